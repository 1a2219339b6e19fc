//! STAMP timestamps (RFC 8762 §4.2.1, RFC 8186 §2.3) and the Error Estimate field
//! (RFC 4656 §4.1.2).
//!
//! Time is always passed in (nanoseconds since the Unix epoch); nothing here reads a clock.

use crate::{Error, Result};

/// Seconds between the NTP epoch (1900-01-01) and the Unix epoch (1970-01-01).
pub const NTP_UNIX_OFFSET_SECS: u64 = 2_208_988_800;
const NANOS_PER_SEC: u64 = 1_000_000_000;

/// Which of the two timestamp formats a STAMP timestamp uses: the Z bit of its Error Estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TimestampFormat {
    /// 64-bit NTP: 32 bits of seconds since 1900, 32 bits of binary fraction (Z = 0).
    #[default]
    Ntp,
    /// PTPv2 truncated: 32 bits of seconds since 1970, 32 bits of nanoseconds (Z = 1).
    Ptp,
}

impl TimestampFormat {
    /// The format's name, as used in messages.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ntp => "NTP",
            Self::Ptp => "PTPv2-truncated",
        }
    }

    /// Encodes `unix_nanos` (nanoseconds since 1970) as the raw 64-bit field.
    ///
    /// NTP uses era 0 until 2036-02-07 and era 1 after it, so any time from 1970 to 2104
    /// encodes; the fraction is rounded to the nearest 2^-32 s, finer than a nanosecond, so
    /// [`Self::decode`] gives back exactly the same nanosecond.
    pub fn encode(self, unix_nanos: u64) -> Result<u64> {
        let secs = unix_nanos / NANOS_PER_SEC;
        let nanos = unix_nanos % NANOS_PER_SEC;
        match self {
            Self::Ntp => {
                // The fraction rounds to nearest; 999_999_999.9 ns never rounds up to a whole
                // second because 2^32 * (1e9 - 0.5) / 1e9 < 2^32 - 0.5.
                let frac = ((nanos << 32) + NANOS_PER_SEC / 2) / NANOS_PER_SEC;
                let ntp_secs = (secs + NTP_UNIX_OFFSET_SECS) & 0xffff_ffff;
                // Era 1 ends at 2104; beyond that the pivot below would misread the time.
                if secs + NTP_UNIX_OFFSET_SECS >= (1 << 32) + (1 << 31) {
                    return Err(Error::TimestampOutOfRange {
                        unix_nanos,
                        format: self.name(),
                    });
                }
                Ok((ntp_secs << 32) | frac)
            }
            Self::Ptp => {
                if secs > u64::from(u32::MAX) {
                    return Err(Error::TimestampOutOfRange {
                        unix_nanos,
                        format: self.name(),
                    });
                }
                Ok((secs << 32) | nanos)
            }
        }
    }

    /// Decodes a raw 64-bit field into nanoseconds since 1970.
    ///
    /// NTP seconds with the top bit clear are read as era 1 (2036 to 2104), the others as
    /// era 0 (1968 to 2036), the pivot RFC 4330 §3 recommends. An NTP time before 1970 is
    /// out of range. A PTP nanoseconds field of 10^9 or more is an error.
    pub fn decode(self, raw: u64) -> Result<u64> {
        let hi = raw >> 32;
        let lo = raw & 0xffff_ffff;
        match self {
            Self::Ntp => {
                let era_secs = if hi & 0x8000_0000 == 0 {
                    hi + (1 << 32)
                } else {
                    hi
                };
                let Some(unix_secs) = era_secs.checked_sub(NTP_UNIX_OFFSET_SECS) else {
                    return Err(Error::NtpBeforeUnixEpoch(u32::try_from(hi).unwrap_or(0)));
                };
                let nanos = (lo * NANOS_PER_SEC + (1 << 31)) >> 32;
                Ok(unix_secs * NANOS_PER_SEC + nanos)
            }
            Self::Ptp => {
                let nanos = u32::try_from(lo).unwrap_or(u32::MAX);
                if lo >= NANOS_PER_SEC {
                    return Err(Error::PtpNanosOutOfRange(nanos));
                }
                Ok(hi * NANOS_PER_SEC + lo)
            }
        }
    }
}

