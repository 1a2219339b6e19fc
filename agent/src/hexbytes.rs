//! Hexadecimal octets as people paste them: `0x`-prefixed, spaced, colon-separated, or as a
//! single stream (Wireshark's "Copy as Hex Stream").

use crate::{Error, Result};

/// Parses hexadecimal text into octets, ignoring whitespace, `:` separators and `0x`
/// prefixes.
pub fn parse(text: &str) -> Result<Vec<u8>> {
    let digits: Vec<u8> = text
        .split(|c: char| c.is_whitespace() || c == ':')
        .map(|w| {
            w.strip_prefix("0x")
                .or_else(|| w.strip_prefix("0X"))
                .unwrap_or(w)
        })
        .flat_map(str::bytes)
        .collect();
    if let Some(bad) = digits.iter().find(|d| !d.is_ascii_hexdigit()) {
        return Err(Error::Hex(format!(
            "`{}` is not a hexadecimal digit",
            char::from(*bad).escape_default()
        )));
    }
    if !digits.len().is_multiple_of(2) {
        return Err(Error::Hex(format!(
            "odd number of hexadecimal digits ({}): each octet needs two",
            digits.len()
        )));
    }
    hex::decode(&digits).map_err(|e| Error::Hex(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn separators_and_prefixes_are_ignored() {
        assert_eq!(parse("0x0a0B ff\n00:01").unwrap(), [10, 11, 255, 0, 1]);
        assert_eq!(parse("").unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn bad_digits_and_odd_lengths_are_named() {
        assert!(parse("0g").unwrap_err().to_string().contains("`g`"));
        assert!(parse("abc").unwrap_err().to_string().contains("odd number"));
    }
}
