//! RFC 8972 TLVs that follow the base packet.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |STAMP TLV Flags|     Type      |           Length              |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ~                            Value                              ~
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! Length counts the Value only. Flags: U (bit 0, unrecognized), M (bit 1, malformed),
//! I (bit 2, integrity check failed); the other bits are unassigned and sent as zero. A
//! Session-Sender sends every TLV with U set (RFC 8972 §4.2), and the Session-Reflector
//! clears it on each TLV it understood, so a sender can tell an answer from an echo.
//!
//! In authenticated mode the HMAC TLV (type 8, §4.8) protects the TLVs, which the base
//! packet's HMAC does not cover: HMAC-SHA-256-128, with the session's key, over the
//! Sequence Number field (the packet's first four octets) and every TLV before it. It
//! follows every other TLV but Extra Padding; one anywhere else, of another length, or a
//! second one, fails verification.

use super::auth::{AuthKey, HMAC_LEN};
use crate::{Error, Result};

/// U: the Session-Reflector did not recognize the TLV.
pub const FLAG_U: u8 = 0x80;
/// M: the TLV is malformed.
pub const FLAG_M: u8 = 0x40;
/// I: the TLV failed an integrity check.
pub const FLAG_I: u8 = 0x20;
/// Flags, Type and Length.
pub const HEADER_LEN: usize = 4;
/// Octets of the HMAC TLV: its header and a 16-octet HMAC.
pub const HMAC_TLV_LEN: usize = HEADER_LEN + HMAC_LEN;

/// TLV types from the IANA "STAMP TLV Types" registry (RFC 8972 §6.2).
pub mod tlv_type {
    pub const EXTRA_PADDING: u8 = 1;
    pub const LOCATION: u8 = 2;
    pub const TIMESTAMP_INFORMATION: u8 = 3;
    pub const CLASS_OF_SERVICE: u8 = 4;
    pub const DIRECT_MEASUREMENT: u8 = 5;
    pub const ACCESS_REPORT: u8 = 6;
    pub const FOLLOW_UP_TELEMETRY: u8 = 7;
    pub const HMAC: u8 = 8;
}

/// Synchronization sources for the Timestamp Information TLV (RFC 8972 §6.5).
pub mod sync_source {
    pub const NTP: u8 = 1;
    pub const PTP: u8 = 2;
    pub const SSU_BITS: u8 = 3;
    pub const GNSS: u8 = 4;
    pub const LOCAL_FREE_RUNNING: u8 = 5;
}

/// Timestamping methods for the Timestamp Information TLV (RFC 8972 §6.6).
pub mod timestamp_method {
    pub const HW_ASSIST: u8 = 1;
    pub const SW_LOCAL: u8 = 2;
    pub const CONTROL_PLANE: u8 = 3;
}

/// One TLV as read from a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tlv<'a> {
    /// Offset of the TLV's first octet from the start of the TLV area.
    pub offset: usize,
    pub flags: u8,
    pub tlv_type: u8,
    pub value: &'a [u8],
}

impl Tlv<'_> {
    /// The U flag.
    pub const fn unrecognized(&self) -> bool {
        self.flags & FLAG_U != 0
    }
    /// The M flag.
    pub const fn malformed(&self) -> bool {
        self.flags & FLAG_M != 0
    }
    /// The I flag.
    pub const fn integrity_failed(&self) -> bool {
        self.flags & FLAG_I != 0
    }
}

/// Reads TLVs one by one. A trailing run of zero octets is the padding an RFC 8762-only
/// peer adds, and ends the sequence. After the first error the iterator stops.
#[derive(Debug, Clone)]
pub struct TlvIter<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> TlvIter<'a> {
    /// Iterates the TLV area `buf` (the octets after the base packet).
    pub const fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
}

impl<'a> Iterator for TlvIter<'a> {
    type Item = Result<Tlv<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = &self.buf[self.pos..];
        if rest.iter().all(|&b| b == 0) {
            self.pos = self.buf.len();
            return None;
        }
        let offset = self.pos;
        match split_tlv(rest) {
            Ok((flags, tlv_type, value)) => {
                self.pos += HEADER_LEN + value.len();
                Some(Ok(Tlv {
                    offset,
                    flags,
                    tlv_type,
                    value,
                }))
            }
            Err(reason) => {
                self.pos = self.buf.len();
                Some(Err(Error::MalformedTlv { offset, reason }))
            }
        }
    }
}

