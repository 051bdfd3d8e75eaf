/* Fused selective scan for CPU (fp32), forward and backward.
 *
 * Mirrors the semantics of mamba-ssm's selective_scan_fn (state-spaces/mamba,
 * mamba_ssm/ops/selective_scan_interface.py), with one extension used by pruning-aware hidden-state alignment:
 * an optional per-token gap G that adds decay without input,
 *     d_t   = softplus(delta_t + bias)            (or delta_t + bias without softplus)
 *     h_t   = exp((d_t + G_t) * A) * h_{t-1} + d_t * B_t * u_t
 *     y_t   = <C_t, h_t> + D * u_t ;  out_t = y_t * silu(z_t)   (z optional)
 *
 * The gap comes either whole, gap (B, E, L), or factored, G[b, e, t] = gap[b, t] * gscale[b, e] with gap (B, L)
 * (the number of pruned positions before a token) and gscale (B, E) (the Δ estimate of a pruned position), which
 * saves building and transposing a (B, E, L) tensor per scan.
 *
 * Layouts (all contiguous, fp32): u, delta, z, gap, out, du, ddelta, dz, dgap: (B, E, L);
 * A: (E, N); Bt, Ct, dB, dC: (B, L, N) (token-major so the N loop is contiguous and vectorises);
 * D, bias: (E); last: (B, E, N); per-batch partial sums dA: (B, E, N), dD, dbias: (B, E).
 * Optional pointers may be NULL.
 *
 * Channels are processed in blocks of W = 16 lanes: every lane is one channel e, so the state h (N x W) lives in
 * vector registers and the recurrence has no horizontal reductions (vectorising over the N states instead would
 * need one per token). A block's rows of u, delta, z and gap are transposed into small token-major buffers first.
 * Parallel over (b, channel block) in the forward; over b in the backward so that dB/dC (summed over e) need no
 * atomics (they are accumulated per lane and reduced once per b).
 * OpenMP on purpose: the library's DT_NEEDED libgomp.so.1 resolves to the copy PyTorch has already loaded, so the
 * kernel and PyTorch's own ops share one thread pool (a private pthread pool measured 25% slower end to end, its
 * threads competing with PyTorch's spinning workers). Compiled at first use by ssmtrim/ops/_cpu_kernel.py with
 * -O3 -ffast-math so that the loops vectorise (the backward's sigmoid through libm's vector expf); the forward's exp,
 * softplus and SiLU are inlined (exp2_row, softplus_row, gate_row), as AVX-512 intrinsics or as plain C.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAXN 256

static inline float sigmoidf(float x) { return 1.f / (1.f + expf(-x)); }

int ssm_max_state(void) { return MAXN; }

#define W 16

/* The token-major scan (below) takes blocks of WT = WT_LANES x W channels: several vectors per step, so that their
 * chains of multiply-adds (the sum over states) overlap instead of waiting on each other. */
#ifndef WT_LANES
#define WT_LANES 4
#endif
#define WT (WT_LANES * W)

/* exp2_row(t, out): out[k] = 2^t[k] for the W lanes of a block: the decay exp(d A) = 2^(d A log2 e) of the
 * recurrence, with A log2 e formed once per block (A2 below; one product per value, which -ffast-math cannot
 * reassociate differently in different loops). It is most of the scan's work, so it is inlined, in four steps: t
 * clamped to |t| <= 150 (2^-150 underflows to 0 and 2^150 overflows to inf, as the exact values do), t = n + f with
 * n = round(t) and f in [-1/2, 1/2] (both exact, and f = t for small decays, so no bits are lost where d A is near 0),
 * 2^f = 1 + f q(f) with q a degree-4 minimax fit (relative error under 1.7e-7 in fp32 with FMA), and the product by
 * 2^n, rounded once (also where the result is subnormal). With AVX-512 the steps are intrinsics (vrangeps,
 * vreduceps, vscalefps); elsewhere (AVX2, NEON...) they are plain C that the compiler vectorises, 2^n applied as two
 * exact powers of two, the first into p's exponent bits (p 2^n1 stays normal) and one multiply by the second. Both
 * give the same bits for every finite t and for +-inf where the compiler fuses the polynomial's multiply-adds as the
 * intrinsics do, as GCC with -ffast-math does (tests/ops/test_kernel_without_avx512.py). Every path of this
 * file takes the decay through decay_row, SiLU and the gate through gate_row, and softplus through softplus_row. */
#define LOG2E 1.44269504088896341f
#define EXP2_Q4 0.001326472731307149f
#define EXP2_Q3 0.009671512991189957f
#define EXP2_Q2 0.05550733581185341f
#define EXP2_Q1 0.24022242426872253f
#define EXP2_Q0 0.6931470036506653f

/* softplus(x) = max(x, 0) + log1p(e), e = exp(-|x|) in (0, 1]: log1p(e) = 2 atanh(s), s = e / (2 + e) in (0, 1/3]
 * (no cancellation for small e), 2 atanh(s) = 2 s (1 + s^2/3 + ... + s^12/13), truncated below 2e-8 relative */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline __m512 exp2_16(__m512 t) {
    t = _mm512_range_ps(t, _mm512_set1_ps(150.f), 0x2); /* |t| <= 150, sign kept */
    const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); /* t - round(t), exact */
    const __m512 n = _mm512_sub_ps(t, f);                                              /* round(t), exact */
    __m512 q = _mm512_set1_ps(EXP2_Q4);
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(EXP2_Q3));
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(EXP2_Q2));
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(EXP2_Q1));
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(EXP2_Q0));
    return _mm512_scalef_ps(_mm512_fmadd_ps(q, f, _mm512_set1_ps(1.f)), n);
}
static inline void exp2_row(const float *x, float *out) { _mm512_storeu_ps(out, exp2_16(_mm512_loadu_ps(x))); }

static inline void softplus_row(const float *x, float *out) {
    const __m512 v = _mm512_loadu_ps(x);
    const __m512 e = exp2_16(_mm512_mul_ps(_mm512_abs_ps(v), _mm512_set1_ps(-LOG2E)));
    const __m512 s = _mm512_div_ps(e, _mm512_add_ps(e, _mm512_set1_ps(2.f))), s2 = _mm512_mul_ps(s, s);
    __m512 p = _mm512_set1_ps(1.f / 13.f);
    p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.f / 11.f));
    p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.f / 9.f));
    p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.f / 7.f));
    p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.f / 5.f));
    p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.f / 3.f));
    p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.f));
    const __m512 log1p_e = _mm512_mul_ps(_mm512_add_ps(s, s), p);
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_max_ps(v, _mm512_setzero_ps()), log1p_e));
}
#else
static inline float exp2_one(float t) {
    t = t < -150.f ? -150.f : t;
    t = t > 150.f ? 150.f : t;
    const float n = rintf(t), f = t - n;
    float q = EXP2_Q4;
    q = q * f + EXP2_Q3;
    q = q * f + EXP2_Q2;
    q = q * f + EXP2_Q1;
    q = q * f + EXP2_Q0;
    const float p = q * f + 1.f;
    const int32_t ni = (int32_t)n, n1 = ni >> 1, n2 = ni - n1; /* each in [-75, 75] */
    int32_t bits, scale_bits = (n2 + 127) * (1 << 23);
    float r, scale;
    memcpy(&bits, &p, sizeof bits);
    bits += n1 * (1 << 23); /* p 2^n1, exact: p in [0.7, 1.5] stays normal */
    memcpy(&r, &bits, sizeof r);
    memcpy(&scale, &scale_bits, sizeof scale);
    return r * scale; /* one rounding */
}
static inline void exp2_row(const float *x, float *out) {
#pragma omp simd
    for (long k = 0; k < W; k++) out[k] = exp2_one(x[k]);
}
static inline void softplus_row(const float *x, float *out) {
#pragma omp simd
    for (long k = 0; k < W; k++) {
        const float v = x[k], e = exp2_one(fabsf(v) * -LOG2E), s = e / (e + 2.f), s2 = s * s;
        float p = 1.f / 13.f;
        p = p * s2 + 1.f / 11.f;
        p = p * s2 + 1.f / 9.f;
        p = p * s2 + 1.f / 7.f;
        p = p * s2 + 1.f / 5.f;
        p = p * s2 + 1.f / 3.f;
        p = p * s2 + 1.f;
        out[k] = (v > 0.f ? v : 0.f) + (s + s) * p;
    }
}
#endif

