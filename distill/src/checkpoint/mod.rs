//! Hugging Face checkpoints on disk: `config.json`, safetensors weights (single file or sharded
//! with `model.safetensors.index.json`), and the optional tokenizer and generation config.

pub mod config;
pub mod index;
pub mod names;
pub mod phi3;
pub mod preset;
pub mod rope;
pub mod weights;
pub mod write;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Tensor;

pub use config::{Architecture, ModelConfig, RopeConfig, RopeScaling};
pub use weights::{DecoderWeights, LayerWeights, Projection, PROJECTIONS};
pub use write::write_checkpoint;

use crate::error::{Error, IoContext, Result};

/// A loaded checkpoint: its configuration and every weight as an f32 tensor on the CPU. A clone
/// shares the weights (candle tensors are reference-counted), it does not copy them.
#[derive(Clone)]
pub struct Checkpoint {
    /// Folder the checkpoint was read from.
    pub dir: PathBuf,
    /// Parsed model configuration.
    pub config: ModelConfig,
    /// Weights by their transformers names (`model.layers.0.self_attn.q_proj.weight`, ...).
    pub tensors: HashMap<String, Tensor>,
    /// `tokenizer.json`, when the checkpoint has one.
    pub tokenizer_json: Option<PathBuf>,
    /// Sampling defaults from `generation_config.json`, when present.
    pub generation_config: Option<serde_json::Value>,
    /// `tokenizer_config.json`, when present (carries the chat template).
    pub tokenizer_config: Option<serde_json::Value>,
    /// The folder is a Phi-3 model's, its q/k/v and gate/up projections fused on disk (split in
    /// `tensors`; adapters for it are saved on the fused modules).
    pub stored_fused: bool,
}

/// A weight by name from a weight map, checked against the expected shape.
pub fn weight<'a>(tensors: &'a HashMap<String, Tensor>, name: &str, shape: &[usize]) -> Result<&'a Tensor> {
    let t = tensors
        .get(name)
        .ok_or_else(|| Error::Tensor { name: name.to_owned(), what: "missing from the checkpoint".into() })?;
    if t.dims() != shape {
        return Err(Error::Tensor {
            name: name.to_owned(),
            what: format!("shape {:?}, expected {:?}", t.dims(), shape),
        });
    }
    Ok(t)
}

/// Reads an optional JSON file (None when it does not exist).
pub(crate) fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).at(path)?;
    serde_json::from_str(&text).map(Some).map_err(|e| Error::InvalidConfig { what: format!("{}: {e}", path.display()) })
}

/// The safetensors files of a checkpoint folder, in a stable order.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if let Some(v) = read_json(&index)? {
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::InvalidConfig { what: format!("{} has no weight_map", index.display()) })?;
        let files: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let pickled = ["pytorch_model.bin", "pytorch_model.bin.index.json"].iter().any(|f| dir.join(f).exists());
    Err(Error::InvalidConfig {
        what: if pickled {
            format!(
                "{} has PyTorch pickle weights (pytorch_model.bin), which edgelm does not read; save the model as safetensors (transformers: save_pretrained(dir, safe_serialization=True))",
                dir.display()
            )
        } else {
            format!("{} has neither model.safetensors nor model.safetensors.index.json", dir.display())
        },
    })
}

/// Every float weight of a checkpoint folder as f32 (f16, bf16 and f64 are converted). Integer
/// tensors are buffers transformers sometimes saves (e.g. `position_ids`), not weights: skipped.
pub fn load_weights(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let mut tensors = HashMap::new();
    for file in weight_files(dir)? {
        read_safetensors(&file, |name, t| {
            tensors.insert(name, t);
        })?;
    }
    Ok(tensors)
}

/// Reads the float tensors of one safetensors file, each widened to f32, one at a time: the file
/// is never held whole beside the tensors made from it (a checkpoint's peak is its f32 weights,
/// not those plus its file).
fn read_safetensors(file: &Path, mut each: impl FnMut(String, Tensor)) -> Result<()> {
    let mut f = std::fs::File::open(file).at(file)?;
    for (name, span) in index::spans(file)? {
        each(name, span.read_from(&mut f)?);
    }
    Ok(())
}

