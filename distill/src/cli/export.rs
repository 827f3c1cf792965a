//! `export`: a checkpoint to a checked bundle.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::ValueEnum;

use edgelm_distill::export::{
    export_owned, quantize_bundle, verify_against_reference, verify_bundle, ExportOptions, LogitsMode, ReferenceLogits,
};
use edgelm_distill::quantize::{BlockScheme, QuantizeOptions};
use edgelm_distill::Checkpoint;

/// Weight precision of a bundle.
#[derive(Clone, Copy, PartialEq, ValueEnum)]
pub enum PrecisionArg {
    /// 32-bit floats.
    Fp32,
    /// 16-bit floats inside the graph, inputs and outputs fp32 (GPU boards; CPUs run it
    /// through casts). --keep-fp32 names nodes (or operator types) to leave in fp32.
    Fp16,
    /// 8-bit weights in blocks (MatMulNBits).
    Int8,
    /// 4-bit weights in blocks (MatMulNBits).
    Int4,
    /// 8-bit weights with a scale per output column and activations quantized at run time
    /// (DynamicQuantizeMatMul): fastest over many tokens, for encoders.
    #[value(name = "int8-dynamic")]
    Int8Dynamic,
    /// 8-bit weights per output column and 8-bit activations with ranges fixed by calibration
    /// (ONNX Runtime's integer matmuls, or the QDQ form with --qdq; encoders; needs
    /// --calibration).
    #[value(name = "int8-static")]
    Int8Static,
}

/// How int8-static picks each activation range from the calibration run.
#[derive(Clone, Copy, PartialEq, ValueEnum)]
pub enum RangeArg {
    /// The smallest and largest value seen.
    MinMax,
    /// Percentiles (--percentile) of the values seen: outliers are clipped.
    Percentile,
}

