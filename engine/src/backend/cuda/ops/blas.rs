//! cuBLAS GEMMs (bf16 linears, batched products) and the casts they need.

use super::*;

/// Element type of a cuBLAS operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CuType {
    Bf16,
    F32,
}

pub(super) fn ty_bytes(t: CuType) -> usize {
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

/// `y[n, out] = x[n, in] · Wᵀ`, by the device's [`crate::backend::cuda::Gemm`] path.
pub fn linear(dev: &Device, y: u64, x: u64, w: &DevLinear, n: usize) -> Result<(), CudaError> {
    if w.w.dtype() == DType::Fp8 {
        return linear_fp8(dev, y, x, w, n);
    }
    if dev.gemm() == crate::backend::cuda::Gemm::Cublas {
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
        &mut crate::backend::cuda::load::Uploader::direct(dev),
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
