//! Reads one thing out of an ONNX file without loading it: the sliding window a decoder's
//! `GroupQueryAttention` applies (`local_window_size`). Folders built by onnxruntime-genai carry
//! no manifest to say so, and older ONNX Runtime releases apply such a window one position
//! wider. The protobuf is walked field by field and everything but the graph's nodes (the
//! weights, when they are inside) is skipped with a seek, so a 2 GB graph costs a few reads.

use std::io::{BufReader, Read, Seek};
use std::path::Path;

/// Largest node read whole: attention nodes are tiny, a node this large holds a constant.
const MAX_NODE_BYTES: u64 = 1 << 20;

/// The smallest positive `local_window_size` of the `GroupQueryAttention` nodes of the graph in
/// `model` (top level), or `None` when none slides: up to it no layer's window matters.
pub(crate) fn gqa_window(model: &Path) -> std::io::Result<Option<u64>> {
    let file = std::fs::File::open(model)?;
    let size = file.metadata()?.len();
    let mut r = BufReader::new(file);
    let mut window = None;
    // ModelProto: the graph is field 7.
    let mut pos = 0;
    while pos < size {
        let (field, wire) = key(&mut r, &mut pos, size)?;
        if field == 7 && wire == 2 {
            let len = varint(&mut r, &mut pos)?;
            let end = within(pos, len, size)?;
            // GraphProto: nodes are field 1.
            while pos < end {
                let (field, wire) = key(&mut r, &mut pos, end)?;
                if field == 1 && wire == 2 {
                    let len = varint(&mut r, &mut pos)?;
                    within(pos, len, end)?;
                    if len > MAX_NODE_BYTES {
                        skip_bytes(&mut r, &mut pos, len)?;
                        continue;
                    }
                    let mut node = vec![0u8; len as usize];
                    r.read_exact(&mut node)?;
                    pos += len;
                    if let Some(w) = node_window(&node)? {
                        window = Some(window.map_or(w, |v: u64| v.min(w)));
                    }
                } else {
                    skip(&mut r, &mut pos, wire, end)?;
                }
            }
        } else {
            skip(&mut r, &mut pos, wire, size)?;
        }
    }
    Ok(window)
}

/// The end of a field of `len` bytes at `pos`, checked to lie within `limit`.
fn within(pos: u64, len: u64, limit: u64) -> std::io::Result<u64> {
    pos.checked_add(len).filter(|&e| e <= limit).ok_or_else(|| bad("a field runs past its message or the file"))
}

/// A NodeProto's `local_window_size`, when it is a `GroupQueryAttention` with a positive one.
fn node_window(node: &[u8]) -> std::io::Result<Option<u64>> {
    let (mut op, mut window) = (None, None);
    let mut r = std::io::Cursor::new(node);
    let mut pos = 0;
    while pos < node.len() as u64 {
        let (field, wire) = key(&mut r, &mut pos, node.len() as u64)?;
        match (field, wire) {
            // op_type
            (4, 2) => op = Some(bytes(&mut r, &mut pos)?),
            // attribute
            (5, 2) => {
                let attr = bytes(&mut r, &mut pos)?;
                if let Some(w) = attribute_int(&attr, b"local_window_size")? {
                    window = Some(w);
                }
            }
            _ => skip(&mut r, &mut pos, wire, node.len() as u64)?,
        }
    }
    Ok(match (op.as_deref(), window) {
        (Some(b"GroupQueryAttention"), Some(w)) if w > 0 => Some(w as u64),
        _ => None,
    })
}

/// An AttributeProto's integer value (field 3) when its name (field 1) is `name`.
fn attribute_int(attr: &[u8], name: &[u8]) -> std::io::Result<Option<i64>> {
    let (mut found, mut value) = (false, None);
    let mut r = std::io::Cursor::new(attr);
    let mut pos = 0;
    while pos < attr.len() as u64 {
        let (field, wire) = key(&mut r, &mut pos, attr.len() as u64)?;
        match (field, wire) {
            (1, 2) => found = bytes(&mut r, &mut pos)? == name,
            (3, 0) => value = Some(varint(&mut r, &mut pos)? as i64),
            _ => skip(&mut r, &mut pos, wire, attr.len() as u64)?,
        }
    }
    Ok(value.filter(|_| found))
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not an ONNX protobuf: {what}"))
}

fn varint(r: &mut impl Read, pos: &mut u64) -> std::io::Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let mut b = [0u8];
        r.read_exact(&mut b)?;
        *pos += 1;
        // The tenth byte carries the 64th bit only.
        if shift == 63 && b[0] > 1 {
            return Err(bad("a varint past 64 bits"));
        }
        v |= u64::from(b[0] & 0x7f) << shift;
        if b[0] & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(bad("a varint longer than 10 bytes"))
}

