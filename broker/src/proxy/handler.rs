//! One request through the pipeline: classify -> look up credential -> swap -> forward ->
//! respond -> audit. See the module docs of `proxy` for the order and the reasons; upgrades
//! are bridged in `upgrade`, the audit record is in `record`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Method, Request, Response, Uri};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use super::decode::{self, Encoded};
use super::error::BrokerError;
use super::pool::SendError;
use super::record::{event, AuditedBody, Pending};
use super::upgrade::bridge_upgrade;
use super::upstream::ConnectError;
use super::{redact, swap};
use super::{BoxError, ConnInfo, Proxy, ProxyBody};
use crate::audit::EventKind;
use crate::providers::{AuthKind, Provider};

/// A request's whole pipeline, boxed. Its future (classify, swap, forward, SigV4, approvals,
/// every await point's state) is large, and hyper's h2 server spawns a task per stream that
/// holds it: unboxed, it was copied several times per request on its way into the task
/// (`memcpy` was 38 % of `broker serve`'s instructions at h2). Boxed, the task holds a
/// pointer and the state is written once.
pub(super) fn handle(
    proxy: Arc<Proxy>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response<ProxyBody>> + Send>> {
    Box::pin(handle_unboxed(proxy, conn, req))
}

async fn handle_unboxed(
    proxy: Arc<Proxy>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    // For the audit records: clones that share the request's bytes (no copy per request).
    let (method, uri) = (req.method().clone(), req.uri().clone());
    match forward(&proxy, &conn, req, &method, &uri, started).await {
        Ok(response) => response,
        Err((error, provider)) => {
            let error = for_system_broker(&proxy, &conn, error);
            if let Some(kind) = audit_kind(&error) {
                proxy.audit.record(event(
                    &conn,
                    kind,
                    provider,
                    None,
                    &method,
                    &uri,
                    error.status().as_u16(),
                    0,
                    started,
                    Some(error.message()),
                ));
            }
            error.into_response()
        }
    }
}

/// On a system broker, a refusal names what its users can do: the policy that kept a provider
/// from this uid, the admin who adds a key or logs the broker in.
fn for_system_broker(proxy: &Proxy, conn: &ConnInfo, error: BrokerError) -> BrokerError {
    let Some(uid) = conn.audit_uid() else {
        return error;
    };
    match error {
        BrokerError::NotAllowed { provider } if conn.run.allows(&provider) => {
            BrokerError::NotAllowedForUid { provider, uid }
        }
        BrokerError::NoCredential { provider, profile } => BrokerError::NoSystemCredential {
            login: proxy
                .catalog()
                .get(&provider)
                .is_some_and(|p| p.oauth.is_some()),
            provider,
            profile,
        },
        BrokerError::LoginExpired { provider } => BrokerError::SystemLoginExpired { provider },
        other => other,
    }
}

/// Which refusals are audited (denials and anomalies, not upstream outages).
fn audit_kind(error: &BrokerError) -> Option<EventKind> {
    match error {
        BrokerError::Misdirected { .. } => Some(EventKind::SniHostMismatch),
        BrokerError::NotAllowed { .. }
        | BrokerError::NotAllowedForUid { .. }
        | BrokerError::NoCredential { .. }
        | BrokerError::NoSystemCredential { .. } => Some(EventKind::Denial),
        BrokerError::UpstreamAddressRefused { .. } => Some(EventKind::UpstreamAddressRefused),
        // A proxy that refuses the broker is a setting to fix, not an outage to wait out.
        BrokerError::UpstreamProxy { .. } => Some(EventKind::UpstreamProxyFailed),
        // Policy refusals and smuggled keys are audited where they are found, once per burst.
        _ => None,
    }
}

type Failure = (BrokerError, Option<String>);

/// `method` and `uri` are the request's as the agent sent them, for the audit.
async fn forward(
    proxy: &Arc<Proxy>,
    conn: &Arc<ConnInfo>,
    req: Request<Incoming>,
    method: &Method,
    uri: &Uri,
    started: Instant,
) -> Result<Response<ProxyBody>, Failure> {
    // Classify.
    if !names_host(&req, &conn.sni) {
        let host = request_host(&req).ok_or((BrokerError::NoHost, None))?;
        if !host.eq_ignore_ascii_case(&conn.sni) {
            return Err((
                BrokerError::Misdirected {
                    sni: conn.sni.clone(),
                    host,
                },
                None,
            ));
        }
    }
    let at = conn.route.ok_or_else(|| {
        (
            BrokerError::BadRequest {
                reason: format!("{} is not managed", conn.sni),
            },
            None,
        )
    })?;
    let (provider, route) = proxy.catalog.route_at(at);
    let spec_index = at.spec;
    let spec = &route.hosts[spec_index];
    let port = spec.port;
    let provider_name = Some(provider.name.clone());
    if !conn.allows(&provider.name) {
        return Err((
            BrokerError::NotAllowed {
                provider: provider.name.clone(),
            },
            provider_name,
        ));
    }

    let (mut parts, body) = req.into_parts();
    let path = uri.path();
    let mut findings = swap::inspect(&proxy.catalog, provider, route, &parts.headers, &parts.uri);
    // A host spec with a path prefix (`example.com/api`) limits the credential to that path.
    if let Some(prefix) = spec.path_prefix.as_deref() {
        if !path_in_prefix(path, prefix) && findings.own_placeholder {
            findings.own_placeholder = false;
            findings.foreign.push(provider.name.clone());
        }
    }
    // Authorize: a real key where the placeholder belongs, then the run's policy.
    if swap::carries_real_key(provider, route, &parts.headers, &parts.uri) {
        let error = BrokerError::RealKeyFromAgent {
            provider: provider.name.clone(),
            host: conn.sni.clone(),
        };
        if conn
            .run
            .policy
            .starts_burst(EventKind::RealKeyFromAgent, &provider.name, Instant::now())
        {
            proxy.audit.record(event(
                conn,
                EventKind::RealKeyFromAgent,
                provider_name.clone(),
                None,
                method,
                uri,
                error.status().as_u16(),
                0,
                started,
                Some("a value matching the provider's key pattern, not the placeholder, where the key goes (the value is not recorded)".into()),
            ));
        }
        drain(body, &parts.headers).await;
        return Err((error, provider_name));
    }
    let body_limit = match authorize(
        proxy,
        conn,
        &provider.name,
        &mut parts,
        findings.own_placeholder,
        started,
    )
    .await
    {
        Ok(limit) => limit,
        Err(error) => {
            drain(body, &parts.headers).await;
            return Err((error, provider_name));
        }
    };
    for foreign in &findings.foreign {
        proxy.audit.record(event(
            conn,
            EventKind::PlaceholderToForeignHost,
            Some(foreign.clone()),
            None,
            method,
            uri,
            0,
            0,
            started,
            Some(format!(
                "{foreign} placeholder sent to {}; not swapped",
                conn.sni
            )),
        ));
    }

    // AWS: the swap is a check of the agent's SigV4 signature and a new one (`sigv4`).
    // Boxed, like the other rare branches below: an `.await` inline would make every
    // request's future as large as this branch's (5.5 KB), allocated and copied per request.
    if provider.auth == AuthKind::AwsSigv4 {
        return Box::pin(super::sigv4::forward(
            proxy, conn, provider, route, spec_index, port, parts, body, method, uri, started,
        ))
        .await;
    }

    // Look up and swap.
    let profile = conn.profile_for(&provider.name).to_string();
    let mut pending = None;
    // Could a 401 be answered with a fresher secret? Not for a key handed to the run (not the
    // vault's to refresh) nor for a cached API key (nothing to renew).
    let mut renewable = false;
    if findings.needs_credential(route, &parts.headers) {
        if !proxy.audit.writable() {
            return Err((BrokerError::AuditUnwritable, provider_name.clone()));
        }
        // A key handed to this run wins over the vault. With none stored, a request that
        // carries no placeholder (git's first, anonymous request to a host whose route adds
        // the key itself) goes on unchanged, as it would without broker; one that carries the
        // placeholder is told to add the key.
        let secret = match conn.run.run_keys.0.get(&provider.name) {
            Some(key) => Some(key.clone()),
            None => match lookup(proxy, provider, &profile).await {
                Ok((secret, fresh)) => {
                    renewable = fresh && proxy.credentials.may_renew(&provider.name, &profile);
                    Some(secret)
                }
                Err(BrokerError::NoCredential { .. }) if !findings.own_placeholder => None,
                Err(e) => return Err((e, provider_name.clone())),
            },
        };
        let swapped = match &secret {
            Some(secret) => {
                accepted(proxy, provider, route, spec_index, &conn.sni)
                    .await
                    .map_err(|e| (e, provider_name.clone()))?;
                swap::apply(provider, route, &mut parts.headers, &mut parts.uri, secret).map_err(
                    |e| {
                        (
                            BrokerError::BadRequest {
                                reason: e.to_string(),
                            },
                            provider_name.clone(),
                        )
                    },
                )?
            }
            None => false,
        };
        if let (true, Some(secret)) = (swapped, secret) {
            pending = Some(Pending {
                kind: EventKind::CredentialUse,
                provider: provider.name.clone(),
                profile: profile.clone(),
                method: method.clone(),
                path: uri.path().to_owned(),
                started,
                secret,
            });
        }
    }

    // Forward: HTTP/1.1 to the upstream, origin-form, with the Host of the upstream (set where
    // the request is sent).
    let upgrade = is_upgrade(&parts.headers);
    strip_hop_by_hop(&mut parts.headers, upgrade);
    parts.headers.remove(header::HOST);
    origin_form(&mut parts.uri);
    if pending.is_some() {
        // Only codings the broker can decode, so the answer can be checked for the key.
        decode::narrow_accept_encoding(&mut parts.headers);
    }
    if upgrade {
        let req = Request::from_parts(parts, body);
        return Box::pin(bridge_upgrade(
            proxy,
            &conn.sni,
            port,
            req,
            pending,
            conn.clone(),
        ))
        .await
        .map_err(|e| (e, provider_name));
    }
    // hyper picks HTTP/1.1 or h2 for the upstream from ALPN; the agent's version is its own.
    parts.version = http::Version::HTTP_11;
    // An OAuth token the upstream rejects is refreshed and the request sent once more; that
    // needs the request again, so a small body is buffered (large or streamed bodies are not
    // retried). No copy is kept when the secret cannot be renewed.
    let retryable = pending.is_some() && renewable;
    let body = match body_limit {
        // A body of unknown length under `max_body_bytes`: cut off (and the request failed)
        // once it grows past it.
        Some(max) => {
            http_body_util::Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX)).boxed()
        }
        None => body.map_err(BoxError::from).boxed(),
    };
    let (body, replay) = match retryable {
        true => buffer_if_small(body)
            .await
            .map_err(|e| (e, provider_name.clone()))?,
        false => (body, None),
    };
    let resend = replay.map(|bytes| {
        (
            parts.method.clone(),
            parts.uri.clone(),
            parts.headers.clone(),
            bytes,
        )
    });
    let req = Request::from_parts(parts, body);
    let mut response = match proxy.pool.send(&conn.sni, port, req).await {
        Ok(response) => response,
        Err(e) if body_limit.is_some() && over_body_limit(&e) => {
            let refusal = policy_body_refusal(conn, &provider.name);
            return Err((
                refused(proxy, conn, &provider.name, method, uri, started, refusal),
                provider_name.clone(),
            ));
        }
        Err(e) => {
            let error = unanswered(proxy, conn, pending, e);
            return Err((error, provider_name.clone()));
        }
    };
    if response.status() == http::StatusCode::UNAUTHORIZED {
        if let (Some(p), Some((method, mut uri, mut headers, bytes))) = (pending.as_mut(), resend) {
            let old = p.secret.clone();
            let fresh = refresh_rejected(proxy, provider, &p.profile, &old)
                .await
                .map_err(|e| (e, provider_name.clone()))?;
            if let Some(fresh) = fresh {
                if swap::replace(route, &mut headers, &mut uri, &old, &fresh).unwrap_or(false) {
                    let mut retry =
                        Request::new(Full::new(bytes).map_err(|never| match never {}).boxed());
                    *retry.method_mut() = method;
                    *retry.uri_mut() = uri;
                    *retry.headers_mut() = headers;
                    match proxy.pool.send(&conn.sni, port, retry).await {
                        Ok(answer) => response = answer,
                        Err(e) => {
                            let error = unanswered(proxy, conn, pending.take(), e);
                            return Err((error, provider_name.clone()));
                        }
                    }
                    p.secret = fresh;
                }
            }
        }
    }

    Ok(to_agent(proxy, conn, pending, response))
}

