/* The decode step of the Llama-family model on CPU, in one call: all layers and the lm_head.
 *
 * Why C: a decode step in torch is ~300 small ops; each costs a dispatch and a parallel region,
 * and torch's int4 kernel wants its own layout. Here one OpenMP region runs the whole step, its
 * threads splitting the rows of each matmul, with 4 barriers per layer.
 *
 * Numbers follow the torch path of model.py: bf16 activations into every matmul (fp32 sums),
 * outputs rounded to bf16, a float32 residual stream, a bf16 KV cache. Each row's sum runs in
 * the same order whatever the batch size and thread count, so a sequence decodes to the same
 * tokens alone or batched.
 *
 * Q4 weights (`q4mat`): per output row, K/2 bytes of nibbles and per group of 32 weights an fp16
 * scale d and minimum m (w = q * d + m, GGUF Q4_1; Q4_0 is m = -8 d). Groups go in pairs (A, B):
 * the 32 bytes of a pair are ordered A0 A1 B0 B1 A2 A3 B2 B3 ... where byte j of a group holds
 * weight j (low nibble) and j + 16 (high nibble). Widened to 16-bit words, pairs of words feed
 * vdpbf16ps lanes: even lanes sum group A, odd lanes group B, so one broadcast of (dA, dB)
 * scales both. A nibble becomes a bf16 number by OR-ing 0x4300 (the bf16 of 128 + q), and the
 * extra 128 * sum(x) is taken off with the minimum: y = sum_g d_g D_g + sum_g (m_g - 128 d_g) S_g,
 * D_g = x . (q + 128), S_g = sum of x over the group.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define VEC 1
#else
#define VEC 0
#endif

typedef struct {
    const uint8_t *qs;     /* [n, k/2] */
    const uint16_t *d;     /* fp16 [n, k/32] */
    const uint16_t *m;     /* fp16 [n, k/32] */
    const uint16_t *bias;  /* bf16 [n] or NULL */
    int64_t n, k;
} q4mat;

typedef struct {
    q4mat qkv, o, gate_up, down;
    const float *attn_norm, *ffn_norm; /* float32 [dim], pre-multiplied by sqrt(dim) */
    uint16_t *kv;                      /* bf16 [slots, 2, n_kv, max_seq, head_dim] */
} layer_t;

typedef struct {
    int64_t n_layers, dim, n_heads, n_kv, head_dim, ffn, vocab, max_seq, max_batch;
    float norm_eps; /* sqrt(dim * eps): rms = hypot(|x|, norm_eps) / sqrt(dim) */
    const layer_t *layers;
    const int8_t *emb_q;      /* int8 [vocab, dim] */
    const uint16_t *emb_scale; /* bf16 [vocab] */
    const int8_t *head_q;      /* int8 [vocab, dim] (the embedding when tied) */
    const uint16_t *head_scale;
    const float *final_norm;   /* float32 [dim], pre-multiplied */
    const float *rope_cos, *rope_sin; /* float32 [max_seq, head_dim/2] */
} model_t;

#define MAXB 8 /* tokens per pass over a weight matrix */

/* -- scalar helpers ------------------------------------------------------------------------ */
static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }
static inline float bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint16_t f2bf(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float rbf(float f) { return bf2f(f2bf(f)); }
static inline float h2f(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, u;
    if (e == 0) {
        if (m == 0) u = s;
        else { /* subnormal */
            e = 127 - 15 + 1;
            while (!(m & 0x400)) { m <<= 1; e--; }
            u = s | (e << 23) | ((m & 0x3ff) << 13);
        }
    } else if (e == 31) u = s | 0x7f800000u | (m << 13);
    else u = s | ((e + 127 - 15) << 23) | (m << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline void thread_id(int *tid, int *nt) { /* this thread's index in its parallel region, and the region's size */
#ifdef _OPENMP
    *tid = omp_get_thread_num();
    *nt = omp_get_num_threads();
#else
    *tid = 0;
    *nt = 1;
#endif
}
static inline void split(int64_t n, int tid, int nt, int64_t *a, int64_t *b) {
    *a = n * tid / nt;
    *b = n * (tid + 1) / nt;
}

/* -- activations: a bf16 vector in the pair layout of the weights, with group sums ---------- */
/* out: k bf16 values; word w of pair p's first half holds x[g*32 + j], of its second half x[g*32 + j + 16],
 * g = 2p + ((w >> 1) & 1), j = ((w >> 2) << 1) | (w & 1). */
static void arrange(const float *x, int64_t k, uint16_t *out, float *gsum) {
#if VEC
    /* per pair: [A 0..15 | B 0..15] and [A 16..31 | B 16..31] in bf16, then one word permutation each */
    static const int16_t order[32] = {0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23,
                                      8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31};
    const __m512i idx = _mm512_loadu_si512(order);
    for (int64_t p = 0; p < k / 64; p++) {
        const float *xa = x + p * 64, *xb = xa + 32;
        __m512i lo = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(xb), _mm512_loadu_ps(xa));
        __m512i hi = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(xb + 16), _mm512_loadu_ps(xa + 16));
        _mm512_storeu_si512(out + p * 64, _mm512_permutexvar_epi16(idx, lo));
        _mm512_storeu_si512(out + p * 64 + 32, _mm512_permutexvar_epi16(idx, hi));
        __m512 sa = _mm512_add_ps(_mm512_cvtpbh_ps((__m256bh)_mm512_castsi512_si256(lo)),
                                  _mm512_cvtpbh_ps((__m256bh)_mm512_castsi512_si256(hi)));
        __m512 sb = _mm512_add_ps(_mm512_cvtpbh_ps((__m256bh)_mm512_extracti64x4_epi64(lo, 1)),
                                  _mm512_cvtpbh_ps((__m256bh)_mm512_extracti64x4_epi64(hi, 1)));
        gsum[2 * p] = _mm512_reduce_add_ps(sa);
        gsum[2 * p + 1] = _mm512_reduce_add_ps(sb);
    }
#else
    for (int64_t p = 0; p < k / 64; p++) {
        const float *xa = x + p * 64, *xb = x + p * 64 + 32;
        uint16_t *o = out + p * 64;
        float sa = 0.f, sb = 0.f;
        for (int w = 0; w < 32; w++) {
            int j = ((w >> 2) << 1) | (w & 1);
            const float *src = ((w >> 1) & 1) ? xb : xa;
            o[w] = f2bf(src[j]);
            o[32 + w] = f2bf(src[j + 16]);
        }
        for (int j = 0; j < 32; j++) {
            sa += rbf(xa[j]);
            sb += rbf(xb[j]);
        }
        gsum[2 * p] = sa;
        gsum[2 * p + 1] = sb;
    }
#endif
}

/* -- q4 rows: y[b][r] = bf16(W[r] . x[b] + bias[r]) for rows r0..r1 --------------------------- */
#if !VEC
/* sum_g (m_g - 128 d_g) S_g of one row (the vector path folds it into its lanes) */
static inline float q4_offset(const q4mat *W, int64_t r, const float *gs) {
    int64_t G = W->k / 32;
    const uint16_t *d = W->d + r * G, *m = W->m + r * G;
    float acc = 0.f;
    for (int64_t g = 0; g < G; g++) acc += (h2f(m[g]) - 128.f * h2f(d[g])) * gs[g];
    return acc;
}
#endif

#if VEC
/* lane j of the result: the sum of the lanes of v[j'] (j' = 4 (j % 4) + j / 4, a transpose), in
 * the pairing _mm512_reduce_add_ps uses: (l_i + l_i+8) then + 4, + 2, + 1. For floats that
 * makes every sum bitwise what reduce_add_ps gives, whichever other vectors share the call. */
static inline __m512 reduce16_ps(const __m512 v[16]) {
    __m512 t[8], u[4];
    for (int i = 0; i < 8; i++)
        t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xee));
    for (int i = 0; i < 4; i++)
        u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88), _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xdd));
    __m512 w01 = _mm512_add_ps(_mm512_unpacklo_ps(u[0], u[1]), _mm512_unpackhi_ps(u[0], u[1]));
    __m512 w23 = _mm512_add_ps(_mm512_unpacklo_ps(u[2], u[3]), _mm512_unpackhi_ps(u[2], u[3]));
    __m512d a = _mm512_castps_pd(w01), b = _mm512_castps_pd(w23);
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
}
/* where v[j] ends up in reduce16_ps's result */
static inline int reduce16_lane(int j) { return 4 * (j % 4) + j / 4; }

