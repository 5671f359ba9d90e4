//! One forward step over a batch of sequence chunks (prefill, continuation or single-token
//! decode; any mix), on the CPU reference backend.
//!
//! Attention always runs in the absorbed (MQA) form that production kernels use: queries are
//! moved into the latent space (`q_lat = W_UKᵀ·q_nope`), scores are taken against the cached
//! `[c_kv | k_pe]` rows of the tokens the lightning indexer selected, and the latent output is
//! expanded by `W_UV` afterwards. Prefill and decode share this one path, so incremental decode
//! computes the same function as a full recompute.

use std::sync::atomic::Ordering;

use rayon::prelude::*;
use thiserror::Error;

use super::{Attention, FeedForward, Mlp, Model, Moe};
use crate::backend::cpu::{
    CpuKvCache, dot, layer_norm, rms_norm, rope_half_split, rope_interleaved, sigmoid, silu,
    softmax, top_k_indices,
};
use crate::dist::{DistError, Reader, Transport, Writer};
use crate::kv::{BlockTable, KvError};

/// Which logits a chunk wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    None,
    Last,
    All,
}

/// A run of consecutive tokens of one sequence, starting at `start_pos`; every earlier position
/// is already in the cache under `blocks`.
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    pub tokens: &'a [u32],
    pub start_pos: usize,
    pub blocks: &'a BlockTable,
    pub logits: LogitsWanted,
}

#[derive(Debug, Error)]
pub enum ForwardError {
    #[error("token id {token} is outside the vocabulary (size {vocab})")]
    TokenOutOfVocab { token: u32, vocab: usize },
    #[error("position {pos} exceeds max_position_embeddings ({max})")]
    PositionTooLarge { pos: usize, max: usize },
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("backend failure: {0}")]
    Backend(String),
    #[error("expert-parallel group: {0}")]
    Dist(#[from] DistError),
}

/// Per-token bookkeeping for one step.
struct TokenPlace {
    seq: usize,
    pos: usize,
}

impl Model {
    /// Runs one step. Returns, per chunk, the requested logits flattened `[rows, vocab]`.
    pub fn forward(
        &self,
        cache: &mut CpuKvCache,
        batch: &[SeqChunk],
    ) -> Result<Vec<Vec<f32>>, ForwardError> {
        self.forward_with(cache, batch, None)
    }

    /// One step on one rank of an expert-parallel group: MoE layers exchange tokens with the
    /// other ranks through `comm` (every rank must call this for every step, even with an
    /// empty batch). With `None`, all experts must be local.
    pub fn forward_with(
        &self,
        cache: &mut CpuKvCache,
        batch: &[SeqChunk],
        mut comm: Option<&mut dyn Transport>,
    ) -> Result<Vec<Vec<f32>>, ForwardError> {
        let cfg = &self.config;
        let h = cfg.hidden_size;
        let mut places = Vec::new();
        // Slots of every position each sequence can attend to (its past plus this chunk).
        let mut seq_slots: Vec<Vec<usize>> = Vec::with_capacity(batch.len());
        for (s, chunk) in batch.iter().enumerate() {
            let end = chunk.start_pos + chunk.tokens.len();
            if end > cfg.max_position_embeddings {
                return Err(ForwardError::PositionTooLarge {
                    pos: end - 1,
                    max: cfg.max_position_embeddings,
                });
            }
            seq_slots.push(
                (0..end)
                    .map(|p| chunk.blocks.slot(p))
                    .collect::<Result<_, _>>()?,
            );
            for (i, &t) in chunk.tokens.iter().enumerate() {
                if t as usize >= cfg.vocab_size {
                    return Err(ForwardError::TokenOutOfVocab {
                        token: t,
                        vocab: cfg.vocab_size,
                    });
                }
                places.push(TokenPlace {
                    seq: s,
                    pos: chunk.start_pos + i,
                });
            }
        }
        let n = places.len();
        let mut x = Vec::with_capacity(n * h);
        for chunk in batch {
            for &t in chunk.tokens {
                x.extend_from_slice(&self.embed_tokens[t as usize * h..(t as usize + 1) * h]);
            }
        }
        let rope: Vec<(Vec<f32>, Vec<f32>)> =
            places.iter().map(|p| self.rope.cos_sin(p.pos)).collect();

        for (li, layer) in self.layers.iter().enumerate() {
            let mut xn = x.clone();
            rms_norm(&mut xn, h, &layer.input_layernorm, cfg.rms_norm_eps);
            let attn = self.attention(li, &layer.self_attn, &xn, &places, &seq_slots, &rope, cache);
            for (a, b) in x.iter_mut().zip(&attn) {
                *a += b;
            }
            let mut xn = x.clone();
            rms_norm(
                &mut xn,
                h,
                &layer.post_attention_layernorm,
                cfg.rms_norm_eps,
            );
            let ffn = match &layer.mlp {
                FeedForward::Dense(mlp) => mlp_forward(mlp, &xn, n),
                FeedForward::Moe(moe) => match comm.as_deref_mut() {
                    Some(t) if t.world_size() > 1 => self.moe_forward_ep(moe, &xn, n, t)?,
                    _ => self.moe_forward(moe, &xn, n)?,
                },
            };
            for (a, b) in x.iter_mut().zip(&ffn) {
                *a += b;
            }
        }

        let mut out = Vec::with_capacity(batch.len());
        let mut row = 0;
        for chunk in batch {
            let len = chunk.tokens.len();
            let rows: Vec<usize> = match chunk.logits {
                LogitsWanted::None => vec![],
                LogitsWanted::Last if len > 0 => vec![row + len - 1],
                LogitsWanted::Last => vec![],
                LogitsWanted::All => (row..row + len).collect(),
            };
            let mut hs: Vec<f32> = rows
                .iter()
                .flat_map(|r| x[r * h..(r + 1) * h].iter().copied())
                .collect();
            rms_norm(&mut hs, h, &self.norm, cfg.rms_norm_eps);
            out.push(self.lm_head.forward(&hs, rows.len()));
            row += len;
        }
        Ok(out)
    }

