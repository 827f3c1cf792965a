//! Bundles on disk: an edgelm bundle (`edgelm.json` + files with recorded sha256), or a folder
//! made by onnxruntime-genai's builder (`genai_config.json` + ONNX + tokenizer files).
//!
//! Loading an edgelm bundle verifies every recorded hash before ONNX Runtime reads a byte, so a
//! corrupt copy is reported as such instead of as a confusing graph error. The format is
//! written here too ([`BundleWriter`]), next to the code that reads it.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::genai_config::GenaiConfig;
use crate::verified::VerifiedFiles;

/// Name of the manifest file.
pub const MANIFEST: &str = "edgelm.json";
/// The `format` value of every manifest.
const FORMAT: &str = "edgelm-bundle";
/// Manifest format version this runtime writes and the newest it reads. Version 2 moved the
/// encoder's settings and the pipeline summary out of the free-form `report` into typed fields;
/// version 3 added `weights.embedding_table.hot`, version 4 `weights.blockwise_scheme`. A manifest is written with the oldest version
/// that holds everything in it ([`Manifest::needed_version`]), so older runtimes keep reading
/// bundles that use nothing newer.
pub(crate) const FORMAT_VERSION: u32 = 4;

/// `edgelm.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always `edgelm-bundle`.
    pub format: String,
    /// Manifest version; a runtime refuses versions newer than its own.
    pub format_version: u32,
    /// What the bundle holds.
    pub kind: Kind,
    /// The ONNX graph, relative to the bundle folder.
    pub model_file: String,
    /// Every file of the bundle with its hash.
    pub files: Vec<FileEntry>,
    /// Tokenizer file, when the bundle has one.
    pub tokenizer: Option<String>,
    /// Generation defaults.
    pub generation: GenerationDefaults,
    /// Chat template (Jinja), when the source checkpoint had one.
    #[serde(default)]
    pub chat_template: Option<String>,
    /// Weight format of the graph.
    pub quantization: Precision,
    /// How quantized weights are stored (quantized bundles only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<WeightScheme>,
    /// Where the bundle came from.
    pub source: Source,
    /// How an encoder bundle takes its text (encoder bundles only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder: Option<EncoderInfo>,
    /// The pipeline that made the bundle and how each stage scored, when a pipeline did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<PipelineSummary>,
    /// Notes for people (architecture, parameter count, export check); nothing reads them.
    #[serde(default)]
    pub report: serde_json::Value,
}

/// Weight format of a bundle's graph (`quantization` in edgelm.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Precision {
    /// 32-bit floats.
    #[default]
    Fp32,
    /// 16-bit floats.
    Fp16,
    /// 8-bit integer weights.
    Int8,
    /// 4-bit integer weights.
    Int4,
}

/// How a quantized graph stores its weights (`weights` in edgelm.json): every parameter of the
/// scheme, so a bundle says exactly what was done to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightScheme {
    /// What the matrices run on: `MatMulNBits`, `DynamicQuantizeMatMul`, `MatMulIntegerToFloat`
    /// (static int8 in ONNX Runtime's integer form), `QDQ` (static int8 in the portable form) or
    /// `fp16` (every tensor inside the graph in fp16; `matrices` counts the weights converted).
    pub operator: String,
    /// Bits per weight.
    pub bits: u8,
    /// Weights per block, each block with its own scale; 0: one scale per output column
    /// (`DynamicQuantizeMatMul`).
    pub block_size: usize,
    /// Scales only (`true`) or scales and zero points.
    pub symmetric: bool,
    /// `MatMulNBits`' `accuracy_level` (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations).
    pub accuracy_level: u8,
    /// Matrices quantized.
    pub matrices: usize,
    /// Whether the embedding table is quantized (`GatherBlockQuantized`).
    pub embedding: bool,
    /// Whether the embedding and a tied LM head share one quantized table.
    pub shared_embedding_head: bool,
    /// Tables stored in blocks (`GatherBlockQuantized`), when they were quantized otherwise than
    /// `bits` / `block_size` / `symmetric` say: an untied table given its own scheme, and every
    /// such table under `DynamicQuantizeMatMul`, `MatMulIntegerToFloat` and `QDQ`, whose
    /// matrices have one scale per column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_table: Option<TableScheme>,
    /// Weights kept in fp32, with the reason.
    #[serde(default)]
    pub kept_fp32: Vec<String>,
    /// With `DynamicQuantizeMatMul` or `QDQ`: name patterns of the weights stored block-wise
    /// (`MatMulNBits`) instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blockwise: Vec<String>,
    /// With `blockwise`: how those weights are stored. Format version 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blockwise_scheme: Option<BlockwiseScheme>,
    /// Static quantization (`QDQ`): how the activations' fixed ranges were calibrated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activations: Option<ActivationScheme>,
}

/// Block quantization of an embedding table (`weights.embedding_table` in edgelm.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableScheme {
    /// Bits per value (4 or 8).
    pub bits: u8,
    /// Values per block, each block with its own scale.
    pub block_size: usize,
    /// Scales only (`true`) or scales and zero points.
    pub symmetric: bool,
    /// Rows of the token table stored apart in more bits (the tokens the calibration text
    /// used most); the others are quantized as this scheme says. Format version 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hot: Option<HotRows>,
}

/// The rows of a token table kept in more bits than the rest (`weights.embedding_table.hot`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HotRows {
    /// How many rows.
    pub rows: usize,
    /// Their bits per value.
    pub bits: u8,
    /// Their values per block.
    pub block_size: usize,
    /// Scales only (`true`) or scales and zero points.
    pub symmetric: bool,
}

/// The block quantization of the weights `weights.blockwise` names (`MatMulNBits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockwiseScheme {
    /// Bits per weight.
    pub bits: u8,
    /// Weights per block, each block with its own scale.
    pub block_size: usize,
    /// Scales only (`true`) or scales and zero points.
    pub symmetric: bool,
}

/// Activations quantized with ranges fixed at export (`weights.activations` in edgelm.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivationScheme {
    /// Element type of the quantized activations (`uint8`, asymmetric).
    pub element: String,
    /// How each range was chosen (`min-max`, `percentile 99.999`).
    pub calibration: String,
    /// Calibration texts run through the fp32 graph.
    pub samples: usize,
    /// Activation tensors given a fixed range.
    pub tensors: usize,
    /// Strength with which activation outliers were moved into the weights (SmoothQuant's
    /// alpha), when they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smoothing: Option<f32>,
}

/// An encoder's input limit and output, as exported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderInfo {
    /// Most tokens one text may have (the model's position table).
    pub max_tokens: usize,
    /// Length of an embedding.
    pub hidden_size: usize,
    /// How token states become one vector (`mean`, `cls`).
    pub pooling: String,
    /// Whether embeddings are L2-normalised inside the graph.
    pub normalize: bool,
}

/// What the pipeline recorded in the bundle it made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSummary {
    /// Recipe name.
    pub recipe: String,
    /// Held-out examples each stage was scored on.
    pub test_examples: usize,
    /// One entry per stage, in order.
    pub stages: Vec<StageSummary>,
    /// Student parameters as a share of the teacher's.
    pub student_share: f64,
    /// Student task completion relative to the teacher's.
    pub student_relative_completion: f64,
}