/* (m - 128 d) of groups g..g+15 of one row (masked past the row's end) */
static inline __m512 q4_offsets(const q4mat *W, int64_t r, int64_t g, __mmask16 mk) {
    const int64_t G = W->k / 32;
    __m512 dv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, W->d + r * G + g));
    __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, W->m + r * G + g));
    return _mm512_fmadd_ps(dv, _mm512_set1_ps(-128.f), mv);
}

/* R (1 or 2) rows at once, each x load serving both; B tokens (a constant after inlining) */
static inline __attribute__((always_inline)) void q4_rows_n(
    const int B, const int R, const q4mat *W, int64_t r, const uint16_t *xa, int64_t xstride,
    const float *gs, int64_t gstride, float *y, int64_t ystride) {
    const int64_t P = W->k / 64, G = W->k / 32;
    const __m512i low = _mm512_set1_epi16(0x0f), one28 = _mm512_set1_epi16(0x4300);
    __m512 acc[2][MAXB];
#pragma GCC unroll 8
    for (int b = 0; b < B; b++) {
        acc[0][b] = _mm512_setzero_ps();
        acc[1][b] = _mm512_setzero_ps();
    }
    /* weights stream from DRAM: ask for the rows 4 ahead now (the hardware prefetcher starts too late for rows this short) */
    for (int i = 0; i < R; i++) {
        const char *next = (const char *)(W->qs + (r + 4 + i) * (W->k / 2));
        for (int64_t c = 0; c < W->k / 2; c += 64) _mm_prefetch(next + c, _MM_HINT_T0);
        _mm_prefetch((const char *)(W->d + (r + 4 + i) * G), _MM_HINT_T0);
        _mm_prefetch((const char *)(W->m + (r + 4 + i) * G), _MM_HINT_T0);
    }
    for (int64_t p = 0; p < P; p++) {
        __m512bh lo[2], hi[2];
        __m512 dv[2];
#pragma GCC unroll 2
        for (int i = 0; i < R; i++) {
            const uint8_t *q = W->qs + (r + i) * (W->k / 2);
            __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(q + p * 32)));
            lo[i] = (__m512bh)_mm512_or_si512(_mm512_and_si512(w, low), one28);
            hi[i] = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(w, 4), one28);
            uint32_t dd;
            memcpy(&dd, W->d + (r + i) * G + 2 * p, 4);
            dv[i] = _mm512_cvtph_ps(_mm256_set1_epi32((int)dd));
        }
#pragma GCC unroll 8
        for (int b = 0; b < B; b++) {
            const uint16_t *xp = xa + b * xstride + p * 64;
            __m512bh xl = (__m512bh)_mm512_loadu_si512(xp), xh = (__m512bh)_mm512_loadu_si512(xp + 32);
#pragma GCC unroll 2
            for (int i = 0; i < R; i++) {
                __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), lo[i], xl);
                t = _mm512_dpbf16_ps(t, hi[i], xh);
                acc[i][b] = _mm512_fmadd_ps(t, dv[i], acc[i][b]);
            }
        }
    }
    /* + sum_g (m_g - 128 d_g) S_g, folded into the lanes before the one reduction */
    for (int64_t g = 0; g < G; g += 16) {
        __mmask16 mk = (G - g) >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (G - g)) - 1);
        __m512 c[2];
#pragma GCC unroll 2
        for (int i = 0; i < R; i++) c[i] = q4_offsets(W, r + i, g, mk);
