// FP8 E4M3 linear layers with DeepSeek's block scaling (weights: one scale per 128×128 block;
// activations: one per token per 128 channels; f32 promotion once per 128-wide K block).
//
// act_quant: codes[n, k] and scales of f32 activations, [n][ceil(k/128)] or, with a block
//   stride s > 0, [ceil(k/128)][s] (cuBLASLt's 1x128 layout, s >= n); grid (n, groups), one
//   warp per group.
// quant_weight_blocks: E4M3 codes and scale_inv = amax/448 per 128×128 block of an f32 matrix
//   (random benchmark weights, or weights a checkpoint stored in higher precision).
// fp8_linear_simple: y = Σ_kb sa·sw·(a_kb · w_kb) on the CUDA cores, one warp per output, the
//   reference order of the host's `fp8_linear`.
// fp8_linear_mma{,_m64}: the same on the tensor cores (mma.sync m16n8k32 e4m3, sm_89+): a 32×128
//   (64×128) output tile per block of 4 (8) warps, each K block's partial sums promoted to f32
//   with both scales; K optionally split over blocks when the output tiles cannot fill the GPU.
// fp8_linear_pipe: the serving kernel for K a multiple of 16: 64×128 tiles, cp.async double
//   buffering, swizzled shared rows (below).

extern "C" __global__ void act_quant(fp8_t* codes, float* scales, const float* x, int n, int k, int pow2, int block_stride) {
    int r = blockIdx.x, g = blockIdx.y, groups = gridDim.y;
    int k0 = g * 128;
    int len = min(128, k - k0);
    const float* src = x + (long long)r * k + k0;
    float s = warp_quantize_group(src, codes + (long long)r * k + k0, len, pow2);
    if (threadIdx.x == 0) scales[block_stride > 0 ? (long long)g * block_stride + r : (long long)r * groups + g] = s;
}

// act_quant_128: the same codes and scales as act_quant for K a multiple of 128 with 16-byte
//   aligned rows: one warp per 128-group, each lane four consecutive values (one 16-byte load,
//   two paired conversions, one 4-byte store), 8 groups per 256-thread block; grid
//   (ceil(n * k / 128 / 8)).
extern "C" __global__ void __launch_bounds__(256) act_quant_128(fp8_t* codes, float* scales, const float* x, int n, int k, int pow2, int block_stride) {
    int groups = k >> 7;
    long long gid = (long long)blockIdx.x * 8 + (threadIdx.x >> 5);
    if (gid >= (long long)n * groups) return;  // whole warps leave together
    int lane = threadIdx.x & 31;
    int r = (int)(gid / groups), g = (int)(gid % groups);
    long long off = (long long)r * k + g * 128 + lane * 4;
    float4 v = *reinterpret_cast<const float4*>(x + off);
    float amax = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
    amax = warp_max(amax);
    float s = group_scale(amax, pow2);
    unsigned short lo, hi;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(lo) : "f"(v.y / s), "f"(v.x / s));
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(hi) : "f"(v.w / s), "f"(v.z / s));
    *reinterpret_cast<unsigned*>(codes + off) = (unsigned)lo | ((unsigned)hi << 16);
    if (lane == 0) scales[block_stride > 0 ? (long long)g * block_stride + r : (long long)r * groups + g] = s;
}

extern "C" __global__ void quant_weight_blocks(fp8_t* codes, float* scale_inv, const float* w, int rows, int cols) {
    __shared__ float sh[32];
    int r0 = blockIdx.x * 128, c0 = blockIdx.y * 128;
    int rn = min(128, rows - r0), cn = min(128, cols - c0);
    float amax = 0.f;
    for (int i = threadIdx.x; i < rn * cn; i += blockDim.x)
        amax = fmaxf(amax, fabsf(w[(long long)(r0 + i / cn) * cols + c0 + i % cn]));
    amax = block_max(amax, sh);
    float s = amax > 0.f ? amax / 448.f : 1.f;
    for (int i = threadIdx.x; i < rn * cn; i += blockDim.x) {
        long long at = (long long)(r0 + i / cn) * cols + c0 + i % cn;
        codes[at] = f_to_e4m3(w[at] / s);
    }
    if (threadIdx.x == 0) scale_inv[blockIdx.x * gridDim.y + blockIdx.y] = s;
}

