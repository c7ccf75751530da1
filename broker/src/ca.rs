//! The broker's local certificate authority.
//!
//! One CA per broker instance (per `broker run`, or per `broker serve` process). Its private
//! key lives only in this process's memory: it is generated at start and never written to
//! disk, so there is nothing to steal from the home directory. The certificate carries X.509
//! name constraints that permit only the managed hostnames and exclude every IP address, so
//! even a stolen CA key could not impersonate any other site to a client that trusts it.
//!
//! Leaves are minted per SNI on first use, signed by the CA, short-lived, back-dated for
//! skewed clocks, and kept in a bounded cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, KeyPair, KeyUsagePurpose, NameConstraints,
    SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use broker_contract::host_matches;

/// Clients with a clock this far behind still accept our certificates.
const BACKDATE: Duration = Duration::from_secs(60 * 60);
/// The CA outlives any realistic `broker serve` uptime; its key dies with the process anyway.
const CA_LIFETIME: Duration = Duration::from_secs(90 * 24 * 60 * 60);
/// Leaves are short-lived: a copied leaf is useless after a week (and it is name-bound).
const LEAF_LIFETIME: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// A cached leaf is re-minted after this long, well before it expires.
const LEAF_REFRESH: Duration = Duration::from_secs(24 * 60 * 60);
/// Bound on cached leaves: managed hosts are few, but wildcards could be asked for many names.
const LEAF_CACHE_MAX: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot create the local CA: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot use the minted key with TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("'{0}' is not a managed host; the broker only mints certificates for managed hosts")]
    NotManaged(String),
}

/// A CA whose key never leaves this process, limited to `host_patterns`.
pub struct LocalCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// One key for all leaves: minting then costs one signature, and the key is no more
    /// exposed than the CA key beside it.
    leaf_key: KeyPair,
    leaf_signing_key: Arc<dyn rustls::sign::SigningKey>,
    host_patterns: Vec<String>,
    leaves: Mutex<HashMap<String, (Instant, Arc<CertifiedKey>)>>,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("hosts", &self.host_patterns)
            .finish_non_exhaustive()
    }
}

impl LocalCa {
    /// A fresh CA permitted to issue only for `host_patterns` (exact names or `*.domain`).
    pub fn new(host_patterns: &[String], label: &str) -> Result<LocalCa, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_LIFETIME;
        params.serial_number = Some(random_serial());
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("broker local CA ({label})"));
        dn.push(DnType::OrganizationName, "broker");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.name_constraints = Some(name_constraints(host_patterns));
        let cert = params.self_signed(&key)?;

        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let leaf_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let leaf_signing_key = rustls::crypto::ring::sign::any_ecdsa_type(&leaf_der)?;
        Ok(LocalCa {
            cert,
            key,
            leaf_key,
            leaf_signing_key,
            host_patterns: host_patterns.to_vec(),
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate, PEM, for trust stores.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    pub fn host_patterns(&self) -> &[String] {
        &self.host_patterns
    }

    /// Is `host` one this CA may issue for?
    pub fn manages(&self, host: &str) -> bool {
        self.host_patterns.iter().any(|p| host_matches(p, host))
    }

    /// The leaf for `host`, from the cache or freshly minted.
    pub fn leaf_for(&self, host: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if !self.manages(&host) {
            return Err(CaError::NotManaged(host));
        }
        let mut leaves = self
            .leaves
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((minted, leaf)) = leaves.get(&host) {
            if minted.elapsed() < LEAF_REFRESH {
                return Ok(leaf.clone());
            }
        }
        let leaf = Arc::new(self.mint(&host)?);
        if leaves.len() >= LEAF_CACHE_MAX {
            leaves.clear();
        }
        leaves.insert(host, (Instant::now(), leaf.clone()));
        Ok(leaf)
    }

    fn mint(&self, host: &str) -> Result<CertifiedKey, CaError> {
        let mut params = CertificateParams::default();
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = (now + LEAF_LIFETIME).min(self.cert.params().not_after);
        params.serial_number = Some(random_serial());
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::DnsName(host.try_into()?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(&self.leaf_key, &self.cert, &self.key)?;
        Ok(CertifiedKey::new(
            vec![leaf.der().clone()],
            self.leaf_signing_key.clone(),
        ))
    }
}

/// Permit the managed names (a `*.domain` pattern permits `domain` and below) and exclude
/// every IPv4 and IPv6 address, which DNS constraints alone would leave unconstrained.
fn name_constraints(host_patterns: &[String]) -> NameConstraints {
    let mut permitted: Vec<GeneralSubtree> = Vec::new();
    for pattern in host_patterns {
        let name = pattern
            .strip_prefix("*.")
            .unwrap_or(pattern)
            .to_ascii_lowercase();
        let subtree = GeneralSubtree::DnsName(name);
        if !permitted.contains(&subtree) {
            permitted.push(subtree);
        }
    }
    NameConstraints {
        permitted_subtrees: permitted,
        excluded_subtrees: vec![
            GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
            GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
        ],
    }
}

fn random_serial() -> rcgen::SerialNumber {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    // SystemRandom only fails when the OS has no entropy source; a fixed serial is then
    // still a valid (if less unique) certificate, so fall back rather than fail.
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    bytes[0] &= 0x7f; // positive INTEGER
    rcgen::SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> LocalCa {
        LocalCa::new(&["api.openai.com".into(), "*.example.org".into()], "test").expect("ca")
    }

    #[test]
    fn mints_only_for_managed_hosts_and_caches() {
        let ca = ca();
        let a = ca.leaf_for("api.openai.com").expect("leaf");
        let b = ca.leaf_for("API.OPENAI.COM.").expect("leaf");
        assert!(Arc::ptr_eq(&a, &b), "leaf is cached per host");
        assert!(ca.leaf_for("x.example.org").is_ok());
        assert!(matches!(
            ca.leaf_for("evil.com"),
            Err(CaError::NotManaged(_))
        ));
        assert!(matches!(
            ca.leaf_for("example.org"),
            Err(CaError::NotManaged(_))
        ));
    }

    #[test]
    fn leaf_verifies_against_the_ca_and_constraints_hold() {
        use rustls::client::danger::ServerCertVerifier as _;
        let ca = ca();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der()).expect("add root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("verifier");
        let leaf = ca.leaf_for("api.openai.com").expect("leaf");
        let name = rustls_pki_types::ServerName::try_from("api.openai.com").expect("name");
        verifier
            .verify_server_cert(
                &leaf.cert[0],
                &[],
                &name,
                &[],
                rustls_pki_types::UnixTime::now(),
            )
            .expect("leaf verifies for its own name");
        let other = rustls_pki_types::ServerName::try_from("api.anthropic.com").expect("name");
        assert!(verifier
            .verify_server_cert(
                &leaf.cert[0],
                &[],
                &other,
                &[],
                rustls_pki_types::UnixTime::now()
            )
            .is_err());
    }

    #[test]
    fn ca_pem_has_name_constraints() {
        let pem = ca().cert_pem();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let nc = name_constraints(&["*.example.org".into(), "a.example.org".into()]);
        assert_eq!(nc.permitted_subtrees.len(), 2);
        assert_eq!(nc.excluded_subtrees.len(), 2);
    }
}
