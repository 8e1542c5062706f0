//! The notification service: consumes the orchestrator's lifecycle events (`saga-events`) and
//! records the customer notification for every order saga that completed or failed (sending is
//! simulated: the notification is stored as sent). One notification per event, however often the
//! event is delivered; `GET /api/v1/notifications?order_id=` lists an order's. `main` only wires.

mod events;
mod http;

use saga_runtime::participant::{run_service, Defaults, Service, ServiceConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = ServiceConfig::parse_with(Defaults {
        name: "saga-notification",
        about: "Notification service: records the customer notification of every completed or failed order",
        http_addr: "0.0.0.0:8085",
        metrics_addr: "0.0.0.0:9105",
        profile_addr: "127.0.0.1:6065",
        database_url: "postgres://postgres@127.0.0.1:5432/saga_notification",
    });
    let service = Service {
        name: "notification",
        description:
            "Records the customer notification of every order saga that completed or failed, from saga-events."
                .to_owned(),
        migrations: vec![saga_runtime::db::outbox_migrations(), sqlx::migrate!("../../migrations/notification")],
        consumes: vec![saga_defs::contract::EVENTS_TOPIC.to_owned()],
        also_creates: Vec::new(),
        retention: Vec::new(),
        describe: events::describe_metrics,
    };
    run_service(service, config, events::Notifier::new, http::api).await
}
