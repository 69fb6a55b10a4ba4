/* Matrices in ggml's block formats (quant.py has the layouts): dot products for the decode-shaped
 * matmul, and dequantization (the prefill path dequantizes a layer's matrices in tiles for a float
 * GEMM). Included by cpu.c inside `#if ISA > 0`, after the vector macros.
 *
 * Each format's values are decoded in registers to the very float32 numbers quant.py's
 * `dequantize` (and gguf-py) computes, operation for operation (q * d; Q4_K's d * sc * q - dmin * m,
 * two roundings), then multiplied by fp32 activations with fp32 accumulation. So a row's dot
 * product is the float32 matmul of the dequantized matrix, the additions in another order: the
 * activations are never quantized (llama.cpp rounds them to 8 bits), and bf16 activations are
 * widened exactly. The decoding runs in VLEN-value chunks (16 with AVX-512, 8 with AVX2), for a
 * few weight rows in lockstep (each format's `*_CHUNKS` below), so that the dot product and the
 * dequantization share one definition of every layout.
 */

enum { FMT_F32 = 0, FMT_F16 = 1, FMT_Q4_0 = 2, FMT_Q8_0 = 8, FMT_Q4_K = 12, FMT_Q6_K = 14, FMT_BF16 = 30 };

/* values per block, bytes per block (quant.py's FORMATS); 0 for a format not handled here */
static inline int64_t fmt_block(int fmt) {
    return fmt == FMT_Q8_0 || fmt == FMT_Q4_0 ? 32 : fmt == FMT_Q4_K || fmt == FMT_Q6_K ? 256 : 0;
}
static inline int64_t fmt_type_size(int fmt) {
    switch (fmt) {
        case FMT_Q8_0: return 34;
        case FMT_Q4_0: return 18;
        case FMT_Q4_K: return 144;
        case FMT_Q6_K: return 210;
        default: return 0;
    }
}
static inline int64_t fmt_row_bytes(int fmt, int64_t K) {
    return K / fmt_block(fmt) * fmt_type_size(fmt);
}

static inline float f16_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

#if ISA >= 2
typedef __m512i veci;
#define vi_u8(p) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p))) /* VLEN bytes */
#define vi_s8(p) _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define vi_and(a, m) _mm512_and_si512(a, _mm512_set1_epi32(m))
#define vi_or(a, b) _mm512_or_si512(a, b)
#define vi_srli(a, n) _mm512_srli_epi32(a, n)
#define vi_slli(a, n) _mm512_slli_epi32(a, n)
#define vi_subc(a, c) _mm512_sub_epi32(a, _mm512_set1_epi32(c))
#define vi_cvt(a) _mm512_cvtepi32_ps(a)
#define vset1(v) _mm512_set1_ps(v)
#define vmul(a, b) _mm512_mul_ps(a, b)
#define vsubf(a, b) _mm512_sub_ps(a, b)
#define vaddf(a, b) _mm512_add_ps(a, b)
#define vstore(p, v) _mm512_storeu_ps(p, v)
/* 16 floats -> 16 bf16, round to nearest even (as torch's cast; finite values, none of them an
 * fp32 denormal, which VCVTNEPS2BF16 would flush: no block format yields one) */
#if ISA == 3
static inline void vstore_bf16(uint16_t *p, __m512 v) {
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v));
}
#else
static inline void vstore_bf16(uint16_t *p, __m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}
#endif
#else
typedef __m256i veci;
#define vi_u8(p) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p))) /* VLEN bytes */
#define vi_s8(p) _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define vi_and(a, m) _mm256_and_si256(a, _mm256_set1_epi32(m))
#define vi_or(a, b) _mm256_or_si256(a, b)
#define vi_srli(a, n) _mm256_srli_epi32(a, n)
#define vi_slli(a, n) _mm256_slli_epi32(a, n)
#define vi_subc(a, c) _mm256_sub_epi32(a, _mm256_set1_epi32(c))
#define vi_cvt(a) _mm256_cvtepi32_ps(a)
#define vset1(v) _mm256_set1_ps(v)
#define vmul(a, b) _mm256_mul_ps(a, b)
#define vsubf(a, b) _mm256_sub_ps(a, b)
#define vaddf(a, b) _mm256_add_ps(a, b)
#define vstore(p, v) _mm256_storeu_ps(p, v)
static inline void vstore_bf16(uint16_t *p, __m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
    _mm_storeu_si128((__m128i *)p, packed);
}
#endif

