//! `serve`: the OpenAI-compatible HTTP API around the engine loop. The listener answers at once
//! (health, metrics with load progress, 503 for requests) while the model loads on its own
//! thread; rank 0 then attaches the engine, and worker ranks compute for their group until
//! rank 0 closes it.
//!
//! SIGTERM and SIGINT drain: no new connections, in-flight requests run to their end within
//! the grace period, and whatever still runs then fails with an error event and `[DONE]`.

use std::future::IntoFuture;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use super::replica::{Replica, Setup, build_replica, model_config};
use super::{Error, ModelOptions, Result};
use crate::backend::cpu::CpuKvCache;
use crate::kv::{DEFAULT_BLOCK_SIZE, KvGeometry, PrefixCachingPool};
use crate::metrics::Metrics;
use crate::model::ModelConfig;
use crate::model::builtin::is_builtin;
use crate::runtime::{self, EngineHandle};
use crate::sched::{Scheduler, SchedulerConfig};
use crate::server::{self, ServerState};
use crate::tokenizer::Tokenizer;

/// How long a drain lets in-flight requests run by default.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// How long streams failed at the end of a drain get to send their last events.
const FLUSH_AFTER_GRACE: Duration = Duration::from_secs(5);

/// What `serve` is asked for, besides the model.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub model: ModelOptions,
    pub host: String,
    pub port: u16,
    /// tokenizer.json to use (default: the model directory's, or the built-in one).
    pub tokenizer: Option<PathBuf>,
    /// Name clients use in the `model` field (default: the model directory's name).
    pub served_model_name: Option<String>,
    /// Longest sequence (prompt plus completion) accepted; default: the model's positions,
    /// or what the KV cache holds if that is less.
    pub max_model_len: Option<usize>,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub max_waiting: usize,
    /// KV-cache blocks; default: sized from `kv_cache_memory_gb` (on a GPU: its free memory).
    pub num_kv_blocks: Option<usize>,
    pub kv_cache_memory_gb: f64,
    pub block_size: usize,
    pub prefix_caching: bool,
    /// How long a drain (SIGTERM, SIGINT) lets in-flight requests run before failing them.
    pub shutdown_grace: Duration,
    /// Header and body read timeouts and the connection limit; the drain deadline is
    /// `shutdown_grace`.
    pub http_limits: server::ServeLimits,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            model: ModelOptions::default(),
            host: "0.0.0.0".into(),
            port: 8000,
            tokenizer: None,
            served_model_name: None,
            max_model_len: None,
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            max_waiting: 256,
            num_kv_blocks: None,
            kv_cache_memory_gb: 1.0,
            block_size: DEFAULT_BLOCK_SIZE,
            prefix_caching: true,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            http_limits: server::ServeLimits::default(),
        }
    }
}

/// The longest sequence requests may use, and why it is less than asked, if it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaxModelLen {
    pub value: usize,
    pub warning: Option<String>,
}

/// Fits `max_model_len` to the model's positions and to a KV cache of `kv_tokens` slots
/// (`num_blocks` × `block_size`). A length the user asked for that the cache cannot hold is
/// refused, since every request of that length would fail; a defaulted one is clamped to
/// what the cache holds, with a warning, so `/v1/models` advertises a length that works.
pub fn fit_max_model_len(
    requested: Option<usize>,
    positions: usize,
    geometry: KvGeometry,
) -> Result<MaxModelLen> {
    let kv_tokens = geometry.num_slots();
    match requested {
        Some(0) => Err(Error::Options("--max-model-len must be at least 1".into())),
        Some(asked) => {
            let (value, warning) = if asked > positions {
                (
                    positions,
                    Some(format!(
                        "--max-model-len {asked} exceeds the model's {positions} positions; using {positions}"
                    )),
                )
            } else {
                (asked, None)
            };
            if value > kv_tokens {
                return Err(Error::KvCacheTooSmall {
                    kv_tokens,
                    num_blocks: geometry.num_blocks,
                    block_size: geometry.block_size,
                    max_model_len: value,
                });
            }
            Ok(MaxModelLen { value, warning })
        }
        None if positions > kv_tokens => Ok(MaxModelLen {
            value: kv_tokens,
            warning: Some(format!(
                "the KV cache holds {kv_tokens} tokens ({} blocks of {}), fewer than the model's \
                 {positions} positions: max_model_len is {kv_tokens}; give the cache more room \
                 (--num-kv-blocks, --kv-cache-memory-gb) for longer sequences",
                geometry.num_blocks, geometry.block_size
            )),
        }),
        None => Ok(MaxModelLen {
            value: positions,
            warning: None,
        }),
    }
}

