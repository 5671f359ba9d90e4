//! Rotary position tables with YaRN, computed as transformers' `_compute_yarn_parameters` does
//! (correction range from beta_fast/beta_slow, linear ramp, blended inverse frequencies, and the
//! cos/sin attention factor). MLA and the indexer share one table; they differ only in which
//! dimensions form a rotating pair (see `backend::cpu::rope_*`).

use std::f64::consts::PI;

use super::config::{ModelConfig, RopeConfig, yarn_mscale};

#[derive(Debug, Clone)]
pub struct RopeTable {
    /// One inverse frequency per rotating pair (`qk_rope_head_dim / 2` of them).
    pub inv_freq: Vec<f32>,
    /// Scale applied to cos and sin (YaRN's attention factor; 1 without YaRN).
    pub attention_factor: f32,
}

impl RopeTable {
    pub fn new(cfg: &ModelConfig) -> Self {
        Self::from_rope(&cfg.rope, cfg.qk_rope_head_dim)
    }

    pub fn from_rope(rope: &RopeConfig, dim: usize) -> Self {
        let base = rope.theta;
        let half = dim / 2;
        let extrapolation: Vec<f64> = (0..half)
            .map(|i| 1.0 / base.powf((2 * i) as f64 / dim as f64))
            .collect();
        let Some(y) = &rope.yarn else {
            return RopeTable {
                inv_freq: extrapolation.iter().map(|f| *f as f32).collect(),
                attention_factor: 1.0,
            };
        };
        let correction_dim = |rotations: f64| {
            dim as f64 * (y.original_max_position_embeddings / (rotations * 2.0 * PI)).ln()
                / (2.0 * base.ln())
        };
        let low = correction_dim(y.beta_fast).floor().max(0.0);
        let high = correction_dim(y.beta_slow).ceil().min(dim as f64 - 1.0);
        let high = if low == high { high + 0.001 } else { high };
        let inv_freq = (0..half)
            .map(|i| {
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let interp = extrapolation[i] / y.factor;
                (interp * ramp + extrapolation[i] * (1.0 - ramp)) as f32
            })
            .collect();
        let attention_factor = y.attention_factor.unwrap_or_else(|| {
            if y.mscale != 0.0 && y.mscale_all_dim != 0.0 {
                yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)
            } else {
                yarn_mscale(y.factor, 1.0)
            }
        }) as f32;
        RopeTable {
            inv_freq,
            attention_factor,
        }
    }

    /// cos and sin for one position, each `dim / 2` long, already scaled by the attention factor.
    pub fn cos_sin(&self, pos: usize) -> (Vec<f32>, Vec<f32>) {
        let p = pos as f32;
        self.inv_freq
            .iter()
            .map(|f| {
                let angle = (p * f) as f64;
                (
                    angle.cos() as f32 * self.attention_factor,
                    angle.sin() as f32 * self.attention_factor,
                )
            })
            .unzip()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Yarn;

    fn deepseek_rope() -> RopeConfig {
        RopeConfig {
            theta: 10000.0,
            yarn: Some(Yarn {
                factor: 40.0,
                original_max_position_embeddings: 4096.0,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: 1.0,
                mscale_all_dim: 1.0,
                attention_factor: None,
            }),
        }
    }

    #[test]
    fn deepseek_yarn_keeps_low_dims_and_divides_high_dims_by_the_factor() {
        // DEEPSEEK_V32.md §2.2: ramp from dim 10 to 23; i <= 10 unchanged, i >= 23 divided by 40.
        let t = RopeTable::from_rope(&deepseek_rope(), 64);
        let base = |i: usize| 1.0 / 10000f64.powf(2.0 * i as f64 / 64.0);
        for i in 0..=10 {
            assert!(((t.inv_freq[i] as f64) - base(i)).abs() < 1e-7 * base(i).max(1e-3));
        }
        for i in 23..32 {
            assert!(((t.inv_freq[i] as f64) - base(i) / 40.0).abs() <= 1e-6 * base(i));
        }
        let mid = 16;
        assert!(
            (t.inv_freq[mid] as f64) < base(mid) && (t.inv_freq[mid] as f64) > base(mid) / 40.0
        );
        assert_eq!(t.attention_factor, 1.0);
    }

    #[test]
    fn unequal_mscales_scale_cos_and_sin() {
        let mut r = deepseek_rope();
        if let Some(y) = r.yarn.as_mut() {
            y.mscale_all_dim = 0.5;
        }
        let t = RopeTable::from_rope(&r, 64);
        let expected = (0.1 * 40f64.ln() + 1.0) / (0.05 * 40f64.ln() + 1.0);
        assert!((t.attention_factor as f64 - expected).abs() < 1e-6);
        let (c, s) = t.cos_sin(0);
        assert!((c[0] - t.attention_factor).abs() < 1e-7 && s[0] == 0.0);
    }
}