/// How to quantize (shared by `export` and `quantize`).
#[derive(clap::Args)]
pub struct QuantArgs {
    /// Weight precision.
    #[arg(long, value_enum, default_value = "fp32")]
    precision: PrecisionArg,
    /// Weights per block, each with its own scale: a power of two from 16 to 256 [default: 64
    /// at int8, 32 at int4].
    #[arg(long)]
    block_size: Option<usize>,
    /// Store a zero point per block too (asymmetric), instead of values centred on zero.
    #[arg(long)]
    asymmetric: bool,
    /// MatMulNBits accuracy_level: 4 computes with int8 activations (fastest on CPUs), 1 in
    /// fp32, 2 fp16, 3 bf16, 0 leaves it to ONNX Runtime [default: 4].
    #[arg(long)]
    accuracy_level: Option<u8>,
    /// int8-dynamic / int8-static: weights over the full -127..127 instead of 7 bits (for ARM
    /// boards and x86 CPUs with VNNI; without VNNI the full range saturates and gives wrong sums).
    #[arg(long)]
    full_range: bool,
    /// int8-dynamic / int8-static: weights whose name contains this run block-wise 8-bit instead (repeatable),
    /// e.g. an encoder's FFN output projections, whose inputs have outliers.
    #[arg(long, value_name = "NAME")]
    blockwise: Vec<String>,
    /// Bits of the token table when no matmul reads it (an untied embedding, an encoder's word
    /// table; position tables keep the matrices' scheme): 4 or 8 [default: as the matrices, 8
    /// for int8-dynamic and int8-static].
    #[arg(long, value_name = "BITS")]
    embedding_bits: Option<u8>,
    /// Block size of those tables with --embedding-bits [default: 32 at 4 bits, --block-size at 8].
    #[arg(long, value_name = "N", requires = "embedding_bits")]
    embedding_block_size: Option<usize>,
    /// With --embedding-bits below the matrices' bits: keep this many rows of the token table at
    /// the matrices' bits, the tokens the --calibration text uses most (counted over the lines
    /// --calibration-samples takes; the lowest ids it did not use fill the rest): common words
    /// keep their precision, the rarely seen rest of the vocabulary shrinks.
    #[arg(long, value_name = "N", requires = "calibration", value_parser = clap::value_parser!(u32).range(1..))]
    embedding_hot_rows: Option<u32>,
    /// Leave embedding tables in fp32 (a tied LM head is then quantized alone).
    #[arg(long, conflicts_with = "embedding_bits")]
    fp32_embedding: bool,
    /// Keep in fp32 every weight whose initializer or node name contains this (repeatable),
    /// e.g. `lm_head` or `layers.0.`; with fp16, every node whose name contains this or whose
    /// operator type is this (e.g. `Pow`).
    #[arg(long, value_name = "NAME")]
    keep_fp32: Vec<String>,
    /// Largest mean KL divergence (nats) of the quantized model's next-token distribution from
    /// the fp32 one on the check prompt, a guard against a broken graph (the pipeline gates measure the task) [default: 0.1 at int8, 1.0 at int4].
    #[arg(long)]
    max_kl: Option<f64>,
    /// Text file with one calibration text per line (a few hundred lines like the texts the
    /// model will see): int8-static runs them through the fp32 graph to fix the activation
    /// ranges; --embedding-hot-rows counts their tokens.
    #[arg(long, value_name = "FILE")]
    calibration: Option<PathBuf>,
    /// At most this many calibration lines are used.
    #[arg(long, default_value_t = 256)]
    calibration_samples: usize,
    /// int8-static: how each activation range is chosen [default: min-max].
    #[arg(long, value_enum)]
    range: Option<RangeArg>,
    /// int8-static with --range percentile: the share of values kept inside the range, in
    /// percent (the rest, on both ends, is clipped) [default: 99.999].
    #[arg(long)]
    percentile: Option<f32>,
    /// int8-static: write the portable QDQ form (DequantizeLinear + MatMul, for runtimes such as
    /// TensorRT that read QDQ) instead of ONNX Runtime's integer matmul with the bias inside,
    /// which its CPU kernels run fastest.
    #[arg(long)]
    qdq: bool,
    /// int8-static: first move activation outliers into the weights with this strength (0 to
    /// 1, SmoothQuant's alpha; 0.5 is the usual choice). Adds one elementwise Mul per
    /// quantized activation.
    #[arg(long, value_name = "ALPHA")]
    smooth: Option<f32>,
}

impl QuantArgs {
    /// Refuses a flag the chosen precision would ignore: the bundle would not be what the
    /// command line asked for, and a flag that does nothing is usually a typo or a wrong
    /// precision.
    fn refuse_unused_flags(&self) -> Result<()> {
        use PrecisionArg::*;
        let p = self.precision;
        let integer = !matches!(p, Fp32 | Fp16);
        let per_column = matches!(p, Int8Dynamic | Int8Static);
        // MatMulNBits runs int8 and int4, and the matrices --blockwise names under the others.
        let matmul_nbits = matches!(p, Int8 | Int4) || (per_column && !self.blockwise.is_empty());
        let percentile_range = self.range == Some(RangeArg::Percentile);
        // Blocks: every weight at int8 and int4; under the per-column methods only the token
        // table (unless it stays fp32) and the matrices --blockwise names.
        let blocks = matches!(p, Int8 | Int4) || (per_column && (!self.fp32_embedding || !self.blockwise.is_empty()));
        let blocks_for = "int8 and int4, and the token table or --blockwise matrices of int8-dynamic and int8-static";
        let uses: [(&str, bool, bool, &str); 15] = [
            ("--block-size", self.block_size.is_some(), blocks, blocks_for),
            ("--asymmetric", self.asymmetric, blocks, blocks_for),
            (
                "--accuracy-level",
                self.accuracy_level.is_some(),
                matmul_nbits,
                "int8 and int4 (MatMulNBits), and the matrices --blockwise names",
            ),
            ("--full-range", self.full_range, per_column, "int8-dynamic and int8-static"),
            ("--blockwise", !self.blockwise.is_empty(), per_column, "int8-dynamic and int8-static"),
            ("--embedding-bits", self.embedding_bits.is_some(), integer, "int8, int4, int8-dynamic and int8-static"),
            ("--fp32-embedding", self.fp32_embedding, integer, "int8, int4, int8-dynamic and int8-static"),
            ("--keep-fp32", !self.keep_fp32.is_empty(), p != Fp32, "every precision but fp32"),
            (
                "--max-kl",
                self.max_kl.is_some(),
                p != Fp32,
                "every precision but fp32 (an fp32 export is checked by --tolerance)",
            ),
            ("--range", self.range.is_some(), p == Int8Static, "int8-static"),
            (
                "--percentile",
                self.percentile.is_some(),
                p == Int8Static && percentile_range,
                "int8-static with --range percentile",
            ),
            ("--smooth", self.smooth.is_some(), p == Int8Static, "int8-static"),
            ("--qdq", self.qdq, p == Int8Static, "int8-static"),
            (
                "--calibration",
                self.calibration.is_some(),
                p == Int8Static || self.embedding_hot_rows.is_some(),
                "int8-static and --embedding-hot-rows",
            ),
            ("--embedding-hot-rows", self.embedding_hot_rows.is_some(), integer, "int8, int8-dynamic and int8-static"),
        ];
        for (flag, given, used, users) in uses {
            if given && !used {
                let name = p.to_possible_value().map_or(String::new(), |v| v.get_name().to_owned());
                anyhow::bail!("{flag} does nothing with --precision {name}: it is for {users}");
            }
        }
        Ok(())
    }

