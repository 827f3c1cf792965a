//! `/metrics`: what Prometheus scrapes from `serve --http`, in its text format (0.0.4):
//! requests by route and status, time to first token and time per token (histograms),
//! generated tokens, the last request's decode speed, queue depth, active sequences, response
//! cache hits and misses, resident memory, and the model being served (`edgelm_model_info`,
//! labels only).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
    kind: String,
    precision: String,
    sha256: String,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    pub ttft: Histogram,
    pub token_latency: Histogram,
    pub generated_tokens: Counter,
    pub decode_tokens_per_s: Gauge<f64, AtomicU64>,
    queued: Gauge,
    active: Gauge,
    rss: Gauge,
    cache_hits: Counter,
    cache_misses: Counter,
    model_info: Family<ModelLabels, Gauge>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("edgelm");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "HTTP requests by route and status", requests.clone());
        // 1 ms to about 33 s.
        let ttft = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register("ttft_seconds", "Time from admission to the first generated token", ttft.clone());
        // 0.1 ms to about 3 s.
        let token_latency = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register("token_latency_seconds", "Time between generated tokens", token_latency.clone());
        let generated_tokens = Counter::default();
        registry.register("generated_tokens", "Tokens generated", generated_tokens.clone());
        let decode_tokens_per_s = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "decode_tokens_per_second",
            "Decode speed of the last finished generation",
            decode_tokens_per_s.clone(),
        );
        let queued = Gauge::default();
        registry.register("queue_depth", "Requests waiting for a sequence", queued.clone());
        let active = Gauge::default();
        registry.register("active_sequences", "Sequences generating now", active.clone());
        let rss = Gauge::default();
        registry.register("resident_memory_bytes", "Resident memory of the server process", rss.clone());
        let cache_hits = Counter::default();
        registry.register("cache_hits", "Greedy requests answered from the response cache", cache_hits.clone());
        let cache_misses = Counter::default();
        registry.register("cache_misses", "Greedy requests the response cache did not hold", cache_misses.clone());
        let info = Family::<ModelLabels, Gauge>::default();
        registry.register("model_info", "The model being served (always 1)", info.clone());
        Metrics {
            registry,
            requests,
            ttft,
            token_latency,
            generated_tokens,
            decode_tokens_per_s,
            queued,
            active,
            rss,
            cache_hits,
            cache_misses,
            model_info: info,
        }
    }

    pub fn request(&self, route: &str, status: u16) {
        self.requests.get_or_create(&RequestLabels { route: route.into(), status: status.to_string() }).inc();
    }

    /// The model now served (the previous one's series goes).
    pub fn set_model(&self, model: &str, kind: &str, precision: &str, sha256: &str) {
        self.model_info.clear();
        self.model_info
            .get_or_create(&ModelLabels {
                model: model.into(),
                kind: kind.into(),
                precision: precision.into(),
                sha256: sha256.into(),
            })
            .set(1);
    }

    /// A greedy request looked up in the response cache.
    pub fn cache(&self, hit: bool) {
        if hit {
            self.cache_hits.inc();
        } else {
            self.cache_misses.inc();
        }
    }

    /// The text a scrape gets, with the gauges read now.
    pub fn render(&self, queued: usize, active: usize) -> String {
        self.queued.set(queued as i64);
        self.active.set(active as i64);
        self.rss.set(edgelm_runtime::metrics::rss_bytes() as i64);
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
