// The CPU products of decode steps (a few activation rows against a layer's weights), built by rss_jax.kernels at
// first use with the machine's own compiler and vector extensions. Both read one layer of a stacked [L, ...] weight
// array in place (the `layer` attribute), so a decode loop needs no per-layer copy of the weights.
//
// * RssJaxInt8Matmul: y[m, n] = sum_g scale[n, g] * sum_{k in group g} x[m, k] * w[n, k], float32 activations
//   against int8 weights stored out-channel-major in groups of K / G along the input axis, each with its own scale
//   (G = 1: one scale per output channel), each weight widened to float inside the product (weight-only
//   quantisation: the weights are read once, at one byte each, and never written back as floats).
// * RssJaxDenseMatmul: y = x @ w[layer] for float32 or bfloat16 weights [K, N] (input-major, as the models store
//   them); bfloat16 weights are widened inside the product, accumulation is in float32.
// * RssJaxDenseRowsMatmul: y = x @ w.T for float32 or bfloat16 weights [N, K] (output-major: the token
//   table that an output head is tied to, the rows of a trimmed head), each output a dot product of contiguous rows.
// * RssJaxCachedAttention: few-token attention over one layer of a stacked KV cache, read in place up to each row's
//   length, and over the new tokens' own keys and values (which the caller writes into the cache afterwards).
//
// Output channels (attention: rows and KV heads) are split over XLA's intra-op thread pool.
#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Keeps v in a register: without it GCC folds the load of an activation vector into every product that uses it,
// so that each weight vector costs one load per activation row instead of the row's vector being loaded once, and
// the loop is bound by the load ports rather than by the multiplications.
template <typename V>
inline void in_register(V& v) {
  asm("" : "+v"(v));
}

constexpr int64_t kMaxRows = 8;  // activation rows handled together: each weight is widened once per group
constexpr int64_t kChunk = 32;   // output channels per task

#ifdef __AVX512F__
// rows (up to 4) of x against four output channels n..n+3, groups of gs (a multiple of 16) along K, AVX-512: each
// 16-weight piece of a channel is widened and scaled once, in a register, and multiplied into every row; the
// 4 x 4 sums stay in registers until the end
template <int R>
void rows4_avx512(const float* x, const int8_t* w, const float* scale, float* y, int64_t n, int64_t K, int64_t N,
                  int64_t gs) {
  const int64_t G = K / gs;
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 sc[4];
    for (int c = 0; c < 4; ++c) sc[c] = _mm512_set1_ps(scale[(n + c) * G + g]);
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {
      __m512 wv[4];
      for (int c = 0; c < 4; ++c)
        wv[c] = _mm512_mul_ps(sc[c], _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                         _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (n + c) * K + k)))));
      for (int r = 0; r < R; ++r) {
        __m512 xv = _mm512_loadu_ps(x + r * K + k);
        in_register(xv);
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) y[r * N + n + c] = _mm512_reduce_add_ps(acc[r][c]);
}

// all `rows` rows against channels n0..n1 (a multiple of 4 apart), four rows at a time
void rows_avx512(const float* x, const int8_t* w, const float* scale, float* y, int64_t rows, int64_t n0, int64_t n1,
                 int64_t K, int64_t N, int64_t gs) {
  for (int64_t n = n0; n < n1; n += 4) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) rows4_avx512<4>(x + r * K, w, scale, y + r * N, n, K, N, gs);
    switch (rows - r) {
      case 3: rows4_avx512<3>(x + r * K, w, scale, y + r * N, n, K, N, gs); break;
      case 2: rows4_avx512<2>(x + r * K, w, scale, y + r * N, n, K, N, gs); break;
      case 1: rows4_avx512<1>(x + r * K, w, scale, y + r * N, n, K, N, gs); break;
      default: break;
    }
  }
}
#endif

