//! The engine's wiring, callable from tests as from the command line: from plain option structs
//! to a loaded model, an executor on the chosen device (the whole replica in this process, its
//! ranks as threads, or one rank of a multi-process group), and the HTTP server around it.
//! `main.rs` only parses the command line into these options.
//!
//! - [`device`]: which backend computes, and the GPU storage types.
//! - [`group`]: how this process takes part in its replica (the group variables).
//! - [`replica`]: model loading and executor construction.
//! - [`serve`]: the HTTP server, the engine loop and shutdown.
//! - [`logging`]: the log format, plain when not on a terminal.
//! - [`offline`]: the one-shot commands (score, generate, bench).

pub mod device;
pub mod group;
pub mod logging;
pub mod offline;
pub mod replica;
pub mod serve;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::backend::cuda::CudaError;
use crate::dist::{DEFAULT_PEER_TIMEOUT, DistError};
use crate::generate::GenerateError;
use crate::kv::KvError;
use crate::model::builtin::BUILTIN_MODEL;
use crate::model::weights::LoadProgress;
use crate::model::{ForwardError, ModelError};
use crate::tokenizer::TokenizerError;

pub use device::BackendFlag;

#[derive(Debug, Error)]
pub enum Error {
    /// Options that cannot work together, found before any weight is read.
    #[error("{0}")]
    Options(String),
    #[error("reading {path}: {error}")]
    ModelConfig { path: PathBuf, error: ModelError },
    #[error("loading {path}: {error}")]
    Load { path: PathBuf, error: ModelError },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error(transparent)]
    Dist(#[from] DistError),
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("the model directory has no usable tokenizer.json ({error}); pass --tokenizer")]
    ModelTokenizer { error: TokenizerError },
    /// A worker rank's group ended with an error (a lost or silent leader, a failed step).
    #[error("this worker rank leaves its group: {0}")]
    Group(ForwardError),
    #[error(
        "the KV cache holds {kv_tokens} tokens ({num_blocks} blocks of {block_size}), fewer than \
         max_model_len {max_model_len}: a request of that length could never run; lower \
         --max-model-len or give the cache more room (--num-kv-blocks, --kv-cache-memory-gb)"
    )]
    KvCacheTooSmall {
        kv_tokens: usize,
        num_blocks: usize,
        block_size: usize,
        max_model_len: usize,
    },
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
}

impl Error {
    /// Short stable label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Options(_) => "options",
            Error::ModelConfig { .. } => "model_config",
            Error::Load { .. } | Error::Model(_) => "model_load",
            Error::Cuda(e) => e.metric_label(),
            Error::Dist(_) | Error::Group(_) => "group",
            Error::Forward(_) => "forward",
            Error::Generate(_) => "generate",
            Error::Kv(_) | Error::KvCacheTooSmall { .. } => "kv_cache",
            Error::Tokenizer(_) | Error::ModelTokenizer { .. } => "tokenizer",
            Error::Io { .. } => "io",
        }
    }

    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |error| Error::Io { what, error }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the model is and where it computes: the options every command shares.
#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// Model directory (config.json + safetensors), or [`BUILTIN_MODEL`].
    pub model: String,
    pub backend: BackendFlag,
    /// Expert-parallel ranks of one replica; `None`: WORLD_SIZE × LOCAL_WORLD_SIZE when the
    /// group variables are set, else 1.
    pub expert_parallel: Option<usize>,
    /// How long the ranks of a multi-process group may take to join.
    pub group_join_timeout: Duration,
    /// How long a rank of a multi-process group may be silent before it is declared lost.
    pub group_timeout: Duration,
    /// How expert-parallel GPU ranks move the MoE rows (NCCL, host memory, or whichever every
    /// rank can use).
    pub moe_exchange: crate::dist::RowExchange,
    /// GPU ordinal for the CUDA backend.
    pub device: usize,
    /// `--weight-dtype`: fp8, bf16, f32 or auto.
    pub weight_dtype: String,
    /// `--kv-cache-dtype`: fp8, bf16, f32 or auto.
    pub kv_cache_dtype: String,
    /// Bytes of weights read so far, for the load-progress metric.
    pub load_progress: Arc<LoadProgress>,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            model: BUILTIN_MODEL.into(),
            backend: BackendFlag::Auto,
            expert_parallel: None,
            group_join_timeout: Duration::from_secs(600),
            group_timeout: DEFAULT_PEER_TIMEOUT,
            moe_exchange: crate::dist::RowExchange::Auto,
            device: 0,
            weight_dtype: "auto".into(),
            kv_cache_dtype: "auto".into(),
            load_progress: LoadProgress::new(),
        }
    }
}
