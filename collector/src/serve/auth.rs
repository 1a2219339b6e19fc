//! Who may do what: the tokens file (agents' tokens, which only ingest and only their own
//! agent's reports; readers' tokens, which only query), client certificates over mutual
//! TLS (which name the agent in place of a token), and the check of each request.
//!
//! Tokens are kept as SHA-256 digests (the file may hold `sha256:HEX` in place of the
//! token itself), and a presented token's digest is compared with every entry's in
//! constant time, so neither the file nor the timing of an answer gives a token away.

use std::path::Path;

use axum::http::{HeaderMap, header};
use axum::response::Response;
use pathprobe_proto::ingest::{Reason, Refused};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use super::AppState;
use super::listen::Peer;
use crate::{Error, Result};

/// The shortest token accepted in clear in the tokens file.
pub const MIN_TOKEN_LEN: usize = 16;

/// What a token lets its holder do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Ingest the reports of this agent id.
    Agent(String),
    /// Query, as this reader.
    Reader(String),
}

#[derive(Debug, Clone)]
struct Entry {
    digest: [u8; 32],
    role: Role,
}

/// The tokens file, loaded.
#[derive(Debug, Clone, Default)]
pub struct Tokens(Vec<Entry>);

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A fresh random token (32 octets, hex) and the SHA-256 digest to put in the tokens file.
pub fn new_token() -> Result<(String, String)> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw)
        .map_err(|e| Error::Config(format!("cannot draw a random token: {e}")))?;
    let token = hex::encode(raw);
    let d = format!("sha256:{}", hex::encode(digest(&token)));
    Ok((token, d))
}

/// The digest a tokens-file word stands for: `sha256:HEX` as given, or a token's own.
fn parse_secret(word: &str) -> std::result::Result<[u8; 32], String> {
    if let Some(h) = word.strip_prefix("sha256:") {
        let mut d = [0u8; 32];
        hex::decode_to_slice(h, &mut d).map_err(|_| {
            "`sha256:` takes 64 hex digits (the digest `pathprobe-collector token new` prints)"
                .to_string()
        })?;
        return Ok(d);
    }
    if word.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "the token is shorter than {MIN_TOKEN_LEN} characters: use a long random one (`pathprobe-collector token new`)"
        ));
    }
    Ok(digest(word))
}

impl Tokens {
    /// Reads a tokens file. Each line is `AGENT_ID TOKEN` (or `agent AGENT_ID TOKEN`) for
    /// an agent, or `reader NAME TOKEN` for a reader; a TOKEN may be `sha256:HEX`. Blank
    /// lines and lines starting with `#` are ignored. A bad line is named with its number;
    /// a file that others can read is refused ([`pathprobe_proto::secrets`]).
    pub fn load(path: &Path) -> Result<Self> {
        pathprobe_proto::secrets::check_mode(path, "--tokens").map_err(Error::Config)?;
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// [`Tokens::load`] of `text`; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let mut entries: Vec<Entry> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: &str| Error::Config(format!("{origin}:{}: {reason}", n + 1));
            let words: Vec<&str> = line.split_whitespace().collect();
            let (role, secret) = match words[..] {
                ["reader", name, secret] => (Role::Reader(name.to_string()), secret),
                ["agent", id, secret] => (Role::Agent(id.to_string()), secret),
                [id, secret] if id != "reader" && id != "agent" => {
                    (Role::Agent(id.to_string()), secret)
                }
                _ => {
                    return Err(bad(
                        "expected `AGENT_ID TOKEN`, `agent AGENT_ID TOKEN` or `reader NAME TOKEN`",
                    ));
                }
            };
            let digest = parse_secret(secret).map_err(|e| bad(&e))?;
            if entries.iter().any(|e| e.digest == digest) {
                return Err(bad(
                    "this token is given twice: give each agent and reader its own",
                ));
            }
            entries.push(Entry { digest, role });
        }
        if entries.is_empty() {
            return Err(Error::Config(format!("{origin}: no tokens in the file")));
        }
        Ok(Self(entries))
    }

    /// The role of `token`, comparing its digest with every entry's in constant time.
    pub fn role_of(&self, token: &str) -> Option<&Role> {
        let d = digest(token);
        let mut found = None;
        for e in &self.0 {
            if bool::from(e.digest.ct_eq(&d)) {
                found = Some(&e.role);
            }
        }
        found
    }

    /// Whether any reader is configured.
    pub fn has_readers(&self) -> bool {
        self.0.iter().any(|e| matches!(e.role, Role::Reader(_)))
    }
}

/// Who sent a batch, as far as ingest is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sender {
    /// No tokens file and no mutual TLS: anyone (a lab on loopback).
    Anyone,
    /// These agent ids only: a token's, or the names of a verified client certificate.
    Agents(Vec<String>),
}

impl Sender {
    /// Whether a report of `agent_id` may come from this sender.
    pub fn may_send(&self, agent_id: &str) -> bool {
        match self {
            Self::Anyone => true,
            Self::Agents(ids) => ids.iter().any(|i| i == agent_id),
        }
    }

