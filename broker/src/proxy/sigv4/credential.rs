//! An AWS credential as the vault keeps it: one sealed secret holding the access key id, the
//! secret access key and, for temporary credentials, the session token, as JSON. One row
//! keeps the three together (a key id never pairs with another credential's secret), and
//! the vault's row format stays the same for every provider.

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize as _, Zeroizing};

#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AwsCredential {
    pub access_key_id: String,
    pub secret_access_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_token: Option<String>,
    /// A role the broker assumes with this credential (STS `AssumeRole`); requests are then
    /// signed with the role's short-lived credentials (`assume`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
}

impl Drop for AwsCredential {
    fn drop(&mut self) {
        self.secret_access_key.zeroize();
        if let Some(token) = &mut self.session_token {
            token.zeroize();
        }
    }
}

impl std::fmt::Debug for AwsCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsCredential")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialError {
    #[error("the stored AWS credential is not in the broker's format; add it again with 'broker add aws'")]
    Format,
    #[error("the access key id does not look like one (AKIA or ASIA and 16 more upper-case letters or digits)")]
    KeyId,
    #[error("the secret access key must be 40 characters of letters, digits, '/' and '+'")]
    Secret,
    #[error("the session token contains characters that cannot be sent in an HTTP header")]
    Token,
    #[error("the role ARN must look like arn:aws:iam::123456789012:role/NAME")]
    RoleArn,
}

impl AwsCredential {
    /// Checked parts: what `broker add aws` stores.
    pub fn new(
        access_key_id: &str,
        secret_access_key: &str,
        session_token: Option<&str>,
    ) -> Result<AwsCredential, CredentialError> {
        let credential = AwsCredential {
            access_key_id: access_key_id.trim().to_string(),
            secret_access_key: secret_access_key.trim().to_string(),
            session_token: session_token
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_string),
            role_arn: None,
        };
        credential.check()?;
        Ok(credential)
    }

    fn check(&self) -> Result<(), CredentialError> {
        if !looks_like_key_id(&self.access_key_id) {
            return Err(CredentialError::KeyId);
        }
        let secret_ok = self.secret_access_key.len() == 40
            && self
                .secret_access_key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'/' || b == b'+');
        if !secret_ok {
            return Err(CredentialError::Secret);
        }
        if let Some(token) = &self.session_token {
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(CredentialError::Token);
            }
        }
        if let Some(arn) = &self.role_arn {
            if !looks_like_role_arn(arn) {
                return Err(CredentialError::RoleArn);
            }
        }
        Ok(())
    }

    /// This credential, used to assume `role_arn`.
    pub fn with_role_arn(mut self, role_arn: &str) -> Result<AwsCredential, CredentialError> {
        self.role_arn = Some(role_arn.trim().to_string());
        self.check()?;
        Ok(self)
    }

    /// The vault's form.
    pub fn encode(&self) -> Zeroizing<String> {
        // Serializing plain strings cannot fail.
        Zeroizing::new(serde_json::to_string(self).unwrap_or_default())
    }

    pub fn decode(stored: &str) -> Result<AwsCredential, CredentialError> {
        let credential: AwsCredential =
            serde_json::from_str(stored).map_err(|_| CredentialError::Format)?;
        credential.check().map_err(|_| CredentialError::Format)?;
        Ok(credential)
    }
}

/// An IAM access key id: `AKIA` (long-term) or `ASIA` (temporary) and 16 upper-case
/// letters or digits.
pub fn looks_like_key_id(id: &str) -> bool {
    id.len() == 20
        && (id.starts_with("AKIA") || id.starts_with("ASIA"))
        && id[4..]
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// `arn:<partition>:iam::<12 digits>:role/<path and name>`.
fn looks_like_role_arn(arn: &str) -> bool {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let ["arn", partition, "iam", "", account, resource] = parts[..] else {
        return false;
    };
    partition.starts_with("aws")
        && account.len() == 12
        && account.bytes().all(|b| b.is_ascii_digit())
        && resource.strip_prefix("role/").is_some_and(|name| {
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-/".contains(&b))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "AKIAIOSFODNN7EXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

    #[test]
    fn round_trip_and_checks() {
        let c = AwsCredential::new(ID, SECRET, Some("tok en")).expect_err("an error");
        assert_eq!(c, CredentialError::Token);
        let c = AwsCredential::new(ID, SECRET, Some("token")).expect("valid");
        assert_eq!(AwsCredential::decode(&c.encode()).expect("decode"), c);
        let c = AwsCredential::new(ID, SECRET, Some("")).expect("valid");
        assert_eq!(c.session_token, None);
        assert_eq!(
            AwsCredential::new("AKIA123", SECRET, None),
            Err(CredentialError::KeyId)
        );
        assert_eq!(
            AwsCredential::new(ID, "short", None),
            Err(CredentialError::Secret)
        );
        assert_eq!(
            AwsCredential::decode("sk-not-json"),
            Err(CredentialError::Format)
        );
    }

    #[test]
    fn role_arns_are_checked() {
        let c = AwsCredential::new(ID, SECRET, None).expect("valid");
        let with = c
            .clone()
            .with_role_arn("arn:aws:iam::123456789012:role/agent-role")
            .expect("arn");
        assert_eq!(AwsCredential::decode(&with.encode()).expect("decode"), with);
        assert!(c
            .clone()
            .with_role_arn("arn:aws-us-gov:iam::123456789012:role/a/b")
            .is_ok());
        for bad in [
            "role/x",
            "arn:aws:iam::123:role/x",
            "arn:aws:iam::123456789012:user/x",
            "arn:aws:iam::123456789012:role/",
        ] {
            assert_eq!(
                c.clone().with_role_arn(bad),
                Err(CredentialError::RoleArn),
                "{bad}"
            );
        }
    }

    #[test]
    fn debug_output_hides_the_secret() {
        let c = AwsCredential::new(ID, SECRET, Some("token-value")).expect("valid");
        let shown = format!("{c:?}");
        assert!(!shown.contains(SECRET) && !shown.contains("token-value"));
    }
}
