//! Token generation on top of the forward pass: sampling (greedy, temperature, top-k, top-p,
//! seeded), stop tokens, and a batched token loop that owns its KV blocks. The serving
//! scheduler drives `Model::forward` directly; this module is what `generate` and tests use.

use thiserror::Error;

use crate::backend::cpu::CpuKvCache;
use crate::kv::{BlockTable, DEFAULT_BLOCK_SIZE, KvError, KvGeometry, PrefixCachingPool};
use crate::model::{ForwardError, LogitsWanted, Model, SeqChunk};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus mass kept, in (0, 1]; 1 disables.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 disables.
    pub top_k: usize,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        }
    }
}

#[derive(Debug, Error, PartialEq)]
pub enum SamplingError {
    #[error("temperature must be a finite number >= 0, got {0}")]
    Temperature(f32),
    #[error("top_p must be in (0, 1], got {0}")]
    TopP(f32),
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        Ok(())
    }
}

/// SplitMix64: small, fast, and reproducible across platforms for seeded sampling.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The generator's whole state: `Rng::new(r.state())` continues where `r` is.
    pub fn state(&self) -> u64 {
        self.0
    }

    pub fn from_entropy() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Rng(t ^ (std::process::id() as u64).rotate_left(32))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Index of the largest value; ties go to the lower index.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Log-softmax of the logits (for logprobs).
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = m + logits.iter().map(|v| (v - m).exp()).sum::<f32>().ln();
    logits.iter().map(|v| v - lse).collect()
}

/// Draws one token from `logits` under `params`.
pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut Rng) -> u32 {
    if params.temperature == 0.0 || logits.len() <= 1 {
        return argmax(logits);
    }
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_unstable_by(|a, b| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    });
    if params.top_k > 0 {
        order.truncate(params.top_k);
    }
    let m = logits[order[0] as usize];
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| (((logits[i as usize] - m) / params.temperature) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if params.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cum += p;
            if cum >= params.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        order.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut u = rng.next_f64();
    for (i, p) in probs.iter().enumerate() {
        if u < *p {
            return order[i];
        }
        u -= p;
    }
    order[probs.len() - 1]
}

/// What one sampled row asks for: its parameters, its generator (advanced by each draw) and how
/// many top logprobs to return.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub params: SamplingParams,
    pub rng: Rng,
    pub logprobs: Option<usize>,
}

/// A sampled token with its logprob and the row's top logprobs when they were asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: Option<f32>,
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Samples a whole row of logits on the host (the reference every device sampler matches).
pub fn sample_row(logits: &[f32], s: &mut Sampler) -> Sampled {
    let token = sample(logits, &s.params, &mut s.rng);
    let (logprob, top_logprobs) = match s.logprobs {
        None => (None, Vec::new()),
        Some(k) => {
            let lp = log_softmax(logits);
            let mut order: Vec<u32> = (0..lp.len() as u32).collect();
            order.sort_unstable_by(|a, b| {
                lp[*b as usize].total_cmp(&lp[*a as usize]).then(a.cmp(b))
            });
            (
                Some(lp[token as usize]),
                order
                    .into_iter()
                    .take(k)
                    .map(|t| (t, lp[t as usize]))
                    .collect(),
            )
        }
    };
    Sampled {
        token,
        logprob,
        top_logprobs,
    }
}

/// What a device computes over a whole row so the host needs only its best candidates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSummary {
    /// The largest logit.
    pub max: f32,
    /// Σ exp(l - max), for logprobs.
    pub sum_exp: f64,
    /// Σ exp((l - max) / T) with [`sample`]'s rounding (f32 difference and division, f64 exp);
    /// the normalizer of temperature sampling without top-k.
    pub sum_exp_t: f64,
}

