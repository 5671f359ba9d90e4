//! The HTTP API through a real HTTP client against servers on loopback ports: the built-in model
//! for the plumbing, and a scripted executor (a fake model that emits chosen text) for tool
//! calls and thinking output, which random weights would never produce.
//!
//! Nothing here waits on a clock: tests wait on the engine's published state, on socket
//! answers and on task joins; timeouts only turn a hang into a failure.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deepseek_engine::backend::{CpuExecutor, Executor};
use deepseek_engine::kv::{KvGeometry, PrefixCachingPool};
use deepseek_engine::metrics::Metrics;
use deepseek_engine::model::builtin::builtin_model;
use deepseek_engine::model::{ForwardError, LogitsWanted, SeqChunk};
use deepseek_engine::runtime::{self, EngineState};
use deepseek_engine::sched::{Scheduler, SchedulerConfig};
use deepseek_engine::server::{RequestLimits, ServeLimits, ServerState, serve};
use deepseek_engine::tokenizer::Tokenizer;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};

const MODEL: &str = "test-model";

/// The failure bound of every wait: long enough for a loaded CI machine, never what a test
/// relies on to pass.
const BOUND: Duration = Duration::from_secs(120);

struct Opts {
    max_num_seqs: usize,
    max_waiting: usize,
    num_blocks: usize,
    max_model_len: usize,
    serve: ServeLimits,
    request: RequestLimits,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            max_num_seqs: 8,
            max_waiting: 64,
            num_blocks: 64,
            max_model_len: 2048,
            serve: ServeLimits::default(),
            request: RequestLimits::default(),
        }
    }
}

/// A server under test: its base URL, its metrics, the engine's published state to wait on,
/// and its shutdown trigger.
struct Served {
    base: String,
    addr: std::net::SocketAddr,
    metrics: Metrics,
    engine: watch::Receiver<EngineState>,
    shutdown: Option<oneshot::Sender<()>>,
    stopped: tokio::task::JoinHandle<std::io::Result<()>>,
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
    let mut state = ServerState::new(
        Arc::new(Tokenizer::builtin().unwrap()),
        metrics.clone(),
        MODEL.into(),
        o.max_model_len,
        vocab_eos,
    );
    state.limits = o.request;
    let state = Arc::new(state);
    state.attach_engine(engine);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (shutdown, stop) = oneshot::channel::<()>();
    let stopped = tokio::spawn(serve(listener, state, o.serve, async move {
        // Only a sent signal shuts down; a test that drops the trigger keeps its server.
        if stop.await.is_err() {
            std::future::pending::<()>().await;
        }
    }));
    Served {
        base: format!("http://{addr}"),
        addr,
        metrics,
        engine: engine_state,
        shutdown: Some(shutdown),
        stopped,
    }
}

/// Waits until the engine publishes a state that satisfies `cond`. The bound only turns a hang
/// into a failure; nothing races it.
async fn engine_reaches(served: &mut Served, what: &str, cond: impl FnMut(&EngineState) -> bool) {
    tokio::time::timeout(BOUND, served.engine.wait_for(cond))
        .await
        .unwrap_or_else(|_| panic!("the engine never reached: {what}"))
        .expect("the engine loop ended");
}

/// Awaits `f`, failing the test if it hangs past the bound.
async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

async fn builtin_server(o: Opts) -> Served {
    let model = Arc::new(builtin_model().unwrap());
    let geometry = KvGeometry {
        num_blocks: o.num_blocks,
        block_size: 16,
    };
    start(Box::new(CpuExecutor::new(model, geometry)), vec![1], o).await
}

/// Keeps the scripted model's sequences from ending: while held, a sequence past its script
/// emits filler instead of EOS, so it stays running until the test lets go.
#[derive(Clone, Default)]
struct Hold(Arc<AtomicBool>);

impl Hold {
    fn held() -> Hold {
        Hold(Arc::new(AtomicBool::new(true)))
    }