    /// The agent ids, for messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Anyone => "anyone".to_string(),
            Self::Agents(ids) => ids
                .iter()
                .map(|i| format!("`{i}`"))
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

impl AppState {
    /// Who may send the batch of this request: over mutual TLS its client certificate
    /// (required then; an agent token is not enough), else its agent token.
    #[allow(clippy::result_large_err)]
    pub(super) fn authorize_ingest(
        &self,
        headers: &HeaderMap,
        peer: Option<&Peer>,
    ) -> std::result::Result<Sender, Response> {
        if self.mutual_tls {
            return match peer.and_then(|p| p.cert_names.as_ref()) {
                Some(names) if !names.is_empty() => Ok(Sender::Agents(names.to_vec())),
                Some(_) => Err(self.refuse(Refused::new(
                    Reason::Forbidden,
                    "the client certificate names no agent (no subject CN or DNS SAN): issue it with the agent id as its CN",
                ))),
                None => Err(self.refuse(Refused::new(
                    Reason::Unauthorized,
                    "this collector takes reports over mutual TLS only: give the agent its client certificate (client_cert and client_key in [collector])",
                ))),
            };
        }
        let Some(tokens) = &self.tokens else {
            return Ok(Sender::Anyone);
        };
        match bearer(headers).and_then(|t| tokens.role_of(t)) {
            Some(Role::Agent(id)) => Ok(Sender::Agents(vec![id.clone()])),
            Some(Role::Reader(name)) => Err(self.refuse(Refused::new(
                Reason::Forbidden,
                format!(
                    "the token is reader `{name}`'s, which may query but not send reports: give the agent its own token (an `AGENT_ID TOKEN` line)"
                ),
            ))),
            None => Err(self.refuse(Refused::new(
                Reason::Unauthorized,
                "missing or unknown bearer token: send `Authorization: Bearer TOKEN` with the agent's token from the collector's tokens file",
            ))),
        }
    }

    /// Whether this request may query: a reader's token, a dashboard session, or
    /// `--open-read`. The refusal
    /// is a 401 without a reader token, a 403 with an agent's.
    #[allow(clippy::result_large_err)]
    pub(super) fn authorize_read(&self, headers: &HeaderMap) -> std::result::Result<(), Response> {
        if self.open_read {
            return Ok(());
        }
        if super::pages::session_cookie(headers)
            .is_some_and(|id| self.sessions.reader(id).is_some())
        {
            return Ok(());
        }
        let role = match (&self.tokens, bearer(headers)) {
            (Some(tokens), Some(t)) => tokens.role_of(t),
            _ => None,
        };
        match role {
            Some(Role::Reader(_)) => Ok(()),
            Some(Role::Agent(id)) => Err(self.refuse(Refused::new(
                Reason::Forbidden,
                format!(
                    "the token is agent `{id}`'s, which may send reports but not query: use a reader token (a `reader NAME TOKEN` line; `pathprobe-collector token new --reader NAME`)"
                ),
            ))),
            None => Err(self.refuse(Refused::new(
                Reason::Unauthorized,
                "queries need a reader token: send `Authorization: Bearer TOKEN` with a token of a `reader NAME TOKEN` line of the collector's tokens file (or start the collector with --open-read on loopback)",
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "agent-token-0123456789";
    const R: &str = "reader-token-0123456789";

    #[test]
    fn roles_digests_and_bad_lines() {
        let (tok, dig) = new_token().unwrap();
        let text = format!("# comment\nonprem-01 {A}\nreader noc {R}\nagent azure-01 {dig}\n");
        let t = Tokens::parse(&text, "tokens").unwrap();
        assert_eq!(t.role_of(A), Some(&Role::Agent("onprem-01".into())));
        assert_eq!(t.role_of(R), Some(&Role::Reader("noc".into())));
        assert_eq!(
            t.role_of(&tok),
            Some(&Role::Agent("azure-01".into())),
            "a digest line"
        );
        assert_eq!(t.role_of(&dig), None, "the digest itself is not a token");
        assert_eq!(t.role_of("agent-token-012345678"), None);
        assert!(t.has_readers());
        for (bad, says) in [
            ("a short\n", "tokens:1: the token is shorter"),
            ("a b c d\n", "tokens:1: expected"),
            (
                &format!("a {A}\nb {A}\n"),
                "tokens:2: this token is given twice",
            ),
            ("a sha256:12\n", "tokens:1: `sha256:` takes 64 hex digits"),
            (&format!("reader {A}\n"), "tokens:1: expected"),
            ("# nothing\n", "tokens: no tokens"),
        ] {
            let e = Tokens::parse(bad, "tokens").unwrap_err().to_string();
            assert!(e.starts_with(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_sender_may_send_only_its_own_agents_reports() {
        let s = Sender::Agents(vec!["a".into(), "b".into()]);
        assert!(s.may_send("a") && s.may_send("b") && !s.may_send("c"));
        assert!(Sender::Anyone.may_send("c"));
    }
}
