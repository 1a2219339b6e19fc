//! Reading a STAMP packet field by field, for `pathprobe-agent decode`: paste the UDP payload
//! of a capture and see what a sender or reflector (ours, a router's, anyone's) put in it.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use pathprobe_proto::stamp::tlv::{
    ClassOfService, FLAG_I, FLAG_M, FLAG_U, HmacTlvCheck, TimestampInformation, TlvIter,
    check_hmac_tlv, check_request_hmac_tlv, tlv_type,
};
use pathprobe_proto::stamp::{
    AuthKey, ErrorEstimate, Mode, ReflectorPacket, ReflectorRepr, SenderPacket, SenderRepr,
    TimestampFormat,
};
use serde::Serialize;

use crate::Result;

/// Which side wrote the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Session-Sender to Session-Reflector.
    Request,
    /// Session-Reflector to Session-Sender.
    Reply,
}

/// A timestamp field.
#[derive(Debug, Clone, Serialize)]
pub struct Timestamp {
    pub raw: String,
    pub format: &'static str,
    pub unix_ns: Option<u64>,
    pub utc: Option<String>,
    pub problem: Option<String>,
}

impl Timestamp {
    fn new(raw: u64, format: TimestampFormat) -> Self {
        let (unix_ns, utc, problem) = match format.decode(raw) {
            Ok(ns) => (
                Some(ns),
                Some(
                    humantime::format_rfc3339_nanos(UNIX_EPOCH + Duration::from_nanos(ns))
                        .to_string(),
                ),
                None,
            ),
            Err(e) => (None, None, Some(e.to_string())),
        };
        Self {
            raw: format!("{raw:#018x}"),
            format: format.name(),
            unix_ns,
            utc,
            problem,
        }
    }
}

/// An Error Estimate field.
#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    pub raw: String,
    pub synchronized: bool,
    pub format: &'static str,
    pub scale: u8,
    pub multiplier: u8,
    pub error_ns: Option<u64>,
}

impl From<ErrorEstimate> for Estimate {
    fn from(e: ErrorEstimate) -> Self {
        Self {
            raw: format!("{:#06x}", e.to_u16()),
            synchronized: e.synchronized,
            format: e.format.name(),
            scale: e.scale,
            multiplier: e.multiplier,
            error_ns: e.error_nanos(),
        }
    }
}

/// One TLV.
#[derive(Debug, Clone, Serialize)]
pub struct Tlv {
    pub offset: usize,
    pub tlv_type: u8,
    pub name: &'static str,
    pub flags: String,
    pub length: usize,
    pub detail: String,
}

/// The fields only a reply has.
#[derive(Debug, Clone, Serialize)]
pub struct ReplyFields {
    pub receive_timestamp: Timestamp,
    pub sender_sequence_number: u32,
    pub sender_timestamp: Timestamp,
    pub sender_error_estimate: Estimate,
    pub sender_ttl: u8,
    /// T3 - T2: how long the reflector held the packet, when both timestamps read.
    pub reflector_residence_ns: Option<i128>,
}

/// A decoded packet.
#[derive(Debug, Clone, Serialize)]
pub struct Decoded {
    pub direction: Direction,
    pub authenticated: bool,
    pub length: usize,
    pub sequence_number: u32,
    pub timestamp: Timestamp,
    pub error_estimate: Estimate,
    pub ssid: u16,
    pub reply: Option<ReplyFields>,
    pub tlvs: Vec<Tlv>,
    pub tlv_problem: Option<String>,
    /// "verified", or why it was not.
    pub hmac: Option<String>,
    /// The HMAC TLV's check (RFC 8972 §4.8), when the packet has one and a key is given.
    pub hmac_tlv: Option<String>,
}

