//! Export: checkpoint -> edgelm bundle (`model.onnx`, `genai_config.json`, tokenizer files,
//! `edgelm.json`), then a numerical check of the ONNX graph in ONNX Runtime against the candle
//! model on a fixed prompt.

pub(crate) mod encoder;
mod graph;
mod quantized;
mod verify;

use std::path::{Path, PathBuf};

use prost::Message;
use sha2::{Digest, Sha256};

use edgelm_runtime::bundle::{self, BundleInfo, BundleWriter, GenerationDefaults};
use edgelm_runtime::genai_config::{
    DecoderInputs, DecoderOutputs, DecoderSection, GenaiConfig, ModelSection, SearchSection,
};

pub use encoder::export_encoder;
pub use graph::LogitsMode;
pub(crate) use graph::HEAD_NORM_SCOPES;
use graph::{build_decoder, Weights};
pub use quantized::{check_encoder, quantize_bundle, EncoderCheck, QuantizedReport, ENCODER_MIN_COSINE};
pub use verify::{
    allowed_diff, compare_bundles_on, compare_checkpoints_on, kl_divergence, magnitude, max_abs_diff,
    verify_against_bundle, verify_against_reference, verify_bundle, ReferenceLogits, SequenceComparison, VerifyReport,
};

use crate::checkpoint::index::WeightIndex;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, IoContext, Result};
use crate::onnx::{DataType, ModelProto};
use crate::quantize::{quantize_model_in, QuantizeOptions};
use quantized::{check_quantized, precision_of, weight_scheme};

/// Export settings.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Which positions get logits.
    pub logits: LogitsMode,
    /// Run the ORT-vs-candle check after writing (on by default).
    pub verify: bool,
    /// Largest allowed max-abs logit difference in the check, for logits up to 1 in magnitude;
    /// proportionally more for larger logits ([`allowed_diff`]).
    pub tolerance: f32,
    /// Record in the bundle that the model answers single requests (trained on single-turn
    /// data), so chat front ends do not feed it a conversation.
    pub single_turn: bool,
    /// Quantize the weights after the fp32 graph passed its check (`None`: fp32 bundle).
    pub quantize: Option<QuantizeOptions>,
    /// Largest mean KL divergence (nats) of the quantized bundle's next-token distribution from
    /// the fp32 source's, on the check prompt.
    pub max_kl: f64,
    /// Keep the weights in `model.onnx.data` beside the graph (on by default: ONNX Runtime then
    /// parses a small graph and opens the model in about half the time). Off, they go into
    /// `model.onnx` unless that would pass protobuf's 2 GiB limit.
    pub external_data: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            logits: LogitsMode::Last,
            verify: true,
            tolerance: 1e-4,
            single_turn: false,
            quantize: None,
            max_kl: 0.05,
            external_data: true,
        }
    }
}

/// What an export wrote and measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportReport {
    /// Bundle folder.
    pub bundle: PathBuf,
    /// Size of the model in bytes: model.onnx and, where the weights are kept beside it,
    /// model.onnx.data.
    pub model_bytes: u64,
    /// Number of parameters.
    pub parameters: usize,
    /// The numerical check of the fp32 graph, when it ran.
    pub verify: Option<VerifyReport>,
    /// The quantization and the check of the quantized graph against the fp32 source.
    pub quantized: Option<QuantizedReport>,
    /// Warnings for the user (e.g. no tokenizer).
    pub warnings: Vec<String>,
}

/// `[out, in]` weight -> row-major `[in, out]` data for `MatMul(x, W)`.
pub(crate) fn transposed(t: &candle_core::Tensor) -> Result<Vec<f32>> {
    Ok(t.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?)
}

