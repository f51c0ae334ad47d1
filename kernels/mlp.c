/* tern training kernels for a dense MLP (ReLU hidden layers, softmax cross-entropy).
 *
 * Built freestanding for wasm32 with SIMD128; the ABI is documented in README.md and
 * checked against kernels/reference.py (the numpy oracle). Arithmetic follows the
 * reference step by step in float32 (matmul, then bias; grad * lr, then subtract) so
 * the two agree to float32 rounding of the summation order.
 */
#include <stddef.h>
#include <stdint.h>
#include <wasm_simd128.h>

#define TERN_ABI_VERSION 1
#define TERN_OK 0
#define TERN_ENOMEM 1
#define PAGE 65536u

#define EXPORT(name) __attribute__((export_name(name), visibility("default")))

extern unsigned char __heap_base;
static uint32_t arena_top;

static uint32_t heap_base(void) { return (uint32_t)(uintptr_t)&__heap_base; }

/* Invalid arguments are host bugs: trap rather than read out of the caller's arrays. */
static void check(int ok) {
  if (!ok) __builtin_trap();
}

EXPORT("tern_abi_version") int32_t tern_abi_version(void) { return TERN_ABI_VERSION; }

EXPORT("tern_reset") void tern_reset(void) { arena_top = heap_base(); }

/* 16-byte aligned bump allocation; grows memory; 0 when memory cannot grow. */
EXPORT("tern_alloc") uint32_t tern_alloc(uint32_t nbytes) {
  if (arena_top == 0) arena_top = heap_base();
  uint64_t p = ((uint64_t)arena_top + 15u) & ~(uint64_t)15u;
  uint64_t end = p + nbytes;
  uint64_t have = (uint64_t)__builtin_wasm_memory_size(0) * PAGE;
  if (end > 0xFFFFFFF0ull) return 0;
  if (end > have) {
    uint64_t pages = (end - have + PAGE - 1) / PAGE;
    if (__builtin_wasm_memory_grow(0, (size_t)pages) == (size_t)-1) return 0;
  }
  arena_top = (uint32_t)end;
  return (uint32_t)p;
}

/* ---- exp and log, computed in double and rounded once to float ---- */

static const double LN2_HI = 6.93147180369123816490e-01;
static const double LN2_LO = 1.90821492927058770002e-10;
static const double INV_LN2 = 1.44269504088896338700e+00;

static double exp_d(double x) {
  if (x < -800.0) return 0.0;
  if (x > 709.0) return __builtin_inf();
  double t = x * INV_LN2;
  int32_t k = (int32_t)(t < 0 ? t - 0.5 : t + 0.5);
  double r = (x - (double)k * LN2_HI) - (double)k * LN2_LO;
  /* Taylor to r^11: |r| <= 0.35, so the remainder is below 3e-13, far under the f32
   * rounding that follows. Even and odd terms go in two short Horner chains. */
  double r2 = r * r;
  double e = ((((1.0 / 3628800.0) * r2 + 1.0 / 40320.0) * r2 + 1.0 / 720.0) * r2 + 1.0 / 24.0) * r2;
  e = (e + 0.5) * r2 + 1.0;
  double o = ((((1.0 / 39916800.0) * r2 + 1.0 / 362880.0) * r2 + 1.0 / 5040.0) * r2 + 1.0 / 120.0) * r2;
  o = ((o + 1.0 / 6.0) * r2 + 1.0) * r;
  double p = e + o;
  /* 2^k in two steps so k below the normal range still scales correctly */
  int32_t k1 = k / 2, k2 = k - k1;
  union { uint64_t u; double d; } s1 = {(uint64_t)(k1 + 1023) << 52}, s2 = {(uint64_t)(k2 + 1023) << 52};
  return p * s1.d * s2.d;
}

