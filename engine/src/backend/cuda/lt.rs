//! The FP8 block-scaled GEMM of cuBLASLt (Hopper, cuBLAS 12.9 and later): E4M3 weights with one
//! f32 scale per 128x128 block (the checkpoint's `weight_scale_inv`, used as stored) times E4M3
//! activations with one f32 scale per token per 128 channels, f32 accumulation and output.
//!
//! Row-major `Y[n, o] = X[n, k] · Wᵀ` is the column-major `Yᵀ[o, n] = op(A) · B` with A the
//! weight (`[k, o]` column-major, transposed) and B the activations (`[k, n]` column-major):
//! the "TN" form FP8 needs. The activation scales go in cuBLASLt's 1x128 layout, tokens fastest
//! (`scale[kb * tokens + t]`, what `act_quant` writes block-major), with the token count
//! padded to a multiple of 4 ([`padded_tokens`]); the weight scales in its
//! 128x128 layout, `[ceil(o/128), k/128]` row-major, which is the checkpoint's.
//!
//! One [`LtFp8`] per device caches, per `(n, o, k)`, the descriptors and the algorithm the
//! heuristic picked, or the reason this cuBLASLt offers none (the caller then runs our own
//! kernel). The output is f32 where the library supports it, else bf16 and a cast.

use std::collections::HashMap;
use std::ffi::c_void;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::CudaSlice;

use super::CudaError;
use super::device::Device;

/// Workspace cuBLASLt may use per GEMM (what PyTorch gives it on Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;

/// Whether cuBLASLt's block-scaled kernel can take `(o, k)` with the checkpoint's scales as
/// stored: whole 128-wide K blocks, and a multiple of 4 of them, because the library reads each
/// row of 128x128 weight scales from a 16-byte-aligned start (`[ceil(o/128)][k/128]` f32
/// rows are packed, so K = 384 puts the second row at byte 12 and gives wrong results, as
/// measured on an H200); 16-aligned output rows. Every DeepSeek-V3.2 linear qualifies (K is
/// 7168, 1536, 512, 16384 or 2048).
pub fn shape_supported(o: usize, k: usize) -> bool {
    o > 0 && k > 0 && k.is_multiple_of(4 * 128) && o.is_multiple_of(16)
}

/// The token count cuBLASLt is given for `n` tokens: a multiple of 4, so each 128-channel
/// block's row of activation scales (`[k/128][tokens]`, f32) starts 16-byte aligned, which the
/// library requires (it offers no kernel otherwise).
pub fn padded_tokens(n: usize) -> usize {
    n.next_multiple_of(4)
}

/// Fewest tokens at which cuBLASLt's kernel beats ours, per weight shape `(o, k)`: the FP8
/// linears of DeepSeek-V3.2 (q_a, q_b, kv_a, kv_b, o_proj, an expert's gate/up and down, the
/// indexer's query projection), read off `gemms.fp8_sweep` of `deepseek-engine bench` on an H200
/// (2026-12-02, docs/PERF.md). Below it our split-K kernel wins: the library's tiles leave
/// most SMs idle and a single token pays its padding to four.
const CROSSOVER: &[((usize, usize), usize)] = &[
    ((1536, 7168), 64),
    ((24576, 1536), 1),
    ((576, 7168), 128),
    ((32768, 512), 64),
    ((7168, 16384), 1),
    ((2048, 7168), 32),
    ((7168, 2048), 8),
    ((8192, 1536), 8),
];

/// The crossover for shapes not in [`CROSSOVER`] (the table's median).
const DEFAULT_CROSSOVER: usize = 64;

/// Whether cuBLASLt's kernel is the faster one for an `n x o x k` GEMM (under
/// [`super::Fp8Gemm::Auto`]): from [`CROSSOVER`], measured once by `deepseek-engine bench` on
/// an H200 (docs/PERF.md); our split-K kernel wins at small `n`, where the library's tiles
/// leave most SMs idle.
pub fn library_wins(n: usize, o: usize, k: usize) -> bool {
    let from = CROSSOVER
        .iter()
        .find(|(shape, _)| *shape == (o, k))
        .map(|(_, n)| *n)
        .unwrap_or(DEFAULT_CROSSOVER);
    n >= from
}

fn lt_err(what: &str, e: cudarc::cublaslt::result::CublasError) -> CudaError {
    CudaError::Unsupported(format!("cuBLASLt {what}: {e:?}"))
}

/// The output element type a plan writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    F32,
    Bf16,
}

/// Descriptors and algorithm of one `(n, o, k)`.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
    out: Out,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created by this plan and is destroyed once.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.d);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// The cuBLASLt handle of one device, its workspace and the plans made so far.
pub struct LtFp8 {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: HashMap<(usize, usize, usize), Result<Plan, String>>,
}

