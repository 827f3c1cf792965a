//! The EWC penalty's sum `sum(F * d^2)` over a weight update `d` with Fisher diagonal `F`, and
//! its gradient.

/// `sum(f[i] * d[i]^2)`, accumulated in f64.
pub fn weighted_square_sum(d: &[f32], fisher: &[f32]) -> f64 {
    d.iter().zip(fisher).map(|(&x, &f)| f as f64 * (x as f64) * (x as f64)).sum()
}

/// The gradient of `g_out * sum(f * d^2)` with respect to `d`: `2 g_out f[i] d[i]`.
pub fn weighted_square_gradient(d: &[f32], fisher: &[f32], g_out: f32) -> Vec<f32> {
    let g = 2.0 * g_out;
    d.iter().zip(fisher).map(|(&x, &f)| g * f * x).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn sum_and_gradient_by_hand() {
        let (d, f) = ([1.0f32, -2.0, 0.5], [0.5f32, 0.25, 4.0]);
        // 0.5 + 1.0 + 1.0
        assert_eq!(super::weighted_square_sum(&d, &f), 2.5);
        assert_eq!(super::weighted_square_gradient(&d, &f, 3.0), [3.0, -3.0, 12.0]);
    }
}