/* Each *_CHUNKS(bp, R, BODY) decodes the blocks at bp[0..R-1] (one per weight row, R <= RQ) in
 * lockstep: BODY(w_, off, a) gets vec w_[RQ], w_[r] holding values off..off+VLEN-1 of row r's
 * block (a: 0/1 alternating, for two accumulator chains where there is one row). */
#if ISA >= 2
#define RQ 4 /* weight rows per pass, each load of x serving all of them */
#else
#define RQ 2
#endif

/* The float value of a nibble n (the low 4 bits of each 32-bit lane of v) minus `bias`: with
 * AVX-512 one table lookup (VPERMPS reads only those bits), else mask, subtract, convert; the
 * same exact float either way. */
#if ISA >= 2
#define NIBBLE_TABLE(bias)                                                                       \
    _mm512_setr_ps(0 - (bias), 1 - (bias), 2 - (bias), 3 - (bias), 4 - (bias), 5 - (bias),      \
                   6 - (bias), 7 - (bias), 8 - (bias), 9 - (bias), 10 - (bias), 11 - (bias),    \
                   12 - (bias), 13 - (bias), 14 - (bias), 15 - (bias))
#define NIBBLE(v, table, bias) _mm512_permutexvar_ps(v, table)
#else
#define NIBBLE_TABLE(bias) vzero()
#define NIBBLE(v, table, bias) vi_cvt(vi_subc(vi_and(v, 15), bias))
#endif

/* Q8_0: fp16 d, 32 int8 q; value = q * d */
#define Q8_0_CHUNKS(bp, R, BODY)                                                  \
    {                                                                             \
        vec d_[RQ];                                                               \
        _Pragma("GCC unroll 4") for (int r_ = 0; r_ < (R); r_++) d_[r_] = vset1(f16_at(bp[r_]));          \
        _Pragma("GCC unroll 4") for (int c_ = 0; c_ < 32; c_ += 2 * VLEN) {                               \
            vec w_[RQ];                                                           \
            _Pragma("GCC unroll 4") for (int r_ = 0; r_ < (R); r_++)                                      \
                w_[r_] = vmul(vi_cvt(vi_s8(bp[r_] + 2 + c_)), d_[r_]);            \
            BODY(w_, c_, 0)                                                       \
            _Pragma("GCC unroll 4") for (int r_ = 0; r_ < (R); r_++)                                      \
                w_[r_] = vmul(vi_cvt(vi_s8(bp[r_] + 2 + VLEN + c_)), d_[r_]);     \
            BODY(w_, VLEN + c_, 1)                                                \
        }                                                                         \
    }

/* Q4_0: fp16 d, 16 bytes; element j the low nibble of byte j, j + 16 its high one;
 * value = (q - 8) * d */
#define Q4_0_CHUNKS(bp, R, BODY)                                                  \
    {                                                                             \
        vec d_[RQ], t_ = NIBBLE_TABLE(8);                                         \
        (void)t_;                                                                 \
        _Pragma("GCC unroll 4") for (int r_ = 0; r_ < (R); r_++) d_[r_] = vset1(f16_at(bp[r_]));          \
        _Pragma("GCC unroll 4") for (int c_ = 0; c_ < 16; c_ += VLEN) {                                   \
            veci v_[RQ];                                                          \
            vec w_[RQ];                                                           \
            _Pragma("GCC unroll 4") for (int r_ = 0; r_ < (R); r_++) {                                    \
                v_[r_] = vi_u8(bp[r_] + 2 + c_);                                  \
                w_[r_] = vmul(NIBBLE(v_[r_], t_, 8), d_[r_]);                     \
            }                                                                     \
            BODY(w_, c_, 0)                                                       \
            _Pragma("GCC unroll 4") for (int r_ = 0; r_ < (R); r_++)                                      \
                w_[r_] = vmul(NIBBLE(vi_srli(v_[r_], 4), t_, 8), d_[r_]);         \
            BODY(w_, 16 + c_, 1)                                                  \
        }                                                                         \
    }

/* A Q4_K block's per-sub-block factors d * sc[j] and dmin * m[j] (fp32, as quant.py): the eight
 * 6-bit scales and mins unpacked from their 12 bytes with ggml's word masks (the same bits as
 * quant.py's _q4_k_scales), then converted and multiplied eight at a time. */
