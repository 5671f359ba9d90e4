//! The CUDA backend: the same function as the CPU reference (`backend::cpu` + `model::forward`),
//! run on one NVIDIA GPU through cudarc.
//!
//! - [`device`]: the context, its stream, and the kernels of `kernels/*.cu`, compiled by NVRTC for
//!   the device's architecture at first use (sm_90a on Hopper), cached on disk by source hash and
//!   architecture, each module loaded once per device.
//! - [`weights`]: the model's weights in device memory (f32 or bf16; norms and biases in f32).
//! - [`plan`]: the memory plan (weights, KV pages, workspace) from the config and free memory.
//! - [`executor`]: [`CudaExecutor`], the [`crate::backend::Executor`] over the paged latent and
//!   indexer-key caches in device memory.
//! - [`lt`]: cuBLASLt's FP8 block-scaled GEMM, the prefill-size path of the FP8 linears.
//! - [`ops`]: host-to-host wrappers of single kernels, for op-level checks against the CPU.
//!
//! cudarc loads the CUDA libraries at run time and panics when they are missing, so every entry
//! point first checks [`is_available`], which never panics.

pub mod bench;
pub mod device;
pub mod executor;
pub mod load;
pub mod lt;
pub mod ops;
pub mod plan;
pub mod weights;

use thiserror::Error;

pub use device::{Attention, Device, Fp8Gemm, Fp8Path, Gemm, GroupedGemm, Indexer};
pub use executor::{CudaExecutor, CudaOptions};
pub use plan::MemoryPlan;
pub use weights::DType;

#[derive(Debug, Error)]
pub enum CudaError {
    #[error("CUDA is not available: {0}")]
    Unavailable(String),
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("NVRTC could not compile kernels/{family}.cu for {arch}: {log}")]
    Compile {
        family: &'static str,
        arch: String,
        log: String,
    },
    #[error("unsupported by the CUDA backend: {0}")]
    Unsupported(String),
    /// The checkpoint could not be read while streaming it to the device.
    #[error(transparent)]
    Model(crate::model::ModelError),
    #[error(
        "the model does not fit on the device: weights {weights_mib} MiB + workspace {workspace_mib} MiB + KV cache {kv_mib} MiB > {usable_mib} MiB usable of {free_mib} MiB free"
    )]
    DoesNotFit {
        weights_mib: usize,
        workspace_mib: usize,
        kv_mib: usize,
        usable_mib: usize,
        free_mib: usize,
    },
}

impl CudaError {
    /// Short stable label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            CudaError::Unavailable(_) => "unavailable",
            CudaError::Driver(_) => "driver",
            CudaError::Compile { .. } => "compile",
            CudaError::Unsupported(_) => "unsupported",
            CudaError::Model(_) => "model",
            CudaError::DoesNotFit { .. } => "does_not_fit",
        }
    }
}

/// Why CUDA cannot be used here, or `None` when the driver and NVRTC libraries load and at
/// least one device is present. Never panics.
pub fn unavailable_reason() -> Option<String> {
    // SAFETY: these only try to dlopen the libraries; no CUDA call is made.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Some("the CUDA driver library (libcuda) was not found".into());
    }
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Some("the NVRTC library (libnvrtc) was not found".into());
    }
    match std::panic::catch_unwind(cudarc::driver::CudaContext::device_count) {
        Ok(Ok(n)) if n > 0 => None,
        Ok(Ok(_)) => Some("no CUDA device is present".into()),
        Ok(Err(e)) => Some(format!("the CUDA driver did not initialise: {e}")),
        Err(_) => Some("the CUDA driver library could not be loaded".into()),
    }
}

/// GPUs visible to this process; an error (never a panic) when CUDA cannot be used.
pub fn device_count() -> Result<usize, CudaError> {
    if let Some(why) = unavailable_reason() {
        return Err(CudaError::Unavailable(why));
    }
    Ok(cudarc::driver::CudaContext::device_count()? as usize)
}

/// True when [`CudaExecutor::new`] can be tried: driver and NVRTC present and a device visible.
pub fn is_available() -> bool {
    unavailable_reason().is_none()
}
