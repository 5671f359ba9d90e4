//! `config.json` of a DeepSeek-V3.2 checkpoint: the on-disk form (Hugging Face field names,
//! both the `rope_scaling` and the newer `rope_parameters` spelling) and the validated runtime
//! form every other module reads.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::ModelError;

/// Which feed-forward block a decoder layer carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpKind {
    Dense,
    Moe,
}

/// YaRN context extension, as DeepSeek configures it.
#[derive(Debug, Clone, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// 0 when the config leaves it out (HF treats a missing value as falsy).
    pub mscale: f64,
    pub mscale_all_dim: f64,
    /// Explicit cos/sin scale; when absent it is derived from mscale / mscale_all_dim.
    pub attention_factor: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub yarn: Option<Yarn>,
}

/// FP8 block quantization of the linear weights (`quantization_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Config {
    pub block: [usize; 2],
    /// `scale_fmt: ue8m0`: activation scales are powers of two (DeepSeek-V3.2).
    pub pow2_scales: bool,
}

/// The validated model configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub q_lora_rank: usize,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub routed_scaling_factor: f32,
    pub norm_topk_prob: bool,
    pub rms_norm_eps: f32,
    pub max_position_embeddings: usize,
    pub rope: RopeConfig,
    pub index_n_heads: usize,
    pub index_head_dim: usize,
    pub index_topk: usize,
    pub mlp_layer_types: Vec<MlpKind>,
    pub quantization: Option<Fp8Config>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub tie_word_embeddings: bool,
    pub num_nextn_predict_layers: usize,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    moe_intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    q_lora_rank: Option<usize>,
    kv_lora_rank: usize,
    qk_nope_head_dim: usize,
    qk_rope_head_dim: usize,
    v_head_dim: usize,
    n_routed_experts: usize,
    #[serde(default = "one")]
    n_shared_experts: usize,
    num_experts_per_tok: usize,
    #[serde(default = "one")]
    n_group: usize,
    #[serde(default = "one")]
    topk_group: usize,
    #[serde(default = "one_f")]
    routed_scaling_factor: f32,
    #[serde(default = "yes")]
    norm_topk_prob: bool,
    scoring_func: Option<String>,
    topk_method: Option<String>,
    hidden_act: Option<String>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f32,
    max_position_embeddings: usize,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    #[serde(default = "default_index_heads")]
    index_n_heads: usize,
    #[serde(default = "default_index_dim")]
    index_head_dim: usize,
    #[serde(default = "default_index_topk")]
    index_topk: usize,
    first_k_dense_replace: Option<usize>,
    #[serde(default = "one")]
    moe_layer_freq: usize,
    mlp_layer_types: Option<Vec<String>>,
    quantization_config: Option<Value>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<Value>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    num_nextn_predict_layers: usize,
    #[serde(default)]
    attention_bias: bool,
}

fn one() -> usize {
    1
}
fn one_f() -> f32 {
    1.0
}
fn yes() -> bool {
    true
}
fn default_eps() -> f32 {
    1e-6
}
fn default_index_heads() -> usize {
    64
}
fn default_index_dim() -> usize {
    128
}
fn default_index_topk() -> usize {
    2048
}

