// linear_{f32,bf16}: y[n, out] = x[n, in] · W[out, in]ᵀ with f32 activations, weights stored as
// f32 or bf16, and f32 accumulation. A plain 64×64 shared-memory tile with a 4×4 register
// micro-tile per thread; bounds-checked for any shape.

#define BM 64
#define BN 64
#define BK 16

template <typename W>
__device__ void linear_impl(float* __restrict__ y, const float* __restrict__ x,
                            const W* __restrict__ w, int n, int out, int in) {
    __shared__ float xs[BK][BM + 1];
    __shared__ float ws[BK][BN + 1];
    int tid = threadIdx.x;
    int tx = tid % 16, ty = tid / 16;
    int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.f;
    for (int k0 = 0; k0 < in; k0 += BK) {
        for (int i = tid; i < BM * BK; i += 256) {
            int r = i / BK, c = i % BK;
            int gm = m0 + r, gk = k0 + c;
            xs[c][r] = (gm < n && gk < in) ? x[(long long)gm * in + gk] : 0.f;
        }
        for (int i = tid; i < BN * BK; i += 256) {
            int r = i / BK, c = i % BK;
            int gn = n0 + r, gk = k0 + c;
            ws[c][r] = (gn < out && gk < in) ? to_f(w[(long long)gn * in + gk]) : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int c = 0; c < BK; c++) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] = xs[c][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; j++) b[j] = ws[c][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int gm = m0 + ty + 16 * i;
        if (gm >= n) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int gn = n0 + tx + 16 * j;
            if (gn < out) y[(long long)gm * out + gn] = acc[i][j];
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) linear_f32(float* y, const float* x, const float* w, int n, int out, int in) {
    linear_impl<float>(y, x, w, n, out, in);
}

extern "C" __global__ void __launch_bounds__(256) linear_bf16(float* y, const float* x, const bf16_t* w, int n, int out, int in) {
    linear_impl<bf16_t>(y, x, w, n, out, in);
}
