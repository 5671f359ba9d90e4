//! Sparse MLA and the absorbed per-head products around it (`kernels/attention.cu`).

use super::*;

/// The absorbed products run as one batched cuBLAS GEMM over the heads under
/// [`crate::backend::cuda::Gemm::Cublas`] with dense weights: bf16 weights take the `len` activations at `x`
/// rounded to bf16 (the returned buffer, kept alive until the GEMM is queued), f32 weights
/// multiply in f32. `None`: the CUDA-core kernels run instead.
fn absorb_operand(
    dev: &Device,
    wkvb: &DevLinear,
    x: u64,
    len: usize,
) -> Result<Option<AbsorbInput>, CudaError> {
    if dev.gemm() != crate::backend::cuda::Gemm::Cublas {
        return Ok(None);
    }
    match wkvb.w.dtype() {
        DType::F32 => Ok(Some(AbsorbInput {
            ty: CuType::F32,
            ptr: x,
            _rounded: None,
        })),
        DType::Bf16 => {
            let buf = dev.alloc::<u16>(len)?;
            let ptr = dev.ptr(&buf, 0);
            cast_to_bf16(dev, ptr, x, len)?;
            Ok(Some(AbsorbInput {
                ty: CuType::Bf16,
                ptr,
                _rounded: Some(buf),
            }))
        }
        DType::Fp8 => Ok(None),
    }
}

/// The activations of an absorbed product as the batched GEMM reads them.
struct AbsorbInput {
    ty: CuType,
    ptr: u64,
    /// Owns the bf16 copy `ptr` points into, if one was made.
    _rounded: Option<cudarc::driver::CudaSlice<u16>>,
}

/// Shapes of the absorbed attention.
#[derive(Debug, Clone, Copy)]
pub struct MlaDims {
    pub heads: usize,
    pub nope: usize,
    pub rd: usize,
    pub vd: usize,
    pub kvr: usize,
}

impl MlaDims {
    pub fn qk(&self) -> usize {
        self.nope + self.rd
    }
}

pub fn absorb_q(
    dev: &Device,
    q_lat: u64,
    q: u64,
    wkvb: &DevLinear,
    n: usize,
    d: MlaDims,
) -> Result<(), CudaError> {
    if let Some(input) = absorb_operand(dev, wkvb, q, n * d.heads * d.qk())? {
        let (ty, qb) = (input.ty, input.ptr);
        // Per head h, column-major: q_lat_h[kvr, n] = W_UK_h[kvr, nope] · q_nope_h[nope, n].
        let w = wkvb.w.ptr(dev);
        return gemm_batched(
            dev,
            false,
            d.kvr,
            n,
            d.nope,
            Strided {
                ptr: w,
                ty,
                ld: d.kvr,
                stride: (d.nope + d.vd) * d.kvr,
            },
            Strided {
                ptr: qb,
                ty,
                ld: d.heads * d.qk(),
                stride: d.qk(),
            },
            Strided {
                ptr: q_lat,
                ty: CuType::F32,
                ld: d.heads * d.kvr,
                stride: d.kvr,
            },
            d.heads,
        );
    }
    let name = format!("absorb_q_{}", wkvb.w.dtype().suffix());
    launch(
        dev,
        Family::Attention,
        &name,
        (n as u32, d.heads as u32, 1),
        128,
        0,
        &[
            Arg::P(q_lat),
            Arg::P(q),
            Arg::P(wkvb.w.ptr(dev)),
            i(d.heads),
            i(d.nope),
            i(d.vd),
            i(d.qk()),
            i(d.kvr),
        ],
    )
}

pub fn absorb_v(
    dev: &Device,
    out: u64,
    o_lat: u64,
    wkvb: &DevLinear,
    n: usize,
    d: MlaDims,
) -> Result<(), CudaError> {
    if let Some(input) = absorb_operand(dev, wkvb, o_lat, n * d.heads * d.kvr)? {
        let (ty, ob) = (input.ty, input.ptr);
        // Per head h, column-major: out_h[vd, n] = W_UV_hᵀ · o_lat_h[kvr, n], W_UV_h stored
        // as vd rows of kvr after the head's nope rows of W_UK.
        let w = wkvb.w.ptr(dev) + (d.nope * d.kvr * ty_bytes(ty)) as u64;
        return gemm_batched(
            dev,
            true,
            d.vd,
            n,
            d.kvr,
            Strided {
                ptr: w,
                ty,
                ld: d.kvr,
                stride: (d.nope + d.vd) * d.kvr,
            },
            Strided {
                ptr: ob,
                ty,
                ld: d.heads * d.kvr,
                stride: d.kvr,
            },
            Strided {
                ptr: out,
                ty: CuType::F32,
                ld: d.heads * d.vd,
                stride: d.vd,
            },
            d.heads,
        );
    }
    let name = format!("absorb_v_{}", wkvb.w.dtype().suffix());
    launch(
        dev,
        Family::Attention,
        &name,
        (n as u32, d.heads as u32, 1),
        128,
        0,
        &[
            Arg::P(out),
            Arg::P(o_lat),
            Arg::P(wkvb.w.ptr(dev)),
            i(d.heads),
            i(d.nope),
            i(d.vd),
            i(d.kvr),
        ],
    )
}

