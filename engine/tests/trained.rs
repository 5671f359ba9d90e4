//! The small DeepSeek-V3.2-architecture model trained on real text (`models/deepseek-v3.2-mini`,
//! made by `train/`) against the transformers reference its export recorded from the same
//! dequantized FP8 weights: logits on held-out prompts and 64-token greedy continuations of 8
//! prompts, on the CPU reference backend. A trained model's logits are peaked, so agreement here
//! means the engine computes the language model, not just the random fixtures' function.

use std::path::{Path, PathBuf};

use deepseek_engine::generate::{self, GenerateRequest, SamplingParams};
use deepseek_engine::model::Model;
use safetensors::SafeTensors;
use serde::Deserialize;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/deepseek-v3.2-mini")
}

#[derive(Deserialize)]
struct LogitPrompt {
    id: String,
    prompt_ids: Vec<u32>,
    logit_positions: Vec<usize>,
}

#[derive(Deserialize)]
struct Greedy {
    id: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Expected {
    logit_prompts: Vec<LogitPrompt>,
    greedy: Vec<Greedy>,
}

fn expected() -> Expected {
    serde_json::from_str(&std::fs::read_to_string(dir().join("expected.json")).unwrap()).unwrap()
}

/// max |a - b| / max |b| over one row.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Positions up to the indexer's top-k attend to every earlier key, so they are compared at
/// 1e-5. Past it the selection decides: this model's trained indexer gives many keys a score
/// of exactly zero after its ReLU (151 tied keys at one boundary of the long prompt), so which
/// of them are kept is arbitrary in both implementations and those rows are not compared.
#[test]
fn cpu_logits_match_transformers_on_the_trained_model() {
    let model = Model::load(&dir()).unwrap();
    let bytes = std::fs::read(dir().join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let vocab = model.config.vocab_size;
    let dense_until = model.config.index_topk;
    let mut compared = 0;
    for (i, p) in expected().logit_prompts.iter().enumerate() {
        let ours = generate::score(&model, &p.prompt_ids, false).unwrap();
        let reference: Vec<f32> = st
            .tensor(&format!("logits.{i}"))
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        for (row, &pos) in p.logit_positions.iter().enumerate() {
            if pos >= dense_until {
                continue;
            }
            let want = &reference[row * vocab..(row + 1) * vocab];
            let e = rel_err(&ours[pos], want);
            assert!(e <= 1e-5, "{} position {pos}: relative error {e:.2e}", p.id);
            compared += 1;
        }
    }
    assert!(compared >= 30, "only {compared} rows compared");
}

#[test]
fn greedy_continuations_match_transformers_on_the_trained_model() {
    let model = Model::load(&dir()).unwrap();
    let exp = expected();
    let requests: Vec<GenerateRequest> = exp
        .greedy
        .iter()
        .map(|g| GenerateRequest {
            prompt: g.prompt_ids.clone(),
            max_tokens: g.greedy_ids.len(),
            sampling: SamplingParams::default(),
            stop_token_ids: vec![],
        })
        .collect();
    let got = generate::generate_batch(&model, &requests).unwrap();
    for (g, out) in exp.greedy.iter().zip(&got) {
        assert_eq!(out.token_ids, g.greedy_ids, "{}", g.id);
    }
    assert_eq!(got.len(), 8);
}
