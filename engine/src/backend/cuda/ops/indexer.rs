//! The lightning indexer and its top-k (`kernels/indexer.cu`).

use super::*;

/// Heads the tensor-core indexer kernel takes (`kernels/indexer.cu::IDX_MMA_HEADS`).
pub const INDEXER_MMA_HEADS: usize = 64;

/// The runs of keys one block of the tensor-core indexer kernel may score.
pub const INDEXER_KEYS_PER_BLOCK: [usize; 4] = [512, 1024, 2048, 4096];

/// Keys per block of the tensor-core indexer for `n` tokens over `max_ctx` keys: the longest
/// run that still gives every SM 4 blocks (a block stages its token's queries once, so longer
/// runs spend less of its life on that), unless the device pins one (the benchmark's sweep).
/// Measured on an H200 (docs/PERF.md): at batch 64, 512 keys are best at 4K context and 4,096
/// from 32K on (1.2x over 512 at 64K); at batch 1, 512.
pub fn indexer_keys_per_block(dev: &Device, n: usize, max_ctx: usize) -> usize {
    if let Some(k) = dev.indexer_keys_per_block() {
        return k;
    }
    let want = 4 * dev.sm_count();
    INDEXER_KEYS_PER_BLOCK
        .iter()
        .rev()
        .copied()
        .find(|&k| n.saturating_mul(max_ctx.div_ceil(k)) >= want)
        .unwrap_or(INDEXER_KEYS_PER_BLOCK[0])
}

/// The tensor-core indexer kernel's name for this cache and shape, or `None` where it does not
/// apply (f32 cache, more than 64 heads, a head dimension other than 32, 64 or 128).
pub fn indexer_mma_kernel(cache: DType, heads: usize, dim: usize) -> Option<String> {
    (cache != DType::F32 && heads <= INDEXER_MMA_HEADS && matches!(dim, 32 | 64 | 128))
        .then(|| format!("indexer_scores_mma_{}_d{dim}", cache.suffix()))
}

/// Bytes of one 16-bit row of `width` elements in the tensor-core kernels' shared memory
/// (`kernels/common.cuh::mma_row_stride`).
pub(super) fn mma_row_stride(width: usize) -> usize {
    let mut b = (width * 2).next_multiple_of(16);
    while b % 128 != 32 && b % 128 != 96 {
        b += 16;
    }
    b
}

/// Lightning-indexer scores `[n, max_ctx]` of each token against its sequence's cached keys,
/// found through the block tables at `tables` (token t's from `table_base[t]`, `block_size`
/// slots a block).
#[allow(clippy::too_many_arguments)]
pub fn indexer_scores(
    dev: &Device,
    scores: u64,
    q: u64,
    w: u64,
    kcache: &DevBuf,
    tables: u64,
    table_base: u64,
    block_size: usize,
    ctx_len: u64,
    n: usize,
    heads: usize,
    dim: usize,
    max_ctx: usize,
) -> Result<(), CudaError> {
    let fp8_stride = (kcache.dtype() == DType::Fp8).then(|| i(index_fp8_stride(dim)));
    let mma = match dev.indexer() {
        crate::backend::cuda::device::Indexer::Auto => {
            indexer_mma_kernel(kcache.dtype(), heads, dim)
        }
        crate::backend::cuda::device::Indexer::CudaCores => None,
    };
    // Both kernels take these, then (the CUDA-core one) the head dimension, then the rest.
    let mut args = vec![
        Arg::P(scores),
        Arg::P(q),
        Arg::P(w),
        Arg::P(kcache.ptr(dev)),
        Arg::P(tables),
        Arg::P(table_base),
        i(block_size),
        Arg::P(ctx_len),
        i(heads),
    ];
    if let Some(name) = mma {
        let keys_per_block = indexer_keys_per_block(dev, n, max_ctx);
        args.push(i(max_ctx));
        args.push(i(keys_per_block));
        args.extend(fp8_stride);
        // The bf16 kernel stages 16-bit queries in dynamic shared memory; the FP8 one keeps
        // its E4M3 queries in a static array.
        let smem = match kcache.dtype() {
            DType::Fp8 => 0,
            _ => INDEXER_MMA_HEADS * mma_row_stride(dim),
        };
        return launch(
            dev,
            Family::Indexer,
            &name,
            (n as u32, blocks(max_ctx, keys_per_block), 1),
            256,
            smem as u32,
            &args,
        );
    }
    let name = format!("indexer_scores_{}", kcache.dtype().suffix());
    let smem = heads * dim * 4;
    if smem > 48 * 1024 {
        return Err(CudaError::Unsupported(format!(
            "indexer queries of {heads}×{dim} floats exceed 48 KiB of shared memory"
        )));
    }
    args.extend([i(dim), i(max_ctx)]);
    args.extend(fp8_stride);
    launch(
        dev,
        Family::Indexer,
        &name,
        (n as u32, blocks(max_ctx, 64), 1),
        256,
        smem as u32,
        &args,
    )
}

/// Threads of one `topk_select` block (`kernels/indexer.cu::TOPK_THREADS`).
const TOPK_THREADS: u32 = 512;

/// Scores one block of `topk_chunk_candidates` takes from a row (`TOPK_CHUNK`).
const TOPK_CHUNK: usize = 16_384;

