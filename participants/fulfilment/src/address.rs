//! Which addresses can be delivered to. The rules are deliberately simple and documented:
//! a known country (ISO 3166 alpha-2 from [`COUNTRIES`]), a street line, a city, and a postal
//! code that is not all zeros.

use serde::Deserialize;

/// Countries the carrier serves.
pub(crate) const COUNTRIES: &[&str] =
    &["US", "CA", "GB", "IE", "DE", "FR", "NL", "BE", "ES", "IT", "SE", "DK", "NO", "FI", "AT", "CH", "PL", "PT"];

#[derive(Debug, Deserialize)]
pub(crate) struct Address {
    #[serde(default)]
    pub(crate) line1: String,
    #[serde(default)]
    pub(crate) city: String,
    #[serde(default)]
    pub(crate) postal_code: String,
    #[serde(default)]
    pub(crate) country: String,
}

/// Why an address cannot be delivered to, or `Ok`.
pub(crate) fn check(address: &Address) -> Result<(), String> {
    if address.line1.trim().is_empty() || address.city.trim().is_empty() {
        return Err("the address needs a street line and a city".into());
    }
    if !COUNTRIES.contains(&address.country.as_str()) {
        return Err(format!("the carrier does not deliver to country {:?}", address.country));
    }
    let postal = address.postal_code.trim();
    if postal.is_empty() || postal.chars().all(|c| c == '0' || c == ' ' || c == '-') {
        return Err(format!("postal code {:?} does not exist", address.postal_code));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(country: &str, postal_code: &str, line1: &str) -> Address {
        Address {
            line1: line1.into(),
            city: "Springfield".into(),
            postal_code: postal_code.into(),
            country: country.into(),
        }
    }

    #[test]
    fn deliverable_addresses_pass_and_the_rest_say_why_not() {
        assert!(check(&address("US", "62701", "1 Main St")).is_ok());
        assert!(check(&address("ZZ", "62701", "1 Main St")).unwrap_err().contains("country"));
        assert!(check(&address("US", "00000", "1 Main St")).unwrap_err().contains("postal code"));
        assert!(check(&address("US", "62701", " ")).unwrap_err().contains("street"));
    }
}
