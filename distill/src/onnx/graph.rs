//! A small builder for ONNX graphs: names values, collects nodes and initializers, and
//! produces a [`ModelProto`]. It knows nothing about language models.

use super::proto::{
    AttributeProto, DataLocation, DataType, Dim, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    StringStringEntryProto, TensorProto, ValueInfoProto,
};

/// Domain of ONNX Runtime's contrib operators.
pub const MS_DOMAIN: &str = "com.microsoft";

/// Builds one graph. Value names are made unique from a scope prefix and the operator name.
pub struct GraphBuilder {
    name: String,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    counter: usize,
    scope: String,
    spill: Option<Spill>,
}

/// Where weights go as they are added, instead of memory: a data file beside the graph,
/// written in the element type the weights came in (so nothing is rounded).
struct Spill {
    out: std::io::BufWriter<std::fs::File>,
    location: String,
    elem: DataType,
    written: usize,
    error: Option<std::io::Error>,
}

impl Spill {
    fn write(&mut self, name: &str, dims: &[i64], data: &[f32]) -> TensorProto {
        use std::io::Write;
        let bytes: Vec<u8> = match self.elem {
            DataType::Bfloat16 => edgelm_kernels::bytes::f32_to_bf16_le_bytes(data),
            DataType::Float16 => edgelm_kernels::bytes::f32_to_f16_le_bytes(data, false),
            _ => edgelm_kernels::bytes::f32_to_le_bytes(data),
        };
        if self.error.is_none() {
            if let Err(e) = self.out.write_all(&bytes) {
                self.error = Some(e);
            }
        }
        let entry = |key: &str, value: String| StringStringEntryProto { key: key.into(), value };
        let t = TensorProto {
            dims: dims.to_vec(),
            data_type: Some(self.elem as i32),
            name: name.to_owned(),
            external_data: vec![
                entry("location", self.location.clone()),
                entry("offset", self.written.to_string()),
                entry("length", bytes.len().to_string()),
            ],
            data_location: Some(DataLocation::External as i32),
            ..Default::default()
        };
        self.written += bytes.len();
        t
    }
}

impl GraphBuilder {
    /// An empty graph called `name`.
    pub fn new(name: &str) -> Self {
        GraphBuilder {
            name: name.to_owned(),
            nodes: vec![],
            initializers: vec![],
            inputs: vec![],
            outputs: vec![],
            counter: 0,
            scope: String::new(),
            spill: None,
        }
    }

    /// Writes the weights added with [`GraphBuilder::init_weight`] to `path` (the file
    /// `location` beside the graph) as `elem` (float, float16 or bfloat16) rather than keeping
    /// them: the graph's initializers name their bytes there.
    pub fn spill_weights(&mut self, path: &std::path::Path, location: &str, elem: DataType) -> std::io::Result<()> {
        let out = std::io::BufWriter::new(std::fs::File::create(path)?);
        self.spill = Some(Spill { out, location: location.into(), elem, written: 0, error: None });
        Ok(())
    }

    /// Adds a weight: an f32 initializer, or one whose bytes go to the spill file when weights
    /// spill.
    pub fn init_weight(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        let Some(spill) = &mut self.spill else {
            return self.init_f32(name, dims, data);
        };
        let dims: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        let t = spill.write(name, &dims, data);
        self.initializers.push(t);
        name.to_owned()
    }

    /// Flushes the spill file; the first write error, if any.
    pub fn finish_spill(&mut self) -> std::io::Result<()> {
        use std::io::Write;
        match self.spill.take() {
            Some(mut s) => match s.error.take() {
                Some(e) => Err(e),
                None => s.out.flush(),
            },
            None => Ok(()),
        }
    }

    /// Sets the prefix of node and value names that follow (e.g. `/model/layers.3/attn`).
    pub fn set_scope(&mut self, scope: impl Into<String>) {
        self.scope = scope.into();
    }

    /// Declares a graph input.
    pub fn input(&mut self, name: &str, elem: DataType, dims: &[Dim]) {
        self.inputs.push(ValueInfoProto::tensor(name, elem, dims));
    }

    /// Declares a graph output.
    pub fn output(&mut self, name: &str, elem: DataType, dims: &[Dim]) {
        self.outputs.push(ValueInfoProto::tensor(name, elem, dims));
    }

    /// Adds an f32 initializer and returns its name.
    pub fn init_f32(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        let dims: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        self.initializers.push(TensorProto::from_f32(name, &dims, data));
        name.to_owned()
    }

    /// Adds an i64 initializer and returns its name.
    pub fn init_i64(&mut self, name: &str, dims: &[usize], data: &[i64]) -> String {
        let dims: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        self.initializers.push(TensorProto::from_i64(name, &dims, data));
        name.to_owned()
    }

    /// Adds a node with `n_out` outputs named after the scope; returns the output names.
    /// An empty input name marks an omitted optional input.
    pub fn node(
        &mut self,
        op: &str,
        domain: &str,
        inputs: &[&str],
        n_out: usize,
        attrs: Vec<AttributeProto>,
    ) -> Vec<String> {
        self.counter += 1;
        let base = format!("{}/{}_{}", self.scope, op, self.counter);
        let outputs: Vec<String> = (0..n_out).map(|i| format!("{base}/output_{i}")).collect();
        self.node_named(op, domain, inputs, &outputs.iter().map(String::as_str).collect::<Vec<_>>(), attrs);
        outputs
    }

    /// Adds a node whose outputs have the given names (graph outputs, or `""` to skip one).
    pub fn node_named(
        &mut self,
        op: &str,
        domain: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: Vec<AttributeProto>,
    ) {
        self.counter += 1;
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| (*s).to_owned()).collect(),
            output: outputs.iter().map(|s| (*s).to_owned()).collect(),
            name: format!("{}/{}_{}", self.scope, op, self.counter),
            op_type: op.to_owned(),
            domain: domain.to_owned(),
            attribute: attrs,
            ..Default::default()
        });
    }

    /// A single-output standard ONNX node.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        self.node(op, "", inputs, 1, attrs).remove(0)
    }

    /// Edits the most recently added node (renaming or blanking its outputs).
    pub fn with_last_node(&mut self, f: impl FnOnce(&mut NodeProto)) {
        if let Some(n) = self.nodes.last_mut() {
            f(n);
        }
    }

    /// The finished model with the given operator set versions.
    pub fn finish(self, onnx_opset: i64, ms_opset: Option<i64>, producer_version: &str) -> ModelProto {
        let mut opset_import = vec![OperatorSetIdProto { domain: String::new(), version: onnx_opset }];
        if let Some(v) = ms_opset {
            opset_import.push(OperatorSetIdProto { domain: MS_DOMAIN.into(), version: v });
        }
        ModelProto {
            // IR version 10 goes with opset 21.
            ir_version: 10,
            producer_name: "edgelm".into(),
            producer_version: producer_version.into(),
            opset_import,
            graph: Some(GraphProto {
                name: self.name,
                node: self.nodes,
                initializer: self.initializers,
                input: self.inputs,
                output: self.outputs,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}