/* log for finite x >= 1 (a softmax denominator) or any positive normal double */
static double log_d(double x) {
  union { double d; uint64_t u; } v = {x};
  int32_t e = (int32_t)((v.u >> 52) & 0x7ff) - 1023;
  v.u = (v.u & 0x000fffffffffffffull) | 0x3ff0000000000000ull;
  double m = v.d;
  if (m > 1.41421356237309504880) {
    m *= 0.5;
    e += 1;
  }
  double s = (m - 1.0) / (m + 1.0), s2 = s * s;
  double p = 1.0 / 19.0;
  for (int i = 17; i >= 1; i -= 2) p = p * s2 + 1.0 / (double)i;
  return (double)e * LN2_HI + ((double)e * LN2_LO + 2.0 * s * p);
}

static float expf_(float x) { return (float)exp_d((double)x); }
static float logf_(float x) { return (float)log_d((double)x); }

/* ---- the matrix products: one register-blocked micro-kernel ----
 *
 * C[M x N] = A[M x K] @ B[K x N] in 8 x 8 tiles (sixteen f32x4 accumulators) where the left
 * operand is read transposed, else 4 x 8 (eight). The 8 x 8 tile takes k in steps of two,
 * acc + (p0 + p1); the 4 x 8 tile in steps of three, acc + ((p0 + p1) + p2); the last
 * products are added one at a time. No fused multiply-add and no relaxed SIMD, so a tile
 * gives the same bits on every host. Tiles are instantiated with constant shapes; edges
 * use 4 x 4, 1 x 8 and 1 x 4 tiles, and the last N % 4 columns go through a zero-padded
 * copy of B.
 *
 * Why these shapes: under fuel metering wasmtime checks fuel at every loop head, and the
 * out-of-fuel path is a call that clobbers every vector register, so Cranelift keeps all
 * accumulators in stack slots across the back edge: each pass of the k loop loads and
 * stores every accumulator and waits on that store-to-load round trip. So a pass should
 * do as much work per accumulator as fits: summing a step's products as a small tree adds
 * into each accumulator once per step, and a step is as long as its loads still fit the
 * sixteen vector registers (Cranelift issues a block's loads first and its arithmetic
 * where it is used): two k for 8 x 8 (four loads of A, four of B), three for 4 x 8. The
 * larger tile also halves the loads of B and the loop overhead per product. Measured on
 * the demo MLP (one epoch through WasmTrainer.train, fuel on, one core): 4 x 8 tiles in
 * steps of two summed in order 1.65 ms, in steps of three 1.56 ms; 8 x 8 tiles (with the
 * shorter exp above) 1.47 ms.
 *
 * `trans` reads A transposed (A[i][k] at A[k * lda + i]): four rows splatted from one load.
 * The epilogue is fused: add a bias row (E, lde = 0), then ReLU; or keep C only where a
 * mask (E) is positive.
 */

#define INLINE static inline __attribute__((always_inline))

enum { EP_STORE, EP_ADD, EP_ADD_RELU, EP_MASK };

INLINE v128_t epilogue(int ep, v128_t c, const float *e) {
  if (ep == EP_ADD || ep == EP_ADD_RELU) c = wasm_f32x4_add(c, wasm_v128_load(e));
  if (ep == EP_ADD_RELU) c = wasm_f32x4_max(c, wasm_f32x4_splat(0.0f));
  if (ep == EP_MASK) c = wasm_v128_and(c, wasm_f32x4_gt(wasm_v128_load(e), wasm_f32x4_splat(0.0f)));
  return c;
}

INLINE float epilogue1(int ep, float c, float e) {
  if (ep == EP_ADD || ep == EP_ADD_RELU) c += e;
  if (ep == EP_ADD_RELU && !(c > 0.0f)) c = 0.0f;
  if (ep == EP_MASK && !(e > 0.0f)) c = 0.0f;
  return c;
}

/* The mr rows of A and the nv vectors of B at one k */
INLINE void load_k(int mr, int nv, int trans, v128_t a[8], v128_t b[2], int32_t k, const float *A,
                   int32_t lda, const float *B, int32_t ldb) {
  for (int v = 0; v < nv; v++) b[v] = wasm_v128_load(B + k * ldb + 4 * v);
  if (trans && mr % 4 == 0) {
    for (int h = 0; h < mr; h += 4) {
      v128_t t = wasm_v128_load(A + k * lda + h);
      a[h + 0] = wasm_i32x4_shuffle(t, t, 0, 0, 0, 0);
      a[h + 1] = wasm_i32x4_shuffle(t, t, 1, 1, 1, 1);
      a[h + 2] = wasm_i32x4_shuffle(t, t, 2, 2, 2, 2);
      a[h + 3] = wasm_i32x4_shuffle(t, t, 3, 3, 3, 3);
    }
  } else {
    for (int r = 0; r < mr; r++)
      a[r] = wasm_v128_load32_splat(trans ? A + k * lda + r : A + r * lda + k);
  }
}

