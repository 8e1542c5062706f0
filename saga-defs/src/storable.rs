//! Which JSON values survive a round trip through Postgres `jsonb` and back out of our API
//! unchanged. Everything that is stored is checked with [`check`] where it enters (the HTTP
//! APIs, the start-request and reply consumers, the participants' command loop), so that a value
//! that was accepted can always be read back.
//!
//! - **NUL** (`\u0000`) in a string or an object key does not: `jsonb` and `text` refuse it
//!   outright, so it is refused at the door with a 400 that says where.
//! - **Numbers** are read as IEEE-754 doubles (I-JSON, RFC 7493), and `jsonb` stores them as
//!   exact decimals that it prints without an exponent: `1.7976931348623157e308` comes back as a
//!   309-digit integer. serde_json reads such digits back as the same double only with its
//!   `float_roundtrip` feature (the workspace turns it on): without it, it called the largest
//!   doubles "number out of range" and read others back one bit off. [`check`] still does what
//!   Postgres does to each number and reads the result back, so that a build or a value for which
//!   that fails is refused instead of stored unreadable. Numbers beyond the double range
//!   (`1e400`) are refused by the JSON parser itself.
//!
//! Integers that fit in 64 bits are stored and read back exactly. A longer integer, or a decimal
//! with more than 17 significant digits, is read as the nearest double, as JavaScript does; send
//! such values as strings when every digit matters. Postgres may print an integral double
//! without its exponent (`5e18` as `5000000000000000000`): the same JSON value.

use serde_json::Value;

/// Why a value cannot be stored, and where in it: a JSON Pointer (RFC 6901).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at {pointer:?}: {reason}")]
pub struct Unstorable {
    pub pointer: String,
    pub reason: String,
}

/// Refused by `jsonb` and `text` alike.
const NUL: char = '\0';

/// Checks that `value` survives a round trip through Postgres unchanged.
pub fn check(value: &Value) -> Result<(), Unstorable> {
    let mut pointer = String::new();
    walk(value, &mut pointer)
}

/// Checks a single text value (a header, a query parameter, a path segment, a column).
pub fn check_text(text: &str) -> Result<(), String> {
    if text.contains(NUL) {
        Err("text may not contain the NUL character (\\u0000)".to_owned())
    } else {
        Ok(())
    }
}

fn walk(value: &Value, pointer: &mut String) -> Result<(), Unstorable> {
    let fail = |pointer: &str, reason: String| Unstorable { pointer: pointer.to_owned(), reason };
    match value {
        Value::String(s) => check_text(s).map_err(|r| fail(pointer, r)),
        Value::Number(n) => check_number(n).map_err(|r| fail(pointer, r)),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = pointer.len();
                pointer.push('/');
                pointer.push_str(&i.to_string());
                walk(item, pointer)?;
                pointer.truncate(len);
            }
            Ok(())
        }
        Value::Object(map) => {
            for (key, item) in map {
                let len = pointer.len();
                pointer.push('/');
                pointer.push_str(&key.replace('~', "~0").replace('/', "~1"));
                check_text(key).map_err(|r| fail(pointer, format!("object key: {r}")))?;
                walk(item, pointer)?;
                pointer.truncate(len);
            }
            Ok(())
        }
        Value::Null | Value::Bool(_) => Ok(()),
    }
}

fn check_number(n: &serde_json::Number) -> Result<(), String> {
    if n.is_i64() || n.is_u64() {
        return Ok(());
    }
    let Some(x) = n.as_f64() else { return Err(format!("number {n} is not a finite double")) };
    let stored = postgres_rendering(&n.to_string());
    match serde_json::from_str::<Value>(&stored).ok().and_then(|v| v.as_f64()) {
        Some(back) if back == x => Ok(()),
        _ => Err(format!("number {n} cannot be stored and read back exactly; send it as a string")),
    }
}

/// Rewrites every number with no fractional part within ±2⁵³ (`2.0`, `1e3`) as an integer, as
/// JSON Schema counts them, so that an integer field accepts `2.0`. True if anything changed.
pub fn whole_numbers_as_integers(value: &mut Value) -> bool {
    const EXACT: f64 = 9_007_199_254_740_992.0;
    match value {
        Value::Number(n) if !n.is_i64() && !n.is_u64() => match n.as_f64() {
            Some(x) if x.fract() == 0.0 && x.abs() <= EXACT => {
                *value = Value::from(x as i64);
                true
            }
            _ => false,
        },
        // Every element is visited (no short circuit: each may change).
        Value::Array(items) => items.iter_mut().map(whole_numbers_as_integers).filter(|changed| *changed).count() > 0,
        Value::Object(map) => map.values_mut().map(whole_numbers_as_integers).filter(|changed| *changed).count() > 0,
        _ => false,
    }
}