#pragma GCC unroll 8
        for (int b = 0; b < B; b++) {
            __m512 sv = _mm512_maskz_loadu_ps(mk, gs + b * gstride + g);
#pragma GCC unroll 2
            for (int i = 0; i < R; i++) acc[i][b] = _mm512_fmadd_ps(c[i], sv, acc[i][b]);
        }
    }
    float sums[16];
    if (R * B >= 4) { /* one transposed reduction for all: the same bits as reduce_add_ps, fewer shuffles */
        __m512 v[16];
#pragma GCC unroll 16
        for (int j = 0; j < 16; j++) v[j] = j < R * B ? acc[j / B][j % B] : _mm512_setzero_ps();
        __m512 red = reduce16_ps(v);
        float lanes[16];
        _mm512_storeu_ps(lanes, red);
#pragma GCC unroll 16
        for (int j = 0; j < R * B; j++) sums[j] = lanes[reduce16_lane(j)];
    } else
#pragma GCC unroll 2
        for (int j = 0; j < R * B; j++) sums[j] = _mm512_reduce_add_ps(acc[j / B][j % B]);
#pragma GCC unroll 2
    for (int i = 0; i < R; i++) {
        float bias = W->bias ? bf2f(W->bias[r + i]) : 0.f;
#pragma GCC unroll 8
        for (int b = 0; b < B; b++) y[b * ystride + r + i] = rbf(sums[i * B + b] + bias);
    }
}

static inline __attribute__((always_inline)) void q4_rows_b(
    const int B, const q4mat *W, int64_t r0, int64_t r1, const uint16_t *xa, int64_t xstride,
    const float *gs, int64_t gstride, float *y, int64_t ystride) {
    int64_t r = r0;
    const int64_t row_bytes = W->k / 2;
    for (int64_t i = r0; i < r0 + 4 && i < r1; i++) /* the first rows; the loop below prefetches ahead */
        for (int64_t c = 0; c < row_bytes; c += 64) _mm_prefetch((const char *)(W->qs + i * row_bytes + c), _MM_HINT_T0);
    if (B > 1)
        for (; r + 2 <= r1; r += 2) q4_rows_n(B, 2, W, r, xa, xstride, gs, gstride, y, ystride);
    for (; r + 1 <= r1 - 1; r++) q4_rows_n(B, 1, W, r, xa, xstride, gs, gstride, y, ystride);
    if (r < r1) q4_rows_n(B, 1, W, r, xa, xstride, gs, gstride, y, ystride);
}
#endif

static void q4_rows(int B, const q4mat *W, int64_t r0, int64_t r1, const uint16_t *xa, int64_t xstride,
                    const float *gs, int64_t gstride, float *y, int64_t ystride) {
#if VEC
    switch (B) { /* constant B: the token loop unrolls and its accumulators stay in registers */
    case 1: q4_rows_b(1, W, r0, r1, xa, xstride, gs, gstride, y, ystride); return;
    case 2: q4_rows_b(2, W, r0, r1, xa, xstride, gs, gstride, y, ystride); return;
    case 3: q4_rows_b(3, W, r0, r1, xa, xstride, gs, gstride, y, ystride); return;
    case 4: q4_rows_b(4, W, r0, r1, xa, xstride, gs, gstride, y, ystride); return;
    case 5: q4_rows_b(5, W, r0, r1, xa, xstride, gs, gstride, y, ystride); return;
    case 6: q4_rows_b(6, W, r0, r1, xa, xstride, gs, gstride, y, ystride); return;
    case 7: q4_rows_b(7, W, r0, r1, xa, xstride, gs, gstride, y, ystride); return;
    default: q4_rows_b(8, W, r0, r1, xa, xstride, gs, gstride, y, ystride); return;
    }
#else
    const int64_t G = W->k / 32;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *q = W->qs + r * (W->k / 2);
        for (int b = 0; b < B; b++) {
            const uint16_t *x = xa + b * xstride;
            float acc = 0.f;
            for (int64_t g = 0; g < G; g++) {
                const uint8_t *qp = q + (g / 2) * 32;
                const uint16_t *xp = x + (g / 2) * 64;
                float s = 0.f;
                for (int w = 0; w < 32; w++) {
                    if (((w >> 1) & 1) != (g & 1)) continue;
                    s += bf2f(xp[w]) * (float)((qp[w] & 15) + 128) + bf2f(xp[32 + w]) * (float)((qp[w] >> 4) + 128);
                }
                acc += h2f(W->d[r * G + g]) * s;
            }
            float bias = W->bias ? bf2f(W->bias[r]) : 0.f;
            y[b * ystride + r] = rbf(acc + q4_offset(W, r, gs + b * gstride) + bias);
        }
    }
#endif
}

/* all tokens, in passes of MAXB; rows r0..r1 */
static void q4_matmul_rows(int B, const q4mat *W, int64_t r0, int64_t r1, const uint16_t *xa, int64_t xstride,
                           const float *gs, int64_t gstride, float *y, int64_t ystride) {
    for (int b0 = 0; b0 < B; b0 += MAXB) {
        int nb = B - b0 < MAXB ? B - b0 : MAXB;
        q4_rows(nb, W, r0, r1, xa + b0 * xstride, xstride, gs + b0 * gstride, gstride, y + b0 * ystride, ystride);
    }
}

/* -- int8 rows (lm_head): y[b][r] = bf16(scale[r] * (q[r] . x[b])) -------------------------- */
/* x[b] is first rounded to integers, x ~ sx * xi with |xi| <= lim, lim small enough that a whole
 * row's sum fits in int32. The dot products are then exact integers (vpdpwssd: 32 products an
 * instruction, twice fp32 FMA's), so their order cannot matter: any batch size and any reduction
 * give the same logits. Relative rounding of x is < 1/(2 lim), lim = 29,000 for dim 576. */
static void quant16(const float *x, int64_t k, int16_t *xi, float *sx) {
    float mx = 0.f;
    for (int64_t i = 0; i < k; i++) mx = fmaxf(mx, fabsf(x[i]));
    double lim = 2147483647.0 / (128.0 * (double)k);
    if (lim > 32767.0) lim = 32767.0;
    lim = floor(lim);
    float inv = mx > 0.f ? (float)(lim / mx) : 0.f;
    for (int64_t i = 0; i < k; i++) {
        float v = rintf(x[i] * inv);
        xi[i] = (int16_t)fmaxf(fminf(v, (float)lim), (float)-lim);
    }
    *sx = mx > 0.f ? (float)(mx / lim) : 0.f;
}

