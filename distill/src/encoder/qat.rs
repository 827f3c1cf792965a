//! Quantization-aware training for `int8-static`: the candle encoder run through the rounding its
//! int8-static bundle will do, so that a student can be trained to be good *after* quantization
//! rather than before it.
//!
//! Each linear layer reads its input as the bundle's `MatMulIntegerToFloat` will: divided by the
//! SmoothQuant scales, rounded to uint8 with one scale and zero point per tensor fixed from
//! calibration text, and its weights multiplied by the same scales and rounded to int8 with one
//! scale per output channel (7 bits, or 8 with `full_range`). The forward pass sees the rounded
//! values; the backward pass goes straight through the rounding (the straight-through
//! estimator), so the fp32 weights keep learning and the rounding only steers them.
//!
//! The scales come from the same statistics `edgelm-distill quantize --precision int8-static`
//! takes from the fp32 ONNX graph (per-channel magnitudes for smoothing, then each smoothed
//! input's range, min-max or percentile), measured here on the candle model one calibration
//! sentence at a time as the bundle quantizer runs them. Training moves the weights, so the
//! trainer measures them again as it goes; the bundle quantizer then finds nearly the ones the
//! student was last trained under.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::{BertModel, EncoderCheckpoint};
use crate::error::{Error, Result};
use crate::quantize::calibrate::{RangeCollector, RangeMethod};

/// How the int8-static bundle will be quantized: give the values the `quantize` command will
/// get.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FakeQuantSpec {
    /// SmoothQuant strength (`--smooth`), none for no smoothing.
    pub smooth: Option<f32>,
    /// How each activation range is picked (`--range`, `--percentile`).
    pub range: RangeMethod,
    /// Weights over -127..=127 (`--full-range`) instead of -63..=63.
    pub full_range: bool,
}

impl FakeQuantSpec {
    /// Why this scheme cannot be trained through, if it cannot.
    pub fn check(&self) -> std::result::Result<(), String> {
        if let Some(alpha) = self.smooth.filter(|a| !(0.0..=1.0).contains(a)) {
            return Err(format!("smoothing strength {alpha}: choose one in [0, 1]"));
        }
        if let RangeMethod::Percentile { percentile } = self.range {
            if !(percentile > 50.0 && percentile <= 100.0) {
                return Err(format!("percentile {percentile}: choose one in (50, 100]"));
            }
        }
        Ok(())
    }

    /// The scheme in words, for reports.
    pub fn describe(&self) -> String {
        format!(
            "int8-static: {} ranges, {}, {}-bit weights",
            self.range.describe(),
            self.smooth.map_or("no smoothing".to_string(), |a| format!("smoothing {a}")),
            if self.full_range { 8 } else { 7 }
        )
    }

    fn qmax(&self) -> f64 {
        if self.full_range {
            127.0
        } else {
            63.0
        }
    }
}

/// One scale per input channel of a linear layer, shared by the layers that read one tensor.
type ChannelScales = Arc<Vec<f32>>;

/// One linear layer's quantization: smoothing scales of its input channels and its input's
/// uint8 scale and zero point.
#[derive(Debug, Clone)]
struct LinearQuant {
    /// `1 / s_j` per input channel (ones without smoothing).
    inv_smooth: ChannelScales,
    /// `s_j` per input channel.
    smooth: ChannelScales,
    scale: f64,
    zero_point: f64,
}

/// The linear layers of an encoder with the scales an int8-static bundle of it would use.
#[derive(Debug, Clone)]
pub struct FakeQuant {
    linears: HashMap<String, LinearQuant>,
    qmax: f64,
}

/// The linear layers of layer `i`, grouped by the tensor they read (query, key and value share
/// the layer's input, and so share its smoothing and range).
fn groups(layers: usize) -> Vec<Vec<String>> {
    let mut out = vec![];
    for i in 0..layers {
        let p = format!("encoder.layer.{i}");
        out.push(["query", "key", "value"].iter().map(|n| format!("{p}.attention.self.{n}")).collect());
        out.push(vec![format!("{p}.attention.output.dense")]);
        out.push(vec![format!("{p}.intermediate.dense")]);
        out.push(vec![format!("{p}.output.dense")]);
    }
    out
}