// rows of x against output channels n0..n1. Weights come in groups of `gs` along K, each group with its own scale
// (gs = K: one scale per channel). The compiler vectorises the inner loops (built with reassociation on).
void rows_block(const float* x, const int8_t* w, const float* scale, float* y, int64_t rows, int64_t n0, int64_t n1,
                int64_t K, int64_t N, int64_t gs, float* wf) {
  const int64_t G = K / gs;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wn = w + n * K;
    const float* sn = scale + n * G;
#ifdef __AVX512F__
    if (rows == 1 && gs == 32) {  // one row, groups of 32, AVX-512: two groups per step, four independent sums
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
      auto term = [&](int64_t j, __m512 sc, __m512 acc) {
        const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(wn + j))));
        return _mm512_fmadd_ps(_mm512_mul_ps(_mm512_loadu_ps(x + j), sc), wv, acc);
      };
      int64_t g = 0;
      for (; g + 2 <= G; g += 2) {
        const __m512 s0 = _mm512_set1_ps(sn[g]), s1 = _mm512_set1_ps(sn[g + 1]);
        a0 = term(g * 32, s0, a0);
        a1 = term(g * 32 + 16, s0, a1);
        a2 = term(g * 32 + 32, s1, a2);
        a3 = term(g * 32 + 48, s1, a3);
      }
      if (g < G) {
        const __m512 s0 = _mm512_set1_ps(sn[g]);
        a0 = term(g * 32, s0, a0);
        a1 = term(g * 32 + 16, s0, a1);
      }
      y[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
      continue;
    }
#elif defined(__AVX2__) && defined(__FMA__)
    if (rows == 1 && gs == 32) {  // one row, groups of 32, AVX2: one group (four 8-wide pieces) per step
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
      auto term = [&](int64_t j, __m256 sc, __m256 acc) {
        const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wn + j))));
        return _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(x + j), sc), wv, acc);
      };
      for (int64_t g = 0; g < G; ++g) {
        const __m256 sc = _mm256_set1_ps(sn[g]);
        a0 = term(g * 32, sc, a0);
        a1 = term(g * 32 + 8, sc, a1);
        a2 = term(g * 32 + 16, sc, a2);
        a3 = term(g * 32 + 24, sc, a3);
      }
      const __m256 t = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
      y[n] = _mm_cvtss_f32(h);
      continue;
    }
#endif
    if (rows == 1) {  // one row: widen and scale inside the product, no buffer
      float s = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        const int8_t* wg = wn + g * gs;
        const float* xg = x + g * gs;
        float part = 0.f;
        for (int64_t j = 0; j < gs; ++j) part += xg[j] * static_cast<float>(wg[j]);
        s += part * sn[g];
      }
      y[n] = s;
      continue;
    }
    for (int64_t g = 0; g < G; ++g) {
      const float sc = sn[g];
      for (int64_t j = 0; j < gs; ++j) wf[g * gs + j] = static_cast<float>(wn[g * gs + j]) * sc;
    }
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {  // four rows share each widened weight: four independent sums
      const float *x0 = x + r * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        const float v = wf[k];
        s0 += x0[k] * v;
        s1 += x1[k] * v;
        s2 += x2[k] * v;
        s3 += x3[k] * v;
      }
      y[r * N + n] = s0;
      y[(r + 1) * N + n] = s1;
      y[(r + 2) * N + n] = s2;
      y[(r + 3) * N + n] = s3;
    }
    for (; r < rows; ++r) {
      const float* xr = x + r * K;
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += xr[k] * wf[k];
      y[r * N + n] = s;
    }
  }
}

