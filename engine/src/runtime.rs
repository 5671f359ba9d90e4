//! The engine loop: one OS thread owns the executor (model + device + KV storage) and the
//! scheduler. The async HTTP side talks to it only through channels: a `Submit` carries the
//! request and the sender its tokens stream back on; dropping the receiving [`SeqStream`]
//! (a client disconnect) cancels the sequence and frees its blocks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc as tmpsc, oneshot, watch};

use crate::backend::Executor;
use crate::generate::{FinishReason, Rng, Sampled, Sampler, SamplingParams};
use crate::metrics::Metrics;
use crate::model::{ForwardError, LogitsWanted, SeqChunk};
use crate::sched::{AdmissionError, Scheduler, SeqId, SeqSpec};

/// How often an idle engine loop asks its executor whether it can still step.
pub const IDLE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// What the HTTP side asks for one sequence.
#[derive(Debug, Clone)]
pub struct SubmitRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_token_ids: Vec<u32>,
    /// Return the sampled token's logprob and this many alternatives.
    pub logprobs: Option<usize>,
}

/// A generated token with its logprobs when asked for: what the sampler returned.
pub type TokenEvent = Sampled;

#[derive(Debug, Clone, PartialEq)]
pub struct FinishInfo {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SeqEvent {
    Token(TokenEvent),
    Finished(FinishInfo),
    /// The engine failed this sequence (e.g. a backend error or a lost rank).
    Failed(String),
}

/// One sequence of a submission, with the sender its events go out on.
struct NewSeq {
    id: SeqId,
    req: SubmitRequest,
    events: tmpsc::UnboundedSender<SeqEvent>,
}

enum Command {
    /// The choices of one request: admitted all together or refused all together.
    Submit {
        seqs: Vec<NewSeq>,
        admitted: oneshot::Sender<Result<(), AdmissionError>>,
    },
    Cancel(SeqId, CancelReason),
    /// Fail every sequence with this reason and end the loop (the end of a drain).
    Shutdown(String),
}

/// Why the HTTP side ends a sequence before the engine finishes it; it decides the
/// `finished_reason` the sequence is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// The client went away (or the request failed): counted as `abort`.
    Abort,
    /// A stop string matched in the text: a normal finish, counted as `stop`.
    StopString,
}

/// The scheduler's counts as the engine loop last published them. Each value is published
/// before the token events of the same step go out, so a client that has seen a token also
/// sees the state that produced it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EngineState {
    /// Sequences being computed.
    pub running: usize,
    /// Sequences admitted but not yet scheduled.
    pub waiting: usize,
    /// Fraction (0..1) of KV blocks held by sequences.
    pub kv_usage: f64,
    /// Engine steps completed so far.
    pub steps: u64,
}

/// Cheap to clone; shared by all HTTP handlers.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    next_id: Arc<AtomicU64>,
    ready: Arc<AtomicBool>,
    /// False once the loop has ended for good (its group broke): the process should restart.
    alive: Arc<AtomicBool>,
    state: watch::Receiver<EngineState>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("ready", &self.is_ready())
            .finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    #[error("the engine is not running")]
    EngineDown,
}

/// A running sequence's token stream. Dropping it before the end cancels the sequence.
#[derive(Debug)]
pub struct SeqStream {
    pub id: SeqId,
    pub events: tmpsc::UnboundedReceiver<SeqEvent>,
    cancel: Option<mpsc::Sender<Command>>,
}

impl SeqStream {
    /// The next event; `None` once the stream is over.
    pub async fn next(&mut self) -> Option<SeqEvent> {
        let ev = self.events.recv().await;
        if matches!(
            ev,
            Some(SeqEvent::Finished(_)) | Some(SeqEvent::Failed(_)) | None
        ) {
            self.cancel = None;
        }
        ev
    }

    /// Stops the sequence now; `reason` says how it is counted.
    pub fn cancel(&mut self, reason: CancelReason) {
        if let Some(tx) = self.cancel.take() {
            let _ = tx.send(Command::Cancel(self.id, reason));
        }
    }
}