#define MUL wasm_f32x4_mul
#define ADD wasm_f32x4_add

/* One mr x (4 * nv) tile of C at (0, 0) of the given A, B, C, E views. */
INLINE void tile(int mr, int nv, int trans, int ep, int32_t K, const float *A, int32_t lda,
                 const float *B, int32_t ldb, float *C, int32_t ldc, const float *E, int32_t lde) {
  v128_t acc[8][2];
  for (int r = 0; r < mr; r++)
    for (int v = 0; v < nv; v++) acc[r][v] = wasm_f32x4_splat(0.0f);
  int32_t k = 0;
  if (mr == 8) {
    for (; k + 2 <= K; k += 2) {
      v128_t a0[8], a1[8], b0[2], b1[2];
      load_k(mr, nv, trans, a0, b0, k, A, lda, B, ldb);
      load_k(mr, nv, trans, a1, b1, k + 1, A, lda, B, ldb);
      for (int r = 0; r < mr; r++)
        for (int v = 0; v < nv; v++)
          acc[r][v] = ADD(acc[r][v], ADD(MUL(a0[r], b0[v]), MUL(a1[r], b1[v])));
    }
  } else {
    for (; k + 3 <= K; k += 3) {
      v128_t a0[8], a1[8], a2[8], b0[2], b1[2], b2[2];
      load_k(mr, nv, trans, a0, b0, k, A, lda, B, ldb);
      load_k(mr, nv, trans, a1, b1, k + 1, A, lda, B, ldb);
      load_k(mr, nv, trans, a2, b2, k + 2, A, lda, B, ldb);
      for (int r = 0; r < mr; r++)
        for (int v = 0; v < nv; v++)
          acc[r][v] = ADD(acc[r][v], ADD(ADD(MUL(a0[r], b0[v]), MUL(a1[r], b1[v])), MUL(a2[r], b2[v])));
    }
  }
  for (; k < K; k++) {
    v128_t a[8], b[2];
    load_k(mr, nv, trans, a, b, k, A, lda, B, ldb);
    for (int r = 0; r < mr; r++)
      for (int v = 0; v < nv; v++) acc[r][v] = ADD(acc[r][v], MUL(a[r], b[v]));
  }
  for (int r = 0; r < mr; r++)
    for (int v = 0; v < nv; v++)
      wasm_v128_store(C + r * ldc + 4 * v, epilogue(ep, acc[r][v], E + r * lde + 4 * v));
}

/* All rows of C for the column block [j, j + 4 * nv). */
INLINE void column_block(int nv, int trans, int ep, int32_t M, int32_t K, const float *A,
                         int32_t lda, const float *B, int32_t ldb, float *C, int32_t ldc,
                         const float *E, int32_t lde) {
  int32_t i = 0;
  if (trans)
    for (; i + 8 <= M; i += 8)
      tile(8, nv, trans, ep, K, A + i, lda, B, ldb, C + i * ldc, ldc, E + i * lde, lde);
  for (; i + 4 <= M; i += 4)
    tile(4, nv, trans, ep, K, trans ? A + i : A + i * lda, lda, B, ldb, C + i * ldc, ldc,
         E + i * lde, lde);
  for (; i < M; i++)
    tile(1, nv, trans, ep, K, trans ? A + i : A + i * lda, lda, B, ldb, C + i * ldc, ldc,
         E + i * lde, lde);
}

