//! Launchers of the kernels in `kernels/*.cu` (one per kernel, arguments as raw device addresses
//! from [`Device::ptr`]) and host-to-host wrappers of single ops, used by the tests to compare
//! each op with its CPU reference.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::CudaError;
use super::device::{Device, Family, Fp8Path};
use super::weights::{DType, DevBuf, DevLinear, index_fp8_stride, latent_fp8_stride};
use crate::backend::cpu::Linear;

/// One kernel argument.
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    /// A device address.
    P(u64),
    I(i32),
    L(i64),
    F(f32),
}

/// Launches `family::name` on the device's stream.
pub fn launch(
    dev: &Device,
    family: Family,
    name: &str,
    grid: (u32, u32, u32),
    block: u32,
    shared_mem_bytes: u32,
    args: &[Arg],
) -> Result<(), CudaError> {
    if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
        return Ok(());
    }
    let f = dev.function(family, name)?;
    if shared_mem_bytes > 48 * 1024 {
        // Above 48 KiB a kernel must opt in to its dynamic shared memory.
        f.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shared_mem_bytes as i32,
        )?;
    }
    let mut b = dev.stream.launch_builder(&f);
    for a in args {
        match a {
            Arg::P(p) => b.arg(p),
            Arg::I(i) => b.arg(i),
            Arg::L(l) => b.arg(l),
            Arg::F(x) => b.arg(x),
        };
    }
    let cfg = LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes,
    };
    // SAFETY: each launcher below passes the argument list its kernel declares, with addresses
    // of live buffers large enough for the extents it passes.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

fn i(v: usize) -> Arg {
    Arg::I(v as i32)
}

fn blocks(n: usize, per: usize) -> u32 {
    n.div_ceil(per) as u32
}

/// Element type of a cuBLAS operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CuType {
    Bf16,
    F32,
}

fn ty_bytes(t: CuType) -> usize {
    match t {
        CuType::Bf16 => 2,
        CuType::F32 => 4,
    }
}

/// A cuBLAS extent or leading dimension as its `int`.
fn blas_int(v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::Unsupported(format!("GEMM extent {v} exceeds i32")))
}

fn blas_type(t: CuType) -> cudarc::cublas::sys::cudaDataType {
    match t {
        CuType::Bf16 => cudarc::cublas::sys::cudaDataType::CUDA_R_16BF,
        CuType::F32 => cudarc::cublas::sys::cudaDataType::CUDA_R_32F,
    }
}

fn blas_op(transpose: bool) -> cudarc::cublas::sys::cublasOperation_t {
    if transpose {
        cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N
    }
}

/// Column-major `C[m, n] = op(A) · B` through cuBLAS with f32 accumulation (alpha 1, beta 0);
/// `a_t` transposes A. Each operand is (device address, element type, leading dimension).
#[allow(clippy::too_many_arguments)]
pub fn gemm_raw(
    dev: &Device,
    a_t: bool,
    m: usize,
    n: usize,
    k: usize,
    a: (u64, CuType, usize),
    b: (u64, CuType, usize),
    c: (u64, CuType, usize),
) -> Result<(), CudaError> {
    use cudarc::cublas::sys;
    if m == 0 || n == 0 || k == 0 {
        return Ok(());
    }
    let int = blas_int;
    let (ty, op_a) = (blas_type, blas_op(a_t));
    let blas = dev.blas()?;
    let (alpha, beta) = (1f32, 0f32);
    // SAFETY: callers pass live device buffers of at least the extents given, used on the
    // stream the handle is bound to.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            op_a,
            sys::cublasOperation_t::CUBLAS_OP_N,
            int(m)?,
            int(n)?,
            int(k)?,
            &alpha as *const f32 as *const _,
            a.0 as *const _,
            ty(a.1),
            int(a.2)?,
            b.0 as *const _,
            ty(b.1),
            int(b.2)?,
            &beta as *const f32 as *const _,
            c.0 as *mut _,
            ty(c.1),
            int(c.2)?,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| CudaError::Unsupported(format!("cuBLAS GEMM {m}x{n}x{k}: {e:?}")))
}

/// One operand of [`gemm_batched`]: device address, element type, leading dimension, and the
/// elements between consecutive matrices of the batch.
#[derive(Debug, Clone, Copy)]
pub struct Strided {
    pub ptr: u64,
    pub ty: CuType,
    pub ld: usize,
    pub stride: usize,
}

