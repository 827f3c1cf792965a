//! The response cache: answers to deterministic requests (greedy sampling), kept in memory up
//! to a byte budget and a time to live, so a repeated question is answered without running
//! the model. The key is everything that decides a greedy answer: the endpoint, the prompt's
//! token ids, the token limit, the stop strings, the repetition penalty, `ignore_eos` and
//! whether log-probabilities were taken. A new model means new answers: the server holds one cache per loaded model.
//!
//! With `--cache-redis URL` a fleet shares answers: a miss in memory asks Redis (keys
//! `edgelm:v1:<model sha256>:<request key>`, expiring with the TTL), and every new answer is
//! stored in both. Redis being away never fails a request: the answer is generated, and the
//! trouble logged once per outage. A broken connection is opened again at the next use (at
//! most once every [`RECONNECT_EVERY`] while Redis stays away), so a restarted Redis is picked
//! up without restarting the server.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use edgelm_runtime::{GenerateParams, Generation, StopReason};

pub type Key = [u8; 32];

pub struct ResponseCache {
    inner: Option<moka::sync::Cache<Key, Arc<Generation>>>,
    shared: Option<Shared>,
}

/// Least time between attempts to reach a Redis that is away.
pub const RECONNECT_EVERY: Duration = Duration::from_secs(2);

/// The Redis tier: one connection (None after it broke), the key prefix of this model,
/// whether Redis is away (an outage, logged when it starts and ends), and whether a command's
/// failure was logged already.
struct Shared {
    client: redis::Client,
    conn: Mutex<Link>,
    prefix: String,
    ttl: u64,
    away: AtomicBool,
    warned: AtomicBool,
}

struct Link {
    conn: Option<redis::Connection>,
    /// When a connection was last tried.
    tried: Instant,
}

/// An answer as Redis holds it.
#[derive(Serialize, Deserialize)]
struct Stored {
    text: String,
    prompt_ids: Vec<u32>,
    generated_ids: Vec<u32>,
    stop_reason: String,
    mean_logprob: Option<f64>,
}

fn reason_name(r: StopReason) -> &'static str {
    match r {
        StopReason::Eos => "eos",
        StopReason::StopString => "stop_string",
        StopReason::MaxTokens => "max_tokens",
        StopReason::ContextFull => "context_full",
        StopReason::Cancelled => "cancelled",
    }
}

fn reason_of(name: &str) -> Option<StopReason> {
    [StopReason::Eos, StopReason::StopString, StopReason::MaxTokens, StopReason::ContextFull]
        .into_iter()
        .find(|r| reason_name(*r) == name)
}