/* 1 where this build takes the exp through AVX-512 intrinsics, 0 where through the plain C steps */
int ssm_avx512(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

/* out[k] = exp(dec[k] A[k]) = 2^(dec[k] a2[k]) for the W lanes, a2 = A log2 e */
static inline void decay_row(const float *dec, const float *a2, float *out) {
    float x[W];
#pragma omp simd
    for (long k = 0; k < W; k++) x[k] = dec[k] * a2[k];
    exp2_row(x, out);
}

/* out[k] = x[k] sigmoid(g[k]) = x[k] / (1 + exp(-g[k])) for the W lanes: SiLU (x = g) and the gate y silu(z) (x = y z),
 * exp(-g) = 2^(-g log2 e) by the inlined exp2 (see exp2_row) */
static inline void gate_row(const float *x, const float *g, float *out) {
#if defined(__AVX512F__)
    const __m512 e = exp2_16(_mm512_mul_ps(_mm512_loadu_ps(g), _mm512_set1_ps(-LOG2E)));
    _mm512_storeu_ps(out, _mm512_div_ps(_mm512_loadu_ps(x), _mm512_add_ps(e, _mm512_set1_ps(1.f))));
#else
#pragma omp simd
    for (long k = 0; k < W; k++) out[k] = x[k] / (exp2_one(g[k] * -LOG2E) + 1.f);
#endif
}

/* The factored gap of batch b as (L, lanes) rows: dst[t][k] = gap[b, t] * gscale[b, e0 + k] (0 for k >= nl), the one
 * way every path forms G, so that they give the same bits. */
static void factored_gap(const float *gap, const float *gscale, long b, long En, long e0, long nl, long Ln,
                         long lanes, float *dst) {
    float sc[WT]; /* lanes is W or WT */
    for (long k = 0; k < lanes; k++) sc[k] = k < nl ? gscale[b * En + e0 + k] : 0.f;
    for (long t = 0; t < Ln; t++) {
        const float g = gap[b * Ln + t];
        for (long k = 0; k < lanes; k++) dst[t * lanes + k] = g * sc[k];
    }
}

/* Copy rows e0..e0+nl-1 of a (E, L) slab into a token-major (L, W) buffer; missing lanes get `fill`. */
static void load_block(const float *src, long Ln, long nl, float fill, float *dst) {
    for (long t = 0; t < Ln; t++)
        for (long k = 0; k < W; k++) dst[t * W + k] = k < nl ? src[k * Ln + t] : fill;
}

static void store_block(const float *src, long Ln, long nl, float *dst) {
    for (long k = 0; k < nl; k++)
        for (long t = 0; t < Ln; t++) dst[k * Ln + t] = src[t * W + k];
}

typedef struct {
    float *u, *d, *dec, *z, *tmp; /* (L, W) each: input, delta (after bias/softplus), decay, gate, scratch */
} Block;

static Block block_alloc(long Ln) {
    Block blk;
    float *mem = (float *)malloc(sizeof(float) * Ln * W * 5);
    blk.u = mem;
    blk.d = mem + Ln * W;
    blk.dec = mem + 2 * Ln * W;
    blk.z = mem + 3 * Ln * W;
    blk.tmp = mem + 4 * Ln * W;
    return blk;
}

/* Fill a block: u, d = softplus(delta + bias), dec = d + gap, z; A^T (N, W), D and bias per lane. */
static void block_prepare(Block *blk, const float *u, const float *delta, const float *z, const float *gap,
                          const float *gscale, const float *A, const float *bias, int softplus, long b, long En,
                          long e0, long nl, long Ln, long Nn, float *At) {
    const long be0 = b * En + e0;
    load_block(u + be0 * Ln, Ln, nl, 0.f, blk->u);
    load_block(delta + be0 * Ln, Ln, nl, 0.f, blk->d);
    if (z) load_block(z + be0 * Ln, Ln, nl, 0.f, blk->z);
    if (gap && gscale) {
        factored_gap(gap, gscale, b, En, e0, nl, Ln, W, blk->tmp);
    } else if (gap) {
        load_block(gap + be0 * Ln, Ln, nl, 0.f, blk->tmp);
    }
    for (long t = 0; t < Ln; t++)
        for (long k = 0; k < W; k++) blk->dec[t * W + k] = blk->d[t * W + k] + (bias && k < nl ? bias[e0 + k] : 0.f);
    for (long t = 0; t < Ln; t++) /* d = softplus(pre-activation), held in dec for now */
        if (softplus)
            softplus_row(blk->dec + t * W, blk->d + t * W);
        else
            memcpy(blk->d + t * W, blk->dec + t * W, sizeof(float) * W);
    for (long t = 0; t < Ln; t++)
        for (long k = 0; k < W; k++) {
            const float x = blk->dec[t * W + k], d = blk->d[t * W + k];
            blk->dec[t * W + k] = gap ? d + blk->tmp[t * W + k] : d;
            blk->tmp[t * W + k] = x; /* pre-activation, kept for the backward */
        }
    for (long n = 0; n < Nn; n++)
        for (long k = 0; k < W; k++) At[n * W + k] = k < nl ? A[(e0 + k) * Nn + n] : 0.f;
}

void ssm_scan_fwd(const float *u, const float *delta, const float *A, const float *Bt, const float *Ct,
                  const float *D, const float *z, const float *bias, const float *gap, const float *gscale,
                  int softplus, float *out, float *last, long Bn, long En, long Ln, long Nn, int nthreads) {
    const long nblk = (En + W - 1) / W;
#pragma omp parallel num_threads(nthreads)
    {
        Block blk = block_alloc(Ln);
        float At[MAXN * W], A2[MAXN * W], h[MAXN * W], Dl[W];
#pragma omp for schedule(static)
        for (long bb = 0; bb < Bn * nblk; bb++) {
            const long b = bb / nblk, e0 = (bb % nblk) * W, nl = En - e0 < W ? En - e0 : W;
            const long be0 = b * En + e0;
            block_prepare(&blk, u, delta, z, gap, gscale, A, bias, softplus, b, En, e0, nl, Ln, Nn, At);
            for (long i = 0; i < Nn * W; i++) A2[i] = At[i] * LOG2E;
            for (long k = 0; k < W; k++) Dl[k] = D && k < nl ? D[e0 + k] : 0.f;
            for (long i = 0; i < Nn * W; i++) h[i] = 0.f;
            float *y = blk.tmp; /* the pre-activation is not needed in the forward */
            for (long t = 0; t < Ln; t++) {
                const float *bt = Bt + (b * Ln + t) * Nn, *ct = Ct + (b * Ln + t) * Nn;
                const float *dec = blk.dec + t * W, *dt = blk.d + t * W, *ut = blk.u + t * W;
                float acc[W], du[W];
#pragma omp simd
                for (long k = 0; k < W; k++) {
                    acc[k] = Dl[k] * ut[k];
                    du[k] = dt[k] * ut[k];
                }
                for (long n = 0; n < Nn; n++) {
                    const float bn = bt[n], cn = ct[n];
                    float *hn = h + n * W, en[W];
                    decay_row(dec, A2 + n * W, en);
#pragma omp simd
                    for (long k = 0; k < W; k++) {
                        hn[k] = en[k] * hn[k] + du[k] * bn;
                        acc[k] += hn[k] * cn;
                    }
                }
                float *yt = y + t * W;
                if (z) {
                    const float *zt = blk.z + t * W;
#pragma omp simd
                    for (long k = 0; k < W; k++) acc[k] *= zt[k];
                    gate_row(acc, zt, yt);
                } else {
#pragma omp simd
                    for (long k = 0; k < W; k++) yt[k] = acc[k];
                }
            }
            store_block(y, Ln, nl, out + be0 * Ln);
            if (last)
                for (long k = 0; k < nl; k++)
                    for (long n = 0; n < Nn; n++) last[(be0 + k) * Nn + n] = h[n * W + k];
        }
        free(blk.u);
    }
}

void ssm_scan_bwd(const float *u, const float *delta, const float *A, const float *Bt, const float *Ct,
                  const float *D, const float *z, const float *bias, const float *gap, const float *gscale,
                  int softplus, const float *dout, const float *dlast, float *du, float *ddelta, float *dA, float *dBt,
                  float *dCt, float *dD, float *dz, float *dbias, float *dgap, long Bn, long En, long Ln, long Nn,
                  int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        Block blk = block_alloc(Ln);
        float *hs = (float *)malloc(sizeof(float) * (Ln + 1) * Nn * W); /* h_{t-1} at hs[t], h_t at hs[t + 1] */
        float *ys = (float *)malloc(sizeof(float) * Ln * W);             /* ungated outputs */
        float *go = (float *)malloc(sizeof(float) * Ln * W * 4);         /* dout, then du, ddelta, dz, dgap rows */
        float *dBl = (float *)malloc(sizeof(float) * Ln * Nn * W);       /* per-lane partial dB, dC */
        float *dCl = (float *)malloc(sizeof(float) * Ln * Nn * W);
        float At[MAXN * W], A2[MAXN * W], gh[MAXN * W], dAl[MAXN * W], Dl[W];
        float *g_du = go + Ln * W, *g_dd = go + 2 * Ln * W, *g_x = go + 3 * Ln * W;
#pragma omp for schedule(dynamic, 1)
        for (long b = 0; b < Bn; b++) {
            memset(dBl, 0, sizeof(float) * Ln * Nn * W);
            memset(dCl, 0, sizeof(float) * Ln * Nn * W);
            for (long e0 = 0; e0 < En; e0 += W) {
                const long nl = En - e0 < W ? En - e0 : W, be0 = b * En + e0;
                block_prepare(&blk, u, delta, z, gap, gscale, A, bias, softplus, b, En, e0, nl, Ln, Nn, At);
                for (long i = 0; i < Nn * W; i++) A2[i] = At[i] * LOG2E;
                for (long k = 0; k < W; k++) Dl[k] = D && k < nl ? D[e0 + k] : 0.f;
                /* forward recomputation, keeping every state */
                for (long i = 0; i < Nn * W; i++) hs[i] = 0.f;
                for (long t = 0; t < Ln; t++) {
                    const float *bt = Bt + (b * Ln + t) * Nn, *ct = Ct + (b * Ln + t) * Nn;
                    const float *dec = blk.dec + t * W, *dt = blk.d + t * W, *ut = blk.u + t * W;
                    const float *hp = hs + t * Nn * W;
                    float *hc = hs + (t + 1) * Nn * W;
                    float acc[W], dut[W];
#pragma omp simd
                    for (long k = 0; k < W; k++) {
                        acc[k] = Dl[k] * ut[k];
                        dut[k] = dt[k] * ut[k];
                    }
                    for (long n = 0; n < Nn; n++) {
                        const float bn = bt[n], cn = ct[n];
                        float en[W];
                        decay_row(dec, A2 + n * W, en);
#pragma omp simd
                        for (long k = 0; k < W; k++) {
                            const float hv = en[k] * hp[n * W + k] + dut[k] * bn;
                            hc[n * W + k] = hv;
                            acc[k] += hv * cn;
                        }
                    }
                    for (long k = 0; k < W; k++) ys[t * W + k] = acc[k];
                }
                load_block(dout + be0 * Ln, Ln, nl, 0.f, go);
                for (long i = 0; i < Nn * W; i++) {
                    const long n = i / W, k = i % W;
                    gh[i] = dlast && k < nl ? dlast[(be0 + k) * Nn + n] : 0.f;
                    dAl[i] = 0.f;
                }
                float dDl[W], dbl[W];
                for (long k = 0; k < W; k++) dDl[k] = dbl[k] = 0.f;
                for (long t = Ln - 1; t >= 0; t--) {
                    const float *bt = Bt + (b * Ln + t) * Nn, *ct = Ct + (b * Ln + t) * Nn;
                    const float *dec = blk.dec + t * W, *dt = blk.d + t * W, *ut = blk.u + t * W;
                    const float *hp = hs + t * Nn * W, *hc = hs + (t + 1) * Nn * W;
                    float gy[W], dut[W], ddt[W], ddec[W];
                    for (long k = 0; k < W; k++) {
                        float g = go[t * W + k];
                        if (z) {
                            const float zt = blk.z[t * W + k], sz = sigmoidf(zt);
                            g_x[t * W + k] = g * ys[t * W + k] * sz * (1.f + zt * (1.f - sz)); /* dz */
                            g *= zt * sz;
                        }
                        gy[k] = g;
                        dDl[k] += g * ut[k];
                        dut[k] = g * Dl[k];
                        ddt[k] = 0.f;
                        ddec[k] = 0.f;
                    }
                    float *dbt = dBl + t * Nn * W, *dct = dCl + t * Nn * W;
                    for (long n = 0; n < Nn; n++) {
                        const float bn = bt[n], cn = ct[n];
                        float en[W];
                        decay_row(dec, A2 + n * W, en);
#pragma omp simd
                        for (long k = 0; k < W; k++) {
                            const long i = n * W + k;
                            const float g = gh[i] + gy[k] * cn; /* dL/dh_t */
                            dct[i] += gy[k] * hc[i];
                            const float ea = en[k];
                            const float gea = g * hp[i] * ea;
                            ddec[k] += gea * At[i];
                            dAl[i] += gea * dec[k];
                            ddt[k] += g * ut[k] * bn;
                            dut[k] += g * dt[k] * bn;
                            dbt[i] += g * dt[k] * ut[k];
                            gh[i] = g * ea;
                        }
                    }
                    for (long k = 0; k < W; k++) {
                        const float tot = ddt[k] + ddec[k];
                        const float draw = softplus ? tot * sigmoidf(blk.tmp[t * W + k]) : tot;
                        g_dd[t * W + k] = draw;
                        dbl[k] += draw;
                        g_du[t * W + k] = dut[k];
                        go[t * W + k] = ddec[k]; /* dgap; dout[t] is no longer needed */
                    }
                }
                store_block(g_du, Ln, nl, du + be0 * Ln);
                store_block(g_dd, Ln, nl, ddelta + be0 * Ln);
                if (z) store_block(g_x, Ln, nl, dz + be0 * Ln);
                if (dgap) store_block(go, Ln, nl, dgap + be0 * Ln);
                for (long k = 0; k < nl; k++) {
                    for (long n = 0; n < Nn; n++) dA[(be0 + k) * Nn + n] = dAl[n * W + k];
                    dD[be0 + k] = dDl[k];
                    dbias[be0 + k] = dbl[k];
                }
            }
            float *dBb = dBt + b * Ln * Nn, *dCb = dCt + b * Ln * Nn;
            for (long i = 0; i < Ln * Nn; i++) {
                float sb = 0.f, sc = 0.f;
                for (long k = 0; k < W; k++) {
                    sb += dBl[i * W + k];
                    sc += dCl[i * W + k];
                }
                dBb[i] = sb;
                dCb[i] = sc;
            }
        }
        free(blk.u);
        free(hs);
        free(ys);
        free(go);
        free(dBl);
        free(dCl);
    }
}