impl Drop for SeqStream {
    fn drop(&mut self) {
        self.cancel(CancelReason::Abort);
    }
}

impl EngineHandle {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// False once the engine loop has stopped for good (a lost or silent rank, a dead thread):
    /// only a restart brings the process back, so liveness probes should fail.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// A receiver of the engine's published state, for waiting on the engine's own events
    /// (tests, drains) instead of polling metrics on a clock.
    pub fn state(&self) -> watch::Receiver<EngineState> {
        self.state.clone()
    }

    /// Ends the engine: every sequence still running or waiting fails with `reason` (its client
    /// gets an error, then the end of its stream), and the loop drops its executor, which
    /// closes its group. [`EngineHandle::stopped`] resolves once that is done.
    pub fn shutdown(&self, reason: impl Into<String>) {
        let _ = self.tx.send(Command::Shutdown(reason.into()));
    }

    /// Resolves once the engine loop has ended and dropped its executor.
    pub async fn stopped(&self) {
        let mut state = self.state.clone();
        while state.changed().await.is_ok() {}
    }

    pub async fn submit(&self, req: SubmitRequest) -> Result<SeqStream, SubmitError> {
        let mut streams = self.submit_all(vec![req]).await?;
        streams.pop().ok_or(SubmitError::EngineDown)
    }

    /// Submits the choices of one request together: the engine admits all of them or none,
    /// so concurrent requests cannot each hold part of the queue and starve one another.
    pub async fn submit_all(
        &self,
        reqs: Vec<SubmitRequest>,
    ) -> Result<Vec<SeqStream>, SubmitError> {
        let mut seqs = Vec::with_capacity(reqs.len());
        let mut receivers = Vec::with_capacity(reqs.len());
        for req in reqs {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let (events, rx) = tmpsc::unbounded_channel();
            seqs.push(NewSeq { id, req, events });
            receivers.push((id, rx));
        }
        let (admitted_tx, admitted) = oneshot::channel();
        self.tx
            .send(Command::Submit {
                seqs,
                admitted: admitted_tx,
            })
            .map_err(|_| SubmitError::EngineDown)?;
        admitted.await.map_err(|_| SubmitError::EngineDown)??;
        Ok(receivers
            .into_iter()
            .map(|(id, events)| SeqStream {
                id,
                events,
                cancel: Some(self.tx.clone()),
            })
            .collect())
    }
}

struct Live {
    events: tmpsc::UnboundedSender<SeqEvent>,
    sampler: Sampler,
    prompt_len: usize,
    arrival: Instant,
    last_token: Option<Instant>,
    generated: usize,
}

/// Starts the engine thread. The executor is moved onto it; `index_topk` is used only for the
/// sparsity metric.
pub fn spawn(
    executor: Box<dyn Executor>,
    scheduler: Scheduler,
    metrics: Metrics,
    index_topk: usize,
) -> EngineHandle {
    let (tx, rx) = mpsc::channel();
    let (state_tx, state) = watch::channel(EngineState::default());
    let ready = Arc::new(AtomicBool::new(true));
    let alive = Arc::new(AtomicBool::new(true));
    let g = executor.kv_geometry();
    metrics.set_cache_config(g.block_size, g.num_blocks);
    metrics.ready.set(1);
    let thread_ready = ready.clone();
    let thread_alive = alive.clone();
    let spawned = std::thread::Builder::new()
        .name("engine-loop".into())
        .spawn(move || {
            let mut lp = Loop {
                executor,
                sched: scheduler,
                metrics,
                live: HashMap::new(),
                index_topk,
                ready: thread_ready.clone(),
                broken: false,
                stopping: false,
                expert_counters: Vec::new(),
                state: state_tx,
                steps: 0,
            };
            lp.run(rx);
            thread_ready.store(false, Ordering::Release);
            if lp.broken {
                thread_alive.store(false, Ordering::Release);
            }
            lp.metrics.ready.set(0);
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "could not start the engine thread");
        ready.store(false, Ordering::Release);
        alive.store(false, Ordering::Release);
    }
    EngineHandle {
        tx,
        next_id: Arc::new(AtomicU64::new(1)),
        ready,
        alive,
        state,
    }
}