/// Respond: the upstream's answer as the agent gets it (here and in `sigv4`). Nothing of it
/// but status, headers and body reaches the agent: hyper keeps an HTTP/1.1 reason phrase
/// other than the canonical one as an extension and would send it on, and it is text the
/// upstream chose (it may quote the key). An answer to a request that carried the key is
/// redacted and audited when its body ends.
pub(super) fn to_agent(
    proxy: &Arc<Proxy>,
    conn: &Arc<ConnInfo>,
    pending: Option<Pending>,
    response: Response<ProxyBody>,
) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    parts.extensions.clear();
    let status = parts.status.as_u16();
    let body = match pending {
        Some(p) => {
            let needles = proxy.needles.get(p.secret.as_bytes());
            let body = redacted_answer(&mut parts.headers, body, needles, &conn.sni);
            AuditedBody::wrap(body, proxy.clone(), conn.clone(), p, status)
        }
        None => body,
    };
    Response::from_parts(parts, body)
}

/// Respond/redact: the answer to a request that carried the key, with every form of the key
/// overwritten in its headers and body (a gzip/deflate body decoded first), since an upstream
/// echoing the key must not hand it to the agent.
pub(super) fn redacted_answer(
    headers: &mut http::HeaderMap,
    body: ProxyBody,
    needles: Arc<redact::Needles>,
    host: &str,
) -> ProxyBody {
    redact::redact_headers(headers, &needles);
    let body = match decode::classify(headers) {
        Encoded::Plain => body,
        Encoded::Decodable(coding) => decode::decode(headers, body, coding),
        Encoded::Opaque => {
            // Asked for codings we decode and got another: passed on unchecked.
            tracing::warn!(%host, "response in a content coding the broker cannot decode; not checked for the key");
            body
        }
    };
    redact::RedactedBody::wrap(body, needles)
}

