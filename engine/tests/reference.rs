//! The CPU reference backend against transformers' `DeepseekV32ForCausalLM`: logits and greedy
//! tokens of the fixtures made by `scripts/gen_fixtures.py`, plus the cache and batching
//! invariants (incremental decode == full recompute; a mixed batch == each sequence alone).

use std::path::{Path, PathBuf};

use deepseek_engine::backend::cpu::CpuKvCache;
use deepseek_engine::generate::{self, GenerateRequest, SamplingParams};
use deepseek_engine::kv::{BlockAllocator, BlockTable, KvGeometry};
use deepseek_engine::model::{LogitsWanted, Model, SeqChunk};
use safetensors::SafeTensors;
use serde::Deserialize;

const FIXTURES: [&str; 3] = ["tiny-sharded", "tiny-deep", "tiny-fp8"];

#[derive(Deserialize)]
struct Expected {
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    rope_attention_scaling: f32,
    softmax_scale: f32,
}

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn expected(name: &str) -> (Expected, Vec<u8>) {
    let meta =
        serde_json::from_str(&std::fs::read_to_string(dir(name).join("expected.json")).unwrap())
            .unwrap();
    (
        meta,
        std::fs::read(dir(name).join("expected.safetensors")).unwrap(),
    )
}

fn f32s(bytes: &[u8], name: &str) -> Vec<f32> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// max |a - b| / max |b|: the error relative to the reference's scale.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn logits_match_transformers_on_every_fixture() {
    for name in FIXTURES {
        let model = Model::load(&dir(name)).unwrap();
        let (exp, bytes) = expected(name);
        let ours: Vec<f32> = generate::score(&model, &exp.prompt_ids, false)
            .unwrap()
            .concat();
        let reference = f32s(&bytes, "logits");
        let err = rel_err(&ours, &reference);
        eprintln!(
            "{name}: max|diff|/max|ref| = {err:.2e} over {} logits",
            reference.len()
        );
        assert!(err < 1e-4, "{name}: relative error {err}");
    }
}

#[test]
fn greedy_tokens_match_transformers_on_every_fixture() {
    for name in FIXTURES {
        let model = Model::load(&dir(name)).unwrap();
        let (exp, _) = expected(name);
        let req = GenerateRequest {
            prompt: exp.prompt_ids.clone(),
            max_tokens: exp.greedy_ids.len(),
            sampling: SamplingParams::default(),
            stop_token_ids: vec![],
        };
        let got = generate::generate_batch(&model, &[req]).unwrap().remove(0);
        assert_eq!(got.token_ids, exp.greedy_ids, "{name}");
    }
}

#[test]
fn yarn_tables_and_softmax_scale_match_transformers() {
    for name in FIXTURES {
        let model = Model::load(&dir(name)).unwrap();
        let (exp, bytes) = expected(name);
        let inv = f32s(&bytes, "rope_inv_freq");
        assert!(
            rel_err(&model.rope.inv_freq, &inv) < 1e-6,
            "{name}: {:?} vs {:?}",
            model.rope.inv_freq,
            inv
        );
        assert!(
            (model.rope.attention_factor - exp.rope_attention_scaling).abs() < 1e-6,
            "{name}"
        );
        assert!(
            (model.softmax_scale - exp.softmax_scale).abs() < 1e-6,
            "{name}"
        );
    }
}

fn run(
    model: &Model,
    cache: &mut CpuKvCache,
    table: &BlockTable,
    tokens: &[u32],
    start: usize,
) -> Vec<f32> {
    model
        .forward(
            cache,
            &[SeqChunk {
                tokens,
                start_pos: start,
                blocks: table,
                logits: LogitsWanted::All,
            }],
        )
        .unwrap()
        .remove(0)
}

#[test]
fn incremental_decode_equals_full_recompute() {
    for name in ["tiny-deep", "tiny-fp8"] {
        let model = Model::load(&dir(name)).unwrap();
        let (exp, _) = expected(name);
        let prompt = &exp.prompt_ids;
        let full = generate::score(&model, prompt, false).unwrap().concat();
        let v = model.config.vocab_size;

        // Small blocks so the sequence spans many non-contiguous blocks.
        let geometry = KvGeometry {
            num_blocks: 64,
            block_size: 4,
        };
        let mut alloc = BlockAllocator::new(geometry);
        let mut decoy = BlockTable::default();
        alloc.reserve(&mut decoy, 9).unwrap();
        let mut cache = CpuKvCache::new(&model.config, geometry);
        let mut table = BlockTable::default();
        alloc.reserve(&mut table, prompt.len()).unwrap();
        let split = 30;
        let mut ours = run(&model, &mut cache, &table, &prompt[..split], 0);
        // One chunk of several tokens, then single-token decode steps.
        ours.extend(run(
            &model,
            &mut cache,
            &table,
            &prompt[split..split + 5],
            split,
        ));
        for p in split + 5..prompt.len() {
            ours.extend(run(&model, &mut cache, &table, &prompt[p..p + 1], p));
        }
        assert_eq!(ours.len(), prompt.len() * v);
        let err = rel_err(&ours, &full);
        assert!(
            err < 1e-5,
            "{name}: incremental vs full relative error {err}"
        );
    }
}

