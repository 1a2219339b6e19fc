//! `pathprobe-agent trace`: which routers a path crosses and the RTT to each, like Paris
//! traceroute: every query of a run keeps the same 5-tuple (so an ECMP path never moves
//! under it), and queries are told apart by what the routers quote back without touching
//! the flow hash: the UDP length (the datagram is a STAMP test packet padded by one more
//! octet per query, so a reflector at the end answers it) or the TCP sequence number.
//!
//! Each query is sent with a rising TTL; a router where it expires answers with an ICMP
//! Time Exceeded (read from a raw ICMP socket, so CAP_NET_RAW is needed); the target
//! answers with a STAMP reply, an ICMP Port Unreachable, or (TCP) a SYN-ACK or RST, and the
//! trace ends at that hop. Queries go one at a time; times are taken around the system
//! calls (monotonic clock). IPv4 only.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::time::Duration;

use pathprobe_proto::stamp::tlv::{HEADER_LEN, TlvWriter};
use pathprobe_proto::stamp::{ErrorEstimate, Mode, SenderPacket, SenderRepr};
use pnet_packet::ipv4::Ipv4Packet;
use serde::Serialize;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::probe::tcp;
use crate::sys;
use crate::{Error, Result};

/// ICMP types this reads.
const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PORT_UNREACHABLE: u8 = 3;
/// Octets of a query before its per-query padding: a STAMP packet and a TLV header.
const UDP_BASE: usize = 48;

/// Which probes a trace sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TraceProto {
    Udp,
    Tcp,
}

/// How to trace.
#[derive(Debug, Clone)]
pub struct TraceConfig {
    pub target: SocketAddr,
    pub proto: TraceProto,
    /// Local address (and, if not 0, the fixed source port).
    pub bind: Option<SocketAddr>,
    pub interface: Option<String>,
    pub fwmark: Option<u32>,
    pub max_hops: u8,
    pub queries: u8,
    pub timeout: Duration,
}

/// One hop.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hop {
    pub ttl: u8,
    /// Who answered (the first answer's source); `None` if no query was answered.
    pub addr: Option<Ipv4Addr>,
    /// Each query's RTT, µs; `None` for no answer.
    pub rtt_us: Vec<Option<f64>>,
    /// The target itself answered here.
    pub reached: bool,
}

/// A finished trace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Trace {
    pub target: SocketAddr,
    pub proto: TraceProto,
    /// The flow's source address and port.
    pub local: SocketAddr,
    pub hops: Vec<Hop>,
    pub reached: bool,
}

impl Trace {
    /// Routers between us and the target (the hops before the one that reached it).
    pub fn routers(&self) -> usize {
        self.hops.iter().filter(|h| !h.reached).count()
    }
}

/// What an ICMP error quotes of the packet that caused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quoted {
    /// Who sent the ICMP error.
    pub from: Ipv4Addr,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// The quoted packet's protocol, destination and ports.
    pub protocol: u8,
    pub dst: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    /// UDP: the length field; TCP: the sequence number.
    pub tag: u32,
}

/// Reads an IPv4 packet from a raw ICMP socket: a Time Exceeded or Destination Unreachable
/// quoting a UDP or TCP packet; `None` for anything else.
pub fn parse_icmp(ip: &[u8]) -> Option<Quoted> {
    let outer = Ipv4Packet::new(ip)?;
    let hl = usize::from(outer.get_header_length()) * 4;
    let icmp = ip.get(hl..)?;
    let (icmp_type, icmp_code) = (*icmp.first()?, *icmp.get(1)?);
    if icmp_type != ICMP_TIME_EXCEEDED && icmp_type != ICMP_DEST_UNREACHABLE {
        return None;
    }
    let inner_ip = icmp.get(8..)?;
    let inner = Ipv4Packet::new(inner_ip)?;
    let ihl = usize::from(inner.get_header_length()) * 4;
    let l4 = inner_ip.get(ihl..ihl + 8)?;
    let protocol = inner.get_next_level_protocol().0;
    let tag = match protocol {
        17 => u32::from(u16::from_be_bytes([l4[4], l4[5]])),
        6 => u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]),
        _ => return None,
    };
    Some(Quoted {
        from: outer.get_source(),
        icmp_type,
        icmp_code,
        protocol,
        dst: inner.get_destination(),
        src_port: u16::from_be_bytes([l4[0], l4[1]]),
        dst_port: u16::from_be_bytes([l4[2], l4[3]]),
        tag,
    })
}

