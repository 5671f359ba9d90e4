//! FP8 block-scaled linears: activation quantization and the three GEMM paths (few-token,
//! split-K, cuBLASLt), and the grouped expert GEMMs (`kernels/fp8.cu`).

use super::*;

/// Where [`act_quant`] writes a token's scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleLayout {
    /// `[n][ceil(k/128)]`: a token's scales together (our kernels).
    TokenMajor,
    /// `[ceil(k/128)][stride]`: tokens fastest, `stride >= n` (cuBLASLt's 1x128 mode).
    BlockMajor { stride: usize },
}

/// Per-token, per-128-channel E4M3 quantization of `x[n, k]` into `codes[n, k]` and its scales.
#[allow(clippy::too_many_arguments)]
pub fn act_quant(
    dev: &Device,
    codes: u64,
    scales: u64,
    x: u64,
    n: usize,
    k: usize,
    pow2: bool,
    layout: ScaleLayout,
) -> Result<(), CudaError> {
    let args = [
        Arg::P(codes),
        Arg::P(scales),
        Arg::P(x),
        i(n),
        i(k),
        i(pow2 as usize),
        i(match layout {
            ScaleLayout::TokenMajor => 0,
            ScaleLayout::BlockMajor { stride } => stride.max(1),
        }),
    ];
    // Whole 128-groups on 16-byte boundaries take the vectorized kernel (same results).
    if k.is_multiple_of(128) && x.is_multiple_of(16) && codes.is_multiple_of(4) {
        let grid = (blocks(n * (k / 128), 8), 1, 1);
        return launch(dev, Family::Fp8, "act_quant_128", grid, 256, 0, &args);
    }
    launch(
        dev,
        Family::Fp8,
        "act_quant",
        (n as u32, blocks(k, 128), 1),
        32,
        0,
        &args,
    )
}

/// E4M3 codes and `amax / 448` scales per 128×128 block of the f32 matrix `w[rows, cols]`.
pub fn quant_weight_blocks(
    dev: &Device,
    codes: u64,
    scale_inv: u64,
    w: u64,
    rows: usize,
    cols: usize,
) -> Result<(), CudaError> {
    launch(
        dev,
        Family::Fp8,
        "quant_weight_blocks",
        (blocks(rows, 128), blocks(cols, 128), 1),
        256,
        0,
        &[
            Arg::P(codes),
            Arg::P(scale_inv),
            Arg::P(w),
            i(rows),
            i(cols),
        ],
    )
}

/// How to split K (in 128-wide blocks) so `tiles` output tiles keep every SM busy: (K blocks
/// per split, splits). No split when the tiles alone fill about two waves of a 132-SM GPU.
pub fn split_k(tiles: usize, k_blocks: usize) -> (usize, usize) {
    const TARGET_BLOCKS: usize = 264;
    if tiles >= TARGET_BLOCKS / 2 || k_blocks < 4 {
        return (k_blocks.max(1), 1);
    }
    let splits = TARGET_BLOCKS.div_ceil(tiles).min(k_blocks / 2).max(1);
    let per = k_blocks.div_ceil(splits);
    (per, k_blocks.div_ceil(per))
}

