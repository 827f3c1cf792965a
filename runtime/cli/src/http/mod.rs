//! `edgelm serve --http ADDR`: the OpenAI-compatible HTTP API (`/v1/completions`,
//! `/v1/chat/completions`, `/v1/embeddings`, `/v1/models`, `/healthz`, `/readyz`, and
//! `/metrics` for Prometheus).
//!
//! One engine (one ONNX Runtime session) serves every request; each running request is a
//! sequence with its own KV cache on a blocking thread, the decode steps of all of them run as
//! one batch (`edgelm_runtime::batch`; `--no-batch`: their steps take turns). At most `max_sequences` run at once (from the board's memory budget: what is left
//! after the weights, divided by one sequence's KV cache at the full context); `queue` more
//! wait, up to `queue_timeout`; beyond that a request gets 429 with `Retry-After`. A request
//! whose client goes away stops at its next token and frees its sequence.
//!
//! For tests, `EDGELM_HTTP_STEP_DELAY_MS=N` sleeps N ms after every generated token, so a test
//! can hold sequences busy on a model that would otherwise answer in a millisecond.

mod api;
mod cache;
mod guard;
mod metrics;

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use edgelm_runtime::decoder::KvCacheMode;
use edgelm_runtime::encoder::Encoder;
use edgelm_runtime::{ChatMessage, Engine, GenerateParams, Generation, Model, StopReason};

use crate::board::{precision_name, Placement};
use api::{ApiError, ChatRequest, CompletionRequest, Content, EmbeddingRequest, Prompt, Sampling, Usage};

/// The HTTP server's settings (`edgelm serve --http`).
#[derive(clap::Args)]
pub struct HttpArgs {
    /// Serve the OpenAI-compatible HTTP API on this address (e.g. 0.0.0.0:8080) instead of a
    /// serial or TCP link.
    #[arg(long, conflicts_with_all = ["serial", "tcp"])]
    pub http: Option<String>,
    /// Sequences generated at once [default: as many KV caches at full context as the board's
    /// memory budget holds beside the weights; 4 without a board].
    #[arg(long)]
    pub max_sequences: Option<usize>,
    /// Most new tokens one request may ask for [default: the model's context].
    #[arg(long)]
    pub max_tokens_cap: Option<usize>,
    /// Seconds a request may run before it is stopped.
    #[arg(long, default_value_t = 300)]
    pub request_timeout: u64,
    /// Seconds a request may wait for a free sequence before it gets 503.
    #[arg(long, default_value_t = 30)]
    pub queue_timeout: u64,
    /// Largest request body in bytes (larger: 413).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Bytes of answers to greedy requests kept to answer repeats without the model (0: no
    /// cache).
    #[arg(long, default_value_t = 16 << 20)]
    pub cache_bytes: u64,
    /// Seconds a cached answer stays.
    #[arg(long, default_value_t = 600)]
    pub cache_ttl: u64,
    /// Share the response cache through Redis (e.g. redis://10.0.0.2:6379/), for a fleet.
    #[arg(long)]
    pub cache_redis: Option<String>,
    /// Run concurrent sequences' model steps one after another instead of batching their
    /// decode steps into one run (batching is faster on every model measured; this is for
    /// comparing).
    #[arg(long)]
    pub no_batch: bool,
    /// Never let a new prompt reuse the keys and values an earlier request left behind (with
    /// reuse, a client could tell from the time to its first token that another sent a prompt
    /// starting like its own).
    #[arg(long)]
    pub no_prompt_reuse: bool,
    /// Guard policy (TOML): prompt limits, denied patterns, injection heuristics, answer
    /// redaction, review threshold (see `http/guard.rs` and the README).
    #[arg(long)]
    pub guard: Option<PathBuf>,
}

/// The loaded model, shareable among requests.
enum Served {
    Lm(Arc<Engine>),
    Encoder(Arc<Mutex<Encoder>>),
}

/// One loaded bundle and what belongs to it. A reload replaces it whole; a request keeps the
/// one it started with until it ends, so the old model drains while the new one serves.
struct Loaded {
    model: Served,
    id: String,
    kind: &'static str,
    precision: String,
    sha256: String,
    created: u64,
    context: usize,
    max_tokens_cap: usize,
    weights: u64,
    kv_bytes: u64,
    cache: cache::ResponseCache,
    /// The tokenizer's special tokens (`<|im_start|>`, ...): chat content may not carry them,
    /// or a user could close their turn and open a system one.
    special_tokens: Vec<String>,
}

struct Server {
    loaded: std::sync::RwLock<Arc<Loaded>>,
    /// What a reload opens again (SIGHUP): the bundle path as given (a `current/model` link
    /// follows a deploy), with the same options and signature policy.
    bundle: PathBuf,
    opts: edgelm_runtime::EngineOptions,
    reload_error: Mutex<Option<String>>,
    created: u64,
    slots: Arc<Semaphore>,
    max_sequences: usize,
    /// Decode steps of concurrent sequences run as one batch of up to `max_sequences` (when
    /// the model's graph can), new prompts reusing free slots' caches or not.
    batch: bool,
    reuse_prompts: bool,
    /// The board's memory budget in bytes and its name, which a reloaded model must fit too.
    budget: Option<(u64, String)>,
    queue: usize,
    waiting: AtomicUsize,
    active: AtomicUsize,
    max_tokens_cap: Option<usize>,
    cache_bytes: u64,
    cache_ttl: Duration,
    cache_redis: Option<String>,
    request_timeout: Duration,
    queue_timeout: Duration,
    next_id: AtomicU64,
    step_delay: Option<Duration>,
    metrics: metrics::Metrics,
    guard: Option<Arc<guard::Guard>>,
}

