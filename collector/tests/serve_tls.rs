//! `serve --tls-cert --tls-key` as a process, with a certificate the test makes: `SIGHUP`
//! swaps the certificate for new connections while an established one goes on, and a bad
//! file on reload leaves the old certificate serving.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use pathprobe_tests::pki::{Ca, Issued};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

const COLLECTOR: &str = env!("CARGO_BIN_EXE_pathprobe-collector");
const READER: &str = "reader-0123456789abcdef01234567";

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pathprobe-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The collector process and its log lines, as they come.
struct Server {
    child: Child,
    addr: SocketAddr,
    log: mpsc::Receiver<String>,
}

impl Server {
    fn start(d: &Path, cert: &Issued) -> Self {
        pathprobe_tests::pki::write(&d.join("tokens"), &format!("reader noc {READER}\n"), true);
        let mut child = Command::new(COLLECTOR)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .arg("--db")
            .arg(d.join("store.db"))
            .arg("--tokens")
            .arg(d.join("tokens"))
            .arg("--tls-cert")
            .arg(&cert.cert)
            .arg("--tls-key")
            .arg(&cert.key)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, log) = mpsc::channel();
        let lines = BufReader::new(child.stderr.take().unwrap()).lines();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let mut s = Self {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            log,
        };
        let line = s.wait_for("collector serving");
        s.addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("listen="))
            .unwrap()
            .parse()
            .unwrap();
        s
    }

    /// The next log line that says `what`.
    fn wait_for(&self, what: &str) -> String {
        loop {
            let line = self
                .log
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("the collector never said `{what}`"));
            if line.contains(what) {
                return line;
            }
        }
    }

    fn hangup(&self) {
        let ok = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// A TLS connection to `localhost` at `addr`, trusting `ca`.
fn connect(addr: SocketAddr, ca: &Path) -> Tls {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let conn =
        ClientConnection::new(Arc::new(cfg), ServerName::try_from("localhost").unwrap()).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    StreamOwned::new(conn, tcp)
}

/// `GET /v1/paths` on a kept-alive connection: the status.
fn get_paths(s: &mut Tls) -> u16 {
    s.write_all(
        format!(
            "GET /v1/paths HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {READER}\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap();
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    head.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The certificate the server presented on `s`.
fn presented(s: &Tls) -> Vec<u8> {
    s.conn.peer_certificates().unwrap()[0].to_vec()
}

fn der_of(pem: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(pem).unwrap().to_vec()
}

#[test]
fn sighup_swaps_the_certificate_and_keeps_established_connections() {
    let d = dir("reload");
    let ca = Ca::new(&d, "corp");
    let first = ca.server(&d, "first");
    let s = Server::start(&d, &first);
    let first_der = der_of(&first.cert);
    let mut old = connect(s.addr, &ca.cert_pem);
    assert_eq!(get_paths(&mut old), 200);
    assert_eq!(presented(&old), first_der);

    // A renewed certificate (a new key too) over the same files, then SIGHUP.
    let second = ca.server(&d, "second");
    std::fs::copy(&second.cert, &first.cert).unwrap();
    std::fs::copy(&second.key, &first.key).unwrap();
    s.hangup();
    s.wait_for("TLS certificate reloaded");
    let mut new = connect(s.addr, &ca.cert_pem);
    assert_eq!(get_paths(&mut new), 200);
    assert_eq!(
        presented(&new),
        der_of(&second.cert),
        "new connections get the new one"
    );
    assert_eq!(
        get_paths(&mut old),
        200,
        "the established connection goes on"
    );
    assert_eq!(
        presented(&old),
        first_der,
        "with the certificate it began with"
    );

    // A broken file on reload: the error is logged, the last good certificate serves on.
    std::fs::write(&first.cert, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    s.hangup();
    let said = s.wait_for("not reloaded");
    assert!(said.contains(&first.cert.display().to_string()), "{said}");
    let mut after = connect(s.addr, &ca.cert_pem);
    assert_eq!(get_paths(&mut after), 200);
    assert_eq!(presented(&after), der_of(&second.cert));
}