/// The FP8 linear: activations quantized per token and 128 channels, then the block-scaled
/// GEMM, on the tensor cores ([`crate::backend::cuda::Gemm::Cublas`], the serving path: cuBLASLt's kernel or
/// ours, by [`super::Device::fp8_gemm_path`]) or in the reference order on the CUDA cores
/// ([`crate::backend::cuda::Gemm::Tiled`]).
pub(super) fn linear_fp8(
    dev: &Device,
    y: u64,
    x: u64,
    w: &DevLinear,
    n: usize,
) -> Result<(), CudaError> {
    let (o, k) = (w.out_dim, w.in_dim);
    let scale_inv = w
        .scale_inv
        .as_ref()
        .ok_or_else(|| CudaError::Unsupported("an FP8 weight without its block scales".into()))?;
    let (wptr, sptr) = (w.w.ptr(dev), dev.ptr(scale_inv, 0));
    if dev.gemm() == crate::backend::cuda::Gemm::Cublas
        && dev.fp8_gemm_path(n, o, k) == Fp8Path::Library
    {
        // The library's token count is padded (its scale rows are 16-byte aligned); padding
        // tokens have zero codes and scales and their outputs are dropped.
        let np = crate::backend::cuda::lt::padded_tokens(n);
        let (xa, sa) = if np == n {
            (dev.alloc::<u8>(n * k)?, dev.alloc::<f32>(n * k / 128)?)
        } else {
            (dev.zeros::<u8>(np * k)?, dev.zeros::<f32>(np * k / 128)?)
        };
        let (pxa, psa) = (dev.ptr(&xa, 0), dev.ptr(&sa, 0));
        let layout = ScaleLayout::BlockMajor { stride: np };
        act_quant(dev, pxa, psa, x, n, k, w.pow2_act, layout)?;
        return dev.with_lt(|lt| lt.gemm(dev, y, pxa, psa, wptr, sptr, n, o, k));
    }
    let xa = dev.alloc::<u8>(n * k)?;
    let sa = dev.alloc::<f32>(n * k.div_ceil(128))?;
    let (pxa, psa) = (dev.ptr(&xa, 0), dev.ptr(&sa, 0));
    act_quant(dev, pxa, psa, x, n, k, w.pow2_act, ScaleLayout::TokenMajor)?;
    if dev.gemm() == crate::backend::cuda::Gemm::Cublas
        && dev.fp8_gemm_path(n, o, k) == Fp8Path::Few
    {
        return linear_fp8_few(dev, y, (pxa, psa), (wptr, sptr), n, o, k);
    }
    if dev.gemm() != crate::backend::cuda::Gemm::Cublas {
        return launch(
            dev,
            Family::Fp8,
            "fp8_linear_simple",
            (blocks(o, 8), n as u32, 1),
            256,
            0,
            &[
                Arg::P(y),
                Arg::P(pxa),
                Arg::P(psa),
                Arg::P(wptr),
                Arg::P(sptr),
                i(n),
                i(o),
                i(k),
            ],
        );
    }
    // The pipelined kernel needs 16-byte rows (K a multiple of 16); odd K takes the plain one.
    let (name, rows, threads) = if k.is_multiple_of(16) {
        ("fp8_linear_pipe", 64, 128)
    } else if n > 32 {
        ("fp8_linear_mma_m64", 64, 256)
    } else {
        ("fp8_linear_mma", 32, 128)
    };
    let (kbs, splits) = split_k(blocks(o, 128) as usize * n.div_ceil(rows), k.div_ceil(128));
    into_splits(dev, y, n * o, splits, |dst| {
        launch(
            dev,
            Family::Fp8,
            name,
            (blocks(o, 128), blocks(n, rows), splits as u32),
            threads,
            0,
            &[
                Arg::P(dst),
                Arg::P(pxa),
                Arg::P(psa),
                Arg::P(wptr),
                Arg::P(sptr),
                i(n),
                i(o),
                i(k),
                i(kbs),
            ],
        )
    })
}

/// Runs `write(dst)`, a launch that writes `splits` partial results of `len` values each at
/// `dst`, then sums them into `y` in order; with one split, `dst` is `y` itself.
fn into_splits(
    dev: &Device,
    y: u64,
    len: usize,
    splits: usize,
    write: impl FnOnce(u64) -> Result<(), CudaError>,
) -> Result<(), CudaError> {
    if splits <= 1 {
        return write(y);
    }
    let parts = dev.alloc::<f32>(splits * len)?;
    write(dev.ptr(&parts, 0))?;
    sum_splits(dev, y, dev.ptr(&parts, 0), len, splits)
}

/// `y[i] = Σ_z parts[z·len + i]`, the splits summed in order (results do not depend on
/// scheduling).
fn sum_splits(
    dev: &Device,
    y: u64,
    parts: u64,
    len: usize,
    splits: usize,
) -> Result<(), CudaError> {
    launch(
        dev,
        Family::Fp8,
        "sum_splits",
        (blocks(len, 256).clamp(1, 65_535), 1, 1),
        256,
        0,
        &[Arg::P(y), Arg::P(parts), Arg::L(len as i64), i(splits)],
    )
}

