//! `broker add aws --role-arn`: the stored credential is only used to call STS `AssumeRole`,
//! and requests are signed with the short-lived credentials it returns. Those are kept in the
//! broker's memory (never written anywhere) and fetched again [`REFRESH_BEFORE`] their expiry,
//! one call at a time per credential (a request that finds them expiring waits for the one
//! call in flight instead of starting its own), as OAuth access tokens are refreshed before
//! they expire (`oauth::refresh`). Each `AssumeRole` is audited as a `refresh`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt as _, Full};

use super::credential::AwsCredential;
use super::signer::{self, Scope, ALGORITHM};
use crate::proxy::error::BrokerError;
use crate::proxy::Proxy;

/// The global STS endpoint (its scope is us-east-1), for roles of the commercial partition.
pub const STS_HOST: &str = "sts.amazonaws.com";

/// Where a role is assumed, and the region the call is signed for, by the partition its ARN
/// names: GovCloud and China have no global endpoint, and their credentials are valid only
/// in their own partition. Other partitions (the isolated regions) get the global endpoint,
/// which refuses them with an error the user reads.
pub fn sts_endpoint(role_arn: &str) -> (&'static str, &'static str) {
    match role_arn.split(':').nth(1) {
        Some("aws-us-gov") => ("sts.us-gov-west-1.amazonaws.com", "us-gov-west-1"),
        Some("aws-cn") => ("sts.cn-north-1.amazonaws.com.cn", "cn-north-1"),
        _ => (STS_HOST, "us-east-1"),
    }
}
/// How long the role's credentials are asked for (STS's default; a role's maximum is at
/// least this).
const DURATION_SECS: u64 = 3600;
/// Fetch new credentials this long before the current ones expire: a request signed just
/// before still has minutes to reach AWS.
pub const REFRESH_BEFORE: Duration = Duration::from_secs(300);
/// Largest STS answer read.
const MAX_ANSWER: usize = 64 * 1024;

/// The role credentials of each stored credential, by `(provider, profile, role)`.
#[derive(Default)]
pub struct RoleCache {
    slots: std::sync::Mutex<HashMap<RoleKey, Slot>>,
}

/// `(provider, profile, role ARN)`.
type RoleKey = (String, String, String);
/// The credentials held for one role, locked while they are fetched.
type Slot = Arc<tokio::sync::Mutex<Option<Held>>>;

struct Held {
    credential: AwsCredential,
    /// The base credential they were made from: a `broker add aws` in between starts over.
    base_key_id: String,
    refresh_at: Instant,
}

impl RoleCache {
    fn slot(&self, key: RoleKey) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(key).or_default().clone()
    }
}

/// Credentials for `role_arn` assumed with `base`: the held ones while fresh, else new ones
/// from STS.
pub async fn role_credential(
    proxy: &Proxy,
    provider: &str,
    profile: &str,
    base: &AwsCredential,
    role_arn: &str,
) -> Result<AwsCredential, BrokerError> {
    let slot = proxy
        .aws_roles
        .slot((provider.into(), profile.into(), role_arn.into()));
    let mut held = slot.lock().await;
    if let Some(h) = held.as_ref() {
        if h.base_key_id == base.access_key_id && Instant::now() < h.refresh_at {
            return Ok(h.credential.clone());
        }
    }
    let (credential, lifetime) = assume(proxy, base, role_arn, profile).await?;
    let margin = REFRESH_BEFORE.min(lifetime / 2);
    *held = Some(Held {
        credential: credential.clone(),
        base_key_id: base.access_key_id.clone(),
        refresh_at: Instant::now() + lifetime.saturating_sub(margin),
    });
    proxy.audit.record(crate::audit::AuditEvent {
        provider: Some(provider.into()),
        profile: Some(profile.into()),
        host: Some(sts_endpoint(role_arn).0.into()),
        reason: Some(format!("AssumeRole {role_arn}")),
        ..crate::audit::AuditEvent::new(crate::audit::EventKind::Refresh)
    });
    Ok(credential)
}