/// The name clients use in the `model` field.
fn served_model_name(opts: &ServeOptions) -> String {
    opts.served_model_name.clone().unwrap_or_else(|| {
        if is_builtin(&opts.model.model) {
            "deepseek-v3.2-builtin".to_string()
        } else {
            PathBuf::from(&opts.model.model)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| opts.model.model.clone())
        }
    })
}

fn load_tokenizer(opts: &ServeOptions) -> Result<Tokenizer> {
    match (&opts.tokenizer, is_builtin(&opts.model.model)) {
        (Some(path), _) => Ok(Tokenizer::from_file(path)?),
        (None, true) => Ok(Tokenizer::builtin()?),
        (None, false) => {
            Tokenizer::from_file(PathBuf::from(&opts.model.model).join("tokenizer.json"))
                .map_err(|error| Error::ModelTokenizer { error })
        }
    }
}

/// The KV cache asked for: `--num-kv-blocks`, or as many blocks as `--kv-cache-memory-gb`
/// holds in host memory. Logged; a GPU with no `--num-kv-blocks` sizes its own after loading.
fn kv_plan(opts: &ServeOptions, config: &ModelConfig, on_gpu: bool) -> KvGeometry {
    let per_slot = CpuKvCache::bytes_per_slot(config);
    let num_blocks = opts.num_kv_blocks.unwrap_or_else(|| {
        let per_block = per_slot.saturating_mul(opts.block_size).max(1);
        ((opts.kv_cache_memory_gb * 1e9) as usize / per_block).max(1)
    });
    let geometry = KvGeometry {
        num_blocks,
        block_size: opts.block_size,
    };
    if on_gpu && opts.num_kv_blocks.is_none() {
        tracing::info!(
            block_size = opts.block_size,
            "KV cache: sized from the GPU's free memory once the weights are loaded"
        );
    } else {
        tracing::info!(
            num_blocks,
            block_size = opts.block_size,
            tokens = geometry.num_slots(),
            bytes = per_slot.saturating_mul(geometry.num_slots()),
            "KV cache"
        );
    }
    geometry
}