struct Loop {
    executor: Box<dyn Executor>,
    sched: Scheduler,
    metrics: Metrics,
    live: HashMap<SeqId, Live>,
    index_topk: usize,
    ready: Arc<AtomicBool>,
    /// The group is gone; the loop ends and new submissions see the engine as down.
    broken: bool,
    /// Asked to shut down: the loop ends once the commands at hand are handled.
    stopping: bool,
    /// Per-expert counter handles, resolved once (label lookups are not for every step).
    expert_counters: Vec<prometheus::IntCounter>,
    /// Where the scheduler's counts are published after every command and step.
    state: watch::Sender<EngineState>,
    steps: u64,
}

/// Events a step produced, held back until the gauges and the published state include the
/// step: whoever receives a token can rely on the metrics already counting its sequence.
#[derive(Default)]
struct Outbox(Vec<(tmpsc::UnboundedSender<SeqEvent>, SeqEvent)>);

impl Outbox {
    fn push(&mut self, to: &tmpsc::UnboundedSender<SeqEvent>, ev: SeqEvent) {
        self.0.push((to.clone(), ev));
    }

    fn deliver(self) {
        for (to, ev) in self.0 {
            // A receiver gone by now is a cancel already on its way to the loop.
            let _ = to.send(ev);
        }
    }
}

