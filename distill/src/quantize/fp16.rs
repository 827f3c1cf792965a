//! fp16 graphs for GPU boards: every fp32 tensor inside the graph (weights, activations,
//! constants) becomes fp16, while the graph's inputs and outputs stay fp32 behind a `Cast` each,
//! so a runtime feeds and reads the same tensors as before (the KV cache included). Nodes named
//! in a keep list compute in fp32 with `Cast`s around them (e.g. a norm whose squares overflow
//! fp16's 65 504).
//!
//! Element types are followed through the graph by operator (most operators return the type of
//! their first input); an operator this file does not know is refused by name rather than
//! guessed.

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::onnx::proto::{GraphProto, NodeProto, TensorProto};
use crate::onnx::{AttributeProto as Attr, DataType, ModelProto};

const FLOAT: i32 = DataType::Float as i32;
const HALF: i32 = DataType::Float16 as i32;
const INT64: i32 = DataType::Int64 as i32;
const BOOL: i32 = DataType::Bool as i32;

/// What the conversion did.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Fp16Summary {
    /// Initializers stored in fp16.
    pub initializers: usize,
    /// Nodes left computing in fp32, by name.
    pub kept: Vec<String>,
}

/// The element type of each output of `n`, from the types of its inputs (`None`: unknown op).
fn output_types(n: &NodeProto, types: &HashMap<String, i32>) -> Option<Vec<i32>> {
    let input = |i: usize| n.input.get(i).and_then(|x| types.get(x)).copied().unwrap_or(FLOAT);
    let attr_i = |name: &str| n.attribute.iter().find(|a| a.name == name).and_then(|a| a.i);
    let attr_t = |name: &str| n.attribute.iter().find(|a| a.name == name).and_then(|a| a.t.as_ref());
    let all = |t: i32| vec![t; n.output.len()];
    Some(match n.op_type.as_str() {
        "Shape" | "Size" | "ArgMax" | "ArgMin" | "NonZero" => all(INT64),
        "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "Not" | "And" | "Or" | "Xor" | "IsNaN"
        | "IsInf" => all(BOOL),
        "Cast" => all(attr_i("to")? as i32),
        "CastLike" | "Where" => all(input(1)),
        "Constant" => all(attr_t("value").and_then(|t| t.data_type).unwrap_or(FLOAT)),
        "ConstantOfShape" => all(attr_t("value").and_then(|t| t.data_type).unwrap_or(FLOAT)),
        // Mean and inverse deviation (outputs 1 and 2) are fp32 whatever the input.
        "LayerNormalization"
        | "SimplifiedLayerNormalization"
        | "SkipLayerNormalization"
        | "SkipSimplifiedLayerNormalization" => {
            (0..n.output.len()).map(|i| if i == 1 || i == 2 { FLOAT } else { input(0) }).collect()
        }
        "Add"
        | "Sub"
        | "Mul"
        | "Div"
        | "Pow"
        | "MatMul"
        | "Gemm"
        | "Relu"
        | "Sigmoid"
        | "Tanh"
        | "Erf"
        | "Sqrt"
        | "Exp"
        | "Log"
        | "Neg"
        | "Abs"
        | "Reciprocal"
        | "Softmax"
        | "LogSoftmax"
        | "ReduceMean"
        | "ReduceSum"
        | "ReduceMax"
        | "ReduceMin"
        | "ReduceL2"
        | "Reshape"
        | "Transpose"
        | "Squeeze"
        | "Unsqueeze"
        | "Concat"
        | "Slice"
        | "Split"
        | "Flatten"
        | "Expand"
        | "Identity"
        | "Gather"
        | "GatherElements"
        | "GatherND"
        | "Tile"
        | "Pad"
        | "Max"
        | "Min"
        | "Clip"
        | "Range"
        | "CumSum"
        | "Trilu"
        | "Gelu"
        | "FastGelu"
        | "BiasGelu"
        | "QuickGelu"
        | "Softplus"
        | "HardSigmoid"
        | "LeakyRelu"
        | "Elu"
        | "Dropout"
        | "GroupQueryAttention"
        | "MultiHeadAttention"
        | "Attention"
        | "RotaryEmbedding"
        | "MatMulNBits"
        | "GatherBlockQuantized"
        | "LpNormalization"
        | "Sin"
        | "Cos"
        | "Floor"
        | "Ceil"
        | "Round"
        | "Sign"
        | "ReduceProd"
        | "ReduceSumSquare"
        | "ReduceLogSumExp"
        | "ReduceL1"
        | "Mod"
        | "Einsum"
        | "Conv"
        | "BatchNormalization"
        | "InstanceNormalization"
        | "PRelu"
        | "Selu"
        | "Celu"
        | "HardSwish"
        | "Mish" => all(input(0)),
        _ => return None,
    })
}

