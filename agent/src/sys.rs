//! The agent's only `unsafe` code: batched UDP I/O with control messages (`recvmmsg`,
//! `sendmmsg`, the error queue for transmit timestamps), clocks, timer slack and the kernel's
//! NTP state, the netlink socket of the NFQUEUE emulator, and an eventfd doorbell. Everything
//! above this module is safe Rust.
//!
//! Buffers are allocated once per batch object and reused; no call here allocates.
#![allow(unsafe_code)]

use std::io;
use std::mem::{MaybeUninit, align_of, size_of, zeroed};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use pathprobe_proto::report::TimestampSource;
use socket2::Socket;

/// Largest datagram a batch slot holds; longer ones arrive truncated and are dropped.
pub const MAX_DATAGRAM: usize = 9216;
/// Room for the control messages of one datagram (timestamps, TTL, TOS, extended error).
const CONTROL_LEN: usize = 256;

/// The control-message buffer of one datagram. The kernel and `CMSG_FIRSTHDR`/`CMSG_NXTHDR`
/// place a `cmsghdr` at its start and at `CMSG_ALIGN`ed offsets after it, and this module
/// reads and writes those headers through references, which must be aligned: a plain
/// `[u8; N]` (alignment 1) does not promise that. Aligned as quinn-udp's `Aligned` is.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Control([u8; CONTROL_LEN]);

const _: () = assert!(align_of::<Control>() >= align_of::<libc::cmsghdr>());
const _: () = assert!(size_of::<Control>() == CONTROL_LEN);

impl Control {
    const fn new() -> Self {
        Self([0; CONTROL_LEN])
    }

    fn as_mut_ptr(&mut self) -> *mut libc::c_void {
        self.0.as_mut_ptr().cast()
    }
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = MaybeUninit::<libc::timespec>::uninit();
    // SAFETY: clock_gettime writes a whole timespec to the valid pointer it is given; the
    // clocks used here always exist on Linux, so it cannot fail.
    let ts = unsafe {
        libc::clock_gettime(clock, ts.as_mut_ptr());
        ts.assume_init()
    };
    timespec_ns(&ts)
}

fn timespec_ns(ts: &libc::timespec) -> u64 {
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// `CLOCK_REALTIME` in nanoseconds since 1970: for timestamps that leave this host.
pub fn realtime_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
}

/// Kernel stamps (`CLOCK_REALTIME`) of one batch turned into monotonic time: the offset
/// between the two clocks is read once, right after the batch's system call, so no clock
/// step falls between a stamp and its conversion. What the prober's receivers and the
/// emulator share.
#[derive(Debug, Clone, Copy)]
pub struct BatchClock {
    /// Monotonic time right after the call.
    pub mono_ns: u64,
    /// Wall time right after the call.
    pub wall_ns: u64,
    offset_ns: i128,
}

impl BatchClock {
    /// Reads both clocks now.
    pub fn now() -> Self {
        let mono_ns = monotonic_ns();
        let wall_ns = realtime_ns();
        Self {
            mono_ns,
            wall_ns,
            offset_ns: i128::from(wall_ns) - i128::from(mono_ns),
        }
    }

    /// A kernel stamp as monotonic time, never later than the read that returned it.
    pub fn mono(&self, stamp_ns: u64) -> u64 {
        u64::try_from(i128::from(stamp_ns) - self.offset_ns)
            .map_or(self.mono_ns, |t| t.min(self.mono_ns))
    }

    /// When a datagram arrived, monotonic and wall: its kernel stamp, or now without one.
    pub fn arrival(&self, kernel_ns: Option<u64>) -> (u64, u64) {
        kernel_ns.map_or((self.mono_ns, self.wall_ns), |k| (self.mono(k), k))
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: for intervals (RTT, schedules), immune to clock steps.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// Sleeps until `deadline_ns` on `CLOCK_MONOTONIC` (absolute, so no drift accumulates).
pub fn sleep_until(deadline_ns: u64) {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(deadline_ns / 1_000_000_000).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::try_from(deadline_ns % 1_000_000_000).unwrap_or(0),
    };
    // SAFETY: the timespec is valid for the call; a null remainder is allowed with
    // TIMER_ABSTIME. EINTR simply returns early; the caller re-checks the time.
    unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &raw const ts,
            std::ptr::null_mut(),
        );
    }
}

/// Lowers this thread's timer slack to 1 ns so that sleeps end when asked, not up to the
/// default 50 µs later.
pub fn lower_timer_slack() -> io::Result<()> {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What the kernel says about the system clock's synchronization (NTP/PTP daemons set it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockSync {
    /// Not `STA_UNSYNC` and not `TIME_ERROR`.
    pub synchronized: bool,
    /// The kernel's maximum error estimate.
    pub max_error_ns: u64,
}

