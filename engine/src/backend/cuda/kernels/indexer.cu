// The lightning indexer and DSA's top-k selection.
//
// indexer_scores_{f32,bf16,fp8}: scores[t, j] = Σ_h w[t, h] · ReLU(q[t, h] · k_j) for every position
// j < ctx_len[t] of token t's sequence, keys read from the paged indexer cache through the
// sequence's block table (tables + table_base[t], bs slots a block). Grid (tokens,
// ceil(max_ctx / KEYS)); 8 warps, one key per warp at a time; the token's queries sit in dynamic
// shared memory (heads · head_dim floats).
//
// topk_select: per token, the min(k, ctx_len) best scores, ties to the lower position, written
// ascending. A radix select over order-preserving keys (four 8-bit histogram passes) finds the
// k-th largest value, then one ordered pass with block scans emits the winners. O(ctx) per
// token; long rows go through topk_chunk_candidates and topk_from_candidates (below).

#define KEYS 64
// Key values each lane keeps in registers (index_head_dim up to 32 · KEY_REGS).
#define KEY_REGS 4

template <typename R>
__device__ void indexer_scores_impl(float* scores, const float* q, const float* w, R kcache,
                                    const int* tables, const int* table_base, int bs, const int* ctx_len,
                                    int heads, int dim, int max_ctx) {
    extern __shared__ float qs[];
    int t = blockIdx.x;
    int len = ctx_len[t];
    int j0 = blockIdx.y * KEYS;
    if (j0 >= len) return;
    const float* qt = q + (long long)t * heads * dim;
    for (int i = threadIdx.x; i < heads * dim; i += blockDim.x) qs[i] = qt[i];
    __syncthreads();
    const float* wt = w + (long long)t * heads;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int j1 = min(j0 + KEYS, len);
    for (int j = j0 + warp; j < j1; j += nw) {
        long long slot = paged_slot(tables + table_base[t], bs, j);
        float acc = 0.f;
        if (dim <= 32 * KEY_REGS) {
            // The key is read (and decoded) once into registers and reused by every head.
            float kr[KEY_REGS];
#pragma unroll
            for (int r = 0; r < KEY_REGS; r++) {
                int i = lane + 32 * r;
                kr[r] = i < dim ? kcache.at(slot, i) : 0.f;
            }
            for (int h = 0; h < heads; h++) {
                float d = 0.f;
#pragma unroll
                for (int r = 0; r < KEY_REGS; r++) {
                    int i = lane + 32 * r;
                    if (i < dim) d += qs[h * dim + i] * kr[r];
                }
                d = warp_sum(d);
                acc += wt[h] * fmaxf(d, 0.f);
            }
        } else {
            for (int h = 0; h < heads; h++) {
                float d = 0.f;
                for (int i = lane; i < dim; i += 32) d += qs[h * dim + i] * kcache.at(slot, i);
                d = warp_sum(d);
                acc += wt[h] * fmaxf(d, 0.f);
            }
        }
        if (lane == 0) scores[(long long)t * max_ctx + j] = acc;
    }
}

extern "C" __global__ void indexer_scores_f32(float* scores, const float* q, const float* w, const float* kcache,
                                              const int* tables, const int* table_base, int bs, const int* ctx_len,
                                              int heads, int dim, int max_ctx) {
    indexer_scores_impl(scores, q, w, RowsF32{kcache, dim}, tables, table_base, bs, ctx_len, heads, dim, max_ctx);
}

extern "C" __global__ void indexer_scores_bf16(float* scores, const float* q, const float* w, const bf16_t* kcache,
                                               const int* tables, const int* table_base, int bs, const int* ctx_len,
                                               int heads, int dim, int max_ctx) {
    indexer_scores_impl(scores, q, w, RowsBf16{kcache, dim}, tables, table_base, bs, ctx_len, heads, dim, max_ctx);
}

