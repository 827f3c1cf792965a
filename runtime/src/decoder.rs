//! One decoder-only ONNX graph in an ONNX Runtime session, and its KV cache.
//!
//! Two cache strategies, chosen per session:
//! - [`KvCacheMode::Shared`] (default): one buffer per layer of `[1, kv_heads, capacity,
//!   head_dim]`, bound through IoBinding as both the past input and the present output. ONNX
//!   Runtime's GroupQueryAttention sees the same pointer on both sides and appends in place, so
//!   the cache is never copied. Needs a graph whose attention supports it (GQA).
//! - [`KvCacheMode::Growing`]: the present outputs of one step become the past inputs of the
//!   next. Works with any graph; the attention kernel copies the whole cache every step.

use std::path::Path;

use ort::memory::Allocator;
use ort::session::{IoBinding, Session};
use ort::value::{DynValue, Tensor};

use crate::error::{Error, Result};
use crate::genai_config::{layer_name, GenaiConfig};
use crate::kv_arena::KvArena;
use crate::providers::ExecutionProvider;

/// How the KV cache is kept between steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheMode {
    /// Preallocated to the needed length, updated in place by the attention operator.
    #[default]
    Shared,
    /// Present outputs fed back as past inputs; the operator copies the cache every step.
    Growing,
}

/// Session settings. Start from [`DecoderOptions::default`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DecoderOptions {
    /// Intra-op threads; 0 lets ONNX Runtime use one per physical core.
    pub threads: usize,
    /// KV cache strategy.
    pub kv_cache: KvCacheMode,
    /// Let idle worker threads spin between operators (lower latency, more CPU burned); off
    /// whenever XNNPACK runs, whose own thread pool needs the cores.
    pub spin: bool,
    /// Execution providers to try, in order (empty: the CPU; see [`crate::providers`]).
    pub execution_providers: Vec<ExecutionProvider>,
}

impl Default for DecoderOptions {
    fn default() -> Self {
        DecoderOptions { threads: 0, kv_cache: KvCacheMode::Shared, spin: true, execution_providers: vec![] }
    }
}

/// Names and shapes the decoder needs, resolved once from genai_config.json.
#[derive(Debug, Clone)]
struct Io {
    input_ids: String,
    attention_mask: Option<String>,
    position_ids: Option<String>,
    past_keys: Vec<String>,
    past_values: Vec<String>,
    present_keys: Vec<String>,
    present_values: Vec<String>,
    logits: String,
}

/// A loaded decoder graph.
pub struct Decoder {
    session: Session,
    io: Io,
    kv_heads: usize,
    head_size: usize,
    vocab: usize,
    context: usize,
    mode: KvCacheMode,
}

/// The cache and position of one sequence being generated.
pub struct DecodeState {
    /// Positions already in the cache.
    pos: usize,
    /// Positions the shared cache can hold.
    capacity: usize,
    cache: Cache,
    logits: Vec<f32>,
}

enum Cache {
    Shared { binding: Box<IoBinding>, _buffers: Vec<Tensor<f32>> },
    Growing { past: Vec<DynValue> },
}

impl DecodeState {
    /// Number of positions processed so far.
    pub fn position(&self) -> usize {
        self.pos
    }
}

impl Decoder {
    /// Opens a bundle's decoder. On an ONNX Runtime that applies a sliding attention window one
    /// position wider ([`crate::ortlib`], before 1.24), a model with a window runs with its
    /// context capped at the window, where the answers are the same (a warning says so).
    pub fn of_bundle(bundle: &crate::bundle::Bundle, opts: &DecoderOptions) -> Result<Self> {
        crate::ortlib::init(None)?;
        let mut decoder = Decoder::load(&bundle.model_path, &bundle.genai, opts)
            .map_err(|e| crate::session::explain_refusal(e, &bundle.dir))?;
        let support = crate::ortlib::window_support();
        if support != crate::ortlib::WindowSupport::Exact {
            // edgelm's export names the window in the manifest; another builder's graph (or a
            // bundle quantized from one) is read for it.
            let window = bundle.sliding_window().unwrap_or_else(|| {
                crate::graph_scan::gqa_window(&bundle.model_path).unwrap_or_else(|e| {
                    tracing::warn!(
                        "{}: cannot look for a sliding window in the graph: {e}",
                        bundle.model_path.display()
                    );
                    None
                })
            });
            if support == crate::ortlib::WindowSupport::Unknown {
                if let Some(w) = window {
                    tracing::warn!(
                        "cannot read the ONNX Runtime version; a sliding window ({w} positions) needs 1.24 or newer"
                    );
                }
                return Ok(decoder);
            }
            // Up to the window every position sees all before it, however wide the window is
            // taken: the answers are the model's.
            if let Some(w) = window.map(|w| w as usize).filter(|&w| w < decoder.context) {
                tracing::warn!(
                    "{}: ONNX Runtime {} applies the sliding attention window ({w} positions) one position wider than the model was trained with (1.24 fixed it); the context is capped at the window, {w} positions instead of {}, where the answers do not change",
                    bundle.dir.display(),
                    crate::ortlib::loaded_version().unwrap_or("?"),
                    decoder.context
                );
                decoder.context = w;
            }
        }
        Ok(decoder)
    }