/// Heads one block of the tensor-core attention kernel takes (`MLA_MMA_HEADS`).
const MLA_MMA_HEADS: usize = 32;

/// Selected rows per tile of the tensor-core attention kernel (`MLA_MMA_KEYS`).
const MLA_MMA_KEYS: usize = 64;

/// The most splits of the selected rows the tensor-core attention takes when pinned.
pub const SPARSE_MLA_MAX_SPLITS: usize = 64;

/// Splits of each token's selected rows in the tensor-core attention for `n` tokens of `heads`
/// heads over up to `k` selected rows, unless the device pins them (the benchmark's sweep, the
/// tests). A block takes 32 (`mma.sync`) or 64 (warpgroup) heads of one token, and one block
/// fills an SM's shared memory, so a few tokens leave most SMs idle: at batch 1 with 128 heads,
/// 2-4 of 132. Splitting the rows gives the idle SMs work; the splits' outputs are then combined
/// by one more launch. Each block stages its 32-64 queries from f32 before its first tile, which
/// costs about as much as two tiles, so the splits stop short of one tile each. The targets
/// below are the H200 sweep's best (docs/PERF.md), µs at 1 and 8 tokens:
/// - `mma.sync`: one wave of blocks, at least two tiles a split (1 token: 165 unsplit, 57 at
///   16 splits; 8 tokens: 168 unsplit, 74 at 4 splits, 131 at 8, a second wave);
/// - warpgroup: half a wave, at least four tiles a split (1 token: 121 unsplit, 39 at 8
///   splits; 8 tokens: 119 unsplit, 49 at 4 splits, 70 at 8).
pub fn sparse_mla_splits(
    dev: &Device,
    kernel: &SparseMlaKernel,
    n: usize,
    heads: usize,
    k: usize,
) -> usize {
    if let Some(s) = dev.sparse_mla_splits() {
        return s.clamp(1, SPARSE_MLA_MAX_SPLITS);
    }
    let blocks = n
        .saturating_mul(heads.div_ceil(kernel.heads_per_block()))
        .max(1);
    let (wave, min_tiles) = match kernel {
        SparseMlaKernel::Mma(_) => (dev.sm_count(), 2),
        SparseMlaKernel::Warpgroup => (dev.sm_count() / 2, 4),
    };
    let most = (k.div_ceil(MLA_MMA_KEYS) / min_tiles).max(1);
    (wave / blocks).clamp(1, most)
}

/// The tensor-core attention kernel's name for this cache and shape, or `None` where it does
/// not apply (f32 cache, kv_lora_rank other than 128 or 512, a row width not a multiple of 16).
pub fn sparse_mla_mma_kernel(cache: DType, kvr: usize, rd: usize) -> Option<String> {
    (cache != DType::F32 && matches!(kvr, 128 | 512) && (kvr + rd).is_multiple_of(16))
        .then(|| format!("sparse_mla_mma_{}_{kvr}", cache.suffix()))
}

/// Heads one block of the warpgroup attention kernel takes (`MLA_WG_HEADS`).
const MLA_WG_HEADS: usize = 64;

/// Dynamic shared memory of the warpgroup attention kernel: the queries and two tiles of 64
/// rows (each nine 128-byte-swizzled blocks of 64 columns), the probabilities, the row maxima
/// and sums of both warpgroups, and room to align the tiles to 1,024 bytes.
const SPARSE_MLA_WGMMA_SMEM: usize = 3 * 9 * 8192 + 8192 + 1024 + 1024;

/// Whether the warpgroup attention kernel takes this device, cache and shape: Hopper's
/// `sm_90a`, a bf16 cache and the released kv_lora_rank 512 with rope 64.
pub fn sparse_mla_wgmma_applies(dev: &Device, cache: DType, kvr: usize, rd: usize) -> bool {
    dev.arch == "sm_90a" && cache == DType::Bf16 && kvr == 512 && rd == 64
}

