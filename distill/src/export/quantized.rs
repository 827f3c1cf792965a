//! Quantized bundles: the record a quantization leaves in the manifest, the check of a
//! quantized graph against its fp32 source, and `quantize` for a bundle already exported.

use std::path::Path;

use prost::Message;

use edgelm_runtime::bundle::{
    BlockwiseScheme, Bundle, BundleInfo, BundleWriter, HotRows, Kind, Precision, TableScheme, WeightScheme,
};

use super::verify::{verify_against_bundle, verify_against_reference, ReferenceLogits, VerifyReport};
use super::ExportReport;
use crate::error::{Error, IoContext, Result};
use crate::onnx::ModelProto;
use crate::quantize::graph::Method;
use crate::quantize::{quantize_model, quantize_model_in, QuantizeOptions, QuantizeSummary};

/// What quantizing an export did and cost.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuantizedReport {
    /// The precision written.
    pub precision: Precision,
    /// What the rewrite did.
    pub summary: QuantizeSummary,
    /// The quantized graph against the candle model (mean KL, top-1 agreement), when checked.
    pub verify: Option<VerifyReport>,
    /// A quantized encoder against its fp32 source (sentence-embedding cosine), when checked.
    pub encoder: Option<EncoderCheck>,
    /// Size of the fp32 model.onnx it replaced.
    pub fp32_bytes: u64,
}

/// The bundle's precision for a quantization choice.
pub(crate) fn precision_of(q: Option<&QuantizeOptions>) -> Precision {
    match q.map(|q| if q.method == Method::Fp16 { 16 } else { q.scheme.bits }) {
        None => Precision::Fp32,
        Some(16) => Precision::Fp16,
        Some(8) => Precision::Int8,
        Some(_) => Precision::Int4,
    }
}

/// The manifest's record of a quantization.
pub(crate) fn weight_scheme(q: &QuantizeOptions, s: &QuantizeSummary) -> WeightScheme {
    if q.method == Method::Fp16 {
        return WeightScheme {
            operator: "fp16".into(),
            bits: 16,
            block_size: 0,
            symmetric: true,
            accuracy_level: 0,
            matrices: s.matmuls,
            embedding: false,
            shared_embedding_head: false,
            embedding_table: None,
            kept_fp32: s.kept.clone(),
            blockwise: vec![],
            blockwise_scheme: None,
            activations: None,
        };
    }
    // Both int8 schemes with a scale per output column.
    let dynamic = matches!(q.method, Method::DynamicInt8 | Method::StaticInt8);
    WeightScheme {
        operator: match q.method {
            Method::Blockwise => "MatMulNBits",
            Method::DynamicInt8 => "DynamicQuantizeMatMul",
            Method::StaticInt8 if q.qdq => "QDQ",
            Method::StaticInt8 => "MatMulIntegerToFloat",
            Method::Fp16 => "fp16",
        }
        .into(),
        // Dynamic int8 weights use 7 of their 8 bits unless the full range was asked for.
        bits: if dynamic && !q.full_range_int8 { 7 } else { q.scheme.bits },
        // Per output column when dynamic: one block the height of the matrix, recorded as 0.
        block_size: if dynamic { 0 } else { q.scheme.block_size },
        // Per-column int8 weights are always centred on zero.
        symmetric: dynamic || q.scheme.symmetric,
        accuracy_level: q.accuracy_level,
        matrices: s.matmuls,
        embedding: s.embeddings > 0,
        shared_embedding_head: s.shared_embedding_head,
        // Under the per-column methods a table in blocks always has a scheme of its own.
        embedding_table: s.embedding_table.or((dynamic && s.block_tables > 0).then_some(q.scheme)).map(|e| {
            TableScheme {
                bits: e.bits,
                block_size: e.block_size,
                symmetric: e.symmetric,
                // Hot rows take the block scheme of the matrices (`QuantizeOptions::scheme`).
                hot: (s.hot_rows > 0).then_some(HotRows {
                    rows: s.hot_rows,
                    bits: q.scheme.bits,
                    block_size: q.scheme.block_size,
                    symmetric: q.scheme.symmetric,
                }),
            }
        }),
        kept_fp32: s.kept.clone(),
        blockwise: if dynamic { q.blockwise.clone() } else { vec![] },
        blockwise_scheme: (dynamic && !q.blockwise.is_empty()).then_some(BlockwiseScheme {
            bits: q.scheme.bits,
            block_size: q.scheme.block_size,
            symmetric: q.scheme.symmetric,
        }),
        activations: s.activations.clone(),
    }
}

