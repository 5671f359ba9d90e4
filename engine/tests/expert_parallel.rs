//! Expert parallelism on the CPU: a group of ranks (threads with the in-process transport, or
//! TCP through the leader) computes the same logits and tokens as one process holding all
//! experts; groups of engine processes notice a rank that dies or freezes.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::Engine;
use deepseek_engine::backend::Executor;
use deepseek_engine::backend::ep::{ExpertParallelExecutor, run_worker};
use deepseek_engine::dist::{ExpertShard, GroupEnv, TcpOptions, TcpTransport};
use deepseek_engine::generate::{self, GenerateRequest, SamplingParams};
use deepseek_engine::model::Model;
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
struct Expected {
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
}

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn expected(name: &str) -> Expected {
    serde_json::from_str(&std::fs::read_to_string(dir(name).join("expected.json")).unwrap())
        .unwrap()
}

fn shards(name: &str, world: usize) -> Vec<Arc<Model>> {
    (0..world)
        .map(|r| {
            let n = Model::load(&dir(name)).unwrap().config.n_routed_experts;
            Arc::new(
                Model::load_sharded(&dir(name), ExpertShard::new(r, world, n).unwrap()).unwrap(),
            )
        })
        .collect()
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Greedy requests for `prompts`, `max_tokens` each, no stop tokens.
fn greedy_requests(prompts: &[&[u32]], max_tokens: usize) -> Vec<GenerateRequest> {
    prompts
        .iter()
        .map(|q| GenerateRequest {
            prompt: q.to_vec(),
            max_tokens,
            sampling: SamplingParams::default(),
            stop_token_ids: vec![],
        })
        .collect()
}

fn requests(e: &Expected) -> Vec<GenerateRequest> {
    let p = &e.prompt_ids;
    greedy_requests(&[&p[..], &p[3..40], &p[50..52], &p[10..70]], 8)
}

#[test]
fn an_in_process_group_matches_one_process_on_every_fixture() {
    for (name, worlds) in [
        ("tiny-sharded", vec![2, 4]),
        ("tiny-deep", vec![2, 4]),
        ("tiny-fp8", vec![2, 4]),
    ] {
        let whole = Model::load(&dir(name)).unwrap();
        let e = expected(name);
        let reference = generate::score(&whole, &e.prompt_ids, false)
            .unwrap()
            .concat();
        let reqs = requests(&e);
        let single = generate::generate_batch(&whole, &reqs).unwrap();
        for world in worlds {
            let geometry =
                generate::plan_geometry(whole.config.max_position_embeddings, &reqs).unwrap();
            let mut ex = ExpertParallelExecutor::in_process(shards(name, world), geometry).unwrap();
            let (g, parts) = (ex.kv_geometry(), ex.kv_partitions());
            assert_eq!(
                g.num_blocks,
                world * geometry.num_blocks,
                "one partition per rank"
            );
            let logits = generate::score_with(
                &mut |b| ex.forward(b),
                g,
                parts,
                &e.prompt_ids,
                false,
                whole.config.vocab_size,
            )
            .unwrap()
            .concat();
            let err = rel_err(&logits, &reference);
            assert!(err < 1e-5, "{name} EP{world}: relative error {err}");
            let got = generate::generate_with(&mut |b| ex.forward(b), g, parts, &reqs).unwrap();
            assert_eq!(
                got, single,
                "{name} EP{world}: a mixed batch spread over the ranks"
            );
            assert_eq!(got[0].token_ids, e.greedy_ids[..8], "{name} EP{world}");
        }
    }
}

/// Each rank holds its own cache: a group of 2 ranks whose caches each fit only one of two
/// sequences runs both at once (one per rank, the scheduler's pool in two partitions), with the
/// tokens one process with room for both computes.
#[test]
fn a_group_holds_as_many_kv_blocks_as_its_ranks_together() {
    let name = "tiny-deep";
    let whole = Model::load(&dir(name)).unwrap();
    let e = expected(name);
    let p = &e.prompt_ids;
    let reqs = greedy_requests(&[&p[..40], &p[20..60]], 6);
    let both = generate::plan_geometry(whole.config.max_position_embeddings, &reqs).unwrap();
    let one = generate::plan_geometry(whole.config.max_position_embeddings, &reqs[..1]).unwrap();
    assert!(2 * one.num_blocks <= both.num_blocks + 1 && one.num_blocks < both.num_blocks);
    let single = generate::generate_batch(&whole, &reqs).unwrap();
    let mut ex = ExpertParallelExecutor::in_process(shards(name, 2), one).unwrap();
    let (g, parts) = (ex.kv_geometry(), ex.kv_partitions());
    assert_eq!((g.num_blocks, parts), (2 * one.num_blocks, 2));
    let got = generate::generate_with(&mut |b| ex.forward(b), g, parts, &reqs).unwrap();
    assert_eq!(got, single);
    // One rank's cache alone cannot hold both.
    assert!(generate::generate_with(&mut |b| ex.forward(b), one, 1, &reqs).is_err());
}

#[test]
fn each_rank_samples_its_own_sequences_as_one_process_would() {
    use deepseek_engine::backend::CpuExecutor;
    use deepseek_engine::generate::{Rng, Sampler};
    use deepseek_engine::kv::{BlockTable, PrefixCachingPool};
    use deepseek_engine::model::{LogitsWanted, SeqChunk};

    let name = "tiny-deep";
    let whole = Arc::new(Model::load(&dir(name)).unwrap());
    let e = expected(name);
    let prompts: Vec<&[u32]> = vec![
        &e.prompt_ids[..9],
        &e.prompt_ids[4..20],
        &e.prompt_ids[30..33],
        &e.prompt_ids[7..15],
    ];
    let steps = 6;
    let per_rank = deepseek_engine::kv::KvGeometry {
        num_blocks: 16,
        block_size: deepseek_engine::kv::DEFAULT_BLOCK_SIZE,
    };
    let mut group = ExpertParallelExecutor::in_process(shards(name, 2), per_rank).unwrap();
    let mut single = CpuExecutor::new(whole, group.kv_geometry());
    let mut pool =
        PrefixCachingPool::partitioned(group.kv_geometry(), group.kv_partitions(), false);
    let mut tables = vec![BlockTable::default(); prompts.len()];
    for (t, p) in tables.iter_mut().zip(&prompts) {
        pool.reserve(t, p.len() + steps).unwrap();
    }
    let per = per_rank.num_blocks as u32;
    let ranks: Vec<u32> = tables.iter().map(|t| t.blocks[0] / per).collect();
    assert!(
        ranks.contains(&0) && ranks.contains(&1),
        "sequences on both ranks: {ranks:?}"
    );
    // Temperature, nucleus, top-k and logprobs on three sequences; the last has no sampler.
    let samplers = || -> Vec<Option<Sampler>> {
        (0..prompts.len())
            .map(|i| {
                (i < 3).then(|| Sampler {
                    params: SamplingParams {
                        temperature: 0.9,
                        top_p: 0.95,
                        top_k: 40,
                        seed: Some(i as u64),
                    },
                    rng: Rng::new(1000 + i as u64),
                    logprobs: Some(3),
                })
            })
            .collect()
    };
    let (mut s_group, mut s_single) = (samplers(), samplers());
    let mut inputs: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
    let mut pos = vec![0usize; prompts.len()];
    for step in 0..steps {
        let chunks: Vec<SeqChunk> = inputs
            .iter()
            .zip(&tables)
            .zip(&pos)
            .map(|((tokens, blocks), &start_pos)| SeqChunk {
                tokens,
                start_pos,
                blocks,
                logits: LogitsWanted::Last,
            })
            .collect();
        let a = group.forward_sample(&chunks, &mut s_group).unwrap();
        let b = single.forward_sample(&chunks, &mut s_single).unwrap();
        assert!(a[3].is_none() && b[3].is_none(), "no sampler, no token");
        for (i, (x, y)) in a.iter().zip(&b).enumerate().take(3) {
            let (x, y) = (x.as_ref().unwrap(), y.as_ref().unwrap());
            assert_eq!(x.token, y.token, "step {step}, sequence {i}");
            assert!((x.logprob.unwrap() - y.logprob.unwrap()).abs() < 1e-4);
            assert_eq!(x.top_logprobs.len(), 3);
            let ids = |s: &deepseek_engine::generate::Sampled| -> Vec<u32> {
                s.top_logprobs.iter().map(|p| p.0).collect()
            };
            assert_eq!(ids(x), ids(y));
        }
        for (x, y) in s_group.iter().zip(&s_single) {
            assert_eq!(
                x.as_ref().map(|s| s.rng.state()),
                y.as_ref().map(|s| s.rng.state()),
                "every rank hands its samplers' generators back"
            );
        }
        for (i, input) in inputs.iter_mut().enumerate() {
            pos[i] += input.len();
            *input = vec![a[i].as_ref().map_or(7, |s| s.token)];
        }
    }
}

#[test]
fn a_tcp_group_on_loopback_matches_one_process() {
    let name = "tiny-deep";
    let whole = Model::load(&dir(name)).unwrap();
    let e = expected(name);
    let reqs = requests(&e);
    let single = generate::generate_batch(&whole, &reqs).unwrap();
    let geometry = generate::plan_geometry(whole.config.max_position_embeddings, &reqs).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let leader = format!("127.0.0.1:{port}");
    let world = 4; // tiny-deep's 16 experts, 4 per rank; three workers exercise the star routing
    let mut models = shards(name, world).into_iter();
    let leader_model = models.next().unwrap();
    let workers: Vec<_> = models
        .enumerate()
        .map(|(i, m)| {
            let env = GroupEnv {
                rank: i + 1,
                world_size: world,
                leader_addr: leader.clone(),
            };
            std::thread::spawn(move || {
                let mut t =
                    TcpTransport::connect(&env, TcpOptions::new(Duration::from_secs(30))).unwrap();
                run_worker(&m, geometry, &mut t)
            })
        })
        .collect();
    let env = GroupEnv {
        rank: 0,
        world_size: world,
        leader_addr: leader,
    };
    let t = TcpTransport::connect(&env, TcpOptions::new(Duration::from_secs(30))).unwrap();
    let mut ex = ExpertParallelExecutor::new(leader_model, geometry, Box::new(t));
    let got = {
        let (g, parts) = (ex.kv_geometry(), ex.kv_partitions());
        generate::generate_with(&mut |b| ex.forward(b), g, parts, &reqs)
    }
    .unwrap();
    assert_eq!(got, single);
    drop(ex);
    for w in workers {
        w.join().unwrap().unwrap();
    }
}

#[test]
fn a_lost_rank_fails_the_step_with_a_clear_error() {
    let name = "tiny-sharded";
    let whole = Model::load(&dir(name)).unwrap();
    let e = expected(name);
    let reqs = requests(&e);
    let geometry = generate::plan_geometry(whole.config.max_position_embeddings, &reqs).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let leader = format!("127.0.0.1:{port}");
    let env1 = GroupEnv {
        rank: 1,
        world_size: 2,
        leader_addr: leader.clone(),
    };
    // A rank that joins, then dies before the first step.
    let worker = std::thread::spawn(move || {
        drop(TcpTransport::connect(&env1, TcpOptions::new(Duration::from_secs(30))).unwrap())
    });
    let t = TcpTransport::connect(
        &GroupEnv {
            rank: 0,
            world_size: 2,
            leader_addr: leader,
        },
        TcpOptions::new(Duration::from_secs(30)),
    )
    .unwrap();
    worker.join().unwrap();
    let mut ex = ExpertParallelExecutor::new(shards(name, 2).remove(0), geometry, Box::new(t));
    let err = {
        let (g, parts) = (ex.kv_geometry(), ex.kv_partitions());
        generate::generate_with(&mut |b| ex.forward(b), g, parts, &reqs)
    }
    .unwrap_err()
    .to_string();
    assert!(err.contains("rank 1"), "{err}");
}

/// Rank 0 and rank 1 of a two-process group on loopback, serving the built-in model with a
/// short group timeout. `--expert-parallel` is left out: it comes from WORLD_SIZE.
fn group_of_two(timeout_s: &str) -> (Engine, Engine) {
    group_of_two_with(timeout_s, &[])
}

fn group_of_two_with(timeout_s: &str, args: &[&str]) -> (Engine, Engine) {
    let leader = format!("127.0.0.1:{}", common::free_port());
    let rank = |r: &str| {
        let mut c = common::serve();
        c.args(["--group-timeout-seconds", timeout_s])
            .args(args)
            .env("RANK", r)
            .env("WORLD_SIZE", "2")
            .env("LEADER_ADDR", &leader);
        Engine::spawn(c)
    };
    let (mut r0, mut r1) = (rank("0"), rank("1"));
    r0.wait_status("/ready", 200);
    r1.wait_status("/ready", 200);
    (r0, r1)
}

/// A serving group offers both ranks' caches: `--num-kv-blocks` is per rank, the scheduler
/// sees twice that in two partitions, and `max_model_len` is what one rank holds (one sequence
/// lives on one rank). Two requests that each need most of a rank's cache both complete.
#[test]
fn a_serving_group_offers_both_ranks_caches_and_bounds_one_sequence_by_one_rank() {
    let (mut r0, _r1) = group_of_two_with("10", &["--num-kv-blocks", "2", "--block-size", "64"]);
    let addr = r0.addr();
    let metrics = common::http(&addr, "GET", "/metrics", None).unwrap().body;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("vllm:cache_config_info{")
                && l.contains(r#"block_size="64""#)
                && l.contains(r#"num_gpu_blocks="4""#)),
        "{metrics}"
    );
    let models = common::http(&addr, "GET", "/v1/models", None).unwrap();
    assert_eq!(models.json()["data"][0]["max_model_len"], 128);
    let ask = |n: usize| {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let body = json!({
                "messages": [{ "role": "user", "content": format!("Request {n}.") }],
                "max_tokens": 90,
                "ignore_eos": true,
            });
            common::http(&addr, "POST", "/v1/chat/completions", Some(&body)).unwrap()
        })
    };
    for r in [ask(1), ask(2)].map(|h| h.join().unwrap()) {
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["usage"]["completion_tokens"], 90, "{}", r.body);
    }
}

