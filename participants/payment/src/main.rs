//! The payment service: charges and refunds through a simulated gateway. `main` only wires.

mod gateway;
mod participant;

use saga_runtime::participant::{self as runtime, Defaults, ServiceConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = ServiceConfig::parse_with(Defaults {
        name: "saga-participant-payment",
        about: "Payment service: the order saga's `payment` participant, with a simulated gateway",
        http_addr: "0.0.0.0:8083",
        metrics_addr: "0.0.0.0:9103",
        profile_addr: "127.0.0.1:6063",
        database_url: "postgres://postgres@127.0.0.1:5432/saga_payment",
    });
    runtime::run(
        |pool| participant::Payments { gateway: pool },
        config,
        sqlx::migrate!("../../migrations/payment"),
        |_| runtime::Api::none(),
    )
    .await
}
