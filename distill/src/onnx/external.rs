//! Weights outside the graph file (ONNX external data). A protobuf message cannot pass 2 GiB,
//! and ONNX Runtime refuses to parse a model file that does, so a model of more than about 500
//! million fp32 parameters keeps its weights in one data file beside the graph, each tensor
//! named by the file, an offset and a length.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use edgelm_kernels::bytes::{widen_to_f32_le_bytes, Half};

use super::proto::{DataLocation, DataType, StringStringEntryProto, TensorProto};
use super::ModelProto;
use crate::error::{Error, IoContext, Result};

/// Largest graph file written in one piece: a margin under protobuf's 2 GiB.
pub const SINGLE_FILE_LIMIT: usize = 2_000_000_000;

/// Tensors smaller than this stay in the graph file (shapes, scales, small constants).
const MIN_EXTERNAL_BYTES: usize = 1024;

/// Offsets are multiples of this, so a tensor can be mapped and read aligned.
const ALIGN: usize = 64;

/// The data files `model`'s tensors name, relative to its folder.
pub fn data_files(model: &ModelProto) -> Vec<String> {
    let mut files: Vec<String> = model
        .graph
        .iter()
        .flat_map(|g| &g.initializer)
        .filter(|t| is_external(t))
        .filter_map(|t| t.external_data.iter().find(|e| e.key == "location").map(|e| e.value.clone()))
        .collect();
    files.sort();
    files.dedup();
    files
}

/// Whether `t`'s bytes are in a data file rather than in the graph.
pub fn is_external(t: &TensorProto) -> bool {
    t.data_location == Some(DataLocation::External as i32) || !t.external_data.is_empty()
}

/// Moves the bytes of every initializer of at least [`MIN_EXTERNAL_BYTES`] into `out`, the
/// file `location` beside the graph, and points the initializers at them; returns the bytes
/// written. Each tensor's bytes are freed once written, so the weights are never held twice.
pub fn externalize(model: &mut ModelProto, location: &str, out: &mut dyn Write) -> std::io::Result<u64> {
    let mut written = 0usize;
    for t in model.graph.iter_mut().flat_map(|g| &mut g.initializer) {
        if t.raw_data.len() < MIN_EXTERNAL_BYTES || is_external(t) {
            continue;
        }
        let offset = written.next_multiple_of(ALIGN);
        out.write_all(&[0u8; ALIGN][..offset - written])?;
        // Freed only once written: after an error the model still holds this tensor (earlier
        // ones point into a data file cut short, which the caller discards).
        out.write_all(&t.raw_data)?;
        let bytes = std::mem::take(&mut t.raw_data);
        written = offset + bytes.len();
        let entry = |key: &str, value: String| StringStringEntryProto { key: key.into(), value };
        t.external_data = vec![
            entry("location", location.into()),
            entry("offset", offset.to_string()),
            entry("length", bytes.len().to_string()),
        ];
        t.data_location = Some(DataLocation::External as i32);
    }
    Ok(written as u64)
}

/// Reads every externally stored initializer of `model` (files relative to `dir`) back into the
/// model, so it can be rewritten as a whole.
pub fn internalize(model: &mut ModelProto, dir: &Path) -> Result<()> {
    // Each tensor read on its own: the data file is never held whole beside the weights.
    let mut files = DataFiles::default();
    for t in model.graph.iter_mut().flat_map(|g| &mut g.initializer).filter(|t| is_external(t)) {
        t.raw_data = files.read(t, dir)?;
        t.external_data.clear();
        t.data_location = None;
    }
    Ok(())
}

/// `t` with 16-bit float values (bfloat16 or float16, as weights spill from a checkpoint stored
/// that way) turned into float32; others as they are.
pub fn widened(mut t: TensorProto) -> TensorProto {
    let elem = t.data_type.and_then(|d| DataType::try_from(d).ok());
    let from = match elem {
        Some(DataType::Bfloat16) => Half::Bf16,
        Some(DataType::Float16) => Half::F16,
        _ => return t,
    };
    if is_external(&t) {
        return t;
    }
    let raw = std::mem::take(&mut t.raw_data);
    t.raw_data = widen_to_f32_le_bytes(&raw, from);
    t.data_type = Some(DataType::Float as i32);
    t
}

/// Every 16-bit float initializer of `model` held in the graph turned into float32: what a
/// deferred export's quantizer left of the spilled weights (norms kept, matrices kept in fp32)
/// takes the graph's type again.
pub fn widen_to_f32(model: &mut ModelProto) {
    for t in model.graph.iter_mut().flat_map(|g| &mut g.initializer) {
        *t = widened(std::mem::take(t));
    }
}

/// Data files opened while reading tensors, by location: each is opened once however many
/// tensors are read from it.
#[derive(Default)]
pub struct DataFiles(HashMap<String, (std::fs::File, usize)>);