/// Reads the clock state with `ntp_adjtime` (read only: no mode bits set).
pub fn clock_sync() -> io::Result<ClockSync> {
    // SAFETY: timex is plain old data; all-zero (modes = 0) asks for a read only.
    let mut tx: libc::timex = unsafe { zeroed() };
    // SAFETY: the pointer is valid and the kernel writes only within the struct.
    let state = unsafe { libc::ntp_adjtime(&raw mut tx) };
    if state < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ClockSync {
        synchronized: state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0,
        max_error_ns: u64::try_from(tx.maxerror).unwrap_or(u64::MAX / 1000) * 1000,
    })
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is a c_int that lives for the call, and its size is given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap_or(4),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks the kernel for the TTL / Hop Limit and the TOS / Traffic Class of every datagram.
pub fn enable_rx_metadata(sock: &Socket, ipv6: bool) -> io::Result<()> {
    let fd = sock.as_raw_fd();
    if ipv6 {
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT, 1)?;
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVTCLASS, 1)?;
        // An IPv6 socket may carry IPv4-mapped traffic too.
        let _ = setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_RECVTTL, 1);
        let _ = setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_RECVTOS, 1);
    } else {
        setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_RECVTTL, 1)?;
        setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_RECVTOS, 1)?;
    }
    Ok(())
}

/// Turns on the best kernel timestamps available: `SO_TIMESTAMPING` (software receive and,
/// with `tx`, software transmit stamps on the error queue, numbered per datagram), else
/// `SO_TIMESTAMPNS` (receive only), else none. Returns where each side's stamps come from.
pub fn enable_timestamping(sock: &Socket, tx: bool) -> (TimestampSource, TimestampSource) {
    let fd = sock.as_raw_fd();
    let mut flags = libc::SOF_TIMESTAMPING_RX_SOFTWARE | libc::SOF_TIMESTAMPING_SOFTWARE;
    if tx {
        flags |= libc::SOF_TIMESTAMPING_TX_SOFTWARE
            | libc::SOF_TIMESTAMPING_OPT_ID
            | libc::SOF_TIMESTAMPING_OPT_TSONLY;
    }
    let flags = libc::c_int::try_from(flags).unwrap_or(0);
    if setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPING, flags).is_ok() {
        let tx_source = if tx {
            TimestampSource::Kernel
        } else {
            TimestampSource::Userspace
        };
        return (TimestampSource::Kernel, tx_source);
    }
    if setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1).is_ok() {
        return (TimestampSource::Kernel, TimestampSource::Userspace);
    }
    (TimestampSource::Userspace, TimestampSource::Userspace)
}

/// What the kernel said about one received datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecvMeta {
    pub len: usize,
    pub src: Option<SocketAddr>,
    /// Kernel receive time, `CLOCK_REALTIME` nanoseconds.
    pub kernel_rx_ns: Option<u64>,
    pub ttl: Option<u8>,
    pub tos: Option<u8>,
    /// The datagram was longer than [`MAX_DATAGRAM`] and was cut.
    pub truncated: bool,
}

fn sockaddr_to_std(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which fits in it.
            let sin: &libc::sockaddr_in = unsafe { &*(std::ptr::from_ref(ss).cast()) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6: &libc::sockaddr_in6 = unsafe { &*(std::ptr::from_ref(ss).cast()) };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn std_to_sockaddr(addr: &SocketAddr, ss: &mut libc::sockaddr_storage) -> libc::socklen_t {
    // SAFETY: sockaddr_storage is plain old data; zero is a valid value.
    *ss = unsafe { zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in.
            let sin: &mut libc::sockaddr_in = unsafe { &mut *(std::ptr::from_mut(ss).cast()) };
            sin.sin_family = libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(2);
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            libc::socklen_t::try_from(size_of::<libc::sockaddr_in>()).unwrap_or(16)
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6: &mut libc::sockaddr_in6 = unsafe { &mut *(std::ptr::from_mut(ss).cast()) };
            sin6.sin6_family = libc::sa_family_t::try_from(libc::AF_INET6).unwrap_or(10);
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            libc::socklen_t::try_from(size_of::<libc::sockaddr_in6>()).unwrap_or(28)
        }
    }
}

/// Reads the control messages of one received datagram into `meta`.
///
/// # Safety
/// `msg` must be a `msghdr` the kernel just filled, whose control buffer is still alive.
unsafe fn parse_control(msg: &libc::msghdr, meta: &mut RecvMeta) {
    // SAFETY: the caller guarantees msg and its control buffer are valid; CMSG_* walk it
    // within msg_controllen.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !cmsg.is_null() {
        // SAFETY: a non-null cmsg from CMSG_FIRSTHDR/NXTHDR points inside the buffer.
        let c = unsafe { &*cmsg };
        // SAFETY: the data of a cmsg starts at CMSG_DATA and is at least as long as the
        // kernel's type for (level, type); unaligned reads are used for every type.
        let data = unsafe { libc::CMSG_DATA(cmsg) };
        match (c.cmsg_level, c.cmsg_type) {
            (libc::SOL_SOCKET, libc::SCM_TIMESTAMPING) => {
                // Three timespecs: software, (deprecated), hardware.
                let ts: libc::timespec = unsafe { std::ptr::read_unaligned(data.cast()) };
                if ts.tv_sec != 0 || ts.tv_nsec != 0 {
                    meta.kernel_rx_ns = Some(timespec_ns(&ts));
                }
            }
            (libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS) => {
                let ts: libc::timespec = unsafe { std::ptr::read_unaligned(data.cast()) };
                meta.kernel_rx_ns = Some(timespec_ns(&ts));
            }
            (libc::IPPROTO_IP, libc::IP_TTL) | (libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT) => {
                let v: libc::c_int = unsafe { std::ptr::read_unaligned(data.cast()) };
                meta.ttl = u8::try_from(v).ok();
            }
            (libc::IPPROTO_IP, libc::IP_TOS) => {
                // IP_TOS arrives as a single octet.
                meta.tos = Some(unsafe { *data });
            }
            (libc::IPPROTO_IPV6, libc::IPV6_TCLASS) => {
                let v: libc::c_int = unsafe { std::ptr::read_unaligned(data.cast()) };
                meta.tos = u8::try_from(v).ok();
            }
            _ => {}
        }
        // SAFETY: msg and cmsg are valid as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
    }
}

