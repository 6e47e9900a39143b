//! Throwaway certificates for the TLS tests, made in the test with rcgen: a CA, and server
//! certificates it issues, written as PEM files the servers can read (ejabberd runs as its
//! own user: mode 0644 in a directory it can enter).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A certificate authority of the test's.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A server certificate's files.
pub struct Leaf {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
    /// Both in one file (what ejabberd's `certfile` takes).
    pub both: PathBuf,
}

impl Ca {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("a key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("a CA certificate");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Writes the CA's certificate to `dir/NAME.pem` (what jat-proxy's `ca` names).
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(format!("{name}.pem"));
        write_readable(&path, &self.pem);
        path
    }

    /// Issues a server certificate for `names` (DNS names or IP addresses), written to
    /// `dir/NAME.crt`, `NAME.key` and `NAME.pem` (both).
    pub fn issue(&self, dir: &Path, name: &str, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().expect("a key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*n).try_into().expect("a DNS name")),
            })
            .collect();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).expect("a certificate");
        let leaf = Leaf {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            both: dir.join(format!("{name}.pem")),
        };
        write_readable(&leaf.cert, &cert.pem());
        write_readable(&leaf.key, &key.serialize_pem());
        write_readable(
            &leaf.both,
            &format!("{}{}", cert.pem(), key.serialize_pem()),
        );
        leaf
    }
}

fn write_readable(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write a PEM file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}
