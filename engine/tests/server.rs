//! The HTTP API through a real HTTP client against servers on loopback ports: the built-in model
//! for the plumbing, and a scripted executor (a fake model that emits chosen text) for tool
//! calls and thinking output, which random weights would never produce.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use deepseek_engine::backend::{CpuExecutor, Executor};
use deepseek_engine::kv::{KvGeometry, PrefixCachingPool};
use deepseek_engine::metrics::Metrics;
use deepseek_engine::model::builtin::builtin_model;
use deepseek_engine::model::{ForwardError, LogitsWanted, SeqChunk};
use deepseek_engine::runtime::{self, EngineState};
use deepseek_engine::sched::{Scheduler, SchedulerConfig};
use deepseek_engine::server::{ServerState, router};
use deepseek_engine::tokenizer::Tokenizer;
use serde_json::{Value, json};
use tokio::sync::watch;

const MODEL: &str = "test-model";

struct Opts {
    max_num_seqs: usize,
    max_waiting: usize,
    num_blocks: usize,
    max_model_len: usize,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            max_num_seqs: 8,
            max_waiting: 64,
            num_blocks: 64,
            max_model_len: 2048,
        }
    }
}

/// A server under test: its base URL, its metrics, and the engine's published state to wait on.
struct Served {
    base: String,
    metrics: Metrics,
    engine: watch::Receiver<EngineState>,
}

/// Starts a server on a loopback port.
async fn start(executor: Box<dyn Executor>, vocab_eos: Vec<u32>, o: Opts) -> Served {
    let geometry = executor.kv_geometry();
    let metrics = Metrics::new(MODEL);
    let sched = Scheduler::new(
        SchedulerConfig {
            max_num_seqs: o.max_num_seqs,
            max_num_batched_tokens: 512,
            max_model_len: o.max_model_len,
            max_waiting: o.max_waiting,
        },
        PrefixCachingPool::new(geometry, true),
    );
    let engine = runtime::spawn(executor, sched, metrics.clone(), 64);
    let engine_state = engine.state();
    let state = Arc::new(ServerState::new(
        Arc::new(Tokenizer::builtin().unwrap()),
        metrics.clone(),
        MODEL.into(),
        o.max_model_len,
        vocab_eos,
    ));
    state.attach_engine(engine);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    Served {
        base: format!("http://{addr}"),
        metrics,
        engine: engine_state,
    }
}

/// Waits until the engine publishes a state that satisfies `cond`. The bound only turns a hang
/// into a failure; nothing races it.
async fn engine_reaches(served: &mut Served, what: &str, cond: impl FnMut(&EngineState) -> bool) {
    tokio::time::timeout(Duration::from_secs(120), served.engine.wait_for(cond))
        .await
        .unwrap_or_else(|_| panic!("the engine never reached: {what}"))
        .expect("the engine loop ended");
}

async fn builtin_server(o: Opts) -> Served {
    let model = Arc::new(builtin_model().unwrap());
    let geometry = KvGeometry {
        num_blocks: o.num_blocks,
        block_size: 16,
    };
    start(Box::new(CpuExecutor::new(model, geometry)), vec![1], o).await
}

/// A fake model: every sequence emits the same scripted tokens, then EOS; optionally slow.
/// Sequences are told apart by their first KV block (tests never run two sharing it at once).
struct Scripted {
    script: Vec<u32>,
    vocab: usize,
    emitted: HashMap<u32, usize>,
    delay: Duration,
}

impl Executor for Scripted {
    fn forward(&mut self, batch: &[SeqChunk]) -> Result<Vec<Vec<f32>>, ForwardError> {
        std::thread::sleep(self.delay);
        Ok(batch
            .iter()
            .map(|c| {
                if c.logits == LogitsWanted::None {
                    return vec![];
                }
                // A prefill chunk starts a sequence (after a prefix-cache hit it need not start at
                // position 0); decode chunks carry one token.
                let key = c.blocks.blocks[0];
                if c.start_pos == 0 || c.tokens.len() > 1 {
                    self.emitted.insert(key, 0);
                }
                let n = self.emitted.entry(key).or_insert(0);
                let tok = self.script.get(*n).copied().unwrap_or(1);
                *n += 1;
                let mut l = vec![0.0; self.vocab];
                l[tok as usize] = 30.0;
                l
            })
            .collect())
    }
    fn kv_geometry(&self) -> KvGeometry {
        KvGeometry {
            num_blocks: 256,
            block_size: 16,
        }
    }
    fn device_name(&self) -> String {
        "scripted".into()
    }
}

