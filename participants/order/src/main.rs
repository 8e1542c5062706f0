//! The order service: takes orders over HTTP and starts the order saga through its outbox, and is
//! the saga's `order` participant (verify, approve, reject). `main` only wires.

mod http;
mod participant;

use saga_runtime::participant::{self as runtime, Defaults, ServiceConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = ServiceConfig::parse_with(Defaults {
        name: "saga-participant-order",
        about: "Order service: takes orders and is the order saga's `order` participant",
        http_addr: "0.0.0.0:8081",
        metrics_addr: "0.0.0.0:9101",
        profile_addr: "127.0.0.1:6061",
        database_url: "postgres://postgres@127.0.0.1:5432/saga_order",
    });
    runtime::run(|_| participant::Orders, config, sqlx::migrate!("../../migrations/order"), http::api).await
}