/// Sees each linear layer's name and input (channels last) as the model runs.
pub(crate) type Tap<'s> = &'s (dyn Fn(&str, &Tensor) -> Result<()> + Sync);

/// Runs every sample alone (as the bundle quantizer does) with `tap` seeing each linear input.
fn run_samples(model: &BertModel, samples: &[(Vec<u32>, Vec<u32>)]) -> Result<()> {
    for (ids, types) in samples {
        model.batch_run(&[(ids, types)], false)?;
    }
    Ok(())
}

/// The largest magnitude in each column of `w` `[out, in]`: `[in]`.
fn column_absmax(w: &Tensor) -> Result<Vec<f32>> {
    Ok(w.abs()?.max(0)?.to_vec1()?)
}

impl FakeQuant {
    /// Measures `ck` over `samples` (token ids and types, one sentence each) and fixes the scales.
    pub fn calibrate(ck: &EncoderCheckpoint, samples: &[(Vec<u32>, Vec<u32>)], spec: &FakeQuantSpec) -> Result<Self> {
        if samples.is_empty() {
            return Err(Error::InvalidConfig { what: "quantization-aware training needs calibration text".into() });
        }
        let c = &ck.config;
        let groups = groups(c.num_hidden_layers);
        // Smoothing scales per group, s_j = a_j^alpha / w_j^(1 - alpha); ones without smoothing.
        let mut smooth: Vec<Vec<f32>> = groups.iter().map(|g| vec![1.0; weight_shape(c, &g[0]).1]).collect();
        if let Some(alpha) = spec.smooth {
            if !(0.0..=1.0).contains(&alpha) {
                return Err(Error::InvalidConfig { what: format!("smoothing strength {alpha}: choose one in [0, 1]") });
            }
            let first: HashSet<&str> = groups.iter().map(|g| g[0].as_str()).collect();
            let absmax: Mutex<HashMap<String, Vec<f32>>> = Mutex::new(HashMap::new());
            let tap = |name: &str, x: &Tensor| -> Result<()> {
                if !first.contains(name) {
                    return Ok(());
                }
                let m: Vec<f32> = x.abs()?.flatten_to(1)?.max(0)?.to_vec1()?;
                let mut all = absmax.lock().expect("calibration lock");
                let a = all.entry(name.to_string()).or_insert_with(|| vec![0.0; m.len()]);
                a.iter_mut().zip(&m).for_each(|(a, v)| *a = a.max(*v));
                Ok(())
            };
            run_samples(&BertModel::new(ck).with_tap(&tap), samples)?;
            let absmax = absmax.into_inner().expect("calibration lock");
            for (group, s) in groups.iter().zip(&mut smooth) {
                let a = &absmax[&group[0]];
                let mut w = vec![0f32; a.len()];
                for name in group {
                    let (rows, cols) = weight_shape(c, name);
                    let m = column_absmax(ck.get(&format!("{name}.weight"), &[rows, cols])?)?;
                    w.iter_mut().zip(&m).for_each(|(w, v)| *w = w.max(*v));
                }
                *s = crate::quantize::qdq::smoothing_scales(a, &w, alpha);
            }
        }
        let dev = candle_core::Device::Cpu;
        // (1 / s, s) per group, shared by the group's linears.
        let scales: Vec<(ChannelScales, ChannelScales)> =
            smooth.into_iter().map(|s| (Arc::new(s.iter().map(|s| 1.0 / s).collect()), Arc::new(s))).collect();
        // Ranges of the smoothed inputs: extremes first, then (percentiles) a histogram.
        let inv_by_name: HashMap<&str, Tensor> = groups
            .iter()
            .zip(&scales)
            .map(|(g, (inv, _))| Ok((g[0].as_str(), Tensor::from_slice(&inv[..], inv.len(), &dev)?)))
            .collect::<Result<_>>()?;
        let collectors: Mutex<HashMap<String, RangeCollector>> = Mutex::new(HashMap::new());
        let passes = if matches!(spec.range, RangeMethod::Percentile { .. }) { 2 } else { 1 };
        for pass in 0..passes {
            let tap = |name: &str, x: &Tensor| -> Result<()> {
                let Some(inv) = inv_by_name.get(name) else { return Ok(()) };
                let v: Vec<f32> = x.broadcast_mul(inv)?.flatten_all()?.to_vec1()?;
                let mut all = collectors.lock().expect("calibration lock");
                let r = all.entry(name.to_string()).or_default();
                if pass == 0 {
                    r.observe(&v)
                } else {
                    r.count(&v)
                }
                Ok(())
            };
            run_samples(&BertModel::new(ck).with_tap(&tap), samples)?;
        }
        let collectors = collectors.into_inner().expect("calibration lock");
        let mut linears = HashMap::new();
        for (group, (inv_smooth, smooth)) in groups.iter().zip(&scales) {
            let range = collectors
                .get(&group[0])
                .ok_or_else(|| Error::InvalidConfig { what: format!("`{}` was never run", group[0]) })?
                .range(spec.range);
            let (scale, zero_point) = range.uint8_params();
            for name in group {
                let q = LinearQuant {
                    inv_smooth: inv_smooth.clone(),
                    smooth: smooth.clone(),
                    scale: scale as f64,
                    zero_point: zero_point as f64,
                };
                linears.insert(name.clone(), q);
            }
        }
        Ok(FakeQuant { linears, qmax: spec.qmax() })
    }