// SAFETY: the handle and descriptors are plain library objects with no thread affinity; the
// device keeps this behind a mutex, so one thread uses them at a time.
unsafe impl Send for LtFp8 {}

impl std::fmt::Debug for LtFp8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LtFp8")
            .field("plans", &self.plans.len())
            .finish()
    }
}

impl Drop for LtFp8 {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: created in `new`, destroyed once, after every plan.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

fn set<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    v: &T,
) -> Result<(), CudaError> {
    // SAFETY: `v` is a live value of the type the attribute takes, read during the call only.
    unsafe {
        lt::set_matmul_desc_attribute(
            desc,
            attr,
            v as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )
    }
    .map_err(|e| lt_err(&format!("set {attr:?}"), e))
}

impl LtFp8 {
    /// A handle on `dev`; an error (never a panic) when libcublasLt is missing.
    pub fn new(dev: &Device) -> Result<Self, CudaError> {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { sys::is_culib_present() } {
            return Err(CudaError::Unavailable(
                "the cuBLASLt library (libcublasLt) was not found".into(),
            ));
        }
        dev.ctx.bind_to_thread()?;
        let handle = lt::create_handle().map_err(|e| lt_err("create handle", e))?;
        let workspace = dev.alloc::<u8>(WORKSPACE_BYTES)?;
        Ok(LtFp8 {
            handle,
            workspace,
            plans: HashMap::new(),
        })
    }

