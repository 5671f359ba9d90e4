// Sparse MLA in the absorbed (MQA) form, over the paged latent cache:
// absorb_q_{f32,bf16}: q_lat[t, h, :] = Σ_d q_nope[t, h, d] · W_UK[h, d, :];
// sparse_mla_{f32,bf16,fp8}: softmax over the selected keys of (q_lat·c_kv + q_pe·k_pe)·scale, then
//   o_lat[t, h, :] = Σ_j p_j · c_kv_j; grid (tokens, heads); dynamic shared memory holds the
//   576-wide query, one probability and the cache slot of each selected key;
// absorb_v_{f32,bf16}: out[t, h·vd + r] = W_UV[h, r, :] · o_lat[t, h, :].
// kv_b_proj is [heads · (nope + vd), kvr]: per head nope rows of W_UK, then vd rows of W_UV.

template <typename W>
__device__ void absorb_q_impl(float* q_lat, const float* q, const W* wkvb, int heads, int nope,
                              int vd, int qk, int kvr) {
    int t = blockIdx.x, h = blockIdx.y;
    const float* qh = q + ((long long)t * heads + h) * qk;
    const W* wh = wkvb + (long long)h * (nope + vd) * kvr;
    float* dst = q_lat + ((long long)t * heads + h) * kvr;
    for (int c = threadIdx.x; c < kvr; c += blockDim.x) {
        float acc = 0.f;
        for (int d = 0; d < nope; d++) acc += qh[d] * to_f(wh[(long long)d * kvr + c]);
        dst[c] = acc;
    }
}

template <typename W>
__device__ void absorb_v_impl(float* out, const float* o_lat, const W* wkvb, int heads, int nope,
                              int vd, int kvr) {
    int t = blockIdx.x, h = blockIdx.y;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const float* o = o_lat + ((long long)t * heads + h) * kvr;
    for (int r = warp; r < vd; r += nw) {
        const W* wr = wkvb + ((long long)h * (nope + vd) + nope + r) * kvr;
        float acc = 0.f;
        for (int c = lane; c < kvr; c += 32) acc += to_f(wr[c]) * o[c];
        acc = warp_sum(acc);
        if (lane == 0) out[((long long)t * heads + h) * vd + r] = acc;
    }
}

template <typename R>
__device__ void sparse_mla_impl(float* o_lat, const float* q_lat, const float* q, R lcache,
                                const int* sel, const int* sel_count, const int* tables,
                                const int* table_base, int bs, int heads, int kvr, int rd, int qk, int nope,
                                int k, float scale) {
    extern __shared__ float smem[];
    __shared__ float sh[32];
    int t = blockIdx.x, h = blockIdx.y;
    int width = kvr + rd;
    float* qs = smem;                   // [kvr + rd]
    float* p = smem + width;            // [k]
    int* key_slot = (int*)(p + k);      // [k]: the cache slot of each selected key
    const float* ql = q_lat + ((long long)t * heads + h) * kvr;
    const float* qpe = q + ((long long)t * heads + h) * qk + nope;
    for (int i = threadIdx.x; i < kvr; i += blockDim.x) qs[i] = ql[i];
    for (int i = threadIdx.x; i < rd; i += blockDim.x) qs[kvr + i] = qpe[i];
    __syncthreads();
    int m = sel_count[t];
    const int* st = sel + (long long)t * k;
    const int* tb = tables + table_base[t];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int j = threadIdx.x; j < m; j += blockDim.x) key_slot[j] = (int)paged_slot(tb, bs, st[j]);
    __syncthreads();
    for (int j = warp; j < m; j += nw) {
        long long slot = key_slot[j];
        float a = 0.f, b = 0.f;
        for (int i = lane; i < kvr; i += 32) a += qs[i] * lcache.at(slot, i);
        for (int i = lane; i < rd; i += 32) b += qs[kvr + i] * lcache.at(slot, kvr + i);
        a = warp_sum(a);
        b = warp_sum(b);
        if (lane == 0) p[j] = (a + b) * scale;
    }
    __syncthreads();
    float mx = NEG_INF;
    for (int j = threadIdx.x; j < m; j += blockDim.x) mx = fmaxf(mx, p[j]);
    mx = block_max(mx, sh);
    float sum = 0.f;
    for (int j = threadIdx.x; j < m; j += blockDim.x) {
        float e = expf(p[j] - mx);
        p[j] = e;
        sum += e;
    }
    sum = block_sum(sum, sh);
    float inv = 1.f / sum;
    float* dst = o_lat + ((long long)t * heads + h) * kvr;
    for (int c = threadIdx.x; c < kvr; c += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < m; j++) acc += (p[j] * inv) * lcache.at(key_slot[j], c);
        dst[c] = acc;
    }
}

