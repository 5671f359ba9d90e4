//! FP8 (E4M3) quantization as the deployed DeepSeek-V3.2 runs it, in plain Rust: the reference the
//! GPU's FP8 paths are checked against bit for bit (codes and scales) or to f32 rounding (GEMMs).
//!
//! - Weights: E4M3 codes with one f32 `scale_inv` per 128×128 block (the checkpoint format).
//! - Activations: dynamic, one scale per token per 128 channels (`act_quant`), with
//!   `s = max(amax, 1e-4) / 448`, rounded up to a power of two for `scale_fmt: ue8m0` checkpoints.
//! - GEMM: `y[m, n] = Σ_kb sa[m, kb] · sw[n / 128, kb] · Σ_{k ∈ kb} a[m, k] · w[n, k]`, the block
//!   sums promoted to f32 once per 128-wide K block.
//! - Caches: the latent row's `c_kv` and the indexer key quantized per 128 channels with
//!   power-of-two scales (FlashMLA's and DeepGEMM's formats).

use crate::model::weights::fp8_e4m3_to_f32;

/// Width of one quantization group along K (channels).
pub const GROUP: usize = 128;
/// The largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;
/// The smallest amax a scale is derived from (DeepSeek's `act_quant`), so all-zero groups get a
/// finite scale.
pub const AMAX_FLOOR: f32 = 1e-4;

/// An `[rows, cols]` matrix of E4M3 codes with one `scale_inv` per `block` (rows × cols).
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Weight {
    pub codes: Vec<u8>,
    /// `[ceil(rows / block[0]), ceil(cols / block[1])]`, row-major.
    pub scale_inv: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
    pub block: [usize; 2],
}

impl Fp8Weight {
    /// The exact f32 values the codes and scales stand for.
    pub fn dequantize(&self) -> Vec<f32> {
        crate::model::weights::dequant_fp8_blocks(
            &self.codes,
            self.rows,
            self.cols,
            &self.scale_inv,
            self.block,
        )
    }

    /// Quantizes `w` (`[rows, cols]`) per `block` with `scale_inv = amax / 448` (the checkpoint
    /// convention; all-zero blocks get scale 1).
    pub fn quantize(w: &[f32], rows: usize, cols: usize, block: [usize; 2]) -> Self {
        let (br, bc) = (rows.div_ceil(block[0]), cols.div_ceil(block[1]));
        let mut scale_inv = vec![1f32; br * bc];
        for (b, s) in scale_inv.iter_mut().enumerate() {
            let (r0, c0) = ((b / bc) * block[0], (b % bc) * block[1]);
            let mut amax = 0f32;
            for r in r0..(r0 + block[0]).min(rows) {
                for c in c0..(c0 + block[1]).min(cols) {
                    amax = amax.max(w[r * cols + c].abs());
                }
            }
            if amax > 0.0 {
                *s = amax / E4M3_MAX;
            }
        }
        let codes = (0..rows * cols)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                f32_to_e4m3(w[i] / scale_inv[(r / block[0]) * bc + c / block[1]])
            })
            .collect();
        Fp8Weight {
            codes,
            scale_inv,
            rows,
            cols,
            block,
        }
    }
}

/// The 127 non-negative finite E4M3 values, ascending by code (0x00..=0x7e).
fn positive_values() -> &'static [f32; 127] {
    static TABLE: std::sync::OnceLock<[f32; 127]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|c| fp8_e4m3_to_f32(c as u8)))
}

/// f32 to E4M3 rounding to nearest, ties to even, saturating to ±448 (PTX
/// `cvt.rn.satfinite.e4m3x2.f32`); NaN stays NaN.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    let table = positive_values();
    if a >= E4M3_MAX {
        return sign | 0x7e;
    }
    // The first code whose value exceeds `a`; `a` lies between codes hi - 1 and hi.
    let hi = table.partition_point(|v| *v <= a);
    let lo = hi - 1;
    let (dl, dh) = (a - table[lo], table[hi] - a);
    let code = if dl < dh || (dl == dh && lo % 2 == 0) {
        lo
    } else {
        hi
    };
    sign | code as u8
}

/// The smallest power of two at or above a positive normal `s` (UE8M0 scales), by its bits so
/// host and device agree exactly.
pub fn round_up_pow2(s: f32) -> f32 {
    let u = s.to_bits();
    if u & 0x007f_ffff == 0 {
        s
    } else {
        f32::from_bits((u & 0x7f80_0000) + 0x0080_0000)
    }
}

/// The scale of a group whose largest magnitude is `amax`.
pub fn group_scale(amax: f32, pow2: bool) -> f32 {
    let s = amax.max(AMAX_FLOOR) / E4M3_MAX;
    if pow2 { round_up_pow2(s) } else { s }
}

/// Quantizes one group: returns its scale and writes `x / scale` as E4M3 codes.
pub fn quantize_group(x: &[f32], codes: &mut [u8], pow2: bool) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let s = group_scale(amax, pow2);
    for (c, v) in codes.iter_mut().zip(x) {
        *c = f32_to_e4m3(v / s);
    }
    s
}