/// Checks a quantized bundle against the fp32 candle model: every logit finite and the mean KL
/// of next-token distributions within `max_kl`. (The byte layout itself is checked against a
/// dequantized matmul in the quantizer's tests; this measures what quantizing cost.)
pub(crate) fn check_quantized(reference: &ReferenceLogits, dir: &Path, max_kl: f64) -> Result<VerifyReport> {
    within_kl(verify_against_reference(reference, dir, f32::INFINITY)?, max_kl)
}

/// Fails a check whose logits are not finite or whose mean KL is past `max_kl`.
fn within_kl(r: VerifyReport, max_kl: f64) -> Result<VerifyReport> {
    // NaN KL counts as past the limit.
    if !r.max_abs_diff.is_finite() || r.mean_kl.is_nan() || r.mean_kl > max_kl {
        return Err(Error::ExportMismatch {
            what: format!(
                "the quantized graph is too far from the fp32 model: mean KL {:.4} nats (limit {max_kl}), top-1 agreement {:.0}%, max abs logit difference {:.3}; try 8 bits, a smaller block size or --keep-fp32",
                r.mean_kl,
                100.0 * r.top1_agreement,
                r.max_abs_diff
            ),
        });
    }
    Ok(r)
}

/// Sentences an encoder bundle's quantization is checked on: short and long, commands,
/// questions and prose, so no single kind of input decides.
const ENCODER_CHECK_TEXTS: [&str; 10] = [
    "Turn on the kitchen light.",
    "What is the weather like in Lisbon tomorrow morning?",
    "The quarterly report shows revenue grew by twelve percent while costs stayed flat.",
    "Set the bedroom heater to 21 degrees at 6:15 am.",
    "A small dog ran across the park chasing a red ball.",
    "How do I reset the firmware on the sensor board?",
    "Neural networks can be compressed by quantizing their weights to eight or four bits.",
    "Please remind me to call my sister on Sunday.",
    "The train to the airport leaves every twenty minutes from platform four.",
    "Close the garage door.",
];

/// Smallest mean cosine between an encoder bundle's fp32 and quantized sentence embeddings that
/// the quantize check accepts: a guard against a broken graph (int8 of all-MiniLM-L6-v2 is
/// above 0.99), not an accuracy target.
pub const ENCODER_MIN_COSINE: f64 = 0.95;

/// A quantized encoder against its fp32 source.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EncoderCheck {
    /// Sentences embedded by both.
    pub texts: usize,
    /// Mean cosine similarity of the two embeddings of a sentence.
    pub mean_cosine: f64,
    /// The lowest of them.
    pub min_cosine: f64,
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b)).max(1e-12)
}

/// Embeds the check sentences with both encoder bundles and compares them.
pub fn check_encoder(reference: &Path, candidate: &Path) -> Result<EncoderCheck> {
    let opts = edgelm_runtime::EngineOptions::default();
    let mut r = edgelm_runtime::encoder::Encoder::open(reference, &opts)?;
    let mut c = edgelm_runtime::encoder::Encoder::open(candidate, &opts)?;
    let mut cos = Vec::new();
    for t in ENCODER_CHECK_TEXTS {
        cos.push(cosine(&r.embed(t)?, &c.embed(t)?));
    }
    Ok(EncoderCheck {
        texts: cos.len(),
        mean_cosine: cos.iter().sum::<f64>() / cos.len() as f64,
        min_cosine: cos.iter().copied().fold(f64::INFINITY, f64::min),
    })
}

/// The bundle's tokenizer at `path` as calibration reads it: without padding (which would add
/// pad tokens to every text and to the hot-row counts) and, as the runtime reads it, without
/// truncation (texts are cut at the bundle's `max_tokens` after).
fn calibration_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    let mut tokenizer = tokenizers::Tokenizer::from_file(path)
        .map_err(|e| Error::Format { path: path.to_path_buf(), what: format!("not a tokenizer: {e}") })?;
    tokenizer.with_padding(None);
    let _ = tokenizer.with_truncation(None);
    Ok(tokenizer)
}