/// Splits the TLV at the start of `rest` into flags, type and value.
fn split_tlv(rest: &[u8]) -> Result<(u8, u8, &[u8]), &'static str> {
    if rest.len() < HEADER_LEN {
        return Err("fewer than 4 octets left for a TLV header");
    }
    let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
    let Some(value) = rest.get(HEADER_LEN..HEADER_LEN + len) else {
        return Err("Length runs past the end of the packet");
    };
    Ok((rest[0], rest[1], value))
}

/// The Timestamp Information TLV (type 3, RFC 8972 §4.3): how the reflector's clock is
/// synchronized and how it took its receive (In) and transmit (Out) timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TimestampInformation {
    pub sync_source_in: u8,
    pub timestamp_in: u8,
    pub sync_source_out: u8,
    pub timestamp_out: u8,
}

impl TimestampInformation {
    /// Length of the value without sub-TLVs.
    pub const LEN: usize = 4;

    /// Reads the first four octets of the value; sub-TLVs after them are not interpreted.
    pub fn parse(value: &[u8]) -> Result<Self> {
        match value {
            [a, b, c, d, ..] => Ok(Self {
                sync_source_in: *a,
                timestamp_in: *b,
                sync_source_out: *c,
                timestamp_out: *d,
            }),
            _ => Err(Error::MalformedTlv {
                offset: 0,
                reason: "Timestamp Information value is shorter than 4 octets",
            }),
        }
    }

    /// The four value octets.
    pub const fn to_bytes(self) -> [u8; 4] {
        [
            self.sync_source_in,
            self.timestamp_in,
            self.sync_source_out,
            self.timestamp_out,
        ]
    }
}

/// The Class of Service TLV (type 4, RFC 8972 §4.4): DSCP1 is the DSCP the sender asks the
/// reflector to use on the reverse path, DSCP2 and ECN are what the reflector received, so
/// the sender learns whether the forward path re-marked its packets; RP reports whether the
/// reflector used DSCP1.
///
/// ```text
/// |   DSCP1   |   DSCP2   |ECN| RP|           Reserved            |
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ClassOfService {
    /// 6 bits.
    pub dscp1: u8,
    /// 6 bits.
    pub dscp2: u8,
    /// 2 bits.
    pub ecn: u8,
    /// 2 bits.
    pub reverse_path: u8,
}

impl ClassOfService {
    /// Length of the value.
    pub const LEN: usize = 4;

    /// Reads a value of exactly four octets; reserved bits are ignored on receipt.
    pub fn parse(value: &[u8]) -> Result<Self> {
        let [a, b, _, _] = value else {
            return Err(Error::MalformedTlv {
                offset: 0,
                reason: "Class of Service value is not 4 octets",
            });
        };
        Ok(Self {
            dscp1: a >> 2,
            dscp2: ((a & 0x03) << 4) | (b >> 4),
            ecn: (b >> 2) & 0x03,
            reverse_path: b & 0x03,
        })
    }

    /// The four value octets; bits beyond each field's width are dropped, Reserved is zero.
    pub const fn to_bytes(self) -> [u8; 4] {
        let dscp1 = self.dscp1 & 0x3f;
        let dscp2 = self.dscp2 & 0x3f;
        [
            (dscp1 << 2) | (dscp2 >> 4),
            ((dscp2 & 0x0f) << 4) | ((self.ecn & 0x03) << 2) | (self.reverse_path & 0x03),
            0,
            0,
        ]
    }
}