extern "C" __global__ void absorb_q_f32(float* q_lat, const float* q, const float* w, int heads, int nope, int vd, int qk, int kvr) {
    absorb_q_impl<float>(q_lat, q, w, heads, nope, vd, qk, kvr);
}
extern "C" __global__ void absorb_q_bf16(float* q_lat, const float* q, const bf16_t* w, int heads, int nope, int vd, int qk, int kvr) {
    absorb_q_impl<bf16_t>(q_lat, q, w, heads, nope, vd, qk, kvr);
}
extern "C" __global__ void absorb_v_f32(float* out, const float* o_lat, const float* w, int heads, int nope, int vd, int kvr) {
    absorb_v_impl<float>(out, o_lat, w, heads, nope, vd, kvr);
}
extern "C" __global__ void absorb_v_bf16(float* out, const float* o_lat, const bf16_t* w, int heads, int nope, int vd, int kvr) {
    absorb_v_impl<bf16_t>(out, o_lat, w, heads, nope, vd, kvr);
}
extern "C" __global__ void sparse_mla_f32(float* o_lat, const float* q_lat, const float* q, const float* lcache,
                                          const int* sel, const int* sel_count, const int* tables, const int* table_base, int bs,
                                          int heads, int kvr, int rd, int qk, int nope, int k, float scale) {
    sparse_mla_impl(o_lat, q_lat, q, RowsF32{lcache, kvr + rd}, sel, sel_count, tables, table_base, bs, heads, kvr, rd, qk, nope, k, scale);
}
extern "C" __global__ void sparse_mla_bf16(float* o_lat, const float* q_lat, const float* q, const bf16_t* lcache,
                                           const int* sel, const int* sel_count, const int* tables, const int* table_base, int bs,
                                           int heads, int kvr, int rd, int qk, int nope, int k, float scale) {
    sparse_mla_impl(o_lat, q_lat, q, RowsBf16{lcache, kvr + rd}, sel, sel_count, tables, table_base, bs, heads, kvr, rd, qk, nope, k, scale);
}
extern "C" __global__ void sparse_mla_fp8(float* o_lat, const float* q_lat, const float* q, const fp8_t* lcache,
                                          const int* sel, const int* sel_count, const int* tables, const int* table_base, int bs,
                                          int heads, int kvr, int rd, int qk, int nope, int k, float scale, int stride) {
    RowsFp8 r{lcache, kvr, kvr + 4 * ((kvr + 127) / 128), stride};
    sparse_mla_impl(o_lat, q_lat, q, r, sel, sel_count, tables, table_base, bs, heads, kvr, rd, qk, nope, k, scale);
}

// sparse_mla_heads_{f32,bf16,fp8}: the same attention with HB heads of one token per block (one
// warp each) sharing every selected key: keys are read (and decoded) into shared memory KT at a
// time, once for HB heads, and each warp keeps an online softmax and its head's 512-wide output
// in registers. Grid (tokens, ceil(heads / HB)), 256 threads; kv_lora_rank ≤ 32 · OUT_REGS.

#define HB 8
#define KT 8
#define OUT_REGS 16