/// One calibration text through `tokenizer` (read from `path`, named in the error).
fn encode_calibration(tokenizer: &tokenizers::Tokenizer, path: &Path, text: &str) -> Result<tokenizers::Encoding> {
    tokenizer
        .encode(text, true)
        .map_err(|e| Error::Format { path: path.to_path_buf(), what: format!("tokenizing a calibration text: {e}") })
}

/// `opts` with `hot_rows` filled in when `hot_row_count` asks for them: the token ids the
/// calibration texts use most, by the bundle's tokenizer at `tokenizer`.
pub(crate) fn with_hot_rows(opts: &QuantizeOptions, tokenizer: Option<&Path>) -> Result<QuantizeOptions> {
    let mut opts = opts.clone();
    if opts.hot_row_count == 0 || !opts.hot_rows.is_empty() {
        return Ok(opts);
    }
    if opts.embedding_scheme.is_none_or(|e| e.bits >= opts.scheme.bits) {
        return Err(Error::Unsupported {
            what: format!(
                "hot rows keep {}-bit rows in a table of fewer bits: give the table fewer bits (e.g. --embedding-bits 4)",
                opts.scheme.bits
            ),
        });
    }
    let texts: Vec<&String> = opts.calibration.iter().filter(|t| !t.trim().is_empty()).collect();
    let Some(path) = tokenizer.filter(|_| !texts.is_empty()) else {
        return Err(Error::Unsupported {
            what: "picking hot rows needs calibration texts (`--calibration FILE`) and a tokenizer in the bundle"
                .into(),
        });
    };
    let tokenizer = calibration_tokenizer(path)?;
    let mut ids = vec![];
    for t in texts {
        ids.extend_from_slice(encode_calibration(&tokenizer, path, t)?.get_ids());
    }
    opts.hot_rows = crate::quantize::graph::hot_rows(ids, tokenizer.get_vocab_size(true), opts.hot_row_count);
    Ok(opts)
}

/// Refuses hot rows that went nowhere: no token table only `Gather`s read (a table tied to the
/// LM head, one kept in fp32), so the table was not split as asked.
pub(crate) fn hot_rows_used(opts: &QuantizeOptions, summary: &QuantizeSummary) -> Result<()> {
    if (opts.hot_row_count > 0 || !opts.hot_rows.is_empty()) && summary.hot_rows == 0 {
        return Err(Error::Unsupported {
            what: "hot rows need a token table that only Gathers read (the one `input_ids` indexes, not tied to the LM head nor kept in fp32) and a table scheme of fewer bits than the matrices' (--embedding-bits 4); nothing was split: drop --embedding-hot-rows".into(),
        });
    }
    Ok(())
}

