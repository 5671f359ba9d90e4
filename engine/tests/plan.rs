//! `deepseek-engine plan`: the per-GPU placement of one replica from config.json alone, as
//! people and the operator's examples use it. The verdicts for the released DeepSeek-V3.2
//! config are the ones its users plan hardware by.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn released_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deepseek-v3.2/config.json")
}

fn plan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deepseek-engine"))
        .arg("plan")
        .arg("--config")
        .arg(released_config())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn plan_json(args: &[&str]) -> (bool, Value) {
    let out = plan(&[args, &["--json"]].concat());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), v)
}

#[test]
fn the_released_model_fits_on_8_gpus_of_140_gib_with_fp8_weights() {
    let (ok, v) = plan_json(&[
        "--gpus",
        "8",
        "--gpu-memory-gib",
        "140",
        "--weight-dtype",
        "fp8",
    ]);
    assert!(ok, "{v}");
    assert_eq!(v["fits"], true);
    assert_eq!(v["experts_per_gpu"], 32);
    let weights = v["per_gpu_weight_bytes"].as_u64().unwrap();
    assert!((90u64 << 30..110u64 << 30).contains(&weights), "{v}");
    // Several full 128K-token sequences per GPU stay in the FP8 cache.
    assert!(v["kv_tokens_per_gpu"].as_u64().unwrap() > 4 * 131072, "{v}");
}

#[test]
fn the_released_model_does_not_fit_on_8_gpus_of_80_gib_and_says_why() {
    let (ok, v) = plan_json(&["--gpus", "8", "--gpu-memory-gib", "80"]);
    assert!(!ok);
    assert_eq!(v["fits"], false);
    assert!(
        v["reason"].as_str().unwrap().contains("does not fit"),
        "{v}"
    );
    let out = plan(&["--gpus", "8", "--gpu-memory-gib", "80"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("fits: no"), "{text}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not fit"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_released_model_fits_on_16_gpus_of_80_gib() {
    let (ok, v) = plan_json(&[
        "--gpus",
        "16",
        "--gpu-memory-gib",
        "80",
        "--max-model-len",
        "131072",
    ]);
    assert!(ok, "{v}");
    assert_eq!(v["experts_per_gpu"], 16);
    assert!(v["kv_tokens_per_gpu"].as_u64().unwrap() >= 131072, "{v}");
    let out = plan(&["--gpus", "16", "--gpu-memory-gib", "80"]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("KV tokens per GPU") && table.contains("fits: yes"),
        "{table}"
    );
}

#[test]
fn bad_plan_arguments_are_refused_by_name() {
    for (args, needle) in [
        (vec!["--gpus", "0", "--gpu-memory-gib", "80"], "--gpus"),
        (
            vec!["--gpus", "8", "--gpu-memory-gib", "-3"],
            "--gpu-memory-gib",
        ),
        (
            vec!["--gpus", "8", "--gpu-memory-gib", "1e300"],
            "--gpu-memory-gib",
        ),
        (
            vec![
                "--gpus",
                "8",
                "--gpu-memory-gib",
                "80",
                "--weight-dtype",
                "int4",
            ],
            "int4",
        ),
        (
            vec![
                "--gpus",
                "8",
                "--gpu-memory-gib",
                "80",
                "--max-num-seqs",
                "0",
            ],
            "--max-num-seqs",
        ),
    ] {
        let out = plan(&args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_deepseek-engine"))
        .args([
            "plan",
            "--config",
            "/nonexistent/config.json",
            "--gpus",
            "8",
            "--gpu-memory-gib",
            "80",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/config.json"));
}