static inline void q4_k_factors(const uint8_t *b, float ds[8], float dm[8]) {
    uint32_t u[4];
    memcpy(u, b + 4, 12);
    u[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4); /* mins 4..7 */
    uint32_t mins = u[1] & 0x3f3f3f3f;                                     /* mins 0..3 */
    u[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);        /* scales 4..7 */
    u[2] = mins;
    u[0] &= 0x3f3f3f3f; /* scales 0..3 */
    __m128i packed = _mm_loadu_si128((const __m128i *)u);
    __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(packed));
    __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(packed, 8)));
    _mm256_storeu_ps(ds, _mm256_mul_ps(_mm256_set1_ps(f16_at(b)), sc));
    _mm256_storeu_ps(dm, _mm256_mul_ps(_mm256_set1_ps(f16_at(b + 2)), mn));
}

/* A Q6_K block's sixteen factors d * sc[i] (fp32, as quant.py) */
static inline void q6_k_factors(const uint8_t *b, float ds[16]) {
    __m128i sc = _mm_loadu_si128((const __m128i *)(b + 192));
    __m256 d = _mm256_set1_ps(f16_at(b + 208));
    _mm256_storeu_ps(ds, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc))));
    _mm256_storeu_ps(ds + 8, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8)))));
}

/* Q4_K: fp16 d, dmin, 12 scale bytes, 128 bytes of nibbles: sub-block 2j (32 values) the low
 * nibbles of bytes 32j..32j+31, sub-block 2j + 1 their high nibbles;
 * value = (d * sc) * q - (dmin * m), each product and the difference rounded */
#define Q4_K_CHUNKS(bp, R, BODY)                                                              \
    {                                                                                         \
        float ds_[RQ][8], dm_[RQ][8];                                                         \
        vec t_ = NIBBLE_TABLE(0);                                                             \
        (void)t_;                                                                             \
        _Pragma("GCC unroll 4") for (int r_ = 0; r_ < (R); r_++) q4_k_factors(bp[r_], ds_[r_], dm_[r_]);              \
        _Pragma("GCC unroll 4") for (int j_ = 0; j_ < 4; j_++)                                     \
            _Pragma("GCC unroll 4") for (int c_ = 0; c_ < 32; c_ += VLEN) {                                           \
                veci v_[RQ];                                                                  \
                vec w_[RQ];                                                                   \
                _Pragma("GCC unroll 4") for (int r_ = 0; r_ < (R); r_++) {                                            \
                    v_[r_] = vi_u8(bp[r_] + 16 + 32 * j_ + c_);                               \
                    w_[r_] = vsubf(vmul(vset1(ds_[r_][2 * j_]), NIBBLE(v_[r_], t_, 0)),       \
                                   vset1(dm_[r_][2 * j_]));                                   \
                }                                                                             \
                BODY(w_, 64 * j_ + c_, 0)                                                     \
                _Pragma("GCC unroll 4") for (int r_ = 0; r_ < (R); r_++)                                              \
                    w_[r_] = vsubf(vmul(vset1(ds_[r_][2 * j_ + 1]), NIBBLE(vi_srli(v_[r_], 4), t_, 0)), \
                                   vset1(dm_[r_][2 * j_ + 1]));                               \
                BODY(w_, 64 * j_ + 32 + c_, 1)                                                \
            }                                                                                 \
    }

/* Q6_K: 128 bytes of low nibbles ql, 64 bytes of 2-bit high parts qh, 16 int8 scales, fp16 d.
 * In each half h (128 values), value 128h + 32s + l (l < 32) has its low 4 bits in ql[64h + l]
 * (s = 0), ql[64h + 32 + l] (s = 1), or their high nibbles (s = 2, 3), and bits 4-5 in bits 2s of
 * qh[32h + l]; value = (d * sc[i / 16]) * (q - 32) */
#define Q6_K_Q(l0, l1, qh, s)                                                    \
    ((s) == 0   ? vi_or(vi_and(l0, 15), vi_and(vi_slli(qh, 4), 0x30))            \
     : (s) == 1 ? vi_or(vi_and(l1, 15), vi_and(vi_slli(qh, 2), 0x30))            \
     : (s) == 2 ? vi_or(vi_srli(l0, 4), vi_and(qh, 0x30))                        \
                : vi_or(vi_srli(l1, 4), vi_and(vi_srli(qh, 2), 0x30)))
