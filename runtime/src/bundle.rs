//! Bundles on disk: an edgelm bundle (`edgelm.json` + files with recorded sha256), or a folder
//! made by onnxruntime-genai's builder (`genai_config.json` + ONNX + tokenizer files).
//!
//! Loading an edgelm bundle verifies every recorded hash before ONNX Runtime reads a byte, so a
//! corrupt copy is reported as such instead of as a confusing graph error.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::genai_config::GenaiConfig;

/// Name of the manifest file.
pub const MANIFEST: &str = "edgelm.json";
/// Manifest format version this runtime reads and writes.
pub const FORMAT_VERSION: u32 = 1;

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
    /// Weight format: `fp32`, `int8`, `int4`, ...
    pub quantization: String,
    /// Where the bundle came from.
    pub source: Source,
    /// Pipeline report entries (free-form, written by edgelm-distill).
    #[serde(default)]
    pub report: serde_json::Value,
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

impl Kind {
    /// The kind of the bundle in `dir`, read before anything is verified: edgelm.json's
    /// `kind`, or a causal LM for a folder made by onnxruntime-genai (which has no manifest).
    pub fn of(dir: &Path) -> Result<Kind> {
        if !dir.join(MANIFEST).exists() {
            return Ok(Kind::CausalLm);
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
    pub fn describe(self) -> &'static str {
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
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
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

/// Reads edgelm.json and checks it: format and version, then the size and sha256 of every
/// listed file, and that the model, the tokenizer and `also_required` are among them.
pub fn verify_manifest(dir: &Path, also_required: &[&str]) -> Result<Manifest> {
    let m: Manifest = read_json(&dir.join(MANIFEST))?;
    if m.format != "edgelm-bundle" {
        return Err(bundle_err(dir, format!("edgelm.json format is `{}`, not `edgelm-bundle`", m.format)));
    }
    if m.format_version > FORMAT_VERSION {
        return Err(bundle_err(
            dir,
            format!("format version {} is newer than this runtime's {FORMAT_VERSION}; update edgelm", m.format_version),
        ));
    }
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
        let actual = sha256_file(&path)?;
        if actual != f.sha256 {
            return Err(Error::HashMismatch { path, expected: f.sha256.clone(), actual });
        }
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

impl Bundle {
    /// Opens and verifies a bundle folder (edgelm or onnxruntime-genai layout).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
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
        if !genai_path.exists() {
            return Err(bundle_err(&dir, "has no genai_config.json; export it with `edgelm-distill export`"));
        }
        let manifest =
            if dir.join(MANIFEST).exists() { Some(verify_manifest(&dir, &["genai_config.json"])?) } else { None };
        let genai: GenaiConfig = read_json(&genai_path)?;
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
                .or_else(|| tok_cfg.as_ref()?.get("chat_template")?.as_str().map(str::to_owned)),
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
