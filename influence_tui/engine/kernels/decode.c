/* The decode step of the Llama-family model on CPU, in one call: all layers and the lm_head.
 *
 * Why C: a decode step in torch is ~300 small ops; each costs a dispatch and a parallel region,
 * and torch's int4 kernel wants its own layout. Here one OpenMP region runs the whole step, its
 * threads splitting the rows of each matmul, with 5 barriers per layer (a prompt's rows: up to 10,
 * as its threads also share the preparation of the activations and the transform of the cache).
 *
 * Numbers: a float32 residual stream and a bf16 KV cache, as the torch path of model.py. Into
 * each int4 matmul the activations go as int8 per group of 32 with a float scale (llama.cpp's
 * Q8_1), so the dot products are integer vpdpbusd (64 products an instruction); into the int8
 * lm_head as int8 with 16 scales a token (see head_rows), vpdpbusd too. Outputs are rounded to
 * bf16. Each row's sum runs in the same order whatever the batch size and thread count, so a
 * sequence decodes to the same tokens alone or batched.
 *
 * Q4 weights (`q4mat`): per group of 32 weights of a row, 32 nibbles and an fp16 scale d and
 * minimum m (w = q * d + m, GGUF Q4_1; Q4_0 is m = -8 d), stored sixteen rows at a time, one row
 * per 32-bit lane: for row block rb and group g, 256 bytes where byte (u, l, j) at u*64 + l*4 + j
 * holds weight 4u + j of row 16 rb + l (low nibble) and weight 16 + 4u + j (high), then d and m
 * as [rb][g][16]. One 64-byte load feeds two vpdpbusd that each take 4 weights of 16 rows times 4
 * activations broadcast; one multiply-add scales the 16 rows by d_g sx_g, one adds m_g S_g, with
 * no horizontal sums. y = sum_g d_g sx_g (q_g . xq_g) + m_g S_g, S_g = sx_g * sum(xq_g).
 */
#include <math.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
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
    const float *q_norm, *k_norm;      /* float32 [head_dim]: Qwen3's per-head norms, or NULL */
} layer_t;

typedef struct {
    int64_t n_layers, dim, n_heads, n_kv, head_dim, ffn, vocab, max_seq, max_batch;
    float norm_eps; /* sqrt(dim * eps): rms = hypot(|x|, norm_eps) / sqrt(dim) */
    const layer_t *layers;
    const int8_t *emb_q;      /* int8 [vocab, dim] */
    const uint16_t *emb_scale; /* bf16 [vocab] */
    const uint8_t *head_lanes; /* the int8 lm_head (the embedding when tied) in lanes, see head_rows */
    const uint16_t *head_scale; /* bf16 [vocab] */
    const float *final_norm;   /* float32 [dim], pre-multiplied */
    const float *rope_cos, *rope_sin; /* float32 [max_seq, head_dim/2] */
    float head_eps; /* the per-head norms' epsilon */
} model_t;

#define MAXB 8 /* tokens per pass over a weight matrix */
#define SPREAD_ROWS 16 /* rows from which the threads share the activations' preparation */
#define GU_ROWS 64 /* gate/up rows a thread computes before their silu (many tokens): a small buffer */

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
/* A spinning barrier for the step's threads. libgomp's own barrier sleeps in the kernel (a futex
 * round trip, tens of microseconds) as soon as the process has more OpenMP threads than CPUs,
 * which it has once two Python threads have run parallel code (torch on the main thread, the
 * engine on its worker): 150 barriers a step made a decode step twice as slow there. This one
 * spins, and yields the CPU only after a long wait (a thread descheduled by the OS). */
typedef struct {
    _Atomic int arrived;
    _Atomic int phase;
} spin_barrier;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void barrier_wait(spin_barrier *b, int nt) {
    if (nt <= 1) return;
    int phase = atomic_load_explicit(&b->phase, memory_order_acquire);
    if (atomic_fetch_add_explicit(&b->arrived, 1, memory_order_acq_rel) == nt - 1) {
        atomic_store_explicit(&b->arrived, 0, memory_order_relaxed);
        atomic_store_explicit(&b->phase, phase + 1, memory_order_release);
        return;
    }
    for (int spins = 0; atomic_load_explicit(&b->phase, memory_order_acquire) == phase;) {
        cpu_relax();
        if (++spins == 1 << 16) {
            sched_yield();
            spins = 0;
        }
    }
}

static inline void split(int64_t n, int tid, int nt, int64_t *a, int64_t *b) {
    *a = n * tid / nt;
    *b = n * (tid + 1) / nt;
}
/* The rows of one phase: each thread first takes its static share of the first 3/4 (contiguous,
 * so that its prefetching runs ahead), then chunks of the rest from a counter shared by the team.
 * With a static split alone the threads reached the barriers far apart (the spin waits were 15%
 * of a step of 8 sequences, 6% with this). Which thread computes a row never changes its numbers. */
typedef struct {
    int64_t n, shared_from, chunk; /* rows [0, shared_from) split statically, the rest in chunks */
    _Atomic int64_t *taken; /* chunks handed out so far, zero before the phase */
    int started;
} rows_share;
/* next_rows then yields [a0, a1) ranges for this thread until it returns 0 */
static inline rows_share share_rows(int64_t n, int64_t chunk, _Atomic int64_t *taken) {
    rows_share r = {n, (n - n / 4) / chunk * chunk, chunk, taken, 0};
    return r;
}
static inline int next_rows(rows_share *w, int tid, int nt, int64_t *a0, int64_t *a1) {
    if (!w->started) { /* whole chunks each (a q4 matrix computes 16 rows at a time) */
        w->started = 1;
        split(w->shared_from / w->chunk, tid, nt, a0, a1);
        *a0 *= w->chunk;
        *a1 *= w->chunk;
        if (*a1 > *a0) return 1;
    }
    int64_t c = w->shared_from + w->chunk * atomic_fetch_add_explicit(w->taken, 1, memory_order_relaxed);
    if (c >= w->n) return 0;
    *a0 = c;
    *a1 = c + w->chunk < w->n ? c + w->chunk : w->n;
    return 1;
}

/* -- activations: int8 per group of 32 (as llama.cpp's Q8_1) ------------------------------------ */
/* Per token, k bytes xq in order and qf(k) floats: sx[G] (x ~ sx_g * xq) and S[G] (sx_g * the sum of
 * the group's xq). */
static inline int64_t qf(int64_t k) { return 2 * (k / 32); }

/* one group: 32 floats -> 32 int8 (round to nearest even), its scale and sum */
static inline void quant_group(const float *x, int8_t *q, float *sx, float *S) {
#if VEC
    __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
    float mx = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    float d = mx / 127.f, inv = mx > 0.f ? 1.f / d : 0.f;
    __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(inv)));
    __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(inv)));
    _mm_storeu_si128((__m128i *)q, _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtsepi32_epi8(qb));
    *sx = d;
    *S = d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
#else
    float mx = 0.f;
    for (int j = 0; j < 32; j++) mx = fmaxf(mx, fabsf(x[j]));
    float d = mx / 127.f, inv = mx > 0.f ? 1.f / d : 0.f;
    int32_t sum = 0;
    for (int j = 0; j < 32; j++) {
        float v = fmaxf(fminf(rintf(x[j] * inv), 127.f), -128.f);
        q[j] = (int8_t)v;
        sum += q[j];
    }
    *sx = d;
    *S = d * (float)sum;
#endif
}


/* -- q4 rows: y[b][r] = bf16(W[r] . x[b] + bias[r]) for rows r0..r1 --------------------------- */
/* Sixteen rows at a time, one per lane (see the layout above): per group, 8 vpdpbusd give the 16
 * rows' integer dots with one token's 32 activations, then one multiply-add and one add of the
 * minimum term. A row's sum runs over its groups in order, the same whatever the batch, so a
 * sequence gets the same bits alone or batched. */
static inline int32_t ld32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}
#if VEC
/* a + b, or their maximum (of floats >= 0 too: their bits order as the numbers do) */
static inline __attribute__((always_inline)) __m512i add_or_max(__m512i a, __m512i b, const int max) {
    return max ? _mm512_max_epi32(a, b) : _mm512_add_epi32(a, b);
}
/* lane j of the result: the sum (or maximum) of the int32 lanes of v[j'] (j' = 4 (j % 4) + j / 4,
 * a transpose) */