    /// MLA + lightning indexer + sparse attention for all tokens of the step; writes this step's
    /// latents and indexer keys into the cache first, so chunks attend to themselves causally.
    fn attention(
        &self,
        li: usize,
        a: &Attention,
        xn: &[f32],
        places: &[TokenPlace],
        seq_slots: &[Vec<usize>],
        rope: &[(Vec<f32>, Vec<f32>)],
        cache: &mut CpuKvCache,
    ) -> Vec<f32> {
        let c = &self.config;
        let n = places.len();
        let (heads, nope, rd, vd, kvr) = (
            c.num_attention_heads,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
            c.kv_lora_rank,
        );
        let qk = nope + rd;
        let (ih, id) = (c.index_n_heads, c.index_head_dim);

        let mut q_lat_in = a.q_a_proj.forward(xn, n);
        rms_norm(
            &mut q_lat_in,
            c.q_lora_rank,
            &a.q_a_layernorm,
            c.rms_norm_eps,
        );
        let mut q = a.q_b_proj.forward(&q_lat_in, n);
        let kv = a.kv_a_proj_with_mqa.forward(xn, n);

        // Indexer projections: per-head queries from the q latent, one key per token.
        let mut iq = a.indexer.wq_b.forward(&q_lat_in, n);
        let mut ik = a.indexer.wk.forward(xn, n);
        layer_norm(
            &mut ik,
            id,
            &a.indexer.k_norm_weight,
            &a.indexer.k_norm_bias,
            1e-6,
        );
        let mut iw = a.indexer.weights_proj.forward(xn, n);
        // ReLU commutes with the positive head_dim^-0.5 scale, so both scales fold into the weights.
        let w_scale = (ih as f32).powf(-0.5) * (id as f32).powf(-0.5);
        iw.iter_mut().for_each(|w| *w *= w_scale);

        for (t, p) in places.iter().enumerate() {
            let (cos, sin) = &rope[t];
            let slot = seq_slots[p.seq][p.pos];
            let lat = cache.latent_mut(li, slot);
            lat.copy_from_slice(&kv[t * c.latent_dim()..(t + 1) * c.latent_dim()]);
            rms_norm(&mut lat[..kvr], kvr, &a.kv_a_layernorm, c.rms_norm_eps);
            rope_interleaved(&mut lat[kvr..], cos, sin);
            let key = &mut ik[t * id..(t + 1) * id];
            rope_half_split(&mut key[..rd], cos, sin);
            cache.index_key_mut(li, slot).copy_from_slice(key);
            for hh in 0..heads {
                rope_interleaved(
                    &mut q[t * heads * qk + hh * qk + nope..t * heads * qk + (hh + 1) * qk],
                    cos,
                    sin,
                );
            }
            for hh in 0..ih {
                rope_half_split(
                    &mut iq[(t * ih + hh) * id..(t * ih + hh) * id + rd],
                    cos,
                    sin,
                );
            }
        }

        let cache: &CpuKvCache = cache;
        let scale = self.softmax_scale;
        let per_token: Vec<Vec<f32>> = (0..n)
            .into_par_iter()
            .map(|t| {
                let p = &places[t];
                let slots = &seq_slots[p.seq][..=p.pos];
                // Lightning indexer: I[j] = Σ_h w_h · ReLU(q_h · k_j) over the causal past.
                let iq_t = &iq[t * ih * id..(t + 1) * ih * id];
                let iw_t = &iw[t * ih..(t + 1) * ih];
                let scores: Vec<f32> = slots
                    .iter()
                    .map(|&s| {
                        let k = cache.index_key(li, s);
                        (0..ih)
                            .map(|hh| iw_t[hh] * dot(&iq_t[hh * id..(hh + 1) * id], k).max(0.0))
                            .sum()
                    })
                    .collect();
                let selected = top_k_indices(&scores, c.index_topk.min(slots.len()));
                let latents: Vec<&[f32]> = selected
                    .iter()
                    .map(|&j| cache.latent(li, slots[j as usize]))
                    .collect();

                let mut out = vec![0f32; heads * vd];
                let mut q_lat = vec![0f32; kvr];
                let mut o_lat = vec![0f32; kvr];
                let mut probs = vec![0f32; latents.len()];
                for hh in 0..heads {
                    let qh = &q[t * heads * qk + hh * qk..t * heads * qk + (hh + 1) * qk];
                    // Absorb W_UK: q_lat = Σ_d q_nope[d] · W_UK[d, :].
                    q_lat.iter_mut().for_each(|v| *v = 0.0);
                    for d in 0..nope {
                        let w = a.kv_b_proj.row(hh * (nope + vd) + d);
                        let qd = qh[d];
                        for (acc, wv) in q_lat.iter_mut().zip(w) {
                            *acc += qd * wv;
                        }
                    }
                    for (pj, lat) in probs.iter_mut().zip(&latents) {
                        *pj = (dot(&q_lat, &lat[..kvr]) + dot(&qh[nope..], &lat[kvr..])) * scale;
                    }
                    softmax(&mut probs);
                    o_lat.iter_mut().for_each(|v| *v = 0.0);
                    for (pj, lat) in probs.iter().zip(&latents) {
                        for (acc, v) in o_lat.iter_mut().zip(&lat[..kvr]) {
                            *acc += pj * v;
                        }
                    }
                    for r in 0..vd {
                        out[hh * vd + r] =
                            dot(a.kv_b_proj.row(hh * (nope + vd) + nope + r), &o_lat);
                    }
                }
                out
            })
            .collect();
        let o: Vec<f32> = per_token.into_iter().flatten().collect();
        a.o_proj.forward(&o, n)
    }

