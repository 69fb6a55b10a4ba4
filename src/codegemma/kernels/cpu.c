/* CPU kernels for decoding: the decode-shaped matmul, and a layer's elementwise pieces fused.
 *
 * gemv: y[m, n] = sum_k x[m, k] * w[n, k] for a few rows m (4 at a time).
 * Decoding multiplies one activation row per sequence by every weight matrix, so a step is bound by
 * how fast the weights stream from memory. torch's CPU GEMM reaches ~60% of the machine's read
 * bandwidth on these shapes (oneDNN/MKL are tuned for large M); this kernel streams each weight
 * row once per call, front to back, against all M activation rows (held in L1), so it runs at the
 * memory's speed. (Measured by benchmarks/bench_gemv.py: blocks of 4 rows read in interleaved
 * order, and software prefetching, were both slower than one plain row after another.)
 *
 * Numerics: fp32 accumulation, one rounding at the end (round-to-nearest-even for bf16 output),
 * like torch's own bf16 and fp32 linear; only the order of the additions differs.
 * ISA: AVX-512 BF16 (VDPBF16PS) > AVX-512F > AVX2+FMA, chosen at compile time (-march=native);
 * `codegemma_gemv_isa` reports which, 0 meaning none (the caller then keeps torch's matmul).
 * Threads: OpenMP over blocks of weight rows; built with -fopenmp, so it shares the libgomp that
 * torch has already loaded, and the caller passes torch's thread count.
 *
 * rmsnorm, rotary: one pass each where torch takes 6-10 ops (each a dispatch and a pass over the
 * data); the same per-element operations in the same order and rounding as the torch code in
 * model.py (built with -ffp-contract=off, so no multiply-add is fused behind our back).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MCHUNK 4 /* activation rows per pass over a weight row (more: one pass per 4, from L1) */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                         /* nearest even */
    return (uint16_t)(u >> 16);
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define ISA 3
#elif defined(__AVX512F__)
#define ISA 2
#elif defined(__AVX2__) && defined(__FMA__)
#define ISA 1
#else
#define ISA 0
#endif

int codegemma_gemv_isa(void) { return ISA; }

#if ISA > 0

#if ISA >= 2
typedef __m512 vec;
#define VLEN 16
#define vzero() _mm512_setzero_ps()
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vload(p) _mm512_loadu_ps(p)
#define vsum(a) _mm512_reduce_add_ps(a)
#define vload_bf16(p) \
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#else
typedef __m256 vec;
#define VLEN 8
#define vzero() _mm256_setzero_ps()
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vload(p) _mm256_loadu_ps(p)
static inline float vsum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#define vload_bf16(p) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#endif

/* R weight rows (K values each, read once, front to back: the access order the hardware
 * prefetcher follows best) against MB activation rows (MB <= MCHUNK). R is 1, or 2 for long rows
 * (K > KLONG): each load of x then serves two rows, halving x's traffic, which for 32 KB and more
 * no longer fits in L1 beside the weight streams and competes with them from L2. R and MB are
 * compile-time constants at every call site, so the loops unroll into registers. */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* The fp32 multiply-add loop over whole vectors, loading with LOAD (fp32, or bf16 widened):
 * leaves acc[r][m] and k, the first column of the scalar tail. */
#define FMA_ROWS(LOAD)                                                              \
    vec acc[2][MCHUNK];                                                             \
    for (int r = 0; r < R; r++)                                                     \
        for (int m = 0; m < MB; m++) acc[r][m] = vzero();                           \
    int64_t k = 0;                                                                  \
    for (; k + VLEN <= K; k += VLEN) {                                              \
        vec wv[2];                                                                  \
        for (int r = 0; r < R; r++) wv[r] = LOAD(w + r * K + k);                    \
        for (int m = 0; m < MB; m++) {                                              \
            vec xv = LOAD(x + m * K + k);                                           \
            for (int r = 0; r < R; r++) acc[r][m] = vfma(wv[r], xv, acc[r][m]);     \
        }                                                                           \
    }

ALWAYS_INLINE void rows_f32(const float *x, const float *w, float *y, int64_t K, int64_t N, int R,
                            int MB) {
    FMA_ROWS(vload)
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++) {
            float s = vsum(acc[r][m]);
            for (int64_t t = k; t < K; t++) s += w[r * K + t] * x[m * K + t];
            y[m * N + r] = s;
        }
}

ALWAYS_INLINE void rows_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t K,
                             int64_t N, int R, int MB) {
#if ISA == 3
    /* VDPBF16PS: 32 bf16 products per instruction, summed in pairs into 16 fp32 lanes */
    __m512 acc[2][MCHUNK];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++) acc[r][m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512bh wv[2];
        for (int r = 0; r < R; r++) wv[r] = (__m512bh)_mm512_loadu_si512(w + r * K + k);
        for (int m = 0; m < MB; m++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
            for (int r = 0; r < R; r++) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv);
        }
    }
#define BF16_SUM(a) _mm512_reduce_add_ps(a)
#else
    FMA_ROWS(vload_bf16)
#define BF16_SUM(a) vsum(a)
#endif
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++) {
            float s = BF16_SUM(acc[r][m]);
            for (int64_t t = k; t < K; t++)
                s += bf16_to_f32(w[r * K + t]) * bf16_to_f32(x[m * K + t]);
            y[m * N + r] = f32_to_bf16(s);
        }
#undef BF16_SUM
}

