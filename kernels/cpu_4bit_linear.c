/* y = x W^T + b for the CPU, reading W from an exact 4-bit form of its float32 values.
 *
 * Not the paper's subject. The default model ships as a Q4_1 file: every run of 32
 * weights along a row was stored as 4-bit codes q and two scales d, m, and loading
 * made each weight the float32 value fl(fl(d * q) + m). Those float32 weights carry
 * 4.5 bits of information in 32. In a decode step every weight is read from memory once
 * for a few dozen rows of x, and the float32 GEMM waits on that stream; here the weights
 * stream as codes and scales (5.3x fewer bytes), and each is rebuilt in the caches, bit
 * for bit, just before it is used. Nothing is approximated: the arithmetic is the float32
 * GEMM on the same float32 weights, in another summation order.
 *
 * Layout of the packed form, for W [N, K] with N and K multiples of 32: panels of 32
 * output rows, and in each panel, blocks of 32 inputs, 768 bytes each:
 *     float d[32], m[32]           the scales of the panel's 32 rows in this block
 *     uint8 codes[32][16]          codes[k][j] = q(row j, k) | q(row j + 16, k) << 4
 * so a block rebuilds as 32 rows of [32 inputs][32 outputs] floats, output-major in
 * vector lanes, the order the GEMM's inner loop reads.
 *
 * Invariant: a weight is only ever rebuilt as fl(fl(d * q) + m), computed without fused
 * multiply-adds (the functions that do it are built with fp-contract=off), and
 * `pack_4bit_f32` accepts a matrix only if that rebuilds every one of its values exactly.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define PANEL 32                  /* output rows per panel: two 16-float vectors */
#define QBLOCK 32                 /* inputs per block of shared scales */
#define BLOCK_BYTES (2 * PANEL * 4 + QBLOCK * PANEL / 2)
#define KCHUNK 192                /* inputs rebuilt at once: 24 KB a panel */
#define MAX_TILE 12               /* rows of x per register tile: 24 accumulators */

#define NO_FMA __attribute__((optimize("fp-contract=off")))

/* x rounded to the nearest float16 value (ties to even), as a float; the scales of a
 * Q4_1 file are float16. Only scaling by powers of two, so every step is exact. */
static float round_to_half(float x) {
    int e;
    frexpf(x, &e);                            /* |x| = f 2^e, f in [0.5, 1) */
    int step = e - 11 < -24 ? -24 : e - 11;   /* float16: 11 significant bits, 2^-24 */
    return ldexpf(rintf(ldexpf(x, -step)), step);
}

/* Codes for w[0..31] (inputs of one row, one block) with scale d and offset m, if
 * fl(fl(d q) + m) rebuilds all of them; returns 1 and fills q, else 0. */
NO_FMA static int codes_for(const float *w, float d, float m, uint8_t *q) {
    for (int i = 0; i < QBLOCK; ++i) {
        float c = d > 0.0f ? rintf((w[i] - m) / d) : 0.0f;
        c = c < 0.0f ? 0.0f : (c > 15.0f ? 15.0f : c);
        const float rebuilt = d * c + m;
        if (memcmp(&rebuilt, &w[i], sizeof rebuilt)) return 0;   /* bits: -0.0 != 0.0 */
        q[i] = (uint8_t)c;
    }
    return 1;
}

/* Find d, m and codes that rebuild one block exactly. m is the block's smallest value
 * (its code is 0); d is tried as the float16 nearest (max - m) / top for the largest
 * code top = 15 .. 12, and its float16 neighbours. */
static int exact_block(const float *w, float *d_out, float *m_out, uint8_t *q) {
    float lo = w[0], hi = w[0];
    for (int i = 0; i < QBLOCK; ++i) {
        if (!isfinite(w[i])) return 0;        /* NaN and infinities have no such form */
        lo = w[i] < lo ? w[i] : lo;
        hi = w[i] > hi ? w[i] : hi;
    }
    for (int top = 15; top >= 12; --top) {
        const float base = (hi - lo) / (float)top, near = round_to_half(base);
        int e;
        frexpf(near, &e);
        const float ulp = ldexpf(1.0f, e - 11 < -24 ? -24 : e - 11);
        const float tries[6] = {near, near - ulp, near + ulp, near - 2 * ulp, near + 2 * ulp, base};
        for (int t = 0; t < 6; ++t) {
            if (tries[t] < 0.0f) continue;
            if (codes_for(w, tries[t], lo, q)) {
                *d_out = tries[t];
                *m_out = lo;
                return 1;
            }
        }
        if (hi == lo) break;
    }
    return 0;
}

