/* The kernels for one activation dtype, included by cpu.c once per dtype with:
 *   T        the element type (float, or uint16_t holding bf16)
 *   SUFFIX   f32 / bf16, appended to every name defined here
 *   LOADF    T -> float;  STOREF: float -> T (rounded);  ROUNDF: float -> float rounded to T
 *   DOTS     the dot-product routine for T (dots_f32 / dots_bf16, in cpu.c)
 * Every STOREF/ROUNDF below stands where the torch code in model.py rounds a result to the
 * activation dtype, so in fp32 they vanish and in bf16 the roundings match op for op.
 */
#define NAME_(name, sfx) name##_##sfx
#define NAME(name, sfx) NAME_(name, sfx)
#define FN(name) NAME(name, SUFFIX)

/* Gemma's RMSNorm of one row: y = x * rsqrt(mean(x^2) + eps) * (1 + w), in fp32, rounded once to
 * T; the same operations in the same order as transformers' GemmaRMSNorm, per element. */
static inline void FN(rmsnorm_row)(const T *x, const T *w, T *y, int64_t dim, float eps) {
    float ss = 0.0f;
    for (int64_t j = 0; j < dim; j++) {
        float v = LOADF(x[j]);
        ss += v * v;
    }
    float r = 1.0f / sqrtf(ss / (float)dim + eps);
    for (int64_t j = 0; j < dim; j++) {
        float n = LOADF(x[j]) * r;
        y[j] = STOREF(n * (1.0f + LOADF(w[j])));
    }
}

/* Rotary embedding of one position's heads in place, half-split layout: v [heads, dim] with
 * cos, sin [dim]; v' = v * cos + rotate_half(v) * sin, where rotate_half(v) = (-v2, v1); each
 * product and each sum rounded like the torch op that makes it. */
static inline void FN(rotary_row)(T *x, const T *cos, const T *sin, int64_t heads, int64_t dim) {
    int64_t half = dim / 2;
    for (int64_t h = 0; h < heads; h++) {
        T *v = x + h * dim;
        for (int64_t j = 0; j < half; j++) {
            float x1 = LOADF(v[j]), x2 = LOADF(v[j + half]);
            float a = ROUNDF(x1 * LOADF(cos[j])) + ROUNDF(-x2 * LOADF(sin[j]));
            float b = ROUNDF(x2 * LOADF(cos[j + half])) + ROUNDF(x1 * LOADF(sin[j + half]));
            v[j] = STOREF(a);
            v[j + half] = STOREF(b);
        }
    }
}

#if ISA > 0

/* gemv_share (below) for several activation rows against long rows (WIDE(M, K)): blocks of
 * RMAX weight rows (the last rows one by one), so each load of x serves RMAX multiply-adds. With
 * `gelu_into`, y (holding the MLP's gate output) becomes round(round(gelu(y)) * round(x . w)), the
 * product with up, rounded as torch rounds it. Kept apart from the one-row loop: folded into it,
 * the one-row path measured 7-15% slower on short rows. */
static void FN(gemv_share_wide)(const T *x, const T *w, T *y, int64_t M, int64_t N, int64_t K,
                                int gelu_into) {
#pragma omp for schedule(static) nowait
    for (int64_t g = 0; g < (N + RMAX - 1) / RMAX; g++) {
        int64_t n0 = g * RMAX, n1 = n0 + RMAX < N ? n0 + RMAX : N;
        int r = n1 - n0 == RMAX ? RMAX : 1;
        for (int64_t n = n0; n < n1; n += r)
            for (int64_t m0 = 0; m0 < M; m0 += MCHUNK) {
                int MB = M - m0 < MCHUNK ? (int)(M - m0) : MCHUNK;
                float s[RMAX][MCHUNK];
                if (r == RMAX) {
                    DISPATCH_MB(DOTS, x + m0 * K, w + n * K, w + (n + 1) * K, K, RMAX, MB, s)
                } else {
                    DISPATCH_MB(DOTS, x + m0 * K, w + n * K, w + n * K, K, 1, MB, s)
                }
                for (int m = 0; m < MB; m++)
                    for (int i = 0; i < r; i++) {
                        T *out = y + (m0 + m) * N + n + i;
                        *out = gelu_into ? STOREF(ROUNDF(gelu_tanh(LOADF(*out))) * ROUNDF(s[i][m]))
                                         : STOREF(s[i][m]);
                    }
            }
    }
}