/// The 16-bit Error Estimate field (RFC 4656 §4.1.2, Z bit from RFC 8186 §2.3):
///
/// ```text
///  0                   1
///  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |S|Z|   Scale   |   Multiplier  |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// ```
///
/// The error is `Multiplier * 2^-32 * 2^Scale` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorEstimate {
    /// S: the clock is synchronized to UTC by an external source.
    pub synchronized: bool,
    /// Z: the format of the timestamp this estimate describes.
    pub format: TimestampFormat,
    /// Scale, 6 bits (0 to 63).
    pub scale: u8,
    /// Multiplier; RFC 4656 says it MUST NOT be zero, but a peer may still send zero.
    pub multiplier: u8,
}

impl Default for ErrorEstimate {
    /// Unsynchronized, NTP format, and an error of 1 s (Multiplier 1, Scale 32): honest for a
    /// clock nobody has vouched for.
    fn default() -> Self {
        Self {
            synchronized: false,
            format: TimestampFormat::Ntp,
            scale: 32,
            multiplier: 1,
        }
    }
}

impl ErrorEstimate {
    /// Reads the field. Every 16-bit value is a valid field.
    pub const fn from_u16(raw: u16) -> Self {
        Self {
            synchronized: raw & 0x8000 != 0,
            format: if raw & 0x4000 != 0 {
                TimestampFormat::Ptp
            } else {
                TimestampFormat::Ntp
            },
            scale: ((raw >> 8) & 0x3f) as u8,
            multiplier: (raw & 0xff) as u8,
        }
    }

    /// Writes the field. A `scale` above 63 is masked to its 6 bits.
    pub const fn to_u16(self) -> u16 {
        let s = if self.synchronized { 0x8000 } else { 0 };
        let z = match self.format {
            TimestampFormat::Ntp => 0,
            TimestampFormat::Ptp => 0x4000,
        };
        s | z | (((self.scale & 0x3f) as u16) << 8) | self.multiplier as u16
    }

    /// The estimated error in nanoseconds, rounded up; `None` when Multiplier is zero
    /// (RFC 4656 forbids it, so the error is unknown) or the value exceeds `u64`.
    pub fn error_nanos(self) -> Option<u64> {
        if self.multiplier == 0 {
            return None;
        }
        // error_s = m * 2^(scale - 32); in ns: m * 1e9 * 2^scale / 2^32.
        let numerator = (u128::from(self.multiplier) * u128::from(NANOS_PER_SEC)) << self.scale;
        let ns = numerator.div_ceil(1u128 << 32);
        u64::try_from(ns).ok()
    }