/* Pack W [n, k] (row-major float32) into `out` (n / 32 * k / 32 * 768 bytes).
 * Returns 0 on success; 1 if some block has no exact 4-bit form, 2 if n or k is not a
 * multiple of 32 (then `out` holds nothing of use). */
int pack_4bit_f32(const float *w, int64_t n, int64_t k, uint8_t *out) {
    if (n % PANEL || k % QBLOCK || n <= 0 || k <= 0) return 2;
    const int64_t panels = n / PANEL, blocks = k / QBLOCK;
    int failed = 0;
#pragma omp parallel for schedule(static) reduction(| : failed)
    for (int64_t p = 0; p < panels; ++p) {
        if (failed) continue;
        for (int64_t b = 0; b < blocks && !failed; ++b) {
            uint8_t *blk = out + (p * blocks + b) * BLOCK_BYTES;
            float *d = (float *)blk, *m = d + PANEL;
            uint8_t *codes = blk + 2 * PANEL * 4, q[QBLOCK];
            memset(codes, 0, QBLOCK * PANEL / 2);
            for (int j = 0; j < PANEL && !failed; ++j) {
                const float *row = w + (p * PANEL + j) * k + b * QBLOCK;
                if (!exact_block(row, &d[j], &m[j], q)) {
                    failed = 1;
                    break;
                }
                for (int i = 0; i < QBLOCK; ++i)
                    codes[i * 16 + (j & 15)] |= (uint8_t)(q[i] << (j < 16 ? 0 : 4));
            }
        }
    }
    return failed;
}

#if defined(__AVX512F__)
#include <immintrin.h>

int has_fast_4bit_linear(void) { return 1; }

/* Rebuild `kc` inputs (a multiple of 32) of one panel into buf [kc][...], each input's
 * 32 weights `stride` floats after the previous input's (32, or 64 for a pair). */
NO_FMA static void rebuild(float *buf, int64_t stride, const uint8_t *blocks, int64_t kc) {
    const __m512i low4 = _mm512_set1_epi32(15);
    for (int64_t b = 0; b < kc / QBLOCK; ++b) {
        const float *dm = (const float *)(blocks + b * BLOCK_BYTES);
        const uint8_t *codes = blocks + b * BLOCK_BYTES + 2 * PANEL * 4;
        const __m512 d0 = _mm512_loadu_ps(dm), d1 = _mm512_loadu_ps(dm + 16);
        const __m512 m0 = _mm512_loadu_ps(dm + 32), m1 = _mm512_loadu_ps(dm + 48);
        for (int i = 0; i < QBLOCK; ++i) {
            const __m128i bytes = _mm_loadu_si128((const __m128i *)(codes + i * 16));
            const __m512i c = _mm512_cvtepu8_epi32(bytes);
            const __m512 q0 = _mm512_cvtepi32_ps(_mm512_and_si512(c, low4));
            const __m512 q1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(c, 4));
            float *o = buf + (b * QBLOCK + i) * stride;
            _mm512_store_ps(o, _mm512_add_ps(_mm512_mul_ps(d0, q0), m0));
            _mm512_store_ps(o + 16, _mm512_add_ps(_mm512_mul_ps(d1, q1), m1));
        }
    }
}

/* y[r][0 .. 16 nv) (+)= x[r][0..kc) . buf for `rows` rows, kept in registers: nv = 2 (one
 * panel, up to 12 rows) or 4 (two panels side by side, up to 6 rows); 24 accumulators
 * either way. `init` is the starting value of every row (the bias or zeros), or NULL to
 * go on from what y holds. */
static inline __attribute__((always_inline)) void tile(
        float *y, int64_t ldy, const float *x, int64_t ldx, const float *buf, int64_t kc,
        const float *init, const int rows, const int nv) {
    __m512 acc[MAX_TILE][4];
    for (int r = 0; r < rows; ++r)
        for (int j = 0; j < nv; ++j)
            acc[r][j] = _mm512_loadu_ps(init ? init + 16 * j : y + r * ldy + 16 * j);
    for (int64_t i = 0; i < kc; ++i) {
        __m512 w[4];
        for (int j = 0; j < nv; ++j) w[j] = _mm512_load_ps(buf + (i * nv + j) * 16);
#pragma GCC unroll 12
        for (int r = 0; r < rows; ++r) {
            const __m512 a = _mm512_set1_ps(x[r * ldx + i]);
            for (int j = 0; j < nv; ++j) acc[r][j] = _mm512_fmadd_ps(a, w[j], acc[r][j]);
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int j = 0; j < nv; ++j) _mm512_storeu_ps(y + r * ldy + 16 * j, acc[r][j]);
}

#define TILE(n) case n: tile(y, ldy, x, ldx, buf, kc, init, n, 2); break;
#define TILE_PAIR(n) case n: tile(y, ldy, x, ldx, buf, kc, init, n, 4); break;
static void tile_any(float *y, int64_t ldy, const float *x, int64_t ldx, const float *buf,
                     int64_t kc, const float *init, int rows, int pair) {
    if (pair) {       /* one specialised loop per row count: accumulators stay in registers */
        switch (rows) { TILE_PAIR(1) TILE_PAIR(2) TILE_PAIR(3) TILE_PAIR(4) TILE_PAIR(5)
                        TILE_PAIR(6) }
    } else {
        switch (rows) { TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6)
                        TILE(7) TILE(8) TILE(9) TILE(10) TILE(11) TILE(12) }
    }
}

