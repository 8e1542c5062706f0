//! The fulfilment service: creates and cancels shipments. `main` only wires.

mod address;
mod participant;

use saga_runtime::participant::{self as runtime, Defaults, ServiceConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = ServiceConfig::parse_with(Defaults {
        name: "saga-participant-fulfilment",
        about: "Fulfilment service: the order saga's `fulfilment` participant",
        http_addr: "0.0.0.0:8084",
        metrics_addr: "0.0.0.0:9104",
        profile_addr: "127.0.0.1:6064",
        database_url: "postgres://postgres@127.0.0.1:5432/saga_fulfilment",
    });
    runtime::run(
        |_| participant::Fulfilment,
        config,
        sqlx::migrate!("../../migrations/fulfilment"),
        |_| runtime::Api::none(),
    )
    .await
}