/* C = epilogue(op(A) @ B); pad is scratch for 4 * K floats. */
INLINE void gemm(int trans, int ep, int32_t M, int32_t N, int32_t K, const float *A, int32_t lda,
                 const float *B, int32_t ldb, float *C, int32_t ldc, const float *E, int32_t lde,
                 float *pad) {
  int32_t j = 0;
  for (; j + 8 <= N; j += 8) column_block(2, trans, ep, M, K, A, lda, B + j, ldb, C + j, ldc, E + j, lde);
  for (; j + 4 <= N; j += 4) column_block(1, trans, ep, M, K, A, lda, B + j, ldb, C + j, ldc, E + j, lde);
  if (j == N) return;
  /* the last N % 4 columns: B's tail padded with zeros to 4 wide, C through a 4-float row */
  int32_t rem = N - j;
  for (int32_t k = 0; k < K; k++)
    for (int32_t c = 0; c < 4; c++) pad[4 * k + c] = c < rem ? B[k * ldb + j + c] : 0.0f;
  float rows[16];
  for (int32_t i = 0; i < M; i += 4) {
    int32_t mr = M - i < 4 ? M - i : 4;
    const float *Ai = trans ? A + i : A + i * lda;
    if (mr == 4)
      tile(4, 1, trans, EP_STORE, K, Ai, lda, pad, 4, rows, 4, rows, 0);
    else
      for (int32_t r = 0; r < mr; r++)
        tile(1, 1, trans, EP_STORE, K, trans ? Ai + r : Ai + r * lda, lda, pad, 4, rows + 4 * r, 4,
             rows, 0);
    for (int32_t r = 0; r < mr; r++)
      for (int32_t c = 0; c < rem; c++)
        C[(i + r) * ldc + j + c] =
            epilogue1(ep, rows[4 * r + c], ep == EP_STORE ? 0.0f : E[(i + r) * lde + j + c]);
  }
}

/* Forward layer: Z = A @ W + bias, then ReLU when `relu`; AT is A transposed, (K, M). */
__attribute__((noinline)) static void gemm_bias(int relu, int32_t M, int32_t N, int32_t K,
                                                const float *AT, const float *W, const float *bias,
                                                float *Z, float *pad) {
  if (relu)
    gemm(1, EP_ADD_RELU, M, N, K, AT, M, W, N, Z, N, bias, 0, pad);
  else
    gemm(1, EP_ADD, M, N, K, AT, M, W, N, Z, N, bias, 0, pad);
}

/* Weight gradient: GW[K x N] = A^T @ G with A [M x K], G [M x N]. */
__attribute__((noinline)) static void gemm_at(int32_t M, int32_t N, int32_t K, const float *A,
                                              const float *G, float *GW, float *pad) {
  gemm(1, EP_STORE, K, N, M, A, K, G, N, GW, N, GW, 0, pad); /* E unused */
}

/* Backward delta: D[M x N] = (G[M x K] @ WT[K x N]) where mask[M x N] > 0, else 0; GT is
 * G transposed, (K, M). */
__attribute__((noinline)) static void gemm_mask(int32_t M, int32_t N, int32_t K, const float *GT,
                                                const float *WT, const float *mask, float *D,
                                                float *pad) {
  gemm(1, EP_MASK, M, N, K, GT, M, WT, N, D, N, mask, N, pad);
}

/* T[cols x rows] = S[rows x cols]^T: 4 x 4 blocks by shuffles, scalar at the edges */
static void transpose(const float *restrict s, float *restrict t, int32_t rows, int32_t cols) {
  int32_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const float *s0 = s + r * cols;
    int32_t c = 0;
    for (; c + 4 <= cols; c += 4) {
      v128_t a0 = wasm_v128_load(s0 + c), a1 = wasm_v128_load(s0 + cols + c);
      v128_t a2 = wasm_v128_load(s0 + 2 * cols + c), a3 = wasm_v128_load(s0 + 3 * cols + c);
      v128_t lo01 = wasm_i32x4_shuffle(a0, a1, 0, 4, 1, 5), hi01 = wasm_i32x4_shuffle(a0, a1, 2, 6, 3, 7);
      v128_t lo23 = wasm_i32x4_shuffle(a2, a3, 0, 4, 1, 5), hi23 = wasm_i32x4_shuffle(a2, a3, 2, 6, 3, 7);
      float *t0 = t + c * rows + r;
      wasm_v128_store(t0, wasm_i64x2_shuffle(lo01, lo23, 0, 2));
      wasm_v128_store(t0 + rows, wasm_i64x2_shuffle(lo01, lo23, 1, 3));
      wasm_v128_store(t0 + 2 * rows, wasm_i64x2_shuffle(hi01, hi23, 0, 2));
      wasm_v128_store(t0 + 3 * rows, wasm_i64x2_shuffle(hi01, hi23, 1, 3));
    }
    for (; c < cols; c++)
      for (int32_t i = 0; i < 4; i++) t[c * rows + r + i] = s0[i * cols + c];
  }
  for (; r < rows; r++)
    for (int32_t c = 0; c < cols; c++) t[c * rows + r] = s[r * cols + c];
}