#if VEC
/* R rows, B tokens: R * B <= 16 accumulators, reduced together */
static inline __attribute__((always_inline)) void i8_rows_n(const int B, const int R, const int8_t *Q, const uint16_t *scale,
                                                            int64_t k, int64_t r, const int16_t *xi, const float *sx,
                                                            float *y, int64_t ystride) {
    __m512i acc[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_si512();
    for (int i = 0; i < R; i++)
        for (int64_t c = 0; c < k; c += 64) _mm_prefetch((const char *)(Q + (r + 4 + i) * k + c), _MM_HINT_T0);
    for (int64_t c = 0; c < k; c += 32) {
        const __mmask32 mk = k - c >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (k - c)) - 1);
        __m512i w[2];
#pragma GCC unroll 2
        for (int i = 0; i < R; i++) w[i] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mk, Q + (r + i) * k + c));
#pragma GCC unroll 8
        for (int b = 0; b < B; b++) {
            __m512i xv = _mm512_maskz_loadu_epi16(mk, xi + b * k + c);
#pragma GCC unroll 2
            for (int i = 0; i < R; i++) acc[i * B + b] = _mm512_dpwssd_epi32(acc[i * B + b], w[i], xv);
        }
    }
    /* lane sums in integers (exact), then one conversion */
    int32_t sums[16];
    {
        __m512i t[8], u[4];
        for (int i = 0; i < 8; i++)
            t[i] = _mm512_add_epi32(_mm512_shuffle_i64x2(acc[2 * i], acc[2 * i + 1], 0x44), _mm512_shuffle_i64x2(acc[2 * i], acc[2 * i + 1], 0xee));
        for (int i = 0; i < 4; i++)
            u[i] = _mm512_add_epi32(_mm512_shuffle_i64x2(t[2 * i], t[2 * i + 1], 0x88), _mm512_shuffle_i64x2(t[2 * i], t[2 * i + 1], 0xdd));
        __m512i w01 = _mm512_add_epi32(_mm512_unpacklo_epi32(u[0], u[1]), _mm512_unpackhi_epi32(u[0], u[1]));
        __m512i w23 = _mm512_add_epi32(_mm512_unpacklo_epi32(u[2], u[3]), _mm512_unpackhi_epi32(u[2], u[3]));
        _mm512_storeu_si512(sums, _mm512_add_epi32(_mm512_unpacklo_epi64(w01, w23), _mm512_unpackhi_epi64(w01, w23)));
    }
#pragma GCC unroll 2
    for (int i = 0; i < R; i++) {
        float s = bf2f(scale[r + i]);
#pragma GCC unroll 8
        for (int b = 0; b < B; b++) y[b * ystride + r + i] = rbf(rbf((float)sums[reduce16_lane(i * B + b)] * sx[b]) * s);
    }
}

static inline __attribute__((always_inline)) void i8_rows_b(const int B, const int8_t *Q, const uint16_t *scale, int64_t k,
                                                            int64_t r0, int64_t r1, const int16_t *xi, const float *sx,
                                                            float *y, int64_t ystride) {
    int64_t r = r0;
    if (2 * B <= 16)
        for (; r + 2 <= r1; r += 2) i8_rows_n(B, 2, Q, scale, k, r, xi, sx, y, ystride);
    for (; r < r1; r++) i8_rows_n(B, 1, Q, scale, k, r, xi, sx, y, ystride);
}
#endif

/* B tokens (in passes of MAXB): xi their integer activations [B, k], sx their scales */
static __attribute__((noinline)) void i8_rows(int B, const int8_t *Q, const uint16_t *scale, int64_t k, int64_t r0, int64_t r1,
                                              const int16_t *xi, const float *sx, float *y, int64_t ystride) {
#if VEC
    for (int b0 = 0; b0 < B; b0 += MAXB, xi += MAXB * k, sx += MAXB, y += MAXB * ystride) {
    switch (B - b0 < MAXB ? B - b0 : MAXB) {
    case 1: i8_rows_b(1, Q, scale, k, r0, r1, xi, sx, y, ystride); break;
    case 2: i8_rows_b(2, Q, scale, k, r0, r1, xi, sx, y, ystride); break;
    case 3: i8_rows_b(3, Q, scale, k, r0, r1, xi, sx, y, ystride); break;
    case 4: i8_rows_b(4, Q, scale, k, r0, r1, xi, sx, y, ystride); break;
    case 5: i8_rows_b(5, Q, scale, k, r0, r1, xi, sx, y, ystride); break;
    case 6: i8_rows_b(6, Q, scale, k, r0, r1, xi, sx, y, ystride); break;
    case 7: i8_rows_b(7, Q, scale, k, r0, r1, xi, sx, y, ystride); break;
    default: i8_rows_b(8, Q, scale, k, r0, r1, xi, sx, y, ystride); break;
    }
    }
#else
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *q = Q + r * k;
        float s = bf2f(scale[r]);
        for (int b = 0; b < B; b++) {
            int32_t acc = 0;
            for (int64_t c = 0; c < k; c++) acc += (int32_t)q[c] * (int32_t)xi[b * k + c];
            y[b * ystride + r] = rbf(rbf((float)acc * sx[b]) * s);
        }
    }
#endif
}

/* -- small vector pieces ---------------------------------------------------------------------- */
#if VEC
static inline __m512 exp512(__m512 x) { /* e^x, ~2 ulp: 2^n * p(r), r in [-ln2/2, ln2/2] */
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3f)), _mm512_set1_ps(-103.9f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
    p = _mm512_add_ps(p, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}
#endif

/* bf16(silu(bf16 g)) * bf16 u, rounded: F.silu(g).mul_(u) in bf16 */
static void silu_mul(const float *g, const float *u, float *h, int64_t n) {
    int64_t i = 0;
#if VEC
    for (; i + 16 <= n; i += 16) {
        __m512 gv = _mm512_loadu_ps(g + i);
        __m512 s = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        s = _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(s));
        __m512 o = _mm512_mul_ps(s, _mm512_loadu_ps(u + i));
        _mm512_storeu_ps(h + i, _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(o)));
    }