/// A field's number and wire type; the key must end by `limit`.
fn key(r: &mut impl Read, pos: &mut u64, limit: u64) -> std::io::Result<(u64, u8)> {
    let k = varint(r, pos)?;
    within(*pos, 0, limit)?;
    Ok((k >> 3, (k & 7) as u8))
}

fn bytes(r: &mut impl Read, pos: &mut u64) -> std::io::Result<Vec<u8>> {
    let len = varint(r, pos)?;
    if len > MAX_NODE_BYTES {
        return Err(bad("a string field longer than a node"));
    }
    let mut v = vec![0u8; len as usize];
    r.read_exact(&mut v)?;
    *pos += len;
    Ok(v)
}

fn skip_bytes(r: &mut impl Seek, pos: &mut u64, len: u64) -> std::io::Result<()> {
    // Relative, so a BufReader keeps its buffer when the field ends inside it.
    r.seek_relative(i64::try_from(len).map_err(|_| bad("a field past 2^63 bytes"))?)?;
    *pos += len;
    Ok(())
}

/// Skips one field's value, which must end by `limit`.
fn skip<R: Read + Seek>(r: &mut R, pos: &mut u64, wire: u8, limit: u64) -> std::io::Result<()> {
    let len = match wire {
        0 => {
            varint(r, pos)?;
            return within(*pos, 0, limit).map(drop);
        }
        1 => 8,
        2 => varint(r, pos)?,
        5 => 4,
        other => return Err(bad(&format!("wire type {other}"))),
    };
    within(*pos, len, limit)?;
    skip_bytes(r, pos, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(number: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut put = |mut v: u64| loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            out.push(if v == 0 { b } else { b | 0x80 });
            if v == 0 {
                break;
            }
        };
        put((number << 3) | 2);
        put(payload.len() as u64);
        out.extend_from_slice(payload);
        out
    }

    fn int_attribute(name: &str, value: u8) -> Vec<u8> {
        // name, i, and type INT (field 20: a two-byte key).
        [field(1, name.as_bytes()), vec![3 << 3, value], vec![0xa0, 0x01, 2]].concat()
    }

    fn node(op: &str, attributes: &[Vec<u8>]) -> Vec<u8> {
        let mut n = field(4, op.as_bytes());
        for a in attributes {
            n.extend(field(5, a));
        }
        n
    }

    #[test]
    fn the_window_is_read_past_weights_and_other_nodes() {
        let weights = field(5, &vec![7u8; 5000]);
        let gqa = |w: u8| {
            node("GroupQueryAttention", &[int_attribute("num_heads", 4), int_attribute("local_window_size", w)])
        };
        let other = node("MatMul", &[int_attribute("local_window_size", 99)]);
        let graph = [weights, field(1, &other), field(1, &gqa(8)), field(1, &gqa(6))].concat();
        let model = [vec![1 << 3, 10], field(7, &graph), field(8, b"opset")].concat();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.onnx");
        std::fs::write(&path, &model).unwrap();
        assert_eq!(gqa_window(&path).unwrap(), Some(6), "the smallest window");
        let plain =
            [vec![1 << 3, 10], field(7, &field(1, &node("GroupQueryAttention", &[int_attribute("num_heads", 4)])))]
                .concat();
        std::fs::write(&path, &plain).unwrap();
        assert_eq!(gqa_window(&path).unwrap(), None);
        // A file cut short is an error, not a guess; so is a length past the file.
        std::fs::write(&path, &model[..model.len() / 2]).unwrap();
        assert!(gqa_window(&path).is_err());
        let huge = [vec![7 << 3 | 2], vec![0xff; 9], vec![0x01]].concat();
        std::fs::write(&path, &huge).unwrap();
        assert!(gqa_window(&path).is_err());
        // A varint whose tenth byte holds more than the 64th bit.
        let wide = [vec![1 << 3], vec![0xff; 9], vec![0x02]].concat();
        std::fs::write(&path, &wide).unwrap();
        assert!(gqa_window(&path).unwrap_err().to_string().contains("64 bits"));
        // A graph of 2 bytes whose integer field runs on into the next field: out of step, refused.
        let overrun = [vec![7 << 3 | 2, 2], vec![2 << 3, 0x80, 0x80, 0x01], field(8, b"opset")].concat();
        std::fs::write(&path, &overrun).unwrap();
        assert!(gqa_window(&path).unwrap_err().to_string().contains("past its message"));
    }
}