// run task(c) for c in [0, chunks) on the caller and up to pool.num_threads() - 1 helpers, and wait for all of them
void parallel_for(ffi::ThreadPool& pool, int64_t chunks, std::function<void(int64_t)> task, bool serial = false) {
  if (serial) {
    for (int64_t c = 0; c < chunks; ++c) task(c);
    return;
  }
  struct State {
    std::function<void(int64_t)> task;
    int64_t chunks;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    void work() {
      for (;;) {
        int64_t c = next.fetch_add(1, std::memory_order_relaxed);
        if (c >= chunks) return;
        task(c);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>();
  state->task = std::move(task);
  state->chunks = chunks;
  int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state] { state->work(); });
  state->work();  // the caller takes chunks too, so the call finishes even if no helper ever runs
  // only chunks a helper has claimed and not finished remain: wait for them, yielding the core after a short spin
  for (int spins = 0; state->done.load(std::memory_order_acquire) < chunks; ++spins) {
    if (spins > 64) std::this_thread::yield();
  }
}

// the layer `layer` of a weight array [L, A, B] (or [A, B] with layer 0); false if out of range
bool layer_offset(const ffi::Span<const int64_t>& dims, int64_t layer, int64_t& offset) {
  if (dims.size() == 2) {
    offset = 0;
    return layer == 0;
  }
  if (dims.size() != 3 || layer < 0 || layer >= dims[0]) return false;
  offset = layer * dims[1] * dims[2];
  return true;
}

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                          ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int64_t layer,
                          int64_t scale_layer) {
  auto xd = x.dimensions(), wd = w.dimensions(), sd = scale.dimensions();
  int64_t w_off = 0, s_off = 0;
  if (xd.size() != 2 || wd.size() < 2 || sd.size() < 2 || !layer_offset(wd, layer, w_off) ||
      !layer_offset(sd, scale_layer, s_off))
    return ffi::Error::InvalidArgument("int8_matmul: expected x [M, K], w [(L,) N, K] int8, scale [(L,) N, G]");
  const int64_t r = wd.size() - 2, q = sd.size() - 2;
  const int64_t M = xd[0], K = xd[1], N = wd[r], G = sd[q + 1];
  if (wd[r + 1] != K || sd[q] != N || G < 1 || K % G != 0)
    return ffi::Error::InvalidArgument("int8_matmul: expected x [M, K], w [(L,) N, K] int8, scale [(L,) N, G]"
                                       " with G dividing K");
  const float* xp = x.typed_data();
  const int8_t* wp = w.typed_data() + w_off;
  const float* sp = scale.typed_data() + s_off;
  float* yp = y->typed_data();
  const int64_t gs = K / G;
  auto task = [=](int64_t c) {
    int64_t n0 = c * kChunk, n1 = std::min(N, n0 + kChunk);
#ifdef __AVX512F__
    if (M > 1 && gs % 16 == 0) {  // several rows: the register-blocked path, the last N % 4 channels below
      const int64_t n4 = n0 + (n1 - n0) / 4 * 4;
      rows_avx512(xp, wp, sp, yp, M, n0, n4, K, N, gs);
      n0 = n4;
      if (n0 == n1) return;
    }
#endif
    std::unique_ptr<float[]> buffer(M > 1 ? new float[K] : nullptr);
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows)
      rows_block(xp + m0 * K, wp, sp, yp + m0 * N, std::min(kMaxRows, M - m0), n0, n1, K, N, gs, buffer.get());
  };
  // one activation row runs on the calling thread alone: a single core already streams int8 weights at close to
  // the memory's speed, so a helper adds its wake-up and hand-off cost and little bandwidth (batch-1 int8 decoding
  // in `scripts/bench_decode.py` is faster this way on a 2-core AMD EPYC; several rows are compute-bound and split)
  parallel_for(pool, (N + kChunk - 1) / kChunk, task, M == 1);
  return ffi::Error::Success();
}

// ---- float32 / bfloat16 weights [K, N]: y[m, :] = sum_k x[m, k] * w[k, :], one panel of output columns at a time
// (a task), the rows of the panel prefetched a few steps ahead

#if defined(__AVX512F__)
constexpr int kVW = 16;  // floats per vector register
constexpr int kNV = 8;   // vectors per panel row: a panel is 128 columns wide
#else
constexpr int kVW = 8;
constexpr int kNV = 4;
#endif
constexpr int64_t kPanel = kVW * kNV;
constexpr int64_t kKChunk = 256;  // rows of a panel that stay in cache while every row group of x passes over them
constexpr int64_t kAhead = 8;     // weight rows prefetched ahead

