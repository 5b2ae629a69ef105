// qkv's CPU kernel for interval masks: softmax attention where query row i sees the keys of
// a few intervals lo[i][r] <= k <= hi[i][r] (one for causal, sliding windows, documents,
// padding, prefix-LM and their intersections; several for window | global tokens or
// block-sparse layouts), forward and backward.
//
// Work is split into blocks of query rows of one (batch, head): BQ rows, or BQL where its rows
// share most keys (block-sparse layouts, causal rows far from the diagonal). A block visits the
// union of its rows' key intervals in chunks of at most BK keys (pieces of a few ranges):
// one GEMM per piece for the scores, the row masks applied from the bounds (no mask
// tensor), an online softmax (FlashAttention, arXiv:2205.14135), and one GEMM per piece
// accumulating straight into the output rows. The backward pass recomputes the
// probabilities from the saved log-sum-exp (interval_attention_backward). The GEMMs are the
// BLAS `?gemm_` that PyTorch itself links, passed in
// as a function pointer; threads come from OpenMP.
//
// bfloat16 (interval_attention_bf16, compiled where the target has AVX-512 BF16): the same blocks and
// online softmax, with its own products (vdpbf16ps) instead of BLAS.
//
// Built on first use by qkv.backends.native.build with the host's C++ compiler; plain C++
// with no PyTorch headers so that the build takes about a second.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include <omp.h>

namespace {

constexpr int64_t BQ = 32;   // query rows per block
constexpr int64_t BQL = 128; // query rows of a large block (forward), taken when its rows share most of their keys
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

// s[0:w): exp(s - m) on the column segments [seg[2t], seg[2t+1]) (sorted, disjoint), 0 elsewhere; returns the sum.
template <typename T> T exp_segments(T* s, int64_t w, const int64_t* seg, int nseg, T m) {
  T sum = 0;
  int64_t prev = 0;
  for (int t = 0; t < nseg; ++t) {
    const int64_t a = seg[2 * t], e = seg[2 * t + 1];
    for (int64_t j = prev; j < a; ++j) s[j] = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = a; j < e; ++j) {
      T p = exp_nonpos(s[j] - m);
      s[j] = p;
      sum += p;
    }
    prev = e;
  }
  for (int64_t j = prev; j < w; ++j) s[j] = 0;
  return sum;
}

// The largest non-NaN score of s over the segments (-inf if none): a NaN score is caught by the sum of
// exponentials instead.
template <typename T> T segments_max(const T* s, const int64_t* seg, int nseg) {
  T mx = -std::numeric_limits<T>::infinity();
  for (int t = 0; t < nseg; ++t) {
#pragma omp simd reduction(max : mx)
    for (int64_t j = seg[2 * t]; j < seg[2 * t + 1]; ++j) mx = s[j] > mx ? s[j] : mx;
  }
  return mx;
}

template <typename T> void fill_nan(T* o, int64_t n) {
  for (int64_t d = 0; d < n; ++d) o[d] = std::numeric_limits<T>::quiet_NaN();
}

struct Shape {
  int64_t B, Hq, Hkv, Tq, Tk, D, Dv;
};
struct Strides {  // in elements: batch, head, row (the feature stride is 1)
  int64_t q[3], k[3], v[3], o[3], l[2];
};

// Which keys each query row sees: row i of (batch b, head h) sees the union of lo[r] <= k <= hi[r] over
// r < R, read at lo + b * sb + h * sh + i * R (slots with lo > hi are empty; sb, sh are 0 when shared).
struct RowBounds {
  const int64_t* lo;
  const int64_t* hi;
  int64_t sb, sh, R;
};

constexpr int MAXP = 32;     // pieces (key ranges) per chunk
constexpr int64_t GAP = 16;  // ranges of a block closer than this are visited as one (the keys between masked)

struct Piece {
  int64_t k0, w, off;  // keys k0 .. k0 + w - 1, at columns off .. off + w - 1 of the chunk
};

// One block of query rows: each row's intervals clipped to [0, Tk), sorted and merged (iv, count), and the
// union of all rows' intervals as sorted ranges (what the block visits, in chunks of at most BK keys).
struct BlockKeys {
  int64_t R = 1, Tk = 0;
  std::vector<int64_t> iv;  // rows x R x 2
  std::vector<int> count;
  std::vector<std::pair<int64_t, int64_t>> all, ranges;  // inclusive [first, last]

