//! Rewrites an fp32 ONNX graph to block-quantized weights on ONNX Runtime's CPU operators:
//! `MatMul` by a weight and the LM head's `Gemm` become `MatMulNBits`, an embedding `Gather`
//! becomes `GatherBlockQuantized`. Works on any graph with weights as initializers (our
//! decoders and encoders, or another exporter's fp32 file), the way ONNX Runtime's own
//! `MatMulNBitsQuantizer` does.
//!
//! A table that is both embedding and tied LM head is stored once: `MatMulNBits` reads it as
//! `[vocab, blocks, block_bytes]` and `GatherBlockQuantized` reads the same initializer with its
//! quantize axis on the last dimension, one scale per block.

use std::collections::HashMap;

use super::block::{quantize, quantize_per_column, BlockScheme, QuantizedMatrix};
use crate::error::{Error, Result};
use crate::onnx::proto::{GraphProto, NodeProto, TensorProto};
use crate::onnx::{AttributeProto as Attr, DataType, ModelProto, MS_DOMAIN};

/// Which operators the matrices run on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// `MatMulNBits`: weights in blocks of `scheme`, 4 or 8 bits (fast decode).
    #[default]
    Blockwise,
    /// `DynamicQuantizeMatMul`: int8 weights with one scale per output column, activations
    /// quantized to 8 bits at run time (fast over many tokens: encoders, prompts).
    DynamicInt8,
    /// QDQ int8: weights per output column, activations with scales fixed by calibration
    /// (`range` over `calibration`): no run-time range search, for encoders.
    StaticInt8,
    /// No integers: every fp32 tensor inside the graph in fp16 (GPU boards), `keep_fp32` nodes
    /// excepted.
    Fp16,
}

/// What to quantize and how.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QuantizeOptions {
    /// Operators the matrices run on.
    #[serde(default)]
    pub method: Method,
    /// Dynamic int8 only: use all of -127..=127 for weights instead of 7 bits. x86 CPUs without
    /// VNNI multiply unsigned activations by signed weights in 16-bit pairs, which saturate on
    /// full-range weights and give wrong sums; ARM and VNNI CPUs gain the extra bit.
    #[serde(default)]
    pub full_range_int8: bool,
    /// Bits, block size and symmetry (matrices when blockwise; embeddings always).
    pub scheme: BlockScheme,
    /// `MatMulNBits`' `accuracy_level`: the type the CPU kernel computes in (0 unset, 1 fp32,
    /// 2 fp16, 3 bf16, 4 int8 activations, the fastest on x86 and ARM).
    pub accuracy_level: u8,
    /// Quantize embedding tables (`Gather` over a weight) too.
    pub embedding: bool,
    /// Bits, block size and symmetry of tables read only by `Gather` (an untied embedding),
    /// when not `scheme`'s: e.g. 4-bit word embeddings under 8-bit matrices, the largest
    /// table of an encoder like MiniLM.
    #[serde(default)]
    pub embedding_scheme: Option<BlockScheme>,
    /// Weights to keep in fp32: a node or initializer whose name contains one of these.
    pub keep_fp32: Vec<String>,
    /// With `DynamicInt8` or `StaticInt8`: weights whose name contains one of these use the block-wise scheme
    /// instead (the few layers whose activations have outliers, e.g. an encoder's FFN output).
    #[serde(default)]
    pub blockwise: Vec<String>,
    /// With `StaticInt8`: how activation ranges are chosen.
    #[serde(default = "default_range")]
    pub range: super::RangeMethod,
    /// With `StaticInt8`: move activation outliers into the weights first with this strength
    /// (0 to 1; see [`super::qdq::smooth`]).
    #[serde(default)]
    pub smooth: Option<f32>,
    /// With `StaticInt8`: the texts the fp32 graph is calibrated on.
    #[serde(skip)]
    pub calibration: Vec<String>,
}

fn default_range() -> super::RangeMethod {
    super::RangeMethod::MinMax
}

impl QuantizeOptions {
    /// `bits`-bit weights with the block size and accuracy level that measured best on CPU:
    /// 4 bits in blocks of 32, 8 bits in blocks of 64, int8 activations, embeddings included.
    pub fn for_bits(bits: u8) -> Result<Self> {
        let block = if bits == 8 { 64 } else { 32 };
        Ok(QuantizeOptions {
            method: Method::Blockwise,
            full_range_int8: false,
            scheme: BlockScheme::new(bits, block, true)?,
            accuracy_level: 4,
            embedding: true,
            embedding_scheme: None,
            keep_fp32: vec![],
            blockwise: vec![],
            range: default_range(),
            smooth: None,
            calibration: vec![],
        })
    }
}

