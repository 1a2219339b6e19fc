//! The command line's questions to a collector over HTTP(S) (`compare`, `paths`,
//! `histogram`, `events` with `--collector URL --token-file F`): the same endpoints the
//! dashboard and scripts use, with a reader's token, checked against `--ca-file` or the
//! system's CAs. Answers are read into the same types the local queries print, so a remote
//! table is the local one.

use std::path::Path;
use std::time::Duration;

use pathprobe_proto::client::{TlsClient, cleartext_beyond_loopback, explain};

use crate::{Error, Result};

/// A collector to ask.
#[derive(Debug)]
pub struct Remote {
    base: String,
    token: String,
    http: ureq::Agent,
}

impl Remote {
    /// The collector at `base` (`https://HOST:PORT`; `http://` only to loopback), asked
    /// with the reader token in `token_file`.
    pub fn new(base: &str, token_file: &Path, ca_file: Option<&Path>) -> Result<Self> {
        let uri: ureq::http::Uri = base.parse().map_err(|e| {
            Error::Config(format!(
                "--collector {base} is not a URL ({e}): write it like https://collector.example.net:8862"
            ))
        })?;
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") if !cleartext_beyond_loopback(base) => {}
            Some("http") => {
                return Err(Error::Config(format!(
                    "--collector {base} would send the reader token in clear beyond this host: use https://"
                )));
            }
            _ => {
                return Err(Error::Config(format!(
                    "--collector {base}: write it like https://collector.example.net:8862"
                )));
            }
        }
        let token = pathprobe_proto::secrets::read_trimmed(
            token_file,
            "--token-file",
            "put a reader token of the collector's tokens file in it",
        )
        .map_err(Error::Config)?;
        let tls = TlsClient {
            ca_file: ca_file.map(Path::to_owned),
            ..TlsClient::default()
        };
        let http = tls
            .agent(base, Duration::from_mins(2))
            .map_err(Error::Config)?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    /// `GET path` with `query` (pairs with no value are left out): the body of a 200, or
    /// the collector's refusal as an error.
    pub fn get(&self, path: &str, query: &[(&str, Option<&str>)]) -> Result<String> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .http
            .get(&url)
            .header("Authorization", &format!("Bearer {}", self.token));
        for (k, v) in query {
            if let Some(v) = v {
                req = req.query(*k, *v);
            }
        }
        let resp = req.call().map_err(|e| {
            Error::Config(format!(
                "cannot ask the collector at {}: {}",
                self.base,
                explain(&e, &url)
            ))
        })?;
        let status = resp.status().as_u16();
        let body = resp.into_body().read_to_string().map_err(|e| {
            Error::Config(format!(
                "the collector's answer to {path} cannot be read: {e}"
            ))
        })?;
        if status == 200 {
            return Ok(body);
        }
        let said = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or(body);
        Err(Error::Config(format!(
            "the collector at {} answered {status} to {path}: {said}",
            self.base
        )))
    }

    /// [`Remote::get`], read as JSON of `T`.
    pub fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, Option<&str>)],
    ) -> Result<T> {
        let body = self.get(path, query)?;
        serde_json::from_str(&body).map_err(|e| {
            Error::Config(format!(
                "the collector's answer to {path} is not what this build reads ({e}): use a pathprobe-collector of the collector's version"
            ))
        })
    }
}