template <typename R>
__device__ void sparse_mla_heads_impl(float* o_lat, const float* q_lat, const float* q, R lcache,
                                      const int* sel, const int* sel_count, const int* tables,
                                      const int* table_base, int bs, int heads, int kvr, int rd, int qk,
                                      int nope, int k, float scale) {
    extern __shared__ float smem[];
    __shared__ int tile_slot[KT];
    int width = kvr + rd;
    float* qs = smem;               // [HB][width]
    float* ks = smem + HB * width;  // [KT][width]
    int t = blockIdx.x, h0 = blockIdx.y * HB;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int nh = min(HB, heads - h0);
    for (int i = threadIdx.x; i < HB * width; i += blockDim.x) {
        int hh = i / width, c = i % width;
        float v = 0.f;
        if (hh < nh) {
            long long th = (long long)t * heads + h0 + hh;
            v = c < kvr ? q_lat[th * kvr + c] : q[th * qk + nope + (c - kvr)];
        }
        qs[i] = v;
    }
    int m = sel_count[t];
    const int* st = sel + (long long)t * k;
    const int* tb = tables + table_base[t];
    const float* qh = qs + warp * width;
    float mx = NEG_INF, l = 0.f;
    float acc[OUT_REGS];
#pragma unroll
    for (int r = 0; r < OUT_REGS; r++) acc[r] = 0.f;
    for (int j0 = 0; j0 < m; j0 += KT) {
        int kn = min(KT, m - j0);
        __syncthreads();
        if (threadIdx.x < kn) tile_slot[threadIdx.x] = (int)paged_slot(tb, bs, st[j0 + threadIdx.x]);
        __syncthreads();
        for (int i = threadIdx.x; i < kn * width; i += blockDim.x) {
            int jj = i / width, c = i % width;
            ks[i] = lcache.at(tile_slot[jj], c);
        }
        __syncthreads();
        if (warp >= nh) continue;
        float sc[KT];
        float tmax = NEG_INF;
#pragma unroll
        for (int jj = 0; jj < KT; jj++) {
            float d = 0.f;
            if (jj < kn) {
                for (int c = lane; c < width; c += 32) d += qh[c] * ks[jj * width + c];
                d = warp_sum(d) * scale;
            }
            sc[jj] = jj < kn ? d : NEG_INF;
            tmax = fmaxf(tmax, sc[jj]);
        }
        float nm = fmaxf(mx, tmax);
        float corr = expf(mx - nm);
        l *= corr;
#pragma unroll
        for (int r = 0; r < OUT_REGS; r++) acc[r] *= corr;
#pragma unroll
        for (int jj = 0; jj < KT; jj++) {
            if (jj >= kn) break;
            float p = expf(sc[jj] - nm);
            l += p;
#pragma unroll
            for (int r = 0; r < OUT_REGS; r++) {
                int c = lane + 32 * r;
                if (c < kvr) acc[r] += p * ks[jj * width + c];
            }
        }
        mx = nm;
    }
    if (warp < nh) {
        float inv = 1.f / l;
        float* dst = o_lat + ((long long)t * heads + h0 + warp) * kvr;
#pragma unroll
        for (int r = 0; r < OUT_REGS; r++) {
            int c = lane + 32 * r;
            if (c < kvr) dst[c] = acc[r] * inv;
        }
    }
}

extern "C" __global__ void sparse_mla_heads_f32(float* o_lat, const float* q_lat, const float* q, const float* lcache,
                                                const int* sel, const int* sel_count, const int* tables,
                                                const int* table_base, int bs, int heads, int kvr, int rd, int qk, int nope,
                                                int k, float scale) {
    sparse_mla_heads_impl(o_lat, q_lat, q, RowsF32{lcache, kvr + rd}, sel, sel_count, tables, table_base, bs, heads, kvr,
                          rd, qk, nope, k, scale);
}
extern "C" __global__ void sparse_mla_heads_bf16(float* o_lat, const float* q_lat, const float* q, const bf16_t* lcache,
                                                 const int* sel, const int* sel_count, const int* tables,
                                                 const int* table_base, int bs, int heads, int kvr, int rd, int qk, int nope,
                                                 int k, float scale) {
    sparse_mla_heads_impl(o_lat, q_lat, q, RowsBf16{lcache, kvr + rd}, sel, sel_count, tables, table_base, bs, heads, kvr,
                          rd, qk, nope, k, scale);
}
extern "C" __global__ void sparse_mla_heads_fp8(float* o_lat, const float* q_lat, const float* q, const fp8_t* lcache,
                                                const int* sel, const int* sel_count, const int* tables,
                                                const int* table_base, int bs, int heads, int kvr, int rd, int qk, int nope,
                                                int k, float scale, int stride) {
    RowsFp8 r{lcache, kvr, kvr + 4 * ((kvr + 127) / 128), stride};
    sparse_mla_heads_impl(o_lat, q_lat, q, r, sel, sel_count, tables, table_base, bs, heads, kvr, rd, qk, nope, k, scale);
}