// Grid (ceil(out / 8), n); 8 warps, one output each.
extern "C" __global__ void fp8_linear_simple(float* y, const fp8_t* xa, const float* sa, const fp8_t* w,
                                             const float* sw, int n, int out, int k) {
    int m = blockIdx.y, o = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (o >= out) return;
    int groups = (k + 127) / 128;
    const fp8_t* xr = xa + (long long)m * k;
    const fp8_t* wr = w + (long long)o * k;
    float acc = 0.f;
    for (int g = 0; g < groups; g++) {
        float p = 0.f;
        int end = min(k, g * 128 + 128);
        for (int i = g * 128 + lane; i < end; i += 32) p += e4m3_to_f(xr[i]) * e4m3_to_f(wr[i]);
        acc += p * (sa[(long long)m * groups + g] * sw[(long long)(o >> 7) * groups + g]);
    }
    acc = warp_sum(acc);
    if (lane == 0) y[(long long)m * out + o] = acc;
}

#define FM 32
#define FN 128
#define FS 144  // shared row stride in bytes: 16-byte aligned, conflict-free fragment reads

struct alignas(16) Bytes16 {
    unsigned v[4];
};

// Copies rows [row0, row0 + tile_rows) × bytes [k0, k0 + 128) of a [rows, k] byte matrix into
// shared memory, zero outside the matrix. vec16: k is a multiple of 16 (16-byte loads).
__device__ __forceinline__ void load_tile(fp8_t* sm, const fp8_t* g, int tile_rows, int row0, int rows,
                                          int k0, int k, bool vec16) {
    for (int v = threadIdx.x; v < tile_rows * 8; v += blockDim.x) {
        int r = v >> 3, c = (v & 7) * 16;
        int gr = row0 + r, gk = k0 + c;
        Bytes16 val;
        val.v[0] = val.v[1] = val.v[2] = val.v[3] = 0u;
        if (gr < rows && gk < k) {
            const fp8_t* src = g + (long long)gr * k + gk;
            if (vec16) {
                val = *(const Bytes16*)src;
            } else {
                for (int j = 0; j < 16 && gk + j < k; j++)
                    val.v[j >> 2] |= ((unsigned)src[j]) << (8 * (j & 3));
            }
        }
        *(Bytes16*)(sm + r * FS + c) = val;
    }
}