/* d[0:n] = s[0:n] for a few dozen floats: an inline loop beats memory.copy, which
 * wasmtime runs as a call out of the module */
static void copy(float *restrict d, const float *restrict s, int32_t n) {
  int32_t j = 0;
  for (; j + 8 <= n; j += 8) {
    wasm_v128_store(d + j, wasm_v128_load(s + j));
    wasm_v128_store(d + j + 4, wasm_v128_load(s + j + 4));
  }
  for (; j < n; j++) d[j] = s[j];
}

static void zero(float *p, int32_t n) {
  int32_t j = 0;
  v128_t z = wasm_f32x4_splat(0.0f);
  for (; j + 4 <= n; j += 4) wasm_v128_store(p + j, z);
  for (; j < n; j++) p[j] = 0.0f;
}

/* ---- the model ---- */

typedef struct {
  int32_t nl;            /* layers (weight matrices) */
  const int32_t *sizes;  /* nl + 1 widths, input first */
  int32_t params;        /* flat parameter count */
  int32_t widest;
  int32_t act_floats;    /* per sample: sum of all widths */
  int32_t widest_w;      /* largest in * out of a layer */
} model;

static model model_of(int32_t nl, const int32_t *sizes) {
  check(nl >= 1);
  model m = {nl, sizes, 0, 0, 0, 0};
  for (int32_t i = 0; i <= nl; i++) {
    check(sizes[i] >= 1 && sizes[i] <= (1 << 20));
    if (sizes[i] > m.widest) m.widest = sizes[i];
    m.act_floats += sizes[i];
    if (i < nl) {
      m.params += sizes[i] * sizes[i + 1] + sizes[i + 1];
      if (sizes[i] * sizes[i + 1] > m.widest_w) m.widest_w = sizes[i] * sizes[i + 1];
    }
  }
  return m;
}

typedef struct {
  float *acts;   /* bs * act_floats: layer i at acts + bs * offset_i */
  int32_t *labels;
  float *delta, *delta2;
  float *wt;   /* one layer's weights transposed, (out, in) */
  float *at;   /* one layer's input (or delta) transposed, (width, bs) */
  float *pad;  /* 4 * max(widest, bs): B's last N % 4 columns, zero-padded */
} scratch;

static int alloc_scratch(const model *m, int32_t bs, scratch *s) {
  s->acts = (float *)(uintptr_t)tern_alloc((uint32_t)(4 * bs * m->act_floats));
  s->labels = (int32_t *)(uintptr_t)tern_alloc((uint32_t)(4 * bs));
  s->delta = (float *)(uintptr_t)tern_alloc((uint32_t)(4 * bs * m->widest));
  s->delta2 = (float *)(uintptr_t)tern_alloc((uint32_t)(4 * bs * m->widest));
  s->wt = (float *)(uintptr_t)tern_alloc((uint32_t)(4 * m->widest_w));
  s->at = (float *)(uintptr_t)tern_alloc((uint32_t)(4 * bs * m->widest));
  s->pad = (float *)(uintptr_t)tern_alloc((uint32_t)(16 * (bs > m->widest ? bs : m->widest)));
  return s->acts && s->labels && s->delta && s->delta2 && s->wt && s->at && s->pad;
}

