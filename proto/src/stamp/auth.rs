//! Authenticated mode (RFC 8762 §4.2.2, §4.3.2, §4.4): HMAC-SHA-256 truncated to 128 bits
//! (RFC 4868) over every octet of the base packet before the HMAC field.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{Error, Result};

/// Length of the truncated HMAC on the wire.
pub const HMAC_LEN: usize = 16;
/// Shortest key accepted: RFC 4868 §2.1.1 keys HMAC-SHA-256-128 with 256 bits; we refuse
/// anything under 128 bits, which no brute force reaches.
pub const MIN_KEY_LEN: usize = 16;

/// A shared STAMP key, keyed once so that each packet costs one HMAC, not a key schedule.
/// Two keys are equal when their octets are (compared by SHA-256 digest, so the key itself
/// is not kept beside its schedule).
#[derive(Clone)]
pub struct AuthKey {
    mac: Hmac<Sha256>,
    digest: [u8; 32],
}

impl PartialEq for AuthKey {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

impl Eq for AuthKey {}

impl std::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthKey(..)")
    }
}

impl AuthKey {
    /// Keys HMAC-SHA-256 with `key`, which must hold at least [`MIN_KEY_LEN`] octets.
    pub fn new(key: &[u8]) -> Result<Self> {
        if key.len() < MIN_KEY_LEN {
            return Err(Error::KeyTooShort {
                len: key.len(),
                min: MIN_KEY_LEN,
            });
        }
        let mac = Hmac::<Sha256>::new_from_slice(key).map_err(|_| Error::KeyTooShort {
            len: key.len(),
            min: MIN_KEY_LEN,
        })?;
        let digest = <Sha256 as sha2::Digest>::digest(key).into();
        Ok(Self { mac, digest })
    }

    /// A name for the key that does not give it away: the first four octets of its
    /// SHA-256, in hexadecimal (`sha256sum` of the key's raw octets begins with it). Logs
    /// and counters name keys by it, so an operator can tell which key answers.
    pub fn fingerprint(&self) -> String {
        use std::fmt::Write as _;
        self.digest[..4].iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    /// The truncated HMAC of `covered`.
    pub fn tag(&self, covered: &[u8]) -> [u8; HMAC_LEN] {
        self.tag_parts(&[covered])
    }

    /// The truncated HMAC of the concatenation of `parts` (the HMAC TLV covers two runs
    /// of the packet that are not adjacent).
    pub fn tag_parts(&self, parts: &[&[u8]]) -> [u8; HMAC_LEN] {
        let mut mac = self.mac.clone();
        for p in parts {
            mac.update(p);
        }
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; HMAC_LEN];
        out.copy_from_slice(&full[..HMAC_LEN]);
        out
    }

    /// Checks `tag` against the HMAC of `covered` in constant time.
    pub fn verify(&self, covered: &[u8], tag: &[u8]) -> Result<()> {
        self.verify_parts(&[covered], tag)
    }

    /// Checks `tag` against the HMAC of the concatenation of `parts` in constant time.
    pub fn verify_parts(&self, parts: &[&[u8]], tag: &[u8]) -> Result<()> {
        let mut mac = self.mac.clone();
        for p in parts {
            mac.update(p);
        }
        // verify_truncated_left compares the leftmost tag.len() octets in constant time;
        // insist on the full 16 so that a short tag cannot weaken the check.
        if tag.len() != HMAC_LEN {
            return Err(Error::AuthenticationFailed);
        }
        mac.verify_truncated_left(tag)
            .map_err(|_| Error::AuthenticationFailed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 4231 test case 2 uses a 4-octet key, too short for us; test case 1 has a 20-octet
    // key: HMAC-SHA-256(0x0b * 20, "Hi There") begins b0344c61d8db38535ca8afceaf0bf12b.
    #[test]
    fn rfc4231_case_1_truncated() {
        let key = AuthKey::new(&[0x0b; 20]).unwrap();
        let tag = key.tag(b"Hi There");
        assert_eq!(
            tag,
            [
                0xb0, 0x34, 0x4c, 0x61, 0xd8, 0xdb, 0x38, 0x53, 0x5c, 0xa8, 0xaf, 0xce, 0xaf, 0x0b,
                0xf1, 0x2b
            ]
        );
        assert!(key.verify(b"Hi There", &tag).is_ok());
        assert_eq!(
            key.verify(b"Hi there", &tag),
            Err(Error::AuthenticationFailed)
        );
    }

    #[test]
    fn parts_are_the_concatenation() {
        let key = AuthKey::new(&[0x0b; 20]).unwrap();
        assert_eq!(key.tag_parts(&[b"Hi ", b"There"]), key.tag(b"Hi There"));
        let tag = key.tag(b"Hi There");
        assert!(key.verify_parts(&[b"Hi", b" There"], &tag).is_ok());
        assert!(key.verify_parts(&[b"Hi", b"There"], &tag).is_err());
    }

    #[test]
    fn fingerprint_is_the_start_of_the_keys_sha256() {
        // SHA-256 of 32 zero octets begins 66687aad.
        assert_eq!(AuthKey::new(&[0; 32]).unwrap().fingerprint(), "66687aad");
    }

    #[test]
    fn short_key_is_refused() {
        assert_eq!(
            AuthKey::new(&[1; 15]).unwrap_err(),
            Error::KeyTooShort { len: 15, min: 16 }
        );
    }

    #[test]
    fn short_tag_is_refused() {
        let key = AuthKey::new(&[7; 32]).unwrap();
        let tag = key.tag(b"x");
        assert_eq!(
            key.verify(b"x", &tag[..8]),
            Err(Error::AuthenticationFailed)
        );
    }
}
