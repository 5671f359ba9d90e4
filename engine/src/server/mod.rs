//! The OpenAI-compatible HTTP API (axum): chat and text completions with SSE streaming, models,
//! tokenize/detokenize, health, readiness and Prometheus metrics. Handlers parse and validate
//! the request, render the DeepSeek-V3.2 prompt, submit sequences to the engine loop and turn
//! its token events back into text, reasoning and tool calls.

mod body;
mod error;
mod serve;
mod stop;
mod worker;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

pub use body::RequestLimits;
pub use error::{ApiError, ApiResult};
pub use serve::{BodyTimeout, ServeLimits, serve};
pub use stop::StopMatcher;
pub use worker::worker_router;

use crate::chat::{self, ThinkingMode};
use crate::generate::{FinishReason, SamplingParams};
use crate::metrics::Metrics;
use crate::runtime::{
    CancelReason, EngineHandle, FinishInfo, SeqEvent, SeqStream, SubmitRequest, TokenEvent,
};
use crate::tokenizer::{Tokenizer, TokenizerError};

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
    /// Per-request limits (body size, stop strings).
    pub limits: RequestLimits,
    /// Where [`serve`] is in its life: handlers end early once the drain deadline passes.
    phase: watch::Sender<Phase>,
}

/// The server's life: serving, draining after shutdown, and past the drain deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Shutdown started: no new connections, `/ready` fails, requests in flight finish.
    Draining,
    /// The drain deadline passed: streams still open end now with an error event.
    Expired,
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
            limits: RequestLimits::default(),
            phase: watch::channel(Phase::Serving).0,
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
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::map_response(openai_error_body))
        .with_state(state)
}

async fn not_found(req: Request) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: Some("not_found"),
        ..ApiError::invalid(format!("no route for {}", req.uri().path()), None)
    }
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: Some("method_not_allowed"),
        ..ApiError::invalid(
            format!("{} is not allowed on {}", req.method(), req.uri().path()),
            None,
        )
    }
}

