//! Hand-written subset of the ONNX IR protobuf schema (`onnx.proto`).
//!
//! Only the messages needed to write an inference model (and to read one back
//! for checks) are defined here, as plain `prost` derives, so the crate needs
//! no `.proto` files, no `protoc` and no build script. Every field number and
//! wire type below was taken from the upstream `onnx/onnx.in.proto`.
//!
//! ONNX is a proto2 schema. The structs use `prost` attributes chosen so that
//! the bytes are ones an ONNX parser reads as intended:
//!
//! * Scalars whose presence matters are `Option<T>` (`AttributeProto.f`/`i`/`s`,
//!   `TensorProto.data_type`), so a value of zero is still written.
//! * Other scalars and strings are plain fields; an empty or zero value is left
//!   out, which ONNX treats the same as an absent field.
//! * Repeated numbers are packed or unpacked exactly as `onnx.proto` declares
//!   them: the `*_data` tensor payloads are `packed = true` there, while
//!   `TensorProto.dims`, `AttributeProto.floats` and `AttributeProto.ints` use
//!   proto2's default (unpacked). Readers accept either form; this way the
//!   repeated fields use the same wire form as files written by `onnx` itself.
//! * Fields and messages not defined here (sparse tensors, functions, training
//!   info, non-tensor types, ...) are skipped as unknown fields when decoding.
//!
//! Nested ONNX messages live in modules named the way `prost-build` names them
//! (`type_proto::Tensor`, `tensor_shape_proto::Dimension`). The enums are at the
//! top level of this module (`DataType`, `AttributeType`, `DataLocation`).

#![allow(missing_docs)]
// A schema module: many variants and helpers exist for completeness and may
// go unused while the module is crate-private.
#![allow(dead_code)]

/// Element type of a tensor (`TensorProto.DataType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration)]
#[repr(i32)]
pub enum DataType {
    Undefined = 0,
    Float = 1,
    Uint8 = 2,
    Int8 = 3,
    Uint16 = 4,
    Int16 = 5,
    Int32 = 6,
    Int64 = 7,
    String = 8,
    Bool = 9,
    Float16 = 10,
    Double = 11,
    Uint32 = 12,
    Uint64 = 13,
    Complex64 = 14,
    Complex128 = 15,
    Bfloat16 = 16,
    Float8e4m3fn = 17,
    Float8e4m3fnuz = 18,
    Float8e5m2 = 19,
    Float8e5m2fnuz = 20,
    Uint4 = 21,
    Int4 = 22,
    Float4e2m1 = 23,
    Float8e8m0 = 24,
}

/// Which value field of an `AttributeProto` is in use (`AttributeProto.AttributeType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration)]
#[repr(i32)]
pub enum AttributeType {
    Undefined = 0,
    Float = 1,
    Int = 2,
    String = 3,
    Tensor = 4,
    Graph = 5,
    Floats = 6,
    Ints = 7,
    Strings = 8,
    Tensors = 9,
    Graphs = 10,
    SparseTensor = 11,
    SparseTensors = 12,
}

/// Where a tensor's bytes are stored (`TensorProto.DataLocation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration)]
#[repr(i32)]
pub enum DataLocation {
    /// In this message: `raw_data` if set, otherwise the typed `*_data` field.
    Default = 0,
    /// In another file, described by `external_data`.
    External = 1,
}

/// Top-level container: a graph plus the metadata needed to run it.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct ModelProto {
    #[prost(int64, tag = "1")]
    pub ir_version: i64,
    #[prost(string, tag = "2")]
    pub producer_name: String,
    #[prost(string, tag = "3")]
    pub producer_version: String,
    #[prost(string, tag = "4")]
    pub domain: String,
    #[prost(int64, tag = "5")]
    pub model_version: i64,
    #[prost(string, tag = "6")]
    pub doc_string: String,
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
    #[prost(message, repeated, tag = "14")]
    pub metadata_props: Vec<StringStringEntryProto>,
}

/// An operator set the model imports: a domain (`""` = default ONNX) and version.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct OperatorSetIdProto {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(int64, tag = "2")]
    pub version: i64,
}

/// A key/value string pair; ONNX's stand-in for a map entry.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct StringStringEntryProto {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// A computation graph: topologically sorted nodes, constants, inputs and outputs.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    #[prost(string, tag = "10")]
    pub doc_string: String,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "13")]
    pub value_info: Vec<ValueInfoProto>,
}

