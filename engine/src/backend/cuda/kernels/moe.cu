// MoE routing and combine.
// moe_route: the noaux_tc router, one warp per token, exactly as the CPU's `route_scores`:
//   sigmoid scores; bias only for selection; group score = sum of the group's two best biased
//   scores; keep the best topk_group groups (ties to the lower group); top-k experts among them
//   (ties to the lower index, NaN as -inf); ids written ascending with weights σ/Σσ (+1e-20) ×
//   scaling, summed in that order. A warp's lanes share the experts (lane l takes l, l + 32,
//   ...), so a decode step's few tokens do not wait on one thread's scan of every expert.
// moe_combine: y[t, :] = Σ_i w[t, i] · rows[row_of[t·k + i], :], in ascending expert order.

#define MAX_EXPERTS 512
#define MAX_GROUPS 64
#define ROUTE_WARPS 4

extern "C" __global__ void __launch_bounds__(32 * ROUTE_WARPS) moe_route(int* ids, float* wts, const float* logits,
                                                                        const float* bias, int n, int e, int n_group,
                                                                        int topk_group, int k, int normalize,
                                                                        float scaling) {
    __shared__ float biased_sh[ROUTE_WARPS][MAX_EXPERTS];
    __shared__ float gscore_sh[ROUTE_WARPS][MAX_GROUPS];
    __shared__ unsigned long long keep_sh[ROUTE_WARPS];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int t = blockIdx.x * ROUTE_WARPS + warp;
    if (t >= n) return;
    float* biased = biased_sh[warp];
    const float* l = logits + (long long)t * e;
    for (int i = lane; i < e; i += 32) biased[i] = 1.f / (1.f + expf(-l[i])) + bias[i];
    __syncwarp();
    int per = e / (n_group > 0 ? n_group : 1);
    for (int g = lane; g < n_group; g += 32) {
        float m1 = NEG_INF, m2 = NEG_INF;
        for (int i = g * per; i < (g + 1) * per; i++) {
            float v = biased[i];
            if (v > m1) {
                m2 = m1;
                m1 = v;
            } else if (v > m2) {
                m2 = v;
            }
        }
        gscore_sh[warp][g] = per >= 2 ? (0.f + m1) + m2 : 0.f + m1;
    }
    __syncwarp();
    if (lane == 0) {
        unsigned long long keep = 0;
        for (int r = 0; r < topk_group && r < n_group; r++) {
            int best = -1;
            for (int g = 0; g < n_group; g++)
                if (!((keep >> g) & 1ull) && (best < 0 || gscore_sh[warp][g] > gscore_sh[warp][best])) best = g;
            keep |= 1ull << best;
        }
        keep_sh[warp] = keep;
    }
    __syncwarp();
    unsigned long long keep = keep_sh[warp];
    for (int i = lane; i < e; i += 32) {
        int g = i / per;
        if (g >= MAX_GROUPS || !((keep >> g) & 1ull)) biased[i] = NEG_INF;
    }
    __syncwarp();
    // k rounds of a warp argmax; lane l remembers which of its experts (bit j: l + 32j) won.
    unsigned taken = 0;
    for (int r = 0; r < k; r++) {
        float bv = NEG_INF;
        int bi = 0x7fffffff;
        for (int i = lane, j = 0; i < e; i += 32, j++) {
            if ((taken >> j) & 1u) continue;
            float v = biased[i];
            if (v != v) v = NEG_INF;
            if (v > bv || (v == bv && i < bi)) {
                bv = v;
                bi = i;
            }
        }
        for (int o = 16; o; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) {
                bv = ov;
                bi = oi;
            }
        }
        if (bi < e && (bi & 31) == lane) taken |= 1u << (bi >> 5);
    }
    int* out = ids + (long long)t * k;
    float* w = wts + (long long)t * k;
    int c = 0;
    for (int base = 0, j = 0; base < e; base += 32, j++) {
        int i = base + lane;
        bool won = i < e && ((taken >> j) & 1u);
        unsigned m = __ballot_sync(0xffffffffu, won);
        if (won) {
            int at = c + __popc(m & ((1u << lane) - 1u));
            out[at] = i;
            w[at] = 1.f / (1.f + expf(-l[i]));
        }
        c += __popc(m);
    }
    __syncwarp();
    if (lane == 0) {
        float sum = 0.f;
        for (int i = 0; i < k; i++) sum += w[i];
        if (normalize) {
            sum += 1e-20f;
            for (int i = 0; i < k; i++) w[i] /= sum;
        }
        for (int i = 0; i < k; i++) w[i] *= scaling;
    }
}