static inline __attribute__((always_inline)) __m512i reduce16(const __m512i v[16], const int max) {
    __m512i t[8], u[4];
    for (int i = 0; i < 8; i++)
        t[i] = add_or_max(_mm512_shuffle_i64x2(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_i64x2(v[2 * i], v[2 * i + 1], 0xee), max);
    for (int i = 0; i < 4; i++)
        u[i] = add_or_max(_mm512_shuffle_i64x2(t[2 * i], t[2 * i + 1], 0x88), _mm512_shuffle_i64x2(t[2 * i], t[2 * i + 1], 0xdd), max);
    __m512i w01 = add_or_max(_mm512_unpacklo_epi32(u[0], u[1]), _mm512_unpackhi_epi32(u[0], u[1]), max);
    __m512i w23 = add_or_max(_mm512_unpacklo_epi32(u[2], u[3]), _mm512_unpackhi_epi32(u[2], u[3]), max);
    return add_or_max(_mm512_unpacklo_epi64(w01, w23), _mm512_unpackhi_epi64(w01, w23), max);
}
/* v[j] ends up in lane 4 (j % 4) + j / 4 of reduce16's result */

/* quant_group for 16 groups at once: their maxima and sums come out of one transpose each instead
 * of 32 horizontal reductions, the scales out of one division. The same numbers as quant_group. */
static inline void quant_16_groups(const float *x, int8_t *q, int64_t qstride, float *sx, float *S, int64_t fstride) {
    const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0); /* lane j: v[j]'s */
    __m512i m[16];
    for (int j = 0; j < 16; j++)
        m[j] = _mm512_castps_si512(_mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + 32 * j)), _mm512_abs_ps(_mm512_loadu_ps(x + 32 * j + 16))));
    const __m512 mx = _mm512_castsi512_ps(_mm512_permutexvar_epi32(order, reduce16(m, 1))); /* lane j: group j */
    const __m512 d = _mm512_div_ps(mx, _mm512_set1_ps(127.f));
    const __m512 inv = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(mx, _mm512_setzero_ps(), _CMP_GT_OQ), _mm512_set1_ps(1.f), d);
    float invs[16];
    _mm512_storeu_ps(invs, inv);
    __m512i sums[16];
    for (int j = 0; j < 16; j++) {
        const __m512 iv = _mm512_set1_ps(invs[j]);
        const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 32 * j), iv));
        const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 32 * j + 16), iv));
        _mm_storeu_si128((__m128i *)(q + qstride * j), _mm512_cvtsepi32_epi8(qa));
        _mm_storeu_si128((__m128i *)(q + qstride * j + 16), _mm512_cvtsepi32_epi8(qb));
        sums[j] = _mm512_add_epi32(qa, qb);
    }
    const __m512i sum = _mm512_permutexvar_epi32(order, reduce16(sums, 0));
    float ds[16], ss[16];
    _mm512_storeu_ps(ds, d);
    _mm512_storeu_ps(ss, _mm512_mul_ps(d, _mm512_cvtepi32_ps(sum)));
    for (int j = 0; j < 16; j++) {
        sx[j * fstride] = ds[j];
        S[j * fstride] = ss[j];
    }
}
#endif

/* Activations in tiles of MAXB tokens, group by group, so a pass of the q4 kernel reads its tokens
 * at fixed offsets from one pointer (one pointer per token ran x86's registers out: spills in the
 * inner loop): token b = MAXB p + j, group g: its 32 int8 at xa + (p G + g) 256 + 32 j, its scale
 * sx at fs + (p G + g) 16 + j and S (sx times the sum of the group's int8) at 8 further. */
static inline int64_t tiled(int64_t B) { return (B + MAXB - 1) / MAXB * MAXB; } /* tokens the buffers hold */

/* token b's k activations into the tiles at xa, fs */
static void arrange(const float *x, int64_t k, int64_t b, int8_t *xa, float *fs) {
    const int64_t G = k / 32, p = b / MAXB, j = b % MAXB;
    int8_t *q = xa + p * G * 256 + 32 * j;
    float *f = fs + p * G * 16 + j;
    int64_t g = 0;
#if VEC
    for (; g + 16 <= G; g += 16) quant_16_groups(x + g * 32, q + g * 256, 256, f + g * 16, f + g * 16 + 8, 16);
#endif
    for (; g < G; g++) quant_group(x + g * 32, q + g * 256, f + g * 16, f + g * 16 + 8);
}
#if VEC

/* CALL(n) with n the literal 1..MAXB equal to nb (the kernels inline per batch size) */
#define WITH_CONSTANT_B(nb, CALL)                                                                  \
    do {                                                                                           \
        switch (nb) {                                                                              \
        case 1: CALL(1); break;                                                                    \
        case 2: CALL(2); break;                                                                    \
        case 3: CALL(3); break;                                                                    \
        case 4: CALL(4); break;                                                                    \
        case 5: CALL(5); break;                                                                    \
        case 6: CALL(6); break;                                                                    \
        case 7: CALL(7); break;                                                                    \
        default: CALL(8); break;                                                                   \
        }                                                                                          \
    } while (0)

/* the 16 rows of block rb for B tokens: acc[b] lane l = row 16 rb + l */
static inline __attribute__((always_inline)) void q4_block(
    const int B, const int stream, const q4mat *W, int64_t rb, const int8_t *xa, const float *fs, __m512 acc[MAXB]) {
    const int64_t k = W->k, G = k / 32;
    const __m512i low = _mm512_set1_epi8(0x0f);
    const uint8_t *q = W->qs + rb * 16 * (k / 2);
    const uint16_t *d = W->d + rb * 16 * G, *m = W->m + rb * 16 * G;
#pragma GCC unroll 8
    for (int b = 0; b < B; b++) acc[b] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *qg = q + g * 256;
        /* blocks lie one after another: stream 4 groups ahead (the hardware prefetcher starts late) */
        for (int u = 0; u < 4; u++) _mm_prefetch((const char *)qg + 1024 + u * 64, _MM_HINT_T0);
        _mm_prefetch((const char *)(d + g * 16) + 256, _MM_HINT_T0);
        _mm_prefetch((const char *)(m + g * 16) + 256, _MM_HINT_T0);
        if (stream) { /* and into L2 well ahead, for more reads in flight than the core keeps itself */
            for (int u = 0; u < 4; u++) _mm_prefetch((const char *)qg + 8192 + u * 64, _MM_HINT_T1);
            _mm_prefetch((const char *)(d + g * 16) + 1024, _MM_HINT_T1);
            _mm_prefetch((const char *)(m + g * 16) + 1024, _MM_HINT_T1);
        }
        __m512i w[8];
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) {
            const __m512i v = _mm512_loadu_si512(qg + u * 64);
            w[u] = _mm512_and_si512(v, low);
            w[u + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
        const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d + g * 16)));
        const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(m + g * 16)));
        /* token by token for each weight vector: the tokens' chains of 8 vpdpbusd interleave, so
         * the core always has independent ones to issue (one chain after another: prompts 6% slower) */
        __m512i iv[MAXB];
#pragma GCC unroll 8
        for (int b = 0; b < B; b++) iv[b] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_set1_epi32(ld32(xa + g * 256 + b * 32)));
#pragma GCC unroll 7
        for (int t = 1; t < 8; t++)
#pragma GCC unroll 8
            for (int b = 0; b < B; b++) iv[b] = _mm512_dpbusd_epi32(iv[b], w[t], _mm512_set1_epi32(ld32(xa + g * 256 + b * 32 + 4 * t)));
#pragma GCC unroll 8
        for (int b = 0; b < B; b++) {
            const __m512i i = iv[b];
            acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(dv, _mm512_set1_ps(fs[g * 16 + b])), acc[b]);
            acc[b] = _mm512_fmadd_ps(mv, _mm512_set1_ps(fs[g * 16 + 8 + b]), acc[b]);
        }
    }
}

/* rows r0..r1 (a block cut by r0 or r1 is computed whole, its other rows left alone); add: y +=
 * instead of y = (the residual stream takes the output where it is made, not in a pass of its own) */
static inline __attribute__((always_inline)) void q4_rows_b(
    const int B, const int stream, const q4mat *W, int64_t r0, int64_t r1, const int8_t *xa,
    const float *fs, float *y, int64_t ystride, int add) {
    for (int64_t rb = r0 / 16; rb * 16 < r1; rb++) {
        __m512 acc[MAXB];
        q4_block(B, stream, W, rb, xa, fs, acc);
        const int64_t lo = r0 > rb * 16 ? r0 - rb * 16 : 0, hi = r1 < rb * 16 + 16 ? r1 - rb * 16 : 16;
        const __mmask16 mk = (__mmask16)(((1u << hi) - 1) & ~((1u << lo) - 1));
        const __m512 bias = W->bias ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                          _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(W->bias + rb * 16))), 16))
                                    : _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int b = 0; b < B; b++) { /* + bias, rounded to bf16 as torch does */
            const __m512 sum = _mm512_add_ps(acc[b], bias);
            __m512 out = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(sum)), 16));
            if (add) out = _mm512_add_ps(_mm512_maskz_loadu_ps(mk, y + b * ystride + rb * 16), out);
            _mm512_mask_storeu_ps(y + b * ystride + rb * 16, mk, out);
        }
    }
}
#endif

static void q4_rows(int B, int stream, const q4mat *W, int64_t r0, int64_t r1, const int8_t *xa, const float *fs,
                    float *y, int64_t ystride, int add) {
#if VEC
    /* constant B: the token loop unrolls and its accumulators stay in registers */
#define Q4_ROWS(n) q4_rows_b(n, 1, W, r0, r1, xa, fs, y, ystride, add)
#define Q4_ROWS_HOT(n) q4_rows_b(n, 0, W, r0, r1, xa, fs, y, ystride, add)
    if (stream)
        WITH_CONSTANT_B(B, Q4_ROWS);
    else
        WITH_CONSTANT_B(B, Q4_ROWS_HOT);
#undef Q4_ROWS_HOT
#undef Q4_ROWS
#else
    const int64_t k = W->k, G = k / 32;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t rb = r / 16, l = r % 16;
        for (int b = 0; b < B; b++) {
            const int8_t *x = xa + b * 32; /* group g at x + 256 g */
            float acc = 0.f;
            for (int64_t g = 0; g < G; g++) {
                const uint8_t *qg = W->qs + (rb * G + g) * 256 + l * 4;
                int32_t dot = 0;
                for (int u = 0; u < 4; u++)
                    for (int j = 0; j < 4; j++)
                        dot += (qg[u * 64 + j] & 15) * x[g * 256 + 4 * u + j] + (qg[u * 64 + j] >> 4) * x[g * 256 + 16 + 4 * u + j];
                const int64_t s = (rb * G + g) * 16 + l;
                acc = fmaf((float)dot, h2f(W->d[s]) * fs[g * 16 + b], acc);
                acc = fmaf(h2f(W->m[s]), fs[g * 16 + 8 + b], acc);
            }
            float bias = W->bias ? bf2f(W->bias[r]) : 0.f;
            y[b * ystride + r] = add ? y[b * ystride + r] + rbf(acc + bias) : rbf(acc + bias);
        }
    }
