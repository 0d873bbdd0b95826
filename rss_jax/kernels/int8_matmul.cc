// y[m, n] = sum_g scale[n, g] * sum_{k in group g} x[m, k] * w[n, k]: the product of float32 activations with int8
// weights stored out-channel-major in groups of K / G along the input axis, each with its own scale (G = 1: one
// scale per output channel), each weight widened to float inside the product (weight-only quantisation: the weights
// are read once, at one byte each, and never written back as floats). Rows of the output are split over XLA's
// intra-op thread pool. Built by rss_jax.kernels at first use with the machine's own compiler and vector extensions.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxRows = 8;  // activation rows handled together: each weight is widened once per group
constexpr int64_t kChunk = 32;   // output channels per task

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

struct Job {
  const float* x;
  const int8_t* w;
  const float* scale;
  float* y;
  int64_t M, K, N, gs, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void work() {
    std::unique_ptr<float[]> buffer;
    for (;;) {
      int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= chunks) return;
      if (M > 1 && !buffer) buffer.reset(new float[K]);
      int64_t n0 = c * kChunk, n1 = std::min(N, n0 + kChunk);
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows)
        rows_block(x + m0 * K, w, scale, y + m0 * N, std::min(kMaxRows, M - m0), n0, n1, K, N, gs, buffer.get());
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                          ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || sd.size() != 2 || xd[1] != wd[1] || sd[0] != wd[0] || sd[1] < 1 ||
      wd[1] % sd[1] != 0)
    return ffi::Error::InvalidArgument("int8_matmul: expected x [M, K], w [N, K] int8, scale [N, G] with G | K");
  auto job = std::make_shared<Job>();
  job->x = x.typed_data();
  job->w = w.typed_data();
  job->scale = scale.typed_data();
  job->y = y->typed_data();
  job->M = xd[0];
  job->K = xd[1];
  job->N = wd[0];
  job->gs = wd[1] / sd[1];
  job->chunks = (job->N + kChunk - 1) / kChunk;
  int64_t helpers = std::min<int64_t>(pool.num_threads(), job->chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job] { job->work(); });
  job->work();  // the caller takes chunks too, so the call finishes even if no helper ever runs
  // only chunks a helper has claimed and not finished remain: wait for them, yielding the core after a short spin
  for (int spins = 0; job->done.load(std::memory_order_acquire) < job->chunks; ++spins) {
    if (spins > 64) std::this_thread::yield();
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
                                  .Ret<ffi::Buffer<ffi::F32>>());
