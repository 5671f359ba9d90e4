//! Writes of the latent and indexer-key caches (`kernels/kv_cache.cu`).

use super::*;

/// Writes `[RMSNorm(c_kv) | RoPE(k_pe)]` of each token into its cache slot.
#[allow(clippy::too_many_arguments)]
pub fn kv_store(
    dev: &Device,
    cache: &DevBuf,
    kv: u64,
    norm_w: u64,
    slots: u64,
    pos: u64,
    inv_freq: u64,
    factor: f32,
    n: usize,
    kvr: usize,
    rd: usize,
    eps: f32,
) -> Result<(), CudaError> {
    let name = format!("kv_store_{}", cache.dtype().suffix());
    let mut args = vec![
        Arg::P(cache.ptr(dev)),
        Arg::P(kv),
        Arg::P(norm_w),
        Arg::P(slots),
        Arg::P(pos),
        Arg::P(inv_freq),
        Arg::F(factor),
        i(kvr),
        i(rd),
        Arg::F(eps),
    ];
    if cache.dtype() == DType::Fp8 {
        args.push(i(latent_fp8_stride(kvr, rd)));
    }
    launch(
        dev,
        Family::KvCache,
        &name,
        (n as u32, 1, 1),
        256,
        ((kvr + rd) * 4) as u32,
        &args,
    )
}

/// Writes `RoPE_half_split(LayerNorm(k))` of each token into the indexer-key cache.
#[allow(clippy::too_many_arguments)]
pub fn index_key_store(
    dev: &Device,
    cache: &DevBuf,
    k: u64,
    w: u64,
    b: u64,
    slots: u64,
    pos: u64,
    inv_freq: u64,
    factor: f32,
    n: usize,
    id: usize,
    rd: usize,
    eps: f32,
) -> Result<(), CudaError> {
    let name = format!("index_key_store_{}", cache.dtype().suffix());
    let mut args = vec![
        Arg::P(cache.ptr(dev)),
        Arg::P(k),
        Arg::P(w),
        Arg::P(b),
        Arg::P(slots),
        Arg::P(pos),
        Arg::P(inv_freq),
        Arg::F(factor),
        i(id),
        i(rd),
        Arg::F(eps),
    ];
    if cache.dtype() == DType::Fp8 {
        args.push(i(index_fp8_stride(id)));
    }
    launch(
        dev,
        Family::KvCache,
        &name,
        (n as u32, 1, 1),
        128,
        (id * 4) as u32,
        &args,
    )
}

/// Stores `[n, kvr + rd]` latent rows (RMSNorm + interleaved RoPE) and `[n, id]` indexer keys
/// (LayerNorm + half-split RoPE) into caches of `dtype` at `slots`, and reads both caches back
/// as f32 (`num_slots` rows each).
#[allow(clippy::too_many_arguments)]
pub fn cache_store_host(
    dev: &Device,
    dtype: DType,
    kv: &[f32],
    kv_norm: &[f32],
    keys: &[f32],
    k_norm: (&[f32], &[f32]),
    slots: &[usize],
    positions: &[usize],
    inv_freq: &[f32],
    factor: f32,
    num_slots: usize,
) -> Result<(Vec<f32>, Vec<f32>), CudaError> {
    let n = slots.len();
    let (width, id) = (kv.len() / n, keys.len() / n);
    let (rd, kvr) = (2 * inv_freq.len(), kv.len() / n - 2 * inv_freq.len());
    let (lat_len, idx_len) = match dtype {
        DType::Fp8 => (latent_fp8_stride(kvr, rd), index_fp8_stride(id)),
        _ => (width, id),
    };
    let lat = DevBuf::zeros(dev, num_slots * lat_len, dtype)?;
    let idx = DevBuf::zeros(dev, num_slots * idx_len, dtype)?;
    let to_i = |v: &[usize]| v.iter().map(|x| *x as i32).collect::<Vec<i32>>();
    let (d_slots, d_pos) = (dev.upload(&to_i(slots))?, dev.upload(&to_i(positions))?);
    let (d_kv, d_keys, d_freq) = (dev.upload(kv)?, dev.upload(keys)?, dev.upload(inv_freq)?);
    let (d_kvn, d_kw, d_kb) = (
        dev.upload(kv_norm)?,
        dev.upload(k_norm.0)?,
        dev.upload(k_norm.1)?,
    );
    let (ps, pp, pf) = (
        dev.ptr(&d_slots, 0),
        dev.ptr(&d_pos, 0),
        dev.ptr(&d_freq, 0),
    );
    kv_store(
        dev,
        &lat,
        dev.ptr(&d_kv, 0),
        dev.ptr(&d_kvn, 0),
        ps,
        pp,
        pf,
        factor,
        n,
        kvr,
        rd,
        1e-6,
    )?;
    index_key_store(
        dev,
        &idx,
        dev.ptr(&d_keys, 0),
        dev.ptr(&d_kw, 0),
        dev.ptr(&d_kb, 0),
        ps,
        pp,
        pf,
        factor,
        n,
        id,
        rd,
        1e-6,
    )?;
    let read = |b: &DevBuf, len: usize, q: usize, tail: usize| -> Result<Vec<f32>, CudaError> {
        Ok(match b {
            DevBuf::F32(s) => dev.download(s, len)?,
            DevBuf::Bf16(s) => dev
                .download(s, len)?
                .into_iter()
                .map(|v| half::bf16::from_bits(v).to_f32())
                .collect(),
            DevBuf::Fp8(s) => crate::backend::cuda::weights::decode_fp8_rows(
                &dev.download(s, len)?,
                len / num_slots,
                q,
                tail,
            ),
        })
    };
    Ok((
        read(&lat, num_slots * lat_len, kvr, rd)?,
        read(&idx, num_slots * idx_len, id, 0)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::split_k;

    #[test]
    fn k_is_split_only_when_the_output_tiles_cannot_fill_the_gpu() {
        // A decode expert projection: 16 tiles of 128 outputs over 56 K blocks.
        let (per, splits) = split_k(16, 56);
        assert_eq!((per, splits), (4, 14));
        assert!(per * splits >= 56 && per * (splits - 1) < 56);
        // A prefill projection fills the GPU alone.
        assert_eq!(split_k(2048, 56), (56, 1));
        // Too few K blocks to split.
        assert_eq!(split_k(1, 3), (3, 1));
        // Every split keeps at least two K blocks.
        for tiles in 1..140 {
            for kb in 1..200 {
                let (per, splits) = split_k(tiles, kb);
                assert!(
                    per * splits >= kb && per * (splits - 1) < kb,
                    "{tiles} {kb}"
                );
                assert!(splits == 1 || per >= 2, "{tiles} {kb}: {per}");
            }
        }
    }
}