/* Causal depth-wise conv1d (kernel width Kw, left padding Kw - 1) with optional SiLU, for inference, over tokens at
 * increasing original positions pos (B, L) (NULL: contiguous 0..L-1); a position that is not present reads as
 * zero, which is the dense conv over the original grid evaluated at the present tokens:
 *     out[b, e, l] = bias[e] + sum_{j < Kw} w[e, Kw - 1 - j] * x[b, e, position pos[l] - j]
 * x is read through its strides (so the token-major slice of in_proj's output needs no copy); out is (B, E, L)
 * contiguous, the layout the scan reads. Parallel over (b, chunk of channels). */
#define CONV_CHUNK 64
/* the hardware's vector width in floats (a wider GCC vector type would be split through the stack) */
#if defined(__AVX512F__)
#define VLEN 16
#elif defined(__AVX__)
#define VLEN 8
#else
#define VLEN 4
#endif
typedef float vecV __attribute__((vector_size(VLEN * sizeof(float))));
#define MAXK 64 /* widest conv kernel the token-major conv and the conv's backward take */
void ssm_conv_silu(const float *x, long sxb, long sxe, long sxl, const long *pos, const float *w, const float *bias,
                   int silu, float *out, long Bn, long En, long Ln, long Kw, int nthreads) {
    const long nchunk = (En + CONV_CHUNK - 1) / CONV_CHUNK;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long bc = 0; bc < Bn * nchunk; bc++) {
        const long b = bc / nchunk, e0 = (bc % nchunk) * CONV_CHUNK;
        const long ne = En - e0 < CONV_CHUNK ? En - e0 : CONV_CHUNK;
        const long *pb = pos ? pos + b * Ln : NULL;
        float acc[CONV_CHUNK];
        for (long l = 0; l < Ln; l++) {
            for (long e = 0; e < CONV_CHUNK; e++) acc[e] = bias && e < ne ? bias[e0 + e] : 0.f;
            for (long m = 0; m < Kw && m <= l; m++) {
                const long d = pb ? pb[l] - pb[l - m] : m; /* distance in original positions, >= m */
                if (d >= Kw) break;
                const float *xs = x + b * sxb + (l - m) * sxl + e0 * sxe;
                const float *wt = w + e0 * Kw + (Kw - 1 - d);
                if (sxe == 1) {
#pragma omp simd
                    for (long e = 0; e < ne; e++) acc[e] += wt[e * Kw] * xs[e];
                } else {
                    for (long e = 0; e < ne; e++) acc[e] += wt[e * Kw] * xs[e * sxe];
                }
            }
            float *o = out + (b * En + e0) * Ln + l;
            if (silu) /* whole vectors (lanes past ne are zeros, unused) */
                for (long e = 0; e < ne; e += W) gate_row(acc + e, acc + e, acc + e);
            for (long e = 0; e < ne; e++) o[e * Ln] = acc[e];
        }
    }
}

/* The gradient of ssm_conv_silu, for training: from dout (B, E, L) contiguous, dx (B, E, L) contiguous (zeroed by the
 * caller; each value receives the taps that read it), dw (E, Kw) and db (E) (NULL without a bias) written whole, for
 * the same x (here contiguous), pos, w, bias and silu. Row by row ((b, e), along L): the pre-activation is recomputed
 * (a few multiply-adds per value), then g = dout silu'(pre), then the taps' sums; without positions every step is a
 * loop over L that vectorises, with them the taps are found per token as in the forward. Sums over L in fp32, over
 * the batch in double. Parallel over chunks of channels, the batch inside (so that a thread walks adjacent rows): a
 * thread owns its channels' dx, dw and db, so nothing is shared.
 * Kw <= MAXK. */
