// Writers of the paged caches, one block per token of the step:
// kv_store_{f32,bf16}: latent row [RMSNorm(c_kv) | RoPE_interleaved(k_pe)] into slot `slots[t]`;
// index_key_store_{f32,bf16}: RoPE_half_split(LayerNorm(k)) into the indexer key cache.
// Dynamic shared memory: one row (kvr + rd, or id, floats).

__device__ __forceinline__ void cs(int pos, float inv_freq, float factor, float* c, float* s) {
    float angle = (float)pos * inv_freq;
    *c = (float)cos((double)angle) * factor;
    *s = (float)sin((double)angle) * factor;
}

template <typename C>
__device__ void kv_store_impl(C* cache, const float* kv, const float* norm_w, const int* slots,
                              const int* pos, const float* inv_freq, float factor, int kvr, int rd,
                              float eps) {
    extern __shared__ float row[];
    __shared__ float sh[32];
    int t = blockIdx.x, width = kvr + rd;
    const float* src = kv + (long long)t * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) row[i] = src[i];
    __syncthreads();
    float s = 0.f;
    for (int i = threadIdx.x; i < kvr; i += blockDim.x) s += row[i] * row[i];
    s = block_sum(s, sh);
    float inv = 1.f / sqrtf(s / (float)kvr + eps);
    C* dst = cache + (long long)slots[t] * width;
    for (int i = threadIdx.x; i < kvr; i += blockDim.x) store_as(dst + i, norm_w[i] * (row[i] * inv));
    for (int j = threadIdx.x; j < rd / 2; j += blockDim.x) {
        float c, sn;
        cs(pos[t], inv_freq[j], factor, &c, &sn);
        float a = row[kvr + 2 * j], b = row[kvr + 2 * j + 1];
        store_as(dst + kvr + 2 * j, a * c - b * sn);
        store_as(dst + kvr + 2 * j + 1, b * c + a * sn);
    }
}

template <typename C>
__device__ void index_key_store_impl(C* cache, const float* k, const float* w, const float* b,
                                     const int* slots, const int* pos, const float* inv_freq,
                                     float factor, int id, int rd, float eps) {
    extern __shared__ float row[];
    __shared__ float sh[32];
    int t = blockIdx.x;
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
    C* dst = cache + (long long)slots[t] * id;
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        float c, sn;
        cs(pos[t], inv_freq[j], factor, &c, &sn);
        float a = row[j], bb = row[j + half];
        store_as(dst + j, a * c - bb * sn);
        store_as(dst + j + half, bb * c + a * sn);
    }
    for (int i = rd + threadIdx.x; i < id; i += blockDim.x) store_as(dst + i, row[i]);
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

// FP8 rows (pow2 scales, as FlashMLA's and DeepGEMM's formats):
// kv_store_fp8: [c_kv as E4M3 | one f32 scale per 128 | k_pe as bf16], `stride` bytes per slot
//   (656 for DeepSeek-V3.2);
// index_key_store_fp8: [key as E4M3 | one f32 scale per 128] (132 bytes for V3.2).
extern "C" __global__ void kv_store_fp8(fp8_t* cache, const float* kv, const float* norm_w, const int* slots,
                                        const int* pos, const float* inv_freq, float factor, int kvr, int rd,
                                        float eps, int stride) {
    extern __shared__ float row[];
    __shared__ float sh[32];
    int t = blockIdx.x, width = kvr + rd;
    const float* src = kv + (long long)t * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) row[i] = src[i];
    __syncthreads();
    float s = 0.f;
    for (int i = threadIdx.x; i < kvr; i += blockDim.x) s += row[i] * row[i];
    s = block_sum(s, sh);
    float inv = 1.f / sqrtf(s / (float)kvr + eps);
    for (int i = threadIdx.x; i < kvr; i += blockDim.x) row[i] = norm_w[i] * (row[i] * inv);
    __syncthreads();
    fp8_t* dst = cache + (long long)slots[t] * stride;
    int groups = (kvr + 127) / 128;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int g = warp; g < groups; g += nw) {
        float sc = warp_quantize_group(row + g * 128, dst + g * 128, min(128, kvr - g * 128), 1);
        if (lane == 0) ((float*)(dst + kvr))[g] = sc;
    }
    bf16_t* pe = (bf16_t*)(dst + kvr + 4 * groups);
    for (int j = threadIdx.x; j < rd / 2; j += blockDim.x) {
        float c, sn;
        cs(pos[t], inv_freq[j], factor, &c, &sn);
        float a = row[kvr + 2 * j], b = row[kvr + 2 * j + 1];
        store_as(pe + 2 * j, a * c - b * sn);
        store_as(pe + 2 * j + 1, b * c + a * sn);
    }
}

extern "C" __global__ void index_key_store_fp8(fp8_t* cache, const float* k, const float* w, const float* b,
                                               const int* slots, const int* pos, const float* inv_freq,
                                               float factor, int id, int rd, float eps, int stride) {
    extern __shared__ float row[];
    __shared__ float sh[32];
    int t = blockIdx.x;
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
        cs(pos[t], inv_freq[j], factor, &c, &sn);
        float a = row[j], bb = row[j + half];
        row[j] = a * c - bb * sn;
        row[j + half] = bb * c + a * sn;
    }
    __syncthreads();
    fp8_t* dst = cache + (long long)slots[t] * stride;
    int groups = (id + 127) / 128;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int g = warp; g < groups; g += nw) {
        float sc = warp_quantize_group(row + g * 128, dst + g * 128, min(128, id - g * 128), 1);
        if (lane == 0) ((float*)(dst + id))[g] = sc;
    }
}