#endif
}

/* all tokens, MAXB at a time; rows r0..r1. Block by block: a block's weights (16 rows) stay in L1
 * while every token passes, instead of the whole matrix streaming from memory once per MAXB
 * tokens (a prompt's rows: 512 tokens read the weights once, not 64 times). */
static void q4_matmul_rows(int B, const q4mat *W, int64_t r0, int64_t r1, const int8_t *xa, const float *fs,
                           float *y, int64_t ystride, int add) {
    const int64_t G = W->k / 32;
    for (int64_t a = r0; a < r1;) {
        const int64_t e = B > MAXB && (a / 16 + 1) * 16 < r1 ? (a / 16 + 1) * 16 : r1;
        for (int b0 = 0; b0 < B; b0 += MAXB) {
            int nb = B - b0 < MAXB ? B - b0 : MAXB;
            q4_rows(nb, B <= MAXB, W, a, e, xa + b0 / MAXB * G * 256, fs + b0 / MAXB * G * 16, y + b0 * ystride, ystride, add);
        }
        a = e;
    }
}

/* -- int8 rows (lm_head): y[b][r] = bf16(bf16(q[r] . x[b]) * scale[r]) ----------------------- */
/* x[b] goes in as int8 with 16 scales, one per "lane class": element c belongs to class
 * (c % 64) / 4. A class has k/16 elements spread over the row (36 for dim 576: as fine a grain as
 * Q8_0's blocks of 32, which llama.cpp feeds its output matrix), so a class's products sum in
 * integers over the whole row and its scale applies once.
 * The weights lie as the q4 layers' do, one row per 32-bit lane, so no horizontal sums are needed
 * ("lanes", `head_lanes`): row block rb (16 rows, the last padded), then class cl, then m = 0..k/64:
 * 64 bytes whose lane l holds row 16 rb + l's elements 64 m + 4 cl .. + 3, as q + 128 (vpdpbusd
 * multiplies unsigned by signed bytes; 128 * the class's sum of x comes off). Per class and token:
 * k/64 vpdpbusd, then one multiply-add by the class's scale, classes in order: the same numbers
 * whatever the batch. (Rows in order, each summed across its lanes, took 3x as many instructions
 * a token in batches: 8 sequences' steps 12% slower.) */
typedef struct {
    int8_t *q;   /* [B, k] */
    float *sx;   /* [B, 16]: x ~ sx[class] * q */
    int32_t *corr; /* [B, 16]: 128 * the class's sum of q */
} head_in;

static inline int64_t lane_class(int64_t c) { return (c % 64) / 4; }

static void quant_lanes(const float *x, int64_t k, int8_t *q, float *sx, int32_t *corr) {
    float mx[16] = {0};
    for (int64_t c = 0; c < k; c++) mx[lane_class(c)] = fmaxf(mx[lane_class(c)], fabsf(x[c]));
    float inv[16];
    for (int l = 0; l < 16; l++) {
        sx[l] = mx[l] / 127.f;
        inv[l] = mx[l] > 0.f ? 1.f / sx[l] : 0.f;
        corr[l] = 0;
    }
#if VEC
    for (int64_t c = 0; c < k; c += 16) { /* 16 floats: classes 4u..4u+3, four lanes each */
        const int u = (int)((c % 64) / 16);
        const __m512 iv = _mm512_set_ps(inv[4 * u + 3], inv[4 * u + 3], inv[4 * u + 3], inv[4 * u + 3],
                                        inv[4 * u + 2], inv[4 * u + 2], inv[4 * u + 2], inv[4 * u + 2],
                                        inv[4 * u + 1], inv[4 * u + 1], inv[4 * u + 1], inv[4 * u + 1],
                                        inv[4 * u], inv[4 * u], inv[4 * u], inv[4 * u]);
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + c), iv));
        _mm_storeu_si128((__m128i *)(q + c), _mm512_cvtsepi32_epi8(v));
    }
    for (int64_t c = 0; c < k; c++) corr[lane_class(c)] += 128 * q[c];
#else
    for (int64_t c = 0; c < k; c++) {
        const float v = fmaxf(fminf(rintf(x[c] * inv[lane_class(c)]), 127.f), -127.f);
        q[c] = (int8_t)v;
        corr[lane_class(c)] += 128 * q[c];
    }
#endif
}

#if VEC
static inline __m512 bf16_round(__m512 v) { /* rbf on 16 lanes */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

/* rows 16 rb .. 16 rb + 15 (those below n_rows) for B tokens */
static inline __attribute__((always_inline)) void head_block(const int B, const uint8_t *H, const uint16_t *scale, int64_t k,
                                                             int64_t rb, int64_t n_rows, head_in x, float *y, int64_t ystride) {
    const int64_t mv = k / 64;
    const uint8_t *blk = H + rb * 16 * k;
    __m512 acc[MAXB];
#pragma GCC unroll 8
    for (int b = 0; b < B; b++) acc[b] = _mm512_setzero_ps();
    for (int cl = 0; cl < 16; cl++) {
        const uint8_t *wv = blk + cl * mv * 64;
        for (int64_t u = 0; u < mv; u++) { /* the next block into L1, one 6 blocks on into L2 */
            _mm_prefetch((const char *)wv + 16 * k + u * 64, _MM_HINT_T0);
            _mm_prefetch((const char *)wv + 6 * 16 * k + u * 64, _MM_HINT_T1);
        }
        __m512i iv[MAXB];
#pragma GCC unroll 8
        for (int b = 0; b < B; b++) iv[b] = _mm512_set1_epi32(-x.corr[b * 16 + cl]);
        for (int64_t m = 0; m < mv; m++) {
            const __m512i w = _mm512_loadu_si512(wv + m * 64);
#pragma GCC unroll 8
            for (int b = 0; b < B; b++) iv[b] = _mm512_dpbusd_epi32(iv[b], w, _mm512_set1_epi32(ld32(x.q + b * k + 64 * m + 4 * cl)));
        }
#pragma GCC unroll 8
        for (int b = 0; b < B; b++) acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iv[b]), _mm512_set1_ps(x.sx[b * 16 + cl]), acc[b]);
    }
    const int64_t n = n_rows - rb * 16 < 16 ? n_rows - rb * 16 : 16;
    const __mmask16 mk = (__mmask16)((1u << n) - 1);
    const __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, scale + rb * 16)), 16));
#pragma GCC unroll 8
    for (int b = 0; b < B; b++)
        _mm512_mask_storeu_ps(y + b * ystride + rb * 16, mk, bf16_round(_mm512_mul_ps(bf16_round(acc[b]), sc)));
}
#endif

/* rows r0..r1 (multiples of 16, or r1 = n_rows) for B tokens, in passes of MAXB */
static __attribute__((noinline)) void head_rows(int B, const uint8_t *H, const uint16_t *scale, int64_t k, int64_t r0,
                                                int64_t r1, int64_t n_rows, head_in x, float *y, int64_t ystride) {
#if VEC
    for (int b0 = 0; b0 < B; b0 += MAXB, x.q += MAXB * k, x.sx += MAXB * 16, x.corr += MAXB * 16, y += MAXB * ystride) {
#define HEAD_ROWS(nb) for (int64_t rb = r0 / 16; rb * 16 < r1; rb++) head_block(nb, H, scale, k, rb, n_rows, x, y, ystride)
        WITH_CONSTANT_B(B - b0 < MAXB ? B - b0 : MAXB, HEAD_ROWS);
#undef HEAD_ROWS
    }
#else
    const int64_t mv = k / 64;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t rb = r / 16, l = r % 16;
        for (int b = 0; b < B; b++) {
            float sum = 0.f;
            for (int cl = 0; cl < 16; cl++) {
                int32_t dot = -x.corr[b * 16 + cl];
                for (int64_t m = 0; m < mv; m++)
                    for (int j = 0; j < 4; j++)
                        dot += H[(((rb * 16 + cl) * mv + m) * 16 + l) * 4 + j] * x.q[b * k + 64 * m + 4 * cl + j];
                sum = fmaf((float)dot, x.sx[b * 16 + cl], sum);
            }
            y[b * ystride + r] = rbf(rbf(sum) * bf2f(scale[r]));
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
    int64_t i = 0;
#if VEC
    /* 8 pairs at a time: x * (c, c) + swapped x * (-s, s) */
    const __m512i dup = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512 flip = _mm512_castsi512_ps(_mm512_set1_epi64((int64_t)0x80000000u)); /* - on even lanes */
    for (; 2 * i + 16 <= hd; i += 8) {
        const __m512 x = _mm512_loadu_ps(in + 2 * i);
        const __m512 c = _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(_mm256_loadu_ps(cs + i)));
        const __m512 sv = _mm512_xor_ps(_mm512_permutexvar_ps(dup, _mm512_castps256_ps512(_mm256_loadu_ps(sn + i))), flip);
        _mm512_storeu_ps(out + 2 * i, _mm512_fmadd_ps(_mm512_permute_ps(x, 0xb1), sv, _mm512_mul_ps(x, c)));
    }
#endif
    for (; i < hd / 2; i++) {
        float a = in[2 * i], b = in[2 * i + 1];
        out[2 * i] = a * cs[i] - b * sn[i];
        out[2 * i + 1] = a * sn[i] + b * cs[i];
    }
}