/// Appends TLVs to a TLV area.
#[derive(Debug)]
pub struct TlvWriter<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> TlvWriter<'a> {
    /// Writes into `buf`, usually `SenderPacket::tlvs_mut()`.
    pub const fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Octets written so far.
    pub const fn len(&self) -> usize {
        self.pos
    }

    /// True when nothing has been written.
    pub const fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Appends one TLV with flags zero and the given value.
    pub fn push(&mut self, tlv_type: u8, value: &[u8]) -> Result<()> {
        let len = u16::try_from(value.len()).map_err(|_| Error::MalformedTlv {
            offset: self.pos,
            reason: "value longer than 65535 octets",
        })?;
        let needed = self.pos + HEADER_LEN + value.len();
        let Some(dst) = self.buf.get_mut(self.pos..needed) else {
            return Err(Error::Truncated {
                what: "TLV area",
                len: self.buf.len(),
                needed,
            });
        };
        dst[0] = FLAG_U;
        dst[1] = tlv_type;
        dst[2..4].copy_from_slice(&len.to_be_bytes());
        dst[4..].copy_from_slice(value);
        self.pos = needed;
        Ok(())
    }

    /// Appends an HMAC TLV with a zero HMAC and returns its offset; sign the packet with
    /// [`sign_hmac_tlv`] once everything it covers is written. It must be the last TLV
    /// but Extra Padding.
    pub fn hmac_placeholder(&mut self) -> Result<usize> {
        let at = self.pos;
        self.push(tlv_type::HMAC, &[0; HMAC_LEN])?;
        Ok(at)
    }

    /// Appends an Extra Padding TLV whose whole length, header included, is `total_len`
    /// (at least 4), filled with zeros.
    pub fn extra_padding(&mut self, total_len: usize) -> Result<()> {
        let value_len = total_len
            .checked_sub(HEADER_LEN)
            .ok_or(Error::MalformedTlv {
                offset: self.pos,
                reason: "Extra Padding needs at least its 4-octet header",
            })?;
        let len = u16::try_from(value_len).map_err(|_| Error::MalformedTlv {
            offset: self.pos,
            reason: "value longer than 65535 octets",
        })?;
        let needed = self.pos + total_len;
        let Some(dst) = self.buf.get_mut(self.pos..needed) else {
            return Err(Error::Truncated {
                what: "TLV area",
                len: self.buf.len(),
                needed,
            });
        };
        dst.fill(0);
        dst[0] = FLAG_U;
        dst[1] = tlv_type::EXTRA_PADDING;
        dst[2..4].copy_from_slice(&len.to_be_bytes());
        self.pos = needed;
        Ok(())
    }

    /// Appends a Timestamp Information TLV (a sender sends zeros; the reflector fills it).
    pub fn timestamp_information(&mut self, info: TimestampInformation) -> Result<()> {
        self.push(tlv_type::TIMESTAMP_INFORMATION, &info.to_bytes())
    }

    /// Appends a Class of Service TLV.
    pub fn class_of_service(&mut self, cos: ClassOfService) -> Result<()> {
        self.push(tlv_type::CLASS_OF_SERVICE, &cos.to_bytes())
    }
}

/// What the reflector found in the TLVs it reflected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TlvReflectOutcome {
    /// TLVs returned with the U flag.
    pub unrecognized: u32,
    /// TLVs returned with the M flag, or trailing octets that are not a TLV.
    pub malformed: u32,
}

/// What a reflector knows about a received packet that its TLV answers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TlvReflectInfo {
    /// The whole TOS / Traffic Class octet the test packet arrived with (DSCP and ECN).
    pub received_tos: u8,
    /// RP for Class of Service answers: 0 when the reply carries DSCP1, 1 when it does not.
    pub reverse_path: u8,
    /// The reflector's own clock and timestamping.
    pub timestamp_information: TimestampInformation,
    /// Authenticated mode: the HMAC TLV is understood (its value is left for
    /// [`sign_hmac_tlv`]); unauthenticated, it is returned as unrecognized.
    pub authenticated: bool,
}

