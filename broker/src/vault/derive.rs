//! Keys derived from the data key, for data that must be authenticated by the vault's key but
//! is not a sealed secret (the audit log's MAC chain and the head the vault keeps of it).
//!
//! HKDF-SHA256 (RFC 5869): the data key is extracted once at unlock, and each use expands it
//! under its own label, so no derived key can stand in for another or for the data key.
//! Forging anything MACed under a derived key needs the data key, so the master key.

use ring::{hkdf, hmac};

use super::crypto::KEY_LEN;
use super::Vault;

/// HKDF salt: fixed, it only separates these keys from any other use of the data key.
const SALT: &[u8] = b"broker-vault-v1\0derived-keys";

/// The pseudo-random key extracted from the data key. Not the data key's bytes.
pub(super) struct Derivation(hkdf::Prk);

impl Derivation {
    pub(super) fn new(data_key: &[u8; KEY_LEN]) -> Derivation {
        Derivation(hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(data_key))
    }

    pub(super) fn hmac_key(&self, label: &str) -> hmac::Key {
        let info = [label.as_bytes()];
        // HKDF-SHA256 can expand up to 255 * 32 bytes; an HMAC-SHA256 key is 32.
        let okm = self
            .0
            .expand(&info, hmac::HMAC_SHA256)
            .expect("32 bytes are within HKDF-SHA256's limit");
        hmac::Key::from(okm)
    }
}

impl std::fmt::Debug for Derivation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Derivation(***)")
    }
}

impl Vault {
    /// An HMAC-SHA256 key derived from the data key under `label` (e.g. `"broker audit v2"`).
    /// The same vault gives the same key for the same label, across processes and rekeys
    /// (a rekey keeps the data key).
    pub fn derived_key(&self, label: &str) -> hmac::Key {
        self.derive.hmac_key(label)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tag(d: &Derivation, label: &str) -> Vec<u8> {
        hmac::sign(&d.hmac_key(label), b"message").as_ref().to_vec()
    }

    #[test]
    fn labels_and_data_keys_give_different_keys() {
        let a = Derivation::new(&[1; KEY_LEN]);
        let b = Derivation::new(&[2; KEY_LEN]);
        assert_eq!(
            tag(&a, "broker audit v2"),
            tag(&Derivation::new(&[1; KEY_LEN]), "broker audit v2"),
            "deterministic"
        );
        assert_ne!(tag(&a, "broker audit v2"), tag(&a, "broker audit head v2"));
        assert_ne!(tag(&a, "broker audit v2"), tag(&b, "broker audit v2"));
    }
}
