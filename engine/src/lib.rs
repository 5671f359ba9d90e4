//! deepseek-engine: an inference runtime for the DeepSeek-V3.2 architecture.
//!
//! Layout: `model` (config, weights, the layer graph), `backend` (the f32 CPU reference
//! kernels), `kv` (paged latent + indexer key cache), `generate` (sampling and the
//! token loop), `chat` (DeepSeek-V3.2 prompt encoding and completion parsing).

pub mod chat;
pub mod tokenizer;