/// What the rewrite did.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct QuantizeSummary {
    /// Weights now in `MatMulNBits` form.
    pub matmuls: usize,
    /// Embedding tables now in `GatherBlockQuantized` form.
    pub embeddings: usize,
    /// Whether an embedding and the LM head share one quantized table.
    pub shared_embedding_head: bool,
    /// The scheme of tables only gathered from, when they took `embedding_scheme`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_table: Option<BlockScheme>,
    /// Weights left in fp32, with the reason.
    pub kept: Vec<String>,
    /// Initializer bytes before and after.
    pub bytes_before: usize,
    /// Initializer bytes after.
    pub bytes_after: usize,
    /// Static int8: how the activation ranges were calibrated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activations: Option<edgelm_runtime::bundle::ActivationScheme>,
}

/// How a weight initializer is used.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Use {
    /// `MatMul(x, W)` with `W [K, N]`.
    MatMul(usize),
    /// `Gemm(x, W)` with `transB = 1`, `W [N, K]`, no bias, unit alpha.
    GemmTransB(usize),
    /// `Gather(W, ids)` on axis 0, `W [rows, K]`.
    Gather(usize),
    /// Anything else: the weight stays as it is.
    Other,
}

fn attr_i(n: &NodeProto, name: &str, default: i64) -> i64 {
    n.attribute.iter().find(|a| a.name == name).and_then(|a| a.i).unwrap_or(default)
}

fn attr_f(n: &NodeProto, name: &str, default: f32) -> f32 {
    n.attribute.iter().find(|a| a.name == name).and_then(|a| a.f).unwrap_or(default)
}

fn classify(n: &NodeProto, idx: usize, slot: usize) -> Use {
    let std = n.domain.is_empty() || n.domain == "ai.onnx";
    match (n.op_type.as_str(), slot) {
        ("MatMul", 1) if std => Use::MatMul(idx),
        ("Gemm", 1)
            if std
                && attr_i(n, "transB", 0) == 1
                && attr_i(n, "transA", 0) == 0
                && attr_f(n, "alpha", 1.0) == 1.0
                && n.input.get(2).is_none_or(|c| c.is_empty()) =>
        {
            Use::GemmTransB(idx)
        }
        ("Gather", 0) if std && attr_i(n, "axis", 0) == 0 => Use::Gather(idx),
        _ => Use::Other,
    }
}

/// An fp32 initializer's values, when it is a plain fp32 matrix held in the file.
pub(super) fn f32_matrix(t: &TensorProto) -> Option<(usize, usize, Vec<f32>)> {
    if t.data_type != Some(DataType::Float as i32) || t.dims.len() != 2 || !t.external_data.is_empty() {
        return None;
    }
    let (r, c) = (usize::try_from(t.dims[0]).ok()?, usize::try_from(t.dims[1]).ok()?);
    let values: Vec<f32> = if !t.raw_data.is_empty() {
        t.raw_data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    } else {
        t.float_data.clone()
    };
    (values.len() == r * c && r > 0 && c > 0).then_some((r, c, values))
}

fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

pub(super) fn tensor_bytes(t: &TensorProto) -> usize {
    t.raw_data.len() + 4 * t.float_data.len() + 8 * t.int64_data.len() + 4 * t.int32_data.len()
}

/// The initializers a quantized matrix adds, named after the weight it replaces.
struct Stored {
    data: String,
    scales: String,
    zero_points: Option<String>,
}

fn store(g: &mut GraphProto, name: &str, q: &QuantizedMatrix) -> Stored {
    let s = q.scheme;
    let (rows, blocks) = (q.rows as i64, s.blocks(q.cols) as i64);
    let data = format!("{name}_Q{}", s.bits);
    g.initializer.push(TensorProto::from_u8(
        &data,
        &[rows, blocks, s.block_bytes() as i64],
        DataType::Uint8,
        q.data.clone(),
    ));
    let scales = format!("{name}_scales");
    g.initializer.push(TensorProto::from_f32(&scales, &[rows, blocks], &q.scales));
    let zero_points = q.zero_points.as_ref().map(|z| {
        let zn = format!("{name}_zero_points");
        let per_row = s.zero_point_bytes(q.cols) as i64;
        g.initializer.push(TensorProto::from_u8(&zn, &[rows, per_row], DataType::Uint8, z.clone()));
        zn
    });
    Stored { data, scales, zero_points }
}

