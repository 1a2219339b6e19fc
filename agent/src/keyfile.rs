//! STAMP authentication keys: on disk, as the reflector holds them, and as a path holds
//! one while it runs.
//!
//! A key file holds the shared key as hexadecimal digits (whitespace and a `0x` prefix are
//! ignored), the way router configurations show keys, so the same key can be pasted into a
//! router's STAMP reflector. At least 16 octets (32 digits); 32 random octets are best.
//! During a rollover a file may hold several keys, one per line, newest first: a prober
//! signs with the first, a reflector accepts any of them, trying the newest first.
//! Blank lines and lines starting with `#` are ignored.
//!
//! A reflector's key directory (`--auth-key-dir`) holds a file per SSID, named by the SSID
//! in hexadecimal as stamp-suite names them (`000a.key` or `000a` for SSID 10), and
//! `default.key` for every other SSID. Keys are named in logs and counters by
//! [`AuthKey::fingerprint`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use pathprobe_proto::stamp::AuthKey;

use crate::{Error, Result, hexbytes};

/// Most keys one file may hold: a rollover needs two; each costs a forged request one more
/// HMAC.
pub const MAX_KEYS_PER_FILE: usize = 4;

/// Reads and checks the first (newest) key in `path`; a file that others can read is
/// refused ([`pathprobe_proto::secrets`]).
pub fn load(path: &Path) -> Result<AuthKey> {
    let mut keys = load_all(path)?;
    Ok(keys.swap_remove(0))
}

/// Reads and checks every key in `path`, newest first (at least one, at most
/// [`MAX_KEYS_PER_FILE`]).
pub fn load_all(path: &Path) -> Result<Vec<AuthKey>> {
    pathprobe_proto::secrets::check_mode(path, "the STAMP key file").map_err(Error::Config)?;
    let text = std::fs::read_to_string(path).map_err(|source| Error::KeyFileRead {
        path: path.to_owned(),
        source,
    })?;
    let format = |line: usize, reason: String| Error::KeyFileFormat {
        path: path.to_owned(),
        reason: format!("line {line}: {reason}"),
    };
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bytes = hexbytes::parse(line).map_err(|e| {
            format(
                n + 1,
                format!("{e}; the file must hold each key as hexadecimal digits, one per line"),
            )
        })?;
        keys.push(AuthKey::new(&bytes).map_err(|e| format(n + 1, e.to_string()))?);
    }
    if keys.is_empty() {
        return Err(Error::KeyFileFormat {
            path: path.to_owned(),
            reason: "it holds no key; write one as hexadecimal digits, e.g. `openssl rand -hex 32`"
                .to_string(),
        });
    }
    if keys.len() > MAX_KEYS_PER_FILE {
        return Err(Error::KeyFileFormat {
            path: path.to_owned(),
            reason: format!(
                "it holds {} keys, and a rollover needs two: remove the oldest (the last lines); at most {MAX_KEYS_PER_FILE}",
                keys.len()
            ),
        });
    }
    Ok(keys)
}

/// A key of a reflector's ring, and how many requests it has answered.
#[derive(Debug)]
pub struct RingKey {
    pub key: AuthKey,
    pub answered: AtomicU64,
}

/// Which keys a [`KeyRing`] entry serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Slot {
    Ssid(u16),
    Default,
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ssid(s) => write!(f, "ssid {s:04x}"),
            Self::Default => f.write_str("default"),
        }
    }
}

/// A reflector's keys: a rollover set per SSID, and one for every other SSID, each tried
/// newest first. Two rings are equal when they hold the same keys in the same places.
#[derive(Debug, Default)]
pub struct KeyRing {
    sets: BTreeMap<Slot, Vec<Arc<RingKey>>>,
}

impl PartialEq for KeyRing {
    fn eq(&self, other: &Self) -> bool {
        self.sets.len() == other.sets.len()
            && self.sets.iter().zip(&other.sets).all(|((a, ka), (b, kb))| {
                a == b && ka.len() == kb.len() && ka.iter().zip(kb).all(|(x, y)| x.key == y.key)
            })
    }
}

