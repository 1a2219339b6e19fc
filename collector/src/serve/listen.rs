//! The accept loop (hyper's HTTP/1 connections, with or without TLS), with the limits
//! that keep a peer from holding the collector's connections: at most `max_connections`
//! at once, the first request's head complete within `header_timeout` of the accept (the
//! TLS handshake included: a silent connection or a slowloris's partial headers are
//! closed then), and `idle_timeout` for every later request's head (an idle keep-alive).
//!
//! A client that speaks plain HTTP to the TLS port is answered, in plain HTTP, that the
//! port speaks TLS. Each connection-level refusal is counted by reason for `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower_service::Service as _;

use super::tls::{self, Tls};

/// Descriptors beyond the connections: the store, its WAL, the listener, logs.
const SPARE_FILES: u64 = 64;

/// Raises this process's open-files limit (`RLIMIT_NOFILE`) so that `max_connections`
/// connections fit beside the store: a service manager's soft default of 1,024 would
/// otherwise refuse connections long before `--max-connections` does. A hard limit too
/// low for it is logged with the fix. Returns the soft limit now in force.
#[allow(
    unsafe_code,
    reason = "getrlimit and setrlimit on a local struct: no safe wrapper in the tree"
)]
pub fn raise_open_files(max_connections: usize) -> u64 {
    let want = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_add(SPARE_FILES);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limit into `lim`, which lives across the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return 0;
    }
    if lim.rlim_cur < want {
        let raised = libc::rlimit {
            rlim_cur: want.min(lim.rlim_max),
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads `raised`, which lives across the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) } == 0 {
            lim.rlim_cur = raised.rlim_cur;
        }
    }
    if lim.rlim_cur < want {
        tracing::warn!(
            open_files = lim.rlim_cur,
            max_connections,
            "the open-files limit holds fewer connections than --max-connections: raise it (LimitNOFILE= in the systemd unit, or ulimit -Hn), or lower --max-connections"
        );
    }
    lim.rlim_cur
}

/// The connection limits (`serve --max-connections --header-timeout --idle-timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Most connections open at once; one more is closed at once and counted.
    pub max_connections: usize,
    /// From the accept to the first request's complete head (TLS handshake included).
    pub header_timeout: Duration,
    /// From the end of an answer to the next request's complete head, on a kept-alive
    /// connection.
    pub idle_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max_connections: 4_096,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_mins(1),
        }
    }
}

/// Connections closed by a limit, by reason (for `/metrics`).
#[derive(Debug, Default)]
pub struct ConnCounts {
    pub max_connections: AtomicU64,
    pub header_timeout: AtomicU64,
    pub tls_handshake: AtomicU64,
    pub plain_http_on_tls: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
}

impl ConnCounts {
    /// `(reason, count)` of every connection-level refusal.
    pub fn refusals(&self) -> [(&'static str, u64); 4] {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            ("max_connections", n(&self.max_connections)),
            ("header_timeout", n(&self.header_timeout)),
            ("tls_handshake", n(&self.tls_handshake)),
            ("plain_http_on_tls", n(&self.plain_http_on_tls)),
        ]
    }
}

/// How the connection reached us, for the handlers: the peer's address and, over mutual
/// TLS, the names its verified client certificate gives it.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    /// `None` without a client certificate.
    pub cert_names: Option<Arc<Vec<String>>>,
}

/// Serves `app` on `listener` until `shutdown`; then stops accepting and lets the
/// connections finish what they are answering (at most 10 s).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<Tls>>,
    limits: ConnLimits,
    counts: Arc<ConnCounts>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            counts.max_connections.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (app, tls, counts) = (app.clone(), tls.clone(), Arc::clone(&counts));
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            counts.open.fetch_add(1, Ordering::Relaxed);
            connection(stream, addr, app, tls, limits, &counts, watcher).await;
            counts.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(Duration::from_secs(10)) => {
            tracing::warn!("connections still open 10 s after shutdown began: closing them");
        }
    }
}

async fn connection(
    stream: TcpStream,
    addr: SocketAddr,
    app: Router,
    tls: Option<Arc<Tls>>,
    limits: ConnLimits,
    counts: &ConnCounts,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let deadline = tokio::time::Instant::now() + limits.header_timeout;
    let Some(tls) = tls else {
        let peer = Peer {
            addr: Some(addr),
            cert_names: None,
        };
        http(stream, peer, app, limits, deadline, counts, watcher).await;
        return;
    };
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        Ok(_) => return, // closed before a word
        Err(_) => {
            counts.header_timeout.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    if first[0] != tls::HANDSHAKE_RECORD {
        counts.plain_http_on_tls.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(peer = %addr, "plain HTTP on the TLS port: told to use https://");
        let mut stream = stream;
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            stream.write_all(&tls::plain_http_answer()),
        )
        .await;
        let _ = stream.shutdown().await;
        // A lingering close: read what the client is still sending (its request body)
        // before closing, for at most 2 s and 16 MiB. Closed with unread data, the socket
        // would answer with a reset, and a client still writing its body would lose the
        // answer above with it (seen beside stress-ng: "Broken pipe" in place of the fix).
        let mut sink = vec![0u8; 16 * 1024];
        let mut left: usize = 16 << 20;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while left > 0 {
                match stream.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        })
        .await;
        return;
    }
    let accepted = tokio::time::timeout_at(deadline, tls.acceptor().accept(stream)).await;
    let stream = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            counts.tls_handshake.fetch_add(1, Ordering::Relaxed);
            tracing::info!(peer = %addr, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            counts.header_timeout.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let cert_names = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(<[_]>::first)
        .map(|c| Arc::new(tls::names(c)));
    let peer = Peer {
        addr: Some(addr),
        cert_names,
    };
    http(stream, peer, app, limits, deadline, counts, watcher).await;
}

async fn http<I>(
    io: I,
    peer: Peer,
    app: Router,
    limits: ConnLimits,
    deadline: tokio::time::Instant,
    counts: &ConnCounts,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let asked = Arc::new(AtomicBool::new(false));
    let service = {
        let asked = Arc::clone(&asked);
        hyper::service::service_fn(move |mut req: Request<Incoming>| {
            asked.store(true, Ordering::Relaxed);
            req.extensions_mut().insert(peer.clone());
            let mut app = app.clone();
            async move { app.call(req).await }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        // hyper starts this whenever it waits for a request's head: for the first one the
        // shorter header timeout below closes the connection first.
        .header_read_timeout(limits.idle_timeout)
        .serve_connection(TokioIo::new(io), service);
    let conn = watcher.watch(conn);
    tokio::pin!(conn);
    tokio::select! {
        _ = &mut conn => return,
        () = tokio::time::sleep_until(deadline) => {}
    }
    if !asked.load(Ordering::Relaxed) {
        counts.header_timeout.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let _ = conn.await;
}
