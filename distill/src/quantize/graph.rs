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
use edgelm_kernels::bytes::transpose;

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

/// Whether ONNX Runtime on this machine sums uint8 activations times full-range (8-bit) int8
/// weights exactly. On x86 that takes VNNI (AVX-512 VNNI or AVX-VNNI), whose dot products add
/// into 32 bits; plain AVX2 adds each pair of products in 16 bits, saturating. ARM widens too.
/// A bundle for another board may still want the full range; this says what a check here sees.
pub fn host_sums_full_range_exactly() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512vnni") || std::arch::is_x86_feature_detected!("avxvnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        true
    }
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
    /// Bits, block size and symmetry of the token table when only `Gather`s read it (an untied
    /// embedding, an encoder's word table: the table the graph input `input_ids` indexes, or
    /// every table only Gathers read in a graph without one), when not `scheme`'s: e.g. 4-bit
    /// word embeddings under 8-bit matrices, the largest table of an encoder like MiniLM.
    /// Position and token-type tables keep `scheme`.
    #[serde(default)]
    pub embedding_scheme: Option<BlockScheme>,
    /// With `embedding_scheme`: token ids whose rows of the token table stay in `scheme` while
    /// the rest of the table takes `embedding_scheme`. Given the tokens a calibration text uses
    /// most ([`hot_rows`]), common words keep 8 bits and the long tail of the vocabulary is
    /// stored in 4. Empty: the whole table takes `embedding_scheme`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hot_rows: Vec<u32>,
    /// How many `hot_rows` the bundle quantizer picks from `calibration` (the token ids its
    /// texts use most) when `hot_rows` is empty; 0 picks none.
    #[serde(default)]
    pub hot_row_count: usize,
    /// Weights to keep in fp32: a node or initializer whose name contains one of these.
    pub keep_fp32: Vec<String>,
    /// With `DynamicInt8` or `StaticInt8`: weights whose name contains one of these use the block-wise scheme
    /// instead (the few layers whose activations have outliers, e.g. an encoder's FFN output).
    #[serde(default)]
    pub blockwise: Vec<String>,
    /// With `StaticInt8`: write the portable QDQ form (`DequantizeLinear` before `MatMul`, for
    /// runtimes such as TensorRT that read QDQ) instead of ONNX Runtime's integer matmul
    /// (`MatMulIntegerToFloat` with the bias inside), which its CPU kernels run fastest.
    #[serde(default)]
    pub qdq: bool,
    /// With `StaticInt8`: how activation ranges are chosen.
    #[serde(default = "default_range")]
    pub range: super::RangeMethod,
    /// With `StaticInt8`: move activation outliers into the weights first with this strength
    /// (0 to 1; see [`super::qdq::smooth`]).
    #[serde(default)]
    pub smooth: Option<f32>,
    /// With `StaticInt8`: the texts the fp32 graph is calibrated on; with `hot_row_count`, the
    /// texts whose tokens pick the hot rows.
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
            hot_rows: vec![],
            hot_row_count: 0,
            keep_fp32: vec![],
            blockwise: vec![],
            qdq: false,
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
    /// Of `embeddings`, the tables stored in blocks (`GatherBlockQuantized`); the others are
    /// read from a tied head's per-column int8 weights.
    #[serde(default)]
    pub block_tables: usize,
    /// The scheme of tables only gathered from, when they took `embedding_scheme`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_table: Option<BlockScheme>,
    /// Rows of the token table kept in the matrices' scheme (`QuantizeOptions::hot_rows`).
    #[serde(default)]
    pub hot_rows: usize,
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
    if t.dims.len() != 2 {
        return None;
    }
    let (r, c) = (usize::try_from(t.dims[0]).ok()?, usize::try_from(t.dims[1]).ok()?);
    let values = f32_values(t)?;
    (values.len() == r * c && r > 0 && c > 0).then_some((r, c, values))
}