impl Loop {
    fn run(&mut self, rx: mpsc::Receiver<Command>) {
        loop {
            if !self.sched.has_work() {
                match rx.recv_timeout(IDLE_CHECK_EVERY) {
                    Ok(cmd) => self.handle(cmd),
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if let Err(e) = self.executor.check_alive() {
                            self.fail_group(&e);
                            return;
                        }
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                self.handle(cmd);
            }
            if self.stopping {
                return;
            }
            let outbox = self.step();
            self.update_gauges();
            self.sync_expert_counters();
            outbox.deliver();
            if self.broken {
                return;
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit { seqs, admitted } => {
                if admitted.is_closed() {
                    // The client left before its request reached the engine.
                    return;
                }
                let specs = seqs
                    .iter()
                    .map(|s| {
                        (
                            s.id,
                            SeqSpec {
                                prompt: s.req.prompt.clone(),
                                max_tokens: s.req.max_tokens,
                                stop_token_ids: s.req.stop_token_ids.clone(),
                            },
                        )
                    })
                    .collect();
                match self.sched.add_all(specs) {
                    Ok(()) => {
                        for NewSeq { id, req, events } in seqs {
                            tracing::debug!(
                                seq = id,
                                prompt_tokens = req.prompt.len(),
                                max_tokens = req.max_tokens,
                                "admitted"
                            );
                            let rng = req
                                .sampling
                                .seed
                                .map(Rng::new)
                                .unwrap_or_else(Rng::from_entropy);
                            self.live.insert(
                                id,
                                Live {
                                    events,
                                    sampler: Sampler {
                                        params: req.sampling,
                                        rng,
                                        logprobs: req.logprobs,
                                    },
                                    prompt_len: req.prompt.len(),
                                    arrival: Instant::now(),
                                    last_token: None,
                                    generated: 0,
                                },
                            );
                        }
                        let _ = admitted.send(Ok(()));
                    }
                    Err(e) => {
                        let reason = match e {
                            AdmissionError::QueueFull { .. } => "queue_full",
                            _ => "invalid",
                        };
                        self.metrics
                            .requests_rejected
                            .with_label_values(&[reason])
                            .inc();
                        let _ = admitted.send(Err(e));
                    }
                }
                self.update_gauges();
            }
            Command::Cancel(id, reason) => {
                if self.sched.abort(id) {
                    tracing::debug!(seq = id, ?reason, "cancelled");
                    let label = match reason {
                        CancelReason::Abort => "abort",
                        CancelReason::StopString => "stop",
                    };
                    self.metrics
                        .request_success
                        .with_label_values(&[label])
                        .inc();
                    if let (CancelReason::StopString, Some(live)) = (reason, self.live.get(&id)) {
                        self.metrics
                            .e2e_request_latency
                            .observe(live.arrival.elapsed().as_secs_f64());
                    }
                }
                self.live.remove(&id);
                self.update_gauges();
            }
            Command::Shutdown(reason) => {
                tracing::info!(sequences = self.live.len(), %reason, "engine shutting down");
                for (id, live) in self.live.drain() {
                    let _ = live.events.send(SeqEvent::Failed(reason.clone()));
                    if self.sched.abort(id) {
                        self.metrics
                            .request_success
                            .with_label_values(&["abort"])
                            .inc();
                    }
                }
                self.stopping = true;
                self.update_gauges();
            }
        }
    }

    fn step(&mut self) -> Outbox {
        let mut outbox = Outbox::default();
        let plan = self.sched.schedule();
        if plan.chunks.is_empty() {
            return outbox;
        }
        let started = Instant::now();
        let mut selected = 0u64;
        let mut resident = 0u64;
        // One sampler per chunk that ends in a sampled token (a copy; the advanced generator
        // is written back below).
        let mut samplers: Vec<Option<Sampler>> = Vec::with_capacity(plan.chunks.len());
        let chunks: Vec<SeqChunk> = plan
            .chunks
            .iter()
            .filter_map(|c| {
                let tokens = self.sched.tokens(c.id)?;
                samplers.push(
                    c.sample
                        .then(|| self.live.get(&c.id).map(|l| l.sampler.clone()))
                        .flatten(),
                );
                for p in c.start..c.start + c.len {
                    selected += (p + 1).min(self.index_topk) as u64;
                    resident += (p + 1) as u64;
                }
                Some(SeqChunk {
                    tokens: &tokens[c.start..c.start + c.len],
                    start_pos: c.start,
                    blocks: self.sched.block_table(c.id)?,
                    logits: if c.sample {
                        LogitsWanted::Last
                    } else {
                        LogitsWanted::None
                    },
                })
            })
            .collect();
        let prefill_tokens: usize = plan
            .chunks
            .iter()
            .filter(|c| c.len > 1 || c.start < self.prompt_len(c.id))
            .map(|c| c.len)
            .sum();
        let result = self.executor.forward_sample(&chunks, &mut samplers);
        drop(chunks);
        let sampled_rows = match result {
            Ok(l) => l,
            Err(e) => {
                // A lost rank breaks the group for good: fail everything and turn not-ready
                // (the operator recreates the group). Other errors fail this step's sequences.
                let fatal = matches!(e, ForwardError::Dist(_));
                tracing::error!(error = %e, fatal, "engine step failed");
                let victims: Vec<SeqId> = if fatal {
                    self.live.keys().copied().collect()
                } else {
                    plan.chunks.iter().map(|c| c.id).collect()
                };
                for id in victims {
                    if let Some(live) = self.live.remove(&id) {
                        outbox.push(&live.events, SeqEvent::Failed(e.to_string()));
                    }
                    self.sched.abort(id);
                }
                if fatal {
                    self.fail_group(&e);
                }
                return outbox;
            }
        };
        self.steps += 1;
        let kind = if prefill_tokens > 0 {
            "prefill"
        } else {
            "decode"
        };
        self.metrics
            .step_duration
            .with_label_values(&[kind])
            .observe(started.elapsed().as_secs_f64());
        self.metrics.indexer_selected_tokens.inc_by(selected);
        self.metrics.attention_resident_tokens.inc_by(resident);
        for id in &plan.preempted {
            tracing::debug!(seq = id, "preempted (will recompute)");
        }

        let now = Instant::now();
        let mut sampled = Vec::new();
        for ((c, row), sampler) in plan.chunks.iter().zip(sampled_rows).zip(samplers) {
            if !c.sample {
                continue;
            }
            let Some(live) = self.live.get_mut(&c.id) else {
                continue;
            };
            let (Some(row), Some(sampler)) = (row, sampler) else {
                continue;
            };
            live.sampler = sampler;
            let token = row.token;
            match live.last_token {
                None => self
                    .metrics
                    .time_to_first_token
                    .observe(now.duration_since(live.arrival).as_secs_f64()),
                Some(t) => self
                    .metrics
                    .time_per_output_token
                    .observe(now.duration_since(t).as_secs_f64()),
            }
            live.last_token = Some(now);
            live.generated += 1;
            self.metrics.generation_tokens.inc();
            // A closed receiver means a Cancel is already queued for the loop; that command,
            // not this step, ends the sequence, so its reason (abort or stop string) counts.
            outbox.push(&live.events, SeqEvent::Token(row));
            sampled.push((c.id, token));
        }
        for c in &plan.chunks {
            let prompt_len = self.prompt_len(c.id);
            let new_prompt = (c.start + c.len)
                .min(prompt_len)
                .saturating_sub(c.start.min(prompt_len));
            self.metrics.prompt_tokens.inc_by(new_prompt as u64);
        }
        for (id, reason) in self.sched.complete_step(&plan, &sampled) {
            if let Some(live) = self.live.remove(&id) {
                let info = FinishInfo {
                    reason,
                    prompt_tokens: live.prompt_len,
                    completion_tokens: live.generated,
                    cached_tokens: 0,
                };
                let label = match reason {
                    FinishReason::Stop => "stop",
                    FinishReason::Length => "length",
                };
                self.metrics
                    .request_success
                    .with_label_values(&[label])
                    .inc();
                self.metrics
                    .e2e_request_latency
                    .observe(now.duration_since(live.arrival).as_secs_f64());
                outbox.push(&live.events, SeqEvent::Finished(info));
            }
        }
        outbox
    }

    /// The group can never step again: turn not-ready, and end the loop after this step.
    fn fail_group(&mut self, e: &ForwardError) {
        tracing::error!(error = %e, "the expert-parallel group is broken; the engine stops");
        self.ready.store(false, Ordering::Release);
        self.metrics.ready.set(0);
        self.broken = true;
    }

    fn prompt_len(&self, id: SeqId) -> usize {
        self.live.get(&id).map_or(0, |l| l.prompt_len)
    }

    /// Brings the per-expert routed-token counters up to the executor's counts; after steps
    /// only, since admissions route no tokens.
    fn sync_expert_counters(&mut self) {
        let Some(counts) = self.executor.expert_routed_tokens() else {
            return;
        };
        if self.expert_counters.len() != counts.len() {
            self.expert_counters = (0..counts.len())
                .map(|e| {
                    self.metrics
                        .expert_routed_tokens
                        .with_label_values(&[&e.to_string()])
                })
                .collect();
        }
        for (c, n) in self.expert_counters.iter().zip(counts) {
            c.inc_by(n.saturating_sub(c.get()));
        }
    }

    fn update_gauges(&self) {
        let m = &self.metrics;
        m.num_requests_running.set(self.sched.num_running() as i64);
        m.num_requests_waiting.set(self.sched.num_waiting() as i64);
        m.kv_cache_usage_perc.set(self.sched.kv_usage());
        m.projected_kv_usage.set(self.sched.projected_kv_usage());
        m.fullest_partition_kv_usage
            .set(self.sched.fullest_partition_kv_usage());
        let state = EngineState {
            running: self.sched.num_running(),
            waiting: self.sched.num_waiting(),
            kv_usage: self.sched.kv_usage(),
            steps: self.steps,
        };
        self.state.send_if_modified(|s| {
            let changed = *s != state;
            *s = state;
            changed
        });
        let s = &self.sched.stats;
        m.num_preemptions
            .inc_by(s.preemptions.saturating_sub(m.num_preemptions.get()));
        m.prefix_cache_queries.inc_by(
            s.prefix_query_tokens
                .saturating_sub(m.prefix_cache_queries.get()),
        );
        m.prefix_cache_hits.inc_by(
            s.prefix_hit_tokens
                .saturating_sub(m.prefix_cache_hits.get()),
        );
    }
}