/// [`sample_row`] from a row's `candidates` (the largest logits, ties to the lower id; any
/// order) and its [`RowSummary`]: the same token, drawn with the same generator values, when
/// the candidates decide it. `None` when they cannot (a top-k, nucleus or draw reaching past
/// them); `s.rng` is then untouched and the caller samples the whole row.
pub fn sample_candidates(
    candidates: &[(u32, f32)],
    vocab: usize,
    summary: &RowSummary,
    s: &mut Sampler,
) -> Option<Sampled> {
    if candidates.is_empty() {
        return None;
    }
    let mut order = candidates.to_vec();
    order.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let complete = order.len() >= vocab;
    if s.logprobs.is_some_and(|k| k > order.len() && !complete) {
        return None;
    }
    let p = &s.params;
    let mut rng = s.rng.clone();
    let token = if p.temperature == 0.0 || vocab <= 1 {
        order[0].0
    } else {
        let mut kept = order.clone();
        // Whether every token that can be drawn is among the candidates.
        let closed = complete || p.top_k > 0;
        if p.top_k > 0 {
            if p.top_k > order.len() && !complete {
                return None;
            }
            kept.truncate(p.top_k);
        }
        let m = kept[0].1;
        let mut probs: Vec<f64> = kept
            .iter()
            .map(|(_, l)| (((l - m) / p.temperature) as f64).exp())
            .collect();
        let total: f64 = if closed {
            probs.iter().sum()
        } else {
            summary.sum_exp_t
        };
        probs.iter_mut().for_each(|q| *q /= total);
        let mut exhaustive = closed;
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = None;
            for (i, q) in probs.iter().enumerate() {
                cum += q;
                if cum >= p.top_p as f64 {
                    keep = Some(i + 1);
                    break;
                }
            }
            let keep = match keep {
                Some(k) => k,
                None if closed => probs.len(),
                None => return None,
            };
            probs.truncate(keep);
            kept.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|q| *q /= total);
            exhaustive = true;
        }
        let mut u = rng.next_f64();
        let mut chosen = None;
        for (i, q) in probs.iter().enumerate() {
            if u < *q {
                chosen = Some(kept[i].0);
                break;
            }
            u -= q;
        }
        match chosen {
            Some(t) => t,
            None if exhaustive => kept[probs.len() - 1].0,
            None => return None,
        }
    };
    s.rng = rng;
    let lse = summary.max + (summary.sum_exp.ln() as f32);
    let (logprob, top_logprobs) = match s.logprobs {
        None => (None, Vec::new()),
        Some(k) => {
            let l = order.iter().find(|(t, _)| *t == token).map(|(_, l)| *l)?;
            (
                Some(l - lse),
                order.iter().take(k).map(|(t, l)| (*t, l - lse)).collect(),
            )
        }
    };
    Some(Sampled {
        token,
        logprob,
        top_logprobs,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was generated (it is included in the output).
    Stop,
    /// `max_tokens` was reached.
    Length,
}

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_token_ids: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
}

#[derive(Debug, Error)]
pub enum GenerateError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceeds the model's {limit} positions"
    )]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        limit: usize,
    },
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error(transparent)]
    Forward(#[from] ForwardError),
}

/// One forward step of some backend: chunks in, requested logits out.
pub type StepFn<'a> = dyn FnMut(&[SeqChunk]) -> Result<Vec<Vec<f32>>, ForwardError> + 'a;

/// Validates requests and returns the KV geometry that holds all of them at once.
pub fn plan_geometry(
    limit: usize,
    requests: &[GenerateRequest],
) -> Result<KvGeometry, GenerateError> {
    for r in requests {
        if r.prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        if r.prompt.len() + r.max_tokens > limit {
            return Err(GenerateError::TooLong {
                prompt: r.prompt.len(),
                max_tokens: r.max_tokens,
                limit,
            });
        }
        r.sampling.validate()?;
    }
    let total: usize = requests
        .iter()
        .map(|r| (r.prompt.len() + r.max_tokens).div_ceil(DEFAULT_BLOCK_SIZE))
        .sum();
    Ok(KvGeometry {
        num_blocks: total.max(1),
        block_size: DEFAULT_BLOCK_SIZE,
    })
}

/// Generates for several requests at once on the CPU reference backend.
pub fn generate_batch(
    model: &Model,
    requests: &[GenerateRequest],
) -> Result<Vec<Generation>, GenerateError> {
    let geometry = plan_geometry(model.config.max_position_embeddings, requests)?;
    let mut cache = CpuKvCache::new(&model.config, geometry);
    generate_with(
        &mut |batch: &[SeqChunk]| model.forward(&mut cache, batch),
        geometry,
        1,
        requests,
    )
}