/// Counts a request as waiting for as long as it lives (also when its client leaves mid-wait).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running sequence: holds its slot and counts as active until dropped.
struct Running {
    _permit: OwnedSemaphorePermit,
    server: Arc<Server>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.server.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Server {
    /// A slot for one sequence: at once, after waiting in the queue, or an error (429 when the
    /// queue is full, 503 after `queue_timeout`).
    async fn admit(self: &Arc<Self>) -> Result<Running, ApiError> {
        let permit = match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.queue {
                    self.waiting.fetch_sub(1, Ordering::SeqCst);
                    let mut e = ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate_limit_error",
                        format!(
                            "all {} sequences are busy and {} requests are waiting; try again shortly",
                            self.max_sequences, self.queue
                        ),
                    );
                    e.retry_after = Some(1);
                    return Err(e);
                }
                let _waiting = Waiting(&self.waiting);
                match tokio::time::timeout(self.queue_timeout, Arc::clone(&self.slots).acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => {
                        let mut e = ApiError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "server_error",
                            format!("no sequence came free within {} s", self.queue_timeout.as_secs()),
                        );
                        e.retry_after = Some(1);
                        return Err(e);
                    }
                }
            }
        };
        self.active.fetch_add(1, Ordering::SeqCst);
        Ok(Running { _permit: permit, server: Arc::clone(self) })
    }

    /// The model serving now.
    fn loaded(&self) -> Arc<Loaded> {
        Arc::clone(&self.loaded.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Opens the bundle again and, if it loads (signature checked as at start), serves it from
    /// the next request on. A bundle that fails leaves the current one serving.
    fn reload(&self) -> Result<()> {
        let new = Loaded::open(
            &self.bundle,
            &self.opts,
            self.max_tokens_cap,
            self.cache_bytes,
            self.cache_ttl,
            self.cache_redis.as_deref(),
            false,
        )
        .with_context(|| format!("reloading {}", self.bundle.display()));
        let new = new.and_then(|mut n| {
            self.fit(&n)?;
            if self.batch {
                n.enable_batching(self.max_sequences, self.reuse_prompts);
            }
            Ok(n)
        });
        let new = match new {
            Ok(n) => n,
            Err(e) => {
                *self.reload_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{e:#}"));
                return Err(e);
            }
        };
        self.metrics.set_model(&new.id, new.kind, &new.precision, &new.sha256);
        eprintln!("edgelm serve: now serving {} ({}, sha256 {})", new.id, new.precision, new.sha256);
        *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        *self.reload_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }

    /// Refuses a model whose weights and `max_sequences` KV caches at full context overflow
    /// the board's budget (the count was set from the first model's sizes).
    fn fit(&self, new: &Loaded) -> Result<()> {
        let Some((budget, board)) = &self.budget else { return Ok(()) };
        let needs = new.weights + self.max_sequences as u64 * new.kv_bytes;
        if needs > *budget {
            bail!(
                "{} needs {} MiB for {} sequences (weights {} MiB + KV cache {} MiB each), over board `{board}`'s budget of {} MiB; restart the server to size it for this model",
                new.id,
                needs >> 20,
                self.max_sequences,
                new.weights >> 20,
                new.kv_bytes >> 20,
                budget >> 20
            );
        }
        Ok(())
    }

    fn new_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}{n:06x}", self.created)
    }

    /// The guard's verdict on a request's texts: a 400 naming the rule (and a log line) when
    /// one is refused.
    fn screen<'t>(&self, texts: impl IntoIterator<Item = &'t str>, param: &str) -> Result<(), ApiError> {
        let Some(g) = &self.guard else { return Ok(()) };
        for t in texts {
            if let Some(why) = g.check_prompt(t) {
                eprintln!("edgelm serve: guard refused a request: {why}");
                let mut e = ApiError::invalid(format!("refused by the server's policy: {why}"), Some(param));
                e.code = Some("content_policy_violation");
                return Err(e);
            }
        }
        Ok(())
    }
}

impl Loaded {
    /// Batches the decode steps of up to `sequences` concurrent sequences (a causal LM whose
    /// graph can; otherwise, or when the memory is refused, which is logged, its steps take
    /// turns). Called before the model is shared.
    fn enable_batching(&mut self, sequences: usize, reuse_prompts: bool) {
        if let Served::Lm(engine) = &mut self.model {
            let Some(engine) = Arc::get_mut(engine) else { return };
            if let Err(e) = engine.enable_batching(sequences, reuse_prompts) {
                eprintln!("edgelm serve: decode steps not batched: {e}");
            }
        }
    }

    /// Whether its decode steps run batched.
    fn batched(&self) -> bool {
        match &self.model {
            Served::Lm(e) => e.batch_sequences() > 0,
            Served::Encoder(_) => false,
        }
    }

