// fusecc: the RMSprop step of N stacked models in ONE pass over memory, each model with its own hyper-parameters.
//
// torch has fused CPU kernels for Adam(W), SGD and Adagrad but not for RMSprop; its foreach path makes five or six
// passes over the parameters and states. This kernel reads p, g, square_avg (and the momentum buffer, grad_avg)
// once and writes them once, element by element in torch.optim.RMSprop's order of operations (single-tensor path):
//
//   g = maximize ? -g : g;  if (wd) g = g + wd * p
//   sq = sq * alpha + (1 - alpha) * g * g
//   centered: ga = ga + (1 - alpha) * (g - ga);  avg = sqrt(sq - ga * ga) + eps     else: avg = sqrt(sq) + eps
//   momentum: buf = buf * momentum + g / avg;  p = p - lr * buf                     else: p = p - lr * g / avg
//
// A parameter is [N, L] (model-major, contiguous); model n uses lr[n], alpha[n], ... Threads split the N*L elements
// (OpenMP, static chunks). Results equal torch's within float rounding (fused multiply-adds may differ by an ulp).
#include <math.h>
#include <stdint.h>

// one element; C, M, X, W (centered, momentum, maximize, weight decay) are literal constants in every function the
// macro below defines, so each variant is its own branch-free loop, vectorized (restrict: the arrays never overlap)
#define BODY(C, M, X, W)                                          \
    {                                                             \
        float gi = (X) ? -g[i] : g[i];                            \
        if (W) gi = gi + w * p[i];                                \
        float s = sq[i] * a + one_a * gi * gi;                    \
        sq[i] = s;                                                \
        float avg;                                                \
        if (C) {                                                  \
            float q = ga[i] + one_a * (gi - ga[i]);               \
            ga[i] = q;                                            \
            avg = sqrtf(s - q * q) + e;                           \
        } else {                                                  \
            avg = sqrtf(s) + e;                                   \
        }                                                         \
        if (M) {                                                  \
            float b = buf[i] * mom + gi / avg;                    \
            buf[i] = b;                                           \
            p[i] = p[i] - l * b;                                  \
        } else {                                                  \
            p[i] = p[i] - l * (gi / avg);                         \
        }                                                         \
    }

#define DEFINE(NAME, C, M, X, W)                                                                                   \
    static void NAME(float *restrict p, const float *restrict g, float *restrict sq, float *restrict buf,         \
                     float *restrict ga, int64_t len, float l, float a, float one_a, float e, float w, float mom, \
                     int threads) {                                                                               \
        _Pragma("omp parallel for simd schedule(static) num_threads(threads) if (threads > 1 && len > 65536)")    \
        for (int64_t i = 0; i < len; i++) BODY(C, M, X, W)                                                        \
    }

DEFINE(plain, 0, 0, 0, 0)
DEFINE(mom, 0, 1, 0, 0)
DEFINE(wd, 0, 0, 0, 1)
DEFINE(mom_wd, 0, 1, 0, 1)
DEFINE(centered, 1, 0, 0, 0)
DEFINE(centered_mom, 1, 1, 0, 0)
DEFINE(centered_wd, 1, 0, 0, 1)
DEFINE(centered_mom_wd, 1, 1, 0, 1)
DEFINE(max_plain, 0, 0, 1, 0)
DEFINE(max_mom, 0, 1, 1, 0)
DEFINE(max_wd, 0, 0, 1, 1)
DEFINE(max_mom_wd, 0, 1, 1, 1)
DEFINE(max_centered, 1, 0, 1, 0)
DEFINE(max_centered_mom, 1, 1, 1, 0)
DEFINE(max_centered_wd, 1, 0, 1, 1)
DEFINE(max_centered_mom_wd, 1, 1, 1, 1)

typedef void (*step_fn)(float *, const float *, float *, float *, float *, int64_t, float, float, float, float, float,
                        float, int);
static const step_fn STEPS[16] = {plain, wd, mom, mom_wd, centered, centered_wd, centered_mom, centered_mom_wd,
                                  max_plain, max_wd, max_mom, max_mom_wd, max_centered, max_centered_wd,
                                  max_centered_mom, max_centered_mom_wd};

void fusecc_rmsprop_f32(float *p, const float *g, float *sq, float *buf, float *ga, int64_t n, int64_t len,
                        const double *lr, const double *alpha, const double *eps, const double *wd,
                        const double *momentum, int centered, const int *maximize, int threads) {
    for (int64_t m = 0; m < n; m++) {
        const float a = (float)alpha[m], one_a = (float)(1.0 - alpha[m]), e = (float)eps[m], w = (float)wd[m];
        const float l = (float)lr[m], mom_m = (float)momentum[m];
        const int use_mom = buf != 0 && momentum[m] > 0.0, has_wd = w != 0.0f;
        const step_fn f = STEPS[(maximize[m] ? 8 : 0) + (centered ? 4 : 0) + (use_mom ? 2 : 0) + (has_wd ? 1 : 0)];
        f(p + m * len, g + m * len, sq + m * len, buf ? buf + m * len : 0, ga ? ga + m * len : 0, len, l, a, one_a,
          e, w, mom_m, threads);
    }
}
