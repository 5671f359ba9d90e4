//! Rank-local streaming load: the weights a rank holds (its routed experts and everything
//! replicated) go from the checkpoint to the device part by part, and nothing of the model is
//! whole in host memory.
//!
//! [`DevModel::load`] reads the checkpoint through [`Model::stream_layers`], which hands over
//! one routed expert or the rest of one layer at a time; each part is uploaded and dropped
//! before the next is read, and the checkpoint drops the map's pages of every tensor it
//! copied. The largest tensors (the embedding and lm_head, 1.85 GB each in DeepSeek-V3.2) are
//! read from their files straight into pinned buffers, chunk by chunk. Every upload goes
//! through [`Uploader`]: two pinned staging buffers of [`STAGING_CHUNK`] bytes, one filled by
//! the host while the device copies the other. Host memory for a load is then bounded by the
//! largest layer part plus the staging, whatever the checkpoint's size.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Instant;

use cudarc::driver::{CudaEvent, CudaSlice, DeviceRepr, PinnedHostSlice};
use safetensors::Dtype;

use super::CudaError;
use super::device::Device;
use super::weights::{
    DType, DevAttention, DevBuf, DevFeedForward, DevLayer, DevLinear, DevMlp, DevModel, DevMoe,
};
use crate::dist::ExpertShard;
use crate::model::weights::{Checkpoint, RawTensor, TensorSource};
use crate::model::{
    DecoderLayer, FeedForward, LoadOptions, Mlp, Model, ModelConfig, ModelError, PartSink,
};

/// Bytes of each of the two pinned staging buffers.
pub const STAGING_CHUNK: usize = 64 << 20;

/// Host-to-device copies, direct or through pinned staging buffers.
pub struct Uploader<'a> {
    dev: &'a Device,
    staging: Option<Staging>,
    files: HashMap<PathBuf, File>,
    /// Bytes copied to the device so far.
    pub bytes: u64,
}

struct Staging {
    bufs: [PinnedHostSlice<u8>; 2],
    /// Recorded after the copy out of the buffer of the same index; the host waits on it
    /// before refilling that buffer.
    done: [Option<CudaEvent>; 2],
    next: usize,
}

impl<'a> Uploader<'a> {
    /// Copies straight from host memory (small models, tests).
    pub fn direct(dev: &'a Device) -> Self {
        Uploader {
            dev,
            staging: None,
            files: HashMap::new(),
            bytes: 0,
        }
    }

    /// Copies through two pinned buffers of `chunk` bytes each.
    pub fn staged(dev: &'a Device, chunk: usize) -> Result<Self, CudaError> {
        dev.ctx.bind_to_thread()?;
        let chunk = chunk.max(4096);
        // SAFETY: the buffers are written before any byte of them is copied.
        let bufs = unsafe {
            [
                dev.ctx.alloc_pinned::<u8>(chunk)?,
                dev.ctx.alloc_pinned::<u8>(chunk)?,
            ]
        };
        Ok(Uploader {
            dev,
            staging: Some(Staging {
                bufs,
                done: [None, None],
                next: 0,
            }),
            files: HashMap::new(),
            bytes: 0,
        })
    }

    pub fn device(&self) -> &Device {
        self.dev
    }

    /// A new device buffer holding `host`.
    pub fn upload<T: DeviceRepr>(&mut self, host: &[T]) -> Result<CudaSlice<T>, CudaError> {
        if self.staging.is_none() {
            self.bytes += std::mem::size_of_val(host) as u64;
            return self.dev.upload(host);
        }
        let dst = self.dev.alloc::<T>(host.len())?;
        // SAFETY: `T` is a plain device type (f32, u16, u8, i32): its bytes are its value.
        let bytes = unsafe {
            std::slice::from_raw_parts(host.as_ptr().cast::<u8>(), std::mem::size_of_val(host))
        };
        let base = self.dev.ptr(&dst, 0);
        self.copy(base, bytes.len(), |at, buf| {
            buf.copy_from_slice(&bytes[at..at + buf.len()]);
            Ok(())
        })?;
        Ok(dst)
    }

