//! What a fake model provider answers, per provider, for the agent CLIs: enough of each API
//! for a real CLI to complete one model call, answered with a text the caller can recognise
//! ([`Provider::answer`]). `broker doctor` serves it from its self-test origin (see
//! [`super::origin`]); the integration tests serve it from theirs (`tests/src/fake_llm.rs`).
//!
//! It answers only requests that carry the real key it was given, as the provider would:
//! anything else gets the provider's own 401, so a CLI that printed the answer went through
//! the broker's swap.
//!
//! What it speaks, per provider (found by running each CLI against it, see the README's
//! table of agents):
//! - OpenAI: `GET /v1/models`, Chat Completions (`POST /v1/chat/completions`, plain JSON and
//!   SSE), the Responses API (`POST /v1/responses` over SSE, and the same events over a
//!   WebSocket upgrade of `GET /v1/responses`, which Codex tries first).
//! - Anthropic: Messages (`POST /v1/messages`, plain JSON and SSE), `count_tokens`,
//!   `GET /v1/models`.
//! - Gemini: `generateContent`, `streamGenerateContent` (SSE with `alt=sse`, else a JSON
//!   array), `countTokens`, `GET /v1beta/models`.
//!
//! Anything else gets a 404 in the provider's error shape.

use serde_json::{json, Value};

/// A request as the fake needs to see it; each origin implements it for its own type.
pub trait ProviderRequest {
    fn method(&self) -> &str;
    /// Path and query, exactly as received.
    fn target(&self) -> &str;
    /// The first value of header `name` (any case).
    fn header(&self, name: &str) -> Option<&str>;
    fn body(&self) -> &[u8];
}

/// What the fake answers; the origin serving it turns this into a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A status and a JSON body.
    Json(u16, String),
    /// 200 `text/event-stream`, one server-sent event per string.
    Events(Vec<String>),
    /// Accept the WebSocket upgrade; to every text message, answer with each of these
    /// strings as a text message of its own.
    WebSocketEvents(Vec<String>),
}

/// The providers the fake speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    OpenAi,
    Anthropic,
    Gemini,
}

impl Provider {
    pub const ALL: [Provider; 3] = [Provider::OpenAi, Provider::Anthropic, Provider::Gemini];

    /// The provider whose API is at `host`.
    pub fn for_host(host: &str) -> Option<Provider> {
        Provider::ALL.into_iter().find(|p| p.host() == host)
    }

    /// The provider's name in broker's catalog.
    pub fn name(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Gemini => "gemini",
        }
    }

    /// The provider's API hostname (the real one; the broker is pointed at the fake with
    /// `--resolve`).
    pub fn host(self) -> &'static str {
        match self {
            Provider::OpenAi => "api.openai.com",
            Provider::Anthropic => "api.anthropic.com",
            Provider::Gemini => "generativelanguage.googleapis.com",
        }
    }

    /// The text every model call is answered with.
    pub fn answer(self) -> &'static str {
        match self {
            Provider::OpenAi => "pong-from-fake-openai",
            Provider::Anthropic => "pong-from-fake-anthropic",
            Provider::Gemini => "pong-from-fake-gemini",
        }
    }

    /// Does `req` carry `key` where this provider's clients put it?
    pub fn has_key(self, req: &(impl ProviderRequest + ?Sized), key: &str) -> bool {
        let bearer = format!("Bearer {key}");
        match self {
            Provider::OpenAi => req.header("authorization") == Some(bearer.as_str()),
            Provider::Anthropic => {
                req.header("x-api-key") == Some(key)
                    || req.header("authorization") == Some(bearer.as_str())
            }
            Provider::Gemini => {
                req.header("x-goog-api-key") == Some(key)
                    || query_param(req.target(), "key").as_deref() == Some(key)
            }
        }
    }

    /// The credential as this request carried it, for messages that must not print it: which
    /// header (or query parameter) held something, and whether that was `key`, a placeholder
    /// or something else.
    pub fn credential_summary(self, req: &(impl ProviderRequest + ?Sized), key: &str) -> String {
        let mut seen = Vec::new();
        let mut note = |name: &str, value: Option<String>| {
            if let Some(value) = value {
                let what = if value.ends_with(key) {
                    "the real key"
                } else if value.contains("placeholder") {
                    "a PLACEHOLDER"
                } else {
                    "something else"
                };
                seen.push(format!("{name}: {what}"));
            }
        };
        note(
            "authorization",
            req.header("authorization").map(str::to_string),
        );
        note("x-api-key", req.header("x-api-key").map(str::to_string));
        note(
            "x-goog-api-key",
            req.header("x-goog-api-key").map(str::to_string),
        );
        note("?key=", query_param(req.target(), "key"));
        if seen.is_empty() {
            "no credential".to_string()
        } else {
            seen.join(", ")
        }
    }
}