/// One operator call in a graph.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(string, tag = "4")]
    pub op_type: String,
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
    #[prost(string, tag = "6")]
    pub doc_string: String,
    #[prost(string, tag = "7")]
    pub domain: String,
}

/// A named operator attribute; `type` says which single value field is in use.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct AttributeProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(float, optional, tag = "2")]
    pub f: Option<f32>,
    #[prost(int64, optional, tag = "3")]
    pub i: Option<i64>,
    #[prost(bytes = "vec", optional, tag = "4")]
    pub s: Option<Vec<u8>>,
    #[prost(message, optional, tag = "5")]
    pub t: Option<TensorProto>,
    #[prost(message, optional, tag = "6")]
    pub g: Option<GraphProto>,
    #[prost(float, repeated, packed = "false", tag = "7")]
    pub floats: Vec<f32>,
    #[prost(int64, repeated, packed = "false", tag = "8")]
    pub ints: Vec<i64>,
    #[prost(bytes = "vec", repeated, tag = "9")]
    pub strings: Vec<Vec<u8>>,
    #[prost(message, repeated, tag = "10")]
    pub tensors: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    pub graphs: Vec<GraphProto>,
    #[prost(string, tag = "13")]
    pub doc_string: String,
    #[prost(enumeration = "AttributeType", tag = "20")]
    pub r#type: i32,
    #[prost(string, tag = "21")]
    pub ref_attr_name: String,
}

/// A dense tensor value: shape, element type and data (inline or external).
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct TensorProto {
    #[prost(int64, repeated, packed = "false", tag = "1")]
    pub dims: Vec<i64>,
    /// A `DataType` value.
    #[prost(int32, optional, tag = "2")]
    pub data_type: Option<i32>,
    #[prost(float, repeated, packed = "true", tag = "4")]
    pub float_data: Vec<f32>,
    #[prost(int32, repeated, packed = "true", tag = "5")]
    pub int32_data: Vec<i32>,
    #[prost(bytes = "vec", repeated, tag = "6")]
    pub string_data: Vec<Vec<u8>>,
    #[prost(int64, repeated, packed = "true", tag = "7")]
    pub int64_data: Vec<i64>,
    #[prost(string, tag = "8")]
    pub name: String,
    /// Fixed-width little-endian element bytes, row-major.
    #[prost(bytes = "vec", tag = "9")]
    pub raw_data: Vec<u8>,
    #[prost(double, repeated, packed = "true", tag = "10")]
    pub double_data: Vec<f64>,
    #[prost(uint64, repeated, packed = "true", tag = "11")]
    pub uint64_data: Vec<u64>,
    #[prost(string, tag = "12")]
    pub doc_string: String,
    /// Keys `location`, `offset`, `length`, `checksum` when `data_location` is external.
    #[prost(message, repeated, tag = "13")]
    pub external_data: Vec<StringStringEntryProto>,
    #[prost(enumeration = "DataLocation", optional, tag = "14")]
    pub data_location: Option<i32>,
}

/// The name and type of a graph input, output or intermediate value.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct ValueInfoProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
    #[prost(string, tag = "3")]
    pub doc_string: String,
}

/// The type of a value; only the tensor case is modelled here.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct TypeProto {
    #[prost(oneof = "type_proto::Value", tags = "1")]
    pub value: Option<type_proto::Value>,
    #[prost(string, tag = "6")]
    pub denotation: String,
}

/// Messages nested inside `TypeProto`.
pub mod type_proto {
    /// A tensor type: element type plus an optional (possibly partly symbolic) shape.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct Tensor {
        /// A `DataType` value.
        #[prost(int32, tag = "1")]
        pub elem_type: i32,
        /// `None` means unknown rank; `Some` with no dims means a scalar.
        #[prost(message, optional, tag = "2")]
        pub shape: Option<super::TensorShapeProto>,
    }

    /// The `value` oneof of `TypeProto` (tensor types only).
    #[derive(Clone, PartialEq, ::prost::Oneof)]
    pub enum Value {
        #[prost(message, tag = "1")]
        TensorType(Tensor),
    }
}

/// A tensor shape: one entry per axis.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<tensor_shape_proto::Dimension>,
}

