//! Choosing the next token from one row of logits.
//!
//! The steps run in the same order as the Hugging Face `transformers` sampler.
//! (1) Repetition penalty, CTRL style: each *distinct* id `t` in the history has
//! its logit `z_t` changed once, to `z_t / r` if `z_t > 0` and to `z_t * r`
//! otherwise. (2) With greedy settings the result is
//! `argmax_i z_i`, and ties go to the lowest index. Otherwise:
//! (3) temperature, `x_i = z_i / T`; (4) top-k, which keeps the `k` largest `x_i`
//! (ties again go to the lowest index); (5) a softmax over what is left,
//! `p_i = exp(x_i - max x) / sum_j exp(x_j - max x)`; (6) nucleus (top-p), which
//! keeps the smallest set of most-likely tokens whose probabilities add up to at
//! least `top_p`, never fewer than one token; (7) the kept probabilities are
//! renormalised and one token is drawn from them using [`Rng`]. NaN logits count
//! as `-inf`, so they are never picked while any other logit is finite.
//! For given parameters (seed included), the same logits and history always give
//! the same token sequence. After the first call, [`Sampler::sample`] reuses its
//! buffers and does not allocate on the heap.

use std::cmp::Ordering;

/// Settings that control how [`Sampler`] picks a token.
///
/// The defaults give greedy decoding (plain argmax) with every filter turned off.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct SamplingParams {
    /// Softmax temperature. A value of `0` or below (or NaN) means greedy decoding.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens before sampling. `0` turns this off.
    /// `1` always gives the argmax token.
    pub top_k: usize,
    /// Nucleus threshold in `(0, 1]`. `1.0` (or more) turns it off. `0.0` or below
    /// keeps only the single most likely token.
    pub top_p: f32,
    /// CTRL-style repetition penalty. `1.0` turns it off. Values that are not
    /// finite, or not above zero, are ignored.
    pub repetition_penalty: f32,
    /// Seed for the random number generator used while sampling.
    pub seed: u64,
}

impl Default for SamplingParams {
    /// Greedy decoding: temperature 0, top_k 0, top_p 1.0,
    /// repetition_penalty 1.0, seed 0.
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0 }
    }
}

impl SamplingParams {
    /// With this softmax temperature (0 or below: greedy).
    pub fn with_temperature(mut self, t: f32) -> Self {
        self.temperature = t;
        self
    }

    /// Keeping the `k` most likely tokens (0: all).
    pub fn with_top_k(mut self, k: usize) -> Self {
        self.top_k = k;
        self
    }

    /// With nucleus threshold `p` (1.0: off).
    pub fn with_top_p(mut self, p: f32) -> Self {
        self.top_p = p;
        self
    }

    /// With this repetition penalty (1.0: off).
    pub fn with_repetition_penalty(mut self, r: f32) -> Self {
        self.repetition_penalty = r;
        self
    }

    /// With this seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Returns `true` when these settings always choose the argmax token. That is
    /// so when the temperature is not above zero (NaN included) or when
    /// `top_k == 1`. No random numbers are drawn in that case.
    pub fn is_greedy(&self) -> bool {
        self.temperature.is_nan() || self.temperature <= 0.0 || self.top_k == 1
    }

    fn penalty_active(&self) -> bool {
        let r = self.repetition_penalty;
        r.is_finite() && r > 0.0 && r != 1.0
    }
}

/// A small, fast, deterministic pseudo-random generator: xoshiro256\*\*, with its
/// state filled from the seed by SplitMix64.
///
/// It is not suitable for cryptography. Its only purpose is sampling that can be
/// reproduced.
#[derive(Debug, Clone)]
pub(crate) struct Rng {
    s: [u64; 4],
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// Creates a generator whose whole output sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let mut s = [0u64; 4];
        for word in s.iter_mut() {
            *word = splitmix64(&mut sm);
        }
        // xoshiro must not start from an all-zero state. SplitMix64 practically
        // never gives one, but the check costs nothing.
        if s.iter().all(|&w| w == 0) {
            s[0] = 0x9E37_79B9_7F4A_7C15;
        }
        Self { s }
    }

    /// Returns the next 64 uniformly distributed random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Returns a uniform `f32` in `[0, 1)`, built from 24 random bits.
    #[cfg(test)]
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / 16_777_216.0)
    }

    /// Returns a uniform `f64` in `[0, 1)`, built from 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }
}