    fn release(&self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A fake model: every sequence emits the same scripted tokens, then EOS (or filler while
/// held); optionally slow. Sequences are told apart by their first KV block (tests never run
/// two sharing it at once).
struct Scripted {
    script: Vec<u32>,
    filler: u32,
    vocab: usize,
    emitted: HashMap<u32, usize>,
    delay: Duration,
    hold: Hold,
    num_blocks: usize,
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
                let tok = match self.script.get(*n) {
                    Some(t) => *t,
                    None if self.hold.0.load(Ordering::Acquire) => self.filler,
                    None => 1,
                };
                *n += 1;
                let mut l = vec![0.0; self.vocab];
                l[tok as usize] = 30.0;
                l
            })
            .collect())
    }
    fn kv_geometry(&self) -> KvGeometry {
        KvGeometry {
            num_blocks: self.num_blocks,
            block_size: 16,
        }
    }
    fn device_name(&self) -> String {
        "scripted".into()
    }
}

async fn scripted_server(text: &str, delay_ms: u64, o: Opts) -> Served {
    scripted_held(text, delay_ms, Hold::default(), o).await
}

/// Opts for tests that hold sequences: a context so long that a held sequence, at the given
/// step delay, could not reach its length limit within any test's bound.
fn long_context(o: Opts) -> Opts {
    Opts {
        max_model_len: 1 << 17,
        ..o
    }
}

/// The per-step delay of held tests: the fake model's speed, which bounds how fast a held
/// sequence approaches its length limit (1 << 17 tokens take minutes).
const HELD_STEP_MS: u64 = 2;

async fn scripted_held(text: &str, delay_ms: u64, hold: Hold, o: Opts) -> Served {
    let tok = Tokenizer::builtin().unwrap();
    let script = tok.encode(text).unwrap();
    let ex = Scripted {
        script,
        filler: tok.encode(".").unwrap()[0],
        vocab: tok.vocab_size(),
        emitted: HashMap::new(),
        delay: Duration::from_millis(delay_ms),
        hold,
        // Room for every sequence a test runs at full length (bookkeeping only).
        num_blocks: (o.max_model_len / 16 + 1).max(256),
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
    let Served { base, .. } =
        scripted_server("The user greets me.</think>Hello!", 0, Opts::default()).await;
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
    let hold = Hold::held();
    let mut served = scripted_held(
        "a b c d",
        HELD_STEP_MS,
        hold.clone(),
        long_context(Opts {
            max_num_seqs: 1,
            max_waiting: 1,
            ..Default::default()
        }),
    )
    .await;
    let base = served.base.clone();
    let request = |base: String| async move {
        let r = client()
            .post(format!("{base}/v1/completions"))
            .json(&json!({ "model": MODEL, "prompt": "x" }))
            .send()
            .await
            .unwrap();
        let retry = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        (r.status().as_u16(), retry, r.json::<Value>().await.unwrap())
    };
    // One request runs and one waits: the engine is full.
    let running = tokio::spawn(request(base.clone()));
    engine_reaches(&mut served, "one request running", |s| s.running == 1).await;
    let waiting = tokio::spawn(request(base.clone()));
    engine_reaches(&mut served, "one request waiting", |s| s.waiting == 1).await;
    for _ in 0..4 {
        let (status, retry, body) = request(base.clone()).await;
        assert_eq!(status, 429, "{body}");
        assert!(retry.is_some());
        assert_eq!(body["error"]["type"], "rate_limit_exceeded");
    }
    hold.release();
    for accepted in [running, waiting] {
        let (status, _, body) = bounded("an accepted request", accepted).await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
    }
    assert!(
        served
            .metrics
            .render()
            .contains("deepseek_engine_requests_rejected_total{reason=\"queue_full\"} 4")
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
    let mut served = scripted_held(
        "tok tok tok",
        HELD_STEP_MS,
        Hold::held(),
        long_context(Opts::default()),
    )
    .await;
    let base = served.base.clone();
    let mut r = client()
        .post(format!("{base}/v1/completions"))
        .json(&json!({ "model": MODEL, "prompt": "go", "stream": true }))
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

/// Sends raw bytes on a fresh connection and reads until the server closes it.
async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(request).await.unwrap();
    let mut out = Vec::new();
    bounded(
        "the server closing the connection",
        conn.read_to_end(&mut out),
    )
    .await
    .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one HTTP response (status line, headers and a content-length body) off `conn`.
async fn read_response(conn: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = bounded("a response header", conn.read(&mut byte))
            .await
            .unwrap();
        assert_eq!(n, 1, "the connection closed mid-response: {buf:?}");
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let status = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_string)
        })
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; len];
    bounded("a response body", conn.read_exact(&mut body))
        .await
        .unwrap();
    (status, String::from_utf8(body).unwrap())
}