extern "C" __global__ void indexer_scores_fp8(float* scores, const float* q, const float* w, const fp8_t* kcache,
                                              const int* tables, const int* table_base, int bs, const int* ctx_len,
                                              int heads, int dim, int max_ctx, int stride) {
    RowsFp8 r{kcache, dim, dim + 4 * ((dim + 127) / 128), stride};
    indexer_scores_impl(scores, q, w, r, tables, table_base, bs, ctx_len, heads, dim, max_ctx);
}

// Maps a float to an unsigned key with the same order as Rust's f32::total_cmp.
__device__ __forceinline__ unsigned order_key(float f) {
    unsigned b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// out[t, 0..count[t]] = selected positions, ascending: the kk = min(k, len) largest scores,
// ties at the threshold taken lowest position first. Block of TOPK_THREADS threads per token.
// The kk-th largest key is found by radix select, 8 bits a pass (4 histogram passes over the
// row, per-warp histograms in shared memory), then each thread writes the selected positions
// of its contiguous segment at offsets from two block scans.
#define TOPK_THREADS 512
#define TOPK_UNROLL 4
// The block's selection of the kk largest of s[0..len), ties lowest index first: emit(slot, j)
// is called once per selected index j, slot 0..kk in ascending order of j.
template <typename Emit>
__device__ void radix_topk(const float* s, int len, int kk, Emit emit) {
    __shared__ int sh[33];
    __shared__ unsigned hist[TOPK_THREADS / 32][256];
    __shared__ unsigned digit_and_rest[2];
    if (kk == len) {
        for (int j = threadIdx.x; j < len; j += blockDim.x) emit(j, j);
        return;
    }
    if (kk <= 0) return;
    int w = threadIdx.x >> 5;
    unsigned prefix = 0, mask = 0;
    unsigned remaining = kk;  // how many keys >= the threshold are still wanted
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < (TOPK_THREADS / 32) * 256; i += blockDim.x) (&hist[0][0])[i] = 0;
        __syncthreads();
        // Scores of one row share their leading bits (sign and exponent), so most of a thread's
        // values fall in the bin of its previous one: each thread counts runs of one bin and
        // adds a run once (no same-address atomics across lanes on every element). Four loads
        // are in flight per thread before their bins are counted.
        unsigned run_bin = 256u, run = 0;
        for (int j0 = 0; j0 < len; j0 += TOPK_UNROLL * TOPK_THREADS) {
            unsigned bins[TOPK_UNROLL];
#pragma unroll
            for (int u = 0; u < TOPK_UNROLL; u++) {
                int j = j0 + u * TOPK_THREADS + threadIdx.x;
                bins[u] = 256u;
                if (j < len) {
                    unsigned key = order_key(s[j]);
                    if ((key & mask) == prefix) bins[u] = (key >> shift) & 255u;
                }
            }
#pragma unroll
            for (int u = 0; u < TOPK_UNROLL; u++) {
                if (bins[u] == run_bin) {
                    run++;
                } else if (bins[u] < 256u) {
                    if (run) atomicAdd(&hist[w][run_bin], run);
                    run_bin = bins[u];
                    run = 1;
                }
            }
        }
        if (run) atomicAdd(&hist[w][run_bin], run);
        __syncthreads();
        // Bin totals over the warps, then the digit from the top where the count reaches what
        // is still wanted.
        unsigned total = 0;
        if (threadIdx.x < 256)
            for (int v = 0; v < TOPK_THREADS / 32; v++) total += hist[v][threadIdx.x];
        __syncthreads();
        if (threadIdx.x < 256) hist[0][threadIdx.x] = total;
        __syncthreads();
        if (threadIdx.x == 0) {
            unsigned above = 0;
            int d = 255;
            for (; d > 0; d--) {
                if (above + hist[0][d] >= remaining) break;
                above += hist[0][d];
            }
            digit_and_rest[0] = (unsigned)d;
            digit_and_rest[1] = remaining - above;
        }
        __syncthreads();
        prefix |= digit_and_rest[0] << shift;
        mask |= 255u << shift;
        remaining = digit_and_rest[1];
        __syncthreads();
    }
    unsigned thr = prefix;
    int ties_wanted = (int)remaining;
    // Each thread's contiguous segment: keys above the threshold and ties, counted, scanned,
    // then written in position order.
    int per = (len + blockDim.x - 1) / blockDim.x;
    int lo = min(len, (int)threadIdx.x * per), hi = min(len, lo + per);
    int gt = 0, ties = 0;
    for (int j = lo; j < hi; j++) {
        unsigned key = order_key(s[j]);
        gt += key > thr;
        ties += key == thr;
    }
    int gt_total, ties_total;
    int gt_before = block_exclusive_scan(gt, sh, &gt_total);
    int ties_before = block_exclusive_scan(ties, sh, &ties_total);
    int at = gt_before + min(ties_before, ties_wanted);
    int tie_seen = ties_before;
    for (int j = lo; j < hi; j++) {
        unsigned key = order_key(s[j]);
        if (key > thr) {
            emit(at++, j);
        } else if (key == thr) {
            if (tie_seen < ties_wanted) emit(at++, j);
            tie_seen++;
        }
    }
}