    /// Opens `model_path` with the names and shape in `genai`.
    pub fn load(model_path: &Path, genai: &GenaiConfig, opts: &DecoderOptions) -> Result<Self> {
        let session = crate::session::open(model_path, opts)?;
        let d = &genai.model.decoder;
        let names = |t: &str| (0..d.num_hidden_layers).map(|i| layer_name(t, i)).collect::<Vec<_>>();
        let has_input = |n: &str| session.inputs().iter().any(|o| o.name() == n);
        let io = Io {
            input_ids: d.inputs.input_ids.clone(),
            attention_mask: d.inputs.attention_mask.clone().filter(|n| has_input(n)),
            position_ids: d
                .inputs
                .position_ids
                .clone()
                .or_else(|| Some("position_ids".into()))
                .filter(|n| has_input(n)),
            past_keys: names(&d.inputs.past_key_names),
            past_values: names(&d.inputs.past_value_names),
            present_keys: names(&d.outputs.present_key_names),
            present_values: names(&d.outputs.present_value_names),
            logits: d.outputs.logits.clone(),
        };
        for n in [&io.input_ids].into_iter().chain(&io.past_keys).chain(&io.past_values) {
            if !has_input(n) {
                return Err(Error::Bundle {
                    path: model_path.to_path_buf(),
                    what: format!(
                        "the graph has no input `{n}` that the bundle's description names (genai_config.json, or config.json for an Optimum export, which needs past inputs: --task text-generation-with-past)"
                    ),
                });
            }
        }
        // The cache is fed as fp32; a graph whose cache is fp16 (an fp16 export) is named here
        // rather than failing at its first step.
        let cache_type = io.past_keys.first().and_then(|n| session.inputs().iter().find(|o| o.name() == n.as_str()));
        if let Some(t) = cache_type.and_then(|o| o.dtype().tensor_type()) {
            if t != ort::value::TensorElementType::Float32 {
                return Err(Error::Bundle {
                    path: model_path.to_path_buf(),
                    what: format!(
                        "the graph's KV cache `{}` is {t:?}; edgelm feeds fp32 caches (an fp16 edgelm bundle keeps them fp32 outside the graph): export in fp32",
                        io.past_keys[0]
                    ),
                });
            }
        }
        for n in [&io.logits].into_iter().chain(&io.present_keys).chain(&io.present_values) {
            if !session.outputs().iter().any(|o| o.name() == n) {
                return Err(Error::Bundle {
                    path: model_path.to_path_buf(),
                    what: format!("the graph has no output `{n}` that genai_config.json names"),
                });
            }
        }
        // In-place appends need an attention operator that recognises a shared buffer (the
        // config says so) and a mask from which it learns the valid length.
        let mode = if opts.kv_cache == KvCacheMode::Shared
            && genai.search.past_present_share_buffer
            && io.attention_mask.is_some()
        {
            KvCacheMode::Shared
        } else {
            KvCacheMode::Growing
        };
        Ok(Decoder {
            session,
            io,
            kv_heads: d.num_key_value_heads,
            head_size: d.head_size,
            vocab: genai.model.vocab_size,
            context: genai.model.context_length,
            mode,
        })
    }

    /// Vocabulary size (length of a logits row).
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// Longest sequence the model supports.
    pub fn context_length(&self) -> usize {
        self.context
    }

    /// The KV cache strategy in use.
    pub fn kv_cache_mode(&self) -> KvCacheMode {
        self.mode
    }