/* Copy the rows idx[0:bs] (identity when idx is 0) into acts[0] and their labels. */
static void gather(const model *m, const float *x, const int32_t *y, int32_t n, const int32_t *idx,
                   int32_t bs, scratch *s) {
  int32_t in = m->sizes[0], classes = m->sizes[m->nl];
  for (int32_t b = 0; b < bs; b++) {
    int32_t r = idx ? idx[b] : b;
    check(r >= 0 && r < n);
    check(y[r] >= 0 && y[r] < classes);
    s->labels[b] = y[r];
    copy(s->acts + b * in, x + (size_t)r * in, in);
  }
}

/* acts[i+1] = relu(acts[i] @ w_i + b_i), no ReLU on the logits; returns the logits. */
static float *forward(const model *m, const float *w, int32_t bs, scratch *s) {
  float *a = s->acts;
  const float *p = w;
  for (int32_t i = 0; i < m->nl; i++) {
    int32_t in = m->sizes[i], out = m->sizes[i + 1];
    const float *wi = p, *bi = p + in * out;
    float *z = a + bs * in;
    transpose(a, s->at, bs, in);
    gemm_bias(i < m->nl - 1, bs, out, in, s->at, wi, bi, z, s->pad);
    a = z;
    p = bi + out;
  }
  return a;
}

/* Log-softmax of one row of logits into out, in the reference's float32 steps. */
static void log_softmax_row(const float *logits, float *out, int32_t c) {
  float mx = logits[0];
  for (int32_t j = 1; j < c; j++)
    if (logits[j] > mx) mx = logits[j];
  float sum = 0.0f;
  for (int32_t j = 0; j < c; j++) {
    out[j] = logits[j] - mx;
    sum += expf_(out[j]);
  }
  float lse = logf_(sum);
  for (int32_t j = 0; j < c; j++) out[j] -= lse;
}

/* Mean cross-entropy gradient of the batch in scratch into grad (flat, spec order);
 * returns the summed loss (not yet divided by bs). */
static double backward(const model *m, const float *w, int32_t bs, scratch *s, float *grad) {
  int32_t nl = m->nl, classes = m->sizes[nl];
  float *logits = forward(m, w, bs, s);
  float *g = s->delta, *g2 = s->delta2;
  float inv = (float)(1.0 / (double)bs);
  double loss = 0.0;
  for (int32_t b = 0; b < bs; b++) {
    float *gr = g + b * classes;
    log_softmax_row(logits + b * classes, gr, classes);
    loss -= (double)gr[s->labels[b]];
    for (int32_t j = 0; j < classes; j++) gr[j] = expf_(gr[j]);
    gr[s->labels[b]] -= 1.0f;
    for (int32_t j = 0; j < classes; j++) gr[j] *= inv;
  }
  /* offsets of each layer's weights and activations */
  int32_t woff[64], aoff[65];
  check(nl < 64);
  woff[0] = 0;
  aoff[0] = 0;
  for (int32_t i = 0; i < nl; i++) {
    woff[i + 1] = woff[i] + m->sizes[i] * m->sizes[i + 1] + m->sizes[i + 1];
    aoff[i + 1] = aoff[i] + bs * m->sizes[i];
  }
  for (int32_t i = nl - 1; i >= 0; i--) {
    int32_t in = m->sizes[i], out = m->sizes[i + 1];
    const float *a = s->acts + aoff[i];
    float *gw = grad + woff[i], *gb = gw + in * out;
    gemm_at(bs, out, in, a, g, gw, s->pad);
    zero(gb, out);
    for (int32_t b = 0; b < bs; b++) {
      const float *gr = g + b * out;
      int32_t j = 0;
      for (; j + 4 <= out; j += 4)
        wasm_v128_store(gb + j, wasm_f32x4_add(wasm_v128_load(gb + j), wasm_v128_load(gr + j)));
      for (; j < out; j++) gb[j] += gr[j];
    }
    if (i > 0) {
      transpose(w + woff[i], s->wt, in, out);
      transpose(g, s->at, bs, out);
      gemm_mask(bs, in, out, s->at, s->wt, a, g2, s->pad);
      float *t = g;
      g = g2;
      g2 = t;
    }
  }
  return loss;
}