extern "C" __global__ void __launch_bounds__(TOPK_THREADS) topk_select(int* out, int* count, const float* scores,
                                                                      const int* ctx_len, int max_ctx, int k) {
    int t = blockIdx.x;
    int len = ctx_len[t];
    int kk = min(k, len);
    const float* s = scores + (long long)t * max_ctx;
    int* o = out + (long long)t * k;
    if (threadIdx.x == 0) count[t] = kk;
    radix_topk(s, len, kk, [&](int slot, int j) { o[slot] = j; });
}

// Long rows in two steps, so that many blocks share one row:
// topk_chunk_candidates: grid (tokens, ceil(max_ctx / TOPK_CHUNK)); each block selects the
//   min(k, chunk) best of its chunk of the row from shared memory and writes them (values and
//   positions, ascending) at chunk · k of the token's candidate row (k <= TOPK_CHUNK, so every
//   earlier chunk wrote exactly k). The row's top k are among these: any value a chunk leaves
//   out ranks behind k of that chunk's own.
// topk_from_candidates: one block per token selects the best k of its candidates, in their
//   (ascending position) order, ties lowest position first as topk_select does.
#define TOPK_CHUNK 16384
extern "C" __global__ void __launch_bounds__(TOPK_THREADS) topk_chunk_candidates(float* cand_val, int* cand_pos,
                                                                                const float* scores, const int* ctx_len,
                                                                                int max_ctx, int k, int cand_stride) {
    extern __shared__ float chunk[];
    int t = blockIdx.x, c = blockIdx.y;
    int len = ctx_len[t];
    int j0 = c * TOPK_CHUNK;
    if (j0 >= len) return;
    int n = min(TOPK_CHUNK, len - j0);
    const float* s = scores + (long long)t * max_ctx + j0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) chunk[i] = s[i];
    __syncthreads();
    float* cv = cand_val + (long long)t * cand_stride + (long long)c * k;
    int* cp = cand_pos + (long long)t * cand_stride + (long long)c * k;
    radix_topk(chunk, n, min(k, n), [&](int slot, int j) {
        cv[slot] = chunk[j];
        cp[slot] = j0 + j;
    });
}

extern "C" __global__ void __launch_bounds__(TOPK_THREADS) topk_from_candidates(int* out, int* count, const float* cand_val,
                                                                               const int* cand_pos, const int* ctx_len,
                                                                               int cand_stride, int k) {
    int t = blockIdx.x;
    int len = ctx_len[t];
    int kk = min(k, len);
    int full = len / TOPK_CHUNK, rest = len % TOPK_CHUNK;
    int n = full * k + min(k, rest);
    const float* cv = cand_val + (long long)t * cand_stride;
    const int* cp = cand_pos + (long long)t * cand_stride;
    int* o = out + (long long)t * k;
    if (threadIdx.x == 0) count[t] = kk;
    radix_topk(cv, n, kk, [&](int slot, int j) { o[slot] = cp[j]; });
}

