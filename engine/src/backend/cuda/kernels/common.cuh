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