  void build(const RowBounds& rb, int64_t b, int64_t h, int64_t r0, int64_t rows, int64_t tk) {
    R = rb.R;
    Tk = tk;
    iv.resize(rows * R * 2);
    count.assign(rows, 0);
    all.clear();
    ranges.clear();
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t* L = rb.lo + b * rb.sb + h * rb.sh + (r0 + i) * R;
      const int64_t* H = rb.hi + b * rb.sb + h * rb.sh + (r0 + i) * R;
      int64_t* row = iv.data() + i * R * 2;
      int c = 0;
      for (int64_t r = 0; r < R; ++r) {  // insertion sort by start (R is small)
        const int64_t a = std::max<int64_t>(L[r], 0), e = std::min<int64_t>(H[r], Tk - 1);
        if (a > e) continue;
        int t = c++;
        for (; t > 0 && row[2 * (t - 1)] > a; --t) {
          row[2 * t] = row[2 * (t - 1)];
          row[2 * t + 1] = row[2 * (t - 1) + 1];
        }
        row[2 * t] = a;
        row[2 * t + 1] = e;
      }
      int out = 0;  // merge overlapping or touching intervals
      for (int t = 0; t < c; ++t) {
        if (out && row[2 * t] <= row[2 * (out - 1) + 1] + 1) {
          row[2 * (out - 1) + 1] = std::max(row[2 * (out - 1) + 1], row[2 * t + 1]);
        } else {
          row[2 * out] = row[2 * t];
          row[2 * out + 1] = row[2 * t + 1];
          ++out;
        }
      }
      count[i] = out;
      for (int t = 0; t < out; ++t) all.emplace_back(row[2 * t], row[2 * t + 1]);
    }
    std::sort(all.begin(), all.end());
    for (const auto& r : all) {
      if (!ranges.empty() && r.first <= ranges.back().second + GAP)
        ranges.back().second = std::max(ranges.back().second, r.second);
      else
        ranges.push_back(r);
    }
  }

  bool empty() const { return ranges.empty(); }

  // Keys the block visits (the width of its ranges).
  int64_t visited() const {
    int64_t w = 0;
    for (const auto& r : ranges) w += r.second - r.first + 1;
    return w;
  }

  // Calls fn(pieces, n, width) for each chunk: consecutive pieces of the ranges, at most BK keys in all.
  template <class F> void chunks(int64_t BK, F fn) const {
    Piece p[MAXP];
    int np = 0;
    int64_t w = 0;
    for (const auto& r : ranges) {
      for (int64_t k = r.first; k <= r.second;) {
        const int64_t take = std::min(r.second - k + 1, BK - w);
        p[np++] = Piece{k, take, w};
        w += take;
        k += take;
        if (w == BK || np == MAXP) {
          fn(p, np, w);
          np = 0;
          w = 0;
        }
      }
    }
    if (np) fn(p, np, w);
  }

  // Row i's visible columns of a chunk as sorted segments [seg[2t], seg[2t + 1]); returns how many (at most
  // count[i] + np of them: seg must hold 2 * (R + MAXP)).
  int segments(int64_t i, const Piece* p, int np, int64_t* seg) const {
    const int64_t* row = iv.data() + i * R * 2;
    const int c = count[i];
    int n = 0, r = 0;
    for (int j = 0; j < np; ++j) {
      const int64_t k0 = p[j].k0, k1 = p[j].k0 + p[j].w - 1;
      while (r < c && row[2 * r + 1] < k0) ++r;
      for (int t = r; t < c && row[2 * t] <= k1; ++t) {
        const int64_t a = std::max(row[2 * t], k0), e = std::min(row[2 * t + 1], k1);
        if (n && seg[2 * n - 1] == p[j].off + a - k0) {
          seg[2 * n - 1] = p[j].off + e - k0 + 1;  // continues the previous segment across pieces
        } else {
          seg[2 * n] = p[j].off + a - k0;
          seg[2 * n + 1] = p[j].off + e - k0 + 1;
          ++n;
        }
      }
    }
    return n;
  }
};

// One output row from scratch over its own keys (the merged intervals row[0..c)), given its softmax max m and
// sum l: keys whose score is -inf do not reach it; any non-finite value of a key that does makes the row NaN.
template <typename T>
void exact_row(const T* q, const T* K, int64_t k_stride, const T* V, int64_t v_stride, const int64_t* row, int c,
               int64_t D, int64_t Dv, T scale, T m, T l, T* o) {
  for (int64_t d = 0; d < Dv; ++d) o[d] = 0;
  for (int t = 0; t < c; ++t) {
    for (int64_t j = row[2 * t]; j <= row[2 * t + 1]; ++j) {
      const T* kj = K + j * k_stride;
      T s = 0;
      for (int64_t d = 0; d < D; ++d) s += q[d] * kj[d];
      s *= scale;
      if (s == -std::numeric_limits<T>::infinity()) continue;
      const T p = std::exp(s - m) / l;
      const T* vj = V + j * v_stride;
      for (int64_t d = 0; d < Dv; ++d) o[d] += p * vj[d];
    }
  }
  T check = 0;
  for (int64_t d = 0; d < Dv; ++d) check += o[d] * T(0);
  if (!(check == T(0))) fill_nan(o, Dv);
}