/// One pipeline stage's size and score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSummary {
    /// Stage name.
    pub stage: String,
    /// Parameters.
    pub parameters: usize,
    /// Weight bytes on disk.
    pub bytes: u64,
    /// Exact-match rate on the held-out examples.
    pub task_completion: f64,
    /// Perplexity of the expected answers, where measured.
    pub perplexity: Option<f64>,
}

/// What a bundle holds, from the `kind` field of edgelm.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A causal language model (`causal-lm`): generation.
    CausalLm,
    /// A sentence encoder (`encoder`): embeddings.
    Encoder,
}

impl Manifest {
    /// The oldest format version that holds everything in this manifest: 4 with the scheme of
    /// block-wise matrices (`weights.blockwise_scheme`), 3 with hot rows of a token table, else 2.
    pub fn needed_version(&self) -> u32 {
        let w = self.weights.as_ref();
        let hot = w.and_then(|w| w.embedding_table.as_ref()).is_some_and(|t| t.hot.is_some());
        if w.is_some_and(|w| w.blockwise_scheme.is_some()) {
            4
        } else if hot {
            3
        } else {
            2
        }
    }
}

impl Kind {
    /// The kind of the bundle in `dir`, read before anything is verified: edgelm.json's
    /// `kind`, or a causal LM for a folder made by onnxruntime-genai (which has no manifest).
    pub fn of(dir: &Path) -> Result<Kind> {
        if !dir.join(MANIFEST).exists() {
            return Ok(if foreign_encoder(dir) { Kind::Encoder } else { Kind::CausalLm });
        }
        #[derive(Deserialize)]
        struct KindOnly {
            kind: String,
        }
        let k: KindOnly = read_json(&dir.join(MANIFEST))?;
        match k.kind.as_str() {
            "causal-lm" => Ok(Kind::CausalLm),
            "encoder" => Ok(Kind::Encoder),
            other => Err(bundle_err(
                dir,
                format!("edgelm.json has kind `{other}`, which this runtime does not know (causal-lm, encoder); update edgelm"),
            )),
        }
    }

    /// "a causal LM" or "an encoder", for messages.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Kind::CausalLm => "a causal LM",
            Kind::Encoder => "an encoder",
        }
    }

    /// The name edgelm.json uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::CausalLm => "causal-lm",
            Kind::Encoder => "encoder",
        }
    }
}

/// One bundle file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Path relative to the bundle folder.
    pub path: String,
    /// Lower-case hex sha256 of the file's bytes.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// Token ids and sampling defaults for generation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationDefaults {
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens.
    pub eos_token_ids: Vec<u32>,
    /// Padding token.
    pub pad_token_id: Option<u32>,
    /// Default temperature (0 = greedy).
    pub temperature: f32,
    /// Default top-k (0 = off).
    pub top_k: usize,
    /// Default top-p (1 = off).
    pub top_p: f32,
    /// Default repetition penalty (1 = off).
    pub repetition_penalty: f32,
    /// The model answers one request at a time (a command model trained on single-turn
    /// data): chat front ends then send each line alone instead of the conversation so far.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub single_turn: bool,
}

/// Provenance of a bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// Checkpoint folder the bundle was exported from.
    pub checkpoint: String,
    /// sha256 over the checkpoint's config and weight files.
    pub sha256: String,
    /// Tool and version that wrote the bundle.
    pub exporter: String,
}

/// A bundle folder, checked and ready to open.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The folder.
    pub dir: PathBuf,
    /// The manifest; None for a folder made by onnxruntime-genai.
    pub manifest: Option<Manifest>,
    /// The decoder description.
    pub genai: GenaiConfig,
    /// Absolute path of the ONNX graph.
    pub model_path: PathBuf,
    /// Absolute path of tokenizer.json, when there is one.
    pub tokenizer_path: Option<PathBuf>,
    /// Chat template, from the manifest or tokenizer_config.json.
    pub chat_template: Option<String>,
    /// Generation defaults (from the manifest, else from genai_config.json).
    pub generation: GenerationDefaults,
    /// `add_bos_token` from tokenizer_config.json: text prompts must start with BOS even when
    /// tokenizer.json's post-processor does not add it (transformers honours this flag).
    pub add_bos_token: bool,
}

/// Bytes of model weights in a folder: ONNX graphs with their external data, and safetensors
/// files. The one measure of model size, for bundles and checkpoints alike.
pub fn weight_bytes(dir: &Path) -> u64 {
    // Optimum names external data `model.onnx_data`.
    let is_weights = |n: &str| {
        n.ends_with(".safetensors") || n.ends_with(".onnx") || n.ends_with(".onnx.data") || n.ends_with(".onnx_data")
    };
    std::fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .filter(|e| is_weights(&e.file_name().to_string_lossy()))
                .filter_map(|e| e.metadata().ok().map(|m| m.len()))
                .sum()
        })
        .unwrap_or(0)
}

/// Lower-case hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).at(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).at(path)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn bundle_err(dir: &Path, what: impl Into<String>) -> Error {
    Error::Bundle { path: dir.to_path_buf(), what: what.into() }
}

/// Reads a JSON file of the bundle. Bytes that are not UTF-8 or not the expected JSON are a
/// damaged bundle ([`Error::Bundle`]), not an I/O failure: the file was read fine.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).at(path)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Bundle {
        path: path.to_path_buf(),
        what: format!("is damaged (not valid JSON of this kind: {e}); re-export or re-copy the bundle"),
    })
}

/// A bundle path inside `dir`, refusing absolute paths and `..` so a manifest cannot point
/// outside its folder.
fn inside(dir: &Path, rel: &str) -> Result<PathBuf> {
    let p = Path::new(rel);
    if p.is_absolute() || p.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(bundle_err(dir, format!("file path `{rel}` leaves the bundle folder")));
    }
    Ok(dir.join(p))
}

/// Reads edgelm.json without checking the files it lists (version 1 manifests are brought to
/// the current shape).
pub(crate) fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    parse_manifest(dir, &std::fs::read(&path).at(&path)?)
}

/// [`read_manifest`] of bytes already read (the bytes a signature was checked over).
pub(crate) fn parse_manifest(dir: &Path, bytes: &[u8]) -> Result<Manifest> {
    let damaged = |e: serde_json::Error| Error::Bundle {
        path: dir.join(MANIFEST),
        what: format!("is damaged (not valid JSON of this kind: {e}); re-export or re-copy the bundle"),
    };
    // Format and version first: a newer manifest may carry fields this runtime does not know,
    // and its reader should hear "update edgelm", not "damaged".
    #[derive(Deserialize)]
    struct Header {
        format: String,
        format_version: u32,
    }
    let h: Header = serde_json::from_slice(bytes).map_err(damaged)?;
    if h.format != FORMAT {
        return Err(bundle_err(dir, format!("edgelm.json format is `{}`, not `{FORMAT}`", h.format)));
    }
    if h.format_version > FORMAT_VERSION {
        return Err(bundle_err(
            dir,
            format!("format version {} is newer than this runtime's {FORMAT_VERSION}; update edgelm", h.format_version),
        ));
    }
    let mut m: Manifest = serde_json::from_slice(bytes).map_err(damaged)?;
    if m.format_version < 2 && m.kind == Kind::Encoder && m.encoder.is_none() {
        // Version 1 kept an encoder's settings among the report's notes.
        let r = &m.report;
        let num = |k: &str| r.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
        if let (Some(max_tokens), Some(hidden_size)) = (num("max_position_embeddings"), num("hidden_size")) {
            m.encoder = Some(EncoderInfo {
                max_tokens,
                hidden_size,
                pooling: r.get("pooling").and_then(|v| v.as_str()).unwrap_or("mean").to_owned(),
                normalize: r.get("normalize").and_then(|v| v.as_bool()).unwrap_or(false),
            });
        }
    }
    Ok(m)
}

