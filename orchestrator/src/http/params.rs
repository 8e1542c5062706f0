//! Parsing and validation of the saga filters, shared by `GET /api/v1/sagas` (query string) and
//! the bulk retry (JSON body). Every error says what is wrong and what is allowed.

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use saga_defs::SagaStatus;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::ApiError;
use crate::store::{ListFilter, Position};

pub(crate) const DEFAULT_LIMIT: i64 = 20;
pub(crate) const MAX_LIMIT: i64 = 500;
/// Longest window or stuck duration accepted.
pub(crate) const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(366 * 24 * 3600);
/// How far past its wake-up time a saga must be to count as past its deadline: the timer loop
/// normally handles a due saga within a fraction of a second.
pub(crate) const OVERDUE_GRACE_SECONDS: i64 = 5;
pub(crate) const MAX_VALUE_LEN: usize = 255;

/// The filter fields, as text, before validation.
#[derive(Debug, Clone, Default, Deserialize, Serialize, utoipa::ToSchema, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct FilterSpec {
    /// One or several statuses (repeat the parameter or separate with commas): RUNNING,
    /// COMPENSATING, COMPLETED, FAILED, NEEDS_ATTENTION.
    #[serde(default)]
    #[param(value_type = Option<String>, example = "FAILED")]
    #[schema(value_type = Option<Vec<String>>)]
    pub(crate) status: Vec<String>,
    /// The saga type, e.g. order-fulfilment.
    pub(crate) saga_type: Option<String>,
    /// The step that failed, or whose compensation needs a human.
    pub(crate) failed_step: Option<String>,
    /// The error code of the failure or of the attention, e.g. PAYMENT_DECLINED.
    pub(crate) failure_code: Option<String>,
    /// The business key (for orders, the order id).
    pub(crate) business_key: Option<String>,
    /// Created at or after this RFC 3339 time.
    pub(crate) created_after: Option<String>,
    /// Created before this RFC 3339 time.
    pub(crate) created_before: Option<String>,
    /// Changed at or after this RFC 3339 time.
    pub(crate) updated_after: Option<String>,
    /// Changed before this RFC 3339 time.
    pub(crate) updated_before: Option<String>,
    /// Stuck: not finished and started longer ago than this duration (e.g. 15m, 2h, 1d).
    pub(crate) stuck_for: Option<String>,
    /// Stuck: not finished and past its step deadline or backoff (by more than 5 s) without
    /// the timer loop having moved it on.
    pub(crate) past_deadline: Option<bool>,
}

pub(crate) const FILTER_PARAMS: &str = "status, saga_type, failed_step, failure_code, business_key, created_after, \
    created_before, updated_after, updated_before, stuck_for, past_deadline";

fn bad(message: String) -> ApiError {
    ApiError::BadRequest(message)
}

/// An RFC 3339 time.
pub(crate) fn parse_time(name: &str, value: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(value.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| bad(format!("{name} must be an RFC 3339 time such as 2026-11-23T10:00:00Z, not {value:?}")))
}

/// A positive duration such as 90s, 15m, 2h or 1d, at most a year.
pub(crate) fn parse_duration(name: &str, value: &str) -> Result<ChronoDuration, ApiError> {
    let parsed = humantime::parse_duration(value.trim())
        .ok()
        .filter(|d| !d.is_zero() && *d <= MAX_DURATION)
        .and_then(|d| ChronoDuration::from_std(d).ok());
    parsed.ok_or_else(|| {
        bad(format!("{name} must be a positive duration of at most 366 days such as 90s, 15m, 2h or 1d, not {value:?}"))
    })
}

pub(crate) fn parse_limit(value: &str) -> Result<i64, ApiError> {
    value
        .trim()
        .parse::<i64>()
        .ok()
        .filter(|l| (1..=MAX_LIMIT).contains(l))
        .ok_or_else(|| bad(format!("limit must be a whole number from 1 to {MAX_LIMIT}, not {value:?}")))
}

fn parse_bool(name: &str, value: &str) -> Result<bool, ApiError> {
    match value.trim() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(bad(format!("{name} must be true or false, not {value:?}"))),
    }
}

