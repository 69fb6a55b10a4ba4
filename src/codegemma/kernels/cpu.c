/* CPU kernels for decoding: the decode-shaped matmul (float and quantized matrices), and the
 * whole decode step of a Gemma model in one call.
 *
 * gemv: y[m, n] = sum_k x[m, k] * w[n, k] for a few rows m (4 at a time).
 * Decoding multiplies one activation row per sequence by every weight matrix, so a step is bound by
 * how fast the weights stream from memory. torch's CPU GEMM reaches ~60% of the machine's read
 * bandwidth on these shapes (oneDNN/MKL are tuned for large M); this kernel streams each weight
 * row once per call, front to back, against all M activation rows (held in L1), so it runs at the
 * memory's speed. (Measured by benchmarks/bench_gemv.py: blocks of 4 rows read in interleaved
 * order, and software prefetching, were both slower than one plain row after another.)
 * qgemv (cpu_quant.h): the same for matrices in ggml's block formats, and their dequantization.
 *
 * decode: a whole decode step (embedding, every layer, final norm, output head) for a few rows
 * inside one OpenMP parallel region: the threads stay in one team from the first matrix to the
 * last, meeting only at the barriers the data flow needs, and no Python runs between the ~130
 * matmuls of a 2B step (through torch's modules, that Python and the small ops cost ~10% of it).
 * q/k/v run back to back without a barrier between them, and so do gate and up, with
 * gelu(gate) * up applied as up's rows are finished. Each matrix may be in the activations' dtype
 * or in a block format (a GGUF's mix, e.g. Q4_K_M's Q4_K and Q6_K).
 *
 * Numerics: fp32 accumulation, one rounding at the end (round-to-nearest-even for bf16 output),
 * like torch's own bf16 and fp32 linear; only the order of the additions differs. Every other
 * step rounds where the torch code in model.py rounds (see cpu_typed.h): RMSNorm and rotary
 * embedding per element as model.py computes them (built with -ffp-contract=off, so no multiply-add
 * is fused behind our back).
 * ISA: AVX-512 BF16 (VDPBF16PS) > AVX-512F > AVX2+FMA, chosen at compile time (-march=native);
 * `codegemma_gemv_isa` reports which, 0 meaning none (the caller then keeps torch's ops).
 * Threads: OpenMP; built with -fopenmp, so it shares the libgomp that torch has already loaded,
 * and the caller passes torch's thread count.
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

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* torch's tanh-approximate GELU, operation for operation (its vectorized CPU kernel, in fp32) */
static inline float gelu_tanh(float x) {
    const float beta = (float)(M_SQRT2 * M_2_SQRTPI * 0.5), kappa = 0.044715f;
    float inner = beta * (x + kappa * (x * x * x));
    return 0.5f * x * (1.0f + tanhf(inner));
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

/* Weight rows per block when several activation rows share the pass (gemv_share_wide): RMAX x
 * MCHUNK accumulators fit in AVX-512's 32 vector registers; AVX2 has 16. */
#if ISA >= 2
#define RMAX 4
#else
#define RMAX 2
#endif

#define ALWAYS_INLINE static inline __attribute__((always_inline))

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

/* s[r][m] = w_r . x[m] (fp32 sums) for R weight rows w_0, w_1, ... of K values (each read once,
 * front to back: the access order the hardware prefetcher follows best) and MB <= MCHUNK
 * activation rows x[m] = x + m * K. w_1 is passed (w_0 + K wherever R > 1), rows past it are
 * w_0 + r * K. R > 1 serves R rows with each load of x: long rows (K > KLONG), whose x no longer
 * fits in L1 beside the weight stream, go two at a time, and with several activation rows RMAX at
 * a time (gemv_share_wide). R and MB are compile-time constants at every call site, so the loops
 * unroll into registers. */
#define FMA_ROWS(LOAD)                                                              \
    vec acc[RMAX][MCHUNK];                                                          \
    for (int r = 0; r < R; r++)                                                     \
        for (int m = 0; m < MB; m++) acc[r][m] = vzero();                           \
    int64_t k = 0;                                                                  \
    for (; k + VLEN <= K; k += VLEN) {                                              \
        vec wv[RMAX];                                                               \
        for (int r = 0; r < R; r++) wv[r] = LOAD(wr[r] + k);                        \
        for (int m = 0; m < MB; m++) {                                              \
            vec xv = LOAD(x + m * K + k);                                           \
            for (int r = 0; r < R; r++) acc[r][m] = vfma(wv[r], xv, acc[r][m]);     \
        }                                                                           \
    }

ALWAYS_INLINE void dots_f32(const float *x, const float *w0, const float *w1, int64_t K, int R,
                            int MB, float s[RMAX][MCHUNK]) {
    const float *wr[4] = {w0, w1, w0 + 2 * K, w0 + 3 * K};
    FMA_ROWS(vload)
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++) {
            float t = vsum(acc[r][m]);
            for (int64_t i = k; i < K; i++) t += wr[r][i] * x[m * K + i];
            s[r][m] = t;
        }
}