typedef float vf __attribute__((vector_size(kVW * 4)));
typedef uint16_t vh __attribute__((vector_size(kVW * 2)));
typedef uint32_t vu __attribute__((vector_size(kVW * 4)));

inline vf load_w(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf load_w(const uint16_t* p) {  // bfloat16 -> float32: the 16 bits are the top half of the float
#if defined(__AVX512F__)
  // spelled out: GCC's generic widening of 16 halves went through two 8-lane halves and an insert (six
  // instructions where these are two), and the bfloat16 products were bound by it
  const __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
                                      16);
  return reinterpret_cast<vf>(_mm512_castsi512_ps(u));
#else
  vh h;
  std::memcpy(&h, p, sizeof h);
  vu u = __builtin_convertvector(h, vu) << 16;
  vf v;
  std::memcpy(&v, &u, sizeof v);
  return v;
#endif
}
inline float widen(float v) { return v; }
inline float widen(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// MR rows of x against NV vectors of columns starting at n0, over weight rows k0..k1; accumulates into y
template <typename T, int MR, int NV>
void panel_rows(const float* x, int64_t K, const T* w, int64_t N, float* y, int64_t n0, int64_t k0, int64_t k1,
                bool prefetch) {
  vf acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = load_w(y + r * N + n0 + j * kVW);
  constexpr int kLines = (NV * kVW * sizeof(T) + 63) / 64;
  for (int64_t k = k0; k < k1; ++k) {
    const T* wk = w + k * N + n0;
    if (prefetch && k + kAhead < k1)
      for (int l = 0; l < kLines; ++l) __builtin_prefetch(reinterpret_cast<const char*>(wk + kAhead * N) + 64 * l);
    vf wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = load_w(wk + j * kVW);
    for (int r = 0; r < MR; ++r) {
      const vf xb = vf{} + x[r * K + k];
      for (int j = 0; j < NV; ++j) acc[r][j] += xb * wv[j];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) std::memcpy(y + r * N + n0 + j * kVW, &acc[r][j], sizeof(vf));
}

// MR rows of x against the nv vectors of columns from n0, in blocks of at most NVB vectors
template <typename T, int MR, int NVB>
void panel_block(int nv, const float* x, int64_t K, const T* w, int64_t N, float* y, int64_t n0, int64_t k0,
                 int64_t k1, bool prefetch) {
  if constexpr (NVB >= 1) {
    if (nv >= NVB) {
      for (; nv >= NVB; nv -= NVB, n0 += NVB * kVW) panel_rows<T, MR, NVB>(x, K, w, N, y, n0, k0, k1, prefetch);
    }
    if (nv > 0) panel_block<T, MR, NVB - 1>(nv, x, K, w, N, y, n0, k0, k1, prefetch);
  }
}

// all M rows of x against the nv vectors of columns from n0 (one panel): with AVX-512 eight rows share each loaded
// weight where there are eight (three vectors at a time), then four (half a panel at a time, so the sums stay in
// registers), then a remainder of three in one pass, or two, then one
template <typename T>
void panel(int nv, const float* x, int64_t M, int64_t K, const T* w, int64_t N, float* y, int64_t n0) {
  for (int64_t m = 0; m < M; ++m) std::memset(y + m * N + n0, 0, nv * kVW * sizeof(float));
  for (int64_t k0 = 0; k0 < K; k0 += kKChunk) {
    const int64_t k1 = std::min(K, k0 + kKChunk);
    int64_t m = 0;
#if defined(__AVX512F__)
    for (; m + 8 <= M; m += 8)  // 24 sums in registers: each loaded weight vector serves eight rows
      panel_block<T, 8, 3>(nv, x + m * K, K, w, N, y + m * N, n0, k0, k1, m == 0);
#endif
    for (; m + 4 <= M; m += 4)
      panel_block<T, 4, kNV / 2>(nv, x + m * K, K, w, N, y + m * N, n0, k0, k1, m == 0);
    if (M - m == 3) {  // three rows in one pass (a verification block of K = 2) rather than a 2-row and a 1-row
      panel_block<T, 3, kNV / 2>(nv, x + m * K, K, w, N, y + m * N, n0, k0, k1, m == 0);
      m += 3;
    }
    for (; m + 2 <= M; m += 2) panel_block<T, 2, kNV>(nv, x + m * K, K, w, N, y + m * N, n0, k0, k1, m == 0);
    if (m < M) panel_block<T, 1, kNV>(nv, x + m * K, K, w, N, y + m * N, n0, k0, k1, m == 0);
  }
}

// columns n0..n1 (fewer than one vector) one at a time
template <typename T>
void columns(const float* x, int64_t M, int64_t K, const T* w, int64_t N, float* y, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * widen(w[k * N + n]);
      y[m * N + n] = s;
    }
}

template <typename T>
void dense(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, const T* w, int64_t N, float* y) {
  const int64_t vectors = N / kVW;
  const int64_t panels = (vectors + kNV - 1) / kNV;
  parallel_for(pool, panels + (N % kVW ? 1 : 0), [=](int64_t c) {
    if (c == panels) return columns(x, M, K, w, N, y, vectors * kVW, N);
    const int nv = static_cast<int>(std::min<int64_t>(kNV, vectors - c * kNV));
    panel<T>(nv, x, M, K, w, N, y, c * kPanel);
  });
}

// run f(typed weight pointer) for float32 or bfloat16 weights at element offset `off`
template <typename F>
ffi::Error with_weights(const ffi::AnyBuffer& w, int64_t off, const char* what, F f) {
  if (w.element_type() == ffi::DataType::F32) {
    f(static_cast<const float*>(w.untyped_data()) + off);
  } else if (w.element_type() == ffi::DataType::BF16) {
    f(static_cast<const uint16_t*>(w.untyped_data()) + off);
  } else {
    return ffi::Error::InvalidArgument(std::string(what) + ": weights must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

ffi::Error DenseMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                           ffi::ResultBuffer<ffi::F32> y, int64_t layer) {
  auto xd = x.dimensions(), wd = w.dimensions();
  int64_t off = 0;
  if (xd.size() != 2 || !layer_offset(wd, layer, off) || wd[wd.size() - 2] != xd[1])
    return ffi::Error::InvalidArgument("dense_matmul: expected x [M, K] and w [(L,) K, N]");
  const int64_t M = xd[0], K = xd[1], N = wd[wd.size() - 1];
  return with_weights(w, off, "dense_matmul",
                      [&](auto wp) { dense(pool, x.typed_data(), M, K, wp, N, y->typed_data()); });
}

// ---- float32 / bfloat16 weights [N, K] (output-major): y[m, n] = sum_k x[m, k] * w[n, k]. Four weight rows at a
// time are read once, straight from memory, while up to four rows of x (in L1) pass over them; each (m, n) sum is
// kept in one vector and reduced across its lanes at the end.

inline float lane_sum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));  // a tree of shuffles; the loop below goes lane by lane
#else
  float s = 0.f;
  for (int i = 0; i < kVW; ++i) s += v[i];
  return s;
#endif
}