    fn moe_forward(&self, moe: &Moe, xn: &[f32], n: usize) -> Result<Vec<f32>, ForwardError> {
        let c = &self.config;
        let h = c.hidden_size;
        let logits = moe.gate.forward(xn, n);
        // Group tokens by expert so each expert runs once over its tokens.
        let mut assigned: Vec<Vec<(usize, f32)>> = vec![Vec::new(); c.n_routed_experts];
        for t in 0..n {
            let (experts, weights) = route(
                &logits[t * c.n_routed_experts..(t + 1) * c.n_routed_experts],
                moe,
                c,
            );
            for (e, w) in experts.into_iter().zip(weights) {
                self.expert_routed_tokens[e].fetch_add(1, Ordering::Relaxed);
                assigned[e].push((t, w));
            }
        }
        let expert_out: Vec<Option<Result<Vec<f32>, usize>>> = assigned
            .par_iter()
            .enumerate()
            .map(|(e, toks)| {
                if toks.is_empty() {
                    return None;
                }
                let xs: Vec<f32> = toks
                    .iter()
                    .flat_map(|(t, _)| xn[t * h..(t + 1) * h].iter().copied())
                    .collect();
                Some(
                    moe.experts[e]
                        .as_ref()
                        .map(|m| mlp_forward(m, &xs, toks.len()))
                        .ok_or(e),
                )
            })
            .collect();
        let expert_out: Vec<Option<Vec<f32>>> = expert_out
            .into_iter()
            .map(|o| o.transpose())
            .collect::<Result<_, usize>>()
            .map_err(|e| {
                ForwardError::Backend(format!(
                    "expert {e} is not on this rank and no group is attached"
                ))
            })?;
        let mut y = vec![0f32; n * h];
        for (toks, out) in assigned.iter().zip(expert_out) {
            let Some(out) = out else { continue };
            for (i, (t, w)) in toks.iter().enumerate() {
                for (acc, v) in y[t * h..(t + 1) * h]
                    .iter_mut()
                    .zip(&out[i * h..(i + 1) * h])
                {
                    *acc += w * v;
                }
            }
        }
        if let Some(shared) = &moe.shared_experts {
            for (acc, v) in y.iter_mut().zip(mlp_forward(shared, xn, n)) {
                *acc += v;
            }
        }
        Ok(y)
    }