EXPORT("tern_loss_and_grad")
int32_t tern_loss_and_grad(int32_t nl, const int32_t *sizes, const float *w, const float *x,
                           const int32_t *y, int32_t n, float *grad, double *loss) {
  model m = model_of(nl, sizes);
  check(n >= 1);
  uint32_t mark = arena_top;
  scratch s;
  if (!alloc_scratch(&m, n, &s)) {
    arena_top = mark;
    return TERN_ENOMEM;
  }
  gather(&m, x, y, n, 0, n, &s);
  *loss = backward(&m, w, n, &s, grad) / (double)n;
  arena_top = mark;
  return TERN_OK;
}

/* One epoch of minibatch SGD over the samples in `order` (n indices), updating w in place. */
EXPORT("tern_train_epoch")
int32_t tern_train_epoch(int32_t nl, const int32_t *sizes, float *w, const float *x,
                         const int32_t *y, const int32_t *order, int32_t n, int32_t batch,
                         float lr) {
  model m = model_of(nl, sizes);
  check(n >= 1 && batch >= 1);
  int32_t bs_max = batch < n ? batch : n;
  uint32_t mark = arena_top;
  scratch s;
  float *grad = (float *)(uintptr_t)tern_alloc((uint32_t)(4 * m.params));
  if (!grad || !alloc_scratch(&m, bs_max, &s)) {
    arena_top = mark;
    return TERN_ENOMEM;
  }
  for (int32_t start = 0; start < n; start += batch) {
    int32_t bs = n - start < batch ? n - start : batch;
    gather(&m, x, y, n, order + start, bs, &s);
    backward(&m, w, bs, &s, grad);
    int32_t j = 0;
    v128_t vl = wasm_f32x4_splat(lr);
    for (; j + 8 <= m.params; j += 8) {
      wasm_v128_store(w + j, wasm_f32x4_sub(wasm_v128_load(w + j),
                                            wasm_f32x4_mul(wasm_v128_load(grad + j), vl)));
      wasm_v128_store(w + j + 4, wasm_f32x4_sub(wasm_v128_load(w + j + 4),
                                                wasm_f32x4_mul(wasm_v128_load(grad + j + 4), vl)));
    }
    for (; j < m.params; j++) w[j] -= grad[j] * lr;
  }
  arena_top = mark;
  return TERN_OK;
}

/* Mean cross-entropy and accuracy over n samples, `chunk` rows at a time: out[0], out[1]. */
EXPORT("tern_evaluate")
int32_t tern_evaluate(int32_t nl, const int32_t *sizes, const float *w, const float *x,
                      const int32_t *y, int32_t n, int32_t chunk, double *out) {
  model m = model_of(nl, sizes);
  check(n >= 1 && chunk >= 1);
  int32_t classes = m.sizes[nl], bs_max = chunk < n ? chunk : n;
  uint32_t mark = arena_top;
  scratch s;
  if (!alloc_scratch(&m, bs_max, &s)) {
    arena_top = mark;
    return TERN_ENOMEM;
  }
  double loss = 0.0;
  int32_t correct = 0;
  for (int32_t start = 0; start < n; start += chunk) {
    int32_t bs = n - start < chunk ? n - start : chunk;
    check(start <= n);
    /* identity rows start..start+bs: gather from the shifted base */
    gather(&m, x + (size_t)start * m.sizes[0], y + start, n - start, 0, bs, &s);
    float *logits = forward(&m, w, bs, &s);
    for (int32_t b = 0; b < bs; b++) {
      float *lp = s.delta + b * classes;
      log_softmax_row(logits + b * classes, lp, classes);
      loss -= (double)lp[s.labels[b]];
      int32_t best = 0;
      for (int32_t j = 1; j < classes; j++)
        if (lp[j] > lp[best]) best = j;
      correct += best == s.labels[b];
    }
  }
  out[0] = loss / (double)n;
  out[1] = (double)correct / (double)n;
  arena_top = mark;
  return TERN_OK;
}
