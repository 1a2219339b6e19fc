//! The collector's side of delivery: one `POST /v1/reports` per batch, and what its answer
//! means for the batch, read from the typed ingest contract ([`pathprobe_proto::ingest`])
//! and never from the text of an error.

use std::time::Duration;

use pathprobe_proto::client::{self, TlsClient};
use pathprobe_proto::ingest::{Accepted, Reason, Refused};

use super::spool::Queued;
use crate::{Error, Result};

/// What one delivery attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// All were stored.
    Delivered(Accepted),
    /// The collector refused report `index` of the batch for good.
    Rejected { index: usize, message: String },
    /// The body or the number of reports is over the collector's limit.
    TooLarge(String),
    /// The collector answered and stored nothing; sending again later may work.
    Refused(String),
    /// No answer: the collector is down or cannot be reached.
    Unreachable(String),
}

/// Delivers batches to a collector's `POST /v1/reports`.
#[derive(Debug)]
pub struct Uploader {
    url: String,
    token: Option<String>,
    http: ureq::Agent,
}

impl Uploader {
    /// An uploader to the collector at `base_url` (`https://HOST:PORT`, or `http://`),
    /// with `tls` for an `https://` one.
    pub fn new(base_url: &str, token: Option<String>, tls: &TlsClient) -> Result<Self> {
        Ok(Self {
            url: format!("{}/v1/reports", base_url.trim_end_matches('/')),
            token,
            http: tls
                .agent(base_url, Duration::from_secs(15))
                .map_err(Error::Config)?,
        })
    }

    /// Sends `batch` as one request.
    pub fn deliver(&self, batch: &[Queued]) -> Delivery {
        let len = batch.iter().map(|q| q.body.len() + 1).sum::<usize>() + 1;
        let mut body = Vec::with_capacity(len);
        body.push(b'[');
        for (i, q) in batch.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&q.body);
        }
        body.push(b']');
        let mut req = self
            .http
            .post(&self.url)
            .header("Content-Type", "application/json");
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let resp = match req.send(&body[..]) {
            Ok(r) => r,
            Err(e) => return Delivery::Unreachable(client::explain(&e, &self.url)),
        };
        let status = resp.status().as_u16();
        let text = resp.into_body().read_to_string().unwrap_or_default();
        answer(status, &text, batch.len())
    }
}

/// What the collector's answer means for a batch of `n` reports.
fn answer(status: u16, text: &str, n: usize) -> Delivery {
    if status == 200 {
        return Delivery::Delivered(serde_json::from_str(text).unwrap_or_default());
    }
    let said = format!("HTTP {status}: {}", text.trim());
    match serde_json::from_str::<Refused>(text) {
        Ok(r) if r.retry => Delivery::Refused(r.error),
        Ok(r) if matches!(r.reason, Reason::TooLarge | Reason::TooManyReports) => {
            Delivery::TooLarge(r.error)
        }
        Ok(Refused {
            index: Some(index),
            error,
            ..
        }) if index < n => Delivery::Rejected {
            index,
            message: error,
        },
        Ok(r) => Delivery::Refused(r.error),
        // Not the ingest contract (a proxy's error page, say): nothing names a report, so
        // nothing is set aside; only the status says whether the body was too large.
        Err(_) if status == 413 => Delivery::TooLarge(said),
        Err(_) => Delivery::Refused(said),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_refusals_map_to_the_right_step() {
        let r = |reason, index, retry| {
            serde_json::to_string(&Refused {
                error: "e".into(),
                reason,
                index,
                limit: None,
                retry,
            })
            .unwrap()
        };
        assert_eq!(
            answer(400, &r(Reason::Malformed, Some(3), false), 5),
            Delivery::Rejected {
                index: 3,
                message: "e".into()
            }
        );
        assert_eq!(
            answer(400, &r(Reason::Malformed, Some(7), false), 5),
            Delivery::Refused("e".into()),
            "an index outside the batch names no report"
        );
        assert_eq!(
            answer(503, &r(Reason::Busy, None, true), 5),
            Delivery::Refused("e".into())
        );
        assert_eq!(
            answer(413, &r(Reason::TooManyReports, None, false), 5),
            Delivery::TooLarge("e".into())
        );
        assert_eq!(
            answer(401, &r(Reason::Unauthorized, None, false), 5),
            Delivery::Refused("e".into())
        );
        assert_eq!(
            answer(
                400,
                r#"{"error":"report 3: report field `agent_id`: bad"}"#,
                5
            ),
            Delivery::Refused(
                r#"HTTP 400: {"error":"report 3: report field `agent_id`: bad"}"#.into()
            ),
            "an answer outside the contract names no report, whatever its text says"
        );
        assert!(matches!(
            answer(502, "bad gateway", 5),
            Delivery::Refused(_)
        ));
    }

    #[test]
    fn an_unreachable_collector_is_called_unreachable() {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let u = Uploader::new(
            &format!("http://127.0.0.1:{port}"),
            None,
            &TlsClient::default(),
        )
        .unwrap();
        let q = vec![Queued {
            body: b"{}".to_vec(),
            origin: String::new(),
        }];
        assert!(matches!(u.deliver(&q), Delivery::Unreachable(_)));
    }
}