/// Buffers for receiving up to `capacity` datagrams with one `recvmmsg`.
pub struct RecvBatch {
    bufs: Vec<[u8; MAX_DATAGRAM]>,
    names: Vec<libc::sockaddr_storage>,
    controls: Vec<Control>,
    iovecs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    metas: Vec<RecvMeta>,
    filled: usize,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("capacity", &self.bufs.len())
            .field("filled", &self.filled)
            .finish_non_exhaustive()
    }
}

// SAFETY: the raw pointers inside iovecs and msgs only ever point into this struct's own
// buffers and are rebuilt before each use, so moving the batch to another thread is sound.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    /// Allocates room for `capacity` datagrams.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            bufs: vec![[0u8; MAX_DATAGRAM]; capacity],
            // SAFETY: these libc structs are plain old data; zero is valid for each.
            names: vec![unsafe { zeroed() }; capacity],
            controls: vec![Control::new(); capacity],
            iovecs: vec![unsafe { zeroed() }; capacity],
            msgs: vec![unsafe { zeroed() }; capacity],
            metas: vec![RecvMeta::default(); capacity],
            filled: 0,
        }
    }

    /// Receives at least one datagram (blocking, up to the socket's receive timeout) and
    /// as many more as are queued, up to the capacity. Returns how many.
    pub fn recv(&mut self, sock: &Socket) -> io::Result<usize> {
        self.recv_flags(sock, libc::MSG_WAITFORONE)
    }

    /// Receives what is queued, up to the capacity, without waiting (`WouldBlock` when
    /// nothing is).
    pub fn recv_now(&mut self, sock: &Socket) -> io::Result<usize> {
        self.recv_flags(sock, libc::MSG_DONTWAIT)
    }

    fn recv_flags(&mut self, sock: &Socket, flags: libc::c_int) -> io::Result<usize> {
        let n = self.bufs.len();
        for i in 0..n {
            self.iovecs[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: MAX_DATAGRAM,
            };
            let hdr = &mut self.msgs[i].msg_hdr;
            hdr.msg_name = (&raw mut self.names[i]).cast();
            hdr.msg_namelen =
                libc::socklen_t::try_from(size_of::<libc::sockaddr_storage>()).unwrap_or(128);
            hdr.msg_iov = &raw mut self.iovecs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = self.controls[i].as_mut_ptr();
            hdr.msg_controllen = CONTROL_LEN;
            hdr.msg_flags = 0;
            self.msgs[i].msg_len = 0;
        }
        // SAFETY: every msghdr points at live buffers of the stated sizes owned by self,
        // which outlives the call; vlen is the number of initialized entries.
        let rc = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                self.msgs.as_mut_ptr(),
                libc::c_uint::try_from(n).unwrap_or(1),
                flags,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            self.filled = 0;
            return Err(io::Error::last_os_error());
        }
        let got = usize::try_from(rc).unwrap_or(0);
        for i in 0..got {
            let hdr = &self.msgs[i].msg_hdr;
            let mut meta = RecvMeta {
                len: usize::try_from(self.msgs[i].msg_len)
                    .unwrap_or(0)
                    .min(MAX_DATAGRAM),
                src: sockaddr_to_std(&self.names[i]),
                truncated: hdr.msg_flags & libc::MSG_TRUNC != 0,
                ..RecvMeta::default()
            };
            // SAFETY: the kernel just filled this msghdr and its control buffer is alive.
            unsafe { parse_control(hdr, &mut meta) };
            self.metas[i] = meta;
        }
        self.filled = got;
        Ok(got)
    }

    /// The `i`th datagram of the last `recv` and what the kernel said about it.
    pub fn get(&self, i: usize) -> Option<(&[u8], &RecvMeta)> {
        (i < self.filled).then(|| (&self.bufs[i][..self.metas[i].len], &self.metas[i]))
    }
}

/// Buffers for sending up to `capacity` datagrams with one `sendmmsg`.
pub struct SendBatch {
    bufs: Vec<[u8; MAX_DATAGRAM]>,
    lens: Vec<usize>,
    dests: Vec<Option<SocketAddr>>,
    tos: Vec<Option<(bool, u8)>>,
    ttl: Vec<Option<(bool, u8)>>,
    names: Vec<libc::sockaddr_storage>,
    controls: Vec<Control>,
    iovecs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    queued: usize,
}

impl std::fmt::Debug for SendBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBatch")
            .field("capacity", &self.bufs.len())
            .field("queued", &self.queued)
            .finish_non_exhaustive()
    }
}

// SAFETY: as for RecvBatch: pointers are rebuilt from owned buffers before each send.
unsafe impl Send for SendBatch {}

