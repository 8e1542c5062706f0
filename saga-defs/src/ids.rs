use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Identifier of one saga instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SagaId(Uuid);

impl SagaId {
    /// A new, time-ordered id (UUIDv7), so ids sort roughly by creation time.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl Default for SagaId {
    fn default() -> Self {
        Self::new()
    }
}

impl From<Uuid> for SagaId {
    fn from(value: Uuid) -> Self {
        Self(value)
    }
}

impl FromStr for SagaId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

impl fmt::Display for SagaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Error for names that do not follow `[a-z][a-z0-9_-]{0,62}`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {what} {value:?}: expected 1-63 characters of a-z, 0-9, '_' or '-', starting with a letter")]
pub struct InvalidName {
    pub what: &'static str,
    pub value: String,
}

fn check_name(what: &'static str, value: &str) -> Result<(), InvalidName> {
    let mut chars = value.chars();
    let ok = matches!(chars.next(), Some('a'..='z'))
        && value.len() <= 63
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(InvalidName { what, value: value.to_owned() })
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(value: impl Into<String>) -> Result<Self, InvalidName> {
                let value = value.into();
                check_name($what, &value)?;
                Ok(Self(value))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidName;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::parse(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> Self {
                value.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }
    };
}

name_type!(
    /// Name of a saga type, such as `order-fulfilment`.
    SagaType, "saga type"
);
name_type!(
    /// Name of a step within a saga definition, such as `charge_payment`.
    StepName, "step name"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accept_lowercase_words_and_refuse_anything_else() {
        assert!(StepName::parse("charge_payment").is_ok());
        assert!(SagaType::parse("order-fulfilment").is_ok());
        for bad in ["", "Charge", "1step", "a b", "x".repeat(64).as_str(), "drop;table"] {
            assert!(StepName::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn saga_ids_round_trip_through_text() {
        let id = SagaId::new();
        assert_eq!(id.to_string().parse::<SagaId>().unwrap(), id);
        assert!("not-a-uuid".parse::<SagaId>().is_err());
    }
}