template <typename T>
void interval_attention(const Gemm<T>& gemm, const T* q, const T* k, const T* v, T* out, T* lse,
                        const RowBounds& rb, const Shape& n, const Strides& st, T scale, int threads) {
  // Blocks of BQL rows; one whose rows share most keys (block-sparse layouts, causal rows far from the
  // diagonal) runs as one (larger GEMMs), any other as BQ-row blocks (less of the union wasted per row).
  // (Only BQ-row blocks when large ones would leave threads without enough work.)
  const int64_t bql = n.B * n.Hq * ((n.Tq + BQL - 1) / BQL) >= 4 * threads ? BQL : BQ;
  const int64_t blocks = (n.Tq + bql - 1) / bql;
  const int64_t items = n.B * n.Hq * blocks;
  const int64_t group = n.Hq / n.Hkv;
  const T inf = std::numeric_limits<T>::infinity();
#pragma omp parallel num_threads(threads)
  {
    T* S = static_cast<T*>(std::malloc(sizeof(T) * BQL * BK));
    std::vector<int64_t> seg(2 * (rb.R + MAXP));
    T m[BQL], l[BQL], alpha[BQL];
    BlockKeys bk;
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t blk = it % blocks, bh = it / blocks, h = bh % n.Hq, b = bh / n.Hq, hk = h / group;
      const int64_t R0 = blk * bql, rowsL = std::min(bql, n.Tq - R0);
      const T* K = k + b * st.k[0] + hk * st.k[1];
      const T* V = v + b * st.v[0] + hk * st.v[1];
      auto run = [&](int64_t r0, int64_t rows) {  // one block of rows r0 .. r0 + rows - 1, keys in bk
        const T* Q = q + b * st.q[0] + h * st.q[1] + r0 * st.q[2];
        T* O = out + b * st.o[0] + h * st.o[1] + r0 * st.o[2];
        T* L = lse + b * st.l[0] + h * st.l[1] + r0;
        if (bk.empty()) {  // no row of the block sees a key
          for (int64_t i = 0; i < rows; ++i) {
            std::memset(O + i * st.o[2], 0, sizeof(T) * n.Dv);
            L[i] = -inf;
          }
          return;
        }
        for (int64_t i = 0; i < rows; ++i) {
          m[i] = -inf;
          l[i] = 0;
        }
        bool first = true;
        bk.chunks(BK, [&](const Piece* p, int np, int64_t w) {
          // S (rows x w, row-major, leading dim BK) = scale * Q K^T, one GEMM per piece
          for (int j = 0; j < np; ++j)
            gemm('T', 'N', (int)p[j].w, (int)rows, (int)n.D, scale, K + p[j].k0 * st.k[2], (int)st.k[2], Q,
                 (int)st.q[2], T(0), S + p[j].off, (int)BK);
          for (int64_t i = 0; i < rows; ++i) {
            T* s = S + i * BK;
            const int ns = bk.segments(i, p, np, seg.data());
            if (ns == 0) {  // this row sees nothing in the chunk: it keeps its state
              std::memset(s, 0, sizeof(T) * w);
              alpha[i] = 1;
              continue;
            }
            // Non-finite scores follow qkv's rule without a test per score: -inf gives p = 0 (the key does
            // not reach the row), NaN gives a NaN sum, and a +inf maximum gives exp(inf - inf) = NaN.
            const T mnew = std::max(m[i], segments_max(s, seg.data(), ns));
            alpha[i] = m[i] == -inf ? T(0) : exp_nonpos(m[i] - mnew);
            l[i] = l[i] * alpha[i] + exp_segments(s, w, seg.data(), ns, mnew == -inf ? T(0) : mnew);
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
          // O (rows x Dv, row-major, leading dim = output row stride) (+)= P V, one GEMM per piece
          for (int j = 0; j < np; ++j) {
            gemm('N', 'N', (int)n.Dv, (int)rows, (int)p[j].w, T(1), V + p[j].k0 * st.v[2], (int)st.v[2],
                 S + p[j].off, (int)BK, first ? T(0) : T(1), O, (int)st.o[2]);
            first = false;
          }
        });
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
            // A non-finite value: the GEMM also multiplied the values of keys outside the row's intervals
            // (p = 0, and 0 * NaN = NaN). Redo the row over its own keys only.
            exact_row(Q + i * st.q[2], K, st.k[2], V, st.v[2], bk.iv.data() + i * bk.R * 2, bk.count[i], n.D, n.Dv,
                      scale, m[i], l[i], o);
          }
        }
      };
      // Score area of the large block against its BQ-row blocks; the large one wins ties by up to 1/8
      // (its GEMMs run that much faster).
      int64_t small = 0;
      for (int64_t r0 = R0; r0 < R0 + rowsL; r0 += BQ) {
        const int64_t rows = std::min(BQ, R0 + rowsL - r0);
        bk.build(rb, b, h, r0, rows, n.Tk);
        small += bk.visited() * rows;
      }
      bk.build(rb, b, h, R0, rowsL, n.Tk);
      if (8 * bk.visited() * rowsL <= 9 * small) {
        run(R0, rowsL);
      } else {
        for (int64_t r0 = R0; r0 < R0 + rowsL; r0 += BQ) {
          const int64_t rows = std::min(BQ, R0 + rowsL - r0);
          bk.build(rb, b, h, r0, rows, n.Tk);
          run(r0, rows);
        }
      }
    }
    std::free(S);
  }
}

