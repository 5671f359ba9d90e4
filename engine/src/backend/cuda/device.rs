//! One GPU: its context and stream, and the kernel families of `kernels/*.cu`.
//!
//! Each family is compiled by NVRTC for the device's architecture the first time one of its
//! kernels is needed (Hopper gets `sm_90a`), loaded once, and kept in a table indexed by
//! [`Family`]. The PTX is cached on disk under a name made of the family, the architecture and a
//! hash of the source and options, so later processes skip NVRTC.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr};
use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

use super::lt::LtFp8;
use super::{CudaError, unavailable_reason};

const COMMON: &str = include_str!("kernels/common.cuh");

/// A kernel family: one `.cu` file, one module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Linear,
    Norm,
    Rope,
    KvCache,
    Indexer,
    Attention,
    Moe,
    Fp8,
}

impl Family {
    pub const ALL: [Family; 8] = [
        Family::Linear,
        Family::Norm,
        Family::Rope,
        Family::KvCache,
        Family::Indexer,
        Family::Attention,
        Family::Moe,
        Family::Fp8,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Family::Linear => "linear",
            Family::Norm => "norm",
            Family::Rope => "rope",
            Family::KvCache => "kv_cache",
            Family::Indexer => "indexer",
            Family::Attention => "attention",
            Family::Moe => "moe",
            Family::Fp8 => "fp8",
        }
    }

    fn source(self) -> &'static str {
        match self {
            Family::Linear => include_str!("kernels/linear.cu"),
            Family::Norm => include_str!("kernels/norm.cu"),
            Family::Rope => include_str!("kernels/rope.cu"),
            Family::KvCache => include_str!("kernels/kv_cache.cu"),
            Family::Indexer => include_str!("kernels/indexer.cu"),
            Family::Attention => include_str!("kernels/attention.cu"),
            Family::Moe => include_str!("kernels/moe.cu"),
            Family::Fp8 => include_str!("kernels/fp8.cu"),
        }
    }

    /// The full translation unit NVRTC sees: the shared prelude, then the family.
    pub fn full_source(self) -> String {
        format!("{COMMON}\n{}", self.source())
    }
}

/// 64-bit FNV-1a: a hash that stays the same across Rust releases (the disk cache key).
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// NVRTC's `--gpu-architecture` for a compute capability; Hopper and Blackwell datacenter parts
/// get their arch-specific (`a`) targets.
pub fn arch_for(major: i32, minor: i32) -> String {
    match (major, minor) {
        (9, 0) => "sm_90a".into(),
        (10, 0) => "sm_100a".into(),
        (m, n) => format!("sm_{m}{n}"),
    }
}

/// Where compiled PTX is kept: `$DEEPSEEK_ENGINE_KERNEL_CACHE`, else
/// `$XDG_CACHE_HOME/deepseek-engine/kernels`, else `$HOME/.cache/deepseek-engine/kernels`, else
/// the system temporary directory.
pub fn kernel_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DEEPSEEK_ENGINE_KERNEL_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("deepseek-engine/kernels");
    }
    if let Some(d) = std::env::var_os("HOME") {
        return PathBuf::from(d).join(".cache/deepseek-engine/kernels");
    }
    std::env::temp_dir().join("deepseek-engine-kernels")
}

const NVRTC_OPTIONS: [&str; 1] = ["--std=c++17"];