    /// Opens `bundle` and works out what it needs. With `redis_required`, a Redis that cannot
    /// be reached is an error (at start, where a wrong address should stop the server);
    /// otherwise the cache starts without it and connects later (a reload).
    fn open(
        bundle: &Path,
        opts: &edgelm_runtime::EngineOptions,
        max_tokens_cap: Option<usize>,
        cache_bytes: u64,
        cache_ttl: Duration,
        cache_redis: Option<&str>,
        redis_required: bool,
    ) -> Result<Loaded> {
        let model = Model::open(bundle, opts).with_context(|| format!("opening {}", bundle.display()))?;
        let id = std::fs::canonicalize(bundle)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "model".into());
        let manifest = std::fs::read(bundle.join("edgelm.json")).unwrap_or_default();
        if manifest.is_empty() && cache_redis.is_some() {
            // Shared answers are keyed by the manifest's hash: without one, two models would
            // share keys.
            bail!("--cache-redis needs an edgelm bundle (its edgelm.json names the model's answers)");
        }
        let sha256 = {
            use sha2::{Digest, Sha256};
            edgelm_runtime::bundle::hex(&Sha256::digest(&manifest))
        };
        let (model, kind, precision, context, weights, kv_bytes) = match model {
            Model::CausalLm(e) => {
                let precision = e.bundle().manifest.as_ref().map(|m| precision_name(m.quantization));
                let (w, k, c) = (e.weight_bytes(), e.kv_cache_bytes(e.context_length()), e.context_length());
                (Served::Lm(Arc::from(e)), "causal-lm", precision, c, w, k)
            }
            Model::Encoder(e) => {
                let precision = e.manifest().map(|m| precision_name(m.quantization));
                let (w, c) = (e.weight_bytes(), e.context_length().unwrap_or(0));
                (Served::Encoder(Arc::new(Mutex::new(*e))), "encoder", precision, c, w, 0)
            }
        };
        let cache = cache::ResponseCache::new(cache_bytes, cache_ttl, cache_redis, &sha256, redis_required)?;
        let special_tokens = match &model {
            Served::Lm(e) => e.codec().map_or_else(Vec::new, |c| {
                c.tokenizer()
                    .get_added_tokens_decoder()
                    .values()
                    .filter(|t| t.special && !t.content.is_empty())
                    .map(|t| t.content.clone())
                    .collect()
            }),
            Served::Encoder(_) => Vec::new(),
        };
        Ok(Loaded {
            model,
            id,
            kind,
            precision: precision.unwrap_or_else(|| "unknown".into()),
            sha256,
            created: now_secs(),
            context,
            max_tokens_cap: max_tokens_cap.unwrap_or(context).max(1),
            weights,
            kv_bytes,
            cache,
            special_tokens,
        })
    }

    fn engine(&self) -> Result<&Arc<Engine>, ApiError> {
        match &self.model {
            Served::Lm(e) => Ok(e),
            Served::Encoder(_) => Err(ApiError::invalid(
                format!("model `{}` is a sentence encoder: use /v1/embeddings", self.id),
                Some("model"),
            )),
        }
    }

    /// Generation settings from a request's fields: the bundle's defaults where it gives none,
    /// a 400 for what cannot be honoured.
    fn params(
        &self,
        guard: Option<&guard::Guard>,
        engine: &Engine,
        s: &Sampling,
        max_tokens: Option<usize>,
        prompt_len: usize,
    ) -> Result<GenerateParams, ApiError> {
        if s.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("only n = 1 is supported", Some("n")));
        }
        for (v, name) in [(s.presence_penalty, "presence_penalty"), (s.frequency_penalty, "frequency_penalty")] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(ApiError::invalid(format!("{name} is not supported (only 0)"), Some(name)));
            }
        }
        if s.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return Err(ApiError::invalid("logit_bias is not supported", Some("logit_bias")));
        }
        let mut sampling = engine.default_sampling();
        if let Some(t) = s.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::invalid("temperature must be between 0 and 2", Some("temperature")));
            }
            sampling = sampling.with_temperature(t);
        }
        if let Some(p) = s.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ApiError::invalid("top_p must be in (0, 1]", Some("top_p")));
            }
            sampling = sampling.with_top_p(p);
        }
        if let Some(k) = s.top_k {
            sampling = sampling.with_top_k(k);
        }
        // Without a seed each sampled request draws its own, as OpenAI's do (the bundle's
        // default seed would give every "random" answer to a prompt the same text).
        let seed = s.seed.unwrap_or_else(fresh_seed);
        sampling = sampling.with_seed(seed);
        let stops = s.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
        if stops.len() > 4 {
            return Err(ApiError::invalid("at most 4 stop sequences", Some("stop")));
        }
        if prompt_len >= self.context {
            return Err(ApiError::invalid(
                format!("the prompt has {prompt_len} tokens; this model's context is {} tokens", self.context),
                Some("messages"),
            ));
        }
        let room = self.context - prompt_len;
        let max_new = match max_tokens {
            Some(0) => return Err(ApiError::invalid("max_tokens must be at least 1", Some("max_tokens"))),
            Some(n) if n > self.max_tokens_cap => {
                return Err(ApiError::invalid(
                    format!("max_tokens is {n}; this server allows at most {}", self.max_tokens_cap),
                    Some("max_tokens"),
                ))
            }
            Some(n) if n > room => {
                return Err(ApiError::invalid(
                    format!(
                        "this model's context is {} tokens; the prompt takes {prompt_len} and max_tokens asks for {n}",
                        self.context
                    ),
                    Some("max_tokens"),
                ))
            }
            Some(n) => n,
            None => room.min(self.max_tokens_cap),
        };
        let logprobs = guard.is_some_and(|g| g.wants_logprobs());
        Ok(GenerateParams::default()
            .with_max_new_tokens(max_new)
            .with_ignore_eos(s.ignore_eos.unwrap_or(false))
            .with_sampling(sampling)
            .with_stop_strings(stops)
            .with_logprobs(logprobs))
    }
}