/// One `AssumeRole` call: the new credentials and how long they last.
async fn assume(
    proxy: &Proxy,
    base: &AwsCredential,
    role_arn: &str,
    profile: &str,
) -> Result<(AwsCredential, Duration), BrokerError> {
    let failed = |reason: String| BrokerError::CredentialSource {
        provider: "aws".into(),
        message: format!("STS AssumeRole of {role_arn} failed: {reason}"),
    };
    let session = format!("broker-{}", session_safe(profile));
    let body = format!(
        "Action=AssumeRole&Version=2011-06-15&DurationSeconds={DURATION_SECS}&RoleArn={}&RoleSessionName={}",
        signer::uri_encode(role_arn.as_bytes(), false),
        signer::uri_encode(session.as_bytes(), false),
    );
    let now = time::OffsetDateTime::now_utc();
    let amz_date = format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    );
    let (sts_host, region) = sts_endpoint(role_arn);
    let scope = Scope {
        date: amz_date[..8].to_string(),
        region: region.into(),
        service: "sts".into(),
    };
    let content_type = "application/x-www-form-urlencoded; charset=utf-8";
    let mut headers = vec![
        ("content-type".to_string(), content_type.to_string()),
        ("host".to_string(), sts_host.to_string()),
        ("x-amz-date".to_string(), amz_date.clone()),
    ];
    if let Some(token) = &base.session_token {
        headers.push(("x-amz-security-token".to_string(), token.clone()));
    }
    let payload = crate::hex::sha256(body.as_bytes());
    let canonical = signer::canonical_request("POST", "/", "", &headers, &payload);
    let key = signer::signing_key(&base.secret_access_key, &scope);
    let signature = signer::signature(&key, &signer::string_to_sign(&amz_date, &scope, &canonical));
    let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
    let authorization = zeroize::Zeroizing::new(format!(
        "{ALGORITHM} Credential={}/{}, SignedHeaders={}, Signature={signature}",
        base.access_key_id,
        scope.render(),
        names.join(";")
    ));
    let mut builder = Request::builder().method(Method::POST).uri("/");
    for (name, value) in headers.iter().filter(|(n, _)| n != "host") {
        builder = builder.header(name.as_str(), value.as_str());
    }
    let request = builder
        .header("authorization", authorization.as_str())
        .body(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        )
        .map_err(|e| failed(e.to_string()))?;
    let response = proxy
        .pool
        .send(sts_host, 443, request)
        .await
        .map_err(|e| failed(crate::proxy::handler::upstream_error(sts_host, e).message()))?;
    let status = response.status();
    let answer = super::read_bounded(response.into_body(), MAX_ANSWER)
        .await
        .map_err(|e| {
            failed(match e {
                super::ReadError::TooLarge => "an answer of more than 64 KiB".into(),
                super::ReadError::Body(e) => format!("reading the answer: {e}"),
            })
        })?;
    let text = String::from_utf8_lossy(&answer);
    if !status.is_success() {
        let code = tag(&text, "Code").unwrap_or_default();
        return Err(failed(format!("STS answered {status} {code}")));
    }
    let field =
        |name: &str| tag(&text, name).ok_or_else(|| failed(format!("no {name} in STS's answer")));
    let credential = AwsCredential::new(
        &field("AccessKeyId")?,
        &field("SecretAccessKey")?,
        Some(&field("SessionToken")?),
    )
    .map_err(|e| failed(e.to_string()))?;
    let expiration = field("Expiration")?;
    let expires =
        time::OffsetDateTime::parse(&expiration, &time::format_description::well_known::Rfc3339)
            .map_err(|_| failed("an Expiration that is not a date".into()))?;
    let lifetime = Duration::try_from(expires - now).unwrap_or(Duration::ZERO);
    Ok((credential, lifetime))
}

/// The text of the first `<name>...</name>` element (STS answers are small, flat XML).
fn tag(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{name}>"))? + start;
    Some(xml[start..end].trim().to_string())
}

/// A role session name holds `[\w+=,.@-]`, at most 64 characters.
fn session_safe(profile: &str) -> String {
    profile
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "+=,.@-_".contains(*c))
        .take(56)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sts_answers_are_read_by_tag() {
        let xml = "<AssumeRoleResponse><AssumeRoleResult><Credentials><AccessKeyId>ASIAXXXXXXXXXXXXXXXX</AccessKeyId>\n<Expiration>2026-12-04T12:00:00Z</Expiration></Credentials></AssumeRoleResult></AssumeRoleResponse>";
        assert_eq!(
            tag(xml, "AccessKeyId").as_deref(),
            Some("ASIAXXXXXXXXXXXXXXXX")
        );
        assert_eq!(
            tag(xml, "Expiration").as_deref(),
            Some("2026-12-04T12:00:00Z")
        );
        assert_eq!(tag(xml, "SessionToken"), None);
        assert_eq!(tag("<Code>AccessDenied", "Code"), None);
    }

    #[test]
    fn roles_are_assumed_in_their_own_partition() {
        assert_eq!(
            sts_endpoint("arn:aws:iam::123456789012:role/agent"),
            ("sts.amazonaws.com", "us-east-1")
        );
        assert_eq!(
            sts_endpoint("arn:aws-us-gov:iam::123456789012:role/a/b"),
            ("sts.us-gov-west-1.amazonaws.com", "us-gov-west-1")
        );
        assert_eq!(
            sts_endpoint("arn:aws-cn:iam::123456789012:role/agent"),
            ("sts.cn-north-1.amazonaws.com.cn", "cn-north-1")
        );
        // Each endpoint is one the built-in catalog manages.
        let catalog = crate::providers::Catalog::builtin();
        for arn in ["arn:aws:", "arn:aws-us-gov:", "arn:aws-cn:"] {
            let (host, _) = sts_endpoint(&format!("{arn}iam::123456789012:role/x"));
            let (provider, _) = catalog.route_for_host(host).expect(host);
            assert_eq!(provider.name, "aws", "{host}");
        }
    }

    #[test]
    fn session_names_keep_only_what_sts_allows() {
        assert_eq!(session_safe("work profile/1"), "workprofile1");
        assert_eq!(session_safe(&"x".repeat(100)).len(), 56);
    }
}