// Grid (ceil(out / 128), ceil(n / (32·WM)), splits); 128·WM threads: WM × 4 warps of 32×32
// outputs. Split z sums K blocks [z·kbs, (z+1)·kbs) into y + z·n·out (the caller reduces the
// splits in order when there are several, so results do not depend on scheduling).
template <int WM>
__device__ void fp8_linear_mma_impl(float* y, const fp8_t* xa, const float* sa, const fp8_t* w,
                                    const float* sw, int n, int out, int k, int kbs) {
    __shared__ alignas(16) fp8_t as_[32 * WM * FS];
    __shared__ alignas(16) fp8_t bs_[FN * FS];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    int wm = warp >> 2, wn = warp & 3;
    int m0 = blockIdx.y * 32 * WM, n0 = blockIdx.x * FN;
    int groups = (k + 127) / 128;
    int kb0 = blockIdx.z * kbs, kb1 = min(groups, kb0 + kbs);
    y += (long long)blockIdx.z * n * out;
    bool vec16 = (k & 15) == 0;
    float acc[2][4][4], part[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.f;
    for (int kb = kb0; kb < kb1; kb++) {
        int k0 = kb * 128;
        load_tile(as_, xa, 32 * WM, m0, n, k0, k, vec16);
        load_tile(bs_, w, FN, n0, out, k0, k, vec16);
        __syncthreads();
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) part[i][j][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < 4; ks++) {
            unsigned a[2][4], b[4][2];
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                int base = (wm * 32 + mt * 16 + g) * FS + ks * 32 + t4 * 4;
                a[mt][0] = *(const unsigned*)(as_ + base);
                a[mt][1] = *(const unsigned*)(as_ + base + 8 * FS);
                a[mt][2] = *(const unsigned*)(as_ + base + 16);
                a[mt][3] = *(const unsigned*)(as_ + base + 8 * FS + 16);
            }
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                int base = (wn * 32 + nt * 8 + g) * FS + ks * 32 + t4 * 4;
                b[nt][0] = *(const unsigned*)(bs_ + base);
                b[nt][1] = *(const unsigned*)(bs_ + base + 16);
            }
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int nt = 0; nt < 4; nt++) mma_e4m3(part[mt][nt], a[mt], b[nt]);
        }
        float ws = sw[(long long)blockIdx.x * groups + kb];
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
            int r0 = m0 + wm * 32 + mt * 16 + g, r1 = r0 + 8;
            float s0 = r0 < n ? sa[(long long)r0 * groups + kb] * ws : 0.f;
            float s1 = r1 < n ? sa[(long long)r1 * groups + kb] * ws : 0.f;
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                acc[mt][nt][0] += part[mt][nt][0] * s0;
                acc[mt][nt][1] += part[mt][nt][1] * s0;
                acc[mt][nt][2] += part[mt][nt][2] * s1;
                acc[mt][nt][3] += part[mt][nt][3] * s1;
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int mt = 0; mt < 2; mt++) {
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
            int c = n0 + wn * 32 + nt * 8 + t4 * 2;
#pragma unroll
            for (int half = 0; half < 2; half++) {
                int r = m0 + wm * 32 + mt * 16 + g + 8 * half;
                if (r >= n) continue;
                if (c < out) y[(long long)r * out + c] = acc[mt][nt][2 * half];
                if (c + 1 < out) y[(long long)r * out + c + 1] = acc[mt][nt][2 * half + 1];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(128) fp8_linear_mma(float* y, const fp8_t* xa, const float* sa,
                                                                 const fp8_t* w, const float* sw, int n, int out,
                                                                 int k, int kbs) {
    fp8_linear_mma_impl<1>(y, xa, sa, w, sw, n, out, k, kbs);
}

extern "C" __global__ void __launch_bounds__(256) fp8_linear_mma_m64(float* y, const fp8_t* xa, const float* sa,
                                                                     const fp8_t* w, const float* sw, int n, int out,
                                                                     int k, int kbs) {
    fp8_linear_mma_impl<2>(y, xa, sa, w, sw, n, out, k, kbs);
}

// y[i] = Σ_z parts[z·len + i], splits summed in order.
extern "C" __global__ void sum_splits(float* y, const float* parts, long long len, int splits) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += (long long)gridDim.x * blockDim.x) {
        float s = 0.f;
        for (int z = 0; z < splits; z++) s += parts[(long long)z * len + i];
        y[i] = s;
    }
}

// ---- the pipelined tensor-core kernel (K a multiple of 16) ----
// 64×128 outputs per block of 4 warps (2 × 2, 32×64 each); each 128-wide K block of A (64 rows)
// and W (128 rows) is copied by cp.async into one of two 24 KiB stages while the other is
// multiplied. Rows are 128 bytes with their 16-byte chunks XOR-swizzled by (row & 7), so the
// fragment reads hit 32 distinct banks without padding.

#define PM 64
#define PN 128


__device__ __forceinline__ int swz(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }

__device__ __forceinline__ void stage_tile(fp8_t* sm, const fp8_t* g, int tile_rows, int row0, int rows, int k0, int k) {
    for (int v = threadIdx.x; v < tile_rows * 8; v += blockDim.x) {
        int r = v >> 3, c = v & 7;
        int gr = row0 + r, gk = k0 + c * 16;
        bool in = gr < rows && gk < k;
        cp_async_16(sm + swz(r, c), in ? (const void*)(g + (long long)gr * k + gk) : (const void*)g, in);
    }
}

