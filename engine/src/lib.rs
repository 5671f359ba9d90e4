//! deepseek-engine: an inference runtime for the DeepSeek-V3.2 architecture.
//!
//! Layout: `model` (config, checkpoint loading, the layer graph and its forward pass),
//! `backend` (the f32 CPU reference kernels and cache storage), `kv` (paged block bookkeeping),
//! `generate` (sampling and the token loop), `chat` (DeepSeek-V3.2 prompt encoding and
//! completion parsing), `tokenizer` (HF tokenizer.json, special tokens, streaming decode),
//! `launch` (the command's wiring: model loading, executors, groups, serving).

pub mod backend;
pub mod chat;
pub mod dist;
pub mod download;
pub mod generate;
pub mod kv;
pub mod launch;
pub mod metrics;
pub mod model;
pub mod runtime;
pub mod sched;
pub mod server;
pub mod tokenizer;
