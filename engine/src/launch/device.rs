//! Which backend computes (`--backend`), decided once at start and logged with its reason, and
//! the GPU's weight and cache storage (`--weight-dtype`, `--kv-cache-dtype`).

use super::{Error, ModelOptions, Result};
use crate::backend::cuda::DType;

/// `--backend`: where the model computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendFlag {
    Cpu,
    Cuda,
    /// The GPU when one is usable, else the CPU.
    Auto,
}

/// Where the model computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compute {
    Cpu,
    Cuda,
}

/// The backend chosen, and why, in words for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendChoice {
    pub compute: Compute,
    pub reason: String,
}

/// Decides the backend from the flag and whether a GPU is usable (`gpu_unavailable` says why
/// not). Expert parallelism runs on either backend, so `ranks` only shows in the reason.
pub fn choose_backend(
    flag: BackendFlag,
    gpu_unavailable: Option<&str>,
    ranks: usize,
) -> Result<BackendChoice> {
    let choice = |compute, reason: String| Ok(BackendChoice { compute, reason });
    match (flag, gpu_unavailable) {
        (BackendFlag::Cpu, _) => choice(Compute::Cpu, "--backend cpu".into()),
        (BackendFlag::Cuda, Some(why)) => Err(Error::Options(format!(
            "--backend cuda: CUDA is not available: {why}"
        ))),
        (BackendFlag::Cuda, None) => choice(Compute::Cuda, "--backend cuda".into()),
        (BackendFlag::Auto, Some(_)) => choice(
            Compute::Cpu,
            "no usable GPU was found (RUST_LOG=debug says why)".into(),
        ),
        (BackendFlag::Auto, None) if ranks > 1 => choice(
            Compute::Cuda,
            format!("a GPU is usable; {ranks} expert-parallel ranks, one GPU each"),
        ),
        (BackendFlag::Auto, None) => choice(Compute::Cuda, "a GPU is usable".into()),
    }
}

/// [`choose_backend`] on this machine, logged.
pub fn choose_here(flag: BackendFlag, ranks: usize) -> Result<BackendChoice> {
    // Only `auto` and `cuda` probe the driver; `--backend cpu` never touches it.
    let why = match flag {
        BackendFlag::Cpu => None,
        _ => crate::backend::cuda::unavailable_reason(),
    };
    if let Some(why) = &why {
        tracing::debug!(%why, "no usable GPU");
    }
    let choice = choose_backend(flag, why.as_deref(), ranks)?;
    let backend = match choice.compute {
        Compute::Cpu => "cpu",
        Compute::Cuda => "cuda",
    };
    tracing::info!(backend, reason = %choice.reason, ranks, "backend chosen");
    Ok(choice)
}

/// The GPU's weight and cache storage chosen by `--weight-dtype` and `--kv-cache-dtype`.
pub fn gpu_dtypes(opts: &ModelOptions, fp8_checkpoint: bool) -> Result<(DType, DType)> {
    let parse = |flag: &str, v: &str, auto: DType| -> Result<DType> {
        if v == "auto" {
            return Ok(auto);
        }
        DType::parse(v).ok_or_else(|| {
            Error::Options(format!("{flag} must be fp8, bf16, f32 or auto, got {v:?}"))
        })
    };
    let weights = parse(
        "--weight-dtype",
        &opts.weight_dtype,
        if fp8_checkpoint {
            DType::Fp8
        } else {
            DType::Bf16
        },
    )?;
    let cache = parse("--kv-cache-dtype", &opts.kv_cache_dtype, DType::Bf16)?;
    Ok((weights, cache))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_GPU: Option<&str> = Some("no CUDA device is present");

    #[test]
    fn expert_parallelism_takes_the_gpu_when_one_is_usable() {
        for flag in [BackendFlag::Auto, BackendFlag::Cuda] {
            let c = choose_backend(flag, None, 4).unwrap();
            assert_eq!(c.compute, Compute::Cuda);
        }
        let c = choose_backend(BackendFlag::Auto, None, 4).unwrap();
        assert!(c.reason.contains("4 expert-parallel ranks"), "{}", c.reason);
    }

    #[test]
    fn an_explicit_cpu_backend_runs_expert_parallelism_anywhere() {
        for gpu in [None, NO_GPU] {
            for ranks in [1, 2, 16] {
                let c = choose_backend(BackendFlag::Cpu, gpu, ranks).unwrap();
                assert_eq!(c.compute, Compute::Cpu);
            }
        }
    }

    #[test]
    fn auto_takes_the_gpu_for_one_rank_and_the_cpu_without_a_gpu() {
        assert_eq!(
            choose_backend(BackendFlag::Auto, None, 1).unwrap().compute,
            Compute::Cuda
        );
        let c = choose_backend(BackendFlag::Auto, NO_GPU, 4).unwrap();
        assert_eq!(c.compute, Compute::Cpu);
        assert!(c.reason.contains("no usable GPU"), "{}", c.reason);
    }

    #[test]
    fn cuda_without_a_gpu_says_why() {
        let e = choose_backend(BackendFlag::Cuda, NO_GPU, 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--backend cuda") && e.contains("no CUDA device"),
            "{e}"
        );
        assert_eq!(
            choose_backend(BackendFlag::Cuda, None, 1).unwrap().compute,
            Compute::Cuda
        );
    }
}