/* This thread's share of y[m, n] = round(x[m] . w[n]) for x [M, K], w [N, K], y [M, N]: contiguous
 * ranges of weight rows (or row pairs, for long rows; schedule static), each streamed in order.
 * A work-sharing loop without a barrier: called inside a parallel region, the caller places the
 * barriers; outside one, the calling thread does all of it. */
static void FN(gemv_share)(const T *x, const T *w, T *y, int64_t M, int64_t N, int64_t K) {
    if (WIDE(M, K)) {
        FN(gemv_share_wide)(x, w, y, M, N, K, 0);
        return;
    }
    int R = K > KLONG ? 2 : 1;
    int64_t groups = (N + R - 1) / R;
#pragma omp for schedule(static) nowait
    for (int64_t g = 0; g < groups; g++) {
        int64_t n = g * R;
        int r = N - n < R ? 1 : R; /* an odd last row goes alone */
        for (int64_t m0 = 0; m0 < M; m0 += MCHUNK) {
            int MB = M - m0 < MCHUNK ? (int)(M - m0) : MCHUNK;
            float s[RMAX][MCHUNK];
            DISPATCH(DOTS, x + m0 * K, w + n * K, w + (n + r - 1) * K, K, r, MB, s)
            for (int m = 0; m < MB; m++)
                for (int i = 0; i < r; i++) y[(m0 + m) * N + n + i] = STOREF(s[i][m]);
        }
    }
}

/* This thread's share of the MLP's act[m, n] = gelu(x[m] . gate[n]) * (x[m] . up[n]), rounded as
 * torch rounds gate, up, gelu and the product: this thread's rows of gate, then the same rows of up
 * (two loops with one static schedule and trip count give each thread the same n, so no barrier is
 * needed between them; one weight stream at a time per thread measured 4% faster than gate and up
 * side by side). */
static void FN(gate_up_share)(const T *x, const T *gate, const T *up, T *act, int64_t M, int64_t F,
                              int64_t K) {
    if (WIDE(M, K)) { /* both passes the same loop, so the same rows per thread */
        FN(gemv_share_wide)(x, gate, act, M, F, K, 0);
        FN(gemv_share_wide)(x, up, act, M, F, K, 1);
        return;
    }
    for (int pass = 0; pass < 2; pass++) {
        const T *w = pass ? up : gate;
#pragma omp for schedule(static) nowait
        for (int64_t n = 0; n < F; n++) {
            for (int64_t m0 = 0; m0 < M; m0 += MCHUNK) {
                int MB = M - m0 < MCHUNK ? (int)(M - m0) : MCHUNK;
                float s[RMAX][MCHUNK];
                DISPATCH_MB(DOTS, x + m0 * K, w + n * K, w + n * K, K, 1, MB, s)
                for (int m = 0; m < MB; m++) {
                    T *a = act + (m0 + m) * F + n;
                    *a = pass ? STOREF(ROUNDF(gelu_tanh(LOADF(*a))) * ROUNDF(s[0][m]))
                              : STOREF(s[0][m]); /* gate, rounded; up's pass finishes it */
                }
            }
        }
    }
}

/* x [n] -> fp32 xf [n] (exact), for the quantized matrices' input */
static inline void FN(widen)(const T *x, float *xf, int64_t n) {
    for (int64_t i = 0; i < n; i++) xf[i] = LOADF(x[i]);
}

/* gemv_share for a weight matrix in a quantized format fmt (cpu_quant.h), reading the activations
 * in fp32 (xf [M, K]): groups of RQ weight rows, each decoded once per QCHUNK activation rows
 * (statically scheduled: the same rows per thread for the same N). One activation row against
 * short rows (K <= QSHORT_K) takes the weight rows one at a time: RQ rows in lockstep are RQ
 * streams a few KB apart, which the prefetcher serves 2-3x slower than one stream (2B's K = 2048
 * rows, every format). Against long rows the lockstep wins (1.1-1.7x at K = 16384: x no longer
 * fits in L1, and each of its loads serves RQ rows), as it does with several activation rows,
 * where the decoding dominates. With `gelu_into`,
 * y (holding gate's output) becomes the MLP's product as in gemv_share_wide, and yf (if not NULL)
 * gets y's values in fp32 too. */
