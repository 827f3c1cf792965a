//! Static int8 in the QDQ form: every `MatMul(x, W)` over an fp32 weight becomes
//! `MatMul(DequantizeLinear(QuantizeLinear(x)), DequantizeLinear(W_int8))`, with `x`'s scale and
//! zero point fixed from calibration ([`super::calibrate`]) and `W` in int8 with one scale per
//! output column. ONNX Runtime fuses each group into an integer matmul at load; the same file
//! runs on any runtime that reads QDQ (TensorRT, QNN, XNNPACK), which is why this form and not
//! `QLinearMatMul` is written when asked for (`QuantizeOptions::qdq`). By default the integer
//! matmul is written directly, `MatMulIntegerToFloat(QuantizeLinear(x), W_int8)` with the
//! following bias inside: what ONNX Runtime's CPU kernels run, without the bias `Add` its QDQ
//! fusion leaves behind (a node per matrix, which short sentences feel).

use std::collections::{HashMap, HashSet};

use super::block::quantize_per_column;
use super::calibrate::ActivationRange;
use super::graph::{f32_matrix, f32_values, tensor_bytes, QuantizeOptions, QuantizeSummary};
use crate::error::{Error, Result};
use crate::onnx::proto::{GraphProto, NodeProto, TensorProto};
use crate::onnx::{AttributeProto as Attr, DataType, ModelProto, MS_DOMAIN};

fn is_std(n: &NodeProto) -> bool {
    n.domain.is_empty() || n.domain == "ai.onnx"
}

/// The `MatMul`s static quantization rewrites, as (node index, activation, weight): the weight
/// a 2-D fp32 initializer read by nothing but `MatMul`s as their second input, neither asked to
/// stay fp32 nor to be stored block-wise (`opts.blockwise`, left for the block quantizer).
fn targets(g: &GraphProto, opts: &QuantizeOptions) -> Vec<(usize, String, String)> {
    let inits: HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: HashSet<&str> = g.input.iter().map(|v| v.name.as_str()).collect();
    let mut other_use: HashSet<&str> = HashSet::new();
    for n in &g.node {
        for (slot, i) in n.input.iter().enumerate() {
            if !(n.op_type == "MatMul" && is_std(n) && slot == 1) {
                other_use.insert(i.as_str());
            }
        }
    }
    let kept = |s: &str| opts.keep_fp32.iter().chain(&opts.blockwise).any(|k| s.contains(k.as_str()));
    g.node
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op_type == "MatMul" && is_std(n) && n.input.len() == 2)
        .filter(|(_, n)| {
            let w = n.input[1].as_str();
            inits.contains(w) && !inputs.contains(w) && !other_use.contains(w) && !kept(w) && !kept(&n.name)
        })
        .filter(|(_, n)| {
            let t = g.initializer.iter().find(|t| t.name == n.input[1]).expect("an initializer");
            f32_matrix(t).is_some()
        })
        .map(|(i, n)| (i, n.input[0].clone(), n.input[1].clone()))
        .collect()
}

/// The activation tensors whose ranges [`quantize_static`] needs (calibrate these).
pub fn activation_tensors(model: &ModelProto, opts: &QuantizeOptions) -> Vec<String> {
    let Some(g) = model.graph.as_ref() else { return vec![] };
    let mut seen = HashSet::new();
    targets(g, opts).into_iter().map(|(_, x, _)| x).filter(|x| seen.insert(x.clone())).collect()
}