impl SendBatch {
    /// Allocates room for `capacity` datagrams.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            bufs: vec![[0u8; MAX_DATAGRAM]; capacity],
            lens: vec![0; capacity],
            dests: vec![None; capacity],
            tos: vec![None; capacity],
            ttl: vec![None; capacity],
            // SAFETY: plain old data; zero is valid.
            names: vec![unsafe { zeroed() }; capacity],
            controls: vec![Control::new(); capacity],
            iovecs: vec![unsafe { zeroed() }; capacity],
            msgs: vec![unsafe { zeroed() }; capacity],
            queued: 0,
        }
    }

    /// Datagrams queued.
    pub const fn len(&self) -> usize {
        self.queued
    }

    /// True when nothing is queued.
    pub const fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// True when no more datagrams fit.
    pub fn is_full(&self) -> bool {
        self.queued == self.bufs.len()
    }

    /// The buffer of the next free slot, to write a datagram into before [`Self::commit`];
    /// `None` when the batch is full.
    pub fn next_slot(&mut self) -> Option<&mut [u8]> {
        let i = self.queued;
        self.bufs.get_mut(i).map(|b| &mut b[..])
    }

    /// Queues the datagram written into [`Self::next_slot`]: `len` octets to `dest` (or the
    /// connected peer), with an optional per-datagram TOS / Traffic Class
    /// (`(is_ipv6, value)`). Returns false when the batch is full or `len` is too large.
    pub fn commit(
        &mut self,
        len: usize,
        dest: Option<SocketAddr>,
        tos: Option<(bool, u8)>,
    ) -> bool {
        if self.is_full() || len > MAX_DATAGRAM {
            return false;
        }
        let i = self.queued;
        self.lens[i] = len;
        self.dests[i] = dest;
        self.tos[i] = tos;
        self.ttl[i] = None;
        self.queued += 1;
        true
    }

    /// Like [`Self::commit`], with a per-datagram TTL / Hop Limit too (`IP_TTL` /
    /// `IPV6_HOPLIMIT` ancillary data), so paths of one socket can differ in both.
    pub fn commit_marked(
        &mut self,
        len: usize,
        dest: Option<SocketAddr>,
        ipv6: bool,
        (tos, ttl): (Option<u8>, Option<u8>),
    ) -> bool {
        if !self.commit(len, dest, tos.map(|t| (ipv6, t))) {
            return false;
        }
        self.ttl[self.queued - 1] = ttl.map(|t| (ipv6, t));
        true
    }

    /// Drops the datagram queued last.
    pub fn clear_last(&mut self) {
        self.queued = self.queued.saturating_sub(1);
    }

    /// Drops what is queued.
    pub fn clear(&mut self) {
        self.queued = 0;
    }

    /// Sends what is queued and empties the batch, going on past the errors a shared,
    /// unconnected socket reports for an earlier datagram's ICMP answer (refused,
    /// unreachable): those say nothing about the datagrams still queued. Returns how many
    /// the kernel took, from the first; the rest are dropped (the caller counts them).
    pub fn send_all(&mut self, sock: &Socket) -> usize {
        let n = self.queued;
        self.prepare(n);
        self.queued = 0;
        let mut done = 0;
        let mut retries = 0;
        while done < n {
            // SAFETY: every msghdr from `done` on points at live buffers owned by self.
            let rc = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    self.msgs[done..].as_mut_ptr(),
                    libc::c_uint::try_from(n - done).unwrap_or(1),
                    0,
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                let asynchronous = matches!(
                    e.raw_os_error(),
                    Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH)
                );
                if asynchronous && retries < n {
                    retries += 1;
                    continue;
                }
                break;
            }
            done += usize::try_from(rc).unwrap_or(0);
            if rc == 0 {
                break;
            }
        }
        done
    }

    /// The payload of the `i`th queued datagram, for last-moment changes (T3, HMAC).
    pub fn payload_mut(&mut self, i: usize) -> Option<&mut [u8]> {
        (i < self.queued).then(|| &mut self.bufs[i][..self.lens[i]])
    }

    /// Sends what is queued and empties the batch. Returns how many datagrams the kernel
    /// took; the rest are dropped (the caller counts them).
    pub fn send(&mut self, sock: &Socket) -> io::Result<usize> {
        let n = self.queued;
        self.queued = 0;
        if n == 0 {
            return Ok(0);
        }
        self.prepare(n);
        // SAFETY: every msghdr points at live buffers owned by self of the stated sizes.
        let rc = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                self.msgs.as_mut_ptr(),
                libc::c_uint::try_from(n).unwrap_or(1),
                0,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(usize::try_from(rc).unwrap_or(0))
    }

    /// Points the first `n` headers at their buffers, addresses and control messages.
    fn prepare(&mut self, n: usize) {
        for i in 0..n {
            self.iovecs[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: self.lens[i],
            };
            let (name, namelen) = match &self.dests[i] {
                Some(addr) => {
                    let len = std_to_sockaddr(addr, &mut self.names[i]);
                    ((&raw mut self.names[i]).cast::<libc::c_void>(), len)
                }
                None => (std::ptr::null_mut(), 0),
            };
            let mut marks: [Option<(libc::c_int, libc::c_int, u8)>; 2] = [None, None];
            if let Some((ipv6, tos)) = self.tos[i] {
                marks[0] = Some(if ipv6 {
                    (libc::IPPROTO_IPV6, libc::IPV6_TCLASS, tos)
                } else {
                    (libc::IPPROTO_IP, libc::IP_TOS, tos)
                });
            }
            if let Some((ipv6, ttl)) = self.ttl[i] {
                marks[1] = Some(if ipv6 {
                    (libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT, ttl)
                } else {
                    (libc::IPPROTO_IP, libc::IP_TTL, ttl)
                });
            }
            let data_len = u32::try_from(size_of::<libc::c_int>()).unwrap_or(4);
            // SAFETY: CMSG_SPACE is pure arithmetic.
            let space = unsafe { libc::CMSG_SPACE(data_len) } as usize;
            let count = marks.iter().flatten().count();
            let controllen = space * count;
            if count > 0 {
                let buf = &mut self.controls[i];
                buf.0[..controllen].fill(0);
                let hdr = libc::msghdr {
                    msg_control: buf.as_mut_ptr(),
                    msg_controllen: controllen,
                    // SAFETY: plain old data; the rest of this temporary is unused.
                    ..unsafe { zeroed() }
                };
                // SAFETY: the control buffer holds `controllen` octets (at most two cmsgs
                // carrying a c_int each, far below CONTROL_LEN); CMSG_FIRSTHDR of a
                // non-empty buffer is non-null, and CMSG_NXTHDR stays inside it for the
                // second of two.
                unsafe {
                    let mut cmsg = libc::CMSG_FIRSTHDR(&raw const hdr);
                    for (level, kind, value) in marks.into_iter().flatten() {
                        (*cmsg).cmsg_level = level;
                        (*cmsg).cmsg_type = kind;
                        (*cmsg).cmsg_len = libc::CMSG_LEN(data_len) as usize;
                        std::ptr::write_unaligned(
                            libc::CMSG_DATA(cmsg).cast(),
                            libc::c_int::from(value),
                        );
                        cmsg = libc::CMSG_NXTHDR(&raw const hdr, cmsg);
                    }
                }
            }
            let hdr = &mut self.msgs[i].msg_hdr;
            hdr.msg_name = name;
            hdr.msg_namelen = namelen;
            hdr.msg_iov = &raw mut self.iovecs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = if controllen > 0 {
                self.controls[i].as_mut_ptr()
            } else {
                std::ptr::null_mut()
            };
            hdr.msg_controllen = controllen;
            hdr.msg_flags = 0;
        }
    }
}