#endif
    for (; i < n; i++) h[i] = rbf(rbf(g[i] / (1.f + expf(-g[i]))) * u[i]);
}

/* RMSNorm of the float32 residual: bf16(x * w / hypot(|x|, eps)) */
static void rms_norm(const float *x, const float *w, float eps, int64_t n, float *out) {
    int64_t i = 0;
    float ss = 0.f;
#if VEC
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(x + i), acc);
    ss = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) ss += x[i] * x[i];
    float r = hypotf(sqrtf(ss), eps);
    i = 0;
#if VEC
    __m512 rv = _mm512_set1_ps(r);
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_div_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(w + i)), rv);
        _mm512_storeu_ps(out + i, _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(v)));
    }
#endif
    for (; i < n; i++) out[i] = rbf(x[i] * w[i] / r);
}

static inline float dot_bf16(const uint16_t *a, const float *q, int64_t n) {
#if VEC
    if (n % 32 == 0) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; i += 16)
            acc = _mm512_fmadd_ps(_mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)(a + i))),
                                  _mm512_loadu_ps(q + i), acc);
        return _mm512_reduce_add_ps(acc);
    }
#endif
    float s = 0.f;
    for (int64_t i = 0; i < n; i++) s += bf2f(a[i]) * q[i];
    return s;
}

static inline void axpy_bf16(float p, const uint16_t *v, float *o, int64_t n) {
#if VEC
    if (n % 16 == 0) {
        __m512 pv = _mm512_set1_ps(p);
        for (int64_t i = 0; i < n; i += 16)
            _mm512_storeu_ps(o + i, _mm512_fmadd_ps(pv, _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)(v + i))),
                                                    _mm512_loadu_ps(o + i)));
        return;
    }
#endif
    for (int64_t i = 0; i < n; i++) o[i] += p * bf2f(v[i]);
}

static __attribute__((noinline)) void softmax_inplace(float *s, int64_t n) {
    float mx = -INFINITY, sum = 0.f;
    int64_t i = 0;
#if VEC
    __m512 mxv = _mm512_set1_ps(-INFINITY);
    for (; i + 16 <= n; i += 16) mxv = _mm512_max_ps(mxv, _mm512_loadu_ps(s + i));
    mx = _mm512_reduce_max_ps(mxv);
#endif
    for (; i < n; i++) mx = s[i] > mx ? s[i] : mx;
    i = 0;
#if VEC
    __m512 acc = _mm512_setzero_ps(), mv = _mm512_set1_ps(mx);
    for (; i + 16 <= n; i += 16) {
        __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + i), mv));
        _mm512_storeu_ps(s + i, e);
        acc = _mm512_add_ps(acc, e);
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) {
        s[i] = expf(s[i] - mx);
        sum += s[i];
    }
    float inv = 1.f / sum;
    i = 0;
#if VEC
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(s + i, _mm512_mul_ps(_mm512_loadu_ps(s + i), _mm512_set1_ps(inv)));
#endif
    for (; i < n; i++) s[i] *= inv;
}

/* rotate the interleaved pairs (2i, 2i+1) of one head by position pos */
static inline void rope(const float *in, float *out, const float *cs, const float *sn, int64_t hd) {
    for (int64_t i = 0; i < hd / 2; i++) {
        float a = in[2 * i], b = in[2 * i + 1];
        out[2 * i] = a * cs[i] - b * sn[i];
        out[2 * i + 1] = a * sn[i] + b * cs[i];
    }
}

/* one token's k (roped) and v, written to its slot's cache at its position */
static void store_kv(const model_t *M, const layer_t *L, int64_t slot, int64_t pos, const float *qkv, float *tmp) {
    const int64_t hd = M->head_dim, nq = M->n_heads, nkv = M->n_kv, S = M->max_seq;
    const float *cs = M->rope_cos + pos * (hd / 2), *sn = M->rope_sin + pos * (hd / 2);
    for (int64_t g = 0; g < nkv; g++) {
        uint16_t *K = L->kv + (((slot * 2 + 0) * nkv + g) * S + pos) * hd;
        uint16_t *V = L->kv + (((slot * 2 + 1) * nkv + g) * S + pos) * hd;
        rope(qkv + (nq + g) * hd, tmp, cs, sn, hd);
        const float *v = qkv + (nq + nkv + g) * hd;
        for (int64_t i = 0; i < hd; i++) { K[i] = f2bf(tmp[i]); V[i] = f2bf(v[i]); }
    }
}

/* one (token, query head) over cache positions 0..pos: writes bf16 attention output [head_dim] */
static __attribute__((noinline)) void attend(const model_t *M, const layer_t *L, int64_t h, int64_t slot, int64_t pos,
                                             const float *qkv, float *out, float *scores, float *tmp) {
    const int64_t hd = M->head_dim, nq = M->n_heads, nkv = M->n_kv, S = M->max_seq;
    const int64_t g = h / (nq / nkv);
    float *q = tmp, *o = tmp + hd;
    rope(qkv + h * hd, q, M->rope_cos + pos * (hd / 2), M->rope_sin + pos * (hd / 2), hd);
    for (int64_t i = 0; i < hd; i++) q[i] = rbf(q[i]);
    const uint16_t *K = L->kv + ((slot * 2 + 0) * nkv + g) * S * hd;
    const uint16_t *V = L->kv + ((slot * 2 + 1) * nkv + g) * S * hd;
    const float scale = 1.f / sqrtf((float)hd);
    for (int64_t t = 0; t <= pos; t++) scores[t] = dot_bf16(K + t * hd, q, hd) * scale;
    softmax_inplace(scores, pos + 1);
    memset(o, 0, hd * sizeof(float));
    for (int64_t t = 0; t <= pos; t++) axpy_bf16(scores[t], V + t * hd, o, hd);
    for (int64_t i = 0; i < hd; i++) out[i] = rbf(o[i]);
}

#if VEC
/* the four horizontal sums of a, b, c, d: [sum a, sum b, sum c, sum d] */
static inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b)); /* per 128 bits: a01 b01 a23 b23 */
    __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
                                _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* hpg (<= 4) query heads of one kv group, head_dim 64, over cache positions 0..pos: each K and V
 * row is read once for the group, and the outputs stay in registers. out: head j at out + j * 64 */
