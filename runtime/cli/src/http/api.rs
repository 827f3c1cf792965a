//! The OpenAI wire format as `edgelm serve --http` speaks it: request bodies (checked strictly:
//! an unknown field or a value we cannot honour is a 400 naming it, never silently ignored),
//! responses, stream chunks and the error object.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// A failed request: its status and OpenAI's `{"error": {...}}` body.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after: Option<u64>,
    /// OpenAI's `code` (e.g. `content_policy_violation`).
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: param.map(str::to_owned),
            retry_after: None,
            code: None,
        }
    }

    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, kind, message: message.into(), param: None, retry_after: None, code: None }
    }

    pub fn body(&self) -> Value {
        json!({ "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code } })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, s.into());
        }
        // A request that ran out of time would only run out again: OpenAI's clients honour
        // this header instead of retrying a 5xx on their own.
        if self.status == axum::http::StatusCode::GATEWAY_TIMEOUT {
            r.headers_mut().insert("x-should-retry", axum::http::HeaderValue::from_static("false"));
        }
        r
    }
}

/// `input` of an embedding request: text, or token ids (which LangChain sends).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    Texts(OneOrMany),
    // Recognised to answer with a clear refusal; the encoder takes text.
    #[allow(dead_code)]
    Ids(Vec<u32>),
    #[allow(dead_code)]
    IdLists(Vec<Vec<u32>>),
}

/// A string or a list of strings (`stop`, `prompt`, `input`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// `prompt` of a completion: text, or token ids, alone or in a list of one.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    // Some SDKs send null for an unset flag.
    pub include_usage: Option<bool>,
}

/// Names a request body may use: any other is refused with its name ([`parse`]). Listed by
/// hand because serde's `deny_unknown_fields` does not work beside `flatten`.
pub trait Fields {
    const FIELDS: &'static [&'static str];
    /// Whether the shared sampling fields ([`Sampling`]) belong too.
    const SAMPLING: bool = true;
}

/// The sampling and stopping fields both endpoints share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sampling {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Not in OpenAI's API; llama.cpp's servers take it too.
    pub top_k: Option<usize>,
    /// Not in OpenAI's API: generate past end-of-sequence tokens (llama-server's field, for
    /// benchmarks that need a fixed answer length).
    pub ignore_eos: Option<bool>,
    pub seed: Option<u64>,
    pub stop: Option<OneOrMany>,
    pub n: Option<u32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    // An end-user id for abuse tracking: accepted, not used.
    #[allow(dead_code)]
    pub user: Option<String>,
    // Some SDKs send null for an unset flag.
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    // Accepted and not used: one model is served, whatever name the client gives (as
    // llama-server does); the response names the real one.
    #[allow(dead_code)]
    pub model: Option<String>,
}

const SAMPLING_FIELDS: [&str; 14] = [
    "temperature",
    "top_p",
    "top_k",
    "ignore_eos",
    "seed",
    "stop",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    "stream",
    "stream_options",
    "model",
];

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    pub max_tokens: Option<usize>,
    pub echo: Option<bool>,
    pub logprobs: Option<Value>,
    pub best_of: Option<u32>,
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

impl Fields for CompletionRequest {
    const FIELDS: &'static [&'static str] = &["prompt", "max_tokens", "echo", "logprobs", "best_of", "suffix"];
}

/// Message content: text, or a list of parts of which only text parts are understood.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<Content>,
    // A participant name: accepted; chat templates take roles only.
    #[allow(dead_code)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessageIn>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    pub response_format: Option<Value>,
    pub tools: Option<Vec<Value>>,
    // Meaningless without tools, which are refused.
    #[allow(dead_code)]
    pub tool_choice: Option<Value>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

impl Fields for ChatRequest {
    const FIELDS: &'static [&'static str] = &[
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "logprobs",
        "top_logprobs",
        "response_format",
        "tools",
        "tool_choice",
    ];
}

impl Fields for EmbeddingRequest {
    const FIELDS: &'static [&'static str] = &["model", "input", "encoding_format", "dimensions", "user"];
    const SAMPLING: bool = false;
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingRequest {
    // Accepted and not used: one model is served, whatever name the client gives (as
    // llama-server does); the response names the real one.
    #[allow(dead_code)]
    pub model: Option<String>,
    pub input: EmbeddingInput,
    pub encoding_format: Option<String>,
    pub dimensions: Option<usize>,
    // An end-user id for abuse tracking: accepted, not used.
    #[allow(dead_code)]
    pub user: Option<String>,
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt: usize, completion: usize) -> Self {
        Usage { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion }
    }
}

/// Parses a JSON body into `T`, every failure a 400 in OpenAI's shape naming the field (an
/// unknown one included).
pub fn parse<T: serde::de::DeserializeOwned + Fields>(body: &[u8]) -> Result<T, ApiError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("invalid request body: {e}"), None))?;
    if let Some(obj) = value.as_object() {
        let known = |k: &str| T::FIELDS.contains(&k) || (T::SAMPLING && SAMPLING_FIELDS.contains(&k));
        if let Some(k) = obj.keys().find(|k| !known(k)) {
            return Err(ApiError::invalid(format!("invalid request body: unknown field `{k}`"), Some(k)));
        }
    }
    serde_json::from_value(value).map_err(|e| {
        let msg = e.to_string();
        // serde names the field in "missing field `x`".
        let param = msg.split('`').nth(1).filter(|_| msg.contains(" field `")).map(str::to_owned);
        let mut err = ApiError::invalid(format!("invalid request body: {msg}"), None);
        err.param = param;
        err
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value every field takes (`stream` is a plain bool).
    fn any(_f: &str) -> &'static str {
        "null"
    }

    /// Every listed name parses (the lists and the structs agree), and an unlisted one is a
    /// 400 naming it.
    #[test]
    fn the_field_lists_match_the_requests() {
        for f in CompletionRequest::FIELDS.iter().chain(&SAMPLING_FIELDS).filter(|f| **f != "prompt") {
            let body = format!(r#"{{"prompt": "hi", "{f}": {}}}"#, any(f));
            assert!(parse::<CompletionRequest>(body.as_bytes()).is_ok(), "{f}");
        }
        for f in ChatRequest::FIELDS.iter().chain(&SAMPLING_FIELDS).filter(|f| **f != "messages") {
            let body = format!(r#"{{"messages": [], "{f}": {}}}"#, any(f));
            assert!(parse::<ChatRequest>(body.as_bytes()).is_ok(), "{f}");
        }
        for f in EmbeddingRequest::FIELDS.iter().filter(|f| **f != "input") {
            let body = format!(r#"{{"input": "hi", "{f}": null}}"#);
            assert!(parse::<EmbeddingRequest>(body.as_bytes()).is_ok(), "{f}");
        }
        let e = parse::<CompletionRequest>(br#"{"prompt": "hi", "tempurature": 1}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tempurature"));
        let e = parse::<EmbeddingRequest>(br#"{"input": "hi", "temperature": 1}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let e = parse::<CompletionRequest>(br#"{"max_tokens": 3}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"));
    }
}