void ssm_conv_silu_bwd(const float *x, const long *pos, const float *w, const float *bias, int silu,
                       const float *dout, float *dx, float *dw, float *db, long Bn, long En, long Ln, long Kw,
                       int nthreads) {
    const long Lp = (Ln + W - 1) / W * W; /* row buffers in whole vectors */
    const long nchunk = (En + CONV_CHUNK - 1) / CONV_CHUNK;
#pragma omp parallel num_threads(nthreads)
    {
        float *pre = (float *)calloc(3 * Lp, sizeof(float)), *sg = pre + Lp, *g = sg + Lp, one[W];
        double *dwc = (double *)malloc(sizeof(double) * CONV_CHUNK * (Kw + 1)), *dbc = dwc + CONV_CHUNK * Kw;
        for (long k = 0; k < W; k++) one[k] = 1.f;
#pragma omp for schedule(static)
        for (long c = 0; c < nchunk; c++) { /* a chunk of channels, the batch inside: rows (b, e0..e1) are adjacent */
            const long e0 = c * CONV_CHUNK, e1 = e0 + CONV_CHUNK < En ? e0 + CONV_CHUNK : En;
            memset(dwc, 0, sizeof(double) * CONV_CHUNK * (Kw + 1));
            for (long b = 0; b < Bn; b++) {
                const long *pb = pos ? pos + b * Ln : NULL;
                for (long e = e0; e < e1; e++) {
                    const float *we = w + e * Kw, *xr = x + (b * En + e) * Ln, *gr = dout + (b * En + e) * Ln;
                    float *dxr = dx + (b * En + e) * Ln;
                    double *dwe = dwc + (e - e0) * Kw;
                    const float b0 = bias ? bias[e] : 0.f;
                    for (long l = 0; l < Ln; l++) pre[l] = b0;
                    if (!pb) {
                        for (long m = 0; m < Kw && m < Ln; m++) {
                            const float wm = we[Kw - 1 - m];
#pragma omp simd
                            for (long l = m; l < Ln; l++) pre[l] += wm * xr[l - m];
                        }
                    } else {
                        for (long l = 0; l < Ln; l++)
                            for (long m = 0; m < Kw && m <= l; m++) {
                                const long d = pb[l] - pb[l - m];
                                if (d >= Kw) break;
                                pre[l] += we[Kw - 1 - d] * xr[l - m];
                            }
                    }
                    if (silu) { /* d silu(p) / dp = s (1 + p (1 - s)), s = sigmoid(p) */
                        for (long l = 0; l < Lp; l += W) gate_row(one, pre + l, sg + l);
#pragma omp simd
                        for (long l = 0; l < Ln; l++) g[l] = gr[l] * (sg[l] * (1.f + pre[l] * (1.f - sg[l])));
                    } else {
                        memcpy(g, gr, sizeof(float) * Ln);
                    }
                    float gsum = 0.f;
#pragma omp simd reduction(+ : gsum)
                    for (long l = 0; l < Ln; l++) gsum += g[l];
                    dbc[e - e0] += gsum;
                    if (!pb) {
                        for (long m = 0; m < Kw && m < Ln; m++) {
                            const float wm = we[Kw - 1 - m];
                            float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                            for (long l = m; l < Ln; l++) {
                                acc += g[l] * xr[l - m];
                                dxr[l - m] += wm * g[l];
                            }
                            dwe[Kw - 1 - m] += acc;
                        }
                    } else {
                        for (long l = 0; l < Ln; l++)
                            for (long m = 0; m < Kw && m <= l; m++) {
                                const long d = pb[l] - pb[l - m];
                                if (d >= Kw) break;
                                dxr[l - m] += we[Kw - 1 - d] * g[l];
                                dwe[Kw - 1 - d] += (double)g[l] * xr[l - m];
                            }
                    }
                }
            }
            for (long e = e0; e < e1; e++) {
                for (long k = 0; k < Kw; k++) dw[e * Kw + k] = (float)dwc[(e - e0) * Kw + k];
                if (db) db[e] = (float)dbc[e - e0];
            }
        }
        free(dwc);
        free(pre);
    }
}

/* ---------------------------------------------------------------------------------------------------------------
 * Token-major inference kernels, for a bidirectional mixer that keeps its activations as (B, L, E) rows: no
 * transposes, no flips, no contiguous copies around the kernels. Each reads its inputs through (batch, token)
 * strides (channels contiguous) and walks the sequence in "scan order": t = 0..L-1 reads original token t, or
 * L-1-t with rev. The arithmetic per value is the one of ssm_conv_silu and ssm_scan_fwd above, operation for
 * operation, so both layouts give the same bits. */

/* ssm_conv_silu over x rows (B, L, E) with strides (sxb, sxl), E a multiple of W, read in scan order; out (B, L, E)
 * contiguous in scan order. pos (B, L), in scan order, as for ssm_conv_silu. The weights w (E, Kw), as the conv
 * stores them, are laid out here as wT (Kw, E), so that a tap's weights are contiguous like the channels they
 * multiply. */
void ssm_conv_silu_tok(const float *x, long sxb, long sxl, const long *pos, const float *w, const float *bias,
                       int silu, int rev, float *out, long Bn, long En, long Ln, long Kw, int nthreads) {
    float *wT = (float *)malloc(sizeof(float) * Kw * En);
    for (long e = 0; e < En; e++)
        for (long m = 0; m < Kw; m++) wT[m * En + e] = w[e * Kw + m];
    /* token by token, each row whole, so that the rows stream through the cache in order; the taps a token reads
     * are listed first, so that each lane sums them in a register */
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long bl = 0; bl < Bn * Ln; bl++) {
        const long b = bl / Ln, l = bl % Ln;
        const long *pb = pos ? pos + b * Ln : NULL;
        const float *xs[MAXK], *wt[MAXK];
        long taps = 0;
        for (long m = 0; m < Kw && m <= l && m < MAXK; m++) {
            const long d = pb ? pb[l] - pb[l - m] : m;
            if (d >= Kw) break;
            xs[taps] = x + b * sxb + (rev ? Ln - 1 - (l - m) : l - m) * sxl;
            wt[taps++] = wT + (Kw - 1 - d) * En;
        }
        float *o = out + (b * Ln + l) * En;
        for (long e0 = 0; e0 < En; e0 += W) { /* En is a multiple of W: whole vectors, as in ssm_conv_silu */
            float res[W];
            for (long v0 = 0; v0 < W; v0 += VLEN) { /* one hardware vector register across the taps */
                vecV acc = {0}, xv, wv;
                if (bias) memcpy(&acc, bias + e0 + v0, sizeof acc);
                for (long j = 0; j < taps; j++) {
                    memcpy(&xv, xs[j] + e0 + v0, sizeof xv);
                    memcpy(&wv, wt[j] + e0 + v0, sizeof wv);
                    acc += wv * xv;
                }
                memcpy(res + v0, &acc, sizeof acc);
            }
            if (silu)
                gate_row(res, res, o + e0);
            else
                memcpy(o + e0, res, sizeof res);
        }
    }
    free(wT);
}

/* Rows e0..e0+nl-1 of token-major data (batch b) in scan order into a (L, WT) buffer. */
static void load_rows(const float *src, long sb, long sl, long b, long e0, long Ln, long nl, int rev, float *dst) {
    for (long t = 0; t < Ln; t++) {
        const float *row = src + b * sb + (rev ? Ln - 1 - t : t) * sl + e0;
        if (nl == WT)
            memcpy(dst + t * WT, row, sizeof(float) * WT);
        else
            for (long k = 0; k < WT; k++) dst[t * WT + k] = k < nl ? row[k] : 0.f;
    }
}

/* One direction of ssm_scan_fwd (no last state) over a block of WT channels of batch b, on token-major inputs
 * p = (u, delta, A, B, C, D, bias, gap, gscale), u, delta (B, L, E) and B, C (B, L, N) in scan order through the
 * strides st = (u: batch, token), (delta), (B), (C); the gap only in factored form, gap (B, L) contiguous in scan
 * order and gscale (B, E), or both NULL. The gate zb (L, WT) is in original order, read at scan step t's original
 * token (L-1-t with rev). The ungated-then-gated outputs go to y (L, WT) in scan order. */
/* What a Vim mixer's direction may hand the token-major scan in a leaner form (ssm_mixer_scan_tok), or NULL: */
typedef struct {
    const float *dtw; /* (E, R): delta = dt_low dtw^T, dt_low (B, L, R) read through delta's strides; NULL: delta */
    long R;
    int a_log;    /* p[2] holds log(-A) (the parameter A_log): A = -exp(p[2]) */
    int gap_mode; /* the scale of the factored gap: 0 gscale (p[8]), 1 the mean over the tokens of d (softplus(delta +
                   * bias), the present tokens' step), 2 softplus(bias) */
} TokExtra;

/* delta rows of a channel block from a low-rank product: dst[t][k] = sum_r dtl[b, t, r] dtw[e0 + k, r] (0 for
 * k >= nl), the sum over r in increasing order */
static void lowrank_rows(const float *dtl, long sb, long sl, long b, const float *dtw, long R, long e0, long nl,
                         long Ln, float *dst) {
    float *wt = (float *)malloc(sizeof(float) * R * WT); /* (R, WT) */
    for (long r = 0; r < R; r++)
        for (long k = 0; k < WT; k++) wt[r * WT + k] = k < nl ? dtw[(e0 + k) * R + r] : 0.f;
    for (long t = 0; t < Ln; t++) {
        const float *row = dtl + b * sb + t * sl;
        float *d = dst + t * WT;
#pragma omp simd
        for (long k = 0; k < WT; k++) d[k] = row[0] * wt[k];
        for (long r = 1; r < R; r++) {
            const float v = row[r];
#pragma omp simd
            for (long k = 0; k < WT; k++) d[k] += v * wt[r * WT + k];
        }
    }
    free(wt);
}