#define Q6_K_CHUNKS(bp, R, BODY)                                                              \
    {                                                                                         \
        float ds_[RQ][16];                                                                    \
        _Pragma("GCC unroll 4") for (int r_ = 0; r_ < (R); r_++) q6_k_factors(bp[r_], ds_[r_]); \
        _Pragma("GCC unroll 2") for (int h_ = 0; h_ < 2; h_++)                                     \
            _Pragma("GCC unroll 4") for (int c_ = 0; c_ < 32; c_ += VLEN) {                                           \
                veci l0_[RQ], l1_[RQ], qh_[RQ];                                               \
                vec w_[RQ];                                                                   \
                int at_ = 128 * h_ + c_;                                                      \
                _Pragma("GCC unroll 4") for (int r_ = 0; r_ < (R); r_++) {                                            \
                    l0_[r_] = vi_u8(bp[r_] + 64 * h_ + c_);                                   \
                    l1_[r_] = vi_u8(bp[r_] + 64 * h_ + 32 + c_);                              \
                    qh_[r_] = vi_u8(bp[r_] + 128 + 32 * h_ + c_);                             \
                }                                                                             \
                _Pragma("GCC unroll 4") for (int s_ = 0; s_ < 4; s_++) {                                              \
                    _Pragma("GCC unroll 4") for (int r_ = 0; r_ < (R); r_++)                                          \
                        w_[r_] = vmul(vset1(ds_[r_][(at_ + 32 * s_) / 16]),                   \
                                      vi_cvt(vi_subc(Q6_K_Q(l0_[r_], l1_[r_], qh_[r_], s_), 32))); \
                    BODY(w_, at_ + 32 * s_, s_ & 1)                                           \
                }                                                                             \
            }                                                                                 \
    }

/* One activation row against quantized rows of at most this many values reads the weight rows
 * one at a time (qgemv_share, cpu_typed.h) */
#define QSHORT_K 4096

/* Activation rows per pass over RQ quantized weight rows: RQ x QCHUNK accumulators (16 of
 * AVX-512's 32 vector registers; 8 of AVX2's 16). */
#define QCHUNK 4

/* s[r][m] = x[m] . w_r for R <= RQ quantized weight rows w_r = w + r * rb of K values and
 * MB <= QCHUNK activation rows x[m] = x + m * K (fp32): each load of x serves the R rows; a lone
 * row gets two accumulator chains, so consecutive multiply-adds do not wait on each other. */
#define QDOT_FMA(w_, off, a)                                                        \
    _Pragma("GCC unroll 4") for (int m = 0; m < MB; m++) {                          \
        vec xv_ = vload(xb + m * K + (off));                                        \
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)                         \
            acc[r][m][R == 1 ? (a) : 0] = vfma(w_[r], xv_, acc[r][m][R == 1 ? (a) : 0]); \
    }

#define DEFINE_QDOT(name, BLOCK, TYPE_SIZE, CHUNKS)                                          \
    ALWAYS_INLINE void qdot_##name(const float *x, const uint8_t *w, int64_t rb, int64_t K,  \
                                   int R, int MB, float s[RQ][QCHUNK]) {                     \
        vec acc[RQ][QCHUNK][2];                                                              \
        for (int r = 0; r < R; r++)                                                          \
            for (int m = 0; m < MB; m++) acc[r][m][0] = acc[r][m][1] = vzero();              \
        for (int64_t blk = 0; blk < K / (BLOCK); blk++) {                                    \
            const float *xb = x + blk * (BLOCK);                                             \
            const uint8_t *bp[RQ];                                                           \
            for (int r = 0; r < R; r++) bp[r] = w + r * rb + blk * (TYPE_SIZE);              \
            CHUNKS(bp, R, QDOT_FMA)                                                          \
        }                                                                                    \
        for (int r = 0; r < R; r++)                                                          \
            for (int m = 0; m < MB; m++)                                                     \
                s[r][m] = vsum(R == 1 ? vaddf(acc[r][m][0], acc[r][m][1]) : acc[r][m][0]);   \
    }

DEFINE_QDOT(q8_0, 32, 34, Q8_0_CHUNKS)
DEFINE_QDOT(q4_0, 32, 18, Q4_0_CHUNKS)
DEFINE_QDOT(q4_k, 256, 144, Q4_K_CHUNKS)
DEFINE_QDOT(q6_k, 256, 210, Q6_K_CHUNKS)

/* One function per (format, R, MB): each its own unrolled loop with its accumulators in
 * registers (inlined into one dispatcher they were not) */
typedef void (*qdot_fn)(const float *, const uint8_t *, int64_t, int64_t, float[RQ][QCHUNK]);
#define QDOT_SPEC(name, R, MB)                                                                 \
    static __attribute__((noinline)) void qdot_##name##_##R##_##MB(                            \
        const float *x, const uint8_t *w, int64_t rb, int64_t K, float s[RQ][QCHUNK]) {        \
        qdot_##name(x, w, rb, K, R, MB, s);                                                    \
    }