fn finish_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::Eos | StopReason::StopString | StopReason::Cancelled => "stop",
        StopReason::MaxTokens | StopReason::ContextFull => "length",
    }
}

/// A seed no other request of this process gets.
fn fresh_seed() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    nanos ^ NEXT.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed).rotate_left(17) ^ u64::from(std::process::id())
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn runtime_error(e: &edgelm_runtime::Error) -> ApiError {
    use edgelm_runtime::Error as E;
    match e {
        E::InvalidRequest(_) | E::ContextOverflow { .. } | E::TokenOutOfRange { .. } | E::Template(_) => {
            ApiError::invalid(e.to_string(), None)
        }
        _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.to_string()),
    }
}

/// What the blocking generation sends the request's task.
enum Step {
    Piece(String),
    Done(Result<Generation, ApiError>),
}

/// Runs one sequence on a blocking thread, sending its text as it comes. It stops when the
/// receiver is gone (the client left) or the request's time is up.
fn start_generation(
    running: Running,
    loaded: Arc<Loaded>,
    engine: Arc<Engine>,
    prompt: Vec<u32>,
    params: GenerateParams,
    cache_key: Option<cache::Key>,
) -> mpsc::Receiver<Step> {
    let (tx, rx) = mpsc::channel(64);
    let deadline = Instant::now() + running.server.request_timeout;
    let step_delay = running.server.step_delay;
    let server = Arc::clone(&running.server);
    tokio::task::spawn_blocking(move || {
        let _running = running;
        let timed_out = std::cell::Cell::new(false);
        let mut last_token: Option<Instant> = None;
        let mut opened = false;
        let result = engine.generate_until(
            &prompt,
            &params,
            || {
                timed_out.set(Instant::now() > deadline);
                timed_out.get() || tx.is_closed()
            },
            |event| {
                if event.id.is_some() {
                    let now = Instant::now();
                    if let Some(t) = last_token.replace(now) {
                        server.metrics.token_latency.observe((now - t).as_secs_f64());
                    }
                }
                if let Some(d) = step_delay {
                    std::thread::sleep(d);
                }
                // The first token opens the stream even when its text is held back (a partial
                // character): a client's time to first token is the model's.
                let first = !opened && event.id.is_some();
                if first || !event.text.is_empty() {
                    opened = true;
                    // A client that stops reading fills the channel: the wait for room ends at
                    // the request's deadline, so it cannot hold a sequence for ever.
                    if !send_until(&tx, Step::Piece(event.text.to_owned()), deadline) {
                        timed_out.set(Instant::now() > deadline);
                        return ControlFlow::Break(());
                    }
                }
                ControlFlow::Continue(())
            },
        );
        let timed_out = timed_out.get();
        if let (Ok(g), Some(key), false) = (&result, cache_key, timed_out) {
            loaded.cache.put(key, g);
        }
        if let Ok(g) = &result {
            let m = &server.metrics;
            m.ttft.observe(g.metrics.ttft_ms / 1e3);
            m.generated_tokens.inc_by(g.generated_ids.len() as u64);
            if g.metrics.decode_tokens_per_s > 0.0 {
                m.decode_tokens_per_s.set(g.metrics.decode_tokens_per_s);
            }
        }
        let result = match result {
            Ok(_) if timed_out => Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                "the request ran past the server's request timeout",
            )),
            Ok(g) => Ok(g),
            Err(e) => Err(runtime_error(&e)),
        };
        let _ = send_until(&tx, Step::Done(result), deadline.max(Instant::now()) + Duration::from_secs(1));
    });
    rx
}