template <typename T, int MR, int NB>
void rows_dot(const float* x, int64_t K, const T* w, float* y, int64_t N, int64_t n) {
  vf acc[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = vf{};
  const int64_t kv = K / kVW * kVW;
  for (int64_t k = 0; k < kv; k += kVW) {
    vf wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = load_w(w + (n + j) * K + k);
    for (int r = 0; r < MR; ++r) {
      vf xv = load_w(x + r * K + k);
      in_register(xv);
      for (int j = 0; j < NB; ++j) acc[r][j] += xv * wv[j];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) {
      float s = lane_sum(acc[r][j]);
      for (int64_t k = kv; k < K; ++k) s += x[r * K + k] * widen(w[(n + j) * K + k]);
      y[r * N + n + j] = s;
    }
}

template <typename T>
void rows_dot_one(const float* x, int64_t M, int64_t K, const T* w, float* y, int64_t N, int64_t n) {
  for (int64_t m = 0; m < M; ++m) {
    float s = 0.f;
    for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * widen(w[n * K + k]);
    y[m * N + n] = s;
  }
}

constexpr int64_t kRowsChunk = 256;  // output channels per task

template <typename T>
void dense_rows(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, const T* w, int64_t N, float* y) {
  parallel_for(pool, (N + kRowsChunk - 1) / kRowsChunk, [=](int64_t c) {
    const int64_t n0 = c * kRowsChunk, n1 = std::min(N, n0 + kRowsChunk);
    int64_t n = n0;
    if (M == 1) {  // one row: eight weight rows per pass, so eight sums are in flight
      for (; n + 8 <= n1; n += 8) rows_dot<T, 1, 8>(x, K, w, y, N, n);
    }
    for (; n + 4 <= n1; n += 4) {
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) rows_dot<T, 4, 4>(x + m * K, K, w, y + m * N, N, n);
      switch (M - m) {
        case 3: rows_dot<T, 3, 4>(x + m * K, K, w, y + m * N, N, n); break;
        case 2: rows_dot<T, 2, 4>(x + m * K, K, w, y + m * N, N, n); break;
        case 1: rows_dot<T, 1, 4>(x + m * K, K, w, y + m * N, N, n); break;
        default: break;
      }
    }
    for (; n < n1; ++n) rows_dot_one<T>(x, M, K, w, y, N, n);
  });
}

ffi::Error DenseRowsMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                               ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || wd[1] != xd[1])
    return ffi::Error::InvalidArgument("dense_rows_matmul: expected x [M, K] and w [N, K]");
  const int64_t M = xd[0], K = xd[1], N = wd[0];
  return with_weights(w, 0, "dense_rows_matmul",
                      [&](auto wp) { dense_rows(pool, x.typed_data(), M, K, wp, N, y->typed_data()); });
}