/// A tensor-core sparse-attention kernel: both take the same arguments and split the selected
/// rows the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SparseMlaKernel {
    /// `sparse_mla_wgmma_bf16_512`.
    Warpgroup,
    /// `sparse_mla_mma_*`, by name.
    Mma(String),
}

impl SparseMlaKernel {
    fn heads_per_block(&self) -> usize {
        match self {
            SparseMlaKernel::Warpgroup => MLA_WG_HEADS,
            SparseMlaKernel::Mma(_) => MLA_MMA_HEADS,
        }
    }

    fn name(&self) -> &str {
        match self {
            SparseMlaKernel::Warpgroup => "sparse_mla_wgmma_bf16_512",
            SparseMlaKernel::Mma(name) => name,
        }
    }
}

/// The tensor-core kernel the device's [`crate::backend::cuda::Attention`] setting picks for this
/// cache and shape, or `None` for the CUDA-core kernels.
pub fn sparse_mla_tensor_kernel(
    dev: &Device,
    cache: DType,
    kvr: usize,
    rd: usize,
) -> Option<SparseMlaKernel> {
    use crate::backend::cuda::device::Attention;
    let mma = || sparse_mla_mma_kernel(cache, kvr, rd).map(SparseMlaKernel::Mma);
    match dev.attention() {
        Attention::Auto | Attention::Warpgroup => {
            if sparse_mla_wgmma_applies(dev, cache, kvr, rd) {
                Some(SparseMlaKernel::Warpgroup)
            } else {
                mma()
            }
        }
        Attention::TensorCores => mma(),
        Attention::PerHead | Attention::SharedHeads | Attention::CudaCores => None,
    }
}

/// Dynamic shared memory of the tensor-core attention kernel: the block's queries, the tile
/// buffers (two bf16 tiles; or one bf16 tile and two raw FP8 tiles) and the score tile.
fn sparse_mla_mma_smem(cache: DType, kvr: usize, rd: usize) -> usize {
    let rs = mma_row_stride(kvr + rd);
    let tiles = match cache {
        DType::Fp8 => MLA_MMA_KEYS * rs + 2 * MLA_MMA_KEYS * latent_fp8_stride(kvr, rd),
        _ => 2 * MLA_MMA_KEYS * rs,
    };
    MLA_MMA_HEADS * rs + tiles + MLA_MMA_HEADS * (MLA_MMA_KEYS + 8) * 4
}