    /// `x W^T + b` as the int8-static bundle computes it, or none when `name` is not one of the
    /// quantized linears.
    pub(crate) fn linear(&self, name: &str, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
        let Some(q) = self.linears.get(name) else { return Ok(None) };
        let xq = x.contiguous()?.apply_op1(RoundedInput {
            inv_smooth: q.inv_smooth.clone(),
            scale: q.scale as f32,
            zero_point: q.zero_point as f32,
        })?;
        let wq = w.contiguous()?.apply_op1(RoundedWeight { smooth: q.smooth.clone(), qmax: self.qmax as f32 })?;
        Ok(Some(crate::model::times_transposed(&xq, &wq)?.broadcast_add(b)?))
    }
}

/// A linear layer's input as its `MatMulIntegerToFloat` sees it, in one pass: divided by the
/// smoothing scales, rounded to uint8 levels and back. Backward, the straight-through estimator:
/// the gradient of the smoothed input passes the rounding unchanged. (Written with candle's
/// element-wise ops this took eight full-size temporaries per linear and step, most of the
/// quantization-aware stage's extra time.)
struct RoundedInput {
    /// `1 / s_j` per input channel, the last dimension.
    inv_smooth: ChannelScales,
    scale: f32,
    zero_point: f32,
}

/// A linear layer's weight `[out, in]` as the bundle stores it, in one pass: multiplied by the
/// smoothing scales of its input channels, rounded to `-qmax..=qmax` with one step per output
/// row, and back. Backward as [`RoundedInput`].
struct RoundedWeight {
    /// `s_j` per input channel.
    smooth: ChannelScales,
    qmax: f32,
}

/// The contiguous f32 values of a custom operator's input whose last dimension is `channels`.
fn channels_last<'a>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
    channels: usize,
) -> candle_core::Result<&'a [f32]> {
    let values = crate::model::contiguous_f32(op, storage, layout)?;
    if layout.dims().last() != Some(&channels) {
        return Err(candle_core::Error::Msg(format!("{op}: {:?} does not end in {channels} channels", layout.dims())));
    }
    Ok(values)
}

/// `grad * scales`, the scales running along the last dimension: the straight-through gradient
/// of a tensor multiplied by per-channel scales before rounding.
fn scaled_gradient(grad: &Tensor, scales: &[f32]) -> candle_core::Result<Tensor> {
    let mut g = grad.flatten_all()?.to_vec1::<f32>()?;
    for row in g.chunks_mut(scales.len()) {
        row.iter_mut().zip(scales).for_each(|(g, s)| *g *= s);
    }
    Tensor::from_vec(g, grad.dims(), grad.device())
}