/// Sends `step` unless the client has gone or `deadline` passes first; whether it was sent.
fn send_until(tx: &mpsc::Sender<Step>, mut step: Step, deadline: Instant) -> bool {
    loop {
        match tx.try_send(step) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            Err(mpsc::error::TrySendError::Full(back)) => {
                if Instant::now() > deadline {
                    return false;
                }
                step = back;
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// The kind of answer: a completion's text, or a chat message.
#[derive(Clone, Copy, PartialEq)]
enum Shape {
    Completion,
    Chat,
}

struct Answer {
    shape: Shape,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    guard: Option<Arc<guard::Guard>>,
}

impl Answer {
    fn chunk(&self, choice: Value, usage: Option<Usage>) -> Value {
        let object = if self.shape == Shape::Chat { "chat.completion.chunk" } else { "text_completion" };
        let mut v = json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": if choice.is_null() { json!([]) } else { json!([choice]) },
        });
        if let Some(u) = usage {
            v["usage"] = json!(u);
        }
        v
    }

    fn piece(&self, text: &str, first: bool) -> Value {
        match self.shape {
            Shape::Completion => {
                json!({"text": text, "index": 0, "logprobs": null, "finish_reason": null})
            }
            Shape::Chat if first => {
                json!({"index": 0, "delta": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": null})
            }
            Shape::Chat => json!({"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null}),
        }
    }

    fn last(&self, reason: &str) -> Value {
        match self.shape {
            Shape::Completion => json!({"text": "", "index": 0, "logprobs": null, "finish_reason": reason}),
            Shape::Chat => json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": reason}),
        }
    }

    fn redacts(&self) -> bool {
        self.guard.as_ref().is_some_and(|g| g.redacts())
    }

    /// The answer's text as the client may see it.
    fn text(&self, raw: &str) -> String {
        match &self.guard {
            Some(g) => g.redact(raw),
            None => raw.to_owned(),
        }
    }

    /// Adds the review mark to a response object when the guard asks for one (and logs it).
    fn mark(&self, v: &mut Value, g: &Generation) {
        if self.guard.as_ref().is_some_and(|guard| guard.needs_review(g.mean_logprob)) {
            let m = g.mean_logprob.unwrap_or(f64::NAN);
            eprintln!("edgelm serve: review: {} has a mean token log-probability of {m:.3}", self.id);
            v["edgelm"] = json!({"review": true, "mean_logprob": m});
        }
    }

    fn whole(&self, g: &Generation) -> Value {
        let reason = finish_reason(g.stop_reason);
        let usage = Usage::new(g.prompt_ids.len(), g.generated_ids.len());
        let text = self.text(&g.text);
        let choice = match self.shape {
            Shape::Completion => json!({"text": text, "index": 0, "logprobs": null, "finish_reason": reason}),
            Shape::Chat => json!({
                "index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": null, "finish_reason": reason,
            }),
        };
        let object = if self.shape == Shape::Chat { "chat.completion" } else { "text_completion" };
        let mut v = json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": [choice], "usage": usage,
        });
        self.mark(&mut v, g);
        v
    }
}

/// Runs an admitted request and answers it whole or as server-sent events.
async fn answer(
    server: &Arc<Server>,
    m: &Arc<Loaded>,
    shape: Shape,
    prompt: Vec<u32>,
    params: GenerateParams,
    stream: bool,
    include_usage: bool,
) -> Result<Response, ApiError> {
    let engine = Arc::clone(m.engine()?);
    let a = Answer {
        shape,
        id: server.new_id(if shape == Shape::Chat { "chatcmpl" } else { "cmpl" }),
        model: m.id.clone(),
        created: now_secs(),
        include_usage,
        guard: server.guard.clone(),
    };
    let key = m.cache.key(if shape == Shape::Chat { "chat" } else { "completion" }, &prompt, &params);
    // Off the async workers: a lookup may ask Redis.
    let cached = match key {
        Some(k) => {
            let m = Arc::clone(m);
            tokio::task::spawn_blocking(move || m.cache.get(&k)).await.ok().flatten()
        }
        None => None,
    };
    if key.is_some() {
        server.metrics.cache(cached.is_some());
    }
    let mut rx = match cached {
        // A repeat: the stored answer, with no sequence and no model step.
        Some(g) => {
            let (tx, rx) = mpsc::channel(2);
            let _ = tx.try_send(Step::Piece(g.text.clone()));
            let _ = tx.try_send(Step::Done(Ok((*g).clone())));
            rx
        }
        None => {
            let running = server.admit().await?;
            start_generation(running, Arc::clone(m), engine, prompt, params, key)
        }
    };
    if !stream {
        // Dropping `rx` (the client left, so axum drops this future) stops the generation.
        loop {
            match rx.recv().await {
                Some(Step::Piece(_)) => {}
                Some(Step::Done(Ok(g))) => return Ok(Json(a.whole(&g)).into_response()),
                Some(Step::Done(Err(e))) => return Err(e),
                None => {
                    return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "generation ended"))
                }
            }
        }
    }
    let events = async_stream(a, rx);
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}

/// The SSE events of a streamed answer: a chunk per piece of text, the last chunk with the
/// finish reason, the usage chunk when asked for, then `[DONE]`.
fn async_stream(
    a: Answer,
    rx: mpsc::Receiver<Step>,
) -> impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>> {
    enum St {
        /// Streaming: the answer, the generation's channel, whether nothing was sent yet, and
        /// the text held back while the guard redacts (it sees the whole answer first).
        Open(Answer, mpsc::Receiver<Step>, bool, String),
        Tail(Vec<Event>),
    }
    futures_util::stream::unfold(St::Open(a, rx, true, String::new()), |state| async move {
        match state {
            St::Open(a, mut rx, first, mut held) => loop {
                match rx.recv().await {
                    Some(Step::Piece(text)) if a.redacts() => held.push_str(&text),
                    Some(Step::Piece(text)) => {
                        let ev = Event::default().data(a.chunk(a.piece(&text, first), None).to_string());
                        break Some((Ok(ev), St::Open(a, rx, false, held)));
                    }
                    Some(Step::Done(result)) => {
                        let mut tail = Vec::new();
                        match result {
                            Ok(g) => {
                                let text = a.text(&held);
                                if !text.is_empty() || (first && a.shape == Shape::Chat) {
                                    tail.push(Event::default().data(a.chunk(a.piece(&text, first), None).to_string()));
                                }
                                let mut last = a.chunk(a.last(finish_reason(g.stop_reason)), None);
                                a.mark(&mut last, &g);
                                tail.push(Event::default().data(last.to_string()));
                                if a.include_usage {
                                    let u = Usage::new(g.prompt_ids.len(), g.generated_ids.len());
                                    tail.push(Event::default().data(a.chunk(Value::Null, Some(u)).to_string()));
                                }
                            }
                            Err(e) => tail.push(Event::default().data(e.body().to_string())),
                        }
                        tail.push(Event::default().data("[DONE]"));
                        tail.reverse();
                        let ev = tail.pop().expect("at least [DONE]");
                        break Some((Ok(ev), St::Tail(tail)));
                    }
                    // The generation ended without a word (it panicked): say so, so no client
                    // takes a cut answer for a whole one.
                    None => {
                        let e =
                            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the generation failed");
                        let tail = vec![Event::default().data("[DONE]"), Event::default().data(e.body().to_string())];
                        let mut tail = tail;
                        let ev = tail.pop().expect("two events");
                        break Some((Ok(ev), St::Tail(tail)));
                    }
                }
            },
            St::Tail(mut tail) => tail.pop().map(|ev| (Ok(ev), St::Tail(tail))),
        }
    })
}

async fn completions(
    State(server): State<Arc<Server>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    let req: CompletionRequest = api::parse(&body)?;
    let m = server.loaded();
    let engine = Arc::clone(m.engine()?);
    for (bad, name) in [
        (req.echo == Some(true), "echo"),
        (req.best_of.is_some_and(|b| b != 1), "best_of"),
        (req.suffix.is_some(), "suffix"),
        (req.logprobs.as_ref().is_some_and(|l| !l.is_null()), "logprobs"),
    ] {
        if bad {
            return Err(ApiError::invalid(format!("{name} is not supported"), Some(name)));
        }
    }
    let ids = match req.prompt.clone() {
        Prompt::Text(t) => {
            server.screen([t.as_str()], "prompt")?;
            tokens(&engine, &t)?
        }
        Prompt::Texts(v) if v.len() == 1 => {
            server.screen([v[0].as_str()], "prompt")?;
            tokens(&engine, &v[0])?
        }
        Prompt::Ids(ids) => screened_ids(&server, &engine, ids)?,
        Prompt::IdLists(v) if v.len() == 1 => screened_ids(&server, &engine, v[0].clone())?,
        _ => return Err(ApiError::invalid("send one prompt per request", Some("prompt"))),
    };
    let s = &req.sampling;
    let params = m.params(server.guard.as_deref(), &engine, s, req.max_tokens, ids.len())?;
    engine.check_request(&ids, &params).map_err(|e| runtime_error(&e))?;
    let usage = s.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
    answer(&server, &m, Shape::Completion, ids, params, s.stream.unwrap_or(false), usage).await
}

/// A prompt given as token ids, screened as the text it decodes to.
fn screened_ids(server: &Server, engine: &Engine, ids: Vec<u32>) -> Result<Vec<u32>, ApiError> {
    if server.guard.is_some() {
        let codec = engine.codec().ok_or_else(|| {
            ApiError::invalid("this bundle has no tokenizer to check token prompts with", Some("prompt"))
        })?;
        let text = codec.decode(&ids).map_err(|e| runtime_error(&e))?;
        server.screen([text.as_str()], "prompt")?;
    }
    Ok(ids)
}

fn tokens(engine: &Engine, text: &str) -> Result<Vec<u32>, ApiError> {
    if text.is_empty() {
        return Err(ApiError::invalid("the prompt is empty", Some("prompt")));
    }
    engine.encode(text).map_err(|e| runtime_error(&e))
}

async fn chat(State(server): State<Arc<Server>>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = body?;
    let req: ChatRequest = api::parse(&body)?;
    let m = server.loaded();
    let engine = Arc::clone(m.engine()?);
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::invalid("tools are not supported", Some("tools")));
    }
    if req.logprobs == Some(true) || req.top_logprobs.is_some() {
        return Err(ApiError::invalid("logprobs are not supported", Some("logprobs")));
    }
    if let Some(f) = &req.response_format {
        if f.get("type").and_then(Value::as_str) != Some("text") {
            return Err(ApiError::invalid("only the text response format is supported", Some("response_format")));
        }
    }
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages is empty", Some("messages")));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    let special_tokens = &m.special_tokens;
    for (i, m) in req.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::invalid(
                    format!("messages[{i}]: role `{other}` is not supported (system, user, assistant)"),
                    Some("messages"),
                ))
            }
        };
        let text = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut t = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(s)) => t.push_str(s),
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                format!("messages[{i}]: content parts of type `{kind}` are not supported"),
                                Some("messages"),
                            ))
                        }
                    }
                }
                t
            }
        };
        if let Some(t) = special_tokens.iter().find(|t| text.contains(t.as_str())) {
            return Err(ApiError::invalid(
                format!("messages[{i}] contains the special token `{t}`, which only the chat template may write"),
                Some("messages"),
            ));
        }
        messages.push(ChatMessage::new(role, text));
    }
    server.screen(messages.iter().map(|m| m.content.as_str()), "messages")?;
    let ids = engine.encode_chat(&messages).map_err(|e| match e {
        edgelm_runtime::Error::Template(_) | edgelm_runtime::Error::NoTokenizer => {
            ApiError::invalid(format!("{e}; this bundle cannot format chats: use /v1/completions"), Some("messages"))
        }
        e => runtime_error(&e),
    })?;
    let s = &req.sampling;
    let params =
        m.params(server.guard.as_deref(), &engine, s, req.max_completion_tokens.or(req.max_tokens), ids.len())?;
    engine.check_request(&ids, &params).map_err(|e| runtime_error(&e))?;
    let usage = s.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
    answer(&server, &m, Shape::Chat, ids, params, s.stream.unwrap_or(false), usage).await
}