/// Softmax attention of each (token, head) over its selected latent rows (positions of its
/// sequence, found through the block tables as in [`indexer_scores`]).
#[allow(clippy::too_many_arguments)]
pub fn sparse_mla(
    dev: &Device,
    o_lat: u64,
    q_lat: u64,
    q: u64,
    lcache: &DevBuf,
    sel: u64,
    sel_count: u64,
    tables: u64,
    table_base: u64,
    block_size: usize,
    n: usize,
    d: MlaDims,
    k: usize,
    scale: f32,
) -> Result<(), CudaError> {
    use crate::backend::cuda::device::Attention;
    let fp8_stride = (lcache.dtype() == DType::Fp8).then(|| i(latent_fp8_stride(d.kvr, d.rd)));
    let tensor = sparse_mla_tensor_kernel(dev, lcache.dtype(), d.kvr, d.rd);
    // Every sparse-attention kernel takes the same arguments.
    let mut args = vec![
        Arg::P(o_lat),
        Arg::P(q_lat),
        Arg::P(q),
        Arg::P(lcache.ptr(dev)),
        Arg::P(sel),
        Arg::P(sel_count),
        Arg::P(tables),
        Arg::P(table_base),
        i(block_size),
        i(d.heads),
        i(d.kvr),
        i(d.rd),
        i(d.qk()),
        i(d.nope),
        i(k),
        Arg::F(scale),
    ];
    args.extend(fp8_stride);
    if let Some(kernel) = tensor {
        let splits = sparse_mla_splits(dev, &kernel, n, d.heads, k);
        let parts = if splits > 1 {
            let rows = splits * n * d.heads;
            Some((dev.alloc::<f32>(rows * d.kvr)?, dev.alloc::<f32>(rows * 2)?))
        } else {
            None
        };
        let (part_o, part_ml) = match &parts {
            Some((o, ml)) => (dev.ptr(o, 0), dev.ptr(ml, 0)),
            None => (0, 0),
        };
        args.extend([Arg::P(part_o), Arg::P(part_ml)]);
        let smem = match kernel {
            SparseMlaKernel::Warpgroup => SPARSE_MLA_WGMMA_SMEM,
            SparseMlaKernel::Mma(_) => sparse_mla_mma_smem(lcache.dtype(), d.kvr, d.rd),
        };
        let blocks_per_token = d.heads.div_ceil(kernel.heads_per_block());
        launch(
            dev,
            Family::Attention,
            kernel.name(),
            (n as u32, blocks_per_token as u32, splits as u32),
            256,
            smem as u32,
            &args,
        )?;
        if parts.is_some() {
            launch(
                dev,
                Family::Attention,
                "sparse_mla_combine",
                (n as u32, d.heads as u32, 1),
                128,
                0,
                &[
                    Arg::P(o_lat),
                    Arg::P(part_o),
                    Arg::P(part_ml),
                    i(splits),
                    i(n),
                    i(d.heads),
                    i(d.kvr),
                ],
            )?;
        }
        return Ok(());
    }
    // Heads of a token share each key in one block when the output fits the registers
    // (kv_lora_rank ≤ 512) and the step has enough tokens to fill the GPU that way (about four
    // blocks per SM; measured on an H200: at decode batch 8 one block per head is faster, at
    // 64 and in prefill sharing is).
    const HEADS_PER_BLOCK: usize = 8;
    const KEYS_PER_TILE: usize = 8;
    let shared_min_blocks = 4 * dev.sm_count();
    let shared = d.kvr <= 512
        && match dev.attention() {
            Attention::PerHead => false,
            Attention::SharedHeads => true,
            Attention::Auto
            | Attention::TensorCores
            | Attention::Warpgroup
            | Attention::CudaCores => n * d.heads.div_ceil(HEADS_PER_BLOCK) >= shared_min_blocks,
        };
    let name = if shared {
        format!("sparse_mla_heads_{}", lcache.dtype().suffix())
    } else {
        format!("sparse_mla_{}", lcache.dtype().suffix())
    };
    let smem = if shared {
        (HEADS_PER_BLOCK + KEYS_PER_TILE) * (d.kvr + d.rd) * 4
    } else {
        (d.kvr + d.rd + 2 * k) * 4
    };
    if smem > 48 * 1024 {
        return Err(CudaError::Unsupported(format!(
            "sparse attention over {k} keys of width {} exceeds 48 KiB of shared memory",
            d.kvr + d.rd
        )));
    }
    let grid_y = if shared {
        d.heads.div_ceil(HEADS_PER_BLOCK)
    } else {
        d.heads
    };
    launch(
        dev,
        Family::Attention,
        &name,
        (n as u32, grid_y as u32, 1),
        256,
        smem as u32,
        &args,
    )
}

/// The latent attention output `[n, heads, kvr]` of the kernel the device's
/// [`crate::backend::cuda::Attention`] setting chooses: token t attends to the cache rows at positions
/// `sel[t, j]` of its sequence for `j < sel_count[t]`, with queries `q_lat [n, heads,
/// kvr]` and `q [n, heads, nope + rd]` (its rope part used). The output starts NaN, so rows a
/// kernel leaves unwritten show.
#[allow(clippy::too_many_arguments)]
pub fn sparse_mla_host(
    dev: &Device,
    lcache: &DevBuf,
    q_lat: &[f32],
    q: &[f32],
    sel: &[i32],
    sel_count: &[i32],
    rows: PagedRows,
    d: MlaDims,
    k: usize,
    scale: f32,
) -> Result<Vec<f32>, CudaError> {
    let n = sel_count.len();
    let out = dev.upload(&vec![f32::NAN; n * d.heads * d.kvr])?;
    let (dql, dq) = (dev.upload(q_lat)?, dev.upload(q)?);
    let (dsel, dcnt) = (dev.upload(sel)?, dev.upload(sel_count)?);
    let (ds, db) = (dev.upload(rows.tables)?, dev.upload(rows.table_base)?);
    sparse_mla(
        dev,
        dev.ptr(&out, 0),
        dev.ptr(&dql, 0),
        dev.ptr(&dq, 0),
        lcache,
        dev.ptr(&dsel, 0),
        dev.ptr(&dcnt, 0),
        dev.ptr(&ds, 0),
        dev.ptr(&db, 0),
        rows.block_size,
        n,
        d,
        k,
        scale,
    )?;
    dev.download(&out, n * d.heads * d.kvr)
}
