//! Saga definitions are data: JSON documents embedded in this crate, parsed and validated when a
//! service starts. The engine interprets them; no saga's control flow is written in code.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::{SagaType, StepName};

/// The definitions this build ships, as `(file name, JSON text)`.
pub const EMBEDDED: &[(&str, &str)] =
    &[("order-fulfilment.v1.json", include_str!("../definitions/order-fulfilment.v1.json"))];

/// How often and how patiently a step (or its compensation) is retried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. `null` means "until it succeeds".
    pub max_attempts: Option<u32>,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
    /// Fraction of the delay that is randomised away, 0 (none) to 1 (full jitter).
    #[serde(default)]
    pub jitter: f64,
}

fn default_multiplier() -> f64 {
    2.0
}

impl RetryPolicy {
    /// Whether another attempt may follow attempt number `attempt` (1-based).
    pub fn allows_another(&self, attempt: u32) -> bool {
        self.max_attempts.is_none_or(|max| attempt < max)
    }

    /// Delay before the attempt after `attempt`: exponential, capped, with `random` in [0, 1)
    /// taking away up to `jitter` of it. Pure, so the caller supplies the randomness.
    pub fn backoff(&self, attempt: u32, random: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(63) as i32;
        let raw = self.initial_backoff_ms as f64 * self.multiplier.powi(exponent);
        let capped = raw.min(self.max_backoff_ms as f64);
        let jittered = capped * (1.0 - self.jitter * random.clamp(0.0, 1.0));
        Duration::from_millis(jittered.max(0.0).round() as u64)
    }
}

/// The undo of a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompensationDefinition {
    pub action: String,
    pub timeout_ms: u64,
    pub retry: RetryPolicy,
}

/// One step of a saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepDefinition {
    pub name: StepName,
    /// The participant service that executes it; its commands go to `<participant>-commands`.
    pub participant: String,
    pub action: String,
    pub timeout_ms: u64,
    pub retry: RetryPolicy,
    #[serde(default)]
    pub compensation: Option<CompensationDefinition>,
}

impl StepDefinition {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// What a command of this `kind` asks the participant to do, and its timeout in
    /// milliseconds; `None` for a compensation the step does not have.
    pub fn command(&self, kind: crate::StepKind) -> Option<(&str, u64)> {
        match kind {
            crate::StepKind::Action => Some((self.action.as_str(), self.timeout_ms)),
            crate::StepKind::Compensation => self.compensation.as_ref().map(|c| (c.action.as_str(), c.timeout_ms)),
        }
    }
}

/// A saga type at one version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SagaDefinition {
    pub name: SagaType,
    pub version: u32,
    #[serde(default)]
    pub description: String,
    pub steps: Vec<StepDefinition>,
}

#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    #[error("definition {file}: not valid JSON for a saga definition: {source}")]
    Parse {
        file: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("definition {saga} v{version}: {problem}")]
    Invalid { saga: String, version: u32, problem: String },
    #[error("saga {saga} v{version} is defined twice")]
    Duplicate { saga: String, version: u32 },
}

impl SagaDefinition {
    /// Parses and validates one definition document.
    pub fn from_json(file: &str, text: &str) -> Result<Self, DefinitionError> {
        let definition: SagaDefinition =
            serde_json::from_str(text).map_err(|source| DefinitionError::Parse { file: file.to_owned(), source })?;
        definition.validate()?;
        Ok(definition)
    }