/// Authorize: the run's policy (`crate::policy`) for this request: its method/path rules,
/// `require_placeholder`, budgets and body size. Allowed, a request under rules goes upstream
/// with its normalised path (what was checked is what is sent). Returns the body limit to
/// enforce while streaming (a body of unknown length under `max_body_bytes`). Under
/// `--policy-mode audit` nothing is refused; what would have been is audited. A request whose
/// rule asks for approval waits here for `broker approve` (`crate::approvals`).
async fn authorize(
    proxy: &Proxy,
    conn: &ConnInfo,
    provider: &str,
    parts: &mut http::request::Parts,
    has_placeholder: bool,
    started: Instant,
) -> Result<Option<u64>, BrokerError> {
    let policy = &conn.run.policy;
    if policy.is_empty() {
        return Ok(None);
    }
    let method = parts.method.as_str();
    let length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let verdict = policy
        .check_rules(provider, method, parts.uri.path(), parts.uri.query())
        .and_then(|normal| {
            policy
                .check_placeholder(provider, has_placeholder)
                .map(|()| normal)
        })
        .and_then(|normal| {
            policy
                .charge(provider, length, Instant::now())
                .map(|()| normal)
        });
    match verdict {
        Ok(Some(allowed)) => {
            if allowed.path.is_some() || allowed.query.is_some() {
                let path = allowed.path.as_deref().unwrap_or(parts.uri.path());
                let query = match &allowed.query {
                    Some(canonical) => Some(canonical.as_str()).filter(|q| !q.is_empty()),
                    None => parts.uri.query(),
                };
                parts.uri = with_path_and_query(&parts.uri, path, query)?;
            }
            if let Some(approval) = allowed.approval {
                if policy.mode == crate::policy::Mode::Enforce && policy.needs_asking(&approval) {
                    Box::pin(approve(proxy, conn, provider, parts, started, &approval)).await?;
                }
            }
        }
        Ok(None) => {}
        Err(refusal) => {
            let (method, uri) = (parts.method.clone(), parts.uri.clone());
            let error = refused(proxy, conn, provider, &method, &uri, started, refusal);
            if policy.mode == crate::policy::Mode::Enforce {
                return Err(error);
            }
            return Ok(None);
        }
    }
    let streaming = length.is_none() && policy.mode == crate::policy::Mode::Enforce;
    Ok(policy
        .max_body(provider)
        .filter(|_| streaming)
        .map(|(max, _)| max))
}

