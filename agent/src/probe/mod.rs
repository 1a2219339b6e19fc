//! Probing a path: the probe kinds that plug into the [`crate::engine`], and the
//! [`Prober`] that opens one and runs it.
//!
//! - [`stamp`]: the STAMP Session-Sender (RFC 8762), over a pinned UDP socket.
//! - [`tcp`]: `tcp-syn` (a half-open handshake from a raw socket) and `tcp-connect` (a full
//!   `connect()`), for paths that pass only TCP.
//!
//! Every kind is pinned to its path by [`crate::pin::pin`] and keeps the engine's
//! schedule; its windows and reports are alike whatever the kind.

pub mod stamp;
pub mod tcp;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use pathprobe_proto::report::{ProbeProtocol, Timestamping};
use pathprobe_proto::stamp::tlv::{ClassOfService, HEADER_LEN, HMAC_TLV_LEN};
use pathprobe_proto::stamp::{AuthKey, Mode};

pub use crate::engine::Sink;
use crate::engine::Timing;
use crate::engine::mux::{self, Prepared};
use crate::engine::session::{MAX_IN_FLIGHT, WindowStats};
use crate::{Error, Result};

/// Largest probe: a 1,500-octet MTU less the IPv4 and UDP headers.
pub const MAX_SIZE: usize = 1472;

/// Octets of the Class-of-Service TLV, with which the far end tells what DSCP it received.
pub(crate) const COS_TLV_LEN: usize = HEADER_LEN + ClassOfService::LEN;

/// The default probe size: the base packet and a Class-of-Service TLV, so that every probe
/// learns the DSCP the far end received, and in authenticated mode the HMAC TLV that
/// protects it (52 octets unauthenticated, 140 authenticated).
pub const fn default_size(mode: Mode) -> usize {
    match mode {
        Mode::Unauthenticated => mode.base_len() + COS_TLV_LEN,
        Mode::Authenticated => mode.base_len() + COS_TLV_LEN + HMAC_TLV_LEN,
    }
}

/// How to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeConfig {
    /// STAMP, or one of the TCP probes ([`tcp`]).
    pub protocol: ProbeProtocol,
    pub target: SocketAddr,
    pub bind: Option<SocketAddr>,
    pub interface: Option<String>,
    pub fwmark: Option<u32>,
    pub interval_ns: u64,
    pub count: Option<u64>,
    pub duration_ns: Option<u64>,
    /// UDP payload octets.
    pub size: usize,
    pub dscp: u8,
    pub ttl: Option<u8>,
    pub key: Option<AuthKey>,
    pub window_ns: u64,
    pub late_timeout_ns: u64,
    /// Give up when nothing at all has answered this long after the first probe.
    pub no_reply_ns: u64,
    pub ssid: u16,
    /// Route every probe afresh (an unconnected socket: the kernel looks the route up per
    /// datagram), so a probe stream follows routing the moment it changes. A connected
    /// socket keeps its route until the kernel invalidates it, which a link coming back
    /// does not always do; but only a connected socket hears ICMP port unreachable, so
    /// probing uses one unless it must follow failovers.
    pub route_each_probe: bool,
}