/// Messages nested inside `TensorShapeProto`.
pub mod tensor_shape_proto {
    /// One axis of a shape: a fixed size, a symbolic name, or unknown (`value: None`).
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct Dimension {
        #[prost(oneof = "dimension::Value", tags = "1, 2")]
        pub value: Option<dimension::Value>,
        #[prost(string, tag = "3")]
        pub denotation: String,
    }

    /// Types nested inside `Dimension`.
    pub mod dimension {
        /// The `value` oneof of `Dimension`.
        #[derive(Clone, PartialEq, ::prost::Oneof)]
        pub enum Value {
            #[prost(int64, tag = "1")]
            DimValue(i64),
            #[prost(string, tag = "2")]
            DimParam(String),
        }
    }
}

/// One axis of a shape handed to [`ValueInfoProto::tensor`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    /// A known size (may be 0).
    Fixed(i64),
    /// A named size bound at run time, e.g. `"batch"`.
    Symbolic(String),
}

impl Dim {
    /// The wire form of this axis.
    pub fn to_proto(&self) -> tensor_shape_proto::Dimension {
        use tensor_shape_proto::dimension::Value;
        let value = match self {
            Dim::Fixed(n) => Value::DimValue(*n),
            Dim::Symbolic(s) => Value::DimParam(s.clone()),
        };
        tensor_shape_proto::Dimension { value: Some(value), denotation: String::new() }
    }
}

impl From<i64> for Dim {
    fn from(n: i64) -> Self {
        Dim::Fixed(n)
    }
}

impl From<&str> for Dim {
    fn from(s: &str) -> Self {
        Dim::Symbolic(s.to_owned())
    }
}

/// Number of elements a tensor of shape `dims` holds (1 for a scalar).
///
/// # Panics
/// If a dimension is negative.
fn element_count(dims: &[i64]) -> usize {
    dims.iter().map(|&d| usize::try_from(d).expect("tensor dimensions must be non-negative")).product()
}

fn check_len(dims: &[i64], len: usize) {
    let expected = element_count(dims);
    assert_eq!(len, expected, "tensor data has {len} elements but shape {dims:?} needs {expected}");
}

impl TensorProto {
    /// A float32 tensor with its values in `raw_data` (little-endian).
    ///
    /// # Panics
    /// If `data.len()` is not the product of `dims`, or a dim is negative.
    pub fn from_f32(name: impl Into<String>, dims: &[i64], data: &[f32]) -> Self {
        check_len(dims, data.len());
        Self::from_u8(name, dims, DataType::Float, edgelm_kernels::bytes::f32_to_le_bytes(data))
    }

    /// An int64 tensor with its values in `raw_data` (little-endian).
    ///
    /// # Panics
    /// If `data.len()` is not the product of `dims`, or a dim is negative.
    pub fn from_i64(name: impl Into<String>, dims: &[i64], data: &[i64]) -> Self {
        check_len(dims, data.len());
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self::from_u8(name, dims, DataType::Int64, raw)
    }

    /// An int32 tensor with its values in `raw_data` (little-endian).
    ///
    /// # Panics
    /// If `data.len()` is not the product of `dims`, or a dim is negative.
    pub fn from_i32(name: impl Into<String>, dims: &[i64], data: &[i32]) -> Self {
        check_len(dims, data.len());
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self::from_u8(name, dims, DataType::Int32, raw)
    }

    /// A tensor of any fixed-width type from bytes already in ONNX `raw_data`
    /// layout (little-endian; 4-bit types two per byte, low nibble first).
    /// The length is not checked against `dims`.
    pub fn from_u8(name: impl Into<String>, dims: &[i64], data_type: DataType, bytes: Vec<u8>) -> Self {
        TensorProto {
            dims: dims.to_vec(),
            data_type: Some(data_type as i32),
            name: name.into(),
            raw_data: bytes,
            ..Default::default()
        }
    }
}

