//! Names that are persisted or travel on the wire. Part of the durable contract.

/// The order saga's type name.
pub const ORDER_FULFILMENT: &str = "order-fulfilment";

/// Topic the participants reply on; the orchestrator consumes it.
pub const REPLIES_TOPIC: &str = "saga-replies";
/// Topic on which services ask the orchestrator to start a saga (written through their outbox).
pub const START_REQUESTS_TOPIC: &str = "saga-start-requests";
/// Lifecycle events topic (started, completed, failed, needs attention).
pub const EVENTS_TOPIC: &str = "saga-events";

/// The commands topic of a participant: `<participant>-commands`.
pub fn commands_topic(participant: &str) -> String {
    format!("{participant}-commands")
}

/// Kafka header carrying the message type tag.
pub const HEADER_MESSAGE_TYPE: &str = "message-type";
/// Kafka header carrying the schema version of the JSON payload.
pub const HEADER_SCHEMA_VERSION: &str = "schema-version";

/// Message type tags.
pub const MESSAGE_TYPE_COMMAND: &str = "saga.command";
pub const MESSAGE_TYPE_REPLY: &str = "saga.reply";
pub const MESSAGE_TYPE_START: &str = "saga.start";
pub const MESSAGE_TYPE_EVENT: &str = "saga.event";
/// The only schema version this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

/// Business and technical error codes used by the order saga's participants.
pub mod codes {
    pub const INVENTORY_UNAVAILABLE: &str = "INVENTORY_UNAVAILABLE";
    pub const PAYMENT_DECLINED: &str = "PAYMENT_DECLINED";
    pub const PAYMENT_GATEWAY_TIMEOUT: &str = "PAYMENT_GATEWAY_TIMEOUT";
    pub const INVALID_ADDRESS: &str = "INVALID_ADDRESS";
    pub const ORDER_NOT_FOUND: &str = "ORDER_NOT_FOUND";
    pub const INVALID_COMMAND: &str = "INVALID_COMMAND";
    pub const UNKNOWN_ACTION: &str = "UNKNOWN_ACTION";
    /// Recorded by the orchestrator when no reply arrived before the step's deadline.
    pub const STEP_TIMEOUT: &str = "STEP_TIMEOUT";
    /// An operator aborted the saga.
    pub const ABORTED: &str = "ABORTED";
    /// Recorded when a completed step has no compensation, so the saga cannot be undone.
    pub const NOT_COMPENSATABLE: &str = "NOT_COMPENSATABLE";
    /// Recorded by the orchestrator for a saga it cannot process (its stored state cannot be
    /// read, or a write of it is refused): parked for a human instead of stopping other sagas.
    pub const UNPROCESSABLE_SAGA: &str = "UNPROCESSABLE_SAGA";
    /// Stored by a participant for an action whose compensation arrived first: a late action is refused.
    pub const ALREADY_COMPENSATED: &str = "ALREADY_COMPENSATED";
}