impl ResponseCache {
    /// A cache of at most `bytes` in memory (0: none) whose answers live `ttl`, shared through
    /// Redis at `redis` (answers of the model whose manifest hashes to `model_sha256`).
    /// Without `required`, a Redis that cannot be reached now is tried again at first use.
    pub fn new(bytes: u64, ttl: Duration, redis: Option<&str>, model_sha256: &str, required: bool) -> Result<Self> {
        let inner = (bytes > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(bytes)
                .weigher(|_k: &Key, g: &Arc<Generation>| weight(g))
                .time_to_live(ttl)
                .build()
        });
        let shared = match redis {
            None => None,
            Some(url) => {
                let client = redis::Client::open(url).with_context(|| format!("--cache-redis {url}"))?;
                let conn = match connect(&client, Duration::from_secs(5)) {
                    Ok(c) => Some(c),
                    Err(e) if !required => {
                        eprintln!("edgelm serve: the shared cache (Redis at {url}) is away, answering without it: {e}");
                        None
                    }
                    Err(e) => return Err(e).with_context(|| format!("cannot reach Redis at {url}")),
                };
                let away = conn.is_none();
                Some(Shared {
                    client,
                    conn: Mutex::new(Link { conn, tried: Instant::now() }),
                    prefix: format!("edgelm:v1:{model_sha256}:"),
                    ttl: ttl.as_secs().max(1),
                    away: AtomicBool::new(away),
                    warned: AtomicBool::new(false),
                })
            }
        };
        Ok(ResponseCache { inner, shared })
    }

    /// The key of a request, or `None` when its answer is not deterministic (sampling) or
    /// there is no cache.
    pub fn key(&self, endpoint: &str, prompt: &[u32], p: &GenerateParams) -> Option<Key> {
        if (self.inner.is_none() && self.shared.is_none()) || !p.sampling.is_greedy() {
            return None;
        }
        let mut h = Sha256::new();
        h.update(endpoint.as_bytes());
        h.update([0]);
        for id in prompt {
            h.update(id.to_le_bytes());
        }
        h.update((p.max_new_tokens as u64).to_le_bytes());
        h.update(p.sampling.repetition_penalty.to_le_bytes());
        h.update([u8::from(p.ignore_eos), u8::from(p.logprobs)]);
        for s in &p.stop_strings {
            h.update((s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        }
        Some(h.finalize().into())
    }

    pub fn get(&self, key: &Key) -> Option<Arc<Generation>> {
        if let Some(g) = self.inner.as_ref().and_then(|c| c.get(key)) {
            return Some(g);
        }
        let shared = self.shared.as_ref()?;
        let text: Option<String> = shared.run(|c| redis::Commands::get(c, shared.key(key)))?;
        let s: Stored = serde_json::from_str(&text?).ok()?;
        let g = Arc::new(Generation {
            text: s.text,
            prompt_ids: s.prompt_ids,
            generated_ids: s.generated_ids,
            stop_reason: reason_of(&s.stop_reason)?,
            mean_logprob: s.mean_logprob,
            metrics: Default::default(),
        });
        if let Some(c) = &self.inner {
            c.insert(*key, Arc::clone(&g));
        }
        Some(g)
    }

    /// Keeps a finished answer (one that was cut short by a cancel is not an answer).
    pub fn put(&self, key: Key, g: &Generation) {
        if g.stop_reason == StopReason::Cancelled {
            return;
        }
        if let Some(c) = &self.inner {
            c.insert(key, Arc::new(g.clone()));
        }
        if let Some(shared) = &self.shared {
            let stored = Stored {
                text: g.text.clone(),
                prompt_ids: g.prompt_ids.clone(),
                generated_ids: g.generated_ids.clone(),
                stop_reason: reason_name(g.stop_reason).into(),
                mean_logprob: g.mean_logprob,
            };
            let json = serde_json::to_string(&stored).expect("an answer serialises");
            shared.run(|c| redis::Commands::set_ex::<_, _, ()>(c, shared.key(&key), &json, shared.ttl));
        }
    }
}

impl Shared {
    fn key(&self, k: &Key) -> String {
        format!("{}{}", self.prefix, edgelm_runtime::bundle::hex(k))
    }

    /// Runs a command; a failure reads as a miss and is logged (once per outage). A connection
    /// that dropped (Redis restarted) is opened again and the command retried once; one that
    /// timed out is dropped without a retry, so a slow Redis holds a request for one timeout.
    fn run<T>(&self, f: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>) -> Option<T> {
        let mut link = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        for attempt in 0..2 {
            if link.conn.is_none() {
                if attempt == 0 && link.tried.elapsed() < RECONNECT_EVERY {
                    return None;
                }
                link.tried = Instant::now();
                match connect(&self.client, Duration::from_millis(500)) {
                    Ok(c) => link.conn = Some(c),
                    Err(e) => {
                        self.outage(&e);
                        return None;
                    }
                }
            }
            let conn = link.conn.as_mut().expect("connected above");
            match f(conn) {
                Ok(v) => {
                    if self.away.swap(false, Ordering::Relaxed) {
                        eprintln!("edgelm serve: the shared cache (Redis) is back");
                    }
                    return Some(v);
                }
                Err(e) if e.is_connection_dropped() || e.is_io_error() || e.is_timeout() => {
                    link.conn = None;
                    if e.is_timeout() || attempt == 1 {
                        self.outage(&e);
                        return None;
                    }
                }
                Err(e) => {
                    // A reply Redis gave (a wrong type, say): the connection is fine.
                    if !self.warned.swap(true, Ordering::Relaxed) {
                        eprintln!("edgelm serve: the shared cache (Redis) refused a command: {e}");
                    }
                    return None;
                }
            }
        }
        None
    }

    fn outage(&self, e: &redis::RedisError) {
        if !self.away.swap(true, Ordering::Relaxed) {
            eprintln!("edgelm serve: the shared cache (Redis) failed, answering without it: {e}");
        }
    }
}

/// A connection whose commands give up after half a second: a slow Redis must not hold a
/// request for long.
fn connect(client: &redis::Client, timeout: Duration) -> redis::RedisResult<redis::Connection> {
    let conn = client.get_connection_with_timeout(timeout)?;
    conn.set_read_timeout(Some(Duration::from_millis(500)))?;
    conn.set_write_timeout(Some(Duration::from_millis(500)))?;
    Ok(conn)
}

/// Bytes an answer takes, roughly: its text and token ids.
fn weight(g: &Generation) -> u32 {
    let bytes = g.text.len() + 4 * (g.prompt_ids.len() + g.generated_ids.len()) + 256;
    u32::try_from(bytes).unwrap_or(u32::MAX)
}
