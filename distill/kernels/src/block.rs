//! Block-wise integer quantization of a weight matrix, in the byte layout ONNX Runtime's
//! `MatMulNBits` and `GatherBlockQuantized` read.
//!
//! A matrix of `rows x cols` (`[N, K]`: one row per output, quantized along the input) is cut
//! into blocks of `block_size` consecutive values of a row; the last block of a row is padded
//! with zeros. Each block keeps one f32 scale and, when asymmetric, one zero point; a value is
//! `(q - zero_point) * scale`, with `q` unsigned. Without stored zero points ONNX Runtime uses
//! `2^(bits-1)` (8 for 4 bits, 128 for 8 bits), which the symmetric scheme writes its values
//! around.
//!
//! Layout: `data` is `[rows, blocks, block_size * bits / 8]` bytes, 4-bit values two to a byte
//! with the first in the low nibble; `scales` is `[rows, blocks]`; `zero_points` is
//! `[rows, ceil(blocks * bits / 8)]` bytes packed the same way.

use crate::{Error, Result};

/// How a matrix is quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockScheme {
    /// Bits per value: 4 or 8.
    pub bits: u8,
    /// Values per block along a row: a power of two from 16 to 256.
    pub block_size: usize,
    /// Scales only, values centred on `2^(bits-1)`; otherwise a zero point per block too.
    pub symmetric: bool,
}

impl BlockScheme {
    /// A checked scheme.
    pub fn new(bits: u8, block_size: usize, symmetric: bool) -> Result<Self> {
        if bits != 4 && bits != 8 {
            return Err(Error::Bits(bits));
        }
        if !(16..=256).contains(&block_size) || !block_size.is_power_of_two() {
            return Err(Error::BlockSize(block_size));
        }
        Ok(BlockScheme { bits, block_size, symmetric })
    }

    /// Blocks per row of `cols` values.
    pub fn blocks(&self, cols: usize) -> usize {
        cols.div_ceil(self.block_size)
    }

    /// Bytes of one packed block.
    pub fn block_bytes(&self) -> usize {
        self.block_size * self.bits as usize / 8
    }

    /// Zero-point bytes per row.
    pub fn zero_point_bytes(&self, cols: usize) -> usize {
        (self.blocks(cols) * self.bits as usize).div_ceil(8)
    }

    /// Largest stored value.
    fn qmax(&self) -> i32 {
        (1 << self.bits) - 1
    }

    /// The zero point ONNX Runtime assumes when none is stored.
    pub fn default_zero_point(&self) -> u8 {
        1 << (self.bits - 1)
    }
}

/// A quantized matrix (see the module comment for the layout).
#[derive(Debug, Clone)]
pub struct QuantizedMatrix {
    /// Rows (`N`, outputs).
    pub rows: usize,
    /// Columns (`K`, inputs), before padding.
    pub cols: usize,
    /// The scheme.
    pub scheme: BlockScheme,
    /// `[rows, blocks, block_bytes]`.
    pub data: Vec<u8>,
    /// `[rows, blocks]`.
    pub scales: Vec<f32>,
    /// `[rows, zero_point_bytes]`, asymmetric schemes only.
    pub zero_points: Option<Vec<u8>>,
}

/// One block's scale, zero point and stored values (unsigned, before packing).
fn quantize_block(v: &[f32], s: &BlockScheme, out: &mut [u8]) -> (f32, u8) {
    let qmax = s.qmax();
    if s.symmetric {
        // The value of largest magnitude maps to -2^(bits-1), the end of the range with one more
        // step, so its sign decides the sign of the scale.
        let half = 1i32 << (s.bits - 1);
        let extreme = v.iter().copied().fold(0f32, |m, x| if x.abs() > m.abs() { x } else { m });
        let scale = best_symmetric_scale(v, extreme, half, s.bits);
        let inv = if scale == 0.0 { 0.0 } else { 1.0 / scale };
        for (o, &x) in out.iter_mut().zip(v) {
            *o = ((x * inv).round() as i32).clamp(-half, half - 1).wrapping_add(half) as u8;
        }
        (scale, half as u8)
    } else {
        // Zero stays exactly representable: the range always includes it.
        let lo = v.iter().copied().fold(0f32, f32::min);
        let hi = v.iter().copied().fold(0f32, f32::max);
        let scale = (hi - lo) / qmax as f32;
        if scale == 0.0 {
            out.iter_mut().for_each(|o| *o = 0);
            return (0.0, 0);
        }
        let zp = (-lo / scale).round().clamp(0.0, qmax as f32) as i32;
        for (o, &x) in out.iter_mut().zip(v) {
            *o = ((x / scale).round() as i32 + zp).clamp(0, qmax) as u8;
        }
        (scale, zp as u8)
    }
}