// NT n-tiles of 8 per warp: NT = 8 is 2 × 2 warps of 32×64 (2 × 4 warps of 32×32, NT = 4, measured
// slower on an H200: more warps, but less fragment reuse).
template <int NT>
// Rows m0.. (PM of them) of y[n, out] over K blocks kb0..kb1, output columns from blockIdx.x.
__device__ void fp8_linear_pipe_impl(float* y, const fp8_t* xa, const float* sa, const fp8_t* w,
                                     const float* sw, int n, int out, int k, int m0, int kb0, int kb1) {
    constexpr int WN = PN / (8 * NT);
    __shared__ alignas(128) fp8_t smem[2 * (PM + PN) * 128];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    int wm = warp / WN, wn = warp % WN;
    int n0 = blockIdx.x * PN;
    int groups = (k + 127) / 128;
    float acc[2][NT][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.f;
    if (kb0 < kb1) {
        stage_tile(smem, xa, PM, m0, n, kb0 * 128, k);
        stage_tile(smem + PM * 128, w, PN, n0, out, kb0 * 128, k);
    }
    asm volatile("cp.async.commit_group;");
    for (int kb = kb0; kb < kb1; kb++) {
        int cur = (kb - kb0) & 1;
        fp8_t* as_ = smem + cur * (PM + PN) * 128;
        fp8_t* bs_ = as_ + PM * 128;
        if (kb + 1 < kb1) {
            fp8_t* nxt = smem + (cur ^ 1) * (PM + PN) * 128;
            stage_tile(nxt, xa, PM, m0, n, (kb + 1) * 128, k);
            stage_tile(nxt + PM * 128, w, PN, n0, out, (kb + 1) * 128, k);
        }
        asm volatile("cp.async.commit_group;");
        asm volatile("cp.async.wait_group 1;");
        __syncthreads();
        float part[2][NT][4];
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int j = 0; j < NT; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) part[i][j][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < 4; ks++) {
            unsigned a[2][4], b[NT][2];
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                int r = wm * 32 + mt * 16 + g;
                a[mt][0] = *(const unsigned*)(as_ + swz(r, 2 * ks) + t4 * 4);
                a[mt][1] = *(const unsigned*)(as_ + swz(r + 8, 2 * ks) + t4 * 4);
                a[mt][2] = *(const unsigned*)(as_ + swz(r, 2 * ks + 1) + t4 * 4);
                a[mt][3] = *(const unsigned*)(as_ + swz(r + 8, 2 * ks + 1) + t4 * 4);
            }
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                int r = wn * 8 * NT + nt * 8 + g;
                b[nt][0] = *(const unsigned*)(bs_ + swz(r, 2 * ks) + t4 * 4);
                b[nt][1] = *(const unsigned*)(bs_ + swz(r, 2 * ks + 1) + t4 * 4);
            }
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int nt = 0; nt < NT; nt++) mma_e4m3(part[mt][nt], a[mt], b[nt]);
        }
        float ws = sw[(long long)blockIdx.x * groups + kb];
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
            int r0 = m0 + wm * 32 + mt * 16 + g, r1 = r0 + 8;
            float s0 = r0 < n ? sa[(long long)r0 * groups + kb] * ws : 0.f;
            float s1 = r1 < n ? sa[(long long)r1 * groups + kb] * ws : 0.f;
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                acc[mt][nt][0] += part[mt][nt][0] * s0;
                acc[mt][nt][1] += part[mt][nt][1] * s0;
                acc[mt][nt][2] += part[mt][nt][2] * s1;
                acc[mt][nt][3] += part[mt][nt][3] * s1;
            }
        }
        __syncthreads();
    }
    asm volatile("cp.async.wait_group 0;");
