//! Activation ranges for static quantization: the extremes and a histogram of the values a
//! tensor took over the calibration samples (min-max, or percentiles that ignore the few
//! outliers that would otherwise stretch the scale), and per-channel magnitudes for smoothing.
//! Running the graph to see those values is `edgelm-distill`'s `quantize::calibrate`.

/// How a tensor's range is chosen from the values calibration saw.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "method")]
pub enum RangeMethod {
    /// The smallest and largest value seen.
    MinMax,
    /// The `percentile`-th percentile of the values seen (and the `100 - percentile`-th below).
    Percentile {
        /// In (50, 100], e.g. 99.999.
        percentile: f32,
    },
}

impl RangeMethod {
    /// The method's name as the manifest records it (`min-max`, `percentile 99.999`).
    pub fn describe(&self) -> String {
        match self {
            RangeMethod::MinMax => "min-max".into(),
            RangeMethod::Percentile { percentile } => format!("percentile {percentile}"),
        }
    }
}

/// The range of one activation tensor, and the uint8 quantization it implies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActivationRange {
    /// Lowest value to represent.
    pub min: f32,
    /// Highest value to represent.
    pub max: f32,
}

impl ActivationRange {
    /// Scale and zero point of an asymmetric uint8 quantization covering the range, widened to
    /// contain 0 so that zero (padding, ReLU output) is exact: `x = (q - zero_point) * scale`.
    pub fn uint8_params(&self) -> (f32, u8) {
        let (lo, hi) = (self.min.min(0.0), self.max.max(0.0));
        if !(hi - lo).is_finite() || hi - lo <= 0.0 {
            return (1.0, 0);
        }
        let scale = (hi - lo) / 255.0;
        let zero_point = (-lo / scale).round().clamp(0.0, 255.0) as u8;
        (scale, zero_point)
    }
}

/// Bins of the histogram percentiles are read from.
const BINS: usize = 4096;

/// Values seen for one tensor over the calibration samples.
#[derive(Debug, Clone)]
pub struct RangeCollector {
    min: f32,
    max: f32,
    /// Counts over `[lo, hi]` (second pass of a percentile calibration).
    histogram: Option<(f32, f32, Vec<u64>)>,
}

impl Default for RangeCollector {
    fn default() -> Self {
        RangeCollector { min: f32::INFINITY, max: f32::NEG_INFINITY, histogram: None }
    }
}

impl RangeCollector {
    /// First pass: the extremes.
    pub fn observe(&mut self, values: &[f32]) {
        for &v in values.iter().filter(|v| v.is_finite()) {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
    }

    /// Second pass (percentiles only): counts in bins spanning the extremes of the first.
    pub fn count(&mut self, values: &[f32]) {
        let (lo, hi) = (self.min, self.max);
        let (_, _, bins) = self.histogram.get_or_insert_with(|| (lo, hi, vec![0; BINS]));
        let width = (hi - lo) / BINS as f32;
        for &v in values.iter().filter(|v| v.is_finite()) {
            let b = if width > 0.0 { ((v - lo) / width) as usize } else { 0 };
            bins[b.min(BINS - 1)] += 1;
        }
    }

    /// The range by `method` (min-max if no histogram was counted).
    pub fn range(&self, method: RangeMethod) -> ActivationRange {
        if !self.min.is_finite() {
            return ActivationRange { min: 0.0, max: 0.0 };
        }
        let (RangeMethod::Percentile { percentile }, Some((lo, hi, bins))) = (method, &self.histogram) else {
            return ActivationRange { min: self.min, max: self.max };
        };
        let total: u64 = bins.iter().sum();
        let width = (hi - lo) / BINS as f32;
        // Values beyond the kept share on either side are clipped.
        let tail = ((100.0 - percentile as f64) / 100.0 * total as f64).floor() as u64;
        let mut below = 0;
        let mut first = 0;
        for (i, c) in bins.iter().enumerate() {
            if below + c > tail {
                first = i;
                break;
            }
            below += c;
        }
        let mut above = 0;
        let mut last = BINS - 1;
        for (i, c) in bins.iter().enumerate().rev() {
            if above + c > tail {
                last = i;
                break;
            }
            above += c;
        }
        ActivationRange { min: lo + first as f32 * width, max: (lo + (last + 1) as f32 * width).min(*hi) }
    }
}

/// Raises each of `absmax[c]` to the largest finite `|x|` of channel `c` (the last axis) in
/// `data`, rows of `absmax.len()` values; a trailing partial row is ignored.
pub fn fold_channel_absmax(absmax: &mut [f32], data: &[f32]) {
    let width = absmax.len().max(1);
    for row in data.chunks_exact(width) {
        for (a, v) in absmax.iter_mut().zip(row) {
            if v.is_finite() {
                *a = a.max(v.abs());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_absmax_by_hand() {
        let mut m = [0.5f32, 0.0];
        fold_channel_absmax(&mut m, &[-2.0, 1.0, 0.25, f32::NAN, 1.5, -3.0]);
        assert_eq!(m, [2.0, 3.0]);
    }

    #[test]
    fn uint8_params_by_hand() {
        // [-1, 3]: 4 / 255 per step, zero at 1 / (4/255) = 63.75 -> 64.
        let (s, z) = ActivationRange { min: -1.0, max: 3.0 }.uint8_params();
        assert!((s - 4.0 / 255.0).abs() < 1e-9);
        assert_eq!(z, 64);
        // All positive: widened to [0, 2.55], zero point 0, step 0.01.
        let (s, z) = ActivationRange { min: 0.5, max: 2.55 }.uint8_params();
        assert!((s - 0.01).abs() < 1e-7);
        assert_eq!(z, 0);
        // All negative: widened to [-5.1, 0], zero point 255.
        let (s, z) = ActivationRange { min: -5.1, max: -1.0 }.uint8_params();
        assert!((s - 0.02).abs() < 1e-7);
        assert_eq!(z, 255);
        // Nothing seen or constant zero: a harmless scale.
        assert_eq!(ActivationRange { min: 0.0, max: 0.0 }.uint8_params(), (1.0, 0));
    }

    #[test]
    fn percentile_clips_outliers_min_max_keeps_them() {
        // 10 000 values spread over [0, 1) and one outlier at 100.
        let mut values: Vec<f32> = (0..10_000).map(|i| i as f32 / 10_000.0).collect();
        values.push(100.0);
        let mut c = RangeCollector::default();
        c.observe(&values);
        assert_eq!(c.range(RangeMethod::MinMax), ActivationRange { min: 0.0, max: 100.0 });
        c.count(&values);
        // 99.9%: 10 values may be clipped on each side; the outlier is one of them.
        let r = c.range(RangeMethod::Percentile { percentile: 99.9 });
        assert_eq!(r.min, 0.0);
        // The bin holding 0.9999 ends within one bin width (100 / 4096) above it.
        assert!(r.max >= 0.9999 && r.max < 0.9999 + 100.0 / 4096.0 + 1e-4, "{r:?}");
        // 100%: nothing clipped.
        assert_eq!(c.range(RangeMethod::Percentile { percentile: 100.0 }).max, 100.0);
    }
}
