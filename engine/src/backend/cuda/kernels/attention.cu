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
                                const int* sel, const int* sel_count, const int* slots,
                                const int* slot_base, int heads, int kvr, int rd, int qk, int nope,
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
    const int* sl = slots + slot_base[t];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int j = threadIdx.x; j < m; j += blockDim.x) key_slot[j] = sl[st[j]];
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
                                          const int* sel, const int* sel_count, const int* slots, const int* slot_base,
                                          int heads, int kvr, int rd, int qk, int nope, int k, float scale) {
    sparse_mla_impl(o_lat, q_lat, q, RowsF32{lcache, kvr + rd}, sel, sel_count, slots, slot_base, heads, kvr, rd, qk, nope, k, scale);
}
extern "C" __global__ void sparse_mla_bf16(float* o_lat, const float* q_lat, const float* q, const bf16_t* lcache,
                                           const int* sel, const int* sel_count, const int* slots, const int* slot_base,
                                           int heads, int kvr, int rd, int qk, int nope, int k, float scale) {
    sparse_mla_impl(o_lat, q_lat, q, RowsBf16{lcache, kvr + rd}, sel, sel_count, slots, slot_base, heads, kvr, rd, qk, nope, k, scale);
}
extern "C" __global__ void sparse_mla_fp8(float* o_lat, const float* q_lat, const float* q, const fp8_t* lcache,
                                          const int* sel, const int* sel_count, const int* slots, const int* slot_base,
                                          int heads, int kvr, int rd, int qk, int nope, int k, float scale, int stride) {
    RowsFp8 r{lcache, kvr, kvr + 4 * ((kvr + 127) / 128), stride};
    sparse_mla_impl(o_lat, q_lat, q, r, sel, sel_count, slots, slot_base, heads, kvr, rd, qk, nope, k, scale);
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
                                      const int* sel, const int* sel_count, const int* slots,
                                      const int* slot_base, int heads, int kvr, int rd, int qk,
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
    const int* sl = slots + slot_base[t];
    const float* qh = qs + warp * width;
    float mx = NEG_INF, l = 0.f;
    float acc[OUT_REGS];
#pragma unroll
    for (int r = 0; r < OUT_REGS; r++) acc[r] = 0.f;
    for (int j0 = 0; j0 < m; j0 += KT) {
        int kn = min(KT, m - j0);
        __syncthreads();
        if (threadIdx.x < kn) tile_slot[threadIdx.x] = sl[st[j0 + threadIdx.x]];
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
                                                const int* sel, const int* sel_count, const int* slots,
                                                const int* slot_base, int heads, int kvr, int rd, int qk, int nope,
                                                int k, float scale) {
    sparse_mla_heads_impl(o_lat, q_lat, q, RowsF32{lcache, kvr + rd}, sel, sel_count, slots, slot_base, heads, kvr,
                          rd, qk, nope, k, scale);
}
extern "C" __global__ void sparse_mla_heads_bf16(float* o_lat, const float* q_lat, const float* q, const bf16_t* lcache,
                                                 const int* sel, const int* sel_count, const int* slots,
                                                 const int* slot_base, int heads, int kvr, int rd, int qk, int nope,
                                                 int k, float scale) {
    sparse_mla_heads_impl(o_lat, q_lat, q, RowsBf16{lcache, kvr + rd}, sel, sel_count, slots, slot_base, heads, kvr,
                          rd, qk, nope, k, scale);
}
extern "C" __global__ void sparse_mla_heads_fp8(float* o_lat, const float* q_lat, const float* q, const fp8_t* lcache,
                                                const int* sel, const int* sel_count, const int* slots,
                                                const int* slot_base, int heads, int kvr, int rd, int qk, int nope,
                                                int k, float scale, int stride) {
    RowsFp8 r{lcache, kvr, kvr + 4 * ((kvr + 127) / 128), stride};
    sparse_mla_heads_impl(o_lat, q_lat, q, r, sel, sel_count, slots, slot_base, heads, kvr, rd, qk, nope, k, scale);
}
