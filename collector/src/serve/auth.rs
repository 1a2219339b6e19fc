//! Who may send reports: the tokens file (one bearer token per agent) and the check of a
//! request's `Authorization` header.

use std::collections::HashMap;
use std::path::Path;

use axum::http::{HeaderMap, header};
use axum::response::Response;
use pathprobe_proto::ingest::{Reason, Refused};

use super::AppState;
use crate::{Error, Result};

/// Bearer tokens, one per agent.
#[derive(Debug, Clone, Default)]
pub struct Tokens(HashMap<String, String>);

impl Tokens {
    /// Reads a tokens file: one `AGENT_ID TOKEN` pair per line; blank lines and lines
    /// starting with `#` are ignored. A bad line is named with its number.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        let mut tokens = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad =
                |reason: &str| Error::Config(format!("{}:{}: {reason}", path.display(), n + 1));
            let mut words = line.split_whitespace();
            let (Some(agent), Some(token), None) = (words.next(), words.next(), words.next())
            else {
                return Err(bad("expected `AGENT_ID TOKEN`"));
            };
            if token.len() < 16 {
                return Err(bad(
                    "the token is shorter than 16 characters: use a long random one",
                ));
            }
            if tokens
                .insert(token.to_string(), agent.to_string())
                .is_some()
            {
                return Err(bad("this token is already given to another agent"));
            }
        }
        if tokens.is_empty() {
            return Err(Error::Config(format!(
                "{}: no tokens in the file",
                path.display()
            )));
        }
        Ok(Self(tokens))
    }
}

impl AppState {
    /// The agent the request's bearer token belongs to (`None` without a tokens file).
    #[allow(clippy::result_large_err)]
    pub(super) fn authorize(
        &self,
        headers: &HeaderMap,
    ) -> std::result::Result<Option<String>, Response> {
        let Some(tokens) = &self.tokens else {
            return Ok(None);
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented.and_then(|t| tokens.0.get(t.trim())) {
            Some(agent) => Ok(Some(agent.clone())),
            None => Err(self.refuse(Refused::new(
                Reason::Unauthorized,
                "missing or unknown bearer token: send `Authorization: Bearer TOKEN` with the agent's token from the collector's tokens file",
            ))),
        }
    }
}