/* Qwen3: each q and k head of one token's qkv RMS-normed in place before RoPE, rounded to bf16 as
 * the torch path's are (model.py _head_norms) */
static void head_norms(const model_t *M, const layer_t *L, float *qkv) {
    const int64_t hd = M->head_dim;
    for (int64_t h = 0; h < M->n_heads + M->n_kv; h++) {
        float *x = qkv + h * hd;
        const float *w = h < M->n_heads ? L->q_norm : L->k_norm;
        float ss = 0.f;
        for (int64_t i = 0; i < hd; i++) ss = fmaf(x[i], x[i], ss);
        const float r = 1.f / sqrtf(ss / (float)hd + M->head_eps);
        for (int64_t i = 0; i < hd; i++) x[i] = rbf(x[i] * r * w[i]);
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
        int64_t i = 0;
#if VEC
        for (; i + 16 <= hd; i += 16) {
            _mm256_storeu_si256((__m256i *)(K + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(tmp + i)));
            _mm256_storeu_si256((__m256i *)(V + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(v + i)));
        }
#endif
        for (; i < hd; i++) { K[i] = f2bf(tmp[i]); V[i] = f2bf(v[i]); }
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

/* -- attention for head_dim 64, positions along the lanes ----------------------------------------
 * vdpbf16ps multiplies bf16 pairs lane by lane. With the cache as it lies (a position's 64 dims in
 * a row) each score needs a horizontal sum; here K is first transposed, 16 positions a block, to
 * 32 vectors (one per pair of dims) of the positions' (k[2p], k[2p+1]), so one instruction adds a
 * pair of dims to 16 scores; and V is interleaved two positions at a time, 4 vectors of
 * (v_t[d], v_t+1[d]), so one instruction adds two positions to 16 outputs with the weights as a
 * bf16 pair (as torch's flash attention rounds them). Positions past n read as zero.
 * The rows of a prompt share one transform of their slot's cache per layer; a decode step
 * transforms as it goes. The instructions and their order are the same either way, so a prompt
 * run as rows leaves exactly what token-by-token decoding leaves. (A transposed copy of K kept
 * beside the cache, written with it, was measured: no faster for one sequence, 8% slower for 8.) */
/* Per thread: the scores (then their bf16 pairs) of 4 heads, a stride of max_seq rounded up to 32 */
static inline int64_t scores_stride(int64_t S) { return (S + 31) / 32 * 32; }

#if VEC
static inline void transpose16(__m512i r[16]) { /* 16 x 16 dwords: r[i] lane j <- r[j] lane i */
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 16; i += 8)
        for (int c = 0; c < 4; c++) {
            t[i + c] = _mm512_shuffle_i32x4(r[i + c], r[i + 4 + c], 0x88);
            t[i + 4 + c] = _mm512_shuffle_i32x4(r[i + c], r[i + 4 + c], 0xdd);
        }
    for (int c = 0; c < 4; c++) {
        r[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);
        r[4 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0x88);
        r[8 + c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xdd);
        r[12 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0xdd);
    }
}

/* positions t0..t0+15 of K [n, 64] as out[p] lane j = (k[t0+j][2p], k[t0+j][2p+1]) */
static inline void kt_block(const uint16_t *K, int64_t t0, int64_t n, __m512i out[32]) {
    __m512i *lo = out, *hi = out + 16;
    for (int j = 0; j < 16; j++) {
        const int ok = t0 + j < n;
        lo[j] = ok ? _mm512_loadu_si512(K + (t0 + j) * 64) : _mm512_setzero_si512();
        hi[j] = ok ? _mm512_loadu_si512(K + (t0 + j) * 64 + 32) : _mm512_setzero_si512();
    }
    transpose16(lo);
    transpose16(hi);
}

/* positions t, t+1 of V [n, 64] as out[i] lane l = (v[t][16i+l], v[t+1][16i+l]) */
static inline void vp_pair(const uint16_t *V, int64_t t, int64_t n, __m512i out[4]) {
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    const __m512i a0 = _mm512_loadu_si512(V + t * 64), a1 = _mm512_loadu_si512(V + t * 64 + 32);
    const int ok = t + 1 < n;
    const __m512i b0 = ok ? _mm512_loadu_si512(V + (t + 1) * 64) : _mm512_setzero_si512();
    const __m512i b1 = ok ? _mm512_loadu_si512(V + (t + 1) * 64 + 32) : _mm512_setzero_si512();
    out[0] = _mm512_permutex2var_epi16(a0, lo, b0);
    out[1] = _mm512_permutex2var_epi16(a0, hi, b0);
    out[2] = _mm512_permutex2var_epi16(a1, lo, b1);
    out[3] = _mm512_permutex2var_epi16(a1, hi, b1);
}

/* One kv group's cache over positions 0..n-1: as it lies (K, V [S, 64]) and, for a prompt's rows,
 * transformed once (kt: 32 vectors per 16 positions, vp: 4 per 2 positions; NULL: none). */
typedef struct {
    const uint16_t *K, *V;
    const __m512i *kt, *vp;
} kv_view;

static void transform_group(const uint16_t *K, const uint16_t *V, int64_t n, int64_t b0, int64_t b1, __m512i *kt, __m512i *vp) {
    for (int64_t b = b0; b < b1; b++) { /* blocks of 16 positions */
        kt_block(K, b * 16, n, kt + b * 32);
        for (int64_t t = b * 16; t < b * 16 + 16 && t < n; t += 2) vp_pair(V, t, n, vp + t * 2);
    }
}

/* a block's scores from its per-head accumulators: summed, scaled, stored; the running maxima */
static inline __attribute__((always_inline)) void block_scores(const int hpg, __m512 acc[4][4], int64_t b, int64_t n,
                                                                float *scores, int64_t SS, __m512 *mx) {
    const __mmask16 live = n - b * 16 >= 16 ? 0xffff : (__mmask16)((1u << (n - b * 16)) - 1);
    for (int j = 0; j < hpg; j++) {
        __m512 s = _mm512_add_ps(_mm512_add_ps(acc[j][0], acc[j][1]), _mm512_add_ps(acc[j][2], acc[j][3]));
        s = _mm512_mul_ps(s, _mm512_set1_ps(0.125f)); /* 1 / sqrt(64) */
        mx[j] = _mm512_mask_max_ps(mx[j], live, mx[j], s);
        _mm512_storeu_ps(scores + j * SS + b * 16, s);
    }
}

/* hpg query heads of one group (q: bf16 pairs [hpg][32]) over positions 0..n-1 -> out [hpg][64] */
static inline __attribute__((always_inline)) void attend64_h(const int hpg, const uint32_t *q, kv_view c, int64_t n,
                                                              float *scores, int64_t SS, float *out) {
    __m512i tmp[32];
    __m512 mx[4]; /* running maxima of the scores: the softmax needs no pass of its own for them */
    for (int j = 0; j < hpg; j++) mx[j] = _mm512_set1_ps(-INFINITY);
    int64_t b = 0;
    /* Transformed caches (a prompt's rows) go two blocks at a time, each q broadcast feeding both
     * (the same sums, in the same order), where their accumulators fit in registers (up to 3 heads
     * a group). The broadcasts are re-read from memory in each pair of blocks (the empty asm):
     * hoisted out of the loop, 32 a head do not fit in registers and spill as whole vectors. */
    for (; hpg <= 3 && c.kt && (b + 1) * 16 < n; b += 2) { /* scores, 32 positions at a time */
        const __m512i *kt = c.kt + b * 32;
        __asm__ volatile("" ::: "memory");
        __m512 acc[2][4][4];
        for (int h = 0; h < 2; h++)
            for (int j = 0; j < hpg; j++)
                for (int u = 0; u < 4; u++) acc[h][j][u] = _mm512_setzero_ps();
#pragma GCC unroll 32
        for (int p = 0; p < 32; p++) {
            const __m512bh k0 = (__m512bh)_mm512_load_si512(kt + p), k1 = (__m512bh)_mm512_load_si512(kt + 32 + p);
            for (int j = 0; j < hpg; j++) {
                const __m512bh qb = (__m512bh)_mm512_set1_epi32((int)q[j * 32 + p]);
                acc[0][j][p & 3] = _mm512_dpbf16_ps(acc[0][j][p & 3], k0, qb);
                acc[1][j][p & 3] = _mm512_dpbf16_ps(acc[1][j][p & 3], k1, qb);
            }
        }
        block_scores(hpg, acc[0], b, n, scores, SS, mx);
        block_scores(hpg, acc[1], b + 1, n, scores, SS, mx);
    }
    for (; b * 16 < n; b++) { /* scores, 16 positions at a time */
        const __m512i *kt = c.kt ? c.kt + b * 32 : (kt_block(c.K, b * 16, n, tmp), tmp);
        __m512 acc[4][4];
        for (int j = 0; j < hpg; j++)
            for (int u = 0; u < 4; u++) acc[j][u] = _mm512_setzero_ps();
#pragma GCC unroll 32
        for (int p = 0; p < 32; p++) { /* four accumulators a head: the adds do not wait on each other */
            const __m512bh k = (__m512bh)_mm512_load_si512(kt + p);
            for (int j = 0; j < hpg; j++)
                acc[j][p & 3] = _mm512_dpbf16_ps(acc[j][p & 3], k, (__m512bh)_mm512_set1_epi32((int)q[j * 32 + p]));
        }
        block_scores(hpg, acc, b, n, scores, SS, mx);
    }
    const int64_t n32 = (n + 31) / 32 * 32;
    for (int j = 0; j < hpg; j++) { /* softmax, its weights as bf16 pairs in place: (p[2i], p[2i+1]) */
        float *s = scores + j * SS;
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx[j]));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t t = 0; t < n32; t += 16) { /* positions from n on: zero (whatever lies there) */
            const __mmask16 live = n - t >= 16 ? 0xffff : n > t ? (__mmask16)((1u << (n - t)) - 1) : 0;
            const __m512 e = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(_mm512_loadu_ps(s + t), m)));
            _mm512_storeu_ps(s + t, e);
            sum = _mm512_add_ps(sum, e);
        }
        const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
        for (int64_t t = 0; t < n32; t += 32)
            _mm512_storeu_si512(s + t / 2, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_loadu_ps(s + t + 16), inv),
                                                                        _mm512_mul_ps(_mm512_loadu_ps(s + t), inv)));
    }
    __m512 o[4][4];
    for (int j = 0; j < hpg; j++)
        for (int i = 0; i < 4; i++) o[j][i] = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; t += 2) {
        const __m512i *vp = c.vp ? c.vp + t * 2 : (vp_pair(c.V, t, n, tmp), tmp);
        __m512bh v[4];
        for (int i = 0; i < 4; i++) v[i] = (__m512bh)_mm512_load_si512(vp + i);
        for (int j = 0; j < hpg; j++) {
            const __m512bh w = (__m512bh)_mm512_set1_epi32(((const int32_t *)(scores + j * SS))[t / 2]);
            for (int i = 0; i < 4; i++) o[j][i] = _mm512_dpbf16_ps(o[j][i], v[i], w);
        }
    }
    for (int j = 0; j < hpg; j++)
        for (int i = 0; i < 4; i++) _mm512_storeu_ps(out + j * 64 + 16 * i, o[j][i]);
}