/// Rewrites the manifest of a bundle after `change` (the manifest is not among the hashed
/// files, so the files stay verified). The new manifest replaces the old one atomically.
pub fn update_manifest(dir: &Path, change: impl FnOnce(&mut Manifest)) -> Result<Manifest> {
    let mut m = read_manifest(dir)?;
    change(&mut m);
    m.format_version = m.needed_version();
    write_manifest(dir, &m)?;
    // The signature was over the old manifest: the bundle is unsigned now, not "altered".
    let sig = dir.join(crate::signature::SIGNATURE_FILE);
    if sig.exists() {
        std::fs::remove_file(&sig).at(&sig)?;
    }
    Ok(m)
}

fn write_manifest(dir: &Path, m: &Manifest) -> Result<()> {
    let path = dir.join(MANIFEST);
    let tmp = dir.join(format!("{MANIFEST}.tmp"));
    let text = serde_json::to_string_pretty(m).map_err(|e| bundle_err(dir, format!("manifest: {e}")))?;
    std::fs::write(&tmp, text).at(&tmp)?;
    std::fs::rename(&tmp, &path).at(&path)
}

/// What a [`BundleWriter`] records besides the files.
#[derive(Debug, Clone)]
pub struct BundleInfo {
    /// Generation defaults.
    pub generation: GenerationDefaults,
    /// Chat template, when the source had one.
    pub chat_template: Option<String>,
    /// Weight format of the graph.
    pub precision: Precision,
    /// How quantized weights are stored.
    pub weights: Option<WeightScheme>,
    /// Checkpoint folder the bundle was made from.
    pub checkpoint: PathBuf,
    /// sha256 over the checkpoint's config and weights.
    pub checkpoint_sha256: String,
    /// Encoder settings (encoder bundles).
    pub encoder: Option<EncoderInfo>,
    /// Notes for people.
    pub report: serde_json::Value,
}

impl GenerationDefaults {
    /// Greedy, no special tokens: what an encoder bundle records.
    pub fn none() -> Self {
        GenerationDefaults {
            bos_token_id: None,
            eos_token_ids: vec![],
            pad_token_id: None,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            single_turn: false,
        }
    }
}

/// Writes a bundle folder: the files first, each recorded with its size and sha256, then the
/// manifest. Everything is written into a hidden sibling folder (`.NAME.partial-TAG`, TAG the
/// process id and a clock reading) and moved to its place only when finished (and, with
/// [`BundleWriter::finish_checked`], checked): a writer dropped on an error or a failed check
/// removes its files and leaves whatever was at the destination as it was, so a failed export
/// never replaces a working bundle nor leaves a folder that opens as one. While it works, the
/// writer holds a lock on `.NAME.lock-TAG`, by which the next writer to the same destination
/// tells a killed writer's leftovers from a running one's.
#[derive(Debug)]
pub struct BundleWriter {
    /// Where the finished bundle goes.
    target: PathBuf,
    /// Where its files are written until then.
    dir: PathBuf,
    /// The destination's parent folder and name, for the hidden siblings.
    parent: PathBuf,
    name: OsString,
    /// What names this writer's hidden siblings.
    tag: String,
    /// The lock file, held until the writer is dropped.
    lock: Option<(PathBuf, std::fs::File)>,
    kind: Kind,
    files: Vec<String>,
    model_file: Option<String>,
    tokenizer: Option<String>,
    published: bool,
}