/// Per-token, per-128-channel activation quantization of `x` (`[n, k]`): codes `[n, k]` and
/// scales `[n, ceil(k / 128)]`.
pub fn act_quant(x: &[f32], n: usize, k: usize, pow2: bool) -> (Vec<u8>, Vec<f32>) {
    let groups = k.div_ceil(GROUP);
    let mut codes = vec![0u8; n * k];
    let mut scales = vec![0f32; n * groups];
    for r in 0..n {
        for g in 0..groups {
            let (a, b) = (r * k + g * GROUP, r * k + ((g + 1) * GROUP).min(k));
            scales[r * groups + g] = quantize_group(&x[a..b], &mut codes[a..b], pow2);
        }
    }
    (codes, scales)
}

/// The FP8 linear `y = x · Wᵀ` exactly as the GPU computes it: activations quantized per token
/// and group, products of codes summed per 128-wide K block, each block sum promoted to f32 with
/// both scales. Needs `w.block == [128, 128]`.
pub fn fp8_linear(x: &[f32], n: usize, w: &Fp8Weight, pow2: bool) -> Vec<f32> {
    let (out, k) = (w.rows, w.cols);
    let (xq, xs) = act_quant(x, n, k, pow2);
    let groups = k.div_ceil(GROUP);
    let table: Vec<f32> = (0..=255u8).map(fp8_e4m3_to_f32).collect();
    let mut y = vec![0f32; n * out];
    for m in 0..n {
        for o in 0..out {
            let mut acc = 0f64;
            for g in 0..groups {
                let mut block = 0f64;
                for kk in g * GROUP..((g + 1) * GROUP).min(k) {
                    block += table[xq[m * k + kk] as usize] as f64
                        * table[w.codes[o * k + kk] as usize] as f64;
                }
                acc +=
                    block * xs[m * groups + g] as f64 * w.scale_inv[(o / 128) * groups + g] as f64;
            }
            y[m * out + o] = acc as f32;
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_and_midpoints_round_to_even() {
        for c in 0u8..=255 {
            let v = fp8_e4m3_to_f32(c);
            if v.is_nan() {
                assert_eq!(f32_to_e4m3(v) & 0x7f, 0x7f);
                continue;
            }
            let back = f32_to_e4m3(v);
            // -0 and +0 both decode to zero; the sign survives.
            assert_eq!(fp8_e4m3_to_f32(back), v, "code {c:#04x}");
        }
        // 1.0 = 0x38, next is 1.125 = 0x39: the midpoint goes to the even code.
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        // 1.125 (0x39) and 1.25 (0x3a): the midpoint 1.1875 goes to 0x3a.
        assert_eq!(f32_to_e4m3(1.1875), 0x3a);
        assert_eq!(f32_to_e4m3(1.06), 0x38);
        assert_eq!(f32_to_e4m3(1.07), 0x39);
        assert_eq!(f32_to_e4m3(1e6), 0x7e);
        assert_eq!(f32_to_e4m3(-1e6), 0xfe);
        assert_eq!(f32_to_e4m3(f32::INFINITY), 0x7e);
        // Below half the smallest subnormal (2^-9) rounds to zero; above it to the subnormal.
        assert_eq!(f32_to_e4m3(2f32.powi(-10)), 0x00);
        assert_eq!(f32_to_e4m3(2f32.powi(-10) * 1.01), 0x01);
    }

    #[test]
    fn pow2_scales_round_up_and_keep_exact_powers() {
        assert_eq!(round_up_pow2(0.25), 0.25);
        assert_eq!(round_up_pow2(0.26), 0.5);
        assert_eq!(group_scale(448.0, true), 1.0);
        assert_eq!(group_scale(449.0, true), 2.0);
        assert_eq!(group_scale(0.0, false), AMAX_FLOOR / 448.0);
    }

    #[test]
    fn quantized_groups_stay_within_half_an_e4m3_step() {
        let x: Vec<f32> = (0..300)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        for pow2 in [false, true] {
            let (codes, scales) = act_quant(&x, 1, 300, pow2);
            assert_eq!(scales.len(), 3);
            for (i, v) in x.iter().enumerate() {
                let back = fp8_e4m3_to_f32(codes[i]) * scales[i / GROUP];
                // 3 mantissa bits: at most 2^-4 relative, or half a subnormal step near zero.
                let tol = v.abs() / 16.0 + scales[i / GROUP] * 2f32.powi(-10);
                assert!((back - v).abs() <= tol, "{v} -> {back}");
            }
        }
    }

    #[test]
    fn block_quantized_weights_dequantize_close_and_the_gemm_matches_f64() {
        let (rows, cols) = (130, 200);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 997) as f32 / 997.0 - 0.5) * 0.2)
            .collect();
        let q = Fp8Weight::quantize(&w, rows, cols, [128, 128]);
        assert_eq!(q.scale_inv.len(), 2 * 2);
        let d = q.dequantize();
        for (a, b) in w.iter().zip(&d) {
            assert!((a - b).abs() <= a.abs() / 16.0 + 1e-6);
        }
        // With activations already on the E4M3 grid at scale 1, the GEMM is exact.
        let x: Vec<f32> = (0..2 * cols)
            .map(|i| fp8_e4m3_to_f32((i % 120) as u8))
            .collect();
        let y = fp8_linear(&x, 2, &q, true);
        for m in 0..2 {
            for o in 0..rows {
                let want: f64 = (0..cols)
                    .map(|k| x[m * cols + k] as f64 * d[o * cols + k] as f64)
                    .sum();
                let got = y[m * rows + o] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{got} vs {want}"
                );
            }
        }
    }
}