fn long_chat() -> Value {
    json!({
        "messages": [{ "role": "user", "content": "Tell me everything." }],
        "max_tokens": 50000,
        "ignore_eos": true,
        "stream": true,
    })
}

#[test]
fn a_frozen_rank_fails_the_stream_in_flight_and_turns_rank_0_unready_and_unhealthy() {
    let (mut r0, r1) = group_of_two("2");
    let mut events = common::stream(&r0.addr(), "/v1/chat/completions", &long_chat());
    // The role chunk, then a token: the sequence is on the engine.
    events.next().unwrap();
    events.next().unwrap();
    r1.signal("STOP");
    let rest: Vec<String> = events.collect();
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"), "{rest:?}");
    let error = rest
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find_map(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("no error event in {rest:?}"));
    assert!(error.contains("rank 1 has been silent for 2 s"), "{error}");
    r0.wait_status("/ready", 503);
    r0.wait_status("/health", 503);
}

#[test]
fn a_killed_rank_turns_an_idle_rank_0_unready_without_a_request() {
    let (mut r0, mut r1) = group_of_two("2");
    r1.child.kill().unwrap();
    r1.wait_exit();
    r0.wait_status("/ready", 503);
    r0.wait_status("/health", 503);
    let lost = r0.wait_event("the expert-parallel group is broken");
    assert!(
        lost["fields"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("rank 1")),
        "{lost}"
    );
}

