//! Certificates the TLS tests make for themselves (rcgen): a CA, server and client
//! certificates it signs, written as PEM files (keys at mode 0600). Nothing here is a
//! checked-in key: every run draws new ones.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A test certificate authority.
#[derive(Debug)]
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// Its certificate (PEM), to trust.
    pub cert_pem: PathBuf,
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What a leaf certificate is for, and its validity.
#[derive(Debug, Clone)]
pub struct Leaf<'a> {
    /// The subject's common name.
    pub cn: &'a str,
    /// Subject alternative names: DNS names or IP addresses.
    pub sans: &'a [&'a str],
    pub server: bool,
    /// Already expired (valid in 2020 only).
    pub expired: bool,
}

/// Writes `text` to `path`; with `secret`, readable by its owner only.
pub fn write(path: &Path, text: &str, secret: bool) {
    std::fs::write(path, text).expect("write a PEM file");
    let mode = if secret { 0o600 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

impl Ca {
    /// A new CA named `name`, its certificate written to `dir/NAME-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Self {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.distinguished_name
            .push(DnType::CommonName, format!("pathprobe test CA {name}"));
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer =
            CertifiedIssuer::self_signed(p, KeyPair::generate().expect("CA key")).expect("CA");
        let cert_pem = dir.join(format!("{name}-ca.pem"));
        write(&cert_pem, &issuer.pem(), false);
        Self { issuer, cert_pem }
    }

    /// A certificate for `leaf`, written to `dir/FILE.pem` and `dir/FILE.key`.
    pub fn issue(&self, dir: &Path, file: &str, leaf: &Leaf<'_>) -> Issued {
        let sans: Vec<String> = leaf.sans.iter().map(|s| (*s).to_string()).collect();
        let mut p = CertificateParams::new(sans).expect("leaf params");
        p.distinguished_name.push(DnType::CommonName, leaf.cn);
        p.extended_key_usages = vec![if leaf.server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        if leaf.expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2020, 12, 31);
        }
        let key = KeyPair::generate().expect("leaf key");
        let cert = p.signed_by(&key, &self.issuer).expect("sign");
        let out = Issued {
            cert: dir.join(format!("{file}.pem")),
            key: dir.join(format!("{file}.key")),
        };
        write(&out.cert, &cert.pem(), false);
        write(&out.key, &key.serialize_pem(), true);
        out
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self, dir: &Path, file: &str) -> Issued {
        self.issue(
            dir,
            file,
            &Leaf {
                cn: "localhost",
                sans: &["localhost", "127.0.0.1"],
                server: true,
                expired: false,
            },
        )
    }

    /// A client certificate whose CN is `agent_id`.
    pub fn client(&self, dir: &Path, agent_id: &str) -> Issued {
        self.issue(
            dir,
            agent_id,
            &Leaf {
                cn: agent_id,
                sans: &[],
                server: false,
                expired: false,
            },
        )
    }
}