/// What a socket's error queue held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// A transmit timestamp: the datagram's number since timestamping was enabled, and the
    /// `CLOCK_REALTIME` ns it left at.
    TxStamp { id: u32, ns: u64 },
    /// An ICMP error (port or host unreachable, and the like) for a datagram sent to
    /// `dest` (`IP_RECVERR`: how an unconnected socket learns of them).
    Unreachable { dest: Option<SocketAddr> },
}

/// Reads every transmit timestamp waiting on the socket's error queue (non-blocking) and
/// hands each to `f` as (datagram number since timestamping was enabled, `CLOCK_REALTIME`
/// ns). Returns how many were read.
pub fn drain_tx_timestamps(sock: &Socket, mut f: impl FnMut(u32, u64)) -> usize {
    drain_error_queue(sock, |q| {
        if let Queued::TxStamp { id, ns } = q {
            f(id, ns);
        }
    })
}

/// Asks for ICMP errors on the error queue of an unconnected socket too (`IP_RECVERR`,
/// `IPV6_RECVERR`), for [`drain_error_queue`].
pub fn enable_recv_errors(sock: &Socket, ipv6: bool) -> io::Result<()> {
    let fd = sock.as_raw_fd();
    if ipv6 {
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVERR, 1)?;
    }
    // An IPv6 socket may carry IPv4-mapped traffic too.
    let v4 = setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_RECVERR, 1);
    if ipv6 { Ok(()) } else { v4 }
}

/// Reads everything waiting on the socket's error queue (non-blocking), handing each
/// transmit timestamp and ICMP error to `f`, one `recvmsg` per entry. Returns how many
/// entries were read. [`ErrBatch`] reads them many to a system call.
pub fn drain_error_queue(sock: &Socket, mut f: impl FnMut(Queued)) -> usize {
    let mut control = Control::new();
    // SAFETY: plain old data; zero is valid.
    let mut name: libc::sockaddr_storage = unsafe { zeroed() };
    let mut count = 0;
    loop {
        // SAFETY: plain old data.
        let mut msg: libc::msghdr = unsafe { zeroed() };
        msg.msg_control = control.as_mut_ptr();
        msg.msg_controllen = CONTROL_LEN;
        msg.msg_name = (&raw mut name).cast();
        msg.msg_namelen =
            libc::socklen_t::try_from(size_of::<libc::sockaddr_storage>()).unwrap_or(128);
        // SAFETY: msg points at a live control buffer and address of the stated sizes; no
        // data buffer is needed (SOF_TIMESTAMPING_OPT_TSONLY; an ICMP error's quoted
        // datagram is cut, which is fine).
        let rc = unsafe {
            libc::recvmsg(
                sock.as_raw_fd(),
                &raw mut msg,
                libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
            )
        };
        if rc < 0 {
            return count;
        }
        count += 1;
        // SAFETY: the kernel just filled msg, its control buffer and name.
        if let Some(q) = unsafe { queued_of(&msg, &name) } {
            f(q);
        }
    }
}