impl ProbeConfig {
    pub(crate) const fn mode(&self) -> Mode {
        if self.key.is_some() {
            Mode::Authenticated
        } else {
            Mode::Unauthenticated
        }
    }

    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<()> {
        let base = self.mode().base_len();
        if self.protocol != ProbeProtocol::Stamp && self.key.is_some() {
            return Err(Error::Config(format!(
                "--auth-key-file is STAMP's; --proto {} has no authenticated mode",
                self.protocol
            )));
        }
        if self.protocol == ProbeProtocol::Stamp && (self.size < base || self.size > MAX_SIZE) {
            return Err(Error::Config(format!(
                "--size {} is out of range: a {} STAMP probe is {base} to {MAX_SIZE} octets",
                self.size,
                if self.key.is_some() {
                    "authenticated"
                } else {
                    "unauthenticated"
                }
            )));
        }
        if self.protocol == ProbeProtocol::Stamp
            && self.key.is_some()
            && self.size > base
            && self.size < base + HMAC_TLV_LEN
        {
            return Err(Error::Config(format!(
                "--size {} leaves no room for the HMAC TLV that protects an authenticated probe's TLVs: use {base} (no TLVs) or {} to {MAX_SIZE}",
                self.size,
                base + HMAC_TLV_LEN
            )));
        }
        if self.dscp > 63 {
            return Err(Error::Config(format!(
                "--dscp {} is not a DSCP: use 0 to 63",
                self.dscp
            )));
        }
        if self.interval_ns == 0 {
            return Err(Error::Config(
                "the probe interval must be above zero".to_string(),
            ));
        }
        if self.late_timeout_ns / self.interval_ns > MAX_IN_FLIGHT {
            return Err(Error::Config(format!(
                "--timeout {:?} at this rate keeps over {MAX_IN_FLIGHT} probes in flight: lower the timeout or the rate",
                Duration::from_nanos(self.late_timeout_ns)
            )));
        }
        Ok(())
    }

    /// Octets of one probe as sent: the STAMP payload, our SYN, or 0 for a kernel-built
    /// SYN (`tcp-connect`).
    pub fn packet_size(&self) -> u16 {
        match self.protocol {
            ProbeProtocol::Stamp => u16::try_from(self.size).unwrap_or(u16::MAX),
            ProbeProtocol::TcpSyn => u16::try_from(tcp::SYN_LEN).unwrap_or(0),
            ProbeProtocol::TcpConnect => 0,
        }
    }

    /// What the engine needs of it.
    pub const fn timing(&self) -> Timing {
        Timing {
            target: self.target,
            interval_ns: self.interval_ns,
            count: self.count,
            duration_ns: self.duration_ns,
            window_ns: self.window_ns,
            late_timeout_ns: self.late_timeout_ns,
            no_reply_ns: self.no_reply_ns,
        }
    }
}

/// An opened, pinned probing socket, ready to run on the shared engine.
#[derive(Debug)]
pub struct Prober {
    cfg: ProbeConfig,
    prepared: Prepared,
    /// Where receive and transmit timestamps come from.
    pub timestamping: Timestamping,
    /// The local address probes leave from.
    pub local: SocketAddr,
    /// The TTL (hop limit) probes leave with, when their answers can tell the hops from it.
    pub sent_ttl: Option<u8>,
}

impl Prober {
    /// Checks `cfg` and opens its socket (a `tcp-syn` path's source ports are reserved
    /// now; a `tcp-connect` path opens a socket per probe as it goes).
    pub fn open(cfg: ProbeConfig) -> Result<Self> {
        let prepared = mux::open_one(&cfg)?;
        let info = prepared.info;
        Ok(Self {
            cfg,
            prepared,
            timestamping: info.timestamping,
            local: info.local,
            sent_ttl: info.sent_ttl,
        })
    }

    /// The settings it runs with.
    pub const fn config(&self) -> &ProbeConfig {
        &self.cfg
    }

    /// Octets of one probe as sent: the STAMP payload, our SYN, or 0 for a kernel-built
    /// SYN (`tcp-connect`).
    pub fn packet_size(&self) -> u16 {
        self.cfg.packet_size()
    }

    /// Probes until the count or duration is reached or `stop` is set, calling `on_window`
    /// as each window closes; returns every window, oldest first.
    pub fn run(
        &self,
        stop: &AtomicBool,
        mut on_window: impl FnMut(&WindowStats),
    ) -> Result<Vec<WindowStats>> {
        self.run_into(stop, &mut on_window)
    }

    /// Like [`Self::run`], with every result going to `sink`.
    pub fn run_into(&self, stop: &AtomicBool, sink: &mut dyn Sink) -> Result<Vec<WindowStats>> {
        mux::run_one(&self.prepared, &self.cfg, stop, sink)
    }
}