/// Static int8 of an encoder graph: activation ranges from running the fp32 graph on the
/// calibration texts (tokenized by the bundle's tokenizer), matrices in QDQ form, embedding
/// tables block-quantized as the other schemes do.
fn quantize_encoder_static(
    model: &mut ModelProto,
    src: &Path,
    manifest: &edgelm_runtime::bundle::Manifest,
    opts: &QuantizeOptions,
) -> Result<QuantizeSummary> {
    let texts: Vec<&String> = opts.calibration.iter().filter(|t| !t.trim().is_empty()).collect();
    if texts.is_empty() {
        return Err(Error::Unsupported {
            what: "int8-static needs calibration texts (`--calibration FILE`, one text per line)".into(),
        });
    }
    let tok_path = src.join(manifest.tokenizer.as_deref().unwrap_or("tokenizer.json"));
    let tokenizer = calibration_tokenizer(&tok_path)?;
    let max = manifest.encoder.as_ref().map_or(usize::MAX, |e| e.max_tokens);
    let inputs: Vec<String> =
        model.graph.as_ref().map(|g| g.input.iter().map(|v| v.name.clone()).collect()).unwrap_or_default();
    let mut samples = vec![];
    for t in &texts {
        let enc = encode_calibration(&tokenizer, &tok_path, t)?;
        let n = enc.get_ids().len().min(max);
        let as_i64 = |v: &[u32]| v[..n].iter().map(|&x| x as i64).collect::<Vec<_>>();
        let mut sample = vec![];
        for name in &inputs {
            let values = match name.as_str() {
                "input_ids" => as_i64(enc.get_ids()),
                "token_type_ids" => as_i64(enc.get_type_ids()),
                "attention_mask" => vec![1; n],
                other => {
                    return Err(Error::Unsupported {
                        what: format!("calibrating an encoder with input `{other}` (known: input_ids, token_type_ids, attention_mask)"),
                    })
                }
            };
            sample.push((name.clone(), values));
        }
        samples.push(sample);
    }
    let mut tensors = crate::quantize::qdq::activation_tensors(model, opts);
    if let Some(alpha) = opts.smooth {
        let absmax = crate::quantize::calibrate::channel_absmax(model, &tensors, &samples)?;
        crate::quantize::qdq::smooth(model, &absmax, alpha, opts)?;
        tensors = crate::quantize::qdq::activation_tensors(model, opts);
    }
    let ranges = crate::quantize::calibrate::calibrate(model, &tensors, &samples, opts.range)?;
    let mut summary = crate::quantize::qdq::quantize_static(model, &ranges, opts)?;
    // Embedding tables (and anything else only a Gather reads) as the block quantizer does.
    let rest = QuantizeOptions { method: Method::Blockwise, ..opts.clone() };
    let tables = quantize_model(model, &rest)?;
    summary.matmuls += tables.matmuls;
    summary.embeddings = tables.embeddings;
    summary.block_tables = tables.block_tables;
    summary.shared_embedding_head = tables.shared_embedding_head;
    summary.embedding_table = tables.embedding_table;
    summary.hot_rows = tables.hot_rows;
    summary.kept = tables.kept;
    summary.bytes_after = tables.bytes_after;
    summary.activations = Some(edgelm_runtime::bundle::ActivationScheme {
        element: "uint8".into(),
        calibration: opts.range.describe(),
        samples: samples.len(),
        tensors: tensors.len(),
        smoothing: opts.smooth,
    });
    Ok(summary)
}

/// What a quantized bundle takes from the bundle it is made from.
struct SourceFiles {
    /// Files copied as they are (not the graph, its data files or the tokenizer).
    copy: Vec<String>,
    model_file: String,
    tokenizer: Option<String>,
    /// A genai_config.json to write (for a source that describes itself another way).
    genai_config: Option<String>,
    /// What the source's manifest says (or would say) about it; the output's starts from it.
    info: BundleInfo,
    /// The fp32 model's bytes (graph and data files).
    model_bytes: u64,
}

impl SourceFiles {
    fn of_manifest(m: &edgelm_runtime::bundle::Manifest) -> Self {
        SourceFiles {
            copy: m
                .files
                .iter()
                .map(|f| f.path.clone())
                .filter(|p| *p != m.model_file && Some(p) != m.tokenizer.as_ref())
                .collect(),
            model_file: m.model_file.clone(),
            tokenizer: m.tokenizer.clone(),
            genai_config: None,
            info: BundleInfo {
                generation: m.generation.clone(),
                chat_template: m.chat_template.clone(),
                precision: m.quantization,
                weights: m.weights.clone(),
                checkpoint: m.source.checkpoint.clone().into(),
                checkpoint_sha256: m.source.sha256.clone(),
                encoder: m.encoder.clone(),
                report: m.report.clone(),
            },
            model_bytes: super::model_bytes(m),
        }
    }