// Gradients of interval_attention (FlashAttention-2's backward, arXiv:2307.08691): per block of query rows
// and chunk of its keys, P = exp(S - lse) again from the saved log-sum-exp, dP = dO V^T,
// dS = P (dP - delta) with delta = rowsum(dO * O) - dlse, then dV += P^T dO, dK += scale dS^T Q and
// dQ += scale dS K: five GEMMs, no probabilities kept. Work units are (batch, kv head, a strided share of
// the query blocks); a unit loops over the kv head's query heads, so it alone writes its dQ rows, and it
// adds dK/dV into its kv head's gradients, or into a scratch copy when several units share a kv head (few
// heads for the threads), summed at the end. dq, dk, dv are zeroed by the caller, contiguous.
template <typename T>
void interval_attention_backward(const Gemm<T>& gemm, const T* q, const T* k, const T* v, const T* out,
                                 const T* lse, const T* dout, const T* dlse, T* dq, T* dk, T* dv,
                                 const RowBounds& rb, const Shape& n, const Strides& st, const int64_t* sdo,
                                 T scale, int threads) {
  constexpr int64_t BQB = 64;  // query rows per block (the dK/dV products' inner dimension)
  const int64_t blocks = (n.Tq + BQB - 1) / BQB;
  const int64_t group = n.Hq / n.Hkv, heads = n.B * n.Hkv;
  // shares per kv head: enough units to keep every thread busy
  const int64_t shares = heads >= 4 * threads ? 1 : std::min(blocks, (4 * threads + heads - 1) / heads);
  const int64_t units = heads * shares;
  const int64_t kd = n.Tk * n.D, vd = n.Tk * n.Dv;
  T* scratch_k = shares > 1 ? static_cast<T*>(std::calloc((shares - 1) * heads * kd, sizeof(T))) : nullptr;
  T* scratch_v = shares > 1 ? static_cast<T*>(std::calloc((shares - 1) * heads * vd, sizeof(T))) : nullptr;
  const T inf = std::numeric_limits<T>::infinity();
#pragma omp parallel num_threads(threads)
  {
    T* P = static_cast<T*>(std::malloc(sizeof(T) * BQB * BK));
    T* dP = static_cast<T*>(std::malloc(sizeof(T) * BQB * BK));
    std::vector<int64_t> seg(2 * (rb.R + MAXP));
    T delta[BQB], rl[BQB];
    BlockKeys bk;
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t bh = u / shares, share = u % shares, b = bh / n.Hkv, hk = bh % n.Hkv;
      const T* K = k + b * st.k[0] + hk * st.k[1];
      const T* V = v + b * st.v[0] + hk * st.v[1];
      T* dK = share ? scratch_k + ((share - 1) * heads + bh) * kd : dk + bh * kd;
      T* dV = share ? scratch_v + ((share - 1) * heads + bh) * vd : dv + bh * vd;
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t blk = share; blk < blocks; blk += shares) {
          const int64_t r0 = blk * BQB, rows = std::min(BQB, n.Tq - r0);
          bk.build(rb, b, h, r0, rows, n.Tk);
          if (bk.empty()) continue;
          const T* Q = q + b * st.q[0] + h * st.q[1] + r0 * st.q[2];
          const T* O = out + b * st.o[0] + h * st.o[1] + r0 * st.o[2];
          const T* dO = dout + b * sdo[0] + h * sdo[1] + r0 * sdo[2];
          const T* L = lse + b * st.l[0] + h * st.l[1] + r0;
          T* dQ = dq + ((b * n.Hq + h) * n.Tq + r0) * n.D;
          for (int64_t i = 0; i < rows; ++i) {
            T s = 0;
            const T* oi = O + i * st.o[2];
            const T* gi = dO + i * sdo[2];
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < n.Dv; ++d) s += oi[d] * gi[d];
            delta[i] = s - (dlse ? dlse[b * st.l[0] + h * st.l[1] + r0 + i] : T(0));
            rl[i] = L[i];
          }
          bk.chunks(BK, [&](const Piece* p, int np, int64_t w) {
            for (int j = 0; j < np; ++j) {
              gemm('T', 'N', (int)p[j].w, (int)rows, (int)n.D, scale, K + p[j].k0 * st.k[2], (int)st.k[2], Q,
                   (int)st.q[2], T(0), P + p[j].off, (int)BK);
              gemm('T', 'N', (int)p[j].w, (int)rows, (int)n.Dv, T(1), V + p[j].k0 * st.v[2], (int)st.v[2], dO,
                   (int)sdo[2], T(0), dP + p[j].off, (int)BK);
            }
            for (int64_t i = 0; i < rows; ++i) {
              T* pr = P + i * BK;
              T* gr = dP + i * BK;
              const int ns = rl[i] == -inf ? 0 : bk.segments(i, p, np, seg.data());
              exp_segments(pr, w, seg.data(), ns, rl[i]);  // P, 0 outside the row's keys
              const T di = delta[i];
              int64_t prev = 0;
              for (int t = 0; t < ns; ++t) {
                const int64_t a = seg[2 * t], e = seg[2 * t + 1];
                for (int64_t j = prev; j < a; ++j) gr[j] = 0;
#pragma omp simd
                for (int64_t j = a; j < e; ++j) gr[j] = pr[j] * (gr[j] - di);
                prev = e;
              }
              for (int64_t j = prev; j < w; ++j) gr[j] = 0;
            }
            for (int j = 0; j < np; ++j) {
              const int64_t k0 = p[j].k0, wp = p[j].w, off = p[j].off;
              gemm('N', 'T', (int)n.Dv, (int)wp, (int)rows, T(1), dO, (int)sdo[2], P + off, (int)BK, T(1),
                   dV + k0 * n.Dv, (int)n.Dv);
              gemm('N', 'T', (int)n.D, (int)wp, (int)rows, scale, Q, (int)st.q[2], dP + off, (int)BK, T(1),
                   dK + k0 * n.D, (int)n.D);
              gemm('N', 'N', (int)n.D, (int)rows, (int)wp, scale, K + k0 * st.k[2], (int)st.k[2], dP + off,
                   (int)BK, T(1), dQ, (int)n.D);
            }
          });
        }
      }
    }
    std::free(P);
    std::free(dP);
    if (shares > 1) {
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t bh = 0; bh < heads; ++bh) {
        for (int64_t s = 1; s < shares; ++s) {
          const T* sk = scratch_k + ((s - 1) * heads + bh) * kd;
          const T* sv = scratch_v + ((s - 1) * heads + bh) * vd;
          T* gk = dk + bh * kd;
          T* gv = dv + bh * vd;
#pragma omp simd
          for (int64_t x = 0; x < kd; ++x) gk[x] += sk[x];
#pragma omp simd
          for (int64_t x = 0; x < vd; ++x) gv[x] += sv[x];
        }
      }
    }
  }
  std::free(scratch_k);
  std::free(scratch_v);
}


