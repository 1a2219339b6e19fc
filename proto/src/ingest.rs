//! The ingest contract: what `POST /v1/reports` answers, as types both ends share, so that
//! neither side parses the other's error text.
//!
//! - 200: [`Accepted`], once every report of the batch is stored durably.
//! - any refusal (4xx, 503): [`Refused`], which says why ([`Reason`]), which report of the
//!   batch it is about (`index`, when it is about one), the limit that was hit, and whether
//!   sending the same request again later can succeed (`retry`).

use serde::{Deserialize, Serialize};

/// A stored batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Accepted {
    /// Reports stored now.
    pub accepted: u64,
    /// Reports already stored (retries), acknowledged and ignored.
    pub duplicates: u64,
}

/// Why a batch was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// No or unknown bearer token.
    Unauthorized,
    /// A report of another agent than the token's.
    Forbidden,
    /// The body is larger than the collector takes.
    TooLarge,
    /// More reports in one batch than the collector takes.
    TooManyReports,
    /// The report would give its agent more paths than the collector keeps for one agent.
    TooManyPaths,
    /// The body cannot be read.
    Unreadable,
    /// The body or one report is not a valid report (`index` names it).
    Malformed,
    /// A report of a newer format than the collector reads.
    Version,
    /// A report outside the time the collector keeps (too old, or in the future).
    Horizon,
    /// Too many batches are being ingested at once.
    Busy,
    /// The store cannot take the batch now.
    Store,
}

impl Reason {
    /// Every reason, in a fixed order.
    pub const ALL: [Self; 11] = [
        Self::Unauthorized,
        Self::Forbidden,
        Self::TooLarge,
        Self::TooManyReports,
        Self::TooManyPaths,
        Self::Unreadable,
        Self::Malformed,
        Self::Version,
        Self::Horizon,
        Self::Busy,
        Self::Store,
    ];

    /// The name in JSON and in metrics labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::TooLarge => "too_large",
            Self::TooManyReports => "too_many_reports",
            Self::TooManyPaths => "too_many_paths",
            Self::Unreadable => "unreadable",
            Self::Malformed => "malformed",
            Self::Version => "version",
            Self::Horizon => "horizon",
            Self::Busy => "busy",
            Self::Store => "store",
        }
    }

    /// True when the same request can succeed later without a change on the agent's side
    /// (the collector was busy or its store was unavailable, or it was upgraded meanwhile).
    pub const fn retry(self) -> bool {
        matches!(self, Self::Busy | Self::Store | Self::Version)
    }
}

/// A refused batch: nothing of it was stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// What is wrong and how to fix it, for people.
    pub error: String,
    pub reason: Reason,
    /// The position in the batch of the report refused, when the refusal is about one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// The limit that was hit, when one was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// Whether sending the same batch again later can succeed.
    pub retry: bool,
}

impl Refused {
    /// A refusal for `reason`, with its retry rule.
    pub fn new(reason: Reason, error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            reason,
            index: None,
            limit: None,
            retry: reason.retry(),
        }
    }

    /// About report `index` of the batch.
    #[must_use]
    pub fn at(mut self, index: usize) -> Self {
        self.index = Some(index);
        self
    }

    /// The limit that was hit.
    #[must_use]
    pub fn limit(mut self, limit: u64) -> Self {
        self.limit = Some(limit);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_round_trips_and_names_its_report() {
        let r = Refused::new(Reason::Malformed, "report 3: bad").at(3);
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(
            text,
            r#"{"error":"report 3: bad","reason":"malformed","index":3,"retry":false}"#
        );
        assert_eq!(serde_json::from_str::<Refused>(&text).unwrap(), r);
        for reason in Reason::ALL {
            let json = serde_json::to_value(reason).unwrap();
            assert_eq!(json, reason.as_str());
        }
        assert!(Refused::new(Reason::Busy, "x").retry);
        assert!(!Refused::new(Reason::TooManyPaths, "x").retry);
    }
}
