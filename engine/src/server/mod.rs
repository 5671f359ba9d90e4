//! The OpenAI-compatible HTTP API (axum): chat and text completions with SSE streaming, models,
//! tokenize/detokenize, health, readiness and Prometheus metrics. Handlers parse and validate
//! the request, render the DeepSeek-V3.2 prompt, submit sequences to the engine loop and turn
//! its token events back into text, reasoning and tool calls.

mod error;
mod stop;
mod worker;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

pub use error::{ApiError, ApiResult};
pub use stop::StopMatcher;
pub use worker::worker_router;

use crate::chat::{self, ThinkingMode};
use crate::generate::{FinishReason, SamplingParams};
use crate::metrics::Metrics;
use crate::runtime::{EngineHandle, FinishInfo, SeqEvent, SeqStream, SubmitRequest, TokenEvent};
use crate::tokenizer::Tokenizer;

/// Everything handlers share. The engine is attached once the model has loaded, so health
/// and metrics (with load progress) answer while weights are still being read.
pub struct ServerState {
    engine: OnceLock<EngineHandle>,
    pub tokenizer: Arc<Tokenizer>,
    pub metrics: Metrics,
    pub model_name: String,
    pub max_model_len: usize,
    /// Token ids that end generation (the model's EOS); never shown as text.
    pub eos_token_ids: Vec<u32>,
    /// Set on worker ranks of an expert-parallel group, which serve no API: ready once joined.
    pub worker_ready: Option<Arc<AtomicBool>>,
}

impl ServerState {
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        metrics: Metrics,
        model_name: String,
        max_model_len: usize,
        eos_token_ids: Vec<u32>,
    ) -> Self {
        ServerState {
            engine: OnceLock::new(),
            tokenizer,
            metrics,
            model_name,
            max_model_len,
            eos_token_ids,
            worker_ready: None,
        }
    }

    /// Attaches the running engine; requests are refused with 503 until then.
    pub fn attach_engine(&self, engine: EngineHandle) {
        let _ = self.engine.set(engine);
    }

    fn engine(&self) -> ApiResult<&EngineHandle> {
        if self.worker_ready.is_some() {
            return Err(ApiError::unavailable(
                "this is a worker rank of an expert-parallel group; send requests to rank 0",
            ));
        }
        self.engine
            .get()
            .ok_or_else(|| ApiError::unavailable("the model is still loading"))
    }

    fn is_ready(&self) -> bool {
        match &self.worker_ready {
            Some(flag) => flag.load(Ordering::Acquire),
            None => self.engine.get().is_some_and(EngineHandle::is_ready),
        }
    }
}

impl std::fmt::Debug for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState")
            .field("model_name", &self.model_name)
            .finish()
    }
}

pub fn router(state: Arc<ServerState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(64 << 20))
        .with_state(state)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_id(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{nanos:x}")
}

/// Liveness: the process can still serve. It fails once the engine loop has stopped for good
/// (a lost or silent rank), so a liveness probe restarts the pod.
async fn health(State(s): State<Arc<ServerState>>) -> Response {
    match s.engine.get() {
        Some(e) if !e.is_alive() => {
            ApiError::unavailable("the engine has stopped: its expert-parallel group is broken")
                .into_response()
        }
        _ => (StatusCode::OK, "ok").into_response(),
    }
}

async fn ready(State(s): State<Arc<ServerState>>) -> Response {
    if s.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        ApiError::unavailable("the engine is not ready").into_response()
    }
}

async fn metrics(State(s): State<Arc<ServerState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

async fn models(State(s): State<Arc<ServerState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": s.model_name,
            "object": "model",
            "created": unix_now(),
            "owned_by": "deepseek-engine",
            "root": s.model_name,
            "max_model_len": s.max_model_len,
        }]
    }))
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("invalid request body: {e}"), None))
}

