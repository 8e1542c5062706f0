//! Fault injection for the fault-injection suite and chaos runs, with the `fail` crate.
//!
//! Named crash points sit where a crash is most dangerous (between a commit and a publish, after
//! a publish before the outbox row is deleted, after a commit before the consumer's offset is
//! stored). They do nothing unless the `FAILPOINTS` environment variable configures them, e.g.
//! `FAILPOINTS='outbox.after_publish=3*off->return'` lets three batches through and aborts the
//! process (as a SIGKILL would) on the fourth. A service logs a warning at start-up when any is
//! configured. See `docs/reliability.md` for the list.

pub use fail;

/// Every crash point, for documentation and for checking `FAILPOINTS`.
pub const CRASH_POINTS: &[&str] = &[
    "outbox.before_publish",
    "outbox.after_publish",
    "consumer.after_commit",
    "participant.after_handle",
    // Not crashes: `task.panic=return(NAME)` panics the background task NAME (see
    // `supervisor`), `participant.panic_on_input=return(MARKER)` panics while handling a
    // command whose input contains MARKER, and `participant.fail_on_input=return(MARKER)` fails
    // its transaction every time (see `participant`).
    "task.panic",
    "participant.panic_on_input",
    "participant.fail_on_input",
    // `consumer.stall=1*return(starve)` or `return(leave)`: a consumer that stops fetching or
    // leaves its group, for the group watch to notice (see `consumer`).
    "consumer.stall",
];

/// Applies `FAILPOINTS` when it is set. A name that is not a crash point is an error, so a typo
/// cannot silently turn a fault test into a plain run.
pub fn setup() -> anyhow::Result<()> {
    let Ok(spec) = std::env::var("FAILPOINTS") else { return Ok(()) };
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, actions) =
            entry.split_once('=').ok_or_else(|| anyhow::anyhow!("FAILPOINTS entry {entry:?} is not name=actions"))?;
        if !CRASH_POINTS.contains(&name.trim()) {
            anyhow::bail!("FAILPOINTS names {name:?}, which is not one of {CRASH_POINTS:?}");
        }
        fail::cfg(name.trim(), actions.trim()).map_err(|e| anyhow::anyhow!("FAILPOINTS entry {entry:?}: {e}"))?;
        tracing::warn!(failpoint = name.trim(), actions = actions.trim(), "fault injection configured");
    }
    Ok(())
}

/// A point where the process may be made to crash (abort, as if SIGKILLed: no shutdown, no
/// offset commit, no flush). Configured `return` means "crash here".
#[macro_export]
macro_rules! crash_point {
    ($name:literal) => {
        $crate::faults::fail::fail_point!($name, |_| {
            eprintln!("fault injection: crashing at {}", $name);
            std::process::abort()
        })
    };
}

pub use crate::crash_point;