fn io_err(what: String) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io { what, source }
}

fn raw(protocol: Protocol, cfg: &TraceConfig) -> Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::RAW, Some(protocol)).map_err(|e| {
        if e.kind() == io::ErrorKind::PermissionDenied {
            Error::Config(
                "trace reads ICMP from a raw socket: it needs CAP_NET_RAW (run as root, or `setcap cap_net_raw+ep` the binary)".to_string(),
            )
        } else {
            Error::Io {
                what: "open a raw socket".to_string(),
                source: e,
            }
        }
    })?;
    if let Some(name) = &cfg.interface {
        s.bind_device(Some(name.as_bytes()))
            .map_err(io_err(format!("bind to interface {name}")))?;
    }
    Ok(s)
}

/// The sockets of one trace run.
struct Run {
    icmp: Socket,
    /// UDP: the flow's socket (reflector answers arrive on it); TCP: the raw TCP socket.
    flow: Socket,
    /// TCP: the socket reserving the source port.
    _reserved: Option<Socket>,
    local: SocketAddrV4,
    target: SocketAddrV4,
    isn_base: u32,
}

impl Run {
    fn open(cfg: &TraceConfig) -> Result<Self> {
        let SocketAddr::V4(target) = cfg.target else {
            return Err(Error::Config("trace takes an IPv4 target".to_string()));
        };
        let icmp = raw(Protocol::ICMPV4, cfg)?;
        let bind = cfg
            .bind
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (flow, reserved, local) = match cfg.proto {
            TraceProto::Udp => {
                let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
                    .map_err(io_err("open a UDP socket".into()))?;
                crate::pin::pin(
                    &s,
                    cfg.target,
                    Some(bind),
                    cfg.interface.as_deref(),
                    cfg.fwmark,
                )?;
                s.connect(&cfg.target.into())
                    .map_err(io_err(format!("connect to {target}")))?;
                let Some(SocketAddr::V4(local)) = s.local_addr().ok().and_then(|a| a.as_socket())
                else {
                    return Err(Error::Config("the UDP socket has no address".to_string()));
                };
                (s, None, local)
            }
            TraceProto::Tcp => {
                // A TCP socket connected nowhere reserves the port; the route lookup of a
                // connected UDP socket gives the source address.
                let u = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
                    .map_err(io_err("open a UDP socket".into()))?;
                crate::pin::pin(
                    &u,
                    cfg.target,
                    Some(SocketAddr::new(bind.ip(), 0)),
                    cfg.interface.as_deref(),
                    cfg.fwmark,
                )?;
                u.connect(&cfg.target.into())
                    .map_err(io_err(format!("find a route to {target}")))?;
                let Some(SocketAddr::V4(src)) = u.local_addr().ok().and_then(|a| a.as_socket())
                else {
                    return Err(Error::Config("no IPv4 source address".to_string()));
                };
                let ip = *src.ip();
                let r = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
                    .map_err(io_err("open a TCP socket".into()))?;
                r.bind(&SocketAddr::new(ip.into(), bind.port()).into())
                    .map_err(io_err(format!("reserve TCP port {} (--bind)", bind.port())))?;
                let port = r
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .map_or(0, |a| a.port());
                let t = raw(Protocol::TCP, cfg)?;
                if let Some(mark) = cfg.fwmark {
                    t.set_mark(mark)
                        .map_err(io_err(format!("set fwmark {mark}")))?;
                }
                (t, Some(r), SocketAddrV4::new(ip, port))
            }
        };
        let mut b = [0u8; 4];
        getrandom::fill(&mut b)
            .map_err(|e| Error::Config(format!("no randomness for sequence numbers: {e}")))?;
        Ok(Self {
            icmp,
            flow,
            _reserved: reserved,
            local,
            target,
            isn_base: u32::from_be_bytes(b),
        })
    }

