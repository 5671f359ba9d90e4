//! Norms and elementwise ops, row gathers and the embedding (`kernels/norm.cu`).

use super::*;

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