    /// Checks what the engine relies on. A definition that passes can be executed.
    pub fn validate(&self) -> Result<(), DefinitionError> {
        let invalid =
            |problem: String| DefinitionError::Invalid { saga: self.name.to_string(), version: self.version, problem };
        if self.version == 0 {
            return Err(invalid("version must be 1 or more".into()));
        }
        if self.steps.is_empty() {
            return Err(invalid("a saga needs at least one step".into()));
        }
        let mut seen = HashSet::new();
        let mut past_pivot = false;
        for step in &self.steps {
            if !seen.insert(step.name.as_str()) {
                return Err(invalid(format!("step {} appears twice", step.name)));
            }
            if step.participant.is_empty() || step.action.is_empty() {
                return Err(invalid(format!("step {} needs a participant and an action", step.name)));
            }
            if step.timeout_ms == 0 {
                return Err(invalid(format!("step {}: timeout_ms must be more than 0", step.name)));
            }
            check_policy(&step.retry).map_err(|p| invalid(format!("step {}: {p}", step.name)))?;
            if let Some(compensation) = &step.compensation {
                if past_pivot {
                    return Err(invalid(format!(
                        "step {} has a compensation but follows a step without one; \
                         compensatable steps must all come first",
                        step.name
                    )));
                }
                if compensation.action.is_empty() || compensation.timeout_ms == 0 {
                    return Err(invalid(format!(
                        "step {}: a compensation needs an action and a timeout_ms above 0",
                        step.name
                    )));
                }
                check_policy(&compensation.retry)
                    .map_err(|p| invalid(format!("step {} compensation: {p}", step.name)))?;
            } else {
                if past_pivot && step.retry.max_attempts.is_some() {
                    return Err(invalid(format!(
                        "step {} follows a step that cannot be compensated, so it must be retried until it \
                         succeeds (max_attempts: null)",
                        step.name
                    )));
                }
                past_pivot = true;
            }
        }
        Ok(())
    }

    pub fn step(&self, index: usize) -> Option<&StepDefinition> {
        self.steps.get(index)
    }

    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name.as_str() == name)
    }
}

fn check_policy(policy: &RetryPolicy) -> Result<(), String> {
    if policy.max_attempts == Some(0) {
        return Err("max_attempts must be 1 or more (or null for unlimited)".into());
    }
    if policy.initial_backoff_ms > policy.max_backoff_ms {
        return Err("initial_backoff_ms must not exceed max_backoff_ms".into());
    }
    if !(policy.multiplier >= 1.0 && policy.multiplier.is_finite()) {
        return Err("multiplier must be a finite number of 1 or more".into());
    }
    if !(0.0..=1.0).contains(&policy.jitter) {
        return Err("jitter must be between 0 and 1".into());
    }
    Ok(())
}

/// Every loaded definition, by type and version.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    by_type: BTreeMap<SagaType, BTreeMap<u32, SagaDefinition>>,
}

impl Registry {
    /// Loads and validates the definitions this build ships.
    pub fn embedded() -> Result<Self, DefinitionError> {
        Self::from_documents(EMBEDDED.iter().copied())
    }

