//! TCP probes, for paths that pass only TCP to a few ports: probe kinds on the same
//! shared engine as STAMP ([`crate::engine::mux`]: one timetable, the same three threads,
//! tracker, windows and reports). This module builds and reads the segments and opens the
//! sockets; the engine sends, receives and credits.
//!
//! - **`tcp-syn`**: a half-open handshake from a raw socket (CAP_NET_RAW). Each probe is a
//!   SYN whose initial sequence number says which probe it is; the SYN-ACK (or RST) is
//!   matched by its acknowledgement number and timed by the kernel's receive stamp. A
//!   SYN-ACK is answered at once with our RST, so the far end keeps no half-open
//!   connection. Paths pinned alike share one raw socket; an answer is credited by its
//!   source (the path's target) and the port of ours it comes to. Source ports are reserved by bound (never listening) TCP sockets, so no
//!   local program can take the same 4-tuple; since no socket owns our connection, the
//!   kernel also answers the SYN-ACK with an RST of its own. Both RSTs close the far end's
//!   half-open entry; neither touches the measurement, which is taken from the SYN-ACK's
//!   kernel receive stamp before either leaves. IPv4 only.
//!
//!   A far end resets a half-open connection when a new SYN with another sequence number
//!   arrives on the same 4-tuple (Linux's `tcp_check_req`), so two probes of one source port
//!   must never be in flight together. `--bind ADDR:PORT` pins one source port (one flow,
//!   one ECMP path; keep the rate under 1/RTT); otherwise probes rotate over
//!   [`SOURCE_PORTS`] reserved ports, each used once per that many probes.
//! - **`tcp-connect`**: a full `connect()` per probe, no privileges; the RTT is the one the
//!   kernel measured for the handshake (`TCP_INFO`), so it does not include our wake-up
//!   latency. Each connection is closed with an RST (`SO_LINGER` 0), leaving no TIME-WAIT.
//!
//! An RST answer (nothing listens on the port) counts as received and as `refused`: it
//! crossed the path and times it. No answer within the timeout is loss.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use pathprobe_proto::report::TimestampSource;
use pnet_packet::ip::IpNextHeaderProtocols;
use pnet_packet::ipv4::Ipv4Packet;
use pnet_packet::tcp::{MutableTcpPacket, TcpFlags, TcpOption, TcpPacket, ipv4_checksum};
use socket2::{Domain, Protocol, Socket, Type};

use super::ProbeConfig;
use crate::sys;
use crate::{Error, Result};

/// Octets of our SYN: the TCP header and an MSS option.
pub const SYN_LEN: usize = 24;
/// Octets of our RST: the bare TCP header.
const RST_LEN: usize = 20;
/// Source ports a `tcp-syn` session rotates over when --bind names none.
pub const SOURCE_PORTS: usize = 64;

/// Writes a TCP segment from `src` to `dst` into `buf`: a SYN with an MSS option, or a
/// bare RST; returns its length. `buf` must hold [`SYN_LEN`] octets.
pub fn segment(buf: &mut [u8], src: SocketAddrV4, dst: SocketAddrV4, seq: u32, rst: bool) -> usize {
    let len = if rst { RST_LEN } else { SYN_LEN };
    buf[..len].fill(0);
    let Some(mut t) = MutableTcpPacket::new(&mut buf[..len]) else {
        return 0;
    };
    t.set_source(src.port());
    t.set_destination(dst.port());
    t.set_sequence(seq);
    t.set_acknowledgement(0);
    t.set_window(if rst { 0 } else { 64_240 });
    if rst {
        t.set_data_offset(5);
        t.set_flags(TcpFlags::RST);
    } else {
        t.set_data_offset(6);
        t.set_flags(TcpFlags::SYN);
        t.set_options(&[TcpOption::mss(1460)]);
    }
    let sum = ipv4_checksum(&t.to_immutable(), src.ip(), dst.ip());
    t.set_checksum(sum);
    len
}

/// What came back for a SYN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// The port of ours it answers.
    pub port: u16,
    /// The acknowledgement number (our ISN + 1).
    pub ack: u32,
    /// SYN-ACK (someone listens) or RST (no one does).
    pub refused: bool,
    /// The TTL it arrived with (the hops back are below the far end's initial TTL).
    pub ttl: u8,
}

