// Writers of the paged caches, one block per token of the step:
// kv_store_{f32,bf16,fp8}: latent row [RMSNorm(c_kv) | RoPE_interleaved(k_pe)] into slot
//   `slots[t]`;
// index_key_store_{f32,bf16,fp8}: RoPE_half_split(LayerNorm(k)) into the indexer key cache.
// The row is built once in shared memory (dynamic: kvr + rd, or id, floats) by the same code
// for every storage, then stored as f32, bf16, or FP8 rows (power-of-two scales, as FlashMLA's
// and DeepGEMM's formats):
//   latent [c_kv as E4M3 | one f32 scale per 128 | k_pe as bf16], `stride` bytes per slot
//   (656 for DeepSeek-V3.2); indexer key [E4M3 | one f32 scale per 128] (132 bytes).

__device__ __forceinline__ void cs(int pos, float inv_freq, float factor, float* c, float* s) {
    float angle = (float)pos * inv_freq;
    *c = (float)cos((double)angle) * factor;
    *s = (float)sin((double)angle) * factor;
}

// row = [RMSNorm(c_kv) | RoPE_interleaved(k_pe)] of token t.
__device__ void latent_row(float* row, float* sh, const float* kv, const float* norm_w, int t, int pos,
                           const float* inv_freq, float factor, int kvr, int rd, float eps) {
    int width = kvr + rd;
    const float* src = kv + (long long)t * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) row[i] = src[i];
    __syncthreads();
    float s = 0.f;
    for (int i = threadIdx.x; i < kvr; i += blockDim.x) s += row[i] * row[i];
    s = block_sum(s, sh);
    float inv = 1.f / sqrtf(s / (float)kvr + eps);
    for (int i = threadIdx.x; i < kvr; i += blockDim.x) row[i] = norm_w[i] * (row[i] * inv);
    for (int j = threadIdx.x; j < rd / 2; j += blockDim.x) {
        float c, sn;
        cs(pos, inv_freq[j], factor, &c, &sn);
        float a = row[kvr + 2 * j], b = row[kvr + 2 * j + 1];
        row[kvr + 2 * j] = a * c - b * sn;
        row[kvr + 2 * j + 1] = b * c + a * sn;
    }
    __syncthreads();
}

// row = RoPE_half_split(LayerNorm(k)) of token t (RoPE on the first rd values).
__device__ void index_key_row(float* row, float* sh, const float* k, const float* w, const float* b, int t,
                              int pos, const float* inv_freq, float factor, int id, int rd, float eps) {
    const float* src = k + (long long)t * id;
    float s = 0.f;
    for (int i = threadIdx.x; i < id; i += blockDim.x) {
        row[i] = src[i];
        s += src[i];
    }
    float mean = block_sum(s, sh) / (float)id;
    float v = 0.f;
    for (int i = threadIdx.x; i < id; i += blockDim.x) v += (row[i] - mean) * (row[i] - mean);
    float inv = 1.f / sqrtf(block_sum(v, sh) / (float)id + eps);
    for (int i = threadIdx.x; i < id; i += blockDim.x) row[i] = (row[i] - mean) * inv * w[i] + b[i];
    __syncthreads();
    int half = rd / 2;
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        float c, sn;
        cs(pos, inv_freq[j], factor, &c, &sn);
        float a = row[j], bb = row[j + half];
        row[j] = a * c - bb * sn;
        row[j + half] = bb * c + a * sn;
    }
    __syncthreads();
}

template <typename C>
__device__ void store_row(C* dst, const float* row, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) store_as(dst + i, row[i]);
}

// FP8 row: the first q values as E4M3 with one f32 scale per 128 (one warp per group), then the
// rest as bf16.
__device__ void store_row_fp8(fp8_t* dst, const float* row, int q, int n) {
    int groups = (q + 127) / 128;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int g = warp; g < groups; g += nw) {
        float sc = warp_quantize_group(row + g * 128, dst + g * 128, min(128, q - g * 128), 1);
        if (lane == 0) ((float*)(dst + q))[g] = sc;
    }
    bf16_t* tail = (bf16_t*)(dst + q + 4 * groups);
    for (int i = q + threadIdx.x; i < n; i += blockDim.x) store_as(tail + (i - q), row[i]);
}