/// Hold the request until `broker approve` answers, or the rule's timeout passes; audited
/// either way (approvals are paced by a person: every one is a line).
async fn approve(
    proxy: &Proxy,
    conn: &ConnInfo,
    provider: &str,
    parts: &http::request::Parts,
    started: Instant,
    approval: &crate::policy::Approval,
) -> Result<(), BrokerError> {
    use crate::approvals::{Ask, Outcome};
    let outcome = proxy
        .approvals
        .ask(Ask {
            run: conn.run.id.clone(),
            command: conn.run.command.clone(),
            method: parts.method.to_string(),
            host: conn.sni.clone(),
            path: shown_target(&parts.uri),
            rule: approval.rule.clone(),
            agent: conn.run.pid.get(),
            timeout: approval.timeout,
        })
        .await;
    let (kind, refusal) = match outcome {
        Outcome::Granted => (EventKind::ApprovalGranted, None),
        Outcome::Denied => (
            EventKind::ApprovalRefused,
            Some(format!("policy: {} {} to {provider} was denied with broker approve (rule {})", parts.method, parts.uri.path(), approval.rule)),
        ),
        Outcome::TimedOut => (
            EventKind::ApprovalRefused,
            Some(format!(
                "policy: {} {} to {provider} waited {} s for 'broker approve' and got no answer (rule {})",
                parts.method,
                parts.uri.path(),
                approval.timeout.as_secs(),
                approval.rule
            )),
        ),
    };
    proxy.audit.record(event(
        conn,
        kind,
        Some(provider.to_string()),
        None,
        &parts.method,
        &parts.uri,
        if refusal.is_some() { 403 } else { 0 },
        0,
        started,
        Some(
            refusal
                .clone()
                .unwrap_or_else(|| format!("approved (rule {})", approval.rule)),
        ),
    ));
    match refusal {
        None => {
            conn.run.policy.granted(approval);
            Ok(())
        }
        Some(message) => Err(BrokerError::Policy(crate::policy::Refusal {
            kind: crate::policy::RefusalKind::NotApproved,
            message,
        })),
    }
}

