//! Everything the orchestrator and the participants agree on, with no I/O:
//! saga definitions (loaded from data and validated), the saga state machine,
//! the message contracts and the names that are persisted or put on the wire.
//!
//! Names in [`contract`] and the serde representations in [`messages`] are part of
//! the durable contract: renaming one needs a migration of stored data and topics.

pub mod contract;
pub mod definition;
pub mod ids;
pub mod machine;
pub mod messages;
pub mod status;
pub mod storable;

pub use definition::{DefinitionError, Registry, RetryPolicy, SagaDefinition, StepDefinition};
pub use ids::{SagaId, SagaType, StepName};
pub use machine::{
    apply, start, AttemptOutcome, Clock, SagaEvent, SagaState, StepCommand, Transition, TransitionError, Waiting,
};
pub use messages::{
    CommandEnvelope, LifecycleEventType, ReplyEnvelope, ReplyOutcome, SagaLifecycleEvent, StartSagaRequest, StepError,
};
pub use status::{SagaStatus, StepKind};