static void group64_core(__m512bh q[4][2], int64_t hpg, const uint16_t *K, const uint16_t *V, int64_t pos,
                         float *scores, int64_t S, float *out) {
    const int64_t hd = 64;
    const float scale = 0.125f; /* 1 / sqrt(64) */
    int64_t t = 0;
    for (; t + 4 <= pos + 1; t += 4) { /* four positions a pass: one reduction tree for their four sums */
        __m512bh k[4][2];
        for (int u = 0; u < 4; u++) {
            k[u][0] = (__m512bh)_mm512_loadu_si512(K + (t + u) * hd);
            k[u][1] = (__m512bh)_mm512_loadu_si512(K + (t + u) * hd + 32);
        }
        for (int64_t j = 0; j < hpg; j++) {
            __m512 d[4];
            for (int u = 0; u < 4; u++) d[u] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), k[u][0], q[j][0]), k[u][1], q[j][1]);
            _mm_storeu_ps(scores + j * S + t, _mm_mul_ps(reduce4(d[0], d[1], d[2], d[3]), _mm_set1_ps(scale)));
        }
    }
    for (; t <= pos; t++) {
        __m512bh k0 = (__m512bh)_mm512_loadu_si512(K + t * hd), k1 = (__m512bh)_mm512_loadu_si512(K + t * hd + 32);
        for (int64_t j = 0; j < hpg; j++)
            scores[j * S + t] = _mm512_reduce_add_ps(_mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), k0, q[j][0]), k1, q[j][1])) * scale;
    }
    for (int64_t j = 0; j < hpg; j++) softmax_inplace(scores + j * S, pos + 1);
    __m512 o[4][4];
    for (int j = 0; j < 4; j++)
        for (int i = 0; i < 4; i++) o[j][i] = _mm512_setzero_ps();
    for (int64_t t = 0; t <= pos; t++) {
        __m512 v[4];
        for (int i = 0; i < 4; i++) v[i] = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)(V + t * hd + 16 * i)));
        for (int64_t j = 0; j < hpg; j++) {
            __m512 pv = _mm512_set1_ps(scores[j * S + t]);
            for (int i = 0; i < 4; i++) o[j][i] = _mm512_fmadd_ps(pv, v[i], o[j][i]);
        }
    }
    for (int64_t j = 0; j < hpg; j++)
        for (int i = 0; i < 4; i++) _mm512_storeu_ps(out + j * hd + 16 * i, o[j][i]);
}

/* decode: the group's query heads roped from this step's qkv; bf16-rounded outputs into out */
static __attribute__((noinline)) void attend_group64(const model_t *M, const layer_t *L, int64_t g, int64_t slot, int64_t pos,
                                                     const float *qkv, float *out, float *scores, float *tmp) {
    const int64_t hd = 64, nq = M->n_heads, nkv = M->n_kv, S = M->max_seq, hpg = nq / nkv;
    __m512bh q[4][2];
    for (int64_t j = 0; j < hpg; j++) {
        rope(qkv + (g * hpg + j) * hd, tmp, M->rope_cos + pos * (hd / 2), M->rope_sin + pos * (hd / 2), hd);
        q[j][0] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(tmp + 16), _mm512_loadu_ps(tmp));
        q[j][1] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(tmp + 48), _mm512_loadu_ps(tmp + 32));
    }
    const uint16_t *K = L->kv + ((slot * 2 + 0) * nkv + g) * S * hd;
    const uint16_t *V = L->kv + ((slot * 2 + 1) * nkv + g) * S * hd;
    float *o = out + g * hpg * hd;
    group64_core(q, hpg, K, V, pos, scores, S, o);
    for (int64_t i = 0; i < hpg * hd; i++) o[i] = rbf(o[i]);
}
#endif

/* Prefill attention for rows start..start+T-1 of one slot whose K/V are in the cache already:
 * q bf16 [T, n_heads, 64] (roped), out bf16 [T, n_heads * 64]. Causal: row t sees 0..start+t.
 * Returns -1 where the shapes do not fit (head_dim 64, up to 4 query heads per kv head). */
int influence_prefill_attention(const model_t *M, int64_t layer, int64_t slot, int64_t start, int64_t T,
                                const uint16_t *q, uint16_t *out, int nthreads) {
#if VEC
    const int64_t hd = M->head_dim, nq = M->n_heads, nkv = M->n_kv, S = M->max_seq, hpg = nq / nkv;
    if (hd != 64 || hpg > 4 || nq % nkv || slot < 0 || slot >= M->max_batch || start < 0 || start + T > S || layer < 0 ||
        layer >= M->n_layers)
        return -1;
    const layer_t *L = &M->layers[layer];
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *scores = aligned_alloc(64, align64(sizeof(float) * 4 * S));
        float *o = aligned_alloc(64, align64(sizeof(float) * 4 * hd));
        if (!scores || !o) {
#pragma omp atomic write
            failed = 1;
        } else {
            /* dynamic: later rows see more positions */
#pragma omp for schedule(dynamic, 4)
            for (int64_t it = 0; it < T * nkv; it++) {
                int64_t t = it / nkv, g = it % nkv;
                __m512bh qv[4][2];
                for (int64_t j = 0; j < hpg; j++) {
                    const uint16_t *qp = q + (t * nq + g * hpg + j) * hd;
                    qv[j][0] = (__m512bh)_mm512_loadu_si512(qp);
                    qv[j][1] = (__m512bh)_mm512_loadu_si512(qp + 32);
                }
                const uint16_t *K = L->kv + ((slot * 2 + 0) * nkv + g) * S * hd;
                const uint16_t *V = L->kv + ((slot * 2 + 1) * nkv + g) * S * hd;
                group64_core(qv, hpg, K, V, start + t, scores, S, o);
                uint16_t *dst = out + (t * nq + g * hpg) * hd;
                for (int64_t i = 0; i < hpg * hd; i += 32)
                    _mm512_storeu_si512(dst + i, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(o + i + 16), _mm512_loadu_ps(o + i)));
            }
        }
        free(scores);
        free(o);
    }
    return failed ? -2 : 0;