/// Decodes `bytes` as a packet of `direction`. With `authenticated`, the 112-octet layout is
/// used and, when `key` is given, the HMAC is checked (a failure is reported, not fatal, so
/// that the fields can still be read).
pub fn decode(
    bytes: &[u8],
    direction: Direction,
    authenticated: bool,
    key: Option<&AuthKey>,
) -> Result<Decoded> {
    let mode = if authenticated || key.is_some() {
        Mode::Authenticated
    } else {
        Mode::Unauthenticated
    };
    let (seq, ts, ee, ssid, reply, tlv_area, verified) = match direction {
        Direction::Request => {
            let p = SenderPacket::new_checked(bytes, mode)?;
            let r = SenderRepr::parse(&p);
            let verified = key.map(|k| p.verify(k));
            let area = &bytes[mode.base_len()..];
            (
                r.sequence_number,
                r.timestamp,
                r.error_estimate,
                r.ssid,
                None,
                area,
                verified,
            )
        }
        Direction::Reply => {
            let p = ReflectorPacket::new_checked(bytes, mode)?;
            let r = ReflectorRepr::parse(&p);
            let verified = key.map(|k| p.verify(k));
            let f = r.error_estimate.format;
            let residence = match (f.decode(r.timestamp), f.decode(r.receive_timestamp)) {
                (Ok(t3), Ok(t2)) => Some(i128::from(t3) - i128::from(t2)),
                _ => None,
            };
            let fields = ReplyFields {
                receive_timestamp: Timestamp::new(r.receive_timestamp, f),
                sender_sequence_number: r.sender_sequence_number,
                sender_timestamp: Timestamp::new(
                    r.sender_timestamp,
                    r.sender_error_estimate.format,
                ),
                sender_error_estimate: r.sender_error_estimate.into(),
                sender_ttl: r.sender_ttl,
                reflector_residence_ns: residence,
            };
            let area = &bytes[mode.base_len()..];
            (
                r.sequence_number,
                r.timestamp,
                r.error_estimate,
                r.ssid,
                Some(fields),
                area,
                verified,
            )
        }
    };
    let mut tlvs = Vec::new();
    let mut tlv_problem = None;
    for t in TlvIter::new(tlv_area) {
        match t {
            Ok(t) => tlvs.push(describe(&t, mode.base_len())),
            Err(e) => tlv_problem = Some(e.to_string()),
        }
    }
    let hmac_tlv = key.and_then(|k| hmac_tlv_said(bytes, mode, direction, k));
    let hmac = match (mode, verified) {
        (Mode::Unauthenticated, _) => None,
        (Mode::Authenticated, None) => Some("not checked: no key given".to_string()),
        (Mode::Authenticated, Some(Ok(()))) => Some("verified".to_string()),
        (Mode::Authenticated, Some(Err(e))) => Some(format!("FAILED: {e}")),
    };
    Ok(Decoded {
        direction,
        authenticated: mode == Mode::Authenticated,
        length: bytes.len(),
        sequence_number: seq,
        timestamp: Timestamp::new(ts, ee.format),
        error_estimate: ee.into(),
        ssid,
        reply,
        tlvs,
        tlv_problem,
        hmac,
        hmac_tlv,
    })
}

/// What the HMAC TLV's check says, when the packet has one.
fn hmac_tlv_said(bytes: &[u8], mode: Mode, direction: Direction, k: &AuthKey) -> Option<String> {
    let check = match direction {
        Direction::Request => check_request_hmac_tlv(bytes, mode.base_len(), k),
        Direction::Reply => check_hmac_tlv(bytes, mode.base_len(), k),
    };
    let said = match check {
        HmacTlvCheck::Absent => return None,
        HmacTlvCheck::Unrecognized => {
            "not checked: flagged unrecognized (the reflector does not implement it)"
        }
        HmacTlvCheck::Verified {
            integrity_failed: false,
        } => "verified",
        HmacTlvCheck::Verified {
            integrity_failed: true,
        } => "verified, flagged I: the request's TLVs failed their HMAC at the reflector",
        HmacTlvCheck::Failed => "FAILED: the TLVs were altered, or it is not the last TLV",
    };
    Some(said.to_string())
}