/// Rewrites `node` (a MatMul, or a Gemm with transB) into `MatMulNBits` over `stored`.
fn to_matmul_nbits(node: &mut NodeProto, stored: &Stored, q: &QuantizedMatrix, accuracy_level: u8) {
    let s = q.scheme;
    let a = node.input[0].clone();
    node.op_type = "MatMulNBits".into();
    node.domain = MS_DOMAIN.into();
    node.input = vec![a, stored.data.clone(), stored.scales.clone()];
    if let Some(z) = &stored.zero_points {
        node.input.push(z.clone());
    }
    node.attribute = vec![
        Attr::int("K", q.cols as i64),
        Attr::int("N", q.rows as i64),
        Attr::int("bits", s.bits as i64),
        Attr::int("block_size", s.block_size as i64),
        Attr::int("accuracy_level", accuracy_level as i64),
    ];
}

/// Replaces the embedding `Gather` at `idx` with `GatherBlockQuantized` over `stored` (data
/// `[rows, blocks, block_bytes]`), then reshapes `[.., blocks, block_size]` back to `[.., K]`
/// (slicing off the padding of a partial last block). Returns the nodes to insert in its place.
fn to_gather_block_quantized(
    g: &mut GraphProto,
    node: &NodeProto,
    stored: &Stored,
    q: &QuantizedMatrix,
    shared: bool,
) -> Vec<NodeProto> {
    let s = q.scheme;
    let (rows, blocks) = (q.rows as i64, s.blocks(q.cols) as i64);
    let base = format!("{}/quantized", node.name);
    let ids = node.input[1].clone();
    let out = node.output[0].clone();
    let mut nodes = vec![];
    let mk = |op: &str, domain: &str, inputs: Vec<String>, output: String, attrs: Vec<Attr>| NodeProto {
        name: format!("{base}/{op}_{}", output.rsplit('/').next().unwrap_or("")),
        op_type: op.into(),
        domain: domain.into(),
        input: inputs,
        output: vec![output],
        attribute: attrs,
        ..Default::default()
    };
    // Scales: one per block on the new last axis. When the table is shared with MatMulNBits
    // (which wants [rows, blocks]) a Reshape that ONNX Runtime folds at load gives the view.
    let scales3 = format!("{base}/scales3");
    if shared {
        let shape3 = format!("{base}/scales_shape");
        g.initializer.push(TensorProto::from_i64(&shape3, &[3], &[rows, blocks, 1]));
        nodes.push(mk("Reshape", "", vec![stored.scales.clone(), shape3], scales3.clone(), vec![]));
    } else {
        let at = g.initializer.iter().position(|t| t.name == stored.scales).expect("scales were stored");
        g.initializer[at].dims = vec![rows, blocks, 1];
        g.initializer[at].name = scales3.clone();
    }
    let mut inputs = vec![stored.data.clone(), ids.clone(), scales3];
    if let Some(z) = &q.zero_points {
        // One zero point per block, unpacked (GatherBlockQuantized reads the low nibble at 4 bits).
        let per_row = s.zero_point_bytes(q.cols);
        let unpacked: Vec<u8> = (0..q.rows)
            .flat_map(|r| {
                (0..blocks as usize).map(move |b| {
                    let byte = z[r * per_row + b * s.bits as usize / 8];
                    if s.bits == 8 {
                        byte
                    } else if b % 2 == 0 {
                        byte & 0x0F
                    } else {
                        byte >> 4
                    }
                })
            })
            .collect();
        let zn = format!("{base}/zero_points3");
        g.initializer.push(TensorProto::from_u8(&zn, &[rows, blocks, 1], DataType::Uint8, unpacked));
        inputs.push(zn);
    }
    let blocked = format!("{base}/blocked");
    nodes.push(mk(
        "GatherBlockQuantized",
        MS_DOMAIN,
        inputs,
        blocked.clone(),
        vec![
            Attr::int("gather_axis", 0),
            Attr::int("quantize_axis", 2),
            Attr::int("block_size", s.block_size as i64),
            Attr::int("bits", s.bits as i64),
        ],
    ));
    let padded = blocks * s.block_size as i64;
    let width = format!("{base}/width");
    g.initializer.push(TensorProto::from_i64(&width, &[1], &[padded]));
    let ids_shape = format!("{base}/ids_shape");
    nodes.push(mk("Shape", "", vec![ids], ids_shape.clone(), vec![]));
    let out_shape = format!("{base}/out_shape");
    nodes.push(mk("Concat", "", vec![ids_shape, width], out_shape.clone(), vec![Attr::int("axis", 0)]));
    if padded == q.cols as i64 {
        nodes.push(mk("Reshape", "", vec![blocked, out_shape], out, vec![]));
    } else {
        let flat = format!("{base}/padded");
        nodes.push(mk("Reshape", "", vec![blocked, out_shape], flat.clone(), vec![]));
        let (start, end, axis) = (format!("{base}/start"), format!("{base}/end"), format!("{base}/axis"));
        g.initializer.push(TensorProto::from_i64(&start, &[1], &[0]));
        g.initializer.push(TensorProto::from_i64(&end, &[1], &[q.cols as i64]));
        g.initializer.push(TensorProto::from_i64(&axis, &[1], &[-1]));
        nodes.push(mk("Slice", "", vec![flat, start, end, axis], out, vec![]));
    }
    nodes
}