/// A text filter: 1 to MAX_VALUE_LEN characters (counted as sent), not only whitespace, trimmed.
fn text(name: &str, value: &Option<String>) -> Result<Option<String>, ApiError> {
    match value.as_deref() {
        None => Ok(None),
        Some(v) if v.chars().count() > MAX_VALUE_LEN => {
            Err(bad(format!("{name} must have at most {MAX_VALUE_LEN} characters")))
        }
        Some(v) if v.trim().is_empty() => Err(bad(format!("{name} must not be empty"))),
        Some(v) => Ok(Some(v.trim().to_owned())),
    }
}

impl FilterSpec {
    /// Sets one query parameter; false if `name` is not a filter.
    pub(crate) fn set(&mut self, name: &str, value: &str) -> Result<bool, ApiError> {
        let slot = match name {
            "status" => {
                self.status.push(value.to_owned());
                return Ok(true);
            }
            "past_deadline" => {
                self.past_deadline = Some(parse_bool(name, value)?);
                return Ok(true);
            }
            "saga_type" => &mut self.saga_type,
            "failed_step" => &mut self.failed_step,
            "failure_code" => &mut self.failure_code,
            "business_key" => &mut self.business_key,
            "created_after" => &mut self.created_after,
            "created_before" => &mut self.created_before,
            "updated_after" => &mut self.updated_after,
            "updated_before" => &mut self.updated_before,
            "stuck_for" => &mut self.stuck_for,
            _ => return Ok(false),
        };
        if slot.is_some() {
            return Err(bad(format!("{name} may be given once")));
        }
        *slot = Some(value.to_owned());
        Ok(true)
    }

    /// The validated filter, with relative durations resolved against `now`.
    pub(crate) fn to_filter(&self, now: DateTime<Utc>) -> Result<ListFilter, ApiError> {
        let mut statuses = Vec::new();
        for status in self.status.iter().flat_map(|s| s.split(',')).map(str::trim).filter(|s| !s.is_empty()) {
            let status: SagaStatus = status
                .to_ascii_uppercase()
                .parse()
                .map_err(|e: saga_defs::status::UnknownStatus| bad(format!("status: {e}")))?;
            if !statuses.contains(&status.as_str().to_owned()) {
                statuses.push(status.as_str().to_owned());
            }
        }
        let time = |name: &str, value: &Option<String>| value.as_deref().map(|v| parse_time(name, v)).transpose();
        let filter = ListFilter {
            statuses,
            saga_type: text("saga_type", &self.saga_type)?,
            failed_step: text("failed_step", &self.failed_step)?,
            failure_code: text("failure_code", &self.failure_code)?,
            business_key: text("business_key", &self.business_key)?,
            created_after: time("created_after", &self.created_after)?,
            created_before: time("created_before", &self.created_before)?,
            updated_after: time("updated_after", &self.updated_after)?,
            updated_before: time("updated_before", &self.updated_before)?,
            unfinished_since: self
                .stuck_for
                .as_deref()
                .map(|v| parse_duration("stuck_for", v).map(|d| now - d))
                .transpose()?,
            overdue_since: self
                .past_deadline
                .unwrap_or(false)
                .then(|| now - ChronoDuration::seconds(OVERDUE_GRACE_SECONDS)),
        };
        // An `_after` at or past its `_before` is an empty range: it matches nothing.
        Ok(filter)
    }
}

/// The form of a page cursor: the position of the last saga of the previous page, as
/// `<microseconds since the epoch>_<saga id>`. Every string of this form is a position, so the
/// OpenAPI document can say exactly which cursors are valid.
pub(crate) const CURSOR_PATTERN: &str = "^[0-9]{1,16}_[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$";

pub(crate) fn encode_cursor(position: Position) -> String {
    format!("{}_{}", position.created_at.timestamp_micros(), position.id.hyphenated())
}