// ---- attention of T new tokens of each row over one layer of a stacked cache [L, B, S, KVH, D] (float32 or
// bfloat16), read in place, and over the T new keys and values themselves: query t of row b sees the cache slots
// s < lengths[b] and the new tokens 0..t (causal), with one softmax over both. q [B, T, KVH, G, D] arrives scaled by
// 1 / sqrt(D); G query heads share each KV head. Only the rows' valid slots are read, nothing past them.

template <typename T>
inline float dot_d(const float* q, const T* k, int64_t D) {
  int64_t d = 0;
  float s = 0.f;
  if (D % kVW == 0) {
    vf acc = vf{};
    for (; d < D; d += kVW) acc += load_w(q + d) * load_w(k + d);
    s = lane_sum(acc);
  }
  for (; d < D; ++d) s += q[d] * widen(k[d]);
  return s;
}

template <typename T>
inline void axpy_d(float a, const T* v, float* o, int64_t D) {
  int64_t d = 0;
  if (D % kVW == 0) {
    const vf av = vf{} + a;
    for (; d < D; d += kVW) {
      vf ov = load_w(o + d);
      ov += av * load_w(v + d);
      std::memcpy(o + d, &ov, sizeof ov);
    }
  }
  for (; d < D; ++d) o[d] += a * widen(v[d]);
}

