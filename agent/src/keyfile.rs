//! STAMP authentication keys on disk.
//!
//! A key file holds the shared key as hexadecimal digits (whitespace and a `0x` prefix are
//! ignored), the way router configurations show keys, so the same key can be pasted into a
//! router's STAMP reflector. At least 16 octets (32 digits); 32 random octets are best.

use std::path::Path;

use pathprobe_proto::stamp::AuthKey;

use crate::{Error, Result, hexbytes};

/// Reads and checks the key in `path`; a file that others can read is refused
/// ([`pathprobe_proto::secrets`]).
pub fn load(path: &Path) -> Result<AuthKey> {
    pathprobe_proto::secrets::check_mode(path, "the STAMP key file").map_err(Error::Config)?;
    let text = std::fs::read_to_string(path).map_err(|source| Error::KeyFileRead {
        path: path.to_owned(),
        source,
    })?;
    let bytes = hexbytes::parse(&text).map_err(|e| Error::KeyFileFormat {
        path: path.to_owned(),
        reason: format!("{e}; the file must hold the key as hexadecimal digits"),
    })?;
    AuthKey::new(&bytes).map_err(|e| Error::KeyFileFormat {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, contents: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("pathprobe-keyfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, contents).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        p
    }

    #[test]
    fn hex_key_loads() {
        let p = temp("good", "0x00112233445566778899aabbccddeeff\n");
        assert!(load(&p).is_ok());
    }

    #[test]
    fn missing_file_says_how_to_make_one() {
        let err = load(Path::new("/nonexistent/stamp.key"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/stamp.key"), "{err}");
        assert!(err.contains("create one with"), "{err}");
    }

    #[test]
    fn short_or_non_hex_keys_are_refused() {
        let short = load(&temp("short", "0011")).unwrap_err().to_string();
        assert!(short.contains("too short"), "{short}");
        let text = load(&temp("text", "my secret password"))
            .unwrap_err()
            .to_string();
        assert!(text.contains("hexadecimal"), "{text}");
    }
}
