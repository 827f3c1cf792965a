//! Where each weight of a checkpoint lies in its safetensors files, so a weight can be read
//! when it is needed rather than all at load: how models larger than memory are exported.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::{phi3, weight_files, ModelConfig};
use crate::error::{Error, IoContext, Result};

/// One tensor's bytes in a safetensors file.
#[derive(Debug, Clone)]
pub struct Span {
    /// The file.
    pub file: PathBuf,
    /// Byte offset in the file.
    pub start: u64,
    /// Stored element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
}

impl Span {
    fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()
    }

    /// Reads the tensor from `f` (its file, open), widened to f32.
    pub(crate) fn read_from(&self, f: &mut std::fs::File) -> Result<Tensor> {
        self.read_rows(f, 0, self.shape.first().copied().unwrap_or(1))
    }

    /// Reads `rows` rows from row `first` on (the first dimension), widened to f32: a part of
    /// a matrix without the rest.
    fn read_rows(&self, f: &mut std::fs::File, first: usize, rows: usize) -> Result<Tensor> {
        let row_bytes = if self.shape.is_empty() { self.bytes() } else { self.bytes() / self.shape[0].max(1) };
        let mut bytes = vec![0u8; rows * row_bytes];
        f.seek(SeekFrom::Start(self.start + (first * row_bytes) as u64)).at(&self.file)?;
        f.read_exact(&mut bytes).at(&self.file)?;
        let mut shape = self.shape.clone();
        if let Some(r) = shape.first_mut() {
            *r = rows;
        }
        let t = Tensor::from_raw_buffer(&bytes, self.dtype, &shape, &Device::Cpu)?;
        drop(bytes);
        Ok(if self.dtype == DType::F32 { t } else { t.to_dtype(DType::F32)? })
    }
}

/// The float tensors of one safetensors file in file order, checked against its size: offsets
/// inside the data section, whole-number shapes that take exactly their bytes. Integer tensors
/// are buffers transformers sometimes saves (e.g. `position_ids`), not weights: skipped.
pub(crate) fn spans(file: &Path) -> Result<Vec<(String, Span)>> {
    let bad = |what: String| Error::Tensor {
        name: file.display().to_string(),
        what: format!("cannot read safetensors: {what}"),
    };
    let mut f = std::fs::File::open(file).at(file)?;
    let size = f.metadata().at(file)?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| bad(format!("no header ({e})")))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > 100_000_000 || 8 + header_len > size {
        return Err(bad(format!("header of {header_len} bytes in a file of {size}")));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).at(file)?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let data_start = 8 + header_len;
    // In file order, so reading goes forward.
    let mut entries: Vec<(&String, &serde_json::Value)> = header.iter().filter(|(k, _)| *k != "__metadata__").collect();
    let offsets = |v: &serde_json::Value| -> Option<(u64, u64)> {
        let o = v.get("data_offsets")?.as_array()?;
        Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?))
    };
    entries.sort_by_key(|(_, v)| offsets(v).map_or(0, |o| o.0));
    let mut out = Vec::with_capacity(entries.len());
    for (name, v) in entries {
        let (begin, end) = offsets(v).ok_or_else(|| bad(format!("tensor `{name}` has no data_offsets")))?;
        if begin > end || end > size - data_start {
            return Err(bad(format!(
                "tensor `{name}` spans bytes {begin}..{end} of a data section of {} (the file is cut short or damaged)",
                size - data_start
            )));
        }
        let dtype = match v.get("dtype").and_then(|d| d.as_str()).unwrap_or("") {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F64" => DType::F64,
            other => {
                tracing::debug!("skipping {name}: {other} is not a weight dtype");
                continue;
            }
        };
        let shape: Option<Vec<usize>> = v
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|s| s.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect());
        let shape = shape.ok_or_else(|| bad(format!("tensor `{name}` has no shape of whole numbers")))?;
        let expected = shape.iter().try_fold(dtype.size_in_bytes(), |n, &d| n.checked_mul(d));
        if expected != usize::try_from(end - begin).ok() {
            return Err(bad(format!("tensor `{name}` ({dtype:?} {shape:?}) does not take its {} bytes", end - begin)));
        }
        out.push((name.clone(), Span { file: file.to_path_buf(), start: data_start + begin, dtype, shape }));
    }
    Ok(out)
}

/// Every weight of a checkpoint folder by name, read on request. Phi-3's split projections are
/// read out of the fused matrices they are stored in.
pub struct WeightIndex {
    spans: HashMap<String, Span>,
    config: ModelConfig,
    fused: bool,
}

impl WeightIndex {
    /// Indexes the safetensors files of `dir` (a checkpoint whose config is `config`; `fused`
    /// for Phi-3 storage).
    pub fn open(dir: &Path, config: &ModelConfig, fused: bool) -> Result<Self> {
        let mut spans = HashMap::new();
        for file in weight_files(dir)? {
            spans.extend(self::spans(&file)?);
        }
        Ok(WeightIndex { spans, config: config.clone(), fused })
    }

    /// Whether the checkpoint stores `name` (or, for Phi-3, the matrix it is part of).
    pub fn contains(&self, name: &str) -> bool {
        self.spans.contains_key(name) || self.fused_part(name).is_some()
    }

    /// An element type every matrix is stored in exactly: bf16 or f16 when all are, else f32
    /// (which holds either). What a deferred export spills the graph's weights in.
    pub fn matrix_dtype(&self) -> DType {
        let mut types = self.spans.values().filter(|s| s.shape.len() == 2).map(|s| s.dtype);
        match types.next() {
            Some(first @ (DType::BF16 | DType::F16)) if types.all(|d| d == first) => first,
            _ => DType::F32,
        }
    }

    /// The weight `name` as f32, checked against `shape`.
    pub fn read(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = match (self.spans.get(name), self.fused_part(name)) {
            (Some(span), _) => span.read_from(&mut std::fs::File::open(&span.file).at(&span.file)?)?,
            (None, Some((fused, start, rows, all_rows))) => {
                let span = &self.spans[&fused];
                let h = self.config.hidden_size;
                if span.shape != [all_rows, h] {
                    return Err(Error::Tensor {
                        name: fused,
                        what: format!("shape {:?}, expected [{all_rows}, {h}] (the projections it joins)", span.shape),
                    });
                }
                // Only this part's rows: the others are read when they are asked for.
                span.read_rows(&mut std::fs::File::open(&span.file).at(&span.file)?, start, rows)?
            }
            (None, None) => {
                return Err(Error::Tensor { name: name.into(), what: "missing from the checkpoint".into() })
            }
        };
        let map = HashMap::from([(name.to_owned(), t)]);
        Ok(super::weight(&map, name, shape)?.clone())
    }

    /// For Phi-3 storage: the fused matrix `name` is part of, its first row, its rows, and the
    /// fused matrix's rows.
    fn fused_part(&self, name: &str) -> Option<(String, usize, usize, usize)> {
        if !self.fused {
            return None;
        }
        let module = name.strip_suffix(".weight")?;
        phi3::FUSED.iter().find_map(|(fused, parts)| {
            let (layer_prefix, part) = parts.iter().find_map(|p| Some((module.strip_suffix(p)?, *p)))?;
            let fused_name = format!("{layer_prefix}{fused}.weight");
            self.spans.contains_key(&fused_name).then_some(())?;
            let spans = phi3::part_rows(&self.config, parts);
            let all_rows: usize = spans.iter().map(|&(_, _, rows)| rows).sum();
            let (_, start, rows) = spans.into_iter().find(|&(p, _, _)| p == part)?;
            Some((fused_name, start, rows, all_rows))
        })
    }
}
