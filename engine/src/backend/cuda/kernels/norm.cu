// Row-wise and elementwise kernels: rms_norm_f32, layer_norm_f32, add_f32, scale_f32,
// silu_mul_f32, gather_rows_f32 and embedding_{f32,bf16}. One block per row for the norms.

// y[r, :] = w ⊙ x[r, :] / sqrt(mean(x[r, :]²) + eps); y may alias x.
extern "C" __global__ void rms_norm_f32(float* y, const float* x, const float* w, int d, float eps) {
    __shared__ float sh[32];
    const float* xr = x + (long long)blockIdx.x * d;
    float* yr = y + (long long)blockIdx.x * d;
    float s = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += xr[i] * xr[i];
    s = block_sum(s, sh);
    float inv = 1.f / sqrtf(s / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = w[i] * (xr[i] * inv);
}

// LayerNorm with weight and bias (biased variance), in place.
extern "C" __global__ void layer_norm_f32(float* x, const float* w, const float* b, int d, float eps) {
    __shared__ float sh[32];
    float* xr = x + (long long)blockIdx.x * d;
    float s = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += xr[i];
    float mean = block_sum(s, sh) / (float)d;
    float v = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) v += (xr[i] - mean) * (xr[i] - mean);
    float inv = 1.f / sqrtf(block_sum(v, sh) / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) xr[i] = (xr[i] - mean) * inv * w[i] + b[i];
}

extern "C" __global__ void add_f32(float* x, const float* y, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

extern "C" __global__ void scale_f32(float* x, float s, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= s;
}

// out = silu(g) ⊙ u, silu(v) = v / (1 + e^-v).
extern "C" __global__ void silu_mul_f32(float* out, const float* g, const float* u, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float v = g[i];
        out[i] = v / (1.f + expf(-v)) * u[i];
    }
}

// out[i, :] = x[rows[i], :]; one block per output row.
extern "C" __global__ void gather_rows_f32(float* out, const float* x, const int* rows, int d) {
    const float* src = x + (long long)rows[blockIdx.x] * d;
    float* dst = out + (long long)blockIdx.x * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = src[i];
}

template <typename W>
__device__ void embedding_impl(float* out, const W* table, const int* ids, int d) {
    const W* src = table + (long long)ids[blockIdx.x] * d;
    float* dst = out + (long long)blockIdx.x * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = to_f(src[i]);
}

extern "C" __global__ void embedding_f32(float* out, const float* table, const int* ids, int d) {
    embedding_impl<float>(out, table, ids, d);
}

extern "C" __global__ void embedding_bf16(float* out, const bf16_t* table, const int* ids, int d) {
    embedding_impl<bf16_t>(out, table, ids, d);
}

// Device-side initialisation and casts (benchmarks build full-width models in device memory
// without a host copy of the weights).

// A counter-based hash (splitmix64) so every element's value depends only on (seed, index):
// the fill is reproducible and needs no generator state.
__device__ __forceinline__ float uniform_pm1(unsigned long long seed, long long i) {
    unsigned long long z = seed + 0x9e3779b97f4a7c15ull * (unsigned long long)(i + 1);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (float)(z >> 40) * (2.f / 16777216.f) - 1.f;
}

// out[i] = scale · U(-1, 1), stored as bf16; grid-stride.
extern "C" __global__ void fill_uniform_bf16(bf16_t* out, long long n, unsigned long long seed, float scale) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        store_as(out + i, scale * uniform_pm1(seed, i));
}

extern "C" __global__ void fill_uniform_f32(float* out, long long n, unsigned long long seed, float scale) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = scale * uniform_pm1(seed, i);
}

extern "C" __global__ void fill_const_f32(float* out, long long n, float v) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = v;
}

// f32 activations to bf16 (round to nearest even) for the cuBLAS bf16 GEMMs.
extern "C" __global__ void cast_f32_bf16(bf16_t* out, const float* x, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        store_as(out + i, x[i]);
}

// bf16 GEMM outputs back to f32.
extern "C" __global__ void cast_bf16_f32(float* out, const bf16_t* x, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = to_f(x[i]);
}

// out[i] uniform in [lo, hi] with range = lo << 8 | hi (random FP8 cache rows for benchmarks).
extern "C" __global__ void fill_bytes(unsigned char* out, long long n, unsigned long long seed, int range) {
    int lo = (range >> 8) & 0xff, hi = range & 0xff;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float u = 0.5f * (uniform_pm1(seed, i) + 1.f);
        out[i] = (unsigned char)min(hi, lo + (int)(u * (float)(hi - lo + 1)));
    }
}