/// The rank of graph input `name`, when the graph declares it.
fn input_rank(g: &GraphProto, name: &str) -> Option<usize> {
    use crate::onnx::proto::type_proto::Value;
    let v = g.input.iter().find(|v| v.name == name)?;
    let Some(Value::TensorType(t)) = v.r#type.as_ref()?.value.as_ref() else { return None };
    Some(t.shape.as_ref()?.dim.len())
}

/// Replaces an embedding `Gather` over a table `[N, K]` whose int8 transpose `[K, N]` with
/// per-column scales `[1, N]` already serves a `DynamicQuantizeMatMul` (a tied LM head): the
/// rows are gathered as columns of that matrix and scaled, so the table is stored once. Needs
/// the rank of the ids (`rank`) for the transposes.
fn to_gather_columns(node: &NodeProto, q: &str, scales: &str, rank: usize) -> Vec<NodeProto> {
    let base = format!("{}/columns", node.name);
    let ids = node.input[1].clone();
    let mk = |op: &str, inputs: Vec<String>, output: String, attrs: Vec<Attr>| NodeProto {
        name: format!("{base}/{op}_{}", output.rsplit('/').next().unwrap_or("")),
        op_type: op.into(),
        input: inputs,
        output: vec![output],
        attribute: attrs,
        ..Default::default()
    };
    // [K, ids...] -> [ids..., K]
    let perm: Vec<i64> = (1..=rank as i64).chain([0]).collect();
    let (cols, floats, rows) = (format!("{base}/int8"), format!("{base}/float"), format!("{base}/rows"));
    let (sc, sct) = (format!("{base}/scales"), format!("{base}/scales_t"));
    vec![
        mk("Gather", vec![q.to_owned(), ids.clone()], cols.clone(), vec![Attr::int("axis", 1)]),
        mk("Cast", vec![cols], floats.clone(), vec![Attr::int("to", DataType::Float as i64)]),
        mk("Transpose", vec![floats], rows.clone(), vec![Attr::ints("perm", perm.clone())]),
        mk("Gather", vec![scales.to_owned(), ids], sc.clone(), vec![Attr::int("axis", 1)]),
        mk("Transpose", vec![sc], sct.clone(), vec![Attr::ints("perm", perm)]),
        mk("Mul", vec![rows, sct], node.output[0].clone(), vec![]),
    ]
}