#pragma unroll
    for (int mt = 0; mt < 2; mt++) {
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            int c = n0 + wn * 8 * NT + nt * 8 + t4 * 2;
#pragma unroll
            for (int half = 0; half < 2; half++) {
                int r = m0 + wm * 32 + mt * 16 + g + 8 * half;
                if (r >= n) continue;
                if (c < out) y[(long long)r * out + c] = acc[mt][nt][2 * half];
                if (c + 1 < out) y[(long long)r * out + c + 1] = acc[mt][nt][2 * half + 1];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(128) fp8_linear_pipe(float* y, const fp8_t* xa, const float* sa,
                                                                  const fp8_t* w, const float* sw, int n, int out,
                                                                  int k, int kbs) {
    int groups = (k + 127) / 128;
    int kb0 = blockIdx.z * kbs, kb1 = min(groups, kb0 + kbs);
    fp8_linear_pipe_impl<8>(y + (long long)blockIdx.z * n * out, xa, sa, w, sw, n, out, k, blockIdx.y * PM, kb0, kb1);
}

// fp8_linear_grouped: the same kernel over many weights in one launch (the routed experts of an
// MoE layer). Tile i = blockIdx.y multiplies rows row0[i] .. row_end[i] (at most PM) of the
// expert-sorted quantized activations by the weight at w_ptrs[i] (block scales sw_ptrs[i]) into
// the same rows of y. No split-K: the experts' tiles fill the GPU.
// Rows r0 .. r1 (at most PM) of the expert-sorted activations through one expert's weight.
__device__ void fp8_grouped_tile(float* y, const fp8_t* xa, const float* sa, const fp8_t* w, const float* sw,
                                 int r0, int r1, int out, int k) {
    int groups = (k + 127) / 128;
    fp8_linear_pipe_impl<8>(y + (long long)r0 * out, xa + (long long)r0 * k, sa + (long long)r0 * groups, w, sw,
                            r1 - r0, out, k, 0, 0, groups);
}

extern "C" __global__ void __launch_bounds__(128) fp8_linear_grouped(float* y, const fp8_t* xa, const float* sa,
                                                                     const unsigned long long* w_ptrs,
                                                                     const unsigned long long* sw_ptrs,
                                                                     const int* row0, const int* row_end, int out,
                                                                     int k) {
    int tile = blockIdx.y;
    fp8_grouped_tile(y, xa, sa, (const fp8_t*)w_ptrs[tile], (const float*)sw_ptrs[tile], row0[tile], row_end[tile],
                     out, k);
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// d (m64n128, f32) = A·Bᵀ (+ d when `accumulate`): E4M3 operands, both K-major in 128-byte-swizzled
// shared memory.
__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float* d, unsigned long long a, unsigned long long b,
                                                      int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(a), "l"(b), "r"(accumulate)
        : "memory");
}
#endif

// fp8_linear_grouped_wgmma: fp8_linear_grouped (same arguments, tiles and block-scaled function)
// with Hopper's warpgroup MMAs, for prefill-sized MoE steps whose experts have many rows each.
// One warpgroup a block takes one tile's PM rows by PN output columns; 128-column blocks of K
// arrive by cp.async through GW_STAGES buffers (rows past the tile's or the weight's end are
// zero-filled), four m64n128k32 MMAs read each block straight from shared memory, and their sum
// is scaled by the activation rows' and the weight block's scales into the f32 accumulators (the
// promotion DeepGEMM does). K a multiple of 128; grid (ceil(out / PN), tiles), 128 threads,
// GW_SMEM bytes of dynamic shared memory.
#define GW_STAGES 4
#define GW_STAGE ((PM + PN) * 128)
extern "C" __global__ void __launch_bounds__(128) fp8_linear_grouped_wgmma(float* y, const fp8_t* xa, const float* sa,
                                                                           const unsigned long long* w_ptrs,
                                                                           const unsigned long long* sw_ptrs,
                                                                           const int* row0, const int* row_end,
                                                                           int out, int k) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(16) unsigned char gw_smem[];
    unsigned char* sm = gw_smem + ((1024 - (smem_addr(gw_smem) & 1023)) & 1023);
    const int tile = blockIdx.y, r0 = row0[tile], rows = row_end[tile] - r0;
    const fp8_t* w = (const fp8_t*)w_ptrs[tile];
    const float* sw = (const float*)sw_ptrs[tile];
    const int n0 = blockIdx.x * PN, groups = k / 128;
    const fp8_t* xt = xa + (long long)r0 * k;
    auto issue = [&](int kb) {
        if (kb < groups) {
            unsigned char* st = sm + (kb % GW_STAGES) * GW_STAGE;
            for (int v = threadIdx.x; v < (PM + PN) * 8; v += blockDim.x) {
                int r = v >> 3, c16 = v & 7;
                bool is_a = r < PM;
                int rr = is_a ? r : r - PM;
                bool ok = is_a ? rr < rows : n0 + rr < out;
                const fp8_t* src = is_a ? xt + (long long)rr * k : w + (long long)(n0 + rr) * k;
                cp_async_16(st + (is_a ? 0 : PM * 128) + swz(rr, c16), ok ? src + kb * 128 + 16 * c16 : xa, ok);
            }
        }
        cp_async_commit();
    };
#pragma unroll
    for (int s = 0; s < GW_STAGES - 1; s++) issue(s);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int ra = warp * 16 + g, rb = ra + 8;  // this thread's rows of the tile
    float acc[64], part[64];
#pragma unroll
    for (int x = 0; x < 64; x++) acc[x] = 0.f, part[x] = 0.f;
    for (int kb = 0; kb < groups; kb++) {
        cp_async_wait<GW_STAGES - 2>();
        fence_async_smem();
        __syncthreads();  // block kb is in; every warp is done with block kb - 1's buffer
        issue(kb + GW_STAGES - 1);
        // The block's scales are requested before the MMAs, so their latency hides behind them.
        const float ws = sw[(long long)blockIdx.x * groups + kb];
        const float sa0 = ra < rows ? sa[(long long)(r0 + ra) * groups + kb] : 0.f;
        const float sa1 = rb < rows ? sa[(long long)(r0 + rb) * groups + kb] : 0.f;
        const unsigned char* st = sm + (kb % GW_STAGES) * GW_STAGE;
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < 4; ks++) {
            wgmma_m64n128k32_e4m3(part, wgmma_desc(st + ks * 32, 16, 1024),
                                  wgmma_desc(st + PM * 128 + ks * 32, 16, 1024), ks);
        }
        wgmma_commit();
        wgmma_wait_all();
#pragma unroll
        for (int x = 0; x < 64; x++) fence_reg(part[x]);
        const float s0 = sa0 * ws, s1 = sa1 * ws;
#pragma unroll
        for (int j = 0; j < 16; j++) {
            acc[4 * j] += part[4 * j] * s0;
            acc[4 * j + 1] += part[4 * j + 1] * s0;
            acc[4 * j + 2] += part[4 * j + 2] * s1;
            acc[4 * j + 3] += part[4 * j + 3] * s1;
        }
    }
    cp_async_wait<0>();