/// `batch` column-major products `C_i[m, n] = op(A_i) · B_i` through cuBLAS's strided batched
/// GEMM, f32 accumulation (alpha 1, beta 0); `a_t` transposes every A.
#[allow(clippy::too_many_arguments)]
pub fn gemm_batched(
    dev: &Device,
    a_t: bool,
    m: usize,
    n: usize,
    k: usize,
    a: Strided,
    b: Strided,
    c: Strided,
    batch: usize,
) -> Result<(), CudaError> {
    use cudarc::cublas::sys;
    if m == 0 || n == 0 || k == 0 || batch == 0 {
        return Ok(());
    }
    let int = blas_int;
    let long = |v: usize| {
        i64::try_from(v).map_err(|_| CudaError::Unsupported(format!("GEMM stride {v} exceeds i64")))
    };
    let (ty, op_a) = (blas_type, blas_op(a_t));
    let blas = dev.blas()?;
    let (alpha, beta) = (1f32, 0f32);
    // SAFETY: callers pass live device buffers covering every matrix of the batch at the
    // strides given, used on the stream the handle is bound to.
    unsafe {
        cudarc::cublas::result::gemm_strided_batched_ex(
            *blas.handle(),
            op_a,
            sys::cublasOperation_t::CUBLAS_OP_N,
            int(m)?,
            int(n)?,
            int(k)?,
            &alpha as *const f32 as *const _,
            a.ptr as *const _,
            ty(a.ty),
            int(a.ld)?,
            long(a.stride)?,
            b.ptr as *const _,
            ty(b.ty),
            int(b.ld)?,
            long(b.stride)?,
            &beta as *const f32 as *const _,
            c.ptr as *mut _,
            ty(c.ty),
            int(c.ld)?,
            long(c.stride)?,
            int(batch)?,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| {
        CudaError::Unsupported(format!("cuBLAS batched GEMM {batch} x {m}x{n}x{k}: {e:?}"))
    })
}

/// The absorbed products run as one batched cuBLAS GEMM over the heads under
/// [`super::Gemm::Cublas`] with dense weights: bf16 weights take the `len` activations at `x`
/// rounded to bf16 (the returned buffer, kept alive until the GEMM is queued), f32 weights
/// multiply in f32. `None`: the CUDA-core kernels run instead.
fn absorb_operand(
    dev: &Device,
    wkvb: &DevLinear,
    x: u64,
    len: usize,
) -> Result<Option<AbsorbInput>, CudaError> {
    if dev.gemm() != super::Gemm::Cublas {
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

/// `out[i] = bf16(x[i])` for `n` values.
pub fn cast_to_bf16(dev: &Device, out: u64, x: u64, n: usize) -> Result<(), CudaError> {
    launch(
        dev,
        Family::Norm,
        "cast_f32_bf16",
        (blocks(n, 256).min(65_535), 1, 1),
        256,
        0,
        &[Arg::P(out), Arg::P(x), Arg::L(n as i64)],
    )
}

/// `out[i] = f32(x[i])` for `n` bf16 values.
pub fn cast_bf16_to_f32(dev: &Device, out: u64, x: u64, n: usize) -> Result<(), CudaError> {
    launch(
        dev,
        Family::Norm,
        "cast_bf16_f32",
        (blocks(n, 256).min(65_535), 1, 1),
        256,
        0,
        &[Arg::P(out), Arg::P(x), Arg::L(n as i64)],
    )
}

/// `y[n, out] = x[n, in] · Wᵀ` through cuBLAS. Row-major Y is column-major Yᵀ `[out, n]` =
/// W (column-major `[in, out]`, transposed) · Xᵀ (column-major `[in, n]`).
fn linear_cublas(dev: &Device, y: u64, x: u64, w: &DevLinear, n: usize) -> Result<(), CudaError> {
    let (o, k) = (w.out_dim, w.in_dim);
    match w.w.dtype() {
        DType::Bf16 => {
            // Stream-ordered scratch: freed on the same stream after the GEMM has read it.
            let xb = dev.alloc::<u16>(n * k)?;
            let pxb = dev.ptr(&xb, 0);
            cast_to_bf16(dev, pxb, x, n * k)?;
            gemm_raw(
                dev,
                true,
                o,
                n,
                k,
                (w.w.ptr(dev), CuType::Bf16, k),
                (pxb, CuType::Bf16, k),
                (y, CuType::F32, o),
            )
        }
        DType::F32 => gemm_raw(
            dev,
            true,
            o,
            n,
            k,
            (w.w.ptr(dev), CuType::F32, k),
            (x, CuType::F32, k),
            (y, CuType::F32, o),
        ),
        DType::Fp8 => linear_fp8(dev, y, x, w, n),
    }
}

/// Where [`act_quant`] writes a token's scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleLayout {
    /// `[n][ceil(k/128)]`: a token's scales together (our kernels).
    TokenMajor,
    /// `[ceil(k/128)][stride]`: tokens fastest, `stride >= n` (cuBLASLt's 1x128 mode).
    BlockMajor { stride: usize },
}

/// Per-token, per-128-channel E4M3 quantization of `x[n, k]` into `codes[n, k]` and its scales.
#[allow(clippy::too_many_arguments)]
pub fn act_quant(
    dev: &Device,
    codes: u64,
    scales: u64,
    x: u64,
    n: usize,
    k: usize,
    pow2: bool,
    layout: ScaleLayout,
) -> Result<(), CudaError> {
    let args = [
        Arg::P(codes),
        Arg::P(scales),
        Arg::P(x),
        i(n),
        i(k),
        i(pow2 as usize),
        i(match layout {
            ScaleLayout::TokenMajor => 0,
            ScaleLayout::BlockMajor { stride } => stride.max(1),
        }),
    ];
    // Whole 128-groups on 16-byte boundaries take the vectorized kernel (same results).
    if k.is_multiple_of(128) && x.is_multiple_of(16) && codes.is_multiple_of(4) {
        let grid = (blocks(n * (k / 128), 8), 1, 1);
        return launch(dev, Family::Fp8, "act_quant_128", grid, 256, 0, &args);
    }
    launch(
        dev,
        Family::Fp8,
        "act_quant",
        (n as u32, blocks(k, 128), 1),
        32,
        0,
        &args,
    )
}

/// E4M3 codes and `amax / 448` scales per 128×128 block of the f32 matrix `w[rows, cols]`.
pub fn quant_weight_blocks(
    dev: &Device,
    codes: u64,
    scale_inv: u64,
    w: u64,
    rows: usize,
    cols: usize,
) -> Result<(), CudaError> {
    launch(
        dev,
        Family::Fp8,
        "quant_weight_blocks",
        (blocks(rows, 128), blocks(cols, 128), 1),
        256,
        0,
        &[
            Arg::P(codes),
            Arg::P(scale_inv),
            Arg::P(w),
            i(rows),
            i(cols),
        ],
    )
}

/// How to split K (in 128-wide blocks) so `tiles` output tiles keep every SM busy: (K blocks
/// per split, splits). No split when the tiles alone fill about two waves of a 132-SM GPU.
pub fn split_k(tiles: usize, k_blocks: usize) -> (usize, usize) {
    const TARGET_BLOCKS: usize = 264;
    if tiles >= TARGET_BLOCKS / 2 || k_blocks < 4 {
        return (k_blocks.max(1), 1);
    }
    let splits = TARGET_BLOCKS.div_ceil(tiles).min(k_blocks / 2).max(1);
    let per = k_blocks.div_ceil(splits);
    (per, k_blocks.div_ceil(per))
}

/// The FP8 linear: activations quantized per token and 128 channels, then the block-scaled
/// GEMM, on the tensor cores ([`super::Gemm::Cublas`], the serving path: cuBLASLt's kernel or
/// ours, by [`super::Device::fp8_gemm_path`]) or in the reference order on the CUDA cores
/// ([`super::Gemm::Tiled`]).
fn linear_fp8(dev: &Device, y: u64, x: u64, w: &DevLinear, n: usize) -> Result<(), CudaError> {
    let (o, k) = (w.out_dim, w.in_dim);
    let scale_inv = w
        .scale_inv
        .as_ref()
        .ok_or_else(|| CudaError::Unsupported("an FP8 weight without its block scales".into()))?;
    let (wptr, sptr) = (w.w.ptr(dev), dev.ptr(scale_inv, 0));
    if dev.gemm() == super::Gemm::Cublas && dev.fp8_gemm_path(n, o, k) == Fp8Path::Library {
        // The library's token count is padded (its scale rows are 16-byte aligned); padding
        // tokens have zero codes and scales and their outputs are dropped.
        let np = super::lt::padded_tokens(n);
        let (xa, sa) = if np == n {
            (dev.alloc::<u8>(n * k)?, dev.alloc::<f32>(n * k / 128)?)
        } else {
            (dev.zeros::<u8>(np * k)?, dev.zeros::<f32>(np * k / 128)?)
        };
        let (pxa, psa) = (dev.ptr(&xa, 0), dev.ptr(&sa, 0));
        let layout = ScaleLayout::BlockMajor { stride: np };
        act_quant(dev, pxa, psa, x, n, k, w.pow2_act, layout)?;
        return dev.with_lt(|lt| lt.gemm(dev, y, pxa, psa, wptr, sptr, n, o, k));
    }
    let xa = dev.alloc::<u8>(n * k)?;
    let sa = dev.alloc::<f32>(n * k.div_ceil(128))?;
    let (pxa, psa) = (dev.ptr(&xa, 0), dev.ptr(&sa, 0));
    act_quant(dev, pxa, psa, x, n, k, w.pow2_act, ScaleLayout::TokenMajor)?;
    if dev.gemm() == super::Gemm::Cublas && dev.fp8_gemm_path(n, o, k) == Fp8Path::Few {
        return linear_fp8_few(dev, y, (pxa, psa), (wptr, sptr), n, o, k);
    }
    if dev.gemm() != super::Gemm::Cublas {
        return launch(
            dev,
            Family::Fp8,
            "fp8_linear_simple",
            (blocks(o, 8), n as u32, 1),
            256,
            0,
            &[
                Arg::P(y),
                Arg::P(pxa),
                Arg::P(psa),
                Arg::P(wptr),
                Arg::P(sptr),
                i(n),
                i(o),
                i(k),
            ],
        );
    }
    // The pipelined kernel needs 16-byte rows (K a multiple of 16); odd K takes the plain one.
    let (name, rows, threads) = if k.is_multiple_of(16) {
        ("fp8_linear_pipe", 64, 128)
    } else if n > 32 {
        ("fp8_linear_mma_m64", 64, 256)
    } else {
        ("fp8_linear_mma", 32, 128)
    };
    let (kbs, splits) = split_k(blocks(o, 128) as usize * n.div_ceil(rows), k.div_ceil(128));
    let parts = if splits > 1 {
        Some(dev.alloc::<f32>(splits * n * o)?)
    } else {
        None
    };
    let dst = parts.as_ref().map(|p| dev.ptr(p, 0)).unwrap_or(y);
    launch(
        dev,
        Family::Fp8,
        name,
        (blocks(o, 128), blocks(n, rows), splits as u32),
        threads,
        0,
        &[
            Arg::P(dst),
            Arg::P(pxa),
            Arg::P(psa),
            Arg::P(wptr),
            Arg::P(sptr),
            i(n),
            i(o),
            i(k),
            i(kbs),
        ],
    )?;
    if let Some(p) = &parts {
        sum_splits(dev, y, dev.ptr(p, 0), n * o, splits)?;
    }
    Ok(())
}

/// `y[i] = Σ_z parts[z·len + i]`, the splits summed in order (results do not depend on
/// scheduling).
fn sum_splits(
    dev: &Device,
    y: u64,
    parts: u64,
    len: usize,
    splits: usize,
) -> Result<(), CudaError> {
    launch(
        dev,
        Family::Fp8,
        "sum_splits",
        (blocks(len, 256).clamp(1, 65_535), 1, 1),
        256,
        0,
        &[Arg::P(y), Arg::P(parts), Arg::L(len as i64), i(splits)],
    )
}

/// The most tokens `fp8_linear_few` takes (the MMA's N).
pub const FEW_TOKENS: usize = 8;

/// Whether an `n`-token FP8 GEMM over `k` inputs fits `fp8_linear_few`.
pub fn few_tokens_apply(n: usize, k: usize) -> bool {
    (1..=FEW_TOKENS).contains(&n) && k.is_multiple_of(128)
}

/// `y[n, o] = x · Wᵀ` by `fp8_linear_few` over quantized activations `(codes, scales)`
/// (token-major) and the weight's `(codes, block scales)`; K split over enough blocks to fill
/// the GPU (at least one 128-column block per warp), the splits summed in order.
fn linear_fp8_few(
    dev: &Device,
    y: u64,
    (xa, sa): (u64, u64),
    (w, sw): (u64, u64),
    n: usize,
    o: usize,
    k: usize,
) -> Result<(), CudaError> {
    let row_blocks = o.div_ceil(16);
    let groups = k / 128;
    let splits = (2 * dev.sm_count())
        .div_ceil(row_blocks)
        .clamp(1, (groups / 8).clamp(1, 16));
    let parts = if splits > 1 {
        Some(dev.alloc::<f32>(splits * n * o)?)
    } else {
        None
    };
    let dst = parts.as_ref().map(|p| dev.ptr(p, 0)).unwrap_or(y);
    launch(
        dev,
        Family::Fp8,
        "fp8_linear_few",
        (row_blocks as u32, splits as u32, 1),
        256,
        0,
        &[
            Arg::P(dst),
            Arg::P(xa),
            Arg::P(sa),
            Arg::P(w),
            Arg::P(sw),
            i(n),
            i(o),
            i(k),
        ],
    )?;
    if let Some(p) = &parts {
        sum_splits(dev, y, dev.ptr(p, 0), n * o, splits)?;
    }
    Ok(())
}

/// Rows of one tile of [`linear_fp8_grouped`] (`kernels/fp8.cu::PM`).
pub const GROUPED_TILE_ROWS: usize = 64;

/// Activation rows quantized for [`linear_fp8_grouped`]: E4M3 codes `[rows, k]` and scales per
/// token and 128 channels, token-major, by one scale rule (`pow2`).
pub struct QuantizedRows {
    codes: cudarc::driver::CudaSlice<u8>,
    scales: cudarc::driver::CudaSlice<f32>,
    rows: usize,
    k: usize,
    pow2: bool,
}

/// Quantizes `rows` activation rows of `k` channels at `x` once, for every grouped linear that
/// reads them.
pub fn quantize_rows(
    dev: &Device,
    x: u64,
    rows: usize,
    k: usize,
    pow2: bool,
) -> Result<QuantizedRows, CudaError> {
    let codes = dev.alloc::<u8>(rows * k)?;
    let scales = dev.alloc::<f32>(rows * k.div_ceil(128))?;
    let (pc, ps) = (dev.ptr(&codes, 0), dev.ptr(&scales, 0));
    act_quant(dev, pc, ps, x, rows, k, pow2, ScaleLayout::TokenMajor)?;
    Ok(QuantizedRows {
        codes,
        scales,
        rows,
        k,
        pow2,
    })
}

/// Many FP8 linears of one shape in one launch: `x` holds activation rows sorted by weight,
/// and `groups[i] = (weight, first row, rows)` says which rows weight i multiplies; every row
/// of `y[x.rows, out]` covered by a group is written.
pub fn linear_fp8_grouped(
    dev: &Device,
    y: u64,
    x: &QuantizedRows,
    groups: &[(&DevLinear, usize, usize)],
) -> Result<(), CudaError> {
    let Some(&(first, ..)) = groups.first() else {
        return Ok(());
    };
    let (o, k) = (first.out_dim, x.k);
    if !k.is_multiple_of(16) {
        return Err(CudaError::Unsupported(format!(
            "grouped FP8 linears need K a multiple of 16, not {k}"
        )));
    }
    let (mut w_ptrs, mut s_ptrs, mut row0, mut row_end) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (w, start, count) in groups {
        let scale = match (&w.scale_inv, w.w.dtype()) {
            (Some(s), DType::Fp8) if (w.out_dim, w.in_dim) == (o, k) && w.pow2_act == x.pow2 => s,
            _ => {
                return Err(CudaError::Unsupported(
                    "grouped FP8 linears need FP8 weights of one shape and of the activations' scale rule".into(),
                ));
            }
        };
        if start + count > x.rows {
            return Err(CudaError::Unsupported(format!(
                "a group's rows {start}..{} exceed the {} rows given",
                start + count,
                x.rows
            )));
        }
        for t0 in (0..*count).step_by(GROUPED_TILE_ROWS) {
            w_ptrs.push(w.w.ptr(dev));
            s_ptrs.push(dev.ptr(scale, 0));
            row0.push((start + t0) as i32);
            row_end.push((start + (t0 + GROUPED_TILE_ROWS).min(*count)) as i32);
        }
    }
    if row0.is_empty() {
        return Ok(());
    }
    let (dw, ds) = (dev.upload(&w_ptrs)?, dev.upload(&s_ptrs)?);
    let (dr0, dr1) = (dev.upload(&row0)?, dev.upload(&row_end)?);
    launch(
        dev,
        Family::Fp8,
        "fp8_linear_grouped",
        (blocks(o, 128), row0.len() as u32, 1),
        128,
        0,
        &[
            Arg::P(y),
            Arg::P(dev.ptr(&x.codes, 0)),
            Arg::P(dev.ptr(&x.scales, 0)),
            Arg::P(dev.ptr(&dw, 0)),
            Arg::P(dev.ptr(&ds, 0)),
            Arg::P(dev.ptr(&dr0, 0)),
            Arg::P(dev.ptr(&dr1, 0)),
            i(o),
            i(k),
        ],
    )
}

/// An MoE layer's FP8 routed experts of one projection as device tables indexed by expert id
/// (weight codes and 128×128 block scales), so a grouped GEMM picks each tile's expert on the
/// device ([`linear_fp8_grouped_table`]).
#[derive(Debug)]
pub struct ExpertTable {
    weights: cudarc::driver::CudaSlice<u64>,
    scales: cudarc::driver::CudaSlice<u64>,
    out_dim: usize,
    in_dim: usize,
    pow2_act: bool,
}

impl ExpertTable {
    /// `None` unless every expert is given, FP8 with block scales, all of one shape and one
    /// activation-scale rule.
    pub fn build(dev: &Device, experts: &[Option<&DevLinear>]) -> Result<Option<Self>, CudaError> {
        let Some(Some(first)) = experts.first() else {
            return Ok(None);
        };
        let (mut weights, mut scales) = (Vec::new(), Vec::new());
        for w in experts {
            match w {
                Some(w)
                    if w.w.dtype() == DType::Fp8
                        && (w.out_dim, w.in_dim, w.pow2_act)
                            == (first.out_dim, first.in_dim, first.pow2_act) =>
                {
                    let Some(scale) = &w.scale_inv else {
                        return Ok(None);
                    };
                    weights.push(w.w.ptr(dev));
                    scales.push(dev.ptr(scale, 0));
                }
                _ => return Ok(None),
            }
        }
        Ok(Some(ExpertTable {
            weights: dev.upload(&weights)?,
            scales: dev.upload(&scales)?,
            out_dim: first.out_dim,
            in_dim: first.in_dim,
            pow2_act: first.pow2_act,
        }))
    }

    pub fn pow2_act(&self) -> bool {
        self.pow2_act
    }
}

/// The most rows (tokens × choices) [`moe_sort_rows`] sorts in one block.
pub const MOE_SORT_MAX_ROWS: usize = 2048;

/// A step's routed rows laid out by expert on the device, with the grouped GEMMs' tile plan
/// (see `kernels/moe.cu::moe_sort_rows`). Nothing of it is read back to the host.
#[derive(Debug)]
pub struct DeviceSortedRows {
    /// `perm[slot]`: the token of sorted slot `slot`.
    pub perm: cudarc::driver::CudaSlice<i32>,
    /// `row_of[t·k + i]`: the sorted slot of token t's i-th choice.
    pub row_of: cudarc::driver::CudaSlice<i32>,
    tile_expert: cudarc::driver::CudaSlice<i32>,
    tile_row0: cudarc::driver::CudaSlice<i32>,
    tile_row_end: cudarc::driver::CudaSlice<i32>,
    tile_count: cudarc::driver::CudaSlice<i32>,
    pub rows: usize,
    /// The most tiles the plan can hold: the grouped launches' grid.
    max_tiles: usize,
}

impl DeviceSortedRows {
    /// Buffers for `rows` rows over `n_experts`, filled with `fill` (tests poison them).
    fn alloc(
        dev: &Device,
        rows: usize,
        n_experts: usize,
        fill: Option<i32>,
    ) -> Result<Self, CudaError> {
        // Every tile holds a row, and all of an expert's tiles but its last are full.
        let max_tiles = rows
            .min(n_experts + rows.div_ceil(GROUPED_TILE_ROWS))
            .max(1);
        let buf = |n: usize| match fill {
            Some(v) => dev.upload(&vec![v; n.max(1)]),
            None => dev.alloc::<i32>(n),
        };
        Ok(DeviceSortedRows {
            perm: buf(rows)?,
            row_of: buf(rows)?,
            tile_expert: buf(max_tiles)?,
            tile_row0: buf(max_tiles)?,
            tile_row_end: buf(max_tiles)?,
            tile_count: dev.zeros::<i32>(1)?,
            rows,
            max_tiles,
        })
    }

    fn launch_sort(
        &self,
        dev: &Device,
        ids: u64,
        n_experts: usize,
        k: usize,
        status: u64,
    ) -> Result<(), CudaError> {
        if self.rows == 0 {
            return Ok(());
        }
        launch(
            dev,
            Family::Moe,
            "moe_sort_rows",
            (1, 1, 1),
            256,
            0,
            &[
                Arg::P(dev.ptr(&self.perm, 0)),
                Arg::P(dev.ptr(&self.row_of, 0)),
                Arg::P(dev.ptr(&self.tile_expert, 0)),
                Arg::P(dev.ptr(&self.tile_row0, 0)),
                Arg::P(dev.ptr(&self.tile_row_end, 0)),
                Arg::P(dev.ptr(&self.tile_count, 0)),
                Arg::P(status),
                Arg::P(ids),
                i(self.rows),
                i(n_experts),
                i(k),
                i(GROUPED_TILE_ROWS),
            ],
        )
    }
}

fn check_sort(rows: usize, n_experts: usize, k: usize) -> Result<(), CudaError> {
    if rows > MOE_SORT_MAX_ROWS || n_experts > MAX_EXPERTS || k == 0 {
        return Err(CudaError::Unsupported(format!(
            "sorting {rows} routed rows over {n_experts} experts on the device (at most \
             {MOE_SORT_MAX_ROWS} rows, {MAX_EXPERTS} experts)"
        )));
    }
    Ok(())
}

/// Sorts the `rows` expert ids at `ids` (`k` per token, each below `n_experts`) by expert on
/// the device and plans [`GROUPED_TILE_ROWS`]-row tiles. `status` is two device counters:
/// experts with rows are added to the first; an out-of-range id sets the second.
pub fn moe_sort_rows(
    dev: &Device,
    ids: u64,
    rows: usize,
    n_experts: usize,
    k: usize,
    status: u64,
) -> Result<DeviceSortedRows, CudaError> {
    check_sort(rows, n_experts, k)?;
    let sorted = DeviceSortedRows::alloc(dev, rows, n_experts, None)?;
    sorted.launch_sort(dev, ids, n_experts, k, status)?;
    Ok(sorted)
}

/// [`linear_fp8_grouped`] with the tiles planned on the device: every row of `y[x.rows, out]`
/// through the expert [`moe_sort_rows`] sorted it under.
pub fn linear_fp8_grouped_table(
    dev: &Device,
    y: u64,
    x: &QuantizedRows,
    table: &ExpertTable,
    sorted: &DeviceSortedRows,
) -> Result<(), CudaError> {
    if (x.k, x.pow2, x.rows) != (table.in_dim, table.pow2_act, sorted.rows)
        || !x.k.is_multiple_of(16)
    {
        return Err(CudaError::Unsupported(format!(
            "grouped FP8 experts of {} inputs got {} rows of {} channels for a plan of {} rows",
            table.in_dim, x.rows, x.k, sorted.rows
        )));
    }
    if sorted.rows == 0 {
        return Ok(());
    }
    launch(
        dev,
        Family::Fp8,
        "fp8_linear_grouped_table",
        (blocks(table.out_dim, 128), sorted.max_tiles as u32, 1),
        128,
        0,
        &[
            Arg::P(y),
            Arg::P(dev.ptr(&x.codes, 0)),
            Arg::P(dev.ptr(&x.scales, 0)),
            Arg::P(dev.ptr(&table.weights, 0)),
            Arg::P(dev.ptr(&table.scales, 0)),
            Arg::P(dev.ptr(&sorted.tile_expert, 0)),
            Arg::P(dev.ptr(&sorted.tile_row0, 0)),
            Arg::P(dev.ptr(&sorted.tile_row_end, 0)),
            Arg::P(dev.ptr(&sorted.tile_count, 0)),
            i(table.out_dim),
            i(table.in_dim),
        ],
    )
}

/// The device sort of `ids` read back: (perm, row_of, tiles as (expert, row0, row_end),
/// status counters), with every output poisoned first.
pub type SortedHost = (Vec<i32>, Vec<i32>, Vec<(i32, i32, i32)>, [u64; 2]);

pub fn moe_sort_rows_host(
    dev: &Device,
    ids: &[i32],
    n_experts: usize,
    k: usize,
) -> Result<SortedHost, CudaError> {
    let rows = ids.len();
    check_sort(rows, n_experts, k)?;
    let d_ids = dev.upload(ids)?;
    let status = dev.zeros::<u64>(2)?;
    let sorted = DeviceSortedRows::alloc(dev, rows, n_experts, Some(-7))?;
    sorted.launch_sort(dev, dev.ptr(&d_ids, 0), n_experts, k, dev.ptr(&status, 0))?;
    let max = sorted.max_tiles;
    let count = dev.download(&sorted.tile_count, 1)?[0].clamp(0, max as i32) as usize;
    let (e, r0, r1) = (
        dev.download(&sorted.tile_expert, max)?,
        dev.download(&sorted.tile_row0, max)?,
        dev.download(&sorted.tile_row_end, max)?,
    );
    let st = dev.download(&status, 2)?;
    Ok((
        dev.download(&sorted.perm, rows)?,
        dev.download(&sorted.row_of, rows)?,
        (0..count).map(|t| (e[t], r0[t], r1[t])).collect(),
        [st[0], st[1]],
    ))
}

/// `y[n, out] = x[n, in] · Wᵀ`, by the device's [`super::Gemm`] path.
pub fn linear(dev: &Device, y: u64, x: u64, w: &DevLinear, n: usize) -> Result<(), CudaError> {
    if w.w.dtype() == DType::Fp8 {
        return linear_fp8(dev, y, x, w, n);
    }
    if dev.gemm() == super::Gemm::Cublas {
        return linear_cublas(dev, y, x, w, n);
    }
    let name = format!("linear_{}", w.w.dtype().suffix());
    let grid = (blocks(w.out_dim, 64), blocks(n, 64), 1);
    launch(
        dev,
        Family::Linear,
        &name,
        grid,
        256,
        0,
        &[
            Arg::P(y),
            Arg::P(x),
            Arg::P(w.w.ptr(dev)),
            i(n),
            i(w.out_dim),
            i(w.in_dim),
        ],
    )
}

pub fn rms_norm(
    dev: &Device,
    y: u64,
    x: u64,
    w: u64,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<(), CudaError> {
    launch(
        dev,
        Family::Norm,
        "rms_norm_f32",
        (rows as u32, 1, 1),
        256,
        0,
        &[Arg::P(y), Arg::P(x), Arg::P(w), i(d), Arg::F(eps)],
    )
}

pub fn layer_norm(
    dev: &Device,
    x: u64,
    w: u64,
    b: u64,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<(), CudaError> {
    launch(
        dev,
        Family::Norm,
        "layer_norm_f32",
        (rows as u32, 1, 1),
        256,
        0,
        &[Arg::P(x), Arg::P(w), Arg::P(b), i(d), Arg::F(eps)],
    )
}

pub fn add(dev: &Device, x: u64, y: u64, n: usize) -> Result<(), CudaError> {
    launch(
        dev,
        Family::Norm,
        "add_f32",
        (blocks(n, 256), 1, 1),
        256,
        0,
        &[Arg::P(x), Arg::P(y), Arg::L(n as i64)],
    )
}

pub fn scale(dev: &Device, x: u64, s: f32, n: usize) -> Result<(), CudaError> {
    launch(
        dev,
        Family::Norm,
        "scale_f32",
        (blocks(n, 256), 1, 1),
        256,
        0,
        &[Arg::P(x), Arg::F(s), Arg::L(n as i64)],
    )
}

pub fn silu_mul(dev: &Device, out: u64, g: u64, u: u64, n: usize) -> Result<(), CudaError> {
    launch(
        dev,
        Family::Norm,
        "silu_mul_f32",
        (blocks(n, 256), 1, 1),
        256,
        0,
        &[Arg::P(out), Arg::P(g), Arg::P(u), Arg::L(n as i64)],
    )
}

/// `out[r, :] = x[rows[r], :]` for `n_rows` rows of width `d`.
pub fn gather_rows(
    dev: &Device,
    out: u64,
    x: u64,
    rows: u64,
    n_rows: usize,
    d: usize,
) -> Result<(), CudaError> {
    launch(
        dev,
        Family::Norm,
        "gather_rows_f32",
        (n_rows as u32, 1, 1),
        256,
        0,
        &[Arg::P(out), Arg::P(x), Arg::P(rows), i(d)],
    )
}

pub fn embedding(
    dev: &Device,
    out: u64,
    table: &DevBuf,
    ids: u64,
    n: usize,
    d: usize,
) -> Result<(), CudaError> {
    let name = format!("embedding_{}", table.dtype().suffix());
    launch(
        dev,
        Family::Norm,
        &name,
        (n as u32, 1, 1),
        256,
        0,
        &[Arg::P(out), Arg::P(table.ptr(dev)), Arg::P(ids), i(d)],
    )
}

/// Rotary embedding of `heads` vectors per token, in place (see `kernels/rope.cu`).
#[allow(clippy::too_many_arguments)]
pub fn rope(
    dev: &Device,
    x: u64,
    pos: u64,
    inv_freq: u64,
    factor: f32,
    n_tokens: usize,
    heads: usize,
    token_stride: usize,
    head_stride: usize,
    offset: usize,
    half: usize,
    interleaved: bool,
) -> Result<(), CudaError> {
    launch(
        dev,
        Family::Rope,
        "rope_f32",
        (n_tokens as u32, heads as u32, 1),
        64,
        0,
        &[
            Arg::P(x),
            Arg::P(pos),
            Arg::P(inv_freq),
            Arg::F(factor),
            i(token_stride),
            i(head_stride),
            i(offset),
            i(half),
            Arg::I(interleaved as i32),
        ],
    )
}

/// Writes `[RMSNorm(c_kv) | RoPE(k_pe)]` of each token into its cache slot.
#[allow(clippy::too_many_arguments)]
pub fn kv_store(
    dev: &Device,
    cache: &DevBuf,
    kv: u64,
    norm_w: u64,
    slots: u64,
    pos: u64,
    inv_freq: u64,
    factor: f32,
    n: usize,
    kvr: usize,
    rd: usize,
    eps: f32,
) -> Result<(), CudaError> {
    let name = format!("kv_store_{}", cache.dtype().suffix());
    let mut args = vec![
        Arg::P(cache.ptr(dev)),
        Arg::P(kv),
        Arg::P(norm_w),
        Arg::P(slots),
        Arg::P(pos),
        Arg::P(inv_freq),
        Arg::F(factor),
        i(kvr),
        i(rd),
        Arg::F(eps),
    ];
    if cache.dtype() == DType::Fp8 {
        args.push(i(latent_fp8_stride(kvr, rd)));
    }
    launch(
        dev,
        Family::KvCache,
        &name,
        (n as u32, 1, 1),
        256,
        ((kvr + rd) * 4) as u32,
        &args,
    )
}

/// Writes `RoPE_half_split(LayerNorm(k))` of each token into the indexer-key cache.
#[allow(clippy::too_many_arguments)]
pub fn index_key_store(
    dev: &Device,
    cache: &DevBuf,
    k: u64,
    w: u64,
    b: u64,
    slots: u64,
    pos: u64,
    inv_freq: u64,
    factor: f32,
    n: usize,
    id: usize,
    rd: usize,
    eps: f32,
) -> Result<(), CudaError> {
    let name = format!("index_key_store_{}", cache.dtype().suffix());
    let mut args = vec![
        Arg::P(cache.ptr(dev)),
        Arg::P(k),
        Arg::P(w),
        Arg::P(b),
        Arg::P(slots),
        Arg::P(pos),
        Arg::P(inv_freq),
        Arg::F(factor),
        i(id),
        i(rd),
        Arg::F(eps),
    ];
    if cache.dtype() == DType::Fp8 {
        args.push(i(index_fp8_stride(id)));
    }
    launch(
        dev,
        Family::KvCache,
        &name,
        (n as u32, 1, 1),
        128,
        (id * 4) as u32,
        &args,
    )
}

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
fn mma_row_stride(width: usize) -> usize {
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
        super::device::Indexer::Auto => indexer_mma_kernel(kcache.dtype(), heads, dim),
        super::device::Indexer::CudaCores => None,
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

/// Per row of `x[m, v]`: the max into `maxes[m]`, and Σ exp(x - max), Σ exp((x - max) / T)
/// (f64, T from `temps[m]`) into `sums[m, 2]`.
pub fn row_softmax_stats(
    dev: &Device,
    maxes: u64,
    sums: u64,
    x: u64,
    temps: u64,
    m: usize,
    v: usize,
) -> Result<(), CudaError> {
    launch(
        dev,
        Family::Indexer,
        "row_softmax_stats",
        (m as u32, 1, 1),
        256,
        0,
        &[Arg::P(maxes), Arg::P(sums), Arg::P(x), Arg::P(temps), i(v)],
    )
}

/// `vals[r, j] = x[r, ids[r, j]]` for `m` rows of `k` ids into rows of width `v`.
pub fn gather_candidates(
    dev: &Device,
    vals: u64,
    x: u64,
    ids: u64,
    m: usize,
    v: usize,
    k: usize,
) -> Result<(), CudaError> {
    launch(
        dev,
        Family::Indexer,
        "gather_candidates",
        (m as u32, 1, 1),
        256,
        0,
        &[Arg::P(vals), Arg::P(x), Arg::P(ids), i(v), i(k)],
    )
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

/// The tensor-core attention kernel's name for this cache and shape, or `None` where it does
/// not apply (f32 cache, kv_lora_rank other than 128 or 512, a row width not a multiple of 16).
pub fn sparse_mla_mma_kernel(cache: DType, kvr: usize, rd: usize) -> Option<String> {
    (cache != DType::F32 && matches!(kvr, 128 | 512) && (kvr + rd).is_multiple_of(16))
        .then(|| format!("sparse_mla_mma_{}_{kvr}", cache.suffix()))
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
    use super::device::Attention;
    let fp8_stride = (lcache.dtype() == DType::Fp8).then(|| i(latent_fp8_stride(d.kvr, d.rd)));
    let mma = match dev.attention() {
        Attention::Auto | Attention::TensorCores => {
            sparse_mla_mma_kernel(lcache.dtype(), d.kvr, d.rd)
        }
        _ => None,
    };
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
    if let Some(name) = mma {
        return launch(
            dev,
            Family::Attention,
            &name,
            (n as u32, d.heads.div_ceil(MLA_MMA_HEADS) as u32, 1),
            256,
            sparse_mla_mma_smem(lcache.dtype(), d.kvr, d.rd) as u32,
            &args,
        );
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
            Attention::Auto | Attention::TensorCores | Attention::CudaCores => {
                n * d.heads.div_ceil(HEADS_PER_BLOCK) >= shared_min_blocks
            }
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

/// Router settings of `kernels/moe.cu::moe_route`.
#[derive(Debug, Clone, Copy)]
pub struct RouteParams {
    pub n_experts: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub top_k: usize,
    pub normalize: bool,
    pub scaling: f32,
}

pub const MAX_EXPERTS: usize = 512;
pub const MAX_GROUPS: usize = 64;
/// Tokens (one warp each) a `moe_route` block takes (`kernels/moe.cu::ROUTE_WARPS`).
const ROUTE_WARPS: usize = 4;

pub fn moe_route(
    dev: &Device,
    ids: u64,
    wts: u64,
    logits: u64,
    bias: u64,
    n: usize,
    p: RouteParams,
) -> Result<(), CudaError> {
    if p.n_experts > MAX_EXPERTS || p.n_group > MAX_GROUPS || p.top_k > p.n_experts {
        return Err(CudaError::Unsupported(format!(
            "router with {} experts in {} groups, top {} (at most {MAX_EXPERTS} experts, {MAX_GROUPS} groups)",
            p.n_experts, p.n_group, p.top_k
        )));
    }
    launch(
        dev,
        Family::Moe,
        "moe_route",
        (blocks(n, ROUTE_WARPS), 1, 1),
        32 * ROUTE_WARPS as u32,
        0,
        &[
            Arg::P(ids),
            Arg::P(wts),
            Arg::P(logits),
            Arg::P(bias),
            i(n),
            i(p.n_experts),
            i(p.n_group),
            i(p.topk_group),
            i(p.top_k),
            Arg::I(p.normalize as i32),
            Arg::F(p.scaling),
        ],
    )
}

#[allow(clippy::too_many_arguments)]
pub fn moe_combine(
    dev: &Device,
    y: u64,
    rows: u64,
    row_of: u64,
    wts: u64,
    n: usize,
    k: usize,
    d: usize,
) -> Result<(), CudaError> {
    launch(
        dev,
        Family::Moe,
        "moe_combine",
        (n as u32, 1, 1),
        256,
        0,
        &[
            Arg::P(y),
            Arg::P(rows),
            Arg::P(row_of),
            Arg::P(wts),
            i(k),
            i(d),
        ],
    )
}

// ---- host-to-host wrappers (op-level tests) ----

/// `len` f32 NaNs: an output buffer in which any element an op fails to write stays NaN.
pub fn poisoned(dev: &Device, len: usize) -> Result<cudarc::driver::CudaSlice<f32>, CudaError> {
    let buf = dev.alloc::<f32>(len)?;
    launch(
        dev,
        Family::Norm,
        "fill_const_f32",
        (blocks(len, 256).clamp(1, 65_535), 1, 1),
        256,
        0,
        &[
            Arg::P(dev.ptr(&buf, 0)),
            Arg::L(len as i64),
            Arg::F(f32::NAN),
        ],
    )?;
    Ok(buf)
}

/// `x[n, in] · Wᵀ` on the device with the weight stored as `dtype` (FP8: `w.fp8`'s codes when
/// set, else quantized per 128×128 block; activation scales powers of two).
pub fn linear_host(
    dev: &Device,
    x: &[f32],
    w: &Linear,
    dtype: DType,
) -> Result<Vec<f32>, CudaError> {
    let n = x.len() / w.in_dim.max(1);
    let dw = DevLinear::upload(
        &mut super::load::Uploader::direct(dev),
        w,
        dtype,
        true,
        true,
    )?;
    let dx = dev.upload(x)?;
    let dy = poisoned(dev, n * w.out_dim)?;
    linear(dev, dev.ptr(&dy, 0), dev.ptr(&dx, 0), &dw, n)?;
    dev.download(&dy, n * w.out_dim)
}

/// RMSNorm of each `d`-wide row.
pub fn rms_norm_host(
    dev: &Device,
    x: &[f32],
    d: usize,
    w: &[f32],
    eps: f32,
) -> Result<Vec<f32>, CudaError> {
    let dx = dev.upload(x)?;
    let dw = dev.upload(w)?;
    let p = dev.ptr(&dx, 0);
    rms_norm(dev, p, p, dev.ptr(&dw, 0), x.len() / d, d, eps)?;
    dev.download(&dx, x.len())
}

/// LayerNorm of each `d`-wide row.
pub fn layer_norm_host(
    dev: &Device,
    x: &[f32],
    d: usize,
    w: &[f32],
    b: &[f32],
    eps: f32,
) -> Result<Vec<f32>, CudaError> {
    let dx = dev.upload(x)?;
    let (dw, db) = (dev.upload(w)?, dev.upload(b)?);
    layer_norm(
        dev,
        dev.ptr(&dx, 0),
        dev.ptr(&dw, 0),
        dev.ptr(&db, 0),
        x.len() / d,
        d,
        eps,
    )?;
    dev.download(&dx, x.len())
}

/// RoPE of one `2·inv_freq.len()`-wide vector per position.
pub fn rope_host(
    dev: &Device,
    x: &[f32],
    positions: &[usize],
    inv_freq: &[f32],
    factor: f32,
    interleaved: bool,
) -> Result<Vec<f32>, CudaError> {
    let half = inv_freq.len();
    let dx = dev.upload(x)?;
    let pos: Vec<i32> = positions.iter().map(|p| *p as i32).collect();
    let dp = dev.upload(&pos)?;
    let df = dev.upload(inv_freq)?;
    rope(
        dev,
        dev.ptr(&dx, 0),
        dev.ptr(&dp, 0),
        dev.ptr(&df, 0),
        factor,
        positions.len(),
        1,
        2 * half,
        0,
        0,
        half,
        interleaved,
    )?;
    dev.download(&dx, x.len())
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

/// The indexer scores `[n, max_ctx]` of the kernel the device's [`super::Indexer`] setting
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

/// The latent attention output `[n, heads, kvr]` of the kernel the device's
/// [`super::Attention`] setting chooses: token t attends to the cache rows at positions
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

/// One token's routing: expert ids (ascending) and their weights.
pub type Routed = (Vec<usize>, Vec<f32>);

/// The router for each `n_experts`-wide row of logits: (expert ids, weights) per token.
pub fn route_host(
    dev: &Device,
    logits: &[f32],
    bias: &[f32],
    p: RouteParams,
) -> Result<Vec<Routed>, CudaError> {
    let n = logits.len() / p.n_experts;
    let dl = dev.upload(logits)?;
    let db = dev.upload(bias)?;
    let ids = dev.zeros::<i32>(n * p.top_k)?;
    let wts = dev.zeros::<f32>(n * p.top_k)?;
    moe_route(
        dev,
        dev.ptr(&ids, 0),
        dev.ptr(&wts, 0),
        dev.ptr(&dl, 0),
        dev.ptr(&db, 0),
        n,
        p,
    )?;
    let (ids, wts) = (
        dev.download(&ids, n * p.top_k)?,
        dev.download(&wts, n * p.top_k)?,
    );
    Ok((0..n)
        .map(|t| {
            let r = t * p.top_k..(t + 1) * p.top_k;
            (
                ids[r.clone()].iter().map(|v| *v as usize).collect(),
                wts[r].to_vec(),
            )
        })
        .collect())
}

/// Stores `[n, kvr + rd]` latent rows (RMSNorm + interleaved RoPE) and `[n, id]` indexer keys
/// (LayerNorm + half-split RoPE) into caches of `dtype` at `slots`, and reads both caches back
/// as f32 (`num_slots` rows each).
#[allow(clippy::too_many_arguments)]
pub fn cache_store_host(
    dev: &Device,
    dtype: DType,
    kv: &[f32],
    kv_norm: &[f32],
    keys: &[f32],
    k_norm: (&[f32], &[f32]),
    slots: &[usize],
    positions: &[usize],
    inv_freq: &[f32],
    factor: f32,
    num_slots: usize,
) -> Result<(Vec<f32>, Vec<f32>), CudaError> {
    let n = slots.len();
    let (width, id) = (kv.len() / n, keys.len() / n);
    let (rd, kvr) = (2 * inv_freq.len(), kv.len() / n - 2 * inv_freq.len());
    let (lat_len, idx_len) = match dtype {
        DType::Fp8 => (latent_fp8_stride(kvr, rd), index_fp8_stride(id)),
        _ => (width, id),
    };
    let lat = DevBuf::zeros(dev, num_slots * lat_len, dtype)?;
    let idx = DevBuf::zeros(dev, num_slots * idx_len, dtype)?;
    let to_i = |v: &[usize]| v.iter().map(|x| *x as i32).collect::<Vec<i32>>();
    let (d_slots, d_pos) = (dev.upload(&to_i(slots))?, dev.upload(&to_i(positions))?);
    let (d_kv, d_keys, d_freq) = (dev.upload(kv)?, dev.upload(keys)?, dev.upload(inv_freq)?);
    let (d_kvn, d_kw, d_kb) = (
        dev.upload(kv_norm)?,
        dev.upload(k_norm.0)?,
        dev.upload(k_norm.1)?,
    );
    let (ps, pp, pf) = (
        dev.ptr(&d_slots, 0),
        dev.ptr(&d_pos, 0),
        dev.ptr(&d_freq, 0),
    );
    kv_store(
        dev,
        &lat,
        dev.ptr(&d_kv, 0),
        dev.ptr(&d_kvn, 0),
        ps,
        pp,
        pf,
        factor,
        n,
        kvr,
        rd,
        1e-6,
    )?;
    index_key_store(
        dev,
        &idx,
        dev.ptr(&d_keys, 0),
        dev.ptr(&d_kw, 0),
        dev.ptr(&d_kb, 0),
        ps,
        pp,
        pf,
        factor,
        n,
        id,
        rd,
        1e-6,
    )?;
    let read = |b: &DevBuf, len: usize, q: usize, tail: usize| -> Result<Vec<f32>, CudaError> {
        Ok(match b {
            DevBuf::F32(s) => dev.download(s, len)?,
            DevBuf::Bf16(s) => dev
                .download(s, len)?
                .into_iter()
                .map(|v| half::bf16::from_bits(v).to_f32())
                .collect(),
            DevBuf::Fp8(s) => {
                super::weights::decode_fp8_rows(&dev.download(s, len)?, len / num_slots, q, tail)
            }
        })
    };
    Ok((
        read(&lat, num_slots * lat_len, kvr, rd)?,
        read(&idx, num_slots * idx_len, id, 0)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::split_k;

    #[test]
    fn k_is_split_only_when_the_output_tiles_cannot_fill_the_gpu() {
        // A decode expert projection: 16 tiles of 128 outputs over 56 K blocks.
        let (per, splits) = split_k(16, 56);
        assert_eq!((per, splits), (4, 14));
        assert!(per * splits >= 56 && per * (splits - 1) < 56);
        // A prefill projection fills the GPU alone.
        assert_eq!(split_k(2048, 56), (56, 1));
        // Too few K blocks to split.
        assert_eq!(split_k(1, 3), (3, 1));
        // Every split keeps at least two K blocks.
        for tiles in 1..140 {
            for kb in 1..200 {
                let (per, splits) = split_k(tiles, kb);
                assert!(
                    per * splits >= kb && per * (splits - 1) < kb,
                    "{tiles} {kb}"
                );
                assert!(splits == 1 || per >= 2, "{tiles} {kb}: {per}");
            }
        }
    }
}
