// qkv's CPU kernel for interval masks: softmax attention where query row i sees the
// keys lo[i] <= k <= hi[i] (causal, sliding windows, documents, padding, prefix-LM and
// their intersections). Forward only; the backward pass reuses the saved output and
// log-sum-exp (see _chunked.py).
//
// Work is split into blocks of BQ query rows of one (batch, head). A block visits the
// union of its rows' key intervals in chunks of at most BK keys: one GEMM for the
// scores, the row masks applied from the bounds (no mask tensor), an online softmax
// (FlashAttention, arXiv:2205.14135), and one GEMM accumulating straight into the
// output rows. The GEMMs are the BLAS `?gemm_` that PyTorch itself links, passed in
// as a function pointer; threads come from OpenMP.
//
// Built on first use by qkv.backends.native.build with the host's C++ compiler; plain C++
// with no PyTorch headers so that the build takes about a second.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <omp.h>

namespace {

constexpr int64_t BQ = 32;   // query rows per block
constexpr int64_t BK = 512;  // keys per chunk

typedef void (*sgemm_t)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                        const int*, const float*, const int*, const float*, float*, const int*);
typedef void (*dgemm_t)(const char*, const char*, const int*, const int*, const int*, const double*,
                        const double*, const int*, const double*, const int*, const double*, double*, const int*);

