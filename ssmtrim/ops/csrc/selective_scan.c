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
 * Parallel over (b, e) rows in the forward; over b in the backward so that dB/dC (summed over e) need no atomics.
 * Threads are plain pthreads started per call, not OpenMP: a second OpenMP runtime beside PyTorch's would keep its
 * idle threads spinning between calls and steal the cores PyTorch's own ops need (measured: up to 10x slower
 * forwards when the machine is shared). Compiled at first use by ssmtrim/ops/_cpu_kernel.py with -O3 -ffast-math
 * -fopenmp-simd so that expf vectorises (libmvec).
 */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define MAXN 256

static inline float softplusf(float x) { return x > 20.f ? x : log1pf(expf(x)); }
static inline float sigmoidf(float x) { return 1.f / (1.f + expf(-x)); }

int ssm_max_state(void) { return MAXN; }

typedef void (*range_fn)(void *ctx, long lo, long hi);
typedef struct {
    range_fn fn;
    void *ctx;
    long lo, hi;
} task_t;

static void *run_task(void *arg) {
    task_t *t = (task_t *)arg;
    t->fn(t->ctx, t->lo, t->hi);
    return NULL;
}

/* fn over [0, n) split into nthreads contiguous ranges; the calling thread takes the first. */
static void parallel_for(long n, int nthreads, range_fn fn, void *ctx) {
    if (nthreads > n) nthreads = (int)n;
    if (nthreads <= 1) {
        fn(ctx, 0, n);
        return;
    }
    task_t tasks[64];
    pthread_t threads[64];
    int started[64] = {0};
    if (nthreads > 64) nthreads = 64;
    for (int i = 0; i < nthreads; i++) {
        tasks[i].fn = fn;
        tasks[i].ctx = ctx;
        tasks[i].lo = n * i / nthreads;
        tasks[i].hi = n * (i + 1) / nthreads;
    }
    for (int i = 1; i < nthreads; i++) started[i] = pthread_create(&threads[i], NULL, run_task, &tasks[i]) == 0;
    fn(ctx, tasks[0].lo, tasks[0].hi);
    for (int i = 1; i < nthreads; i++) {
        if (started[i])
            pthread_join(threads[i], NULL);
        else
            fn(ctx, tasks[i].lo, tasks[i].hi); /* could not start a thread: do its share here */
    }
}

typedef struct {
    const float *u, *delta, *A, *Bt, *Ct, *D, *z, *bias, *gap, *dout, *dlast;
    int softplus;
    float *out, *last, *du, *ddelta, *dA, *dBt, *dCt, *dD, *dz, *dbias, *dgap;
    long Bn, En, Ln, Nn;
} scan_args;

static void fwd_rows(void *ctx, long lo, long hi) {
    const scan_args *p = (const scan_args *)ctx;
    const float *u = p->u, *delta = p->delta, *A = p->A, *Bt = p->Bt, *Ct = p->Ct, *D = p->D, *z = p->z;
    const float *bias = p->bias, *gap = p->gap;
    const int softplus = p->softplus;
    float *out = p->out, *last = p->last;
    const long En = p->En, Ln = p->Ln, Nn = p->Nn;
    for (long be = lo; be < hi; be++) {
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

void ssm_scan_fwd(const float *u, const float *delta, const float *A, const float *Bt, const float *Ct,
                  const float *D, const float *z, const float *bias, const float *gap, int softplus,
                  float *out, float *last, long Bn, long En, long Ln, long Nn, int nthreads) {
    scan_args p = {u, delta, A, Bt, Ct, D, z, bias, gap, NULL, NULL, softplus, out, last,
                   NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, Bn, En, Ln, Nn};
    parallel_for(Bn * En, nthreads, fwd_rows, &p);
}

static void bwd_batches(void *ctx, long lo, long hi) {
    const scan_args *p = (const scan_args *)ctx;
    const float *u = p->u, *delta = p->delta, *A = p->A, *Bt = p->Bt, *Ct = p->Ct, *D = p->D, *z = p->z;
    const float *bias = p->bias, *gap = p->gap, *dout = p->dout, *dlast = p->dlast;
    const int softplus = p->softplus;
    float *du = p->du, *ddelta = p->ddelta, *dA = p->dA, *dBt = p->dBt, *dCt = p->dCt, *dD = p->dD, *dz = p->dz;
    float *dbias = p->dbias, *dgap = p->dgap;
    const long En = p->En, Ln = p->Ln, Nn = p->Nn;
    for (long b = lo; b < hi; b++) {
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

void ssm_scan_bwd(const float *u, const float *delta, const float *A, const float *Bt, const float *Ct,
                  const float *D, const float *z, const float *bias, const float *gap, int softplus,
                  const float *dout, const float *dlast, float *du, float *ddelta, float *dA, float *dBt,
                  float *dCt, float *dD, float *dz, float *dbias, float *dgap, long Bn, long En, long Ln, long Nn,
                  int nthreads) {
    scan_args p = {u, delta, A, Bt, Ct, D, z, bias, gap, dout, dlast, softplus, NULL, NULL,
                   du, ddelta, dA, dBt, dCt, dD, dz, dbias, dgap, Bn, En, Ln, Nn};
    parallel_for(Bn, nthreads, bwd_batches, &p);
}