    /// The shipped definitions plus `extra` documents (name, JSON text), e.g. read from a
    /// directory at start-up. A type and version defined twice is an error.
    pub fn embedded_with<'a>(extra: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self, DefinitionError> {
        Self::from_documents(EMBEDDED.iter().copied().chain(extra))
    }

    pub fn from_documents<'a>(
        documents: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, DefinitionError> {
        let mut registry = Registry::default();
        for (file, text) in documents {
            let definition = SagaDefinition::from_json(file, text)?;
            let versions = registry.by_type.entry(definition.name.clone()).or_default();
            if versions.contains_key(&definition.version) {
                return Err(DefinitionError::Duplicate {
                    saga: definition.name.to_string(),
                    version: definition.version,
                });
            }
            versions.insert(definition.version, definition);
        }
        Ok(registry)
    }

    /// The newest version of a saga type: what new sagas of that type run.
    pub fn latest(&self, saga_type: &str) -> Option<&SagaDefinition> {
        self.by_type
            .iter()
            .find(|(name, _)| name.as_str() == saga_type)
            .and_then(|(_, versions)| versions.values().next_back())
    }

    /// A given version: what a running saga keeps using until it ends.
    pub fn get(&self, saga_type: &str, version: u32) -> Option<&SagaDefinition> {
        self.by_type
            .iter()
            .find(|(name, _)| name.as_str() == saga_type)
            .and_then(|(_, versions)| versions.get(&version))
    }

    pub fn all(&self) -> impl Iterator<Item = &SagaDefinition> {
        self.by_type.values().flat_map(|versions| versions.values())
    }

    /// Every participant named by any definition.
    pub fn participants(&self) -> Vec<String> {
        let mut names: Vec<String> = self.all().flat_map(|d| d.steps.iter().map(|s| s.participant.clone())).collect();
        names.sort();
        names.dedup();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_order_saga_loads_with_five_steps_in_order() {
        let registry = Registry::embedded().unwrap();
        let saga = registry.latest(crate::contract::ORDER_FULFILMENT).unwrap();
        let names: Vec<&str> = saga.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["verify_order", "reserve_inventory", "charge_payment", "create_shipment", "approve_order"]);
        assert_eq!(saga.steps[2].retry.max_attempts, Some(3), "payment is tried 3 times");
        assert!(saga.steps[4].compensation.is_none());
        assert_eq!(registry.participants(), ["fulfilment", "inventory", "order", "payment"]);
    }

    fn doc(steps: &str) -> String {
        format!(r#"{{"name":"s","version":1,"steps":[{steps}]}}"#)
    }

    const POLICY: &str =
        r#"{"max_attempts":3,"initial_backoff_ms":10,"max_backoff_ms":100,"multiplier":2.0,"jitter":0.0}"#;

    #[test]
    fn invalid_definitions_are_refused_with_the_reason() {
        let step = |name: &str, extra: &str| {
            format!(r#"{{"name":"{name}","participant":"p","action":"a","timeout_ms":100,"retry":{POLICY}{extra}}}"#)
        };
        let comp = format!(r#","compensation":{{"action":"undo","timeout_ms":100,"retry":{POLICY}}}"#);
        let cases = [
            (doc(""), "at least one step"),
            (doc(&format!("{},{}", step("a", ""), step("a", ""))), "appears twice"),
            (doc(&format!("{},{}", step("a", ""), step("b", &comp))), "compensatable steps must all come first"),
            (doc(&format!("{},{}", step("a", ""), step("b", ""))), "retried until it succeeds"),
            (doc(&step("a", "").replace("\"timeout_ms\":100", "\"timeout_ms\":0")), "timeout_ms"),
            (doc(&step("a", "").replace("\"jitter\":0.0", "\"jitter\":2.0")), "jitter"),
            (doc(&step("a", "").replace("\"max_attempts\":3", "\"max_attempts\":0")), "max_attempts"),
            (
                doc(&step("a", "").replace("\"initial_backoff_ms\":10", "\"initial_backoff_ms\":1000")),
                "initial_backoff_ms",
            ),
        ];
        for (text, expected) in cases {
            let err = SagaDefinition::from_json("t.json", &text).unwrap_err().to_string();
            assert!(err.contains(expected), "{err:?} should mention {expected:?}");
        }
        let unknown_field = r#"{"name":"s","version":1,"stepz":[]}"#;
        assert!(matches!(SagaDefinition::from_json("t.json", unknown_field), Err(DefinitionError::Parse { .. })));
    }

    #[test]
    fn two_documents_with_the_same_type_and_version_are_refused() {
        let text = include_str!("../definitions/order-fulfilment.v1.json");
        let err = Registry::from_documents([("a", text), ("b", text)]).unwrap_err();
        assert!(matches!(err, DefinitionError::Duplicate { .. }));
    }

    #[test]
    fn backoff_grows_exponentially_up_to_the_cap_and_jitter_only_shortens_it() {
        let policy = RetryPolicy {
            max_attempts: Some(5),
            initial_backoff_ms: 100,
            max_backoff_ms: 1000,
            multiplier: 2.0,
            jitter: 0.5,
        };
        let ms = |attempt, random| policy.backoff(attempt, random).as_millis();
        assert_eq!([ms(1, 0.0), ms(2, 0.0), ms(3, 0.0), ms(4, 0.0), ms(5, 0.0)], [100, 200, 400, 800, 1000]);
        assert_eq!(ms(1, 0.999_999), 50);
        assert_eq!(ms(60, 0.0), 1000, "huge attempt numbers stay capped");
        assert!(policy.allows_another(4));
        assert!(!policy.allows_another(5));
        let forever = RetryPolicy { max_attempts: None, ..policy };
        assert!(forever.allows_another(u32::MAX - 1));
    }
}