#else
    (void)M; (void)layer; (void)slot; (void)start; (void)T; (void)q; (void)out; (void)nthreads;
    return -1;
#endif
}


/* The decode step: B tokens, each with its slot and position -> float32 logits [n_logits, vocab] of
 * the tokens logit_rows[0..n_logits-1] (NULL: every token, n_logits = B). Tokens may share a slot
 * at consecutive positions (prompts run row by
 * row: each row computes exactly what it would as a decode step). */
int influence_decode(const model_t *M, int B, const int64_t *slots, const int64_t *tokens, const int64_t *positions,
                     const int64_t *logit_rows, int n_logits, float *logits, int nthreads) {
    const int64_t dim = M->dim, F = M->ffn, hd = M->head_dim, nq = M->n_heads, nkv = M->n_kv;
    const int64_t QKV = (nq + 2 * nkv) * hd, A = nq * hd;
    for (int b = 0; b < B; b++)
        if (slots[b] < 0 || slots[b] >= M->max_batch || positions[b] < 0 || positions[b] >= M->max_seq ||
            tokens[b] < 0 || tokens[b] >= M->vocab)
            return -1;
    if (n_logits < 1 || n_logits > B || (!logit_rows && n_logits != B)) return -1;
    for (int i = 0; logit_rows && i < n_logits; i++)
        if (logit_rows[i] < 0 || logit_rows[i] >= B) return -1;
    float *x = aligned_alloc(64, align64(sizeof(float) * B * dim));
    float *qkv = aligned_alloc(64, align64(sizeof(float) * B * QKV));
    float *att = aligned_alloc(64, align64(sizeof(float) * B * A));
    float *gu = aligned_alloc(64, align64(sizeof(float) * B * 2 * F));
    float *hbuf = aligned_alloc(64, align64(sizeof(float) * B * F));
    if (!x || !qkv || !att || !gu || !hbuf) {
        free(x); free(qkv); free(att); free(gu); free(hbuf);
        return -2;
    }
    for (int b = 0; b < B; b++) { /* embedding rows: bf16(q * scale), as Int8Linear.rows */
        const int8_t *q = M->emb_q + tokens[b] * dim;
        float s = bf2f(M->emb_scale[tokens[b]]);
        for (int64_t i = 0; i < dim; i++) x[b * dim + i] = rbf((float)q[i] * s);
    }
    const int64_t kmax = F > dim ? (F > A ? F : A) : (dim > A ? dim : A);
#if VEC
    const int grouped = hd == 64 && nq / nkv <= 4; /* attend_group64 applies */
#endif
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        int tid, nt;
        thread_id(&tid, &nt);
        /* per thread: normed input, its pair layout and group sums, attention scratch */
        float *xn = aligned_alloc(64, align64(sizeof(float) * B * kmax));
        uint16_t *xa = aligned_alloc(64, align64(sizeof(uint16_t) * B * kmax));
        float *gs = aligned_alloc(64, align64(sizeof(float) * B * (kmax / 32)));
        float *scores = aligned_alloc(64, align64(sizeof(float) * 4 * M->max_seq));
        float *tmp = aligned_alloc(64, align64(sizeof(float) * 2 * hd));
        int16_t *xi = aligned_alloc(64, align64(sizeof(int16_t) * n_logits * dim));
        float *sx = aligned_alloc(64, align64(sizeof(float) * n_logits));
        int ok = xn && xa && gs && scores && tmp && xi && sx;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            int64_t a0, a1;
            for (int64_t l = 0; l < M->n_layers; l++) {
                const layer_t *L = &M->layers[l];
                /* attention block */
                for (int b = 0; b < B; b++) {
                    rms_norm(x + b * dim, L->attn_norm, M->norm_eps, dim, xn + b * dim);
                    arrange(xn + b * dim, dim, xa + b * dim, gs + b * (dim / 32));
                }
                split(L->qkv.n, tid, nt, &a0, &a1);
                q4_matmul_rows(B, &L->qkv, a0, a1, xa, dim, gs, dim / 32, qkv, QKV);
#pragma omp barrier
                /* K/V first (rows of one slot may attend to each other: a prompt run as rows), then attention */
                split(B, tid, nt, &a0, &a1);
                for (int64_t b = a0; b < a1; b++) store_kv(M, L, slots[b], positions[b], qkv + b * QKV, tmp);
#pragma omp barrier
#if VEC
                if (grouped) {
                    split((int64_t)B * nkv, tid, nt, &a0, &a1);
                    for (int64_t it = a0; it < a1; it++) {
                        int64_t b = it / nkv;
                        attend_group64(M, L, it % nkv, slots[b], positions[b], qkv + b * QKV, att + b * A, scores, tmp);
                    }
                } else
#endif
                {
                    split((int64_t)B * nq, tid, nt, &a0, &a1);
                    for (int64_t it = a0; it < a1; it++) {
                        int64_t b = it / nq;
                        attend(M, L, it % nq, slots[b], positions[b], qkv + b * QKV, att + b * A + (it % nq) * hd, scores, tmp);
                    }
                }
#pragma omp barrier
                for (int b = 0; b < B; b++) arrange(att + b * A, A, xa + b * A, gs + b * (A / 32));
                split(dim, tid, nt, &a0, &a1);
                q4_matmul_rows(B, &L->o, a0, a1, xa, A, gs, A / 32, xn, dim); /* xn: scratch for the rows */
                for (int b = 0; b < B; b++)
                    for (int64_t r = a0; r < a1; r++) x[b * dim + r] += xn[b * dim + r];
#pragma omp barrier
                /* feed-forward block: rows r of gate and F + r of up go to the same thread */
                for (int b = 0; b < B; b++) {
                    rms_norm(x + b * dim, L->ffn_norm, M->norm_eps, dim, xn + b * dim);
                    arrange(xn + b * dim, dim, xa + b * dim, gs + b * (dim / 32));
                }
                split(F, tid, nt, &a0, &a1);
                q4_matmul_rows(B, &L->gate_up, a0, a1, xa, dim, gs, dim / 32, gu, 2 * F);
                q4_matmul_rows(B, &L->gate_up, F + a0, F + a1, xa, dim, gs, dim / 32, gu, 2 * F);
                for (int b = 0; b < B; b++) silu_mul(gu + b * 2 * F + a0, gu + b * 2 * F + F + a0, hbuf + b * F + a0, a1 - a0);
#pragma omp barrier
                for (int b = 0; b < B; b++) arrange(hbuf + b * F, F, xa + b * F, gs + b * (F / 32));
                split(dim, tid, nt, &a0, &a1);
                q4_matmul_rows(B, &L->down, a0, a1, xa, F, gs, F / 32, xn, dim);
                for (int b = 0; b < B; b++)
                    for (int64_t r = a0; r < a1; r++) x[b * dim + r] += xn[b * dim + r];
#pragma omp barrier
            }
            /* logits of the chosen tokens only (a prompt run as rows needs its last) */
            for (int i = 0; i < n_logits; i++) {
                int64_t b = logit_rows ? logit_rows[i] : i;
                rms_norm(x + b * dim, M->final_norm, M->norm_eps, dim, xn);
                quant16(xn, dim, xi + i * dim, sx + i);
            }
            split(M->vocab, tid, nt, &a0, &a1);
            i8_rows(n_logits, M->head_q, M->head_scale, dim, a0, a1, xi, sx, logits, M->vocab);
        }
        free(xn); free(xa); free(gs); free(scores); free(tmp); free(xi); free(sx);
    }
    free(x); free(qkv); free(att); free(gu); free(hbuf);
    return failed ? -2 : 0;
}

