//! A fake model provider for the agent CLI tests (`tests/tests/agents.rs`): one TLS origin per
//! provider, on the provider's real hostname, that records every request (the credential
//! headers included) for the test to check and answers it as the broker's own fake provider
//! does (`broker_cli::selftest::fake_llm`, which `broker doctor` serves to the agent CLIs it
//! finds): enough of each API for a real agent CLI to complete one model call, answered with
//! a text the test can recognise ([`Provider::answer`]), and the provider's own 401 to
//! anything without the real key.

pub use broker_cli::selftest::fake_llm::Provider;
use broker_cli::selftest::fake_llm::{self, Answer, ProviderRequest};

use crate::origin::{Origin, OriginRequest, Reply};
use crate::TestCa;

impl ProviderRequest for OriginRequest {
    fn method(&self) -> &str {
        &self.method
    }
    fn target(&self) -> &str {
        &self.target
    }
    fn header(&self, name: &str) -> Option<&str> {
        OriginRequest::header(self, name)
    }
    fn body(&self) -> &[u8] {
        &self.body
    }
}

/// A fake provider origin, serving until dropped.
pub struct FakeLlm {
    pub provider: Provider,
    pub origin: Origin,
}

impl FakeLlm {
    /// Start a fake `provider` with a certificate from `ca` that accepts only `key`.
    pub fn start(ca: &TestCa, provider: Provider, key: &str) -> FakeLlm {
        let key = key.to_string();
        let origin = Origin::start(ca, &[provider.host()], move |req| {
            reply(provider, &key, req)
        });
        FakeLlm { provider, origin }
    }

    pub fn requests(&self) -> Vec<OriginRequest> {
        self.origin.requests()
    }

    /// Every request as `METHOD path` (the query cut off), in order: what the CLI asked for.
    pub fn paths(&self) -> Vec<String> {
        self.requests()
            .iter()
            .map(|r| {
                let path = r.target.split('?').next().unwrap_or_default();
                let ws = if r.header("upgrade").is_some() {
                    " (websocket)"
                } else {
                    ""
                };
                format!("{} {path}{ws}", r.method)
            })
            .collect()
    }
}

/// What the fake answers `req` with, as this crate's origin serves it (events streamed one
/// body chunk each).
pub fn reply(provider: Provider, key: &str, req: &OriginRequest) -> Reply {
    match fake_llm::reply(provider, key, req) {
        Answer::Json(status, body) => Reply::Json(status, body),
        Answer::Events(events) => Reply::Events(events),
        Answer::WebSocketEvents(events) => Reply::WebSocketEvents(events),
    }
}