#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define QKV_HAS_BF16 1

// bfloat16 inputs, float32 accumulation (AVX-512 BF16: vdpbf16ps multiplies pairs of bf16 and adds to
// float32 lanes). Same blocks, chunks and online softmax as above; the two products are small register-
// blocked kernels over packed copies of each key/value chunk ("pairs" layout: element (p, j, 0..1) holds
// features 2p and 2p+1 of key j, so one 32-bit broadcast of two query features meets 16 keys at once).
constexpr int64_t BK16 = 256;  // keys per chunk in bf16 (the packed chunk stays in L2)

inline float bf2f(uint16_t x) {
  uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f2bf(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// 16 floats -> 16 bfloat16 (round to nearest even), n <= 16 of them stored.
inline void store_bf16(const float* src, uint16_t* dst, int64_t n) {
  const __mmask16 mask = n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src));
  _mm256_mask_storeu_epi16(dst, mask, h);
}

// The products as R x G register tiles (R rows, G vectors of 16 lanes): R * G independent accumulators hide
// vdpbf16ps's latency, and each packed vector loaded serves R rows.
template <int R, int G>
inline void scores_tile(const uint32_t* Qp, int64_t qs, const uint16_t* Kp, int64_t ldk, int64_t pairs, float scale,
                        float* S, int64_t lds) {
  __m512 acc[R][G];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) acc[r][g] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh kv[G];
    for (int g = 0; g < G; ++g) kv[g] = (__m512bh)_mm512_loadu_si512(Kp + (p * ldk + 16 * g) * 2);
    for (int r = 0; r < R; ++r) {
      const __m512bh qb = (__m512bh)_mm512_set1_epi32(Qp[r * qs + p]);
      for (int g = 0; g < G; ++g) acc[r][g] = _mm512_dpbf16_ps(acc[r][g], qb, kv[g]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) _mm512_storeu_ps(S + r * lds + 16 * g, _mm512_mul_ps(acc[r][g], sc));
}

// S[i][j] = scale * sum_d Q[i][d] K[j][d] for i < rows, j < W (W a multiple of 16). Kp: keys packed by pairs
// of features, element (p, j, e) at (p * ldk + j) * 2 + e.
inline void scores_bf16(const uint32_t* Qp, int64_t qs, const uint16_t* Kp, int64_t ldk, int64_t pairs, int64_t W,
                        int64_t rows, float scale, float* S, int64_t lds) {
  int64_t j = 0;
  for (; j + 64 <= W; j += 64) {
    int64_t i = 0;
    for (; i + 4 <= rows; i += 4)
      scores_tile<4, 4>(Qp + i * qs, qs, Kp + j * 2, ldk, pairs, scale, S + i * lds + j, lds);
    for (; i < rows; ++i) scores_tile<1, 4>(Qp + i * qs, qs, Kp + j * 2, ldk, pairs, scale, S + i * lds + j, lds);
  }
  for (; j < W; j += 16) {
    int64_t i = 0;
    for (; i + 4 <= rows; i += 4)
      scores_tile<4, 1>(Qp + i * qs, qs, Kp + j * 2, ldk, pairs, scale, S + i * lds + j, lds);
    for (; i < rows; ++i) scores_tile<1, 1>(Qp + i * qs, qs, Kp + j * 2, ldk, pairs, scale, S + i * lds + j, lds);
  }
}