/// The most tokens `fp8_linear_few` takes (the MMA's N).
pub const FEW_TOKENS: usize = 8;

/// Whether an `n`-token FP8 GEMM over `k` inputs fits `fp8_linear_few`.
pub fn few_tokens_apply(n: usize, k: usize) -> bool {
    (1..=FEW_TOKENS).contains(&n) && k.is_multiple_of(128)
}

/// `y[n, o] = x · Wᵀ` by `fp8_linear_few` over quantized activations `(codes, scales)`
/// (token-major) and the weight's `(codes, block scales)`; K split over enough blocks to fill
/// the GPU (at least one 128-column block per warp), the splits summed in order.
fn linear_fp8_few(
    dev: &Device,
    y: u64,
    (xa, sa): (u64, u64),
    (w, sw): (u64, u64),
    n: usize,
    o: usize,
    k: usize,
) -> Result<(), CudaError> {
    let row_blocks = o.div_ceil(16);
    let groups = k / 128;
    let splits = (2 * dev.sm_count())
        .div_ceil(row_blocks)
        .clamp(1, (groups / 8).clamp(1, 16));
    into_splits(dev, y, n * o, splits, |dst| {
        launch(
            dev,
            Family::Fp8,
            "fp8_linear_few",
            (row_blocks as u32, splits as u32, 1),
            256,
            0,
            &[
                Arg::P(dst),
                Arg::P(xa),
                Arg::P(sa),
                Arg::P(w),
                Arg::P(sw),
                i(n),
                i(o),
                i(k),
            ],
        )
    })
}

/// Rows of one tile of [`linear_fp8_grouped`] (`kernels/fp8.cu::PM`).
pub const GROUPED_TILE_ROWS: usize = 64;

/// Activation rows quantized for [`linear_fp8_grouped`]: E4M3 codes `[rows, k]` and scales per
/// token and 128 channels, token-major, by one scale rule (`pow2`).
pub struct QuantizedRows {
    codes: cudarc::driver::CudaSlice<u8>,
    scales: cudarc::driver::CudaSlice<f32>,
    rows: usize,
    k: usize,
    pow2: bool,
}

/// Quantizes `rows` activation rows of `k` channels at `x` once, for every grouped linear that
/// reads them.
pub fn quantize_rows(
    dev: &Device,
    x: u64,
    rows: usize,
    k: usize,
    pow2: bool,
) -> Result<QuantizedRows, CudaError> {
    let codes = dev.alloc::<u8>(rows * k)?;
    let scales = dev.alloc::<f32>(rows * k.div_ceil(128))?;
    let (pc, ps) = (dev.ptr(&codes, 0), dev.ptr(&scales, 0));
    act_quant(dev, pc, ps, x, rows, k, pow2, ScaleLayout::TokenMajor)?;
    Ok(QuantizedRows {
        codes,
        scales,
        rows,
        k,
        pow2,
    })
}

/// Dynamic shared memory of `fp8_linear_grouped_wgmma`: four stages of a 64-row activation
/// block and a 128-row weight block of 128 bytes each, and room to align them to 1,024 bytes.
const GROUPED_WGMMA_SMEM: usize = 4 * (GROUPED_TILE_ROWS + 128) * 128 + 1024;

/// Whether the warpgroup grouped kernel takes this device and K (Hopper's `sm_90a`, K a
/// multiple of 128, one activation scale per 128-column block of both operands).
pub fn grouped_wgmma_applies(dev: &Device, k: usize) -> bool {
    dev.arch == "sm_90a" && k > 0 && k.is_multiple_of(128)
}