    /// A new device buffer holding the bytes of `t`, read from its file (no copy in host
    /// memory beyond the staging buffers). `T` must match the tensor's element size.
    pub fn upload_file<T: DeviceRepr>(&mut self, t: &RawTensor) -> Result<CudaSlice<T>, CudaError> {
        let size = std::mem::size_of::<T>();
        if !t.len.is_multiple_of(size) {
            return Err(CudaError::Unsupported(format!(
                "tensor {} holds {} bytes, not a whole number of {size}-byte elements",
                t.name, t.len
            )));
        }
        let file = match self.files.get(&t.path) {
            Some(f) => f,
            None => {
                let f = File::open(&t.path).map_err(|e| {
                    CudaError::Unsupported(format!("opening {}: {e}", t.path.display()))
                })?;
                self.files.entry(t.path.clone()).or_insert(f)
            }
        };
        let file = file
            .try_clone()
            .map_err(|e| CudaError::Unsupported(format!("opening {}: {e}", t.path.display())))?;
        let read = |at: usize, buf: &mut [u8]| {
            file.read_exact_at(buf, t.offset + at as u64).map_err(|e| {
                CudaError::Unsupported(format!(
                    "reading tensor {} from {}: {e}",
                    t.name,
                    t.path.display()
                ))
            })
        };
        if self.staging.is_none() {
            let mut host = vec![0u8; t.len];
            read(0, &mut host)?;
            self.bytes += t.len as u64;
            let dst = self.dev.alloc::<T>(t.len / size)?;
            let d = self.dev.ptr(&dst, 0);
            // SAFETY: `dst` holds exactly `t.len` bytes.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(d, &host, self.dev.stream.cu_stream())?;
            }
            self.dev.stream.synchronize()?;
            return Ok(dst);
        }
        let dst = self.dev.alloc::<T>(t.len / size)?;
        let base = self.dev.ptr(&dst, 0);
        self.copy(base, t.len, read)?;
        Ok(dst)
    }

    /// Copies `len` bytes to device address `dst`, chunk by chunk: `fill(offset, buf)` writes
    /// the chunk starting at `offset` into a pinned buffer, whose copy to the device then runs
    /// while the next chunk is filled into the other buffer.
    fn copy(
        &mut self,
        dst: u64,
        len: usize,
        mut fill: impl FnMut(usize, &mut [u8]) -> Result<(), CudaError>,
    ) -> Result<(), CudaError> {
        let dev = self.dev;
        let Some(st) = self.staging.as_mut() else {
            return Err(CudaError::Unsupported("no staging buffers".into()));
        };
        let mut at = 0;
        while at < len {
            let i = st.next;
            st.next = 1 - i;
            if let Some(done) = st.done[i].take() {
                done.synchronize()?;
            }
            let n = (len - at).min(st.bufs[i].len());
            let buf = &mut st.bufs[i].as_mut_slice()?[..n];
            fill(at, buf)?;
            // SAFETY: `buf` stays untouched until `done[i]` has passed, and `dst + at .. + n`
            // lies inside the destination allocation.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    dst + at as u64,
                    &*buf,
                    dev.stream.cu_stream(),
                )?;
            }
            st.done[i] = Some(dev.stream.record_event(None)?);
            at += n;
        }
        self.bytes += len as u64;
        Ok(())
    }

    /// Waits for every copy to land.
    pub fn finish(&mut self) -> Result<(), CudaError> {
        self.dev.stream.synchronize()?;
        if let Some(st) = self.staging.as_mut() {
            st.done = [None, None];
        }
        Ok(())
    }
}

/// Uploads the parts [`Model::stream_layers`] hands over, dropping each on the host.
struct DeviceParts<'u, 'd> {
    up: &'u mut Uploader<'d>,
    dtype: DType,
    pow2: bool,
    n_experts: usize,
    pending: Vec<Option<DevMlp>>,
    layers: Vec<DevLayer>,
}

impl PartSink for DeviceParts<'_, '_> {
    type Error = CudaError;

    fn expert(&mut self, _layer: usize, expert: usize, mlp: Mlp) -> Result<(), CudaError> {
        if self.pending.is_empty() {
            self.pending.resize_with(self.n_experts, || None);
        }
        let slot = self.pending.get_mut(expert).ok_or_else(|| {
            CudaError::Unsupported(format!("expert {expert} of {}", self.n_experts))
        })?;
        *slot = Some(DevMlp::upload(self.up, &mlp, self.dtype, self.pow2)?);
        Ok(())
    }

    fn layer(&mut self, _index: usize, layer: DecoderLayer) -> Result<(), CudaError> {
        let up = &mut *self.up;
        let (dtype, pow2) = (self.dtype, self.pow2);
        let mlp = match &layer.mlp {
            FeedForward::Dense(m) => DevFeedForward::Dense(DevMlp::upload(up, m, dtype, pow2)?),
            FeedForward::Moe(moe) => {
                let mut experts = std::mem::take(&mut self.pending);
                experts.resize_with(self.n_experts, || None);
                DevFeedForward::Moe(DevMoe {
                    gate: DevLinear::upload(up, &moe.gate, dtype, false, pow2)?,
                    e_score_correction_bias: up.upload(&moe.e_score_correction_bias)?,
                    experts,
                    shared_experts: moe
                        .shared_experts
                        .as_ref()
                        .map(|m| DevMlp::upload(up, m, dtype, pow2))
                        .transpose()?,
                    tables: None,
                })
            }
        };
        self.layers.push(DevLayer {
            input_layernorm: up.upload(&layer.input_layernorm)?,
            self_attn: DevAttention::upload(up, &layer.self_attn, dtype, pow2)?,
            post_attention_layernorm: up.upload(&layer.post_attention_layernorm)?,
            mlp,
        });
        Ok(())
    }
}