template <int R, int G>
inline void accumulate_tile(const uint32_t* Pp, int64_t kpairs, const uint16_t* Vp, int64_t DV, float* O, int64_t ldo) {
  __m512 acc[R][G];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) acc[r][g] = _mm512_loadu_ps(O + r * ldo + 16 * g);
  for (int64_t p = 0; p < kpairs; ++p) {
    __m512bh vv[G];
    for (int g = 0; g < G; ++g) vv[g] = (__m512bh)_mm512_loadu_si512(Vp + (p * DV + 16 * g) * 2);
    for (int r = 0; r < R; ++r) {
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(Pp[r * kpairs + p]);
      for (int g = 0; g < G; ++g) acc[r][g] = _mm512_dpbf16_ps(acc[r][g], pb, vv[g]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) _mm512_storeu_ps(O + r * ldo + 16 * g, acc[r][g]);
}

// O[i][c] += sum_j P[i][j] V[j][c] for i < rows, c < DV (a multiple of 16); Pp: rows of kpairs 32-bit pairs,
// Vp: V packed by pairs of keys (kpairs x DV x 2).
inline void accumulate_bf16(const uint32_t* Pp, int64_t kpairs, const uint16_t* Vp, int64_t DV, int64_t rows,
                            float* O, int64_t ldo) {
  int64_t c = 0;
  for (; c + 64 <= DV; c += 64) {
    int64_t i = 0;
    for (; i + 4 <= rows; i += 4) accumulate_tile<4, 4>(Pp + i * kpairs, kpairs, Vp + c * 2, DV, O + i * ldo + c, ldo);
    for (; i < rows; ++i) accumulate_tile<1, 4>(Pp + i * kpairs, kpairs, Vp + c * 2, DV, O + i * ldo + c, ldo);
  }
  for (; c < DV; c += 16) {
    int64_t i = 0;
    for (; i + 4 <= rows; i += 4) accumulate_tile<4, 1>(Pp + i * kpairs, kpairs, Vp + c * 2, DV, O + i * ldo + c, ldo);
    for (; i < rows; ++i) accumulate_tile<1, 1>(Pp + i * kpairs, kpairs, Vp + c * 2, DV, O + i * ldo + c, ldo);
  }
}

// exact_row for bfloat16 inputs: products in float32 from the bf16 values, as the kernel computes them.
void exact_row_bf16(const uint16_t* q, const uint16_t* K, int64_t k_stride, const uint16_t* V, int64_t v_stride,
                    int64_t lo, int64_t hi, int64_t D, int64_t Dv, float scale, float m, float l, uint16_t* out) {
  float o[1024];
  float* acc = Dv <= 1024 ? o : static_cast<float*>(std::malloc(sizeof(float) * Dv));
  for (int64_t d = 0; d < Dv; ++d) acc[d] = 0;
  for (int64_t j = lo; j <= hi; ++j) {
    const uint16_t* kj = K + j * k_stride;
    float s = 0;
    for (int64_t d = 0; d < D; ++d) s += bf2f(q[d]) * bf2f(kj[d]);
    s *= scale;
    if (s == -std::numeric_limits<float>::infinity()) continue;
    const float p = bf2f(f2bf(std::exp(s - m))) / l;
    const uint16_t* vj = V + j * v_stride;
    for (int64_t d = 0; d < Dv; ++d) acc[d] += p * bf2f(vj[d]);
  }
  float check = 0;
  for (int64_t d = 0; d < Dv; ++d) check += acc[d] * 0.0f;
  for (int64_t d = 0; d < Dv; ++d) out[d] = check == 0.0f ? f2bf(acc[d]) : uint16_t(0x7fc0);
  if (acc != o) std::free(acc);
}

// Rows see one interval each here (rb.R == 1): a block visits the hull of its rows' intervals.
void interval_attention_bf16(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out, float* lse,
                             const RowBounds& rb, const Shape& n, const Strides& st, float scale, int threads) {
  const int64_t blocks = (n.Tq + BQ - 1) / BQ;
  const int64_t items = n.B * n.Hq * blocks;
  const int64_t group = n.Hq / n.Hkv;
  const float inf = std::numeric_limits<float>::infinity();
  const int64_t qpairs = (n.D + 1) / 2, DV = (n.Dv + 15) / 16 * 16, TK = (n.Tk + 15) / 16 * 16;
  // Every key and value packed once per call (not once per query block): keys by pairs of features
  // (qpairs x TK x 2 per head), values by pairs of keys (TK/2 x DV x 2 per head), zero padded.
  const int64_t kp_head = qpairs * TK * 2, vp_head = (TK / 2) * DV * 2, heads = n.B * n.Hkv;
  uint16_t* KP = static_cast<uint16_t*>(std::calloc(heads * kp_head, sizeof(uint16_t)));
  uint16_t* VP = static_cast<uint16_t*>(std::calloc(heads * vp_head, sizeof(uint16_t)));
  const int64_t tiles = (n.Tk + 63) / 64;
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < heads * tiles; ++t) {
      const int64_t bh = t / tiles, j0 = (t % tiles) * 64, j1 = std::min(j0 + 64, n.Tk);
      const int64_t b = bh / n.Hkv, hk = bh % n.Hkv;
      uint16_t* kp = KP + bh * kp_head;
      uint16_t* vp = VP + bh * vp_head;
      for (int64_t j = j0; j < j1; ++j) {
        const uint16_t* kr = k + b * st.k[0] + hk * st.k[1] + j * st.k[2];
        for (int64_t d = 0; d < n.D; ++d) kp[((d >> 1) * TK + j) * 2 + (d & 1)] = kr[d];
        const uint16_t* vr = v + b * st.v[0] + hk * st.v[1] + j * st.v[2];
        uint16_t* dst = vp + (j >> 1) * DV * 2 + (j & 1);
        for (int64_t c = 0; c < n.Dv; ++c) dst[c * 2] = vr[c];
      }
    }
    float* S = static_cast<float*>(std::malloc(sizeof(float) * BQ * BK16));
    uint32_t* Qp = static_cast<uint32_t*>(std::malloc(sizeof(uint32_t) * BQ * qpairs));
    uint32_t* Pp = static_cast<uint32_t*>(std::malloc(sizeof(uint32_t) * BQ * (BK16 / 2)));
    float* O = static_cast<float*>(std::malloc(sizeof(float) * BQ * DV));
    float m[BQ], l[BQ];
    int64_t rlo[BQ], rhi[BQ];
    BlockKeys bk;
#pragma omp for schedule(dynamic, 4)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t blk = it % blocks, bh = it / blocks, h = bh % n.Hq, b = bh / n.Hq, hk = h / group;
      const int64_t r0 = blk * BQ, rows = std::min(BQ, n.Tq - r0);
      bk.build(rb, b, h, r0, rows, n.Tk);
      const int64_t kmin = bk.empty() ? n.Tk : bk.ranges.front().first;
      const int64_t kmax = bk.empty() ? -1 : bk.ranges.back().second;
      for (int64_t i = 0; i < rows; ++i) {
        m[i] = -inf;
        l[i] = 0;
        rlo[i] = bk.count[i] ? bk.iv[i * 2] : n.Tk;
        rhi[i] = bk.count[i] ? bk.iv[i * 2 + 1] : -1;
      }
      const uint16_t* Q = q + b * st.q[0] + h * st.q[1] + r0 * st.q[2];
      uint16_t* OUT = out + b * st.o[0] + h * st.o[1] + r0 * st.o[2];
      float* L = lse + b * st.l[0] + h * st.l[1] + r0;
      const uint16_t* kp = KP + (b * n.Hkv + hk) * kp_head;
      const uint16_t* vp = VP + (b * n.Hkv + hk) * vp_head;
      std::memset(O, 0, sizeof(float) * BQ * DV);
      for (int64_t i = 0; i < rows; ++i) {  // the block's queries as 32-bit pairs (an odd D padded with 0)
        uint16_t* dst = reinterpret_cast<uint16_t*>(Qp + i * qpairs);
        std::memcpy(dst, Q + i * st.q[2], sizeof(uint16_t) * n.D);
        if (n.D & 1) dst[n.D] = 0;
      }
      // chunks start on a multiple of 16 keys (the packed layout's vectors); keys before kmin are masked
      for (int64_t c0 = kmax < kmin ? kmax + 1 : kmin / 16 * 16; c0 <= kmax; c0 += BK16) {
        const int64_t c1 = std::min(c0 + BK16, kmax + 1), w = c1 - c0, W = (w + 15) / 16 * 16;
        scores_bf16(Qp, qpairs, kp + c0 * 2, TK, qpairs, W, rows, scale, S, BK16);
        const int64_t kpairs = (w + 1) / 2;
        for (int64_t i = 0; i < rows; ++i) {
          float* s = S + i * BK16;
          const int64_t a = std::max(rlo[i], c0) - c0, e = std::min(rhi[i], c1 - 1) - c0 + 1;
          uint16_t* p16 = reinterpret_cast<uint16_t*>(Pp + i * kpairs);
          if (e <= a) {  // this row sees nothing in the chunk: it keeps its state
            std::memset(p16, 0, sizeof(uint32_t) * kpairs);
            continue;
          }
          const int64_t seg[2] = {a, e};
          const float mnew = std::max(m[i], segments_max(s, seg, 1));
          const float alpha = m[i] == -inf ? 0.0f : exp_nonpos(m[i] - mnew);
          l[i] = l[i] * alpha + exp_segments(s, w, seg, 1, mnew == -inf ? 0.0f : mnew);
          m[i] = mnew;
          if (alpha != 1.0f) {
            float* o = O + i * DV;
#pragma omp simd
            for (int64_t d = 0; d < DV; ++d) o[d] *= alpha;
          }
          for (int64_t j = 0; j < w; j += 16) store_bf16(s + j, p16 + j, std::min<int64_t>(16, w - j));
          if (w & 1) p16[w] = 0;
        }
        accumulate_bf16(Pp, kpairs, vp + (c0 / 2) * DV * 2, DV, rows, O, DV);
      }
      for (int64_t i = 0; i < rows; ++i) {
        uint16_t* o16 = OUT + i * st.o[2];
        float* o = O + i * DV;
        if (m[i] == -inf && l[i] == 0.0f) {  // no key reaches the row
          std::memset(o16, 0, sizeof(uint16_t) * n.Dv);
          L[i] = -inf;
          continue;
        }
        if (!(l[i] == l[i])) {  // a NaN or +inf score reaches the row
          for (int64_t d = 0; d < n.Dv; ++d) o16[d] = 0x7fc0;
          L[i] = std::numeric_limits<float>::quiet_NaN();
          continue;
        }
        const float f = 1.0f / l[i];
        float check = 0;  // NaN iff some output is not finite
#pragma omp simd reduction(+ : check)
        for (int64_t d = 0; d < n.Dv; ++d) {
          o[d] *= f;
          check += o[d] * 0.0f;
        }
        for (int64_t d = 0; d < n.Dv; d += 16) store_bf16(o + d, o16 + d, std::min<int64_t>(16, n.Dv - d));
        L[i] = m[i] + std::log(l[i]);
        if (!(check == 0.0f)) {  // a non-finite value, maybe of a key outside the row (0 * NaN): redo exactly
          const uint16_t* K = k + b * st.k[0] + hk * st.k[1];
          const uint16_t* V = v + b * st.v[0] + hk * st.v[1];
          exact_row_bf16(Q + i * st.q[2], K, st.k[2], V, st.v[2], rlo[i], rhi[i], n.D, n.Dv, scale, m[i], l[i], o16);
        }
      }
    }
    std::free(S);
    std::free(Qp);
    std::free(Pp);
    std::free(O);
  }
  std::free(KP);
  std::free(VP);
}
#else
#define QKV_HAS_BF16 0
#endif

