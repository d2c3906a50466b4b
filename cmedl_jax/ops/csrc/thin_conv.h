// Direct convolutions with a single channel on one side, for the layers oneDNN runs slowly (it pads the single
// channel to its 8-channel blocks; docs/performance.md): the generators' 7x7 first (1 -> F channels) and last
// (F -> 1) layers and the PatchGAN's first layer (1 -> F, 4x4, stride 2), on full-resolution maps. Included by
// onednn_conv.cc; NHWC activations, HWIO kernels, float32.
//
// Two forward forms cover the forward passes and the input gradients:
//   reduce:    y[p]    = sum_taps dot(x[s p + t - pad, 0..C), w[t, 0..C])       (C input channels, 1 output)
//   broadcast: y[p, :] = sum_taps x[s p + t - pad] * w[t, :]                      (1 input channel, F outputs)
// The input gradient of a stride-1 broadcast convolution is a reduce convolution of dy with the flipped kernel and
// padding k - 1 - pad (that of a reduce convolution, a broadcast one, is left to oneDNN: see Eligible). The kernel
// gradients sum x-by-dy products over all output pixels, per tap. The inner loops keep 4-8 independent FMA chains
// (8 output pixels at a time, or 8 accumulators over columns or channel blocks) so that the FMA latency is hidden.
// AVX2 + FMA with function-level target attributes (like winograd.h), 8 channels per vector, threads over output
// rows (the kernel gradients: one partial sum per block of rows, added in block order, so the result does not depend
// on which thread ran which block).

#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "winograd.h"  // CMEDL_AVX2, CMEDL_WINOGRAD_X86, Supported(), Buffer()
#include "work_pool.h"

namespace cmedl_thin {

// y (n, out_h, out_w, out) reads x (n, h, w, in) at row stride * out_row + ky - pad_top (zeros outside).
struct Problem {
  int64_t n, h, w, in, out_h, out_w, out, kh, kw, stride, pad_top, pad_left;
};

// One side 1 channel, the other a multiple of 8; equal strides, no dilation. The input gradient runs here for
// 1-input-channel convolutions only (stride 1, padding below the kernel size: its padding is k - 1 - pad): it is then
// a reduce convolution; the broadcast form writes a full-width map and is no faster than oneDNN's input gradient
// (docs/performance.md).
inline bool Eligible(int64_t kh, int64_t kw, int64_t stride_h, int64_t stride_w, int64_t dilation_h,
                     int64_t dilation_w, int64_t in, int64_t out, int64_t pad_top, int64_t pad_left, bool data_grad) {
  if (!cmedl_winograd::Supported() || stride_h != stride_w || dilation_h != 1 || dilation_w != 1) return false;
  if (pad_top < 0 || pad_left < 0) return false;
  if (!((in == 1 && out % 8 == 0) || (out == 1 && in % 8 == 0))) return false;
  return !data_grad || (in == 1 && stride_h == 1 && pad_top < kh && pad_left < kw);
}

#if CMEDL_WINOGRAD_X86

CMEDL_AVX2 inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Output columns [first, last) whose taps all lie inside the input row (the rest take the checked path).
inline void InteriorColumns(const Problem& p, int64_t* first, int64_t* last) {
  *first = std::min(p.out_w, (p.pad_left + p.stride - 1) / p.stride);
  const int64_t end = p.w + p.pad_left - p.kw;  // last column start that fits, times stride
  *last = end < 0 ? *first : std::max(*first, std::min(p.out_w, end / p.stride + 1));
}

// reduce form, one output pixel, with bounds checks (the border columns). Four accumulators over the channel
// blocks keep four FMA chains.
CMEDL_AVX2 inline void ReducePixel(const float* xi, const float* w, float* yr, const Problem& p, int64_t row,
                                   int64_t col) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t ky = 0; ky < p.kh; ++ky) {
    const int64_t iy = p.stride * row + ky - p.pad_top;
    if (iy < 0 || iy >= p.h) continue;
    for (int64_t kx = 0; kx < p.kw; ++kx) {
      const int64_t ix = p.stride * col + kx - p.pad_left;
      if (ix < 0 || ix >= p.w) continue;
      const int chain = (int)((ky * p.kw + kx) & 3);
      for (int64_t c = 0; c < p.in; c += 8) {
        acc[chain] = _mm256_fmadd_ps(_mm256_loadu_ps(xi + ((size_t)iy * p.w + ix) * p.in + c),
                                     _mm256_loadu_ps(w + (size_t)(ky * p.kw + kx) * p.in + c), acc[chain]);
      }
    }
  }
  yr[col] = HorizontalSum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}