async fn scripted_server(text: &str, delay_ms: u64, o: Opts) -> Served {
    let tok = Tokenizer::builtin().unwrap();
    let script = tok.encode(text).unwrap();
    let ex = Scripted {
        script,
        vocab: tok.vocab_size(),
        emitted: HashMap::new(),
        delay: Duration::from_millis(delay_ms),
    };
    start(Box::new(ex), vec![1], o).await
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

async fn post(base: &str, path: &str, body: Value) -> (u16, Value) {
    let r = client()
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Reads an SSE response to the end; returns the parsed `data:` payloads before `[DONE]`.
async fn sse(base: &str, path: &str, body: Value) -> Vec<Value> {
    let r = client()
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = r.text().await.unwrap();
    let mut out = Vec::new();
    let mut done = false;
    for line in text.lines() {
        if let Some(d) = line.strip_prefix("data: ") {
            if d == "[DONE]" {
                done = true;
                continue;
            }
            assert!(!done, "data after [DONE]");
            out.push(serde_json::from_str(d).unwrap());
        }
    }
    assert!(done, "the stream must end with [DONE]");
    out
}

fn user(text: &str) -> Value {
    json!([{ "role": "user", "content": text }])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_model_is_listed() {
    let Served { base, .. } = builtin_server(Opts::default()).await;
    let v: Value = client()
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], MODEL);
    assert_eq!(
        client()
            .get(format!("{base}/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client()
            .get(format!("{base}/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_completion_returns_a_message_usage_and_moves_the_metrics() {
    let Served { base, metrics, .. } = builtin_server(Opts::default()).await;
    let (status, v) = post(
        &base,
        "/v1/chat/completions",
        json!({ "model": MODEL, "messages": user("hello"), "max_tokens": 5, "seed": 1 }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let usage = &v["usage"];
    assert!(usage["completion_tokens"].as_u64().unwrap() <= 5);
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 3);
    let text = metrics.render();
    assert!(
        !text.contains("vllm:generation_tokens_total{model_name=\"test-model\"} 0"),
        "{text}"
    );
    let m: String = client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("vllm:kv_cache_usage_perc"));
    assert!(m.contains("vllm:request_success_total"));
    assert!(
        m.contains("deepseek_engine_expert_routed_tokens_total{expert=\"0\"}"),
        "{m}"
    );
    assert!(m.contains("deepseek_engine_indexer_selected_tokens_total"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_chat_sends_role_deltas_a_finish_reason_usage_and_done() {
    let Served { base, .. } = builtin_server(Opts::default()).await;
    let chunks = sse(
        &base,
        "/v1/chat/completions",
        json!({ "model": MODEL, "messages": user("hi"), "max_tokens": 4, "stream": true,
                "stream_options": { "include_usage": true }, "ignore_eos": true }),
    )
    .await;
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let finishes: Vec<&Value> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(finishes.len(), 1);
    assert_eq!(finishes[0]["choices"][0]["finish_reason"], "length");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_come_back_as_openai_tool_calls() {
    let completion = "Let me check.\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n<｜DSML｜parameter name=\"days\" string=\"false\">3</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜function_calls>";
    let Served { base, .. } = scripted_server(completion, 0, Opts::default()).await;
    let tools = json!([{ "type": "function", "function": { "name": "get_weather", "description": "Weather",
        "parameters": { "type": "object", "properties": { "city": { "type": "string" }, "days": { "type": "integer" } } } } }]);
    let (status, v) = post(
        &base,
        "/v1/chat/completions",
        json!({ "model": MODEL, "messages": user("weather?"), "tools": tools }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({ "city": "Paris", "days": 3 }));
    assert_eq!(choice["message"]["content"], "Let me check.");

    // The same, streamed: tool-call deltas reassemble into the same call.
    let chunks = sse(
        &base,
        "/v1/chat/completions",
        json!({ "model": MODEL, "messages": user("weather?"), "tools": tools, "stream": true }),
    )
    .await;
    let mut name = String::new();
    let mut arguments = String::new();
    let mut content = String::new();
    for c in &chunks {
        let d = &c["choices"][0]["delta"];
        if let Some(t) = d["content"].as_str() {
            content.push_str(t);
        }
        if let Some(calls) = d["tool_calls"].as_array() {
            for call in calls {
                if let Some(n) = call["function"]["name"].as_str() {
                    name.push_str(n);
                }
                if let Some(a) = call["function"]["arguments"].as_str() {
                    arguments.push_str(a);
                }
            }
        }
    }
    assert_eq!(name, "get_weather", "{chunks:#?}");
    assert_eq!(
        serde_json::from_str::<Value>(&arguments).unwrap(),
        json!({ "city": "Paris", "days": 3 })
    );
    assert_eq!(content, "Let me check.");
    assert_eq!(
        chunks
            .iter()
            .rev()
            .find_map(|c| c["choices"][0]["finish_reason"].as_str()),
        Some("tool_calls")
    );

    // A tool result sent back renders and is accepted.
    let follow_up = json!({ "model": MODEL, "tools": tools, "messages": [
        { "role": "user", "content": "weather?" },
        { "role": "assistant", "content": "", "tool_calls": [{ "id": "call_1", "type": "function",
            "function": { "name": "get_weather", "arguments": "{\"city\":\"Paris\",\"days\":3}" } }] },
        { "role": "tool", "tool_call_id": "call_1", "content": "sunny" }
    ]});
    let (status, v) = post(&base, "/v1/chat/completions", follow_up).await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thinking_mode_returns_reasoning_content_apart_from_content() {
    let Served { base, .. } = scripted_server("The user greets me.</think>Hello!", 0, Opts::default()).await;
    let body = json!({ "model": MODEL, "messages": user("hi"), "chat_template_kwargs": { "thinking": true } });
    let (status, v) = post(&base, "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["choices"][0]["message"]["reasoning_content"],
        "The user greets me."
    );
    assert_eq!(v["choices"][0]["message"]["content"], "Hello!");
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let chunks = sse(&base, "/v1/chat/completions", streamed).await;
    let join = |field: &str| -> String {
        chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"][field].as_str())
            .collect::<String>()
    };
    assert_eq!(join("reasoning_content"), "The user greets me.");
    assert_eq!(join("content"), "Hello!");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_cut_the_text_and_finish_with_stop() {
    let Served { base, .. } = scripted_server("one two three four", 0, Opts::default()).await;
    let (status, v) = post(
        &base,
        "/v1/completions",
        json!({ "model": MODEL, "prompt": "count:", "stop": [" three"] }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], "one two");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let chunks = sse(
        &base,
        "/v1/completions",
        json!({ "model": MODEL, "prompt": [5, 6, 7], "stop": "four", "stream": true }),
    )
    .await;
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, "one two three ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_error_bodies() {
    let Served { base, .. } = builtin_server(Opts {
        max_model_len: 64,
        ..Default::default()
    })
    .await;
    let r = client()
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid request body")
    );

    let (s, v) = post(
        &base,
        "/v1/chat/completions",
        json!({ "model": "nope", "messages": user("x") }),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );

    let (s, v) = post(
        &base,
        "/v1/chat/completions",
        json!({ "model": MODEL, "messages": user(&"word ".repeat(200)) }),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("context_length_exceeded")),
        "{v}"
    );

    let (s, v) = post(
        &base,
        "/v1/chat/completions",
        json!({ "model": MODEL, "messages": user("x"), "max_tokens": 1000 }),
    )
    .await;
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (400, Some("max_tokens")),
        "{v}"
    );

    let (s, v) = post(
        &base,
        "/v1/chat/completions",
        json!({ "model": MODEL, "messages": user("x"), "temperature": -2 }),
    )
    .await;
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (400, Some("temperature")),
        "{v}"
    );

    let (s, _) = post(
        &base,
        "/v1/chat/completions",
        json!({ "model": MODEL, "messages": [] }),
    )
    .await;
    assert_eq!(s, 400);

    let (s, v) = post(
        &base,
        "/v1/completions",
        json!({ "model": MODEL, "prompt": [1, 999999] }),
    )
    .await;
    assert_eq!(s, 400, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_answers_429_with_retry_after_and_loses_no_accepted_request() {
    let Served { base, metrics, .. } = scripted_server(
        "a b c d e f g h",
        20,
        Opts {
            max_num_seqs: 1,
            max_waiting: 1,
            ..Default::default()
        },
    )
    .await;
    let mut handles = Vec::new();
    for _ in 0..8 {
        let base = base.clone();
        handles.push(tokio::spawn(async move {
            let r = client()
                .post(format!("{base}/v1/completions"))
                .json(&json!({ "model": MODEL, "prompt": "x", "max_tokens": 4 }))
                .send()
                .await
                .unwrap();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            (r.status().as_u16(), retry, r.json::<Value>().await.unwrap())
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for h in handles {
        let (status, retry, body) = h.await.unwrap();
        match status {
            200 => {
                ok += 1;
                assert_eq!(body["choices"][0]["finish_reason"], "length");
            }
            429 => {
                refused += 1;
                assert!(retry.is_some());
                assert_eq!(body["error"]["type"], "rate_limit_exceeded");
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert!(ok >= 1 && refused >= 1, "ok {ok}, refused {refused}");
    assert!(
        metrics
            .render()
            .contains("deepseek_engine_requests_rejected_total{reason=\"queue_full\"}")
    );
}

async fn metric(base: &str, name: &str) -> f64 {
    let text = client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_disconnect_cancels_the_sequence_and_frees_its_blocks() {
    let mut served = scripted_server(&"tok ".repeat(500), 10, Opts::default()).await;
    let base = served.base.clone();
    let mut r = client()
        .post(format!("{base}/v1/completions"))
        .json(&json!({ "model": MODEL, "prompt": "go", "max_tokens": 1000, "stream": true }))
        .send()
        .await
        .unwrap();
    let first = r.chunk().await.unwrap();
    assert!(first.is_some());
    // The engine publishes a step's gauges before its tokens go out.
    assert_eq!(metric(&base, "vllm:num_requests_running").await, 1.0);
    assert!(metric(&base, "vllm:kv_cache_usage_perc").await > 0.0);
    drop(r);
    engine_reaches(
        &mut served,
        "the cancelled sequence released its KV blocks",
        |s| s.running == 0 && s.waiting == 0 && s.kv_usage == 0.0,
    )
    .await;
    assert_eq!(metric(&base, "vllm:num_requests_running").await, 0.0);
    assert_eq!(metric(&base, "vllm:kv_cache_usage_perc").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_and_detokenize_round_trip() {
    let Served { base, .. } = builtin_server(Opts::default()).await;
    let (s, v) = post(&base, "/tokenize", json!({ "prompt": "héllo 世界" })).await;
    assert_eq!(s, 200, "{v}");
    let (s, d) = post(&base, "/detokenize", json!({ "tokens": v["tokens"] })).await;
    assert_eq!(s, 200);
    assert_eq!(d["prompt"], "héllo 世界");
    let (s, v) = post(&base, "/tokenize", json!({ "messages": user("hi") })).await;
    assert_eq!(s, 200, "{v}");
    assert!(v["count"].as_u64().unwrap() > 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_and_seeded_sampling_are_reproducible() {
    let Served { base, .. } = builtin_server(Opts::default()).await;
    let body = json!({ "model": MODEL, "prompt": "abc", "max_tokens": 6, "n": 2, "temperature": 1.0, "seed": 7, "ignore_eos": true });
    let (s, a) = post(&base, "/v1/completions", body.clone()).await;
    assert_eq!(s, 200, "{a}");
    let (_, b) = post(&base, "/v1/completions", body).await;
    assert_eq!(a["choices"].as_array().unwrap().len(), 2);
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    assert_eq!(a["choices"][1]["text"], b["choices"][1]["text"]);
    let (s, v) = post(
        &base,
        "/v1/chat/completions",
        json!({ "model": MODEL, "messages": user("x"), "max_tokens": 3,
        "logprobs": true, "top_logprobs": 2 }),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"]["content"];
    assert!(!lp.as_array().unwrap().is_empty());
    assert_eq!(lp[0]["top_logprobs"].as_array().unwrap().len(), 2);
}