impl BundleWriter {
    /// Starts a bundle of `kind` that will be the folder `dir`. An existing `dir` is replaced
    /// when the bundle is finished; one that holds files but no bundle (neither edgelm.json nor
    /// genai_config.json) is refused, so a mistyped path cannot take a user's folder.
    pub fn create(dir: impl Into<PathBuf>, kind: Kind) -> Result<Self> {
        // Rebuilt from parent and name: `out/`, `out/.` and `link/` name the folders `out` and
        // `link`, but rename (and the symlink test) take only the plain form.
        let (mut parent, mut name) = split_destination(&dir.into())?;
        let mut target = parent.join(&name);
        // Through a symlink to the folder it names (moving the link would leave the folder).
        if std::fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_symlink()) {
            (parent, name) = split_destination(&std::fs::canonicalize(&target).at(&target)?)?;
            target = parent.join(&name);
        }
        // First, so the checks below see what a killed writer may have to put back.
        recover_leftovers(&parent, &name, &target);
        if target.exists() {
            if !target.is_dir() {
                return Err(bundle_err(&target, "exists and is not a folder; name a new or empty folder"));
            }
            let empty = std::fs::read_dir(&target).at(&target)?.next().is_none();
            if !empty && !target.join(MANIFEST).exists() && !target.join("genai_config.json").exists() {
                return Err(bundle_err(
                    &target,
                    "holds files but no bundle (no edgelm.json or genai_config.json); write the bundle to a new or empty folder (nothing was changed)",
                ));
            }
            #[cfg(unix)]
            {
                use std::os::unix::fs::MetadataExt;
                let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).at(p);
                if dev(&target)? != dev(&parent)? {
                    return Err(bundle_err(
                        &target,
                        "is a mount point, and a bundle replaces its folder as a whole; write it to a folder inside",
                    ));
                }
            }
        }
        std::fs::create_dir_all(&parent).at(&parent)?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let tag = format!("{}-{nanos}", std::process::id());
        let lock_path = hidden(&parent, &name, "lock", &tag);
        let cannot = |path: &Path, e: std::io::Error| {
            bundle_err(
                &target,
                format!(
                    "cannot be written: the bundle is made beside it first, and {} could not be created ({e})",
                    path.display()
                ),
            )
        };
        // Made and locked under a name recovery ignores, then renamed (the lock goes with it):
        // another writer never sees this writer's lock file unlocked.
        let locking = hidden(&parent, &name, "locking", &tag);
        let lock = std::fs::File::create_new(&locking).map_err(|e| cannot(&locking, e))?;
        // A file system without locks still gets bundles written, only without that guard.
        let locked = match lock.try_lock() {
            Err(std::fs::TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported => Ok(()),
            other => other.map_err(|e| bundle_err(&target, format!("cannot lock {} ({e})", locking.display()))),
        }
        .and_then(|()| std::fs::rename(&locking, &lock_path).at(&lock_path));
        if let Err(e) = locked {
            let _ = std::fs::remove_file(&locking);
            return Err(e);
        }
        let dir = hidden(&parent, &name, "partial", &tag);
        if let Err(e) = std::fs::create_dir(&dir) {
            let _ = std::fs::remove_file(&lock_path);
            return Err(cannot(&dir, e));
        }
        Ok(BundleWriter {
            target,
            dir,
            parent,
            name,
            tag,
            lock: Some((lock_path, lock)),
            kind,
            files: vec![],
            model_file: None,
            tokenizer: None,
            published: false,
        })
    }

    /// The folder the files are being written to (not the destination): what a check of the
    /// bundle before [`BundleWriter::finish`] opens.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes a file of the bundle; returns its path (inside [`BundleWriter::dir`]).
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<PathBuf> {
        let path = inside(&self.dir, name)?;
        std::fs::write(&path, bytes).at(&path)?;
        self.record(name);
        Ok(path)
    }

    /// Writes a file of the bundle through `fill`, which streams its bytes into it (a file too
    /// large to build in memory first, such as a model's external weights); returns its path.
    pub fn write_with(
        &mut self,
        name: &str,
        fill: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> Result<PathBuf> {
        use std::io::Write;
        let path = inside(&self.dir, name)?;
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path).at(&path)?);
        fill(&mut out).and_then(|()| out.flush()).at(&path)?;
        self.record(name);
        Ok(path)
    }

    /// Copies `from` into the bundle as `name`; returns its path (inside [`BundleWriter::dir`]).
    pub fn copy(&mut self, name: &str, from: &Path) -> Result<PathBuf> {
        let path = inside(&self.dir, name)?;
        std::fs::copy(from, &path).at(from)?;
        self.record(name);
        Ok(path)
    }

    /// Takes a file written earlier out of the bundle (nothing when there is none).
    pub fn remove(&mut self, name: &str) -> Result<()> {
        let path = inside(&self.dir, name)?;
        if path.exists() {
            std::fs::remove_file(&path).at(&path)?;
        }
        self.files.retain(|f| f != name);
        Ok(())
    }

    /// Writes the ONNX graph.
    pub fn model(&mut self, name: &str, bytes: &[u8]) -> Result<PathBuf> {
        self.model_file = Some(name.to_owned());
        self.write(name, bytes)
    }

    /// Copies the tokenizer in as `tokenizer.json`.
    pub fn tokenizer(&mut self, from: &Path) -> Result<PathBuf> {
        self.tokenizer = Some("tokenizer.json".into());
        self.copy("tokenizer.json", from)
    }

    fn record(&mut self, name: &str) {
        if !self.files.iter().any(|f| f == name) {
            self.files.push(name.to_owned());
        }
    }

    /// Hashes every file, writes the manifest and moves the bundle to its destination.
    pub fn finish(self, info: BundleInfo) -> Result<Manifest> {
        self.finish_checked(info, |_| Ok::<_, Error>(())).map(|(m, ())| m)
    }

    /// [`BundleWriter::finish`], but `check` runs on the complete bundle (manifest included, in
    /// the folder `check` is given) before it is moved to its destination; a failed check
    /// leaves the destination as it was.
    pub fn finish_checked<T, E: From<Error>>(
        mut self,
        info: BundleInfo,
        check: impl FnOnce(&Path) -> std::result::Result<T, E>,
    ) -> std::result::Result<(Manifest, T), E> {
        let model_file =
            self.model_file.clone().ok_or_else(|| bundle_err(&self.target, "the writer was given no model file"))?;
        let files = self
            .files
            .iter()
            .map(|f| {
                let p = self.dir.join(f);
                Ok(FileEntry { path: f.clone(), sha256: sha256_file(&p)?, bytes: std::fs::metadata(&p).at(&p)?.len() })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut m = Manifest {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            kind: self.kind,
            model_file,
            files,
            tokenizer: self.tokenizer.clone(),
            generation: info.generation,
            chat_template: info.chat_template,
            quantization: info.precision,
            weights: info.weights,
            source: Source {
                checkpoint: info.checkpoint.display().to_string(),
                sha256: info.checkpoint_sha256,
                exporter: concat!("edgelm-distill ", env!("CARGO_PKG_VERSION")).into(),
            },
            encoder: info.encoder,
            pipeline: None,
            report: info.report,
        };
        m.format_version = m.needed_version();
        write_manifest(&self.dir, &m)?;
        let checked = check(&self.dir)?;
        self.publish()?;
        Ok((m, checked))
    }

    /// Moves the finished folder to the destination, the bundle there before kept until the
    /// new one is in place (and put back if the move fails).
    fn publish(&mut self) -> Result<()> {
        let old = hidden(&self.parent, &self.name, "old", &self.tag);
        let had_old = self.target.exists();
        if had_old {
            std::fs::rename(&self.target, &old).at(&self.target)?;
        }
        if let Err(e) = std::fs::rename(&self.dir, &self.target) {
            if had_old && std::fs::rename(&old, &self.target).is_err() {
                return Err(bundle_err(
                    &self.target,
                    format!(
                        "the new bundle could not be moved into place ({e}), nor the old one back: it is in {}",
                        old.display()
                    ),
                ));
            }
            return Err(Error::Io { path: self.target.clone(), err: e });
        }
        self.published = true;
        if had_old {
            // Renamed first, so a removal cut short never leaves a half-deleted `.old` that a
            // later writer would take for a bundle to put back.
            let trash = hidden(&self.parent, &self.name, "trash", &self.tag);
            let gone = std::fs::rename(&old, &trash).and_then(|()| std::fs::remove_dir_all(&trash));
            if let Err(e) = gone {
                tracing::warn!("the new bundle is in place; the one it replaced is left beside it ({e})");
            }
        }
        Ok(())
    }
}

impl Drop for BundleWriter {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        if let Some((path, file)) = self.lock.take() {
            drop(file);
            let _ = std::fs::remove_file(path);
        }
    }
}

/// `.NAME.KIND-TAG` in `parent`: a writer's hidden sibling of the destination NAME.
fn hidden(parent: &Path, name: &OsStr, kind: &str, tag: &str) -> PathBuf {
    let mut file = OsString::from(".");
    file.push(name);
    file.push(format!(".{kind}-{tag}"));
    parent.join(file)
}

/// `dir` as the parent folder and the name a writer works with.
fn split_destination(dir: &Path) -> Result<(PathBuf, OsString)> {
    let name =
        dir.file_name().ok_or_else(|| bundle_err(dir, "is not a folder name a bundle can be written to"))?.to_owned();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name))
}