static void attend64(int hpg, const uint32_t *q, kv_view c, int64_t n, float *scores, int64_t SS, float *out) {
    switch (hpg) { /* a constant count: the accumulators stay in registers */
    case 1: attend64_h(1, q, c, n, scores, SS, out); break;
    case 2: attend64_h(2, q, c, n, scores, SS, out); break;
    case 3: attend64_h(3, q, c, n, scores, SS, out); break;
    default: attend64_h(4, q, c, n, scores, SS, out); break;
    }
}

/* The transformed caches of the slots that have a prompt's rows in this call (several rows of one
 * slot): per such slot and group, kt then vp, for positions up to the slot's last row. */
typedef struct {
    int64_t *off;   /* [max_batch]: offset in vectors into buf, -1 where the slot transforms as it goes */
    int64_t *n;     /* [max_batch]: positions transformed */
    int64_t units;  /* (slot, group, block of 16) work items */
    __m512i *buf;
} kv_shared;

enum { SHARE_ROWS = 4 }; /* rows of one slot from which a shared transform pays */

static inline int64_t group_vectors(int64_t n) { return (n + 15) / 16 * 32 + (n + 1) / 2 * 4; }

static int kv_shared_init(kv_shared *s, int64_t max_batch, int64_t nkv, int B, const int64_t *slots, const int64_t *positions) {
    s->off = malloc(sizeof(int64_t) * max_batch);
    s->n = calloc(max_batch, sizeof(int64_t));
    s->buf = NULL;
    s->units = 0;
    if (!s->off || !s->n) return -1;
    int64_t *count = calloc(max_batch, sizeof(int64_t));
    if (!count) return -1;
    for (int b = 0; b < B; b++) {
        count[slots[b]]++;
        if (positions[b] + 1 > s->n[slots[b]]) s->n[slots[b]] = positions[b] + 1;
    }
    int64_t total = 0;
    for (int64_t sl = 0; sl < max_batch; sl++) {
        s->off[sl] = count[sl] >= SHARE_ROWS ? total : -1;
        if (s->off[sl] >= 0) {
            total += nkv * group_vectors(s->n[sl]);
            s->units += nkv * ((s->n[sl] + 15) / 16);
        }
    }
    free(count);
    if (total && !(s->buf = aligned_alloc(64, (size_t)total * 64))) return -1;
    return 0;
}

static void kv_shared_free(kv_shared *s) {
    free(s->off);
    free(s->n);
    free(s->buf);
}

/* this thread's share of the transforms of one layer */
static void kv_shared_fill(const kv_shared *s, const model_t *M, const layer_t *L, int tid, int nt) {
    const int64_t nkv = M->n_kv, S = M->max_seq;
    int64_t a0, a1, u = 0;
    split(s->units, tid, nt, &a0, &a1);
    for (int64_t sl = 0; sl < M->max_batch && u < a1; sl++) {
        if (s->off[sl] < 0) continue;
        const int64_t n = s->n[sl], nb = (n + 15) / 16;
        for (int64_t g = 0; g < nkv; g++, u += nb) {
            const int64_t b0 = a0 > u ? a0 - u : 0, b1 = a1 - u < nb ? a1 - u : nb;
            if (b1 <= b0) continue;
            __m512i *kt = s->buf + s->off[sl] + g * group_vectors(n);
            transform_group(L->kv + ((sl * 2 + 0) * nkv + g) * S * 64, L->kv + ((sl * 2 + 1) * nkv + g) * S * 64, n, b0, b1,
                            kt, kt + (n + 15) / 16 * 32);
        }
    }
}

static inline kv_view kv_view_of(const kv_shared *s, const model_t *M, const layer_t *L, int64_t slot, int64_t g) {
    const int64_t nkv = M->n_kv, S = M->max_seq;
    kv_view c = {L->kv + ((slot * 2 + 0) * nkv + g) * S * 64, L->kv + ((slot * 2 + 1) * nkv + g) * S * 64, NULL, NULL};
    if (s && s->off[slot] >= 0) {
        const int64_t n = s->n[slot];
        c.kt = s->buf + s->off[slot] + g * group_vectors(n);
        c.vp = c.kt + (n + 15) / 16 * 32;
    }
    return c;
}

/* decode: the group's query heads roped from this step's qkv; bf16-rounded outputs into out */
static __attribute__((noinline)) void attend_group64(const model_t *M, kv_view c, int64_t g, int64_t pos,
                                                     const float *qkv, float *out, float *scores, float *tmp) {
    const int64_t hd = 64, hpg = M->n_heads / M->n_kv;
    uint32_t q[4 * 32] = {0};
    for (int64_t j = 0; j < hpg; j++) {
        rope(qkv + (g * hpg + j) * hd, tmp, M->rope_cos + pos * (hd / 2), M->rope_sin + pos * (hd / 2), hd);
        _mm512_storeu_si512(q + j * 32, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(tmp + 16), _mm512_loadu_ps(tmp)));
        _mm512_storeu_si512(q + j * 32 + 16, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(tmp + 48), _mm512_loadu_ps(tmp + 32)));
    }
    float *o = out + g * hpg * hd;
    attend64((int)hpg, q, c, pos + 1, scores, scores_stride(M->max_seq), o);
    for (int64_t i = 0; i < hpg * hd; i++) o[i] = rbf(o[i]);
}
#endif

/* Prefill attention for rows start..start+T-1 of one slot whose K/V are in the cache already:
 * q bf16 [T, n_heads, 64] (roped), out bf16 [T, n_heads * 64]. Causal: row t sees 0..start+t.
 * Returns -1 where the shapes do not fit (head_dim 64, up to 4 query heads per kv head). */