    fn plan(
        &self,
        dev: &Device,
        n: usize,
        o: usize,
        k: usize,
        out: Out,
    ) -> Result<Plan, CudaError> {
        use sys::cublasLtMatmulDescAttributes_t as A;
        use sys::cudaDataType as T;
        let out_ty = match out {
            Out::F32 => T::CUDA_R_32F,
            Out::Bf16 => T::CUDA_R_16BF,
        };
        let desc =
            lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, T::CUDA_R_32F)
                .map_err(|e| lt_err("matmul descriptor", e))?;
        let layout = |ty, rows: usize, cols: usize, ld: usize| {
            lt::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64)
                .map_err(|e| lt_err("matrix layout", e))
        };
        // Built field by field so a failure part-way drops what was made.
        let mut plan = Plan {
            desc,
            a: layout(T::CUDA_R_8F_E4M3, k, o, k)?,
            b: std::ptr::null_mut(),
            d: std::ptr::null_mut(),
            // SAFETY: plain-old-data, overwritten by the heuristic's choice below.
            algo: unsafe { std::mem::zeroed() },
            out,
        };
        plan.b = layout(T::CUDA_R_8F_E4M3, k, n, k)?;
        plan.d = layout(out_ty, o, n, o)?;
        set(
            plan.desc,
            A::CUBLASLT_MATMUL_DESC_TRANSA,
            &cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T,
        )?;
        set(
            plan.desc,
            A::CUBLASLT_MATMUL_DESC_TRANSB,
            &cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
        )?;
        set(
            plan.desc,
            A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE,
            &(sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F as i32),
        )?;
        set(
            plan.desc,
            A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE,
            &(sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F as i32),
        )?;
        // Scale addresses are set per call; a placeholder keeps the heuristic from seeing null.
        let placeholder = dev.ptr(&self.workspace, 0);
        set(
            plan.desc,
            A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
            &placeholder,
        )?;
        set(
            plan.desc,
            A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
            &placeholder,
        )?;
        let pref = lt::create_matmul_pref().map_err(|e| lt_err("preference", e))?;
        let ws = WORKSPACE_BYTES as u64;
        // SAFETY: `ws` outlives the call; `pref` is destroyed right after the heuristic.
        let chosen = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                std::mem::size_of::<u64>(),
            )
            .and_then(|_| {
                lt::get_matmul_algo_heuristic(
                    self.handle,
                    plan.desc,
                    plan.a,
                    plan.b,
                    plan.d,
                    plan.d,
                    pref,
                )
            })
        };
        // SAFETY: created above, not used after this.
        unsafe {
            let _ = lt::destroy_matmul_pref(pref);
        }
        plan.algo = chosen.map_err(|e| lt_err("heuristic", e))?.algo;
        Ok(plan)
    }

    /// Whether a plan exists for `(n, o, k)`, making it on first ask (f32 output first, then
    /// bf16). The reason when none does is logged once per shape ([`LtFp8::refusal`]).
    pub fn supports(&mut self, dev: &Device, n: usize, o: usize, k: usize) -> bool {
        if n == 0 || !shape_supported(o, k) {
            return false;
        }
        let n = padded_tokens(n);
        if !self.plans.contains_key(&(n, o, k)) {
            let made = self.plan(dev, n, o, k, Out::F32).or_else(|f32_err| {
                self.plan(dev, n, o, k, Out::Bf16)
                    .map_err(|bf16_err| format!("f32 output: {f32_err}; bf16 output: {bf16_err}"))
            });
            if let Err(e) = &made {
                tracing::info!(n, o, k, error = %e, "no cuBLASLt block-scaled FP8 GEMM for this shape; our kernel runs it");
            }
            self.plans.insert((n, o, k), made);
        }
        self.plans.get(&(n, o, k)).is_some_and(|p| p.is_ok())
    }

    /// Why cuBLASLt refused `(n, o, k)`, once [`LtFp8::supports`] has asked.
    pub fn refusal(&self, n: usize, o: usize, k: usize) -> Option<String> {
        match self.plans.get(&(padded_tokens(n), o, k)) {
            Some(Err(e)) => Some(e.clone()),
            _ => None,
        }
    }

    /// `y[n, o] (f32) = dequant(xa) · dequant(w)ᵀ` on the device's stream. With `np` =
    /// [`padded_tokens`]`(n)`: `xa` is E4M3 `[np, k]` and `sa` its scales `[k/128][np]` (rows
    /// past `n` zero); `w` is E4M3 `[o, k]`, `sw` its scales `[ceil(o/128)][k/128]`. Only `n`
    /// rows of `y` are written. An unsupported shape ([`LtFp8::supports`]) is an error.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &mut self,
        dev: &Device,
        y: u64,
        xa: u64,
        sa: u64,
        w: u64,
        sw: u64,
        n: usize,
        o: usize,
        k: usize,
    ) -> Result<(), CudaError> {
        use sys::cublasLtMatmulDescAttributes_t as A;
        if !self.supports(dev, n, o, k) {
            return Err(CudaError::Unsupported(format!(
                "no cuBLASLt block-scaled FP8 GEMM for {n}x{o}x{k}"
            )));
        }
        let np = padded_tokens(n);
        let Some(Ok(plan)) = self.plans.get(&(np, o, k)) else {
            unreachable!("supports() made the plan");
        };
        set(plan.desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sw)?;
        set(plan.desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sa)?;
        // D is column-major [o, np]: its first n columns are y. Padding or a bf16 output goes
        // through a staging buffer.
        let elem = match plan.out {
            Out::F32 => 4,
            Out::Bf16 => 2,
        };
        let staged = if plan.out == Out::F32 && np == n {
            None
        } else {
            Some(dev.alloc::<u8>(np * o * elem)?)
        };
        let d = staged.as_ref().map(|s| dev.ptr(s, 0)).unwrap_or(y);
        let (alpha, beta) = (1f32, 0f32);
        dev.ctx.bind_to_thread()?;
        let ws = dev.ptr(&self.workspace, 0);
        // SAFETY: the caller passes live device buffers of the extents named; the plan's
        // descriptors match them; everything is enqueued on the device's one stream.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                w as *const c_void,
                plan.a,
                xa as *const c_void,
                plan.b,
                d as *const c_void,
                plan.d,
                d as *mut c_void,
                plan.d,
                &plan.algo,
                ws as *mut c_void,
                WORKSPACE_BYTES,
                dev.stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| lt_err(&format!("matmul {n}x{o}x{k}"), e))?;
        if let Some(s) = &staged {
            match plan.out {
                Out::Bf16 => super::ops::cast_bf16_to_f32(dev, y, dev.ptr(s, 0), n * o)?,
                // SAFETY: both ranges are live device memory of at least n * o f32 values.
                Out::F32 => unsafe {
                    cudarc::driver::result::memcpy_dtod_async(
                        y,
                        dev.ptr(s, 0),
                        n * o * 4,
                        dev.stream.cu_stream(),
                    )
                }?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_k_blocks_and_aligned_outputs_go_to_the_library() {
        assert!(shape_supported(2048, 7168));
        assert!(shape_supported(16, 512));
        assert!(
            !shape_supported(256, 384),
            "scale rows of 3 blocks are not 16-byte aligned"
        );
        assert!(!shape_supported(2048, 7100), "partial K block");
        assert!(!shape_supported(2050, 7168), "output rows not 16-aligned");
        assert!(!shape_supported(0, 128));
    }

    #[test]
    fn the_measured_crossover_picks_the_library_for_prefill_and_ours_for_small_decode() {
        assert!(library_wins(4096, 2048, 7168));
        assert!(!library_wins(16, 2048, 7168));
        assert!(library_wins(32, 2048, 7168));
        assert!(library_wins(1, 7168, 16384));
        assert!(!library_wins(64, 576, 7168));
        assert!(
            !library_wins(63, 4096, 4096),
            "unknown shapes use the default"
        );
        assert!(library_wins(64, 4096, 4096));
    }

    #[test]
    fn token_counts_are_padded_to_whole_16_byte_scale_rows() {
        assert_eq!(padded_tokens(1), 4);
        assert_eq!(padded_tokens(4), 4);
        assert_eq!(padded_tokens(257), 260);
        assert_eq!(padded_tokens(4096), 4096);
    }
}