/// PTX of `family` for `arch`, from the disk cache or NVRTC (then stored).
pub fn compile(family: Family, arch: &str) -> Result<String, CudaError> {
    let src = family.full_source();
    let mut key_parts = vec![src.as_str(), arch];
    key_parts.extend(NVRTC_OPTIONS);
    let key = fnv1a(&key_parts);
    let dir = kernel_cache_dir();
    let path = dir.join(format!("{}-{arch}-{key:016x}.ptx", family.name()));
    if let Ok(text) = std::fs::read_to_string(&path) {
        tracing::debug!(family = family.name(), path = %path.display(), "kernel PTX from the disk cache");
        return Ok(text);
    }
    let started = std::time::Instant::now();
    let opts = CompileOptions {
        arch: Some(Box::leak(arch.to_string().into_boxed_str())),
        options: NVRTC_OPTIONS.iter().map(|s| s.to_string()).collect(),
        name: Some(format!("{}.cu", family.name())),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(&src, opts).map_err(|e| CudaError::Compile {
        family: family.name(),
        arch: arch.to_string(),
        log: match e {
            CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => other.to_string(),
        },
    })?;
    let text = ptx.to_src();
    tracing::info!(
        family = family.name(),
        arch,
        ms = started.elapsed().as_millis() as u64,
        "compiled kernels with NVRTC"
    );
    // A failed cache write only costs a recompile next time.
    if std::fs::create_dir_all(&dir).is_ok() {
        let tmp = dir.join(format!(
            ".{}-{key:016x}.{}.tmp",
            family.name(),
            std::process::id()
        ));
        if std::fs::write(&tmp, &text).is_ok() && std::fs::rename(&tmp, &path).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(text)
}

/// How the linear layers multiply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Gemm {
    /// The tiled kernel of `kernels/linear.cu`: f32 activations times f32 or bf16 weights, f32
    /// accumulation. The same function as the CPU reference to f32 rounding.
    #[default]
    Tiled,
    /// cuBLAS: activations rounded to bf16 and multiplied with the bf16 weights on the tensor
    /// cores, f32 accumulation and output (f32 weights go through cuBLAS in f32). What serving
    /// engines do; it rounds the activations, so it differs from the reference by bf16 rounding.
    Cublas,
}

/// Which kernel runs the FP8 block-scaled GEMMs under [`Gemm::Cublas`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fp8Gemm {
    /// cuBLASLt where it beats ours at that shape ([`super::lt::library_wins`]), else ours.
    #[default]
    Auto = 0,
    /// Our split-K `mma.sync` kernel everywhere.
    Ours = 1,
    /// cuBLASLt wherever it takes the shape.
    Library = 2,
    /// The few-token kernel (`fp8_linear_few`) wherever it takes the shape, else ours.
    Few = 3,
}

/// The kernel one FP8 GEMM runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Path {
    Ours,
    Library,
    /// `fp8_linear_few`: at most [`super::ops::FEW_TOKENS`] tokens, K a multiple of 128.
    Few,
}

/// Which sparse-attention kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Attention {
    /// Warpgroup MMAs where they take the shape ([`Attention::Warpgroup`]), else `mma.sync`
    /// tensor cores on a bf16 or FP8 cache where that kernel takes it; otherwise shared heads
    /// when the step has enough tokens to fill the GPU with them, else per head.
    #[default]
    Auto = 0,
    /// One block per (token, head), each reading every selected key: the most blocks, for
    /// small decode batches.
    PerHead = 1,
    /// One block per (token, 8 heads) sharing each key read: less traffic, fewer blocks.
    SharedHeads = 2,
    /// `mma.sync` with 32 heads of a token per block (bf16 and FP8 caches, kv_lora_rank 128 or
    /// 512); falls back to [`Attention::Auto`]'s CUDA-core choice where it does not apply.
    TensorCores = 3,
    /// The CUDA-core kernels only, chosen as [`Attention::Auto`] chooses between them.
    CudaCores = 4,
    /// Hopper's warpgroup MMAs (wgmma) with 64 heads of a token per block: bf16 cache,
    /// kv_lora_rank 512 with rope 64 (the released shape), sm_90a; falls back to
    /// [`Attention::TensorCores`] where it does not apply.
    Warpgroup = 5,
}

/// Which kernel runs the grouped FP8 expert GEMMs ([`super::ops::linear_fp8_grouped`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupedGemm {
    /// Warpgroup MMAs for each expert with more rows than one tile (prefill-sized) where the
    /// device and shape take them, `mma.sync` for the rest: decode-sized experts stay on the
    /// kernel the on-device MoE path runs, so both paths give the same sums, and the choice
    /// depends on an expert's rows alone, so an expert-parallel group computes what one GPU does.
    #[default]
    Auto = 0,
    /// `fp8_linear_grouped` (`mma.sync`) always.
    Mma = 1,
    /// `fp8_linear_grouped_wgmma` wherever the device and shape take it.
    Warpgroup = 2,
}

/// Which lightning-indexer scoring kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Indexer {
    /// Tensor cores on a bf16 or FP8 cache where the kernel takes the shape, else CUDA cores.
    #[default]
    Auto = 0,
    /// The f32 CUDA-core kernel (one key per warp), the reference on the GPU.
    CudaCores = 1,
}

