//! The response cache: answers to deterministic requests (greedy sampling), kept in memory up
//! to a byte budget and a time to live, so a repeated question is answered without running
//! the model. The key is everything that decides a greedy answer: the endpoint, the prompt's
//! token ids, the token limit, the stop strings, the repetition penalty and `ignore_eos`. A new
//! model means new answers: the server holds one cache per loaded model.

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use edgelm_runtime::{GenerateParams, Generation, StopReason};

pub type Key = [u8; 32];

pub struct ResponseCache {
    inner: Option<moka::sync::Cache<Key, Arc<Generation>>>,
}

impl ResponseCache {
    /// A cache of at most `bytes` (0: no cache) whose answers live `ttl`.
    pub fn new(bytes: u64, ttl: Duration) -> Self {
        let inner = (bytes > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(bytes)
                .weigher(|_k: &Key, g: &Arc<Generation>| weight(g))
                .time_to_live(ttl)
                .build()
        });
        ResponseCache { inner }
    }

    /// The key of a request, or `None` when its answer is not deterministic (sampling) or
    /// there is no cache.
    pub fn key(&self, endpoint: &str, prompt: &[u32], p: &GenerateParams) -> Option<Key> {
        if self.inner.is_none() || !p.sampling.is_greedy() {
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
        h.update([u8::from(p.ignore_eos)]);
        for s in &p.stop_strings {
            h.update((s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        }
        Some(h.finalize().into())
    }

    pub fn get(&self, key: &Key) -> Option<Arc<Generation>> {
        self.inner.as_ref()?.get(key)
    }

    /// Keeps a finished answer (one that was cut short by a cancel is not an answer).
    pub fn put(&self, key: Key, g: &Generation) {
        if let (Some(c), false) = (&self.inner, g.stop_reason == StopReason::Cancelled) {
            c.insert(key, Arc::new(g.clone()));
        }
    }
}

/// Bytes an answer takes, roughly: its text and token ids.
fn weight(g: &Generation) -> u32 {
    let bytes = g.text.len() + 4 * (g.prompt_ids.len() + g.generated_ids.len()) + 256;
    u32::try_from(bytes).unwrap_or(u32::MAX)
}