/// Which grouped kernel takes a group of `rows` rows: the warpgroup one where `warpgroup_ok`
/// (the device and K take it) and the device's [`crate::backend::cuda::GroupedGemm`] setting
/// wants it; under `Auto`, only groups of more rows than one tile (prefill-sized). The choice
/// depends on the group alone, so an expert's rows go through the same kernel whether its layer
/// runs on one GPU or its experts are spread over an expert-parallel group.
fn group_takes_warpgroup(
    setting: crate::backend::cuda::device::GroupedGemm,
    warpgroup_ok: bool,
    rows: usize,
) -> bool {
    use crate::backend::cuda::device::GroupedGemm;
    warpgroup_ok
        && match setting {
            GroupedGemm::Auto => rows > GROUPED_TILE_ROWS,
            GroupedGemm::Warpgroup => true,
            GroupedGemm::Mma => false,
        }
}

/// One grouped GEMM tile: rows `row0..row_end` of the sorted activations through group
/// `group`'s weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GroupedTile {
    group: usize,
    row0: usize,
    row_end: usize,
}

/// The tiles of groups `(first row, rows)`: each group cut into tiles of at most
/// [`GROUPED_TILE_ROWS`] rows, in order; the first list for the `mma.sync` kernel, the second
/// for the warpgroup kernel, as `warpgroup(rows)` says per group.
fn grouped_tiles(
    groups: &[(usize, usize)],
    warpgroup: impl Fn(usize) -> bool,
) -> [Vec<GroupedTile>; 2] {
    let mut kernels: [Vec<GroupedTile>; 2] = [Vec::new(), Vec::new()];
    for (group, &(start, count)) in groups.iter().enumerate() {
        let list = &mut kernels[usize::from(warpgroup(count))];
        for t0 in (0..count).step_by(GROUPED_TILE_ROWS) {
            list.push(GroupedTile {
                group,
                row0: start + t0,
                row_end: start + (t0 + GROUPED_TILE_ROWS).min(count),
            });
        }
    }
    kernels
}

/// Many FP8 linears of one shape in one launch per kernel: `x` holds activation rows sorted by
/// weight, and `groups[i] = (weight, first row, rows)` says which rows weight i multiplies;
/// every row of `y[x.rows, out]` covered by a group is written. Groups of decode size run on
/// `mma.sync` and, on Hopper, larger ones on warpgroup MMAs ([`group_takes_warpgroup`]).
pub fn linear_fp8_grouped(
    dev: &Device,
    y: u64,
    x: &QuantizedRows,
    groups: &[(&DevLinear, usize, usize)],
) -> Result<(), CudaError> {
    let Some(&(first, ..)) = groups.first() else {
        return Ok(());
    };
    let (o, k) = (first.out_dim, x.k);
    if !k.is_multiple_of(16) {
        return Err(CudaError::Unsupported(format!(
            "grouped FP8 linears need K a multiple of 16, not {k}"
        )));
    }
    let mut operands = Vec::with_capacity(groups.len());
    for (w, start, count) in groups {
        let scale = match (&w.scale_inv, w.w.dtype()) {
            (Some(s), DType::Fp8) if (w.out_dim, w.in_dim) == (o, k) && w.pow2_act == x.pow2 => s,
            _ => {
                return Err(CudaError::Unsupported(
                    "grouped FP8 linears need FP8 weights of one shape and of the activations' scale rule".into(),
                ));
            }
        };
        if start + count > x.rows {
            return Err(CudaError::Unsupported(format!(
                "a group's rows {start}..{} exceed the {} rows given",
                start + count,
                x.rows
            )));
        }
        operands.push((w.w.ptr(dev), dev.ptr(scale, 0)));
    }
    let (setting, warpgroup_ok) = (dev.grouped_gemm(), grouped_wgmma_applies(dev, k));
    let spans: Vec<(usize, usize)> = groups.iter().map(|g| (g.1, g.2)).collect();
    let [mma, warpgroup] = grouped_tiles(&spans, |rows| {
        group_takes_warpgroup(setting, warpgroup_ok, rows)
    });
    for (tiles, name, smem) in [
        (mma, "fp8_linear_grouped", 0),
        (warpgroup, "fp8_linear_grouped_wgmma", GROUPED_WGMMA_SMEM),
    ] {
        if tiles.is_empty() {
            continue;
        }
        let w_ptrs: Vec<u64> = tiles.iter().map(|t| operands[t.group].0).collect();
        let s_ptrs: Vec<u64> = tiles.iter().map(|t| operands[t.group].1).collect();
        let row0: Vec<i32> = tiles.iter().map(|t| t.row0 as i32).collect();
        let row_end: Vec<i32> = tiles.iter().map(|t| t.row_end as i32).collect();
        let (dw, ds) = (dev.upload(&w_ptrs)?, dev.upload(&s_ptrs)?);
        let (dr0, dr1) = (dev.upload(&row0)?, dev.upload(&row_end)?);
        launch(
            dev,
            Family::Fp8,
            name,
            (blocks(o, 128), tiles.len() as u32, 1),
            128,
            smem as u32,
            &[
                Arg::P(y),
                Arg::P(dev.ptr(&x.codes, 0)),
                Arg::P(dev.ptr(&x.scales, 0)),
                Arg::P(dev.ptr(&dw, 0)),
                Arg::P(dev.ptr(&ds, 0)),
                Arg::P(dev.ptr(&dr0, 0)),
                Arg::P(dev.ptr(&dr1, 0)),
                i(o),
                i(k),
            ],
        )?;
    }
    Ok(())
}

