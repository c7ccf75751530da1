//! Sealing: AES-256-GCM (ring) with a random 96-bit nonce per blob.
//!
//! Blob layout: `version (1 byte) || nonce (12 bytes) || ciphertext || tag (16 bytes)`.
//! Random nonces are safe here: a vault seals at most a few thousand blobs under one key, far
//! below the 2^32 messages after which random 96-bit nonces start to risk a collision.
//!
//! Every blob is bound to where it lives by its AAD (see [`credential_aad`]): a blob copied
//! into another row fails to open instead of handing one provider's key to another.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// Length of the data key and of every master key.
pub const KEY_LEN: usize = 32;

const BLOB_VERSION: u8 = 1;
const TAG_LEN: usize = 16;

/// AAD of the wrapped data key: it can only ever be opened as a data key.
pub const DATA_KEY_AAD: &[u8] = b"broker-vault-v1\0data-key";

/// Which secret of a credential row a blob holds.
#[derive(Debug, Clone, Copy)]
pub enum Field {
    /// The API key or OAuth access token.
    Secret,
    /// The OAuth refresh token (sealed separately, so it can be rotated on its own).
    Refresh,
    /// A confidential OAuth client's secret (`broker login` with client_auth basic/post).
    ClientSecret,
}

/// AAD binding a blob to `(provider, profile, field)`. Length-prefixed, so no two different
/// triples give the same bytes.
pub fn credential_aad(provider: &str, profile: &str, field: Field) -> Vec<u8> {
    let field = match field {
        Field::Secret => "secret",
        Field::Refresh => "refresh",
        Field::ClientSecret => "client_secret",
    };
    let mut aad = b"broker-vault-v1\0credential".to_vec();
    for part in [provider, profile, field] {
        aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
        aad.extend_from_slice(part.as_bytes());
    }
    aad
}

/// A symmetric key that seals and opens blobs. The raw bytes are not kept: ring holds the
/// expanded key schedule.
pub struct SealingKey {
    key: LessSafeKey,
}

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealingKey(***)")
    }
}

/// Sealing or opening failed. Deliberately carries no detail: AEAD failures do not say why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CryptoError;

impl SealingKey {
    pub fn new(bytes: &[u8; KEY_LEN]) -> SealingKey {
        // AES_256_GCM takes exactly 32 bytes, which the array type guarantees.
        let unbound = UnboundKey::new(&AES_256_GCM, bytes).expect("32-byte AES-256 key");
        SealingKey {
            key: LessSafeKey::new(unbound),
        }
    }

    /// Encrypt `plaintext` with a fresh random nonce.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| CryptoError)?;
        let mut blob = Vec::with_capacity(1 + NONCE_LEN + plaintext.len() + TAG_LEN);
        blob.push(BLOB_VERSION);
        blob.extend_from_slice(&nonce);
        // Encrypt in place inside the blob so no second plaintext copy is made.
        let mut body = blob.split_off(1 + NONCE_LEN);
        body.extend_from_slice(plaintext);
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut body,
            )
            .map_err(|_| CryptoError)?;
        blob.extend_from_slice(&body);
        Ok(blob)
    }

    /// Decrypt a blob made by [`SealingKey::seal`] with the same AAD.
    pub fn open(&self, blob: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if blob.len() < 1 + NONCE_LEN + TAG_LEN || blob[0] != BLOB_VERSION {
            return Err(CryptoError);
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&blob[1..1 + NONCE_LEN]);
        let mut buf = Zeroizing::new(blob[1 + NONCE_LEN..].to_vec());
        let len = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| CryptoError)?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

/// 32 random bytes from the OS.
pub fn random_key() -> Result<Zeroizing<[u8; KEY_LEN]>, CryptoError> {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    SystemRandom::new()
        .fill(key.as_mut())
        .map_err(|_| CryptoError)?;
    Ok(key)
}

/// Random bytes (salts).
pub fn random_bytes<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| CryptoError)?;
    Ok(out)
}

/// Argon2id cost parameters, stored next to the salt so they can be raised later without
/// breaking existing vaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

impl KdfParams {
    /// OWASP's recommended Argon2id minimum (19 MiB, 2 passes, 1 lane): tens of milliseconds
    /// per unlock, paid once per process.
    pub const DEFAULT: KdfParams = KdfParams {
        m_cost: 19 * 1024,
        t_cost: 2,
        p_cost: 1,
    };
}

/// Derive a master key from a passphrase with Argon2id.
pub fn derive_from_passphrase(
    passphrase: &[u8],
    salt: &[u8],
    params: KdfParams,
) -> Result<Zeroizing<[u8; KEY_LEN]>, String> {
    let params = argon2::Params::new(params.m_cost, params.t_cost, params.p_cost, Some(KEY_LEN))
        .map_err(|e| format!("invalid Argon2 parameters: {e}"))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    argon
        .hash_password_into(passphrase, salt, key.as_mut())
        .map_err(|e| format!("Argon2id failed: {e}"))?;
    Ok(key)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SealingKey {
        SealingKey::new(&[byte; KEY_LEN])
    }

    #[test]
    fn seal_open_round_trip() {
        let k = key(1);
        let aad = credential_aad("openai", "default", Field::Secret);
        let blob = k.seal(b"sk-test-not-a-real-key", &aad).unwrap();
        assert!(
            !blob.windows(4).any(|w| w == b"test"),
            "ciphertext must not contain plaintext"
        );
        assert_eq!(&k.open(&blob, &aad).unwrap()[..], b"sk-test-not-a-real-key");
    }

    #[test]
    fn nonces_differ_between_seals() {
        let k = key(1);
        assert_ne!(
            k.seal(b"same", b"a").unwrap(),
            k.seal(b"same", b"a").unwrap()
        );
    }

    #[test]
    fn wrong_key_fails() {
        let blob = key(1).seal(b"secret", b"aad").unwrap();
        assert_eq!(key(2).open(&blob, b"aad"), Err(CryptoError));
    }

    #[test]
    fn aad_binds_blob_to_its_row() {
        let k = key(1);
        let blob = k
            .seal(
                b"secret",
                &credential_aad("openai", "default", Field::Secret),
            )
            .unwrap();
        for other in [
            credential_aad("github", "default", Field::Secret),
            credential_aad("openai", "work", Field::Secret),
            credential_aad("openai", "default", Field::Refresh),
            // Length prefixes keep ("ab","c") apart from ("a","bc").
            credential_aad("openaid", "efault", Field::Secret),
        ] {
            assert_eq!(k.open(&blob, &other), Err(CryptoError));
        }
    }

    #[test]
    fn tampered_blob_fails() {
        let k = key(1);
        let mut blob = k.seal(b"secret", b"aad").unwrap();
        let last = blob.len() - 1;
        blob[last] ^= 1;
        assert_eq!(k.open(&blob, b"aad"), Err(CryptoError));
        assert_eq!(k.open(&blob[..5], b"aad"), Err(CryptoError));
    }

    #[test]
    fn passphrase_derivation_is_deterministic_per_salt() {
        let p = KdfParams {
            m_cost: 64,
            t_cost: 1,
            p_cost: 1,
        };
        let a = derive_from_passphrase(b"pw", b"saltsaltsaltsalt", p).unwrap();
        let b = derive_from_passphrase(b"pw", b"saltsaltsaltsalt", p).unwrap();
        let c = derive_from_passphrase(b"pw", b"othersaltothersa", p).unwrap();
        assert_eq!(*a, *b);
        assert_ne!(*a, *c);
    }
}