impl CustomOp1 for RoundedInput {
    fn name(&self) -> &'static str {
        "fake-quant-input"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = channels_last(self.name(), storage, layout, self.inv_smooth.len())?;
        let (per_level, zp) = (1.0 / self.scale, self.zero_point);
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks(self.inv_smooth.len()) {
            out.extend(
                row.iter()
                    .zip(self.inv_smooth.iter())
                    .map(|(&x, &inv)| (((x * inv * per_level).round() + zp).clamp(0.0, 255.0) - zp) * self.scale),
            );
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        scaled_gradient(grad_res, &self.inv_smooth).map(Some)
    }
}

impl CustomOp1 for RoundedWeight {
    fn name(&self) -> &'static str {
        "fake-quant-weight"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = channels_last(self.name(), storage, layout, self.smooth.len())?;
        let mut out: Vec<f32> = Vec::with_capacity(w.len());
        for row in w.chunks(self.smooth.len()) {
            let at = out.len();
            out.extend(row.iter().zip(self.smooth.iter()).map(|(w, s)| w * s));
            let scaled = &mut out[at..];
            let step = (scaled.iter().fold(0f32, |m, v| m.max(v.abs())) / self.qmax).max(1e-30);
            scaled.iter_mut().for_each(|v| *v = (*v / step).round().clamp(-self.qmax, self.qmax) * step);
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        scaled_gradient(grad_res, &self.smooth).map(Some)
    }
}