// sparse_mla_mma_{bf16,fp8}_{128,512}: the same attention on tensor cores, FlashAttention-style.
// A block takes MLA_MMA_HEADS heads of one token; those heads share every selected latent row,
// so heads are the M dimension of both products. Selected rows arrive MLA_MMA_KEYS at a time by
// cp.async into a double buffer (FP8 rows are decoded to bf16 in shared memory first). Per
// tile: S = Q·Kᵀ (8 warps, each 16 heads x 16 keys over the whole 576-wide row) into shared
// memory; then each warp keeps an online softmax and the output of 16 heads x kv_lora_rank/4
// latent columns in registers and adds P·V (V = the rows' first kv_lora_rank columns, read
// transposed by ldmatrix). Queries and probabilities are rounded to bf16, accumulation is f32.
// Grid (tokens, ceil(heads / MLA_MMA_HEADS), splits), MLA_MMA_THREADS threads; kv_lora_rank +
// rope width a multiple of 16. With one split a block writes its normalized output to o_lat.
// With more, split z takes its share of the selected rows' tiles (a few tokens fill only a few
// blocks otherwise) and writes its unnormalized output to part_o [splits, tokens, heads, kvr]
// and its running max (log2 units) and sum to part_ml [splits, tokens, heads, 2], for
// sparse_mla_combine.
#define MLA_MMA_HEADS 32
#define MLA_MMA_KEYS 64
#define MLA_MMA_THREADS 256
#define MLA_MMA_SST (MLA_MMA_KEYS + 8)