/// What one message read from an error queue holds: a transmit stamp (its number and
/// time), an ICMP error, or neither.
///
/// # Safety
/// `msg` must have just been filled by the kernel, with its control buffer alive, and
/// `name` be the address buffer it pointed at.
unsafe fn queued_of(msg: &libc::msghdr, name: &libc::sockaddr_storage) -> Option<Queued> {
    let mut stamp = None;
    let mut id = None;
    let mut icmp = false;
    // SAFETY: the caller's promise: the kernel just filled msg and its control buffer.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !cmsg.is_null() {
        // SAFETY: non-null cmsg inside the buffer; data read unaligned at its type.
        unsafe {
            let c = &*cmsg;
            let data = libc::CMSG_DATA(cmsg);
            match (c.cmsg_level, c.cmsg_type) {
                (libc::SOL_SOCKET, libc::SCM_TIMESTAMPING) => {
                    let ts: libc::timespec = std::ptr::read_unaligned(data.cast());
                    stamp = Some(timespec_ns(&ts));
                }
                (libc::IPPROTO_IP, libc::IP_RECVERR) | (libc::IPPROTO_IPV6, libc::IPV6_RECVERR) => {
                    let err: libc::sock_extended_err = std::ptr::read_unaligned(data.cast());
                    if err.ee_origin == libc::SO_EE_ORIGIN_TIMESTAMPING {
                        id = Some(err.ee_data);
                    } else if err.ee_origin == libc::SO_EE_ORIGIN_ICMP
                        || err.ee_origin == libc::SO_EE_ORIGIN_ICMP6
                    {
                        icmp = true;
                    }
                }
                _ => {}
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    if let (Some(id), Some(ns)) = (id, stamp) {
        Some(Queued::TxStamp { id, ns })
    } else if icmp {
        let dest = (msg.msg_namelen > 0)
            .then(|| sockaddr_to_std(name))
            .flatten();
        Some(Queued::Unreachable { dest })
    } else {
        None
    }
}

/// Buffers for reading a socket's error queue many entries to a `recvmmsg`
/// (`MSG_ERRQUEUE`): a transmit stamp per datagram sent is otherwise a system call each.
pub struct ErrBatch {
    names: Vec<libc::sockaddr_storage>,
    controls: Vec<Control>,
    msgs: Vec<libc::mmsghdr>,
}

impl std::fmt::Debug for ErrBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ErrBatch")
            .field("capacity", &self.msgs.len())
            .finish_non_exhaustive()
    }
}

// SAFETY: as for RecvBatch: pointers are rebuilt from owned buffers before each read.
unsafe impl Send for ErrBatch {}

impl ErrBatch {
    /// Room for `capacity` entries a system call.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            // SAFETY: these libc structs are plain old data; zero is valid for each.
            names: vec![unsafe { zeroed() }; capacity],
            controls: vec![Control::new(); capacity],
            msgs: vec![unsafe { zeroed() }; capacity],
        }
    }

    /// Reads everything waiting on the socket's error queue (non-blocking), handing each
    /// transmit timestamp and ICMP error to `f`, in the order queued. Returns how many
    /// entries were read.
    pub fn drain(&mut self, sock: &Socket, mut f: impl FnMut(Queued)) -> usize {
        let n = self.msgs.len();
        let mut count = 0;
        loop {
            for i in 0..n {
                // SAFETY: plain old data.
                self.msgs[i] = unsafe { zeroed() };
                let hdr = &mut self.msgs[i].msg_hdr;
                hdr.msg_name = (&raw mut self.names[i]).cast();
                hdr.msg_namelen =
                    libc::socklen_t::try_from(size_of::<libc::sockaddr_storage>()).unwrap_or(128);
                hdr.msg_control = self.controls[i].as_mut_ptr();
                hdr.msg_controllen = CONTROL_LEN;
            }
            // SAFETY: every msghdr points at live buffers of the stated sizes owned by self;
            // none has a data buffer (SOF_TIMESTAMPING_OPT_TSONLY; an ICMP error's quoted
            // datagram is cut, which is fine).
            let rc = unsafe {
                libc::recvmmsg(
                    sock.as_raw_fd(),
                    self.msgs.as_mut_ptr(),
                    libc::c_uint::try_from(n).unwrap_or(1),
                    libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            let Ok(got) = usize::try_from(rc) else {
                return count;
            };
            for i in 0..got {
                // SAFETY: the kernel just filled this msghdr, its control buffer and name.
                if let Some(q) = unsafe { queued_of(&self.msgs[i].msg_hdr, &self.names[i]) } {
                    f(q);
                }
            }
            count += got;
            if got < n {
                return count;
            }
        }
    }
}

/// Waits up to `timeout_ms` for the socket to be readable or to have an error queued.
pub fn poll_readable(sock: &Socket, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&raw mut pfd, 1, timeout_ms) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc > 0)
}

/// Turns on UDP generic segmentation offload (Linux 4.18+): every send longer than
/// `segment` octets leaves as datagrams of `segment` octets, segmented by the kernel after
/// one trip through the stack.
pub fn enable_udp_gso(sock: &Socket, segment: u16) -> io::Result<()> {
    const SOL_UDP: libc::c_int = 17;
    const UDP_SEGMENT: libc::c_int = 103;
    setsockopt_int(
        sock.as_raw_fd(),
        SOL_UDP,
        UDP_SEGMENT,
        libc::c_int::from(segment),
    )
}