fn invalid(msg: impl Into<String>) -> ModelError {
    ModelError::InvalidConfig(msg.into())
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::from_json(&text)
    }

    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| invalid(format!("config.json: {e}")))?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Self, ModelError> {
        let is_v32 = raw.model_type.as_deref() == Some("deepseek_v32")
            || raw
                .architectures
                .as_deref()
                .is_some_and(|a| a.iter().any(|s| s == "DeepseekV32ForCausalLM"));
        if !is_v32 {
            return Err(ModelError::UnsupportedModel(format!(
                "model_type {:?} (architectures {:?}); this engine serves model_type \"deepseek_v32\"",
                raw.model_type.unwrap_or_default(),
                raw.architectures.unwrap_or_default()
            )));
        }
        if let Some(f) = raw.scoring_func.as_deref().filter(|f| *f != "sigmoid") {
            return Err(invalid(format!(
                "scoring_func {f:?} is not supported (DeepSeek-V3.2 uses \"sigmoid\")"
            )));
        }
        if let Some(m) = raw.topk_method.as_deref().filter(|m| *m != "noaux_tc") {
            return Err(invalid(format!(
                "topk_method {m:?} is not supported (DeepSeek-V3.2 uses \"noaux_tc\")"
            )));
        }
        if let Some(a) = raw.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(invalid(format!(
                "hidden_act {a:?} is not supported (expected \"silu\")"
            )));
        }
        if raw.attention_bias {
            return Err(invalid(
                "attention_bias = true is not supported by DeepSeek-V3.2",
            ));
        }
        let q_lora_rank = raw.q_lora_rank.ok_or_else(|| {
            invalid("q_lora_rank is required: the lightning indexer reads the query latent")
        })?;

        let mlp_layer_types = match (&raw.mlp_layer_types, raw.first_k_dense_replace) {
            (Some(types), _) => types
                .iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    "dense" => Ok(MlpKind::Dense),
                    "sparse" | "moe" => Ok(MlpKind::Moe),
                    other => Err(invalid(format!(
                        "mlp_layer_types[{i}] = {other:?}; expected \"dense\" or \"sparse\""
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?,
            (None, first_dense) => {
                let first_dense = first_dense.unwrap_or(3).min(raw.num_hidden_layers);
                let freq = raw.moe_layer_freq.max(1);
                (0..raw.num_hidden_layers)
                    .map(|i| {
                        if i >= first_dense && i % freq == 0 {
                            MlpKind::Moe
                        } else {
                            MlpKind::Dense
                        }
                    })
                    .collect()
            }
        };

        let rope = parse_rope(
            raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref()),
            raw.rope_theta,
        )?;
        let quantization = raw
            .quantization_config
            .as_ref()
            .map(parse_quant)
            .transpose()?;
        let eos_token_ids = match &raw.eos_token_id {
            None | Some(Value::Null) => vec![],
            Some(Value::Number(n)) => vec![
                n.as_u64()
                    .ok_or_else(|| invalid("eos_token_id must be a token id"))?
                    as u32,
            ],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|x| x as u32)
                        .ok_or_else(|| invalid("eos_token_id must hold token ids"))
                })
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(invalid(format!("eos_token_id {other} is not a token id"))),
        };

        let cfg = ModelConfig {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            moe_intermediate_size: raw.moe_intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            q_lora_rank,
            kv_lora_rank: raw.kv_lora_rank,
            qk_nope_head_dim: raw.qk_nope_head_dim,
            qk_rope_head_dim: raw.qk_rope_head_dim,
            v_head_dim: raw.v_head_dim,
            n_routed_experts: raw.n_routed_experts,
            n_shared_experts: raw.n_shared_experts,
            num_experts_per_tok: raw.num_experts_per_tok,
            n_group: raw.n_group,
            topk_group: raw.topk_group,
            routed_scaling_factor: raw.routed_scaling_factor,
            norm_topk_prob: raw.norm_topk_prob,
            rms_norm_eps: raw.rms_norm_eps,
            max_position_embeddings: raw.max_position_embeddings,
            rope,
            index_n_heads: raw.index_n_heads,
            index_head_dim: raw.index_head_dim,
            index_topk: raw.index_topk,
            mlp_layer_types,
            quantization,
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
            tie_word_embeddings: raw.tie_word_embeddings,
            num_nextn_predict_layers: raw.num_nextn_predict_layers,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Cross-field consistency; every message names the fields involved.
    pub fn validate(&self) -> Result<(), ModelError> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("q_lora_rank", self.q_lora_rank),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("index_n_heads", self.index_n_heads),
            ("index_head_dim", self.index_head_dim),
            ("index_topk", self.index_topk),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(invalid(format!("{name} must be positive")));
            }
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err(invalid(format!(
                "qk_rope_head_dim ({}) must be even",
                self.qk_rope_head_dim
            )));
        }
        if self.index_head_dim < self.qk_rope_head_dim {
            return Err(invalid(format!(
                "index_head_dim ({}) must be at least qk_rope_head_dim ({}): the indexer rotates its first rope dims",
                self.index_head_dim, self.qk_rope_head_dim
            )));
        }
        if self.mlp_layer_types.len() != self.num_hidden_layers {
            return Err(invalid(format!(
                "mlp_layer_types has {} entries but num_hidden_layers is {}",
                self.mlp_layer_types.len(),
                self.num_hidden_layers
            )));
        }
        if self.has_moe() {
            if self.n_routed_experts == 0
                || self.num_experts_per_tok == 0
                || self.moe_intermediate_size == 0
            {
                return Err(invalid(
                    "MoE layers need n_routed_experts, num_experts_per_tok and moe_intermediate_size > 0",
                ));
            }
            if self.n_group == 0 || !self.n_routed_experts.is_multiple_of(self.n_group) {
                return Err(invalid(format!(
                    "n_routed_experts ({}) must be divisible by n_group ({})",
                    self.n_routed_experts, self.n_group
                )));
            }
            if self.topk_group == 0 || self.topk_group > self.n_group {
                return Err(invalid(format!(
                    "topk_group ({}) must be between 1 and n_group ({})",
                    self.topk_group, self.n_group
                )));
            }
            let selectable = self.topk_group * (self.n_routed_experts / self.n_group);
            if self.num_experts_per_tok > selectable {
                return Err(invalid(format!(
                    "num_experts_per_tok ({}) exceeds the experts in topk_group groups ({selectable})",
                    self.num_experts_per_tok
                )));
            }
        }
        if self.mlp_layer_types.contains(&MlpKind::Dense) && self.intermediate_size == 0 {
            return Err(invalid("dense layers need intermediate_size > 0"));
        }
        for id in self.bos_token_id.iter().chain(&self.eos_token_ids) {
            if *id as usize >= self.vocab_size {
                return Err(invalid(format!(
                    "special token id {id} is outside vocab_size {}",
                    self.vocab_size
                )));
            }
        }
        if let Some(y) = &self.rope.yarn
            && (y.factor <= 0.0 || y.original_max_position_embeddings <= 0.0)
        {
            return Err(invalid(
                "rope yarn factor and original_max_position_embeddings must be positive",
            ));
        }
        Ok(())
    }

    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Per-token width of the MLA latent cache: compressed KV then the shared rope key.
    pub fn latent_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// Multiply-add FLOPs (2 per MAC) of one token at position `context`, counting only the
    /// weights a token activates (routed top-k plus shared experts) and attention over the
    /// `min(index_topk, context + 1)` selected keys plus the indexer's scan of every key.
    pub fn flops_per_token(&self, context: usize) -> f64 {
        let (h, heads) = (self.hidden_size as f64, self.num_attention_heads as f64);
        let (ql, kvr, rd) = (
            self.q_lora_rank as f64,
            self.kv_lora_rank as f64,
            self.qk_rope_head_dim as f64,
        );
        let (nope, vd) = (self.qk_nope_head_dim as f64, self.v_head_dim as f64);
        let (ih, id) = (self.index_n_heads as f64, self.index_head_dim as f64);
        let keys = (context + 1) as f64;
        let selected = keys.min(self.index_topk as f64);
        let projections = h * ql + ql * heads * (nope + rd) + h * (kvr + rd) + heads * vd * h;
        let indexer = ql * ih * id + h * id + h * ih + keys * ih * id;
        let absorbed = heads * nope * kvr + heads * vd * kvr + selected * heads * (2.0 * kvr + rd);
        let mut macs = 0.0;
        for kind in &self.mlp_layer_types {
            macs += projections + indexer + absorbed;
            macs += match kind {
                MlpKind::Dense => 3.0 * h * self.intermediate_size as f64,
                MlpKind::Moe => {
                    let m = self.moe_intermediate_size as f64;
                    h * self.n_routed_experts as f64
                        + 3.0 * h * m * (self.num_experts_per_tok + self.n_shared_experts) as f64
                }
            };
        }
        2.0 * (macs + h * self.vocab_size as f64)
    }

    pub fn has_moe(&self) -> bool {
        self.mlp_layer_types.contains(&MlpKind::Moe)
    }

    /// The attention softmax scale: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN.
    pub fn softmax_scale(&self) -> f32 {
        let base = (self.qk_head_dim() as f64).powf(-0.5);
        let m = match &self.rope.yarn {
            Some(y) if y.mscale_all_dim != 0.0 => yarn_mscale(y.factor, y.mscale_all_dim),
            _ => 1.0,
        };
        (base * m * m) as f32
    }
}

