//! Pinning a socket to a path: the one function every probe kind, the trace and the
//! capacity test use, so that `--bind`, `--interface` and `--fwmark` mean the same
//! everywhere and fail with the same messages.

use std::io;
use std::net::SocketAddr;

use socket2::Socket;

use crate::{Error, Result};

/// Maps an I/O error to [`Error::Io`] naming `what` was being done.
pub(crate) fn io_err(what: &str) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        what: what.to_string(),
        source,
    }
}

/// Pins `sock` to a path: an interface (`SO_BINDTODEVICE`), a firewall mark (`SO_MARK`)
/// and a local address (`bind`, or the unspecified address of `target`'s family).
pub fn pin(
    sock: &Socket,
    target: SocketAddr,
    bind: Option<SocketAddr>,
    interface: Option<&str>,
    fwmark: Option<u32>,
) -> Result<()> {
    let v6 = target.is_ipv6();
    if let Some(name) = interface {
        sock.bind_device(Some(name.as_bytes())).map_err(|e| match e.kind() {
            io::ErrorKind::PermissionDenied => Error::Config(format!(
                "--interface {name} needs CAP_NET_RAW (run as root), or pin the path with --bind instead"
            )),
            _ => Error::Io {
                what: format!("bind to interface {name}"),
                source: e,
            },
        })?;
    }
    if let Some(mark) = fwmark {
        sock.set_mark(mark).map_err(|e| match e.kind() {
            io::ErrorKind::PermissionDenied => {
                Error::Config(format!("--fwmark {mark} needs CAP_NET_ADMIN (run as root)"))
            }
            _ => Error::Io {
                what: format!("set fwmark {mark}"),
                source: e,
            },
        })?;
    }
    let local = bind.unwrap_or_else(|| {
        if v6 {
            "[::]:0".parse().unwrap_or(target)
        } else {
            "0.0.0.0:0".parse().unwrap_or(target)
        }
    });
    sock.bind(&local.into())
        .map_err(io_err(&format!("bind {local} (--bind)")))?;
    Ok(())
}