/// Serves until a signal ends the drain (rank 0, or a single process), or until rank 0 closes
/// the group (a worker rank). Blocks the calling thread; builds its own async runtime.
pub fn serve(opts: ServeOptions) -> Result<()> {
    let setup = Setup::new(&opts.model)?;
    let config = model_config(&opts.model)?;
    let auto_blocks = opts.num_kv_blocks.is_none();
    let geometry = kv_plan(&opts, &config, setup.on_gpu());
    // A GPU sizing its own cache is checked once it has (see `start_engine`).
    let max_model_len = if setup.on_gpu() && auto_blocks {
        let positions = config.max_position_embeddings;
        opts.max_model_len.unwrap_or(positions).min(positions)
    } else {
        let fit = fit_max_model_len(opts.max_model_len, config.max_position_embeddings, geometry)?;
        if let Some(w) = &fit.warning {
            tracing::warn!("{w}");
        }
        fit.value
    };
    // Worker ranks never tokenize: they need no tokenizer.json.
    let tokenizer = if setup.role.is_worker() {
        None
    } else {
        Some(load_tokenizer(&opts)?)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(Error::io("starting the async runtime"))?;
    rt.block_on(async move {
        let mut signals = Signals::new()?;
        let addr = format!("{}:{}", opts.host, opts.port);
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(Error::io(format!("binding {addr}")))?;
        let run = Run {
            setup,
            geometry,
            auto_blocks,
            max_model_len,
            metrics: Metrics::new(&served_model_name(&opts)),
            opts,
        };
        match tokenizer {
            Some(tokenizer) => run.api(listener, tokenizer, config, &mut signals).await,
            None => run.worker(listener, &mut signals).await,
        }
    })
}

/// One `serve` run, past its checks.
struct Run {
    opts: ServeOptions,
    setup: Setup,
    geometry: KvGeometry,
    auto_blocks: bool,
    max_model_len: usize,
    metrics: Metrics,
}

type HttpTask = tokio::task::JoinHandle<std::io::Result<()>>;

/// Serves `router` until `stop` turns true, then lets open requests finish.
fn spawn_http(
    listener: TcpListener,
    router: axum::Router,
    stop: watch::Receiver<bool>,
) -> HttpTask {
    let mut stop = stop;
    tokio::spawn(
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .into_future(),
    )
}

async fn http_result(http: HttpTask) -> Result<()> {
    http_result_of(http.await)
}

/// Runs `f` on a thread of its own (model loading must not hold an async worker, and a drain
/// must not wait for it); the receiver gets its result.
fn on_thread<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<oneshot::Receiver<Result<T>>> {
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(Error::io("starting the loader thread"))?;
    Ok(rx)
}

fn thread_died(_: oneshot::error::RecvError) -> Error {
    Error::Io {
        what: "the loader thread".into(),
        error: std::io::Error::other("it ended without a result"),
    }
}

impl Run {
    /// Rank 0 or a single process: the OpenAI-compatible API.
    async fn api(
        self,
        listener: TcpListener,
        tokenizer: Tokenizer,
        config: ModelConfig,
        signals: &mut Signals,
    ) -> Result<()> {
        self.metrics.model_load_progress.set(0.0);
        let state = Arc::new(ServerState::new(
            Arc::new(tokenizer),
            self.metrics.clone(),
            served_model_name(&self.opts),
            self.max_model_len,
            config.eos_token_ids.clone(),
        ));
        let local = listener
            .local_addr()
            .map_err(Error::io("reading the listener's address"))?;
        tracing::info!(
            addr = %local,
            "HTTP listening; the API answers 503 until the model is loaded"
        );
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let grace = self.opts.shutdown_grace;
        // The server's own drain deadline is the same grace, so both ends of a stream close
        // at once.
        let limits = server::ServeLimits {
            drain_timeout: grace,
            ..self.opts.http_limits.clone()
        };
        let mut http: HttpTask =
            tokio::spawn(server::serve(listener, state.clone(), limits, async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            }));
        let group_timeout = self.opts.model.group_timeout;
        // The load-progress gauge follows the bytes read until the model is up.
        let progress = self.opts.model.load_progress.clone();
        let gauge = self.metrics.model_load_progress.clone();
        let load_state = state.clone();
        let mut loaded = on_thread("model-loader", move || {
            self.start_engine(&load_state, config.index_topk)
        })?;
        let mut engine: Option<EngineHandle> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let signal = loop {
            tokio::select! {
                signal = signals.next() => break signal,
                _ = tick.tick(), if engine.is_none() => gauge.set(progress.fraction().min(0.999)),
                r = &mut loaded, if engine.is_none() => match r.map_err(thread_died).and_then(|r| r) {
                    Ok(e) => engine = Some(e),
                    Err(e) => {
                        let _ = stop_tx.send(true);
                        return Err(e);
                    }
                },
                r = &mut http => return http_result_of(r),
            }
        };
        tracing::info!(
            signal,
            grace_seconds = grace.as_secs_f64(),
            "draining: no new connections; requests in flight may finish within the grace period"
        );
        let _ = stop_tx.send(true);
        let Some(engine) = engine else {
            // Still loading: nothing is in flight.
            return http_result(http).await;
        };
        let ended = tokio::select! {
            r = &mut http => Some(r),
            _ = tokio::time::sleep(grace) => {
                tracing::warn!(grace_seconds = grace.as_secs_f64(), "the grace period ran out; failing the requests still in flight");
                engine.shutdown(format!("the server is shutting down: the drain grace period of {} s ran out", grace.as_secs_f64()));
                None
            }
            signal = signals.next() => {
                tracing::warn!(signal, "a second signal; failing the requests still in flight");
                engine.shutdown("the server is shutting down");
                None
            }
        };
        let http_done = match ended {
            Some(r) => http_result_of(r),
            None => match tokio::time::timeout(FLUSH_AFTER_GRACE, &mut http).await {
                Ok(r) => http_result_of(r),
                Err(_) => {
                    tracing::warn!("connections still open after the drain; closing them");
                    http.abort();
                    Ok(())
                }
            },
        };
        // The engine loop drops its executor, which closes the group (workers exit cleanly).
        engine.shutdown("the server is shutting down");
        let bound = group_timeout + FLUSH_AFTER_GRACE;
        if tokio::time::timeout(bound, engine.stopped()).await.is_err() {
            tracing::warn!("the engine did not stop in time");
        }
        tracing::info!("drained; exiting");
        http_done
    }

    /// Builds the replica, checks its cache against `max_model_len`, and starts the engine
    /// loop: the API is ready from here on.
    fn start_engine(self, state: &ServerState, index_topk: usize) -> Result<EngineHandle> {
        let replica = build_replica(
            &self.opts.model,
            &self.setup,
            self.geometry,
            self.auto_blocks,
            None,
        )?;
        let Replica::Executor(ex) = replica else {
            return Err(Error::Options("a worker rank cannot serve the API".into()));
        };
        let geometry = ex.kv_geometry();
        let partitions = ex.kv_partitions().max(1);
        // One sequence lives in one partition (one rank's cache), so that bounds its length.
        let per_partition = KvGeometry {
            num_blocks: geometry.num_blocks / partitions,
            block_size: geometry.block_size,
        };
        if per_partition.num_slots() < self.max_model_len {
            return Err(Error::KvCacheTooSmall {
                kv_tokens: per_partition.num_slots(),
                num_blocks: per_partition.num_blocks,
                block_size: per_partition.block_size,
                max_model_len: self.max_model_len,
            });
        }
        self.metrics.model_load_progress.set(1.0);
        self.metrics
            .set_cache_config(geometry.block_size, geometry.num_blocks);
        let sched_cfg = SchedulerConfig {
            max_num_seqs: self.opts.max_num_seqs,
            max_num_batched_tokens: self.opts.max_num_batched_tokens,
            max_model_len: self.max_model_len,
            max_waiting: self.opts.max_waiting,
        };
        let sched = Scheduler::new(
            sched_cfg,
            PrefixCachingPool::partitioned(geometry, partitions, self.opts.prefix_caching),
        );
        let device = ex.device_name();
        let engine = runtime::spawn(ex, sched, self.metrics.clone(), index_topk);
        state.attach_engine(engine.clone());
        tracing::info!(
            device = %device,
            model = %state.model_name,
            max_model_len = self.max_model_len,
            "ready: serving the OpenAI-compatible API"
        );
        Ok(engine)
    }

    /// A worker rank: probes and metrics over HTTP, its share of the model for rank 0.
    async fn worker(self, listener: TcpListener, signals: &mut Signals) -> Result<()> {
        let joined = Arc::new(AtomicBool::new(false));
        let local = listener
            .local_addr()
            .map_err(Error::io("reading the listener's address"))?;
        tracing::info!(
            addr = %local,
            "HTTP listening for probes and metrics; a worker rank serves no API (rank 0 does)"
        );
        let (stop_tx, stop_rx) = watch::channel(false);
        let http = spawn_http(
            listener,
            server::worker_router(self.metrics.clone(), joined.clone()),
            stop_rx,
        );
        let grace = self.opts.shutdown_grace;
        let in_group = joined.clone();
        let mut group = on_thread("worker-rank", move || {
            build_replica(
                &self.opts.model,
                &self.setup,
                self.geometry,
                self.auto_blocks,
                Some(joined),
            )
            .map(drop)
        })?;
        let ended = tokio::select! {
            r = &mut group => Some(r),
            signal = signals.next() => if !in_group.load(Ordering::Acquire) {
                // Not in a group, so nothing to finish: waiting out the grace would only hold
                // up the pod's replacement (a StatefulSet waits for the old pod to go).
                tracing::info!(signal, "this worker rank has not joined a group");
                None
            } else {
                tracing::info!(
                    signal,
                    grace_seconds = grace.as_secs_f64(),
                    "this worker rank keeps computing for its group until rank 0 closes it, within the grace period"
                );
                tokio::select! {
                    r = &mut group => Some(r),
                    _ = tokio::time::sleep(grace) => None,
                    _ = signals.next() => None,
                }
            }
        };
        let _ = stop_tx.send(true);
        match ended {
            Some(r) => {
                r.map_err(thread_died)??;
                tracing::info!("rank 0 closed the group; exiting");
                http_result(http).await
            }
            None => {
                tracing::info!("exiting before rank 0 closed the group");
                Ok(())
            }
        }
    }
}