// The entry points' dims (B, Hq, Hkv, Tq, Tk, D, Dv) and strides; false for shapes the kernels refuse.
bool unpack(const int64_t* dims, const int64_t* strides, Shape& n, Strides& st) {
  n = Shape{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6]};
  if (n.Hkv <= 0 || n.Hq % n.Hkv != 0 || n.D <= 0 || n.Dv <= 0) return false;
  std::memcpy(st.q, strides + 0, sizeof(int64_t) * 3);
  std::memcpy(st.k, strides + 3, sizeof(int64_t) * 3);
  std::memcpy(st.v, strides + 6, sizeof(int64_t) * 3);
  std::memcpy(st.o, strides + 9, sizeof(int64_t) * 3);
  std::memcpy(st.l, strides + 12, sizeof(int64_t) * 2);
  return true;
}

}  // namespace

extern "C" {

// dims: B, Hq, Hkv, Tq, Tk, D, Dv. strides: q (b, h, t), k (b, h, t), v (b, h, t), out (b, h, t), lse (b, h).
// lo/hi: int64 (B', H', Tq, R) row bounds, bounds = {batch stride, head stride, R} (strides 0 when shared).
// Returns 0 on success.
int qkv_interval_attention(int is_double, void* gemm, const void* q, const void* k, const void* v, void* out,
                           void* lse, const int64_t* lo, const int64_t* hi, const int64_t* bounds,
                           const int64_t* dims, const int64_t* strides, double scale, int threads) {
  Shape n;
  Strides st;
  if (!unpack(dims, strides, n, st) || bounds[2] < 1) return 1;
  const RowBounds rb{lo, hi, bounds[0], bounds[1], bounds[2]};
  if (is_double) {
    interval_attention<double>(Gemm<double>{reinterpret_cast<dgemm_t>(gemm)}, static_cast<const double*>(q),
                               static_cast<const double*>(k), static_cast<const double*>(v),
                               static_cast<double*>(out), static_cast<double*>(lse), rb, n, st, scale, threads);
  } else {
    interval_attention<float>(Gemm<float>{reinterpret_cast<sgemm_t>(gemm)}, static_cast<const float*>(q),
                              static_cast<const float*>(k), static_cast<const float*>(v), static_cast<float*>(out),
                              static_cast<float*>(lse), rb, n, st, (float)scale, threads);
  }
  return 0;
}

// The gradients dq (B, Hq, Tq, D), dk (B, Hkv, Tk, D), dv (B, Hkv, Tk, Dv) (contiguous, zeroed) of
// qkv_interval_attention's output, from its out and lse (strides as there), the output's gradient dout
// (strides sdo: b, h, t) and optionally the lse's gradient dlse (lse's layout; null: zero).
int qkv_interval_attention_backward(int is_double, void* gemm, const void* q, const void* k, const void* v,
                                    const void* out, const void* lse, const void* dout, const void* dlse, void* dq,
                                    void* dk, void* dv, const int64_t* lo, const int64_t* hi, const int64_t* bounds,
                                    const int64_t* dims, const int64_t* strides, const int64_t* sdo, double scale,
                                    int threads) {
  Shape n;
  Strides st;
  if (!unpack(dims, strides, n, st) || bounds[2] < 1) return 1;
  const RowBounds rb{lo, hi, bounds[0], bounds[1], bounds[2]};
  if (is_double) {
    interval_attention_backward<double>(
        Gemm<double>{reinterpret_cast<dgemm_t>(gemm)}, static_cast<const double*>(q), static_cast<const double*>(k),
        static_cast<const double*>(v), static_cast<const double*>(out), static_cast<const double*>(lse),
        static_cast<const double*>(dout), static_cast<const double*>(dlse), static_cast<double*>(dq),
        static_cast<double*>(dk), static_cast<double*>(dv), rb, n, st, sdo, scale, threads);
  } else {
    interval_attention_backward<float>(
        Gemm<float>{reinterpret_cast<sgemm_t>(gemm)}, static_cast<const float*>(q), static_cast<const float*>(k),
        static_cast<const float*>(v), static_cast<const float*>(out), static_cast<const float*>(lse),
        static_cast<const float*>(dout), static_cast<const float*>(dlse), static_cast<float*>(dq),
        static_cast<float*>(dk), static_cast<float*>(dv), rb, n, st, sdo, (float)scale, threads);
  }
  return 0;
}

// 1 when this build has the bfloat16 kernel (the compiler targeted AVX-512 BF16).
int qkv_native_bf16() { return QKV_HAS_BF16; }

// bfloat16 q, k, v and out (as uint16), float32 lse; the rest as qkv_interval_attention, with one interval per
// row (R = 1). Returns 0 on success, 2 for R > 1, 3 when the build has no bfloat16 kernel.
int qkv_interval_attention_bf16(const void* q, const void* k, const void* v, void* out, void* lse, const int64_t* lo,
                                const int64_t* hi, const int64_t* bounds, const int64_t* dims,
                                const int64_t* strides, double scale, int threads) {
#if QKV_HAS_BF16
  Shape n;
  Strides st;
  if (!unpack(dims, strides, n, st)) return 1;
  if (bounds[2] != 1) return 2;
  const RowBounds rb{lo, hi, bounds[0], bounds[1], 1};
  interval_attention_bf16(static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(k),
                          static_cast<const uint16_t*>(v), static_cast<uint16_t*>(out), static_cast<float*>(lse), rb,
                          n, st, (float)scale, threads);
  return 0;
#else
  (void)q, (void)k, (void)v, (void)out, (void)lse, (void)lo, (void)hi, (void)bounds, (void)dims, (void)strides,
      (void)scale, (void)threads;
  return 3;
#endif
}

}  // extern "C"