/// Reflects the TLV area `request` into `reply`, which must be exactly as long: the reply is
/// never larger than the request.
///
/// RFC 8972 §4: known TLVs are answered (Timestamp Information filled with the reflector's
/// values; Class of Service with the DSCP and ECN received), Extra Padding is returned as
/// it came, unknown TLVs are returned unchanged with the U flag, and a TLV whose Length runs
/// past the packet is returned with the M flag and the rest copied as is. Zero padding from
/// an RFC 8762-only sender is returned unchanged.
pub fn reflect_tlvs(request: &[u8], reply: &mut [u8], info: &TlvReflectInfo) -> TlvReflectOutcome {
    debug_assert_eq!(request.len(), reply.len());
    let len = request.len().min(reply.len());
    let (request, reply) = (&request[..len], &mut reply[..len]);
    let mut outcome = TlvReflectOutcome::default();
    let mut pos = 0;
    while pos < len {
        let rest = &request[pos..];
        if rest.iter().all(|&b| b == 0) {
            reply[pos..].copy_from_slice(rest);
            break;
        }
        let Ok((_, tlv_type, value)) = split_tlv(rest) else {
            reply[pos..].copy_from_slice(rest);
            if rest.len() >= HEADER_LEN {
                reply[pos] = FLAG_M;
            }
            outcome.malformed += 1;
            break;
        };
        let end = pos + HEADER_LEN + value.len();
        reply[pos..end].copy_from_slice(&request[pos..end]);
        let value_out = &mut reply[pos + HEADER_LEN..end];
        let flags = match tlv_type {
            tlv_type::EXTRA_PADDING => 0,
            tlv_type::TIMESTAMP_INFORMATION if value.len() >= TimestampInformation::LEN => {
                value_out[..4].copy_from_slice(&info.timestamp_information.to_bytes());
                0
            }
            tlv_type::CLASS_OF_SERVICE if value.len() == ClassOfService::LEN => {
                let asked = ClassOfService::parse(value).unwrap_or_default();
                let answer = ClassOfService {
                    dscp1: asked.dscp1,
                    dscp2: info.received_tos >> 2,
                    ecn: info.received_tos & 0x03,
                    reverse_path: info.reverse_path,
                };
                value_out.copy_from_slice(&answer.to_bytes());
                0
            }
            tlv_type::HMAC if info.authenticated && value.len() == HMAC_LEN => 0,
            tlv_type::TIMESTAMP_INFORMATION | tlv_type::CLASS_OF_SERVICE => {
                outcome.malformed += 1;
                FLAG_M
            }
            tlv_type::HMAC if info.authenticated => {
                outcome.malformed += 1;
                FLAG_M
            }
            _ => {
                outcome.unrecognized += 1;
                FLAG_U
            }
        };
        reply[pos] = flags;
        pos = end;
    }
    outcome
}

/// Where a TLV area's HMAC TLV is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HmacTlvAt {
    /// The area has none (or a malformed TLV ends it before one).
    Absent,
    /// The HMAC TLV's first octet, counted from the start of the TLV area.
    At(usize),
    /// An HMAC TLV followed by a TLV other than Extra Padding, not 16 octets long, or not
    /// the only one: RFC 8972 §4.8 makes that an HMAC verification failure.
    Misplaced,
}

/// Finds the HMAC TLV of a TLV area.
pub fn find_hmac_tlv(area: &[u8]) -> HmacTlvAt {
    let mut at = None;
    for tlv in TlvIter::new(area) {
        let Ok(tlv) = tlv else {
            return at.map_or(HmacTlvAt::Absent, |_| HmacTlvAt::Misplaced);
        };
        match (tlv.tlv_type, at) {
            (tlv_type::HMAC, None) if tlv.value.len() == HMAC_LEN => at = Some(tlv.offset),
            (tlv_type::HMAC, _) => return HmacTlvAt::Misplaced,
            (tlv_type::EXTRA_PADDING, _) | (_, None) => {}
            (_, Some(_)) => return HmacTlvAt::Misplaced,
        }
    }
    at.map_or(HmacTlvAt::Absent, HmacTlvAt::At)
}

/// The two runs of `packet` an HMAC TLV at `at` (in the TLV area, which starts at `base`)
/// covers: the Sequence Number field, and the TLVs before it.
fn hmac_tlv_covers(packet: &[u8], base: usize, at: usize) -> Option<[&[u8]; 2]> {
    Some([packet.get(..4)?, packet.get(base..base + at)?])
}