int influence_prefill_attention(const model_t *M, int64_t layer, int64_t slot, int64_t start, int64_t T,
                                const uint16_t *q, uint16_t *out, int nthreads) {
#if VEC
    const int64_t hd = M->head_dim, nq = M->n_heads, nkv = M->n_kv, S = M->max_seq, hpg = nq / nkv, SS = scores_stride(S);
    if (hd != 64 || hpg > 4 || nq % nkv || slot < 0 || slot >= M->max_batch || start < 0 || T < 1 || start + T > S ||
        layer < 0 || layer >= M->n_layers)
        return -1;
    const layer_t *L = &M->layers[layer];
    int64_t *slots = malloc(sizeof(int64_t) * T), *positions = malloc(sizeof(int64_t) * T);
    kv_shared sh;
    int failed = !slots || !positions;
    for (int64_t t = 0; !failed && t < T; t++) {
        slots[t] = slot;
        positions[t] = start + t;
    }
    failed = failed || kv_shared_init(&sh, M->max_batch, nkv, (int)T, slots, positions) != 0;
    spin_barrier bar = {0, 0};
#pragma omp parallel num_threads(nthreads)
    if (!failed) {
        int tid, nt;
        thread_id(&tid, &nt);
        kv_shared_fill(&sh, M, L, tid, nt);
        barrier_wait(&bar, nt);
        float *scores = aligned_alloc(64, align64(sizeof(float) * 4 * SS));
        float *o = aligned_alloc(64, align64(sizeof(float) * 4 * hd));
        if (!scores || !o) {
#pragma omp atomic write
            failed = 1;
        }
        /* dynamic: later rows see more positions */
#pragma omp for schedule(dynamic, 4)
        for (int64_t it = 0; it < T * nkv; it++) {
            if (scores && o) {
                int64_t t = it / nkv, g = it % nkv;
                attend64((int)hpg, (const uint32_t *)(q + (t * nq + g * hpg) * hd), kv_view_of(&sh, M, L, slot, g), start + t + 1,
                         scores, SS, o);
                uint16_t *dst = out + (t * nq + g * hpg) * hd;
                for (int64_t i = 0; i < hpg * hd; i += 32)
                    _mm512_storeu_si512(dst + i, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(o + i + 16), _mm512_loadu_ps(o + i)));
            }
        }
        free(scores);
        free(o);
    }
    if (slots && positions) kv_shared_free(&sh);
    free(slots);
    free(positions);
    return failed ? -2 : 0;
#else
    (void)M; (void)layer; (void)slot; (void)start; (void)T; (void)q; (void)out; (void)nthreads;
    return -1;
#endif
}


/* One pass of the decode step over B rows (checked by influence_decode): the logits of rows
 * logit_rows[0..n_logits-1] (n_logits may be 0) into logits [n_logits, vocab]. */
static int decode_pass(const model_t *M, int B, const int64_t *slots, const int64_t *tokens, const int64_t *positions,
                       const int64_t *logit_rows, int n_logits, float *logits, int nthreads) {
    const int64_t dim = M->dim, F = M->ffn, hd = M->head_dim, nq = M->n_heads, nkv = M->n_kv;
    const int64_t QKV = (nq + 2 * nkv) * hd, A = nq * hd;
    float *x = aligned_alloc(64, align64(sizeof(float) * B * dim));
    float *qkv = aligned_alloc(64, align64(sizeof(float) * B * QKV));
    float *att = aligned_alloc(64, align64(sizeof(float) * B * A));
    float *hbuf = aligned_alloc(64, align64(sizeof(float) * B * F));
    if (!x || !qkv || !att || !hbuf) {
        free(x); free(qkv); free(att); free(hbuf);
        return -2;
    }
    for (int b = 0; b < B; b++) { /* embedding rows: bf16(q * scale), as Int8Linear.rows */
        const int8_t *q = M->emb_q + tokens[b] * dim;
        float s = bf2f(M->emb_scale[tokens[b]]);
        for (int64_t i = 0; i < dim; i++) x[b * dim + i] = rbf((float)q[i] * s);
    }
    const int64_t kmax = F > dim ? (F > A ? F : A) : (dim > A ? dim : A);
    const int64_t qmax = qf(F) > qf(dim) ? (qf(F) > qf(A) ? qf(F) : qf(A)) : (qf(dim) > qf(A) ? qf(dim) : qf(A));
    int failed = 0;
    /* many rows (a prompt): each thread normalises and quantises its share of them once, for all
     * threads, with a barrier after; few (decode steps): every thread all of them, no barrier */
    const int spread = B >= SPREAD_ROWS && nthreads > 1;
    const int64_t gu_rows = B <= MAXB ? F : GU_ROWS; /* a decode step streams a thread's rows in one run */
    int8_t *xa_all = spread ? aligned_alloc(64, align64((size_t)tiled(B) * kmax)) : NULL;
    float *gs_all = spread ? aligned_alloc(64, align64(sizeof(float) * tiled(B) * qmax)) : NULL;
    if (spread && (!xa_all || !gs_all)) failed = 1;
#if VEC
    const int grouped = hd == 64 && nq / nkv <= 4 && nq % nkv == 0; /* attend_group64 applies */
    kv_shared sh = {0};
    if (grouped && kv_shared_init(&sh, M->max_batch, nkv, B, slots, positions) != 0) failed = 1;
#endif
    /* the last layer past its K/V: only the logit rows (see Bl below) */
    const int compact = n_logits < B;
    const int64_t nh = n_logits > 0 ? n_logits : 1; /* logit rows' buffers: never of size 0 */
    float *xc = compact ? aligned_alloc(64, align64(sizeof(float) * nh * dim)) : NULL;
    float *qc = compact ? aligned_alloc(64, align64(sizeof(float) * nh * QKV)) : NULL;
    int64_t *cslots = compact ? malloc(sizeof(int64_t) * nh) : NULL;
    int64_t *cpos = compact ? malloc(sizeof(int64_t) * nh) : NULL;
    if (compact && (!xc || !qc || !cslots || !cpos)) failed = 1;
    for (int i = 0; compact && cslots && cpos && i < n_logits; i++) {
        cslots[i] = slots[logit_rows ? logit_rows[i] : i];
        cpos[i] = positions[logit_rows ? logit_rows[i] : i];
    }
    spin_barrier bar = {0, 0};
    enum { PHASES = 5 }; /* row counters per layer: qkv, attention, o, gate_up, down; then the head's */
    _Atomic int64_t *taken = calloc((size_t)(M->n_layers * PHASES + 1), sizeof(_Atomic int64_t));
    if (!taken) failed = 1;
#pragma omp parallel num_threads(nthreads)
    if (!failed) {
        int tid, nt;
        thread_id(&tid, &nt);
        /* per thread: a normed row, gate/up outputs of GU_ROWS rows, attention scratch, the head's
         * inputs; the int8 groups too when each thread makes its own */
        float *xn = aligned_alloc(64, align64(sizeof(float) * dim));
        float *gu = aligned_alloc(64, align64(sizeof(float) * B * 2 * gu_rows));
        int8_t *xa = spread ? xa_all : aligned_alloc(64, align64((size_t)tiled(B) * kmax));
        float *gs = spread ? gs_all : aligned_alloc(64, align64(sizeof(float) * tiled(B) * qmax));
        float *scores = aligned_alloc(64, align64(sizeof(float) * 4 * scores_stride(M->max_seq)));
        float *tmp = aligned_alloc(64, align64(sizeof(float) * 2 * hd));
        head_in hx = {aligned_alloc(64, align64((size_t)nh * dim)), aligned_alloc(64, align64(sizeof(float) * nh * 16)),
                      aligned_alloc(64, align64(sizeof(int32_t) * nh * 16))};
        int ok = xn && gu && xa && gs && scores && tmp && hx.q && hx.sx && hx.corr;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            int64_t a0, a1, p0 = 0, p1 = B; /* rows p0..p1: the ones this thread prepares */
            if (spread) split(B, tid, nt, &p0, &p1);
            /* the rows in play: all of them, but after the last layer's K/V only those whose logits are
             * wanted (gathered into xc, qc: the others' outputs would go nowhere, as llama.cpp skips them) */
            int Bl = B;
            float *X = x, *Q = qkv;
            const int64_t *S = slots, *P = positions;
            rows_share w;
            for (int64_t l = 0; l < M->n_layers; l++) {
                const layer_t *L = &M->layers[l];
                _Atomic int64_t *tk = taken + l * PHASES;
                /* attention block */
                for (int64_t b = p0; b < p1; b++) {
                    rms_norm(x + b * dim, L->attn_norm, M->norm_eps, dim, xn);
                    arrange(xn, dim, b, xa, gs);
                }
                if (spread) barrier_wait(&bar, nt);
                for (w = share_rows(L->qkv.n, 16, tk); next_rows(&w, tid, nt, &a0, &a1);)
                    q4_matmul_rows(B, &L->qkv, a0, a1, xa, gs, qkv, QKV, 0);
                barrier_wait(&bar, nt);
                /* K/V first (rows of one slot may attend to each other: a prompt run as rows), then attention */
                split(B, tid, nt, &a0, &a1);
                for (int64_t b = a0; b < a1; b++) {
                    if (L->q_norm) head_norms(M, L, qkv + b * QKV); /* q too: attention reads it after the barrier */
                    store_kv(M, L, slots[b], positions[b], qkv + b * QKV, tmp);
                }
                barrier_wait(&bar, nt);
#if VEC
                if (grouped && sh.units) { /* a prompt's rows: their slot's cache transformed once */
                    kv_shared_fill(&sh, M, L, tid, nt);
                    barrier_wait(&bar, nt);
                }
#endif
                if (l == M->n_layers - 1 && compact) {
                    if (tid == 0)
                        for (int i = 0; i < n_logits; i++) {
                            const int64_t b = logit_rows ? logit_rows[i] : i;
                            memcpy(xc + i * dim, x + b * dim, sizeof(float) * dim);
                            memcpy(qc + i * QKV, qkv + b * QKV, sizeof(float) * QKV);
                        }
                    barrier_wait(&bar, nt);
                    Bl = n_logits, X = xc, Q = qc, S = cslots, P = cpos;
                    p0 = 0, p1 = Bl;
                    if (spread) split(Bl, tid, nt, &p0, &p1);
                }
#if VEC
                /* sequences of different lengths: the shared chunks even them out */
                if (grouped) {
                    for (w = share_rows((int64_t)Bl * nkv, 1, tk + 1); next_rows(&w, tid, nt, &a0, &a1);)
                        for (int64_t it = a0; it < a1; it++) {
                            int64_t b = it / nkv, g = it % nkv;
                            attend_group64(M, kv_view_of(&sh, M, L, S[b], g), g, P[b], Q + b * QKV, att + b * A, scores, tmp);
                        }
                } else
#endif
                {
                    for (w = share_rows((int64_t)Bl * nq, 1, tk + 1); next_rows(&w, tid, nt, &a0, &a1);)
                        for (int64_t it = a0; it < a1; it++) {
                            int64_t b = it / nq;
                            attend(M, L, it % nq, S[b], P[b], Q + b * QKV, att + b * A + (it % nq) * hd, scores, tmp);
                        }
                }
                barrier_wait(&bar, nt);
                for (int64_t b = p0; b < p1; b++) arrange(att + b * A, A, b, xa, gs);
                if (spread) barrier_wait(&bar, nt);
                for (w = share_rows(dim, 16, tk + 2); next_rows(&w, tid, nt, &a0, &a1);)
                    q4_matmul_rows(Bl, &L->o, a0, a1, xa, gs, X, dim, 1);
                barrier_wait(&bar, nt);
                /* feed-forward block */
                for (int64_t b = p0; b < p1; b++) {
                    rms_norm(X + b * dim, L->ffn_norm, M->norm_eps, dim, xn);
                    arrange(xn, dim, b, xa, gs);
                }
                if (spread) barrier_wait(&bar, nt);
                for (w = share_rows(F, 16, tk + 3); next_rows(&w, tid, nt, &a0, &a1);)
                    for (int64_t c0 = a0; c0 < a1; c0 += gu_rows) {
                        /* gate rows c0..c1 and up rows F + c0..F + c1 into gu [B][2c] (y[b][r] lands at
                         * y + b * stride + r, r a multiple of 16: no masked lane falls before gu) */
                        const int64_t c1 = c0 + gu_rows < a1 ? c0 + gu_rows : a1, c = c1 - c0;
                        q4_matmul_rows(Bl, &L->gate_up, c0, c1, xa, gs, gu - c0, 2 * c, 0);
                        q4_matmul_rows(Bl, &L->gate_up, F + c0, F + c1, xa, gs, gu + c - (F + c0), 2 * c, 0);
                        for (int b = 0; b < Bl; b++) silu_mul(gu + b * 2 * c, gu + b * 2 * c + c, hbuf + b * F + c0, c);
                    }
                barrier_wait(&bar, nt);
                for (int64_t b = p0; b < p1; b++) arrange(hbuf + b * F, F, b, xa, gs);
                if (spread) barrier_wait(&bar, nt);
                for (w = share_rows(dim, 16, tk + 4); next_rows(&w, tid, nt, &a0, &a1);)
                    q4_matmul_rows(Bl, &L->down, a0, a1, xa, gs, X, dim, 1);
                barrier_wait(&bar, nt);
            }
            /* logits of the chosen tokens only (a prompt run as rows needs its last) */
            for (int i = 0; i < n_logits; i++) {
                int64_t b = compact ? i : logit_rows ? logit_rows[i] : i;
                rms_norm(X + b * dim, M->final_norm, M->norm_eps, dim, xn);
                quant_lanes(xn, dim, hx.q + i * dim, hx.sx + i * 16, hx.corr + i * 16);
            }
            for (w = share_rows(n_logits ? M->vocab : 0, 512, taken + M->n_layers * PHASES); next_rows(&w, tid, nt, &a0, &a1);)
                head_rows(n_logits, M->head_lanes, M->head_scale, dim, a0, a1, M->vocab, hx, logits, M->vocab);
        }
        free(xn); free(gu); free(scores); free(tmp); free(hx.q); free(hx.sx); free(hx.corr);
        if (!spread) {
            free(xa);
            free(gs);
        }
    }
    free(x); free(qkv); free(att); free(hbuf); free(taken); free(xa_all); free(gs_all);
    free(xc); free(qc); free(cslots); free(cpos);