/// An fp32 initializer's values, when they are in the file (not external data).
pub(super) fn f32_values(t: &TensorProto) -> Option<Vec<f32>> {
    if t.data_type != Some(DataType::Float as i32) || !t.external_data.is_empty() {
        return None;
    }
    Some(if t.raw_data.is_empty() {
        t.float_data.clone()
    } else {
        edgelm_kernels::bytes::f32_from_le_bytes(&t.raw_data)
    })
}

pub(super) fn tensor_bytes(t: &TensorProto) -> usize {
    crate::onnx::external::stored_bytes(t) + 4 * t.float_data.len() + 8 * t.int64_data.len() + 4 * t.int32_data.len()
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
    let scales3 = if shared {
        let (shape3, scales3) = (format!("{base}/scales_shape"), format!("{base}/scales3"));
        g.initializer.push(TensorProto::from_i64(&shape3, &[3], &[rows, blocks, 1]));
        nodes.push(mk("Reshape", "", vec![stored.scales.clone(), shape3], scales3.clone(), vec![]));
        scales3
    } else {
        // Only Gathers read it: stored in the shape they want (every Gather of the table).
        let at = g.initializer.iter().position(|t| t.name == stored.scales).expect("scales were stored");
        g.initializer[at].dims = vec![rows, blocks, 1];
        stored.scales.clone()
    };
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

/// `count` token ids of a vocabulary of `vocab`: those used most in `ids` (a tokenized
/// calibration text), most used first, ties to the lower id; when the text used fewer, the
/// lowest ids it did not use fill the rest (tokenizers number common tokens first: BPE merges
/// in the order they were learnt, WordPiece vocabularies by frequency).
pub fn hot_rows(ids: impl IntoIterator<Item = u32>, vocab: usize, count: usize) -> Vec<u32> {
    let mut seen: HashMap<u32, usize> = HashMap::new();
    for id in ids.into_iter().filter(|&id| (id as usize) < vocab) {
        *seen.entry(id).or_default() += 1;
    }
    let mut ranked: Vec<(u32, usize)> = seen.into_iter().collect();
    ranked.sort_by_key(|&(id, n)| (std::cmp::Reverse(n), id));
    let mut hot: Vec<u32> = ranked.into_iter().take(count).map(|(id, _)| id).collect();
    let used: std::collections::HashSet<u32> = hot.iter().copied().collect();
    let fill = count.min(vocab).saturating_sub(hot.len());
    hot.extend((0..vocab as u32).filter(|id| !used.contains(id)).take(fill));
    hot
}

/// A token table `[rows, cols]` split in two: the `hot_ids` rows (distinct, in range) quantized
/// with `hot_scheme`, the others with `cold_scheme`. Each Gather of it becomes: the token's place in its part (an
/// int32 table), both parts gathered with the place clamped into their range, and `Where` on a
/// `[rows, 1]` bool table picking the part the token is in. Returns the replacement nodes of
/// each Gather in `gathers`.
#[allow(clippy::too_many_arguments)]
fn split_table(
    g: &mut GraphProto,
    name: &str,
    w: &[f32],
    (rows, cols): (usize, usize),
    hot_ids: &[usize],
    hot_scheme: BlockScheme,
    cold_scheme: BlockScheme,
    gathers: &[usize],
) -> Vec<(usize, Vec<NodeProto>)> {
    let mut is_hot = vec![false; rows];
    hot_ids.iter().for_each(|&r| is_hot[r] = true);
    let cold_ids: Vec<usize> = (0..rows).filter(|&r| !is_hot[r]).collect();
    // Hot rows first, then cold ones: a token's place less the hot count is its cold row.
    let mut place = vec![0i32; rows];
    for (i, &r) in hot_ids.iter().chain(&cold_ids).enumerate() {
        place[r] = i as i32;
    }
    let part = |ids: &[usize]| -> Vec<f32> { ids.iter().flat_map(|&r| w[r * cols..(r + 1) * cols].to_vec()).collect() };
    let q_hot = quantize(&part(hot_ids), hot_ids.len(), cols, hot_scheme);
    let q_cold = quantize(&part(&cold_ids), cold_ids.len(), cols, cold_scheme);
    let stored_hot = store(g, &format!("{name}_hot"), &q_hot);
    let stored_cold = store(g, &format!("{name}_cold"), &q_cold);
    let (place_t, hot_t) = (format!("{name}_place"), format!("{name}_is_hot"));
    g.initializer.push(TensorProto::from_i32(&place_t, &[rows as i64], &place));
    let mask: Vec<u8> = is_hot.iter().map(|&h| u8::from(h)).collect();
    g.initializer.push(TensorProto::from_u8(&hot_t, &[rows as i64, 1], DataType::Bool, mask));
    let (last_hot, n_hot, zero) = (format!("{name}_last_hot"), format!("{name}_hot_count"), format!("{name}_zero"));
    g.initializer.push(TensorProto::from_i32(&last_hot, &[], &[hot_ids.len() as i32 - 1]));
    g.initializer.push(TensorProto::from_i32(&n_hot, &[], &[hot_ids.len() as i32]));
    g.initializer.push(TensorProto::from_i32(&zero, &[], &[0]));
    let mut out = vec![];
    for &i in gathers {
        let node = g.node[i].clone();
        // Named after the Gather's output, which is unique where node names need not be.
        let base = format!("{}/split", node.output[0]);
        let ids = node.input[1].clone();
        let mk = |op: &str, inputs: Vec<String>, output: &str| NodeProto {
            name: format!("{base}/{op}_{output}"),
            op_type: op.into(),
            input: inputs,
            output: vec![format!("{base}/{output}")],
            ..Default::default()
        };
        let o = |s: &str| format!("{base}/{s}");
        let mut nodes = vec![
            NodeProto {
                attribute: vec![Attr::int("axis", 0)],
                ..mk("Gather", vec![place_t.clone(), ids.clone()], "place")
            },
            mk("Min", vec![o("place"), last_hot.clone()], "hot_place"),
            mk("Sub", vec![o("place"), n_hot.clone()], "cold_offset"),
            mk("Max", vec![o("cold_offset"), zero.clone()], "cold_place"),
            NodeProto { attribute: vec![Attr::int("axis", 0)], ..mk("Gather", vec![hot_t.clone(), ids], "is_hot") },
        ];
        for (which, stored, q) in [("hot", &stored_hot, &q_hot), ("cold", &stored_cold, &q_cold)] {
            let part_node = NodeProto {
                name: o(which),
                input: vec![stored.data.clone(), o(&format!("{which}_place"))],
                output: vec![o(&format!("{which}_rows"))],
                ..node.clone()
            };
            nodes.extend(to_gather_block_quantized(g, &part_node, stored, q, false));
        }
        nodes.push(NodeProto {
            output: vec![node.output[0].clone()],
            ..mk("Where", vec![o("is_hot"), o("hot_rows"), o("cold_rows")], "rows")
        });
        out.push((i, nodes));
    }
    out
}

/// Moves the bias of `Add(matmul, bias)` into the CPU integer matmuls that take one
/// (`DynamicQuantizeMatMul`, `MatMulIntegerToFloat`): one node less per matrix, which short
/// inputs (a sentence) feel. The bias must be a 1-D fp32 initializer as long as the matmul's
/// output row, and the Add the matmul's only reader. `MatMulNBits` keeps its Add: ONNX
/// Runtime's CUDA kernel refuses a bias input, and its bundles go to GPU boards too.
/// Returns how many were folded.
pub(super) fn fold_biases(g: &mut GraphProto) -> usize {
    let slot = |n: &NodeProto| match (n.domain.as_str(), n.op_type.as_str()) {
        (MS_DOMAIN, "DynamicQuantizeMatMul") => Some(4),
        (MS_DOMAIN, "MatMulIntegerToFloat") => Some(6),
        _ => None,
    };
    let init = |name: &str| g.initializer.iter().find(|t| t.name == name);
    // The output width of each candidate: B is [K, N].
    let width =
        |n: &NodeProto| -> Option<i64> { init(n.input.get(1)?).filter(|t| t.dims.len() == 2).map(|t| t.dims[1]) };
    let mut readers: HashMap<&str, usize> = HashMap::new();
    for n in &g.node {
        for i in &n.input {
            *readers.entry(i.as_str()).or_default() += 1;
        }
    }
    let outputs: std::collections::HashSet<&str> = g.output.iter().map(|v| v.name.as_str()).collect();
    let mut folds: Vec<(usize, usize, String)> = vec![]; // (matmul, add, bias)
    let by_input: HashMap<&str, usize> = g
        .node
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op_type == "Add" && (n.domain.is_empty() || n.domain == "ai.onnx") && n.input.len() == 2)
        .flat_map(|(i, n)| n.input.iter().map(move |x| (x.as_str(), i)))
        .collect();
    for (i, n) in g.node.iter().enumerate() {
        let (Some(s), Some(width)) = (slot(n), width(n)) else { continue };
        let out = n.output[0].as_str();
        if n.input.get(s).is_some_and(|b| !b.is_empty()) || readers.get(out) != Some(&1) || outputs.contains(out) {
            continue;
        }
        let Some(&a) = by_input.get(out) else { continue };
        let add = &g.node[a];
        let bias = if add.input[0] == out { &add.input[1] } else { &add.input[0] };
        let fits = init(bias).is_some_and(|t| t.dims == [width] && t.data_type == Some(DataType::Float as i32));
        if fits && add.input[0] != add.input[1] {
            folds.push((i, a, bias.clone()));
        }
    }
    let mut gone = std::collections::HashSet::new();
    for (i, a, bias) in &folds {
        let s = slot(&g.node[*i]).expect("a candidate");
        let sum = g.node[*a].output[0].clone();
        let n = &mut g.node[*i];
        n.input.resize(s, String::new());
        n.input.push(bias.clone());
        n.output[0] = sum;
        gone.insert(*a);
    }
    let mut at = 0;
    g.node.retain(|_| {
        at += 1;
        !gone.contains(&(at - 1))
    });
    folds.len()
}