    /// The quantizer's settings, or `None` for fp32.
    pub fn options(&self) -> Result<Option<QuantizeOptions>> {
        self.refuse_unused_flags()?;
        if self.embedding_hot_rows.is_some() && self.fp32_embedding {
            anyhow::bail!("--embedding-hot-rows splits a quantized token table; --fp32-embedding keeps it in fp32");
        }
        let bits = match self.precision {
            PrecisionArg::Fp32 => return Ok(None),
            PrecisionArg::Fp16 => {
                let mut o = QuantizeOptions::for_bits(8)?;
                o.method = edgelm_distill::quantize::graph::Method::Fp16;
                o.keep_fp32 = self.keep_fp32.clone();
                return Ok(Some(o));
            }
            PrecisionArg::Int8 | PrecisionArg::Int8Dynamic | PrecisionArg::Int8Static => 8,
            PrecisionArg::Int4 => 4,
        };
        let mut o = QuantizeOptions::for_bits(bits)?;
        o.scheme = BlockScheme::new(bits, self.block_size.unwrap_or(o.scheme.block_size), !self.asymmetric)?;
        o.accuracy_level = self.accuracy_level.unwrap_or(o.accuracy_level);
        o.embedding = !self.fp32_embedding;
        if let Some(b) = self.embedding_bits {
            let block = self.embedding_block_size.unwrap_or(if b == 4 { 32 } else { o.scheme.block_size });
            o.embedding_scheme = Some(BlockScheme::new(b, block, !self.asymmetric)?);
        }
        o.keep_fp32 = self.keep_fp32.clone();
        if self.precision == PrecisionArg::Int8Dynamic {
            o.method = edgelm_distill::quantize::graph::Method::DynamicInt8;
            o.full_range_int8 = self.full_range;
            warn_full_range_here(self.full_range);
            o.blockwise = self.blockwise.clone();
        }
        if let Some(path) = &self.calibration {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            o.calibration = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .take(self.calibration_samples)
                .map(String::from)
                .collect();
        }
        if let Some(n) = self.embedding_hot_rows {
            if bits < 8 {
                anyhow::bail!(
                    "--embedding-hot-rows keeps rows at the matrices' bits, above the table's: it needs 8-bit matrices"
                );
            }
            if self.embedding_bits.is_none_or(|b| b >= bits) {
                anyhow::bail!(
                    "--embedding-hot-rows keeps {bits}-bit rows in a table of fewer bits: add --embedding-bits 4"
                );
            }
            o.hot_row_count = n as usize;
        }
        if self.precision == PrecisionArg::Int8Static {
            o.method = edgelm_distill::quantize::graph::Method::StaticInt8;
            o.full_range_int8 = self.full_range;
            warn_full_range_here(self.full_range);
            o.blockwise = self.blockwise.clone();
            if self.calibration.is_none() {
                anyhow::bail!("--precision int8-static needs --calibration FILE (one text per line)");
            }
            o.smooth = self.smooth;
            o.qdq = self.qdq;
            o.range = match self.range.unwrap_or(RangeArg::MinMax) {
                RangeArg::MinMax => edgelm_distill::quantize::RangeMethod::MinMax,
                RangeArg::Percentile => {
                    edgelm_distill::quantize::RangeMethod::Percentile { percentile: self.percentile.unwrap_or(99.999) }
                }
            };
        }
        Ok(Some(o))
    }

