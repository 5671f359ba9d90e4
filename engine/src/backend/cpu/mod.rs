//! The f32 CPU reference backend: plain, readable kernels that define what every other backend
//! must compute. Parallel over output rows or tokens with rayon; no unsafe code.

use rayon::prelude::*;

pub mod fp8;
mod kv_cache;
pub use kv_cache::CpuKvCache;

/// A dense `[out, in]` weight in f32, applied as `y = x · Wᵀ` (the checkpoint's layout).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Vec<f32>,
    pub out_dim: usize,
    pub in_dim: usize,
    /// The checkpoint's E4M3 codes and block scales when the tensor was stored in FP8, so a GPU
    /// backend can keep the weight in FP8. `weight` is their exact dequantization, or empty when
    /// the model was loaded with `LoadOptions::fp8_codes_only` (GPU upload only).
    pub fp8: Option<std::sync::Arc<fp8::Fp8Weight>>,
}

impl Linear {
    pub fn new(weight: Vec<f32>, out_dim: usize, in_dim: usize) -> Self {
        debug_assert_eq!(weight.len(), out_dim * in_dim);
        Linear {
            weight,
            out_dim,
            in_dim,
            fp8: None,
        }
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.weight[r * self.in_dim..(r + 1) * self.in_dim]
    }

    /// `x` is `[n, in]`; returns `[n, out]`.
    pub fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        matmul_t(x, n, &self.weight, self.out_dim, self.in_dim)
    }
}

/// Dot product with eight independent partial sums (vectorizes; deterministic order).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let chunks = n / 8;
    for c in 0..chunks {
        let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut tail = 0f32;
    for i in chunks * 8..n {
        tail += a[i] * b[i];
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `y[n, out] = x[n, in] · w[out, in]ᵀ`, parallel over blocks of output rows so each weight row
/// is read once per call, whatever the batch size.
pub fn matmul_t(x: &[f32], n: usize, w: &[f32], out_dim: usize, in_dim: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), n * in_dim);
    debug_assert_eq!(w.len(), out_dim * in_dim);
    if n == 0 || out_dim == 0 {
        return vec![0.0; n * out_dim];
    }
    const ROWS: usize = 16;
    let blocks: Vec<Vec<f32>> = w
        .par_chunks(ROWS * in_dim.max(1))
        .map(|wb| {
            let rows = wb.len() / in_dim.max(1);
            let mut yt = vec![0f32; rows * n];
            for r in 0..rows {
                let wr = &wb[r * in_dim..(r + 1) * in_dim];
                for i in 0..n {
                    yt[r * n + i] = dot(&x[i * in_dim..(i + 1) * in_dim], wr);
                }
            }
            yt
        })
        .collect();
    let mut y = vec![0f32; n * out_dim];
    for (b, yt) in blocks.iter().enumerate() {
        let rows = yt.len() / n;
        for r in 0..rows {
            for i in 0..n {
                y[i * out_dim + b * ROWS + r] = yt[r * n + i];
            }
        }
    }
    y
}

/// RMSNorm over each row of `x` (`[n, d]`), in place: `w ⊙ x / sqrt(mean(x²) + eps)`.
pub fn rms_norm(x: &mut [f32], d: usize, w: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(d) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for (v, g) in row.iter_mut().zip(w) {
            *v = g * (*v * inv);
        }
    }
}

/// LayerNorm (weight and bias, biased variance) over each row, in place.
pub fn layer_norm(x: &mut [f32], d: usize, w: &[f32], b: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(d) {
        let mean = row.iter().sum::<f32>() / d as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, g), bb) in row.iter_mut().zip(w).zip(b) {
            *v = (*v - mean) * inv * g + bb;
        }
    }
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        return;
    }
    let mut s = 0f32;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    for v in x.iter_mut() {
        *v /= s;
    }
}

/// Rotary embedding on interleaved pairs `(2j, 2j+1)` (the MLA layout).
pub fn rope_interleaved(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    for j in 0..cos.len() {
        let (a, b) = (x[2 * j], x[2 * j + 1]);
        x[2 * j] = a * cos[j] - b * sin[j];
        x[2 * j + 1] = b * cos[j] + a * sin[j];
    }
}

/// Rotary embedding on half-split pairs `(j, j + d/2)` (the NeoX layout the indexer uses).
pub fn rope_half_split(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let h = cos.len();
    for j in 0..h {
        let (a, b) = (x[j], x[j + h]);
        x[j] = a * cos[j] - b * sin[j];
        x[j + h] = b * cos[j] + a * sin[j];
    }
}