pub(crate) fn decode_cursor(cursor: &str) -> Result<Position, ApiError> {
    let invalid = || bad("cursor is not valid: pass the `next` value of the previous page unchanged".to_owned());
    let (micros, id) = cursor.split_once('_').ok_or_else(invalid)?;
    let well_formed = (1..=16).contains(&micros.len())
        && micros.bytes().all(|b| b.is_ascii_digit())
        && id.len() == 36
        && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f' | b'-'));
    if !well_formed {
        return Err(invalid());
    }
    let created_at = micros.parse::<i64>().ok().and_then(DateTime::from_timestamp_micros).ok_or_else(invalid)?;
    Ok(Position { created_at, id: Uuid::parse_str(id).map_err(|_| invalid())? })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        parse_time("now", "2026-11-23T12:00:00Z").unwrap()
    }

    fn error(result: Result<impl std::fmt::Debug, ApiError>) -> String {
        result.unwrap_err().to_string()
    }

    #[test]
    fn statuses_repeat_or_use_commas_any_case_without_duplicates() {
        let mut spec = FilterSpec::default();
        spec.set("status", "failed,needs_attention").unwrap();
        spec.set("status", "FAILED").unwrap();
        assert_eq!(spec.to_filter(now()).unwrap().statuses, vec!["FAILED", "NEEDS_ATTENTION"]);
    }

    #[test]
    fn bad_filter_values_say_what_is_allowed() {
        let cases: Vec<(&str, &str, &str)> = vec![
            ("status", "DONE", "RUNNING, COMPENSATING, COMPLETED, FAILED, NEEDS_ATTENTION"),
            ("created_after", "yesterday", "RFC 3339"),
            ("stuck_for", "-5m", "positive duration"),
            ("stuck_for", "0s", "positive duration"),
            ("stuck_for", "400d", "at most 366 days"),
            ("past_deadline", "maybe", "true or false"),
            ("saga_type", "", "must not be empty"),
        ];
        for (name, value, want) in cases {
            let mut spec = FilterSpec::default();
            let result = spec.set(name, value).and_then(|_| spec.to_filter(now()));
            let message = error(result);
            assert!(message.contains(want), "{name}={value}: {message}");
        }
        let mut spec = FilterSpec::default();
        spec.set("saga_type", "a").unwrap();
        assert!(error(spec.set("saga_type", "b")).contains("once"));
        let mut spec = FilterSpec::default();
        spec.set("created_after", "2026-11-23T12:00:00Z").unwrap();
        spec.set("created_before", "2026-11-23T11:00:00Z").unwrap();
        let empty = spec.to_filter(now()).unwrap();
        assert!(empty.created_after > empty.created_before, "an empty range is kept as given: it matches nothing");
    }

    #[test]
    fn limits_outside_one_to_the_cap_are_refused() {
        assert_eq!(parse_limit("10").unwrap(), 10);
        assert_eq!(parse_limit("500").unwrap(), 500);
        for bad in ["0", "-1", "501", "1e9", "ten", "99999999999999999999"] {
            assert!(error(parse_limit(bad)).contains("from 1 to 500"), "{bad}");
        }
    }

    #[test]
    fn stuck_and_past_deadline_resolve_against_now() {
        let mut spec = FilterSpec::default();
        spec.set("stuck_for", "15m").unwrap();
        spec.set("past_deadline", "true").unwrap();
        let filter = spec.to_filter(now()).unwrap();
        assert_eq!(filter.unfinished_since, Some(now() - ChronoDuration::minutes(15)));
        assert_eq!(filter.overdue_since, Some(now() - ChronoDuration::seconds(5)));
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let position =
            Position { created_at: parse_time("t", "2026-11-23T12:00:00.123456Z").unwrap(), id: Uuid::now_v7() };
        assert_eq!(decode_cursor(&encode_cursor(position)).unwrap(), position);
        for garbage in [
            "",
            "abc",
            "!!!",
            "12_x",
            "_01a22c84-f44a-7000-8848-b6ba912b3588",
            "1_01A22C84-F44A-7000-8848-B6BA912B3588",
        ] {
            assert!(error(decode_cursor(garbage)).contains("cursor is not valid"), "{garbage}");
        }
    }

    proptest::proptest! {
        /// Every cursor the OpenAPI document calls valid is one (schemathesis sends them).
        #[test]
        fn every_string_of_the_documented_form_is_a_cursor(
            cursor in proptest::string::string_regex(CURSOR_PATTERN.trim_start_matches('^').trim_end_matches('$')).unwrap()
        ) {
            proptest::prop_assert!(decode_cursor(&cursor).is_ok(), "{}", cursor);
        }
    }
}