    /// Sends query `idx` with `ttl`.
    fn send(&self, proto: TraceProto, ttl: u8, idx: u32) -> Result<()> {
        self.flow
            .set_ttl_v4(u32::from(ttl))
            .map_err(io_err("set the TTL".into()))?;
        let sent = match proto {
            TraceProto::Udp => {
                let len = UDP_BASE + usize::try_from(idx).unwrap_or(0);
                let mut buf = vec![0u8; len];
                let mut p = SenderPacket::new_unchecked(&mut buf[..], Mode::Unauthenticated);
                SenderRepr {
                    sequence_number: idx,
                    timestamp: 0,
                    error_estimate: ErrorEstimate::from_error_nanos(
                        false,
                        pathprobe_proto::stamp::TimestampFormat::Ntp,
                        1,
                    ),
                    ssid: 0,
                }
                .emit(&mut p);
                let area = p.tlvs_mut();
                if area.len() >= HEADER_LEN {
                    let n = area.len();
                    let _ = TlvWriter::new(area).extra_padding(n);
                }
                // An earlier query's Port Unreachable is reported on the next send of a
                // connected socket, once: send again.
                match self.flow.send(&buf) {
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => self.flow.send(&buf),
                    r => r,
                }
            }
            TraceProto::Tcp => {
                let mut buf = [0u8; tcp::SYN_LEN];
                let n = tcp::segment(
                    &mut buf,
                    self.local,
                    self.target,
                    self.isn_base.wrapping_add(idx),
                    false,
                );
                let to: SockAddr = SocketAddr::V4(SocketAddrV4::new(*self.target.ip(), 0)).into();
                self.flow.send_to(&buf[..n], &to)
            }
        };
        sent.map(|_| ())
            .map_err(io_err(format!("send a TTL {ttl} query to {}", self.target)))
    }