#[test]
fn a_batch_of_mixed_lengths_equals_each_sequence_alone() {
    let model = Model::load(&dir("tiny-sharded")).unwrap();
    let (exp, _) = expected("tiny-sharded");
    let p = &exp.prompt_ids;
    let prompts: [&[u32]; 3] = [&p[..72], &p[5..23], &p[40..41]];
    let alone: Vec<Vec<f32>> = prompts
        .iter()
        .map(|q| generate::score(&model, q, false).unwrap().concat())
        .collect();

    let geometry = KvGeometry {
        num_blocks: 16,
        block_size: 16,
    };
    let mut alloc = BlockAllocator::new(geometry);
    let mut cache = CpuKvCache::new(&model.config, geometry);
    let tables: Vec<BlockTable> = prompts
        .iter()
        .map(|q| {
            let mut t = BlockTable::default();
            alloc.reserve(&mut t, q.len()).unwrap();
            t
        })
        .collect();
    let chunks: Vec<SeqChunk> = prompts
        .iter()
        .zip(&tables)
        .map(|(q, t)| SeqChunk {
            tokens: q,
            start_pos: 0,
            blocks: t,
            logits: LogitsWanted::All,
        })
        .collect();
    let batched = model.forward(&mut cache, &chunks).unwrap();
    for (i, (b, a)) in batched.iter().zip(&alone).enumerate() {
        let err = rel_err(b, a);
        assert!(
            err < 1e-5,
            "sequence {i}: batched vs alone relative error {err}"
        );
    }

    // Greedy generation batched equals each alone, too.
    let reqs: Vec<GenerateRequest> = prompts
        .iter()
        .map(|q| GenerateRequest {
            prompt: q.to_vec(),
            max_tokens: 6,
            sampling: SamplingParams::default(),
            stop_token_ids: vec![],
        })
        .collect();
    let together = generate::generate_batch(&model, &reqs).unwrap();
    for (r, g) in reqs.iter().zip(&together) {
        assert_eq!(
            &generate::generate_batch(&model, std::slice::from_ref(r)).unwrap()[0],
            g
        );
    }
}

#[test]
fn a_stop_token_ends_generation_with_reason_stop() {
    let model = Model::load(&dir("tiny-sharded")).unwrap();
    let (exp, _) = expected("tiny-sharded");
    let stop = exp.greedy_ids[3];
    let req = GenerateRequest {
        prompt: exp.prompt_ids.clone(),
        max_tokens: 16,
        sampling: SamplingParams::default(),
        stop_token_ids: vec![stop],
    };
    let g = generate::generate_batch(&model, &[req]).unwrap().remove(0);
    let first = exp.greedy_ids.iter().position(|t| *t == stop).unwrap();
    assert_eq!(g.token_ids, exp.greedy_ids[..=first]);
    assert_eq!(g.finish_reason, generate::FinishReason::Stop);
}

#[test]
fn the_indexer_really_selects_a_subset_on_the_fixtures() {
    // Guard against fixtures whose top-k covers the whole prompt (then sparsity is untested).
    for name in FIXTURES {
        let model = Model::load(&dir(name)).unwrap();
        let (exp, _) = expected(name);
        assert!(model.config.index_topk * 2 < exp.prompt_ids.len(), "{name}");
    }
}

#[test]
fn a_token_outside_the_vocabulary_is_an_error_not_a_panic() {
    let model = Model::load(&dir("tiny-sharded")).unwrap();
    let err = generate::score(&model, &[3, 100_000], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("100000"), "{err}");
}

/// An FP8 checkpoint loaded for a GPU that keeps its weights in FP8: every linear the checkpoint
/// stores in FP8 holds its codes and scales only (no f32 copy), the same as a full load holds,
/// and `kv_b_proj` keeps its f32 values.
#[test]
fn an_fp8_checkpoint_loaded_as_codes_only_keeps_the_codes_and_drops_the_f32_copy() {
    use deepseek_engine::dist::ExpertShard;
    use deepseek_engine::model::{FeedForward, LoadOptions};
    let full = Model::load(&dir("tiny-fp8")).unwrap();
    let codes = Model::load_with(
        &dir("tiny-fp8"),
        ExpertShard::WHOLE,
        LoadOptions {
            fp8_codes_only: true,
        },
    )
    .unwrap();
    let mut checked = 0;
    for (a, b) in full.layers.iter().zip(&codes.layers) {
        let (fa, fb) = (&a.self_attn, &b.self_attn);
        for (x, y) in [
            (&fa.q_a_proj, &fb.q_a_proj),
            (&fa.q_b_proj, &fb.q_b_proj),
            (&fa.kv_a_proj_with_mqa, &fb.kv_a_proj_with_mqa),
            (&fa.o_proj, &fb.o_proj),
        ] {
            let (qx, qy) = (x.fp8.as_ref().unwrap(), y.fp8.as_ref().unwrap());
            assert_eq!(qx, qy);
            assert!(y.weight.is_empty() && !x.weight.is_empty());
            assert_eq!(qy.dequantize(), x.weight);
            checked += 1;
        }
        assert_eq!(fa.kv_b_proj.weight, fb.kv_b_proj.weight);
        if let (FeedForward::Moe(ma), FeedForward::Moe(mb)) = (&a.mlp, &b.mlp) {
            let (ea, eb) = (
                ma.experts[0].as_ref().unwrap(),
                mb.experts[0].as_ref().unwrap(),
            );
            assert!(eb.down_proj.weight.is_empty());
            assert_eq!(ea.down_proj.fp8, eb.down_proj.fp8);
            checked += 1;
        }
    }
    assert!(checked >= 8, "{checked}");
}