/// The symmetric scale: `extreme / -half` rounds every value to the nearest level, but a
/// slightly smaller step often lowers the block's squared error at 4 bits (the outlier is
/// clipped by less than the others gain). Tries a few steps around it and keeps the best;
/// at 8 bits the plain step is already within noise of the best.
fn best_symmetric_scale(v: &[f32], extreme: f32, half: i32, bits: u8) -> f32 {
    let base = extreme / -(half as f32);
    if base == 0.0 || bits == 8 {
        return base;
    }
    let error = |scale: f32| -> f32 {
        let inv = 1.0 / scale;
        v.iter()
            .map(|&x| {
                let q = ((x * inv).round() as i32).clamp(-half, half - 1) as f32;
                (x - q * scale).powi(2)
            })
            .sum()
    };
    let mut best = (error(base), base);
    for step in 1..=8 {
        let scale = base * (1.0 - 0.025 * step as f32);
        let e = error(scale);
        if e < best.0 {
            best = (e, scale);
        }
    }
    best.1
}

/// Quantizes `w` (`[rows, cols]`, row-major).
///
/// # Panics
/// If `w.len() != rows * cols`.
pub fn quantize(w: &[f32], rows: usize, cols: usize, scheme: BlockScheme) -> QuantizedMatrix {
    assert_eq!(w.len(), rows * cols, "matrix data does not match its shape");
    let s = scheme;
    let (blocks, bs) = (s.blocks(cols), s.block_size);
    let mut data = vec![0u8; rows * blocks * s.block_bytes()];
    let mut scales = vec![0f32; rows * blocks];
    let mut zps = vec![0u8; rows * blocks];
    let mut values = vec![0u8; bs];
    let mut padded = vec![0f32; bs];
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        for b in 0..blocks {
            let chunk = &row[b * bs..((b + 1) * bs).min(cols)];
            padded.fill(0.0);
            padded[..chunk.len()].copy_from_slice(chunk);
            let (scale, zp) = quantize_block(&padded, &s, &mut values);
            scales[r * blocks + b] = scale;
            zps[r * blocks + b] = zp;
            let out = &mut data[(r * blocks + b) * s.block_bytes()..][..s.block_bytes()];
            pack(&values, s.bits, out);
        }
    }
    let zero_points = (!s.symmetric).then(|| {
        let per_row = s.zero_point_bytes(cols);
        let mut packed = vec![0u8; rows * per_row];
        for r in 0..rows {
            pack(&zps[r * blocks..(r + 1) * blocks], s.bits, &mut packed[r * per_row..(r + 1) * per_row]);
        }
        packed
    });
    QuantizedMatrix { rows, cols, scheme: s, data, scales, zero_points }
}

/// Packs unsigned values into bytes: one per byte at 8 bits, two at 4 (first in the low nibble).
fn pack(values: &[u8], bits: u8, out: &mut [u8]) {
    if bits == 8 {
        out[..values.len()].copy_from_slice(values);
        return;
    }
    for (i, pair) in values.chunks(2).enumerate() {
        out[i] = (pair[0] & 0x0F) | (pair.get(1).copied().unwrap_or(0) << 4);
    }
}

/// Stored value `i` of a packed buffer.
fn unpack(bytes: &[u8], bits: u8, i: usize) -> u8 {
    if bits == 8 {
        bytes[i]
    } else if i.is_multiple_of(2) {
        bytes[i / 2] & 0x0F
    } else {
        bytes[i / 2] >> 4
    }
}