/// Generates with any step function (a backend executor): one batched prefill, then one
/// batched decode step per token until every sequence has finished. Each of `geometry`'s
/// `partitions` (one per rank of an expert-parallel executor, [`crate::backend::Executor::kv_partitions`])
/// must hold what [`plan_geometry`] returns for these requests.
pub fn generate_with(
    step: &mut StepFn,
    geometry: KvGeometry,
    partitions: usize,
    requests: &[GenerateRequest],
) -> Result<Vec<Generation>, GenerateError> {
    // Each sequence's whole length up front, every block of it in one partition (an
    // expert-parallel group's rank), spread over the partitions by free space.
    let mut pool = PrefixCachingPool::partitioned(geometry, partitions, false);
    let mut tables: Vec<BlockTable> = vec![BlockTable::default(); requests.len()];
    for (r, t) in requests.iter().zip(tables.iter_mut()) {
        pool.reserve(t, r.prompt.len() + r.max_tokens)?;
    }
    let mut rngs: Vec<Rng> = requests
        .iter()
        .map(|r| {
            r.sampling
                .seed
                .map(Rng::new)
                .unwrap_or_else(Rng::from_entropy)
        })
        .collect();
    let mut out: Vec<Generation> = requests
        .iter()
        .map(|_| Generation {
            token_ids: Vec::new(),
            finish_reason: FinishReason::Length,
        })
        .collect();
    let mut done: Vec<bool> = requests.iter().map(|r| r.max_tokens == 0).collect();

    // Pending input per sequence: the prompt first, then each sampled token.
    let mut pending: Vec<Vec<u32>> = requests.iter().map(|r| r.prompt.clone()).collect();
    let mut positions: Vec<usize> = vec![0; requests.len()];
    while done.iter().any(|d| !d) {
        let active: Vec<usize> = (0..requests.len()).filter(|i| !done[*i]).collect();
        let chunks: Vec<SeqChunk> = active
            .iter()
            .map(|&i| SeqChunk {
                tokens: &pending[i],
                start_pos: positions[i],
                blocks: &tables[i],
                logits: LogitsWanted::Last,
            })
            .collect();
        let logits = step(&chunks)?;
        for (k, &i) in active.iter().enumerate() {
            positions[i] += pending[i].len();
            let tok = sample(&logits[k], &requests[i].sampling, &mut rngs[i]);
            out[i].token_ids.push(tok);
            if requests[i].stop_token_ids.contains(&tok) {
                out[i].finish_reason = FinishReason::Stop;
                done[i] = true;
            } else if out[i].token_ids.len() >= requests[i].max_tokens {
                done[i] = true;
            }
            pending[i] = vec![tok];
        }
    }
    Ok(out)
}

/// Logits of every prompt position (or the last only), in one prefill, on the CPU backend.
pub fn score(
    model: &Model,
    prompt: &[u32],
    last_only: bool,
) -> Result<Vec<Vec<f32>>, GenerateError> {
    let geometry = score_geometry(model.config.max_position_embeddings, prompt)?;
    let mut cache = CpuKvCache::new(&model.config, geometry);
    score_with(
        &mut |batch: &[SeqChunk]| model.forward(&mut cache, batch),
        geometry,
        1,
        prompt,
        last_only,
        model.config.vocab_size,
    )
}

pub fn score_geometry(limit: usize, prompt: &[u32]) -> Result<KvGeometry, GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    if prompt.len() > limit {
        return Err(GenerateError::TooLong {
            prompt: prompt.len(),
            max_tokens: 0,
            limit,
        });
    }
    Ok(KvGeometry {
        num_blocks: prompt.len().div_ceil(DEFAULT_BLOCK_SIZE),
        block_size: DEFAULT_BLOCK_SIZE,
    })
}