// reduce form: one output row. w: (kh, kw, in).
CMEDL_AVX2 inline void ReduceRow(const float* x, const float* w, float* y, const Problem& p, int64_t image,
                                 int64_t row) {
  const float* xi = x + (size_t)image * p.h * p.w * p.in;
  float* yr = y + ((size_t)image * p.out_h + row) * p.out_w;
  int64_t first, last;
  InteriorColumns(p, &first, &last);
  for (int64_t col = 0; col < first; ++col) ReducePixel(xi, w, yr, p, row, col);
  int64_t col = first;
  for (; col + 8 <= last; col += 8) {
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t ky = 0; ky < p.kh; ++ky) {
      const int64_t iy = p.stride * row + ky - p.pad_top;
      if (iy < 0 || iy >= p.h) continue;
      const float* xrow = xi + ((size_t)iy * p.w + p.stride * col - p.pad_left) * p.in;
      for (int64_t kx = 0; kx < p.kw; ++kx) {
        for (int64_t c = 0; c < p.in; c += 8) {
          const __m256 wv = _mm256_loadu_ps(w + (size_t)(ky * p.kw + kx) * p.in + c);
          const float* xs = xrow + kx * p.in + c;
          for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(xs + i * p.stride * p.in), wv, acc[i]);
        }
      }
    }
    for (int i = 0; i < 8; ++i) yr[col + i] = HorizontalSum(acc[i]);
  }
  for (; col < p.out_w; ++col) ReducePixel(xi, w, yr, p, row, col);
}

// broadcast form, one output pixel, with bounds checks (the border columns); up to 8 channel blocks at a time
// (independent FMA chains).
CMEDL_AVX2 inline void BroadcastPixel(const float* xi, const float* w, float* yr, const Problem& p, int64_t row,
                                      int64_t col) {
  for (int64_t k0 = 0; k0 < p.out; k0 += 64) {
    const int blocks = (int)std::min<int64_t>(8, (p.out - k0) / 8);
    __m256 acc[8];
    for (int b = 0; b < 8; ++b) acc[b] = _mm256_setzero_ps();
    for (int64_t ky = 0; ky < p.kh; ++ky) {
      const int64_t iy = p.stride * row + ky - p.pad_top;
      if (iy < 0 || iy >= p.h) continue;
      for (int64_t kx = 0; kx < p.kw; ++kx) {
        const int64_t ix = p.stride * col + kx - p.pad_left;
        if (ix < 0 || ix >= p.w) continue;
        const __m256 xv = _mm256_set1_ps(xi[iy * p.w + ix]);
        const float* wt = w + (size_t)(ky * p.kw + kx) * p.out + k0;
        for (int b = 0; b < blocks; ++b) acc[b] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(wt + 8 * b), acc[b]);
      }
    }
    for (int b = 0; b < blocks; ++b) _mm256_storeu_ps(yr + col * p.out + k0 + 8 * b, acc[b]);
  }
}

// broadcast form: one output row. w: (kh, kw, out).
CMEDL_AVX2 inline void BroadcastRow(const float* x, const float* w, float* y, const Problem& p, int64_t image,
                                    int64_t row) {
  const float* xi = x + (size_t)image * p.h * p.w;
  float* yr = y + ((size_t)image * p.out_h + row) * p.out_w * p.out;
  int64_t first, last;
  InteriorColumns(p, &first, &last);
  for (int64_t col = 0; col < first; ++col) BroadcastPixel(xi, w, yr, p, row, col);
  int64_t col = first;
  for (; col + 8 <= last; col += 8) {
    for (int64_t k = 0; k < p.out; k += 8) {
      __m256 acc[8];
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t ky = 0; ky < p.kh; ++ky) {
        const int64_t iy = p.stride * row + ky - p.pad_top;
        if (iy < 0 || iy >= p.h) continue;
        const float* xrow = xi + iy * p.w + p.stride * col - p.pad_left;
        for (int64_t kx = 0; kx < p.kw; ++kx) {
          const __m256 wv = _mm256_loadu_ps(w + (size_t)(ky * p.kw + kx) * p.out + k);
          for (int i = 0; i < 8; ++i) {
            acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(xrow + kx + i * p.stride), wv, acc[i]);
          }
        }
      }
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(yr + (col + i) * p.out + k, acc[i]);
    }
  }
  for (; col < p.out_w; ++col) BroadcastPixel(xi, w, yr, p, row, col);
}