impl QuantizedMatrix {
    /// The matrix as ONNX Runtime reads it back, `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let s = &self.scheme;
        let blocks = s.blocks(self.cols);
        let zp_row = s.zero_point_bytes(self.cols);
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            for c in 0..self.cols {
                let b = c / s.block_size;
                let block = &self.data[(r * blocks + b) * s.block_bytes()..][..s.block_bytes()];
                let q = unpack(block, s.bits, c % s.block_size) as f32;
                let zp = match &self.zero_points {
                    Some(z) => unpack(&z[r * zp_row..(r + 1) * zp_row], s.bits, b),
                    None => s.default_zero_point(),
                } as f32;
                out.push((q - zp) * self.scales[r * blocks + b]);
            }
        }
        out
    }

    /// Bytes stored: data, scales and zero points.
    pub fn stored_bytes(&self) -> usize {
        self.data.len() + 4 * self.scales.len() + self.zero_points.as_ref().map_or(0, Vec::len)
    }
}

/// Per-column symmetric int8 of a `[K, N]` matrix (the layout `MatMul(x, W)` reads): one scale
/// per output column, `max |w| / qmax`, values rounded into `-qmax..=qmax` (127 for the full
/// range, 63 for 7 bits). Returns the values row-major `[K, N]` and the `N` scales.
pub fn quantize_per_column(w: &[f32], k: usize, n: usize, qmax: i8) -> (Vec<i8>, Vec<f32>) {
    let qmax = qmax as f32;
    assert_eq!(w.len(), k * n, "matrix data does not match its shape");
    let mut scales = vec![0f32; n];
    for row in w.chunks_exact(n) {
        for (s, x) in scales.iter_mut().zip(row) {
            *s = s.max(x.abs());
        }
    }
    scales.iter_mut().for_each(|s| *s /= qmax);
    let q = w
        .chunks_exact(n)
        .flat_map(|row| {
            row.iter().zip(&scales).map(|(x, s)| if *s == 0.0 { 0 } else { (x / s).round().clamp(-qmax, qmax) as i8 })
        })
        .collect();
    (q, scales)
}

#[cfg(test)]
mod tests {
    #[test]
    fn per_column_int8_by_hand() {
        // Column 0: max 2.54 -> scale 0.02 (0.009 is 0.45 steps: 0); column 1 all zero -> scale 0.
        let w = [2.54f32, 0.0, -1.0, 0.0, 0.009, 0.0];
        let (q, s) = super::quantize_per_column(&w, 3, 2, 127);
        assert_eq!(s, [2.54 / 127.0, 0.0]);
        assert_eq!(q, [127, 0, -50, 0, 0, 0]);
        // 7 bits: scale 2.54 / 63, -1.0 -> -24.8 -> -25.
        let (q, s) = super::quantize_per_column(&w, 3, 2, 63);
        assert_eq!((s[0], q[..3].to_vec()), (2.54 / 63.0, vec![63, 0, -25]));
    }

    use super::*;

    fn scheme(bits: u8, symmetric: bool) -> BlockScheme {
        BlockScheme::new(bits, 16, symmetric).unwrap()
    }

    #[test]
    fn symmetric_8_bit_by_hand() {
        // Largest magnitude -2.54 maps to -128: scale 2.54 / 128 = 0.01984375.
        let mut row = vec![0f32; 16];
        row[0] = -2.54;
        row[1] = 1.0;
        row[2] = 0.01;
        let q = quantize(&row, 1, 16, scheme(8, true));
        assert_eq!(q.scales, [0.01984375]);
        assert!(q.zero_points.is_none());
        // 1.0 / 0.01984375 = 50.39 -> 50, stored 178; 0.01 / 0.01984375 = 0.504 -> 1, stored 129.
        assert_eq!(&q.data[..4], &[0, 178, 129, 128]);
        let back = q.dequantize();
        assert_eq!(back[0], -2.54);
        assert!((back[1] - 50.0 * 0.01984375).abs() < 1e-7);
    }

    #[test]
    fn a_positive_extreme_gives_a_negative_scale_and_keeps_the_extra_level() {
        // 1.6 maps to -128 with scale -0.0125, so -1.5875 (127 steps) is exact too.
        let mut row = vec![0f32; 16];
        row[0] = 1.6;
        row[1] = -1.5875;
        let q = quantize(&row, 1, 16, scheme(8, true));
        assert_eq!(q.scales, [-0.0125]);
        assert_eq!(&q.data[..3], &[0, 255, 128]);
        let back = q.dequantize();
        assert_eq!(back[0], 1.6);
        assert!((back[1] + 1.5875).abs() < 1e-6, "{}", back[1]);
    }