template <typename C>
__device__ void kv_store_impl(C* cache, const float* kv, const float* norm_w, const int* slots,
                              const int* pos, const float* inv_freq, float factor, int kvr, int rd,
                              float eps) {
    extern __shared__ float row[];
    __shared__ float sh[32];
    int t = blockIdx.x;
    latent_row(row, sh, kv, norm_w, t, pos[t], inv_freq, factor, kvr, rd, eps);
    store_row(cache + (long long)slots[t] * (kvr + rd), row, kvr + rd);
}

template <typename C>
__device__ void index_key_store_impl(C* cache, const float* k, const float* w, const float* b,
                                     const int* slots, const int* pos, const float* inv_freq,
                                     float factor, int id, int rd, float eps) {
    extern __shared__ float row[];
    __shared__ float sh[32];
    int t = blockIdx.x;
    index_key_row(row, sh, k, w, b, t, pos[t], inv_freq, factor, id, rd, eps);
    store_row(cache + (long long)slots[t] * id, row, id);
}

extern "C" __global__ void kv_store_f32(float* cache, const float* kv, const float* norm_w, const int* slots,
                                        const int* pos, const float* inv_freq, float factor, int kvr, int rd, float eps) {
    kv_store_impl<float>(cache, kv, norm_w, slots, pos, inv_freq, factor, kvr, rd, eps);
}
extern "C" __global__ void kv_store_bf16(bf16_t* cache, const float* kv, const float* norm_w, const int* slots,
                                         const int* pos, const float* inv_freq, float factor, int kvr, int rd, float eps) {
    kv_store_impl<bf16_t>(cache, kv, norm_w, slots, pos, inv_freq, factor, kvr, rd, eps);
}
extern "C" __global__ void index_key_store_f32(float* cache, const float* k, const float* w, const float* b,
                                               const int* slots, const int* pos, const float* inv_freq,
                                               float factor, int id, int rd, float eps) {
    index_key_store_impl<float>(cache, k, w, b, slots, pos, inv_freq, factor, id, rd, eps);
}
extern "C" __global__ void index_key_store_bf16(bf16_t* cache, const float* k, const float* w, const float* b,
                                                const int* slots, const int* pos, const float* inv_freq,
                                                float factor, int id, int rd, float eps) {
    index_key_store_impl<bf16_t>(cache, k, w, b, slots, pos, inv_freq, factor, id, rd, eps);
}

extern "C" __global__ void kv_store_fp8(fp8_t* cache, const float* kv, const float* norm_w, const int* slots,
                                        const int* pos, const float* inv_freq, float factor, int kvr, int rd,
                                        float eps, int stride) {
    extern __shared__ float fp8_row[];  // not `row`: the templates above declare that name with C++ linkage
    __shared__ float sh[32];
    int t = blockIdx.x;
    latent_row(fp8_row, sh, kv, norm_w, t, pos[t], inv_freq, factor, kvr, rd, eps);
    store_row_fp8(cache + (long long)slots[t] * stride, fp8_row, kvr, kvr + rd);
}

extern "C" __global__ void index_key_store_fp8(fp8_t* cache, const float* k, const float* w, const float* b,
                                               const int* slots, const int* pos, const float* inv_freq,
                                               float factor, int id, int rd, float eps, int stride) {
    extern __shared__ float fp8_row[];  // not `row`: the templates above declare that name with C++ linkage
    __shared__ float sh[32];
    int t = blockIdx.x;
    index_key_row(fp8_row, sh, k, w, b, t, pos[t], inv_freq, factor, id, rd, eps);
    store_row_fp8(cache + (long long)slots[t] * stride, fp8_row, id, id);
}