impl AttributeProto {
    fn named(name: impl Into<String>, ty: AttributeType) -> Self {
        AttributeProto { name: name.into(), r#type: ty as i32, ..Default::default() }
    }

    /// An `INT` attribute (written even when `v` is 0).
    pub fn int(name: impl Into<String>, v: i64) -> Self {
        AttributeProto { i: Some(v), ..Self::named(name, AttributeType::Int) }
    }

    /// A `FLOAT` attribute (written even when `v` is 0.0).
    pub fn float(name: impl Into<String>, v: f32) -> Self {
        AttributeProto { f: Some(v), ..Self::named(name, AttributeType::Float) }
    }

    /// An `INTS` attribute.
    pub fn ints(name: impl Into<String>, v: Vec<i64>) -> Self {
        AttributeProto { ints: v, ..Self::named(name, AttributeType::Ints) }
    }

    /// A `FLOATS` attribute.
    pub fn floats(name: impl Into<String>, v: Vec<f32>) -> Self {
        AttributeProto { floats: v, ..Self::named(name, AttributeType::Floats) }
    }

    /// A `STRING` attribute (stored as UTF-8 bytes).
    pub fn string(name: impl Into<String>, s: &str) -> Self {
        AttributeProto { s: Some(s.as_bytes().to_vec()), ..Self::named(name, AttributeType::String) }
    }

    /// A `TENSOR` attribute, e.g. the `value` of a `Constant` node.
    pub fn tensor(name: impl Into<String>, t: TensorProto) -> Self {
        AttributeProto { t: Some(t), ..Self::named(name, AttributeType::Tensor) }
    }
}

impl ValueInfoProto {
    /// A tensor-typed value. The shape is always written, so `dims = &[]`
    /// declares a scalar (rank 0), not an unknown rank.
    pub fn tensor(name: impl Into<String>, elem: DataType, dims: &[Dim]) -> Self {
        let shape = TensorShapeProto { dim: dims.iter().map(Dim::to_proto).collect() };
        let tensor = type_proto::Tensor { elem_type: elem as i32, shape: Some(shape) };
        ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto { value: Some(type_proto::Value::TensorType(tensor)), denotation: String::new() }),
            doc_string: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn tiny_model() -> ModelProto {
        let graph = GraphProto {
            name: "tiny".into(),
            node: vec![
                NodeProto {
                    input: vec!["x".into(), "w".into()],
                    output: vec!["y".into()],
                    name: "add0".into(),
                    op_type: "Add".into(),
                    ..Default::default()
                },
                NodeProto {
                    input: vec!["y".into(), "idx".into()],
                    output: vec!["z".into()],
                    name: "gather0".into(),
                    op_type: "Gather".into(),
                    attribute: vec![AttributeProto::int("axis", 0)],
                    ..Default::default()
                },
            ],
            initializer: vec![
                TensorProto::from_f32("w", &[4], &[0.5, -1.0, 2.25, 0.0]),
                TensorProto::from_i64("idx", &[2], &[3, 0]),
            ],
            input: vec![ValueInfoProto::tensor("x", DataType::Float, &[Dim::Symbolic("batch".into()), Dim::Fixed(4)])],
            output: vec![ValueInfoProto::tensor("z", DataType::Float, &[Dim::Symbolic("batch".into()), Dim::Fixed(2)])],
            ..Default::default()
        };
        ModelProto {
            ir_version: 10,
            producer_name: "edgelm-distill".into(),
            producer_version: "0.1.0".into(),
            opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 21 }],
            metadata_props: vec![StringStringEntryProto { key: "k".into(), value: "v".into() }],
            graph: Some(graph),
            ..Default::default()
        }
    }

    #[test]
    fn model_round_trips() {
        let model = tiny_model();
        let bytes = model.encode_to_vec();
        let back = ModelProto::decode(bytes.as_slice()).expect("decode");
        assert_eq!(back, model);

        let g = back.graph.as_ref().unwrap();
        // A zero-valued INT attribute must survive (it is optional, not proto3-default).
        assert_eq!(g.node[1].attribute[0].i, Some(0));
        assert_eq!(g.node[1].attribute[0].r#type(), AttributeType::Int);
        assert_eq!(g.initializer[0].data_type, Some(DataType::Float as i32));
        assert_eq!(g.initializer[1].raw_data.len(), 16);
    }

    #[test]
    fn scalar_value_info_keeps_empty_shape() {
        let v = ValueInfoProto::tensor("s", DataType::Int64, &[]);
        let back = ValueInfoProto::decode(v.encode_to_vec().as_slice()).unwrap();
        let Some(TypeProto { value: Some(type_proto::Value::TensorType(t)), .. }) = back.r#type else {
            panic!("expected a tensor type");
        };
        assert_eq!(t.elem_type, DataType::Int64 as i32);
        assert_eq!(t.shape, Some(TensorShapeProto { dim: vec![] }));
    }

    #[test]
    fn opset_import_exact_bytes() {
        // Empty domain is a default value and is not written; version 21 is
        // field 2, varint: key (2 << 3) | 0 = 0x10, value 0x15.
        let default_domain = OperatorSetIdProto { domain: String::new(), version: 21 };
        assert_eq!(default_domain.encode_to_vec(), [0x10_u8, 0x15]);

        // Non-empty domain: field 1, length-delimited: key 0x0a, length 10.
        let ml = OperatorSetIdProto { domain: "ai.onnx.ml".into(), version: 1 };
        let mut want: Vec<u8> = vec![0x0a, 10];
        want.extend_from_slice(b"ai.onnx.ml");
        want.extend_from_slice(&[0x10, 0x01]);
        assert_eq!(ml.encode_to_vec(), want);
    }

    #[test]
    fn attribute_exact_bytes() {
        // name (1): 0x0a len "axis"; i (3) = 0 still written: 0x18 0x00;
        // type (20) = INT (2): key 160 = varint [0xa0, 0x01], value 0x02.
        assert_eq!(
            AttributeProto::int("axis", 0).encode_to_vec(),
            [0x0a, 0x04, b'a', b'x', b'i', b's', 0x18, 0x00, 0xa0, 0x01, 0x02]
        );
        // f (2) is fixed32: key (2 << 3) | 5 = 0x15, 0.5f32 LE = 00 00 00 3f.
        assert_eq!(
            AttributeProto::float("alpha", 0.5).encode_to_vec(),
            [0x0a, 0x05, b'a', b'l', b'p', b'h', b'a', 0x15, 0x00, 0x00, 0x00, 0x3f, 0xa0, 0x01, 0x01]
        );
        // ints (8) unpacked as in onnx.proto: one key 0x40 per element; type INTS = 7.
        assert_eq!(
            AttributeProto::ints("perm", vec![1, 0]).encode_to_vec(),
            [0x0a, 0x04, b'p', b'e', b'r', b'm', 0x40, 0x01, 0x40, 0x00, 0xa0, 0x01, 0x07]
        );
    }

    #[test]
    fn tensor_exact_bytes() {
        // dims (1) unpacked: 0x08 0x02; data_type (2) = FLOAT: 0x10 0x01;
        // name (8): 0x42 len "w"; raw_data (9): 0x4a len 8, 1.0 and -2.0 as f32 LE.
        let t = TensorProto::from_f32("w", &[2], &[1.0, -2.0]);
        assert_eq!(
            t.encode_to_vec(),
            [0x08, 0x02, 0x10, 0x01, 0x42, 0x01, b'w', 0x4a, 0x08, 0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0xc0]
        );
        // float_data (4) is packed: one key 0x22, byte length, then the values.
        let packed = TensorProto { float_data: vec![1.0], ..Default::default() };
        assert_eq!(packed.encode_to_vec(), [0x22_u8, 0x04, 0x00, 0x00, 0x80, 0x3f]);
    }

    #[test]
    fn value_info_exact_bytes() {
        let v = ValueInfoProto::tensor("x", DataType::Float, &[Dim::from("n"), Dim::from(3_i64)]);
        assert_eq!(
            v.encode_to_vec(),
            [
                0x0a, 0x01, b'x', // name
                0x12, 0x0f, // type: TypeProto, 15 bytes
                0x0a, 0x0d, // tensor_type: Tensor, 13 bytes
                0x08, 0x01, // elem_type = FLOAT
                0x12, 0x09, // shape: TensorShapeProto, 9 bytes
                0x0a, 0x03, 0x12, 0x01, b'n', // dim { dim_param: "n" }
                0x0a, 0x02, 0x08, 0x03, // dim { dim_value: 3 }
            ]
        );
        // A zero-sized axis is a oneof member, so 0 is still written.
        assert_eq!(Dim::Fixed(0).to_proto().encode_to_vec(), [0x08_u8, 0x00]);
    }

    #[test]
    #[should_panic(expected = "needs 6")]
    fn from_f32_rejects_wrong_length() {
        let _ = TensorProto::from_f32("bad", &[2, 3], &[0.0; 5]);
    }
}