template <int KVR, bool FP8>
__device__ void sparse_mla_mma_impl(float* o_lat, const float* q_lat, const float* q,
                                    const unsigned char* lcache, const int* sel,
                                    const int* sel_count, const int* tables, const int* table_base, int bs,
                                    int heads, int rd, int qk, int nope, int k, float scale,
                                    int stride, float* part_o, float* part_ml) {
    constexpr int CQ = KVR / 4;
    constexpr int NTV = CQ / 8;
    extern __shared__ __align__(16) unsigned char mla_smem[];
    const int W = KVR + rd;
    const int rs = mma_row_stride(W);
    unsigned char* qs = mla_smem;
    unsigned char* tiles = qs + MLA_MMA_HEADS * rs;
    unsigned char* raw = tiles + (FP8 ? 1 : 2) * MLA_MMA_KEYS * rs;
    float* S = (float*)(raw + (FP8 ? 2 * MLA_MMA_KEYS * stride : 0));
    const int t = blockIdx.x, h0 = blockIdx.y * MLA_MMA_HEADS;
    for (int i = threadIdx.x; i < MLA_MMA_HEADS * W; i += blockDim.x) {
        int hh = i / W, col = i % W, h = h0 + hh;
        float v = 0.f;
        if (h < heads) {
            long long th = (long long)t * heads + h;
            v = col < KVR ? q_lat[th * KVR + col] : q[th * qk + nope + (col - KVR)];
        }
        store_as((bf16_t*)(qs + hh * rs) + col, v);
    }
    const int m = sel_count[t];
    const int* st = sel + (long long)t * k;
    const int* tb = tables + table_base[t];
    const int lrow = threadIdx.x >> 2, lsub = threadIdx.x & 3;  // loader: 4 threads per row
    const int src_bytes = FP8 ? stride : W * 2;
    auto issue = [&](int tile, int buf) {
        int j = tile * MLA_MMA_KEYS + lrow;
        bool ok = j < m;
        const unsigned char* src = lcache + (ok ? paged_slot(tb, bs, st[j]) * src_bytes : 0);
        unsigned char* dst = FP8 ? raw + (buf * MLA_MMA_KEYS + lrow) * stride
                                 : tiles + (buf * MLA_MMA_KEYS + lrow) * rs;
        for (int ch = lsub; ch < src_bytes / 16; ch += 4) cp_async_16(dst + 16 * ch, src + 16 * ch, ok);
        cp_async_commit();
    };
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, c = lane & 3, rg = warp >> 2, wq = warp & 3;
    const float sl2 = scale * 1.4426950408889634f;
    float o[NTV][4];
#pragma unroll
    for (int nt = 0; nt < NTV; nt++) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
    float mrow[2] = {NEG_INF, NEG_INF}, lsum[2] = {0.f, 0.f};
    const int splits = gridDim.z;
    const int per_split = ((k + MLA_MMA_KEYS - 1) / MLA_MMA_KEYS + splits - 1) / splits;
    const int first = blockIdx.z * per_split;
    const int ntiles = min((m + MLA_MMA_KEYS - 1) / MLA_MMA_KEYS, first + per_split);
    if (first < ntiles) issue(first, first & 1);
    for (int i = first; i < ntiles; i++) {
        if (i + 1 < ntiles) {
            issue(i + 1, (i + 1) & 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const unsigned char* tile = tiles;
        if (FP8) {
            const unsigned char* src = raw + ((i & 1) * MLA_MMA_KEYS + lrow) * stride;
            unsigned char* dst = tiles + lrow * rs;
            const float* scales = (const float*)(src + KVR);
            for (int u = lsub; u < KVR / 4; u += 4) {
                unsigned codes = *(const unsigned*)(src + 4 * u);
                float s = scales[(4 * u) >> 7];
                unsigned lo = e4m3x2_to_f16x2((unsigned short)(codes & 0xffff));
                unsigned hi = e4m3x2_to_f16x2((unsigned short)(codes >> 16));
                uint2 v;
                v.x = pack_bf16x2(f16_bits_to_f(lo & 0xffff) * s, f16_bits_to_f(lo >> 16) * s);
                v.y = pack_bf16x2(f16_bits_to_f(hi & 0xffff) * s, f16_bits_to_f(hi >> 16) * s);
                *(uint2*)(dst + 8 * u) = v;
            }
            const unsigned* tail = (const unsigned*)(src + KVR + 4 * (KVR / 128));
            unsigned* tdst = (unsigned*)(dst + 2 * KVR);
            for (int u = lsub; u < rd / 2; u += 4) tdst[u] = tail[u];
            __syncthreads();
        } else {
            tile = tiles + (i & 1) * MLA_MMA_KEYS * rs;
        }
        // S = Q·Kᵀ for heads rg·16.., keys wq·16.. of the tile.
        {
            float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
            const unsigned char* qa = qs + (rg * 16 + g) * rs;
            const unsigned char* kb = tile + (wq * 16 + g) * rs;
            for (int s = 0; s < W / 16; s++) {
                int off = (16 * s + 4 * c) * 2;
                uint2 x = *(const uint2*)(qa + off), y = *(const uint2*)(qa + 8 * rs + off);
                unsigned a[4] = {x.x, y.x, x.y, y.y};
                uint2 u = *(const uint2*)(kb + off), v = *(const uint2*)(kb + 8 * rs + off);
                unsigned b0[2] = {u.x, u.y}, b1[2] = {v.x, v.y};
                mma_bf16_16816(acc[0], a, b0);
                mma_bf16_16816(acc[1], a, b1);
            }
#pragma unroll
            for (int nt = 0; nt < 2; nt++) {
                int col = wq * 16 + nt * 8 + 2 * c;
                int j = i * MLA_MMA_KEYS + col;
                float* r0 = S + (rg * 16 + g) * MLA_MMA_SST + col;
                float* r1 = r0 + 8 * MLA_MMA_SST;
                r0[0] = j < m ? acc[nt][0] * sl2 : NEG_INF;
                r0[1] = j + 1 < m ? acc[nt][1] * sl2 : NEG_INF;
                r1[0] = j < m ? acc[nt][2] * sl2 : NEG_INF;
                r1[1] = j + 1 < m ? acc[nt][3] * sl2 : NEG_INF;
            }
        }
        __syncthreads();
        // Online softmax of rows g and g + 8 of this row group, then O += P·V.
        {
            const float* s0 = S + (rg * 16 + g) * MLA_MMA_SST;
            const float* s1 = s0 + 8 * MLA_MMA_SST;
            float p0[16], p1[16];
#pragma unroll
            for (int ks = 0; ks < 4; ks++) {
                float2 a = *(const float2*)(s0 + 16 * ks + 2 * c);
                float2 b = *(const float2*)(s0 + 16 * ks + 8 + 2 * c);
                float2 d = *(const float2*)(s1 + 16 * ks + 2 * c);
                float2 e = *(const float2*)(s1 + 16 * ks + 8 + 2 * c);
                p0[4 * ks] = a.x, p0[4 * ks + 1] = a.y, p0[4 * ks + 2] = b.x, p0[4 * ks + 3] = b.y;
                p1[4 * ks] = d.x, p1[4 * ks + 1] = d.y, p1[4 * ks + 2] = e.x, p1[4 * ks + 3] = e.y;
            }
            float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
            for (int x = 0; x < 16; x++) mx0 = fmaxf(mx0, p0[x]), mx1 = fmaxf(mx1, p1[x]);
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
            float mn0 = fmaxf(mrow[0], mx0), mn1 = fmaxf(mrow[1], mx1);
            float corr0 = exp2f(mrow[0] - mn0), corr1 = exp2f(mrow[1] - mn1);
            float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
            for (int x = 0; x < 16; x++) {
                p0[x] = exp2f(p0[x] - mn0);
                p1[x] = exp2f(p1[x] - mn1);
                sum0 += p0[x];
                sum1 += p1[x];
            }
            sum0 += __shfl_xor_sync(0xffffffffu, sum0, 1);
            sum0 += __shfl_xor_sync(0xffffffffu, sum0, 2);
            sum1 += __shfl_xor_sync(0xffffffffu, sum1, 1);
            sum1 += __shfl_xor_sync(0xffffffffu, sum1, 2);
            lsum[0] = lsum[0] * corr0 + sum0;
            lsum[1] = lsum[1] * corr1 + sum1;
            mrow[0] = mn0;
            mrow[1] = mn1;
#pragma unroll
            for (int nt = 0; nt < NTV; nt++) {
                o[nt][0] *= corr0, o[nt][1] *= corr0, o[nt][2] *= corr1, o[nt][3] *= corr1;
            }
            const int mi = lane >> 3, rr = lane & 7;
#pragma unroll
            for (int ks = 0; ks < 4; ks++) {
                unsigned a[4] = {pack_bf16x2(p0[4 * ks], p0[4 * ks + 1]),
                                 pack_bf16x2(p1[4 * ks], p1[4 * ks + 1]),
                                 pack_bf16x2(p0[4 * ks + 2], p0[4 * ks + 3]),
                                 pack_bf16x2(p1[4 * ks + 2], p1[4 * ks + 3])};
                const unsigned char* vrow = tile + (16 * ks + rr + 8 * (mi & 1)) * rs;
#pragma unroll
                for (int np = 0; np < NTV / 2; np++) {
                    unsigned r[4];
                    ldmatrix_x4_trans(r, vrow + (wq * CQ + np * 16 + 8 * (mi >> 1)) * 2);
                    unsigned blo[2] = {r[0], r[1]}, bhi[2] = {r[2], r[3]};
                    mma_bf16_16816(o[2 * np], a, blo);
                    mma_bf16_16816(o[2 * np + 1], a, bhi);
                }
            }
        }
        __syncthreads();
    }
    int ha = h0 + rg * 16 + g, hb = ha + 8;
    if (splits > 1) {
        long long pa = ((long long)blockIdx.z * gridDim.x + t) * heads + ha, pb = pa + 8;
#pragma unroll
        for (int nt = 0; nt < NTV; nt++) {
            int col = wq * CQ + nt * 8 + 2 * c;
            if (ha < heads) *(float2*)(part_o + pa * KVR + col) = make_float2(o[nt][0], o[nt][1]);
            if (hb < heads) *(float2*)(part_o + pb * KVR + col) = make_float2(o[nt][2], o[nt][3]);
        }
        if (wq == 0 && c == 0) {
            if (ha < heads) *(float2*)(part_ml + 2 * pa) = make_float2(mrow[0], lsum[0]);
            if (hb < heads) *(float2*)(part_ml + 2 * pb) = make_float2(mrow[1], lsum[1]);
        }
        return;
    }
    float inv0 = lsum[0] > 0.f ? 1.f / lsum[0] : 0.f;
    float inv1 = lsum[1] > 0.f ? 1.f / lsum[1] : 0.f;
#pragma unroll
    for (int nt = 0; nt < NTV; nt++) {
        int col = wq * CQ + nt * 8 + 2 * c;
        if (ha < heads)
            *(float2*)(o_lat + ((long long)t * heads + ha) * KVR + col) = make_float2(o[nt][0] * inv0, o[nt][1] * inv0);
        if (hb < heads)
            *(float2*)(o_lat + ((long long)t * heads + hb) * KVR + col) = make_float2(o[nt][2] * inv1, o[nt][3] * inv1);
    }
}

#define SPARSE_MLA_MMA(KVR)                                                                               \
    extern "C" __global__ void __launch_bounds__(MLA_MMA_THREADS) sparse_mla_mma_bf16_##KVR(              \
        float* o_lat, const float* q_lat, const float* q, const bf16_t* lcache, const int* sel,           \
        const int* sel_count, const int* tables, const int* table_base, int bs, int heads, int kvr, int rd, int qk, \
        int nope, int k, float scale, float* part_o, float* part_ml) {                                    \
        sparse_mla_mma_impl<KVR, false>(o_lat, q_lat, q, (const unsigned char*)lcache, sel, sel_count,    \
                                        tables, table_base, bs, heads, rd, qk, nope, k, scale, 0, part_o, \
                                        part_ml);                                                         \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(MLA_MMA_THREADS) sparse_mla_mma_fp8_##KVR(               \
        float* o_lat, const float* q_lat, const float* q, const fp8_t* lcache, const int* sel,            \
        const int* sel_count, const int* tables, const int* table_base, int bs, int heads, int kvr, int rd, int qk, \
        int nope, int k, float scale, int stride, float* part_o, float* part_ml) {                        \
        sparse_mla_mma_impl<KVR, true>(o_lat, q_lat, q, lcache, sel, sel_count, tables, table_base, bs, heads,  \
                                       rd, qk, nope, k, scale, stride, part_o, part_ml);                  \
    }
SPARSE_MLA_MMA(128)
SPARSE_MLA_MMA(512)

// sparse_mla_combine: o_lat[t, h, :] from the splits of sparse_mla_mma_*: each split's output
// weighted by 2^(its max - the overall max), over the sum of its softmax sums weighted alike.
// A (token, head) with no selected rows gets zeros, as with one split. Grid (tokens, heads).
extern "C" __global__ void sparse_mla_combine(float* o_lat, const float* part_o, const float* part_ml,
                                              int splits, int tokens, int heads, int kvr) {
    const int t = blockIdx.x, h = blockIdx.y;
    const long long th = (long long)t * heads + h, per_split = (long long)tokens * heads;
    float mx = NEG_INF;
    for (int z = 0; z < splits; z++) mx = fmaxf(mx, part_ml[2 * (z * per_split + th)]);
    float total = 0.f;
    for (int z = 0; z < splits; z++) {
        float2 ml = *(const float2*)(part_ml + 2 * (z * per_split + th));
        if (ml.y > 0.f) total += exp2f(ml.x - mx) * ml.y;
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;
    for (int col = threadIdx.x; col < kvr; col += blockDim.x) {
        float acc = 0.f;
        for (int z = 0; z < splits; z++) {
            float2 ml = *(const float2*)(part_ml + 2 * (z * per_split + th));
            if (ml.y > 0.f) acc += exp2f(ml.x - mx) * part_o[(z * per_split + th) * kvr + col];
        }
        o_lat[th * kvr + col] = acc * inv;
    }
}