/// Audit a policy refusal (once per burst), or under `--policy-mode audit` what would have
/// been one; the error the agent gets when the policy is enforced.
fn refused(
    proxy: &Proxy,
    conn: &ConnInfo,
    provider: &str,
    method: &Method,
    uri: &Uri,
    started: Instant,
    refusal: crate::policy::Refusal,
) -> BrokerError {
    use crate::policy::{Mode, RefusalKind};
    let kind = match (conn.run.policy.mode, refusal.kind) {
        (Mode::Audit, _) => EventKind::PolicyWouldDeny,
        (_, RefusalKind::Rules | RefusalKind::PlaceholderRequired | RefusalKind::NotApproved) => {
            EventKind::PolicyDenied
        }
        (_, RefusalKind::Budget | RefusalKind::BodyTooLarge) => EventKind::BudgetExceeded,
    };
    let error = BrokerError::Policy(refusal);
    if conn.run.policy.starts_burst(kind, provider, Instant::now()) {
        proxy.audit.record(event(
            conn,
            kind,
            Some(provider.to_string()),
            None,
            method,
            uri,
            error.status().as_u16(),
            0,
            started,
            Some(error.message()),
        ));
    }
    error
}

/// The refusal of a streamed body that grew past the provider's `max_body_bytes`.
fn policy_body_refusal(conn: &ConnInfo, provider: &str) -> crate::policy::Refusal {
    let (max, source) = conn
        .run
        .policy
        .max_body(provider)
        .unwrap_or((0, "the policy"));
    crate::policy::body_too_large(provider, max, source)
}

