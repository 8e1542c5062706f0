//! The inventory service: stock per SKU, reserved and released for sagas. `main` only wires.

mod http;
mod participant;

use saga_runtime::participant::{self as runtime, Defaults, ServiceConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = ServiceConfig::parse_with(Defaults {
        name: "saga-participant-inventory",
        about: "Inventory service: the order saga's `inventory` participant",
        http_addr: "0.0.0.0:8082",
        metrics_addr: "0.0.0.0:9102",
        profile_addr: "127.0.0.1:6062",
        database_url: "postgres://postgres@127.0.0.1:5432/saga_inventory",
    });
    runtime::run(|_| participant::Inventory, config, sqlx::migrate!("../../migrations/inventory"), http::api).await
}
