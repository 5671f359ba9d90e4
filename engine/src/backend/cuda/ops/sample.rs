//! Device-side sampling statistics and candidates (`kernels/indexer.cu`).

use super::*;

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