#[test]
fn a_worker_exits_with_an_error_when_its_leader_goes_silent() {
    let (r0, mut r1) = group_of_two("2");
    r0.signal("STOP");
    let status = r1.wait_exit();
    assert!(!status.success(), "{status}");
    let log = r1.log();
    assert!(log.contains("rank 0 has been silent for 2 s"), "{log}");
}

#[test]
fn a_worker_rank_needs_no_tokenizer() {
    let name = "tiny-deep";
    assert!(
        !dir(name).join("tokenizer.json").exists(),
        "the fixture must come without a tokenizer for this test"
    );
    let whole = Model::load(&dir(name)).unwrap();
    let e = expected(name);
    let reqs = requests(&e);
    let single = generate::generate_batch(&whole, &reqs).unwrap();
    let geometry = generate::plan_geometry(whole.config.max_position_embeddings, &reqs).unwrap();
    let leader = format!("127.0.0.1:{}", common::free_port());
    let mut worker = common::serve_model(dir(name));
    worker
        .args(["--num-kv-blocks", &geometry.num_blocks.to_string()])
        .env("RANK", "1")
        .env("WORLD_SIZE", "2")
        .env("LEADER_ADDR", &leader);
    let mut worker = Engine::spawn(worker);
    let t = TcpTransport::connect(
        &GroupEnv {
            rank: 0,
            world_size: 2,
            leader_addr: leader,
        },
        TcpOptions::new(common::BOUND),
    )
    .unwrap();
    let mut ex = ExpertParallelExecutor::new(shards(name, 2).remove(0), geometry, Box::new(t));
    worker.wait_status("/ready", 200);
    let api = common::http(&worker.addr(), "GET", "/v1/models", None).unwrap();
    assert_eq!(api.status, 503);
    assert!(
        api.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("rank 0")),
        "{}",
        api.body
    );
    let got = {
        let (g, parts) = (ex.kv_geometry(), ex.kv_partitions());
        generate::generate_with(&mut |b| ex.forward(b), g, parts, &reqs)
    }
    .unwrap();
    assert_eq!(got, single);
    drop(ex);
    let status = worker.wait_exit();
    assert!(status.success(), "{status}: {}", worker.log());
}