/// `[out, in]` of a linear layer's weight: the FFN widens to `intermediate_size` and its output
/// projection reads that width; the rest are `hidden_size` square.
fn weight_shape(c: &super::EncoderConfig, name: &str) -> (usize, usize) {
    if name.ends_with("intermediate.dense") {
        (c.intermediate_size, c.hidden_size)
    } else if name.ends_with(".output.dense") && !name.contains("attention") {
        (c.hidden_size, c.intermediate_size)
    } else {
        (c.hidden_size, c.hidden_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoder::{tiny_encoder, Pooling};

    #[test]
    fn one_linear_by_hand() {
        // x = [0.51, -1.0, 2.0] with range [-1, 2] -> scale 3/255, zero point 85;
        // no smoothing; weight row [1.0, 0.52, -0.3], 7 bits: step 1/63.
        let dev = candle_core::Device::Cpu;
        let q = LinearQuant {
            inv_smooth: Arc::new(vec![1.0; 3]),
            smooth: Arc::new(vec![1.0; 3]),
            scale: 3.0 / 255.0,
            zero_point: 85.0,
        };
        let fq = FakeQuant { linears: [("l".to_string(), q)].into(), qmax: 63.0 };
        let x = Tensor::new(&[[0.51f32, -1.0, 2.0]], &dev).unwrap();
        let w = Tensor::new(&[[1.0f32, 0.52, -0.3]], &dev).unwrap();
        let b = Tensor::new(&[0.1f32], &dev).unwrap();
        let y: Vec<Vec<f32>> = fq.linear("l", &x, &w, &b).unwrap().unwrap().to_vec2().unwrap();
        // x levels: 0.51 / (3/255) = 43.35 -> 43, + 85 = 128 -> (128-85)*3/255;
        // -1 -> -85 + 85 = 0 -> -1; 2 -> 170 + 85 = 255 -> 2.
        let xq = [43.0 * 3.0 / 255.0, -1.0, 2.0];
        // w: -0.3 * 63 = -18.9 -> -19 / 63; 0.52 * 63 = 32.76 -> 33 / 63.
        let wq = [1.0, 33.0 / 63.0, -19.0 / 63.0];
        let expect = xq.iter().zip(wq).map(|(a, b)| a * b).sum::<f64>() + 0.1;
        assert!((y[0][0] as f64 - expect).abs() < 1e-5, "{} vs {expect}", y[0][0]);
        assert!(fq.linear("other", &x, &w, &b).unwrap().is_none());
    }

    fn samples() -> Vec<(Vec<u32>, Vec<u32>)> {
        (0..12u32)
            .map(|i| ((0..3 + i % 9).map(|t| (t * 7 + i * 3) % 40).collect(), vec![0; 3 + (i % 9) as usize]))
            .collect()
    }

    #[test]
    fn the_fake_quantized_model_computes_what_the_int8_static_graph_does() {
        use crate::quantize::graph::{Method, QuantizeOptions};
        use crate::quantize::{calibrate, qdq};
        use prost::Message;
        let ck = tiny_encoder(Pooling::Mean, 5);
        let samples = samples();
        for (smooth, range, full_range) in
            [(Some(0.8), RangeMethod::Percentile { percentile: 99.9 }, false), (None, RangeMethod::MinMax, true)]
        {
            if full_range && !crate::quantize::graph::host_sums_full_range_exactly() {
                // AVX2 without VNNI saturates on 8-bit weights: the graph is not the exact
                // arithmetic the fake quantization models, by design (7 bits there).
                eprintln!("full-range case skipped: this CPU's integer kernels saturate on 8-bit weights");
                continue;
            }
            let spec = FakeQuantSpec { smooth, range, full_range };
            let fq = FakeQuant::calibrate(&ck, &samples, &spec).unwrap();
            // What `quantize --precision int8-static` does to the exported graph, on the same text.
            let mut model = crate::export::encoder::build(&ck).unwrap();
            let onnx_samples: Vec<calibrate::Sample> = samples
                .iter()
                .map(|(ids, types)| {
                    let i64s = |v: &[u32]| v.iter().map(|&x| x as i64).collect::<Vec<_>>();
                    vec![
                        ("input_ids".to_string(), i64s(ids)),
                        ("token_type_ids".to_string(), i64s(types)),
                        ("attention_mask".to_string(), vec![1; ids.len()]),
                    ]
                })
                .collect();
            let opts = QuantizeOptions {
                method: Method::StaticInt8,
                full_range_int8: full_range,
                range,
                smooth,
                ..QuantizeOptions::for_bits(8).unwrap()
            };
            let mut tensors = qdq::activation_tensors(&model, &opts);
            if let Some(alpha) = smooth {
                let absmax = calibrate::channel_absmax(&model, &tensors, &onnx_samples).unwrap();
                let smoothed = qdq::smooth(&mut model, &absmax, alpha, &opts).unwrap();
                // Each layer's attention output reads the heads joined back: its smoothing goes
                // into the value projection, the others' into a Mul each.
                let muls = model.graph.as_ref().unwrap().node.iter().filter(|n| n.name.ends_with("/Smooth")).count();
                assert_eq!(smoothed - muls, ck.config.num_hidden_layers, "smoothings folded");
                tensors = qdq::activation_tensors(&model, &opts);
            }
            let ranges = calibrate::calibrate(&model, &tensors, &onnx_samples, range).unwrap();
            qdq::quantize_static(&mut model, &ranges, &opts).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("model.onnx");
            std::fs::write(&path, model.encode_to_vec()).unwrap();
            let mut session = edgelm_runtime::encoder::EncoderSession::load(&path, &Default::default()).unwrap();
            let (ids, types): (Vec<u32>, Vec<u32>) = ((0..9).map(|t| (t * 5 + 2) % 40).collect(), vec![0; 9]);
            let int8 = session.run(&ids, &types).unwrap();
            let fake = BertModel::new(&ck).with_fake_quant(&fq).embed(&ids, &types).unwrap();
            let fp32 = BertModel::new(&ck).embed(&ids, &types).unwrap();
            let diff = |a: &[f32]| a.iter().zip(&int8).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(
                diff(&fake) < diff(&fp32) / 20.0,
                "{spec:?}: fake quantization is {:.2e} from the int8 graph, fp32 {:.2e}",
                diff(&fake),
                diff(&fp32)
            );
        }
    }

    /// The fused operators give what the same rounding written with candle's element-wise ops
    /// gives, forward and backward (the straight-through estimator on the smoothed tensors).
    #[test]
    fn the_fused_rounding_matches_the_composed_one() {
        let dev = candle_core::Device::Cpu;
        let (inv, smooth) = ([0.5f32, 2.0, 1.25, 0.8], [2.0f32, 0.5, 0.8, 1.25]);
        let q = LinearQuant {
            inv_smooth: Arc::new(inv.to_vec()),
            smooth: Arc::new(smooth.to_vec()),
            scale: 0.03,
            zero_point: 97.0,
        };
        let fq = FakeQuant { linears: [("l".to_string(), q.clone())].into(), qmax: 63.0 };
        let values = |n: usize, k: f32| (0..n).map(|i| (i as f32 * k).sin() * 3.0).collect::<Vec<f32>>();
        let x = candle_core::Var::from_vec(values(2 * 5 * 4, 0.7), (2, 5, 4), &dev).unwrap();
        let w = candle_core::Var::from_vec(values(3 * 4, 1.3), (3, 4), &dev).unwrap();
        let b = Tensor::new(&[0.1f32, -0.2, 0.3], &dev).unwrap();
        let weights = Tensor::from_vec(values(2 * 5 * 3, 0.9), (2, 5, 3), &dev).unwrap();
        let fused = fq.linear("l", x.as_tensor(), w.as_tensor(), &b).unwrap().unwrap();
        // The same with candle's ops: x + (rounded - x).detach() passes the gradient unchanged.
        let through = |x: &Tensor, r: &Tensor| (x + (r - x).unwrap().detach()).unwrap();
        let xs = x.as_tensor().broadcast_mul(&Tensor::new(&inv, &dev).unwrap()).unwrap();
        let levels = (((&xs / q.scale).unwrap().round().unwrap() + q.zero_point).unwrap().clamp(0f32, 255f32).unwrap()
            - q.zero_point)
            .unwrap();
        let xq = through(&xs, &(levels * q.scale).unwrap());
        let ws = w.as_tensor().broadcast_mul(&Tensor::new(&smooth, &dev).unwrap()).unwrap();
        let step = (ws.abs().unwrap().max_keepdim(1).unwrap() / 63.0).unwrap().detach();
        let wq = ws.broadcast_div(&step).unwrap().round().unwrap().clamp(-63f32, 63f32).unwrap();
        let wq = through(&ws, &wq.broadcast_mul(&step).unwrap());
        let composed = crate::model::times_transposed(&xq, &wq).unwrap().broadcast_add(&b).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let close = |a: Vec<f32>, b: Vec<f32>, what: &str| {
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-4 * (1.0 + y.abs()), "{what}: {a:?} vs {b:?}");
            }
        };
        close(flat(&fused), flat(&composed), "output");
        // The rounding moved the output: a test of the rounding, not of a plain matmul.
        let plain = crate::model::times_transposed(x.as_tensor(), w.as_tensor()).unwrap().broadcast_add(&b).unwrap();
        assert!(flat(&plain).iter().zip(flat(&fused)).any(|(a, b)| (a - b).abs() > 1e-3));
        let loss = |y: &Tensor| (y * &weights).unwrap().sum_all().unwrap();
        let (gf, gc) = (loss(&fused).backward().unwrap(), loss(&composed).backward().unwrap());
        for (var, what) in [(&x, "input gradient"), (&w, "weight gradient")] {
            close(flat(gf.get(var.as_tensor()).unwrap()), flat(gc.get(var.as_tensor()).unwrap()), what);
        }
    }

    #[test]
    fn gradients_pass_through_the_rounding() {
        let ck = tiny_encoder(Pooling::Mean, 3);
        let samples = samples();
        let spec = FakeQuantSpec { smooth: Some(0.8), range: RangeMethod::MinMax, full_range: false };
        let fq = FakeQuant::calibrate(&ck, &samples, &spec).unwrap();
        // Make one weight a variable and check the loss moves it.
        let name = "encoder.layer.0.intermediate.dense.weight";
        let var = candle_core::Var::from_tensor(&ck.tensors[name]).unwrap();
        let mut tensors = ck.tensors.clone();
        tensors.insert(name.into(), var.as_tensor().clone());
        let trained = EncoderCheckpoint {
            dir: ck.dir.clone(),
            config: ck.config.clone(),
            tensors,
            tokenizer_json: None,
            tokenizer_config: None,
        };
        let model = BertModel::new(&trained).with_fake_quant(&fq);
        let (ids, types) = &samples[3];
        let loss = model.sentence(ids, types).unwrap().sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let g: f32 = grads.get(var.as_tensor()).unwrap().abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(g > 0.0, "no gradient reached the weight through the fake quantization");
    }
}
