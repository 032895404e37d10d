/* fusecc: per-model GEMM for few rows per model, on x86-64 CPUs with AVX2 + FMA (fp32, inference).
 *
 *   y[n, r, o] = act(b[n, o] + sum_k x[n, r, k] * w[n, o, k])     n < N models, r < R rows, o < O, k < K
 *
 * With a few rows per model (an MLP fleet at batch 8, a conv on a 1x1 map) the GEMM is bound by reading the N
 * weight matrices; a BLAS sgemm packs every weight into its panel layout on each call, which moves each weight
 * three times. This kernel reads w in its own layout ([O, K] rows, the nn.Linear one) from memory once: each
 * three weight rows are streamed and dotted with up to four input rows at a time (12 AVX accumulators),
 * the input rows staying in L1/L2. Work is split over (model, block of output rows) with OpenMP.
 *
 * Strides are in elements; the innermost dimension of x, w and y is contiguous. Built and loaded at run time by
 * kernels/linear/cpu.py (cc -O3 -mavx2 -mfma -fopenmp); act: 0 none, 1 relu.
 */
#include <immintrin.h>
#include <stdint.h>

#define MR 4   /* input rows per micro-tile */
#define OR 3   /* weight rows per micro-tile: MR x OR = 12 AVX accumulators (4 x 2 is 10-20% slower, 8 too few to
                  hide the FMA latency) */
#define OB 18  /* output rows per task (a multiple of OR) */
#define PF 4096 /* software prefetch distance in floats: with weights read from DRAM (cold caches, as in a real
                   forward) it takes the kernel from 16 to 23 GB/s; the hardware prefetchers alone fall behind */

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
/* output rows [o0, o1) of one model, all R input rows */
static void block(const float *x, int64_t sxr, const float *w, int64_t swo, const float *b, int64_t sbo, float *y,
                  int64_t syr, int64_t R, int64_t K, int64_t o0, int64_t o1, int act) {
    const int64_t K8 = K & ~(int64_t)7;
    const int dense = swo == K;
    for (int64_t o = o0; o < o1; o += OR) {
        const int oo = o1 - o < OR ? (int)(o1 - o) : OR;
        const float *ws[OR];
        for (int j = 0; j < OR; j++) ws[j] = w + (o + (j < oo ? j : 0)) * swo;
        for (int64_t r = 0; r < R; r += MR) {
            const int rr = R - r < MR ? (int)(R - r) : MR;
            const float *xs[MR];
            for (int i = 0; i < MR; i++) xs[i] = x + (r + (i < rr ? i : 0)) * sxr;
            __m256 acc[MR][OR];
#pragma GCC unroll 16
            for (int i = 0; i < MR; i++)
#pragma GCC unroll 16
                for (int j = 0; j < OR; j++) acc[i][j] = _mm256_setzero_ps();
            for (int64_t k = 0; k < K8; k += 8) {
                __m256 v[OR];
#pragma GCC unroll 16
                for (int j = 0; j < OR; j++) v[j] = _mm256_loadu_ps(ws[j] + k);
                if (dense) { /* the OR rows are one block: prefetch it linearly, 16 KB ahead (into the next rows) */
                    _mm_prefetch((const char *)(ws[0] + OR * k + PF), _MM_HINT_T0);
                    _mm_prefetch((const char *)(ws[0] + OR * k + PF + 16), _MM_HINT_T0);
                } else {
#pragma GCC unroll 16
                    for (int j = 0; j < OR; j++) _mm_prefetch((const char *)(ws[j] + k + PF / OR), _MM_HINT_T0);
                }
#pragma GCC unroll 16
                for (int i = 0; i < MR; i++) {
                    __m256 xv = _mm256_loadu_ps(xs[i] + k);
#pragma GCC unroll 16
                    for (int j = 0; j < OR; j++) acc[i][j] = _mm256_fmadd_ps(xv, v[j], acc[i][j]);
                }
            }
            float s[MR][OR];
            for (int i = 0; i < MR; i++)
                for (int j = 0; j < OR; j++) s[i][j] = hsum(acc[i][j]);
            for (int64_t k = K8; k < K; k++)
                for (int i = 0; i < MR; i++)
                    for (int j = 0; j < OR; j++) s[i][j] += xs[i][k] * ws[j][k];
            for (int i = 0; i < rr; i++)
                for (int j = 0; j < oo; j++) {
                    float v = s[i][j] + (b ? b[(o + j) * sbo] : 0.0f);
                    if (act == 1 && v < 0.0f) v = 0.0f;
                    y[(r + i) * syr + o + j] = v;
                }
        }
    }
}
int fusecc_small_gemm(const float *x, int64_t sxn, int64_t sxr, const float *w, int64_t swn, int64_t swo,
                      const float *b, int64_t sbn, int64_t sbo, float *y, int64_t syn, int64_t syr, int64_t N,
                      int64_t R, int64_t K, int64_t O, int act, int threads) {
    const int64_t nb = (O + OB - 1) / OB, tasks = N * nb;
    if (threads < 1) threads = 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && tasks > 1)
    for (int64_t t = 0; t < tasks; t++) {
        const int64_t n = t / nb, o0 = (t % nb) * OB, o1 = o0 + OB < O ? o0 + OB : O;
        block(x + n * sxn, sxr, w + n * swn, swo, b ? b + n * sbn : 0, sbo, y + n * syn, syr, R, K, o0, o1, act);
    }
    return 0;
}
