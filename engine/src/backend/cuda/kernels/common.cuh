// Shared prelude of every kernel family: bf16 storage without cuda_bf16.h (NVRTC needs no
// include paths this way), load/store converters and warp/block reductions.

typedef unsigned short bf16_t;

// -inf without math.h (NVRTC has no standard headers).
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16_t x) { return __uint_as_float(((unsigned)x) << 16); }

__device__ __forceinline__ void store_as(float* p, float v) { *p = v; }
// Round to nearest even, as half::bf16::from_f32 does on the host.
__device__ __forceinline__ void store_as(bf16_t* p, float v) {
    unsigned u = __float_as_uint(v);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x7fffffu)) {
        *p = (bf16_t)((u >> 16) | 0x40);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    *p = (bf16_t)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block; `sh` holds at least 32 floats. Every thread gets the result.
__device__ float block_sum(float v, float* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        v = lane < nw ? sh[lane] : 0.f;
        v = warp_sum(v);
        if (lane == 0) sh[0] = v;
    }
    __syncthreads();
    float r = sh[0];
    __syncthreads();
    return r;
}

__device__ float block_max(float v, float* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        v = lane < nw ? sh[lane] : NEG_INF;
        v = warp_max(v);
        if (lane == 0) sh[0] = v;
    }
    __syncthreads();
    float r = sh[0];
    __syncthreads();
    return r;
}

// Integer sum over the block; `sh` holds at least 32 ints.
__device__ int block_sum_int(int v, int* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        v = lane < nw ? sh[lane] : 0;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) sh[0] = v;
    }
    __syncthreads();
    int r = sh[0];
    __syncthreads();
    return r;
}

// Exclusive prefix sum over the block in thread order; `sh` holds at least 33 ints.
// Returns this thread's exclusive prefix; `*total` receives the block's sum.
__device__ int block_exclusive_scan(int v, int* sh, int* total) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    int inc = v;
    for (int o = 1; o < 32; o <<= 1) {
        int t = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += t;
    }
    __syncthreads();
    if (lane == 31 || threadIdx.x == blockDim.x - 1) sh[w] = inc;
    __syncthreads();
    if (threadIdx.x == 0) {
        int acc = 0;
        for (int i = 0; i < nw; i++) {
            int s = sh[i];
            sh[i] = acc;
            acc += s;
        }
        sh[32] = acc;
    }
    __syncthreads();
    int r = sh[w] + inc - v;
    *total = sh[32];
    __syncthreads();
    return r;
}

// ---- FP8 E4M3 (float8_e4m3fn: bias 7, no infinities, S.1111.111 is NaN) ----

typedef unsigned char fp8_t;

// Exact decode by bit placement (subnormals are m · 2^-9).
__device__ __forceinline__ float e4m3_to_f(fp8_t b) {
    unsigned e = (b >> 3) & 15u, m = b & 7u;
    float v;
    if (e == 0) v = (float)m * 0.001953125f;
    else if (e == 15 && m == 7) v = __int_as_float(0x7fc00000);
    else v = __uint_as_float(((e + 120u) << 23) | (m << 20));
    return (b & 0x80) ? -v : v;
}

// Round to nearest even, saturating to ±448 (sm_89+).
__device__ __forceinline__ fp8_t f_to_e4m3(float x) {
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(0.f), "f"(x));
    return (fp8_t)(r & 0xff);
}

// The smallest power of two at or above a positive normal s (UE8M0 scales).
__device__ __forceinline__ float round_up_pow2(float s) {
    unsigned u = __float_as_uint(s);
    return (u & 0x7fffffu) ? __uint_as_float((u & 0x7f800000u) + 0x800000u) : s;
}

// The scale of a quantization group whose largest magnitude is amax.
__device__ __forceinline__ float group_scale(float amax, int pow2) {
    float s = fmaxf(amax, 1e-4f) / 448.f;
    return pow2 ? round_up_pow2(s) : s;
}

// Quantizes one group of n <= 128 values with one warp: writes codes, returns the scale.
__device__ float warp_quantize_group(const float* x, fp8_t* codes, int n, int pow2) {
    int lane = threadIdx.x & 31;
    float amax = 0.f;
    for (int i = lane; i < n; i += 32) amax = fmaxf(amax, fabsf(x[i]));
    amax = warp_max(amax);
    float s = group_scale(amax, pow2);
    for (int i = lane; i < n; i += 32) codes[i] = f_to_e4m3(x[i] / s);
    return s;
}

// ---- paged caches ----