/// An MoE layer's FP8 routed experts of one projection as device tables indexed by expert id
/// (weight codes and 128×128 block scales), so a grouped GEMM picks each tile's expert on the
/// device ([`linear_fp8_grouped_table`]).
#[derive(Debug)]
pub struct ExpertTable {
    weights: cudarc::driver::CudaSlice<u64>,
    scales: cudarc::driver::CudaSlice<u64>,
    out_dim: usize,
    in_dim: usize,
    pow2_act: bool,
}

impl ExpertTable {
    /// `None` unless every expert is given, FP8 with block scales, all of one shape and one
    /// activation-scale rule.
    pub fn build(dev: &Device, experts: &[Option<&DevLinear>]) -> Result<Option<Self>, CudaError> {
        let Some(Some(first)) = experts.first() else {
            return Ok(None);
        };
        let (mut weights, mut scales) = (Vec::new(), Vec::new());
        for w in experts {
            match w {
                Some(w)
                    if w.w.dtype() == DType::Fp8
                        && (w.out_dim, w.in_dim, w.pow2_act)
                            == (first.out_dim, first.in_dim, first.pow2_act) =>
                {
                    let Some(scale) = &w.scale_inv else {
                        return Ok(None);
                    };
                    weights.push(w.w.ptr(dev));
                    scales.push(dev.ptr(scale, 0));
                }
                _ => return Ok(None),
            }
        }
        Ok(Some(ExpertTable {
            weights: dev.upload(&weights)?,
            scales: dev.upload(&scales)?,
            out_dim: first.out_dim,
            in_dim: first.in_dim,
            pow2_act: first.pow2_act,
        }))
    }

    pub fn pow2_act(&self) -> bool {
        self.pow2_act
    }
}

/// [`linear_fp8_grouped`] with the tiles planned on the device: every row of `y[x.rows, out]`
/// through the expert [`moe_sort_rows`] sorted it under.
pub fn linear_fp8_grouped_table(
    dev: &Device,
    y: u64,
    x: &QuantizedRows,
    table: &ExpertTable,
    sorted: &DeviceSortedRows,
) -> Result<(), CudaError> {
    if (x.k, x.pow2, x.rows) != (table.in_dim, table.pow2_act, sorted.rows)
        || !x.k.is_multiple_of(16)
    {
        return Err(CudaError::Unsupported(format!(
            "grouped FP8 experts of {} inputs got {} rows of {} channels for a plan of {} rows",
            table.in_dim, x.rows, x.k, sorted.rows
        )));
    }
    if sorted.rows == 0 {
        return Ok(());
    }
    launch(
        dev,
        Family::Fp8,
        "fp8_linear_grouped_table",
        (blocks(table.out_dim, 128), sorted.max_tiles as u32, 1),
        128,
        0,
        &[
            Arg::P(y),
            Arg::P(dev.ptr(&x.codes, 0)),
            Arg::P(dev.ptr(&x.scales, 0)),
            Arg::P(dev.ptr(&table.weights, 0)),
            Arg::P(dev.ptr(&table.scales, 0)),
            Arg::P(dev.ptr(&sorted.tile_expert, 0)),
            Arg::P(dev.ptr(&sorted.tile_row0, 0)),
            Arg::P(dev.ptr(&sorted.tile_row_end, 0)),
            Arg::P(dev.ptr(&sorted.tile_count, 0)),
            i(table.out_dim),
            i(table.in_dim),
        ],
    )
}