    /// Refuses `--max-kl` (the check's limit) with `--no-verify` (no check).
    fn refuse_max_kl_without_check(&self, no_verify: bool) -> Result<()> {
        if self.max_kl.is_some() && no_verify {
            anyhow::bail!("--max-kl is the check's limit and --no-verify skips the check: give one of them");
        }
        Ok(())
    }

    /// The KL limit of the check.
    pub fn max_kl(&self) -> f64 {
        self.max_kl.unwrap_or(if self.precision == PrecisionArg::Int4 { 1.0 } else { 0.1 })
    }
}

/// Quantize an fp32 bundle (edgelm's, or a causal LM folder built by onnxruntime-genai or
/// exported by Optimum) (MatMulNBits weights, quantized embedding) and check it
/// against the source bundle.
#[derive(clap::Args)]
pub struct QuantizeArgs {
    /// fp32 bundle folder written by `export` (a causal LM or a sentence encoder).
    bundle: PathBuf,
    /// Bundle folder to write.
    #[arg(short, long)]
    output: PathBuf,
    #[command(flatten)]
    quant: QuantArgs,
    /// Skip the check against the source bundle.
    #[arg(long)]
    no_verify: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Quantizes a bundle.
pub fn quantize(a: QuantizeArgs) -> Result<()> {
    let Some(opts) = a.quant.options()? else {
        anyhow::bail!(
            "--precision fp32 leaves nothing to quantize: choose int8, int4, int8-dynamic, int8-static or fp16"
        );
    };
    a.quant.refuse_max_kl_without_check(a.no_verify)?;
    if a.quant.max_kl.is_some() && edgelm_runtime::bundle::Kind::of(&a.bundle)? == edgelm_runtime::bundle::Kind::Encoder
    {
        anyhow::bail!(
            "--max-kl checks a causal LM's next-token distributions; {} is an encoder, checked by the cosine of its sentence embeddings",
            a.bundle.display()
        );
    }
    let max_kl = (!a.no_verify).then(|| a.quant.max_kl());
    let report = quantize_bundle(&a.bundle, &a.output, &opts, max_kl)
        .with_context(|| format!("quantizing {} into {}", a.bundle.display(), a.output.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    print_quantized(&report.quantized, report.model_bytes);
    eprintln!("wrote {}", report.bundle.display());
    Ok(())
}

/// One line on the rewrite and one on its check.
fn print_quantized(q: &Option<edgelm_distill::export::QuantizedReport>, model_bytes: u64) {
    let Some(q) = q else { return };
    let s = &q.summary;
    let ratio = model_bytes as f64 / q.fp32_bytes as f64;
    let mib = model_bytes as f64 / (1 << 20) as f64;
    if q.precision == edgelm_runtime::bundle::Precision::Fp16 {
        eprintln!("stored {} weights in fp16: model {mib:.1} MiB, {ratio:.2}x of fp32", s.matmuls);
    } else {
        eprintln!(
            "quantized {} matrices{}{}: model {mib:.1} MiB, {ratio:.2}x of fp32",
            s.matmuls,
            if s.embeddings > 0 { " and the embedding" } else { "" },
            if s.shared_embedding_head { " (one table shared with the LM head)" } else { "" },
        );
    }
    if let Some(t) = &s.embedding_table {
        let sym = if t.symmetric { "" } else { " with zero points" };
        let (bits, block) = (t.bits, t.block_size);
        if s.hot_rows > 0 {
            eprintln!(
                "token table: {} most used rows at the matrices' bits, the rest {bits}-bit in blocks of {block}{sym}",
                s.hot_rows
            );
        } else {
            eprintln!("token table: {bits}-bit in blocks of {block}{sym}");
        }
    } else if s.hot_rows > 0 {
        eprintln!("token table: all {} rows hot, so all at the matrices' bits", s.hot_rows);
    }
    if let Some(a) = &s.activations {
        eprintln!(
            "activations: {} tensors in {}, ranges by {} over {} texts",
            a.tensors, a.element, a.calibration, a.samples
        );
    }
    for k in &s.kept {
        eprintln!("  {k}");
    }
    if let Some(e) = &q.encoder {
        eprintln!(
            "check: quantized vs fp32 sentence embeddings of {} sentences: mean cosine {:.4}, lowest {:.4}",
            e.texts, e.mean_cosine, e.min_cosine
        );
    }
    if let Some(v) = &q.verify {
        eprintln!(
            "check: quantized vs fp32 over {} prompt tokens + {} decode steps: mean KL {:.4} nats, top-1 agreement {:.0}%, max abs logit diff {:.3}",
            v.prompt_tokens,
            v.decode_steps,
            v.mean_kl,
            100.0 * v.top1_agreement,
            v.max_abs_diff
        );
    }
}

/// Which positions the exported graph gives logits for.
#[derive(Clone, Copy, ValueEnum)]
pub enum LogitsArg {
    Last,
    All,
}

/// Export a checkpoint to an edgelm bundle (ONNX with KV cache, fp32 or quantized) and check it.
#[derive(clap::Args)]
pub struct ExportArgs {
    /// Checkpoint folder (config.json, safetensors, tokenizer.json).
    checkpoint: PathBuf,
    /// Bundle folder to write.
    #[arg(short, long)]
    output: PathBuf,
    /// Logits for the last position only (fast prefill) or for every position [default: last].
    #[arg(long, value_enum)]
    logits: Option<LogitsArg>,
    /// Skip the ONNX-vs-candle check.
    #[arg(long)]
    no_verify: bool,
    /// Largest allowed max-abs difference in the check, per unit of the largest value compared
    /// (each decode step's logits, or an encoder's embedding; values under 1 in magnitude count
    /// as 1): fp32 sums taken in another order differ more on larger values.
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f32,
    /// Write the weights into model.onnx itself instead of model.onnx.data beside it (ONNX
    /// external data, the default: ONNX Runtime loads it in about half the time). Models whose
    /// model.onnx would pass protobuf's 2 GiB limit (about 500 million fp32 parameters) keep
    /// their weights apart anyway.
    #[arg(long, conflicts_with = "external_data")]
    single_file: bool,
    /// Weights in model.onnx.data beside the graph: the default, kept for older scripts.
    #[arg(long, hide = true)]
    external_data: bool,
    #[command(flatten)]
    quant: QuantArgs,
    /// Record that the model answers single requests, so `edgelm chat` sends each line
    /// alone (models trained on single-turn {instruction, input, output} data).
    #[arg(long)]
    single_turn: bool,
    /// Never hold the model whole (int8, int4, int8-dynamic): each weight is read from the
    /// checkpoint when the graph needs it, spilled to disk and quantized from there, and the
    /// check takes the reference one layer at a time, with no fp32 graph check. Chosen by
    /// itself when the checkpoint's f32 weights would not fit the memory available.
    #[arg(long)]
    low_memory: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Whether the f32 weights of `ck` (opened without them) fit the memory available now, at the
/// about 1.1 times an export holds at its peak; else what they need and what there is.
fn f32_weights_fit(ck: &Checkpoint) -> std::result::Result<(), String> {
    let need = (ck.config.num_parameters() as f64 * 4.0 * 1.1) as u64;
    match edgelm_runtime::metrics::meminfo_bytes("MemAvailable:") {
        Some(a) if a < need => Err(format!(
            "the f32 weights need about {:.1} GB and {:.1} GB are available",
            need as f64 / 1e9,
            a as f64 / 1e9
        )),
        _ => Ok(()),
    }
}

/// Exports and checks a bundle.
pub fn export(a: ExportArgs) -> Result<()> {
    let ExportArgs {
        checkpoint,
        output,
        logits,
        no_verify,
        tolerance,
        single_file,
        external_data,
        quant,
        single_turn,
        low_memory,
        json,
    } = a;
    if edgelm_distill::encoder::EncoderCheckpoint::is_encoder(&checkpoint) {
        let causal_only = [
            ("--external-data", external_data),
            ("--single-file", single_file),
            ("--single-turn", single_turn),
            ("--low-memory", low_memory),
            ("--logits", logits.is_some()),
        ];
        if let Some((flag, _)) = causal_only.iter().find(|(_, given)| *given) {
            anyhow::bail!("{flag} is for causal LMs; {} is an encoder", checkpoint.display());
        }
        if no_verify {
            anyhow::bail!(
                "{}: an encoder export is always checked against candle (it takes seconds); leave out --no-verify",
                checkpoint.display()
            );
        }
        if quant.precision != PrecisionArg::Fp32 {
            anyhow::bail!(
                "{} is an encoder: export it in fp32, then `edgelm-distill quantize` the bundle",
                checkpoint.display()
            );
        }
        // Refuses any quantization flag: an encoder export is fp32.
        quant.options()?;
        let ck = edgelm_distill::encoder::EncoderCheckpoint::load(&checkpoint)
            .with_context(|| format!("loading {}", checkpoint.display()))?;
        let diff = edgelm_distill::export::export_encoder(&ck, &output, tolerance)
            .with_context(|| format!("exporting to {}", output.display()))?;
        if json {
            let report = serde_json::json!({"bundle": output, "kind": "encoder", "check_max_abs_diff": diff});
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            eprintln!(
                "exported encoder to {} (check: ONNX Runtime vs candle embedding, max abs diff {diff:.2e})",
                output.display()
            );
        }
        return Ok(());
    }
    quant.refuse_max_kl_without_check(no_verify)?;
    // Before options(), which would ask int8-static for its calibration text first.
    if quant.precision == PrecisionArg::Int8Static {
        anyhow::bail!(edgelm_distill::export::STATIC_INT8_IS_FOR_ENCODERS);
    }
    let opts = ExportOptions {
        logits: match logits.unwrap_or(LogitsArg::Last) {
            LogitsArg::Last => LogitsMode::Last,
            LogitsArg::All => LogitsMode::All,
        },
        verify: !no_verify,
        tolerance,
        single_turn,
        quantize: quant.options()?,
        max_kl: quant.max_kl(),
        external_data: !single_file,
    };
    let (ck, index) =
        Checkpoint::load_deferred(&checkpoint).with_context(|| format!("reading {}", checkpoint.display()))?;
    let fits = f32_weights_fit(&ck);
    // Only weight-only int8 and int4 graphs can be made one weight at a time.
    let streamable = matches!(quant.precision, PrecisionArg::Int8 | PrecisionArg::Int4 | PrecisionArg::Int8Dynamic);
    let report = if low_memory || (fits.is_err() && streamable) {
        if let (false, Err(short)) = (low_memory, &fits) {
            eprintln!("{short}: exporting without loading them whole (--low-memory)");
        }
        edgelm_distill::export::export_deferred(&ck, &index, &output, &opts)
    } else {
        if let Err(short) = &fits {
            eprintln!(
                "warning: {short}; an int8, int4 or int8-dynamic export (--precision) reads them a layer at a time"
            );
        }
        drop(index);
        let ck = ck.with_weights().with_context(|| format!("loading {}", checkpoint.display()))?;
        export_owned(ck, &output, &opts)
    }
    .with_context(|| format!("exporting to {}", output.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for w in &report.warnings {
            eprintln!("warning: {w}");
        }
        eprintln!(
            "exported {} parameters to {} (model {:.1} MiB)",
            report.parameters,
            report.bundle.display(),
            report.model_bytes as f64 / (1 << 20) as f64
        );
        if let Some(v) = &report.verify {
            eprintln!(
                "check: ONNX Runtime vs candle, {} prompt tokens + {} decode steps, max abs logit diff {:.2e} (logits up to {:.3})",
                v.prompt_tokens, v.decode_steps, v.max_abs_diff, v.logit_scale
            );
        }
        print_quantized(&report.quantized, report.model_bytes);
    }
    Ok(())
}

/// Check a causal LM bundle (edgelm's, an onnxruntime-genai folder or an Optimum export) against
/// the checkpoint it was made from: the export's own check, on any bundle.
#[derive(clap::Args)]
pub struct CheckArgs {
    /// Checkpoint folder (config.json, safetensors).
    checkpoint: PathBuf,
    /// Bundle or model folder to check.
    bundle: PathBuf,
    /// Largest allowed max-abs logit difference per unit of each step's largest logit.
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f32,
    /// Pass instead when the mean KL divergence of next-token distributions is at most this
    /// (nats): the measure for quantized bundles, whose logits differ by more than rounding.
    #[arg(long)]
    max_kl: Option<f64>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Checks a bundle against a checkpoint; fails when it is out of bounds.
pub fn check(a: CheckArgs) -> Result<()> {
    let (ck, index) =
        Checkpoint::load_deferred(&a.checkpoint).with_context(|| format!("reading {}", a.checkpoint.display()))?;
    let v = if f32_weights_fit(&ck).is_ok() {
        drop(index);
        let ck = ck.with_weights().with_context(|| format!("loading {}", a.checkpoint.display()))?;
        verify_bundle(&ck, &a.bundle, a.tolerance)
    } else {
        eprintln!("the f32 weights would not fit in memory: the reference runs one layer at a time");
        ReferenceLogits::streamed(&ck.config, &index).and_then(|r| verify_against_reference(&r, &a.bundle, a.tolerance))
    }
    .with_context(|| format!("checking {} against {}", a.bundle.display(), a.checkpoint.display()))?;
    let passed = match a.max_kl {
        Some(max_kl) => v.mean_kl <= max_kl,
        None => v.passed,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"passed": passed, "check": v}))?);
    } else {
        eprintln!(
            "{} vs candle, {} prompt tokens + {} decode steps: max abs logit diff {:.2e} (worst at step {}, logits up to {:.3}), mean KL {:.2e}, top-1 agreement {:.0}%",
            a.bundle.display(),
            v.prompt_tokens,
            v.decode_steps,
            v.max_abs_diff,
            v.worst_step,
            v.logit_scale,
            v.mean_kl,
            v.top1_agreement * 100.0
        );
    }
    if !passed {
        match a.max_kl {
            Some(max_kl) => anyhow::bail!("check failed: mean KL {:.3e} is over --max-kl {max_kl}", v.mean_kl),
            None => anyhow::bail!(
                "check failed: logits differ by up to {:.3e} at step {} (logits up to {:.3}), over --tolerance {} per unit of logit",
                v.max_abs_diff,
                v.worst_step,
                v.logit_scale,
                a.tolerance
            ),
        }
    }
    Ok(())
}

/// `--full-range` is for VNNI and ARM boards; on this host's AVX2 kernels a check measures
/// saturated sums, so say so before the numbers look wrong.
pub(crate) fn warn_full_range_here(full_range: bool) {
    if full_range && !edgelm_distill::quantize::graph::host_sums_full_range_exactly() {
        eprintln!(
            "warning: --full-range: this CPU has no VNNI, so ONNX Runtime's integer kernels saturate on \
             8-bit weights and a check run on this machine measures that loss; the bundle runs exactly \
             on VNNI and ARM boards"
        );
    }
}