/// Reads an IPv4 packet a raw TCP socket received: where it came from and, when it is a
/// SYN-ACK or an RST, what it answers. Anything else (our own SYNs seen on loopback, other
/// programs' segments) is `None`.
pub fn parse_reply(ip: &[u8]) -> Option<(SocketAddrV4, Answer)> {
    let p = Ipv4Packet::new(ip)?;
    if p.get_version() != 4 || p.get_next_level_protocol() != IpNextHeaderProtocols::Tcp {
        return None;
    }
    let hl = usize::from(p.get_header_length()) * 4;
    if hl < 20 {
        return None;
    }
    let t = TcpPacket::new(ip.get(hl..)?)?;
    let f = t.get_flags();
    let syn_ack = f & (TcpFlags::SYN | TcpFlags::ACK) == TcpFlags::SYN | TcpFlags::ACK;
    let rst = f & TcpFlags::RST != 0;
    (syn_ack || rst).then(|| {
        (
            SocketAddrV4::new(p.get_source(), t.get_source()),
            Answer {
                port: t.get_destination(),
                ack: t.get_acknowledgement(),
                refused: rst,
                ttl: p.get_ttl(),
            },
        )
    })
}

/// Reads an IPv4 packet a raw TCP socket received: an answer from `target` to one of our
/// `ports`, or `None` for anything else.
pub fn parse_answer(ip: &[u8], target: SocketAddrV4, ports: &[u16]) -> Option<Answer> {
    parse_reply(ip)
        .filter(|(from, a)| *from == target && ports.contains(&a.port))
        .map(|(_, a)| a)
}

fn io_err(what: String) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// The IPv4 target of a `tcp-syn` path.
pub fn syn_target(target: SocketAddr) -> Result<SocketAddrV4> {
    match target {
        SocketAddr::V4(t) => Ok(t),
        SocketAddr::V6(_) => Err(Error::Config(
            "--proto tcp-syn takes an IPv4 target; for IPv6 use --proto tcp-connect".to_string(),
        )),
    }
}

/// The raw TCP socket `tcp-syn` paths pinned alike share (CAP_NET_RAW), bound to `bind`
/// when the pinning names an address, non-blocking, with kernel receive stamps where the
/// kernel gives them. Each SYN's TOS and TTL go with it as ancillary data.
pub fn open_raw(cfg: &ProbeConfig, bind: Option<Ipv4Addr>) -> Result<(Socket, TimestampSource)> {
    let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP)).map_err(|e| {
        if e.kind() == io::ErrorKind::PermissionDenied {
            Error::Config(
                "--proto tcp-syn needs CAP_NET_RAW (run as root, or `setcap cap_net_raw+ep` the binary); without it use --proto tcp-connect".to_string(),
            )
        } else {
            Error::Io {
                what: "open a raw TCP socket".to_string(),
                source: e,
            }
        }
    })?;
    crate::pin::pin(
        &raw,
        cfg.target,
        bind.map(|ip| SocketAddr::from((ip, 0))),
        cfg.interface.as_deref(),
        cfg.fwmark,
    )?;
    raw.set_nonblocking(true)
        .map_err(io_err("make the raw socket non-blocking".into()))?;
    let _ = raw.set_recv_buffer_size(8 << 20);
    let (rx, _) = sys::enable_timestamping(&raw, false);
    Ok((raw, rx))
}

/// A `tcp-syn` path's flow: the source ports it reserves (bound, never listening TCP
/// sockets, so no local program can take the same 4-tuple) and its sequence numbers.
/// Probe `n` leaves from `ports[n % ports.len()]` with the ISN `isn_base + n`.
#[derive(Debug)]
pub struct SynFlow {
    _reserved: Vec<Socket>,
    pub target: SocketAddrV4,
    /// Where the SYNs leave from (the first of the ports).
    pub local: SocketAddrV4,
    ports: Vec<u16>,
    isn_base: u32,
}

