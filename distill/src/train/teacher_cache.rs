//! Teacher outputs cached on disk for distillation runs that read the data more than once: the
//! top-k logits of every scored position, computed in one forward pass, so later epochs (and
//! resumed or repeated runs) skip the teacher.
//!
//! File `teacher-top<k>.safetensors` in the cache folder: `values [rows, k]` (f32 logits),
//! `indices [rows, k]` (u32 token ids), `offsets [examples + 1]` (u32: the rows of example i are
//! `offsets[i]..offsets[i + 1]`, in the order [`Batch`] scores them), and `key`, a fingerprint of
//! the teacher's files, the data and k. A cache whose key differs is rebuilt, never reused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, D};
use sha2::{Digest, Sha256};

use super::batch::{Batch, Encoded};
use super::workers::{map_parts, split, training_workers};
use crate::error::{Error, IoContext, Result};
use crate::model::LlamaModel;

/// Cached top-k teacher logits for one training set.
pub struct TeacherCache {
    values: Tensor,
    indices: Tensor,
    offsets: Vec<u32>,
}

fn key(teacher_hash: &str, data: &[Encoded], k: usize) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(teacher_hash.as_bytes());
    h.update((k as u64).to_le_bytes());
    for e in data {
        h.update((e.prompt_len as u64).to_le_bytes());
        h.update((e.ids.len() as u64).to_le_bytes());
        for id in &e.ids {
            h.update(id.to_le_bytes());
        }
    }
    h.finalize().to_vec()
}

impl TeacherCache {
    /// Loads the cache for `teacher` (checkpoint folder) and `data` from `dir`, or computes it
    /// with `model` and writes it there.
    pub fn open_or_build(
        dir: &Path,
        teacher_dir: &Path,
        model: &LlamaModel,
        data: &[Encoded],
        k: usize,
        batch_size: usize,
    ) -> Result<Self> {
        let vocab = model.config().vocab_size;
        if k == 0 || k > vocab {
            return Err(Error::Training {
                what: format!("teacher cache top-k must be between 1 and the vocabulary ({vocab})"),
            });
        }
        let want = key(&crate::export::checkpoint_hash(teacher_dir)?, data, k);
        let path: PathBuf = dir.join(format!("teacher-top{k}.safetensors"));
        if let Ok(t) = candle_core::safetensors::load(&path, &Device::Cpu) {
            if t.get("key").and_then(|k| k.to_vec1::<u8>().ok()).as_deref() == Some(want.as_slice()) {
                tracing::info!("teacher cache: reusing {}", path.display());
                return Self::from_tensors(&path, t);
            }
            tracing::info!("teacher cache: {} is for other data or another teacher; rebuilding", path.display());
        }
        // The batches shared among the training workers, each part's rows kept in data order.
        let chunks: Vec<&[Encoded]> = data.chunks(batch_size.max(1)).collect();
        let top_k = |part: &&[&[Encoded]]| -> Result<Vec<(Tensor, Tensor)>> {
            let mut out = Vec::with_capacity(part.len());
            for chunk in *part {
                let refs: Vec<&Encoded> = chunk.iter().collect();
                let batch = Batch::new(&refs, 0)?;
                let logits = model.logits_at(&batch.input_ids, &batch.rows)?;
                let order = logits.arg_sort_last_dim(false)?.narrow(D::Minus1, 0, k)?.contiguous()?;
                out.push((logits.gather(&order, D::Minus1)?, order));
            }
            Ok(out)
        };
        let (mut values, mut indices) = (Vec::new(), Vec::new());
        for part in map_parts(&split(&chunks, training_workers()), "teacher cache", top_k) {
            for (v, i) in part? {
                values.push(v);
                indices.push(i);
            }
        }
        let mut offsets = vec![0u32];
        for e in data {
            let scored = e.ids.len() - e.prompt_len.max(1);
            offsets.push(offsets.last().copied().unwrap_or(0) + scored as u32);
        }
        let mut tensors = HashMap::new();
        tensors.insert("values".to_owned(), Tensor::cat(&values, 0)?);
        tensors.insert("indices".to_owned(), Tensor::cat(&indices, 0)?);
        tensors.insert("offsets".to_owned(), Tensor::new(offsets.as_slice(), &Device::Cpu)?);
        tensors.insert("key".to_owned(), Tensor::new(want.as_slice(), &Device::Cpu)?);
        std::fs::create_dir_all(dir).at(dir)?;
        let tmp = path.with_extension("tmp");
        candle_core::safetensors::save(&tensors, &tmp)
            .map_err(|e| Error::Format { path: tmp.clone(), what: e.to_string() })?;
        std::fs::rename(&tmp, &path).at(&path)?;
        Self::from_tensors(&path, tensors)
    }

    fn from_tensors(path: &Path, mut t: HashMap<String, Tensor>) -> Result<Self> {
        let mut take = |n: &str| {
            t.remove(n).ok_or_else(|| Error::Format { path: path.to_path_buf(), what: format!("lacks `{n}`") })
        };
        Ok(TeacherCache { values: take("values")?, indices: take("indices")?, offsets: take("offsets")?.to_vec1()? })
    }

    /// The cached `(values, indices)`, `[N, k]` each, for a batch built from the training
    /// examples `examples` (in batch order).
    pub fn rows(&self, examples: &[usize]) -> Result<(Tensor, Tensor)> {
        let mut rows = Vec::new();
        for &i in examples {
            let (a, b) = (self.offsets[i], self.offsets[i + 1]);
            rows.extend(a..b);
        }
        let rows = Tensor::new(rows.as_slice(), &Device::Cpu)?;
        Ok((self.values.index_select(&rows, 0)?, self.indices.index_select(&rows, 0)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::preset::{preset_config, random_weights};
    use crate::checkpoint::write::{write_checkpoint, WriteOptions};

    /// The rows a batch reads from the cache are the teacher's top-k logits for that batch,
    /// whichever examples it holds and in whatever order.
    #[test]
    fn cached_rows_are_the_teachers_top_k_for_any_batch() {
        let config = preset_config("tiny").unwrap();
        let weights = random_weights(&config, 5).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let teacher_dir = dir.path().join("teacher");
        write_checkpoint(&teacher_dir, &config, &weights, WriteOptions::default()).unwrap();
        let model = LlamaModel::from_tensors(&config, &weights).unwrap();
        let vocab = config.vocab_size as u32;
        let data: Vec<Encoded> = (0..7)
            .map(|i| Encoded {
                ids: (0..(5 + 2 * i)).map(|j| (11 * i + 5 * j) as u32 % vocab).collect(),
                prompt_len: 2,
            })
            .collect();
        let k = 4;
        let cache = TeacherCache::open_or_build(&dir.path().join("cache"), &teacher_dir, &model, &data, k, 3).unwrap();
        for picked in [vec![6usize, 1, 3], vec![0], vec![2, 5, 4, 0]] {
            let refs: Vec<&Encoded> = picked.iter().map(|&i| &data[i]).collect();
            let batch = Batch::new(&refs, 0).unwrap();
            let logits = model.logits_at(&batch.input_ids, &batch.rows).unwrap();
            let order = logits.arg_sort_last_dim(false).unwrap().narrow(D::Minus1, 0, k).unwrap().contiguous().unwrap();
            let want = logits.gather(&order, D::Minus1).unwrap();
            let (values, indices) = cache.rows(&picked).unwrap();
            assert_eq!(indices.to_vec2::<u32>().unwrap(), order.to_vec2::<u32>().unwrap(), "{picked:?}");
            let diff = (values - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "{picked:?}: values differ by {diff}");
        }
    }
}