    /// A fresh sequence whose cache can hold `capacity` positions (prompt + new tokens).
    pub fn start(&self, capacity: usize) -> Result<DecodeState> {
        if capacity == 0 || capacity > self.context {
            return Err(Error::InvalidRequest(format!(
                "sequence capacity {capacity} must be between 1 and the context length {}",
                self.context
            )));
        }
        let cache = match self.mode {
            KvCacheMode::Shared => {
                let alloc = Allocator::default();
                let mut binding = self.session.create_binding()?;
                let mut buffers = Vec::with_capacity(2 * self.io.past_keys.len());
                let pairs = self
                    .io
                    .past_keys
                    .iter()
                    .zip(&self.io.present_keys)
                    .chain(self.io.past_values.iter().zip(&self.io.present_values));
                for (past, present) in pairs {
                    let mut t = Tensor::<f32>::new(&alloc, [1usize, self.kv_heads, capacity, self.head_size])?;
                    // Positions past `pos` are never read; zeroing keeps runs reproducible.
                    t.extract_tensor_mut().1.fill(0.0);
                    binding.bind_input(past.as_str(), &t)?;
                    binding.bind_output(present.as_str(), &mut t)?;
                    buffers.push(t);
                }
                Cache::Shared { binding: Box::new(binding), _buffers: buffers }
            }
            KvCacheMode::Growing => {
                let mut past = Vec::with_capacity(2 * self.io.past_keys.len());
                for _ in 0..2 * self.io.past_keys.len() {
                    let empty: Vec<f32> = Vec::new();
                    past.push(Tensor::from_array(([1usize, self.kv_heads, 0, self.head_size], empty))?.into_dyn());
                }
                Cache::Growing { past }
            }
        };
        Ok(DecodeState { pos: 0, capacity, cache, logits: vec![0.0; self.vocab] })
    }

    /// Runs `ids` after the cached positions and returns the logits of the last one.
    pub fn forward<'s>(&mut self, state: &'s mut DecodeState, ids: &[u32]) -> Result<&'s mut [f32]> {
        if ids.is_empty() {
            return Err(Error::InvalidRequest("no tokens to run".into()));
        }
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(Error::TokenOutOfRange { id, vocab: self.vocab });
        }
        let total = state.pos + ids.len();
        if total > state.capacity {
            return Err(Error::CacheFull { position: state.pos, adding: ids.len(), capacity: state.capacity });
        }
        let s = ids.len();
        let input_ids = Tensor::from_array(([1usize, s], ids.iter().map(|&i| i as i64).collect::<Vec<_>>()))?;
        let mask = Tensor::from_array(([1usize, total], vec![1i64; total]))?;
        let positions = Tensor::from_array(([1usize, s], (state.pos as i64..total as i64).collect::<Vec<_>>()))?;
        let vocab = self.vocab;
        match &mut state.cache {
            Cache::Shared { binding, .. } => {
                self.bind_step(binding, &input_ids, &mask, &positions)?;
                let outputs = self.session.run_binding(binding)?;
                copy_last_row(&self.io.logits, &outputs[self.io.logits.as_str()], vocab, &mut state.logits)?;
            }
            Cache::Growing { past } => {
                let mut inputs: Vec<(std::borrow::Cow<'_, str>, ort::session::SessionInputValue<'_>)> =
                    Vec::with_capacity(3 + past.len());
                inputs.push((self.io.input_ids.as_str().into(), input_ids.into()));
                if let Some(n) = &self.io.attention_mask {
                    inputs.push((n.as_str().into(), mask.into()));
                }
                if let Some(n) = &self.io.position_ids {
                    inputs.push((n.as_str().into(), positions.into()));
                }
                let names = self.io.past_keys.iter().chain(&self.io.past_values);
                for (name, value) in names.zip(past.drain(..)) {
                    inputs.push((name.as_str().into(), value.into()));
                }
                let mut outputs = self.session.run(inputs)?;
                copy_last_row(&self.io.logits, &outputs[self.io.logits.as_str()], vocab, &mut state.logits)?;
                for name in self.io.present_keys.iter().chain(&self.io.present_values) {
                    past.push(outputs.remove(name.as_str()).ok_or_else(|| Error::UnexpectedShape {
                        name: name.clone(),
                        shape: vec![],
                        expected: "a present KV tensor".into(),
                    })?);
                }
            }
        }
        state.pos = total;
        Ok(&mut state.logits)
    }
}

impl Decoder {
    /// Binds one step's token inputs (those the graph has) and its logits output to `binding`,
    /// whose KV cache tensors are bound already.
    fn bind_step(
        &self,
        binding: &mut IoBinding,
        input_ids: &Tensor<i64>,
        mask: &Tensor<i64>,
        positions: &Tensor<i64>,
    ) -> Result<()> {
        binding.bind_input(self.io.input_ids.as_str(), input_ids)?;
        if let Some(n) = &self.io.attention_mask {
            binding.bind_input(n.as_str(), mask)?;
        }
        if let Some(n) = &self.io.position_ids {
            binding.bind_input(n.as_str(), positions)?;
        }
        // Bound afresh every step: its shape changes from prefill to decode in graphs that
        // return logits for every position.
        binding.bind_output_to_device(self.io.logits.as_str(), self.session.allocator().memory_info())?;
        Ok(())
    }
}

/// One sequence's part in a batched step: positions already in its cache, and tokens to run.
pub(crate) struct BatchRow<'a> {
    pub past: usize,
    pub ids: &'a [u32],
}

