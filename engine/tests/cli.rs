//! The `deepseek-engine` command line as tests, people and the operator use it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_deepseek-engine"));
    c.env("RUST_LOG", "warn")
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env_remove("LEADER_ADDR");
    c
}

fn data(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(p)
}

fn stdout_json(c: &mut Command) -> Value {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn render_chat_reproduces_deepseeks_gold_encodings() {
    for name in ["", "_search_w_date", "_search_wo_date"] {
        let out = bin()
            .args(["render-chat", "--thinking-mode", "thinking", "--request"])
            .arg(data(&format!("data/chat/test_input{name}.json")))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let gold =
            std::fs::read_to_string(data(&format!("data/chat/test_output{name}.txt"))).unwrap();
        assert_eq!(
            String::from_utf8(out.stdout).unwrap().trim(),
            gold.trim(),
            "test_input{name}.json"
        );
    }
}

#[test]
fn parse_completion_reads_reasoning_and_tool_calls_from_stdin() {
    let text = "plan</think>ok\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"x\" string=\"false\">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜function_calls><｜end▁of▁sentence｜>";
    let mut child = bin()
        .args(["parse-completion", "--thinking-mode", "thinking"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["reasoning_content"], "plan");
    assert_eq!(v["content"], "ok");
    assert_eq!(v["tool_calls"][0]["function"]["name"], "f");
}

#[test]
fn score_and_generate_print_the_documented_json() {
    let model = data("fixtures/tiny-deep");
    let v = stdout_json(
        bin()
            .args(["score", "--last-only", "--prompt-ids", "5,6,7", "--model"])
            .arg(&model),
    );
    assert_eq!(v["logits"].as_array().unwrap().len(), 1);
    assert_eq!(v["logits"][0].as_array().unwrap().len(), 320);
    let g = |ep: &str| {
        stdout_json(
            bin()
                .args([
                    "generate",
                    "--prompt-ids",
                    "5,6,7,8,9",
                    "--max-tokens",
                    "6",
                    "--temperature",
                    "0",
                ])
                .args(["--ignore-eos", "--expert-parallel", ep, "--model"])
                .arg(&model),
        )
    };
    let one = g("1");
    assert_eq!(one["token_ids"].as_array().unwrap().len(), 6);
    assert_eq!(
        one,
        g("2"),
        "two expert-parallel ranks generate what one does"
    );
    assert_eq!(one, g("4"));
}

#[test]
fn a_bad_model_directory_is_a_clear_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let out = bin()
        .args(["score", "--prompt-ids", "1", "--model"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config.json") && !err.contains("panicked"),
        "{err}"
    );
    let out = bin()
        .args([
            "generate",
            "--prompt-ids",
            "1",
            "--expert-parallel",
            "3",
            "--model",
        ])
        .arg(data("fixtures/tiny-deep"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("16 routed experts") && err.contains('3'),
        "{err}"
    );
    // An unknown storage type is refused by name before the model is loaded.
    let out = bin()
        .args(["generate", "--prompt-ids", "1", "--backend", "cpu"])
        .args(["--weight-dtype", "fp7"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--weight-dtype") && err.contains("fp7"),
        "{err}"
    );
    assert!(!err.contains("model ready"), "{err}");
}