/// Declares the `com.microsoft` operator set the rewritten nodes come from, once.
pub(super) fn import_ms_domain(model: &mut ModelProto) {
    if !model.opset_import.iter().any(|o| o.domain == MS_DOMAIN) {
        model.opset_import.push(crate::onnx::proto::OperatorSetIdProto { domain: MS_DOMAIN.into(), version: 1 });
    }
}

/// The distinct rows of `hot` inside a table of `rows`, in `hot`'s order.
fn distinct_rows(hot: &[u32], rows: usize) -> Vec<usize> {
    let mut seen = vec![false; rows];
    hot.iter().map(|&id| id as usize).filter(|&r| r < rows && !std::mem::replace(&mut seen[r], true)).collect()
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
    quantize_model_in(model, opts, None)
}

/// [`quantize_model`] of a model whose weights may be in data files in `weights_dir` (external
/// data): each is read when its turn comes, so the fp32 weights are never all in memory (but
/// for fp16, which reads them all in first); those left in fp32 are read in at the end, and
/// the model comes back whole.
pub fn quantize_model_in(
    model: &mut ModelProto,
    opts: &QuantizeOptions,
    weights_dir: Option<&std::path::Path>,
) -> Result<QuantizeSummary> {
    quantize_external(model, opts, weights_dir, false)
}