/// Index of the largest logit. Ties go to the lowest index.
///
/// NaN entries are skipped, which is the same as treating them as `-inf`. The
/// function returns `0` when the slice is empty or no entry is above `-inf`.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best_idx = 0usize;
    let mut best = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        // `>` is false for NaN, so NaN never wins; strict `>` keeps the first of ties.
        if v > best {
            best = v;
            best_idx = i;
        }
    }
    best_idx as u32
}

/// Comparison for (score, id) pairs: higher score first, then lower id first.
/// Scores in the scratch buffer are never NaN.
#[inline]
fn desc(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.partial_cmp(&a.0).unwrap_or(Ordering::Equal).then(a.1.cmp(&b.1))
}

/// The first nucleus pass sorts this many candidates. If their mass is short of
/// the target, the next pass sorts four times as many.
const TOP_P_FIRST_WINDOW: usize = 64;

/// Picks tokens from logits using fixed [`SamplingParams`] and its own [`Rng`].
///
/// Use one `Sampler` per generated sequence. It keeps scratch buffers between
/// calls, so picking a token does not allocate once the buffers have grown to
/// the vocabulary size.
#[derive(Debug, Clone)]
pub(crate) struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// (score, token id) candidates. Scores are scaled logits at first and
    /// unnormalised probabilities after the softmax.
    scratch: Vec<(f32, u32)>,
    /// The history with duplicates removed, so that each id is penalised once.
    seen: Vec<u32>,
}