/// A tensor's values in row-major order.
pub(crate) fn flat(t: &candle_core::Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// sha256 over the checkpoint's config.json and weight files, in name order.
pub(crate) fn checkpoint_hash(dir: &Path) -> Result<String> {
    let names: Vec<String> = std::fs::read_dir(dir)
        .at(dir)?
        .filter_map(|e| e.ok()?.file_name().to_str().map(str::to_owned))
        .filter(|n| n == "config.json" || n.ends_with(".safetensors") || n == "model.safetensors.index.json")
        .collect();
    files_hash(dir, names)
}

/// sha256 over the files `names` of `dir`, each name and its sha256 in name order: what names a
/// model's source in a manifest.
pub(crate) fn files_hash(dir: &Path, mut names: Vec<String>) -> Result<String> {
    names.sort();
    let mut h = Sha256::new();
    for n in names {
        h.update(n.as_bytes());
        h.update(bundle::sha256_file(&dir.join(&n))?.as_bytes());
    }
    Ok(bundle::hex(&h.finalize()))
}

/// The genai_config.json describing this export.
fn genai_config(ck: &Checkpoint) -> GenaiConfig {
    let c = &ck.config;
    let eos = ck.eos_token_ids();
    GenaiConfig {
        model: ModelSection {
            bos_token_id: ck.bos_token_id(),
            context_length: c.max_position_embeddings,
            decoder: DecoderSection {
                filename: "model.onnx".into(),
                head_size: graph::cache_head_size(c),
                hidden_size: c.hidden_size,
                // Positions come from the mask inside GroupQueryAttention.
                inputs: DecoderInputs::standard(false),
                outputs: DecoderOutputs::standard(),
                num_attention_heads: c.num_attention_heads,
                num_hidden_layers: c.num_hidden_layers,
                num_key_value_heads: c.num_key_value_heads,
                session_options: Some(serde_json::json!({"log_id": "onnxruntime-genai", "provider_options": []})),
            },
            pad_token_id: c.pad_token_id.or(eos.first().copied()),
            eos_token_id: eos,
            model_type: c.architecture.model_type().into(),
            vocab_size: c.vocab_size,
        },
        search: SearchSection {
            max_length: Some(c.max_position_embeddings),
            // GroupQueryAttention appends in place when past and present are one buffer.
            past_present_share_buffer: true,
            top_k: 1,
            ..SearchSection::default()
        },
    }
}

/// Sampling defaults from generation_config.json (greedy when it does not ask to sample).
fn generation_defaults(ck: &Checkpoint) -> GenerationDefaults {
    let g = ck.generation_config.clone().unwrap_or_default();
    let f = |k: &str, d: f64| g.get(k).and_then(|v| v.as_f64()).unwrap_or(d) as f32;
    let sample = g.get("do_sample").and_then(|v| v.as_bool()).unwrap_or(false);
    GenerationDefaults {
        bos_token_id: ck.bos_token_id(),
        eos_token_ids: ck.eos_token_ids(),
        pad_token_id: ck.config.pad_token_id,
        temperature: if sample { f("temperature", 1.0) } else { 0.0 },
        top_k: if sample { g.get("top_k").and_then(|v| v.as_u64()).unwrap_or(50) as usize } else { 0 },
        top_p: if sample { f("top_p", 1.0) } else { 1.0 },
        repetition_penalty: f("repetition_penalty", 1.0),
        single_turn: false,
    }
}

/// Writes `model` into the bundle as `name`, its weights in `name.data` beside it when one
/// file would pass protobuf's 2 GiB limit or `external` asks for it. Returns the bytes written
/// (graph and data file). A model written apart is left without its weights, which point into
/// the data file.
pub(crate) fn write_model(w: &mut BundleWriter, name: &str, model: &mut ModelProto, external: bool) -> Result<u64> {
    use crate::onnx::external::{externalize, SINGLE_FILE_LIMIT};
    let data = format!("{name}.data");
    if !external && model.encoded_len() <= SINGLE_FILE_LIMIT {
        // A graph that fits replaces one written apart before it (the fp32 graph of an export
        // that then quantizes), data file included.
        w.remove(&data)?;
        let bytes = model.encode_to_vec();
        w.model(name, &bytes)?;
        return Ok(bytes.len() as u64);
    }
    let mut written = 0;
    w.write_with(&data, |out| {
        written = externalize(model, &data, out)?;
        Ok(())
    })?;
    let bytes = model.encode_to_vec();
    w.model(name, &bytes)?;
    written += bytes.len() as u64;
    Ok(written)
}

/// Why a causal LM is not exported as int8-static.
pub const STATIC_INT8_IS_FOR_ENCODERS: &str =
    "int8-static is for encoder bundles; a causal LM exports as int8, int4 or int8-dynamic";

impl ExportOptions {
    /// Fails on options no causal-LM export takes (int8-static is for encoders): checked before
    /// a checkpoint's weights are read.
    pub fn check(&self) -> Result<()> {
        if self.quantize.as_ref().is_some_and(|q| q.method == crate::quantize::graph::Method::StaticInt8) {
            return Err(Error::Unsupported { what: STATIC_INT8_IS_FOR_ENCODERS.into() });
        }
        Ok(())
    }
}

/// Refuses an output folder that is `source` or holds it: a finished bundle replaces its folder
/// as a whole, so writing it there would delete what it was made from (the fp32 bundle a
/// quantization needs again for any other precision, or the checkpoint). Checked before any
/// work is done; an `out` that does not exist yet cannot be either.
pub(crate) fn refuse_replacing_source(source: &Path, out: &Path) -> Result<()> {
    let (Ok(source), Ok(target)) = (std::fs::canonicalize(source), std::fs::canonicalize(out)) else {
        return Ok(());
    };
    if source.starts_with(&target) {
        let what = if source == target {
            "is the folder the bundle is made from"
        } else {
            "holds the folder the bundle is made from"
        };
        return Err(Error::Destination {
            path: out.to_path_buf(),
            what: format!(
                "{what} ({}), and a bundle replaces its folder whole: write it to another folder (nothing was changed)",
                source.display()
            ),
        });
    }
    Ok(())
}

/// Size of a finished bundle's model, as its manifest records it: the graph file and, when its
/// weights are kept apart, their data file.
pub(crate) fn model_bytes(m: &bundle::Manifest) -> u64 {
    let data = format!("{}.data", m.model_file);
    m.files.iter().filter(|f| f.path == m.model_file || f.path == data).map(|f| f.bytes).sum()
}

/// Exports a loaded checkpoint into `out` and (by default) checks it numerically. The weights
/// are held twice on the way (the caller's and the graph's); [`export_owned`] holds them once.
pub fn export(ck: &Checkpoint, out: &Path, opts: &ExportOptions) -> Result<ExportReport> {
    // The tensors are shared, not copied.
    export_owned(ck.clone(), out, opts)
}

/// [`export`] of a checkpoint handed over: its weights are let go layer by layer as the graph
/// takes them, and the graph's once written, and the checks compare against logits taken from
/// the checkpoint beforehand. So the fp32 weights are in memory about once at any time: a
/// 3B-parameter model exports in about 13 GB rather than 26.
pub fn export_owned(mut ck: Checkpoint, out: &Path, opts: &ExportOptions) -> Result<ExportReport> {
    refuse_replacing_source(&ck.dir, out)?;
    opts.check()?;
    graph::check_expressible(&ck.config)?;
    let reference = if opts.verify { Some(ReferenceLogits::of(&ck)?) } else { None };
    // Built first: a checkpoint the graph cannot express leaves no folder behind.
    let mut model = build_decoder(&ck.config, Weights::Loaded(std::mem::take(&mut ck.tensors)), opts.logits, None)?;
    // The writer fills a hidden folder beside `out`; the checks below open that folder
    // (`w.dir()`), and only a bundle that passed them takes `out`'s place.
    let mut w = BundleWriter::create(out, bundle::Kind::CausalLm)?;
    let mut warnings = Vec::new();
    // Written apart, the model keeps no weights: quantizing reads them back one at a time.
    let fp32_bytes = write_model(&mut w, "model.onnx", &mut model, opts.external_data)?;
    // Kept for quantizing after the fp32 check, else freed before it.
    let mut model = opts.quantize.is_some().then_some(model);
    write_side_files(&mut w, &ck, &mut warnings)?;

    let verify = if let Some(reference) = &reference {
        let r = verify_against_reference(reference, w.dir(), opts.tolerance)?;
        if !r.passed {
            return Err(Error::ExportMismatch {
                what: format!(
                    "ONNX and candle logits differ by up to {:.3e} (max abs); at step {} (logits up to {:.3}) the difference passes the {:.3e} allowed (tolerance {:.1e} per unit of logit)",
                    r.max_abs_diff,
                    r.worst_step,
                    r.logit_scale,
                    allowed_diff(opts.tolerance, r.logit_scale),
                    opts.tolerance
                ),
            });
        }
        Some(r)
    } else {
        None
    };
    let quantized = match &opts.quantize {
        None => None,
        Some(q) => {
            let mut model = model.take().expect("kept for quantizing");
            let q = &quantized::with_hot_rows(q, ck.tokenizer_json.as_deref())?;
            let summary = quantize_model_in(&mut model, q, Some(w.dir()))?;
            quantized::hot_rows_used(q, &summary)?;
            write_model(&mut w, "model.onnx", &mut model, opts.external_data)?;
            drop(model);
            let check = reference.as_ref().map(|r| check_quantized(r, w.dir(), opts.max_kl)).transpose()?;
            Some(QuantizedReport {
                precision: precision_of(Some(q)),
                summary,
                verify: check,
                encoder: None,
                fp32_bytes,
            })
        }
    };
    let manifest = w.finish(bundle_info(&ck, opts, quantized.as_ref())?)?;
    Ok(ExportReport {
        bundle: out.to_path_buf(),
        model_bytes: model_bytes(&manifest),
        parameters: ck.config.num_parameters(),
        verify,
        quantized,
        warnings,
    })
}

/// genai_config.json, the tokenizer and tokenizer_config.json of an exported causal LM.
fn write_side_files(w: &mut BundleWriter, ck: &Checkpoint, warnings: &mut Vec<String>) -> Result<()> {
    let genai = genai_config(ck);
    w.write("genai_config.json", serde_json::to_string_pretty(&genai).expect("json").as_bytes())?;
    match &ck.tokenizer_json {
        Some(src) => {
            w.tokenizer(src)?;
            // genai's tokenizer loader needs tokenizer_config.json next to tokenizer.json.
            let cfg = ck
                .tokenizer_config
                .clone()
                .unwrap_or_else(|| serde_json::json!({"tokenizer_class": "PreTrainedTokenizerFast"}));
            w.write("tokenizer_config.json", serde_json::to_string_pretty(&cfg).expect("json").as_bytes())?;
        }
        None => {
            let w = format!("{} has no tokenizer.json: the bundle takes token ids only", ck.dir.display());
            tracing::warn!("{w}");
            warnings.push(w);
        }
    }
    Ok(())
}

/// The manifest's description of an exported causal LM.
fn bundle_info(ck: &Checkpoint, opts: &ExportOptions, quantized: Option<&QuantizedReport>) -> Result<BundleInfo> {
    Ok(BundleInfo {
        generation: GenerationDefaults { single_turn: opts.single_turn, ..generation_defaults(ck) },
        chat_template: ck.chat_template(),
        precision: precision_of(opts.quantize.as_ref()),
        weights: opts.quantize.as_ref().zip(quantized).map(|(q, r)| weight_scheme(q, &r.summary)),
        checkpoint: ck.dir.clone(),
        checkpoint_sha256: checkpoint_hash(&ck.dir)?,
        encoder: None,
        // The window is named so a runtime can refuse an ONNX Runtime that applies it otherwise.
        report: serde_json::json!({"architecture": ck.config.architecture, "parameters": ck.config.num_parameters(), "logits": opts.logits, "sliding_window": ck.config.sliding_window}),
    })
}

/// Exports a checkpoint opened without its weights ([`Checkpoint::load_deferred`]), quantized,
/// for models larger than memory: each weight is read from the checkpoint when the graph needs
/// it and written to a spill file beside the graph in its stored element type, the graph is
/// quantized from there one matrix at a time, and the check runs the quantized bundle against
/// candle logits taken one layer at a time. So memory holds about the quantized model, never
/// the fp32 one; the disk holds the spill (the checkpoint's size) until the bundle is written.
/// There is no fp32 graph to check, so the quantized check (its KL gate) is the only one.
pub fn export_deferred(ck: &Checkpoint, index: &WeightIndex, out: &Path, opts: &ExportOptions) -> Result<ExportReport> {
    use crate::quantize::graph::Method;
    refuse_replacing_source(&ck.dir, out)?;
    opts.check()?;
    let q = match &opts.quantize {
        Some(q) if matches!(q.method, Method::Blockwise | Method::DynamicInt8) => q,
        _ => {
            return Err(Error::Unsupported {
                what: "exporting a model without loading it whole needs --precision int8, int4 or int8-dynamic (fp32 and fp16 graphs are as large as the model)".into(),
            })
        }
    };
    graph::check_expressible(&ck.config)?;
    let reference = if opts.verify { Some(ReferenceLogits::streamed(&ck.config, index)?) } else { None };
    let mut w = BundleWriter::create(out, bundle::Kind::CausalLm)?;
    let spill = w.dir().join(SPILL_FILE);
    let elem = match index.matrix_dtype() {
        candle_core::DType::BF16 => DataType::Bfloat16,
        candle_core::DType::F16 => DataType::Float16,
        _ => DataType::Float,
    };
    let mut model = build_decoder(&ck.config, Weights::Indexed(index), opts.logits, Some((&spill, elem)))?;
    let q = &quantized::with_hot_rows(q, ck.tokenizer_json.as_deref())?;
    let summary = crate::quantize::graph::quantize_spilled(&mut model, q, w.dir())?;
    quantized::hot_rows_used(q, &summary)?;
    crate::onnx::external::widen_to_f32(&mut model);
    write_model(&mut w, "model.onnx", &mut model, opts.external_data)?;
    drop(model);
    std::fs::remove_file(&spill).at(&spill)?;
    let mut warnings = Vec::new();
    write_side_files(&mut w, ck, &mut warnings)?;
    let check = reference.as_ref().map(|r| check_quantized(r, w.dir(), opts.max_kl)).transpose()?;
    let quantized = QuantizedReport {
        precision: precision_of(Some(q)),
        summary,
        verify: check,
        encoder: None,
        // What the fp32 graph would take: no such graph is written.
        fp32_bytes: 4 * ck.config.num_parameters() as u64,
    };
    let manifest = w.finish(bundle_info(ck, opts, Some(&quantized))?)?;
    Ok(ExportReport {
        bundle: out.to_path_buf(),
        model_bytes: model_bytes(&manifest),
        parameters: ck.config.num_parameters(),
        verify: None,
        quantized: Some(quantized),
        warnings,
    })
}

/// The data file the graph's weights spill to while a deferred export quantizes them.
const SPILL_FILE: &str = "weights.spill";
