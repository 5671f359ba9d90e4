//! Every GPU example in examples/ must be servable as written: its group (expertParallel GPUs
//! of the type its node selector asks for) is placed by the same plan the engine serves with,
//! from the released DeepSeek-V3.2 config, and must fit with the example's context length,
//! cache format and sequence count.

use deepseek_e2e::{read_repo_file, repo_root, yaml_documents};
use deepseek_engine::backend::cuda::DType;
use deepseek_engine::backend::cuda::plan::{PlacementRequest, placement};
use deepseek_engine::model::ModelConfig;
use deepseek_operator::api::{DeepSeekDeployment, KvCacheDtype};

/// Memory of each GPU the examples may select by `nvidia.com/gpu.product` (the labels of
/// NVIDIA's GPU feature discovery), as the driver reports it, in MiB.
const GPUS: &[(&str, usize)] = &[("NVIDIA-H200", 143_771), ("NVIDIA-H100-80GB-HBM3", 81_559)];

/// An example that names no GPU type must fit on the smallest one above.
const SMALLEST_GPU: (&str, usize) = ("NVIDIA-H100-80GB-HBM3", 81_559);

/// The block size and step size the engine serves with by default.
const BLOCK_SIZE: usize = 64;
const MAX_BATCH_TOKENS: usize = 2048;

fn released_config() -> ModelConfig {
    ModelConfig::from_file(&repo_root().join("engine/tests/fixtures/deepseek-v3.2/config.json"))
        .expect("the released DeepSeek-V3.2 config parses")
}

fn gpu_deployments() -> Vec<(String, DeepSeekDeployment)> {
    let mut out = Vec::new();
    let dir = repo_root().join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("examples/ exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let docs = yaml_documents(&read_repo_file(&format!("examples/{name}")))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        for doc in docs {
            if doc["kind"] != "DeepSeekDeployment" {
                continue;
            }
            let d: DeepSeekDeployment =
                serde_json::from_value(doc).unwrap_or_else(|e| panic!("{name}: {e}"));
            if d.spec.parallelism.gpus_per_pod > 0 {
                out.push((name.clone(), d));
            }
        }
    }
    out
}

#[test]
fn every_gpu_example_fits_its_gpus_by_the_engine_plan() {
    let cfg = released_config();
    let examples = gpu_deployments();
    assert!(
        examples.len() >= 2,
        "the GPU examples were not found: {examples:?}"
    );
    for (file, d) in examples {
        let spec = &d.spec;
        let (gpu, mib) = match spec.node_selector.get("nvidia.com/gpu.product") {
            Some(product) => *GPUS
                .iter()
                .find(|(name, _)| name == product)
                .unwrap_or_else(|| panic!("{file}: no memory size known for GPU {product}")),
            None => SMALLEST_GPU,
        };
        let req = PlacementRequest {
            gpus: spec.parallelism.expert_parallel as usize,
            gpu_memory_bytes: mib << 20,
            // The released checkpoint's own FP8 weights: the engine's `auto` for it.
            weights: DType::Fp8,
            cache: match spec.engine.kv_cache_dtype {
                KvCacheDtype::Fp8 => DType::Fp8,
                KvCacheDtype::Bf16 => DType::Bf16,
            },
            block_size: BLOCK_SIZE,
            max_batch_tokens: MAX_BATCH_TOKENS,
            max_model_len: Some(spec.engine.max_model_len as usize),
            max_num_seqs: spec.engine.max_num_seqs as usize,
        };
        let p = placement(&cfg, &req);
        assert!(
            p.fits,
            "{file}: {} GPUs of {gpu} do not serve DeepSeek-V3.2 as written:\n{}",
            req.gpus,
            p.table()
        );
    }
}

#[test]
fn the_plan_refuses_what_the_examples_must_not_ask_for() {
    // The check above can fail: half the 16-GPU group of H100s cannot hold the model.
    let p = placement(
        &released_config(),
        &PlacementRequest {
            gpus: 8,
            gpu_memory_bytes: SMALLEST_GPU.1 << 20,
            weights: DType::Fp8,
            cache: DType::Fp8,
            block_size: BLOCK_SIZE,
            max_batch_tokens: MAX_BATCH_TOKENS,
            max_model_len: Some(131072),
            max_num_seqs: 256,
        },
    );
    assert!(!p.fits);
}