static void FN(qgemv_share)(const float *xf, const uint8_t *w, int fmt, T *y, float *yf,
                            int64_t M, int64_t N, int64_t K, int gelu_into) {
    int64_t rb = fmt_row_bytes(fmt, K);
#pragma omp for schedule(static) nowait
    for (int64_t g = 0; g < (N + RQ - 1) / RQ; g++) {
        int64_t n0 = g * RQ;
        int R = M == 1 && K <= QSHORT_K ? 1
                : N - n0 >= RQ              ? RQ
                : N - n0 >= 2               ? 2
                                            : 1; /* the last rows in smaller groups */
        for (int64_t n = n0; n < n0 + RQ && n < N; n += R) {
            if (N - n < R) R = 1;
            for (int64_t m0 = 0; m0 < M; m0 += QCHUNK) {
                int MB = M - m0 < QCHUNK ? (int)(M - m0) : QCHUNK;
                float s[RQ][QCHUNK];
                qdot(fmt, xf + m0 * K, w + n * rb, rb, K, R, MB, s);
                for (int m = 0; m < MB; m++)
                    for (int r = 0; r < R; r++) {
                        T *out = y + (m0 + m) * N + n + r;
                        *out = gelu_into ? STOREF(ROUNDF(gelu_tanh(LOADF(*out))) * ROUNDF(s[r][m]))
                                         : STOREF(s[r][m]);
                        if (yf) yf[(m0 + m) * N + n + r] = LOADF(*out);
                    }
            }
        }
    }
}

/* This thread's share of y = x . w^T for w [N, K] in format fmt: T (the activations' own dtype:
 * x) or a quantized one (its input xf, x in fp32). No barrier. */
static void FN(matmul_share)(const T *x, const float *xf, const void *w, int fmt, T *y, int64_t M,
                             int64_t N, int64_t K) {
    if (fmt == T_FMT)
        FN(gemv_share)(x, (const T *)w, y, M, N, K);
    else
        FN(qgemv_share)(xf, (const uint8_t *)w, fmt, y, NULL, M, N, K, 0);
}

/* gate_up_share for any formats: both quantized run the same loop twice (so the same rows per
 * thread, no barrier between); a mix of formats puts a barrier between gate and up. actf (if not
 * NULL): the product in fp32 too (written by the quantized up pass; else left to the caller). */
static void FN(mlp_share)(const T *x, const float *xf, const void *gate, int gate_fmt,
                          const void *up, int up_fmt, T *act, float *actf, int64_t M, int64_t F,
                          int64_t K) {
    if (gate_fmt == T_FMT && up_fmt == T_FMT) {
        FN(gate_up_share)(x, (const T *)gate, (const T *)up, act, M, F, K);
        return;
    }
    FN(matmul_share)(x, xf, gate, gate_fmt, act, M, F, K);
    if (gate_fmt == T_FMT || up_fmt == T_FMT) {
#pragma omp barrier
    }
    if (up_fmt == T_FMT)
        FN(gemv_share_wide)(x, (const T *)up, act, M, F, K, 1);
    else
        FN(qgemv_share)(xf, (const uint8_t *)up, up_fmt, act, actf, M, F, K, 1);
}

/* This thread's share of decode attention: for every row b and query head h, softmax(q . k_t *
 * scale) over the row's cached keys t = 0..positions[b], times the values. Like torch's CPU flash
 * attention: fp32 scores and sums, probabilities rounded to T before they weight the values,
 * fp32 accumulation, one rounding of the output. */
static void FN(attention_share)(const model_dims *d, const T *q, const T *kc, const T *vc, T *out,
                                float *scores, const int64_t *positions, const int64_t *rows,
                                int64_t B) {
    int64_t H = d->heads, hd = d->head_dim, S = d->cache_len, rep = d->heads / d->kv_heads;
    float scale = 1.0f / sqrtf((float)hd);
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < B * H; i++) {
        int64_t b = i / H, j = (i % H) / rep, n = positions[b] + 1;
        const T *qv = q + i * hd;
        const T *keys = kc + (rows[b] * d->kv_heads + j) * S * hd;
        const T *values = vc + (rows[b] * d->kv_heads + j) * S * hd;
        float *s = scores + i * S, top = -INFINITY, sum = 0.0f;
        for (int64_t t = 0; t < n; t++) {
            float dot[RMAX][MCHUNK];
            DOTS(qv, keys + t * hd, keys + t * hd, hd, 1, 1, dot);
            s[t] = dot[0][0] * scale;
            top = fmaxf(top, s[t]);
        }
        for (int64_t t = 0; t < n; t++) {
            float p = expf(s[t] - top);
            sum += p;
            s[t] = ROUNDF(p);
        }
        T *o = out + i * hd;
        for (int64_t c0 = 0; c0 < hd; c0 += 64) { /* 64 accumulators at a time, in registers */
            int64_t cn = hd - c0 < 64 ? hd - c0 : 64;
            float acc[64] = {0};
            for (int64_t t = 0; t < n; t++) {
                const T *vt = values + t * hd + c0;
                for (int64_t c = 0; c < cn; c++) acc[c] += s[t] * LOADF(vt[c]);
            }
            for (int64_t c = 0; c < cn; c++) o[c0 + c] = STOREF(acc[c] / sum);
        }
    }
}