/// The value of `name` in the query of `target`, as sent (no percent-decoding: keys and
/// placeholders have no characters that need it).
pub fn query_param(target: &str, name: &str) -> Option<String> {
    let query = target.split_once('?')?.1;
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// What the fake answers `req` with.
pub fn reply(provider: Provider, key: &str, req: &(impl ProviderRequest + ?Sized)) -> Answer {
    if !provider.has_key(req, key) {
        return unauthorized(provider);
    }
    let body: Value = serde_json::from_slice(req.body()).unwrap_or(Value::Null);
    let path = req.target().split('?').next().unwrap_or_default();
    match provider {
        Provider::OpenAi => openai(req, path, &body),
        Provider::Anthropic => anthropic(req, path, &body),
        Provider::Gemini => gemini(req, path, &body),
    }
}

fn unauthorized(provider: Provider) -> Answer {
    let body = match provider {
        Provider::OpenAi => {
            json!({"error": {"message": "Incorrect API key provided (fake origin: not the real key)",
            "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}})
        }
        Provider::Anthropic => json!({"type": "error", "error": {"type": "authentication_error",
            "message": "invalid x-api-key (fake origin: not the real key)"}}),
        Provider::Gemini => json!({"error": {"code": 400, "status": "INVALID_ARGUMENT",
            "message": "API key not valid. Please pass a valid API key. (fake origin: not the real key)"}}),
    };
    let status = if provider == Provider::Gemini {
        400
    } else {
        401
    };
    Answer::Json(status, body.to_string())
}

fn not_found(provider: Provider, path: &str) -> Answer {
    let message = format!("the fake {} origin does not serve {path}", provider.name());
    let body = match provider {
        Provider::Anthropic => {
            json!({"type": "error", "error": {"type": "not_found_error", "message": message}})
        }
        Provider::OpenAi => json!({"error": {"message": message, "type": "invalid_request_error",
            "param": null, "code": "unknown_url"}}),
        Provider::Gemini => {
            json!({"error": {"code": 404, "status": "NOT_FOUND", "message": message}})
        }
    };
    Answer::Json(404, body.to_string())
}

/// One server-sent event, with an `event:` line when `name` is given.
fn sse(name: Option<&str>, data: &Value) -> String {
    match name {
        Some(name) => format!("event: {name}\ndata: {data}\n\n"),
        None => format!("data: {data}\n\n"),
    }
}

fn model_of(body: &Value, default: &str) -> String {
    body["model"].as_str().unwrap_or(default).to_string()
}

fn openai(req: &(impl ProviderRequest + ?Sized), path: &str, body: &Value) -> Answer {
    const ANSWER: &str = "pong-from-fake-openai";
    let model = model_of(body, "gpt-4o-mini");
    match (req.method(), path) {
        ("GET", "/v1/models") => {
            let data: Vec<Value> = ["gpt-4o-mini", "gpt-4.1", "gpt-5", "gpt-5-codex", "o4-mini"]
                .iter()
                .map(|id| json!({"id": id, "object": "model", "created": 1_700_000_000, "owned_by": "openai"}))
                .collect();
            Answer::Json(200, json!({"object": "list", "data": data}).to_string())
        }
        ("POST", "/v1/chat/completions") => {
            let usage = json!({"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8});
            if body["stream"].as_bool() == Some(true) {
                let chunk = |delta: Value, finish: Value| {
                    json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1_700_000_000,
                        "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
                };
                let mut events = vec![
                    sse(
                        None,
                        &chunk(json!({"role": "assistant", "content": ""}), Value::Null),
                    ),
                    sse(None, &chunk(json!({"content": ANSWER}), Value::Null)),
                    sse(None, &chunk(json!({}), json!("stop"))),
                ];
                if body["stream_options"]["include_usage"].as_bool() == Some(true) {
                    events.push(sse(
                        None,
                        &json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                            "created": 1_700_000_000, "model": model, "choices": [], "usage": usage}),
                    ));
                }
                events.push("data: [DONE]\n\n".to_string());
                Answer::Events(events)
            } else {
                Answer::Json(
                    200,
                    json!({"id": "chatcmpl-fake", "object": "chat.completion", "created": 1_700_000_000,
                        "model": model, "choices": [{"index": 0, "finish_reason": "stop",
                        "message": {"role": "assistant", "content": ANSWER}}], "usage": usage})
                    .to_string(),
                )
            }
        }
        ("GET", "/v1/responses") if req.header("upgrade").is_some() => Answer::WebSocketEvents(
            responses_events(&model)
                .into_iter()
                .map(|(_, e)| e.to_string())
                .collect(),
        ),
        ("POST", "/v1/responses") => {
            let events = responses_events(&model);
            if body["stream"].as_bool() == Some(true) {
                Answer::Events(events.iter().map(|(name, e)| sse(Some(name), e)).collect())
            } else {
                // The last event, `response.completed`, holds the whole response.
                let completed = events.last().map(|(_, e)| e["response"].clone());
                Answer::Json(200, completed.unwrap_or(Value::Null).to_string())
            }
        }
        _ => not_found(Provider::OpenAi, path),
    }
}

/// The Responses API's events for one assistant message holding the answer, as
/// `(event name, data)`.
fn responses_events(model: &str) -> Vec<(&'static str, Value)> {
    const ANSWER: &str = "pong-from-fake-openai";
    let part = json!({"type": "output_text", "text": ANSWER, "annotations": []});
    let item = |status: &str, content: Value| json!({"id": "msg_fake", "type": "message", "status": status, "role": "assistant", "content": content});
    let response = |status: &str, output: Value| {
        json!({"id": "resp_fake", "object": "response", "created_at": 1_700_000_000, "status": status,
            "model": model, "output": output, "error": null, "incomplete_details": null,
            "usage": {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 3,
                "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 8}})
    };
    let at = json!({"item_id": "msg_fake", "output_index": 0, "content_index": 0});
    let with = |mut base: Value, extra: Value| {
        if let Value::Object(extra) = extra {
            for (k, v) in extra {
                base[k] = v;
            }
        }
        base
    };
    let events = vec![
        (
            "response.created",
            json!({"response": response("in_progress", json!([]))}),
        ),
        (
            "response.in_progress",
            json!({"response": response("in_progress", json!([]))}),
        ),
        (
            "response.output_item.added",
            json!({"output_index": 0, "item": item("in_progress", json!([]))}),
        ),
        (
            "response.content_part.added",
            with(
                at.clone(),
                json!({"part": {"type": "output_text", "text": "", "annotations": []}}),
            ),
        ),
        (
            "response.output_text.delta",
            with(at.clone(), json!({"delta": ANSWER, "logprobs": []})),
        ),
        (
            "response.output_text.done",
            with(at.clone(), json!({"text": ANSWER, "logprobs": []})),
        ),
        (
            "response.content_part.done",
            with(at, json!({"part": part.clone()})),
        ),
        (
            "response.output_item.done",
            json!({"output_index": 0, "item": item("completed", json!([part]))}),
        ),
        (
            "response.completed",
            json!({"response": response("completed", json!([item("completed", json!([part]))]))}),
        ),
    ];
    events
        .into_iter()
        .enumerate()
        .map(|(i, (name, data))| {
            (
                name,
                with(json!({"type": name, "sequence_number": i}), data),
            )
        })
        .collect()
}

fn anthropic(req: &(impl ProviderRequest + ?Sized), path: &str, body: &Value) -> Answer {
    const ANSWER: &str = "pong-from-fake-anthropic";
    let model = model_of(body, "claude-sonnet-4-5");
    match (req.method(), path) {
        ("GET", "/v1/models") => {
            let data: Vec<Value> = ["claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1"]
                .iter()
                .map(|id| json!({"type": "model", "id": id, "display_name": id, "created_at": "2025-01-01T00:00:00Z"}))
                .collect();
            Answer::Json(
                200,
                json!({"data": data, "has_more": false, "first_id": null, "last_id": null})
                    .to_string(),
            )
        }
        ("POST", "/v1/messages/count_tokens") => {
            Answer::Json(200, json!({"input_tokens": 5}).to_string())
        }
        ("POST", "/v1/messages") => {
            let usage = json!({"input_tokens": 5, "output_tokens": 3, "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0});
            let message = |content: Value, stop: Value| {
                json!({"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                    "content": content, "stop_reason": stop, "stop_sequence": null, "usage": usage})
            };
            if body["stream"].as_bool() == Some(true) {
                let events = [
                    (
                        "message_start",
                        json!({"type": "message_start", "message": message(json!([]), Value::Null)}),
                    ),
                    (
                        "content_block_start",
                        json!({"type": "content_block_start", "index": 0,
                        "content_block": {"type": "text", "text": ""}}),
                    ),
                    (
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": ANSWER}}),
                    ),
                    (
                        "content_block_stop",
                        json!({"type": "content_block_stop", "index": 0}),
                    ),
                    (
                        "message_delta",
                        json!({"type": "message_delta",
                        "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 3}}),
                    ),
                    ("message_stop", json!({"type": "message_stop"})),
                ];
                Answer::Events(events.iter().map(|(name, e)| sse(Some(name), e)).collect())
            } else {
                Answer::Json(
                    200,
                    message(json!([{"type": "text", "text": ANSWER}]), json!("end_turn"))
                        .to_string(),
                )
            }
        }
        _ => not_found(Provider::Anthropic, path),
    }
}

/// A value that fits a Gemini response schema (OpenAPI-style `type`s in either case), with
/// the answer in every string: what a structured-output call (Gemini CLI's model router asks
/// for a JSON complexity score before the model call proper) gets back.
fn value_for_schema(schema: &Value, answer: &str) -> Value {
    let kind = schema["type"]
        .as_str()
        .unwrap_or("string")
        .to_ascii_lowercase();
    match kind.as_str() {
        "object" => {
            let mut object = serde_json::Map::new();
            if let Some(properties) = schema["properties"].as_object() {
                for (name, property) in properties {
                    object.insert(name.clone(), value_for_schema(property, answer));
                }
            }
            Value::Object(object)
        }
        "array" => json!([value_for_schema(&schema["items"], answer)]),
        "integer" | "number" => json!(1),
        "boolean" => json!(false),
        _ => match schema["enum"].as_array().and_then(|e| e.first()) {
            Some(first) => first.clone(),
            None => json!(answer),
        },
    }
}

fn gemini(req: &(impl ProviderRequest + ?Sized), path: &str, body: &Value) -> Answer {
    const ANSWER: &str = "pong-from-fake-gemini";
    let config = &body["generationConfig"];
    let text = if config["responseMimeType"].as_str() == Some("application/json") {
        let schema = [&config["responseJsonSchema"], &config["responseSchema"]]
            .into_iter()
            .find(|s| s.is_object())
            .cloned()
            .unwrap_or(json!({"type": "object"}));
        value_for_schema(&schema, ANSWER).to_string()
    } else {
        ANSWER.to_string()
    };
    // /v1beta/models/<model>:<method>
    let (resource, method) = path.rsplit_once(':').unwrap_or((path, ""));
    let model = resource
        .rsplit('/')
        .next()
        .unwrap_or("gemini-2.5-flash")
        .to_string();
    let answer = json!({"candidates": [{"content": {"parts": [{"text": text}], "role": "model"},
        "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 3, "totalTokenCount": 8},
        "modelVersion": model, "responseId": "fake-response"});
    match (req.method(), method) {
        ("GET", "") if resource.ends_with("/models") => {
            let models: Vec<Value> = [
                "gemini-2.5-pro",
                "gemini-2.5-flash",
                "gemini-2.5-flash-lite",
            ]
            .iter()
            .map(|id| {
                json!({"name": format!("models/{id}"), "displayName": id,
                    "supportedGenerationMethods": ["generateContent", "countTokens"]})
            })
            .collect();
            Answer::Json(200, json!({"models": models}).to_string())
        }
        ("POST", "generateContent") => Answer::Json(200, answer.to_string()),
        ("POST", "streamGenerateContent") => {
            if query_param(req.target(), "alt").as_deref() == Some("sse") {
                Answer::Events(vec![sse(None, &answer)])
            } else {
                Answer::Json(200, json!([answer]).to_string())
            }
        }
        ("POST", "countTokens") => Answer::Json(200, json!({"totalTokens": 5}).to_string()),
        _ => not_found(Provider::Gemini, path),
    }
}
