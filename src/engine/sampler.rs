//! Token sampling for one row: temperature, top-k, top-p and a seeded RNG. The logprob reported
//! for a sampled token is taken after temperature and before top-k/top-p truncation, which is
//! exactly what the learner recomputes (`log_softmax(logits / t)`), so ratios start at 1.

/// A small, seedable PRNG (SplitMix64): per-request seeds give reproducible samples.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// The generator whose internal state is `state` (plain SplitMix64 seeding).
    pub fn from_state(state: u64) -> Self {
        Self(state)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Sampling settings of one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    /// 1.0 disables nucleus sampling.
    pub top_p: f64,
    /// 0 (or negative) disables top-k.
    pub top_k: i64,
}

/// Picks a token from `logprobs` (already `log_softmax(logits / t)`, or of the raw logits when
/// greedy). Returns the token id.
pub fn sample(logprobs: &[f32], params: &SamplingParams, rng: &mut Rng) -> usize {
    if params.temperature <= 0.0 {
        return argmax(logprobs);
    }
    let mut order: Vec<usize> = (0..logprobs.len()).collect();
    let truncate = params.top_k > 0 || params.top_p < 1.0;
    if truncate {
        order.sort_unstable_by(|&a, &b| logprobs[b].total_cmp(&logprobs[a]));
        if params.top_k > 0 {
            order.truncate(params.top_k as usize);
        }
        if params.top_p < 1.0 {
            let mut mass = 0.0f64;
            let mut keep = 0;
            for &i in &order {
                keep += 1;
                mass += f64::from(logprobs[i]).exp();
                if mass >= params.top_p {
                    break;
                }
            }
            order.truncate(keep.max(1));
        }
    }
    let total: f64 = order.iter().map(|&i| f64::from(logprobs[i]).exp()).sum();
    let mut target = rng.next_f64() * total;
    for &i in &order {
        target -= f64::from(logprobs[i]).exp();
        if target <= 0.0 {
            return i;
        }
    }
    order.last().copied().unwrap_or(0)
}

/// Index of the largest value (the first one on ties).
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

/// The `k` most likely token ids, best first.
pub fn top_k_ids(logprobs: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..logprobs.len()).collect();
    order.sort_unstable_by(|&a, &b| logprobs[b].total_cmp(&logprobs[a]));
    order.truncate(k);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_softmax(x: &[f32]) -> Vec<f32> {
        let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z: f32 = x.iter().map(|v| (v - m).exp()).sum();
        x.iter().map(|v| v - m - z.ln()).collect()
    }

    #[test]
    fn greedy_top_k_and_top_p() {
        let lp = log_softmax(&[0.0, 3.0, 1.0, 2.0]);
        let mut rng = Rng::new(1);
        assert_eq!(
            sample(
                &lp,
                &SamplingParams {
                    temperature: 0.0,
                    top_p: 1.0,
                    top_k: 0
                },
                &mut rng
            ),
            1
        );
        for _ in 0..200 {
            let t = sample(
                &lp,
                &SamplingParams {
                    temperature: 1.0,
                    top_p: 1.0,
                    top_k: 2,
                },
                &mut rng,
            );
            assert!(t == 1 || t == 3, "top-2 keeps tokens 1 and 3, got {t}");
            let t = sample(
                &lp,
                &SamplingParams {
                    temperature: 1.0,
                    top_p: 0.5,
                    top_k: 0,
                },
                &mut rng,
            );
            assert_eq!(t, 1, "token 1 alone holds more than half the mass");
        }
    }

    #[test]
    fn sampling_follows_the_distribution_and_seeds_repeat() {
        let lp = log_softmax(&[0.0, 1.0]);
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
        };
        let mut rng = Rng::new(7);
        let ones = (0..20_000).filter(|_| sample(&lp, &params, &mut rng) == 1).count() as f64 / 20_000.0;
        let expected = 1.0f64.exp() / (1.0 + 1.0f64.exp());
        assert!((ones - expected).abs() < 0.02, "{ones} vs {expected}");
        let draw = |seed| {
            let mut r = Rng::new(seed);
            (0..32).map(|_| sample(&lp, &params, &mut r)).collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
    }
}