#pragma unroll
    for (int j = 0; j < 16; j++) {
        const int col = n0 + 8 * j + 2 * c;
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int r = half ? rb : ra;
            if (r >= rows) continue;
            float* dst = y + (long long)(r0 + r) * out + col;
            if (col < out) dst[0] = acc[4 * j + 2 * half];
            if (col + 1 < out) dst[1] = acc[4 * j + 2 * half + 1];
        }
    }
#endif
}

// fp8_linear_grouped_table: the same, with the tiles planned on the device (`moe_sort_rows`):
// tile i < *tile_count multiplies rows row0[i] .. row_end[i] by expert tile_expert[i], whose
// weight and block scales are w_table[e] and sw_table[e]. The grid covers the most tiles a
// step can have; the rest exit. Nothing about the step comes from the host.
extern "C" __global__ void __launch_bounds__(128) fp8_linear_grouped_table(float* y, const fp8_t* xa, const float* sa,
                                                                           const unsigned long long* w_table,
                                                                           const unsigned long long* sw_table,
                                                                           const int* tile_expert, const int* row0,
                                                                           const int* row_end, const int* tile_count,
                                                                           int out, int k) {
    int tile = blockIdx.y;
    if (tile >= *tile_count) return;
    int e = tile_expert[tile];
    fp8_grouped_tile(y, xa, sa, (const fp8_t*)w_table[e], (const float*)sw_table[e], row0[tile], row_end[tile], out,
                     k);
}