    /// A causal LM folder without edgelm.json: one built by onnxruntime-genai's model builder,
    /// or a decoder exported by Hugging Face Optimum. Its files are copied (a genai_config.json
    /// is written for an Optimum folder), the source is named by the hash of its graph and data.
    fn of_foreign(b: &Bundle) -> Result<Self> {
        let model_file =
            b.model_path.strip_prefix(&b.dir).ok().and_then(|p| p.to_str()).map(str::to_owned).ok_or_else(|| {
                Error::Unsupported { what: format!("{}: a model outside its folder", b.dir.display()) }
            })?;
        let tokenizer = b.tokenizer_path.as_ref().and_then(|p| p.file_name()?.to_str().map(str::to_owned));
        let has_genai = b.dir.join("genai_config.json").exists();
        let mut copy = Vec::new();
        let mut model_bytes = 0;
        // The graph and its external data (`model.onnx.data`, `model.onnx_data`), hashed
        // together to name the source.
        let mut weights = Vec::new();
        for e in std::fs::read_dir(&b.dir).at(&b.dir)? {
            let e = e.at(&b.dir)?;
            let Some(name) = e.file_name().to_str().map(str::to_owned) else { continue };
            // Followed: a Hugging Face cache snapshot is a folder of symlinks.
            let meta = std::fs::metadata(e.path()).at(e.path())?;
            if !meta.is_file() || name.starts_with('.') {
                continue;
            }
            if name.starts_with(model_file.as_str()) {
                model_bytes += meta.len();
                weights.push(name);
            } else if !name.ends_with(".onnx") && !name.ends_with(".onnx_data") && Some(&name) != tokenizer.as_ref() {
                // Other graphs (an Optimum folder's model_quantized.onnx) are not this bundle's.
                copy.push(name);
            }
        }
        copy.sort();
        let genai_config =
            if has_genai { None } else { Some(serde_json::to_string_pretty(&b.genai).expect("the config serializes")) };
        let origin = if has_genai { "onnxruntime-genai folder" } else { "Hugging Face Optimum export" };
        Ok(SourceFiles {
            copy,
            model_file: model_file.clone(),
            tokenizer,
            genai_config,
            info: BundleInfo {
                generation: b.generation.clone(),
                chat_template: b.chat_template.clone(),
                precision: Precision::Fp32,
                weights: None,
                checkpoint: b.dir.clone(),
                checkpoint_sha256: super::files_hash(&b.dir, weights)?,
                encoder: None,
                report: serde_json::json!({"source": origin}),
            },
            model_bytes,
        })
    }
}

/// Refuses a graph some other tool quantized already: its matrices are packed, in fp16 or
/// integer, and quantizing again would compound the rounding (only fp32 sources are taken).
fn refuse_quantized_graph(model: &ModelProto, src: &Path) -> Result<()> {
    const QUANTIZED: [&str; 7] = [
        "MatMulNBits",
        "GatherBlockQuantized",
        "DynamicQuantizeMatMul",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "QLinearMatMul",
        "DequantizeLinear",
    ];
    let g = model.graph.as_ref();
    let op = g.and_then(|g| g.node.iter().find(|n| QUANTIZED.contains(&n.op_type.as_str())));
    let half = g.is_some_and(|g| {
        let reduced = [crate::onnx::DataType::Float16 as i32, crate::onnx::DataType::Bfloat16 as i32];
        g.initializer.iter().any(|t| t.data_type.is_some_and(|d| reduced.contains(&d)))
    });
    match (op, half) {
        (Some(n), _) => Err(Error::Unsupported {
            what: format!(
                "{} is quantized already (operator {}): quantize from an fp32 model",
                src.display(),
                n.op_type
            ),
        }),
        (None, true) => Err(Error::Unsupported {
            what: format!("{} holds fp16 or bf16 weights: quantize from an fp32 model", src.display()),
        }),
        _ => Ok(()),
    }
}