#define QDOT_SPECS_R(name, R) \
    QDOT_SPEC(name, R, 1) QDOT_SPEC(name, R, 2) QDOT_SPEC(name, R, 3) QDOT_SPEC(name, R, 4)
#define QDOT_ROW(name, R) \
    {qdot_##name##_##R##_1, qdot_##name##_##R##_2, qdot_##name##_##R##_3, qdot_##name##_##R##_4}
#if RQ == 4
#define QDOT_SPECS(name) QDOT_SPECS_R(name, 1) QDOT_SPECS_R(name, 2) QDOT_SPECS_R(name, 4)
#define QDOT_TABLE(name) {QDOT_ROW(name, 1), QDOT_ROW(name, 2), QDOT_ROW(name, 4)}
#else
#define QDOT_SPECS(name) QDOT_SPECS_R(name, 1) QDOT_SPECS_R(name, 2)
#define QDOT_TABLE(name) {QDOT_ROW(name, 1), QDOT_ROW(name, 2), QDOT_ROW(name, 2)}
#endif
QDOT_SPECS(q8_0)
QDOT_SPECS(q4_0)
QDOT_SPECS(q4_k)
QDOT_SPECS(q6_k)
/* [format: Q8_0, Q4_0, Q4_K, Q6_K][R: 1, 2, RQ][MB - 1] */
static const qdot_fn qdot_table[4][3][QCHUNK] = {QDOT_TABLE(q8_0), QDOT_TABLE(q4_0),
                                                 QDOT_TABLE(q4_k), QDOT_TABLE(q6_k)};

/* s[r][m] = x[m] . w_r for R (RQ, 2 or 1) weight rows in format fmt (a quantized one), rb bytes
 * apart, and MB <= QCHUNK activation rows */
static inline void qdot(int fmt, const float *x, const uint8_t *w, int64_t rb, int64_t K, int R,
                        int MB, float s[RQ][QCHUNK]) {
    int f = fmt == FMT_Q8_0 ? 0 : fmt == FMT_Q4_0 ? 1 : fmt == FMT_Q4_K ? 2 : 3;
    qdot_table[f][R == 1 ? 0 : R == 2 ? 1 : 2][MB - 1](x, w, rb, K, s);
}

/* One row of K values in format fmt, dequantized into out (fp32, or bf16 rounded once) */
#define STORE_F32(w_, off, a) vstore(out + (off), w_[0]);
#define STORE_BF16(w_, off, a) vstore_bf16(out + (off), w_[0]);
#define DEFINE_DEQUANT_ROW(name, OUT_T, STORE)                                               \
    static void dequant_row_##name(int fmt, const uint8_t *w, int64_t K, OUT_T *out_row) {   \
        int64_t bs = fmt_block(fmt), ts = fmt_type_size(fmt);                                \
        for (int64_t blk = 0; blk < K / bs; blk++) {                                         \
            const uint8_t *bp[1] = {w + blk * ts};                                           \
            OUT_T *out = out_row + blk * bs;                                                 \
            switch (fmt) {                                                                   \
                case FMT_Q8_0: Q8_0_CHUNKS(bp, 1, STORE) break;                              \
                case FMT_Q4_0: Q4_0_CHUNKS(bp, 1, STORE) break;                              \
                case FMT_Q4_K: Q4_K_CHUNKS(bp, 1, STORE) break;                              \
                default: Q6_K_CHUNKS(bp, 1, STORE) break;                                    \
            }                                                                                \
        }                                                                                    \
    }
DEFINE_DEQUANT_ROW(f32, float, STORE_F32)
DEFINE_DEQUANT_ROW(bf16, uint16_t, STORE_BF16)

/* rows [rows, K] of format fmt (row_bytes apart) -> out [rows, K], fp32 (bf16 = 0) or bf16 */
void codegemma_dequantize(const uint8_t *w, int fmt, void *out, int bf16, int64_t rows, int64_t K,
                          int threads) {
    int64_t rb = fmt_row_bytes(fmt, K);
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * K >= (1 << 16))
    for (int64_t n = 0; n < rows; n++) {
        if (bf16)
            dequant_row_bf16(fmt, w + n * rb, K, (uint16_t *)out + n * K);
        else
            dequant_row_f32(fmt, w + n * rb, K, (float *)out + n * K);
    }
}
