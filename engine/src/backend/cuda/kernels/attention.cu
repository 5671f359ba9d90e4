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

// The tiles of `tile_rows` selected rows that split blockIdx.z of gridDim.z takes, [first, end):
// the k-row selection's tiles shared out evenly, cut at the m rows this token has.
__device__ __forceinline__ void split_tiles(int k, int m, int tile_rows, int& first, int& end) {
    const int per_split = ((k + tile_rows - 1) / tile_rows + gridDim.z - 1) / gridDim.z;
    first = blockIdx.z * per_split;
    end = min((m + tile_rows - 1) / tile_rows, first + per_split);
}

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
    int first, ntiles;
    split_tiles(k, m, MLA_MMA_KEYS, first, ntiles);
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

// sparse_mla_wgmma_bf16_512: the same attention with Hopper's warpgroup MMAs (wgmma), for the
// released shape (kv_lora_rank 512, rope 64) on a bf16 cache. A block takes 64 heads of one
// token (M = 64, FlashMLA's decode tiling) and two warpgroups: each computes S = Q·Kᵀ for half of
// a 64-row tile (m64n32, 36 steps over the 576 columns), the two share each row's running max
// through shared memory, write their probabilities as one bf16 tile, and each adds P·V for half
// of the 512 output columns (m64n256, V read transposed from the same tile). Operands are read
// by the tensor cores straight from 128-byte-swizzled shared memory: queries once, selected rows
// by cp.async into a double buffer. Splits and their outputs are those of sparse_mla_mma_*.
// Grid (tokens, ceil(heads / 64), splits), 256 threads, SPARSE_MLA_WGMMA_SMEM bytes.
#define MLA_WG_HEADS 64
#define MLA_WG_KEYS 64
#define MLA_WG_CHUNK 8192
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void wgmma_m64n32k16_kk(float* d, unsigned long long a, unsigned long long b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "l"(a), "l"(b), "r"(1)
        : "memory");
}
__device__ __forceinline__ void wgmma_m64n256k16_kn(float* d, unsigned long long a, unsigned long long b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, 0, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(a), "l"(b), "r"(1)
        : "memory");
}

// Byte offset of 16-byte column chunk `c16` (0-7) of `row` in a 128-byte-swizzled 64-column block.
__device__ __forceinline__ int sw128(int row, int c16) { return row * 128 + ((c16 ^ (row & 7)) << 4); }
#endif