/// How Postgres prints a JSON number it stored: the exact decimal, without an exponent
/// (`1.5e3` → `1500`, `2.5e-3` → `0.0025`). `text` is a JSON number as serde_json writes it.
pub fn postgres_rendering(text: &str) -> String {
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(at) => (&text[..at], text[at + 1..].parse::<i64>().unwrap_or(0)),
        None => (text, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{int_part}{frac_part}");
    // The decimal point sits after `point` digits of `digits`.
    let point = int_part.len() as i64 + exponent;
    let (int_digits, frac_digits) = if point <= 0 {
        ("0".to_owned(), format!("{}{digits}", "0".repeat(point.unsigned_abs() as usize)))
    } else if point as usize >= digits.len() {
        (format!("{digits}{}", "0".repeat(point as usize - digits.len())), String::new())
    } else {
        (digits[..point as usize].to_owned(), digits[point as usize..].to_owned())
    };
    let int_digits = int_digits.trim_start_matches('0');
    let int_digits = if int_digits.is_empty() { "0" } else { int_digits };
    let sign = if negative { "-" } else { "" };
    if frac_digits.is_empty() {
        format!("{sign}{int_digits}")
    } else {
        format!("{sign}{int_digits}.{frac_digits}")
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn postgres_prints_numbers_as_plain_decimals() {
        for (given, printed) in [
            ("1500", "1500"),
            ("1.5e3", "1500"),
            ("1.5E3", "1500"),
            ("2.5e-3", "0.0025"),
            ("-2.5e-3", "-0.0025"),
            ("0.1", "0.1"),
            ("1e0", "1"),
            ("12.25", "12.25"),
            ("1e-7", "0.0000001"),
            ("-0.0", "-0.0"),
        ] {
            assert_eq!(postgres_rendering(given), printed, "{given}");
        }
        assert_eq!(postgres_rendering("1.7976931348623157e308").len(), 309);
    }

    #[test]
    fn ordinary_values_are_storable() {
        let value = json!({"a": [1, -2, 0.1, 1e300, -1e-300, 18446744073709551615u64, i64::MIN, "x", null, true],
                           "b": {"c": "ünïcødé ✓", "": 5e-324}});
        assert_eq!(check(&value), Ok(()));
    }

    #[test]
    fn nul_anywhere_is_refused_with_its_place() {
        let error = check(&json!({"items": [{"sku": "A\u{0}B"}]})).unwrap_err();
        assert_eq!(error.pointer, "/items/0/sku");
        assert!(error.reason.contains("NUL"), "{error}");
        let error = check(&json!({"a/b": {"k\u{0}": 1}})).unwrap_err();
        assert_eq!(error.pointer, "/a~1b/k\u{0}");
        assert!(error.reason.starts_with("object key"), "{error}");
    }

    #[test]
    fn the_largest_doubles_survive_postgres_digits() {
        for text in ["1.7976931348623157e308", "-1.7976931348623157e308", "6.755072567434262e201", "5e-324"] {
            let value: Value = serde_json::from_str(text).unwrap();
            assert_eq!(check(&value), Ok(()), "{text}");
            let back: Value = serde_json::from_str(&postgres_rendering(&value.to_string())).unwrap();
            assert_eq!(back.as_f64(), value.as_f64(), "{text}");
        }
    }

    #[test]
    fn whole_numbers_become_integers_and_the_rest_stays() {
        let mut value = json!({"a": 2.0, "b": [1e3, 0.5, -0.0], "c": 1e300, "d": 7});
        assert!(whole_numbers_as_integers(&mut value));
        assert_eq!(value, json!({"a": 2, "b": [1000, 0.5, 0], "c": 1e300, "d": 7}));
        assert!(!whole_numbers_as_integers(&mut value), "nothing left to change");
    }

    #[test]
    fn check_text_refuses_only_nul() {
        assert!(check_text("tab\tnew\nline ✓").is_ok());
        assert!(check_text("a\0").is_err());
    }
}