/// The JSON body of a raw response read to the end.
fn json_body(raw: &str) -> Value {
    let (_, body) = raw.split_once("\r\n\r\n").expect("a complete response");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {raw}"))
}

/// Asks `/health` again and again until `done` holds, each answer within `per_answer`:
/// the server's async workers must stay free while it works on other requests.
async fn health_answers_until(base: &str, per_answer: Duration, done: impl Fn() -> bool) -> usize {
    let mut answers = 0;
    loop {
        let r = tokio::time::timeout(per_answer, client().get(format!("{base}/health")).send())
            .await
            .unwrap_or_else(|_| panic!("/health did not answer within {per_answer:?}"))
            .unwrap();
        assert_eq!(r.status(), 200);
        answers += 1;
        if done() {
            return answers;
        }
    }
}

fn roomy_bodies() -> RequestLimits {
    RequestLimits {
        min_body_bytes: 64 << 20,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_far_over_the_context_is_refused_early_and_health_keeps_answering() {
    // The body budget is raised so that these bodies reach the tokenizer.
    let Served { base, .. } = builtin_server(Opts {
        request: roomy_bodies(),
        ..Default::default()
    })
    .await;
    let text = "lorem ipsum dolor sit amet, consectetur adipiscing elit. ".repeat(350_000);
    let bodies = [
        (
            "/v1/chat/completions",
            json!({ "model": MODEL, "messages": user(&text) }),
        ),
        ("/v1/completions", json!({ "model": MODEL, "prompt": text })),
    ];
    let mut big = Vec::new();
    for (path, body) in bodies {
        let base = base.clone();
        big.push(tokio::spawn(async move { post(&base, path, body).await }));
    }
    let answers = health_answers_until(&base, Duration::from_secs(10), || {
        big.iter().all(|h| h.is_finished())
    })
    .await;
    assert!(answers >= 1);
    for h in big {
        let (status, v) = h.await.unwrap();
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (400, Some("context_length_exceeded")),
            "{v}"
        );
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("maximum context length is 2048 tokens"),
            "{v}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_byte_budget_is_refused_with_a_json_413_before_parsing() {
    let Served { base, .. } = builtin_server(Opts::default()).await;
    // 2048 tokens * 32 bytes + 1 MiB of overhead: about 1.06 MB.
    let limit = RequestLimits::default().body_limit(2048);
    for size in [limit + 1, 3 * limit] {
        let body = format!(
            "{{\"model\":\"{MODEL}\",\"prompt\":\"{}\"}}",
            "a".repeat(size)
        );
        let r = client()
            .post(format!("{base}/v1/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "request_too_large");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&limit.to_string()),
            "{v}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_streams_whose_clients_leave_are_dropped_from_the_waiting_queue() {
    let mut served = scripted_held(
        "x",
        HELD_STEP_MS,
        Hold::held(),
        long_context(Opts {
            max_num_seqs: 1,
            max_waiting: 16,
            ..Default::default()
        }),
    )
    .await;
    let base = served.base.clone();
    let stream = |base: String| async move {
        client()
            .post(format!("{base}/v1/chat/completions"))
            .json(&json!({ "model": MODEL, "messages": user("hi"), "stream": true }))
            .send()
            .await
            .unwrap()
    };
    // The one running slot is taken by a sequence that does not end.
    let running = stream(base.clone()).await;
    assert_eq!(running.status(), 200);
    engine_reaches(&mut served, "one sequence running", |s| s.running == 1).await;
    // Sixteen streaming clients fill the queue (a streamed response starts once admitted).
    let mut queued = Vec::new();
    for _ in 0..16 {
        let r = stream(base.clone()).await;
        assert_eq!(r.status(), 200);
        queued.push(r);
    }
    engine_reaches(&mut served, "sixteen waiting", |s| s.waiting == 16).await;
    let (status, v) = post(
        &base,
        "/v1/chat/completions",
        json!({ "model": MODEL, "messages": user("hi") }),
    )
    .await;
    assert_eq!(status, 429, "{v}");
    // They leave before their first token: the queue must empty, not wait for a write.
    drop(queued);
    engine_reaches(&mut served, "the queue emptied", |s| s.waiting == 0).await;
    assert_eq!(served.engine.borrow().running, 1);
    let again = stream(base.clone()).await;
    assert_eq!(again.status(), 200, "a new request is admitted");
    engine_reaches(&mut served, "the new request waiting", |s| s.waiting == 1).await;
    drop(running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_non_streaming_request_whose_client_leaves_is_dropped() {
    let mut served = scripted_held(
        "x",
        HELD_STEP_MS,
        Hold::held(),
        long_context(Opts {
            max_num_seqs: 1,
            ..Default::default()
        }),
    )
    .await;
    let base = served.base.clone();
    let body = json!({ "model": MODEL, "prompt": "x" });
    let running = tokio::spawn({
        let (base, body) = (base.clone(), body.clone());
        async move { post(&base, "/v1/completions", body).await }
    });
    engine_reaches(&mut served, "one sequence running", |s| s.running == 1).await;
    let queued = tokio::spawn(async move { post(&base, "/v1/completions", body).await });
    engine_reaches(&mut served, "one waiting", |s| s.waiting == 1).await;
    queued.abort();
    engine_reaches(&mut served, "the queue emptied", |s| s.waiting == 0).await;
    running.abort();
    engine_reaches(&mut served, "nothing running", |s| s.running == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_half_a_header_is_disconnected_after_the_header_timeout() {
    let served = builtin_server(Opts {
        serve: ServeLimits {
            header_read_timeout: Duration::from_millis(300),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let raw = raw_exchange(served.addr, b"GET /health HTTP/1.1\r\nHost: x\r\n").await;
    assert!(!raw.contains("200"), "{raw}");
    // An idle keep-alive connection is closed the same way.
    let mut conn = TcpStream::connect(served.addr).await.unwrap();
    conn.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut conn).await.0, 200);
    let mut rest = Vec::new();
    bounded("the idle connection closing", conn.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(rest.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_arriving_is_refused_with_408() {
    let served = builtin_server(Opts {
        serve: ServeLimits {
            body_read_timeout: Duration::from_millis(300),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let raw = raw_exchange(
        served.addr,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n\
          content-length: 100\r\n\r\n{\"model\":",
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 408"), "{raw}");
    assert_eq!(json_body(&raw)["error"]["code"], "request_timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_get_a_json_503_and_a_freed_slot_is_reused() {
    let served = builtin_server(Opts {
        serve: ServeLimits {
            max_connections: 4,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut conn = TcpStream::connect(served.addr).await.unwrap();
        conn.write_all(health).await.unwrap();
        assert_eq!(read_response(&mut conn).await.0, 200);
        open.push(conn);
    }
    let raw = raw_exchange(served.addr, health).await;
    assert!(raw.starts_with("HTTP/1.1 503"), "{raw}");
    let v = json_body(&raw);
    assert_eq!(v["error"]["type"], "service_unavailable");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit of 4 open connections"),
        "{v}"
    );
    // Once a connection closes its slot is free again (the server notices the close
    // asynchronously, so ask until it has).
    drop(open.pop());
    bounded("a freed connection slot", async {
        loop {
            let raw = raw_exchange(
                served.addr,
                b"GET /health HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n",
            )
            .await;
            if raw.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(raw.starts_with("HTTP/1.1 503"), "{raw}");
        }
    })
    .await;
}

/// Parses SSE text into its data payloads; says whether it ended with `[DONE]`.
fn sse_events(text: &str) -> (Vec<Value>, bool) {
    let mut out = Vec::new();
    let mut done = false;
    for line in text.lines() {
        if let Some(d) = line.strip_prefix("data: ") {
            assert!(!done, "data after [DONE]");
            if d == "[DONE]" {
                done = true;
            } else {
                out.push(serde_json::from_str(d).unwrap());
            }
        }
    }
    (out, done)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_stream_finish_with_done_before_the_server_returns() {
    let hold = Hold::held();
    let mut served = scripted_held(
        "a b",
        HELD_STEP_MS,
        hold.clone(),
        long_context(Opts::default()),
    )
    .await;
    let mut r = client()
        .post(format!("{}/v1/completions", served.base))
        .json(&json!({ "model": MODEL, "prompt": "x", "stream": true }))
        .send()
        .await
        .unwrap();
    assert!(r.chunk().await.unwrap().is_some());
    served.shutdown.take().unwrap().send(()).unwrap();
    // The stream is still served while the server drains.
    assert!(r.chunk().await.unwrap().is_some());
    assert!(!served.stopped.is_finished());
    hold.release();
    let (events, done) = sse_events(&r.text().await.unwrap());
    assert!(done, "the drained stream ends with [DONE]");
    assert_eq!(
        events.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
    bounded("the server returning", served.stopped)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_still_open_at_the_drain_deadline_ends_with_an_error_event_and_done() {
    let mut served = scripted_held(
        "a b",
        HELD_STEP_MS,
        Hold::held(),
        long_context(Opts {
            serve: ServeLimits {
                drain_timeout: Duration::from_millis(200),
                ..Default::default()
            },
            ..Default::default()
        }),
    )
    .await;
    let mut r = client()
        .post(format!("{}/v1/chat/completions", served.base))
        .json(&json!({ "model": MODEL, "messages": user("hi"), "stream": true }))
        .send()
        .await
        .unwrap();
    assert!(r.chunk().await.unwrap().is_some());
    served.shutdown.take().unwrap().send(()).unwrap();
    let (events, done) = sse_events(&r.text().await.unwrap());
    assert!(done, "the stream ends with [DONE], not a cut connection");
    let last = events.last().unwrap();
    assert_eq!(last["error"]["type"], "service_unavailable", "{last}");
    bounded("the server returning", served.stopped)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn megabyte_stop_strings_are_refused_and_health_keeps_answering() {
    let Served { base, .. } = scripted_server(
        "a b c",
        0,
        Opts {
            request: roomy_bodies(),
            ..Default::default()
        },
    )
    .await;
    let stops: Vec<String> = (0..16)
        .map(|i| format!("{i}{}", "z".repeat(1 << 20)))
        .collect();
    let mut big = Vec::new();
    for _ in 0..2 {
        let (base, stops) = (base.clone(), stops.clone());
        big.push(tokio::spawn(async move {
            post(
                &base,
                "/v1/completions",
                json!({ "model": MODEL, "prompt": "x", "stop": stops, "max_tokens": 50 }),
            )
            .await
        }));
    }
    health_answers_until(&base, Duration::from_secs(10), || {
        big.iter().all(|h| h.is_finished())
    })
    .await;
    for h in big {
        let (status, v) = h.await.unwrap();
        assert_eq!(
            (status, v["error"]["param"].as_str()),
            (400, Some("stop")),
            "{v}"
        );
    }
    // Stop strings at the limit are served.
    let limit = RequestLimits::default().max_stop_bytes;
    let stops: Vec<String> = (0..16)
        .map(|i| format!("{i}{}", "z".repeat(limit - 2)))
        .collect();
    let (status, v) = post(
        &base,
        "/v1/completions",
        json!({ "model": MODEL, "prompt": "x", "stop": stops }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], "a b c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn n_choices_are_admitted_all_together_or_refused_as_a_whole() {
    let hold = Hold::held();
    let mut served = scripted_held(
        "a b",
        HELD_STEP_MS,
        hold.clone(),
        long_context(Opts {
            max_num_seqs: 1,
            max_waiting: 16,
            ..Default::default()
        }),
    )
    .await;
    let (results_tx, mut results) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..6 {
        let (base, results_tx) = (served.base.clone(), results_tx.clone());
        tokio::spawn(async move {
            let r = post(
                &base,
                "/v1/completions",
                json!({ "model": MODEL, "prompt": "x", "n": 16, "max_tokens": 50 }),
            )
            .await;
            let _ = results_tx.send(r);
        });
    }
    // Exactly one request fits; the other five are refused whole, and the one admitted
    // holds all of its sixteen sequences.
    for _ in 0..5 {
        let (status, v) = bounded("a refusal", results.recv()).await.unwrap();
        assert_eq!(status, 429, "{v}");
    }
    engine_reaches(&mut served, "one whole request admitted", |s| {
        s.running + s.waiting == 16
    })
    .await;
    hold.release();
    let (status, v) = bounded("the admitted request", results.recv())
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_n_request_never_holds_part_of_the_queue() {
    let mut served = scripted_held(
        "a",
        HELD_STEP_MS,
        Hold::held(),
        long_context(Opts {
            max_num_seqs: 1,
            max_waiting: 16,
            ..Default::default()
        }),
    )
    .await;
    let base = served.base.clone();
    let one = json!({ "model": MODEL, "prompt": "x" });
    let running = tokio::spawn({
        let (base, one) = (base.clone(), one.clone());
        async move { post(&base, "/v1/completions", one).await }
    });
    engine_reaches(&mut served, "one running", |s| s.running == 1).await;
    let waiting = tokio::spawn({
        let (base, one) = (base.clone(), one.clone());
        async move { post(&base, "/v1/completions", one).await }
    });
    engine_reaches(&mut served, "one waiting", |s| s.waiting == 1).await;
    // Fifteen slots are free, sixteen are asked for: refused whole, none admitted then
    // cancelled (which would count as aborted requests).
    let (status, v) = post(
        &base,
        "/v1/completions",
        json!({ "model": MODEL, "prompt": "x", "n": 16 }),
    )
    .await;
    assert_eq!(status, 429, "{v}");
    engine_reaches(&mut served, "the queue as before", |s| {
        s.waiting == 1 && s.running == 1
    })
    .await;
    let text = served.metrics.render();
    assert!(!text.contains("finished_reason=\"abort\""), "{text}");
    running.abort();
    waiting.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_string_finish_is_counted_as_stop_not_abort() {
    // Held: the sequence never ends by itself, so only the stop string can finish it.
    let mut served = scripted_held(
        "one two three four",
        HELD_STEP_MS,
        Hold::held(),
        long_context(Opts::default()),
    )
    .await;
    let base = served.base.clone();
    let (status, v) = post(
        &base,
        "/v1/completions",
        json!({ "model": MODEL, "prompt": "count:", "stop": [" three"] }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], "one two");
    let chunks = sse(
        &base,
        "/v1/chat/completions",
        json!({ "model": MODEL, "messages": user("count"), "stop": "four", "stream": true }),
    )
    .await;
    assert_eq!(
        chunks
            .iter()
            .rev()
            .find_map(|c| c["choices"][0]["finish_reason"].as_str()),
        Some("stop")
    );
    engine_reaches(&mut served, "both sequences finished", |s| {
        s.running == 0 && s.waiting == 0
    })
    .await;
    let text = served.metrics.render();
    assert!(
        text.contains(
            "vllm:request_success_total{finished_reason=\"stop\",model_name=\"test-model\"} 2"
        ),
        "{text}"
    );
    assert!(!text.contains("finished_reason=\"abort\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_wrong_methods_get_openai_error_bodies() {
    let Served { base, .. } = builtin_server(Opts::default()).await;
    let check = |r: reqwest::Response, status: u16| async move {
        assert_eq!(r.status(), status);
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json")
        );
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        assert!(v["error"].get("param").is_some() && v["error"].get("code").is_some());
    };
    check(
        client()
            .get(format!("{base}/v1/nothing"))
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
    check(
        client()
            .get(format!("{base}/v1/chat/completions"))
            .send()
            .await
            .unwrap(),
        405,
    )
    .await;
    check(
        client()
            .delete(format!("{base}/health"))
            .send()
            .await
            .unwrap(),
        405,
    )
    .await;
}

/// The numbers of a context-length message: (requested total, prompt, completion).
fn requested(message: &str) -> (u128, u128, u128) {
    let nums: Vec<u128> = message
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .map(|w| w.parse().unwrap())
        .collect();
    // "maximum context length is L tokens ... requested T tokens (P in the prompt, C for ...)"
    (nums[1], nums[2], nums[3])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_numbers_get_correct_messages_and_overflow_nothing() {
    let Served { base, .. } = builtin_server(Opts {
        max_model_len: 64,
        ..Default::default()
    })
    .await;
    let (s, v) = post(
        &base,
        "/v1/chat/completions",
        json!({ "model": MODEL, "messages": user("x"), "max_tokens": u64::MAX }),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("context_length_exceeded")),
        "{v}"
    );
    let (total, prompt, completion) = requested(v["error"]["message"].as_str().unwrap());
    assert_eq!(completion, u64::MAX as u128);
    assert_eq!(total, prompt + completion, "{v}");

    let cases = [
        (json!({ "n": u64::MAX }), "n"),
        (json!({ "top_k": i64::MIN }), "top_k"),
        (
            json!({ "logprobs": true, "top_logprobs": u64::MAX }),
            "top_logprobs",
        ),
        (json!({ "max_completion_tokens": u64::MAX }), "max_tokens"),
    ];
    for (extra, param) in cases {
        let mut body = json!({ "model": MODEL, "messages": user("x") });
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (s, v) = post(&base, "/v1/chat/completions", body).await;
        assert_eq!((s, v["error"]["param"].as_str()), (400, Some(param)), "{v}");
    }
    // Numbers beyond the field's type are invalid bodies, not wrapped values.
    for extra in [
        json!({ "top_k": u64::MAX }),
        json!({ "n": -1 }),
        json!({ "max_tokens": -1 }),
    ] {
        let mut body = json!({ "model": MODEL, "messages": user("x") });
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (s, v) = post(&base, "/v1/chat/completions", body).await;
        assert_eq!(s, 400, "{v}");
    }
    let (s, v) = post(
        &base,
        "/v1/completions",
        json!({ "model": MODEL, "prompt": [1, u32::MAX], "logprobs": u64::MAX }),
    )
    .await;
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (400, Some("prompt")),
        "{v}"
    );
    let (s, v) = post(
        &base,
        "/v1/completions",
        json!({ "model": MODEL, "prompt": [5, 6], "logprobs": u64::MAX }),
    )
    .await;
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (400, Some("top_logprobs")),
        "{v}"
    );
    let (s, v) = post(
        &base,
        "/v1/completions",
        json!({ "model": MODEL, "prompt": [5, 6], "n": 2, "seed": u64::MAX, "max_tokens": 2 }),
    )
    .await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn special_tokens_do_not_leak_into_replies() {
    let Served { base, .. } = scripted_server(
        "Think<｜begin▁of▁sentence｜>ing</think>Hello<｜begin▁of▁sentence｜> world",
        0,
        Opts::default(),
    )
    .await;
    let body = json!({ "model": MODEL, "messages": user("hi"), "chat_template_kwargs": { "thinking": true } });
    let (status, v) = post(&base, "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["reasoning_content"], "Thinking");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello world");

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let chunks = sse(&base, "/v1/chat/completions", streamed).await;
    let join = |field: &str| -> String {
        chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"][field].as_str())
            .collect()
    };
    assert_eq!(join("reasoning_content"), "Thinking");
    assert_eq!(join("content"), "Hello world");

    let (status, v) = post(
        &base,
        "/v1/completions",
        json!({ "model": MODEL, "prompt": "x", "skip_special_tokens": false,
                "spaces_between_special_tokens": false }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["choices"][0]["text"],
        "Think<｜begin▁of▁sentence｜>ing</think>Hello<｜begin▁of▁sentence｜> world"
    );
}