/// An fp32 tensor's values in fp16, in place.
fn tensor_to_f16(t: &mut TensorProto) -> Result<()> {
    let values = super::graph::f32_values(t).ok_or_else(|| Error::Unsupported {
        what: format!("fp16 of tensor `{}` stored outside the model file", t.name),
    })?;
    // Finite values beyond fp16's range saturate (a -1e9 mask stays a large negative, not -inf).
    t.raw_data = edgelm_kernels::bytes::f32_to_f16_le_bytes(&values, true);
    t.float_data.clear();
    t.data_type = Some(HALF);
    Ok(())
}

fn cast(name: String, input: String, output: String, to: i32) -> NodeProto {
    NodeProto {
        name,
        op_type: "Cast".into(),
        input: vec![input],
        output: vec![output],
        attribute: vec![Attr::int("to", to as i64)],
        ..Default::default()
    }
}

/// Whether `n` stays in fp32: its name contains a pattern of `keep`, or its type equals one.
fn is_kept(n: &NodeProto, keep: &[String]) -> bool {
    keep.iter().any(|k| n.name.contains(k.as_str()) || n.op_type == *k)
}

/// Converts `model` to fp16 in place, keeping the nodes `keep` names in fp32.
pub fn to_fp16(model: &mut ModelProto, keep: &[String]) -> Result<Fp16Summary> {
    let g: &mut GraphProto =
        model.graph.as_mut().ok_or_else(|| Error::Unsupported { what: "converting a model without a graph".into() })?;
    if g.initializer.iter().any(|t| t.data_type == Some(FLOAT) && !t.external_data.is_empty()) {
        return Err(Error::Unsupported { what: "fp16 of a model with external weights".into() });
    }
    // Element types before conversion.
    let mut types: HashMap<String, i32> = HashMap::new();
    for v in &g.input {
        use crate::onnx::proto::type_proto::Value;
        if let Some(Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            types.insert(v.name.clone(), t.elem_type);
        }
    }
    for t in &g.initializer {
        types.insert(t.name.clone(), t.data_type.unwrap_or(0));
    }
    for n in &g.node {
        let out = output_types(n, &types).ok_or_else(|| Error::Unsupported {
            what: format!(
                "fp16 does not know the element types operator {} (node `{}`) returns; export this model in fp32",
                n.op_type, n.name
            ),
        })?;
        // A blank name is an optional output left unused: no tensor, no type.
        for (o, t) in n.output.iter().zip(out).filter(|(o, _)| !o.is_empty()) {
            types.insert(o.clone(), t);
        }
    }
    let is_float = |x: &str| types.get(x) == Some(&FLOAT);
    let graph_inputs: HashSet<String> = g.input.iter().map(|v| v.name.clone()).collect();
    let graph_outputs: HashSet<String> = g.output.iter().map(|v| v.name.clone()).collect();
    let kept: Vec<bool> = g.node.iter().map(|n| is_kept(n, keep)).collect();
    // Initializers read by a converted node become fp16; one read only by kept nodes stays.
    let mut converted_reader: HashSet<String> = HashSet::new();
    for (n, &k) in g.node.iter().zip(&kept) {
        if !k {
            converted_reader.extend(n.input.iter().cloned());
        }
    }
    let mut summary = Fp16Summary::default();
    // Tensors now held in fp16.
    let mut half: HashSet<String> = HashSet::new();
    for t in g.initializer.iter_mut().filter(|t| t.data_type == Some(FLOAT) && converted_reader.contains(&t.name)) {
        tensor_to_f16(t)?;
        half.insert(t.name.clone());
        summary.initializers += 1;
    }
    let mut nodes = Vec::with_capacity(g.node.len());
    // fp16 copies of fp32 graph inputs, made once.
    let mut input_half: HashMap<String, String> = HashMap::new();
    // fp32 copies of fp16 tensors for kept nodes, made once.
    let mut as_float: HashMap<String, String> = HashMap::new();
    for (mut n, k) in std::mem::take(&mut g.node).into_iter().zip(kept) {
        if k {
            summary.kept.push(n.name.clone());
            for i in n.input.iter_mut().filter(|i| half.contains(i.as_str())) {
                let f = as_float.entry(i.clone()).or_insert_with(|| {
                    let f = format!("{i}/fp32");
                    nodes.push(cast(format!("{i}/CastToFp32"), i.clone(), f.clone(), FLOAT));
                    f
                });
                *i = f.clone();
            }
            let mut after = vec![];
            for o in n.output.iter_mut().filter(|o| is_float(o) && !graph_outputs.contains(o.as_str())) {
                let f = format!("{o}/fp32");
                after.push(cast(format!("{o}/CastToFp16"), f.clone(), o.clone(), HALF));
                half.insert(o.clone());
                // A kept node after this one reads the fp32 output itself, not a cast of a cast.
                as_float.insert(o.clone(), f.clone());
                *o = f;
            }
            nodes.push(n);
            nodes.extend(after);
            continue;
        }
        for i in n.input.iter_mut().filter(|i| graph_inputs.contains(i.as_str()) && is_float(i)) {
            let h = input_half.entry(i.clone()).or_insert_with(|| {
                let h = format!("{i}/fp16");
                nodes.push(cast(format!("{i}/CastToFp16"), i.clone(), h.clone(), HALF));
                h
            });
            *i = h.clone();
        }
        match n.op_type.as_str() {
            "Cast" => {
                for a in n.attribute.iter_mut().filter(|a| a.name == "to" && a.i == Some(FLOAT as i64)) {
                    a.i = Some(HALF as i64);
                }
            }
            "Constant" | "ConstantOfShape" => {
                for t in n.attribute.iter_mut().filter_map(|a| a.t.as_mut()).filter(|t| t.data_type == Some(FLOAT)) {
                    tensor_to_f16(t)?;
                }
            }
            _ => {}
        }
        let mut after = vec![];
        for o in n.output.iter_mut().filter(|o| is_float(o)) {
            if graph_outputs.contains(o.as_str()) {
                let h = format!("{o}/fp16");
                after.push(cast(format!("{o}/CastToFp32"), h.clone(), o.clone(), FLOAT));
                *o = h;
            } else {
                half.insert(o.clone());
            }
        }
        nodes.push(n);
        nodes.extend(after);
    }
    g.node = nodes;
    // Intermediate type annotations would now be wrong; ONNX Runtime infers them again.
    g.value_info.clear();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use half::f16;
    use ort::session::Session;
    use ort::value::Tensor;
    use prost::Message;

    use super::*;
    use crate::onnx::graph::MS_DOMAIN;
    use crate::onnx::{Dim, GraphBuilder};

    /// `y = Softmax(x W + b) * mask`, with `Cast(mask_ids -> float)`, and `n = Pow(x, 2)`.
    fn model() -> ModelProto {
        let mut g = GraphBuilder::new("test");
        g.input("x", DataType::Float, &[Dim::Fixed(2), Dim::Fixed(3)]);
        g.input("mask_ids", DataType::Int64, &[Dim::Fixed(2), Dim::Fixed(4)]);
        g.output("y", DataType::Float, &[Dim::Fixed(2), Dim::Fixed(4)]);
        g.output("n", DataType::Float, &[Dim::Fixed(2), Dim::Fixed(3)]);
        let w = g.init_f32("w", &[3, 4], &[0.1, -0.2, 0.3, 0.4, 0.5, -0.6, 0.7, 0.8, -0.9, 1.0, 1.1, 1.2]);
        let b = g.init_f32("b", &[4], &[0.0, 1.0, -1.0, 1e9]);
        let two = g.init_f32("two", &[], &[2.0]);
        g.node_named("MatMul", "", &["x", &w], &["xw"], vec![]);
        g.node_named("Add", "", &["xw", &b], &["z"], vec![]);
        g.node_named("Softmax", "", &["z"], &["p"], vec![Attr::int("axis", -1)]);
        g.node_named("Cast", "", &["mask_ids"], &["m"], vec![Attr::int("to", DataType::Float as i64)]);
        g.node_named("Mul", "", &["p", "m"], &["y"], vec![]);
        g.set_scope("/norm");
        g.node_named("Pow", "", &["x", &two], &["n"], vec![]);
        g.finish(21, None, "test")
    }

    fn run(m: &ModelProto, x: &[f32]) -> Vec<Vec<f32>> {
        let env = edgelm_runtime::ortlib::init(None).expect("ONNX Runtime (EDGELM_ORT_LIB)");
        let mut s = Session::builder(env).unwrap().commit_from_memory(&m.encode_to_vec()).unwrap();
        let out = s
            .run(ort::inputs![
                "x" => Tensor::from_array(([2usize, 3], x.to_vec())).unwrap(),
                "mask_ids" => Tensor::from_array(([2usize, 4], vec![1i64, 1, 0, 1, 1, 0, 1, 1])).unwrap(),
            ])
            .unwrap();
        ["y", "n"].iter().map(|n| out[*n].try_extract_tensor::<f32>().unwrap().1.to_vec()).collect()
    }

    /// The converted graph keeps fp32 inputs and outputs, stores weights in fp16, runs in ONNX
    /// Runtime and stays within fp16 rounding of the fp32 graph; a kept node stays fp32 and
    /// still computes what fp32 computes where fp16 would overflow.
    #[test]
    fn fp16_graph_runs_close_to_fp32_and_keeps_what_it_is_told() {
        let m = model();
        let x = [0.5f32, -1.0, 2.0, 300.0, 0.25, -0.75];
        let want = run(&m, &x);
        let mut h = m.clone();
        let s = to_fp16(&mut h, &["/norm/".into()]).unwrap();
        assert_eq!(s.initializers, 2, "w and b (two is read by the kept Pow only)");
        assert!(s.kept.len() == 1 && s.kept[0].starts_with("/norm/Pow"), "{:?}", s.kept);
        let g = h.graph.as_ref().unwrap();
        let w = g.initializer.iter().find(|t| t.name == "w").unwrap();
        assert_eq!((w.data_type, w.raw_data.len()), (Some(HALF), 24));
        // b's 1e9 saturates to fp16's largest finite value.
        let b = g.initializer.iter().find(|t| t.name == "b").unwrap();
        assert_eq!(f16::from_le_bytes([b.raw_data[6], b.raw_data[7]]).to_f32(), 65504.0);
        assert!(g
            .node
            .iter()
            .any(|n| n.op_type == "Cast" && n.attribute[0].i == Some(HALF as i64) && n.input[0] == "mask_ids"));
        let got = run(&h, &x);
        for (a, b) in got[0].iter().zip(&want[0]) {
            assert!((a - b).abs() < 2e-3, "y: {a} vs {b}");
        }
        // 300^2 = 90 000 overflows fp16 but not the kept Pow.
        assert_eq!(got[1], want[1]);

        // Without the keep list Pow and its exponent are fp16 too.
        let mut all = m.clone();
        let s = to_fp16(&mut all, &[]).unwrap();
        assert_eq!((s.initializers, s.kept.len()), (3, 0));
        let pow = all.graph.as_ref().unwrap().node.iter().find(|n| n.op_type == "Pow").unwrap();
        assert_eq!(pow.input[0], "x/fp16");
    }

    /// Norms kept in fp32 whose optional outputs are blank (as the exporter writes its residual
    /// norms) still make one graph ONNX Runtime loads: a blank name is no tensor, so it gets no
    /// fp32 copy and no cast, and two such nodes do not both define `/fp32`.
    #[test]
    fn kept_nodes_with_blank_optional_outputs_convert_to_a_loadable_graph() {
        let mut g = GraphBuilder::new("test");
        g.input("x", DataType::Float, &[Dim::Fixed(2), Dim::Fixed(4)]);
        g.input("r", DataType::Float, &[Dim::Fixed(2), Dim::Fixed(4)]);
        g.output("y", DataType::Float, &[Dim::Fixed(2), Dim::Fixed(4)]);
        let gamma = g.init_f32("gamma", &[4], &[1.0, 0.5, 2.0, 1.5]);
        let eps = || vec![Attr::float("epsilon", 1e-5)];
        for i in 0..2 {
            g.set_scope(format!("/layers.{i}/norm"));
            let (x, r, y) = if i == 0 { ("x", "r", "h") } else { ("h", "s0", "y") };
            let sum = format!("s{i}");
            g.node_named("SkipSimplifiedLayerNormalization", MS_DOMAIN, &[x, r, &gamma], &[y, "", "", &sum], eps());
        }
        let m = g.finish(21, Some(1), "test");
        let x: Vec<f32> = (0..8).map(|i| i as f32 * 0.25 - 1.0).collect();
        let r: Vec<f32> = (0..8).map(|i| 0.5 - i as f32 * 0.125).collect();
        let run = |m: &ModelProto| {
            let env = edgelm_runtime::ortlib::init(None).expect("ONNX Runtime (EDGELM_ORT_LIB)");
            let mut s = Session::builder(env).unwrap().commit_from_memory(&m.encode_to_vec()).unwrap();
            let out = s
                .run(ort::inputs![
                    "x" => Tensor::from_array(([2usize, 4], x.clone())).unwrap(),
                    "r" => Tensor::from_array(([2usize, 4], r.clone())).unwrap(),
                ])
                .unwrap();
            out["y"].try_extract_tensor::<f32>().unwrap().1.to_vec()
        };
        let want = run(&m);
        let mut h = m.clone();
        let s = to_fp16(&mut h, &["SkipSimplifiedLayerNormalization".into()]).unwrap();
        assert_eq!(s.kept.len(), 2, "{:?}", s.kept);
        let g = h.graph.as_ref().unwrap();
        assert!(g.node.iter().all(|n| n.output.iter().all(|o| o != "/fp32")), "a blank output was renamed");
        assert_eq!(run(&h), want, "both norms computed in fp32 between fp16 casts of exact values");
    }

    #[test]
    fn an_unknown_operator_is_refused_by_name() {
        let mut m = model();
        m.graph.as_mut().unwrap().node[2].op_type = "MadeUpOp".into();
        let e = to_fp16(&mut m, &[]).unwrap_err().to_string();
        assert!(e.contains("MadeUpOp") && e.contains("Softmax_"), "{e}");
    }
}