/// Cleans up after writers to `target` that are gone (killed, or their removal failed): their
/// lock file is missing or no longer held. A half-written `.partial-*` is removed, and of the
/// `.old-*` bundles (a writer killed between moving the old bundle aside and the new one in)
/// the newest is put back when nothing took the destination's place; the rest are removed.
fn recover_leftovers(parent: &Path, name: &OsStr, target: &Path) {
    let Some(name) = name.to_str() else { return };
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    let prefix = format!(".{name}.");
    // (kind, clock, path) of every leftover of a writer that is gone.
    let mut gone: Vec<(String, u128, PathBuf)> = Vec::new();
    let mut someone_writing = false;
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(rest) = file.to_str().and_then(|f| f.strip_prefix(&prefix)) else { continue };
        let Some((kind, tag)) = rest.split_once('-') else { continue };
        if !["partial", "old", "trash", "lock"].contains(&kind) {
            continue;
        }
        // The tag is exactly PID-CLOCK, so another destination's folders never match.
        let Some((pid, clock)) = tag.split_once('-') else { continue };
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        let Some(clock) = (digits(pid) && digits(clock)).then(|| clock.parse::<u128>().ok()).flatten() else {
            continue;
        };
        let lock = std::fs::File::open(hidden(parent, OsStr::new(name), "lock", tag));
        let held = lock.is_ok_and(|f| matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)));
        if held {
            someone_writing = true;
        } else {
            gone.push((kind.to_owned(), clock, e.path()));
        }
    }
    let newest_old = gone.iter().filter(|(k, ..)| k == "old").max_by_key(|(_, c, _)| *c).map(|(.., p)| p.clone());
    for (kind, _, path) in &gone {
        match kind.as_str() {
            "lock" => {
                let _ = std::fs::remove_file(path);
            }
            // Not while another writer works: the destination is missing during its swap.
            "old" if someone_writing => {}
            "old" if !target.exists() && newest_old.as_ref() == Some(path) => {
                let _ = std::fs::rename(path, target);
            }
            _ => {
                let _ = std::fs::remove_dir_all(path);
            }
        }
    }
}

/// Reads edgelm.json and checks it: format and version, then the size and sha256 of every
/// listed file, and that the model, the tokenizer and `also_required` are among them.
/// Files unchanged since an earlier open found their hashes right are not read again
/// ([`crate::verified`]).
pub(crate) fn verify_manifest(dir: &Path, also_required: &[&str]) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let mut verified = VerifiedFiles::from_env();
    let m = check_manifest(dir, &std::fs::read(&path).at(&path)?, also_required, &mut verified)?;
    verified.save();
    Ok(m)
}

/// [`verify_manifest`] of a manifest already read: the one a signature was checked over, so
/// the files are checked against exactly the signed hashes. Every file is hashed: the record of
/// earlier checks is not signed.
pub(crate) fn verify_manifest_bytes(dir: &Path, bytes: &[u8], also_required: &[&str]) -> Result<Manifest> {
    check_manifest(dir, bytes, also_required, &mut VerifiedFiles::full())
}

fn check_manifest(dir: &Path, bytes: &[u8], also_required: &[&str], verified: &mut VerifiedFiles) -> Result<Manifest> {
    let m = parse_manifest(dir, bytes)?;
    for f in &m.files {
        let path = inside(dir, &f.path)?;
        if !path.exists() {
            return Err(bundle_err(dir, format!("file `{}` listed in edgelm.json is missing", f.path)));
        }
        let len = std::fs::metadata(&path).at(&path)?.len();
        if len != f.bytes {
            return Err(bundle_err(
                dir,
                format!(
                    "file `{}` has {len} bytes, edgelm.json records {} (truncated or replaced); re-copy the bundle",
                    f.path, f.bytes
                ),
            ));
        }
        verified.check(&path, &f.sha256)?;
    }
    let required = [Some(m.model_file.as_str()), m.tokenizer.as_deref()]
        .into_iter()
        .flatten()
        .chain(also_required.iter().copied());
    for r in required {
        if !m.files.iter().any(|f| f.path == r) {
            return Err(bundle_err(dir, format!("`{r}` is not covered by a hash in edgelm.json")));
        }
    }
    Ok(m)
}