/// Moves activation outliers into the weights before static quantization (as SmoothQuant
/// does): for an activation `x` whose channel `j` reaches `a_j` and whose weights' row `j`
/// reaches `w_j`, `x` is divided by `s_j = a_j^alpha / w_j^(1 - alpha)` (a `Mul` node) and row `j`
/// of every weight it feeds multiplied by `s_j`. The product is unchanged; the activation's range
/// flattens, so one uint8 scale fits it better. `absmax` holds the `a_j` of each tensor
/// [`activation_tensors`] names ([`super::calibrate::channel_absmax`]). Where `x` is attention
/// heads joined back, the division goes into the value projection's columns instead of a `Mul`
/// ([`head_merge_source`]). Returns the activations smoothed; call [`activation_tensors`] again
/// for the names to calibrate.
pub fn smooth(
    model: &mut ModelProto,
    absmax: &HashMap<String, Vec<f32>>,
    alpha: f32,
    opts: &QuantizeOptions,
) -> Result<usize> {
    if !(0.0..=1.0).contains(&alpha) {
        return Err(Error::Unsupported { what: format!("smoothing strength {alpha}: choose one in [0, 1]") });
    }
    let g =
        model.graph.as_mut().ok_or_else(|| Error::Unsupported { what: "smoothing a model without a graph".into() })?;
    let targets = targets(g, opts);
    // Activation -> its weights; a weight fed by two different activations is left alone.
    let mut feeds: HashMap<String, Vec<String>> = HashMap::new();
    let mut readers: HashMap<String, HashSet<String>> = HashMap::new();
    for (_, x, w) in &targets {
        let ws = feeds.entry(x.clone()).or_default();
        if !ws.contains(w) {
            ws.push(w.clone());
        }
        readers.entry(w.clone()).or_default().insert(x.clone());
    }
    // Every activation's scales first, from the weights as they came: folding one scale into a
    // value projection changes that matrix's rows' magnitudes, which another activation's
    // scales must not see (the quantization-aware training computes them from the unchanged
    // checkpoint). Each plan: the activation, its weights with their column counts, its scales.
    let mut plans = vec![];
    for (x, ws) in &feeds {
        let Some(a) = absmax.get(x) else { continue };
        if ws.iter().any(|w| readers[w].len() > 1) {
            continue;
        }
        let mats: Vec<(usize, usize, Vec<f32>)> = ws
            .iter()
            .map(|w| {
                f32_matrix(g.initializer.iter().find(|t| &t.name == w).expect("a target's weight")).expect("checked")
            })
            .collect();
        let k = mats[0].0;
        if a.len() != k || mats.iter().any(|m| m.0 != k) {
            continue;
        }
        let w_max: Vec<f32> = (0..k)
            .map(|j| {
                mats.iter().flat_map(|(_, n, v)| v[j * n..(j + 1) * n].iter().map(|x| x.abs())).fold(0.0, f32::max)
            })
            .collect();
        let ws: Vec<(String, usize)> = ws.iter().zip(&mats).map(|(w, (_, n, _))| (w.clone(), *n)).collect();
        plans.push((x.clone(), ws, smoothing_scales(a, &w_max, alpha)));
    }
    let mut inserted: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut renamed: HashMap<String, String> = HashMap::new();
    let mut folded = 0;
    for (x, ws, s) in &plans {
        let k = s.len();
        for (w, n) in ws {
            scale_values(g, w, |i| s[i / n]);
        }
        let inv_s: Vec<f32> = s.iter().map(|s| 1.0 / s).collect();
        let matmuls = targets.iter().filter(|(_, t, _)| t == x).count();
        if let Some((w, b)) = head_merge_source(g, x, k, matmuls) {
            // x / s made by the value projection itself (its k columns and its bias): no node added.
            for t in std::iter::once(&w).chain(&b) {
                scale_values(g, t, |i| inv_s[i % k]);
            }
            folded += 1;
            continue;
        }
        let (inv, out) = (format!("{x}_smooth_scale"), format!("{x}_smoothed"));
        g.initializer.push(TensorProto::from_f32(&inv, &[k as i64], &inv_s));
        let first = targets.iter().filter(|(_, t, _)| t == x).map(|(i, _, _)| *i).min().expect("x has a target");
        inserted.entry(first).or_default().push(node(
            format!("{x}/Smooth"),
            "Mul",
            vec![x.clone(), inv],
            out.clone(),
            vec![],
        ));
        renamed.insert(x.clone(), out);
    }
    for (i, x, _) in &targets {
        if let Some(out) = renamed.get(x) {
            g.node[*i].input[0] = out.clone();
        }
    }
    let nodes = std::mem::take(&mut g.node);
    for (i, n) in nodes.into_iter().enumerate() {
        if let Some(q) = inserted.remove(&i) {
            g.node.extend(q);
        }
        g.node.push(n);
    }
    Ok(renamed.len() + folded)
}

