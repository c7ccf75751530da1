//! Errors the broker itself makes, as responses the agent (and the person reading its logs)
//! can act on: a fixed status per kind, an `x-broker-error` header naming the source, and a
//! one-line body that says what to do. Never a secret in any of them.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::ProxyBody;
use crate::policy::RefusalKind;

/// Where the failure came from (pingora's `ErrorSource`): the agent's request, the upstream,
/// or the broker's own state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Agent,
    Upstream,
    Broker,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Agent => "agent",
            Source::Upstream => "upstream",
            Source::Broker => "broker",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerError {
    /// SNI and Host/:authority name different hosts.
    Misdirected { sni: String, host: String },
    /// The request has no Host or :authority.
    NoHost,
    /// The run was started without this provider in `--allow`.
    NotAllowed { provider: String },
    /// A system broker's policy does not give this uid the provider (`/etc/broker/config.toml`).
    NotAllowedForUid { provider: String, uid: u32 },
    /// A system broker has no credential for the provider/profile: only an admin can add one
    /// (`login`: the provider has an OAuth login, which an admin can also run).
    NoSystemCredential {
        provider: String,
        profile: String,
        login: bool,
    },
    /// A system broker refused the connection's uid (not on its access list, or not the
    /// uid that opened the run); the message says which and what to do.
    UidRefused { message: String },
    /// `--deny-unlisted`: the destination is not one of the run's providers.
    Unlisted { host: String },
    /// No credential stored for the provider/profile.
    NoCredential { provider: String, profile: String },
    /// Looking the credential up failed (vault locked, key missing, ...).
    Vault { message: String },
    /// The stored credential failed its integrity check (its vault row was changed outside
    /// broker); the message names it and says how to recover.
    Integrity { message: String },
    /// The definition in effect sends the key where the user never accepted (a provider file
    /// planted in the home, a built-in widened by an upgrade): no credential is used.
    NotAccepted { provider: String, host: String },
    /// The command that produces the credential failed.
    CredentialSource { provider: String, message: String },
    /// A login expired and could not be refreshed.
    LoginExpired { provider: String },
    /// A system broker's login expired: only an admin can log it in again.
    SystemLoginExpired { provider: String },
    /// Could not connect to the upstream.
    UpstreamUnreachable { host: String, reason: String },
    /// The upstream proxy (`upstream_proxy`, `HTTPS_PROXY`) could not be reached or refused:
    /// the reason names it, never its password.
    UpstreamProxy { host: String, reason: String },
    /// The upstream's certificate failed verification.
    UpstreamCertificate { host: String, reason: String },
    /// The upstream connection broke mid-request.
    UpstreamFailed { host: String, reason: String },
    /// The agent sent something the broker cannot forward.
    BadRequest { reason: String },
    /// A signed request (AWS SigV4) that was not signed with the placeholder credential.
    Signature { reason: String },
    /// The audit log cannot be written, so no credential is used.
    AuditUnwritable,
    /// The run (or the broker) holds as many client connections as it may
    /// (`proxy::limits`); the message says which and what to do.
    TooManyConnections { message: String },
    /// The run's policy refuses the request (rules, `require_placeholder`, a budget, a body
    /// size): the message names the rule or budget.
    Policy(crate::policy::Refusal),
    /// The request carries a real-looking key where the provider's key goes, not the
    /// placeholder: an agent should never hold one, so it is refused (the value is never
    /// repeated).
    RealKeyFromAgent { provider: String, host: String },
    /// The upstream host resolved only to addresses the broker does not connect to (loopback,
    /// private, link-local, metadata; the SSRF guard).
    UpstreamAddressRefused { host: String, reason: String },
}