fn describe(t: &pathprobe_proto::stamp::tlv::Tlv<'_>, base: usize) -> Tlv {
    let name = match t.tlv_type {
        tlv_type::EXTRA_PADDING => "Extra Padding",
        tlv_type::LOCATION => "Location",
        tlv_type::TIMESTAMP_INFORMATION => "Timestamp Information",
        tlv_type::CLASS_OF_SERVICE => "Class of Service",
        tlv_type::DIRECT_MEASUREMENT => "Direct Measurement",
        tlv_type::ACCESS_REPORT => "Access Report",
        tlv_type::FOLLOW_UP_TELEMETRY => "Follow-Up Telemetry",
        tlv_type::HMAC => "HMAC",
        _ => "unassigned",
    };
    let detail = match t.tlv_type {
        tlv_type::CLASS_OF_SERVICE => ClassOfService::parse(t.value).map_or_else(
            |e| e.to_string(),
            |c| {
                format!(
                    "DSCP1 {} (asked for the reply), DSCP2 {} (received), ECN {}, RP {}",
                    c.dscp1, c.dscp2, c.ecn, c.reverse_path
                )
            },
        ),
        tlv_type::TIMESTAMP_INFORMATION => TimestampInformation::parse(t.value).map_or_else(
            |e| e.to_string(),
            |i| {
                format!(
                    "sync source in {} out {}, timestamp method in {} out {}",
                    i.sync_source_in, i.sync_source_out, i.timestamp_in, i.timestamp_out
                )
            },
        ),
        _ => format!("{} octets", t.value.len()),
    };
    let mut flags = String::new();
    for (bit, letter) in [(FLAG_U, 'U'), (FLAG_M, 'M'), (FLAG_I, 'I')] {
        if t.flags & bit != 0 {
            flags.push(letter);
        }
    }
    Tlv {
        offset: base + t.offset,
        tlv_type: t.tlv_type,
        name,
        flags,
        length: t.value.len(),
        detail,
    }
}

fn line_ts(out: &mut String, label: &str, t: &Timestamp) {
    let when = t
        .utc
        .clone()
        .or_else(|| t.problem.clone())
        .unwrap_or_default();
    let _ = writeln!(out, "{label:<32}{} {} ({when})", t.raw, t.format);
}

fn line_ee(out: &mut String, label: &str, e: &Estimate) {
    let err = e.error_ns.map_or_else(
        || "unknown (multiplier 0)".to_string(),
        |ns| format!("±{ns} ns"),
    );
    let _ = writeln!(
        out,
        "{label:<32}{} S={} Z={} scale={} multiplier={} error {err}",
        e.raw,
        u8::from(e.synchronized),
        e.format,
        e.scale,
        e.multiplier
    );
}

/// The decoded packet as aligned text.
pub fn render(d: &Decoded) -> String {
    let mut out = String::new();
    let what = match d.direction {
        Direction::Request => "Session-Sender test packet",
        Direction::Reply => "Session-Reflector test packet",
    };
    let mode = if d.authenticated {
        "authenticated"
    } else {
        "unauthenticated"
    };
    let _ = writeln!(out, "{what}, {mode}, {} octets", d.length);
    let _ = writeln!(out, "{:<32}{}", "Sequence Number", d.sequence_number);
    line_ts(&mut out, "Timestamp", &d.timestamp);
    line_ee(&mut out, "Error Estimate", &d.error_estimate);
    let _ = writeln!(out, "{:<32}{}", "SSID", d.ssid);
    if let Some(r) = &d.reply {
        line_ts(&mut out, "Receive Timestamp", &r.receive_timestamp);
        let _ = writeln!(
            out,
            "{:<32}{}",
            "Session-Sender Sequence Number", r.sender_sequence_number
        );
        line_ts(&mut out, "Session-Sender Timestamp", &r.sender_timestamp);
        line_ee(
            &mut out,
            "Session-Sender Error Estimate",
            &r.sender_error_estimate,
        );
        let _ = writeln!(out, "{:<32}{}", "Session-Sender TTL", r.sender_ttl);
        if let Some(ns) = r.reflector_residence_ns {
            let _ = writeln!(out, "{:<32}{ns} ns (T3 - T2)", "Reflector residence time");
        }
    }
    if let Some(h) = &d.hmac {
        let _ = writeln!(out, "{:<32}{h}", "HMAC");
    }
    if let Some(h) = &d.hmac_tlv {
        let _ = writeln!(out, "{:<32}{h}", "HMAC TLV");
    }
    for t in &d.tlvs {
        let flags = if t.flags.is_empty() {
            String::new()
        } else {
            format!(" [{}]", t.flags)
        };
        let _ = writeln!(
            out,
            "TLV at {:<3} type {:<3} {:<22}{flags} {}",
            t.offset, t.tlv_type, t.name, t.detail
        );
    }
    if let Some(p) = &d.tlv_problem {
        let _ = writeln!(out, "TLV problem: {p}");
    }
    out
}