async fn embeddings(
    State(server): State<Arc<Server>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    let req: EmbeddingRequest = api::parse(&body)?;
    let m = server.loaded();
    let Served::Encoder(enc) = &m.model else {
        return Err(ApiError::invalid(format!("model `{}` is not an encoder", m.id), Some("model")));
    };
    // The openai client asks for base64 unless told otherwise.
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("encoding_format `{other}` is not supported (float, base64)"),
                Some("encoding_format"),
            ))
        }
    };
    if req.dimensions.is_some() {
        return Err(ApiError::invalid("dimensions is not supported", Some("dimensions")));
    }
    let inputs = match req.input {
        api::EmbeddingInput::Texts(t) => t.into_vec(),
        _ => {
            return Err(ApiError::invalid(
                "token-id inputs are not supported: send text (LangChain: check_embedding_ctx_length=False)",
                Some("input"),
            ))
        }
    };
    if inputs.is_empty() {
        return Err(ApiError::invalid("input is empty", Some("input")));
    }
    // OpenAI's own bound: one request cannot hold the encoder (and memory) for minutes.
    if inputs.len() > 2048 {
        return Err(ApiError::invalid(format!("{} inputs; at most 2048 per request", inputs.len()), Some("input")));
    }
    server.screen(inputs.iter().map(String::as_str), "input")?;
    let running = server.admit().await?;
    let enc = Arc::clone(enc);
    let result = tokio::task::spawn_blocking(move || {
        let _running = running;
        let mut enc = enc.lock().unwrap_or_else(|e| e.into_inner());
        let mut data = Vec::with_capacity(inputs.len());
        let mut tokens = 0;
        for (i, text) in inputs.iter().enumerate() {
            tokens += enc.token_count(text).map_err(|e| runtime_error(&e))?;
            let v = enc.embed(text).map_err(|e| runtime_error(&e))?;
            let embedding = if base64 { json!(base64_f32(&v)) } else { json!(v) };
            data.push(json!({"object": "embedding", "index": i, "embedding": embedding}));
        }
        Ok::<_, ApiError>((data, tokens))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.to_string()))?;
    let (data, tokens) = result?;
    Ok(Json(json!({
        "object": "list", "data": data, "model": m.id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}

/// Little-endian f32 bytes in standard base64, as OpenAI's `encoding_format: "base64"`.
fn base64_f32(v: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn models(State(server): State<Arc<Server>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_card(&server.loaded())]}))
}