#if VEC
    if (grouped) kv_shared_free(&sh);
#endif
    return failed ? -2 : 0;
}

/* Rows per pass through the layers: a long prompt's activations (~16 KB a row, 130 MB for 8,000)
 * are held for one pass at a time; a pass's rows see the K/V that earlier passes left in the cache,
 * so the numbers are those of one call. */
enum { PASS_ROWS = 512 };

/* whether each slot's rows come in ascending positions (then a later pass never holds a position
 * that an earlier pass's rows attend to) */
static int ascending_per_slot(const model_t *M, int B, const int64_t *slots, const int64_t *positions) {
    int64_t *last = malloc(sizeof(int64_t) * M->max_batch);
    if (!last) return 0;
    for (int64_t s = 0; s < M->max_batch; s++) last[s] = -1;
    int ok = 1;
    for (int b = 0; b < B && ok; b++) {
        ok = positions[b] > last[slots[b]];
        last[slots[b]] = positions[b];
    }
    free(last);
    return ok;
}

/* The decode step: B tokens, each with its slot and position -> float32 logits [n_logits, vocab] of
 * the tokens logit_rows[0..n_logits-1] (NULL: every token, n_logits = B). Tokens may share a slot
 * at consecutive positions (prompts run row by row: each row computes exactly what it would as a
 * decode step). */
int influence_decode(const model_t *M, int B, const int64_t *slots, const int64_t *tokens, const int64_t *positions,
                     const int64_t *logit_rows, int n_logits, float *logits, int nthreads) {
    for (int b = 0; b < B; b++)
        if (slots[b] < 0 || slots[b] >= M->max_batch || positions[b] < 0 || positions[b] >= M->max_seq ||
            tokens[b] < 0 || tokens[b] >= M->vocab)
            return -1;
    if (n_logits < 1 || n_logits > B || (!logit_rows && n_logits != B)) return -1;
    for (int i = 0; logit_rows && i < n_logits; i++)
        if (logit_rows[i] < 0 || logit_rows[i] >= B) return -1;
    if (B <= PASS_ROWS || !ascending_per_slot(M, B, slots, positions))
        return decode_pass(M, B, slots, tokens, positions, logit_rows, n_logits, logits, nthreads);
    /* per pass: its logit rows (local indices) and where each one's logits go */
    int64_t *local = malloc(sizeof(int64_t) * n_logits), *dest = malloc(sizeof(int64_t) * n_logits);
    float *scatter = NULL;
    int rc = local && dest ? 0 : -2;
    for (int off = 0; rc == 0 && off < B; off += PASS_ROWS) {
        const int nb = B - off < PASS_ROWS ? B - off : PASS_ROWS;
        int nl = 0, in_order = 1;
        for (int i = 0; i < n_logits; i++) {
            const int64_t r = logit_rows ? logit_rows[i] : i;
            if (r < off || r >= off + nb) continue;
            if (nl && i != dest[nl - 1] + 1) in_order = 0;
            local[nl] = r - off;
            dest[nl++] = i;
        }
        float *out = nl ? logits + dest[0] * M->vocab : NULL;
        if (nl && !in_order) { /* into a buffer, then each row where it belongs */
            float *grown = realloc(scatter, sizeof(float) * nl * M->vocab);
            if (!grown) {
                rc = -2;
                break;
            }
            out = scatter = grown;
        }
        rc = decode_pass(M, nb, slots + off, tokens + off, positions + off, local, nl, out, nthreads);
        for (int j = 0; rc == 0 && out == scatter && j < nl; j++)
            memcpy(logits + dest[j] * M->vocab, scatter + (int64_t)j * M->vocab, sizeof(float) * M->vocab);
    }
    free(local);
    free(dest);
    free(scatter);
    return rc;
}

/* y [M, n] bf16 = x [M, k] bf16 @ W.T, for prompts too short for a dense matmul */
int influence_q4_matmul(const q4mat *W, const uint16_t *x, int64_t Mrows, uint16_t *y, int nthreads) {
    const int64_t k = W->k, n = W->n;
    float *xf = malloc(sizeof(float) * k);
    int8_t *xa = aligned_alloc(64, align64((size_t)tiled(Mrows) * k));
    float *gs = malloc(sizeof(float) * tiled(Mrows) * qf(k));
    float *yf = malloc(sizeof(float) * Mrows * n);
    if (!xf || !xa || !gs || !yf) {
        free(xf); free(xa); free(gs); free(yf);
        return -2;
    }
    for (int64_t i = 0; i < Mrows; i++) {
        for (int64_t c = 0; c < k; c++) xf[c] = bf2f(x[i * k + c]);
        arrange(xf, k, i, xa, gs);
    }
#pragma omp parallel num_threads(nthreads)
    {
        int tid, nt;
        thread_id(&tid, &nt);
        int64_t a0, a1;
        split(n, tid, nt, &a0, &a1);
        q4_matmul_rows((int)Mrows, W, a0, a1, xa, gs, yf, n, 0);
    }
    for (int64_t i = 0; i < Mrows * n; i++) y[i] = f2bf(yf[i]);
    free(xf); free(xa); free(gs); free(yf);
    return 0;
}