// Sampling on the device (the same selection serves the logits of sampled rows):
// row_softmax_stats: per row of x[m, v], the max and, in f64, Σ exp(x - max) and
//   Σ exp((x - max) / T) with T = temps[row] (f32 difference and division, f64 exp: the host
//   sampler's rounding; 0 when T = 0). Block of 256 threads per row.
// gather_candidates: vals[r, j] = x[r, ids[r, j]].
extern "C" __global__ void row_softmax_stats(float* maxes, double* sums, const float* x, const float* temps, int v) {
    __shared__ float sh[32];
    __shared__ double shd[2][32];
    int r = blockIdx.x;
    const float* row = x + (long long)r * v;
    float mx = NEG_INF;
    for (int i = threadIdx.x; i < v; i += blockDim.x) mx = fmaxf(mx, row[i]);
    mx = block_max(mx, sh);
    float t = temps[r];
    double s1 = 0.0, st = 0.0;
    for (int i = threadIdx.x; i < v; i += blockDim.x) {
        s1 += exp((double)(row[i] - mx));
        if (t > 0.f) st += exp((double)((row[i] - mx) / t));
    }
    for (int o = 16; o > 0; o >>= 1) {
        s1 += __shfl_xor_sync(0xffffffffu, s1, o);
        st += __shfl_xor_sync(0xffffffffu, st, o);
    }
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    if (lane == 0) {
        shd[0][w] = s1;
        shd[1][w] = st;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double a = 0.0, b = 0.0;
        for (int i = 0; i < nw; i++) {
            a += shd[0][i];
            b += shd[1][i];
        }
        maxes[r] = mx;
        sums[2 * r] = a;
        sums[2 * r + 1] = b;
    }
}

extern "C" __global__ void gather_candidates(float* vals, const float* x, const int* ids, int v, int k) {
    int r = blockIdx.x;
    for (int j = threadIdx.x; j < k; j += blockDim.x)
        vals[(long long)r * k + j] = x[(long long)r * v + ids[(long long)r * k + j]];
}

// indexer_scores_mma_{bf16,fp8}_d{32,64,128}: the same scores on tensor cores. Per token, keys
// are the rows (M) and heads the columns (N, up to IDX_MMA_HEADS, zero-padded) of an MMA over
// the head dimension; ReLU, the head weights and the sum over heads are applied to the
// accumulators, and each score is written once. Keys go straight from the paged cache to
// registers, each read once. Grid (tokens, ceil(max_ctx / keys_per_block)), 8 warps, each
// taking 16 keys at a time; a block stages its token's queries once, so longer runs of keys
// per block spread that cost over more keys.
//   bf16 cache: queries rounded to bf16, m16n8k16 bf16 MMAs.
//   FP8 cache (132-byte rows: E4M3 codes, then the row's f32 scale), as DeepSeek runs it:
//   each head's query quantized to E4M3 with its own scale (amax / 448), which joins the head
//   weight; E4M3 × E4M3 m16n8k32 MMAs straight on the cached codes; the key's scale applied
//   before the ReLU.
#define IDX_MMA_HEADS 64

