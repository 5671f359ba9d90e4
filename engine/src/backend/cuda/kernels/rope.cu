// rope_f32: rotary embedding with the YaRN table, in place, on `heads` vectors per token.
// `interleaved` rotates pairs (2j, 2j+1) (MLA); otherwise pairs (j, j + half) (the indexer's
// NeoX layout). cos/sin are computed like the CPU table: angle = pos·inv_freq in f32, cos and
// sin in f64, scaled by the attention factor.

__device__ __forceinline__ void rope_cos_sin(int pos, float inv_freq, float factor, float* c, float* s) {
    float angle = (float)pos * inv_freq;
    *c = (float)cos((double)angle) * factor;
    *s = (float)sin((double)angle) * factor;
}

__device__ __forceinline__ void rope_pair(float* v, int j, int half, int interleaved, float c, float s) {
    int i0 = interleaved ? 2 * j : j;
    int i1 = interleaved ? 2 * j + 1 : j + half;
    float a = v[i0], b = v[i1];
    v[i0] = a * c - b * s;
    v[i1] = b * c + a * s;
}

// Grid (tokens, heads); the rotated part of head h of token t starts at
// x + t*token_stride + h*head_stride + offset and is 2*half wide.
extern "C" __global__ void rope_f32(float* x, const int* pos, const float* inv_freq, float factor,
                                    int token_stride, int head_stride, int offset, int half,
                                    int interleaved) {
    int t = blockIdx.x, h = blockIdx.y;
    float* v = x + (long long)t * token_stride + (long long)h * head_stride + offset;
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        float c, s;
        rope_cos_sin(pos[t], inv_freq[j], factor, &c, &s);
        rope_pair(v, j, half, interleaved, c, s);
    }
}