fn model_card(s: &Loaded) -> Value {
    json!({
        "id": s.id, "object": "model", "created": s.created, "owned_by": "edgelm",
        "edgelm": {"kind": s.kind, "precision": s.precision, "sha256": s.sha256, "context_length": s.context},
    })
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(server): State<Arc<Server>>) -> Json<Value> {
    let loaded = server.loaded();
    Json(json!({
        "ready": true,
        "model": model_card(&loaded),
        "last_reload_error": *server.reload_error.lock().unwrap_or_else(|p| p.into_inner()),
        "max_sequences": server.max_sequences,
        "batched_decode": loaded.batched(),
        // Since this model loaded: batched steps, sequences' steps in them, placeholder rows,
        // prompt tokens found already in a free slot's cache.
        "batch": match &loaded.model {
            Served::Lm(e) => {
                let b = e.batch_stats();
                json!({"steps": b.steps, "rows": b.rows, "placeholders": b.placeholders, "reused_prompt_tokens": b.reused})
            }
            Served::Encoder(_) => Value::Null,
        },
        // What the count was worked out from (with a board: its budget less the weights,
        // divided by one sequence's KV cache at the full context).
        "weights_bytes": loaded.weights,
        "kv_cache_bytes_per_sequence": loaded.kv_bytes,
        "context_length": loaded.context,
        "active_sequences": server.active.load(Ordering::SeqCst),
        "queued": server.waiting.load(Ordering::SeqCst),
        "queue_limit": server.queue,
    }))
}

async fn not_found(State(server): State<Arc<Server>>) -> ApiError {
    server.metrics.request("unmatched", 404);
    ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "no such route")
}