// Column-major C = alpha * op(A) op(B) + beta * C, through the BLAS routine for T.
template <typename T> struct Gemm;
template <> struct Gemm<float> {
  sgemm_t fn;
  void operator()(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                  int ldb, float beta, float* c, int ldc) const {
    fn(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
  }
};
template <> struct Gemm<double> {
  dgemm_t fn;
  void operator()(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
                  int ldb, double beta, double* c, int ldc) const {
    fn(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
  }
};

// exp(x) for x <= 0 in float32 (relative error ~2e-7), written so the compiler vectorises
// the loops that call it: 2^n * p(r) with n = round(x / ln 2) and a degree-6 polynomial.
// Below -87 (where float32 leaves its normal range) it is 0, so exp(-inf) = 0; NaN stays NaN.
inline float exp_nonpos(float x) {
  const bool tiny = x < -87.0f;
  x = tiny ? -87.0f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits
  float t = x * 1.44269504088896341f + shifter;
  int32_t ti;
  std::memcpy(&ti, &t, 4);
  float n = t - shifter;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (ti - 0x4B400000 + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return tiny ? 0.0f : p * scale;
}
inline double exp_nonpos(double x) { return std::exp(x); }

// s[0:w): exp(s - m) on [a, e), 0 elsewhere; returns the sum.
template <typename T> T exp_row(T* s, int64_t w, int64_t a, int64_t e, T m) {
  T sum = 0;
  for (int64_t j = 0; j < a; ++j) s[j] = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = a; j < e; ++j) {
    T p = exp_nonpos(s[j] - m);
    s[j] = p;
    sum += p;
  }
  for (int64_t j = e; j < w; ++j) s[j] = 0;
  return sum;
}

// The largest non-NaN score of s[a:e) (-inf if none): a NaN score is caught by the sum of exponentials instead.
template <typename T> T row_max(const T* s, int64_t a, int64_t e) {
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = a; j < e; ++j) mx = s[j] > mx ? s[j] : mx;
  return mx;
}

template <typename T> void fill_nan(T* o, int64_t n) {
  for (int64_t d = 0; d < n; ++d) o[d] = std::numeric_limits<T>::quiet_NaN();
}

// One output row from scratch over its own keys lo..hi, given its softmax max m and sum l: keys whose
// score is -inf do not reach it; any non-finite value of a key that does makes the whole row NaN.
template <typename T>
void exact_row(const T* q, const T* K, int64_t k_stride, const T* V, int64_t v_stride, int64_t lo, int64_t hi,
               int64_t D, int64_t Dv, T scale, T m, T l, T* o) {
  for (int64_t d = 0; d < Dv; ++d) o[d] = 0;
  for (int64_t j = lo; j <= hi; ++j) {
    const T* kj = K + j * k_stride;
    T s = 0;
    for (int64_t d = 0; d < D; ++d) s += q[d] * kj[d];
    s *= scale;
    if (s == -std::numeric_limits<T>::infinity()) continue;
    const T p = std::exp(s - m) / l;
    const T* vj = V + j * v_stride;
    for (int64_t d = 0; d < Dv; ++d) o[d] += p * vj[d];
  }
  T check = 0;
  for (int64_t d = 0; d < Dv; ++d) check += o[d] * T(0);
  if (!(check == T(0))) fill_nan(o, Dv);
}

struct Shape {
  int64_t B, Hq, Hkv, Tq, Tk, D, Dv;
};
struct Strides {  // in elements: batch, head, row (the feature stride is 1)
  int64_t q[3], k[3], v[3], o[3], l[2];
};

template <typename T>
void interval_attention(const Gemm<T>& gemm, const T* q, const T* k, const T* v, T* out, T* lse, const int64_t* lo,
                        const int64_t* hi, int64_t bound_batch_stride, const Shape& n, const Strides& st, T scale,
                        int threads) {
  const int64_t blocks = (n.Tq + BQ - 1) / BQ;
  const int64_t items = n.B * n.Hq * blocks;
  const int64_t group = n.Hq / n.Hkv;
  const T inf = std::numeric_limits<T>::infinity();
#pragma omp parallel num_threads(threads)
  {
    T* S = static_cast<T*>(std::malloc(sizeof(T) * BQ * BK));
    T m[BQ], l[BQ], alpha[BQ];
    int64_t rlo[BQ], rhi[BQ];
#pragma omp for schedule(dynamic, 4)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t blk = it % blocks, bh = it / blocks, h = bh % n.Hq, b = bh / n.Hq, hk = h / group;
      const int64_t r0 = blk * BQ, rows = std::min(BQ, n.Tq - r0);
      const int64_t* LO = lo + b * bound_batch_stride + r0;
      const int64_t* HI = hi + b * bound_batch_stride + r0;
      int64_t kmin = n.Tk, kmax = -1, common_lo = 0, common_hi = n.Tk - 1;
      for (int64_t i = 0; i < rows; ++i) {
        rlo[i] = std::max<int64_t>(LO[i], 0);
        rhi[i] = std::min<int64_t>(HI[i], n.Tk - 1);
        common_lo = std::max(common_lo, rlo[i]);
        common_hi = std::min(common_hi, rhi[i]);
        if (rlo[i] <= rhi[i]) {
          kmin = std::min(kmin, rlo[i]);
          kmax = std::max(kmax, rhi[i]);
        }
      }
      const T* Q = q + b * st.q[0] + h * st.q[1] + r0 * st.q[2];
      T* O = out + b * st.o[0] + h * st.o[1] + r0 * st.o[2];
      T* L = lse + b * st.l[0] + h * st.l[1] + r0;
      if (kmax < kmin) {  // no row of the block sees a key
        for (int64_t i = 0; i < rows; ++i) {
          std::memset(O + i * st.o[2], 0, sizeof(T) * n.Dv);
          L[i] = -inf;
        }
        continue;
      }
      for (int64_t i = 0; i < rows; ++i) {
        m[i] = -inf;
        l[i] = 0;
      }
      bool first = true;
      for (int64_t c0 = kmin; c0 <= kmax; c0 += BK) {
        const int64_t c1 = std::min(c0 + BK, kmax + 1), w = c1 - c0;
        const T* K = k + b * st.k[0] + hk * st.k[1] + c0 * st.k[2];
        const T* V = v + b * st.v[0] + hk * st.v[1] + c0 * st.v[2];
        // S (rows x w, row-major, leading dim BK) = scale * Q K^T
        gemm('T', 'N', (int)w, (int)rows, (int)n.D, scale, K, (int)st.k[2], Q, (int)st.q[2], T(0), S, (int)BK);
        const bool whole = common_lo <= c0 && common_hi >= c1 - 1;  // every row sees the whole chunk
        for (int64_t i = 0; i < rows; ++i) {
          T* s = S + i * BK;
          const int64_t a = whole ? 0 : std::max(rlo[i], c0) - c0;
          const int64_t e = whole ? w : std::min(rhi[i], c1 - 1) - c0 + 1;
          if (e <= a) {  // this row sees nothing in the chunk: it keeps its state
            std::memset(s, 0, sizeof(T) * w);
            alpha[i] = 1;
            continue;
          }
          // Non-finite scores follow qkv's rule without a test per score: -inf gives p = 0 (the key does
          // not reach the row), NaN gives a NaN sum, and a +inf maximum gives exp(inf - inf) = NaN.
          const T mnew = std::max(m[i], row_max(s, a, e));
          alpha[i] = m[i] == -inf ? T(0) : exp_nonpos(m[i] - mnew);
          l[i] = l[i] * alpha[i] + exp_row(s, w, a, e, mnew == -inf ? T(0) : mnew);
          m[i] = mnew;
        }
        if (!first) {
          for (int64_t i = 0; i < rows; ++i) {
            if (alpha[i] == T(1)) continue;
            T* o = O + i * st.o[2];
            const T f = alpha[i];
#pragma omp simd
            for (int64_t d = 0; d < n.Dv; ++d) o[d] *= f;
          }
        }
        // O (rows x Dv, row-major, leading dim = output row stride) (+)= P V
        gemm('N', 'N', (int)n.Dv, (int)rows, (int)w, T(1), V, (int)st.v[2], S, (int)BK, first ? T(0) : T(1), O,
             (int)st.o[2]);
        first = false;
      }
      for (int64_t i = 0; i < rows; ++i) {
        T* o = O + i * st.o[2];
        if (m[i] == -inf && l[i] == T(0)) {  // no key reaches the row (mask or -inf scores)
          std::memset(o, 0, sizeof(T) * n.Dv);
          L[i] = -inf;
          continue;
        }
        if (!(l[i] == l[i])) {  // a NaN or +inf score reaches the row
          fill_nan(o, n.Dv);
          L[i] = std::numeric_limits<T>::quiet_NaN();
          continue;
        }
        const T f = T(1) / l[i];
        T check = 0;  // NaN iff some output is not finite (x * 0 is NaN for inf and NaN)
#pragma omp simd reduction(+ : check)
        for (int64_t d = 0; d < n.Dv; ++d) {
          o[d] *= f;
          check += o[d] * T(0);
        }
        L[i] = m[i] + std::log(l[i]);
        if (!(check == T(0))) {
          // A non-finite value: the GEMM also multiplied the values of keys outside the row's interval
          // (p = 0, and 0 * NaN = NaN). Redo the row over its own keys only.
          const T* K = k + b * st.k[0] + hk * st.k[1];
          const T* V = v + b * st.v[0] + hk * st.v[1];
          exact_row(Q + i * st.q[2], K, st.k[2], V, st.v[2], rlo[i], rhi[i], n.D, n.Dv, scale, m[i], l[i], o);
        }
      }
    }
    std::free(S);
  }
}

}  // namespace