// the scores of one query head against n keys (slot stride `slot`), the query held in NV vector registers
// (D = NV * kVW), and their running maximum
template <typename T, int NV>
void scores_vec(const float* qv, const T* k, int64_t n, int64_t slot, float* scores, float& top) {
  vf q[NV];
  for (int j = 0; j < NV; ++j) q[j] = load_w(qv + j * kVW);
  for (int64_t s = 0; s < n; ++s) {
    vf acc = q[0] * load_w(k + s * slot);
    for (int j = 1; j < NV; ++j) acc += q[j] * load_w(k + s * slot + j * kVW);
    top = std::max(top, scores[s] = lane_sum(acc));
  }
}

// o (NV vector registers) += sum_s p[s] * v[s]
template <typename T, int NV>
void mix_vec(const float* p, const T* v, int64_t n, int64_t slot, vf* o) {
  for (int64_t s = 0; s < n; ++s) {
    const vf a = vf{} + p[s];
    for (int j = 0; j < NV; ++j) o[j] += a * load_w(v + s * slot + j * kVW);
  }
}

// one (row, KV head): every new token t and query head g of the group. ck/cv point at slot 0 of this row and KV
// head (slot stride KVH * D); nk/nv at new token 0 (token stride KVH * D); q/out at token 0, group head 0 (token
// stride KVH * G * D, head stride D); scores has room for n_old + T floats. NV > 0: D = NV * kVW, kept in
// registers; NV = 0: any D.
template <typename T, int NV>
void attend(const float* q, const T* ck, const T* cv, const float* nk, const float* nv, float* out, int64_t n_old,
            int64_t Tn, int64_t KVH, int64_t G, int64_t D, float* scores) {
  const int64_t slot = KVH * D, tok = KVH * G * D;
  for (int64_t t = 0; t < Tn; ++t)
    for (int64_t g = 0; g < G; ++g) {
      const float* qv = q + t * tok + g * D;
      float* o = out + t * tok + g * D;
      const int64_t n = n_old + t + 1;
      float top = -INFINITY;
      if constexpr (NV > 0) {
        scores_vec<T, NV>(qv, ck, n_old, slot, scores, top);
        scores_vec<float, NV>(qv, nk, t + 1, slot, scores + n_old, top);
      } else {
        for (int64_t s = 0; s < n_old; ++s) top = std::max(top, scores[s] = dot_d(qv, ck + s * slot, D));
        for (int64_t j = 0; j <= t; ++j) top = std::max(top, scores[n_old + j] = dot_d(qv, nk + j * slot, D));
      }
      float total = 0.f;
      for (int64_t s = 0; s < n; ++s) total += scores[s] = std::exp(scores[s] - top);
      const float inv = 1.f / total;
      if constexpr (NV > 0) {
        vf acc[NV];
        for (int j = 0; j < NV; ++j) acc[j] = vf{};
        mix_vec<T, NV>(scores, cv, n_old, slot, acc);
        mix_vec<float, NV>(scores + n_old, nv, t + 1, slot, acc);
        for (int j = 0; j < NV; ++j) {
          const vf r = acc[j] * inv;
          std::memcpy(o + j * kVW, &r, sizeof r);
        }
      } else {
        std::memset(o, 0, D * sizeof(float));
        for (int64_t s = 0; s < n_old; ++s) axpy_d(scores[s], cv + s * slot, o, D);
        for (int64_t j = 0; j <= t; ++j) axpy_d(scores[n_old + j], nv + j * slot, o, D);
        for (int64_t d = 0; d < D; ++d) o[d] *= inv;
      }
    }
}

// attend<T, NV> for the head size D: registers for D = 1..8 vectors, the generic loop otherwise
template <typename T>
auto attend_for(int64_t D) {
  using F = void (*)(const float*, const T*, const T*, const float*, const float*, float*, int64_t, int64_t,
                     int64_t, int64_t, int64_t, float*);
  if (D % kVW == 0) {
    switch (D / kVW) {
      case 1: return static_cast<F>(attend<T, 1>);
      case 2: return static_cast<F>(attend<T, 2>);
      case 3: return static_cast<F>(attend<T, 3>);
      case 4: return static_cast<F>(attend<T, 4>);
      case 5: return static_cast<F>(attend<T, 5>);
      case 6: return static_cast<F>(attend<T, 6>);
      case 7: return static_cast<F>(attend<T, 7>);
      case 8: return static_cast<F>(attend<T, 8>);
      default: break;
    }
  }
  return static_cast<F>(attend<T, 0>);
}