/// Did sending fail because the request body went over its `Limited` cap?
fn over_body_limit(err: &SendError) -> bool {
    let SendError::Http(err) = err else {
        return false;
    };
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        if e.downcast_ref::<http_body_util::LengthLimitError>()
            .is_some()
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// `uri` with its path and query replaced (by their normal forms).
fn with_path_and_query(uri: &Uri, path: &str, query: Option<&str>) -> Result<Uri, BrokerError> {
    let bad = || BrokerError::BadRequest {
        reason: "the request target cannot be rebuilt with its normalised path and query".into(),
    };
    let mut parts = uri.clone().into_parts();
    let target = match query {
        Some(query) => format!("{path}?{query}"),
        None => path.to_string(),
    };
    parts.path_and_query = Some(target.parse().map_err(|_| bad())?);
    Uri::from_parts(parts).map_err(|_| bad())
}

/// Refuse the credential where the definition in effect sends it somewhere the user has not
/// accepted (`providers::trust`).
pub(super) async fn accepted(
    proxy: &Arc<Proxy>,
    provider: &Provider,
    route: &crate::providers::Route,
    spec_index: usize,
    host: &str,
) -> Result<(), BrokerError> {
    let Some(grant) = route.grants.get(spec_index) else {
        return Err(BrokerError::NotAccepted {
            provider: provider.name.clone(),
            host: host.to_string(),
        });
    };
    let accepted = match proxy.credentials.accepted_now(&provider.name, grant) {
        Some(accepted) => accepted,
        None => {
            // As for keys (`VaultReads`): the grants are read once after a change, not once
            // per waiting connection.
            let _gate = proxy.vault_reads.one_at_a_time(&provider.name).await;
            if let Some(accepted) = proxy.credentials.accepted_now(&provider.name, grant) {
                return match accepted {
                    true => Ok(()),
                    false => Err(BrokerError::NotAccepted {
                        provider: provider.name.clone(),
                        host: host.to_string(),
                    }),
                };
            }
            let credentials = proxy.credentials.clone();
            let (name, grant) = (provider.name.clone(), grant.clone());
            tokio::task::spawn_blocking(move || credentials.accepts(&name, &grant))
                .await
                .map_err(|_| BrokerError::Vault {
                    message: "the check of the provider definition crashed".into(),
                })?
                .map_err(|e| match e {
                    super::LookupError::Integrity(message) => BrokerError::Integrity { message },
                    super::LookupError::Unavailable(message)
                    | super::LookupError::Source(message) => BrokerError::Vault { message },
                    super::LookupError::LoginExpired => BrokerError::LoginExpired {
                        provider: provider.name.clone(),
                    },
                })?
        }
    };
    if accepted {
        Ok(())
    } else {
        Err(BrokerError::NotAccepted {
            provider: provider.name.clone(),
            host: host.to_string(),
        })
    }
}

/// Per provider, a gate for the vault reads whose answer is cached. Every write to the
/// vault's files empties the caches, and the audit writer moves the audit head in the vault
/// once per batch (every few milliseconds under load): without the gate, each connection's
/// next request read the same row on the blocking pool (a thread hop, a query and a
/// decryption each); with it the first reads and fills the cache, the others wait for it and
/// find the key there. Keys that are not cached (OAuth tokens, commands) are not gated.
#[derive(Default)]
pub(super) struct VaultReads(std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl VaultReads {
    async fn one_at_a_time(&self, provider: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let gate = {
            let mut gates = self.0.lock().unwrap_or_else(|p| p.into_inner());
            match gates.get(provider) {
                Some(gate) => gate.clone(),
                None => gates.entry(provider.to_string()).or_default().clone(),
            }
        };
        gate.lock_owned().await
    }
}

/// The secret, and whether it was read just now (`false`: a cached API key, current and with
/// nothing to renew).
pub(super) async fn lookup(
    proxy: &Arc<Proxy>,
    provider: &Provider,
    profile: &str,
) -> Result<(zeroize::Zeroizing<String>, bool), BrokerError> {
    if let Some(secret) = proxy.credentials.cached(&provider.name, profile) {
        return Ok((secret, false));
    }
    let _gate = match proxy.credentials.cacheable(&provider.name, profile) {
        true => Some(proxy.vault_reads.one_at_a_time(&provider.name).await),
        false => None,
    };
    // Read while this request waited at the gate?
    if let Some(secret) = proxy.credentials.cached(&provider.name, profile) {
        return Ok((secret, false));
    }
    let credentials = proxy.credentials.clone();
    let (name, prof) = (provider.name.clone(), profile.to_string());
    let found = tokio::task::spawn_blocking(move || credentials.lookup(&name, &prof))
        .await
        .map_err(|_| BrokerError::Vault {
            message: "credential lookup crashed".into(),
        })?
        .map_err(|e| match e {
            super::LookupError::Unavailable(message) => BrokerError::Vault { message },
            super::LookupError::LoginExpired => BrokerError::LoginExpired {
                provider: provider.name.clone(),
            },
            super::LookupError::Source(message) => BrokerError::CredentialSource {
                provider: provider.name.clone(),
                message,
            },
            super::LookupError::Integrity(message) => BrokerError::Integrity { message },
        })?;
    let secret = found.ok_or_else(|| BrokerError::NoCredential {
        provider: provider.name.clone(),
        profile: profile.to_string(),
    })?;
    Ok((secret, true))
}

/// Is `path` inside `prefix` (`/api` holds `/api` and `/api/x`, not `/apix`)? A path with dot
/// segments or encoded dots is never inside: the upstream might resolve it elsewhere.
fn path_in_prefix(path: &str, prefix: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    if path.split('/').any(|seg| seg == ".." || seg == ".") || lower.contains("%2e") {
        return false;
    }
    let prefix = prefix.trim_end_matches('/');
    path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Most of a refused request's body read (and dropped) before the refusal is sent, and how
/// long that may take.
const DRAIN_LIMIT: usize = 1024 * 1024;
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Read and drop what the agent is sending of a request the broker refuses before it went
/// upstream. Answered while its body is still arriving, the connection is closed with the body
/// unread, the kernel resets it, and the client may see the reset instead of the refusal. A
/// client waiting for `100 Continue` is not asked for its body.
async fn drain(body: Incoming, headers: &HeaderMap) {
    if body.is_end_stream() || headers.contains_key(header::EXPECT) {
        return;
    }
    let limited = http_body_util::Limited::new(body, DRAIN_LIMIT);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, limited.collect()).await;
}

/// Largest request body kept for a retry after a refreshed token.
const REPLAY_LIMIT: u64 = 64 * 1024;

/// The body to send, and a copy to resend if it is small and of known size.
async fn buffer_if_small(body: ProxyBody) -> Result<(ProxyBody, Option<Bytes>), BrokerError> {
    let small = body.is_end_stream() || body.size_hint().exact().is_some_and(|n| n <= REPLAY_LIMIT);
    if !small {
        return Ok((body, None));
    }
    let bytes = body
        .collect()
        .await
        .map_err(|e| BrokerError::BadRequest {
            reason: format!("reading the request body failed: {e}"),
        })?
        .to_bytes();
    Ok((
        Full::new(bytes.clone())
            .map_err(|never| match never {})
            .boxed(),
        Some(bytes),
    ))
}

/// After a 401: a fresher token than `rejected`, if the credential store can get one.
async fn refresh_rejected(
    proxy: &Arc<Proxy>,
    provider: &Provider,
    profile: &str,
    rejected: &zeroize::Zeroizing<String>,
) -> Result<Option<zeroize::Zeroizing<String>>, BrokerError> {
    let credentials = proxy.credentials.clone();
    let (name, prof, old) = (provider.name.clone(), profile.to_string(), rejected.clone());
    let outcome =
        tokio::task::spawn_blocking(move || credentials.refresh_rejected(&name, &prof, &old)).await;
    match outcome {
        Ok(Ok(Some(fresh))) if fresh.as_str() != rejected.as_str() => Ok(Some(fresh)),
        // The grant itself was refused: say so instead of passing the bare 401 on.
        Ok(Err(super::LookupError::LoginExpired)) => Err(BrokerError::LoginExpired {
            provider: provider.name.clone(),
        }),
        // Nothing fresher (an API key), or the refresh could not run: the upstream's 401 stands.
        _ => Ok(None),
    }
}

/// Whether the request names `sni` (a DNS name) as its host, exactly as [`request_host`]
/// would find it, without parsing the authority or allocating: `name`, `name.` or `name:port`,
/// in any case. `false` sends the caller to [`request_host`], which tells the other cases
/// apart (another host, a malformed one, none).
fn names_host<B>(req: &Request<B>, sni: &str) -> bool {
    let text = match req.uri().authority() {
        Some(authority) => authority.as_str(),
        None => match req.headers().get(header::HOST).map(|v| v.to_str()) {
            Some(Ok(value)) => value,
            _ => return false,
        },
    };
    let (host, port) = match text.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (text, None),
    };
    port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
        && host
            .strip_suffix('.')
            .unwrap_or(host)
            .eq_ignore_ascii_case(sni)
}

/// The host the request names: `:authority` (h2, absolute-form) or `Host`, without port.
pub(super) fn request_host<B>(req: &Request<B>) -> Option<String> {
    let from_header;
    let authority = match req.uri().authority() {
        Some(authority) => authority,
        None => {
            let value = req.headers().get(header::HOST)?.to_str().ok()?;
            from_header = value.parse::<http::uri::Authority>().ok()?;
            &from_header
        }
    };
    Some(authority.host().trim_end_matches('.').to_ascii_lowercase())
}

/// The request target as sent to the upstream: path and query only (an h2 request, or an
/// absolute-form h1 one, also carries scheme and authority). Shares the bytes, no copy.
pub(super) fn origin_form(uri: &mut Uri) {
    if uri.scheme().is_some() || uri.authority().is_some() {
        let path = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        *uri = Uri::from(path);
    }
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Remove hop-by-hop headers (RFC 9110 7.6.1), and any header named in `Connection`.
/// For an upgrade, `Connection: upgrade` and `Upgrade` are kept.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Names, not strings: a string is parsed into a name on every call.
    const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    const ALWAYS: [HeaderName; 6] = [
        KEEP_ALIVE,
        PROXY_CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TRANSFER_ENCODING,
        header::TRAILER,
    ];
    // One pass over the names present, then a lookup or a `remove` only for those: most
    // messages carry none of them, and each lookup by name hashes it (about 90 instructions;
    // six of them per message, two messages per request, when they were made unasked).
    let mut doomed: Vec<HeaderName> = Vec::new();
    let (mut connection, mut te, mut upgrade) = (false, false, false);
    for name in headers.keys() {
        if ALWAYS.contains(name) {
            doomed.push(name.clone());
        } else if name == header::CONNECTION {
            connection = true;
        } else if name == header::TE {
            te = true;
        } else if name == header::UPGRADE {
            upgrade = true;
        }
    }
    if connection {
        doomed.extend(
            headers
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
                .filter(|name| !(keep_upgrade && name == header::UPGRADE)),
        );
    }
    if te {
        let only_trailers = headers.get(header::TE).is_some_and(|v| {
            v.to_str()
                .is_ok_and(|v| v.trim().eq_ignore_ascii_case("trailers"))
        });
        if !only_trailers {
            doomed.push(header::TE);
        }
    }
    for name in doomed {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(
            header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
    } else {
        if connection {
            headers.remove(header::CONNECTION);
        }
        if upgrade {
            headers.remove(header::UPGRADE);
        }
    }
}

/// The agent's error for a request the upstream did not answer. If the connection was up, the
/// request may have left with the key: that is a use of the key, audited with the status the
/// agent gets and why. (A refused connection or certificate sent nothing.)
pub(super) fn unanswered(
    proxy: &Proxy,
    conn: &ConnInfo,
    pending: Option<Pending>,
    err: SendError,
) -> BrokerError {
    let may_have_left = matches!(err, SendError::Http(_));
    let error = upstream_error(&conn.sni, err);
    if let (true, Some(p)) = (may_have_left, pending) {
        let status = error.status().as_u16();
        proxy
            .audit
            .record_request(p.into_request_event(conn, status, 0, Some(error.message())));
    }
    error
}

pub(super) fn upstream_error(host: &str, err: SendError) -> BrokerError {
    let err = match err {
        SendError::Connect(connect) => return connect_error(host, &connect),
        SendError::Http(err) => err,
    };
    // Keep hyper's own words, innermost cause: "connection closed before message completed", ...
    let mut reason = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(e) = source {
        reason = e.to_string();
        source = e.source();
    }
    BrokerError::UpstreamFailed {
        host: host.to_string(),
        reason,
    }
}

/// What a person approving a request is shown of its target: the path, and the query's
/// parameter names with their values elided. The names are what change an API's action (S3's
/// `?policy`, `?delete`). Values are left out although the approval is asked before the swap
/// (so a value is at most a placeholder; a real key from the agent was refused before): they
/// are the agent's text, kept out of what a person reads and of the notification's argv,
/// which the agent's user can read.
fn shown_target(uri: &http::Uri) -> String {
    let Some(query) = uri.query().filter(|q| !q.is_empty()) else {
        return uri.path().to_string();
    };
    let names: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) => format!("{name}=..."),
            None => pair.to_string(),
        })
        .collect();
    format!("{}?{}", uri.path(), names.join("&"))
}