/// Gives any error response the framework produced on its own (without a JSON body) the
/// OpenAI error shape, so clients can always parse an error.
async fn openai_error_body(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let kind = if status.is_client_error() {
        "invalid_request_error"
    } else {
        "internal_error"
    };
    let message = status.canonical_reason().unwrap_or("request failed");
    let err = ApiError {
        status,
        message: message.to_string(),
        kind,
        param: None,
        code: None,
        retry_after: None,
    };
    let mut out = err.into_response();
    for (name, value) in resp.headers() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
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
    if *s.phase.borrow() != Phase::Serving {
        ApiError::unavailable("the server is shutting down").into_response()
    } else if s.is_ready() {
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

/// The request's body, read under the server's byte budget before anything parses it.
async fn request_body(s: &ServerState, req: Request) -> ApiResult<Bytes> {
    let (parts, body) = req.into_parts();
    body::read_body(&parts.headers, body, s.limits.body_limit(s.max_model_len)).await
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
    /// Drop special tokens (BOS, EOS, role markers) from the text, as vLLM does by default.
    /// The thinking tags stay: they split reasoning from content. vLLM's companion field
    /// `spaces_between_special_tokens` is accepted and has no effect.
    skip_special_tokens: Option<bool>,
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
    skip_special_tokens: bool,
}

/// The OpenAI error for a prompt (or prompt plus completion) over the context length.
fn context_exceeded(message: String, param: &str) -> ApiError {
    ApiError {
        code: Some("context_length_exceeded"),
        ..ApiError::invalid(message, Some(param))
    }
}

/// Token ids of a prompt, refused as soon as it is known to exceed the context length:
/// the work is bounded by `max_model_len`, not by the size of the text.
fn encode_prompt(s: &ServerState, text: &str, param: &str) -> ApiResult<Vec<u32>> {
    match s.tokenizer.encode_within(text, s.max_model_len) {
        Ok(ids) => Ok(ids),
        Err(TokenizerError::TooLong { limit }) => Err(context_exceeded(
            format!(
                "This model's maximum context length is {limit} tokens. However, your prompt has \
                 more than {limit} tokens."
            ),
            param,
        )),
        Err(e) => Err(ApiError::invalid(e.to_string(), Some(param))),
    }
}

/// Runs request preparation (JSON parsing, prompt rendering, tokenization) on the blocking
/// pool: it costs CPU in proportion to the body, which must not stall the async workers that
/// answer health probes and stream tokens.
async fn off_the_workers<T: Send + 'static>(
    s: &Arc<ServerState>,
    f: impl FnOnce(&ServerState) -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    let s = s.clone();
    tokio::task::spawn_blocking(move || f(&s))
        .await
        .map_err(|e| ApiError::internal(format!("preparing the request failed: {e}")))?
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
        return Err(context_exceeded(
            format!(
                "This model's maximum context length is {} tokens. However, your prompt has {} tokens.",
                s.max_model_len,
                prompt.len()
            ),
            "messages",
        ));
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
            // Widened: a client's max_tokens may be as large as the integer type allows.
            let total = prompt.len() as u128 + m as u128;
            return Err(context_exceeded(
                format!(
                    "This model's maximum context length is {} tokens. However, you requested {total} tokens \
                     ({} in the prompt, {m} for the completion).",
                    s.max_model_len,
                    prompt.len(),
                ),
                "max_tokens",
            ));
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
    if let Some(long) = stops.iter().find(|st| st.len() > s.limits.max_stop_bytes) {
        return Err(ApiError::invalid(
            format!(
                "stop sequences may be at most {} bytes long; one is {} bytes",
                s.limits.max_stop_bytes,
                long.len()
            ),
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
        skip_special_tokens: f.skip_special_tokens.unwrap_or(true),
    })
}

/// Submits every choice of a request; the engine admits all of them or none.
async fn submit_all(s: &ServerState, p: &Prepared) -> ApiResult<Vec<SeqStream>> {
    let reqs = (0..p.n)
        .map(|i| {
            let mut sampling = p.sampling.clone();
            sampling.seed = sampling.seed.map(|seed| seed.wrapping_add(i as u64));
            SubmitRequest {
                prompt: p.prompt.clone(),
                max_tokens: p.max_tokens,
                sampling,
                stop_token_ids: p.stop_token_ids.clone(),
                logprobs: p.logprobs,
            }
        })
        .collect();
    Ok(s.engine()?.submit_all(reqs).await?)
}

/// What a choice's task sees next.
enum Next {
    Event(SeqEvent),
    /// The engine closed the stream.
    Over,
    /// The client disconnected: the response body (and its channel) was dropped.
    ClientGone,
    /// The server's drain deadline passed.
    Deadline,
}

/// Waits for the sequence's next event, the client leaving, or the drain deadline, whichever
/// comes first: a sequence still waiting for its first token is cancelled as soon as its
/// client leaves, not at its first write.
async fn next_step<T>(
    seq: &mut SeqStream,
    tx: &mpsc::Sender<T>,
    phase: &mut watch::Receiver<Phase>,
) -> Next {
    tokio::select! {
        ev = seq.next() => ev.map_or(Next::Over, Next::Event),
        _ = tx.closed() => Next::ClientGone,
        _ = deadline(phase) => Next::Deadline,
    }
}

/// Resolves once the drain deadline has passed.
async fn deadline(phase: &mut watch::Receiver<Phase>) {
    let reached = phase.wait_for(|p| *p == Phase::Expired).await.is_ok();
    if !reached {
        // The state (and its sender) is gone; no deadline will come.
        std::future::pending::<()>().await;
    }
}

fn shutting_down() -> ApiError {
    ApiError::unavailable("the server is shutting down; the request ended before it finished")
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
    fn new(s: &ServerState, p: &Prepared) -> Self {
        ChoiceText {
            // Skipping keeps the thinking tags, which the chat parser reads (DSML tool-call
            // tags are plain text).
            decoder: s.tokenizer.decode_stream(p.skip_special_tokens),
            stop: StopMatcher::new(p.stops.clone()),
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

/// Drives one choice to its end (non-streaming). If the client leaves, hyper drops this
/// future, and with it the sequence stream, which cancels the sequence.
async fn collect(s: &ServerState, p: &Prepared, mut seq: SeqStream) -> ApiResult<ChoiceText> {
    let mut c = ChoiceText::new(s, p);
    let mut phase = s.phase.subscribe();
    loop {
        let ev = tokio::select! {
            ev = seq.next() => ev,
            _ = deadline(&mut phase) => return Err(shutting_down()),
        };
        let Some(ev) = ev else { break };
        c.apply(s, ev);
        if c.done() {
            break;
        }
    }
    if c.stopped_by_string {
        seq.cancel(CancelReason::StopString);
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

async fn chat_completions(State(s): State<Arc<ServerState>>, req: Request) -> Response {
    match chat_inner(s, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Parses, renders and tokenizes a chat request (on the blocking pool).
fn prepare_chat(s: &ServerState, body: &Bytes) -> ApiResult<(Prepared, ThinkingMode)> {
    let raw: Value = parse_json(body)?;
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
    let fields: SamplingFields = parse_json(body)?;
    let chat_fields: ChatFields = parse_json(body)?;
    // Render from the raw text: tool schemas keep the key order the client sent.
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::invalid("the request body is not UTF-8", None))?;
    let chat_req = chat::Json::parse(text)
        .map_err(|e| ApiError::invalid(format!("invalid request body: {e}"), None))
        .and_then(|j| chat::ChatRequest::from_json(&j).map_err(chat_error))?;
    let mode = chat_req.mode;
    let prompt_text = chat_req.render().map_err(chat_error)?;
    let prompt = encode_prompt(s, &prompt_text, "messages")?;
    let logprobs = if chat_fields.logprobs {
        Some(chat_fields.top_logprobs.unwrap_or(0))
    } else {
        None
    };
    Ok((prepare(s, fields, prompt, logprobs)?, mode))
}

async fn chat_inner(s: Arc<ServerState>, req: Request) -> ApiResult<Response> {
    let body = request_body(&s, req).await?;
    let (p, mode) = off_the_workers(&s, move |s| prepare_chat(s, &body)).await?;
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
        let c = collect(&s, &p, seq).await?;
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
/// channel; when the client disconnects the channel closes, the tasks end (even for choices
/// still waiting for their first token) and their dropped sequence streams cancel the
/// sequences.
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
    let p = Arc::new(p);
    for (i, mut seq) in streams.into_iter().enumerate() {
        let (s, p, tx, done_tx, base) = (
            s.clone(),
            p.clone(),
            tx.clone(),
            done_tx.clone(),
            base.clone(),
        );
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
            let mut text = ChoiceText::new(&s, &p);
            let mut parser = chat::StreamParser::new(mode);
            let mut saw_tool_call = false;
            let mut phase = s.phase.subscribe();
            let mut expired = false;
            loop {
                let ev = match next_step(&mut seq, &tx, &mut phase).await {
                    Next::Event(ev) => ev,
                    Next::Over => break,
                    Next::ClientGone => return,
                    Next::Deadline => {
                        expired = true;
                        break;
                    }
                };
                let new_tokens_from = text.tokens.len();
                let visible = text.apply(&s, ev);
                let mut deltas = parser.push(&visible);
                if text.done() {
                    deltas.extend(parser.finish());
                }
                let lp = p
                    .logprobs
                    .is_some()
                    .then(|| chat_logprobs(&s, &text.tokens[new_tokens_from..]));
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
                seq.cancel(CancelReason::StopString);
            }
            if expired {
                let _ = tx.send(data(&shutting_down().body())).await;
            } else if let Some(msg) = &text.failed {
                let err = ApiError::internal(format!("generation failed: {msg}"));
                let _ = tx.send(data(&err.body())).await;
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

async fn completions(State(s): State<Arc<ServerState>>, req: Request) -> Response {
    match completions_inner(s, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Parses and tokenizes a text completion request (on the blocking pool).
fn prepare_completion(s: &ServerState, body: &Bytes) -> ApiResult<Prepared> {
    let fields: SamplingFields = parse_json(body)?;
    let cf: CompletionFields = parse_json(body)?;
    if cf.echo {
        return Err(ApiError::invalid("echo is not supported", Some("echo")));
    }
    let prompt = match cf.prompt {
        None => return Err(ApiError::invalid("prompt is required", Some("prompt"))),
        Some(PromptField::Text(t)) => encode_prompt(s, &t, "prompt")?,
        Some(PromptField::Ids(ids)) => ids,
        Some(PromptField::Texts(v)) if v.len() == 1 => encode_prompt(s, &v[0], "prompt")?,
        Some(PromptField::IdLists(mut v)) if v.len() == 1 => v.swap_remove(0),
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
    prepare(s, fields, prompt, cf.logprobs)
}

async fn completions_inner(s: Arc<ServerState>, req: Request) -> ApiResult<Response> {
    let body = request_body(&s, req).await?;
    let p = off_the_workers(&s, move |s| prepare_completion(s, &body)).await?;
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
            let c = collect(&s, &p, seq).await?;
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
    let p = Arc::new(p);
    for (i, mut seq) in streams.into_iter().enumerate() {
        let (s, p, tx, done_tx, id) = (
            s.clone(),
            p.clone(),
            tx.clone(),
            done_tx.clone(),
            id.clone(),
        );
        tokio::spawn(async move {
            let mut text = ChoiceText::new(&s, &p);
            let mut phase = s.phase.subscribe();
            let mut expired = false;
            loop {
                let ev = match next_step(&mut seq, &tx, &mut phase).await {
                    Next::Event(ev) => ev,
                    Next::Over => break,
                    Next::ClientGone => return,
                    Next::Deadline => {
                        expired = true;
                        break;
                    }
                };
                let visible = text.apply(&s, ev);
                let finish =
                    (text.done() && text.failed.is_none()).then(|| finish_str(text.finish));
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
                seq.cancel(CancelReason::StopString);
            }
            if expired {
                let _ = tx.send(data(&shutting_down().body())).await;
            } else if let Some(msg) = &text.failed {
                let err = ApiError::internal(format!("generation failed: {msg}"));
                let _ = tx.send(data(&err.body())).await;
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

async fn tokenize(State(s): State<Arc<ServerState>>, req: Request) -> Response {
    let run =
        async {
            let body = request_body(&s, req).await?;
            off_the_workers(&s, move |s| {
            let req: TokenizeRequest = parse_json(&body)?;
            let (text, param) = match (req.prompt, req.messages) {
                (Some(p), _) => (p, "prompt"),
                (None, Some(_)) => {
                    let text = std::str::from_utf8(&body)
                        .map_err(|_| ApiError::invalid("the request body is not UTF-8", None))?;
                    (chat::render_request_str(text).map_err(chat_error)?, "messages")
                }
                (None, None) => {
                    return Err(ApiError::invalid(
                        "give either prompt or messages",
                        Some("prompt"),
                    ));
                }
            };
            let tokens = encode_prompt(s, &text, param)?;
            Ok(json!({ "count": tokens.len(), "max_model_len": s.max_model_len, "tokens": tokens }))
        })
        .await
        };
    match run.await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct DetokenizeRequest {
    tokens: Vec<u32>,
}

async fn detokenize(State(s): State<Arc<ServerState>>, req: Request) -> Response {
    let run = async {
        let body = request_body(&s, req).await?;
        off_the_workers(&s, move |s| {
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
        })
        .await
    };
    match run.await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}
