//! Bit rates as engineers and `tc` write them: `50mbit`, `1gbit`, `500kbit`, `1000000`
//! (bits per second). Units are decimal (1 mbit = 10^6 bits). `mbps` and friends are
//! refused, because `tc` reads them as megabytes per second and Azure's "Mbps" as
//! megabits: the ambiguity is not worth a wrong circuit size.

use std::fmt;

/// A rate in bits per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Rate(pub u64);

impl Rate {
    pub const fn bps(self) -> u64 {
        self.0
    }
}

/// Parses `50mbit`, `1.5gbit`, `800kbit`, `1000000` or `100bit`.
pub fn parse(v: &str) -> Result<Rate, String> {
    let s = v.trim().to_ascii_lowercase();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    // `Mbit/s`, as we print rates, reads back.
    let unit = unit.trim();
    let unit = unit.strip_suffix("/s").unwrap_or(unit);
    let mult: f64 = match unit {
        "" | "bit" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        "tbit" => 1e12,
        u if u.ends_with("bps") || u.ends_with('b') => {
            return Err(format!(
                "rate `{v}`: write bits as kbit, mbit or gbit (like 50mbit); `{unit}` is ambiguous (tc reads mbps as megabytes per second)"
            ));
        }
        _ => {
            return Err(format!(
                "rate `{v}`: unknown unit `{unit}`; write it like 50mbit or 1gbit"
            ));
        }
    };
    let x: f64 = num
        .parse()
        .map_err(|_| format!("rate `{v}` is not a number with a unit, like 50mbit"))?;
    let bits = x * mult;
    if !(1.0..=1e15).contains(&bits) {
        return Err(format!(
            "rate `{v}` is out of range (1 bit/s to 1,000 tbit)"
        ));
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(Rate(bits.round() as u64))
}

/// Parses a fraction as `95%` or `0.95`, between 0 and 1.
pub fn parse_fraction(v: &str) -> Result<f64, String> {
    let (num, scale) = v.strip_suffix('%').map_or((v, 1.0), |n| (n, 100.0));
    let x: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{v}` is not a fraction: write 95% or 0.95"))?;
    let f = x / scale;
    if (0.0..=1.0).contains(&f) {
        Ok(f)
    } else {
        Err(format!("`{v}` is not between 0% and 100%"))
    }
}

impl fmt::Display for Rate {
    #[allow(clippy::cast_precision_loss)]
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as f64;
        if b >= 1e9 {
            write!(f, "{:.2} Gbit/s", b / 1e9)
        } else if b >= 1e6 {
            write!(f, "{:.1} Mbit/s", b / 1e6)
        } else if b >= 1e3 {
            write!(f, "{:.1} kbit/s", b / 1e3)
        } else {
            write!(f, "{} bit/s", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_in_decimal_bits() {
        assert_eq!(parse("50mbit"), Ok(Rate(50_000_000)));
        assert_eq!(parse("1gbit"), Ok(Rate(1_000_000_000)));
        assert_eq!(parse("1.5Gbit"), Ok(Rate(1_500_000_000)));
        assert_eq!(parse("800kbit"), Ok(Rate(800_000)));
        assert_eq!(parse("1000000"), Ok(Rate(1_000_000)));
        assert_eq!(parse("100bit"), Ok(Rate(100)));
        assert_eq!(parse("48.6 Mbit/s"), Ok(Rate(48_600_000)), "our own output");
    }

    #[test]
    fn ambiguous_and_bad_rates_are_refused_with_the_fix() {
        for v in ["50mbps", "50MB", "1gbps", "10kbps"] {
            let e = parse(v).unwrap_err();
            assert!(e.contains("50mbit") && e.contains("ambiguous"), "{v}: {e}");
        }
        assert!(parse("fast").unwrap_err().contains("like 50mbit"));
        assert!(parse("50furlongs").unwrap_err().contains("unknown unit"));
        assert!(parse("0mbit").unwrap_err().contains("out of range"));
        assert!(parse("").is_err());
    }

    #[test]
    fn fractions_parse_as_percentages_or_decimals() {
        assert_eq!(parse_fraction("95%"), Ok(0.95));
        assert_eq!(parse_fraction("0.25"), Ok(0.25));
        assert!(
            parse_fraction("120%")
                .unwrap_err()
                .contains("between 0% and 100%")
        );
        assert!(parse_fraction("most").unwrap_err().contains("95% or 0.95"));
    }

    #[test]
    fn rates_print_in_the_nearest_unit() {
        assert_eq!(Rate(48_612_345).to_string(), "48.6 Mbit/s");
        assert_eq!(Rate(2_300_000_000).to_string(), "2.30 Gbit/s");
        assert_eq!(Rate(640_000).to_string(), "640.0 kbit/s");
        assert_eq!(Rate(12).to_string(), "12 bit/s");
    }
}