pub(super) fn connect_error(host: &str, err: &ConnectError) -> BrokerError {
    match err {
        ConnectError::Certificate(reason) => BrokerError::UpstreamCertificate {
            host: host.to_string(),
            reason: reason.clone(),
        },
        ConnectError::AddressRefused(reason) => BrokerError::UpstreamAddressRefused {
            host: host.to_string(),
            reason: reason.clone(),
        },
        ConnectError::Proxy(reason) => BrokerError::UpstreamProxy {
            host: host.to_string(),
            reason: reason.clone(),
        },
        other => BrokerError::UpstreamUnreachable {
            host: host.to_string(),
            reason: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_approval_shows_the_query_names_never_their_values() {
        let shown = |u: &str| shown_target(&u.parse::<http::Uri>().expect("uri"));
        assert_eq!(shown("/bucket"), "/bucket");
        assert_eq!(shown("/bucket?policy"), "/bucket?policy");
        assert_eq!(
            shown("/v1/models?key=AIzaRealKey0123&alt=json"),
            "/v1/models?key=...&alt=..."
        );
    }

    #[test]
    fn path_prefixes_hold_only_their_own_paths() {
        assert!(path_in_prefix("/api", "/api"));
        assert!(path_in_prefix("/api/v1/x", "/api/"));
        assert!(!path_in_prefix("/apix", "/api"));
        assert!(!path_in_prefix("/api/../admin", "/api"));
        assert!(!path_in_prefix("/api/%2E%2E/admin", "/api"));
        assert!(!path_in_prefix("/", "/api"));
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret-hop".parse().expect("v"));
        h.insert("x-secret-hop", "1".parse().expect("v"));
        h.insert("keep-alive", "timeout=5".parse().expect("v"));
        h.insert("te", "gzip".parse().expect("v"));
        h.insert("authorization", "Bearer x".parse().expect("v"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("x-secret-hop").is_none());
        assert!(h.get("connection").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get("te").is_none());
        assert!(h.get("authorization").is_some());

        let mut h = HeaderMap::new();
        h.insert("te", "trailers".parse().expect("v"));
        h.insert("transfer-encoding", "chunked".parse().expect("v"));
        h.insert("proxy-authorization", "Basic eA==".parse().expect("v"));
        h.insert("proxy-connection", "keep-alive".parse().expect("v"));
        h.insert("trailer", "x-checksum".parse().expect("v"));
        h.insert("upgrade", "h2c".parse().expect("v"));
        h.insert("accept", "*/*".parse().expect("v"));
        strip_hop_by_hop(&mut h, false);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["te", "accept"]);
    }

    #[test]
    fn upgrade_headers_survive_for_websockets() {
        let mut h = HeaderMap::new();
        h.insert("connection", "Upgrade".parse().expect("v"));
        h.insert("upgrade", "websocket".parse().expect("v"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn host_comes_from_authority_or_host_header() {
        let req = Request::builder()
            .uri("https://API.openai.com:443/v1")
            .body(())
            .expect("req");
        assert_eq!(request_host(&req).as_deref(), Some("api.openai.com"));
        let req = Request::builder()
            .uri("/v1")
            .header("host", "api.openai.com.")
            .body(())
            .expect("req");
        assert_eq!(request_host(&req).as_deref(), Some("api.openai.com"));
        let req = Request::builder().uri("/v1").body(()).expect("req");
        assert_eq!(request_host(&req), None);
    }

    #[test]
    fn the_quick_host_check_agrees_with_the_parsed_host() {
        let sni = "api.openai.com";
        for (host, names) in [
            ("api.openai.com", true),
            ("API.OpenAI.com", true),
            ("api.openai.com.", true),
            ("api.openai.com:443", true),
            ("api.openai.com.:8443", true),
            ("api.openai.com:", false),
            ("api.openai.com:443:1", false),
            ("api.openai.com:x", false),
            ("api.openai.com@evil.example", false),
            ("user@api.openai.com", false),
            ("evil.example", false),
            ("api.openai.com.evil.example", false),
            ("", false),
        ] {
            let req = Request::builder()
                .uri("/v1")
                .header("host", host)
                .body(())
                .expect("req");
            assert_eq!(names_host(&req, sni), names, "{host}");
            // Never more lenient than the parse: a quick yes is the parse's yes.
            if names {
                assert!(
                    request_host(&req).is_some_and(|h| h.eq_ignore_ascii_case(sni)),
                    "{host}"
                );
            }
        }
        let req = Request::builder()
            .uri("https://API.openai.com:443/v1")
            .body(())
            .expect("req");
        assert!(names_host(&req, sni));
        let req = Request::builder().uri("/v1").body(()).expect("req");
        assert!(!names_host(&req, sni));
    }

    #[test]
    fn upstream_target_is_origin_form() {
        for (agent, sent) in [
            ("/v1/models?key=x", "/v1/models?key=x"),
            ("https://api.x.com:8443/v1/models?key=x", "/v1/models?key=x"),
            ("https://api.x.com", "/"),
            ("*", "*"),
        ] {
            let mut uri: Uri = agent.parse().expect("uri");
            origin_form(&mut uri);
            assert_eq!(uri.to_string(), sent, "{agent}");
        }
    }
}
