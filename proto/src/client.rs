//! The HTTP client side shared by the agent's uploader and the collector's remote queries
//! (feature `client`): ureq over rustls with the *ring* provider, the roots (an
//! enterprise CA file, else the system's), an optional client certificate for mutual TLS,
//! and what a failed exchange means, said with its fix.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ureq::tls::{Certificate, ClientCert, PemItem, RootCerts, TlsConfig, TlsProvider};

/// Whether `url` sends in clear beyond this host (reports and tokens): `http://` to
/// anything but a loopback address or `localhost`.
pub fn cleartext_beyond_loopback(url: &str) -> bool {
    let Ok(uri) = url.parse::<ureq::http::Uri>() else {
        return false;
    };
    if uri.scheme_str() != Some("http") {
        return false;
    }
    let host = uri.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    !(host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()))
}

/// How a client reaches a collector over TLS: whose CA signs the collector's certificate,
/// and the client's own certificate for mutual TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsClient {
    /// CA certificates (PEM) to check the collector against, in place of the system's.
    pub ca_file: Option<PathBuf>,
    /// The agent's client certificate chain (PEM), for a collector with `--client-ca`.
    pub client_cert: Option<PathBuf>,
    /// Its private key (PEM; mode 0600).
    pub client_key: Option<PathBuf>,
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| {
        format!(
            "cannot read {what} {}: {e}; check the path and its permissions",
            path.display()
        )
    })
}

fn certs_of(path: &Path, what: &str) -> Result<Vec<Certificate<'static>>, String> {
    let pem = read_pem(path, what)?;
    let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect();
    if certs.is_empty() {
        return Err(format!(
            "{what} {} holds no certificate (no -----BEGIN CERTIFICATE----- block): give a PEM certificate file",
            path.display()
        ));
    }
    Ok(certs)
}

impl TlsClient {
    /// An HTTP agent for `base_url` (`https://` with these TLS settings, or `http://`)
    /// that gives every status to the caller and gives up on an exchange after `timeout`.
    /// The roots (`ca_file`, else the system's) and the client certificate are loaded and
    /// checked now, so that a bad file is an error at start.
    pub fn agent(&self, base_url: &str, timeout: Duration) -> Result<ureq::Agent, String> {
        let https = base_url.starts_with("https://");
        let mut cfg = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .https_only(https);
        if https {
            cfg = cfg.tls_config(self.config()?);
        }
        Ok(cfg.build().into())
    }

    fn config(&self) -> Result<TlsConfig, String> {
        let roots = if let Some(ca) = &self.ca_file {
            certs_of(ca, "ca_file")?
        } else {
            let found = rustls_native_certs::load_native_certs();
            if found.certs.is_empty() {
                let why = found
                    .errors
                    .first()
                    .map_or_else(|| "none found".to_string(), ToString::to_string);
                return Err(format!(
                    "no system CA certificates to check the collector against ({why}): install the ca-certificates package, or give ca_file (--ca-file) with the CA that signed the collector's certificate"
                ));
            }
            found
                .certs
                .into_iter()
                .map(|c| Certificate::from_der(c.as_ref()).to_owned())
                .collect()
        };
        let client = match (&self.client_cert, &self.client_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                let chain = certs_of(cert, "client_cert")?;
                crate::secrets::check_mode(key, "client_key")?;
                let pem = read_pem(key, "client_key")?;
                let key = ureq::tls::PrivateKey::from_pem(&pem).map_err(|e| {
                    format!(
                        "client_key {} holds no usable private key ({e}): give the PEM key of client_cert",
                        key.display()
                    )
                })?;
                Some(ClientCert::new_with_certs(&chain, key))
            }
            _ => {
                return Err(
                    "client_cert and client_key go together: give both, or neither".to_string(),
                );
            }
        };
        Ok(TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .root_certs(RootCerts::new_with_certs(&roots))
            .client_cert(client)
            .build())
    }
}

/// What a failed exchange with `url` means, with the fix: TLS failures by their cause.
pub fn explain(e: &ureq::Error, url: &str) -> String {
    use rustls::{AlertDescription, CertificateError, Error as Tls};
    // rustls's verdict comes as its own error, or inside the I/O error of the stream.
    let tls = match e {
        ureq::Error::Rustls(tls) => Some(tls),
        ureq::Error::Io(io) => io.get_ref().and_then(|i| i.downcast_ref::<Tls>()),
        _ => None,
    };
    let Some(tls) = tls else {
        if let ureq::Error::Io(io) = e
            && url.starts_with("https://")
            && matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            )
        {
            return format!(
                "the collector closed the TLS connection ({io}): if it requires mutual TLS, give client_cert and client_key signed by its --client-ca"
            );
        }
        return e.to_string();
    };
    match tls {
        Tls::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => format!(
                "the collector's certificate has expired ({c}): renew it on the collector, then send it SIGHUP"
            ),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => format!(
                "the collector's certificate is not valid yet ({c}): check this host's clock and the certificate's dates"
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!(
                    "the collector's certificate is not for the name in {url} ({c}): use the name the certificate was issued for, or issue one with this name among its subject alternative names"
                )
            }
            CertificateError::UnknownIssuer => "the collector's certificate is signed by a CA this agent does not trust: give ca_file (--ca-file) with the CA that signed it".to_string(),
            other => format!("the collector's certificate is refused: {other}"),
        },
        Tls::InvalidMessage(_) => format!(
            "{url} does not answer in TLS ({tls}): it may be a plain-HTTP port; use the collector's HTTPS port, or http:// if it serves no TLS"
        ),
        Tls::AlertReceived(
            a @ (AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateRequired
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown),
        ) => format!(
            "the collector refused this agent's client certificate ({a:?}): give client_cert and client_key signed by the CA the collector takes (--client-ca), and in date"
        ),
        other => format!("TLS: {other}"),
    }
}