impl Eq for KeyRing {}

impl KeyRing {
    /// One set for every SSID (`--auth-key-file`), newest first.
    pub fn single(keys: Vec<AuthKey>) -> Self {
        let mut ring = Self::default();
        ring.insert(Slot::Default, keys);
        ring
    }

    fn insert(&mut self, slot: Slot, keys: Vec<AuthKey>) {
        let set = keys
            .into_iter()
            .map(|key| {
                Arc::new(RingKey {
                    key,
                    answered: AtomicU64::new(0),
                })
            })
            .collect();
        self.sets.insert(slot, set);
    }

    /// Reads a key directory (`--auth-key-dir`). A file that does not load, or two files
    /// for one SSID, is an error that names it; a file whose name is neither an SSID nor
    /// `default` is skipped, with a warning.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            Error::Config(format!(
                "cannot read the key directory {}: {e}; give a directory of key files named by SSID in hexadecimal (000a.key) and default.key",
                dir.display()
            ))
        })?;
        let mut ring = Self::default();
        let mut names = BTreeMap::new();
        for entry in entries {
            let entry = entry.map_err(|e| {
                Error::Config(format!(
                    "cannot read the key directory {}: {e}",
                    dir.display()
                ))
            })?;
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.starts_with('.') || !path.is_file() {
                continue;
            }
            let stem = name.strip_suffix(".key").unwrap_or(name);
            let slot = if stem.eq_ignore_ascii_case("default") {
                Slot::Default
            } else if let Ok(ssid) = u16::from_str_radix(stem, 16)
                && !stem.starts_with('+')
            {
                Slot::Ssid(ssid)
            } else {
                tracing::warn!(file = %path.display(), "skipped: a key file is named by its SSID in hexadecimal (000a.key) or default.key");
                continue;
            };
            if let Some(other) = names.insert(slot, name.to_string()) {
                return Err(Error::Config(format!(
                    "{}: {other} and {name} are both keys of {slot}: keep one",
                    dir.display()
                )));
            }
            ring.insert(slot, load_all(&path)?);
        }
        if ring.sets.is_empty() {
            return Err(Error::Config(format!(
                "the key directory {} holds no key file: name each by its SSID in hexadecimal (000a.key), and default.key for the other SSIDs",
                dir.display()
            )));
        }
        Ok(ring)
    }

    /// The keys a request with `ssid` may be signed with, newest first: its own set, else
    /// the default one.
    pub fn for_ssid(&self, ssid: u16) -> &[Arc<RingKey>] {
        self.sets
            .get(&Slot::Ssid(ssid))
            .or_else(|| self.sets.get(&Slot::Default))
            .map_or(&[], Vec::as_slice)
    }

    /// Every key, wherever it serves.
    pub fn keys(&self) -> impl Iterator<Item = (Slot, &Arc<RingKey>)> {
        self.sets
            .iter()
            .flat_map(|(slot, set)| set.iter().map(move |k| (*slot, k)))
    }

    /// Takes over the counts of `old`'s keys that this ring keeps in the same place, so
    /// that a reload does not reset them.
    pub fn carry_counts(&self, old: &Self) {
        for (slot, key) in self.keys() {
            if let Some(prev) = old
                .sets
                .get(&slot)
                .and_then(|set| set.iter().find(|k| k.key == key.key))
            {
                key.answered
                    .store(prev.answered.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
    }

    /// Each place and its keys, newest first, with the requests each answered: `ssid
    /// 000a: 1a2b3c4d 1200, 9f8e7d6c 0; default: 5e6f7a8b 3`.
    pub fn summary(&self) -> String {
        self.sets
            .iter()
            .map(|(slot, set)| {
                let keys: Vec<String> = set
                    .iter()
                    .map(|k| {
                        format!(
                            "{} {}",
                            k.key.fingerprint(),
                            k.answered.load(Ordering::Relaxed)
                        )
                    })
                    .collect();
                format!("{slot}: {}", keys.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// A reflector's ring, which `SIGHUP` replaces while it runs: the reflector looks at the
/// generation once per batch and takes the new ring when it moved.
#[derive(Debug)]
pub struct LiveRing {
    ring: RwLock<Arc<KeyRing>>,
    generation: AtomicU64,
}

impl LiveRing {
    pub fn new(ring: KeyRing) -> Self {
        Self {
            ring: RwLock::new(Arc::new(ring)),
            generation: AtomicU64::new(0),
        }
    }

    /// The ring now.
    pub fn get(&self) -> Arc<KeyRing> {
        Arc::clone(&self.ring.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Bumped by every [`Self::replace`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Answers with `ring` from the next batch on; its keys keep the counts they had.
    pub fn replace(&self, ring: KeyRing) {
        self.swap_in(Arc::new(ring));
    }

    /// Answers with `other`'s ring from the next batch on (a reloaded plan's).
    pub fn adopt(&self, other: &Self) {
        if !std::ptr::eq(self, other) {
            self.swap_in(other.get());
        }
    }

    fn swap_in(&self, ring: Arc<KeyRing>) {
        let mut slot = self.ring.write().unwrap_or_else(PoisonError::into_inner);
        ring.carry_counts(&slot);
        *slot = ring;
        drop(slot);
        self.generation.fetch_add(1, Ordering::Release);
    }
}

impl PartialEq for LiveRing {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other) || *self.get() == *other.get()
    }
}

impl Eq for LiveRing {}

/// The key a path signs with, which `SIGHUP` may change while it runs. Answers verify with
/// it or, for as long as a probe signed with it can still be answered, the one before.
#[derive(Debug)]
pub struct LiveKey {
    keys: RwLock<(AuthKey, Option<(AuthKey, u64)>)>,
}

impl LiveKey {
    pub fn new(key: AuthKey) -> Self {
        Self {
            keys: RwLock::new((key, None)),
        }
    }

    /// Calls `f` with the current key.
    pub fn with_current<R>(&self, f: impl FnOnce(&AuthKey) -> R) -> R {
        f(&self.keys.read().unwrap_or_else(PoisonError::into_inner).0)
    }

    /// The first of `f`'s answers that is `Some`: with the current key, else with the one
    /// before while it is still accepted (until its monotonic deadline).
    pub fn first<R>(&self, mut f: impl FnMut(&AuthKey) -> Option<R>) -> Option<R> {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        f(&keys.0).or_else(|| {
            keys.1
                .as_ref()
                .filter(|(_, until)| crate::sys::monotonic_ns() < *until)
                .and_then(|(k, _)| f(k))
        })
    }

    /// Signs with `key` from now on; the key it replaces still verifies answers for `grace`.
    pub fn replace(&self, key: AuthKey, grace: std::time::Duration) {
        let until = crate::sys::monotonic_ns()
            .saturating_add(u64::try_from(grace.as_nanos()).unwrap_or(u64::MAX));
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        if keys.0 != key {
            let old = std::mem::replace(&mut keys.0, key);
            keys.1 = Some((old, until));
        }
    }

    /// The current key's fingerprint.
    pub fn fingerprint(&self) -> String {
        self.with_current(AuthKey::fingerprint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, contents: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("pathprobe-keyfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        pathprobe_tests::pki::write(&p, contents, true);
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

    const K1: &str = "00112233445566778899aabbccddeeff";
    const K2: &str = "ffeeddccbbaa99887766554433221100";

    fn key(hex: &str) -> AuthKey {
        AuthKey::new(&hexbytes::parse(hex).unwrap()).unwrap()
    }

    #[test]
    fn a_rollover_file_holds_keys_newest_first() {
        let p = temp("rollover", &format!("# new key first\n{K2}\n\n{K1}\n"));
        let keys = load_all(&p).unwrap();
        assert_eq!(keys, [key(K2), key(K1)]);
        assert_eq!(load(&p).unwrap(), key(K2), "a prober signs with the first");
        let empty = load(&temp("empty", "# nothing\n")).unwrap_err().to_string();
        assert!(empty.contains("holds no key"), "{empty}");
        let five = load(&temp("five", &format!("{K1}\n").repeat(5)))
            .unwrap_err()
            .to_string();
        assert!(five.contains("remove the oldest"), "{five}");
        let bad = load(&temp("bad2", &format!("{K1}\nzz\n")))
            .unwrap_err()
            .to_string();
        assert!(bad.contains("line 2"), "{bad}");
    }

    fn dir(name: &str, files: &[(&str, &str)]) -> std::path::PathBuf {
        let d =
            std::env::temp_dir().join(format!("pathprobe-keydir-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        for (f, text) in files {
            pathprobe_tests::pki::write(&d.join(f), text, true);
        }
        d
    }

    #[test]
    fn a_key_directory_is_read_as_stamp_suite_names_it() {
        let d = dir(
            "good",
            &[
                ("000a.key", &format!("{K2}\n{K1}\n")),
                ("ff", K1),
                ("default.key", K1),
                ("notes.txt", "not a key"),
            ],
        );
        let ring = KeyRing::from_dir(&d).unwrap();
        let fp = |ks: &[Arc<RingKey>]| ks.iter().map(|k| k.key.clone()).collect::<Vec<_>>();
        assert_eq!(fp(ring.for_ssid(10)), [key(K2), key(K1)]);
        assert_eq!(fp(ring.for_ssid(255)), [key(K1)]);
        assert_eq!(fp(ring.for_ssid(7)), [key(K1)], "the default");
        assert_eq!(ring.keys().count(), 4);
        let no_default = KeyRing::from_dir(&dir("nodefault", &[("1.key", K1)])).unwrap();
        assert!(no_default.for_ssid(2).is_empty());
    }

    #[test]
    fn a_broken_key_directory_says_which_file() {
        let twice = KeyRing::from_dir(&dir("twice", &[("a.key", K1), ("000a", K1)]))
            .unwrap_err()
            .to_string();
        assert!(twice.contains("both keys of ssid 000a"), "{twice}");
        let bad = KeyRing::from_dir(&dir("bad", &[("0001.key", "zz")]))
            .unwrap_err()
            .to_string();
        assert!(bad.contains("0001.key"), "{bad}");
        let empty = KeyRing::from_dir(&dir("empty", &[]))
            .unwrap_err()
            .to_string();
        assert!(empty.contains("holds no key file"), "{empty}");
        let missing = KeyRing::from_dir(Path::new("/nonexistent/keys"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("/nonexistent/keys"), "{missing}");
    }

    #[test]
    fn a_reload_keeps_the_counts_of_the_keys_it_keeps() {
        let live = LiveRing::new(KeyRing::single(vec![key(K1)]));
        live.get().for_ssid(0)[0]
            .answered
            .store(5, Ordering::Relaxed);
        let g = live.generation();
        live.replace(KeyRing::single(vec![key(K2), key(K1)]));
        assert_eq!(live.generation(), g + 1);
        let ring = live.get();
        let counts: Vec<u64> = ring
            .for_ssid(0)
            .iter()
            .map(|k| k.answered.load(Ordering::Relaxed))
            .collect();
        assert_eq!(counts, [0, 5]);
        assert_eq!(
            ring.summary(),
            format!(
                "default: {} 0, {} 5",
                key(K2).fingerprint(),
                key(K1).fingerprint()
            )
        );
    }

    #[test]
    fn a_replaced_path_key_still_verifies_for_its_grace() {
        let live = LiveKey::new(key(K1));
        let is = |want: AuthKey| move |k: &AuthKey| (*k == want).then_some(());
        live.replace(key(K2), std::time::Duration::from_mins(1));
        assert!(live.with_current(|k| *k == key(K2)));
        assert!(live.first(is(key(K1))).is_some(), "within its grace");
        live.replace(key(K1), std::time::Duration::ZERO);
        assert!(live.first(is(key(K2))).is_none(), "past its grace");
        assert!(live.first(is(key(K1))).is_some());
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