/// Waits up to `timeout_ms` for any of `fds` (their `events` set by the caller); their
/// `revents` say which are ready. Returns how many are.
pub fn poll_many(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: `fds` is a valid slice of pollfd structs of the length given.
    let rc = unsafe {
        libc::poll(
            fds.as_mut_ptr(),
            libc::nfds_t::try_from(fds.len()).unwrap_or(libc::nfds_t::MAX),
            timeout_ms,
        )
    };
    usize::try_from(rc).map_err(|_| io::Error::last_os_error())
}

/// The kernel's smoothed RTT of a TCP connection (`TCP_INFO`), µs; right after the
/// handshake it is the SYN to SYN-ACK time the kernel measured itself.
pub fn tcp_rtt_us(sock: &Socket) -> Option<u32> {
    // SAFETY: tcp_info is plain old data; zero is valid.
    let mut info: libc::tcp_info = unsafe { zeroed() };
    let mut len = libc::socklen_t::try_from(size_of::<libc::tcp_info>()).unwrap_or(0);
    // SAFETY: `info` is writable for `len` octets; the kernel writes at most that.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    (rc == 0 && info.tcpi_rtt > 0).then_some(info.tcpi_rtt)
}

/// A byte buffer seen as the uninitialised kind socket2's receive calls take.
pub fn as_uninit(buf: &mut [u8]) -> &mut [MaybeUninit<u8>] {
    // SAFETY: MaybeUninit<u8> has the layout of u8 and every initialised byte is a valid
    // MaybeUninit<u8>; the receive calls only ever write initialised bytes into it.
    unsafe { &mut *(std::ptr::from_mut::<[u8]>(buf) as *mut [MaybeUninit<u8>]) }
}

/// A `NETLINK_NETFILTER` socket bound to the kernel, for NFQUEUE: the messages themselves are
/// built and parsed in safe code (`emulate::nfqueue`).
#[derive(Debug)]
pub struct Netlink(OwnedFd);

impl Netlink {
    /// Opens and binds the socket, with a large receive buffer (so a burst of queued packets
    /// is not lost between two reads) and without `ENOBUFS` reports.
    pub fn open_netfilter() -> io::Result<Self> {
        // SAFETY: plain socket(2); the result is checked before it is owned.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_nl is valid (pid 0: the kernel picks one).
        let mut addr: libc::sockaddr_nl = unsafe { zeroed() };
        addr.nl_family = libc::sa_family_t::try_from(libc::AF_NETLINK).unwrap_or(16);
        // SAFETY: `addr` is a sockaddr_nl of the size given.
        let rc = unsafe {
            libc::bind(
                fd,
                (&raw const addr).cast(),
                libc::socklen_t::try_from(size_of::<libc::sockaddr_nl>()).unwrap_or(12),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        setsockopt_int(fd, libc::SOL_NETLINK, libc::NETLINK_NO_ENOBUFS, 1)?;
        // Forcing the size needs CAP_NET_ADMIN, which binding a queue needs anyway; without
        // it the ordinary limit applies.
        if setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 8 << 20).is_err() {
            let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 8 << 20);
        }
        Ok(Self(owned))
    }