    #[test]
    fn four_bit_values_pack_low_nibble_first() {
        // Values -8..7 times 0.5: exact at 4 bits, stored 0..15.
        let row: Vec<f32> = (0..16).map(|i| (i as f32 - 8.0) * 0.5).collect();
        let q = quantize(&row, 1, 16, scheme(4, true));
        assert_eq!(q.scales, [0.5]);
        assert_eq!(q.data, [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]);
        assert_eq!(q.dequantize(), row);
    }

    #[test]
    fn asymmetric_keeps_zero_and_packs_zero_points() {
        // Block 0: 0..=3 -> scale 0.2, zero point 0; block 1: -1..=0.5 -> scale 0.1, zp 10.
        let mut row = vec![0f32; 32];
        row[0] = 3.0;
        row[16] = -1.0;
        row[17] = 0.5;
        let q = quantize(&row, 1, 32, scheme(4, false));
        assert_eq!(q.scales.len(), 2);
        assert!((q.scales[0] - 0.2).abs() < 1e-7 && (q.scales[1] - 0.1).abs() < 1e-7, "{:?}", q.scales);
        assert_eq!(q.zero_points.as_deref(), Some(&[0xA0][..]));
        let back = q.dequantize();
        for (a, b) in back.iter().zip(&row) {
            assert!((a - b).abs() < 1e-6, "{back:?}");
        }
    }

    #[test]
    fn rows_are_padded_to_whole_blocks() {
        // 20 columns: two blocks per row, the second holding 4 values and 12 zeros.
        let w: Vec<f32> = (0..40).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let q = quantize(&w, 2, 20, scheme(8, false));
        assert_eq!((q.data.len(), q.scales.len()), (2 * 2 * 16, 4));
        assert_eq!(q.zero_points.as_ref().map(Vec::len), Some(4));
        let back = q.dequantize();
        assert_eq!(back.len(), 40);
        for (a, b) in back.iter().zip(&w) {
            assert!((a - b).abs() <= 0.03, "{a} vs {b}");
        }
    }

    #[test]
    fn error_stays_within_half_a_step() {
        let w: Vec<f32> = (0..64 * 8).map(|i| ((i as f32 * 0.37).sin() * 3.0).powi(3)).collect();
        for (bits, symmetric) in [(8, true), (8, false), (4, true), (4, false)] {
            let q = quantize(&w, 8, 64, scheme(bits, symmetric));
            let back = q.dequantize();
            for (i, (a, b)) in back.iter().zip(&w).enumerate() {
                let step = q.scales[i / 16].abs();
                // Symmetric blocks have one level fewer on the side opposite their extreme, so a
                // value there may be clipped by up to one step; at 4 bits the searched scale may
                // also clip the extreme by its shrink (at most 20%).
                let bound = match (symmetric, bits) {
                    (false, _) => 0.5001 * step + 1e-6,
                    (true, 8) => 1.0001 * step,
                    _ => 1.0001 * step + 0.2 * b.abs(),
                };
                assert!((a - b).abs() <= bound, "{bits}-bit {symmetric}: {a} vs {b} (step {step})");
            }
        }
    }

    #[test]
    fn the_scale_search_never_does_worse_than_plain_rounding() {
        let w: Vec<f32> = (0..16 * 32).map(|i| ((i as f32 * 1.7).sin() * 2.0).powi(3)).collect();
        let s = scheme(4, true);
        let q = quantize(&w, 32, 16, s);
        let back = q.dequantize();
        for r in 0..32 {
            let row = &w[r * 16..(r + 1) * 16];
            let extreme = row.iter().copied().fold(0f32, |m, x| if x.abs() > m.abs() { x } else { m });
            let plain = extreme / -8.0;
            let plain_err: f32 =
                row.iter().map(|&x| (x - ((x / plain).round().clamp(-8.0, 7.0) * plain)).powi(2)).sum();
            let err: f32 = row.iter().zip(&back[r * 16..]).map(|(a, b)| (a - b).powi(2)).sum();
            assert!(err <= plain_err + 1e-6, "row {r}: {err} > {plain_err}");
        }
    }

    #[test]
    fn bad_schemes_are_refused_with_the_reason() {
        assert!(BlockScheme::new(3, 32, true).unwrap_err().to_string().contains("3-bit"));
        assert!(BlockScheme::new(4, 48, true).unwrap_err().to_string().contains("power of two"));
        assert!(BlockScheme::new(8, 8, true).is_err());
    }
}
