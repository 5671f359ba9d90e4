//! The MoE router, the on-device sort of routed rows and the weighted combine (`kernels/moe.cu`).

use super::*;

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
    pub(super) tile_expert: cudarc::driver::CudaSlice<i32>,
    pub(super) tile_row0: cudarc::driver::CudaSlice<i32>,
    pub(super) tile_row_end: cudarc::driver::CudaSlice<i32>,
    pub(super) tile_count: cudarc::driver::CudaSlice<i32>,
    pub rows: usize,
    /// The most tiles the plan can hold: the grouped launches' grid.
    pub(super) max_tiles: usize,
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