/* the dense weight [n, k] in bf16, bf16(q * d + m), for prefill's matmuls */
#if VEC
/* 32 bf16 values of one group from its 16 low and 16 high nibble values (bytes 0..15) */
static inline void dequant_group(__m128i lo, __m128i hi, float d, float m, uint16_t *o) {
    const __m512 dv = _mm512_set1_ps(d), mv = _mm512_set1_ps(m);
    __m512 f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), dv, mv);
    __m512 f1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), dv, mv);
    _mm512_storeu_si512(o, (__m512i)_mm512_cvtne2ps_pbh(f1, f0));
}
#endif

void influence_q4_dequant(const q4mat *W, uint16_t *out, int nthreads) {
    const int64_t k = W->k, G = k / 32;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t rb = 0; rb < W->n / 16; rb++)
        for (int64_t g = 0; g < G; g++) {
            const uint8_t *qg = W->qs + (rb * G + g) * 256;
            const uint16_t *dg = W->d + (rb * G + g) * 16, *mg = W->m + (rb * G + g) * 16;
            for (int l = 0; l < 16; l++) {
                uint16_t *o = out + (rb * 16 + l) * k + g * 32;
#if VEC
                /* row l's 16 bytes: 4 at u*64 + 4l for u = 0..3, weights 0..15 low and 16..31 high */
                int32_t b4[4];
                for (int u = 0; u < 4; u++) memcpy(b4 + u, qg + u * 64 + l * 4, 4);
                const __m128i v = _mm_loadu_si128((const __m128i *)b4), low = _mm_set1_epi8(0x0f);
                dequant_group(_mm_and_si128(v, low), _mm_and_si128(_mm_srli_epi16(v, 4), low), h2f(dg[l]), h2f(mg[l]), o);
#else
                const float d = h2f(dg[l]), m = h2f(mg[l]);
                for (int u = 0; u < 4; u++)
                    for (int j = 0; j < 4; j++) {
                        const uint8_t byte = qg[u * 64 + l * 4 + j];
                        o[4 * u + j] = f2bf(fmaf((float)(byte & 15), d, m));
                        o[16 + 4 * u + j] = f2bf(fmaf((float)(byte >> 4), d, m));
                    }
#endif
            }
        }
}


/* -- sampling one row of logits (the engine's non-greedy picks) ------------------------------- */
/* One call instead of ~25 numpy operations: right after a decode step the caches hold the weights,
 * and each of those cost 20-30 us cold (~0.6 ms a token in all). Penalised logits come as
 * overrides. Temperature, then top-k (ties with the k-th stay), min-p, top-p (the token that
 * crosses it stays), then the token where the kept mass, in order, first exceeds u times its
 * total (top-p: largest first, ties by index; otherwise by index). -1: nothing to draw from (a NaN,
 * every logit -inf): the caller picks greedily. buf: n floats, scratch: 16n bytes. */
typedef struct {
    float p;
    int32_t i;
} cand_t;

static int cand_desc(const void *a, const void *b) {
    const cand_t *x = a, *y = b;
    if (x->p != y->p) return x->p > y->p ? -1 : 1;
    return (x->i > y->i) - (x->i < y->i);
}

/* the entries of e >= f (f > 0) or > 0 (f == 0), largest first, into c; their count and mass */
static int64_t head_of(const float *e, int64_t n, float f, cand_t *c, float *vals, int32_t *ids, double *mass) {
    int64_t m = 0, i = 0;
    double s = 0.0;
#if VEC
    const __m512 thr = _mm512_set1_ps(f);
    __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; i + 16 <= n; i += 16, at = _mm512_add_epi32(at, _mm512_set1_epi32(16))) {
        const __m512 v = _mm512_loadu_ps(e + i);
        const __mmask16 k = f > 0.f ? _mm512_cmp_ps_mask(v, thr, _CMP_GE_OQ) : _mm512_cmp_ps_mask(v, thr, _CMP_GT_OQ);
        if (!k) continue;
        _mm512_mask_compressstoreu_ps(vals + m, k, v);
        _mm512_mask_compressstoreu_epi32(ids + m, k, at);
        m += __builtin_popcount(k);
    }
#endif
    for (; i < n; i++)
        if (f > 0.f ? e[i] >= f : e[i] > 0.f) {
            vals[m] = e[i];
            ids[m++] = (int32_t)i;
        }
    for (int64_t j = 0; j < m; j++) {
        c[j].p = vals[j];
        c[j].i = ids[j];
        s += vals[j];
    }
    qsort(c, (size_t)m, sizeof(cand_t), cand_desc);
    *mass = s;
    return m;
}

/* e[i] = 0 where e[i] < f; the sum of what is left */
static double drop_below(float *e, int64_t n, float f) {
    int64_t i = 0;
    double s = 0.0;
#if VEC
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(e + i);
        const __m512 w = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, _mm512_set1_ps(f), _CMP_GE_OQ), v);
        _mm512_storeu_ps(e + i, w);
        acc = _mm512_add_ps(acc, w);
    }
    s = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) {
        if (e[i] < f) e[i] = 0.f;
        s += e[i];
    }
    return s;
}

int64_t influence_sample(const float *logits, int64_t n, const int64_t *ov_ids, const float *ov_vals, int64_t n_ov,
                         float temperature, int64_t top_k, float top_p, float min_p, double u, float *buf, void *scratch) {
    static const float levels[] = {0x1p-10f, 0x1p-20f, 0x1p-40f, 0.f};
    /* scratch, 16n bytes: n candidates (value, id) for the sort, then their values and ids as the
     * vector compare leaves them */
    cand_t *c = scratch;
    float *vals = (float *)scratch + 2 * n;
    int32_t *ids = (int32_t *)scratch + 3 * n;
    if (n < 1 || !(temperature > 0.f)) return -1;
    memcpy(buf, logits, sizeof(float) * (size_t)n);
    for (int64_t j = 0; j < n_ov; j++)
        if (ov_ids[j] >= 0 && ov_ids[j] < n) buf[ov_ids[j]] = ov_vals[j];
    float mx = -INFINITY;
    int bad = 0;
    int64_t i = 0;
#if VEC
    __m512 vm = _mm512_set1_ps(-INFINITY);
    for (; i + 16 <= n; i += 16) {
        const __m512 x = _mm512_loadu_ps(buf + i);
        bad |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q) != 0;
        vm = _mm512_max_ps(vm, x);
    }
    mx = _mm512_reduce_max_ps(vm);
#endif
    for (; i < n; i++) {
        bad |= buf[i] != buf[i];
        mx = buf[i] > mx ? buf[i] : mx;
    }
    if (bad || !isfinite(mx)) return -1;
    const float inv = 1.f / temperature;
    double total = 0.0;
    i = 0;
#if VEC
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        const __m512 x = _mm512_loadu_ps(buf + i);
        const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
        const __m512 e = _mm512_maskz_mov_ps(live, exp512(_mm512_mul_ps(_mm512_sub_ps(x, _mm512_set1_ps(mx)), _mm512_set1_ps(inv))));
        _mm512_storeu_ps(buf + i, e);
        acc = _mm512_add_ps(acc, e);
    }
    total = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) {
        buf[i] = buf[i] == -INFINITY ? 0.f : expf((buf[i] - mx) * inv);
        total += buf[i];
    }
    /* the best token has e = 1 and every filter keeps it */
    if (top_k > 0 && top_k < n) {
        double mass;
        int64_t m = 0;
        for (int l = 0; l < 4; l++)
            if ((m = head_of(buf, n, levels[l], c, vals, ids, &mass)) >= top_k || levels[l] == 0.f) break;
        if (m >= top_k) total = drop_below(buf, n, c[top_k - 1].p);
    }
    const double mass_k = total; /* top-p is a share of what top-k left, before min-p */
    if (min_p > 0.f) total = drop_below(buf, n, min_p);
    if (top_p > 0.f && top_p < 1.f) {
        const double target = (double)top_p * mass_k;
        double mass = 0.0;
        int64_t m = 0;
        for (int l = 0; l < 4; l++)
            if ((m = head_of(buf, n, levels[l], c, vals, ids, &mass)) > 0 && mass >= target) break;
        double cum = 0.0;
        int64_t kept = 0;
        while (kept < m && cum < target) cum += c[kept++].p;
        double r = u * cum, run = 0.0;
        for (int64_t j = 0; j < kept; j++) {
            run += c[j].p;
            if (run > r) return c[j].i;
        }
        return kept > 0 ? c[kept - 1].i : -1;
    }
    if (!(total > 0.0)) return -1;
    /* by index: whole blocks of 16 first, then the block where the running sum passes r */
    const double r = u * total;
    double run = 0.0;
    int64_t last = -1;
    for (i = 0; i < n; i += 16) {
        const int64_t e = i + 16 < n ? i + 16 : n;
        double block = 0.0;
        for (int64_t j = i; j < e; j++) block += buf[j];
        if (run + block <= r && e < n) {
            run += block;
            continue;
        }
        for (int64_t j = i; j < e; j++) {
            if (buf[j] > 0.f) last = j;
            run += buf[j];
            if (run > r) return j;
        }
    }
    for (i = n - 1; i >= 0 && last < 0; i--)
        if (buf[i] > 0.f) last = i;
    return last;
}

int influence_vectorized(void) { return VEC; }