/// Per token, the `min(k, ctx_len)` best positions, ascending, into `out[n, k]` and `count[n]`.
#[allow(clippy::too_many_arguments)]
pub fn topk_select(
    dev: &Device,
    out: u64,
    count: u64,
    scores: u64,
    ctx_len: u64,
    n: usize,
    max_ctx: usize,
    k: usize,
) -> Result<(), CudaError> {
    if max_ctx > 2 * TOPK_CHUNK && 4 * k <= TOPK_CHUNK {
        // Long rows: the chunks' candidates first, many blocks a row, then the row's pick.
        let chunks = max_ctx.div_ceil(TOPK_CHUNK);
        let stride = chunks * k;
        let vals = dev.alloc::<f32>(n * stride)?;
        let pos = dev.alloc::<i32>(n * stride)?;
        let (pv, pp) = (dev.ptr(&vals, 0), dev.ptr(&pos, 0));
        launch(
            dev,
            Family::Indexer,
            "topk_chunk_candidates",
            (n as u32, chunks as u32, 1),
            TOPK_THREADS,
            (TOPK_CHUNK * 4) as u32,
            &[
                Arg::P(pv),
                Arg::P(pp),
                Arg::P(scores),
                Arg::P(ctx_len),
                i(max_ctx),
                i(k),
                i(stride),
            ],
        )?;
        return launch(
            dev,
            Family::Indexer,
            "topk_from_candidates",
            (n as u32, 1, 1),
            TOPK_THREADS,
            0,
            &[
                Arg::P(out),
                Arg::P(count),
                Arg::P(pv),
                Arg::P(pp),
                Arg::P(ctx_len),
                i(stride),
                i(k),
            ],
        );
    }
    launch(
        dev,
        Family::Indexer,
        "topk_select",
        (n as u32, 1, 1),
        TOPK_THREADS,
        0,
        &[
            Arg::P(out),
            Arg::P(count),
            Arg::P(scores),
            Arg::P(ctx_len),
            i(max_ctx),
            i(k),
        ],
    )
}

/// Top-k of each row of `scores` (`rows × width`), the first `lens[r]` entries of row r.
pub fn top_k_host(
    dev: &Device,
    scores: &[f32],
    width: usize,
    lens: &[usize],
    k: usize,
) -> Result<Vec<Vec<u32>>, CudaError> {
    let n = lens.len();
    let ds = dev.upload(scores)?;
    let lens_i: Vec<i32> = lens.iter().map(|l| *l as i32).collect();
    let dl = dev.upload(&lens_i)?;
    // Poisoned: an unwritten position reads -1 (and an unwritten count fails the slice).
    let out = dev.upload(&vec![-1i32; n * k])?;
    let count = dev.upload(&vec![-1i32; n])?;
    topk_select(
        dev,
        dev.ptr(&out, 0),
        dev.ptr(&count, 0),
        dev.ptr(&ds, 0),
        dev.ptr(&dl, 0),
        n,
        width,
        k,
    )?;
    let (o, c) = (dev.download(&out, n * k)?, dev.download(&count, n)?);
    (0..n)
        .map(|r| {
            let cnt = usize::try_from(c[r])
                .ok()
                .filter(|c| *c <= k)
                .ok_or_else(|| {
                    CudaError::Unsupported(format!("top-k left row {r}'s count at {}", c[r]))
                })?;
            Ok(o[r * k..r * k + cnt].iter().map(|v| *v as u32).collect())
        })
        .collect()
}

/// One step's view of a paged cache for the DSA host wrappers: per token, its sequence's block
/// table (`tables[table_base[t]..]`, `block_size` slots a block) and context length.
#[derive(Debug, Clone, Copy)]
pub struct PagedRows<'a> {
    pub tables: &'a [i32],
    pub table_base: &'a [i32],
    pub block_size: usize,
    pub ctx_len: &'a [i32],
}

/// The indexer scores `[n, max_ctx]` of the kernel the device's [`crate::backend::cuda::Indexer`] setting
/// chooses, over `kcache` (raw rows as stored) for queries `[n, heads, dim]` and head weights
/// `[n, heads]`. Positions past a token's context are never written: they come back NaN.
#[allow(clippy::too_many_arguments)]
pub fn indexer_scores_host(
    dev: &Device,
    kcache: &DevBuf,
    q: &[f32],
    w: &[f32],
    rows: PagedRows,
    heads: usize,
    dim: usize,
) -> Result<Vec<f32>, CudaError> {
    let n = rows.ctx_len.len();
    let max_ctx = rows.ctx_len.iter().copied().max().unwrap_or(0).max(0) as usize;
    let scores = dev.upload(&vec![f32::NAN; n * max_ctx])?;
    let (dq, dw) = (dev.upload(q)?, dev.upload(w)?);
    let (ds, db, dl) = (
        dev.upload(rows.tables)?,
        dev.upload(rows.table_base)?,
        dev.upload(rows.ctx_len)?,
    );
    indexer_scores(
        dev,
        dev.ptr(&scores, 0),
        dev.ptr(&dq, 0),
        dev.ptr(&dw, 0),
        kcache,
        dev.ptr(&ds, 0),
        dev.ptr(&db, 0),
        rows.block_size,
        dev.ptr(&dl, 0),
        n,
        heads,
        dim,
        max_ctx,
    )?;
    dev.download(&scores, n * max_ctx)
}