/// Quantizes the fp32 bundle in `src` (causal LM or encoder) into `out` and, with `max_kl`,
/// checks the result against `src` in ONNX Runtime: for a causal LM the mean KL and top-1
/// agreement of next-token distributions, for an encoder the cosine of sentence embeddings
/// (at least [`ENCODER_MIN_COSINE`] on average).
pub fn quantize_bundle(src: &Path, out: &Path, opts: &QuantizeOptions, max_kl: Option<f64>) -> Result<ExportReport> {
    super::refuse_replacing_source(src, out)?;
    let kind = Kind::of(src)?;
    if opts.method == Method::StaticInt8 && kind != Kind::Encoder {
        return Err(Error::Unsupported {
            what: format!(
                "{} is a {kind:?} bundle: int8-static is for encoders (a causal LM decodes one token at a time, where int8 or int8-dynamic is faster)",
                src.display()
            ),
        });
    }
    let (source, manifest, model_path) = match kind {
        Kind::Encoder => {
            if !src.join(edgelm_runtime::bundle::MANIFEST).exists() {
                return Err(Error::Unsupported {
                    what: format!(
                        "{} is an encoder exported by Optimum: export the checkpoint with `edgelm-distill export`, then quantize that bundle",
                        src.display()
                    ),
                });
            }
            // Its files checked against the manifest; the graph is read and checked below.
            let m = edgelm_runtime::bundle::verify_files(src)?;
            let p = src.join(&m.model_file);
            (SourceFiles::of_manifest(&m), Some(m), p)
        }
        _ => {
            let b = Bundle::open(src)?;
            let source = match &b.manifest {
                Some(m) => SourceFiles::of_manifest(m),
                None => SourceFiles::of_foreign(&b)?,
            };
            (source, b.manifest, b.model_path)
        }
    };
    if source.info.precision != Precision::Fp32 {
        return Err(Error::Unsupported {
            what: format!("{} is already {:?}: quantize from the fp32 bundle", src.display(), source.info.precision),
        });
    }
    let tokenizer = src.join(source.tokenizer.as_deref().unwrap_or("tokenizer.json"));
    let opts = &with_hot_rows(opts, tokenizer.exists().then_some(tokenizer.as_path()))?;
    let bytes = std::fs::read(&model_path).at(&model_path)?;
    let mut model = ModelProto::decode(bytes.as_slice())
        .map_err(|e| Error::Format { path: model_path.clone(), what: format!("not an ONNX model: {e}") })?;
    drop(bytes);
    if manifest.is_none() {
        refuse_quantized_graph(&model, src)?;
    }
    let fp32_bytes = source.model_bytes;
    // Weights kept beside the graph are read in as they are quantized, and those files are not
    // copied to the output: it gets its own.
    let data_files: Vec<String> = crate::onnx::external::data_files(&model);
    let weights_dir = model_path.parent().unwrap_or(src);
    let summary = if opts.method == Method::StaticInt8 {
        crate::onnx::external::internalize(&mut model, weights_dir)?;
        quantize_encoder_static(&mut model, src, manifest.as_ref().expect("encoders have one"), opts)?
    } else {
        // Weights written apart are read one at a time as they are quantized.
        quantize_model_in(&mut model, opts, Some(weights_dir))?
    };
    hot_rows_used(opts, &summary)?;
    let mut w = BundleWriter::create(out, kind)?;
    for f in source.copy.iter().filter(|f| !data_files.contains(f)) {
        w.copy(f, &src.join(f))?;
    }
    if let Some(t) = &source.tokenizer {
        w.tokenizer(&src.join(t))?;
    }
    if let Some(genai) = &source.genai_config {
        w.write("genai_config.json", genai.as_bytes())?;
    }
    // A causal LM keeps its source's layout: weights apart when they were (an encoder's graph
    // is written whole).
    let apart = kind == Kind::CausalLm && !data_files.is_empty();
    super::write_model(&mut w, &source.model_file, &mut model, apart)?;
    drop(model);
    let verify = match max_kl {
        Some(limit) if kind == Kind::CausalLm => {
            Some(within_kl(verify_against_bundle(src, w.dir(), f32::INFINITY)?, limit)?)
        }
        _ => None,
    };
    let parameters = source.info.report.get("parameters").and_then(|p| p.as_u64()).unwrap_or(0) as usize;
    let mut report = source.info.report.clone();
    if let Some(obj) = report.as_object_mut() {
        obj.insert("quantized_from".into(), serde_json::Value::from(src.display().to_string()));
    }
    // The check runs on the finished bundle (an encoder's goes through the runtime's own
    // loader, which needs the manifest) before it takes the place of whatever `out` held.
    let info = BundleInfo {
        precision: precision_of(Some(opts)),
        weights: Some(weight_scheme(opts, &summary)),
        report,
        ..source.info
    };
    let (written, encoder_check) = w.finish_checked(info, |dir| -> Result<Option<EncoderCheck>> {
        if max_kl.is_none() || kind != Kind::Encoder {
            return Ok(None);
        }
        let c = check_encoder(src, dir)?;
        if c.mean_cosine.is_nan() || c.mean_cosine < ENCODER_MIN_COSINE {
            return Err(Error::ExportMismatch {
                what: format!(
                    "the quantized encoder's embeddings are too far from fp32: mean cosine {:.4} (at least {ENCODER_MIN_COSINE}), lowest {:.4}",
                    c.mean_cosine, c.min_cosine
                ),
            });
        }
        Ok(Some(c))
    })?;
    Ok(ExportReport {
        bundle: out.to_path_buf(),
        model_bytes: super::model_bytes(&written),
        parameters,
        verify: None,
        quantized: Some(QuantizedReport {
            precision: precision_of(Some(opts)),
            summary,
            verify,
            encoder: encoder_check,
            fp32_bytes,
        }),
        warnings: vec![],
    })
}