/// YaRN's magnitude correction `0.1 * m * ln(scale) + 1` (1 when not extending).
pub fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

fn parse_rope(v: Option<&Value>, top_theta: Option<f64>) -> Result<RopeConfig, ModelError> {
    let theta_of = |v: &Value| v.get("rope_theta").and_then(Value::as_f64);
    let theta = v.and_then(theta_of).or(top_theta).unwrap_or(10000.0);
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(RopeConfig { theta, yarn: None });
    };
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| v.get(k).and_then(Value::as_f64);
    match kind {
        "default" => Ok(RopeConfig { theta, yarn: None }),
        "yarn" => {
            let factor =
                num("factor").ok_or_else(|| invalid("rope yarn scaling needs `factor`"))?;
            let original = num("original_max_position_embeddings").ok_or_else(|| {
                invalid("rope yarn scaling needs `original_max_position_embeddings`")
            })?;
            Ok(RopeConfig {
                theta,
                yarn: Some(Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: num("beta_fast").unwrap_or(32.0),
                    beta_slow: num("beta_slow").unwrap_or(1.0),
                    mscale: num("mscale").unwrap_or(0.0),
                    mscale_all_dim: num("mscale_all_dim").unwrap_or(0.0),
                    attention_factor: num("attention_factor"),
                }),
            })
        }
        other => Err(invalid(format!(
            "rope type {other:?} is not supported (expected \"yarn\" or \"default\")"
        ))),
    }
}

