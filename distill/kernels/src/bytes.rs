//! f32 values to and from the little-endian bytes ONNX and safetensors store, and the matrix
//! transpose the quantizers need.

/// The little-endian bytes of `values`.
pub fn f32_to_le_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; 4 * values.len()];
    for (o, v) in out.chunks_exact_mut(4).zip(values) {
        o.copy_from_slice(&v.to_le_bytes());
    }
    out
}

/// The f32 values of little-endian `bytes` (a trailing partial value is ignored).
pub fn f32_from_le_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// `[rows, cols]` row-major to `[cols, rows]` row-major.
///
/// # Panics
/// If `v.len() != rows * cols`.
pub fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(v.len(), rows * cols, "matrix data does not match its shape");
    let mut out = vec![0f32; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_little_endian() {
        let b = f32_to_le_bytes(&[1.0, -2.5]);
        assert_eq!(b, [0, 0, 0x80, 0x3F, 0, 0, 0x20, 0xC0]);
        assert_eq!(f32_from_le_bytes(&b), [1.0, -2.5]);
    }

    #[test]
    fn transpose_by_hand() {
        assert_eq!(transpose(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3), [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    }
}
