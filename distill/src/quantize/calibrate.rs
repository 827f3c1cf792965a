//! Activation ranges for static quantization, measured by running the fp32 graph in ONNX
//! Runtime on calibration inputs: every tensor to be quantized is made a graph output, the
//! graph is run on each sample, and the values seen give a range (min-max, or percentiles of a
//! histogram, which ignores the few outliers that would otherwise stretch the scale).

use std::collections::HashMap;

use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::Tensor;
use prost::Message;

use crate::error::{Error, Result};
use crate::onnx::proto::{type_proto, TypeProto, ValueInfoProto};
use crate::onnx::{DataType, ModelProto};

pub use edgelm_kernels::range::{ActivationRange, RangeCollector, RangeMethod};

/// One calibration input: named int64 tensors `[1, len]` (e.g. `input_ids`, `attention_mask`).
pub type Sample = Vec<(String, Vec<i64>)>;

/// Runs `model` in ONNX Runtime over `samples` `passes` times with `tensors` made graph
/// outputs, handing each tensor's shape and values to `seen(pass, name, shape, values)`.
fn probe(
    model: &ModelProto,
    tensors: &[String],
    samples: &[Sample],
    passes: usize,
    mut seen: impl FnMut(usize, &str, &[i64], &[f32]),
) -> Result<()> {
    if samples.is_empty() {
        return Err(Error::Unsupported { what: "static quantization needs at least one calibration sample".into() });
    }
    let mut probe = model.clone();
    let g = probe
        .graph
        .as_mut()
        .ok_or_else(|| Error::Unsupported { what: "calibrating a model without a graph".into() })?;
    let float = TypeProto {
        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
            elem_type: DataType::Float as i32,
            shape: None,
        })),
        ..Default::default()
    };
    for t in tensors {
        if !g.output.iter().any(|o| &o.name == t) {
            g.output.push(ValueInfoProto { name: t.clone(), r#type: Some(float.clone()), ..Default::default() });
        }
    }
    let env = edgelm_runtime::ortlib::init(None)?;
    let rt = edgelm_runtime::Error::from;
    let setting =
        |e: ort::Error<ort::session::builder::SessionBuilder>| Error::from(edgelm_runtime::Error::Ort(e.into()));
    // No graph rewrites: the tensors asked for must keep their names and their fp32 values.
    let mut session = Session::builder(env)
        .map_err(rt)?
        .with_optimization_level(GraphOptimizationLevel::Disable)
        .map_err(setting)?
        .commit_from_memory(&probe.encode_to_vec())
        .map_err(rt)?;
    drop(probe);
    for pass in 0..passes {
        for sample in samples {
            let mut inputs: Vec<(String, ort::session::SessionInputValue)> = vec![];
            for (name, values) in sample {
                let t = Tensor::from_array(([1usize, values.len()], values.clone())).map_err(rt)?;
                inputs.push((name.clone(), t.into()));
            }
            let out = session.run(inputs).map_err(rt)?;
            for name in tensors {
                let (shape, data) = out[name.as_str()].try_extract_tensor::<f32>().map_err(rt)?;
                seen(pass, name, shape, data);
            }
        }
    }
    Ok(())
}

/// Runs `model` in ONNX Runtime on every sample and returns the range of each of `tensors`.
pub fn calibrate(
    model: &ModelProto,
    tensors: &[String],
    samples: &[Sample],
    method: RangeMethod,
) -> Result<HashMap<String, ActivationRange>> {
    if let RangeMethod::Percentile { percentile } = method {
        if !(percentile > 50.0 && percentile <= 100.0) {
            return Err(Error::Unsupported { what: format!("percentile {percentile}: choose one in (50, 100]") });
        }
    }
    let mut collectors: HashMap<String, RangeCollector> =
        tensors.iter().map(|t| (t.clone(), RangeCollector::default())).collect();
    let passes = if matches!(method, RangeMethod::Percentile { .. }) { 2 } else { 1 };
    probe(model, tensors, samples, passes, |pass, name, _, data| {
        let c = collectors.get_mut(name).expect("one per tensor");
        if pass == 0 {
            c.observe(data);
        } else {
            c.count(data);
        }
    })?;
    Ok(collectors.into_iter().map(|(n, c)| (n, c.range(method))).collect())
}

/// The largest magnitude of each channel (last axis) of each of `tensors` over the samples.
pub fn channel_absmax(model: &ModelProto, tensors: &[String], samples: &[Sample]) -> Result<HashMap<String, Vec<f32>>> {
    let mut out: HashMap<String, Vec<f32>> = HashMap::new();
    probe(model, tensors, samples, 1, |_, name, shape, data| {
        let width = shape.last().copied().unwrap_or(1).max(1) as usize;
        let m = out.entry(name.to_owned()).or_insert_with(|| vec![0.0; width]);
        if m.len() == width {
            edgelm_kernels::range::fold_channel_absmax(m, data);
        }
    })?;
    Ok(out)
}