fn http_result_of(
    r: std::result::Result<std::io::Result<()>, tokio::task::JoinError>,
) -> Result<()> {
    r.map_err(|e| Error::Io {
        what: "the HTTP server task failed".into(),
        error: std::io::Error::other(e.to_string()),
    })?
    .map_err(Error::io("serving HTTP"))
}

/// SIGINT and SIGTERM, installed before the listener opens so that neither kills the process
/// with requests in flight.
struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Signals {
                interrupt: signal(SignalKind::interrupt())
                    .map_err(Error::io("installing the SIGINT handler"))?,
                terminate: signal(SignalKind::terminate())
                    .map_err(Error::io("installing the SIGTERM handler"))?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// The next signal's name.
    async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => "SIGINT",
                _ = self.terminate.recv() => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "interrupt"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(num_blocks: usize, block_size: usize) -> KvGeometry {
        KvGeometry {
            num_blocks,
            block_size,
        }
    }

    #[test]
    fn a_defaulted_max_model_len_is_clamped_to_what_the_cache_holds() {
        let fit = fit_max_model_len(None, 131072, cache(4, 64)).unwrap();
        assert_eq!(fit.value, 256);
        let w = fit.warning.unwrap();
        assert!(w.contains("256 tokens") && w.contains("131072"), "{w}");
        assert_eq!(
            fit_max_model_len(None, 4096, cache(64, 64)).unwrap(),
            MaxModelLen {
                value: 4096,
                warning: None
            }
        );
    }

    #[test]
    fn an_explicit_max_model_len_the_cache_cannot_hold_is_refused() {
        let e = fit_max_model_len(Some(1000), 131072, cache(4, 64))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("256 tokens") && e.contains("max_model_len 1000"),
            "{e}"
        );
        assert_eq!(
            fit_max_model_len(Some(256), 131072, cache(4, 64))
                .unwrap()
                .value,
            256
        );
        assert!(fit_max_model_len(Some(0), 131072, cache(4, 64)).is_err());
    }

    #[test]
    fn a_max_model_len_beyond_the_models_positions_is_lowered_with_a_warning() {
        let fit = fit_max_model_len(Some(10_000), 4096, cache(100, 64)).unwrap();
        assert_eq!(fit.value, 4096);
        assert!(fit.warning.unwrap().contains("4096 positions"));
    }
}