extern "C" {

// dims: B, Hq, Hkv, Tq, Tk, D, Dv. strides: q (b, h, t), k (b, h, t), v (b, h, t), out (b, h, t), lse (b, h).
// lo/hi: int64 per row, batch stride `bound_batch_stride` (0 when shared). Returns 0 on success.
int qkv_interval_attention(int is_double, void* gemm, const void* q, const void* k, const void* v, void* out,
                           void* lse, const int64_t* lo, const int64_t* hi, int64_t bound_batch_stride,
                           const int64_t* dims, const int64_t* strides, double scale, int threads) {
  Shape n{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6]};
  if (n.Hkv <= 0 || n.Hq % n.Hkv != 0 || n.D <= 0 || n.Dv <= 0) return 1;
  Strides st;
  std::memcpy(st.q, strides + 0, sizeof(int64_t) * 3);
  std::memcpy(st.k, strides + 3, sizeof(int64_t) * 3);
  std::memcpy(st.v, strides + 6, sizeof(int64_t) * 3);
  std::memcpy(st.o, strides + 9, sizeof(int64_t) * 3);
  std::memcpy(st.l, strides + 12, sizeof(int64_t) * 2);
  if (is_double) {
    interval_attention<double>(Gemm<double>{reinterpret_cast<dgemm_t>(gemm)}, static_cast<const double*>(q),
                               static_cast<const double*>(k), static_cast<const double*>(v),
                               static_cast<double*>(out), static_cast<double*>(lse), lo, hi, bound_batch_stride, n,
                               st, scale, threads);
  } else {
    interval_attention<float>(Gemm<float>{reinterpret_cast<sgemm_t>(gemm)}, static_cast<const float*>(q),
                              static_cast<const float*>(k), static_cast<const float*>(v), static_cast<float*>(out),
                              static_cast<float*>(lse), lo, hi, bound_batch_stride, n, st, (float)scale, threads);
  }
  return 0;
}

}  // extern "C"
