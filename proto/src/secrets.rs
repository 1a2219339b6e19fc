//! Secrets at rest: a file that holds a token or a key (the collector's tokens file and TLS
//! key, an agent's token, client key and STAMP keys) must be readable by its owner alone.
//! A wider mode is refused with the `chmod` that fixes it, unless the process was started
//! with `--allow-world-readable-secrets` ([`allow_readable`]).

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

static ALLOW_READABLE: AtomicBool = AtomicBool::new(false);

/// Accepts secret files that others can read, for the whole process (the
/// `--allow-world-readable-secrets` flag).
pub fn allow_readable(allow: bool) {
    ALLOW_READABLE.store(allow, Ordering::Relaxed);
}

/// Refuses `path` (named `what` in the message, the way the user gave it) when its group
/// or others have any permission on it. A file that cannot be read is left to the reader,
/// whose error names it.
pub fn check_mode(path: &Path, what: &str) -> Result<(), String> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let mode = meta.permissions().mode() & 0o777;
    // The group's and others' permission bits.
    let shared = mode & 0o077;
    if shared == 0 || ALLOW_READABLE.load(Ordering::Relaxed) {
        return Ok(());
    }
    Err(format!(
        "{what} {} holds a secret but others can read it (mode {mode:04o}): run `chmod 600 {}`, or start with --allow-world-readable-secrets",
        path.display(),
        path.display()
    ))
}

/// A secret's file (a token or a password) read whole and trimmed, once [`check_mode`]
/// has passed; a file that cannot be read is named (`what`, the way the user gave it)
/// with `fix`.
pub fn read_trimmed(path: &Path, what: &str, fix: &str) -> Result<String, String> {
    check_mode(path, what)?;
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("cannot read {what} {}: {e}; {fix}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_others_can_read_is_refused_with_the_chmod_that_fixes_it() {
        let dir = std::env::temp_dir().join(format!("pp-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("tokens");
        std::fs::write(&f, "x").unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o640, false),
            (0o644, false),
            (0o604, false),
        ] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = check_mode(&f, "--tokens");
            assert_eq!(r.is_ok(), ok, "mode {mode:o}: {r:?}");
            if let Err(e) = r {
                assert!(e.contains(&format!("chmod 600 {}", f.display())), "{e}");
                assert!(e.contains(&format!("{mode:04o}")), "{e}");
            }
        }
        assert!(
            check_mode(&dir.join("absent"), "--tokens").is_ok(),
            "left to the reader"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