// fp8_linear_few: y[n, out] = x · Wᵀ for decode-sized steps (n ≤ 8 tokens, K a multiple of
// 128), the same block-scaled function as the kernels above: weights are the MMA's M dimension
// (16 output rows a warp) and tokens its N (8, zero-padded), so every weight byte is read once,
// by 16-byte loads, and fed to E4M3 MMAs as stored; nothing is wasted on padding rows of
// tokens. Within each 64-column chunk, lane c holds bytes 16c .. 16c+15 of a row for two k32
// steps (the same permutation of K for both operands). Block (blockIdx.x) = 16 rows; its 8 warps
// and the splits (blockIdx.y) share the 128-column blocks of K; each block's partial sum is
// scaled by the activation and weight scales, summed over the warps in order, and written to
// split z's slice of y (the caller sums the splits in order).
extern "C" __global__ void __launch_bounds__(256) fp8_linear_few(float* y, const fp8_t* xa, const float* sa,
                                                                 const fp8_t* w, const float* sw, int n, int out,
                                                                 int k) {
    __shared__ float red[8][32][4];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    int groups = k >> 7;
    int units = gridDim.y * 8, unit = blockIdx.y * 8 + warp;
    int kb0 = (int)((long long)unit * groups / units), kb1 = (int)((long long)(unit + 1) * groups / units);
    int row0 = blockIdx.x * 16;
    int ra = row0 + g, rb = row0 + g + 8;
    const fp8_t* wa = w + (long long)min(ra, out - 1) * k + 16 * c;
    const fp8_t* wb = w + (long long)min(rb, out - 1) * k + 16 * c;
    const fp8_t* xt = xa + (long long)min(g, n - 1) * k + 16 * c;
    bool tok = g < n;
    int t0 = 2 * c, t1 = 2 * c + 1;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 2
    for (int kb = kb0; kb < kb1; kb++) {
        float part[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int h = 0; h < 2; h++) {
            int off = kb * 128 + h * 64;
            uint4 va = *(const uint4*)(wa + off);
            uint4 vb = *(const uint4*)(wb + off);
            uint4 vx = tok ? *(const uint4*)(xt + off) : make_uint4(0u, 0u, 0u, 0u);
            unsigned a0[4] = {va.x, vb.x, va.y, vb.y}, b0[2] = {vx.x, vx.y};
            unsigned a1[4] = {va.z, vb.z, va.w, vb.w}, b1[2] = {vx.z, vx.w};
            mma_e4m3(part, a0, b0);
            mma_e4m3(part, a1, b1);
        }
        float ws = sw[(long long)(row0 >> 7) * groups + kb];
        float s0 = t0 < n ? sa[(long long)t0 * groups + kb] * ws : 0.f;
        float s1 = t1 < n ? sa[(long long)t1 * groups + kb] * ws : 0.f;
        acc[0] += part[0] * s0;
        acc[1] += part[1] * s1;
        acc[2] += part[2] * s0;
        acc[3] += part[3] * s1;
    }
#pragma unroll
    for (int e = 0; e < 4; e++) red[warp][lane][e] = acc[e];
    __syncthreads();
    if (warp != 0) return;
    float sum[4] = {0.f, 0.f, 0.f, 0.f};
    for (int v = 0; v < 8; v++)
#pragma unroll
        for (int e = 0; e < 4; e++) sum[e] += red[v][lane][e];
    float* ys = y + (long long)blockIdx.y * n * out;
    if (ra < out) {
        if (t0 < n) ys[(long long)t0 * out + ra] = sum[0];
        if (t1 < n) ys[(long long)t1 * out + ra] = sum[1];
    }
    if (rb < out) {
        if (t0 < n) ys[(long long)t0 * out + rb] = sum[2];
        if (t1 < n) ys[(long long)t1 * out + rb] = sum[3];
    }
}