/* y[i] = round(y[i] + x[i]): a residual connection, rounded as torch's add */
static inline void FN(add_into)(T *y, const T *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = STOREF(LOADF(y[i]) + LOADF(x[i]));
}

void FN(codegemma_gemv)(const T *x, const T *w, T *y, int64_t M, int64_t N, int64_t K,
                        int threads) {
    int parallel = threads > 1 && M * N * K >= PARALLEL_MIN_MACS;
#pragma omp parallel num_threads(threads) if (parallel)
    FN(gemv_share)(x, w, y, M, N, K);
}

/* y [M, N] = x . w^T for w [N, K] in quantized format fmt; x given in fp32 (xf [M, K]), y rounded
 * once to T. */
void FN(codegemma_qgemv)(const float *xf, const uint8_t *w, int fmt, T *y, int64_t M, int64_t N,
                         int64_t K, int threads) {
    int parallel = threads > 1 && M * N * K >= PARALLEL_MIN_MACS;
#pragma omp parallel num_threads(threads) if (parallel)
    FN(qgemv_share)(xf, w, fmt, y, NULL, M, N, K, 0);
}

/* One decode step of the whole model for B rows, one new token each: tokens[b] at positions[b],
 * written into KV-cache row rows[b] (cos, sin [B, head_dim]: that position's rotary angles).
 * Rows may share a cache row (several tokens of one sequence, e.g. a speculative draft being
 * verified): every row's keys and values are written before any row attends, and row b attends
 * to positions 0..positions[b] of its cache row.
 * layer_ptrs: P_COUNT pointers per layer (enum in cpu.c), weights as transformers lays them out;
 * layer_fmts: the format of each (FMT_*: T's own, or a quantized one for the matrices).
 * embed / lm_head: the embedding table and output head [vocab, hidden] (the same for tied
 * embeddings) in formats embed_fmt / head_fmt. logits [B, vocab].
 * scratch: codegemma_decode_scratch_bytes(d, B) bytes.
 * Returns 0, or 1 if a token, position or row is out of range (then nothing was written). */
