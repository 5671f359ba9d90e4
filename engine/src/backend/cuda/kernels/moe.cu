// MoE routing and combine.
// moe_route: the noaux_tc router, one thread per token, exactly as the CPU's `route_scores`:
//   sigmoid scores; bias only for selection; group score = sum of the group's two best biased
//   scores; keep the best topk_group groups; top-k experts among them (ties to the lower index);
//   ids written ascending with weights σ/Σσ (+1e-20) × scaling.
// moe_combine: y[t, :] = Σ_i w[t, i] · rows[row_of[t·k + i], :], in ascending expert order.

#define MAX_EXPERTS 512
#define MAX_GROUPS 64

extern "C" __global__ void moe_route(int* ids, float* wts, const float* logits, const float* bias,
                                     int n, int e, int n_group, int topk_group, int k, int normalize,
                                     float scaling) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    float biased[MAX_EXPERTS];
    unsigned char taken[MAX_EXPERTS];
    float gscore[MAX_GROUPS];
    unsigned char gkeep[MAX_GROUPS];
    const float* l = logits + (long long)t * e;
    for (int i = 0; i < e; i++) {
        biased[i] = 1.f / (1.f + expf(-l[i])) + bias[i];
        taken[i] = 0;
    }
    int per = e / (n_group > 0 ? n_group : 1);
    for (int g = 0; g < n_group; g++) {
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
        gscore[g] = per >= 2 ? (0.f + m1) + m2 : 0.f + m1;
        gkeep[g] = 0;
    }
    for (int r = 0; r < topk_group && r < n_group; r++) {
        int best = -1;
        for (int g = 0; g < n_group; g++)
            if (!gkeep[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
        gkeep[best] = 1;
    }
    for (int i = 0; i < e; i++)
        if (!gkeep[i / per]) biased[i] = NEG_INF;
    for (int r = 0; r < k; r++) {
        int best = -1;
        for (int i = 0; i < e; i++)
            if (!taken[i] && (best < 0 || biased[i] > biased[best])) best = i;
        taken[best] = 1;
    }
    int* out = ids + (long long)t * k;
    float* w = wts + (long long)t * k;
    int c = 0;
    float sum = 0.f;
    for (int i = 0; i < e && c < k; i++) {
        if (taken[i]) {
            out[c] = i;
            w[c] = 1.f / (1.f + expf(-l[i]));
            sum += w[c];
            c++;
        }
    }
    if (normalize) {
        sum += 1e-20f;
        for (int i = 0; i < k; i++) w[i] /= sum;
    }
    for (int i = 0; i < k; i++) w[i] *= scaling;
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
