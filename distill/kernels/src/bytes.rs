//! f32 values to and from the little-endian bytes ONNX and safetensors store (as f32, f16 or
//! bf16), and the matrix transpose the quantizers need.

use half::{bf16, f16};

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

/// The little-endian f16 bytes of `values`, rounded to nearest. With `saturate`, finite values
/// beyond f16's range become its largest finite values (a -1e9 attention mask stays a large
/// negative, not -inf); without, they overflow to infinity as a cast does.
pub fn f32_to_f16_le_bytes(values: &[f32], saturate: bool) -> Vec<u8> {
    let mut out = vec![0u8; 2 * values.len()];
    for (o, &v) in out.chunks_exact_mut(2).zip(values) {
        let v = if saturate && v.is_finite() { v.clamp(-65504.0, 65504.0) } else { v };
        o.copy_from_slice(&f16::from_f32(v).to_le_bytes());
    }
    out
}

/// The little-endian bf16 bytes of `values`, rounded to nearest.
pub fn f32_to_bf16_le_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; 2 * values.len()];
    for (o, &v) in out.chunks_exact_mut(2).zip(values) {
        o.copy_from_slice(&bf16::from_f32(v).to_le_bytes());
    }
    out
}

/// A 16-bit float type of stored weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

/// Little-endian 16-bit floats of type `from` widened to little-endian f32 bytes (a trailing
/// odd byte is ignored).
pub fn widen_to_f32_le_bytes(bytes: &[u8], from: Half) -> Vec<u8> {
    let mut out = vec![0u8; 2 * (bytes.len() / 2 * 2)];
    for (o, b) in out.chunks_exact_mut(4).zip(bytes.chunks_exact(2)) {
        let v = match from {
            Half::F16 => f16::from_le_bytes([b[0], b[1]]).to_f32(),
            Half::Bf16 => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        };
        o.copy_from_slice(&v.to_le_bytes());
    }
    out
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
    fn sixteen_bit_floats_by_hand() {
        // 1.0 is 0x3C00 in f16 and 0x3F80 in bf16; 1e9 saturates to 65504 (0x7BFF) or overflows.
        assert_eq!(f32_to_f16_le_bytes(&[1.0, 1e9], true), [0x00, 0x3C, 0xFF, 0x7B]);
        assert_eq!(f32_to_f16_le_bytes(&[1e9], false), [0x00, 0x7C]);
        assert_eq!(f32_to_bf16_le_bytes(&[1.0, -2.0]), [0x80, 0x3F, 0x00, 0xC0]);
        assert_eq!(widen_to_f32_le_bytes(&[0x00, 0x3C], Half::F16), f32_to_le_bytes(&[1.0]));
        assert_eq!(widen_to_f32_le_bytes(&[0x00, 0xC0], Half::Bf16), f32_to_le_bytes(&[-2.0]));
    }

    #[test]
    fn transpose_by_hand() {
        assert_eq!(transpose(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3), [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    }
}