/// Quantizes the weights of `model` in place.
pub fn quantize_model(model: &mut ModelProto, opts: &QuantizeOptions) -> Result<QuantizeSummary> {
    let g =
        model.graph.as_mut().ok_or_else(|| Error::Unsupported { what: "quantizing a model without a graph".into() })?;
    if opts.method == Method::StaticInt8 {
        return Err(Error::Unsupported {
            what: "static int8 needs calibration: use `quantize_bundle` (or `qdq::quantize_static`)".into(),
        });
    }
    let mut summary =
        QuantizeSummary { bytes_before: g.initializer.iter().map(tensor_bytes).sum(), ..Default::default() };
    if opts.method == Method::Fp16 {
        let s = super::fp16::to_fp16(model, &opts.keep_fp32)?;
        let g = model.graph.as_ref().expect("checked above");
        return Ok(QuantizeSummary {
            matmuls: s.initializers,
            kept: s.kept.iter().map(|n| format!("{n}: computes in fp32 as asked")).collect(),
            bytes_after: g.initializer.iter().map(tensor_bytes).sum(),
            ..summary
        });
    }
    if !(0..=4).contains(&opts.accuracy_level) {
        return Err(Error::Unsupported {
            what: format!("accuracy level {}: ONNX Runtime takes 0 to 4", opts.accuracy_level),
        });
    }
    // Every use of every initializer.
    let mut uses: HashMap<String, Vec<Use>> = HashMap::new();
    for (i, n) in g.node.iter().enumerate() {
        for (slot, input) in n.input.iter().enumerate() {
            uses.entry(input.clone()).or_default().push(classify(n, i, slot));
        }
    }
    let graph_inputs: Vec<String> = g.input.iter().map(|v| v.name.clone()).collect();
    let names: Vec<String> = g.initializer.iter().map(|t| t.name.clone()).collect();
    // Replacement nodes for embedding Gathers, spliced in at the end so indices stay valid.
    let mut splices: Vec<(usize, Vec<NodeProto>)> = vec![];
    let mut removed: Vec<String> = vec![];
    for name in names {
        let Some(u) = uses.get(&name).cloned() else { continue };
        if graph_inputs.contains(&name) || u.contains(&Use::Other) {
            continue;
        }
        let matmuls: Vec<usize> =
            u.iter().filter_map(|x| if let Use::MatMul(i) = x { Some(*i) } else { None }).collect();
        let gemms: Vec<usize> =
            u.iter().filter_map(|x| if let Use::GemmTransB(i) = x { Some(*i) } else { None }).collect();
        let gathers: Vec<usize> =
            u.iter().filter_map(|x| if let Use::Gather(i) = x { Some(*i) } else { None }).collect();
        let transposed_reader = !gemms.is_empty() || !gathers.is_empty();
        if !matmuls.is_empty() && transposed_reader {
            continue; // read both ways round: leave it.
        }
        let t = g.initializer.iter().find(|t| t.name == name).expect("listed above");
        let Some((r, c, values)) = f32_matrix(t) else { continue };
        let node_names: Vec<&str> = u
            .iter()
            .filter_map(|x| match x {
                Use::MatMul(i) | Use::GemmTransB(i) | Use::Gather(i) => Some(g.node[*i].name.as_str()),
                Use::Other => None,
            })
            .collect();
        if let Some(k) = opts
            .keep_fp32
            .iter()
            .find(|k| name.contains(k.as_str()) || node_names.iter().any(|n| n.contains(k.as_str())))
        {
            summary.kept.push(format!("{name}: kept in fp32 as asked (`{k}`)"));
            continue;
        }
        // An embedding left in fp32 keeps its table, also when a tied head is quantized.
        let fp32_reader = !gathers.is_empty() && !opts.embedding;
        let gathers = if opts.embedding { gathers } else { vec![] };
        if matmuls.is_empty() && gemms.is_empty() && gathers.is_empty() {
            continue;
        }
        if fp32_reader {
            summary.kept.push(format!("{name}: embedding kept in fp32 as asked"));
        }
        let blockwise_here = opts.blockwise.iter().any(|p| name.contains(p.as_str()));
        if opts.method == Method::DynamicInt8 && !blockwise_here && !(matmuls.is_empty() && gemms.is_empty()) {
            // [K, N] int8 with per-column scales; a table also gathered keeps a block copy.
            let (k, n, w_kn) =
                if matmuls.is_empty() { (c, r, transpose(&values, r, c)) } else { (r, c, values.clone()) };
            let (q, scales) = quantize_per_column(&w_kn, k, n, if opts.full_range_int8 { 127 } else { 63 });
            let (qn, sn) = (format!("{name}_Qint8"), format!("{name}_col_scales"));
            let bytes: Vec<u8> = q.iter().map(|v| *v as u8).collect();
            g.initializer.push(TensorProto::from_u8(&qn, &[k as i64, n as i64], DataType::Int8, bytes));
            // [1, N]: ONNX Runtime reads a 1-D scale differently (not per column).
            g.initializer.push(TensorProto::from_f32(&sn, &[1, n as i64], &scales));
            for &i in matmuls.iter().chain(&gemms) {
                let node = &mut g.node[i];
                let a = node.input[0].clone();
                node.op_type = "DynamicQuantizeMatMul".into();
                node.domain = MS_DOMAIN.into();
                node.input = vec![a, qn.clone(), sn.clone()];
                node.attribute.clear();
            }
            summary.matmuls += 1;
            let ranks: Vec<Option<usize>> = gathers.iter().map(|&i| input_rank(g, &g.node[i].input[1])).collect();
            if !gathers.is_empty() && !gemms.is_empty() && ranks.iter().all(Option::is_some) {
                // A tied table: the Gathers read the head's int8 columns.
                for (&i, rank) in gathers.iter().zip(ranks) {
                    let node = g.node[i].clone();
                    splices.push((i, to_gather_columns(&node, &qn, &sn, rank.expect("checked"))));
                }
                summary.embeddings += 1;
                summary.shared_embedding_head = true;
            } else if !gathers.is_empty() {
                let tq = quantize(&values, r, c, opts.embedding_scheme.unwrap_or(opts.scheme));
                summary.embedding_table = summary.embedding_table.or(opts.embedding_scheme);
                let stored = store(g, &format!("{name}_table"), &tq);
                for &i in &gathers {
                    let node = g.node[i].clone();
                    splices.push((i, to_gather_block_quantized(g, &node, &stored, &tq, false)));
                }
                summary.embeddings += 1;
            }
            if !fp32_reader {
                removed.push(name);
            }
            continue;
        }
        // [N, K]: one row per output (or per table entry), quantized along K.
        let (rows, cols, w) = if matmuls.is_empty() { (r, c, values) } else { (c, r, transpose(&values, r, c)) };
        // A table only gathered from may take its own scheme; one a matmul also reads cannot.
        let table_only = matmuls.is_empty() && gemms.is_empty();
        let scheme = if table_only { opts.embedding_scheme.unwrap_or(opts.scheme) } else { opts.scheme };
        if table_only && !gathers.is_empty() {
            summary.embedding_table = summary.embedding_table.or(opts.embedding_scheme);
        }
        let q = quantize(&w, rows, cols, scheme);
        let stored = store(g, &name, &q);
        for &i in matmuls.iter().chain(&gemms) {
            to_matmul_nbits(&mut g.node[i], &stored, &q, opts.accuracy_level);
        }
        summary.matmuls += usize::from(!matmuls.is_empty() || !gemms.is_empty());
        let shared = !gemms.is_empty();
        for &i in &gathers {
            let node = g.node[i].clone();
            splices.push((i, to_gather_block_quantized(g, &node, &stored, &q, shared)));
        }
        if !gathers.is_empty() {
            summary.embeddings += 1;
            summary.shared_embedding_head |= shared;
        }
        if !fp32_reader {
            removed.push(name);
        }
    }
    g.initializer.retain(|t| !removed.contains(&t.name));
    splices.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
    for (i, nodes) in splices {
        g.node.splice(i..=i, nodes);
    }
    if !model.opset_import.iter().any(|o| o.domain == MS_DOMAIN) {
        model.opset_import.push(crate::onnx::proto::OperatorSetIdProto { domain: MS_DOMAIN.into(), version: 1 });
    }
    let g = model.graph.as_ref().expect("checked above");
    summary.bytes_after = g.initializer.iter().map(tensor_bytes).sum();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use ort::session::Session;
    use ort::value::Tensor;

    use super::*;
    use crate::onnx::{Dim, GraphBuilder};

    const K: usize = 80; // not a multiple of 32 or 64: the last block is padded
    const N: usize = 24;
    const V: usize = 40;

    fn weights(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                (((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 9) as f32 / 8_388_608.0 - 0.5) * 0.8
            })
            .collect()
    }

    /// `y = x W` (`W [K, N]`), a tied table read by `Gather` and by `Gemm(transB)`, and an
    /// untied table read by `Gather` only.
    fn model(w: &[f32], tied: &[f32], untied: &[f32]) -> ModelProto {
        let mut g = GraphBuilder::new("test");
        let d = |v: usize| Dim::Fixed(v as i64);
        g.input("x", DataType::Float, &[d(2), d(K)]);
        g.input("ids", DataType::Int64, &[d(3)]);
        g.output("y", DataType::Float, &[d(2), d(N)]);
        g.output("logits", DataType::Float, &[d(2), d(V)]);
        g.output("e", DataType::Float, &[d(3), d(K)]);
        g.output("e2", DataType::Float, &[d(3), d(K)]);
        let w = g.init_f32("w", &[K, N], w);
        let t = g.init_f32("tied", &[V, K], tied);
        let u = g.init_f32("untied", &[V, K], untied);
        g.node_named("MatMul", "", &["x", &w], &["y"], vec![]);
        g.node_named("Gemm", "", &["x", &t], &["logits"], vec![Attr::int("transB", 1)]);
        g.set_scope("/embed");
        g.node_named("Gather", "", &[&t, "ids"], &["e"], vec![Attr::int("axis", 0)]);
        g.node_named("Gather", "", &[&u, "ids"], &["e2"], vec![Attr::int("axis", 0)]);
        g.finish(21, None, "test")
    }

    fn run(m: &ModelProto, x: &[f32], ids: &[i64]) -> Vec<Vec<f32>> {
        use prost::Message;
        let env = edgelm_runtime::ortlib::init(None).expect("ONNX Runtime (EDGELM_ORT_LIB)");
        let mut s = Session::builder(env).unwrap().commit_from_memory(&m.encode_to_vec()).unwrap();
        let out = s
            .run(ort::inputs![
                "x" => Tensor::from_array(([2usize, K], x.to_vec())).unwrap(),
                "ids" => Tensor::from_array(([3usize], ids.to_vec())).unwrap(),
            ])
            .unwrap();
        ["y", "logits", "e", "e2"].iter().map(|n| out[*n].try_extract_tensor::<f32>().unwrap().1.to_vec()).collect()
    }

    fn matmul_t(x: &[f32], w_nk: &[f32], rows: usize) -> Vec<f32> {
        (0..2).flat_map(|i| (0..rows).map(move |r| (0..K).map(|k| x[i * K + k] * w_nk[r * K + k]).sum())).collect()
    }

    /// The rewritten graph in ONNX Runtime (fp32 compute) gives exactly what our dequantized
    /// weights give: the packed layout, scales, zero points, padding and the shared table.
    #[test]
    fn onnx_runtime_reads_the_packed_layout_as_we_wrote_it() {
        let (w, tied, untied) = (weights(K * N, 1), weights(V * K, 2), weights(V * K, 3));
        let x = weights(2 * K, 4);
        let ids = [0i64, 17, 39];
        for bits in [4u8, 8] {
            for symmetric in [true, false] {
                for block in [16usize, 32, 64] {
                    let scheme = BlockScheme::new(bits, block, symmetric).unwrap();
                    let opts = QuantizeOptions {
                        method: Method::Blockwise,
                        full_range_int8: false,
                        scheme,
                        accuracy_level: 1,
                        embedding: true,
                        embedding_scheme: None,
                        keep_fp32: vec![],
                        blockwise: vec![],
                        range: default_range(),
                        smooth: None,
                        calibration: vec![],
                    };
                    let mut m = model(&w, &tied, &untied);
                    let s = quantize_model(&mut m, &opts).unwrap();
                    assert_eq!((s.matmuls, s.embeddings, s.shared_embedding_head), (2, 2, true));
                    let inits = &m.graph.as_ref().unwrap().initializer;
                    assert!(
                        inits.iter().all(|t| t.data_type != Some(DataType::Float as i32)
                            || t.dims.len() != 2
                            || t.dims[1] == 1
                            || t.name.ends_with("_scales")),
                        "an fp32 matrix is left"
                    );
                    assert_eq!(
                        inits.iter().filter(|t| t.name.starts_with("tied_Q")).count(),
                        1,
                        "the tied table is stored once"
                    );
                    let got = run(&m, &x, &ids);
                    let wq = quantize(&transpose(&w, K, N), N, K, scheme).dequantize();
                    let tq = quantize(&tied, V, K, scheme).dequantize();
                    let uq = quantize(&untied, V, K, scheme).dequantize();
                    let rows = |t: &[f32]| {
                        ids.iter().flat_map(|&i| t[i as usize * K..(i as usize + 1) * K].to_vec()).collect::<Vec<_>>()
                    };
                    let want = [matmul_t(&x, &wq, N), matmul_t(&x, &tq, V), rows(&tq), rows(&uq)];
                    for (name, (g, e)) in ["y", "logits", "e", "e2"].iter().zip(got.iter().zip(&want)) {
                        let diff = g.iter().zip(e).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                        assert!(
                            diff < 1e-5,
                            "{bits}-bit block {block} symmetric {symmetric}: {name} differs by {diff}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_kept_embedding_keeps_its_table_for_a_quantized_tied_head() {
        let (w, tied, untied) = (weights(K * N, 1), weights(V * K, 2), weights(V * K, 3));
        let mut opts = QuantizeOptions::for_bits(4).unwrap();
        opts.embedding = false;
        opts.keep_fp32 = vec!["untied".into()];
        let mut m = model(&w, &tied, &untied);
        let s = quantize_model(&mut m, &opts).unwrap();
        assert_eq!((s.matmuls, s.embeddings), (2, 0));
        assert!(
            s.kept.iter().any(|k| k.starts_with("untied:")) && s.kept.iter().any(|k| k.starts_with("tied:")),
            "{:?}",
            s.kept
        );
        let got = run(&m, &weights(2 * K, 4), &[1, 2, 3]);
        assert_eq!(got[2], tied[K..4 * K].to_vec(), "the fp32 embedding is read as it was");
    }

    /// Dynamic int8: every matrix on DynamicQuantizeMatMul with per-column scales, within the
    /// error of 8-bit activations of the fp32 result; embeddings block-quantized apart.
    #[test]
    fn dynamic_int8_runs_and_stays_close() {
        let (w, tied, untied) = (weights(K * N, 1), weights(V * K, 2), weights(V * K, 3));
        let x = weights(2 * K, 4);
        let mut opts = QuantizeOptions::for_bits(8).unwrap();
        opts.method = Method::DynamicInt8;
        let mut m = model(&w, &tied, &untied);
        let s = quantize_model(&mut m, &opts).unwrap();
        assert_eq!((s.matmuls, s.embeddings, s.shared_embedding_head), (2, 2, true));
        let ops: Vec<&str> = m.graph.as_ref().unwrap().node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops.iter().filter(|o| **o == "DynamicQuantizeMatMul").count(), 2, "{ops:?}");
        assert!(!m.graph.as_ref().unwrap().initializer.iter().any(|t| t.name.starts_with("tied_table")), "stored once");
        let got = run(&m, &x, &[0, 17, 39]);
        // The tied rows come from the head's int8 columns: within a 7-bit step of fp32.
        let col_max: Vec<f32> =
            (0..V).map(|v| tied[v * K..(v + 1) * K].iter().fold(0f32, |m, x| m.max(x.abs()))).collect();
        for (j, &id) in [0usize, 17, 39].iter().enumerate() {
            for k in 0..K {
                let (g, e) = (got[2][j * K + k], tied[id * K + k]);
                assert!((g - e).abs() <= 0.51 * col_max[id] / 63.0 + 1e-6, "row {id} col {k}: {g} vs {e}");
            }
        }
        // A weight named for block-wise goes to MatMulNBits (sharing its table with the Gather).
        opts.blockwise = vec!["tied".into()];
        let mut mixed = model(&w, &tied, &untied);
        let s = quantize_model(&mut mixed, &opts).unwrap();
        assert!(s.shared_embedding_head);
        let ops: Vec<&str> = mixed.graph.as_ref().unwrap().node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops.iter().filter(|o| **o == "DynamicQuantizeMatMul" || **o == "MatMulNBits").count(), 2, "{ops:?}");
        assert!(ops.contains(&"MatMulNBits") && ops.contains(&"DynamicQuantizeMatMul"), "{ops:?}");
        let mixed_got = run(&mixed, &x, &[0, 17, 39]);
        let want = [matmul_t(&x, &transpose(&w, K, N), N), matmul_t(&x, &tied, V)];
        for (g, e) in mixed_got.iter().zip(&want) {
            let scale = e.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(g.iter().zip(e).all(|(a, b)| (a - b).abs() < 0.02 * scale));
        }
        for (g, e) in got.iter().zip(&want) {
            let scale = e.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = g.iter().zip(e).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 0.02 * scale, "{diff} vs {scale}: {:?} vs {:?}", &g[..4], &e[..4]);
        }
    }

    /// A table only gathered from takes `embedding_scheme` (here 4-bit, asymmetric, blocks of
    /// 16 under 8-bit matrices) and ONNX Runtime reads it as we dequantize it; a table a matmul
    /// also reads keeps the matrices' scheme.
    #[test]
    fn an_untied_table_takes_the_embedding_scheme() {
        let (w, tied, untied) = (weights(K * N, 1), weights(V * K, 2), weights(V * K, 3));
        for method in [Method::Blockwise, Method::DynamicInt8] {
            let mut opts = QuantizeOptions::for_bits(8).unwrap();
            opts.method = method;
            opts.accuracy_level = 1;
            let table = BlockScheme::new(4, 16, false).unwrap();
            opts.embedding_scheme = Some(table);
            let mut m = model(&w, &tied, &untied);
            let s = quantize_model(&mut m, &opts).unwrap();
            assert_eq!(s.embedding_table, Some(table), "{method:?}");
            let bits: Vec<(String, i64)> = m
                .graph
                .as_ref()
                .unwrap()
                .node
                .iter()
                .filter(|n| n.op_type == "GatherBlockQuantized")
                .map(|n| {
                    (n.input[0].clone(), n.attribute.iter().find(|a| a.name == "bits").and_then(|a| a.i).unwrap_or(4))
                })
                .collect();
            assert!(bits.iter().any(|(t, b)| t.starts_with("untied") && *b == 4), "{method:?}: {bits:?}");
            let got = run(&m, &weights(2 * K, 4), &[0, 17, 39]);
            let uq = quantize(&untied, V, K, table).dequantize();
            let want: Vec<f32> = [0usize, 17, 39].iter().flat_map(|&i| uq[i * K..(i + 1) * K].to_vec()).collect();
            let diff = got[3].iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-5, "{method:?}: the 4-bit table differs by {diff}");
        }
        // Without a separate scheme nothing is recorded.
        let mut m = model(&w, &tied, &untied);
        assert_eq!(quantize_model(&mut m, &QuantizeOptions::for_bits(8).unwrap()).unwrap().embedding_table, None);
    }
}