/// Multiplies value `i` (row-major) of the fp32 initializer `name` by `f(i)`.
fn scale_values(g: &mut GraphProto, name: &str, f: impl Fn(usize) -> f32) {
    let t = g.initializer.iter_mut().find(|t| t.name == name).expect("a checked fp32 initializer");
    let v = f32_values(t).expect("a checked fp32 initializer");
    t.float_data.clear();
    t.raw_data = v.iter().enumerate().flat_map(|(i, x)| (x * f(i)).to_le_bytes()).collect();
}

/// An int64 initializer's values (a `Reshape`'s shape).
fn i64_values(t: &TensorProto) -> Option<Vec<i64>> {
    if t.data_type != Some(DataType::Int64 as i32) || !t.external_data.is_empty() {
        return None;
    }
    Some(if t.raw_data.is_empty() {
        t.int64_data.clone()
    } else {
        t.raw_data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes"))).collect()
    })
}

/// The value projection (weight, and bias if any) whose output channels are the channels of
/// `x`, when `x` is attention heads merged back:
/// `x = Reshape(Transpose(MatMul(P, Transpose(Reshape(h W + b)))))`, the reshapes splitting the
/// `k` channels into heads and joining them again and both transposes swapping heads with
/// tokens. `P` mixes tokens only, so channel `j` of `x` is linear in column `j` of `W` and `b_j`
/// alone: scaling those scales it, and a smoothing `Mul` on `x` (one more node per layer, which
/// short sentences feel) is not needed. None unless `x` is read by its `matmuls` quantized
/// MatMuls alone and every tensor on the way, the weight and the bias have no other reader (and
/// no subgraph, which could read any of them unseen).
fn head_merge_source(g: &GraphProto, x: &str, k: usize, matmuls: usize) -> Option<(String, Option<String>)> {
    if g.node.iter().flat_map(|n| &n.attribute).any(|a| a.g.is_some() || !a.graphs.is_empty()) {
        return None;
    }
    let producer = |t: &str| g.node.iter().find(|n| n.output.iter().any(|o| o == t));
    let reads = |t: &str| g.node.iter().flat_map(|n| &n.input).filter(|i| *i == t).count();
    let only = |t: &str| reads(t) == 1 && !g.output.iter().any(|o| o.name == t);
    let init = |t: &str| g.initializer.iter().find(|i| i.name == t);
    let fed = |t: &str| g.input.iter().any(|i| i.name == t);
    let swaps_heads = |n: &NodeProto| {
        n.op_type == "Transpose" && is_std(n) && n.attribute.iter().any(|a| a.name == "perm" && a.ints == [0, 2, 1, 3])
    };
    let reshape_to = |n: &NodeProto| -> Option<Vec<i64>> {
        (n.op_type == "Reshape" && is_std(n) && n.input.len() == 2).then_some(())?;
        i64_values(init(&n.input[1])?)
    };
    (reads(x) == matmuls && !g.output.iter().any(|o| o.name == x)).then_some(())?;
    let k = k as i64;
    // The join: [batch, tokens, k] (or -1 after batch and tokens copied).
    let join = producer(x)?;
    let shape = reshape_to(join)?;
    (shape.len() == 3 && (shape[2] == k || shape[..] == [0, 0, -1])).then_some(())?;
    let back = producer(&join.input[0]).filter(|n| swaps_heads(n) && only(&join.input[0]))?;
    let mix = producer(&back.input[0])
        .filter(|n| n.op_type == "MatMul" && is_std(n) && n.input.len() == 2 && only(&back.input[0]))?;
    (mix.input[0] != mix.input[1] && only(&mix.input[1])).then_some(())?;
    let heads = producer(&mix.input[1]).filter(|n| swaps_heads(n))?;
    // The split: [batch, tokens, heads, k / heads] (heads -1 after batch and tokens copied).
    let split = producer(&heads.input[0]).filter(|_| only(&heads.input[0]))?;
    let shape = reshape_to(split)?;
    let (h, d) = (*shape.get(2)?, *shape.get(3)?);
    let copies_rows = shape[0] == 0 && shape[1] == 0;
    (shape.len() == 4 && d > 0 && (h.checked_mul(d) == Some(k) || (h == -1 && copies_rows && k % d == 0)))
        .then_some(())?;
    (only(&split.input[0])).then_some(())?;
    let made = producer(&split.input[0])?;
    let (projection, bias) = if made.op_type == "Add" && is_std(made) && made.input.len() == 2 {
        let b_slot = (0..2).find(|&i| init(&made.input[i]).is_some())?;
        let (lin, b) = (&made.input[1 - b_slot], &made.input[b_slot]);
        let bias = f32_values(init(b)?)?;
        (bias.len() as i64 == k && init(b)?.dims.len() == 1 && reads(b) == 1 && !fed(b) && only(lin)).then_some(())?;
        (producer(lin)?, Some(b.clone()))
    } else {
        (made, None)
    };
    (projection.op_type == "MatMul" && is_std(projection) && projection.input.len() == 2).then_some(())?;
    let w = &projection.input[1];
    let (_, cols, _) = f32_matrix(init(w)?)?;
    (cols as i64 == k && reads(w) == 1 && !fed(w)).then_some(())?;
    Some((w.clone(), bias))
}