template <int D>
__device__ void indexer_mma_bf16_impl(float* scores, const float* q, const float* w, const bf16_t* kcache,
                                      const int* tables, const int* table_base, int bs, const int* ctx_len,
                                      int heads, int max_ctx, int keys_per_block) {
    constexpr int STEPS = D / 16;
    constexpr int NT = IDX_MMA_HEADS / 8;
    extern __shared__ __align__(16) unsigned char idx_smem[];
    __shared__ float wsh[IDX_MMA_HEADS];
    int t = blockIdx.x;
    int len = ctx_len[t];
    int j0 = blockIdx.y * keys_per_block;
    if (j0 >= len) return;
    int qstride = mma_row_stride(D);  // bytes
    const float* qt = q + (long long)t * heads * D;
    for (int i = threadIdx.x; i < IDX_MMA_HEADS * D; i += blockDim.x) {
        int h = i / D, d = i % D;
        float v = h < heads ? qt[h * D + d] : 0.f;
        unsigned short bits;
        store_as(&bits, v);
        *(unsigned short*)(idx_smem + h * qstride + d * 2) = bits;
    }
    for (int h = threadIdx.x; h < IDX_MMA_HEADS; h += blockDim.x)
        wsh[h] = h < heads ? w[(long long)t * heads + h] : 0.f;
    __syncthreads();
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int g = lane >> 2, c = lane & 3;
    int nt_used = (heads + 7) / 8;
    const int* tb = tables + table_base[t];
    int j1 = min(j0 + keys_per_block, len);
    for (int base = j0 + warp * 16; base < j1; base += 8 * 16) {
        // Rows g and g + 8 of this 16-key tile: a[s][0..3] per step.
        unsigned a[STEPS][4];
#pragma unroll
        for (int half = 0; half < 2; half++) {
            int j = base + g + 8 * half;
            bool ok = j < len;
            long long slot = ok ? paged_slot(tb, bs, j) : 0;
            const bf16_t* row = kcache + slot * D;
#pragma unroll
            for (int s = 0; s < STEPS; s++) {
                uint2 v = ok ? *(const uint2*)(row + 16 * s + 4 * c) : make_uint2(0u, 0u);
                a[s][half] = v.x;
                a[s][2 + half] = v.y;
            }
        }
        float part[2] = {0.f, 0.f};
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            if (nt >= nt_used) break;
            float acc[4] = {0.f, 0.f, 0.f, 0.f};
            const unsigned char* qrow = idx_smem + (nt * 8 + g) * qstride;
#pragma unroll
            for (int s = 0; s < STEPS; s++) {
                uint2 bv = *(const uint2*)(qrow + (16 * s + 4 * c) * 2);
                unsigned b[2] = {bv.x, bv.y};
                mma_bf16_16816(acc, a[s], b);
            }
            float w0 = wsh[nt * 8 + 2 * c], w1 = wsh[nt * 8 + 2 * c + 1];
            part[0] += w0 * fmaxf(acc[0], 0.f) + w1 * fmaxf(acc[1], 0.f);
            part[1] += w0 * fmaxf(acc[2], 0.f) + w1 * fmaxf(acc[3], 0.f);
        }
#pragma unroll
        for (int half = 0; half < 2; half++) {
            float v = part[half];
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            v += __shfl_xor_sync(0xffffffffu, v, 2);
            int j = base + g + 8 * half;
            if (c == 0 && j < len) scores[(long long)t * max_ctx + j] = v;
        }
    }
}

// Bytes of one E4M3 query row in shared memory: D plus 16, so the 8 rows a fragment load
// touches start in different 16-byte bank groups.
#define IDX_FP8_QSTRIDE(D) ((D) + 16)

