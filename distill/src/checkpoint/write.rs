//! Writing checkpoints in the Hugging Face layout, so transformers and every edgelm stage can
//! read what another stage wrote.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};

use super::ModelConfig;
use crate::error::{Error, IoContext, Result};

/// How the weights are stored.
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    /// Storage dtype of the weights (F32, F16 or BF16).
    pub dtype: DType,
    /// Split into `model-0000N-of-0000M.safetensors` shards plus an index when the weights are
    /// larger than this many bytes.
    pub max_shard_bytes: Option<usize>,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions { dtype: DType::F32, max_shard_bytes: None }
    }
}

/// Writes `config.json` and the weights of a checkpoint into `dir` (created if needed).
pub fn write_checkpoint(
    dir: &Path,
    config: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    opts: WriteOptions,
) -> Result<()> {
    std::fs::create_dir_all(dir).at(dir)?;
    let cfg = serde_json::to_string_pretty(&config.to_hf_json()).expect("json value");
    std::fs::write(dir.join("config.json"), cfg).at(dir.join("config.json"))?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut shards: Vec<Vec<&String>> = vec![vec![]];
    let mut bytes = 0usize;
    for name in names {
        let size = tensors[name].elem_count() * opts.dtype.size_in_bytes();
        if let Some(max) = opts.max_shard_bytes {
            if bytes > 0 && bytes + size > max {
                shards.push(vec![]);
                bytes = 0;
            }
        }
        bytes += size;
        shards.last_mut().expect("non-empty").push(name);
    }
    // Each file through `replace_file`: a checkpoint read from this folder is never read
    // half-overwritten.
    let save = |names: &[&String], file: &Path| -> Result<()> {
        let part: HashMap<String, Tensor> =
            names.iter().map(|n| Ok(((*n).clone(), tensors[*n].to_dtype(opts.dtype)?))).collect::<Result<_>>()?;
        replace_file(file, |tmp| {
            candle_core::safetensors::save(&part, tmp)
                .map_err(|e| Error::Format { path: file.to_path_buf(), what: e.to_string() })
        })
    };
    if shards.len() == 1 {
        save(&shards[0], &dir.join("model.safetensors"))?;
        return remove_other_weights(dir, &["model.safetensors".into()]);
    }
    let mut weight_map = serde_json::Map::new();
    let total: usize = tensors.values().map(|t| t.elem_count() * opts.dtype.size_in_bytes()).sum();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len());
        save(shard, &dir.join(&file))?;
        for n in shard {
            weight_map.insert((*n).clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let path = dir.join("model.safetensors.index.json");
    replace_file(&path, |tmp| std::fs::write(tmp, serde_json::to_string_pretty(&index).expect("json")).at(tmp))?;
    let mut kept: Vec<String> =
        (1..=shards.len()).map(|i| format!("model-{i:05}-of-{:05}.safetensors", shards.len())).collect();
    kept.push("model.safetensors.index.json".into());
    remove_other_weights(dir, &kept)
}

/// Writes `path` through `write` into `path.tmp`, then renames it into place: a failed write
/// leaves the old file (and no temporary one), and no reader sees it half-written.
fn replace_file(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = Path::new(&tmp);
    let written = write(tmp).and_then(|()| std::fs::rename(tmp, path).at(path));
    if written.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    written
}

/// Whether `name` is a shard as transformers names them: `model-00001-of-00003.safetensors`.
fn is_shard_name(name: &str) -> bool {
    let five_digits = |t: &str| t.len() == 5 && t.bytes().all(|b| b.is_ascii_digit());
    name.strip_prefix("model-")
        .and_then(|r| r.strip_suffix(".safetensors"))
        .and_then(|r| r.split_once("-of-"))
        .is_some_and(|(i, n)| five_digits(i) && five_digits(n))
}

/// Removes safetensors weights (and a shard index) in `dir` other than `keep`: those of a
/// checkpoint this one replaced, which a loader would otherwise read instead (an index left
/// beside a new single file) or with it.
fn remove_other_weights(dir: &Path, keep: &[String]) -> Result<()> {
    for e in std::fs::read_dir(dir).at(dir)? {
        let e = e.at(dir)?;
        let name = e.file_name().to_string_lossy().into_owned();
        let weights = name == "model.safetensors" || name == "model.safetensors.index.json" || is_shard_name(&name);
        if weights && !keep.contains(&name) {
            std::fs::remove_file(e.path()).at(e.path())?;
        }
    }
    Ok(())
}

/// Writes `generation_config.json` with the model's special ids and greedy decoding.
pub fn write_generation_config(dir: &Path, config: &ModelConfig) -> Result<()> {
    let gen = serde_json::json!({
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_ids.first(),
        "pad_token_id": config.pad_token_id,
        "do_sample": false,
    });
    let p = dir.join("generation_config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&gen).expect("json")).at(&p)
}

/// Gives a checkpoint derived from the one in `source` (pruned, distilled, merged) its decoding
/// defaults: the source's `generation_config.json` when it has one (its sampling settings and
/// every end-of-sequence id hold for a model with the same tokenizer; left as it is when `dir`
/// is `source`), else the greedy one [`write_generation_config`] writes.
pub fn derive_generation_config(source: &Path, dir: &Path, config: &ModelConfig) -> Result<()> {
    let theirs = source.join("generation_config.json");
    if theirs.exists() {
        std::fs::create_dir_all(dir).at(dir)?;
        return copy_file(&theirs, &dir.join("generation_config.json"));
    }
    write_generation_config(dir, config)
}

/// Files that make up a checkpoint's tokenizer and chat formatting (its decoding defaults are
/// [`derive_generation_config`]'s).
const TOKENIZER_FILES: [&str; 4] =
    ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"];

/// Copies the tokenizer files of checkpoint `from` into `to` (a student keeps its teacher's),
/// and removes those `to` holds that `from` has not.
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).at(to)?;
    for f in TOKENIZER_FILES {
        let (src, dst) = (from.join(f), to.join(f));
        if src.exists() {
            copy_file(&src, &dst)?;
        } else if dst.exists() && !same_file(from, to)? {
            // Left by a checkpoint this one replaces (a chat template, say): a loader would
            // take it for this model's.
            std::fs::remove_file(&dst).at(&dst)?;
        }
    }
    Ok(())
}

/// Copies `from` to `to`, or does nothing when they are the same file (a stage writing into
/// the folder it read from: a copy onto itself would empty the file).
pub(crate) fn copy_file(from: &Path, to: &Path) -> Result<()> {
    if to.exists() && same_file(from, to)? {
        return Ok(());
    }
    std::fs::copy(from, to).at(from)?;
    Ok(())
}

/// Refuses `out` when it is the folder `teacher` (a student written there would replace the
/// model the next student is cut from); a folder that does not exist yet cannot be.
pub fn refuse_writing_over_teacher(teacher: &Path, out: &Path) -> Result<()> {
    if out.exists() && teacher.exists() && same_file(teacher, out)? {
        return Err(Error::Destination {
            path: out.to_path_buf(),
            what: "is the teacher's folder, and the student would replace it: write it to another folder (nothing was changed)".into(),
        });
    }
    Ok(())
}

/// Whether two paths name one file (through links, hard ones included where the OS says so).
fn same_file(a: &Path, b: &Path) -> Result<bool> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let (x, y) = (std::fs::metadata(a).at(a)?, std::fs::metadata(b).at(b)?);
        Ok((x.dev(), x.ino()) == (y.dev(), y.ino()))
    }
    #[cfg(not(unix))]
    {
        Ok(std::fs::canonicalize(a).at(a)? == std::fs::canonicalize(b).at(b)?)
    }
}