/// SmoothQuant's per-channel scales `s_j = a_j^alpha / w_j^(1 - alpha)` for activation channel
/// magnitudes `a` and weight row magnitudes `w` (1 where that is not a usable number).
pub(crate) fn smoothing_scales(a: &[f32], w: &[f32], alpha: f32) -> Vec<f32> {
    a.iter()
        .zip(w)
        .map(|(&a, &w)| {
            let s = a.powf(alpha) / w.powf(1.0 - alpha);
            if s.is_finite() && s > 1e-5 {
                s
            } else {
                1.0
            }
        })
        .collect()
}

fn node(name: String, op: &str, input: Vec<String>, output: String, attribute: Vec<Attr>) -> NodeProto {
    NodeProto { name, op_type: op.into(), input, output: vec![output], attribute, ..Default::default() }
}

/// Rewrites the `MatMul`s over fp32 weights into QDQ form with the activation `ranges`
/// (one per tensor [`activation_tensors`] names). Weights use `qmax` = 127, or 63 unless
/// `opts.full_range_int8` (see [`QuantizeOptions::full_range_int8`]). Other weights are left
/// alone: run the block quantizer afterwards for embedding tables.
pub fn quantize_static(
    model: &mut ModelProto,
    ranges: &HashMap<String, ActivationRange>,
    opts: &QuantizeOptions,
) -> Result<QuantizeSummary> {
    // DequantizeLinear with `axis` and int8 zero points needs opset 13; raising the opset would
    // change what other operators mean.
    let opset =
        model.opset_import.iter().find(|o| o.domain.is_empty() || o.domain == "ai.onnx").map_or(0, |o| o.version);
    if opset < 13 {
        return Err(Error::Unsupported {
            what: format!("static int8 needs ONNX opset 13 or later; the model has {opset}"),
        });
    }
    let g =
        model.graph.as_mut().ok_or_else(|| Error::Unsupported { what: "quantizing a model without a graph".into() })?;
    let bytes_before = g.initializer.iter().map(tensor_bytes).sum();
    let targets = targets(g, opts);
    let qmax = if opts.full_range_int8 { 127 } else { 63 };
    // Weights: int8 [K, N] with per-column scales, dequantized along axis 1.
    let mut weight_nodes = vec![];
    let mut weight_out: HashMap<String, String> = HashMap::new();
    let mut weight_scale: HashMap<String, String> = HashMap::new();
    for (_, _, w) in &targets {
        if weight_out.contains_key(w) {
            continue;
        }
        let t = g.initializer.iter().find(|t| &t.name == w).expect("a target's weight");
        let (k, n, values) = f32_matrix(t).expect("checked by targets");
        let (q, scales) = quantize_per_column(&values, k, n, qmax);
        let (qn, sn, zn, out) =
            (format!("{w}_int8"), format!("{w}_scale"), format!("{w}_zero_point"), format!("{w}_dequantized"));
        g.initializer.push(TensorProto::from_u8(
            &qn,
            &[k as i64, n as i64],
            DataType::Int8,
            q.iter().map(|v| *v as u8).collect(),
        ));
        g.initializer.push(TensorProto::from_f32(&sn, &[n as i64], &scales));
        if opts.qdq {
            g.initializer.push(TensorProto::from_u8(&zn, &[n as i64], DataType::Int8, vec![0; n]));
            weight_nodes.push(node(
                format!("{w}/DequantizeLinear"),
                "DequantizeLinear",
                vec![qn, sn, zn],
                out.clone(),
                vec![Attr::int("axis", 1)],
            ));
            weight_out.insert(w.clone(), out);
        } else {
            // Centred on zero: no zero point needed.
            weight_out.insert(w.clone(), qn);
            weight_scale.insert(w.clone(), sn);
        }
    }
    // Activations: one QuantizeLinear per tensor, one DequantizeLinear per consumer (ONNX
    // Runtime fuses a DequantizeLinear into one node only).
    let mut quantized: HashMap<String, (String, String, String)> = HashMap::new();
    let mut before: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    for (i, x, w) in &targets {
        let range = ranges.get(x).ok_or_else(|| Error::Unsupported {
            what: format!("no calibrated range for `{x}`, the input of `{}`", g.node[*i].name),
        })?;
        let at = before.entry(*i).or_default();
        if !quantized.contains_key(x) {
            let (scale, zero_point) = range.uint8_params();
            let (sn, zn, qn) = (format!("{x}_scale"), format!("{x}_zero_point"), format!("{x}_quantized"));
            g.initializer.push(TensorProto::from_f32(&sn, &[], &[scale]));
            g.initializer.push(TensorProto::from_u8(&zn, &[], DataType::Uint8, vec![zero_point]));
            at.push(node(
                format!("{x}/QuantizeLinear"),
                "QuantizeLinear",
                vec![x.clone(), sn.clone(), zn.clone()],
                qn.clone(),
                vec![],
            ));
            quantized.insert(x.clone(), (qn, sn, zn));
        }
        let (qn, sn, zn) = quantized[x].clone();
        if !opts.qdq {
            let n = &mut g.node[*i];
            n.op_type = "MatMulIntegerToFloat".into();
            n.domain = MS_DOMAIN.into();
            n.input = vec![qn, weight_out[w].clone(), sn, weight_scale[w].clone(), zn];
            continue;
        }
        let mm = &g.node[*i].name;
        let dq = format!("{mm}/{x}_dequantized");
        at.push(node(format!("{mm}/DequantizeLinear"), "DequantizeLinear", vec![qn, sn, zn], dq.clone(), vec![]));
        let n = &mut g.node[*i];
        n.input = vec![dq, weight_out[w].clone()];
    }
    let nodes = std::mem::take(&mut g.node);
    g.node = weight_nodes;
    for (i, n) in nodes.into_iter().enumerate() {
        if let Some(q) = before.remove(&i) {
            g.node.extend(q);
        }
        g.node.push(n);
    }
    g.initializer.retain(|t| !weight_out.contains_key(&t.name));
    if !opts.qdq {
        super::graph::fold_biases(g);
        super::graph::import_ms_domain(model);
    }
    let g = model.graph.as_ref().expect("checked above");
    Ok(QuantizeSummary {
        matmuls: weight_out.len(),
        bytes_before,
        bytes_after: g.initializer.iter().map(tensor_bytes).sum(),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use ort::session::Session;
    use ort::value::Tensor;
    use prost::Message;

    use super::*;
    use crate::onnx::{Dim, GraphBuilder};
    use crate::quantize::calibrate::{calibrate, RangeMethod};

    const V: usize = 30;
    const K: usize = 16;
    const N: usize = 12;
    const M: usize = 8;

    fn values(len: usize, seed: u32, spread: f32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                (((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 9) as f32 / 8_388_608.0 - 0.5) * spread
            })
            .collect()
    }

    /// `ids -> Gather(table) = x -> MatMul(W1) -> Relu = h -> MatMul(W2) = y`.
    fn model(table: &[f32], w1: &[f32], w2: &[f32]) -> ModelProto {
        let mut g = GraphBuilder::new("test");
        g.input("input_ids", DataType::Int64, &[Dim::Fixed(1), Dim::Symbolic("s".into())]);
        g.output("y", DataType::Float, &[Dim::Fixed(1), Dim::Symbolic("s".into()), Dim::Fixed(M as i64)]);
        let t = g.init_f32("table", &[V, K], table);
        let w1 = g.init_f32("w1", &[K, N], w1);
        let w2 = g.init_f32("w2", &[N, M], w2);
        let b1 = g.init_f32("b1", &[N], &bias());
        g.node_named("Gather", "", &[&t, "input_ids"], &["x"], vec![Attr::int("axis", 0)]);
        g.node_named("MatMul", "", &["x", &w1], &["xw"], vec![]);
        g.node_named("Add", "", &["xw", &b1], &["pre"], vec![]);
        g.node_named("Relu", "", &["pre"], &["h"], vec![]);
        g.node_named("MatMul", "", &["h", &w2], &["y"], vec![]);
        g.finish(21, None, "test")
    }

    /// The first matrix's bias: large enough that losing it shows.
    fn bias() -> Vec<f32> {
        (0..N).map(|j| j as f32 * 0.5 - 3.0).collect()
    }

    fn run(m: &ModelProto, ids: &[i64]) -> Vec<f32> {
        let env = edgelm_runtime::ortlib::init(None).expect("ONNX Runtime (EDGELM_ORT_LIB)");
        let mut s = Session::builder(env).unwrap().commit_from_memory(&m.encode_to_vec()).unwrap();
        let out = s
            .run(ort::inputs!["input_ids" => Tensor::from_array(([1usize, ids.len()], ids.to_vec())).unwrap()])
            .unwrap();
        out["y"].try_extract_tensor::<f32>().unwrap().1.to_vec()
    }

    /// What QuantizeLinear + DequantizeLinear do to `x` with `range`.
    fn fake_quant(x: &[f32], range: ActivationRange) -> Vec<f32> {
        let (s, z) = range.uint8_params();
        x.iter().map(|v| (((v / s).round_ties_even() + z as f32).clamp(0.0, 255.0) - z as f32) * s).collect()
    }

    fn matmul(x: &[f32], w: &[f32], k: usize, n: usize) -> Vec<f32> {
        x.chunks_exact(k)
            .flat_map(|row| (0..n).map(move |j| (0..k).map(|i| row[i] * w[i * n + j]).sum::<f32>()))
            .collect()
    }

    fn dequantized(w: &[f32], k: usize, n: usize) -> Vec<f32> {
        let (q, s) = quantize_per_column(w, k, n, 63);
        q.iter().enumerate().map(|(i, v)| *v as f32 * s[i % n]).collect()
    }

    /// Calibration in ONNX Runtime finds the ranges of the tensors feeding each MatMul, and the
    /// QDQ graph computes what fake-quantizing those tensors and the weights computes.
    #[test]
    fn calibrated_qdq_graph_matches_fake_quantization() {
        let (table, w1, w2) = (values(V * K, 1, 4.0), values(K * N, 2, 1.0), values(N * M, 3, 1.0));
        let m = model(&table, &w1, &w2);
        let opts = QuantizeOptions::for_bits(8).unwrap();
        let tensors = activation_tensors(&m, &opts);
        assert_eq!(tensors, ["x", "h"]);
        let samples: Vec<_> = [vec![1i64, 5, 7], vec![29, 0, 3, 3, 12]]
            .into_iter()
            .map(|ids| vec![("input_ids".to_string(), ids)])
            .collect();
        let ranges = calibrate(&m, &tensors, &samples, RangeMethod::MinMax).unwrap();
        // x's range is that of the table rows the samples gathered.
        let rows: Vec<f32> =
            [1usize, 5, 7, 29, 0, 3, 12].iter().flat_map(|&r| table[r * K..(r + 1) * K].to_vec()).collect();
        let lo = rows.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = rows.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(ranges["x"], ActivationRange { min: lo, max: hi });
        assert!(ranges["h"].min >= 0.0, "h follows a Relu");

        let ids = [3i64, 29, 12, 5];
        let x: Vec<f32> = ids.iter().flat_map(|&r| table[r as usize * K..(r as usize + 1) * K].to_vec()).collect();
        let h: Vec<f32> = matmul(&fake_quant(&x, ranges["x"]), &dequantized(&w1, K, N), K, N)
            .iter()
            .zip(bias().iter().cycle())
            .map(|(v, b)| (v + b).max(0.0))
            .collect();
        let want = matmul(&fake_quant(&h, ranges["h"]), &dequantized(&w2, N, M), N, M);
        let fp32 = run(&m, &ids);
        // Both forms: QDQ, and the integer matmuls with the bias folded in.
        for qdq in [true, false] {
            let mut q = m.clone();
            let s = quantize_static(&mut q, &ranges, &QuantizeOptions { qdq, ..opts.clone() }).unwrap();
            assert_eq!(s.matmuls, 2);
            let ops: Vec<&str> = q.graph.as_ref().unwrap().node.iter().map(|n| n.op_type.as_str()).collect();
            let count = |op: &str| ops.iter().filter(|o| **o == op).count();
            assert_eq!(count("QuantizeLinear"), 2);
            if qdq {
                assert_eq!((count("DequantizeLinear"), count("MatMul"), count("Add")), (4, 2, 1), "{ops:?}");
            } else {
                assert_eq!(
                    (count("MatMulIntegerToFloat"), count("DequantizeLinear"), count("Add")),
                    (2, 0, 0),
                    "{ops:?}"
                );
            }
            assert!(q.graph.as_ref().unwrap().initializer.iter().all(|t| t.name != "w1" && t.name != "w2"));
            let got = run(&q, &ids);
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "qdq {qdq}: graph vs fake quantization: {worst}");
            let err = got.iter().zip(&fp32).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err > 0.0 && err < 0.1, "qdq {qdq}: int8 vs fp32: {err}");
        }
    }

    /// Smoothing leaves the fp32 function unchanged (a Mul on the activation, the inverse in the
    /// weight rows) and narrows the range of an activation with an outlier channel.
    #[test]
    fn smoothing_keeps_the_product_and_flattens_outlier_channels() {
        use crate::quantize::calibrate::channel_absmax;
        // Channel 3 of the table is 50x the others: x has one outlier channel.
        let mut table = values(V * K, 1, 1.0);
        table.iter_mut().skip(3).step_by(K).for_each(|v| *v *= 50.0);
        let m = model(&table, &values(K * N, 2, 1.0), &values(N * M, 3, 1.0));
        let opts = QuantizeOptions::for_bits(8).unwrap();
        let samples: Vec<_> = [vec![1i64, 5, 7, 20], vec![29, 0, 3]]
            .into_iter()
            .map(|ids| vec![("input_ids".to_string(), ids)])
            .collect();
        let tensors = activation_tensors(&m, &opts);
        let absmax = channel_absmax(&m, &tensors, &samples).unwrap();
        assert_eq!(absmax["x"].len(), K);
        assert!(absmax["x"][3] > 10.0 * absmax["x"][2]);
        let mut sm = m.clone();
        assert_eq!(smooth(&mut sm, &absmax, 0.5, &opts).unwrap(), 2);
        assert_eq!(activation_tensors(&sm, &opts), ["x_smoothed", "h_smoothed"]);
        let ids = [3i64, 29, 12, 5];
        let (a, b) = (run(&m, &ids), run(&sm, &ids));
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "smoothing changed the output by {worst}");
        // Largest channel over the median one: what one per-tensor scale has to span.
        let outlier = |v: &[f32]| {
            let mut s = v.to_vec();
            s.sort_by(f32::total_cmp);
            s[s.len() - 1] / s[s.len() / 2]
        };
        let smoothed = channel_absmax(&sm, &["x_smoothed".to_string()], &samples).unwrap();
        let (before, after) = (outlier(&absmax["x"]), outlier(&smoothed["x_smoothed"]));
        assert!(before > 10.0 && after * 3.0 < before, "outlier ratio {before} before, {after} after");
        assert!(smooth(&mut m.clone(), &absmax, 1.5, &opts).is_err());
    }

    /// On an exported encoder, smoothing the joined attention heads goes into the value
    /// projection (no `Mul`) and the function stays; when the projection's output or the joined
    /// heads have another reader, scaling them would change that reader, so the `Mul` stays.
    #[test]
    fn smoothing_of_joined_heads_goes_into_the_value_projection() {
        use crate::encoder::{tiny_encoder, Pooling};
        use crate::quantize::calibrate::channel_absmax;
        let ck = tiny_encoder(Pooling::Mean, 3);
        let layers = ck.config.num_hidden_layers;
        let embed = |m: &ModelProto| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("model.onnx");
            std::fs::write(&path, m.encode_to_vec()).unwrap();
            let mut s = edgelm_runtime::encoder::EncoderSession::load(&path, &Default::default()).unwrap();
            s.run(&[3, 17, 5, 29, 8], &[0; 5]).unwrap()
        };
        let samples: Vec<_> = [vec![1i64, 5, 7, 20], vec![29, 0, 3]]
            .into_iter()
            .map(|ids| {
                let n = ids.len();
                vec![
                    ("input_ids".to_string(), ids),
                    ("token_type_ids".into(), vec![0; n]),
                    ("attention_mask".into(), vec![1; n]),
                ]
            })
            .collect();
        let opts = QuantizeOptions::for_bits(8).unwrap();
        let smooth_muls =
            |m: &ModelProto| m.graph.as_ref().unwrap().node.iter().filter(|n| n.name.ends_with("/Smooth")).count();
        let m = crate::export::encoder::build(&ck).unwrap();
        let absmax = channel_absmax(&m, &activation_tensors(&m, &opts), &samples).unwrap();
        let want = embed(&m);
        let mut sm = m.clone();
        let smoothed = smooth(&mut sm, &absmax, 0.8, &opts).unwrap();
        assert_eq!(smoothed - smooth_muls(&sm), layers, "one smoothing per layer folded");
        let worst = embed(&sm).iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "folding changed the embedding by {worst}");
        // A second reader of each projection's output (the Add before the head split), then of
        // each joined-heads tensor (the attention output projection's input).
        for (reshape, per_layer) in [("split_heads", 3), ("merge_heads", 1)] {
            let mut shared = m.clone();
            let g = shared.graph.as_mut().unwrap();
            let read: Vec<String> = g
                .node
                .iter()
                .filter(|n| n.op_type == "Reshape" && n.input[1].contains(reshape))
                .map(|n| if reshape == "split_heads" { n.input[0].clone() } else { n.output[0].clone() })
                .collect();
            assert_eq!(read.len(), per_layer * layers, "{reshape}");
            for (i, v) in read.iter().enumerate() {
                g.node.push(node(format!("extra{i}"), "Identity", vec![v.clone()], format!("extra{i}_out"), vec![]));
                let dims = [Dim::Fixed(1), Dim::Symbolic("s".into()), Dim::Fixed(ck.config.hidden_size as i64)];
                g.output.push(crate::onnx::proto::ValueInfoProto::tensor(
                    format!("extra{i}_out"),
                    DataType::Float,
                    &dims,
                ));
            }
            let mut sm = shared.clone();
            let smoothed = smooth(&mut sm, &absmax, 0.8, &opts).unwrap();
            assert_eq!(smooth_muls(&sm), smoothed, "{reshape}: nothing folded where a tensor on the way is read twice");
            let worst = embed(&sm).iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-5, "{reshape}: smoothing changed the embedding by {worst}");
        }
    }

    #[test]
    fn a_missing_range_is_an_error_naming_the_tensor() {
        let m = model(&values(V * K, 1, 4.0), &values(K * N, 2, 1.0), &values(N * M, 3, 1.0));
        let mut q = m.clone();
        let ranges = HashMap::from([("x".to_string(), ActivationRange { min: -1.0, max: 1.0 })]);
        let e = quantize_static(&mut q, &ranges, &QuantizeOptions::for_bits(8).unwrap()).unwrap_err();
        assert!(e.to_string().contains("`h`"), "{e}");
    }
}