impl Sampler {
    /// Creates a sampler with its random generator seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        Self { rng: Rng::new(params.seed), params, scratch: Vec::new(), seen: Vec::new() }
    }

    /// Picks the next token id from `logits`, one row of length `vocab`.
    ///
    /// `history` holds the ids already in the context (prompt and/or generated
    /// tokens); only the repetition penalty looks at it, and ids outside the
    /// vocabulary are ignored. The repetition penalty is applied to `logits`
    /// itself, so the caller sees the changed values afterwards. Other steps
    /// work on an internal copy. The result is always below `logits.len()`,
    /// except that an empty row gives `0`. If every logit is NaN or `-inf`, the
    /// result is `0`.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        if logits.is_empty() {
            return 0;
        }
        self.apply_repetition_penalty(logits, history);

        if self.params.is_greedy() {
            return argmax(logits);
        }

        let temperature = self.params.temperature;
        self.scratch.clear();
        self.scratch.extend(logits.iter().enumerate().map(|(i, &v)| {
            let x = if v.is_nan() { f32::NEG_INFINITY } else { v / temperature };
            (x, i as u32)
        }));

        // Top-k: partial selection, O(vocab) on average, no full sort.
        let k = self.params.top_k;
        if k > 0 && k < self.scratch.len() {
            self.scratch.select_nth_unstable_by(k - 1, desc);
            self.scratch.truncate(k);
        }

        // Numerically stable softmax (unnormalised, the sum is kept aside).
        let max = self.scratch.iter().fold(f32::NEG_INFINITY, |m, &(x, _)| if x > m { x } else { m });
        if max == f32::NEG_INFINITY {
            // Every entry is -inf or NaN: nothing can be sampled meaningfully.
            return argmax(logits);
        }
        let mut total = 0.0f64;
        if max == f32::INFINITY {
            // Overflow from a tiny temperature or +inf logits: +inf entries share
            // all of the mass equally.
            for c in self.scratch.iter_mut() {
                c.0 = if c.0 == f32::INFINITY { 1.0 } else { 0.0 };
                total += c.0 as f64;
            }
        } else {
            for c in self.scratch.iter_mut() {
                c.0 = (c.0 - max).exp();
                total += c.0 as f64;
            }
        }

        // Nucleus filtering.
        let top_p = self.params.top_p;
        if (top_p.is_nan() || top_p < 1.0) && self.scratch.len() > 1 {
            total = self.apply_top_p(top_p, total);
        }

        self.draw(total)
    }

    /// CTRL-style penalty, applied once to each distinct id in `history`.
    fn apply_repetition_penalty(&mut self, logits: &mut [f32], history: &[u32]) {
        if !self.params.penalty_active() || history.is_empty() {
            return;
        }
        let r = self.params.repetition_penalty;
        self.seen.clear();
        self.seen.extend_from_slice(history);
        self.seen.sort_unstable();
        self.seen.dedup();
        for &id in &self.seen {
            if let Some(z) = logits.get_mut(id as usize) {
                // NaN stays NaN (and is treated as -inf later); -inf stays -inf.
                *z = if *z > 0.0 { *z / r } else { *z * r };
            }
        }
    }

    /// Keeps the smallest prefix, in descending probability order, whose mass
    /// reaches `top_p * total`, and always at least one token. Returns the
    /// kept mass.
    ///
    /// The sort covers only as many of the most likely tokens as it has to:
    /// first [`TOP_P_FIRST_WINDOW`] of them, then four times as many at each
    /// further pass, and the full candidate list only when the nucleus is that
    /// large.
    fn apply_top_p(&mut self, top_p: f32, total: f64) -> f64 {
        let n = self.scratch.len();
        // NaN or top_p <= 0 gives a target of 0, so only the first token is kept.
        let target = if top_p > 0.0 { top_p as f64 * total } else { 0.0 };
        let mut window = TOP_P_FIRST_WINDOW.min(n);
        loop {
            if window < n {
                self.scratch.select_nth_unstable_by(window - 1, desc);
            }
            self.scratch[..window].sort_unstable_by(desc);

            let mut cum = 0.0f64;
            let mut cut = None;
            for (i, &(p, _)) in self.scratch[..window].iter().enumerate() {
                cum += p as f64;
                if cum >= target {
                    cut = Some((i + 1, cum));
                    break;
                }
            }
            match cut {
                Some((keep, mass)) => {
                    self.scratch.truncate(keep.max(1));
                    return mass;
                }
                None if window == n => {
                    // Rounding kept the sum just under the target: keep everything.
                    return cum;
                }
                None => window = window.saturating_mul(4).min(n),
            }
        }
    }

    /// Draws one candidate, with probability proportional to its score.
    fn draw(&mut self, total: f64) -> u32 {
        let r = self.rng.next_f64() * total;
        let mut cum = 0.0f64;
        let mut last_positive = self.scratch[0].1;
        for &(p, id) in &self.scratch {
            if p > 0.0 {
                cum += p as f64;
                last_positive = id;
                if cum > r {
                    return id;
                }
            }
        }
        // Only reached through rounding: choose the last token with mass.
        last_positive
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, repetition_penalty: 1.0, seed }
    }

    /// Logits that follow a simple deterministic pattern, with a unique maximum at `peak`.
    fn test_logits(n: usize, peak: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0).collect();
        v[peak] = 5.0;
        v
    }

    #[test]
    fn default_is_greedy() {
        let p = SamplingParams::default();
        assert!(p.is_greedy());
        assert_eq!(p.top_k, 0);
        assert_eq!(p.top_p, 1.0);
        assert_eq!(p.repetition_penalty, 1.0);
        assert!(!params(0.7, 0, 1.0, 0).is_greedy());
        assert!(params(0.7, 1, 1.0, 0).is_greedy());
    }

    #[test]
    fn argmax_ties_lowest_index() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[f32::NAN, -1.0, f32::NAN]), 1);
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::default());
        for peak in [0usize, 17, 999] {
            let mut l = test_logits(1000, peak);
            let expect = argmax(&l);
            assert_eq!(expect as usize, peak);
            assert_eq!(s.sample(&mut l, &[]), expect);
        }
    }

    #[test]
    fn top_k_one_is_argmax_for_many_seeds() {
        // Close values, so that real sampling would often pick something else.
        let base: Vec<f32> = (0..500).map(|i| ((i * 7919 % 500) as f32) * 1e-3).collect();
        let expect = argmax(&base);
        for seed in 0..200u64 {
            let mut s = Sampler::new(params(1.0, 1, 1.0, seed));
            let mut l = base.clone();
            assert_eq!(s.sample(&mut l, &[]), expect, "seed {seed}");
        }
        // With a tie for the maximum, top_k = 1 still gives the lowest index.
        let tied = [0.5f32, 2.0, 1.0, 2.0];
        for seed in 0..50u64 {
            let mut s = Sampler::new(params(1.0, 1, 1.0, seed));
            let mut l = tied;
            assert_eq!(s.sample(&mut l, &[]), 1);
        }
    }

    #[test]
    fn same_seed_same_sequence() {
        let base = vec![0.0f32; 256];
        let run = |seed: u64| -> Vec<u32> {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed));
            (0..64)
                .map(|_| {
                    let mut l = base.clone();
                    s.sample(&mut l, &[])
                })
                .collect()
        };
        assert_eq!(run(42), run(42));

        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        for _ in 0..1000 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
    }

    #[test]
    fn different_seeds_differ() {
        let base = vec![0.0f32; 256];
        let run = |seed: u64| -> Vec<u32> {
            let mut s = Sampler::new(params(1.0, 0, 0.95, seed));
            (0..64)
                .map(|_| {
                    let mut l = base.clone();
                    s.sample(&mut l, &[])
                })
                .collect()
        };
        let a = run(1);
        let b = run(2);
        let c = run(3);
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_ne!(b, c);
        // A uniform distribution over 256 tokens gives many different ids.
        let mut distinct = a.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() > 30, "only {} distinct ids", distinct.len());
    }

    #[test]
    fn rng_floats_in_unit_interval() {
        let mut r = Rng::new(0);
        for _ in 0..100_000 {
            let f = r.next_f32();
            assert!((0.0..1.0).contains(&f));
            let d = r.next_f64();
            assert!((0.0..1.0).contains(&d));
        }
    }

    #[test]
    fn tiny_top_p_keeps_only_top_token() {
        let base = test_logits(300, 123);
        for seed in 0..200u64 {
            let mut s = Sampler::new(params(1.5, 0, 1e-6, seed));
            let mut l = base.clone();
            assert_eq!(s.sample(&mut l, &[]), 123);
        }
        for seed in 0..50u64 {
            let mut s = Sampler::new(params(1.5, 0, 0.0, seed));
            let mut l = base.clone();
            assert_eq!(s.sample(&mut l, &[]), 123);
        }
    }

    #[test]
    fn top_p_large_nucleus_needs_several_windows() {
        // 200 equally likely tokens with top_p = 0.9: 180 are kept, more than
        // the first window, so the window has to grow.
        let base = vec![0.0f32; 200];
        let mut s = Sampler::new(params(1.0, 0, 0.9, 9));
        let mut seen = [false; 200];
        for _ in 0..8_000 {
            let mut l = base.clone();
            let id = s.sample(&mut l, &[]) as usize;
            assert!(id < 200);
            seen[id] = true;
        }
        let count = seen.iter().filter(|&&b| b).count();
        assert!(count > 170 && count <= 181, "distinct = {count}");
    }

    #[test]
    fn repetition_penalty_changes_argmax() {
        let rp = |r: f32| SamplingParams { repetition_penalty: r, ..SamplingParams::default() };
        // Positive logit: divided.
        let mut s = Sampler::new(rp(1.2));
        let mut l = vec![2.0f32, 1.9, -1.0];
        assert_eq!(argmax(&l), 0);
        assert_eq!(s.sample(&mut l, &[0, 7_000]), 1);
        assert!((l[0] - 2.0 / 1.2).abs() < 1e-6);

        // Negative logit: multiplied.
        let mut l = vec![-1.0f32, -1.1];
        assert_eq!(s.sample(&mut l, &[0]), 1);

        // A repeated id is penalised only once: 2.0 / 1.2 = 1.67 > 1.5, whereas
        // a second division would give 1.39 < 1.5.
        let mut l = vec![2.0f32, 1.5];
        assert_eq!(s.sample(&mut l, &[0, 0, 0]), 0);
        assert!((l[0] - 2.0 / 1.2).abs() < 1e-6);

        // A penalty of 1.0 changes nothing.
        let mut s = Sampler::new(rp(1.0));
        let mut l = vec![2.0f32, 1.9];
        assert_eq!(s.sample(&mut l, &[0]), 0);
        assert_eq!(l, vec![2.0, 1.9]);
    }

    #[test]
    fn frequencies_match_softmax() {
        let logits = [1.0f32, 2.0, 0.5];
        let m = 2.0f32;
        let e: Vec<f64> = logits.iter().map(|&x| ((x - m) as f64).exp()).collect();
        let z: f64 = e.iter().sum();
        let expect: Vec<f64> = e.iter().map(|v| v / z).collect();

        let draws = 20_000usize;
        let mut counts = [0usize; 3];
        let mut s = Sampler::new(params(1.0, 0, 1.0, 12345));
        for _ in 0..draws {
            let mut l = logits;
            counts[s.sample(&mut l, &[]) as usize] += 1;
        }
        for (i, (&c, &p)) in counts.iter().zip(expect.iter()).enumerate() {
            let freq = c as f64 / draws as f64;
            assert!((freq - p).abs() < 0.02, "token {i}: freq {freq:.4} vs p {p:.4}");
        }
    }

    #[test]
    fn top_k_restricts_support() {
        let base = [0.1f32, 3.0, 0.2, 2.9, 0.0, 2.8];
        let mut s = Sampler::new(params(1.0, 2, 1.0, 5));
        for _ in 0..2_000 {
            let mut l = base;
            let id = s.sample(&mut l, &[]);
            assert!(id == 1 || id == 3, "got {id}");
        }
    }

    #[test]
    fn nan_does_not_panic() {
        let nan_row = [f32::NAN, 1.0, f32::NAN, 0.5, f32::NAN];
        for p in [
            SamplingParams::default(),
            params(1.0, 0, 1.0, 1),
            params(0.8, 2, 0.9, 2),
            params(1.0, 0, 0.5, 3),
            SamplingParams { repetition_penalty: 1.3, ..params(1.0, 3, 0.95, 4) },
        ] {
            let mut s = Sampler::new(p);
            for _ in 0..200 {
                let mut l = nan_row;
                let id = s.sample(&mut l, &[0, 1, 2]);
                assert!(id == 1 || id == 3, "NaN slot {id} chosen with {p:?}");
            }
            // Rows that are all NaN or all -inf, and an empty row, must not panic.
            let mut all_nan = [f32::NAN; 4];
            assert!(s.sample(&mut all_nan, &[]) < 4);
            let mut all_neg = [f32::NEG_INFINITY; 4];
            assert!(s.sample(&mut all_neg, &[]) < 4);
            let mut empty: [f32; 0] = [];
            assert_eq!(s.sample(&mut empty, &[]), 0);
            let mut with_inf = [0.0f32, f32::INFINITY, 1.0];
            assert_eq!(s.sample(&mut with_inf, &[]), 1);
        }
    }
}