fn parse_quant(v: &Value) -> Result<Fp8Config, ModelError> {
    let method = v.get("quant_method").and_then(Value::as_str).unwrap_or("");
    if method != "fp8" {
        return Err(invalid(format!(
            "quantization_config.quant_method {method:?} is not supported (expected \"fp8\")"
        )));
    }
    if let Some(fmt) = v
        .get("fmt")
        .and_then(Value::as_str)
        .filter(|f| *f != "e4m3")
    {
        return Err(invalid(format!(
            "quantization_config.fmt {fmt:?} is not supported (expected \"e4m3\")"
        )));
    }
    let block = match v.get("weight_block_size") {
        None | Some(Value::Null) => [128, 128],
        Some(b) => {
            let dims: Vec<usize> = b
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_u64)
                        .map(|x| x as usize)
                        .collect()
                })
                .unwrap_or_default();
            match dims.as_slice() {
                [r, c] if *r > 0 && *c > 0 => [*r, *c],
                _ => {
                    return Err(invalid(format!(
                        "quantization_config.weight_block_size {b} must be two positive integers"
                    )));
                }
            }
        }
    };
    let pow2_scales = v.get("scale_fmt").and_then(Value::as_str) == Some("ue8m0");
    Ok(Fp8Config { block, pow2_scales })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn fixture_config(name: &str) -> ModelConfig {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
            .join("config.json");
        ModelConfig::from_file(&path).unwrap()
    }

    #[test]
    fn fixture_configs_parse_with_yarn_and_layer_types() {
        let c = fixture_config("tiny-deep");
        assert_eq!(c.num_hidden_layers, 4);
        assert_eq!(
            c.mlp_layer_types,
            vec![MlpKind::Dense, MlpKind::Dense, MlpKind::Moe, MlpKind::Moe]
        );
        let y = c.rope.yarn.as_ref().unwrap();
        assert_eq!(y.factor, 8.0);
        assert_eq!(y.mscale_all_dim, 0.8);
        assert!(c.quantization.is_none());
        let f = fixture_config("tiny-fp8");
        assert_eq!(
            f.quantization,
            Some(Fp8Config {
                block: [128, 128],
                pow2_scales: true
            })
        );
    }

    #[test]
    fn the_released_config_spelling_with_rope_scaling_parses() {
        let text = r#"{"architectures":["DeepseekV32ForCausalLM"],"model_type":"deepseek_v32","vocab_size":129280,
          "hidden_size":7168,"intermediate_size":18432,"moe_intermediate_size":2048,"num_hidden_layers":61,
          "num_attention_heads":128,"q_lora_rank":1536,"kv_lora_rank":512,"qk_nope_head_dim":128,
          "qk_rope_head_dim":64,"v_head_dim":128,"n_routed_experts":256,"n_shared_experts":1,
          "num_experts_per_tok":8,"n_group":8,"topk_group":4,"routed_scaling_factor":2.5,"scoring_func":"sigmoid",
          "topk_method":"noaux_tc","norm_topk_prob":true,"rms_norm_eps":1e-6,"max_position_embeddings":163840,
          "rope_theta":10000,"rope_scaling":{"type":"yarn","factor":40,"original_max_position_embeddings":4096,
          "beta_fast":32,"beta_slow":1,"mscale":1.0,"mscale_all_dim":1.0},"first_k_dense_replace":3,
          "moe_layer_freq":1,"index_n_heads":64,"index_head_dim":128,"index_topk":2048,"num_nextn_predict_layers":1,
          "bos_token_id":0,"eos_token_id":1,"quantization_config":{"activation_scheme":"dynamic","fmt":"e4m3",
          "quant_method":"fp8","weight_block_size":[128,128],"scale_fmt":"ue8m0"}}"#;
        let c = ModelConfig::from_json(text).unwrap();
        assert_eq!(
            c.mlp_layer_types
                .iter()
                .filter(|k| **k == MlpKind::Dense)
                .count(),
            3
        );
        assert_eq!(c.num_nextn_predict_layers, 1);
        // DEEPSEEK_V32.md §2.2: 192^-0.5 * (0.1 ln 40 + 1)^2 = 0.135234
        assert!(
            (c.softmax_scale() - 0.135234).abs() < 1e-5,
            "{}",
            c.softmax_scale()
        );
        assert_eq!(c.latent_dim(), 576);
    }

    #[test]
    fn an_unknown_model_type_is_refused_by_name() {
        let err = ModelConfig::from_json(r#"{"model_type":"llama","vocab_size":1,"hidden_size":1,"intermediate_size":1,
            "moe_intermediate_size":1,"num_hidden_layers":1,"num_attention_heads":1,"kv_lora_rank":1,
            "qk_nope_head_dim":1,"qk_rope_head_dim":2,"v_head_dim":1,"n_routed_experts":1,"num_experts_per_tok":1,
            "max_position_embeddings":8}"#)
        .unwrap_err();
        assert!(err.to_string().contains("llama"), "{err}");
    }

    #[test]
    fn inconsistent_expert_groups_are_refused() {
        let mut c = fixture_config("tiny-sharded");
        c.n_group = 3;
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("n_routed_experts (8) must be divisible by n_group (3)"),
            "{err}"
        );
        let mut c = fixture_config("tiny-sharded");
        c.index_head_dim = 4;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("index_head_dim")
        );
        let mut c = fixture_config("tiny-sharded");
        c.mlp_layer_types.pop();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("mlp_layer_types")
        );
    }
}