/* y [M, n] bf16 = x [M, k] bf16 @ W.T, for prompts too short for a dense matmul */
int influence_q4_matmul(const q4mat *W, const uint16_t *x, int64_t Mrows, uint16_t *y, int nthreads) {
    const int64_t k = W->k, n = W->n, G = k / 32;
    float *xf = malloc(sizeof(float) * k);
    uint16_t *xa = aligned_alloc(64, align64(sizeof(uint16_t) * Mrows * k));
    float *gs = malloc(sizeof(float) * Mrows * G);
    float *yf = malloc(sizeof(float) * Mrows * n);
    if (!xf || !xa || !gs || !yf) {
        free(xf); free(xa); free(gs); free(yf);
        return -2;
    }
    for (int64_t i = 0; i < Mrows; i++) {
        for (int64_t c = 0; c < k; c++) xf[c] = bf2f(x[i * k + c]);
        arrange(xf, k, xa + i * k, gs + i * G);
    }
#pragma omp parallel num_threads(nthreads)
    {
        int tid, nt;
        thread_id(&tid, &nt);
        int64_t a0, a1;
        split(n, tid, nt, &a0, &a1);
        q4_matmul_rows((int)Mrows, W, a0, a1, xa, k, gs, G, yf, n);
    }
    for (int64_t i = 0; i < Mrows * n; i++) y[i] = f2bf(yf[i]);
    free(xf); free(xa); free(gs); free(yf);
    return 0;
}

/* the dense weight [n, k] in bf16, bf16(q * d + m), for prefill's matmuls */
void influence_q4_dequant(const q4mat *W, uint16_t *out, int nthreads) {
    const int64_t k = W->k, G = k / 32;
#if VEC
    /* inverse of arrange()'s word order: pair layout -> [A 0..15 | B 0..15] */
    static const int16_t inverse[32] = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29,
                                        2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < W->n; r++) {
        const __m512i inv = _mm512_loadu_si512(inverse), low = _mm512_set1_epi16(0x0f);
        const uint8_t *q = W->qs + r * (k / 2);
        uint16_t *o = out + r * k;
        for (int64_t p = 0; p < k / 64; p++) {
            __m512 dv = _mm512_mask_blend_ps(0xCCCC, _mm512_set1_ps(h2f(W->d[r * G + 2 * p])), _mm512_set1_ps(h2f(W->d[r * G + 2 * p + 1])));
            __m512 mv = _mm512_mask_blend_ps(0xCCCC, _mm512_set1_ps(h2f(W->m[r * G + 2 * p])), _mm512_set1_ps(h2f(W->m[r * G + 2 * p + 1])));
            __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(q + p * 32)));
            __m512i halves[2] = {_mm512_and_si512(w, low), _mm512_srli_epi16(w, 4)};
            __m512i res[2];
            for (int h = 0; h < 2; h++) {
                __m512 f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(halves[h]))), dv, mv);
                __m512 f1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(halves[h], 1))), dv, mv);
                res[h] = _mm512_permutexvar_epi16(inv, (__m512i)_mm512_cvtne2ps_pbh(f1, f0));
            }
            uint16_t *oa = o + 2 * p * 32, *ob = oa + 32;
            _mm256_storeu_si256((__m256i *)oa, _mm512_castsi512_si256(res[0]));
            _mm256_storeu_si256((__m256i *)(oa + 16), _mm512_castsi512_si256(res[1]));
            _mm256_storeu_si256((__m256i *)ob, _mm512_extracti64x4_epi64(res[0], 1));
            _mm256_storeu_si256((__m256i *)(ob + 16), _mm512_extracti64x4_epi64(res[1], 1));
        }
    }
#else
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < W->n; r++) {
        const uint8_t *q = W->qs + r * (k / 2);
        uint16_t *o = out + r * k;
        for (int64_t p = 0; p < k / 64; p++) {
            float da = h2f(W->d[r * G + 2 * p]), db = h2f(W->d[r * G + 2 * p + 1]);
            float ma = h2f(W->m[r * G + 2 * p]), mb = h2f(W->m[r * G + 2 * p + 1]);
            for (int w = 0; w < 32; w++) {
                int j = ((w >> 2) << 1) | (w & 1), grp = (w >> 1) & 1;
                uint8_t byte = q[p * 32 + w];
                float d = grp ? db : da, m = grp ? mb : ma;
                uint16_t *og = o + (2 * p + grp) * 32;
                og[j] = f2bf((float)(byte & 15) * d + m);
                og[j + 16] = f2bf((float)(byte >> 4) * d + m);
            }
        }
    }
#endif
}

int influence_vectorized(void) { return VEC; }