extern "C" __global__ void __launch_bounds__(256, 1) sparse_mla_wgmma_bf16_512(
    float* o_lat, const float* q_lat, const float* q, const bf16_t* lcache, const int* sel,
    const int* sel_count, const int* tables, const int* table_base, int bs, int heads, int kvr, int rd,
    int qk, int nope, int k, float scale, float* part_o, float* part_ml) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int KVR = 512, W = 576, CHUNKS = W / 64, TILE = CHUNKS * MLA_WG_CHUNK;
    extern __shared__ __align__(16) unsigned char wg_smem[];
    unsigned char* qs = wg_smem + ((1024 - (smem_addr(wg_smem) & 1023)) & 1023);
    unsigned char* tiles = qs + TILE;      // two tiles
    unsigned char* ps = tiles + 2 * TILE;  // the probabilities, [64 heads][64 rows]
    float* red = (float*)(ps + MLA_WG_CHUNK);  // [2][64] row maxima, then [2][64] row sums
    const int t = blockIdx.x, h0 = blockIdx.y * MLA_WG_HEADS;
    for (int i = threadIdx.x; i < MLA_WG_HEADS * (W / 8); i += blockDim.x) {
        int hh = i / (W / 8), c16 = i % (W / 8), h = h0 + hh;
        float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        if (h < heads) {
            long long th = (long long)t * heads + h;
            if (c16 < KVR / 8) {
                float4 a = *(const float4*)(q_lat + th * KVR + 8 * c16);
                float4 b = *(const float4*)(q_lat + th * KVR + 8 * c16 + 4);
                v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
            } else {
                for (int e = 0; e < 8; e++) v[e] = q[th * qk + nope + 8 * c16 - KVR + e];
            }
        }
        uint4 pk = make_uint4(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]), pack_bf16x2(v[4], v[5]),
                              pack_bf16x2(v[6], v[7]));
        *(uint4*)(qs + (c16 >> 3) * MLA_WG_CHUNK + sw128(hh, c16 & 7)) = pk;
    }
    const int m = sel_count[t];
    const int* st = sel + (long long)t * k;
    const int* tb = tables + table_base[t];
    const int lrow = threadIdx.x >> 2, lsub = threadIdx.x & 3;  // loader: 4 threads per row
    // A loader's row of a tile: its selected position, then that position's cache slot (-1 past
    // the selection). Both are global loads, one depending on the other, so they are requested
    // tiles ahead of the copy that needs them instead of stalling it.
    auto position_at = [&](int tile) {
        int j = tile * MLA_WG_KEYS + lrow;
        return j < m ? st[j] : -1;
    };
    auto slot_of = [&](int pos) { return pos >= 0 ? paged_slot(tb, bs, pos) : -1ll; };
    auto issue = [&](long long slot, int buf) {
        bool ok = slot >= 0;
        const unsigned char* src = (const unsigned char*)lcache + (ok ? slot * (W * 2) : 0);
        unsigned char* dst = tiles + buf * TILE;
        for (int c16 = lsub; c16 < W / 8; c16 += 4)
            cp_async_16(dst + (c16 >> 3) * MLA_WG_CHUNK + sw128(lrow, c16 & 7), src + 16 * c16, ok);
        cp_async_commit();
    };
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int g = lane >> 2, c = lane & 3;
    const int r0 = warp * 16 + g, r1 = r0 + 8;  // this thread's rows (heads h0 + r) of every tile
    const float sl2 = scale * 1.4426950408889634f;
    float o[128];
#pragma unroll
    for (int x = 0; x < 128; x++) o[x] = 0.f;
    float mrow0 = NEG_INF, mrow1 = NEG_INF, l0 = 0.f, l1 = 0.f;
    const int splits = gridDim.z;
    int first, ntiles;
    split_tiles(k, m, MLA_WG_KEYS, first, ntiles);
    if (first < ntiles) issue(slot_of(position_at(first)), first & 1);
    long long next_slot = first + 1 < ntiles ? slot_of(position_at(first + 1)) : -1;
    int later_position = first + 2 < ntiles ? position_at(first + 2) : -1;
    for (int i = first; i < ntiles; i++) {
        __syncthreads();  // both warpgroups are done with tile i - 1 (whose buffer gets i + 1) and P
        if (i + 1 < ntiles) {
            issue(next_slot, (i + 1) & 1);
            next_slot = slot_of(later_position);
            later_position = i + 3 < ntiles ? position_at(i + 3) : -1;
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        fence_async_smem();
        __syncthreads();
        const unsigned char* tile = tiles + (i & 1) * TILE;
        float s[16];
#pragma unroll
        for (int x = 0; x < 16; x++) s[x] = 0.f;
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < W / 16; ks++) {
            int off = (ks >> 2) * MLA_WG_CHUNK + (ks & 3) * 32;
            wgmma_m64n32k16_kk(s, wgmma_desc(qs + off, 16, 1024),
                               wgmma_desc(tile + off + wg * 32 * 128, 16, 1024));
        }
        wgmma_commit();
        wgmma_wait_all();
#pragma unroll
        for (int x = 0; x < 16; x++) fence_reg(s[x]);
        // s[4j + e]: row r0, key 32·wg + 8j + 2c + e of the tile; s[4j + 2 + e]: row r1.
        float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
        for (int j = 0; j < 4; j++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                bool ok = i * MLA_WG_KEYS + 32 * wg + 8 * j + 2 * c + e < m;
                s[4 * j + e] = ok ? s[4 * j + e] * sl2 : NEG_INF;
                s[4 * j + 2 + e] = ok ? s[4 * j + 2 + e] * sl2 : NEG_INF;
                mx0 = fmaxf(mx0, s[4 * j + e]);
                mx1 = fmaxf(mx1, s[4 * j + 2 + e]);
            }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        if (c == 0) red[wg * 64 + r0] = mx0, red[wg * 64 + r1] = mx1;
        __syncthreads();
        const float mn0 = fmaxf(mrow0, fmaxf(red[r0], red[64 + r0]));
        const float mn1 = fmaxf(mrow1, fmaxf(red[r1], red[64 + r1]));
        const float corr0 = exp2f(mrow0 - mn0), corr1 = exp2f(mrow1 - mn1);
        mrow0 = mn0, mrow1 = mn1;
        l0 *= corr0, l1 *= corr1;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float a0 = exp2f(s[4 * j] - mn0), a1 = exp2f(s[4 * j + 1] - mn0);
            float b0 = exp2f(s[4 * j + 2] - mn1), b1 = exp2f(s[4 * j + 3] - mn1);
            l0 += a0 + a1, l1 += b0 + b1;
            int key = 32 * wg + 8 * j + 2 * c;
            *(unsigned*)(ps + sw128(r0, key >> 3) + (key & 7) * 2) = pack_bf16x2(a0, a1);
            *(unsigned*)(ps + sw128(r1, key >> 3) + (key & 7) * 2) = pack_bf16x2(b0, b1);
        }