impl SynFlow {
    /// Reserves the flow's source ports on `source`: the one `--bind` names, or
    /// [`SOURCE_PORTS`] the kernel picks.
    pub fn open(cfg: &ProbeConfig, source: Ipv4Addr) -> Result<Self> {
        let target = syn_target(cfg.target)?;
        let wanted: Vec<u16> = match cfg.bind.map(|b| b.port()) {
            Some(p) if p != 0 => vec![p],
            _ => vec![0; SOURCE_PORTS],
        };
        let mut reserved = Vec::with_capacity(wanted.len());
        let mut ports = Vec::with_capacity(wanted.len());
        for port in wanted {
            let r = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
                .map_err(io_err("open a TCP socket".into()))?;
            r.bind(&SocketAddr::from((source, port)).into())
                .map_err(io_err(format!(
                    "reserve TCP port {port} on {source} (--bind)"
                )))?;
            match r.local_addr().ok().and_then(|a| a.as_socket()) {
                Some(SocketAddr::V4(a)) => ports.push(a.port()),
                _ => {
                    return Err(Error::Config(
                        "a reserved TCP port has no address".to_string(),
                    ));
                }
            }
            reserved.push(r);
        }
        let mut b = [0u8; 4];
        getrandom::fill(&mut b)
            .map_err(|e| Error::Config(format!("no randomness for sequence numbers: {e}")))?;
        Ok(Self {
            _reserved: reserved,
            target,
            local: SocketAddrV4::new(source, ports[0]),
            ports,
            isn_base: u32::from_be_bytes(b),
        })
    }

    fn port_of(&self, seq: u32) -> u16 {
        self.ports[usize::try_from(seq).unwrap_or(0) % self.ports.len()]
    }

    /// Whether an answer to `port` is this flow's to read.
    pub fn holds(&self, port: u16) -> bool {
        self.ports.contains(&port)
    }

    /// Writes probe `seq`'s SYN into `buf` ([`SYN_LEN`] octets); returns its length.
    pub fn syn(&self, buf: &mut [u8], seq: u32) -> usize {
        let from = SocketAddrV4::new(*self.local.ip(), self.port_of(seq));
        segment(
            buf,
            from,
            self.target,
            self.isn_base.wrapping_add(seq),
            false,
        )
    }

    /// The probe an answer of this flow's answers: `None` when it came to another port
    /// than that probe left from (not an answer to it).
    pub fn seq_of(&self, a: &Answer) -> Option<u32> {
        let seq = a.ack.wrapping_sub(1).wrapping_sub(self.isn_base);
        (self.port_of(seq) == a.port).then_some(seq)
    }

    /// Writes the RST that closes the far end's half-open connection of a SYN-ACK.
    pub fn rst(&self, buf: &mut [u8], a: &Answer) -> usize {
        let from = SocketAddrV4::new(*self.local.ip(), a.port);
        segment(buf, from, self.target, a.ack, true)
    }
}

/// A non-blocking TCP socket, pinned, connecting to the target (`tcp-connect`: one per
/// probe, closed with an RST).
pub fn start_connect(cfg: &ProbeConfig) -> Result<Socket> {
    let io = |what: &'static str| {
        move |source| Error::Io {
            what: what.to_string(),
            source,
        }
    };
    let sock = Socket::new(
        Domain::for_address(cfg.target),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .map_err(io("open a TCP socket"))?;
    sock.set_nonblocking(true)
        .map_err(io("make a socket non-blocking"))?;
    sock.set_linger(Some(Duration::ZERO))
        .map_err(io("set SO_LINGER"))?;
    // --bind pins the address; each probe takes a port of its own.
    let bind = cfg.bind.map(|b| SocketAddr::new(b.ip(), 0));
    crate::pin::pin(
        &sock,
        cfg.target,
        bind,
        cfg.interface.as_deref(),
        cfg.fwmark,
    )?;
    let tos = u32::from(cfg.dscp) << 2;
    if cfg.target.is_ipv6() {
        sock.set_tclass_v6(tos)
            .map_err(io("set the traffic class"))?;
    } else {
        sock.set_tos_v4(tos).map_err(io("set the TOS"))?;
    }
    if let Some(ttl) = cfg.ttl {
        if cfg.target.is_ipv6() {
            sock.set_unicast_hops_v6(u32::from(ttl))
                .map_err(io("set the hop limit"))?;
        } else {
            sock.set_ttl_v4(u32::from(ttl)).map_err(io("set the TTL"))?;
        }
    }
    match sock.connect(&cfg.target.into()) {
        Ok(()) => Ok(sock),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(sock),
        Err(e) => Err(io("start a TCP connection")(e)),
    }
}

/// What a finished `connect()` says: `Some((refused, the kernel's handshake RTT))` for an
/// answer from the far end, `None` for none (unreachable and the like: the tracker will
/// call the probe lost).
pub fn connect_outcome(sock: &Socket) -> Option<(bool, Option<u32>)> {
    match sock.take_error() {
        Ok(None) => Some((false, sys::tcp_rtt_us(sock))),
        Ok(Some(e)) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Some((true, None)),
        _ => None,
    }
}