/// Checks that the folder holds nothing the manifest does not hash: no unlisted file (an ONNX
/// external-data file the graph names, say) and no symlink. What a signature over the
/// manifest vouches for is then everything the runtime can read from the folder.
pub fn check_coverage(dir: &Path, m: &Manifest) -> Result<()> {
    let listed: std::collections::HashSet<PathBuf> = m.files.iter().map(|f| PathBuf::from(&f.path)).collect();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let here = dir.join(&rel);
        for entry in std::fs::read_dir(&here).at(&here)? {
            let entry = entry.at(&here)?;
            let name = rel.join(entry.file_name());
            let kind = entry.file_type().at(entry.path())?;
            if kind.is_symlink() {
                return Err(bundle_err(
                    dir,
                    format!("`{}` is a symlink; a signed bundle holds plain files", name.display()),
                ));
            }
            if kind.is_dir() {
                stack.push(name);
            } else if !listed.contains(&name)
                && ![MANIFEST, crate::signature::SIGNATURE_FILE].iter().any(|f| name == Path::new(f))
            {
                return Err(bundle_err(
                    dir,
                    format!(
                        "`{}` is not hashed in edgelm.json, so a signature cannot vouch for it; remove it or re-export",
                        name.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Checks an edgelm bundle's files against its manifest (sizes and sha256) without opening its
/// model; returns the manifest. Every file is read and hashed, whatever earlier opens found.
pub fn verify_files(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    verify_manifest_bytes(dir, &std::fs::read(&path).at(&path)?, &[])
}

/// Whether `dir` is a folder the runtime opens (an edgelm bundle, an onnxruntime-genai folder,
/// or an ONNX graph exported by Hugging Face Optimum beside transformers' config.json) rather
/// than a checkpoint to export. Nothing is verified.
pub fn is_model_folder(dir: &Path) -> bool {
    let has_graph = || {
        std::fs::read_dir(dir).is_ok_and(|d| d.flatten().any(|e| e.file_name().to_string_lossy().ends_with(".onnx")))
    };
    dir.join(MANIFEST).exists()
        || dir.join("genai_config.json").exists()
        || (dir.join("config.json").exists() && has_graph())
}

/// Whether a folder without edgelm.json is an encoder exported by Hugging Face Optimum: no
/// genai_config.json, and a config.json naming an encoder family (BERT and its kin) or an
/// encoder class (`...Model`, not `...ForCausalLM`).
fn foreign_encoder(dir: &Path) -> bool {
    const ENCODERS: [&str; 10] = [
        "bert",
        "roberta",
        "xlm-roberta",
        "distilbert",
        "mpnet",
        "camembert",
        "electra",
        "albert",
        "nomic_bert",
        "modernbert",
    ];
    if dir.join("genai_config.json").exists() || !dir.join("config.json").exists() {
        return false;
    }
    // sentence-transformers' own files: an embedding model, even one whose class is a causal LM
    // (Qwen3-Embedding, gte-Qwen2).
    if dir.join("modules.json").exists() || dir.join("config_sentence_transformers.json").exists() {
        return true;
    }
    let Ok(config) = read_json::<serde_json::Value>(&dir.join("config.json")) else {
        return false;
    };
    let classes: Vec<&str> = config
        .get("architectures")
        .and_then(|a| a.as_array())
        .map_or(vec![], |a| a.iter().filter_map(|c| c.as_str()).collect());
    // `GPT2LMHeadModel` ends in Model too.
    if classes.iter().any(|c| c.contains("CausalLM") || c.contains("LMHead") || c.contains("ForConditionalGeneration"))
    {
        return false;
    }
    let model_type = config.get("model_type").and_then(|t| t.as_str()).unwrap_or("");
    ENCODERS.contains(&model_type) || classes.iter().any(|c| c.ends_with("Model"))
}

/// The graph of a folder without edgelm.json or genai_config.json (an Optimum export):
/// `model.onnx`, or the one `.onnx` file there is (Optimum's quantizer writes
/// `model_quantized.onnx`).
pub(crate) fn foreign_graph(dir: &Path) -> Result<String> {
    let names: Vec<String> =
        std::fs::read_dir(dir).at(dir)?.flatten().filter_map(|e| e.file_name().to_str().map(str::to_owned)).collect();
    let graphs: Vec<String> = names.iter().filter(|n| n.ends_with(".onnx")).cloned().collect();
    match graphs.as_slice() {
        _ if graphs.iter().any(|g| g == "model.onnx") => Ok("model.onnx".to_owned()),
        _ if graphs.iter().any(|g| g.starts_with("decoder_")) => Err(bundle_err(
            dir,
            "is an ONNX export by an older Optimum (decoder_model_merged.onnx / decoder_with_past_model.onnx), which edgelm does not run; export again with a current optimum (one model.onnx with past inputs)",
        )),
        [one] => Ok(one.clone()),
        [] => {
            let checkpoint = names.iter().any(|n| n.ends_with(".safetensors"));
            Err(bundle_err(
                dir,
                if checkpoint {
                    "is a Hugging Face checkpoint, not a bundle: export it with `edgelm-distill export CHECKPOINT -o BUNDLE`"
                } else {
                    "has config.json but no ONNX graph (expected an ONNX export by Hugging Face Optimum)"
                },
            ))
        }
        many => Err(bundle_err(
            dir,
            format!("has several ONNX graphs ({}) and no model.onnx: which one to run is unclear", many.join(", ")),
        )),
    }
}

/// The genai description of a folder exported by Hugging Face Optimum: its graph (`model.onnx`;
/// the older split layout with `decoder_model_merged.onnx` is refused by name) and
/// transformers' `config.json` and `generation_config.json`.
fn optimum_config(dir: &Path) -> Result<GenaiConfig> {
    let graph = foreign_graph(dir)?;
    let config: serde_json::Value = read_json(&dir.join("config.json"))?;
    let gen_path = dir.join("generation_config.json");
    let generation: Option<serde_json::Value> = if gen_path.exists() { Some(read_json(&gen_path)?) } else { None };
    GenaiConfig::from_transformers(&config, generation.as_ref(), &graph).map_err(|what| bundle_err(dir, what))
}

impl Bundle {
    /// The attention window the exporter recorded (`report.sliding_window` in edgelm.json):
    /// `Some(Some(w))` for a model whose attention slides over `w` positions, `Some(None)` when
    /// the manifest says none does (null), `None` when it does not say (no manifest, no key, or
    /// a value that is not a whole number).
    pub fn sliding_window(&self) -> Option<Option<u64>> {
        let value = self.manifest.as_ref()?.report.get("sliding_window")?;
        // Anything but null or a whole number says nothing: the graph is read instead.
        if value.is_null() {
            Some(None)
        } else {
            value.as_u64().map(Some)
        }
    }

    /// Opens and verifies a bundle folder (edgelm or onnxruntime-genai layout, or a decoder
    /// exported by Hugging Face Optimum).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Bundle::open_with_manifest(dir, None)
    }

    /// [`Bundle::open`] with edgelm.json's bytes when they were read already (for a signature
    /// check): the files are checked against those bytes, not a second read.
    pub(crate) fn open_with_manifest(dir: impl AsRef<Path>, manifest: Option<&[u8]>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(bundle_err(
                &dir,
                "is not a folder (expected a bundle folder with edgelm.json or genai_config.json)",
            ));
        }
        let genai_path = dir.join("genai_config.json");
        let kind = Kind::of(&dir)?;
        if kind != Kind::CausalLm {
            return Err(Error::WrongKind { path: dir, found: kind, wanted: Kind::CausalLm });
        }
        // No genai description and no manifest, but transformers' config: an Optimum export.
        let optimum = !genai_path.exists()
            && manifest.is_none()
            && !dir.join(MANIFEST).exists()
            && dir.join("config.json").exists();
        if !genai_path.exists() && !optimum {
            return Err(bundle_err(
                &dir,
                "has no genai_config.json (nor, for an ONNX export by Hugging Face Optimum, config.json); export it with `edgelm-distill export`",
            ));
        }
        let manifest = match manifest {
            Some(bytes) => Some(verify_manifest_bytes(&dir, bytes, &["genai_config.json"])?),
            None if dir.join(MANIFEST).exists() => Some(verify_manifest(&dir, &["genai_config.json"])?),
            None => None,
        };
        let genai: GenaiConfig = if optimum { optimum_config(&dir)? } else { read_json(&genai_path)? };
        let model_path =
            inside(&dir, manifest.as_ref().map(|m| m.model_file.as_str()).unwrap_or(&genai.model.decoder.filename))?;
        if !model_path.exists() {
            return Err(bundle_err(&dir, format!("model file {} is missing", model_path.display())));
        }
        let tokenizer_path = match &manifest {
            Some(m) => m.tokenizer.as_deref().map(|t| inside(&dir, t)).transpose()?,
            None => Some(dir.join("tokenizer.json")).filter(|p| p.exists()),
        };
        // In an edgelm bundle only hashed files are read; a genai folder has no hashes to check.
        let readable = |name: &str| match &manifest {
            Some(m) => m.files.iter().any(|f| f.path == name),
            None => dir.join(name).exists(),
        };
        let tok_cfg: Option<serde_json::Value> =
            if readable("tokenizer_config.json") { Some(read_json(&dir.join("tokenizer_config.json"))?) } else { None };
        let chat_template = match &manifest {
            Some(m) => m.chat_template.clone(),
            None => std::fs::read_to_string(dir.join("chat_template.jinja"))
                .ok()
                .or_else(|| crate::tokenizer::chat_template_in(tok_cfg.as_ref()?)),
        };
        let generation = match &manifest {
            Some(m) => m.generation.clone(),
            None => {
                let s = &genai.search;
                GenerationDefaults {
                    bos_token_id: genai.model.bos_token_id,
                    eos_token_ids: genai.model.eos_token_id.clone(),
                    pad_token_id: genai.model.pad_token_id,
                    temperature: if s.do_sample { s.temperature } else { 0.0 },
                    top_k: if s.do_sample { s.top_k } else { 0 },
                    top_p: if s.do_sample { s.top_p } else { 1.0 },
                    repetition_penalty: s.repetition_penalty,
                    single_turn: false,
                }
            }
        };
        let add_bos_token =
            tok_cfg.as_ref().and_then(|c| c.get("add_bos_token")).and_then(|v| v.as_bool()).unwrap_or(false);
        Ok(Bundle { dir, manifest, genai, model_path, tokenizer_path, chat_template, generation, add_bos_token })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_without_a_manifest_are_told_apart_by_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let kind = |config: Option<&str>, extra: &[&str]| {
            let d = dir.path().join(format!("case-{}", rand_name()));
            std::fs::create_dir_all(&d).unwrap();
            if let Some(c) = config {
                std::fs::write(d.join("config.json"), c).unwrap();
            }
            for f in extra {
                std::fs::write(d.join(f), "{}").unwrap();
            }
            Kind::of(&d).unwrap()
        };
        let bert = r#"{"architectures": ["BertModel"], "model_type": "bert"}"#;
        assert_eq!(kind(Some(bert), &[]), Kind::Encoder);
        assert_eq!(kind(Some(r#"{"model_type": "xlm-roberta"}"#), &[]), Kind::Encoder);
        assert_eq!(kind(Some(r#"{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}"#), &[]), Kind::CausalLm);
        assert_eq!(
            kind(Some(r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}"#), &[]),
            Kind::CausalLm
        );
        // An embedding model whose class is a causal LM, told by sentence-transformers' files.
        let qwen = r#"{"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}"#;
        assert_eq!(kind(Some(qwen), &["modules.json"]), Kind::Encoder);
        assert_eq!(kind(Some(bert), &["genai_config.json"]), Kind::CausalLm);
        assert_eq!(kind(None, &["genai_config.json"]), Kind::CausalLm);
    }

    fn rand_name() -> String {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        N.fetch_add(1, Ordering::Relaxed).to_string()
    }

    fn info() -> BundleInfo {
        BundleInfo {
            generation: GenerationDefaults::none(),
            chat_template: None,
            precision: Precision::Int8,
            weights: None,
            checkpoint: PathBuf::from("ck"),
            checkpoint_sha256: "00".into(),
            encoder: None,
            report: serde_json::json!({}),
        }
    }

    #[test]
    fn what_the_writer_writes_the_reader_verifies_and_a_new_writer_unmarks_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = BundleWriter::create(dir.path(), Kind::CausalLm).unwrap();
        w.model("model.onnx", b"graph").unwrap();
        w.write("genai_config.json", b"{}").unwrap();
        let written = w.finish(info()).unwrap();
        let read = verify_manifest(dir.path(), &["genai_config.json"]).unwrap();
        assert_eq!(read.files.len(), 2);
        assert_eq!(read.files[0].bytes, 5);
        assert_eq!(read.files[0].sha256, written.files[0].sha256);
        // Nothing of version 3 in it: written as version 2, which older runtimes read.
        assert_eq!((read.quantization, read.format_version), (Precision::Int8, 2));
        let text = std::fs::read_to_string(dir.path().join(MANIFEST)).unwrap();
        assert!(text.contains("\"quantization\": \"int8\""), "{text}");
        // A new export into the folder leaves the old bundle alone until it is finished.
        let w = BundleWriter::create(dir.path(), Kind::CausalLm).unwrap();
        assert!(w.finish(info()).is_err(), "a bundle needs a model file");
        verify_manifest(dir.path(), &["genai_config.json"]).unwrap();
        // Files may not leave the folder.
        let mut w = BundleWriter::create(dir.path(), Kind::CausalLm).unwrap();
        assert!(w.write("../outside", b"x").is_err());
    }

    /// Names in `parent` other than `keep`.
    fn others(parent: &Path, keep: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(parent)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != keep)
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_bundle_replaces_the_old_one_only_when_finished_and_checked() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("b");
        let write = |graph: &[u8], extra: Option<&str>| {
            let mut w = BundleWriter::create(&dir, Kind::CausalLm).unwrap();
            w.model("model.onnx", graph).unwrap();
            if let Some(name) = extra {
                w.write(name, b"x").unwrap();
            }
            w
        };
        write(b"first", Some("notes.txt")).finish(info()).unwrap();
        std::fs::write(dir.join(crate::signature::SIGNATURE_FILE), "{}").unwrap();
        // Dropped on an error: the first bundle as it was, nothing left beside it.
        drop(write(b"second", None));
        assert_eq!(std::fs::read(dir.join("model.onnx")).unwrap(), b"first");
        assert!(verify_files(&dir).is_ok());
        assert!(others(parent.path(), "b").is_empty(), "{:?}", others(parent.path(), "b"));
        // A failed check: the same, and the check saw the whole new bundle.
        let err = write(b"second", None)
            .finish_checked(info(), |d| {
                assert_eq!(std::fs::read(d.join("model.onnx")).unwrap(), b"second");
                verify_files(d)?;
                Err::<(), _>(Error::Bundle { path: d.into(), what: "check failed".into() })
            })
            .unwrap_err();
        assert!(err.to_string().contains("check failed"), "{err}");
        assert_eq!(std::fs::read(dir.join("model.onnx")).unwrap(), b"first");
        assert!(others(parent.path(), "b").is_empty(), "{:?}", others(parent.path(), "b"));
        // Finished: the new bundle in place, the old one's other files and signature gone.
        let (_, seen) = write(b"second", None).finish_checked(info(), |_| Ok::<_, Error>(7)).unwrap();
        assert_eq!(seen, 7);
        assert_eq!(std::fs::read(dir.join("model.onnx")).unwrap(), b"second");
        assert!(verify_files(&dir).is_ok());
        assert_eq!(others(&dir, ""), vec!["edgelm.json".to_string(), "model.onnx".to_string()]);
        assert!(others(parent.path(), "b").is_empty(), "{:?}", others(parent.path(), "b"));
    }

    #[test]
    fn trailing_slashes_symlinks_and_killed_writers() {
        let parent = tempfile::tempdir().unwrap();
        let p = parent.path();
        let finish = |dest: PathBuf, graph: &[u8]| {
            let mut w = BundleWriter::create(dest, Kind::CausalLm).unwrap();
            w.model("model.onnx", graph).unwrap();
            w.finish(info()).unwrap();
        };
        // `b/` and `b/.` are the folder `b`.
        finish(PathBuf::from(format!("{}/b/", p.display())), b"one");
        finish(p.join("b").join("."), b"two");
        assert_eq!(std::fs::read(p.join("b/model.onnx")).unwrap(), b"two");
        // Through a symlink, written with a slash as shells complete it: the folder it names
        // gets the bundle and the link stays a link.
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(p.join("b"), p.join("link")).unwrap();
            finish(PathBuf::from(format!("{}/link/", p.display())), b"three");
            assert!(std::fs::symlink_metadata(p.join("link")).unwrap().file_type().is_symlink());
            assert_eq!(std::fs::read(p.join("b/model.onnx")).unwrap(), b"three");
            std::fs::remove_file(p.join("link")).unwrap();
        }
        // A writer killed mid-write, and one killed after moving the old bundle aside (no such
        // process id can run): the next writer removes the first and puts the bundle back.
        std::fs::create_dir(p.join(".c.partial-99999999-1")).unwrap();
        std::fs::rename(p.join("b"), p.join(".c.old-99999999-1")).unwrap();
        let w = BundleWriter::create(p.join("c"), Kind::CausalLm).unwrap();
        assert_eq!(std::fs::read(p.join("c/model.onnx")).unwrap(), b"three");
        drop(w);
        assert_eq!(others(p, "c"), Vec::<String>::new());
        // Of two such old bundles the newer goes back; another destination's folders whose
        // names start alike, and a running writer's folder, are left alone.
        for (clock, graph) in [("1", b"v0"), ("5", b"v1")] {
            let old = p.join(format!(".e.old-99999999-{clock}"));
            std::fs::create_dir(&old).unwrap();
            std::fs::write(old.join("model.onnx"), graph).unwrap();
            std::fs::write(old.join(MANIFEST), "{}").unwrap();
        }
        std::fs::create_dir(p.join(".e.partial-5-x.partial-1-2")).unwrap();
        let running = BundleWriter::create(p.join("e"), Kind::CausalLm).unwrap();
        assert_eq!(std::fs::read(p.join("e/model.onnx")).unwrap(), b"v1");
        let second = BundleWriter::create(p.join("e"), Kind::CausalLm).unwrap();
        assert!(running.dir().exists(), "a running writer's folder was taken");
        drop((running, second));
        assert_eq!(others(p, "e"), vec![".e.partial-5-x.partial-1-2".to_string(), "c".to_string()]);
        // While a writer works (its swap leaves the destination missing for a moment), no old
        // bundle is put back; once it is gone, the next writer does.
        let old = p.join(".f.old-99999999-1");
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join(MANIFEST), "{}").unwrap();
        let running = BundleWriter::create(p.join("g"), Kind::CausalLm).unwrap();
        let mut lock_name = OsString::from(".f.lock-");
        lock_name.push(running.tag.as_str());
        std::fs::rename(running.lock.as_ref().unwrap().0.clone(), p.join(&lock_name)).unwrap();
        drop(BundleWriter::create(p.join("f"), Kind::CausalLm).unwrap());
        assert!(!p.join("f").exists() && old.exists(), "restored during another writer's swap");
        std::fs::rename(p.join(&lock_name), running.lock.as_ref().unwrap().0.clone()).unwrap();
        drop(running);
        drop(BundleWriter::create(p.join("f"), Kind::CausalLm).unwrap());
        assert!(p.join("f").join(MANIFEST).exists() && !old.exists());
    }

    #[test]
    fn a_folder_of_other_files_is_not_taken_for_a_bundle() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("photos");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("a.jpg"), b"mine").unwrap();
        let err = BundleWriter::create(&dir, Kind::CausalLm).unwrap_err().to_string();
        assert!(err.contains("holds files but no bundle"), "{err}");
        assert_eq!(others(&dir, ""), vec!["a.jpg".to_string()]);
        assert!(others(parent.path(), "photos").is_empty());
        // A file where the folder should be is refused too; an empty folder is taken.
        std::fs::write(parent.path().join("file"), b"x").unwrap();
        assert!(BundleWriter::create(parent.path().join("file"), Kind::CausalLm).is_err());
        let empty = parent.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let mut w = BundleWriter::create(&empty, Kind::CausalLm).unwrap();
        w.model("model.onnx", b"g").unwrap();
        w.finish(info()).unwrap();
        assert!(verify_files(&empty).is_ok());
    }

    /// A token table with hot rows needs version 3, the scheme of block-wise matrices version 4;
    /// the writer says so and the reader takes it.
    #[test]
    fn hot_rows_are_written_as_format_version_3_and_blockwise_schemes_as_4() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = BundleWriter::create(dir.path(), Kind::Encoder).unwrap();
        w.model("model.onnx", b"graph").unwrap();
        let hot = HotRows { rows: 16, bits: 8, block_size: 64, symmetric: true };
        let weights = WeightScheme {
            operator: "MatMulIntegerToFloat".into(),
            bits: 7,
            block_size: 0,
            symmetric: true,
            accuracy_level: 4,
            matrices: 2,
            embedding: true,
            shared_embedding_head: false,
            embedding_table: Some(TableScheme { bits: 4, block_size: 32, symmetric: true, hot: Some(hot) }),
            kept_fp32: vec![],
            blockwise: vec![],
            blockwise_scheme: None,
            activations: None,
        };
        let m = w.finish(BundleInfo { weights: Some(weights.clone()), ..info() }).unwrap();
        assert_eq!(m.format_version, 3);
        let read = read_manifest(dir.path()).unwrap();
        assert_eq!(read.weights.unwrap().embedding_table.unwrap().hot, Some(hot));

        // The scheme of block-wise matrices needs version 4.
        let mut w = BundleWriter::create(dir.path(), Kind::Encoder).unwrap();
        w.model("model.onnx", b"graph").unwrap();
        let blocks = BlockwiseScheme { bits: 8, block_size: 128, symmetric: false };
        let weights =
            WeightScheme { blockwise: vec!["output.dense".into()], blockwise_scheme: Some(blocks), ..weights };
        let m = w.finish(BundleInfo { weights: Some(weights), ..info() }).unwrap();
        assert_eq!(m.format_version, 4);
        assert_eq!(read_manifest(dir.path()).unwrap().weights.unwrap().blockwise_scheme, Some(blocks));
    }

    #[test]
    fn a_version_1_encoder_manifest_reads_as_version_2_and_newer_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = BundleWriter::create(dir.path(), Kind::Encoder).unwrap();
        w.model("model.onnx", b"graph").unwrap();
        let mut m = w.finish(info()).unwrap();
        m.format_version = 1;
        m.report = serde_json::json!({"max_position_embeddings": 512, "hidden_size": 384, "pooling": "mean", "normalize": true});
        std::fs::write(dir.path().join(MANIFEST), serde_json::to_string(&m).unwrap()).unwrap();
        let read = read_manifest(dir.path()).unwrap();
        let e = read.encoder.unwrap();
        assert_eq!((e.max_tokens, e.hidden_size, e.pooling.as_str(), e.normalize), (512, 384, "mean", true));
        m.format_version = FORMAT_VERSION + 1;
        // A newer manifest may also carry fields this runtime does not know.
        let mut newer = serde_json::to_value(&m).unwrap();
        newer["added_later"] = serde_json::json!({"x": 1});
        std::fs::write(dir.path().join(MANIFEST), newer.to_string()).unwrap();
        let err = read_manifest(dir.path()).unwrap_err().to_string();
        assert!(err.contains("newer than this runtime"), "{err}");
        // The same field at this version is damage.
        newer["format_version"] = FORMAT_VERSION.into();
        std::fs::write(dir.path().join(MANIFEST), newer.to_string()).unwrap();
        let err = read_manifest(dir.path()).unwrap_err().to_string();
        assert!(err.contains("damaged") && err.contains("added_later"), "{err}");
    }

    #[test]
    fn updating_the_manifest_keeps_the_files_verified() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = BundleWriter::create(dir.path(), Kind::CausalLm).unwrap();
        w.model("model.onnx", b"graph").unwrap();
        w.finish(info()).unwrap();
        let summary = PipelineSummary {
            recipe: "r".into(),
            test_examples: 3,
            stages: vec![],
            student_share: 0.5,
            student_relative_completion: 1.0,
        };
        update_manifest(dir.path(), |m| m.pipeline = Some(summary.clone())).unwrap();
        assert_eq!(verify_manifest(dir.path(), &[]).unwrap().pipeline, Some(summary));
        assert!(!dir.path().join(format!("{MANIFEST}.tmp")).exists());
    }
}