impl BrokerError {
    pub fn status(&self) -> StatusCode {
        match self {
            BrokerError::Misdirected { .. } => StatusCode::MISDIRECTED_REQUEST,
            BrokerError::NoHost | BrokerError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            BrokerError::NotAllowed { .. }
            | BrokerError::NotAllowedForUid { .. }
            | BrokerError::UidRefused { .. }
            | BrokerError::Unlisted { .. }
            | BrokerError::NotAccepted { .. }
            | BrokerError::RealKeyFromAgent { .. }
            | BrokerError::Signature { .. } => StatusCode::FORBIDDEN,
            BrokerError::Policy(refusal) => match refusal.kind {
                RefusalKind::Rules
                | RefusalKind::PlaceholderRequired
                | RefusalKind::NotApproved => StatusCode::FORBIDDEN,
                RefusalKind::Budget => StatusCode::TOO_MANY_REQUESTS,
                RefusalKind::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            },
            BrokerError::UpstreamAddressRefused { .. } => StatusCode::BAD_GATEWAY,
            BrokerError::NoCredential { .. }
            | BrokerError::NoSystemCredential { .. }
            | BrokerError::LoginExpired { .. }
            | BrokerError::SystemLoginExpired { .. } => StatusCode::UNAUTHORIZED,
            BrokerError::Vault { .. } | BrokerError::Integrity { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            BrokerError::CredentialSource { .. }
            | BrokerError::AuditUnwritable
            | BrokerError::TooManyConnections { .. } => StatusCode::SERVICE_UNAVAILABLE,
            BrokerError::UpstreamUnreachable { .. }
            | BrokerError::UpstreamProxy { .. }
            | BrokerError::UpstreamCertificate { .. }
            | BrokerError::UpstreamFailed { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    pub fn source(&self) -> Source {
        match self {
            BrokerError::Misdirected { .. }
            | BrokerError::NoHost
            | BrokerError::BadRequest { .. }
            | BrokerError::Signature { .. }
            | BrokerError::NotAllowed { .. }
            | BrokerError::NotAllowedForUid { .. }
            | BrokerError::UidRefused { .. }
            | BrokerError::Unlisted { .. }
            | BrokerError::TooManyConnections { .. }
            | BrokerError::Policy(_)
            | BrokerError::RealKeyFromAgent { .. } => Source::Agent,
            BrokerError::UpstreamAddressRefused { .. } => Source::Broker,
            BrokerError::UpstreamUnreachable { .. }
            | BrokerError::UpstreamProxy { .. }
            | BrokerError::UpstreamCertificate { .. }
            | BrokerError::UpstreamFailed { .. } => Source::Upstream,
            BrokerError::NoCredential { .. }
            | BrokerError::NoSystemCredential { .. }
            | BrokerError::NotAccepted { .. }
            | BrokerError::Vault { .. }
            | BrokerError::Integrity { .. }
            | BrokerError::CredentialSource { .. }
            | BrokerError::LoginExpired { .. }
            | BrokerError::SystemLoginExpired { .. }
            | BrokerError::AuditUnwritable => Source::Broker,
        }
    }

    /// The one line that tells the user what happened and what to do.
    pub fn message(&self) -> String {
        match self {
            BrokerError::Misdirected { sni, host } => format!(
                "TLS server name '{sni}' does not match Host '{host}': the request was refused"
            ),
            BrokerError::NoHost => "request has no Host or :authority".to_string(),
            BrokerError::NotAllowed { provider } => format!(
                "provider '{provider}' is not allowed in this run: add it with --allow {provider}"
            ),
            BrokerError::NotAllowedForUid { provider, uid } => format!(
                "provider '{provider}' is not allowed for uid {uid} by the system broker's policy: an administrator can allow it in [[policy]] in /etc/broker/config.toml"
            ),
            BrokerError::NoSystemCredential {
                provider,
                profile,
                login,
            } => {
                let (which, flag) = if profile == "default" {
                    (String::new(), String::new())
                } else {
                    (format!(" (profile {profile})"), format!(" --profile {profile}"))
                };
                if *login {
                    format!(
                        "no credential for {provider}{which} in the system broker: an administrator runs 'broker login {provider}{flag} --system' (or 'broker add {provider}{flag} --system' with a key)"
                    )
                } else {
                    format!(
                        "no credential for {provider}{which} in the system broker: an administrator runs 'broker add {provider}{flag} --system'"
                    )
                }
            }
            BrokerError::UidRefused { message } => message.clone(),
            BrokerError::Unlisted { host } => format!(
                "connections to {host} are refused: this run only reaches its providers (--deny-unlisted)"
            ),
            BrokerError::NoCredential { provider, profile } if profile == "default" => {
                format!("no credential for {provider}: run 'broker add {provider}'")
            }
            BrokerError::NoCredential { provider, profile } => format!(
                "no credential for {provider} (profile {profile}): run 'broker add {provider} --profile {profile}'"
            ),
            BrokerError::Vault { message } => {
                format!("cannot read the vault: {message}; run 'broker doctor'")
            }
            BrokerError::Integrity { message } | BrokerError::TooManyConnections { message } => {
                message.clone()
            }
            BrokerError::NotAccepted { provider, host } => format!(
                "the definition of provider {provider} in effect sends its key to {host}, which you have not accepted (a file in $BROKER_HOME/providers, or a changed built-in): no key was sent; review and accept it with 'broker providers trust {provider}'"
            ),
            BrokerError::CredentialSource { provider, message } => {
                format!("cannot get the {provider} key: {message}")
            }
            BrokerError::LoginExpired { provider } => {
                format!("login expired: run 'broker login {provider}'")
            }
            BrokerError::SystemLoginExpired { provider } => format!(
                "the system broker's login to {provider} expired: an administrator runs 'broker login {provider} --system'"
            ),
            BrokerError::UpstreamUnreachable { host, reason } => {
                format!("cannot reach upstream {host}: {reason}")
            }
            BrokerError::UpstreamProxy { host, reason } => {
                format!("cannot reach upstream {host}: {reason}; nothing was sent")
            }
            BrokerError::UpstreamCertificate { host, reason } => format!(
                "upstream {host} presented a certificate that failed verification ({reason}); the request was not sent"
            ),
            BrokerError::UpstreamFailed { host, reason } => {
                format!("upstream {host} failed: {reason}")
            }
            BrokerError::BadRequest { reason } => format!("bad request: {reason}"),
            BrokerError::Policy(refusal) => refusal.message.clone(),
            BrokerError::RealKeyFromAgent { provider, host } => format!(
                "the request to {host} carries a real {provider} key where the broker puts the key, not the placeholder: refused, since an agent should never hold one (give the agent the placeholder; store the key with 'broker add {provider}')"
            ),
            BrokerError::UpstreamAddressRefused { host, reason } => format!(
                "upstream {host} resolves to {reason}, where the broker does not send requests (SSRF guard): for an internal API set private_addresses = true in its provider file, or pin the address with --resolve; nothing was sent"
            ),
            BrokerError::Signature { reason } => format!("refused: {reason}"),
            BrokerError::AuditUnwritable => "the audit log cannot be written (a full disk?), and the broker uses no credential it cannot audit: see broker serve's log, free space, and the request can be sent again".to_string(),
        }
    }

    /// The response sent to the agent.
    pub fn into_response(self) -> Response<ProxyBody> {
        let message = self.message();
        let body = Full::new(Bytes::from(format!("broker: {message}\n")))
            .map_err(|never| match never {})
            .boxed();
        let mut response = Response::new(body);
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            "x-broker-error",
            HeaderValue::from_str(&message)
                .unwrap_or_else(|_| HeaderValue::from_static("broker error")),
        );
        headers.insert(
            "x-broker-error-source",
            HeaderValue::from_static(self.source().as_str()),
        );
        headers.insert(
            "content-type",
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }
}

impl std::fmt::Display for BrokerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_carry_header_status_and_advice() {
        let r = BrokerError::NoCredential {
            provider: "openai".into(),
            profile: "default".into(),
        }
        .into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let h = r.headers()["x-broker-error"].to_str().expect("ascii");
        assert_eq!(h, "no credential for openai: run 'broker add openai'");
        assert_eq!(r.headers()["x-broker-error-source"], "broker");
        let r = BrokerError::LoginExpired {
            provider: "github".into(),
        }
        .into_response();
        assert_eq!(
            r.headers()["x-broker-error"],
            "login expired: run 'broker login github'"
        );
    }
}