/// Fields chat and text completions share.
#[derive(Debug, Deserialize)]
struct SamplingFields {
    model: Option<String>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<usize>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    seed: Option<u64>,
    stop: Option<StopField>,
    stop_token_ids: Option<Vec<u32>>,
    #[serde(default)]
    ignore_eos: bool,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

/// A validated, engine-ready request (parse, don't validate: nothing unchecked goes further).
struct Prepared {
    prompt: Vec<u32>,
    n: usize,
    max_tokens: usize,
    sampling: SamplingParams,
    stops: Vec<String>,
    stop_token_ids: Vec<u32>,
    stream: bool,
    include_usage: bool,
    logprobs: Option<usize>,
}

fn prepare(
    s: &ServerState,
    f: SamplingFields,
    prompt: Vec<u32>,
    logprobs: Option<usize>,
) -> ApiResult<Prepared> {
    if let Some(m) = &f.model
        && m != &s.model_name
    {
        return Err(ApiError::model_not_found(m));
    }
    if prompt.is_empty() {
        return Err(ApiError::invalid("the prompt is empty", Some("prompt")));
    }
    if prompt.len() >= s.max_model_len {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid(
                format!(
                    "This model's maximum context length is {} tokens. However, your prompt has {} tokens.",
                    s.max_model_len,
                    prompt.len()
                ),
                Some("messages"),
            )
        });
    }
    let n = f.n.unwrap_or(1);
    if n == 0 || n > 16 {
        return Err(ApiError::invalid(
            format!("n must be between 1 and 16, got {n}"),
            Some("n"),
        ));
    }
    let room = s.max_model_len - prompt.len();
    let max_tokens = match f.max_completion_tokens.or(f.max_tokens) {
        Some(0) => {
            return Err(ApiError::invalid(
                "max_tokens must be at least 1",
                Some("max_tokens"),
            ));
        }
        Some(m) if m > room => {
            return Err(ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::invalid(
                    format!(
                        "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in \
                         the prompt, {} for the completion).",
                        s.max_model_len,
                        prompt.len() + m,
                        prompt.len(),
                        m
                    ),
                    Some("max_tokens"),
                )
            });
        }
        Some(m) => m,
        None => room,
    };
    let top_k = match f.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                format!("top_k must be -1 (off) or positive, got {k}"),
                Some("top_k"),
            ));
        }
    };
    let sampling = SamplingParams {
        temperature: f.temperature.unwrap_or(1.0),
        top_p: f.top_p.unwrap_or(1.0),
        top_k,
        seed: f.seed,
    };
    if let Err(e) = sampling.validate() {
        let param = if e.to_string().starts_with("temperature") {
            "temperature"
        } else {
            "top_p"
        };
        return Err(ApiError::invalid(e.to_string(), Some(param)));
    }
    let stops = match f.stop {
        None => vec![],
        Some(StopField::One(s)) => vec![s],
        Some(StopField::Many(v)) => v,
    };
    if stops.len() > 16 {
        return Err(ApiError::invalid(
            "at most 16 stop sequences are allowed",
            Some("stop"),
        ));
    }
    let mut stop_token_ids = f.stop_token_ids.unwrap_or_default();
    if !f.ignore_eos {
        stop_token_ids.extend(&s.eos_token_ids);
    }
    if let Some(k) = logprobs
        && k > 20
    {
        return Err(ApiError::invalid(
            format!("top_logprobs must be at most 20, got {k}"),
            Some("top_logprobs"),
        ));
    }
    Ok(Prepared {
        prompt,
        n,
        max_tokens,
        sampling,
        stops,
        stop_token_ids,
        stream: f.stream,
        include_usage: f.stream_options.is_some_and(|o| o.include_usage),
        logprobs,
    })
}

async fn submit_all(s: &ServerState, p: &Prepared) -> ApiResult<Vec<SeqStream>> {
    let mut streams = Vec::with_capacity(p.n);
    for i in 0..p.n {
        let mut sampling = p.sampling.clone();
        sampling.seed = sampling.seed.map(|seed| seed.wrapping_add(i as u64));
        let req = SubmitRequest {
            prompt: p.prompt.clone(),
            max_tokens: p.max_tokens,
            sampling,
            stop_token_ids: p.stop_token_ids.clone(),
            logprobs: p.logprobs,
        };
        // Earlier streams of this request are dropped (cancelled) if a later one is refused.
        streams.push(s.engine()?.submit(req).await?);
    }
    Ok(streams)
}

/// Text produced by one choice so far, as the client should see it.
struct ChoiceText {
    decoder: crate::tokenizer::DecodeStream,
    stop: StopMatcher,
    text: String,
    tokens: Vec<TokenEvent>,
    finish: Option<FinishReason>,
    stopped_by_string: bool,
    completion_tokens: usize,
    failed: Option<String>,
}