/* Expand R and MB into constant-argument calls so each combination is its own unrolled code. */
#define DISPATCH_MB(ROWS, x, w, y, K, N, R, MB)      \
    switch (MB) {                                    \
        case 1: ROWS(x, w, y, K, N, R, 1); break;    \
        case 2: ROWS(x, w, y, K, N, R, 2); break;    \
        case 3: ROWS(x, w, y, K, N, R, 3); break;    \
        default: ROWS(x, w, y, K, N, R, 4); break;   \
    }
#define DISPATCH(ROWS, x, w, y, K, N, R, MB)                              \
    if ((R) == 2) {                                                       \
        DISPATCH_MB(ROWS, x, w, y, K, N, 2, MB)                           \
    } else {                                                              \
        DISPATCH_MB(ROWS, x, w, y, K, N, 1, MB)                           \
    }

/* Below this many multiply-adds a call runs on one thread: waking the team costs more. */
#define PARALLEL_MIN_MACS (1 << 17)

/* Rows longer than this go two at a time (R = 2): measured faster on 2B's down_proj (K = 16384),
 * no better on rows that leave x room in L1. */
#define KLONG 8192

/* Threads take contiguous ranges of weight rows (or row pairs; schedule static), each streamed
 * in order; an odd last row of a paired call goes alone. */
#define GEMV_BODY(ROWS)                                                                      \
    int parallel = threads > 1 && M * N * K >= PARALLEL_MIN_MACS;                            \
    int R = K > KLONG ? 2 : 1;                                                               \
    int64_t groups = N / R;                                                                  \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(parallel)")           \
    for (int64_t g = 0; g < groups; g++) {                                                   \
        int64_t n = g * R;                                                                   \
        for (int64_t m0 = 0; m0 < M; m0 += MCHUNK) {                                         \
            int MB = M - m0 < MCHUNK ? (int)(M - m0) : MCHUNK;                               \
            DISPATCH(ROWS, x + m0 * K, w + n * K, y + m0 * N + n, K, N, R, MB)               \
        }                                                                                    \
    }                                                                                        \
    for (int64_t n = groups * R; n < N; n++) /* the odd row out */                          \
        for (int64_t m0 = 0; m0 < M; m0 += MCHUNK) {                                         \
            int MB = M - m0 < MCHUNK ? (int)(M - m0) : MCHUNK;                               \
            DISPATCH(ROWS, x + m0 * K, w + n * K, y + m0 * N + n, K, N, 1, MB)               \
        }

/* x [M, K], w [N, K], y [M, N]: contiguous, row-major. */
void codegemma_gemv_f32(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K,
                        int threads) {
    GEMV_BODY(rows_f32)
}

void codegemma_gemv_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t N,
                         int64_t K, int threads) {
    GEMV_BODY(rows_bf16)
}

#endif

/* ---- elementwise pieces of a layer, fused: each is one pass instead of 6-10 torch ops ---------- */

/* Gemma's RMSNorm: y = x * rsqrt(mean(x^2) + eps) * (1 + w), in fp32, rounded once to the dtype;
 * the same operations in the same order as transformers' GemmaRMSNorm, per element. */
#define RMSNORM_BODY(LOAD, STORE)                                                   \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(rows * dim >= (1 << 16))") \
    for (int64_t i = 0; i < rows; i++) {                                            \
        float ss = 0.0f;                                                            \
        for (int64_t j = 0; j < dim; j++) {                                         \
            float v = LOAD(x[i * dim + j]);                                         \
            ss += v * v;                                                            \
        }                                                                           \
        float r = 1.0f / sqrtf(ss / (float)dim + eps);                              \
        for (int64_t j = 0; j < dim; j++) {                                         \
            float n = LOAD(x[i * dim + j]) * r;                                     \
            y[i * dim + j] = STORE(n * (1.0f + LOAD(w[j])));                        \
        }                                                                           \
    }

#define ID(v) (v)

void codegemma_rmsnorm_f32(const float *x, const float *w, float *y, int64_t rows, int64_t dim,
                           float eps, int threads) {
    RMSNORM_BODY(ID, ID)
}

void codegemma_rmsnorm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t rows,
                            int64_t dim, float eps, int threads) {
    RMSNORM_BODY(bf16_to_f32, f32_to_bf16)
}

/* Rotary embedding in place, half-split layout: x [rows, heads, dim] with cos, sin [rows, dim];
 * x' = x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1). ROUND reproduces the
 * rounding of each torch op in the activation dtype (products, then their sum). */
#define ROTARY_BODY(T, LOAD, ROUND, STORE)                                          \
    int64_t half = dim / 2;                                                         \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(rows * heads * dim >= (1 << 16))") \
    for (int64_t i = 0; i < rows; i++) {                                            \
        const T *c = cos + i * dim, *s = sin + i * dim;                             \
        for (int64_t h = 0; h < heads; h++) {                                       \
            T *v = x + (i * heads + h) * dim;                                       \
            for (int64_t j = 0; j < half; j++) {                                    \
                float x1 = LOAD(v[j]), x2 = LOAD(v[j + half]);                      \
                float a = ROUND(x1 * LOAD(c[j])) + ROUND(-x2 * LOAD(s[j]));         \
                float b = ROUND(x2 * LOAD(c[j + half])) + ROUND(x1 * LOAD(s[j + half])); \
                v[j] = STORE(a);                                                    \
                v[j + half] = STORE(b);                                             \
            }                                                                       \
        }                                                                           \
    }

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

void codegemma_rotary_f32(float *x, const float *cos, const float *sin, int64_t rows,
                          int64_t heads, int64_t dim, int threads) {
    ROTARY_BODY(float, ID, ID, ID)
}

void codegemma_rotary_bf16(uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t rows,
                           int64_t heads, int64_t dim, int threads) {
    ROTARY_BODY(uint16_t, bf16_to_f32, round_bf16, f32_to_bf16)
}