impl DataFiles {
    /// A copy of the externally stored tensor `t` with its bytes read in from its data file
    /// (relative to `dir`); `t` itself stays as it is.
    pub fn loaded(&mut self, t: &TensorProto, dir: &Path) -> Result<TensorProto> {
        let raw_data = self.read(t, dir)?;
        Ok(TensorProto { raw_data, external_data: vec![], data_location: None, ..t.clone() })
    }

    /// The bytes of the externally stored tensor `t`, its location checked to stay inside `dir`
    /// and its span to lie inside the file.
    fn read(&mut self, t: &TensorProto, dir: &Path) -> Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let field = |key: &str| t.external_data.iter().find(|e| e.key == key).map(|e| e.value.clone());
        let bad = |what: String| Error::Format { path: dir.to_path_buf(), what };
        let location =
            field("location").ok_or_else(|| bad(format!("tensor `{}` is external without a location", t.name)))?;
        let rel = Path::new(&location);
        if rel.is_absolute() || rel.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
            return Err(bad(format!("tensor `{}` names data file `{location}` outside the model's folder", t.name)));
        }
        let number = |key: &str| -> Result<Option<usize>> {
            field(key)
                .map(|v| v.parse::<usize>().map_err(|e| bad(format!("tensor `{}`: {key} `{v}`: {e}", t.name))))
                .transpose()
        };
        let (offset, length) = (number("offset")?.unwrap_or(0), number("length")?);
        let path = dir.join(rel);
        if !self.0.contains_key(&location) {
            let f = std::fs::File::open(&path).at(&path)?;
            let len = f.metadata().at(&path)?.len() as usize;
            self.0.insert(location.clone(), (f, len));
        }
        let (file, size) = self.0.get_mut(&location).expect("just opened");
        let end = length.map_or(Some(*size), |l| offset.checked_add(l)).filter(|&e| e <= *size && offset <= e);
        let end =
            end.ok_or_else(|| bad(format!("tensor `{}` lies past the end of `{location}` ({} bytes)", t.name, *size)))?;
        let mut bytes = vec![0u8; end - offset];
        file.seek(SeekFrom::Start(offset as u64)).at(&path)?;
        file.read_exact(&mut bytes).at(&path)?;
        Ok(bytes)
    }
}

/// Bytes of `t`'s values, wherever they are kept (in the graph or, by its recorded length, in a
/// data file).
pub fn stored_bytes(t: &TensorProto) -> usize {
    let external = t
        .external_data
        .iter()
        .find(|e| e.key == "length")
        .and_then(|e| e.value.parse::<usize>().ok())
        .filter(|_| is_external(t));
    external.unwrap_or(0) + t.raw_data.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::proto::GraphProto;

    fn tensor(name: &str, bytes: usize) -> TensorProto {
        TensorProto { name: name.into(), raw_data: (0..bytes).map(|i| (i % 251) as u8).collect(), ..Default::default() }
    }

    fn external_blob(m: &mut ModelProto, location: &str) -> Vec<u8> {
        let mut blob = Vec::new();
        let written = externalize(m, location, &mut blob).unwrap();
        assert_eq!(written as usize, blob.len());
        blob
    }

    #[test]
    fn weights_go_out_aligned_and_come_back_the_same() {
        let graph = GraphProto {
            initializer: vec![tensor("big", 3000), tensor("small", 10), tensor("big2", 1500)],
            ..Default::default()
        };
        let original = ModelProto { graph: Some(graph), ..Default::default() };
        let mut m = original.clone();
        let blob = external_blob(&mut m, "model.onnx.data");
        let g = m.graph.as_ref().unwrap();
        assert_eq!(data_files(&m), ["model.onnx.data"]);
        assert!(g.initializer[0].raw_data.is_empty() && g.initializer[2].raw_data.is_empty());
        assert_eq!(g.initializer[1].raw_data.len(), 10, "small tensors stay inside");
        let offset = &g.initializer[2].external_data.iter().find(|e| e.key == "offset").unwrap().value;
        assert_eq!(offset.parse::<usize>().unwrap() % ALIGN, 0);
        assert_eq!(blob.len(), 3008 + 1500);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.onnx.data"), &blob).unwrap();
        internalize(&mut m, dir.path()).unwrap();
        assert_eq!(m, original);
        // A data file cut short, and one outside the folder, are errors that name the tensor.
        let mut m2 = original.clone();
        let blob = external_blob(&mut m2, "model.onnx.data");
        std::fs::write(dir.path().join("model.onnx.data"), &blob[..2000]).unwrap();
        let err = internalize(&mut m2.clone(), dir.path()).unwrap_err().to_string();
        assert!(err.contains("`big`") && err.contains("past the end"), "{err}");
        let mut m3 = original;
        external_blob(&mut m3, "../elsewhere.data");
        let err = internalize(&mut m3, dir.path()).unwrap_err().to_string();
        assert!(err.contains("outside the model's folder"), "{err}");
    }
}