impl ChoiceText {
    fn new(s: &ServerState, stops: Vec<String>) -> Self {
        ChoiceText {
            // Special tokens stay in the text: the chat parser reads `</think>` and DSML tags.
            decoder: s.tokenizer.decode_stream(false),
            stop: StopMatcher::new(stops),
            text: String::new(),
            tokens: Vec::new(),
            finish: None,
            stopped_by_string: false,
            completion_tokens: 0,
            failed: None,
        }
    }

    /// Applies one engine event; returns the newly visible text.
    fn apply(&mut self, s: &ServerState, ev: SeqEvent) -> String {
        match ev {
            SeqEvent::Token(t) => {
                self.completion_tokens += 1;
                let piece = if s.eos_token_ids.contains(&t.token) {
                    String::new()
                } else {
                    self.decoder
                        .step(t.token)
                        .ok()
                        .flatten()
                        .unwrap_or_default()
                };
                self.tokens.push(t);
                let (out, stopped) = self.stop.push(&piece);
                if stopped {
                    self.stopped_by_string = true;
                    self.finish = Some(FinishReason::Stop);
                }
                self.text.push_str(&out);
                out
            }
            SeqEvent::Finished(FinishInfo { reason, .. }) => {
                self.finish.get_or_insert(reason);
                let mut rest = self.decoder.flush().ok().flatten().unwrap_or_default();
                let (mut out, stopped) = self.stop.push(&std::mem::take(&mut rest));
                if stopped {
                    self.finish = Some(FinishReason::Stop);
                } else {
                    out.push_str(&self.stop.flush());
                }
                self.text.push_str(&out);
                out
            }
            SeqEvent::Failed(msg) => {
                self.failed = Some(msg);
                String::new()
            }
        }
    }

    fn done(&self) -> bool {
        self.finish.is_some() || self.failed.is_some()
    }
}

/// Drives one choice to its end (non-streaming).
async fn collect(s: &ServerState, mut seq: SeqStream, stops: Vec<String>) -> ApiResult<ChoiceText> {
    let mut c = ChoiceText::new(s, stops);
    while let Some(ev) = seq.next().await {
        c.apply(s, ev);
        if c.done() {
            break;
        }
    }
    if c.stopped_by_string {
        seq.cancel();
    }
    if let Some(msg) = c.failed.take() {
        return Err(ApiError::internal(format!("generation failed: {msg}")));
    }
    if c.finish.is_none() {
        return Err(ApiError::unavailable(
            "the engine stopped before the sequence finished",
        ));
    }
    Ok(c)
}