int FN(codegemma_decode)(const model_dims *d, void *const *layer_ptrs, const int *layer_fmts,
                         const void *embed, int embed_fmt, const T *final_norm,
                         const void *lm_head, int head_fmt, const int64_t *tokens,
                         const int64_t *positions, const int64_t *rows, const T *cos,
                         const T *sin, int64_t B, T *logits, void *scratch, int threads) {
    for (int64_t b = 0; b < B; b++)
        if (tokens[b] < 0 || tokens[b] >= d->vocab || positions[b] < 0 ||
            positions[b] >= d->cache_len || rows[b] < 0 || rows[b] >= d->cache_rows)
            return 1;
    step_buffers buf;
    carve(d, B, sizeof(T), scratch, &buf);
    T *h = buf.h, *xn = buf.xn, *q = buf.q, *k = buf.k, *v = buf.v, *att = buf.att, *o = buf.o,
      *act = buf.act;
    int64_t D = d->hidden, F = d->intermediate, hd = d->head_dim, S = d->cache_len;
    int64_t Q = d->heads * hd, KV = d->kv_heads * hd;
    /* fp32 copies of the matmul inputs for quantized matrices: in fp32, the buffers themselves */
    int wide = sizeof(T) != sizeof(float);
    float *xnf = wide ? buf.xnf : (float *)xn, *attf = wide ? buf.attf : (float *)att;
    float *actf = wide ? buf.actf : (float *)act;
    int64_t layer_macs = D * (2 * Q + 2 * KV + 3 * F);
    int parallel = threads > 1 && B * layer_macs >= PARALLEL_MIN_MACS;
#pragma omp parallel num_threads(threads) if (parallel)
    {
        if (embed_fmt == T_FMT) {
#pragma omp for schedule(static)
            for (int64_t b = 0; b < B; b++)
                for (int64_t i = 0; i < D; i++)
                    h[b * D + i] =
                        STOREF(LOADF(((const T *)embed)[tokens[b] * D + i]) * d->embed_scale);
        } else { /* the looked-up rows dequantized (into xnf, free until the first norm) */
            int64_t rb = fmt_row_bytes(embed_fmt, D);
#pragma omp for schedule(static)
            for (int64_t b = 0; b < B; b++) {
                float *row = buf.xnf + b * D;
                dequant_row_f32(embed_fmt, (const uint8_t *)embed + tokens[b] * rb, D, row);
                for (int64_t i = 0; i < D; i++)
                    h[b * D + i] = STOREF(ROUNDF(row[i]) * d->embed_scale);
            }
        }
        for (int64_t l = 0; l < d->layers; l++) {
            const T *const *p = (const T *const *)(layer_ptrs + l * P_COUNT);
            const int *f = layer_fmts + l * P_COUNT;
            int att_twin = wide && f[P_O] != T_FMT, act_twin = wide && f[P_DOWN] != T_FMT;
#pragma omp single
            for (int64_t b = 0; b < B; b++) {
                FN(rmsnorm_row)(h + b * D, p[P_IN_NORM], xn + b * D, D, d->eps);
                if (wide) FN(widen)(xn + b * D, xnf + b * D, D);
            }
            FN(matmul_share)(xn, xnf, p[P_Q], f[P_Q], q, B, Q, D);
            FN(matmul_share)(xn, xnf, p[P_K], f[P_K], k, B, KV, D);
            FN(matmul_share)(xn, xnf, p[P_V], f[P_V], v, B, KV, D);
#pragma omp barrier
#pragma omp single
            for (int64_t b = 0; b < B; b++) {
                FN(rotary_row)(q + b * Q, cos + b * hd, sin + b * hd, d->heads, hd);
                FN(rotary_row)(k + b * KV, cos + b * hd, sin + b * hd, d->kv_heads, hd);
                for (int64_t j = 0; j < d->kv_heads; j++) {
                    int64_t at = ((rows[b] * d->kv_heads + j) * S + positions[b]) * hd;
                    memcpy((T *)p[P_K_CACHE] + at, k + b * KV + j * hd, hd * sizeof(T));
                    memcpy((T *)p[P_V_CACHE] + at, v + b * KV + j * hd, hd * sizeof(T));
                }
            }
            FN(attention_share)(d, q, p[P_K_CACHE], p[P_V_CACHE], att, buf.scores, positions,
                                rows, B);
#pragma omp barrier
            if (att_twin) {
#pragma omp single
                FN(widen)(att, attf, B * Q);
            }
            FN(matmul_share)(att, attf, p[P_O], f[P_O], o, B, D, Q);
#pragma omp barrier
#pragma omp single
            for (int64_t b = 0; b < B; b++) {
                FN(add_into)(h + b * D, o + b * D, D);
                FN(rmsnorm_row)(h + b * D, p[P_POST_NORM], xn + b * D, D, d->eps);
                if (wide) FN(widen)(xn + b * D, xnf + b * D, D);
            }
            /* a quantized up pass writes the product's fp32 copy itself */
            int up_twin = act_twin && f[P_UP] != T_FMT;
            FN(mlp_share)(xn, xnf, p[P_GATE], f[P_GATE], p[P_UP], f[P_UP], act,
                          up_twin ? actf : NULL, B, F, D);
#pragma omp barrier
            if (act_twin && !up_twin) {
#pragma omp single
                FN(widen)(act, actf, B * F);
            }
            FN(matmul_share)(act, actf, p[P_DOWN], f[P_DOWN], o, B, D, F);
#pragma omp barrier
#pragma omp single
            FN(add_into)(h, o, B * D);
        }
#pragma omp single
        for (int64_t b = 0; b < B; b++) {
            FN(rmsnorm_row)(h + b * D, final_norm, xn + b * D, D, d->eps);
            if (wide) FN(widen)(xn + b * D, xnf + b * D, D);
        }
        FN(matmul_share)(xn, xnf, lm_head, head_fmt, logits, B, d->vocab, D);
    }
    return 0;
}

#endif /* ISA > 0 */

#undef FN
#undef NAME
#undef NAME_