    /// The smallest estimate that is at least `error_nanos` (never understates the error),
    /// with the given S bit and timestamp format. An error of zero is written as the
    /// smallest non-zero estimate (Multiplier 1, Scale 0, about 0.23 ns).
    pub fn from_error_nanos(synchronized: bool, format: TimestampFormat, error_nanos: u64) -> Self {
        // error(m, scale) = m * 1e9 * 2^scale / 2^32 ns >= error_nanos
        //   <=> m >= error_nanos * 2^32 / (1e9 * 2^scale); take the smallest scale where
        //   that m fits in 8 bits.
        let target = u128::from(error_nanos) << 32;
        for scale in 0u8..64 {
            let unit = u128::from(NANOS_PER_SEC) << scale;
            let m = target.div_ceil(unit).max(1);
            if let Ok(multiplier) = u8::try_from(m) {
                return Self {
                    synchronized,
                    format,
                    scale,
                    multiplier,
                };
            }
        }
        Self {
            synchronized,
            format,
            scale: 63,
            multiplier: 255,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // RFC 5905 §6: the NTP era 0 prime epoch is 1900-01-01; 1970-01-01 is 2,208,988,800 s later.
    #[test]
    fn ntp_unix_epoch_is_offset_seconds() {
        assert_eq!(TimestampFormat::Ntp.encode(0), Ok(0x83aa_7e80_0000_0000));
        assert_eq!(TimestampFormat::Ntp.decode(0x83aa_7e80_0000_0000), Ok(0));
    }

    #[test]
    fn ntp_half_second_is_top_fraction_bit() {
        let raw = TimestampFormat::Ntp.encode(500_000_000).unwrap();
        assert_eq!(raw & 0xffff_ffff, 0x8000_0000);
    }

    #[test]
    fn ntp_after_2036_uses_era_one() {
        // 2040-01-01T00:00:00Z = 2_208_988_800 s since 1970.
        let unix = 2_208_988_800 * NANOS_PER_SEC;
        let raw = TimestampFormat::Ntp.encode(unix).unwrap();
        assert_eq!(
            raw >> 32,
            (2_208_988_800 + NTP_UNIX_OFFSET_SECS) - (1 << 32)
        );
        assert_eq!(TimestampFormat::Ntp.decode(raw), Ok(unix));
    }

    #[test]
    fn ntp_beyond_2104_is_refused() {
        let unix = ((1u64 << 32) + (1 << 31) - NTP_UNIX_OFFSET_SECS) * NANOS_PER_SEC;
        assert!(TimestampFormat::Ntp.encode(unix).is_err());
        assert!(TimestampFormat::Ntp.encode(unix - NANOS_PER_SEC).is_ok());
    }

    #[test]
    fn ptp_layout_is_seconds_then_nanoseconds() {
        let raw = TimestampFormat::Ptp
            .encode(1_700_000_000_123_456_789)
            .unwrap();
        assert_eq!(raw, (1_700_000_000u64 << 32) + 123_456_789);
    }

    #[test]
    fn ptp_nanoseconds_of_a_billion_is_an_error() {
        assert_eq!(
            TimestampFormat::Ptp.decode(1_000_000_000),
            Err(Error::PtpNanosOutOfRange(1_000_000_000))
        );
        assert_eq!(TimestampFormat::Ptp.decode(999_999_999), Ok(999_999_999));
    }

    #[test]
    fn ptp_beyond_2106_is_refused() {
        assert!(
            TimestampFormat::Ptp
                .encode((1u64 << 32) * NANOS_PER_SEC)
                .is_err()
        );
    }

    // RFC 4656 §4.1.2 bit positions, one field at a time, zero and maximum.
    #[test]
    fn error_estimate_bits() {
        assert!(ErrorEstimate::from_u16(0x8000).synchronized);
        assert_eq!(ErrorEstimate::from_u16(0x4000).format, TimestampFormat::Ptp);
        assert_eq!(ErrorEstimate::from_u16(0x3f00).scale, 63);
        assert_eq!(ErrorEstimate::from_u16(0x00ff).multiplier, 255);
        let zero = ErrorEstimate::from_u16(0);
        assert_eq!(
            zero,
            ErrorEstimate {
                synchronized: false,
                format: TimestampFormat::Ntp,
                scale: 0,
                multiplier: 0
            }
        );
        assert_eq!(zero.error_nanos(), None);
        assert_eq!(ErrorEstimate::from_u16(0xffff).to_u16(), 0xffff);
    }

    #[test]
    fn error_estimate_one_second() {
        // Multiplier 1, Scale 32: exactly 1 s.
        let e = ErrorEstimate::from_u16(0x2001);
        assert_eq!(e.error_nanos(), Some(1_000_000_000));
    }

    #[test]
    fn error_estimate_from_nanos_never_understates() {
        for ns in [
            0,
            1,
            2,
            100,
            999,
            1_000,
            12_345,
            1_000_000,
            7_777_777,
            1_000_000_000,
        ] {
            let e = ErrorEstimate::from_error_nanos(true, TimestampFormat::Ntp, ns);
            let back = e.error_nanos().unwrap();
            assert!(back >= ns, "{ns} -> {back}");
            // and is within one multiplier step (under 1% above 128 ns) of the request
            assert!(back <= ns.max(1) * 101 / 100 + 1, "{ns} -> {back}");
        }
    }

    proptest! {
        #[test]
        fn ntp_round_trip_is_exact(ns in 0u64..((1u64 << 32) + (1 << 31) - NTP_UNIX_OFFSET_SECS) * NANOS_PER_SEC) {
            let raw = TimestampFormat::Ntp.encode(ns).unwrap();
            prop_assert_eq!(TimestampFormat::Ntp.decode(raw), Ok(ns));
        }

        #[test]
        fn ptp_round_trip_is_exact(ns in 0u64..(1u64 << 32) * NANOS_PER_SEC) {
            let raw = TimestampFormat::Ptp.encode(ns).unwrap();
            prop_assert_eq!(TimestampFormat::Ptp.decode(raw), Ok(ns));
        }

        #[test]
        fn error_estimate_round_trip(raw: u16) {
            prop_assert_eq!(ErrorEstimate::from_u16(raw).to_u16(), raw);
        }

        #[test]
        fn error_estimate_covers_request(ns in 0u64..1_000_000_000_000) {
            let e = ErrorEstimate::from_error_nanos(false, TimestampFormat::Ptp, ns);
            prop_assert!(e.error_nanos().unwrap() >= ns);
        }
    }
}
