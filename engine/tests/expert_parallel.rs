//! Expert parallelism on the CPU: a group of ranks (threads with the in-process transport, or
//! TCP through the leader) computes the same logits and tokens as one process holding all
//! experts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use deepseek_engine::backend::Executor;
use deepseek_engine::backend::ep::{ExpertParallelExecutor, run_worker};
use deepseek_engine::dist::{ExpertShard, GroupEnv, TcpOptions, TcpTransport};
use deepseek_engine::generate::{self, GenerateRequest, SamplingParams};
use deepseek_engine::model::Model;
use serde::Deserialize;

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

fn requests(e: &Expected) -> Vec<GenerateRequest> {
    let p = &e.prompt_ids;
    [&p[..], &p[3..40], &p[50..52], &p[10..70]]
        .iter()
        .map(|q| GenerateRequest {
            prompt: q.to_vec(),
            max_tokens: 8,
            sampling: SamplingParams::default(),
            stop_token_ids: vec![],
        })
        .collect()
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
            let g = ex.kv_geometry();
            let logits = generate::score_with(
                &mut |b| ex.forward(b),
                g,
                &e.prompt_ids,
                false,
                whole.config.vocab_size,
            )
            .unwrap()
            .concat();
            let err = rel_err(&logits, &reference);
            assert!(err < 1e-5, "{name} EP{world}: relative error {err}");
            let got = generate::generate_with(&mut |b| ex.forward(b), geometry, &reqs).unwrap();
            assert_eq!(
                got, single,
                "{name} EP{world}: a mixed batch spread over the ranks"
            );
            assert_eq!(got[0].token_ids, e.greedy_ids[..8], "{name} EP{world}");
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
    let got = generate::generate_with(&mut |b| ex.forward(b), geometry, &reqs).unwrap();
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
    let err = generate::generate_with(&mut |b| ex.forward(b), geometry, &reqs)
        .unwrap_err()
        .to_string();
    assert!(err.contains("rank 1"), "{err}");
}