// The cache slot of position j of a sequence whose block table is `table` (bs slots a block).
__device__ __forceinline__ long long paged_slot(const int* table, int bs, int j) {
    return (long long)table[j / bs] * bs + j % bs;
}

// ---- cache row readers: value i of slot r, whatever the storage ----

struct RowsF32 {
    const float* p;
    int width;
    __device__ __forceinline__ float at(long long r, int i) const { return p[r * width + i]; }
};

struct RowsBf16 {
    const bf16_t* p;
    int width;
    __device__ __forceinline__ float at(long long r, int i) const { return to_f(p[r * width + i]); }
};

// FP8 rows: `q` E4M3 codes, then one f32 scale per 128 of them, then `tail` bf16 values kept
// unquantized (the latent's k_pe; none for indexer keys). `stride` bytes per row.
struct RowsFp8 {
    const fp8_t* p;
    int q;
    int tail_off;
    int stride;
    __device__ __forceinline__ float at(long long r, int i) const {
        const fp8_t* row = p + r * stride;
        if (i < q) return e4m3_to_f(row[i]) * ((const float*)(row + q))[i >> 7];
        return to_f(((const bf16_t*)(row + tail_off))[i - q]);
    }
};

// ---- tensor-core building blocks (sm_80+; the FP8 conversions sm_89+) ----
//
// mma_*_16816: D += A · B for one m16n8k16 tile, A row-major and B column-major fragments as
// the PTX ISA lays them out: a[0] = (row g, k 2c..2c+1), a[1] = (row g+8, k 2c..), a[2] =
// (row g, k 2c+8..), a[3] = (row g+8, k 2c+8..); b[0] = (k 2c.., col g), b[1] = (k 2c+8.., col
// g); d[0..1] = (row g, cols 2c, 2c+1), d[2..3] = (row g+8, ...), with g = lane / 4, c = lane % 4.
//
// When both operands of a dot product are read by the same rule, any permutation of k inside a
// 16-wide step gives the same sum. The kernels use that: in step s, thread c holds the four
// contiguous elements 16s + 4c .. 16s + 4c + 3 of its rows (a[0]/b[0] the first two, a[2]/b[1]
// the last two), so every fragment is one 8-byte load, from global or shared memory alike.

__device__ __forceinline__ void mma_bf16_16816(float* d, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_f16_16816(float* d, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two floats as packed bf16 (lo in the low half), round to nearest even.
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ unsigned short f_to_f16_bits(float x) {
    unsigned short r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ float f16_bits_to_f(unsigned short h) {
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h));
    return r;
}

// Two E4M3 codes (low byte first) as packed f16, exactly (every E4M3 value is an f16 value).
__device__ __forceinline__ unsigned e4m3x2_to_f16x2(unsigned short codes) {
    unsigned r;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(codes));
    return r;
}

// D += A · B for a 16×32 E4M3 tile A (row-major) and a 32×8 E4M3 tile B (column-major), f32
// accumulation (sm_89+).
__device__ __forceinline__ void mma_e4m3(float* d, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

// 16-byte asynchronous copy to shared memory; `valid == false` writes zeros instead.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

// Four 8x8 b16 matrices, transposed: lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// Bytes between rows of a 16-bit tile in shared memory so that the eight-byte fragment loads of
// four consecutive rows (one half-warp) fall in distinct banks: at least `width` elements, a
// multiple of 16 bytes, and 32 or 96 modulo 128.
__device__ __forceinline__ int mma_row_stride(int width) {
    int b = (width * 2 + 15) / 16 * 16;
    while (b % 128 != 32 && b % 128 != 96) b += 16;
    return b;
}

// Hopper's warpgroup MMAs (wgmma), where the target has them (sm_90a).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Descriptor of a 128-byte-swizzled shared-memory operand whose 8-row groups are `sbo` bytes
// apart and (MN-major operands) whose 64-element column blocks are `lbo` bytes apart.
__device__ __forceinline__ unsigned long long wgmma_desc(const void* p, unsigned lbo, unsigned sbo) {
    unsigned long long a = smem_addr(p);
    return ((a & 0x3FFFF) >> 4) | ((unsigned long long)(lbo >> 4) << 16) |
           ((unsigned long long)(sbo >> 4) << 32) | (1ull << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
// Generic-proxy writes to shared memory (stores, cp.async) made visible to the tensor cores.
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
// Keeps the compiler from moving reads of an accumulator above the wait for its wgmma.
__device__ __forceinline__ void fence_reg(float& r) { asm volatile("" : "+f"(r)::"memory"); }
#endif