impl Decoder {
    /// KV caches for `slots` sequences of `capacity` positions each, whose steps
    /// [`Decoder::forward_batch`] runs together; None when the cache is not shared (the
    /// batched step appends in place, as a lone sequence's does), an error when the memory is
    /// refused.
    pub(crate) fn arena(&self, slots: usize, capacity: usize) -> Result<Option<KvArena>> {
        if self.mode != KvCacheMode::Shared || slots == 0 || capacity == 0 || capacity > self.context {
            return Ok(None);
        }
        let names: Vec<(String, String)> = self
            .io
            .past_keys
            .iter()
            .zip(&self.io.present_keys)
            .chain(self.io.past_values.iter().zip(&self.io.present_values))
            .map(|(a, b)| (a.clone(), b.clone()))
            .collect();
        let bytes = (names.len() * slots * self.kv_heads * capacity * self.head_size * 4) as u64;
        KvArena::new(names, slots, self.kv_heads, capacity, self.head_size).map(Some).ok_or_else(|| {
            Error::InvalidRequest(format!(
                "the system refused {} MiB of address space for {slots} KV caches of {capacity} positions",
                bytes >> 20
            ))
        })
    }

    /// Runs `rows` (each the same number of tokens) on slots `first..first + rows.len()` of
    /// `arena` as one batch, and writes each row's last-position logits to `out` (`vocab`
    /// floats per row). Rows may have different pasts: the attention mask is padded on the
    /// right, and the attention operator reads each row's own length from it.
    pub(crate) fn forward_batch(
        &mut self,
        arena: &mut KvArena,
        first: usize,
        rows: &[BatchRow<'_>],
        out: &mut [f32],
    ) -> Result<()> {
        let (n, vocab) = (rows.len(), self.vocab);
        let s = rows.first().map_or(0, |r| r.ids.len());
        if s == 0 || rows.iter().any(|r| r.ids.len() != s) {
            return Err(Error::InvalidRequest("a batched step needs rows of one, non-zero length".into()));
        }
        if out.len() != n * vocab {
            return Err(Error::InvalidRequest(format!("logits buffer of {} floats for {n} rows", out.len())));
        }
        for r in rows {
            if let Some(&id) = r.ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(Error::TokenOutOfRange { id, vocab });
            }
            if r.past + s > arena.capacity() {
                return Err(Error::CacheFull { position: r.past, adding: s, capacity: arena.capacity() });
            }
        }
        let width = rows.iter().map(|r| r.past + s).max().unwrap_or(0);
        let ids: Vec<i64> = rows.iter().flat_map(|r| r.ids.iter().map(|&i| i64::from(i))).collect();
        let mask: Vec<i64> = rows.iter().flat_map(|r| (0..width).map(move |j| i64::from(j < r.past + s))).collect();
        let positions: Vec<i64> = rows.iter().flat_map(|r| (r.past..r.past + s).map(|p| p as i64)).collect();
        let input_ids = Tensor::from_array(([n, s], ids))?;
        let mask = Tensor::from_array(([n, width], mask))?;
        let positions = Tensor::from_array(([n, s], positions))?;
        let binding = arena.binding(&self.session, first, n)?;
        self.bind_step(binding, &input_ids, &mask, &positions)?;
        let outputs = self.session.run_binding(binding)?;
        let logits = &outputs[self.io.logits.as_str()];
        let (shape, data) = logits.try_extract_tensor::<f32>()?;
        let dims: Vec<i64> = shape.iter().copied().collect();
        let steps = dims.get(1).copied().unwrap_or(0) as usize;
        if dims.len() != 3 || dims[0] as usize != n || dims[2] as usize != vocab || steps == 0 {
            return Err(Error::UnexpectedShape {
                name: self.io.logits.clone(),
                shape: dims,
                expected: format!("[{n}, seq, {vocab}]"),
            });
        }
        for (b, row) in out.chunks_exact_mut(vocab).enumerate() {
            let last = (b * steps + steps - 1) * vocab;
            row.copy_from_slice(&data[last..last + vocab]);
        }
        Ok(())
    }
}

/// Copies the last position's row of `logits [1, S, vocab]` into `out`.
fn copy_last_row(name: &str, value: &DynValue, vocab: usize, out: &mut [f32]) -> Result<()> {
    let (shape, data) = value.try_extract_tensor::<f32>()?;
    let dims: Vec<i64> = shape.iter().copied().collect();
    if dims.len() != 3 || dims[2] as usize != vocab || data.len() < vocab {
        return Err(Error::UnexpectedShape {
            name: name.to_owned(),
            shape: dims,
            expected: format!("[1, seq, {vocab}]"),
        });
    }
    out.copy_from_slice(&data[data.len() - vocab..]);
    Ok(())
}