static void scan_dir_tok(Block *blk, const float *const *p, const long *st, int softplus, int rev, const float *zb,
                         long b, long e0, long nl, long En, long Ln, long Nn, const TokExtra *ex, float *y) {
    const float *A = p[2], *Bm = p[3], *Cm = p[4], *D = p[5], *bias = p[6], *gap = p[7], *gscale = p[8];
    const int gap_mode = ex ? ex->gap_mode : 0;
    float At[MAXN * WT], h[MAXN * WT], Dl[WT]; /* At: A log2 e (see decay_row) */
    load_rows(p[0], st[0], st[1], b, e0, Ln, nl, 0, blk->u);
    if (ex && ex->dtw)
        lowrank_rows(p[1], st[2], st[3], b, ex->dtw, ex->R, e0, nl, Ln, blk->d);
    else
        load_rows(p[1], st[2], st[3], b, e0, Ln, nl, 0, blk->d);
    if (gap && gap_mode == 0) factored_gap(gap, gscale, b, En, e0, nl, Ln, WT, blk->tmp); /* then d + G */
    for (long t = 0; t < Ln; t++)
        for (long k = 0; k < WT; k++) blk->d[t * WT + k] += bias && k < nl ? bias[e0 + k] : 0.f;
    if (softplus)
        for (long i = 0; i < Ln * WT; i += W) softplus_row(blk->d + i, blk->d + i);
    if (gap && gap_mode != 0) { /* the scale from this block's steps, or from the bias, then G as factored_gap */
        float sc[WT];
        if (gap_mode == 1) {
            for (long k = 0; k < WT; k++) sc[k] = 0.f;
            for (long t = 0; t < Ln; t++)
                for (long k = 0; k < WT; k++) sc[k] += blk->d[t * WT + k];
            for (long k = 0; k < WT; k++) sc[k] = k < nl ? sc[k] / (float)Ln : 0.f;
        } else {
            float bv[WT];
            for (long k = 0; k < WT; k++) bv[k] = bias && k < nl ? bias[e0 + k] : 0.f;
            for (long k = 0; k < WT; k += W) softplus_row(bv + k, sc + k);
            for (long k = nl; k < WT; k++) sc[k] = 0.f;
        }
        for (long t = 0; t < Ln; t++) {
            const float g = gap[b * Ln + t];
            for (long k = 0; k < WT; k++) blk->tmp[t * WT + k] = g * sc[k];
        }
    }
    if (gap)
        for (long t = 0; t < Ln; t++)
            for (long k = 0; k < WT; k++) blk->dec[t * WT + k] = blk->d[t * WT + k] + blk->tmp[t * WT + k];
    for (long n = 0; n < Nn; n++)
        for (long k = 0; k < WT; k++) At[n * WT + k] = (k < nl ? A[(e0 + k) * Nn + n] : 0.f) * LOG2E;
    if (ex && ex->a_log) /* A = -exp(A_log) = -2^(A_log log2 e), by the scan's own vector exp2 */
        for (long i = 0; i < Nn * WT; i += W) {
            exp2_row(At + i, At + i);
            for (long k = 0; k < W; k++) At[i + k] = (i % WT) + k < nl ? -At[i + k] * LOG2E : 0.f;
        }
    for (long k = 0; k < WT; k++) Dl[k] = D && k < nl ? D[e0 + k] : 0.f;
    for (long i = 0; i < Nn * WT; i++) h[i] = 0.f;
    for (long t = 0; t < Ln; t++) {
        const float *bt = Bm + b * st[4] + t * st[5], *ct = Cm + b * st[6] + t * st[7];
        const float *dt = blk->d + t * WT, *ut = blk->u + t * WT, *dec = gap ? blk->dec + t * WT : dt;
        float acc[WT], du[WT];
#pragma omp simd
        for (long k = 0; k < WT; k++) {
            acc[k] = Dl[k] * ut[k];
            du[k] = dt[k] * ut[k];
        }
        for (long n = 0; n < Nn; n++) {
            const float bn = bt[n], cn = ct[n];
            float *hn = h + n * WT;
            float en[WT];
            for (long k = 0; k < WT; k += W) decay_row(dec + k, At + n * WT + k, en + k);
#pragma omp simd
            for (long k = 0; k < WT; k++) {
                hn[k] = en[k] * hn[k] + du[k] * bn;
                acc[k] += hn[k] * cn;
            }
        }
        float *yt = y + t * WT;
        if (zb) {
            const float *zt = zb + (rev ? Ln - 1 - t : t) * WT;
#pragma omp simd
            for (long k = 0; k < WT; k++) acc[k] *= zt[k];
            for (long k = 0; k < WT; k += W) gate_row(acc + k, zt + k, yt + k);
        } else {
#pragma omp simd
            for (long k = 0; k < WT; k++) yt[k] = acc[k];
        }
    }
}

/* Both directions of a bidirectional mixer in one call: p[0..8] the forward direction's inputs, p[9..17] the
 * backward one's (in its scan order, i.e. reversed), strides st[0..7] and st[8..15] (see scan_dir_tok); z (B, L, E)
 * through (szb, szl); out (B, L, E) contiguous, original order: (y_forward + y_backward) / 2, written once. */
static void scan_bi_tok(const float *const *p, const long *st, const TokExtra *ex, const float *z, long szb, long szl,
                        int softplus, float *out, long Bn, long En, long Ln, long Nn, int nthreads) {
    const long nblk = (En + WT - 1) / WT;
#pragma omp parallel num_threads(nthreads)
    {
        Block blk = block_alloc(WT / W * Ln); /* (L, WT) buffers */
        float *yf = (float *)malloc(sizeof(float) * Ln * WT * 2), *yb = yf + Ln * WT;
#pragma omp for schedule(static)
        for (long bb = 0; bb < Bn * nblk; bb++) {
            const long b = bb / nblk, e0 = (bb % nblk) * WT, nl = En - e0 < WT ? En - e0 : WT;
            if (z) load_rows(z, szb, szl, b, e0, Ln, nl, 0, blk.z);
            scan_dir_tok(&blk, p, st, softplus, 0, z ? blk.z : NULL, b, e0, nl, En, Ln, Nn, ex, yf);
            scan_dir_tok(&blk, p + 9, st + 8, softplus, 1, z ? blk.z : NULL, b, e0, nl, En, Ln, Nn, ex ? ex + 1 : NULL,
                         yb);
            for (long t = 0; t < Ln; t++) {
                float *row = out + (b * Ln + t) * En + e0;
                const float *yft = yf + t * WT, *ybt = yb + (Ln - 1 - t) * WT;
                for (long k = 0; k < nl; k++) row[k] = (yft[k] + ybt[k]) / 2.f;
            }
        }
        free(blk.u);
        free(yf);
    }
}

void ssm_scan_bi_tok(const float *const *p, const long *st, const float *z, long szb, long szl, int softplus,
                     float *out, long Bn, long En, long Ln, long Nn, int nthreads) {
    scan_bi_tok(p, st, NULL, z, szb, szl, softplus, out, Bn, En, Ln, Nn, nthreads);
}

/* A Vim mixer's two directions after its in_proj, in two calls (ssmtrim/ops/backends/cpu.py::_mixer_tokens, with
 * the x_proj products between them): ssm_conv_pair_tok, both directions' conv + SiLU of x (B, L, E) into out (2, B,
 * L, E) (direction 1 in its scan order, reversed); then ssm_mixer_scan_tok, ssm_scan_bi_tok with softplus, each
 * direction's delta the low-rank product of its dt rows with dtw (E, R) (dtws[0], dtws[1]), A given as A_log and
 * the gap's scale (when a gap is given) by gap_mode (see TokExtra). */
void ssm_conv_pair_tok(const float *x, long sxb, long sxl, const long *pos, const long *pos_b, const float *w,
                       const float *w_b, const float *bias, const float *bias_b, float *out, long Bn, long En, long Ln,
                       long Kw, int nthreads) {
    ssm_conv_silu_tok(x, sxb, sxl, pos, w, bias, 1, 0, out, Bn, En, Ln, Kw, nthreads);
    ssm_conv_silu_tok(x, sxb, sxl, pos_b, w_b, bias_b, 1, 1, out + Bn * Ln * En, Bn, En, Ln, Kw, nthreads);
}

void ssm_mixer_scan_tok(const float *const *p, const long *st, const float *const *dtws, long R, int gap_mode,
                        const float *z, long szb, long szl, float *out, long Bn, long En, long Ln, long Nn,
                        int nthreads) {
    TokExtra ex[2] = {{dtws[0], R, 1, gap_mode}, {dtws[1], R, 1, gap_mode}};
    scan_bi_tok(p, st, ex, z, szb, szl, 1, out, Bn, En, Ln, Nn, nthreads);
}

/* ---------------------------------------------------------------------------------------------------------------
 * A merge step on token-major rows (inference): which tokens leave and where they go, then the staying tokens with
 * the leaving ones averaged in, for ssmtrim/pruning/strategies/merge.py (whose PyTorch code is the reference and
 * says what each value means). One image at a time; parallel over the batch. */

typedef struct {
    uint32_t key; /* the float key mapped to an unsigned integer of the same order (see order_key) */
    long at;
} Ranked;

/* An unsigned integer that orders as the float does, -0 with +0 and every NaN last, as torch.sort orders them;
 * integers, since -ffast-math lets the compiler assume that no float is a NaN or an infinity. */
