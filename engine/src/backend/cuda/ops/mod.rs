//! Launchers of the kernels in `kernels/*.cu`, one module per kernel family beside its `.cu`
//! file: one function per kernel, arguments as raw device addresses from [`Device::ptr`], all
//! through the one typed [`launch`]; and host-to-host wrappers of single ops, used by the tests
//! to compare each op with its CPU reference. Everything is re-exported here, so callers name
//! `ops::f` whatever module holds it.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::CudaError;
use super::device::{Device, Family, Fp8Path};
use super::weights::{DType, DevBuf, DevLinear, index_fp8_stride, latent_fp8_stride};
use crate::backend::cpu::Linear;

mod attention;
mod blas;
mod elementwise;
mod fp8;
mod indexer;
mod kv_cache;
mod moe;
mod rope;
mod sample;

pub use attention::*;
pub use blas::*;
pub use elementwise::*;
pub use fp8::*;
pub use indexer::*;
pub use kv_cache::*;
pub use moe::*;
pub use rope::*;
pub use sample::*;

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