async fn metrics_text(State(server): State<Arc<Server>>) -> Response {
    let text = server.metrics.render(server.waiting.load(Ordering::SeqCst), server.active.load(Ordering::SeqCst));
    ([(axum::http::header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}

/// Counts every answered request by its route and status.
async fn count_requests(
    State(server): State<Arc<Server>>,
    route: axum::extract::MatchedPath,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = route.as_str().to_owned();
    let response = next.run(request).await;
    server.metrics.request(&route, response.status().as_u16());
    response
}

/// Opens the bundle, works out how many sequences fit, and serves until SIGINT/SIGTERM.
pub fn serve_http(
    addr: &str,
    h: &HttpArgs,
    bundle: &Path,
    queue: usize,
    threads: usize,
    kv: KvCacheMode,
    place: &Placement,
) -> Result<()> {
    // main() restores SIGPIPE's default (a closed stdout ends a CLI quietly). The HTTP stack
    // writes to sockets with writev, which raises SIGPIPE when the client has left: that would
    // end the server. Ignored, the write fails with EPIPE and the request ends.
    // SAFETY: changing a signal's disposition touches no Rust state.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    // glibc gives each thread that allocates its own arena, and requests move between many
    // threads here: a 10 000-request soak grew the server by 5.1 MiB with the default and by
    // 3.8 MiB with two arenas, at the same speed (BENCHMARKS.md).
    #[cfg(target_env = "gnu")]
    // SAFETY: a malloc tuning call, made before the server's threads start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let opts = place.engine_options(threads, kv)?;
    let cache_ttl = Duration::from_secs(h.cache_ttl);
    let first =
        Loaded::open(bundle, &opts, h.max_tokens_cap, h.cache_bytes, cache_ttl, h.cache_redis.as_deref(), true)?;
    let (weights, kv_bytes, context) = (first.weights, first.kv_bytes, first.context);
    let max_sequences = match (h.max_sequences, &place.board) {
        (Some(0), _) => bail!("--max-sequences must be at least 1"),
        (Some(n), Some(b)) if weights + n as u64 * kv_bytes > b.memory_budget_mib << 20 => bail!(
            "{n} sequences need {} MiB (weights {} MiB + KV cache {} MiB each at {context} tokens), over board `{}`'s budget of {} MiB",
            (weights + n as u64 * kv_bytes) >> 20,
            weights >> 20,
            kv_bytes >> 20,
            b.id,
            b.memory_budget_mib
        ),
        (Some(n), _) => n,
        (None, Some(b)) => {
            let budget = b.memory_budget_mib << 20;
            if weights + kv_bytes > budget {
                bail!(
                    "one sequence needs {} MiB (weights {} MiB + KV cache {} MiB at {context} tokens), over board `{}`'s budget of {} MiB",
                    (weights + kv_bytes) >> 20,
                    weights >> 20,
                    kv_bytes >> 20,
                    b.id,
                    b.memory_budget_mib
                );
            }
            // An encoder holds no KV cache: its count is not memory-bound.
            (budget - weights).checked_div(kv_bytes).map_or(4, |n| n.clamp(1, 64) as usize)
        }
        (None, None) => 4,
    };
    let mut first = first;
    if !h.no_batch {
        first.enable_batching(max_sequences, !h.no_prompt_reuse);
    }
    let batched = first.batched();
    let guard = h.guard.as_deref().map(guard::Guard::load).transpose()?.map(Arc::new);
    let metrics = metrics::Metrics::new();
    metrics.set_model(&first.id, first.kind, &first.precision, &first.sha256);
    let banner = format!(
        "edgelm serve: model {} ({}, {}), {max_sequences} sequences at once{} (weights {} MiB, KV cache {} MiB each at {context} tokens), queue {queue}",
        first.id,
        first.kind,
        first.precision,
        if batched { ", decode steps batched" } else { "" },
        weights >> 20,
        kv_bytes >> 20,
    );
    let server = Arc::new(Server {
        loaded: std::sync::RwLock::new(Arc::new(first)),
        bundle: bundle.to_path_buf(),
        opts,
        reload_error: Mutex::new(None),
        created: now_secs(),
        slots: Arc::new(Semaphore::new(max_sequences)),
        max_sequences,
        batch: !h.no_batch,
        reuse_prompts: !h.no_prompt_reuse,
        budget: place.board.as_ref().map(|b| (b.memory_budget_mib << 20, b.id.clone())),
        queue,
        waiting: AtomicUsize::new(0),
        active: AtomicUsize::new(0),
        max_tokens_cap: h.max_tokens_cap,
        cache_bytes: h.cache_bytes,
        cache_ttl,
        cache_redis: h.cache_redis.clone(),
        request_timeout: Duration::from_secs(h.request_timeout),
        queue_timeout: Duration::from_secs(h.queue_timeout),
        next_id: AtomicU64::new(0),
        step_delay: std::env::var("EDGELM_HTTP_STEP_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis),
        metrics,
        guard,
    });
    let app = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route_layer(axum::middleware::from_fn_with_state(Arc::clone(&server), count_requests))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(h.max_body_bytes))
        .with_state(Arc::clone(&server));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        let local: SocketAddr = listener.local_addr()?;
        eprintln!("{banner}");
        tokio::spawn(reload_on_sighup(Arc::clone(&server)));
        eprintln!("edgelm serve: listening on http://{local}");
        axum::serve(listener, app).with_graceful_shutdown(shutdown()).await.context("HTTP server")
    })
}

/// SIGHUP (`systemctl reload`, or after `edgelm deploy` switched slots) reopens the bundle and
/// swaps it in; requests running on the old one finish on it.
async fn reload_on_sighup(server: Arc<Server>) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
    while hup.recv().await.is_some() {
        let s = Arc::clone(&server);
        let done = tokio::task::spawn_blocking(move || s.reload()).await;
        if let Ok(Err(e)) = done {
            eprintln!("edgelm serve: reload failed, still serving the previous model: {e:#}");
        }
    }
}

async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

/// Bodies over the limit and bodies that are not JSON get OpenAI's error shape too.
impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        let status = r.status();
        let kind = if status == StatusCode::PAYLOAD_TOO_LARGE { "invalid_request_error" } else { "server_error" };
        ApiError::new(status, kind, r.body_text())
    }
}
