//! Rotary position embedding (`kernels/rope.cu`).

use super::*;

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