#pragma unroll
        for (int j = 0; j < 32; j++) {
            o[4 * j] *= corr0, o[4 * j + 1] *= corr0, o[4 * j + 2] *= corr1, o[4 * j + 3] *= corr1;
        }
        fence_async_smem();
        __syncthreads();
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < MLA_WG_KEYS / 16; ks++) {
            wgmma_m64n256k16_kn(o, wgmma_desc(ps + ks * 32, 16, 1024),
                                wgmma_desc(tile + 4 * wg * MLA_WG_CHUNK + ks * 16 * 128, MLA_WG_CHUNK, 1024));
        }
        wgmma_commit();
        wgmma_wait_all();
#pragma unroll
        for (int x = 0; x < 128; x++) fence_reg(o[x]);
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    if (c == 0) red[128 + wg * 64 + r0] = l0, red[128 + wg * 64 + r1] = l1;
    __syncthreads();
    const float sum0 = red[128 + r0] + red[192 + r0], sum1 = red[128 + r1] + red[192 + r1];
    const int ha = h0 + r0, hb = h0 + r1;
    const int splits_out = splits > 1;
    const long long pa = ((long long)blockIdx.z * gridDim.x + t) * heads + ha, pb = pa + 8;
    const float inv0 = splits_out ? 1.f : (sum0 > 0.f ? 1.f / sum0 : 0.f);
    const float inv1 = splits_out ? 1.f : (sum1 > 0.f ? 1.f / sum1 : 0.f);
    float* da = splits_out ? part_o + pa * KVR : o_lat + ((long long)t * heads + ha) * KVR;
    float* db = splits_out ? part_o + pb * KVR : o_lat + ((long long)t * heads + hb) * KVR;
#pragma unroll
    for (int j = 0; j < 32; j++) {
        int col = 256 * wg + 8 * j + 2 * c;
        if (ha < heads) *(float2*)(da + col) = make_float2(o[4 * j] * inv0, o[4 * j + 1] * inv0);
        if (hb < heads) *(float2*)(db + col) = make_float2(o[4 * j + 2] * inv1, o[4 * j + 3] * inv1);
    }
    if (splits_out && wg == 0 && c == 0) {
        if (ha < heads) *(float2*)(part_ml + 2 * pa) = make_float2(mrow0, sum0);
        if (hb < heads) *(float2*)(part_ml + 2 * pb) = make_float2(mrow1, sum1);
    }
#endif
}

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