static uint32_t order_key(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return 0xffffffffu; /* NaN */
    if (u == 0x80000000u) u = 0; /* -0 */
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* Ascending by key, ties by position: torch.sort(stable=True)'s order. */
static int ranked_cmp(const void *pa, const void *pb) {
    const Ranked *a = (const Ranked *)pa, *b = (const Ranked *)pb;
    if (a->key != b->key) return a->key < b->key ? -1 : 1;
    return a->at < b->at ? -1 : (a->at > b->at);
}

/* ranked (n), whose entries come in increasing position, into ranked_cmp's order: a stable radix sort of the keys
 * (four passes of 8 bits, through tmp (n)), several times faster than qsort's comparisons at a few hundred tokens;
 * qsort below 64 entries. */
static void sort_ranked(Ranked *ranked, Ranked *tmp, long n) {
    if (n < 64) {
        qsort(ranked, n, sizeof(Ranked), ranked_cmp);
        return;
    }
    long count[256];
    Ranked *from = ranked, *to = tmp;
    for (int shift = 0; shift < 32; shift += 8) { /* an even number of passes: the result ends in ranked */
        memset(count, 0, sizeof count);
        for (long i = 0; i < n; i++) count[(from[i].key >> shift) & 255u]++;
        for (long d = 0, sum = 0; d < 256; d++) {
            const long c = count[d];
            count[d] = sum;
            sum += c;
        }
        for (long i = 0; i < n; i++) to[count[(from[i].key >> shift) & 255u]++] = from[i];
        Ranked *t = from;
        from = to;
        to = t;
    }
}

#define SIMV 4 /* vectors of similarities summed at once */

/* max(||x||, 1e-12), as F.normalize divides by */
static float row_norm(const float *x, long Fn) {
    float ss = 0.f;
    for (long f = 0; f < Fn; f++) ss += x[f] * x[f];
    const float norm = sqrtf(ss);
    return norm > 1e-12f ? norm : 1e-12f;
}

static void unit_row(const float *x, long Fn, float *out) {
    const float norm = row_norm(x, Fn);
    for (long f = 0; f < Fn; f++) out[f] = x[f] / norm;
}

/* keys (B, L): the ranking (protected tokens +inf, so they stay); prot (B, L) bytes; feat (B, L, F) through strides
 * (sfb, sfl), or NULL when no token is merged. The R lowest keys leave: src_all (B, R) in ranking order; the others
 * stay: index (B, L-R) in increasing order; the removed tokens after the first ndrop are merged, each into the
 * staying unprotected token of highest cosine similarity of feat (the first on a tie; the first staying token when
 * there is none): dst (B, R-ndrop), current indices. With adjacent set, each goes instead to the more similar of the
 * nearest staying unprotected tokens before and after it (the earlier on a tie; the one there is, if one). */
void ssm_merge_choose(const float *keys, const unsigned char *prot, const float *feat, long sfb, long sfl, long Bn,
                      long Ln, long Fn, long R, long ndrop, long *src_all, long *index, long *dst, int adjacent,
                      int nthreads) {
    const long K = Ln - R, M = R - ndrop;
#pragma omp parallel num_threads(nthreads)
    {
        Ranked *order = (Ranked *)malloc(sizeof(Ranked) * 2 * Ln), *spare = order + Ln;
        long *shut = (long *)malloc(sizeof(long) * Ln); /* the protected staying tokens' slots */
        unsigned char *gone = (unsigned char *)malloc(Ln);
        /* the staying tokens' unit features feature-major (F, K), so that one token's similarities to all of them
         * are K-wide multiply-adds with no horizontal sums; then that token's unit features and similarities */
        const long Kp = (K + SIMV * VLEN - 1) / (SIMV * VLEN) * (SIMV * VLEN); /* K padded with zero columns */
        /* with adjacent, a merged token is compared with two staying tokens only: their unit features are made
         * when needed (the same products as the feature-major table's), and the table is not built */
        const long table = adjacent ? 2 * Fn : Fn * Kp;
        float *unit = feat && M > 0 ? (float *)calloc(table + Fn + 2 * Kp, sizeof(float)) : NULL;
#pragma omp for schedule(static)
        for (long b = 0; b < Bn; b++) {
            for (long l = 0; l < Ln; l++) {
                order[l].key = order_key(keys[b * Ln + l]);
                order[l].at = l;
                gone[l] = 0;
            }
            sort_ranked(order, spare, Ln);
            for (long r = 0; r < R; r++) {
                src_all[b * R + r] = order[r].at;
                gone[order[r].at] = 1;
            }
            for (long l = 0, k = 0; l < Ln; l++)
                if (!gone[l]) index[b * K + k++] = l;
            if (M <= 0) continue;
            if (!feat) {
                for (long m = 0; m < M; m++) dst[b * M + m] = src_all[b * R + ndrop + m];
                continue;
            }
            float *us = unit + table, *sim = us + Fn, *row = sim + Kp;
            long nshut = 0;
            for (long k = 0; k < K; k++)
                if (prot[b * Ln + index[b * K + k]]) shut[nshut++] = k;
            for (long k = 0; k < K; k++) row[k] = 1.f / row_norm(feat + b * sfb + index[b * K + k] * sfl, Fn);
            if (!adjacent)
                for (long f = 0; f < Fn; f++) /* written in order, read across the rows */
                    for (long k = 0; k < K; k++)
                        unit[f * Kp + k] = feat[b * sfb + index[b * K + k] * sfl + f] * row[k];
            for (long m = 0; m < M; m++) {
                const long s = src_all[b * R + ndrop + m];
                unit_row(feat + b * sfb + s * sfl, Fn, us);
                if (adjacent) {
                    long lo = 0, hi = K; /* the first staying token after s: index is increasing */
                    while (lo < hi) {
                        const long mid = (lo + hi) / 2;
                        if (index[b * K + mid] < s) lo = mid + 1;
                        else hi = mid;
                    }
                    long prev = lo - 1, next = lo;
                    while (prev >= 0 && prot[b * Ln + index[b * K + prev]]) prev--;
                    while (next < K && prot[b * Ln + index[b * K + next]]) next++;
                    long pick = prev >= 0 ? prev : (next < K ? next : 0);
                    if (prev >= 0 && next < K) {
                        float *up = unit, *un = unit + Fn, sp = 0.f, sn = 0.f;
                        const float *xp = feat + b * sfb + index[b * K + prev] * sfl;
                        const float *xn = feat + b * sfb + index[b * K + next] * sfl;
                        for (long f = 0; f < Fn; f++) {
                            up[f] = xp[f] * row[prev];
                            un[f] = xn[f] * row[next];
                        }
                        for (long f = 0; f < Fn; f++) {
                            sp += us[f] * up[f];
                            sn += us[f] * un[f];
                        }
                        if (sn > sp) pick = next;
                    }
                    dst[b * M + m] = index[b * K + pick];
                    continue;
                }
                for (long k0 = 0; k0 < Kp; k0 += SIMV * VLEN) { /* SIMV vectors of sums in registers */
                    vecV acc[SIMV] = {{0}};
                    for (long f = 0; f < Fn; f++) {
                        const vecV uf = (vecV){0} + us[f];
                        const float *uk = unit + f * Kp + k0;
                        for (int v = 0; v < SIMV; v++) {
                            vecV x;
                            memcpy(&x, uk + v * VLEN, sizeof x);
                            acc[v] += uf * x;
                        }
                    }
                    memcpy(sim + k0, acc, sizeof acc);
                }
                for (long j = 0; j < nshut; j++) sim[shut[j]] = -FLT_MAX; /* below any cosine: never chosen */
                float top = sim[0];
                for (long k = 1; k < K; k++) top = fmaxf(top, sim[k]); /* a vectorised reduction */
                long best = 0; /* the first that highest (the first slot where every one is protected) */
                while (best + 1 < K && sim[best] != top) best++;
                dst[b * M + m] = index[b * K + best];
            }
        }
        free(order);
        free(shut);
        free(gone);
        free(unit);
    }
}

/* The staying tokens index (B, K) of each stream (B, L, D_i) through strides (batch, token; unit stride within a
 * row), with the tokens src (B, M) averaged into dst (B, M) size-weighted: out[k] = (x[index k] s[index k] + sum of
 * x[src] s[src] over the src whose dst is index k, in src order) / (the same sum of sizes), and that sum is new_sizes
 * (B, K); with M = 0 the rows are copied and the sizes taken. slot_of (B, L): each current token's slot among the
 * staying ones (-1: leaves). outs (B, K, D_i) contiguous. */
void ssm_merge_keep(long Bn, long Ln, long K, long M, const long *index, const long *src, const long *dst,
                    const float *sizes, int nstreams, const float *const *streams, const long *rows, const long *strides,
                    float *const *outs, float *new_sizes, long *slot_of, int rescale, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long b = 0; b < Bn; b++) {
        long *slot = slot_of + b * Ln;
        float *total = new_sizes + b * K;
        /* rescale: a staying row that others were merged into takes the size-weighted mean of their norms */
        float *norm_sum = (rescale && M > 0) ? (float *)malloc(sizeof(float) * (size_t)K) : NULL;
        for (long l = 0; l < Ln; l++) slot[l] = -1;
        for (long k = 0; k < K; k++) {
            slot[index[b * K + k]] = k;
            total[k] = sizes[b * Ln + index[b * K + k]];
        }
        for (long m = 0; m < M; m++) total[slot[dst[b * M + m]]] += sizes[b * Ln + src[b * M + m]];
        for (int i = 0; i < nstreams; i++) {
            const long D = rows[i];
            const float *x = streams[i] + b * strides[2 * i];
            const long sl = strides[2 * i + 1];
            float *o = outs[i] + b * K * D;
            for (long k = 0; k < K; k++) {
                const float *xr = x + index[b * K + k] * sl;
                float *orow = o + k * D;
                if (M == 0) {
                    memcpy(orow, xr, sizeof(float) * D);
                    continue;
                }
                const float w = sizes[b * Ln + index[b * K + k]];
                for (long d = 0; d < D; d++) orow[d] = xr[d] * w;
                if (norm_sum) norm_sum[k] = -1.0f; /* nothing merged in yet */
            }
            if (M == 0) continue;
            for (long m = 0; m < M; m++) {
                const long s = src[b * M + m];
                const float w = sizes[b * Ln + s];
                const float *xr = x + s * sl;
                const long k = slot[dst[b * M + m]];
                float *orow = o + k * D;
                for (long d = 0; d < D; d++) orow[d] += xr[d] * w;
                if (norm_sum) {
                    if (norm_sum[k] < 0.0f) { /* the staying row's own norm, weighted, first */
                        const float *kr = x + index[b * K + k] * sl;
                        double sq = 0.0;
                        for (long d = 0; d < D; d++) sq += (double)kr[d] * kr[d];
                        norm_sum[k] = (float)sqrt(sq) * sizes[b * Ln + index[b * K + k]];
                    }
                    double sq = 0.0;
                    for (long d = 0; d < D; d++) sq += (double)xr[d] * xr[d];
                    norm_sum[k] += (float)sqrt(sq) * w;
                }
            }
            for (long k = 0; k < K; k++) {
                float *orow = o + k * D;
                const float t = total[k];
                for (long d = 0; d < D; d++) orow[d] /= t;
                if (norm_sum && norm_sum[k] >= 0.0f) {
                    double sq = 0.0;
                    for (long d = 0; d < D; d++) sq += (double)orow[d] * orow[d];
                    const float now = (float)sqrt(sq);
                    const float scale = (norm_sum[k] / t) / (now > 1e-12f ? now : 1e-12f);
                    for (long d = 0; d < D; d++) orow[d] *= scale;
                }
            }
        }
        free(norm_sum);
    }
}