/// A GPU with its stream and lazily loaded kernel modules.
#[derive(Debug)]
pub struct Device {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub arch: String,
    pub name: String,
    /// Streaming multiprocessors: launch shapes that must fill the GPU count from it.
    sms: usize,
    modules: Mutex<[Option<Arc<CudaModule>>; Family::ALL.len()]>,
    gemm: AtomicU8,
    attention: AtomicU8,
    indexer: AtomicU8,
    grouped_experts: std::sync::atomic::AtomicBool,
    device_moe: std::sync::atomic::AtomicBool,
    /// Keys per block of the tensor-core indexer, when pinned (0: chosen per step).
    indexer_keys: AtomicUsize,
    /// Splits of the selected rows in the tensor-core attention, when pinned (0: chosen per step).
    mla_splits: AtomicUsize,
    /// [`GroupedGemm`] as its discriminant.
    grouped_gemm: AtomicU8,
    blas: Mutex<Option<Arc<CudaBlas>>>,
    fp8_gemm: AtomicU8,
    /// cuBLASLt, made on first use; the error text when it cannot be.
    lt: Mutex<Option<Result<LtFp8, String>>>,
}

impl Device {
    /// Opens device `ordinal`; a clear error (never a panic) when CUDA is missing.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        if let Some(reason) = unavailable_reason() {
            return Err(CudaError::Unavailable(reason));
        }
        let count = CudaContext::device_count()? as usize;
        if ordinal >= count {
            return Err(CudaError::Unavailable(format!(
                "device {ordinal} requested but only {count} present"
            )));
        }
        let ctx = CudaContext::new(ordinal)?;
        // One stream does all the work, so cudarc's cross-stream event tracking is not needed.
        // SAFETY: no other stream of this context touches our allocations.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability()?;
        let stream = ctx.default_stream();
        let name = ctx.name()?;
        let sms = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )?;
        Ok(Device {
            arch: arch_for(major, minor),
            name,
            sms: sms.max(1) as usize,
            ctx,
            stream,
            modules: Mutex::new(Default::default()),
            gemm: AtomicU8::new(0),
            attention: AtomicU8::new(0),
            indexer: AtomicU8::new(0),
            grouped_experts: std::sync::atomic::AtomicBool::new(true),
            device_moe: std::sync::atomic::AtomicBool::new(true),
            indexer_keys: AtomicUsize::new(0),
            mla_splits: AtomicUsize::new(0),
            grouped_gemm: AtomicU8::new(0),
            blas: Mutex::new(None),
            fp8_gemm: AtomicU8::new(0),
            lt: Mutex::new(None),
        })
    }

    pub fn gemm(&self) -> Gemm {
        match self.gemm.load(Ordering::Relaxed) {
            1 => Gemm::Cublas,
            _ => Gemm::Tiled,
        }
    }

    /// Chooses the linear-layer path; [`Gemm::Cublas`] fails here, not at the first step, when
    /// cuBLAS cannot be loaded.
    pub fn set_gemm(&self, gemm: Gemm) -> Result<(), CudaError> {
        if gemm == Gemm::Cublas {
            self.blas()?;
        }
        self.gemm.store(gemm as u8, Ordering::Relaxed);
        Ok(())
    }

    pub fn fp8_gemm(&self) -> Fp8Gemm {
        match self.fp8_gemm.load(Ordering::Relaxed) {
            1 => Fp8Gemm::Ours,
            2 => Fp8Gemm::Library,
            3 => Fp8Gemm::Few,
            _ => Fp8Gemm::Auto,
        }
    }

    /// Chooses the FP8 GEMM kernel (tests and the benchmark pin one to compare them).
    pub fn set_fp8_gemm(&self, g: Fp8Gemm) {
        self.fp8_gemm.store(g as u8, Ordering::Relaxed);
    }

    /// The kernel an `n x o x k` FP8 GEMM runs on: the few-token kernel for decode-sized steps,
    /// else ours unless cuBLASLt loads, takes the shape and is chosen for it.
    pub fn fp8_gemm_path(&self, n: usize, o: usize, k: usize) -> Fp8Path {
        let few = super::ops::few_tokens_apply(n, k);
        let wanted = match self.fp8_gemm() {
            Fp8Gemm::Ours => false,
            Fp8Gemm::Library => true,
            Fp8Gemm::Few | Fp8Gemm::Auto if few => return Fp8Path::Few,
            Fp8Gemm::Few => false,
            Fp8Gemm::Auto => super::lt::library_wins(n, o, k),
        };
        if wanted && super::lt::shape_supported(o, k) {
            let takes = self.with_lt(|lt| Ok(lt.supports(self, n, o, k)));
            if takes.unwrap_or(false) {
                return Fp8Path::Library;
            }
        }
        Fp8Path::Ours
    }

    /// Why cuBLASLt does not run an `n x o x k` FP8 GEMM here (library missing, or the shape
    /// refused), or `None` when it does.
    pub fn fp8_library_refusal(&self, n: usize, o: usize, k: usize) -> Option<String> {
        if !super::lt::shape_supported(o, k) {
            return Some(format!(
                "{o}x{k}: K is not a multiple of 512 (16-byte-aligned weight-scale rows) or the output rows are not 16-aligned"
            ));
        }
        match self.with_lt(|lt| {
            Ok(if lt.supports(self, n, o, k) {
                None
            } else {
                lt.refusal(n, o, k)
            })
        }) {
            Ok(r) => r,
            Err(e) => Some(e.to_string()),
        }
    }

    /// Runs `f` with this device's cuBLASLt state, making it on first use; an error when the
    /// library cannot be loaded (logged once, when first tried).
    pub fn with_lt<R>(
        &self,
        f: impl FnOnce(&mut LtFp8) -> Result<R, CudaError>,
    ) -> Result<R, CudaError> {
        let mut slot = self.lt.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let made = LtFp8::new(self).map_err(|e| e.to_string());
            if let Err(e) = &made {
                tracing::warn!(error = %e, "cuBLASLt is unavailable; FP8 GEMMs run on our kernel");
            }
            *slot = Some(made);
        }
        match slot.as_mut() {
            Some(Ok(lt)) => f(lt),
            Some(Err(e)) => Err(CudaError::Unavailable(e.clone())),
            None => unreachable!("set above"),
        }
    }

    pub fn attention(&self) -> Attention {
        match self.attention.load(Ordering::Relaxed) {
            1 => Attention::PerHead,
            2 => Attention::SharedHeads,
            3 => Attention::TensorCores,
            4 => Attention::CudaCores,
            5 => Attention::Warpgroup,
            _ => Attention::Auto,
        }
    }

    pub fn indexer(&self) -> Indexer {
        match self.indexer.load(Ordering::Relaxed) {
            1 => Indexer::CudaCores,
            _ => Indexer::Auto,
        }
    }

    /// Whether an MoE layer's FP8 experts may run as grouped GEMMs (one launch per projection
    /// for every expert) where each expert has few rows; off, every expert runs its own.
    pub fn grouped_experts(&self) -> bool {
        self.grouped_experts.load(Ordering::Relaxed)
    }

    /// Allows or forbids the grouped expert GEMMs (tests compare both).
    pub fn set_grouped_experts(&self, on: bool) {
        self.grouped_experts.store(on, Ordering::Relaxed);
    }

    /// Streaming multiprocessors on this GPU.
    pub fn sm_count(&self) -> usize {
        self.sms
    }

    /// Keys per block of the tensor-core indexer, when pinned.
    pub fn indexer_keys_per_block(&self) -> Option<usize> {
        Some(self.indexer_keys.load(Ordering::Relaxed)).filter(|k| *k > 0)
    }

    /// Pins the tensor-core indexer's keys per block (one of
    /// [`super::ops::INDEXER_KEYS_PER_BLOCK`]), or lets each step choose (`None`).
    pub fn set_indexer_keys_per_block(&self, keys: Option<usize>) {
        self.indexer_keys
            .store(keys.unwrap_or(0), Ordering::Relaxed);
    }

    /// The grouped expert GEMMs' kernel setting.
    pub fn grouped_gemm(&self) -> GroupedGemm {
        match self.grouped_gemm.load(Ordering::Relaxed) {
            1 => GroupedGemm::Mma,
            2 => GroupedGemm::Warpgroup,
            _ => GroupedGemm::Auto,
        }
    }

    /// Chooses the grouped expert GEMMs' kernel (tests and the benchmark compare them).
    pub fn set_grouped_gemm(&self, g: GroupedGemm) {
        self.grouped_gemm.store(g as u8, Ordering::Relaxed);
    }

    /// Splits of the selected rows in the tensor-core sparse attention, when pinned.
    pub fn sparse_mla_splits(&self) -> Option<usize> {
        Some(self.mla_splits.load(Ordering::Relaxed)).filter(|s| *s > 0)
    }

    /// Pins the tensor-core sparse attention's splits of the selected rows (at least 1), or
    /// lets each step choose (`None`); the benchmark's sweep and the tests pin them.
    pub fn set_sparse_mla_splits(&self, splits: Option<usize>) {
        self.mla_splits
            .store(splits.unwrap_or(0), Ordering::Relaxed);
    }

    /// Whether decode-sized MoE steps may route, sort and run their grouped experts wholly on
    /// the device; off, the expert ids come to the host to be sorted (same kernels, same sums).
    pub fn device_moe(&self) -> bool {
        self.device_moe.load(Ordering::Relaxed)
    }

    /// Allows or forbids the on-device MoE path (tests compare both).
    pub fn set_device_moe(&self, on: bool) {
        self.device_moe.store(on, Ordering::Relaxed);
    }

    /// Chooses the indexer's scoring kernel (tests and the benchmark compare both).
    pub fn set_indexer(&self, i: Indexer) {
        self.indexer.store(i as u8, Ordering::Relaxed);
    }

    /// Chooses the sparse-attention kernel (tests pin one to check each against the CPU).
    pub fn set_attention(&self, a: Attention) {
        self.attention.store(a as u8, Ordering::Relaxed);
    }

    /// The cuBLAS handle on this device's stream, created on first use.
    pub fn blas(&self) -> Result<Arc<CudaBlas>, CudaError> {
        let mut slot = self.blas.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = &*slot {
            return Ok(b.clone());
        }
        // SAFETY: only tries to dlopen the library; cudarc panics on a missing one otherwise.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(CudaError::Unavailable(
                "the cuBLAS library (libcublas) was not found".into(),
            ));
        }
        let b = Arc::new(
            CudaBlas::new(self.stream.clone())
                .map_err(|e| CudaError::Unsupported(format!("cuBLAS init: {e:?}")))?,
        );
        *slot = Some(b.clone());
        Ok(b)
    }

    /// The kernel `name` of `family`, compiling and loading the family on first use.
    pub fn function(&self, family: Family, name: &str) -> Result<CudaFunction, CudaError> {
        let idx = Family::ALL.iter().position(|f| *f == family).unwrap_or(0);
        let module = {
            let mut mods = self.modules.lock().unwrap_or_else(|p| p.into_inner());
            match &mods[idx] {
                Some(m) => m.clone(),
                None => {
                    let ptx = compile(family, &self.arch)?;
                    let m = self.ctx.load_module(Ptx::from_src(ptx))?;
                    mods[idx] = Some(m.clone());
                    m
                }
            }
        };
        Ok(module.load_function(name)?)
    }

    /// Compiles and loads every family now (start-up cost up front, errors early).
    pub fn load_all(&self) -> Result<(), CudaError> {
        for f in Family::ALL {
            // Any kernel name works to force the load; a missing name is an error we want.
            let probe = match f {
                Family::Linear => "linear_f32",
                Family::Norm => "rms_norm_f32",
                Family::Rope => "rope_f32",
                Family::KvCache => "kv_store_f32",
                Family::Indexer => "topk_select",
                Family::Attention => "sparse_mla_f32",
                Family::Moe => "moe_route",
                Family::Fp8 => "fp8_linear_mma",
            };
            self.function(f, probe)?;
        }
        Ok(())
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize), CudaError> {
        Ok(self.ctx.mem_get_info()?)
    }

    /// A zeroed device buffer of `len` elements (at least one, so empty steps need no special case).
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>, CudaError> {
        Ok(self.stream.alloc_zeros::<T>(len.max(1))?)
    }

    /// An uninitialised device buffer of `len` elements (at least one).
    pub fn alloc<T: DeviceRepr>(&self, len: usize) -> Result<CudaSlice<T>, CudaError> {
        // SAFETY: every caller writes the buffer with a kernel before reading it.
        Ok(unsafe { self.stream.alloc::<T>(len.max(1)) }?)
    }

    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>, CudaError> {
        if host.is_empty() {
            return Ok(unsafe { self.stream.alloc::<T>(1) }?);
        }
        Ok(self.stream.clone_htod(host)?)
    }

    pub fn download<T: DeviceRepr + Default + Clone>(
        &self,
        dev: &CudaSlice<T>,
        len: usize,
    ) -> Result<Vec<T>, CudaError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut out = vec![T::default(); len];
        self.stream.memcpy_dtoh(&dev.slice(..len), &mut out)?;
        self.stream.synchronize()?;
        Ok(out)
    }

    /// The raw address of element `offset` of `buf`, for kernel arguments. All work runs on
    /// [`Device::stream`] in order, so no cross-stream synchronisation is involved.
    pub fn ptr<T>(&self, buf: &CudaSlice<T>, offset: usize) -> u64 {
        let (p, _sync) = buf.device_ptr(&self.stream);
        p + (offset * std::mem::size_of::<T>()) as u64
    }
}