    /// Expert-parallel MoE: route locally, send each (token, expert) row to the expert's owner,
    /// run the local experts on what arrives, send results back and combine with the weights.
    fn moe_forward_ep(
        &self,
        moe: &Moe,
        xn: &[f32],
        n: usize,
        comm: &mut dyn Transport,
    ) -> Result<Vec<f32>, ForwardError> {
        let c = &self.config;
        let (h, e_total, world) = (c.hidden_size, c.n_routed_experts, comm.world_size());
        let logits = moe.gate.forward(xn, n);
        // rows[r] = (token, expert, weight) sent to rank r, in send order.
        let mut rows: Vec<Vec<(usize, usize, f32)>> = vec![Vec::new(); world];
        for t in 0..n {
            let (experts, weights) = route(&logits[t * e_total..(t + 1) * e_total], moe, c);
            for (e, w) in experts.into_iter().zip(weights) {
                self.expert_routed_tokens[e].fetch_add(1, Ordering::Relaxed);
                rows[self.shard.owner(e, e_total)].push((t, e, w));
            }
        }
        let dispatch: Vec<Vec<u8>> = rows
            .iter()
            .map(|rs| {
                let mut w = Writer::default();
                w.u32(rs.len() as u32);
                for (t, e, _) in rs {
                    w.u32(*e as u32).f32s(&xn[t * h..(t + 1) * h]);
                }
                w.finish()
            })
            .collect();
        let received = comm.all_to_all(dispatch)?;

        // Compute every received row with the local experts, grouped by expert.
        let mut replies = Vec::with_capacity(world);
        for (src, bytes) in received.iter().enumerate() {
            let mut r = Reader::new(bytes, src);
            let count = if bytes.is_empty() {
                0
            } else {
                r.u32()? as usize
            };
            let mut by_expert: Vec<Vec<(usize, Vec<f32>)>> = vec![Vec::new(); e_total];
            for i in 0..count {
                let e = r.u32()? as usize;
                let x = r.f32s()?;
                if e >= e_total || x.len() != h {
                    return Err(ForwardError::Backend(format!(
                        "rank {src} sent a malformed row for expert {e}"
                    )));
                }
                by_expert[e].push((i, x));
            }
            let mut out = vec![0f32; count * h];
            for (e, items) in by_expert.iter().enumerate() {
                if items.is_empty() {
                    continue;
                }
                let mlp = moe.experts[e].as_ref().ok_or_else(|| {
                    ForwardError::Backend(format!(
                        "rank {src} sent expert {e}, which this rank does not hold"
                    ))
                })?;
                let xs: Vec<f32> = items.iter().flat_map(|(_, x)| x.iter().copied()).collect();
                let ys = mlp_forward(mlp, &xs, items.len());
                for (k, (i, _)) in items.iter().enumerate() {
                    out[i * h..(i + 1) * h].copy_from_slice(&ys[k * h..(k + 1) * h]);
                }
            }
            let mut w = Writer::default();
            w.f32s(&out);
            replies.push(w.finish());
        }
        let results = comm.all_to_all(replies)?;

        let mut y = vec![0f32; n * h];
        for (dest, bytes) in results.iter().enumerate() {
            let out = Reader::new(bytes, dest).f32s()?;
            if out.len() != rows[dest].len() * h {
                return Err(ForwardError::Backend(format!(
                    "rank {dest} returned {} values for {} rows",
                    out.len(),
                    rows[dest].len()
                )));
            }
            for (k, (t, _, wgt)) in rows[dest].iter().enumerate() {
                for (acc, v) in y[t * h..(t + 1) * h]
                    .iter_mut()
                    .zip(&out[k * h..(k + 1) * h])
                {
                    *acc += wgt * v;
                }
            }
        }
        if let Some(shared) = &moe.shared_experts {
            for (acc, v) in y.iter_mut().zip(mlp_forward(shared, xn, n)) {
                *acc += v;
            }
        }
        Ok(y)
    }
}

