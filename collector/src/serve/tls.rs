//! TLS for `serve` (rustls, the *ring* provider): the server's certificate chain and key
//! from PEM files, swapped on `SIGHUP` for new connections while the established ones go
//! on with theirs, and optional mutual TLS (`--client-ca`), where a client certificate's
//! names (subject CN and DNS SANs) say which agent it is.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use tokio_rustls::TlsAcceptor;

use crate::{Error, Result};

/// The files `serve --tls-cert --tls-key [--client-ca]` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) that sign agents' client certificates: with it, ingest takes
    /// a client certificate in place of a bearer token.
    pub client_ca: Option<PathBuf>,
}

/// The server's TLS settings as loaded last; [`Tls::reload`] replaces them.
#[derive(Debug)]
pub struct Tls {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

/// The first octet of every TLS record that opens a connection (a handshake record): a
/// connection that starts otherwise is not speaking TLS.
pub const HANDSHAKE_RECORD: u8 = 0x16;

/// What a plain-HTTP client that reached the TLS port is told, in plain HTTP, before the
/// connection is closed.
pub fn plain_http_answer() -> Vec<u8> {
    let body = r#"{"error":"this port speaks TLS (HTTPS): use an https:// URL for the collector, not http://","reason":"tls_required"}"#;
    format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pem_error(path: &Path, what: &str, e: &pem::Error) -> Error {
    match e {
        pem::Error::Io(io) => Error::Config(format!(
            "cannot read {what} {}: {io}; check the path and its permissions",
            path.display()
        )),
        other => Error::Config(format!(
            "{what} {} is not valid PEM ({other}): give the PEM file (-----BEGIN ...-----)",
            path.display()
        )),
    }
}

/// Every certificate in a PEM file; none is an error that names the file.
pub fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, what, &e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, what, &e))?;
    if certs.is_empty() {
        return Err(Error::Config(format!(
            "{what} {} holds no certificate (no -----BEGIN CERTIFICATE----- block): give the PEM certificate file",
            path.display()
        )));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    pathprobe_proto::secrets::check_mode(path, "--tls-key").map_err(Error::Config)?;
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        pem::Error::NoItemsFound => Error::Config(format!(
            "--tls-key {} holds no private key (no -----BEGIN PRIVATE KEY----- block): give the key that belongs to --tls-cert",
            path.display()
        )),
        other => pem_error(path, "--tls-key", &other),
    })
}

/// The names a certificate gives its holder: the subject's common names, then its DNS
/// subject alternative names. Empty when it cannot be parsed.
pub fn names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, x)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = x
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(str::to_string)
        .collect();
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push((*d).to_string());
            }
        }
    }
    names.dedup();
    names
}

/// When a certificate stops being valid, in seconds since 1970.
fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(x.validity().not_after.timestamp())
}

fn load(files: &TlsFiles) -> Result<ServerConfig> {
    let certs = read_certs(&files.cert, "--tls-cert")?;
    let key = read_key(&files.key)?;
    let now = UnixTime::now().as_secs();
    if let Some(end) = not_after(&certs[0])
        && end < i64::try_from(now).unwrap_or(i64::MAX)
    {
        return Err(Error::Config(format!(
            "the certificate in --tls-cert {} expired {} ago: renew it (agents refuse an expired certificate)",
            files.cert.display(),
            humantime::format_duration(std::time::Duration::from_secs(
                now.saturating_sub(u64::try_from(end).unwrap_or(0))
            ))
        )));
    }
    let p = provider();
    let builder = ServerConfig::builder_with_provider(Arc::clone(&p))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS: {e}")))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs(ca, "--client-ca")? {
                roots.add(c).map_err(|e| {
                    Error::Config(format!(
                        "--client-ca {}: a certificate cannot be used as a CA ({e})",
                        ca.display()
                    ))
                })?;
            }
            // Optional at the handshake: readers (dashboards, queries) come with a reader
            // token and no certificate; ingest then requires one (see `auth`). A
            // certificate that is presented must still verify against these CAs.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), p)
                .allow_unauthenticated()
                .build()
                .map_err(|e| Error::Config(format!("--client-ca {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder.with_single_cert(certs, key).map_err(|e| {
        Error::Config(format!(
            "--tls-cert {} and --tls-key {} cannot be used together ({e}): give the key that belongs to the certificate",
            files.cert.display(),
            files.key.display()
        ))
    })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

impl Tls {
    /// Loads and checks the files: every problem is an error that names the file and the
    /// fix, before the collector listens.
    pub fn load(files: TlsFiles) -> Result<Self> {
        let cfg = load(&files)?;
        Ok(Self {
            files,
            current: RwLock::new(Arc::new(cfg)),
        })
    }

    /// Loads the files again (after `SIGHUP`): new connections get the new certificate,
    /// established ones keep theirs. On an error the old settings stay.
    pub fn reload(&self) -> Result<()> {
        let cfg = load(&self.files)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(cfg);
        Ok(())
    }

    /// Whether ingest requires a client certificate.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// An acceptor with the current settings.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(
            &self.current.read().unwrap_or_else(PoisonError::into_inner),
        ))
    }
}
