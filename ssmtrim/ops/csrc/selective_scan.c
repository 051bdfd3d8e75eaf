/* Fused selective scan for CPU (fp32), forward and backward.
 *
 * Mirrors the semantics of mamba-ssm's selective_scan_fn (state-spaces/mamba,
 * mamba_ssm/ops/selective_scan_interface.py), with one extension used by pruning-aware hidden-state alignment:
 * an optional per-token gap G that adds decay without input,
 *     d_t   = softplus(delta_t + bias)            (or delta_t + bias without softplus)
 *     h_t   = exp((d_t + G_t) * A) * h_{t-1} + d_t * B_t * u_t
 *     y_t   = <C_t, h_t> + D * u_t ;  out_t = y_t * silu(z_t)   (z optional)
 *
 * Layouts (all contiguous, fp32): u, delta, z, gap, out, du, ddelta, dz, dgap: (B, E, L);
 * A: (E, N); Bt, Ct, dB, dC: (B, L, N) (token-major so the N loop is contiguous and vectorises);
 * D, bias: (E); last: (B, E, N); per-batch partial sums dA: (B, E, N), dD, dbias: (B, E).
 * Optional pointers may be NULL.
 *
 * Parallel over (b, e) in the forward; over b in the backward so that dB/dC (summed over e) need no atomics.
 * OpenMP on purpose: the library's DT_NEEDED libgomp.so.1 resolves to the copy PyTorch has already loaded, so the
 * kernel and PyTorch's own ops share one thread pool (a private pthread pool measured 25% slower end to end, its
 * threads competing with PyTorch's spinning workers). Compiled at first use by ssmtrim/ops/_cpu_kernel.py with -O3 -ffast-math so that expf vectorises (libmvec).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MAXN 256

static inline float softplusf(float x) { return x > 20.f ? x : log1pf(expf(x)); }
static inline float sigmoidf(float x) { return 1.f / (1.f + expf(-x)); }

int ssm_max_state(void) { return MAXN; }

void ssm_scan_fwd(const float *u, const float *delta, const float *A, const float *Bt, const float *Ct,
                  const float *D, const float *z, const float *bias, const float *gap, int softplus,
                  float *out, float *last, long Bn, long En, long Ln, long Nn, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (long be = 0; be < Bn * En; be++) {
        const long b = be / En, e = be % En;
        float h[MAXN];
        for (long n = 0; n < Nn; n++) h[n] = 0.f;
        const float *a = A + e * Nn;
        const float *ub = u + be * Ln, *db = delta + be * Ln;
        const float *zb = z ? z + be * Ln : NULL, *gb = gap ? gap + be * Ln : NULL;
        const float bias_e = bias ? bias[e] : 0.f, D_e = D ? D[e] : 0.f;
        float *ob = out + be * Ln;
        for (long t = 0; t < Ln; t++) {
            const float x = db[t] + bias_e;
            const float d = softplus ? softplusf(x) : x;
            const float decay = gb ? d + gb[t] : d;
            const float du = d * ub[t];
            const float *bt = Bt + (b * Ln + t) * Nn, *ct = Ct + (b * Ln + t) * Nn;
            float acc = 0.f;
#pragma omp simd reduction(+ : acc)
            for (long n = 0; n < Nn; n++) {
                const float hn = expf(decay * a[n]) * h[n] + du * bt[n];
                h[n] = hn;
                acc += hn * ct[n];
            }
            float y = acc + D_e * ub[t];
            if (zb) y *= zb[t] * sigmoidf(zb[t]);
            ob[t] = y;
        }
        if (last)
            for (long n = 0; n < Nn; n++) last[be * Nn + n] = h[n];
    }
}

void ssm_scan_bwd(const float *u, const float *delta, const float *A, const float *Bt, const float *Ct,
                  const float *D, const float *z, const float *bias, const float *gap, int softplus,
                  const float *dout, const float *dlast, float *du, float *ddelta, float *dA, float *dBt,
                  float *dCt, float *dD, float *dz, float *dbias, float *dgap, long Bn, long En, long Ln, long Nn,
                  int nthreads) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (long b = 0; b < Bn; b++) {
        float *hs = (float *)malloc(sizeof(float) * Ln * Nn); /* states h_t of one (b, e) row */
        float *ys = (float *)malloc(sizeof(float) * Ln);      /* ungated outputs y_t */
        float gh[MAXN], dA_acc[MAXN];
        float *dBb = dBt + b * Ln * Nn, *dCb = dCt + b * Ln * Nn;
        memset(dBb, 0, sizeof(float) * Ln * Nn);
        memset(dCb, 0, sizeof(float) * Ln * Nn);
        for (long e = 0; e < En; e++) {
            const long be = b * En + e;
            const float *a = A + e * Nn;
            const float *ub = u + be * Ln, *db = delta + be * Ln, *gob = dout + be * Ln;
            const float *zb = z ? z + be * Ln : NULL, *gb = gap ? gap + be * Ln : NULL;
            const float bias_e = bias ? bias[e] : 0.f, D_e = D ? D[e] : 0.f;
            /* forward recomputation, keeping every state */
            float h[MAXN];
            for (long n = 0; n < Nn; n++) h[n] = 0.f;
            for (long t = 0; t < Ln; t++) {
                const float x = db[t] + bias_e;
                const float d = softplus ? softplusf(x) : x;
                const float decay = gb ? d + gb[t] : d;
                const float dut = d * ub[t];
                const float *bt = Bt + (b * Ln + t) * Nn, *ct = Ct + (b * Ln + t) * Nn;
                float *ht = hs + t * Nn;
                float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                for (long n = 0; n < Nn; n++) {
                    const float hn = expf(decay * a[n]) * h[n] + dut * bt[n];
                    h[n] = hn;
                    ht[n] = hn;
                    acc += hn * ct[n];
                }
                ys[t] = acc + D_e * ub[t];
            }
            /* reverse sweep */
            for (long n = 0; n < Nn; n++) {
                gh[n] = dlast ? dlast[be * Nn + n] : 0.f;
                dA_acc[n] = 0.f;
            }
            float dD_acc = 0.f, dbias_acc = 0.f;
            for (long t = Ln - 1; t >= 0; t--) {
                float gy = gob[t];
                if (zb) {
                    const float zt = zb[t], sz = sigmoidf(zt);
                    dz[be * Ln + t] = gy * ys[t] * sz * (1.f + zt * (1.f - sz));
                    gy *= zt * sz;
                }
                const float x = db[t] + bias_e;
                const float d = softplus ? softplusf(x) : x;
                const float decay = gb ? d + gb[t] : d;
                const float *bt = Bt + (b * Ln + t) * Nn, *ct = Ct + (b * Ln + t) * Nn;
                float *dbt = dBb + t * Nn, *dct = dCb + t * Nn;
                const float *ht = hs + t * Nn, *hp = t > 0 ? hs + (t - 1) * Nn : NULL;
                dD_acc += gy * ub[t];
                float du_t = gy * D_e, dd = 0.f, ddecay = 0.f;
                const float ut = ub[t];
#pragma omp simd reduction(+ : du_t, dd, ddecay)
                for (long n = 0; n < Nn; n++) {
                    const float g = gh[n] + gy * ct[n]; /* dL/dh_t */
                    dct[n] += gy * ht[n];
                    const float ea = expf(decay * a[n]);
                    const float gea = hp ? g * hp[n] * ea : 0.f;
                    ddecay += gea * a[n];
                    dA_acc[n] += gea * decay;
                    dd += g * ut * bt[n];
                    du_t += g * d * bt[n];
                    dbt[n] += g * d * ut;
                    gh[n] = g * ea;
                }
                if (dgap) dgap[be * Ln + t] = ddecay;
                const float dd_tot = dd + ddecay;
                const float draw = softplus ? dd_tot * sigmoidf(x) : dd_tot;
                ddelta[be * Ln + t] = draw;
                dbias_acc += draw;
                du[be * Ln + t] = du_t;
            }
            for (long n = 0; n < Nn; n++) dA[be * Nn + n] = dA_acc[n];
            dD[be] = dD_acc;
            dbias[be] = dbias_acc;
        }
        free(hs);
        free(ys);
    }
}