pub fn score_with(
    step: &mut StepFn,
    geometry: KvGeometry,
    partitions: usize,
    prompt: &[u32],
    last_only: bool,
    vocab: usize,
) -> Result<Vec<Vec<f32>>, GenerateError> {
    let mut pool = PrefixCachingPool::partitioned(geometry, partitions, false);
    let mut table = BlockTable::default();
    pool.reserve(&mut table, prompt.len())?;
    let wanted = if last_only {
        LogitsWanted::Last
    } else {
        LogitsWanted::All
    };
    let flat = step(&[SeqChunk {
        tokens: prompt,
        start_pos: 0,
        blocks: &table,
        logits: wanted,
    }])?
    .remove(0);
    Ok(flat.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_and_the_first_of_ties() {
        let mut rng = Rng::new(1);
        assert_eq!(
            sample(&[0.1, 3.0, 3.0, -1.0], &SamplingParams::default(), &mut rng),
            1
        );
    }

    #[test]
    fn top_k_one_is_greedy_whatever_the_temperature() {
        let p = SamplingParams {
            temperature: 5.0,
            top_k: 1,
            ..Default::default()
        };
        let mut rng = Rng::new(7);
        for _ in 0..50 {
            assert_eq!(sample(&[0.0, 0.5, 0.2], &p, &mut rng), 1);
        }
    }

    #[test]
    fn top_p_drops_the_unlikely_tail() {
        // probabilities ~ [0.64, 0.24, 0.09, 0.03]; top_p 0.8 keeps the first two only.
        let logits = [3.0, 2.0, 1.0, 0.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.8,
            ..Default::default()
        };
        let mut rng = Rng::new(3);
        for _ in 0..200 {
            assert!(sample(&logits, &p, &mut rng) <= 1);
        }
    }

    #[test]
    fn the_same_seed_samples_the_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.7).sin()).collect();
        let p = SamplingParams {
            temperature: 1.0,
            seed: Some(42),
            ..Default::default()
        };
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..20)
                .map(|_| sample(&logits, &p, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = [0.25, 0.75]
        let p = SamplingParams {
            temperature: 1.0,
            ..Default::default()
        };
        let mut rng = Rng::new(11);
        let ones = (0..4000)
            .filter(|_| sample(&logits, &p, &mut rng) == 1)
            .count();
        assert!((2850..3150).contains(&ones), "{ones}");
    }

    #[test]
    fn invalid_sampling_parameters_are_refused() {
        assert!(
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn candidate_sampling_draws_what_whole_row_sampling_draws() {
        let vocab = 3000;
        let mut g = Rng::new(5);
        let mut decided = 0;
        for case in 0..400 {
            let spread = [0.5f64, 2.0, 8.0][case % 3];
            let logits: Vec<f32> = (0..vocab)
                .map(|_| ((g.next_f64() - 0.5) * spread) as f32)
                .collect();
            let params = SamplingParams {
                temperature: [0.0, 0.7, 1.0, 1.3][case % 4],
                top_p: [1.0, 0.9, 0.5, 0.05][(case / 4) % 4],
                top_k: [0, 5, 50, 400][(case / 16) % 4],
                seed: None,
            };
            let logprobs = [None, Some(0), Some(5)][case % 3];
            let mut host = Sampler {
                params: params.clone(),
                rng: Rng::new(case as u64),
                logprobs,
            };
            let want = sample_row(&logits, &mut host);
            let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let t = params.temperature;
            let summary = RowSummary {
                max: m,
                sum_exp: logits.iter().map(|l| ((l - m) as f64).exp()).sum(),
                sum_exp_t: if t > 0.0 {
                    logits.iter().map(|l| (((l - m) / t) as f64).exp()).sum()
                } else {
                    0.0
                },
            };
            let mut order: Vec<u32> = (0..vocab as u32).collect();
            order.sort_by(|a, b| {
                logits[*b as usize]
                    .total_cmp(&logits[*a as usize])
                    .then(a.cmp(b))
            });
            let cands: Vec<(u32, f32)> = order[..256]
                .iter()
                .map(|i| (*i, logits[*i as usize]))
                .collect();
            let mut dev = Sampler {
                params: params.clone(),
                rng: Rng::new(case as u64),
                logprobs,
            };
            match sample_candidates(&cands, vocab, &summary, &mut dev) {
                Some(got) => {
                    decided += 1;
                    assert_eq!(got.token, want.token, "case {case} {params:?}");
                    assert_eq!(dev.rng.next_u64(), host.rng.next_u64(), "case {case}");
                    if let (Some(a), Some(b)) = (got.logprob, want.logprob) {
                        assert!((a - b).abs() < 1e-4, "{a} {b}");
                    }
                    let ids = |v: &[(u32, f32)]| v.iter().map(|x| x.0).collect::<Vec<_>>();
                    assert_eq!(ids(&got.top_logprobs), ids(&want.top_logprobs));
                }
                None => {
                    // Only a draw that can reach past the 256 candidates may refuse, and then
                    // the generator is untouched.
                    assert!(params.temperature > 0.0 && (params.top_k == 0 || params.top_k > 256));
                    assert_eq!(dev.rng.next_u64(), Rng::new(case as u64).next_u64());
                }
            }
        }
        // Greedy, top-k within the candidates and most nucleus draws are decided by them.
        assert!(decided > 250, "{decided} of 400 decided");
    }

    #[test]
    fn log_softmax_normalises() {
        let l = log_softmax(&[1.0, 2.0, 3.0]);
        let s: f32 = l.iter().map(|v| v.exp()).sum();
        assert!((s - 1.0).abs() < 1e-6);
    }
}