    /// Sends one buffer of netlink messages to the kernel.
    pub fn send(&self, buf: &[u8]) -> io::Result<()> {
        // SAFETY: an all-zero sockaddr_nl addresses the kernel.
        let mut to: libc::sockaddr_nl = unsafe { zeroed() };
        to.nl_family = libc::sa_family_t::try_from(libc::AF_NETLINK).unwrap_or(16);
        // SAFETY: `buf` is valid for its length; `to` is a sockaddr_nl of the size given.
        let rc = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                0,
                (&raw const to).cast(),
                libc::socklen_t::try_from(size_of::<libc::sockaddr_nl>()).unwrap_or(12),
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Receives one datagram without waiting; `WouldBlock` when there is none. A datagram
    /// longer than `buf` comes back truncated (the length says so).
    pub fn recv_now(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length.
        let rc = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        usize::try_from(rc).map_err(|_| io::Error::last_os_error())
    }

    /// Waits up to `timeout` (to the nanosecond, unlike poll's milliseconds) for a datagram.
    pub fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
        };
        // SAFETY: one valid pollfd, a valid timespec, no signal mask.
        let rc = unsafe { libc::ppoll(&raw mut pfd, 1, &raw const ts, std::ptr::null()) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        Ok(rc > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Domain, Protocol, Type};

    fn udp() -> Socket {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    }

    /// `cmsghdr` is read and written through references into these buffers: each must
    /// have its alignment, in the batches' vectors and on the stack alike.
    #[test]
    fn control_buffers_are_aligned_for_cmsghdr() {
        let align = align_of::<libc::cmsghdr>();
        let aligned = |c: &Control| (std::ptr::from_ref(c) as usize).is_multiple_of(align);
        let recv = RecvBatch::new(7);
        let send = SendBatch::new(5);
        assert!(recv.controls.iter().chain(&send.controls).all(aligned));
        for _ in 0..4 {
            let (_odd, c) = (0u8, Control::new());
            assert!(aligned(&c));
        }
        assert!(align_of::<Control>() >= align, "{align}");
    }

    #[test]
    fn batch_round_trip_carries_metadata_and_timestamps() {
        let rx = udp();
        enable_rx_metadata(&rx, false).unwrap();
        let (rx_src, _) = enable_timestamping(&rx, false);
        assert_eq!(
            rx_src,
            TimestampSource::Kernel,
            "Linux always has software stamps"
        );
        let tx = udp();
        let (_, tx_src) = enable_timestamping(&tx, true);
        assert_eq!(tx_src, TimestampSource::Kernel);
        tx.set_ttl_v4(42).unwrap();
        let dest = rx.local_addr().unwrap().as_socket().unwrap();
        // Linux turns software receive stamps on through deferred work (the netstamp static
        // key): on a quiet host the first datagrams after enabling can arrive unstamped, and
        // callers fall back to the clock. Wait until stamps flow, from a third socket so the
        // transmit stamp numbering below stays intact.
        let primer = udp();
        let mut warm = RecvBatch::new(1);
        for _ in 0..200 {
            primer.send_to(b"warm-up", &dest.into()).unwrap();
            if warm.recv(&rx).is_ok_and(|n| n == 1) && warm.get(0).unwrap().1.kernel_rx_ns.is_some()
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut out = SendBatch::new(4);
        for i in 0..3u8 {
            out.next_slot().unwrap()[..10 + usize::from(i)].fill(i);
            assert!(out.commit(10 + usize::from(i), Some(dest), Some((false, 0xb8))));
        }
        let before = realtime_ns();
        assert_eq!(out.send(&tx).unwrap(), 3);
        let mut inb = RecvBatch::new(8);
        let mut got = 0;
        while got < 3 {
            let n = inb.recv(&rx).unwrap();
            for i in 0..n {
                let (payload, meta) = inb.get(i).unwrap();
                assert_eq!(payload.len(), 10 + payload[0] as usize);
                assert_eq!(meta.ttl, Some(42));
                assert_eq!(meta.tos, Some(0xb8), "per-datagram TOS from the cmsg");
                assert_eq!(meta.src, tx.local_addr().unwrap().as_socket());
                if rx_src == TimestampSource::Kernel {
                    let ts = meta.kernel_rx_ns.unwrap();
                    assert!(ts >= before && ts <= realtime_ns());
                }
            }
            got += n;
        }
        if tx_src == TimestampSource::Kernel {
            let mut ids = Vec::new();
            for _ in 0..100 {
                drain_tx_timestamps(&tx, |id, ns| {
                    assert!(ns >= before);
                    ids.push(id);
                });
                if ids.len() == 3 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(ids, [0, 1, 2], "one numbered transmit stamp per datagram");
        }
    }

    #[test]
    fn error_batch_reads_many_transmit_stamps_a_call_in_order() {
        let rx = udp();
        let tx = udp();
        let (_, tx_src) = enable_timestamping(&tx, true);
        assert_eq!(
            tx_src,
            TimestampSource::Kernel,
            "Linux always has software stamps"
        );
        let dest = rx.local_addr().unwrap().as_socket().unwrap();
        let before = realtime_ns();
        // More than a batch holds: the drain goes on past a full read.
        let mut out = SendBatch::new(50);
        for _ in 0..50 {
            out.next_slot().unwrap()[..8].fill(7);
            assert!(out.commit(8, Some(dest), None));
        }
        assert_eq!(out.send(&tx).unwrap(), 50);
        let mut errs = ErrBatch::new(16);
        let mut ids = Vec::new();
        for _ in 0..100 {
            errs.drain(&tx, |q| match q {
                Queued::TxStamp { id, ns } => {
                    assert!(ns >= before && ns <= realtime_ns());
                    ids.push(id);
                }
                Queued::Unreachable { .. } => panic!("nothing was refused"),
            });
            if ids.len() >= 50 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(ids, (0..50).collect::<Vec<u32>>());
        assert_eq!(errs.drain(&tx, |_| {}), 0, "the queue is empty");
    }

    #[test]
    fn clocks_move_forward() {
        let a = monotonic_ns();
        sleep_until(a + 1_000_000);
        assert!(monotonic_ns() >= a + 1_000_000);
        assert!(realtime_ns() > 1_700_000_000_000_000_000);
    }

    #[test]
    fn batch_stamps_become_monotonic_and_never_later_than_the_read() {
        let c = BatchClock::now();
        let before = c.wall_ns - 5_000_000;
        assert_eq!(c.mono(before), c.mono_ns - 5_000_000);
        assert_eq!(
            c.mono(c.wall_ns + 1_000),
            c.mono_ns,
            "a stamp after the read is clamped"
        );
        assert_eq!(c.arrival(None), (c.mono_ns, c.wall_ns));
        assert_eq!(c.arrival(Some(before)), (c.mono_ns - 5_000_000, before));
    }

    #[test]
    fn clock_sync_reads() {
        let s = clock_sync().unwrap();
        assert!(s.max_error_ns > 0 || s.synchronized);
    }
}

/// A doorbell one thread rings and another polls (`eventfd`, non-blocking): the probe
/// engine's sender rings it when it hands the receiver connections to watch.
#[derive(Debug)]
pub struct Bell(OwnedFd);

impl Bell {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain eventfd(2); the result is checked before it is owned.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Makes the bell readable (until [`Self::clear`]).
    pub fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes the 8 octets of `one`, as eventfd(2) asks. A full counter
        // (EAGAIN) is still readable, which is all a ring means.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    /// Takes the rings so far: not readable again until the next one.
    pub fn clear(&self) {
        let mut n: u64 = 0;
        // SAFETY: reads at most the 8 octets of `n`; EAGAIN (not rung) leaves it alone.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&raw mut n).cast(), 8) };
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