impl Checkpoint {
    /// Reads a checkpoint folder. Weights stored as f16 or bf16 are widened to f32.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        Self::describe(dir.as_ref())?.with_weights()
    }

    /// Reads the folder's weights one tensor at a time through `keep`, which is given the
    /// configuration and returns what to hold for each tensor (the tensor, or something smaller
    /// made from it): a caller that packs the projections never holds them all in f32 at once.
    /// Phi-3's fused projections are split as they are read, and `keep` sees their parts.
    pub fn load_with(
        dir: impl AsRef<Path>,
        mut keep: impl FnMut(&ModelConfig, &str, Tensor) -> Result<Tensor>,
    ) -> Result<Self> {
        let mut ck = Self::describe(dir.as_ref())?;
        let (config, stored_fused) = (ck.config.clone(), ck.stored_fused);
        let is_fused = |name: &str| name.strip_suffix(".weight").and_then(phi3::fused_parts).is_some();
        let mut tensors = HashMap::new();
        let mut failed = None;
        for file in weight_files(&ck.dir)? {
            read_safetensors(&file, |name, t| {
                if failed.is_some() {
                    return;
                }
                // `keep` sees the names the model reads: a fused tensor's parts.
                let parts = if stored_fused && is_fused(&name) {
                    let mut one = HashMap::from([(name, t)]);
                    phi3::split_fused(&mut one, &config).map(|()| one.into_iter().collect())
                } else {
                    Ok(vec![(name, t)])
                };
                let kept = parts.and_then(|parts| {
                    parts.into_iter().map(|(n, t)| keep(&config, &n, t).map(|t| (n, t))).collect::<Result<Vec<_>>>()
                });
                match kept {
                    Ok(kept) => tensors.extend(kept),
                    Err(e) => failed = Some(e),
                }
            })?;
        }
        if let Some(e) = failed {
            return Err(e);
        }
        ck.tensors = tensors;
        let has_head = ck.tensors.contains_key(names::LM_HEAD);
        Ok(ck.tied_without_head(has_head))
    }

    /// Reads the weights of a checkpoint opened without them ([`Self::load_deferred`]), so a
    /// caller that finds they fit in memory need not read the folder's files again.
    pub fn with_weights(mut self) -> Result<Self> {
        self.tensors = load_weights(&self.dir)?;
        if self.stored_fused {
            phi3::split_fused(&mut self.tensors, &self.config)?;
        }
        let has_head = self.tensors.contains_key(names::LM_HEAD);
        Ok(self.tied_without_head(has_head))
    }

    /// Reads a checkpoint folder's configuration and files but no weights (`tensors` is empty):
    /// the index reads each weight when asked, for models larger than memory.
    pub fn load_deferred(dir: impl AsRef<Path>) -> Result<(Self, index::WeightIndex)> {
        let ck = Self::describe(dir.as_ref())?;
        let index = index::WeightIndex::open(&ck.dir, &ck.config, ck.stored_fused)?;
        let has_head = index.contains(names::LM_HEAD);
        Ok((ck.tied_without_head(has_head), index))
    }

    /// Everything but the weights.
    fn describe(dir: &Path) -> Result<Self> {
        let dir = dir.to_path_buf();
        let cfg_path = dir.join("config.json");
        let mut text = std::fs::read_to_string(&cfg_path).at(&cfg_path)?;
        let phi3 = serde_json::from_str::<serde_json::Value>(&text).ok().filter(phi3::is_phi3);
        let stored_fused = phi3.is_some();
        if let Some(config) = phi3 {
            tracing::info!("{} is Phi-3: read as the Mistral model it stores (q/k/v and gate/up split)", dir.display());
            text = phi3::as_mistral_config(config)?;
        }
        let config = ModelConfig::from_hf_json(&text)?;
        let ck = Checkpoint {
            generation_config: read_json(&dir.join("generation_config.json"))?,
            tokenizer_config: read_json(&dir.join("tokenizer_config.json"))?,
            tokenizer_json: Some(dir.join("tokenizer.json")).filter(|p| p.exists()),
            dir,
            config,
            tensors: HashMap::new(),
            stored_fused,
        };
        Ok(ck)
    }

    /// Saved tied (transformers drops the shared head): without `lm_head.weight` the embedding
    /// is the head, whatever the config says.
    fn tied_without_head(mut self, has_head: bool) -> Self {
        if !self.config.tie_word_embeddings && !has_head {
            tracing::info!("no lm_head.weight in {}: using tied embeddings", self.dir.display());
            self.config.tie_word_embeddings = true;
        }
        self
    }

    /// A weight by name, checked against the expected shape.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<&Tensor> {
        weight(&self.tensors, name, shape)
    }

    /// The LM head matrix `[vocab, hidden]`: `lm_head.weight`, or the embedding when tied.
    pub fn lm_head(&self) -> Result<&Tensor> {
        let c = &self.config;
        let shape = [c.vocab_size, c.hidden_size];
        let name = if c.tie_word_embeddings { names::EMBED } else { names::LM_HEAD };
        self.get(name, &shape)
    }

    /// End-of-sequence ids: generation_config.json wins over config.json, as in transformers.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let from_gen = self
            .generation_config
            .as_ref()
            .map(|g| config::token_ids(&g.get("eos_token_id").cloned()))
            .unwrap_or_default();
        if from_gen.is_empty() {
            self.config.eos_token_ids.clone()
        } else {
            from_gen
        }
    }

    /// Beginning-of-sequence id: generation_config.json wins over config.json.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.generation_config
            .as_ref()
            .and_then(|g| config::token_ids(&g.get("bos_token_id").cloned()).first().copied())
            .or(self.config.bos_token_id)
    }

    /// The chat template from tokenizer_config.json (or a `chat_template.jinja` file).
    pub fn chat_template(&self) -> Option<String> {
        let file = self.dir.join("chat_template.jinja");
        if let Ok(t) = std::fs::read_to_string(file) {
            return Some(t);
        }
        edgelm_runtime::tokenizer::chat_template_in(self.tokenizer_config.as_ref()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn safetensors_read_tensor_by_tensor_as_candle_reads_them_whole() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.safetensors");
        let dev = Device::Cpu;
        let values: Vec<f32> = (0..60).map(|i| (i as f32 - 30.0) / 7.0).collect();
        let f32_t = Tensor::from_vec(values.clone(), (6, 10), &dev).unwrap();
        let mut saved = HashMap::new();
        saved.insert("a.weight".to_owned(), f32_t.clone());
        saved.insert("b.weight".to_owned(), f32_t.to_dtype(DType::BF16).unwrap());
        saved.insert("c.weight".to_owned(), f32_t.narrow(0, 0, 2).unwrap().to_dtype(DType::F16).unwrap());
        saved.insert("position_ids".to_owned(), Tensor::arange(0i64, 5, &dev).unwrap());
        candle_core::safetensors::save(&saved, &file).unwrap();

        let mut read = HashMap::new();
        read_safetensors(&file, |n, t| {
            read.insert(n, t);
        })
        .unwrap();
        let whole = candle_core::safetensors::load(&file, &dev).unwrap();
        assert_eq!(read.len(), 3, "the integer buffer is skipped");
        for (name, t) in &read {
            assert_eq!(t.dtype(), DType::F32);
            let expected = whole[name].to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(t.dims(), whole[name].dims(), "{name}");
            assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), expected, "{name}");
        }
        assert_eq!(read["a.weight"].flatten_all().unwrap().to_vec1::<f32>().unwrap(), values);

        // Cut short: an error naming the file, not a panic or a short tensor.
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() - 10]).unwrap();
        let err = read_safetensors(&file, |_, _| {}).unwrap_err().to_string();
        assert!(err.contains("cut short") && err.contains("model.safetensors"), "{err}");
        std::fs::write(&file, &bytes[..4]).unwrap();
        let err = read_safetensors(&file, |_, _| {}).unwrap_err().to_string();
        assert!(err.contains("cannot read safetensors"), "{err}");
        // Hostile headers: offsets that would wrap, a shape that is not whole numbers, a shape
        // whose size overflows.
        let with_header = |header: &str| {
            let mut b = (header.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(header.as_bytes());
            b.extend_from_slice(&[0u8; 16]);
            std::fs::write(&file, b).unwrap();
            read_safetensors(&file, |_, _| {}).unwrap_err().to_string()
        };
        let wrap =
            format!(r#"{{"w": {{"dtype": "F32", "shape": [4], "data_offsets": [{}, {}]}}}}"#, u64::MAX - 8, u64::MAX);
        assert!(with_header(&wrap).contains("cut short"));
        let float = r#"{"w": {"dtype": "F32", "shape": [2, 2.0], "data_offsets": [0, 16]}}"#;
        assert!(with_header(float).contains("whole numbers"));
        let huge = format!(r#"{{"w": {{"dtype": "F32", "shape": [{}, 4], "data_offsets": [0, 16]}}}}"#, u64::MAX / 2);
        assert!(with_header(&huge).contains("does not take"));
    }
}