/* y [m, n] = x [m, k] (rows ldx floats apart) W^T + bias (or none), W packed as above.
 * Each thread takes an equal run of panels and goes through it two panels at a time
 * (one alone if the run is odd): it rebuilds them 192 inputs at a time, side by side,
 * and runs every row of x over them, in tiles of at most 6 rows of near-equal size.
 * Two panels at once load 4 weight vectors and 6 values of x per 24 multiply-adds,
 * against 2 and 12 for one panel: 2-4 % faster at 16-200 rows on the Zen 4-class EPYC
 * (2026-12-06), the same floats (each output still sums its inputs in order). */
void linear_4bit_f32(float *y, const float *x, int64_t ldx, const uint8_t *w,
                     const float *bias, int64_t m, int64_t n, int64_t k) {
    static const float zeros[2 * PANEL];
    const int64_t panels = n / PANEL, panel_bytes = (k / QBLOCK) * BLOCK_BYTES;
#pragma omp parallel
    {
        float buf[KCHUNK * 2 * PANEL] __attribute__((aligned(64)));
        const int64_t t = omp_get_thread_num(), threads = omp_get_num_threads();
        const int64_t last = panels * (t + 1) / threads;
        for (int64_t p = panels * t / threads, width; p < last; p += width) {
            width = p + 1 < last ? 2 : 1;
            const int64_t most = width == 2 ? MAX_TILE / 2 : MAX_TILE;
            const int64_t tiles = (m + most - 1) / most;
            const uint8_t *src = w + p * panel_bytes;
            if (p + width < last)   /* the next panels' codes arrive while these run */
                for (int64_t o = 0; o < width * panel_bytes; o += 64)
                    __builtin_prefetch(src + width * panel_bytes + o, 0, 0);
            for (int64_t k0 = 0; k0 < k; k0 += KCHUNK) {
                const int64_t kc = k - k0 < KCHUNK ? k - k0 : KCHUNK;
                for (int64_t j = 0; j < width; ++j)
                    rebuild(buf + j * PANEL, width * PANEL,
                            src + j * panel_bytes + (k0 / QBLOCK) * BLOCK_BYTES, kc);
                const float *init = k0 ? NULL : (bias ? bias + p * PANEL : zeros);
                for (int64_t i = 0, r0 = 0; i < tiles; ++i) {
                    const int64_t left = m - r0, rows = (left + tiles - i - 1) / (tiles - i);
                    tile_any(y + r0 * n + p * PANEL, n, x + r0 * ldx + k0, ldx, buf, kc,
                             init, (int)rows, width == 2);
                    r0 += rows;
                }
            }
        }
    }
}

#else   /* no AVX-512: a plain loop, correct but slow; callers check has_fast_4bit_linear */

int has_fast_4bit_linear(void) { return 0; }

NO_FMA static float weight_at(const uint8_t *w, int64_t k, int64_t row, int64_t i) {
    const uint8_t *blk = w + ((row / PANEL) * (k / QBLOCK) + i / QBLOCK) * BLOCK_BYTES;
    const int j = (int)(row % PANEL);
    const float *d = (const float *)blk, *m = d + PANEL;
    const uint8_t byte = blk[2 * PANEL * 4 + (i % QBLOCK) * 16 + (j & 15)];
    const float q = (float)(j < 16 ? byte & 15 : byte >> 4);
    return d[j] * q + m[j];
}

void linear_4bit_f32(float *y, const float *x, int64_t ldx, const uint8_t *w,
                     const float *bias, int64_t m, int64_t n, int64_t k) {
#pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < n; ++j)
        for (int64_t r = 0; r < m; ++r) {
            float acc = bias ? bias[j] : 0.0f;
            for (int64_t i = 0; i < k; ++i) acc += x[r * ldx + i] * weight_at(w, k, j, i);
            y[r * n + j] = acc;
        }
}
#endif