    /// Waits up to `timeout` for the answer to query `idx`: who answered and whether it was
    /// the target.
    fn answer(&self, proto: TraceProto, idx: u32, timeout: Duration) -> Option<(Ipv4Addr, bool)> {
        let deadline = sys::monotonic_ns() + u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
        let mut buf = vec![0u8; 2048];
        let want_tag = match proto {
            TraceProto::Udp => u32::try_from(UDP_BASE + 8).unwrap_or(0) + idx,
            TraceProto::Tcp => self.isn_base.wrapping_add(idx),
        };
        loop {
            let now = sys::monotonic_ns();
            if now >= deadline {
                return None;
            }
            let ms = i32::try_from((deadline - now) / 1_000_000 + 1).unwrap_or(i32::MAX);
            let mut fds = [
                libc::pollfd {
                    fd: self.icmp.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.flow.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            if sys::poll_many(&mut fds, ms).unwrap_or(0) == 0 {
                continue;
            }
            if fds[0].revents != 0
                && let Ok(n) = recv_now(&self.icmp, &mut buf)
                && let Some(q) = parse_icmp(&buf[..n])
            {
                let ours = q.dst == *self.target.ip()
                    && q.src_port == self.local.port()
                    && q.dst_port == self.target.port()
                    && q.tag == want_tag
                    && q.protocol == if proto == TraceProto::Udp { 17 } else { 6 };
                if ours {
                    let reached = q.icmp_type == ICMP_DEST_UNREACHABLE
                        && q.icmp_code == ICMP_PORT_UNREACHABLE
                        && q.from == *self.target.ip();
                    return Some((q.from, reached || q.from == *self.target.ip()));
                }
            }
            if fds[1].revents != 0
                && let Ok(n) = recv_now(&self.flow, &mut buf)
            {
                match proto {
                    // A reflector's answer on our connected socket: the target.
                    TraceProto::Udp => return Some((*self.target.ip(), true)),
                    TraceProto::Tcp => {
                        if let Some(a) =
                            tcp::parse_answer(&buf[..n], self.target, &[self.local.port()])
                            && a.ack == want_tag.wrapping_add(1)
                        {
                            if !a.refused {
                                let mut rst = [0u8; tcp::SYN_LEN];
                                let len =
                                    tcp::segment(&mut rst, self.local, self.target, a.ack, true);
                                let to: SockAddr =
                                    SocketAddr::V4(SocketAddrV4::new(*self.target.ip(), 0)).into();
                                let _ = self.flow.send_to(&rst[..len], &to);
                            }
                            return Some((*self.target.ip(), true));
                        }
                    }
                }
            }
        }
    }
}

fn recv_now(s: &Socket, buf: &mut [u8]) -> io::Result<usize> {
    s.recv_with_flags(sys::as_uninit(buf), libc::MSG_DONTWAIT)
}

/// Traces the path to `cfg.target`.
pub fn trace(cfg: &TraceConfig) -> Result<Trace> {
    if cfg.queries == 0 || cfg.max_hops == 0 {
        return Err(Error::Config(
            "--queries and --max-hops must be at least 1".to_string(),
        ));
    }
    let run = Run::open(cfg)?;
    let mut hops = Vec::new();
    let mut idx = 0u32;
    let mut reached = false;
    for ttl in 1..=cfg.max_hops {
        let mut hop = Hop {
            ttl,
            addr: None,
            rtt_us: Vec::new(),
            reached: false,
        };
        for _ in 0..cfg.queries {
            let t0 = sys::monotonic_ns();
            run.send(cfg.proto, ttl, idx)?;
            let answer = run.answer(cfg.proto, idx, cfg.timeout);
            #[allow(clippy::cast_precision_loss)]
            let rtt = answer.map(|_| (sys::monotonic_ns() - t0) as f64 / 1000.0);
            if let Some((from, at_target)) = answer {
                hop.addr.get_or_insert(from);
                hop.reached |= at_target;
            }
            hop.rtt_us.push(rtt);
            idx += 1;
        }
        reached = hop.reached;
        hops.push(hop);
        if reached {
            break;
        }
    }
    Ok(Trace {
        target: cfg.target,
        proto: cfg.proto,
        local: SocketAddr::V4(run.local),
        hops,
        reached,
    })
}

/// The trace as a table.
pub fn table(t: &Trace) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "trace to {} over {} from {}, {} router{}{}\n",
        t.target,
        if t.proto == TraceProto::Udp {
            "UDP"
        } else {
            "TCP"
        },
        t.local,
        t.routers(),
        if t.routers() == 1 { "" } else { "s" },
        if t.reached {
            ""
        } else {
            ", target not reached"
        }
    );
    for h in &t.hops {
        let rtts: Vec<String> = h
            .rtt_us
            .iter()
            .map(|r| r.map_or("*".to_string(), |us| format!("{:.3} ms", us / 1000.0)))
            .collect();
        let _ = writeln!(
            out,
            "{:>3}  {:<16} {}{}",
            h.ttl,
            h.addr.map_or("*".to_string(), |a| a.to_string()),
            rtts.join("  "),
            if h.reached { "  (target)" } else { "" }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ICMP error from `from` quoting a UDP packet to `dst:dport` from port `sport`
    /// whose length is `len`.
    fn icmp(
        kind: u8,
        code: u8,
        from: Ipv4Addr,
        dst: Ipv4Addr,
        sport: u16,
        dport: u16,
        len: u16,
    ) -> Vec<u8> {
        let mut v = vec![0u8; 20];
        v[0] = 0x45;
        v[9] = 1;
        v[12..16].copy_from_slice(&from.octets());
        let mut icmp = vec![kind, code, 0, 0, 0, 0, 0, 0];
        let mut inner = vec![0u8; 20];
        inner[0] = 0x45;
        inner[9] = 17;
        inner[16..20].copy_from_slice(&dst.octets());
        icmp.extend(inner);
        icmp.extend(sport.to_be_bytes());
        icmp.extend(dport.to_be_bytes());
        icmp.extend(len.to_be_bytes());
        icmp.extend([0, 0]);
        v.extend(icmp);
        let total = u16::try_from(v.len()).unwrap();
        v[2..4].copy_from_slice(&total.to_be_bytes());
        v
    }

    #[test]
    fn icmp_errors_give_back_the_quoted_flow() {
        let r = Ipv4Addr::new(10, 10, 1, 2);
        let dst = Ipv4Addr::new(10, 1, 0, 1);
        let q = parse_icmp(&icmp(11, 0, r, dst, 40000, 862, 61)).unwrap();
        assert_eq!(
            q,
            Quoted {
                from: r,
                icmp_type: 11,
                icmp_code: 0,
                protocol: 17,
                dst,
                src_port: 40000,
                dst_port: 862,
                tag: 61
            }
        );
        // An echo reply or a cut packet is not a trace answer, and never a panic.
        assert_eq!(parse_icmp(&icmp(0, 0, r, dst, 1, 2, 3)), None);
        let whole = icmp(3, 3, r, dst, 40000, 862, 61);
        for n in 0..whole.len() {
            assert_eq!(parse_icmp(&whole[..n]), None, "cut at {n}");
        }
        assert!(parse_icmp(&whole).is_some());
    }
}