/// [`quantize_model_in`] of a graph whose weights a deferred export spilled to `dir` in the
/// 16-bit type they were stored in: each is read as the f32 it stands for, and counted so in
/// the summary. What is not quantized stays 16-bit; [`crate::onnx::external::widen_to_f32`]
/// makes it f32.
pub fn quantize_spilled(
    model: &mut ModelProto,
    opts: &QuantizeOptions,
    dir: &std::path::Path,
) -> Result<QuantizeSummary> {
    use crate::onnx::external::{is_external, stored_bytes};
    let half = [DataType::Float16 as i32, DataType::Bfloat16 as i32];
    let spilled_half: usize = model
        .graph
        .iter()
        .flat_map(|g| &g.initializer)
        .filter(|t| is_external(t) && t.data_type.is_some_and(|d| half.contains(&d)))
        .map(stored_bytes)
        .sum();
    let mut summary = quantize_external(model, opts, Some(dir), true)?;
    // Two bytes a value on disk, four in the fp32 model they stand for: before, and after for
    // what stays unquantized (read back in, still 16-bit until widened).
    summary.bytes_before += spilled_half;
    summary.bytes_after += model
        .graph
        .iter()
        .flat_map(|g| &g.initializer)
        .filter(|t| t.data_type.is_some_and(|d| half.contains(&d)))
        .map(stored_bytes)
        .sum::<usize>();
    Ok(summary)
}

