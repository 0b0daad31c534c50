/* Dropout in one pass over memory: the mask's bits are made where they are used (mlpmixer.kernels).
 *
 * Element e of a call keyed by `key` gets the 16-bit uniform lane e % 4 (memory order) of the 64-bit
 * word finish(key + (e / 4 + 1) · GOLDEN): SplitMix64's output at position e / 4 + 1 of the stream
 * that starts at `key`. A counter-based generator, so any thread can make any element's bits, the result does not
 * depend on the thread count, and backward makes the forward pass's mask again from the key instead
 * of storing it. mlpmixer/kernels.py computes the same bits with torch operations (its fallback and
 * the tests' reference); keep the two in step.
 *
 * An element is dropped when its lane is below `thr` (= round(p * 65536)). float32 and bfloat16
 * (as uint16, rounded to nearest even like torch) are computed in float32, one rounding per result,
 * as torch's element-wise kernels do; built with -ffp-contract=off so no product is fused into a sum.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define BLOCK 1024            /* elements per task: their bits live on the stack, in L1 */
#define PARALLEL_MIN 32768    /* below this many elements, one thread */

#define GOLDEN 0x9E3779B97F4A7C15ULL

/* SplitMix64's output function of the state z */
static inline uint64_t finish(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* the lanes of elements e0 … e0 + n - 1 (n <= BLOCK): consecutive words, the state stepped by GOLDEN
 * from word to word */
static inline void draw(uint64_t key, int64_t e0, int64_t n, uint16_t *lanes) {
    uint64_t words[BLOCK / 4 + 2];
    const int64_t w0 = e0 >> 2, count = ((e0 + n + 3) >> 2) - w0;
    const uint64_t first = key + ((uint64_t)w0 + 1) * GOLDEN;
    for (int64_t i = 0; i < count; ++i) words[i] = finish(first + (uint64_t)i * GOLDEN);
    memcpy(lanes, (const uint16_t *)words + (e0 & 3), (size_t)n * sizeof(uint16_t));
}

static inline float load_f32(float v) { return v; }
static inline float store_f32(float v) { return v; }
static inline float load_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline uint16_t store_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  /* NaN, as torch writes it */
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* out (rows, cols) = bias + (dropped where the element is dropped, else 0): a dropout-biased
 * pre-activation buffer (mlpmixer.fused). bias has one value per row (per_row) or per column. Each
 * element is one of two values of its row (or column), STORE(b) and STORE(b + dropped), made once per
 * call: the pass is a compare and a blend (16-bit lanes, 32 to a 512-bit register) instead of a
 * conversion, an add and a rounding per element, with the same results. */
#define DROPOUT_BIAS(NAME, T, LOAD, STORE)                                                           \
    void NAME(T *out, const T *bias, int64_t rows, int64_t cols, int per_row, uint64_t key,          \
              uint32_t thr, float dropped, int nthreads) {                                          \
        const int64_t per = (cols + BLOCK - 1) / BLOCK, tasks = rows * per;                          \
        const int64_t width = per_row ? rows : cols;  /* one value pair per row or per column */    \
        T *kept = malloc(2 * (size_t)width * sizeof(T)), *gone = kept + width;                       \
        if (!kept) { /* no memory for the pairs: one element at a time */                           \
            _Pragma("omp parallel for num_threads(nthreads) schedule(static) if(rows * cols >= PARALLEL_MIN)") \
            for (int64_t t = 0; t < tasks; ++t) {                                                    \
                const int64_t i = t / per, j0 = (t % per) * BLOCK, n = min64(BLOCK, cols - j0);     \
                uint16_t lanes[BLOCK];                                                               \
                draw(key, i * cols + j0, n, lanes);                                                  \
                for (int64_t k = 0; k < n; ++k)                                                      \
                    out[i * cols + j0 + k] = STORE(LOAD(bias[per_row ? i : j0 + k])                  \
                                                   + (lanes[k] < thr ? dropped : 0.0f));             \
            }                                                                                        \
            return;                                                                                  \
        }                                                                                            \
        for (int64_t j = 0; j < width; ++j) {                                                        \
            kept[j] = STORE(LOAD(bias[j]) + 0.0f);                                                   \
            gone[j] = STORE(LOAD(bias[j]) + dropped);                                                \
        }                                                                                            \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static) if(rows * cols >= PARALLEL_MIN)") \
        for (int64_t t = 0; t < tasks; ++t) {                                                        \
            const int64_t i = t / per, j0 = (t % per) * BLOCK, n = min64(BLOCK, cols - j0);         \
            uint16_t lanes[BLOCK];                                                                   \
            draw(key, i * cols + j0, n, lanes);                                                      \
            T *restrict o = out + i * cols + j0;                                                     \
            if (per_row) {                                                                           \
                const T k1 = kept[i], g1 = gone[i];                                                  \
                for (int64_t k = 0; k < n; ++k) o[k] = lanes[k] < thr ? g1 : k1;                     \
            } else {                                                                                 \
                const T *restrict k1 = kept + j0, *restrict g1 = gone + j0;                          \
                for (int64_t k = 0; k < n; ++k) o[k] = lanes[k] < thr ? g1[k] : k1[k];               \
            }                                                                                        \
        }                                                                                            \
        free(kept);                                                                                  \
    }

/* `BODY` for every element e < n, which sees e and the element's lane u: the elements go in tasks of
 * BLOCK over the threads, each task's lanes made on its stack first */
#define FOR_EACH_LANE(n, key, BODY)                                                                  \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static) if(n >= PARALLEL_MIN)")         \
    for (int64_t task = 0; task < ((n) + BLOCK - 1) / BLOCK; ++task) {                               \
        const int64_t e0 = task * BLOCK, m = min64(BLOCK, (n) - e0);                                 \
        uint16_t lanes[BLOCK];                                                                       \
        draw(key, e0, m, lanes);                                                                     \
        for (int64_t k = 0; k < m; ++k) {                                                            \
            const int64_t e = e0 + k;                                                                \
            const uint32_t u = lanes[k];                                                             \
            BODY;                                                                                    \
        }                                                                                            \
    }

/* out = x + branch * scale where kept, x where dropped (a residual add with dropout on the branch);
 * the branch may be bfloat16 beside a float32 x (autocast's products feeding a float32 residual) */
#define DROPOUT_ADD(NAME, T, LOAD, STORE, TB, LOADB)                                                 \
    void NAME(T *out, const T *x, const TB *branch, int64_t n, uint64_t key, uint32_t thr,          \
              float scale, int nthreads) {                                                          \
        FOR_EACH_LANE(n, key, out[e] = STORE(u < thr ? LOAD(x[e]) : LOAD(x[e]) + LOADB(branch[e]) * scale)); \
    }

/* out = t * scale where kept, 0 where dropped (dropout itself, and every dropout's backward); out may
 * be bfloat16 beside a float32 t (a float32 residual gradient going to a bfloat16 branch) */
#define DROPOUT_MUL(NAME, T, LOAD, TO, STORE)                                                        \
    void NAME(TO *out, const T *t, int64_t n, uint64_t key, uint32_t thr, float scale, int nthreads) { \
        FOR_EACH_LANE(n, key, out[e] = STORE(u < thr ? 0.0f : LOAD(t[e]) * scale));                \
    }

/* the raw lanes of elements 0 … n - 1 (for tests: the same bits as kernels.lanes) */
void mlpmixer_lanes(uint16_t *out, int64_t n, uint64_t key) {
    for (int64_t e0 = 0; e0 < n; e0 += BLOCK) draw(key, e0, min64(BLOCK, n - e0), out + e0);
}

DROPOUT_BIAS(mlpmixer_dropout_bias_f32, float, load_f32, store_f32)
DROPOUT_BIAS(mlpmixer_dropout_bias_bf16, uint16_t, load_bf16, store_bf16)
/* A residual branch's end in one pass: out = x + (branch + bias) * scale where kept, x where dropped, for a
 * float32 x and a (rows, cols) branch with its output bias, one value per row (per_row) or per column
 * (mlpmixer.fused: the bias added here, in float32, instead of in the branch's product, which then needs no
 * bias copy: issue 17). thr = 0 drops nothing and makes no bits. */
#define DROPOUT_ADD_BIAS(NAME, TB, LOADB)                                                             \
    void NAME(float *out, const float *x, const TB *branch, const TB *bias, int64_t rows, int64_t cols,  \
              int per_row, uint64_t key, uint32_t thr, float scale, int nthreads) {                  \
        const int64_t total = rows * cols;                                                           \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static) if(total >= PARALLEL_MIN)") \
        for (int64_t task = 0; task < (total + BLOCK - 1) / BLOCK; ++task) {                         \
            const int64_t e0 = task * BLOCK, m = min64(BLOCK, total - e0);                           \
            uint16_t lanes[BLOCK];                                                                   \
            if (thr) draw(key, e0, m, lanes);                                                        \
            for (int64_t s0 = 0; s0 < m;) {  /* the block's pieces of one row each */               \
                const int64_t i = (e0 + s0) / cols, j0 = (e0 + s0) % cols, n = min64(m - s0, cols - j0); \
                const float *restrict xr = x + e0 + s0;                                              \
                const TB *restrict br = branch + e0 + s0, *restrict bc = bias + j0;                  \
                const uint16_t *restrict u = lanes + s0;                                             \
                float *restrict o = out + e0 + s0;                                                   \
                const float b = LOADB(bias[per_row ? i : 0]);                                        \
                if (per_row && !thr)                                                                 \
                    for (int64_t k = 0; k < n; ++k) o[k] = xr[k] + (LOADB(br[k]) + b) * scale;       \
                else if (per_row)                                                                    \
                    for (int64_t k = 0; k < n; ++k)                                                  \
                        o[k] = u[k] < thr ? xr[k] : xr[k] + (LOADB(br[k]) + b) * scale;              \
                else if (!thr)                                                                       \
                    for (int64_t k = 0; k < n; ++k) o[k] = xr[k] + (LOADB(br[k]) + LOADB(bc[k])) * scale; \
                else                                                                                 \
                    for (int64_t k = 0; k < n; ++k)                                                  \
                        o[k] = u[k] < thr ? xr[k] : xr[k] + (LOADB(br[k]) + LOADB(bc[k])) * scale;   \
                s0 += n;                                                                             \
            }                                                                                        \
        }                                                                                            \
    }

DROPOUT_ADD(mlpmixer_dropout_add_f32, float, load_f32, store_f32, float, load_f32)
DROPOUT_ADD(mlpmixer_dropout_add_bf16, uint16_t, load_bf16, store_bf16, uint16_t, load_bf16)
DROPOUT_ADD(mlpmixer_dropout_add_f32_bf16, float, load_f32, store_f32, uint16_t, load_bf16)
DROPOUT_ADD_BIAS(mlpmixer_dropout_add_bias_f32, float, load_f32)
DROPOUT_ADD_BIAS(mlpmixer_dropout_add_bias_f32_bf16, uint16_t, load_bf16)
DROPOUT_MUL(mlpmixer_dropout_mul_f32, float, load_f32, float, store_f32)
DROPOUT_MUL(mlpmixer_dropout_mul_bf16, uint16_t, load_bf16, uint16_t, store_bf16)
DROPOUT_MUL(mlpmixer_dropout_mul_f32_bf16, float, load_f32, uint16_t, store_bf16)

/* GELU on bfloat16 by table: a bfloat16 has 65,536 values, so σ(h) is one lookup in `table` (the
 * bfloat16 results torch's own gelu gives for each value, widened to 32 bits for the gather) and the
 * backward σ'(h)·dy one lookup in `slope` (torch's float32 derivative) and one product, rounded once as
 * torch's bfloat16 gelu_backward rounds it (kernels.py builds both tables with torch and the tests
 * hold the results equal to torch's). `out` may be `dy`. */
void mlpmixer_gelu_bf16(uint16_t *out, const uint16_t *h, int64_t n, const uint32_t *table, int nthreads) {
    _Pragma("omp parallel for num_threads(nthreads) schedule(static) if(n >= PARALLEL_MIN)")
    for (int64_t e = 0; e < n; ++e) out[e] = (uint16_t)table[h[e]];
}

static inline void gelu_backward_span(uint16_t *o, const uint16_t *g, const uint16_t *h, int64_t n,
                                      const float *slope) {
    for (int64_t k = 0; k < n; ++k) o[k] = store_bf16(load_bf16(g[k]) * slope[h[k]]);
}

void mlpmixer_gelu_backward_bf16(uint16_t *out, const uint16_t *dy, const uint16_t *h, int64_t n,
                                 const float *slope, int nthreads) {
    _Pragma("omp parallel for num_threads(nthreads) schedule(static) if(n >= PARALLEL_MIN)")
    for (int64_t e0 = 0; e0 < n; e0 += BLOCK) gelu_backward_span(out + e0, dy + e0, h + e0, min64(BLOCK, n - e0), slope);
}

/* LayerNorm over the rows of a float32 (rows, d) table, d a multiple of 16 (mlpmixer.fused.residual_mlp):
 * y = (x − μ)·ρ·w + b with μ the row's mean and ρ = 1/√(var + eps), var the biased variance (two passes,
 * float32). Written in GCC vector types of 16 floats (one AVX-512 register, or two AVX2 ones): each sum
 * runs in 16 lanes and then a fixed pairwise tree, so a row's result does not depend on the thread count.
 * y is float32 or bfloat16 (the dtype autocast multiplies in: the cast rides in this pass). */
typedef float vf __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
#define V 16

static inline vf vload_f32(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore_f32(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf vload_bf16(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline void vstore_bf16(uint16_t *p, vf f) {  /* store_bf16, 16 at a time */
    vu u;
    memcpy(&u, &f, sizeof u);
    const vu nan = (vu)((u & 0x7FFFFFFFu) > 0x7F800000u);
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    u = (u & ~nan) | (nan & 0x7FC0u);
    vh h = __builtin_convertvector(u, vh);
    memcpy(p, &h, sizeof h);
}
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
typedef float vf2 __attribute__((vector_size(8)));
static inline float vsum(vf v) {  /* 16 lanes in a fixed pairwise tree: lane j + lane j + 8, … */
    const vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    const vf4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    const vf2 c = __builtin_shufflevector(b, b, 0, 1) + __builtin_shufflevector(b, b, 2, 3);
    return c[0] + c[1];
}

/* Rows go GROUP at a time through each pass (the means, then the variances, then the writes): a row's
 * pass is short (d / 16 vectors) and its mean and ρ are latency chains (a sum tree, a division, a square
 * root), so rows one after another left the core waiting; GROUP independent chains overlap. Each row's
 * arithmetic is unchanged. */
#define GROUP 4
#define LAYER_NORM(NAME, TO, VSTORE)                                                                 \
    void NAME(TO *y, float *mean, float *rstd, const float *x, const float *w, const float *b,       \
              int64_t rows, int64_t d, float eps, int nthreads) {                                    \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static) if(rows * d >= PARALLEL_MIN)") \
        for (int64_t r0 = 0; r0 < rows; r0 += GROUP) {                                               \
            const int64_t m = min64(GROUP, rows - r0);                                               \
            float mu[GROUP], rho[GROUP];                                                             \
            for (int64_t q = 0; q < m; ++q) {                                                        \
                const float *xr = x + (r0 + q) * d;                                                  \
                vf s = {0};                                                                          \
                for (int64_t k = 0; k < d; k += V) s += vload_f32(xr + k);                           \
                mu[q] = vsum(s) / (float)d;                                                          \
            }                                                                                        \
            for (int64_t q = 0; q < m; ++q) {                                                        \
                const float *xr = x + (r0 + q) * d;                                                  \
                vf v = {0};                                                                          \
                for (int64_t k = 0; k < d; k += V) { const vf t = vload_f32(xr + k) - mu[q]; v += t * t; } \
                rho[q] = 1.0f / sqrtf(vsum(v) / (float)d + eps);                                     \
            }                                                                                        \
            for (int64_t q = 0; q < m; ++q) {                                                        \
                const float *xr = x + (r0 + q) * d;                                                  \
                for (int64_t k = 0; k < d; k += V)                                                   \
                    VSTORE(y + (r0 + q) * d + k, (vload_f32(xr + k) - mu[q]) * rho[q] * vload_f32(w + k) + vload_f32(b + k)); \
                mean[r0 + q] = mu[q];                                                                \
                rstd[r0 + q] = rho[q];                                                               \
            }                                                                                        \
        }                                                                                            \
    }

/* LayerNorm's backward, plus the gradient that reaches x around the norm (`dres`, the residual path,
 * or NULL): dx = dres + ρ·(g·w − mean(g·w) − x̂·mean(g·w·x̂)) with x̂ = (x − μ)·ρ and g = dy. The weight
 * and bias gradients Σ g·x̂ and Σ g are summed per chunk of CHUNK rows into `part` (2·d floats per chunk:
 * the caller's buffer) and the chunks then in order, so they too do not depend on the thread count. dy
 * is float32 or bfloat16. */
#define CHUNK 64

/* out[k] = Σ_c part[c · stride + k] for k < n, the chunks added in order (thread-count independent) */
static void sum_chunks(float *out, const float *part, int64_t chunks, int64_t stride, int64_t n) {
    for (int64_t k = 0; k < n; ++k) {
        float s = 0.0f;
        for (int64_t c = 0; c < chunks; ++c) s += part[c * stride + k];
        out[k] = s;
    }
}

#define LAYER_NORM_BACKWARD(NAME, TG, VLOADG)                                                        \
    void NAME(float *dx, float *dw, float *db, float *part, const TG *dy, const float *dres,         \
              const float *x, const float *mean, const float *rstd, const float *w, int64_t rows,    \
              int64_t d, int nthreads) {                                                             \
        const int64_t chunks = (rows + CHUNK - 1) / CHUNK;                                           \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static) if(rows * d >= PARALLEL_MIN)") \
        for (int64_t c = 0; c < chunks; ++c) {                                                       \
            float *pw = part + c * 2 * d, *pb = pw + d;                                              \
            memset(pw, 0, 2 * (size_t)d * sizeof(float));                                            \
            for (int64_t r = c * CHUNK; r < min64((c + 1) * CHUNK, rows); ++r) {                     \
                const float *xr = x + r * d, mu = mean[r], rho = rstd[r];                            \
                const TG *gr = dy + r * d;                                                           \
                vf sg = {0}, sgx = {0};                                                              \
                for (int64_t k = 0; k < d; k += V) {                                                 \
                    const vf gw = VLOADG(gr + k) * vload_f32(w + k);                                 \
                    sg += gw;                                                                        \
                    sgx += gw * ((vload_f32(xr + k) - mu) * rho);                                    \
                }                                                                                    \
                const float a = vsum(sg) / (float)d, e = vsum(sgx) / (float)d;                       \
                for (int64_t k = 0; k < d; k += V) {                                                 \
                    const vf g = VLOADG(gr + k), xh = (vload_f32(xr + k) - mu) * rho;                \
                    vf o = rho * (g * vload_f32(w + k) - a - xh * e);                                \
                    if (dres) o = vload_f32(dres + r * d + k) + o;                                   \
                    vstore_f32(dx + r * d + k, o);                                                   \
                    vstore_f32(pw + k, vload_f32(pw + k) + g * xh);                                  \
                    vstore_f32(pb + k, vload_f32(pb + k) + g);                                       \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
        sum_chunks(dw, part, chunks, 2 * d, d);                                                      \
        sum_chunks(db, part + d, chunks, 2 * d, d);                                                  \
    }

LAYER_NORM(mlpmixer_layer_norm_f32, float, vstore_f32)
LAYER_NORM(mlpmixer_layer_norm_bf16, uint16_t, vstore_bf16)
LAYER_NORM_BACKWARD(mlpmixer_layer_norm_backward_f32, float, vload_f32)
LAYER_NORM_BACKWARD(mlpmixer_layer_norm_backward_bf16, uint16_t, vload_bf16)

/* mlpmixer_gelu_backward_bf16 over a (rows, cols) table, plus the hidden bias's gradient: the float32
 * sums of the results (as rounded to bfloat16, the values torch would sum) over each row (per_row: the
 * token-mixing MLP's hidden units are rows) or each column (the channel MLP's). Rows go one to a thread
 * in 16 lanes and a fixed pairwise tree; column sums per chunk of CHUNK rows into `part` (cols floats
 * per chunk) and the chunks then in order: the sums do not depend on the thread count. cols % 16 == 0. */
void mlpmixer_gelu_backward_sum_bf16(uint16_t *out, float *sums, float *part, const uint16_t *dy,
                                     const uint16_t *h, int64_t rows, int64_t cols, int per_row,
                                     const float *slope, int nthreads) {
    if (per_row) {
        _Pragma("omp parallel for num_threads(nthreads) schedule(static) if(rows * cols >= PARALLEL_MIN)")
        for (int64_t r = 0; r < rows; ++r) {
            vf acc = {0};
            for (int64_t k0 = 0; k0 < cols; k0 += BLOCK) {
                const int64_t n = min64(BLOCK, cols - k0), e = r * cols + k0;
                gelu_backward_span(out + e, dy + e, h + e, n, slope);
                for (int64_t k = 0; k < n; k += V) acc += vload_bf16(out + e + k);
            }
            sums[r] = vsum(acc);
        }
        return;
    }
    const int64_t chunks = (rows + CHUNK - 1) / CHUNK;
    _Pragma("omp parallel for num_threads(nthreads) schedule(static) if(rows * cols >= PARALLEL_MIN)")
    for (int64_t c = 0; c < chunks; ++c) {
        float *p = part + c * cols;
        memset(p, 0, (size_t)cols * sizeof(float));
        for (int64_t r = c * CHUNK; r < min64((c + 1) * CHUNK, rows); ++r) {
            const int64_t e = r * cols;
            gelu_backward_span(out + e, dy + e, h + e, cols, slope);
            for (int64_t k = 0; k < cols; k += V) vstore_f32(p + k, vload_f32(p + k) + vload_bf16(out + e + k));
        }
    }
    sum_chunks(sums, part, chunks, cols, cols);
}

/* mlpmixer_dropout_mul over a float32 (rows, cols) table into TO, plus the float32 sums of the results
 * (as rounded to TO) over each row (per_row: the token-mixing MLP's outputs are rows) or each column:
 * a residual branch's gradient and its output bias's gradient in one pass (mlpmixer.fused). thr = 0
 * drops nothing and makes no bits (out = t * scale). Sums as mlpmixer_gelu_backward_sum_bf16's: rows in
 * 16 lanes and a fixed tree, columns per chunk of CHUNK rows and then in order. cols % 16 == 0. */
#define DROPOUT_MUL_SUM(NAME, TO, STORE, VLOADO)                                                     \
    static inline void NAME##_span(TO *o, const float *t, int64_t e0, int64_t n, uint64_t key,       \
                                   uint32_t thr, float scale) {                                     \
        if (!thr) {                                                                                  \
            for (int64_t k = 0; k < n; ++k) o[k] = STORE(t[k] * scale);                              \
            return;                                                                                  \
        }                                                                                            \
        uint16_t lanes[BLOCK];                                                                       \
        draw(key, e0, n, lanes);                                                                     \
        for (int64_t k = 0; k < n; ++k) o[k] = STORE(lanes[k] < thr ? 0.0f : t[k] * scale);          \
    }                                                                                                \
    void NAME(TO *out, float *sums, float *part, const float *t, int64_t rows, int64_t cols,         \
              int per_row, uint64_t key, uint32_t thr, float scale, int nthreads) {                 \
        if (per_row) {                                                                               \
            _Pragma("omp parallel for num_threads(nthreads) schedule(static) if(rows * cols >= PARALLEL_MIN)") \
            for (int64_t r = 0; r < rows; ++r) {                                                     \
                vf acc = {0};                                                                        \
                for (int64_t k0 = 0; k0 < cols; k0 += BLOCK) {                                       \
                    const int64_t n = min64(BLOCK, cols - k0), e = r * cols + k0;                   \
                    NAME##_span(out + e, t + e, e, n, key, thr, scale);                              \
                    for (int64_t k = 0; k < n; k += V) acc += VLOADO(out + e + k);                   \
                }                                                                                    \
                sums[r] = vsum(acc);                                                                 \
            }                                                                                        \
            return;                                                                                  \
        }                                                                                            \
        const int64_t chunks = (rows + CHUNK - 1) / CHUNK;                                           \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static) if(rows * cols >= PARALLEL_MIN)") \
        for (int64_t c = 0; c < chunks; ++c) {                                                       \
            float *p = part + c * cols;                                                              \
            memset(p, 0, (size_t)cols * sizeof(float));                                              \
            for (int64_t r = c * CHUNK; r < min64((c + 1) * CHUNK, rows); ++r)                       \
                for (int64_t k0 = 0; k0 < cols; k0 += BLOCK) {                                       \
                    const int64_t n = min64(BLOCK, cols - k0), e = r * cols + k0;                   \
                    NAME##_span(out + e, t + e, e, n, key, thr, scale);                              \
                    for (int64_t k = 0; k < n; k += V)                                               \
                        vstore_f32(p + k0 + k, vload_f32(p + k0 + k) + VLOADO(out + e + k));        \
                }                                                                                    \
        }                                                                                            \
        sum_chunks(sums, part, chunks, cols, cols);                                                  \
    }

DROPOUT_MUL_SUM(mlpmixer_dropout_mul_sum_f32, float, store_f32, vload_f32)
DROPOUT_MUL_SUM(mlpmixer_dropout_mul_sum_f32_bf16, uint16_t, store_bf16, vload_bf16)

/* A text model's input (mlpmixer.fused.embed): ids (B, N) of a (V, D) float32 table to the sequence-first
 * out (N, B, D) = table[id] · scale (+ pos (N, D) where given), each value rounded as torch's mul and add
 * round them. Returns -1, or the first position (b · N + n) whose id is outside [0, V), having written
 * nothing there. */
int64_t mlpmixer_embed_f32(float *out, const int64_t *ids, const float *table, const float *pos, int64_t batch,
                           int64_t n, int64_t d, int64_t vocab, float scale, int nthreads) {
    for (int64_t e = 0; e < batch * n; ++e)
        if (ids[e] < 0 || ids[e] >= vocab) return e;
    _Pragma("omp parallel for num_threads(nthreads) schedule(static) if(batch * n * d >= PARALLEL_MIN)")
    for (int64_t r = 0; r < n * batch; ++r) {  /* row r = i · B + b of the output */
        const int64_t i = r / batch, b = r % batch;
        const float *restrict t = table + ids[b * n + i] * d;
        float *restrict o = out + r * d;
        if (pos) {
            const float *restrict p = pos + i * d;
            for (int64_t k = 0; k < d; ++k) o[k] = t[k] * scale + p[k];
        } else {
            for (int64_t k = 0; k < d; ++k) o[k] = t[k] * scale;
        }
    }
    return -1;
}

/* Its backward for the table: dtable (V, D) = Σ over the rows r = i · B + b with that id of dout[r] · scale,
 * each row added in ascending r from 0 (torch's embedding backward order, after its mul's rounding: the
 * same bits). `order` (B · N) and `start` (2 · V + 1) are the caller's buffers for the rows bucketed by id. */
void mlpmixer_embed_backward_f32(float *dtable, int64_t *order, int64_t *start, const float *dout,
                                 const int64_t *ids, int64_t batch, int64_t n, int64_t d, int64_t vocab,
                                 float scale, int nthreads) {
    memset(start, 0, (size_t)(vocab + 1) * sizeof(int64_t));
    for (int64_t r = 0; r < n * batch; ++r) ++start[ids[(r % batch) * n + r / batch] + 1];
    for (int64_t v = 0; v < vocab; ++v) start[v + 1] += start[v];
    int64_t *next = start + vocab + 1;  /* where each id's next row goes */
    memcpy(next, start, (size_t)vocab * sizeof(int64_t));
    for (int64_t r = 0; r < n * batch; ++r) order[next[ids[(r % batch) * n + r / batch]]++] = r;
    _Pragma("omp parallel for num_threads(nthreads) schedule(dynamic, 4) if(batch * n * d >= PARALLEL_MIN)")
    for (int64_t v = 0; v < vocab; ++v) {
        float *restrict acc = dtable + v * d;
        memset(acc, 0, (size_t)d * sizeof(float));
        for (int64_t j = start[v]; j < start[v + 1]; ++j) {
            const float *restrict g = dout + order[j] * d;
            for (int64_t k = 0; k < d; ++k) acc[k] += g[k] * scale;
        }
    }
}

/* Autocast's casts in the residual node (mlpmixer.node), without a dispatch and a TensorIterator each (issue
 * 17: about 3-5 µs apiece for the MLM seed configuration's small weights, 96 a step, while the second thread
 * waits). mlpmixer_to_bf16: float32 to bfloat16 rounded as torch's .to(torch.bfloat16), then, where
 * scale != 1, times scale rounded again as torch's bfloat16 `t * scale` (the product in float32): a weight,
 * and W2 with its hidden dropout's scale. mlpmixer_to_f32: bfloat16 to float32 (exact) after, where
 * scale != 1, the same bfloat16 product: a product's gradient back in the parameter's dtype. */
void mlpmixer_to_bf16(uint16_t *out, const float *x, int64_t n, float scale, int nthreads) {
    const int64_t whole = n / V * V;
    _Pragma("omp parallel for num_threads(nthreads) schedule(static) if(n >= PARALLEL_MIN)")
    for (int64_t k = 0; k < whole; k += V) {
        vstore_bf16(out + k, vload_f32(x + k));
        if (scale != 1.0f) vstore_bf16(out + k, vload_bf16(out + k) * scale);
    }
    for (int64_t k = whole; k < n; ++k) {
        out[k] = store_bf16(x[k]);
        if (scale != 1.0f) out[k] = store_bf16(load_bf16(out[k]) * scale);
    }
}

void mlpmixer_to_f32(float *out, const uint16_t *x, int64_t n, float scale, int nthreads) {
    const int64_t whole = n / V * V;
    _Pragma("omp parallel for num_threads(nthreads) schedule(static) if(n >= PARALLEL_MIN)")
    for (int64_t k = 0; k < whole; k += V) {
        vf f = vload_bf16(x + k);
        if (scale != 1.0f) {
            uint16_t r[V];
            vstore_bf16(r, f * scale);
            f = vload_bf16(r);
        }
        vstore_f32(out + k, f);
    }
    for (int64_t k = whole; k < n; ++k)
        out[k] = load_bf16(scale != 1.0f ? store_bf16(load_bf16(x[k]) * scale) : x[k]);
}