/// [`linear_fp8_grouped`] from the host: `x[rows, in]` through `groups[i] = (weight, first row,
/// rows)` (FP8 weights from `w.fp8`'s codes, activation scales powers of two). Rows no group
/// covers stay NaN, so rows a kernel leaves unwritten show.
pub fn linear_fp8_grouped_host(
    dev: &Device,
    x: &[f32],
    groups: &[(&Linear, usize, usize)],
) -> Result<Vec<f32>, CudaError> {
    let Some(&(first, ..)) = groups.first() else {
        return Ok(Vec::new());
    };
    let (k, out) = (first.in_dim, first.out_dim);
    let rows = x.len() / k.max(1);
    let mut up = crate::backend::cuda::load::Uploader::direct(dev);
    let weights = groups
        .iter()
        .map(|(w, ..)| DevLinear::upload(&mut up, w, DType::Fp8, true, true))
        .collect::<Result<Vec<_>, _>>()?;
    let dx = dev.upload(x)?;
    let xq = quantize_rows(dev, dev.ptr(&dx, 0), rows, k, true)?;
    let dy = dev.upload(&vec![f32::NAN; rows * out])?;
    let planned: Vec<(&DevLinear, usize, usize)> = weights
        .iter()
        .zip(groups)
        .map(|(w, (_, start, count))| (w, *start, *count))
        .collect();
    linear_fp8_grouped(dev, dev.ptr(&dy, 0), &xq, &planned)?;
    dev.download(&dy, rows * out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::device::GroupedGemm;

    #[test]
    fn grouped_tiles_cut_each_group_into_tiles_and_send_it_to_one_kernel() {
        let groups = [(0, 1), (1, 64), (65, 65), (130, 0), (130, 200), (333, 3)];
        let [mma, wide] = grouped_tiles(&groups, |rows| {
            group_takes_warpgroup(GroupedGemm::Auto, true, rows)
        });
        let spans = |tiles: &[GroupedTile]| -> Vec<(usize, usize, usize)> {
            tiles.iter().map(|t| (t.group, t.row0, t.row_end)).collect()
        };
        assert_eq!(spans(&mma), vec![(0, 0, 1), (1, 1, 65), (5, 333, 336)]);
        assert_eq!(
            spans(&wide),
            vec![
                (2, 65, 129),
                (2, 129, 130),
                (4, 130, 194),
                (4, 194, 258),
                (4, 258, 322),
                (4, 322, 330)
            ]
        );
        // The same groups give the same tiles however they are shared out: each group's
        // kernel depends on its own rows only.
        let [alone, _] = grouped_tiles(&groups[1..2], |rows| {
            group_takes_warpgroup(GroupedGemm::Auto, true, rows)
        });
        assert_eq!(spans(&alone), vec![(0, 1, 65)]);
    }

    #[test]
    fn the_grouped_kernel_setting_and_the_device_decide_the_warpgroup_kernel() {
        for rows in [1, GROUPED_TILE_ROWS, GROUPED_TILE_ROWS + 1, 4096] {
            let big = rows > GROUPED_TILE_ROWS;
            assert_eq!(group_takes_warpgroup(GroupedGemm::Auto, true, rows), big);
            assert!(group_takes_warpgroup(GroupedGemm::Warpgroup, true, rows));
            assert!(!group_takes_warpgroup(GroupedGemm::Mma, true, rows));
            for setting in [GroupedGemm::Auto, GroupedGemm::Warpgroup, GroupedGemm::Mma] {
                assert!(!group_takes_warpgroup(setting, false, rows));
            }
        }
    }
}
