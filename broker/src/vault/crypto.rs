//! Sealing: AES-256-GCM (ring) with a random 96-bit nonce per blob.
//!
//! Blob layout: `version (1 byte) || nonce (12 bytes) || ciphertext || tag (16 bytes)`.
//! Random nonces are safe here: a vault seals at most a few thousand blobs under one key, far
//! below the 2^32 messages after which random 96-bit nonces start to risk a collision.
//!
//! Every blob is bound to its whole row by its AAD (see [`row_aad`]): a blob copied into another
//! row, or a row whose kind, metadata, expiry or times were edited, fails to open instead of
//! handing a key to another provider, endpoint or command.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// Length of the data key and of every master key.
pub const KEY_LEN: usize = 32;

const BLOB_VERSION: u8 = 1;
const TAG_LEN: usize = 16;

/// AAD of the wrapped data key in a vault of row format 1 (before whole-row authentication):
/// only ever opened, to migrate such a vault.
pub const DATA_KEY_AAD_V1: &[u8] = b"broker-vault-v1\0data-key";

/// AAD of the wrapped data key: it can only ever be opened as a data key, and which of the two
/// AADs opens it is the vault's row format, authenticated by the master key (an attacker
/// without it cannot turn a vault back to format 1 to have its rows accepted unbound).
pub const DATA_KEY_AAD: &[u8] = b"broker-vault-v2\0data-key";

/// How the credential rows of a vault are sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowFormat {
    /// Schema 3 and before: each blob bound to (provider, profile, field) only
    /// ([`credential_aad_v1`]). Opened only to migrate.
    V1,
    /// Each blob bound to its whole row ([`row_aad`]).
    V2,
}

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

impl Field {
    fn as_str(self) -> &'static str {
        match self {
            Field::Secret => "secret",
            Field::Refresh => "refresh",
            Field::ClientSecret => "client_secret",
        }
    }
}

/// Format 1's AAD, binding a blob to `(provider, profile, field)` only. Length-prefixed, so no
/// two different triples give the same bytes. Used to open rows for the migration only.
pub fn credential_aad_v1(provider: &str, profile: &str, field: Field) -> Vec<u8> {
    let mut aad = b"broker-vault-v1\0credential".to_vec();
    for part in [provider, profile, field.as_str()] {
        push_part(&mut aad, part.as_bytes());
    }
    aad
}

/// Everything in a credential row but its sealed blobs: what decides how and where the
/// secret is used (kind; metadata with endpoints, client id, grant, TTL; expiry) and the rest
/// of the row (times, which optional blobs it holds), all bound into each blob's AAD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowBinding<'a> {
    pub provider: &'a str,
    pub profile: &'a str,
    /// As stored (`api_key`, `oauth2`, `command`).
    pub kind: &'a str,
    /// As stored, byte for byte.
    pub metadata: &'a str,
    pub expires_at: Option<&'a str>,
    pub created_at: &'a str,
    pub updated_at: &'a str,
    pub has_refresh: bool,
    pub has_client_secret: bool,
}

/// AAD binding a blob to its field and its whole row ([`RowBinding`]), format 2. A canonical
/// encoding: a versioned label, then every part length-prefixed (an absent expiry is a tag
/// byte apart from any string), so no two different rows give the same bytes.
pub fn row_aad(row: &RowBinding<'_>, field: Field) -> Vec<u8> {
    let mut aad = b"broker-vault-v2\0row".to_vec();
    for part in [
        row.provider,
        row.profile,
        field.as_str(),
        row.kind,
        row.metadata,
    ] {
        push_part(&mut aad, part.as_bytes());
    }
    match row.expires_at {
        None => aad.push(0),
        Some(t) => {
            aad.push(1);
            push_part(&mut aad, t.as_bytes());
        }
    }
    for part in [row.created_at, row.updated_at] {
        push_part(&mut aad, part.as_bytes());
    }
    aad.push(u8::from(row.has_refresh));
    aad.push(u8::from(row.has_client_secret));
    aad
}

fn push_part(aad: &mut Vec<u8>, part: &[u8]) {
    // Every part is far below 4 GiB (names are checked, secrets and metadata are small).
    aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
    aad.extend_from_slice(part);
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

    fn row() -> RowBinding<'static> {
        RowBinding {
            provider: "openai",
            profile: "default",
            kind: "api_key",
            metadata: "{}",
            expires_at: None,
            created_at: "2026-01-01T00:00:00Z",
            updated_at: "2026-01-01T00:00:00Z",
            has_refresh: false,
            has_client_secret: false,
        }
    }

    #[test]
    fn seal_open_round_trip() {
        let k = key(1);
        let aad = row_aad(&row(), Field::Secret);
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
    fn aad_binds_blob_to_its_whole_row() {
        let k = key(1);
        let blob = k.seal(b"secret", &row_aad(&row(), Field::Secret)).unwrap();
        assert!(k.open(&blob, &row_aad(&row(), Field::Secret)).is_ok());
        let edits: Vec<RowBinding<'static>> = vec![
            RowBinding {
                provider: "github",
                ..row()
            },
            RowBinding {
                profile: "work",
                ..row()
            },
            // Length prefixes keep ("ab","c") apart from ("a","bc").
            RowBinding {
                provider: "openaid",
                profile: "efault",
                ..row()
            },
            RowBinding {
                kind: "command",
                ..row()
            },
            RowBinding {
                metadata: r#"{"ttl_secs":1}"#,
                ..row()
            },
            RowBinding {
                metadata: "{} ",
                ..row()
            },
            RowBinding {
                expires_at: Some(""),
                ..row()
            },
            RowBinding {
                expires_at: Some("2000-01-01T00:00:00Z"),
                ..row()
            },
            RowBinding {
                created_at: "2026-01-01T00:00:01Z",
                ..row()
            },
            RowBinding {
                updated_at: "2026-01-01T00:00:01Z",
                ..row()
            },
            RowBinding {
                has_refresh: true,
                ..row()
            },
            RowBinding {
                has_client_secret: true,
                ..row()
            },
        ];
        for other in &edits {
            assert_eq!(
                k.open(&blob, &row_aad(other, Field::Secret)),
                Err(CryptoError),
                "{other:?}"
            );
        }
        assert_eq!(
            k.open(&blob, &row_aad(&row(), Field::Refresh)),
            Err(CryptoError)
        );
        // Format 1's AAD of the same row is another AAD.
        assert_eq!(
            k.open(
                &blob,
                &credential_aad_v1("openai", "default", Field::Secret)
            ),
            Err(CryptoError)
        );
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