// Grid (tokens); threads over the hidden dimension.
extern "C" __global__ void moe_combine(float* y, const float* rows, const int* row_of, const float* wts,
                                       int k, int d) {
    int t = blockIdx.x;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = 0.f;
        for (int i = 0; i < k; i++) acc += wts[t * k + i] * rows[(long long)row_of[t * k + i] * d + c];
        y[(long long)t * d + c] = acc;
    }
}

// moe_sort_rows: one block lays a step's (token, choice) rows out by expert on the device, the
// order the host's sort gives (by expert, then by row): row_of[r] is row r's sorted slot and
// perm[slot] its token (r / k). It also plans the grouped GEMMs' tiles: each expert's rows in
// tiles of at most tile_rows, tile i = (tile_expert, row0, row_end), *tile_count of them, in
// expert order. status[0] += experts with rows (the step's weight traffic); an id outside
// [0, e) (the router never writes one) sets status[1] and is counted as expert 0.
#define SORT_MAX_ROWS 2048

extern "C" __global__ void moe_sort_rows(int* perm, int* row_of, int* tile_expert, int* tile_row0, int* tile_row_end,
                                         int* tile_count, unsigned long long* status, const int* ids, int rows, int e,
                                         int k, int tile_rows) {
    __shared__ int sid[SORT_MAX_ROWS];
    __shared__ int counts[MAX_EXPERTS];
    __shared__ int offsets[MAX_EXPERTS];
    __shared__ int first_tile[MAX_EXPERTS];
    for (int x = threadIdx.x; x < e; x += blockDim.x) counts[x] = 0;
    __syncthreads();
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        int x = ids[r];
        if (x < 0 || x >= e) {
            atomicOr(&status[1], 1ull);
            x = 0;
        }
        sid[r] = x;
        atomicAdd(&counts[x], 1);
    }
    __syncthreads();
    if (threadIdx.x < 32) {
        // One warp scans the counts: each lane a contiguous run of experts.
        int lane = threadIdx.x, per = (e + 31) / 32;
        int x0 = min(e, lane * per), x1 = min(e, x0 + per);
        int rsum = 0, tsum = 0, active = 0;
        for (int x = x0; x < x1; x++) {
            rsum += counts[x];
            tsum += (counts[x] + tile_rows - 1) / tile_rows;
            active += counts[x] > 0;
        }
        int rinc = rsum, tinc = tsum;
        for (int d = 1; d < 32; d <<= 1) {
            int a = __shfl_up_sync(0xffffffffu, rinc, d), b = __shfl_up_sync(0xffffffffu, tinc, d);
            if (lane >= d) {
                rinc += a;
                tinc += b;
            }
        }
        int ro = rinc - rsum, to = tinc - tsum;
        for (int x = x0; x < x1; x++) {
            offsets[x] = ro;
            first_tile[x] = to;
            ro += counts[x];
            to += (counts[x] + tile_rows - 1) / tile_rows;
        }
        for (int d = 16; d; d >>= 1) active += __shfl_down_sync(0xffffffffu, active, d);
        if (lane == 31) *tile_count = tinc;
        if (lane == 0) atomicAdd(&status[0], (unsigned long long)active);
    }
    __syncthreads();
    for (int x = threadIdx.x; x < e; x += blockDim.x) {
        int c = counts[x];
        for (int t = 0; t * tile_rows < c; t++) {
            int i = first_tile[x] + t;
            tile_expert[i] = x;
            tile_row0[i] = offsets[x] + t * tile_rows;
            tile_row_end[i] = offsets[x] + min(c, (t + 1) * tile_rows);
        }
    }
    // Stable: a row's slot counts the earlier rows of its expert (decode steps have few rows).
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        int x = sid[r], before = 0;
        for (int q = 0; q < r; q++) before += sid[q] == x;
        int slot = offsets[x] + before;
        row_of[r] = slot;
        perm[slot] = r / k;
    }
}