constexpr int64_t kAttendSerialWork = int64_t(1) << 17;  // below this many products per call, no helper is woken

ffi::Error CachedAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer cache_k,
                               ffi::AnyBuffer cache_v, ffi::Buffer<ffi::F32> new_k, ffi::Buffer<ffi::F32> new_v,
                               ffi::Buffer<ffi::S32> lengths, ffi::ResultBuffer<ffi::F32> out, int64_t layer) {
  auto qd = q.dimensions(), cd = cache_k.dimensions(), nd = new_k.dimensions();
  const char* shapes = "cached_attention: expected q [B, T, KVH, G, D], caches [L, B, S, KVH, D] of one dtype, "
                       "new k/v [B, T, KVH, D], lengths [B] and 0 <= layer < L";
  if (qd.size() != 5 || cd.size() != 5 || nd.size() != 4 || cache_v.dimensions().size() != 5 ||
      cache_k.element_type() != cache_v.element_type() || lengths.dimensions().size() != 1)
    return ffi::Error::InvalidArgument(shapes);
  const int64_t B = qd[0], Tn = qd[1], KVH = qd[2], G = qd[3], D = qd[4], L = cd[0], S = cd[2];
  for (int i = 0; i < 5; ++i)
    if (cd[i] != cache_v.dimensions()[i]) return ffi::Error::InvalidArgument(shapes);
  if (cd[1] != B || cd[3] != KVH || cd[4] != D || nd[0] != B || nd[1] != Tn || nd[2] != KVH || nd[3] != D ||
      lengths.dimensions()[0] != B || layer < 0 || layer >= L)
    return ffi::Error::InvalidArgument(shapes);
  const float *qp = q.typed_data(), *nkp = new_k.typed_data(), *nvp = new_v.typed_data();
  const int32_t* lp = lengths.typed_data();
  float* op = out->typed_data();
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) work += (std::clamp<int64_t>(lp[b], 0, S) + Tn) * Tn * KVH * G * D;
  auto run = [&](auto ckp, auto cvp) {
    const auto fn = attend_for<std::remove_const_t<std::remove_pointer_t<decltype(ckp)>>>(D);
    auto task = [=](int64_t c) {
      const int64_t b = c / KVH, h = c % KVH;
      const int64_t n_old = std::clamp<int64_t>(lp[b], 0, S);
      std::unique_ptr<float[]> scores(new float[n_old + Tn]);
      const int64_t row = ((layer * B + b) * S) * KVH * D + h * D;
      fn(qp + b * Tn * KVH * G * D + h * G * D, ckp + row, cvp + row, nkp + b * Tn * KVH * D + h * D,
         nvp + b * Tn * KVH * D + h * D, op + b * Tn * KVH * G * D + h * G * D, n_old, Tn, KVH, G, D, scores.get());
    };
    parallel_for(pool, B * KVH, task, work < kAttendSerialWork);
  };
  if (cache_k.element_type() == ffi::DataType::F32) {
    run(static_cast<const float*>(cache_k.untyped_data()), static_cast<const float*>(cache_v.untyped_data()));
  } else if (cache_k.element_type() == ffi::DataType::BF16) {
    run(static_cast<const uint16_t*>(cache_k.untyped_data()), static_cast<const uint16_t*>(cache_v.untyped_data()));
  } else {
    return ffi::Error::InvalidArgument("cached_attention: the cache must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RssJaxInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("layer")
                                  .Attr<int64_t>("scale_layer"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RssJaxDenseMatmul, DenseMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("layer"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RssJaxDenseRowsMatmul, DenseRowsMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RssJaxCachedAttention, CachedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("layer"));