/// Writes the HMAC of the HMAC TLV at `at` of `packet`'s TLV area (which starts at
/// `base`, the mode's base length). Everything it covers must be final.
pub fn sign_hmac_tlv(packet: &mut [u8], base: usize, at: usize, key: &AuthKey) {
    let Some(parts) = hmac_tlv_covers(packet, base, at) else {
        return;
    };
    let tag = key.tag_parts(&parts);
    let value = base + at + HEADER_LEN;
    if let Some(dst) = packet.get_mut(value..value + HMAC_LEN) {
        dst.copy_from_slice(&tag);
    }
}

/// What a packet's HMAC TLV says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HmacTlvCheck {
    /// There is none: the TLVs are not protected.
    Absent,
    /// The far end returned it flagged unrecognized: it does not implement the HMAC TLV,
    /// and the TLVs are not protected.
    Unrecognized,
    /// It verifies. `integrity_failed`: the reflector flagged it I, because the request's
    /// TLVs failed their HMAC on the way there, so its TLV answers are not to be used.
    Verified { integrity_failed: bool },
    /// It does not verify, or is not where it must be: the TLVs were altered.
    Failed,
}

/// Checks the HMAC TLV of a reply, whose TLV area starts at `base`, with `key`.
pub fn check_hmac_tlv(packet: &[u8], base: usize, key: &AuthKey) -> HmacTlvCheck {
    check(packet, base, key, true)
}

/// Checks the HMAC TLV of a request (whose sender sets U on every TLV) with `key`.
pub fn check_request_hmac_tlv(packet: &[u8], base: usize, key: &AuthKey) -> HmacTlvCheck {
    check(packet, base, key, false)
}

fn check(packet: &[u8], base: usize, key: &AuthKey, reply: bool) -> HmacTlvCheck {
    let Some(area) = packet.get(base..) else {
        return HmacTlvCheck::Absent;
    };
    let at = match find_hmac_tlv(area) {
        HmacTlvAt::Absent => return HmacTlvCheck::Absent,
        HmacTlvAt::Misplaced => return HmacTlvCheck::Failed,
        HmacTlvAt::At(at) => at,
    };
    let flags = area[at];
    if reply && flags & FLAG_U != 0 {
        return HmacTlvCheck::Unrecognized;
    }
    if verify_hmac_tlv_at(packet, base, at, key) {
        HmacTlvCheck::Verified {
            integrity_failed: flags & FLAG_I != 0,
        }
    } else {
        HmacTlvCheck::Failed
    }
}

/// Whether the HMAC of the HMAC TLV at `at` of `packet`'s TLV area (which starts at
/// `base`) is right.
pub fn verify_hmac_tlv_at(packet: &[u8], base: usize, at: usize, key: &AuthKey) -> bool {
    let value = base + at + HEADER_LEN;
    match (
        hmac_tlv_covers(packet, base, at),
        packet.get(value..value + HMAC_LEN),
    ) {
        (Some(parts), Some(tag)) => key.verify_parts(&parts, tag).is_ok(),
        _ => false,
    }
}