fn finish_str(r: Option<FinishReason>) -> &'static str {
    match r {
        Some(FinishReason::Length) => "length",
        _ => "stop",
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({ "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion })
}

fn token_text(s: &ServerState, id: u32) -> String {
    s.tokenizer.decode(&[id], false).unwrap_or_default()
}

fn chat_logprobs(s: &ServerState, tokens: &[TokenEvent]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let text = token_text(s, t.token);
            json!({
                "token": text,
                "logprob": t.logprob,
                "bytes": text.as_bytes(),
                "top_logprobs": t.top_logprobs.iter().map(|(id, lp)| {
                    let tt = token_text(s, *id);
                    json!({ "token": tt, "logprob": lp, "bytes": tt.as_bytes() })
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "content": content })
}

#[derive(Debug, Deserialize)]
struct ChatFields {
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<usize>,
}

fn chat_error(e: chat::ChatError) -> ApiError {
    ApiError::invalid(e.to_string(), Some(&e.param()))
}

async fn chat_completions(State(s): State<Arc<ServerState>>, body: Bytes) -> Response {
    match chat_inner(s, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(s: Arc<ServerState>, body: Bytes) -> ApiResult<Response> {
    let raw: Value = parse_json(&body)?;
    if !raw.is_object() {
        return Err(ApiError::invalid(
            "the request body must be a JSON object",
            None,
        ));
    }
    if raw
        .get("messages")
        .and_then(Value::as_array)
        .is_none_or(|m| m.is_empty())
    {
        return Err(ApiError::invalid(
            "messages must be a non-empty array",
            Some("messages"),
        ));
    }
    let fields: SamplingFields = parse_json(&body)?;
    let chat_fields: ChatFields = parse_json(&body)?;
    // Render from the raw text: tool schemas keep the key order the client sent.
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::invalid("the request body is not UTF-8", None))?;
    let chat_req = chat::Json::parse(text)
        .map_err(|e| ApiError::invalid(format!("invalid request body: {e}"), None))
        .and_then(|j| chat::ChatRequest::from_json(&j).map_err(chat_error))?;
    let mode = chat_req.mode;
    let prompt_text = chat_req.render().map_err(chat_error)?;
    let prompt = s
        .tokenizer
        .encode(&prompt_text)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    let logprobs = if chat_fields.logprobs {
        Some(chat_fields.top_logprobs.unwrap_or(0))
    } else {
        None
    };
    let p = prepare(&s, fields, prompt, logprobs)?;
    let streams = submit_all(&s, &p).await?;
    let id = new_id("chatcmpl");
    let created = unix_now();
    tracing::info!(request_id = %id, prompt_tokens = p.prompt.len(), n = p.n, stream = p.stream, "chat completion");

    if p.stream {
        return Ok(stream_chat(s, p, streams, id, created, mode));
    }
    let mut choices = Vec::new();
    let mut completion_tokens = 0;
    for (i, seq) in streams.into_iter().enumerate() {
        let c = collect(&s, seq, p.stops.clone()).await?;
        completion_tokens += c.completion_tokens;
        let parsed = chat::parse_completion(&c.text, mode);
        let has_tools = !parsed.tool_calls.is_empty();
        let mut message = json!({ "role": "assistant", "content": parsed.content });
        if let Some(r) = &parsed.reasoning_content {
            message["reasoning_content"] = json!(r);
        }
        if has_tools {
            message["tool_calls"] = serde_json::to_value(&parsed.tool_calls).unwrap_or(Value::Null);
        }
        let finish = if has_tools && c.finish == Some(FinishReason::Stop) {
            "tool_calls"
        } else {
            finish_str(c.finish)
        };
        let mut choice = json!({ "index": i, "message": message, "finish_reason": finish });
        if p.logprobs.is_some() {
            choice["logprobs"] = chat_logprobs(&s, &c.tokens);
        }
        choices.push(choice);
    }
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": s.model_name,
        "choices": choices,
        "usage": usage(p.prompt.len(), completion_tokens),
    }))
    .into_response())
}

fn sse_response(rx: mpsc::Receiver<Event>) -> Response {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    sse(stream)
}

fn sse<S: Stream<Item = Result<Event, Infallible>> + Send + 'static>(stream: S) -> Response {
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn data(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

/// Streams every choice of a chat completion. Each choice runs in its own task feeding one SSE
/// channel; when the client disconnects the channel closes, the tasks end and their dropped
/// sequence streams cancel the sequences.
fn stream_chat(
    s: Arc<ServerState>,
    p: Prepared,
    streams: Vec<SeqStream>,
    id: String,
    created: u64,
    mode: ThinkingMode,
) -> Response {
    let (tx, rx) = mpsc::channel::<Event>(64);
    let n = streams.len();
    let (done_tx, mut done_rx) = mpsc::channel::<usize>(n.max(1));
    let base = json!({ "id": id, "object": "chat.completion.chunk", "created": created, "model": s.model_name });
    for (i, mut seq) in streams.into_iter().enumerate() {
        let (s, tx, done_tx, base, stops) = (
            s.clone(),
            tx.clone(),
            done_tx.clone(),
            base.clone(),
            p.stops.clone(),
        );
        let with_logprobs = p.logprobs.is_some();
        tokio::spawn(async move {
            let chunk = |delta: Value, finish: Option<&str>, logprobs: Option<Value>| {
                let mut v = base.clone();
                let mut choice = json!({ "index": i, "delta": delta, "finish_reason": finish });
                if let Some(lp) = logprobs {
                    choice["logprobs"] = lp;
                }
                v["choices"] = json!([choice]);
                data(&v)
            };
            if tx
                .send(chunk(
                    json!({ "role": "assistant", "content": "" }),
                    None,
                    None,
                ))
                .await
                .is_err()
            {
                return;
            }
            let mut text = ChoiceText::new(&s, stops);
            let mut parser = chat::StreamParser::new(mode);
            let mut saw_tool_call = false;
            while let Some(ev) = seq.next().await {
                let new_tokens_from = text.tokens.len();
                let visible = text.apply(&s, ev);
                let mut deltas = parser.push(&visible);
                if text.done() {
                    deltas.extend(parser.finish());
                }
                let lp = with_logprobs.then(|| chat_logprobs(&s, &text.tokens[new_tokens_from..]));
                let mut lp = lp.filter(|v| v["content"].as_array().is_some_and(|a| !a.is_empty()));
                for d in deltas {
                    let delta = match d {
                        chat::Delta::ReasoningDelta(r) => json!({ "reasoning_content": r }),
                        chat::Delta::ContentDelta(c) => json!({ "content": c }),
                        chat::Delta::ToolCallStart { index, id, name } => {
                            saw_tool_call = true;
                            json!({ "tool_calls": [{ "index": index, "id": id, "type": "function", "function": { "name": name, "arguments": "" } }] })
                        }
                        chat::Delta::ToolCallArgumentsDelta {
                            index,
                            json_fragment,
                        } => {
                            json!({ "tool_calls": [{ "index": index, "function": { "arguments": json_fragment } }] })
                        }
                    };
                    if tx.send(chunk(delta, None, lp.take())).await.is_err() {
                        return;
                    }
                }
                if let Some(lp) = lp
                    && tx.send(chunk(json!({}), None, Some(lp))).await.is_err()
                {
                    return;
                }
                if text.done() {
                    break;
                }
            }
            if text.stopped_by_string {
                seq.cancel();
            }
            if let Some(msg) = &text.failed {
                let err = json!({ "error": { "message": format!("generation failed: {msg}"), "type": "internal_error", "param": null, "code": null } });
                let _ = tx.send(data(&err)).await;
            } else {
                let finish = if saw_tool_call && text.finish == Some(FinishReason::Stop) {
                    "tool_calls"
                } else {
                    finish_str(text.finish)
                };
                let _ = tx.send(chunk(json!({}), Some(finish), None)).await;
            }
            let _ = done_tx.send(text.completion_tokens).await;
        });
    }
    drop(done_tx);
    let prompt_tokens = p.prompt.len();
    let include_usage = p.include_usage;
    let model = s.model_name.clone();
    tokio::spawn(async move {
        let mut completion = 0;
        while let Some(c) = done_rx.recv().await {
            completion += c;
        }
        if include_usage {
            let v = json!({ "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [], "usage": usage(prompt_tokens, completion) });
            let _ = tx.send(data(&v)).await;
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    });
    sse_response(rx)
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
struct CompletionFields {
    prompt: Option<PromptField>,
    logprobs: Option<usize>,
    #[serde(default)]
    echo: bool,
}

async fn completions(State(s): State<Arc<ServerState>>, body: Bytes) -> Response {
    match completions_inner(s, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn completions_inner(s: Arc<ServerState>, body: Bytes) -> ApiResult<Response> {
    let fields: SamplingFields = parse_json(&body)?;
    let cf: CompletionFields = parse_json(&body)?;
    if cf.echo {
        return Err(ApiError::invalid("echo is not supported", Some("echo")));
    }
    let encode = |t: &str| {
        s.tokenizer
            .encode(t)
            .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))
    };
    let prompt = match cf.prompt {
        None => return Err(ApiError::invalid("prompt is required", Some("prompt"))),
        Some(PromptField::Text(t)) => encode(&t)?,
        Some(PromptField::Ids(ids)) => ids,
        Some(PromptField::Texts(v)) if v.len() == 1 => encode(&v[0])?,
        Some(PromptField::IdLists(v)) if v.len() == 1 => v[0].clone(),
        Some(_) => {
            return Err(ApiError::invalid(
                "batched prompts are not supported; send one prompt per request",
                Some("prompt"),
            ));
        }
    };
    if let Some(bad) = prompt
        .iter()
        .find(|t| **t as usize >= s.tokenizer.vocab_size())
    {
        return Err(ApiError::invalid(
            format!("token id {bad} is outside the vocabulary"),
            Some("prompt"),
        ));
    }
    let p = prepare(&s, fields, prompt, cf.logprobs)?;
    let streams = submit_all(&s, &p).await?;
    let id = new_id("cmpl");
    let created = unix_now();
    tracing::info!(request_id = %id, prompt_tokens = p.prompt.len(), n = p.n, stream = p.stream, "completion");
    let legacy_logprobs = |c: &[TokenEvent]| {
        json!({
            "tokens": c.iter().map(|t| token_text(&s, t.token)).collect::<Vec<_>>(),
            "token_logprobs": c.iter().map(|t| t.logprob).collect::<Vec<_>>(),
            "top_logprobs": c.iter().map(|t| t.top_logprobs.iter().map(|(id, lp)| (token_text(&s, *id), json!(*lp))).collect::<serde_json::Map<String, Value>>()).collect::<Vec<_>>(),
        })
    };

    if !p.stream {
        let mut choices = Vec::new();
        let mut completion_tokens = 0;
        for (i, seq) in streams.into_iter().enumerate() {
            let c = collect(&s, seq, p.stops.clone()).await?;
            completion_tokens += c.completion_tokens;
            let lp = p.logprobs.map(|_| legacy_logprobs(&c.tokens));
            choices.push(json!({ "index": i, "text": c.text, "logprobs": lp, "finish_reason": finish_str(c.finish) }));
        }
        return Ok(Json(json!({
            "id": id, "object": "text_completion", "created": created, "model": s.model_name,
            "choices": choices, "usage": usage(p.prompt.len(), completion_tokens),
        }))
        .into_response());
    }

    let (tx, rx) = mpsc::channel::<Event>(64);
    let (done_tx, mut done_rx) = mpsc::channel::<usize>(p.n);
    for (i, mut seq) in streams.into_iter().enumerate() {
        let (s, tx, done_tx, stops, id) = (
            s.clone(),
            tx.clone(),
            done_tx.clone(),
            p.stops.clone(),
            id.clone(),
        );
        tokio::spawn(async move {
            let mut text = ChoiceText::new(&s, stops);
            while let Some(ev) = seq.next().await {
                let visible = text.apply(&s, ev);
                let finish = text.done().then(|| finish_str(text.finish));
                if (!visible.is_empty() || finish.is_some())
                    && tx
                        .send(data(&json!({ "id": id, "object": "text_completion", "created": created, "model": s.model_name,
                            "choices": [{ "index": i, "text": visible, "logprobs": null, "finish_reason": finish }] })))
                        .await
                        .is_err()
                {
                    return;
                }
                if text.done() {
                    break;
                }
            }
            if text.stopped_by_string {
                seq.cancel();
            }
            let _ = done_tx.send(text.completion_tokens).await;
        });
    }
    drop(done_tx);
    let (prompt_tokens, include_usage, model) =
        (p.prompt.len(), p.include_usage, s.model_name.clone());
    tokio::spawn(async move {
        let mut completion = 0;
        while let Some(c) = done_rx.recv().await {
            completion += c;
        }
        if include_usage {
            let v = json!({ "id": id, "object": "text_completion", "created": created, "model": model, "choices": [],
                            "usage": usage(prompt_tokens, completion) });
            let _ = tx.send(data(&v)).await;
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    });
    Ok(sse_response(rx))
}

#[derive(Debug, Deserialize)]
struct TokenizeRequest {
    prompt: Option<String>,
    messages: Option<Value>,
}

async fn tokenize(State(s): State<Arc<ServerState>>, body: Bytes) -> Response {
    let run = || -> ApiResult<Value> {
        let req: TokenizeRequest = parse_json(&body)?;
        let text = match (req.prompt, req.messages) {
            (Some(p), _) => p,
            (None, Some(_)) => {
                let text = std::str::from_utf8(&body)
                    .map_err(|_| ApiError::invalid("the request body is not UTF-8", None))?;
                chat::render_request_str(text).map_err(chat_error)?
            }
            (None, None) => {
                return Err(ApiError::invalid(
                    "give either prompt or messages",
                    Some("prompt"),
                ));
            }
        };
        let tokens = s
            .tokenizer
            .encode(&text)
            .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))?;
        Ok(json!({ "count": tokens.len(), "max_model_len": s.max_model_len, "tokens": tokens }))
    };
    match run() {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct DetokenizeRequest {
    tokens: Vec<u32>,
}

async fn detokenize(State(s): State<Arc<ServerState>>, body: Bytes) -> Response {
    let run = || -> ApiResult<Value> {
        let req: DetokenizeRequest = parse_json(&body)?;
        if let Some(bad) = req
            .tokens
            .iter()
            .find(|t| **t as usize >= s.tokenizer.vocab_size())
        {
            return Err(ApiError::invalid(
                format!("token id {bad} is outside the vocabulary"),
                Some("tokens"),
            ));
        }
        let text = s
            .tokenizer
            .decode(&req.tokens, false)
            .map_err(|e| ApiError::invalid(e.to_string(), Some("tokens")))?;
        Ok(json!({ "prompt": text }))
    };
    match run() {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}