ALWAYS_INLINE void dots_bf16(const uint16_t *x, const uint16_t *w0, const uint16_t *w1, int64_t K,
                             int R, int MB, float s[RMAX][MCHUNK]) {
    const uint16_t *wr[4] = {w0, w1, w0 + 2 * K, w0 + 3 * K};
#if ISA == 3
    /* VDPBF16PS: 32 bf16 products per instruction, summed in pairs into 16 fp32 lanes */
    __m512 acc[RMAX][MCHUNK];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++) acc[r][m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512bh wv[RMAX];
        for (int r = 0; r < R; r++) wv[r] = (__m512bh)_mm512_loadu_si512(wr[r] + k);
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
            float t = BF16_SUM(acc[r][m]);
            for (int64_t i = k; i < K; i++) t += bf16_to_f32(wr[r][i]) * bf16_to_f32(x[m * K + i]);
            s[r][m] = t;
        }
#undef BF16_SUM
}

/* Expand R and MB into constant-argument calls so each combination is its own unrolled code. */
#define DISPATCH_MB(DOTS, x, w0, w1, K, R, MB, s)      \
    switch (MB) {                                      \
        case 1: DOTS(x, w0, w1, K, R, 1, s); break;    \
        case 2: DOTS(x, w0, w1, K, R, 2, s); break;    \
        case 3: DOTS(x, w0, w1, K, R, 3, s); break;    \
        default: DOTS(x, w0, w1, K, R, 4, s); break;   \
    }
#define DISPATCH(DOTS, x, w0, w1, K, R, MB, s)      \
    if ((R) == 2) {                                 \
        DISPATCH_MB(DOTS, x, w0, w1, K, 2, MB, s)   \
    } else {                                        \
        DISPATCH_MB(DOTS, x, w0, w1, K, 1, MB, s)   \
    }

/* Below this many multiply-adds a call runs on one thread: waking the team costs more. */
#define PARALLEL_MIN_MACS (1 << 17)

/* Rows longer than this go two at a time (R = 2): measured faster on 2B's down_proj (K = 16384),
 * no better on rows that leave x room in L1. */
#define KLONG 8192

/* Several activation rows against rows at least this long take RMAX weight rows per pass
 * (gemv_share_wide): 1.2-1.5x faster than one at a time for 4-8 rows of 2B's shapes; on short rows
 * (K = 256) no faster. */
#define KWIDE 2048 /* kernels/__init__.py's WIDE_K */
#define WIDE(M, K) ((M) > 1 && (K) >= KWIDE)

#include "cpu_quant.h" /* matrices in ggml's block formats */

#endif /* ISA > 0 */

/* The sizes of a Gemma decoder, for the decode step (kernels/__init__.py mirrors this struct). */
typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, intermediate, vocab;
    int64_t cache_rows, cache_len; /* the KV cache: [cache_rows, kv_heads, cache_len, head_dim] */
    float eps, embed_scale;
} model_dims;

/* Per layer, the decode step takes these pointers, in this order (kernels/__init__.py LAYER_PARTS) */
enum { P_IN_NORM, P_Q, P_K, P_V, P_O, P_POST_NORM, P_GATE, P_UP, P_DOWN, P_K_CACHE, P_V_CACHE, P_COUNT };

/* The decode step's working memory, carved out of one buffer the caller allocates:
 * activations h (residual), xn (normed), q, k, v, att, o (a matmul's output), act (the MLP's
 * gelu(gate) * up), in elements of `elem` bytes; attention scores in fp32; and fp32 copies of the
 * matmul inputs xn, att, act, which the quantized matrices read (with bf16 activations). */
typedef struct {
    void *h, *xn, *q, *k, *v, *att, *o, *act;
    float *scores, *xnf, *attf, *actf;
} step_buffers;

static int64_t carve(const model_dims *d, int64_t B, int64_t elem, char *base, step_buffers *out) {
    int64_t q = d->heads * d->head_dim, kv = d->kv_heads * d->head_dim;
    int64_t sizes[12] = {B * d->hidden * elem, B * d->hidden * elem, B * q * elem, B * kv * elem,
                         B * kv * elem,        B * q * elem,         B * d->hidden * elem,
                         B * d->intermediate * elem, B * d->heads * d->cache_len * 4,
                         B * d->hidden * 4,    B * q * 4,            B * d->intermediate * 4};
    void **slots[12] = {&out->h,   &out->xn,  &out->q,
                        &out->k,   &out->v,   &out->att,
                        &out->o,   &out->act, (void **)&out->scores,
                        (void **)&out->xnf, (void **)&out->attf, (void **)&out->actf};
    int64_t at = 0;
    for (int i = 0; i < 12; i++) {
        if (base) *slots[i] = base + at;
        at += (sizes[i] + 63) / 64 * 64; /* each piece on its own cache lines */
    }
    return at;
}

/* Bytes of working memory the decode step needs for B rows (the same for both dtypes). */
int64_t codegemma_decode_scratch_bytes(const model_dims *d, int64_t B) {
    step_buffers unused;
    return carve(d, B, 4, NULL, &unused);
}

/* The dtype-generic kernels, once per dtype: T, its conversions, and the dot-product routine. */
#define T float
#define SUFFIX f32
#define LOADF(v) (v)
#define STOREF(v) (v)
#define ROUNDF(v) (v)
#define DOTS dots_f32
#define T_FMT 0 /* FMT_F32 */
#include "cpu_typed.h"
#undef T
#undef SUFFIX
#undef LOADF
#undef STOREF
#undef ROUNDF
#undef DOTS
#undef T_FMT

#define T uint16_t
#define SUFFIX bf16
#define LOADF(v) bf16_to_f32(v)
#define STOREF(v) f32_to_bf16(v)
#define ROUNDF(v) round_bf16(v)
#define DOTS dots_bf16
#define T_FMT 30 /* FMT_BF16 */
#include "cpu_typed.h"