/// Indices of the `k` largest scores, ties broken towards the lower index, returned ascending.
/// This is the lightning indexer's selection; it is O(n) on average.
pub fn top_k_indices(scores: &[f32], k: usize) -> Vec<u32> {
    let n = scores.len();
    if k >= n {
        return (0..n as u32).collect();
    }
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..n as u32).collect();
    let better = |a: &u32, b: &u32| {
        let (sa, sb) = (scores[*a as usize], scores[*b as usize]);
        sb.total_cmp(&sa).then(a.cmp(b))
    };
    idx.select_nth_unstable_by(k - 1, better);
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_matches_a_naive_triple_loop_for_odd_sizes() {
        let (n, out, inp) = (3, 37, 19);
        let x: Vec<f32> = (0..n * inp).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..out * inp).map(|i| (i as f32 * 0.11).cos()).collect();
        let y = matmul_t(&x, n, &w, out, inp);
        for i in 0..n {
            for o in 0..out {
                let r: f32 = (0..inp).map(|k| x[i * inp + k] * w[o * inp + k]).sum();
                assert!((y[i * out + o] - r).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn interleaved_and_half_split_rope_rotate_different_pairs() {
        let cos = [0.0, 1.0];
        let sin = [1.0, 0.0];
        let mut a = [1.0, 2.0, 3.0, 4.0];
        rope_interleaved(&mut a, &cos, &sin);
        // pair (0,1) rotated by 90 degrees, pair (2,3) untouched
        assert_eq!(a, [-2.0, 1.0, 3.0, 4.0]);
        let mut b = [1.0, 2.0, 3.0, 4.0];
        rope_half_split(&mut b, &cos, &sin);
        // pair (0,2) rotated by 90 degrees, pair (1,3) untouched
        assert_eq!(b, [-3.0, 2.0, 1.0, 4.0]);
    }

    #[test]
    fn rope_preserves_norms_and_relative_angles() {
        let theta = [0.3f32, 1.1];
        let (c, s): (Vec<f32>, Vec<f32>) = theta.iter().map(|t| (t.cos(), t.sin())).unzip();
        let mut q = [0.5, -1.0, 2.0, 0.25];
        let n0: f32 = q.iter().map(|v| v * v).sum();
        rope_interleaved(&mut q, &c, &s);
        let n1: f32 = q.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-5);
    }

    #[test]
    fn top_k_prefers_higher_scores_then_lower_positions_on_ties() {
        let s = [0.5, 2.0, 0.5, 3.0, 0.5, -1.0];
        assert_eq!(top_k_indices(&s, 2), vec![1, 3]);
        // three-way tie at 0.5 for the last slot: the lowest index wins
        assert_eq!(top_k_indices(&s, 3), vec![0, 1, 3]);
        assert_eq!(top_k_indices(&s, 4), vec![0, 1, 2, 3]);
    }

    #[test]
    fn top_k_of_a_short_sequence_keeps_everything() {
        assert_eq!(top_k_indices(&[1.0, 0.0], 2048), vec![0, 1]);
        assert!(top_k_indices(&[], 4).is_empty());
        assert!(top_k_indices(&[1.0], 0).is_empty());
    }

    #[test]
    fn top_k_handles_negative_infinity_and_all_zero_scores() {
        let s = [0.0, f32::NEG_INFINITY, 0.0, 0.0];
        assert_eq!(top_k_indices(&s, 2), vec![0, 2]);
    }

    #[test]
    fn softmax_of_all_masked_stays_finite_and_norms_add_to_one() {
        let mut x = [1.0, 2.0, 3.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let mut y = [f32::NEG_INFINITY; 2];
        softmax(&mut y);
        assert!(y.iter().all(|v| *v == f32::NEG_INFINITY));
    }

    #[test]
    fn norms_match_their_definitions() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        rms_norm(&mut x, 4, &[1.0, 1.0, 1.0, 2.0], 0.0);
        let rms = (30.0f32 / 4.0).sqrt();
        assert!((x[3] - 8.0 / rms).abs() < 1e-6);
        let mut y = vec![1.0, 3.0];
        layer_norm(&mut y, 2, &[1.0, 1.0], &[0.5, 0.5], 0.0);
        assert!((y[0] + 0.5).abs() < 1e-6 && (y[1] - 1.5).abs() < 1e-6);
    }
}