/// The local address a `tcp-connect` session leaves from, for its reports.
pub fn connect_local(cfg: &ProbeConfig) -> SocketAddr {
    cfg.bind.unwrap_or_else(|| match cfg.target.ip() {
        IpAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        IpAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    /// An IPv4 header in front of `tcp`, from `src` to `dst`.
    fn ip(src: Ipv4Addr, dst: Ipv4Addr, tcp: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; 20];
        v[0] = 0x45;
        v[2..4].copy_from_slice(&u16::try_from(20 + tcp.len()).unwrap().to_be_bytes());
        v[8] = 64;
        v[9] = 6;
        v[12..16].copy_from_slice(&src.octets());
        v[16..20].copy_from_slice(&dst.octets());
        v.extend_from_slice(tcp);
        v
    }

    #[test]
    fn syn_has_mss_and_a_valid_checksum() {
        let (src, dst) = (addr("10.0.0.1:40000"), addr("10.1.0.1:443"));
        let mut buf = [0u8; SYN_LEN];
        assert_eq!(segment(&mut buf, src, dst, 0xdead_beef, false), SYN_LEN);
        let t = TcpPacket::new(&buf).unwrap();
        assert_eq!((t.get_source(), t.get_destination()), (40000, 443));
        assert_eq!(t.get_sequence(), 0xdead_beef);
        assert_eq!(t.get_flags(), TcpFlags::SYN);
        assert_eq!(t.get_data_offset(), 6);
        assert_eq!(&buf[20..24], &[2, 4, 0x05, 0xb4], "MSS 1460");
        assert_eq!(t.get_checksum(), ipv4_checksum(&t, src.ip(), dst.ip()));
        // One's complement: summing the whole segment with its pseudo-header gives 0xffff.
        let mut sum: u32 = 0;
        for w in src
            .ip()
            .octets()
            .chunks(2)
            .chain(dst.ip().octets().chunks(2))
            .chain(buf.chunks(2))
        {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        sum += 6 + u32::try_from(SYN_LEN).unwrap();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
        let mut rst = [0u8; SYN_LEN];
        assert_eq!(segment(&mut rst, src, dst, 7, true), RST_LEN);
        let r = TcpPacket::new(&rst[..RST_LEN]).unwrap();
        assert_eq!((r.get_flags(), r.get_sequence()), (TcpFlags::RST, 7));
    }

    #[test]
    fn answers_are_matched_to_our_flow_only() {
        let target = addr("10.1.0.1:443");
        let local = addr("10.0.0.1:40000");
        let answer = |flags: u8, from: SocketAddrV4, to_port: u16| {
            let mut t = [0u8; 20];
            let mut p = MutableTcpPacket::new(&mut t).unwrap();
            p.set_source(from.port());
            p.set_destination(to_port);
            p.set_acknowledgement(1001);
            p.set_data_offset(5);
            p.set_flags(flags);
            ip(*from.ip(), *local.ip(), &t)
        };
        let syn_ack = TcpFlags::SYN | TcpFlags::ACK;
        let ours = [40000, 40002];
        let a = |flags, from, port| parse_answer(&answer(flags, from, port), target, &ours);
        assert_eq!(
            a(syn_ack, target, 40002),
            Some(Answer {
                port: 40002,
                ack: 1001,
                refused: false,
                ttl: 64,
            })
        );
        assert_eq!(
            a(TcpFlags::RST | TcpFlags::ACK, target, 40000),
            Some(Answer {
                port: 40000,
                ack: 1001,
                refused: true,
                ttl: 64,
            })
        );
        // Another port of ours, another port or host of theirs, a bare ACK: not ours.
        assert_eq!(a(syn_ack, target, 40001), None);
        assert_eq!(a(syn_ack, addr("10.1.0.1:80"), 40000), None);
        assert_eq!(a(syn_ack, addr("10.1.0.2:443"), 40000), None);
        assert_eq!(a(TcpFlags::ACK, target, 40000), None);
        // Cut short anywhere: nothing, never a panic.
        let whole = answer(syn_ack, target, 40000);
        for n in 0..whole.len() {
            assert_eq!(parse_answer(&whole[..n], target, &ours), None, "cut at {n}");
        }
    }
}