/// Returns a request's TLVs as they came, each flagged I (and nothing else), for a
/// request whose HMAC TLV failed: the reflector answers none of them (RFC 8972 §4.8).
pub fn flag_integrity_failed(request: &[u8], reply: &mut [u8]) {
    let len = request.len().min(reply.len());
    reply[..len].copy_from_slice(&request[..len]);
    for tlv in TlvIter::new(&request[..len]).map_while(Result::ok) {
        reply[tlv.offset] = FLAG_I;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn class_of_service_bit_layout() {
        // DSCP1 = EF (46 = 0b101110), DSCP2 = AF41 (34 = 0b100010), ECN = CE (3), RP = 1.
        let cos = ClassOfService {
            dscp1: 46,
            dscp2: 34,
            ecn: 3,
            reverse_path: 1,
        };
        assert_eq!(cos.to_bytes(), [0b1011_1010, 0b0010_1101, 0, 0]);
        assert_eq!(ClassOfService::parse(&cos.to_bytes()), Ok(cos));
        let max = ClassOfService {
            dscp1: 63,
            dscp2: 63,
            ecn: 3,
            reverse_path: 3,
        };
        assert_eq!(max.to_bytes(), [0xff, 0xff, 0, 0]);
        assert_eq!(ClassOfService::default().to_bytes(), [0; 4]);
    }

    #[test]
    fn class_of_service_wrong_length_is_an_error() {
        assert!(ClassOfService::parse(&[0; 3]).is_err());
        assert!(ClassOfService::parse(&[0; 5]).is_err());
    }

    #[test]
    fn iter_reads_tlvs_and_stops_at_zero_padding() {
        let area = [
            0, 1, 0, 2, 0xaa, 0xbb, // Extra Padding, 2 octets
            0x80, 200, 0, 0, // unknown type 200 with U set, empty
            0, 0, 0, 0, 0, 0, // RFC 8762 zero padding
        ];
        let tlvs: Vec<_> = TlvIter::new(&area).collect::<Result<_>>().unwrap();
        assert_eq!(tlvs.len(), 2);
        assert_eq!(tlvs[0].tlv_type, tlv_type::EXTRA_PADDING);
        assert_eq!(tlvs[0].value, &[0xaa, 0xbb]);
        assert_eq!(tlvs[1].offset, 6);
        assert!(tlvs[1].unrecognized());
        assert!(!tlvs[1].malformed());
    }

    #[test]
    fn iter_reports_overrun_with_offset_then_stops() {
        let area = [0, 4, 0, 4, 0, 0, 0, 0, 0, 1, 0, 9, 1];
        let mut it = TlvIter::new(&area);
        assert!(it.next().unwrap().is_ok());
        assert_eq!(
            it.next().unwrap(),
            Err(Error::MalformedTlv {
                offset: 8,
                reason: "Length runs past the end of the packet"
            })
        );
        assert!(it.next().is_none());
    }

    #[test]
    fn iter_reports_short_header() {
        let area = [0, 1, 0];
        assert!(matches!(
            TlvIter::new(&area).next(),
            Some(Err(Error::MalformedTlv { offset: 0, .. }))
        ));
    }

    #[test]
    fn writer_refuses_to_overflow() {
        let mut buf = [0u8; 7];
        let mut w = TlvWriter::new(&mut buf);
        assert!(w.class_of_service(ClassOfService::default()).is_err());
        assert!(w.extra_padding(7).is_ok());
        assert_eq!(w.len(), 7);
        assert!(w.extra_padding(4).is_err());
        assert_eq!(
            buf,
            [FLAG_U, 1, 0, 3, 0, 0, 0],
            "a sender sets U on every TLV"
        );
    }

    fn reflect(request: &[u8], info: TlvReflectInfo) -> (Vec<u8>, TlvReflectOutcome) {
        let mut reply = vec![0x5a; request.len()];
        let outcome = reflect_tlvs(request, &mut reply, &info);
        (reply, outcome)
    }

    #[test]
    fn unknown_tlv_comes_back_with_u_flag_and_value() {
        let req = [0, 77, 0, 3, 1, 2, 3];
        let (reply, outcome) = reflect(&req, TlvReflectInfo::default());
        assert_eq!(reply, [FLAG_U, 77, 0, 3, 1, 2, 3]);
        assert_eq!(outcome.unrecognized, 1);
    }

    #[test]
    fn class_of_service_answer_reports_received_dscp_and_ecn() {
        let mut req = [0u8; 8];
        TlvWriter::new(&mut req)
            .class_of_service(ClassOfService {
                dscp1: 46,
                ..Default::default()
            })
            .unwrap();
        // Received as AF11 (10) with ECT(0) (2): TOS = 10 << 2 | 2.
        let info = TlvReflectInfo {
            received_tos: (10 << 2) | 2,
            reverse_path: 0,
            ..Default::default()
        };
        let (reply, outcome) = reflect(&req, info);
        assert_eq!(outcome, TlvReflectOutcome::default());
        let tlv = TlvIter::new(&reply).next().unwrap().unwrap();
        assert_eq!(tlv.flags, 0);
        assert_eq!(
            ClassOfService::parse(tlv.value).unwrap(),
            ClassOfService {
                dscp1: 46,
                dscp2: 10,
                ecn: 2,
                reverse_path: 0
            }
        );
    }

    #[test]
    fn timestamp_information_is_filled_and_sub_tlvs_kept() {
        let req = [0, 3, 0, 6, 0, 0, 0, 0, 0xde, 0xad];
        let info = TlvReflectInfo {
            timestamp_information: TimestampInformation {
                sync_source_in: sync_source::NTP,
                timestamp_in: timestamp_method::SW_LOCAL,
                sync_source_out: sync_source::NTP,
                timestamp_out: timestamp_method::SW_LOCAL,
            },
            ..Default::default()
        };
        let (reply, _) = reflect(&req, info);
        assert_eq!(reply, [0, 3, 0, 6, 1, 2, 1, 2, 0xde, 0xad]);
    }

    #[test]
    fn overrunning_tlv_comes_back_with_m_flag() {
        let req = [0, 1, 0, 0, 0, 9, 0, 50, 1, 2];
        let (reply, outcome) = reflect(&req, TlvReflectInfo::default());
        assert_eq!(reply, [0, 1, 0, 0, FLAG_M, 9, 0, 50, 1, 2]);
        assert_eq!(outcome.malformed, 1);
    }

    #[test]
    fn zero_padding_comes_back_unchanged() {
        let req = [0u8; 20];
        let (reply, outcome) = reflect(&req, TlvReflectInfo::default());
        assert_eq!(reply, req);
        assert_eq!(outcome, TlvReflectOutcome::default());
    }

    #[test]
    fn request_flags_are_not_echoed() {
        // A sender that (wrongly) set U and I on a padding TLV gets clean flags back.
        let req = [FLAG_U | FLAG_I | 0x01, 1, 0, 0];
        let (reply, _) = reflect(&req, TlvReflectInfo::default());
        assert_eq!(reply, [0, 1, 0, 0]);
    }

    proptest! {
        #[test]
        fn iter_never_panics_and_stays_in_bounds(area in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut end = 0;
            for tlv in TlvIter::new(&area) {
                match tlv {
                    Ok(t) => { end = t.offset + HEADER_LEN + t.value.len(); prop_assert!(end <= area.len()); }
                    Err(_) => break,
                }
            }
            prop_assert!(end <= area.len());
        }

        #[test]
        fn reflection_keeps_length_and_structure(area in proptest::collection::vec(any::<u8>(), 0..300), tos: u8) {
            let info = TlvReflectInfo { received_tos: tos, ..Default::default() };
            let mut reply = vec![0; area.len()];
            reflect_tlvs(&area, &mut reply, &info);
            // Same TLV boundaries and types on both sides.
            let a: Vec<_> = TlvIter::new(&area).map(|t| t.map(|t| (t.offset, t.tlv_type, t.value.len()))).collect();
            let b: Vec<_> = TlvIter::new(&reply).map(|t| t.map(|t| (t.offset, t.tlv_type, t.value.len()))).collect();
            prop_assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(&b) {
                if let (Ok(x), Ok(y)) = (x, y) { prop_assert_eq!(x, y); }
            }
        }

        #[test]
        fn writer_round_trip(dscp1 in 0u8..64, dscp2 in 0u8..64, ecn in 0u8..4, rp in 0u8..4, pad in 4usize..100) {
            let cos = ClassOfService { dscp1, dscp2, ecn, reverse_path: rp };
            let mut buf = vec![0u8; 8 + pad];
            let mut w = TlvWriter::new(&mut buf);
            w.class_of_service(cos).unwrap();
            w.extra_padding(pad).unwrap();
            let tlvs: Vec<_> = TlvIter::new(&buf).collect::<Result<_>>().unwrap();
            prop_assert_eq!(ClassOfService::parse(tlvs[0].value).unwrap(), cos);
            prop_assert_eq!(tlvs[1].value.len(), pad - HEADER_LEN);
        }
    }
}