/// The noaux_tc router for one token: sigmoid scores; the correction bias only steers selection;
/// groups ranked by the sum of their two best biased scores; top-k experts within the best
/// `topk_group` groups; weights from the unbiased scores, normalised, times the scaling factor.
/// Ties go to the lower index. Returns (expert ids, weights).
pub fn route(logits: &[f32], moe: &Moe, c: &super::ModelConfig) -> (Vec<usize>, Vec<f32>) {
    route_scores(
        logits,
        &moe.e_score_correction_bias,
        c.n_group,
        c.topk_group,
        c.num_experts_per_tok,
        c.norm_topk_prob,
        c.routed_scaling_factor,
    )
}

pub fn route_scores(
    logits: &[f32],
    bias: &[f32],
    n_group: usize,
    topk_group: usize,
    top_k: usize,
    normalize: bool,
    scaling: f32,
) -> (Vec<usize>, Vec<f32>) {
    let e = logits.len();
    let scores: Vec<f32> = logits.iter().map(|l| sigmoid(*l)).collect();
    let biased: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
    let per_group = e / n_group.max(1);
    let group_scores: Vec<f32> = (0..n_group)
        .map(|g| {
            let mut v: Vec<f32> = biased[g * per_group..(g + 1) * per_group].to_vec();
            v.sort_unstable_by(|a, b| b.total_cmp(a));
            v.iter().take(2).sum()
        })
        .collect();
    let keep_groups = top_k_indices(&group_scores, topk_group);
    let masked: Vec<f32> = (0..e)
        .map(|i| {
            if keep_groups.contains(&((i / per_group) as u32)) {
                biased[i]
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let experts: Vec<usize> = top_k_indices(&masked, top_k)
        .into_iter()
        .map(|i| i as usize)
        .collect();
    let mut weights: Vec<f32> = experts.iter().map(|&i| scores[i]).collect();
    if normalize {
        let sum: f32 = weights.iter().sum::<f32>() + 1e-20;
        weights.iter_mut().for_each(|w| *w /= sum);
    }
    weights.iter_mut().for_each(|w| *w *= scaling);
    (experts, weights)
}

fn mlp_forward(mlp: &Mlp, x: &[f32], n: usize) -> Vec<f32> {
    let g = mlp.gate_proj.forward(x, n);
    let u = mlp.up_proj.forward(x, n);
    let act: Vec<f32> = g.iter().zip(&u).map(|(g, u)| silu(*g) * u).collect();
    mlp.down_proj.forward(&act, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logit(p: f32) -> f32 {
        (p / (1.0 - p)).ln()
    }

    #[test]
    fn the_router_selects_by_biased_scores_but_weights_by_unbiased_ones() {
        // 4 experts, 1 group: expert 0 has the best raw score, but the bias pushes 2 and 3 ahead.
        let logits = [logit(0.9), logit(0.5), logit(0.6), logit(0.55)];
        let bias = [0.0, 0.0, 0.5, 0.5];
        let (e, w) = route_scores(&logits, &bias, 1, 1, 2, true, 2.5);
        assert_eq!(e, vec![2, 3]);
        let total = 0.6 + 0.55;
        assert!((w[0] - 2.5 * 0.6 / total).abs() < 1e-5);
        assert!((w[1] - 2.5 * 0.55 / total).abs() < 1e-5);
    }

    #[test]
    fn the_router_only_picks_experts_from_the_best_groups() {
        // 8 experts in 4 groups of 2; group score = sum of its two biased scores.
        // Group 0 holds the single best expert but a weak partner; groups 1 and 3 win on sums.
        let p = [0.99, 0.01, 0.7, 0.7, 0.5, 0.1, 0.6, 0.65];
        let logits: Vec<f32> = p.iter().map(|v| logit(*v)).collect();
        let (e, _) = route_scores(&logits, &[0.0; 8], 4, 2, 3, true, 1.0);
        assert_eq!(e, vec![2, 3, 7]);
    }

    #[test]
    fn unnormalised_router_weights_are_the_scaled_sigmoid_scores() {
        let logits = [logit(0.8), logit(0.3)];
        let (e, w) = route_scores(&logits, &[0.0, 0.0], 1, 1, 1, false, 2.0);
        assert_eq!(e, vec![0]);
        assert!((w[0] - 1.6).abs() < 1e-5);
    }
}