template <int D>
__device__ void indexer_mma_fp8_impl(float* scores, const float* q, const float* w, const fp8_t* kcache,
                                     const int* tables, const int* table_base, int bs, const int* ctx_len,
                                     int heads, int max_ctx, int keys_per_block, int stride) {
    constexpr int STEPS = D / 32;
    constexpr int NT = IDX_MMA_HEADS / 8;
    constexpr int QS = IDX_FP8_QSTRIDE(D);
    __shared__ __align__(16) unsigned char qsh[IDX_MMA_HEADS * QS];
    __shared__ float wsh[IDX_MMA_HEADS];
    int t = blockIdx.x;
    int len = ctx_len[t];
    int j0 = blockIdx.y * keys_per_block;
    if (j0 >= len) return;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float* qt = q + (long long)t * heads * D;
    // One warp per head: its amax, its scale, its codes. Within a k32 step, lane c's fragment
    // registers hold logical columns 4c..4c+3 and 16+4c..16+4c+3; both operands map them to
    // the 8 stored bytes 8c..8c+7, so every fragment is one contiguous load.
    for (int h = warp; h < IDX_MMA_HEADS; h += blockDim.x >> 5) {
        float amax = 0.f;
        if (h < heads)
            for (int d = lane; d < D; d += 32) amax = fmaxf(amax, fabsf(qt[h * D + d]));
        for (int o = 16; o; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        float sc = group_scale(amax, 0);
        for (int d = lane; d < D; d += 32)
            qsh[h * QS + d] = h < heads ? f_to_e4m3(qt[h * D + d] / sc) : (fp8_t)0;
        if (lane == 0) wsh[h] = h < heads ? w[(long long)t * heads + h] * sc : 0.f;
    }
    __syncthreads();
    int g = lane >> 2, c = lane & 3;
    int nt_used = (heads + 7) / 8;
    const int* tb = tables + table_base[t];
    int j1 = min(j0 + keys_per_block, len);
    for (int base = j0 + warp * 16; base < j1; base += 8 * 16) {
        unsigned a[STEPS][4];
        float kscale[2] = {0.f, 0.f};
#pragma unroll
        for (int half = 0; half < 2; half++) {
            int j = base + g + 8 * half;
            bool ok = j < len;
            const unsigned char* row = kcache + (ok ? paged_slot(tb, bs, j) : 0) * stride;
            if (ok) kscale[half] = *(const float*)(row + D);
#pragma unroll
            for (int s = 0; s < STEPS; s++) {
                // Rows are 4-byte aligned (132 bytes apart), so two 4-byte loads.
                a[s][half] = ok ? *(const unsigned*)(row + 32 * s + 8 * c) : 0u;
                a[s][2 + half] = ok ? *(const unsigned*)(row + 32 * s + 8 * c + 4) : 0u;
            }
        }
        float part[2] = {0.f, 0.f};
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            if (nt >= nt_used) break;
            float acc[4] = {0.f, 0.f, 0.f, 0.f};
            const unsigned char* qrow = qsh + (nt * 8 + g) * QS;
#pragma unroll
            for (int s = 0; s < STEPS; s++) {
                uint2 bv = *(const uint2*)(qrow + 32 * s + 8 * c);
                unsigned b[2] = {bv.x, bv.y};
                mma_e4m3(acc, a[s], b);
            }
            float w0 = wsh[nt * 8 + 2 * c], w1 = wsh[nt * 8 + 2 * c + 1];
            part[0] += w0 * fmaxf(acc[0] * kscale[0], 0.f) + w1 * fmaxf(acc[1] * kscale[0], 0.f);
            part[1] += w0 * fmaxf(acc[2] * kscale[1], 0.f) + w1 * fmaxf(acc[3] * kscale[1], 0.f);
        }
#pragma unroll
        for (int half = 0; half < 2; half++) {
            float v = part[half];
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            v += __shfl_xor_sync(0xffffffffu, v, 2);
            int j = base + g + 8 * half;
            if (c == 0 && j < len) scores[(long long)t * max_ctx + j] = v;
        }
    }
}

#define INDEXER_MMA(D)                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) indexer_scores_mma_bf16_d##D(                     \
        float* scores, const float* q, const float* w, const bf16_t* kcache, const int* tables,         \
        const int* table_base, int bs, const int* ctx_len, int heads, int max_ctx, int keys_per_block) { \
        indexer_mma_bf16_impl<D>(scores, q, w, kcache, tables, table_base, bs, ctx_len, heads, max_ctx,   \
                                 keys_per_block);                                                       \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) indexer_scores_mma_fp8_d##D(                      \
        float* scores, const float* q, const float* w, const fp8_t* kcache, const int* tables,          \
        const int* table_base, int bs, const int* ctx_len, int heads, int max_ctx, int keys_per_block,  \
        int stride) {                                                                                   \
        indexer_mma_fp8_impl<D>(scores, q, w, kcache, tables, table_base, bs, ctx_len, heads, max_ctx,    \
                                keys_per_block, stride);                                                \
    }
INDEXER_MMA(32)
INDEXER_MMA(64)
INDEXER_MMA(128)