/* A whole merge step in one call: the choice (ssm_merge_choose) on keys made here from scores (B, L): a protected
 * token (prot_idx (B, P), current indices; NULL: none) ranks above all (+inf), a token within `around` original
 * positions (positions (B, L)) of a protected one above every other (FLT_MAX; around 0: none), the rest by score;
 * then the staying rows (ssm_merge_keep, sizes NULL: every token of size 1), their original positions into
 * new_positions (B, K) and the protected tokens' new indices into new_prot (B, P). */
void ssm_merge_step(const float *scores, const long *positions, const long *prot_idx, long Pn, long around,
                    const float *feat, long sfb, long sfl, long Fn, const float *sizes, long Bn, long Ln, long R,
                    long ndrop, int adjacent, int nstreams, const float *const *streams, const long *rows,
                    const long *strides, float *const *outs, int rescale, long *src_all, long *index, long *dst,
                    float *new_sizes, long *slot_of, long *new_positions, long *new_prot, int nthreads) {
    const long K = Ln - R, M = R - ndrop;
    float *keys = (float *)malloc(sizeof(float) * (size_t)(Bn * Ln) * (sizes ? 1 : 2));
    float *ones = sizes ? NULL : keys + Bn * Ln;
    unsigned char *prot = (unsigned char *)calloc((size_t)(Bn * Ln), 1);
    const uint32_t inf_bits = 0x7f800000u; /* +inf, written as bits: -ffast-math assumes no float is infinite */
    for (long b = 0; b < Bn; b++) {
        const long *pos = positions + b * Ln;
        float *key = keys + b * Ln;
        memcpy(key, scores + b * Ln, sizeof(float) * (size_t)Ln);
        if (ones)
            for (long l = 0; l < Ln; l++) ones[b * Ln + l] = 1.f;
        if (!prot_idx) continue;
        for (long p = 0; p < Pn; p++) prot[b * Ln + prot_idx[b * Pn + p]] = 1;
        if (around > 0)
            for (long l = 0; l < Ln; l++)
                for (long p = 0; p < Pn; p++) {
                    const long d = pos[l] - pos[prot_idx[b * Pn + p]];
                    if (d <= around && -d <= around) {
                        key[l] = FLT_MAX;
                        break;
                    }
                }
        for (long p = 0; p < Pn; p++) memcpy(key + prot_idx[b * Pn + p], &inf_bits, sizeof inf_bits);
    }
    ssm_merge_choose(keys, prot, M > 0 ? feat : NULL, sfb, sfl, Bn, Ln, Fn, R, ndrop, src_all, index, dst, adjacent,
                     nthreads);
    long *src = M > 0 ? (long *)malloc(sizeof(long) * (size_t)(Bn * M)) : NULL; /* the merged ones: src_all's tail */
    for (long b = 0; b < Bn && src; b++) memcpy(src + b * M, src_all + b * R + ndrop, sizeof(long) * (size_t)M);
    ssm_merge_keep(Bn, Ln, K, M > 0 ? M : 0, index, src, dst, sizes ? sizes : ones, nstreams, streams, rows, strides,
                   outs, new_sizes, slot_of, rescale, nthreads);
    free(src);
    for (long b = 0; b < Bn; b++) {
        for (long k = 0; k < K; k++) new_positions[b * K + k] = positions[b * Ln + index[b * K + k]];
        if (prot_idx)
            for (long p = 0; p < Pn; p++) new_prot[b * Pn + p] = slot_of[b * Ln + prot_idx[b * Pn + p]];
    }
    free(keys);
    free(prot);
}

/* ---- groups of positions (unmerge's blocks: ssmtrim/models/tokens.py's Unmerge is the reference) ---- */

/* x (B, L, D) through strides (sxb, sxl; unit stride within a row), owner (B, L) in [0, K), sizes (B, K) -> out
 * (B, K, D) contiguous: each group's rows summed in row order, then divided by its size (as index_add_ then a
 * division). */
void ssm_group_mean(const float *x, long sxb, long sxl, long Bn, long Ln, long K, long D, const long *owner,
                    const float *sizes, float *out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long b = 0; b < Bn; b++) {
        float *o = out + b * K * D;
        memset(o, 0, sizeof(float) * (size_t)(K * D));
        for (long l = 0; l < Ln; l++) {
            const float *xr = x + b * sxb + l * sxl;
            float *orow = o + owner[b * Ln + l] * D;
            for (long d = 0; d < D; d++) orow[d] += xr[d];
        }
        for (long k = 0; k < K; k++) {
            const float s = sizes[b * K + k];
            float *orow = o + k * D;
            for (long d = 0; d < D; d++) orow[d] /= s;
        }
    }
}

/* out (B L D) = x + scale * u[owner]: the residual add of an update on the tokens (u, B K D), un-merged to every
 * position (owner, B L in [0, K)); scale (D) or NULL. One pass in place of a gather, a multiply and an add. */
void ssm_group_add(const float *x, long sxb, long sxl, const float *u, long sub, long suk, const long *owner,
                   const float *scale, float *out, long Bn, long Ln, long D, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long b = 0; b < Bn; b++) {
        for (long l = 0; l < Ln; l++) {
            const float *xr = x + b * sxb + l * sxl;
            const float *ur = u + b * sub + owner[b * Ln + l] * suk;
            float *o = out + (b * Ln + l) * D;
            if (scale)
                for (long d = 0; d < D; d++) o[d] = xr[d] + scale[d] * ur[d];
            else
                for (long d = 0; d < D; d++) o[d] = xr[d] + ur[d];
        }
    }
}

#define CB 8 /* centres whose similarities are summed at once */
typedef int32_t vecI __attribute__((vector_size(VLEN * sizeof(int32_t))));

/* The C tokens of largest rank (size, plus L + 1 for an alone one; ties by token order), in token order, into out
 * (C), by counting: the ranks are whole numbers in [0, 2L + 2) where sizes count positions. Returns 0 (out untouched)
 * where a rank is not such a number (the caller sorts instead). */
static int top_by_count(const float *sizes, const unsigned char *alone, long K, long Ln, long C, long *hist,
                        long *out) {
    const long bins = 2 * Ln + 3;
    memset(hist, 0, sizeof(long) * (size_t)bins);
    for (long k = 0; k < K; k++) {
        const float r = sizes[k] + (alone && alone[k] ? (float)(Ln + 1) : 0.f);
        if (!(r >= 0.f && r < (float)bins) || (float)(long)r != r) return 0;
        hist[(long)r]++;
    }
    long cut = bins - 1, above = 0; /* the rank of the C-th token, and how many rank above it */
    while (cut > 0 && above + hist[cut] < C) above += hist[cut--];
    long ties = C - above; /* the first `ties` tokens of rank cut, in token order, join those above it */
    for (long k = 0, c = 0; k < K && c < C; k++) {
        const long r = (long)(sizes[k] + (alone && alone[k] ? (float)(Ln + 1) : 0.f));
        if (r > cut || (r == cut && ties-- > 0)) out[c++] = k;
    }
    return 1;
}

/* z (B, L, D) through strides (szb, szl; unit stride within a row); anchors (B, K) the positions of the tokens,
 * sizes (B, K) the positions each owns, alone (B, K) bytes or NULL (a token that stands for itself alone). Around
 * the C tokens of largest size (C < K; an alone token first; ties by token order; in token order), each position
 * joins the token whose unit z is most like its own (cosine; the first on a tie; an alone token takes none), every
 * token's own position staying with it; then `rounds` rounds of k-means move each position to the group whose mean
 * unit z, normed, is most like its own. -> owner (B, L) in [0, C), counts (B, C). */