/// Whether a rank holding `shard` reads tensor `name`: not the routed experts of other ranks,
/// nor the multi-token-prediction layer, nor stored rotary tables.
pub fn rank_reads(cfg: &ModelConfig, shard: ExpertShard, name: &str) -> bool {
    if name.ends_with("rotary_emb.inv_freq") {
        return false;
    }
    let Some(rest) = name.strip_prefix("model.layers.") else {
        return true;
    };
    let mut parts = rest.split('.');
    let layer: Option<usize> = parts.next().and_then(|l| l.parse().ok());
    if layer.is_some_and(|l| l >= cfg.num_hidden_layers) {
        return false;
    }
    let rest: Vec<&str> = parts.collect();
    match rest.as_slice() {
        ["mlp", "experts", e, ..] => e
            .parse::<usize>()
            .map_or(true, |e| shard.owns(e, cfg.n_routed_experts)),
        _ => true,
    }
}

/// A `[rows, cols]` matrix stored in `dense` (bf16 or f32) on the device: read from its file
/// when it is stored as bf16 and kept as bf16 (no host copy), else through f32 on the host.
fn dense_matrix(
    up: &mut Uploader,
    ckpt: &Checkpoint,
    name: &str,
    rows: usize,
    cols: usize,
    dense: DType,
) -> Result<DevBuf, CudaError> {
    if let Some(raw) = ckpt.raw_tensor(name, &[rows, cols])?
        && raw.dtype == Dtype::BF16
        && dense == DType::Bf16
    {
        let buf = up.upload_file::<u16>(&raw)?;
        ckpt.consumed_raw(&raw);
        return Ok(DevBuf::Bf16(buf));
    }
    let host = ckpt.f32_tensor(name, &[rows, cols])?;
    DevBuf::upload(up, &host, dense)
}

impl DevModel {
    /// Streams the weights `shard` holds from `ckpt` to the device through `up` (see the
    /// module's comment), as `dtype`, and logs the read rate.
    pub fn load(
        up: &mut Uploader,
        ckpt: &Checkpoint,
        cfg: &ModelConfig,
        dtype: DType,
        shard: ExpertShard,
    ) -> Result<Self, CudaError> {
        let started = Instant::now();
        let pow2 = cfg
            .quantization
            .as_ref()
            .map(|q| q.pow2_scales)
            .unwrap_or(true);
        let options = LoadOptions {
            fp8_codes_only: dtype == DType::Fp8,
        };
        let mut parts = DeviceParts {
            up: &mut *up,
            dtype,
            pow2,
            n_experts: cfg.n_routed_experts,
            pending: Vec::new(),
            layers: Vec::with_capacity(cfg.num_hidden_layers),
        };
        Model::stream_layers(cfg, ckpt, shard, options, &mut parts)?;
        let layers = parts.layers;
        let h = cfg.hidden_size;
        let dense = dtype.dense();
        let embed_tokens = dense_matrix(
            up,
            ckpt,
            "model.embed_tokens.weight",
            cfg.vocab_size,
            h,
            dense,
        )?;
        let lm_name = if cfg.tie_word_embeddings && !ckpt.contains("lm_head.weight") {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let lm_head = DevLinear {
            w: dense_matrix(up, ckpt, lm_name, cfg.vocab_size, h, dense)?,
            out_dim: cfg.vocab_size,
            in_dim: h,
            scale_inv: None,
            pow2_act: false,
        };
        let norm = up.upload(&ckpt.f32_tensor("model.norm.weight", &[h])?)?;
        let rope = crate::model::rope::RopeTable::new(cfg);
        let rope_inv_freq = up.upload(&rope.inv_freq)?;
        up.finish()?;
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        tracing::info!(
            rank = shard.rank,
            world = shard.world,
            device_bytes = up.bytes,
            secs = format!("{secs:.1}"),
            rate_gb_s = format!("{:.2}", up.bytes as f64 / secs / 1e9),
            peak_host_rss_mib = peak_rss_bytes().map(|b| b >> 20),
            "weights streamed to the device"
        );
        Ok(DevModel {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope_inv_freq,
        })
    }
}

/// This process's peak resident memory (`VmHWM`), where the system reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl From<ModelError> for CudaError {
    fn from(e: ModelError) -> Self {
        CudaError::Model(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::builtin::builtin_config;

    #[test]
    fn a_rank_reads_its_own_experts_and_everything_replicated() {
        let mut cfg = builtin_config();
        cfg.num_hidden_layers = 2;
        cfg.n_routed_experts = 8;
        let shard = ExpertShard::new(1, 4, 8).unwrap();
        let reads = |n: &str| rank_reads(&cfg, shard, n);
        assert!(reads("model.embed_tokens.weight"));
        assert!(reads("lm_head.weight"));
        assert!(reads("model.layers.1.self_attn.q_a_proj.weight"));
        assert!(reads("model.layers.1.mlp.shared_experts.up_proj.weight"));
        assert!(reads("model.layers.1.mlp.experts.2.up_proj.weight"));
        assert!(reads(
            "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"
        ));
        assert!(!reads("model.layers.1.mlp.experts.4.up_proj.weight"));
        assert!(!reads("model.layers.0.mlp.experts.0.gate_proj.weight"));
        // The multi-token-prediction layer sits past the last decoder layer.
        assert!(!reads("model.layers.2.self_attn.q_a_proj.weight"));
        assert!(!reads("model.layers.0.self_attn.rotary_emb.inv_freq"));
    }
}
