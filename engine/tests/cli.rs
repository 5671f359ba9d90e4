//! The `deepseek-engine` command line as tests, people and the operator use it.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::Engine;
use serde_json::{Value, json};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_deepseek-engine"));
    c.env("RUST_LOG", "warn")
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env_remove("LEADER_ADDR")
        .env_remove("LOCAL_WORLD_SIZE");
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
                .args(["--ignore-eos", "--backend", "cpu", "--expert-parallel", ep])
                .arg("--model")
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
fn bench_times_one_device_and_an_expert_parallel_group_the_same_way() {
    let bench = |ep: &str| {
        stdout_json(
            bin()
                .args(["bench", "--backend", "cpu", "--expert-parallel", ep])
                .args([
                    "--prompt-len",
                    "40",
                    "--decode-steps",
                    "3",
                    "--contexts",
                    "20,70",
                ])
                .arg("--model")
                .arg(data("fixtures/tiny-deep")),
        )
    };
    for (ep, ranks) in [("1", 1), ("2", 2)] {
        let v = bench(ep);
        assert_eq!(v["ranks"], ranks, "{v}");
        assert_eq!(v["prefill"][0]["tokens"], 40, "{v}");
        let decode = v["decode"].as_array().unwrap();
        let contexts: Vec<_> = decode.iter().map(|d| d["context"].clone()).collect();
        assert_eq!(contexts, [json!(20), json!(70)], "{v}");
        for d in decode {
            assert_eq!(d["batch"], 1, "{v}");
            assert!(d["tokens_per_s"].as_f64().unwrap() > 0.0, "{v}");
        }
    }
    let out = bin()
        .args([
            "bench",
            "--backend",
            "cpu",
            "--decode-steps",
            "0",
            "--model",
        ])
        .arg(data("fixtures/tiny-deep"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--decode-steps must be at least 1"), "{err}");
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
            "--backend",
            "cpu",
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

fn chat(max_tokens: usize) -> Value {
    json!({
        "messages": [{ "role": "user", "content": "Say something long." }],
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "stream": true,
    })
}

#[test]
fn sigterm_lets_a_stream_in_flight_finish_then_exits_cleanly() {
    let mut engine = Engine::spawn(common::serve());
    engine.wait_status("/ready", 200);
    let mut events = common::stream(&engine.addr(), "/v1/chat/completions", &chat(400));
    events.next().unwrap();
    events.next().unwrap();
    engine.signal("TERM");
    let rest: Vec<String> = events.collect();
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"), "{rest:?}");
    let finish = rest
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find_map(|v| {
            v["choices"][0]["finish_reason"]
                .as_str()
                .map(str::to_string)
        });
    assert_eq!(finish.as_deref(), Some("length"), "{rest:?}");
    assert!(!rest.iter().any(|e| e.contains("\"error\"")), "{rest:?}");
    let status = engine.wait_exit();
    assert!(status.success(), "{status}: {}", engine.log());
}

#[test]
fn a_stream_still_running_when_the_grace_period_ends_gets_an_error_and_done() {
    let mut cmd = common::serve();
    cmd.args(["--shutdown-grace-seconds", "0"]);
    let mut engine = Engine::spawn(cmd);
    engine.wait_status("/ready", 200);
    let mut events = common::stream(&engine.addr(), "/v1/chat/completions", &chat(50000));
    events.next().unwrap();
    events.next().unwrap();
    engine.signal("TERM");
    let rest: Vec<String> = events.collect();
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"), "{rest:?}");
    let error = rest
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find_map(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("no error event in {rest:?}"));
    assert!(error.contains("shutting down"), "{error}");
    let status = engine.wait_exit();
    assert!(status.success(), "{status}: {}", engine.log());
}

#[test]
fn a_defaulted_max_model_len_shrinks_to_the_kv_cache_and_models_advertises_it() {
    let mut cmd = common::serve();
    cmd.args(["--num-kv-blocks", "2", "--block-size", "64"]);
    let mut engine = Engine::spawn(cmd);
    engine.wait_status("/ready", 200);
    let warning = engine.wait_event("KV cache holds 128 tokens");
    assert_eq!(warning["level"], "WARN");
    let models = common::http(&engine.addr(), "GET", "/v1/models", None).unwrap();
    assert_eq!(models.json()["data"][0]["max_model_len"], 128);
    // A request that leaves max_tokens to the server fits.
    let mut body = chat(0);
    body.as_object_mut().unwrap().remove("max_tokens");
    body["stream"] = json!(false);
    let r = common::http(&engine.addr(), "POST", "/v1/chat/completions", Some(&body)).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    // Every line is a JSON object with a message.
    for line in engine.lines() {
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["fields"]["message"].is_string(), "{line}");
    }
}

#[test]
fn an_explicit_max_model_len_beyond_the_kv_cache_is_refused_at_start() {
    let out = bin()
        .args([
            "serve",
            "--port",
            "0",
            "--host",
            "127.0.0.1",
            "--backend",
            "cpu",
        ])
        .args([
            "--num-kv-blocks",
            "2",
            "--block-size",
            "64",
            "--max-model-len",
            "1000",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("128 tokens")
            && err.contains("max_model_len 1000")
            && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn logs_off_a_terminal_are_plain_and_say_when_the_api_is_ready() {
    let mut cmd = common::bin();
    cmd.args(["serve", "--host", "127.0.0.1", "--port", "0"]);
    let mut engine = Engine::spawn(cmd);
    let ready = engine.wait_line("ready", |l| l.contains("ready: serving"));
    let log = engine.log();
    assert!(!log.contains("\x1b["), "{log}");
    let first = log.lines().next().unwrap();
    assert!(first.contains("backend chosen"), "{log}");
    if first.contains("cpu") {
        assert!(!first.to_lowercase().contains("cuda"), "{first}");
    }
    let listening = engine.wait_line("HTTP listening", |l| l.contains("HTTP listening"));
    assert!(listening.contains("503"), "{listening}");
    let lines = engine.lines();
    let at = |l: &str| lines.iter().position(|x| x == l).unwrap();
    assert!(at(&listening) < at(&ready), "{log}");
    engine.signal("TERM");
    assert!(engine.wait_exit().success(), "{}", engine.log());
}

/// `serve` with no `--model` serves the bundled trained model, which answers the README's
/// question in English.
#[test]
fn serve_with_no_model_serves_the_bundled_trained_model() {
    let mut cmd = common::bin();
    cmd.args([
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--backend",
        "cpu",
    ])
    .args(["--log-format", "json", "--kv-cache-memory-gb", "0.1"]);
    let mut engine = Engine::spawn(cmd);
    engine.wait_status("/ready", 200);
    let addr = engine.addr();
    let models = common::http(&addr, "GET", "/v1/models", None)
        .unwrap()
        .json();
    assert_eq!(models["data"][0]["id"], "deepseek-v3.2-mini", "{models}");
    let body = json!({
        "messages": [{ "role": "user", "content": "What does serendipity mean?" }],
        "max_tokens": 24,
        "temperature": 0,
    });
    let reply = common::http(&addr, "POST", "/v1/chat/completions", Some(&body)).unwrap();
    let content = reply.json()["choices"][0]["message"]["content"].clone();
    assert!(
        content
            .as_str()
            .unwrap()
            .starts_with("The noun \"serendipity\" means"),
        "{}",
        reply.body
    );
    engine.signal("TERM");
    assert!(engine.wait_exit().success(), "{}", engine.log());
}

#[test]
fn expert_parallel_defaults_to_the_group_and_a_mismatch_is_refused() {
    let generate = |env: &[(&str, &str)], ep: Option<&str>| {
        let mut c = bin();
        c.env("RUST_LOG", "info")
            .args(["generate", "--prompt-ids", "5,6,7", "--max-tokens", "2"])
            .args(["--backend", "cpu", "--model"])
            .arg(data("fixtures/tiny-deep"));
        if let Some(ep) = ep {
            c.args(["--expert-parallel", ep]);
        }
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let one_pod = [
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("LEADER_ADDR", "127.0.0.1:1"),
    ];
    let out = generate(&one_pod, None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("expert parallelism over threads of this process") && err.contains("ranks=2"),
        "{err}"
    );
    let two_pods = [
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("LEADER_ADDR", "127.0.0.1:1"),
    ];
    let out = generate(&two_pods, Some("4"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--expert-parallel 4 does not match WORLD_SIZE 2"),
        "{err}"
    );
}

#[test]
fn the_connection_limit_and_header_timeout_are_set_from_the_command_line() {
    let mut cmd = common::serve();
    cmd.args([
        "--max-connections",
        "1",
        "--http-header-read-timeout-seconds",
        "2",
    ]);
    let mut engine = Engine::spawn(cmd);
    engine.wait_status("/ready", 200);
    let addr = engine.addr();
    // A client that connects and sends nothing holds the only slot until the header timeout
    // closes it, without an answer; the server accepts in order, so the next connection is
    // over the limit. (The slot of the probe before may be released a moment after its
    // answer: then the silent connection is the one refused, and the attempt is repeated.)
    let refused = (0..100)
        .find_map(|_| {
            let mut silent = std::net::TcpStream::connect(&addr).unwrap();
            let answer = common::http(&addr, "GET", "/health", None).unwrap();
            if answer.status != 503 {
                return None;
            }
            silent
                .set_read_timeout(Some(std::time::Duration::from_secs(60)))
                .unwrap();
            let mut got = Vec::new();
            let _ = std::io::Read::read_to_end(&mut silent, &mut got);
            got.is_empty().then_some(answer)
        })
        .expect("a second connection is refused while a silent one is open");
    assert!(
        refused.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit of 1 open connections"),
        "{}",
        refused.body
    );
    engine.wait_status("/health", 200);
    engine.signal("TERM");
    assert!(engine.wait_exit().success(), "{}", engine.log());
}