void ssm_regroup(const float *z, long szb, long szl, long Bn, long Ln, long D, long K, long C, const long *anchors,
                 const float *sizes, const unsigned char *alone, int rounds, long *owner, float *counts,
                 int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        const long Lp = (Ln + VLEN - 1) / VLEN * VLEN, Cq = (C + CB - 1) / CB * CB; /* padded with zeros */
        float *unit = (float *)calloc((size_t)(Ln * D + Cq * D + D * Lp), sizeof(float));
        float *centre = unit + Ln * D, *unitT = centre + Cq * D;
        Ranked *pick = (Ranked *)malloc(sizeof(Ranked) * (size_t)K);
        long *hist = (long *)malloc(sizeof(long) * (size_t)(2 * Ln + 3));
        long *anc = (long *)malloc(sizeof(long) * (size_t)C);
        unsigned char *solo = (unsigned char *)malloc((size_t)C);
#pragma omp for schedule(static)
        for (long b = 0; b < Bn; b++) {
            for (long l = 0; l < Ln; l++) unit_row(z + b * szb + l * szl, D, unit + l * D);
            for (long l0 = 0; l0 < Ln; l0 += VLEN) /* and feature-major (D, Lp): one vector holds VLEN rows */
                for (long d = 0; d < D; d++)
                    for (long v = 0; v < VLEN && l0 + v < Ln; v++) unitT[d * Lp + l0 + v] = unit[(l0 + v) * D + d];
            /* the C tokens kept (token indices into anc, in token order), then their positions and alone flags */
            if (C == K) {
                for (long c = 0; c < C; c++) anc[c] = c;
            } else if (!top_by_count(sizes + b * K, alone ? alone + b * K : NULL, K, Ln, C, hist, anc)) {
                for (long k = 0; k < K; k++) { /* descending rank, ties by position: torch.sort(-rank, stable) */
                    pick[k].key = order_key(-(sizes[b * K + k] + (alone && alone[b * K + k] ? (float)(Ln + 1) : 0.f)));
                    pick[k].at = k;
                }
                qsort(pick, K, sizeof(Ranked), ranked_cmp);
                for (long c = 0; c < C; c++) { /* the first C, by insertion in token order */
                    long at = pick[c].at, j = c;
                    while (j > 0 && anc[j - 1] > at) {
                        anc[j] = anc[j - 1];
                        j--;
                    }
                    anc[j] = at;
                }
            }
            for (long c = 0; c < C; c++) {
                solo[c] = alone ? alone[b * K + anc[c]] : 0;
                anc[c] = anchors[b * K + anc[c]];
            }
            for (long c = 0; c < C; c++) memcpy(centre + c * D, unit + anc[c] * D, sizeof(float) * (size_t)D);
            long *own = owner + b * Ln;
            float *cnt = counts + b * C;
            for (int round = 0; round <= rounds; round++) {
                /* VLEN rows at once, one lane each: each centre's similarity is summed lane-wise over d (CB centres at
                 * once, independent sums), and the first highest is kept lane-wise with no horizontal step */
                for (long r0 = 0; r0 < Lp; r0 += VLEN) {
                    vecV top = (vecV){0} - 4.f; /* below everything */
                    vecI best = (vecI){0};
                    for (long c0 = 0; c0 < C; c0 += CB) {
                        vecV acc[CB] = {{0}};
                        for (long d = 0; d < D; d++) {
                            vecV x;
                            memcpy(&x, unitT + d * Lp + r0, sizeof x);
                            for (int j = 0; j < CB; j++) acc[j] += x * centre[(c0 + j) * D + d];
                        }
                        for (int j = 0; j < CB && c0 + j < C; j++) {
                            const vecV sc = solo[c0 + j] ? (vecV){0} - 2.f /* below any cosine */ : acc[j];
                            const vecI higher = sc > top;
                            top = (vecV)(((vecI)sc & higher) | ((vecI)top & ~higher));
                            best = (((vecI){0} + (int32_t)(c0 + j)) & higher) | (best & ~higher);
                        }
                    }
                    for (long v = 0; v < VLEN && r0 + v < Ln; v++) own[r0 + v] = best[v];
                }
                for (long c = 0; c < C; c++) own[anc[c]] = c;
                for (long c = 0; c < C; c++) cnt[c] = 0.f;
                for (long l = 0; l < Ln; l++) cnt[own[l]] += 1.f;
                if (round == rounds) break;
                memset(centre, 0, sizeof(float) * (size_t)(C * D));
                for (long l = 0; l < Ln; l++) {
                    float *cr = centre + own[l] * D;
                    const float *u = unit + l * D;
                    for (long d = 0; d < D; d++) cr[d] += u[d];
                }
                for (long c = 0; c < C; c++) {
                    float *cr = centre + c * D;
                    for (long d = 0; d < D; d++) cr[d] /= cnt[c];
                    unit_row(cr, D, cr);
                }
            }
        }
        free(unit);
        free(pick);
        free(hist);
        free(anc);
        free(solo);
    }
}

#define AROWS 4 /* A tokens whose similarities are summed at once */

/* The R first of ranked (n) in ranked_cmp's order moved to its front, in that order: a partial selection where R is
 * small beside n (a step that merges a few tokens), else the whole sort. */
static void first_ranked(Ranked *ranked, Ranked *tmp, long n, long R) {
    if (R * 8 >= n) {
        sort_ranked(ranked, tmp, n);
        return;
    }
    for (long r = 0; r < R; r++) {
        long best = r;
        for (long i = r + 1; i < n; i++)
            if (ranked_cmp(ranked + i, ranked + best) < 0) best = i;
        const Ranked t = ranked[r];
        ranked[r] = ranked[best];
        ranked[best] = t;
    }
}

/* ToMe's bipartite choice (ssmtrim/pruning/strategies/tome.py's choose_bipartite is the reference). feat (B, L, F)
 * through strides (sfb, sfl; unit stride within a row); prot (B, L) bytes. The unprotected tokens in order alternate
 * between set A (even) and set B (odd); each A token's most similar B token by cosine (the first on a tie); the R A
 * tokens of highest such similarity (ties by A order) leave: src (B, R) in that order, dst (B, R) their B tokens,
 * index (B, L - R) the staying tokens in increasing order. */
void ssm_bipartite_choose(const float *feat, long sfb, long sfl, const unsigned char *prot, long Bn, long Ln, long Fn,
                          long R, long *src, long *dst, long *index, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        long *order = (long *)malloc(sizeof(long) * (size_t)Ln);
        long *match = (long *)malloc(sizeof(long) * (size_t)Ln);
        Ranked *ranked = (Ranked *)malloc(sizeof(Ranked) * 2 * (size_t)Ln), *spare = ranked + Ln;
        unsigned char *gone = (unsigned char *)malloc((size_t)Ln);
        const long Kp = (Ln / 2 + VLEN - 1) / VLEN * VLEN; /* |B| <= L / 2, padded */
        float *unit = (float *)calloc((size_t)(Fn * Kp + AROWS * Fn + AROWS * Kp + Kp), sizeof(float));
        float *ua = unit + Fn * Kp, *sim = ua + AROWS * Fn, *inv = sim + AROWS * Kp;
#pragma omp for schedule(static)
        for (long b = 0; b < Bn; b++) {
            long n = 0;
            for (long l = 0; l < Ln; l++)
                if (!prot[b * Ln + l]) order[n++] = l;
            const long na = (n + 1) / 2, nb = n / 2;
            const float *fb = feat + b * sfb;
            for (long j = 0; j < nb; j++) inv[j] = 1.f / row_norm(fb + order[2 * j + 1] * sfl, Fn);
            for (long f = 0; f < Fn; f++) /* B's unit features feature-major (F, Kp), zero beyond nb */
                for (long j = 0; j < Kp; j++) unit[f * Kp + j] = j < nb ? fb[order[2 * j + 1] * sfl + f] * inv[j] : 0.f;
            for (long i0 = 0; i0 < na; i0 += AROWS) { /* AROWS A tokens at once: independent sums */
                for (long r = 0; r < AROWS; r++) unit_row(fb + order[2 * (i0 + r < na ? i0 + r : i0)] * sfl, Fn,
                                                          ua + r * Fn);
                for (long k0 = 0; k0 < Kp; k0 += VLEN) {
                    vecV acc[AROWS] = {{0}};
                    for (long f = 0; f < Fn; f++) {
                        vecV x;
                        memcpy(&x, unit + f * Kp + k0, sizeof x);
                        for (int r = 0; r < AROWS; r++) acc[r] += ua[r * Fn + f] * x;
                    }
                    for (int r = 0; r < AROWS; r++) memcpy(sim + r * Kp + k0, acc + r, sizeof(vecV));
                }
                for (long r = 0; r < AROWS && i0 + r < na; r++) {
                    const float *sr = sim + r * Kp;
                    float top = nb > 0 ? sr[0] : 0.f;
                    for (long j = 1; j < nb; j++) top = fmaxf(top, sr[j]); /* a vectorised reduction */
                    long best = 0; /* the first that highest */
                    while (best + 1 < nb && sr[best] != top) best++;
                    match[i0 + r] = best;
                    ranked[i0 + r].key = order_key(-top);
                    ranked[i0 + r].at = i0 + r;
                }
            }
            first_ranked(ranked, spare, na, R);
            for (long l = 0; l < Ln; l++) gone[l] = 0;
            for (long r = 0; r < R; r++) {
                const long i = ranked[r].at;
                src[b * R + r] = order[2 * i];
                dst[b * R + r] = order[2 * match[i] + 1];
                gone[order[2 * i]] = 1;
            }
            for (long l = 0, k = 0; l < Ln; l++)
                if (!gone[l]) index[b * (Ln - R) + k++] = l;
        }
        free(order);
        free(match);
        free(ranked);
        free(gone);
        free(unit);
    }
}