fn quantize_external(
    model: &mut ModelProto,
    opts: &QuantizeOptions,
    weights_dir: Option<&std::path::Path>,
    spilled: bool,
) -> Result<QuantizeSummary> {
    use crate::onnx::external::{internalize, is_external, widened, DataFiles};
    let external = model.graph.iter().flat_map(|g| &g.initializer).any(is_external);
    let weights = match weights_dir {
        Some(dir) if external => Some(dir),
        None if external => {
            return Err(Error::Unsupported { what: "quantizing a model whose weights are not read in".into() })
        }
        _ => None,
    };
    // fp16 rewrites every float initializer: all read in first.
    if let (Some(dir), Method::Fp16) = (weights, opts.method) {
        internalize(model, dir)?;
    }
    let mut files = DataFiles::default();
    let summary = quantize_loaded(model, opts, &mut |t: &TensorProto| match weights {
        Some(dir) if is_external(t) => files.loaded(t, dir).map(|t| Some(if spilled { widened(t) } else { t })),
        _ => Ok(None),
    })?;
    // What stayed in fp32 comes back into the model (nothing, where no tensor is apart).
    if let Some(dir) = weights {
        internalize(model, dir)?;
    }
    Ok(summary)
}

/// The quantization itself; `load` gives an externally stored tensor with its bytes read in
/// (`None`: the tensor holds its bytes).
fn quantize_loaded(
    model: &mut ModelProto,
    opts: &QuantizeOptions,
    load: &mut dyn FnMut(&TensorProto) -> Result<Option<TensorProto>>,
) -> Result<QuantizeSummary> {
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
        // Norms over attention heads (Qwen3) square values an fp16 holds only up to 256.
        let mut keep = opts.keep_fp32.clone();
        keep.extend(crate::export::HEAD_NORM_SCOPES.iter().map(|s| s.to_string()));
        let s = super::fp16::to_fp16(model, &keep)?;
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
    // The token table: what a Gather indexes with the graph's `input_ids`. A graph without one
    // (another exporter's names) gives every table only Gathers read the embedding scheme.
    let token_tables: Vec<String> = g
        .node
        .iter()
        .filter(|n| n.op_type == "Gather" && n.input.get(1).is_some_and(|i| i == "input_ids"))
        .map(|n| n.input[0].clone())
        .collect();
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
        let Some((r, c, values)) = (match load(t)? {
            Some(loaded) => f32_matrix(&loaded),
            None => f32_matrix(t),
        }) else {
            continue;
        };
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
                summary.block_tables += 1;
            }
            if !fp32_reader {
                removed.push(name);
            }
            continue;
        }
        // [N, K]: one row per output (or per table entry), quantized along K.
        let (rows, cols, w) = if matmuls.is_empty() { (r, c, values) } else { (c, r, transpose(&values, r, c)) };
        // The token table may take its own scheme when only Gathers read it (one a matmul also
        // reads cannot).
        let only_gathered = matmuls.is_empty() && gemms.is_empty() && !gathers.is_empty();
        let token_table = token_tables.contains(&name);
        // Hot rows are token ids: only the token table has them, and when every row is hot the
        // whole table keeps the matrices' scheme.
        let hot_ids = if only_gathered && token_table && opts.embedding_scheme.is_some() {
            distinct_rows(&opts.hot_rows, rows)
        } else {
            vec![]
        };
        let hot = hot_ids.len();
        let own_scheme = only_gathered && (token_table || token_tables.is_empty()) && hot < rows;
        let scheme = if own_scheme { opts.embedding_scheme.unwrap_or(opts.scheme) } else { opts.scheme };
        if own_scheme {
            summary.embedding_table = summary.embedding_table.or(opts.embedding_scheme);
        }
        if own_scheme && hot > 0 {
            splices.extend(split_table(g, &name, &w, (rows, cols), &hot_ids, opts.scheme, scheme, &gathers));
            summary.embeddings += 1;
            summary.block_tables += 1;
            summary.hot_rows = hot;
            removed.push(name);
            continue;
        }
        if hot == rows {
            summary.hot_rows = hot;
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
            summary.block_tables += 1;
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
    fold_biases(g);
    import_ms_domain(model);
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
                        hot_rows: vec![],
                        hot_row_count: 0,
                        keep_fp32: vec![],
                        blockwise: vec![],
                        qdq: false,
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
    fn weights_read_from_a_data_file_one_at_a_time_quantize_as_weights_in_memory() {
        let (w, tied, untied) = (weights(K * N, 1), weights(V * K, 2), weights(V * K, 3));
        let dir = tempfile::tempdir().unwrap();
        for (bits, embedding, keep) in [(4, true, vec![]), (8, false, vec!["untied".to_owned()])] {
            let mut opts = QuantizeOptions::for_bits(bits).unwrap();
            opts.embedding = embedding;
            opts.keep_fp32 = keep;
            let mut in_memory = model(&w, &tied, &untied);
            let expected = quantize_model(&mut in_memory, &opts).unwrap();
            let mut apart = model(&w, &tied, &untied);
            let mut data = Vec::new();
            crate::onnx::external::externalize(&mut apart, "model.onnx.data", &mut data).unwrap();
            std::fs::write(dir.path().join("model.onnx.data"), data).unwrap();
            // Without the folder the weights cannot be read: refused, not skipped.
            assert!(quantize_model(&mut apart.clone(), &opts).is_err());
            let got = quantize_model_in(&mut apart, &opts, Some(dir.path())).unwrap();
            assert_eq!(apart, in_memory, "{bits} bits: the same graph and weights, all read in");
            assert_eq!((got.bytes_before, got.bytes_after), (expected.bytes_before, expected.bytes_after));
            assert_eq!(got.kept, expected.kept);
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

    /// A token table (`Gather` by `input_ids`) and a position table, each read only by a Gather.
    fn tables_model(token: &[f32], position: &[f32]) -> ModelProto {
        let mut g = GraphBuilder::new("test");
        let d = |v: usize| Dim::Fixed(v as i64);
        g.input("input_ids", DataType::Int64, &[d(4)]);
        g.input("pos", DataType::Int64, &[d(4)]);
        g.output("e", DataType::Float, &[d(4), d(K)]);
        g.output("p", DataType::Float, &[d(4), d(K)]);
        let t = g.init_f32("token", &[V, K], token);
        let p = g.init_f32("position", &[V, K], position);
        g.node_named("Gather", "", &[&t, "input_ids"], &["e"], vec![Attr::int("axis", 0)]);
        g.node_named("Gather", "", &[&p, "pos"], &["p"], vec![Attr::int("axis", 0)]);
        g.finish(21, None, "test")
    }

    fn run_tables(m: &ModelProto, ids: &[i64]) -> (Vec<f32>, Vec<f32>) {
        use prost::Message;
        let env = edgelm_runtime::ortlib::init(None).expect("ONNX Runtime (EDGELM_ORT_LIB)");
        let mut s = Session::builder(env).unwrap().commit_from_memory(&m.encode_to_vec()).unwrap();
        let out = s
            .run(ort::inputs![
                "input_ids" => Tensor::from_array(([4usize], ids.to_vec())).unwrap(),
                "pos" => Tensor::from_array(([4usize], ids.to_vec())).unwrap(),
            ])
            .unwrap();
        let get = |n: &str| out[n].try_extract_tensor::<f32>().unwrap().1.to_vec();
        (get("e"), get("p"))
    }

    fn rows(table: &[f32], ids: &[i64]) -> Vec<f32> {
        ids.iter().flat_map(|&i| table[i as usize * K..(i as usize + 1) * K].to_vec()).collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
    }

    /// With hot rows the token table is stored twice over: the hot rows in the matrices' 8 bits,
    /// the rest in the table's 4; ONNX Runtime gives each token the row of its part, and the
    /// position table (not read by `input_ids`) keeps the matrices' scheme.
    #[test]
    fn hot_rows_keep_8_bits_and_the_rest_of_the_token_table_takes_4() {
        let (token, position) = (weights(V * K, 5), weights(V * K, 6));
        let mut opts = QuantizeOptions::for_bits(8).unwrap();
        opts.accuracy_level = 1;
        let table = BlockScheme::new(4, 16, false).unwrap();
        opts.embedding_scheme = Some(table);
        // A repeat and an id past the table are ignored.
        opts.hot_rows = vec![17, 3, 17, 99];
        let mut m = tables_model(&token, &position);
        let s = quantize_model(&mut m, &opts).unwrap();
        assert_eq!((s.embeddings, s.hot_rows, s.embedding_table), (2, 2, Some(table)));
        let g = m.graph.as_ref().unwrap();
        assert!(g.initializer.iter().all(|t| t.name != "token" && t.name != "position"));
        assert_eq!(g.node.iter().filter(|n| n.op_type == "GatherBlockQuantized").count(), 3);
        let ids = [0i64, 17, 39, 3];
        let (e, p) = run_tables(&m, &ids);
        let eight = quantize(&token, V, K, opts.scheme).dequantize();
        let four = quantize(&token, V, K, table).dequantize();
        for (i, &id) in ids.iter().enumerate() {
            let (got, hot) = (&e[i * K..(i + 1) * K], id == 17 || id == 3);
            let want = rows(if hot { &eight } else { &four }, &[id]);
            assert!(max_diff(got, &want) < 1e-6, "token {id} (hot {hot}) differs by {}", max_diff(got, &want));
        }
        // 4 bits are visibly coarser than 8 here, so the check above tells the parts apart.
        assert!(max_diff(&rows(&eight, &[0]), &rows(&four, &[0])) > 1e-3);
        let p8 = quantize(&position, V, K, opts.scheme).dequantize();
        assert!(max_diff(&p, &rows(&p8, &ids)) < 1e-6, "the position table took the token table's scheme");
        // No row hot: one 4-bit table. Every row hot: one table in the matrices' 8 bits.
        for (hot, want) in [(vec![], &four), ((0..V as u32).collect::<Vec<_>>(), &eight)] {
            let mut m = tables_model(&token, &position);
            let all = !hot.is_empty();
            let s = quantize_model(&mut m, &QuantizeOptions { hot_rows: hot, ..opts.clone() }).unwrap();
            assert_eq!((s.hot_rows, s.embedding_table.is_some()), (if all { V } else { 0 }, !all));
            assert_eq!(m.graph.as_ref().unwrap().node.iter().filter(|n| n.op_type == "Where").count(), 0);
            let (e, _) = run_tables(&m, &ids);
            assert!(max_diff(&e, &rows(want, &ids)) < 1e-6, "all hot {all}: {}", max_diff(&e, &rows(want, &ids)));
        }
        // Without an `input_ids` Gather every table only Gathers read takes the table's scheme,
        // and none is split by token ids.
        let mut g = GraphBuilder::new("test");
        g.input("ids", DataType::Int64, &[Dim::Fixed(4)]);
        g.output("e", DataType::Float, &[Dim::Fixed(4), Dim::Fixed(K as i64)]);
        let t = g.init_f32("table", &[V, K], &token);
        g.node_named("Gather", "", &[&t, "ids"], &["e"], vec![Attr::int("axis", 0)]);
        let mut m = g.finish(21, None, "test");
        let s = quantize_model(&mut m, &opts).unwrap();
        assert_eq!((s.hot_rows, s.embedding_table), (0, Some(table)));
    }

    /// Hot rows are the ids a text uses most, ties to the lower id, then the lowest unused ids.
    #[test]
    fn hot_rows_rank_by_use_then_fill_from_the_lowest_ids() {
        let ids = [5u32, 5, 2, 9, 9, 9, 2, 5, 1, 12];
        assert_eq!(hot_rows(ids, 10, 4), [5, 9, 2, 1]);
        assert_eq!(hot_rows(ids, 10, 2), [5, 9]);
        assert_eq!(hot_rows(ids, 10, 6), [5, 9, 2, 1, 0, 3]);
        assert_eq!(hot_rows(ids, 10, 50).len(), 10);
        assert_eq!(hot_rows([], 4, 2), [0, 1]);
    }

    /// `y = x W + b`: the bias moves into the integer matmul (no Add left, whichever side of the
    /// Add it is on) and the sum stays right; a matmul whose output has another reader keeps its
    /// Add, and so does MatMulNBits.
    #[test]
    fn biases_fold_into_the_quantized_matmuls() {
        let w = weights(K * N, 7);
        let b: Vec<f32> = (0..N).map(|j| 4.0 - j as f32 * 0.25).collect();
        let x = weights(2 * K, 8);
        let want: Vec<f32> =
            matmul_t(&x, &transpose(&w, K, N), N).iter().zip(b.iter().cycle()).map(|(v, b)| v + b).collect();
        // (method, the matmul output also a graph output, the bias as the Add's first input, Adds left)
        let cases = [
            (Method::DynamicInt8, false, false, 0),
            (Method::DynamicInt8, false, true, 0),
            (Method::DynamicInt8, true, false, 1),
            // MatMulNBits keeps its Add (ONNX Runtime's CUDA kernel takes no bias).
            (Method::Blockwise, false, false, 1),
        ];
        for (method, also_read, bias_first, adds_left) in cases {
            let mut g = GraphBuilder::new("test");
            let d = |v: usize| Dim::Fixed(v as i64);
            g.input("x", DataType::Float, &[d(2), d(K)]);
            g.output("y", DataType::Float, &[d(2), d(N)]);
            let wn = g.init_f32("w", &[K, N], &w);
            let bn = g.init_f32("b", &[N], &b);
            g.node_named("MatMul", "", &["x", &wn], &["xw"], vec![]);
            let add_inputs = if bias_first { [bn.as_str(), "xw"] } else { ["xw", bn.as_str()] };
            g.node_named("Add", "", &add_inputs, &["y"], vec![]);
            if also_read {
                g.output("xw", DataType::Float, &[d(2), d(N)]);
            }
            let mut m = g.finish(21, None, "test");
            let mut opts = QuantizeOptions::for_bits(8).unwrap();
            (opts.method, opts.accuracy_level) = (method, 1);
            quantize_model(&mut m, &opts).unwrap();
            let adds = m.graph.as_ref().unwrap().node.iter().filter(|n| n.op_type == "Add").count();
            assert_eq!(adds, adds_left, "{method:?}, also read {also_read}, bias first {bias_first}");
            use prost::Message;
            let env = edgelm_runtime::ortlib::init(None).expect("ONNX Runtime (EDGELM_ORT_LIB)");
            let mut s = Session::builder(env).unwrap().commit_from_memory(&m.encode_to_vec()).unwrap();
            let out = s.run(ort::inputs!["x" => Tensor::from_array(([2usize, K], x.clone())).unwrap()]).unwrap();
            let got = out["y"].try_extract_tensor::<f32>().unwrap().1.to_vec();
            assert!(max_diff(&got, &want) < 0.05, "{method:?}: {:?} vs {:?}", &got[..4], &want[..4]);
        }
    }
}
