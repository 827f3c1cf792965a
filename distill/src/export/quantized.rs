//! Quantized bundles: the record a quantization leaves in the manifest, the check of a
//! quantized graph against its fp32 source, and `quantize` for a bundle already exported.

use std::path::Path;

use prost::Message;

use edgelm_runtime::bundle::{Bundle, BundleInfo, BundleWriter, Kind, Precision, WeightScheme};

use super::verify::{verify_against_bundle, verify_bundle, VerifyReport};
use super::ExportReport;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, IoContext, Result};
use crate::onnx::ModelProto;
use crate::quantize::{quantize_model, QuantizeOptions, QuantizeSummary};

/// What quantizing an export did and cost.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuantizedReport {
    /// What the rewrite did.
    pub summary: QuantizeSummary,
    /// The quantized graph against the candle model (mean KL, top-1 agreement), when checked.
    pub verify: Option<VerifyReport>,
    /// Size of the fp32 model.onnx it replaced.
    pub fp32_bytes: u64,
}

/// The bundle's precision for a quantization choice.
pub(crate) fn precision_of(q: Option<&QuantizeOptions>) -> Precision {
    match q.map(|q| q.scheme.bits) {
        None => Precision::Fp32,
        Some(8) => Precision::Int8,
        Some(_) => Precision::Int4,
    }
}

/// The manifest's record of a quantization.
pub(crate) fn weight_scheme(q: &QuantizeOptions, s: &QuantizeSummary) -> WeightScheme {
    WeightScheme {
        operator: "MatMulNBits".into(),
        bits: q.scheme.bits,
        block_size: q.scheme.block_size,
        symmetric: q.scheme.symmetric,
        accuracy_level: q.accuracy_level,
        matrices: s.matmuls,
        embedding: s.embeddings > 0,
        shared_embedding_head: s.shared_embedding_head,
        kept_fp32: s.kept.clone(),
    }
}

/// Checks a quantized bundle against the fp32 candle model: every logit finite and the mean KL
/// of next-token distributions within `max_kl`. (The byte layout itself is checked against a
/// dequantized matmul in the quantizer's tests; this measures what quantizing cost.)
pub(crate) fn check_quantized(ck: &Checkpoint, dir: &Path, max_kl: f64) -> Result<VerifyReport> {
    within_kl(verify_bundle(ck, dir, f32::INFINITY)?, max_kl)
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

/// Quantizes the fp32 bundle in `src` into `out` and, with `max_kl`, checks the result against
/// `src` in ONNX Runtime (mean KL and top-1 agreement of next-token distributions).
pub fn quantize_bundle(src: &Path, out: &Path, opts: &QuantizeOptions, max_kl: Option<f64>) -> Result<ExportReport> {
    let bundle = Bundle::open(src)?;
    let Some(manifest) = bundle.manifest.clone() else {
        return Err(Error::Unsupported {
            what: format!(
                "{} has no edgelm.json (an onnxruntime-genai folder?): export the checkpoint with `edgelm-distill export --precision ...`",
                src.display()
            ),
        });
    };
    if manifest.quantization != Precision::Fp32 {
        return Err(Error::Unsupported {
            what: format!("{} is already {:?}: quantize from the fp32 bundle", src.display(), manifest.quantization),
        });
    }
    let bytes = std::fs::read(&bundle.model_path).at(&bundle.model_path)?;
    let fp32_bytes = bytes.len() as u64;
    let mut model = ModelProto::decode(bytes.as_slice())
        .map_err(|e| Error::Format { path: bundle.model_path.clone(), what: format!("not an ONNX model: {e}") })?;
    drop(bytes);
    let summary = quantize_model(&mut model, opts)?;
    let mut w = BundleWriter::create(out, Kind::CausalLm)?;
    for f in manifest.files.iter().filter(|f| f.path != manifest.model_file) {
        w.copy(&f.path, &src.join(&f.path))?;
    }
    if let Some(t) = &manifest.tokenizer {
        w.tokenizer(&src.join(t))?;
    }
    let model_path = w.model(&manifest.model_file, &model.encode_to_vec())?;
    drop(model);
    let verify = match max_kl {
        Some(limit) => Some(within_kl(verify_against_bundle(src, out, f32::INFINITY)?, limit)?),
        None => None,
    };
    let parameters = manifest.report.get("parameters").and_then(|p| p.as_u64()).unwrap_or(0) as usize;
    let mut report = manifest.report.clone();
    if let Some(obj) = report.as_object_mut() {
        obj.insert("quantized_from".into(), serde_json::Value::from(src.display().to_string()));
    }
    w.finish(BundleInfo {
        generation: manifest.generation.clone(),
        chat_template: manifest.chat_template.clone(),
        precision: precision_of(Some(opts)),
        weights: Some(weight_scheme(opts, &summary)),
        checkpoint: manifest.source.checkpoint.clone().into(),
        checkpoint_sha256: manifest.source.sha256.clone(),
        encoder: None,
        report,
    })?;
    Ok(ExportReport {
        bundle: out.to_path_buf(),
        model_bytes: std::fs::metadata(&model_path).at(&model_path)?.len(),
        parameters,
        verify: None,
        quantized: Some(QuantizedReport { summary, verify, fp32_bytes }),
        warnings: vec![],
    })
}