// The kernel gradient of either form over one output row, added into `dw` (kh, kw, C) with C = max(in, out):
// reduce form dw[t, c] += x[s p + t, c] * dy[p]; broadcast form dw[t, k] += x[s p + t] * dy[p, k].
CMEDL_AVX2 inline void KernelGradientRow(const float* x, const float* dy, float* dw, const Problem& p, int64_t image,
                                         int64_t row) {
  const bool reduce = p.out == 1;
  const int64_t channels = reduce ? p.in : p.out;
  const float* xi = x + (size_t)image * p.h * p.w * p.in;
  const float* gr = dy + ((size_t)image * p.out_h + row) * p.out_w * p.out;
  for (int64_t ky = 0; ky < p.kh; ++ky) {
    const int64_t iy = p.stride * row + ky - p.pad_top;
    if (iy < 0 || iy >= p.h) continue;
    for (int64_t kx = 0; kx < p.kw; ++kx) {
      // Output columns whose tap (ky, kx) falls inside the input row.
      const int64_t lo = std::max<int64_t>(0, (p.pad_left - kx + p.stride - 1) / p.stride);
      const int64_t last_start = p.w - 1 + p.pad_left - kx;  // < 0: the tap misses the row in every column
      const int64_t hi = last_start < 0 ? 0 : std::min<int64_t>(p.out_w, last_start / p.stride + 1);
      for (int64_t c = 0; c < channels; c += 8) {
        __m256 acc[8];
        for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
        int64_t col = lo;
        for (; col + 8 <= hi; col += 8) {
          for (int i = 0; i < 8; ++i) {
            const int64_t ix = p.stride * (col + i) + kx - p.pad_left;
            const __m256 a = reduce ? _mm256_loadu_ps(xi + ((size_t)iy * p.w + ix) * p.in + c)
                                    : _mm256_set1_ps(xi[iy * p.w + ix]);
            const __m256 b = reduce ? _mm256_set1_ps(gr[col + i]) : _mm256_loadu_ps(gr + (col + i) * p.out + c);
            acc[i] = _mm256_fmadd_ps(a, b, acc[i]);
          }
        }
        for (; col < hi; ++col) {
          const int64_t ix = p.stride * col + kx - p.pad_left;
          const __m256 a = reduce ? _mm256_loadu_ps(xi + ((size_t)iy * p.w + ix) * p.in + c)
                                  : _mm256_set1_ps(xi[iy * p.w + ix]);
          const __m256 b = reduce ? _mm256_set1_ps(gr[col]) : _mm256_loadu_ps(gr + col * p.out + c);
          acc[0] = _mm256_fmadd_ps(a, b, acc[0]);
        }
        __m256 sum = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])),
                                   _mm256_add_ps(_mm256_add_ps(acc[4], acc[5]), _mm256_add_ps(acc[6], acc[7])));
        float* target = dw + (size_t)(ky * p.kw + kx) * channels + c;
        _mm256_storeu_ps(target, _mm256_add_ps(_mm256_loadu_ps(target), sum));
      }
    }
  }
}

// y = conv(x, w): the reduce form when p.out == 1, else the broadcast form. w: (kh, kw, max(in, out)).
inline void Forward(const float* x, const float* w, float* y, const Problem& p, int threads) {
  const bool reduce = p.out == 1;
  cmedl_pool::ForEach(p.n * p.out_h, threads, [&](int64_t r) {
    if (reduce) {
      ReduceRow(x, w, y, p, r / p.out_h, r % p.out_h);
    } else {
      BroadcastRow(x, w, y, p, r / p.out_h, r % p.out_h);
    }
  });
}

// The input gradient (n, h, w, in) of y = conv(x, kernel), stride 1: the other form applied to dy with the flipped
// kernel and padding k - 1 - pad (correct for both forms; Eligible sends only broadcast convolutions here).
inline void BackwardData(const float* dy, const float* kernel, float* dx, const Problem& p, int threads) {
  static std::vector<float> storage;
  const int64_t channels = std::max(p.in, p.out);
  float* flipped = cmedl_winograd::Buffer(storage, (size_t)p.kh * p.kw * channels);
  for (int64_t ky = 0; ky < p.kh; ++ky) {
    for (int64_t kx = 0; kx < p.kw; ++kx) {
      std::copy_n(kernel + (size_t)((p.kh - 1 - ky) * p.kw + (p.kw - 1 - kx)) * channels, channels,
                  flipped + (size_t)(ky * p.kw + kx) * channels);
    }
  }
  const Problem back{p.n, p.out_h, p.out_w, p.out, p.h, p.w, p.in, p.kh, p.kw, 1, p.kh - 1 - p.pad_top,
                     p.kw - 1 - p.pad_left};
  Forward(dy, flipped, dx, back, threads);
}

// The kernel gradient (kh, kw, in, out) of y = conv(x, kernel): per block of output rows a partial sum, then the
// partial sums added in block order (the blocks depend on the row count and `threads` only: work_pool.h).
inline void KernelGradient(const float* x, const float* dy, float* dw, const Problem& p, int threads) {
  static std::vector<float> storage;
  const size_t size = (size_t)p.kh * p.kw * std::max(p.in, p.out);
  const int64_t rows = p.n * p.out_h;
  const size_t blocks = (size_t)cmedl_pool::Blocks(rows, threads);
  float* partial = cmedl_winograd::Buffer(storage, size * std::max<size_t>(1, blocks));
  std::fill_n(partial, size * blocks, 0.f);
  cmedl_pool::ParallelFor(rows, threads, [&](int64_t begin, int64_t end, int64_t block) {
    float* mine = partial + size * block;
    for (int64_t r = begin; r < end; ++r) KernelGradientRow(x, dy, mine, p, r / p.out_h, r % p.out_h);
  });
  std::fill_n(dw, size, 0.f);
  for (size_t b = 0; b < blocks; ++b) {
    for (size_t i = 0; i < size; ++i) dw[i] += partial[size * b + i];
  }
}

#endif  // CMEDL_WINOGRAD_X86

}  // namespace cmedl_thin