/// Two processes of a group holding two ranks each (LOCAL_WORLD_SIZE=2, as a pod with two
/// GPUs does): the four ranks generate what one process holding every expert generates.
#[test]
fn processes_holding_several_ranks_each_generate_what_one_process_does() {
    let model = dir("tiny-deep");
    let generate = |envs: &[(&str, String)]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_deepseek-engine"));
        c.args(["generate", "--prompt-ids", "5,6,7,8,9", "--max-tokens", "6"])
            .args(["--temperature", "0", "--ignore-eos", "--backend", "cpu"])
            .arg("--model")
            .arg(&model)
            .env("RUST_LOG", "warn")
            .env_remove("RANK")
            .env_remove("WORLD_SIZE")
            .env_remove("LEADER_ADDR")
            .env_remove("LOCAL_WORLD_SIZE");
        for (k, v) in envs {
            c.env(k, v);
        }
        c.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let one = generate(&[]).wait_with_output().unwrap();
    assert!(
        one.status.success(),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );
    let leader = format!("127.0.0.1:{}", common::free_port());
    let group = |rank: &str| {
        generate(&[
            ("RANK", rank.into()),
            ("WORLD_SIZE", "2".into()),
            ("LOCAL_WORLD_SIZE", "2".into()),
            ("LEADER_ADDR", leader.clone()),
        ])
    };
    let (r1, r0) = (group("1"), group("0"));
    let out0 = r0.wait_with_output().unwrap();
    let out1 = r1.wait_with_output().unwrap();
    assert!(
        out0.status.success(),
        "{}",
        String::from_utf8_lossy(&out0.stderr)
    );
    assert!(
        out1.status.success(),
        "{}",
        String::from_utf8_lossy(&out1.stderr)
    );
    let tokens = |b: &[u8]| serde_json::from_slice::<Value>(b).unwrap()["token_ids"].clone();
    assert_eq!(tokens(&out0.stdout), tokens(&one.stdout));
    assert!(out1.stdout.is_empty(), "a worker process prints nothing");
}
