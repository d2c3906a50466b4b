// Winograd F(4x4, 3x3) convolutions (forward, input gradient, kernel gradient) for 3x3, stride-1, undilated
// kernels, NHWC activations and HWIO kernels, float32; included by onednn_conv.cc.
//
// Why: on CPUs without AVX-512 oneDNN has no Winograd kernels, and its direct 3x3 convolutions already run at the
// FMA peak; F(4x4, 3x3) does 36 multiplications per 4x4 output tile and channel pair instead of 144, i.e. the 3x3
// layers of the paper networks (most of the step, docs/performance.md) need 4x fewer GEMM flops plus the transforms.
//
// Method (Lavin & Gray 2016, points 0, +-1, +-2, inf): per 4x4 output tile t, the 6x6 input tile d_t becomes
// V_t = B^T d_t B and the kernel g becomes U = G g G^T; for each of the 36 positions xi of the transformed tile,
// M[xi] (tiles x out) = V[xi] (tiles x in) . U[xi] (in x out), one GEMM (oneDNN's sgemm), and the output tile is
// A^T M_t A. The input gradient is the same forward pass of the output gradient with the flipped, in/out-swapped
// kernel; the kernel gradient is dU[xi] = V[xi]^T (A dy_t A^T)[xi] summed over the tiles, then dg = G^T dU G.
// Tiles are processed in chunks that keep V and M in the last-level cache; within a chunk the transforms run in
// parallel over tiles and the GEMMs in parallel over the 36 positions and, with many threads, over blocks of
// their output rows (each single-threaded over the whole contraction), so nothing is reduced across threads.
//
// Accuracy: the transforms scale values by up to ~100x and back, so results differ from a direct convolution by
// ~1e-6 to 1e-5 relative to the output's magnitude (tests/test_fast_kernels.py measures it against float64), ~3-10x
// a direct float32 convolution's rounding -- what cuDNN's and oneDNN's Winograd kernels also trade for speed.
//
// The transforms use AVX2 + FMA (8 channels per vector, function-level target attributes so the rest of the
// library stays baseline x86-64); Supported() checks the CPU at run time, and channel counts must be multiples of 8.

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "oneapi/dnnl/dnnl.h"
#include "work_pool.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define CMEDL_WINOGRAD_X86 1
#define CMEDL_AVX2 __attribute__((target("avx2,fma")))
#else
#define CMEDL_WINOGRAD_X86 0
#define CMEDL_AVX2
#endif

namespace cmedl_winograd {

constexpr int kTile = 4;     // output tile side
constexpr int kInput = 6;    // input tile side
constexpr int kPoints = 36;  // transformed tile positions

inline bool Supported() {
#if CMEDL_WINOGRAD_X86
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}

// A 3x3, stride-1, undilated convolution of an (n, h, w, in) input into an (n, out_h, out_w, out) output that reads
// input row out_row + ky - pad_top (zero outside the input); pad_bottom/right follow from the sizes.
struct Problem {
  int64_t n, h, w, in, out_h, out_w, out, pad_top, pad_left;
  int64_t TilesH() const { return (out_h + kTile - 1) / kTile; }
  int64_t TilesW() const { return (out_w + kTile - 1) / kTile; }
  int64_t Tiles() const { return n * TilesH() * TilesW(); }
  // Output tile `tile` (images in order, tiles row-major within one): its image, first output row and column.
  void TileOrigin(int64_t tile, int64_t* image, int64_t* row, int64_t* col) const {
    const int64_t per_image = TilesH() * TilesW(), rest = tile % per_image;
    *image = tile / per_image;
    *row = (rest / TilesW()) * kTile;
    *col = (rest % TilesW()) * kTile;
  }
};

// Whether these sizes can run here: 3x3 stride-1 undilated kernels, channels in multiples of 8, padding 0..2
// (the input gradient's padding is 2 - padding).
inline bool Eligible(int64_t kh, int64_t kw, int64_t stride_h, int64_t stride_w, int64_t dilation_h,
                     int64_t dilation_w, int64_t in, int64_t out, int64_t pad_top, int64_t pad_left) {
  return Supported() && kh == 3 && kw == 3 && stride_h == 1 && stride_w == 1 && dilation_h == 1 && dilation_w == 1 &&
         in % 8 == 0 && out % 8 == 0 && pad_top >= 0 && pad_top <= 2 && pad_left >= 0 && pad_left <= 2;
}

#if CMEDL_WINOGRAD_X86

// Thread-unsafe growable buffers: only the executor thread calls in here.
inline float* Buffer(std::vector<float>& storage, size_t floats) {
  if (storage.size() < floats + 16) storage.resize(floats + 16);
  auto address = reinterpret_cast<uintptr_t>(storage.data());
  return reinterpret_cast<float*>((address + 63) & ~uintptr_t{63});
}

// B^T applied to 6 vectors (one column or row of a 6x6 tile).
CMEDL_AVX2 inline void InputRows(const __m256 d[6], __m256 r[6]) {
  const __m256 four = _mm256_set1_ps(4.f), five = _mm256_set1_ps(5.f), two = _mm256_set1_ps(2.f);
  // r0 = 4 d0 - 5 d2 + d4; r5 = 4 d1 - 5 d3 + d5
  r[0] = _mm256_fnmadd_ps(five, d[2], _mm256_fmadd_ps(four, d[0], d[4]));
  r[5] = _mm256_fnmadd_ps(five, d[3], _mm256_fmadd_ps(four, d[1], d[5]));
  // r1,2 = (d4 - 4 d2) -/+ (4 d1 - d3); r3,4 = (d4 - d2) -/+ (2 d1 - 2 d3)
  const __m256 a = _mm256_fnmadd_ps(four, d[2], d[4]), b = _mm256_fmsub_ps(four, d[1], d[3]);
  r[1] = _mm256_sub_ps(a, b);
  r[2] = _mm256_add_ps(a, b);
  const __m256 c = _mm256_sub_ps(d[4], d[2]), e = _mm256_mul_ps(two, _mm256_sub_ps(d[1], d[3]));
  r[3] = _mm256_sub_ps(c, e);
  r[4] = _mm256_add_ps(c, e);
}

// A^T applied to 6 vectors -> 4.
CMEDL_AVX2 inline void OutputRows(const __m256 m[6], __m256 o[4]) {
  const __m256 two = _mm256_set1_ps(2.f), four = _mm256_set1_ps(4.f), eight = _mm256_set1_ps(8.f);
  const __m256 s12 = _mm256_add_ps(m[1], m[2]), d12 = _mm256_sub_ps(m[1], m[2]);
  const __m256 s34 = _mm256_add_ps(m[3], m[4]), d34 = _mm256_sub_ps(m[3], m[4]);
  o[0] = _mm256_add_ps(_mm256_add_ps(m[0], s12), s34);
  o[1] = _mm256_fmadd_ps(two, d34, d12);
  o[2] = _mm256_fmadd_ps(four, s34, s12);
  o[3] = _mm256_add_ps(_mm256_fmadd_ps(eight, d34, d12), m[5]);
}

// A applied to 4 vectors -> 6 (the transpose of OutputRows).
CMEDL_AVX2 inline void GradientRows(const __m256 v[4], __m256 a[6]) {
  const __m256 two = _mm256_set1_ps(2.f), four = _mm256_set1_ps(4.f), eight = _mm256_set1_ps(8.f);
  const __m256 s02 = _mm256_add_ps(v[0], v[2]), s13 = _mm256_add_ps(v[1], v[3]);
  const __m256 e02 = _mm256_fmadd_ps(four, v[2], v[0]), e13 = _mm256_fmadd_ps(eight, v[3], _mm256_mul_ps(two, v[1]));
  a[0] = v[0];
  a[1] = _mm256_add_ps(s02, s13);
  a[2] = _mm256_sub_ps(s02, s13);
  a[3] = _mm256_add_ps(e02, e13);
  a[4] = _mm256_sub_ps(e02, e13);
  a[5] = v[3];
}

// G applied to 3 vectors -> 6.
CMEDL_AVX2 inline void KernelRows(const __m256 g[3], __m256 t[6]) {
  const __m256 quarter = _mm256_set1_ps(1.f / 4), sixth = _mm256_set1_ps(1.f / 6);
  const __m256 twelfth = _mm256_set1_ps(1.f / 12), twentyfourth = _mm256_set1_ps(1.f / 24);
  const __m256 s02 = _mm256_add_ps(g[0], g[2]);
  t[0] = _mm256_mul_ps(quarter, g[0]);
  t[1] = _mm256_mul_ps(sixth, _mm256_sub_ps(_mm256_setzero_ps(), _mm256_add_ps(s02, g[1])));
  t[2] = _mm256_mul_ps(sixth, _mm256_sub_ps(g[1], s02));
  const __m256 a = _mm256_fmadd_ps(twentyfourth, g[0], _mm256_mul_ps(sixth, g[2]));
  const __m256 b = _mm256_mul_ps(twelfth, g[1]);
  t[3] = _mm256_add_ps(a, b);
  t[4] = _mm256_sub_ps(a, b);
  t[5] = g[2];
}

// G^T applied to 6 vectors -> 3 (the kernel gradient's back-transform).
CMEDL_AVX2 inline void KernelGradientRows(const __m256 x[6], __m256 g[3]) {
  const __m256 quarter = _mm256_set1_ps(1.f / 4), sixth = _mm256_set1_ps(1.f / 6);
  const __m256 twelfth = _mm256_set1_ps(1.f / 12), twentyfourth = _mm256_set1_ps(1.f / 24);
  const __m256 s12 = _mm256_add_ps(x[1], x[2]), d12 = _mm256_sub_ps(x[2], x[1]);
  const __m256 s34 = _mm256_add_ps(x[3], x[4]), d34 = _mm256_sub_ps(x[3], x[4]);
  // g0 = x0/4 - (x1 + x2)/6 + (x3 + x4)/24; g1 = (x2 - x1)/6 + (x3 - x4)/12; g2 = (x3 + x4 - x1 - x2)/6 + x5
  g[0] = _mm256_fmadd_ps(quarter, x[0], _mm256_fmadd_ps(twentyfourth, s34, _mm256_mul_ps(sixth, _mm256_sub_ps(
      _mm256_setzero_ps(), s12))));
  g[1] = _mm256_fmadd_ps(sixth, d12, _mm256_mul_ps(twelfth, d34));
  g[2] = _mm256_fmadd_ps(sixth, _mm256_sub_ps(s34, s12), x[5]);
}

// U[xi][c][k] (in x out per position) from an HWIO kernel (3, 3, in, out). flip: the input gradient's kernel, i.e.
// g'[a][b] = g[2 - a][2 - b] (the in/out swap is left to the GEMM, which reads U transposed).
CMEDL_AVX2 inline void TransformKernelRow(const float* kernel, int64_t in, int64_t out, int64_t c, bool flip,
                                          float* u) {
  const size_t plane = (size_t)in * out;
  for (int64_t k = 0; k < out; k += 8) {
    __m256 g[3][3];
    for (int a = 0; a < 3; ++a) {
      for (int b = 0; b < 3; ++b) {
        const int ka = flip ? 2 - a : a, kb = flip ? 2 - b : b;
        g[a][b] = _mm256_loadu_ps(kernel + ((size_t)(ka * 3 + kb) * in + c) * out + k);
      }
    }
    __m256 t[6][3];  // G g: 6 rows x 3 columns
    for (int b = 0; b < 3; ++b) {
      const __m256 column[3] = {g[0][b], g[1][b], g[2][b]};
      __m256 rows[6];
      KernelRows(column, rows);
      for (int i = 0; i < 6; ++i) t[i][b] = rows[i];
    }
    for (int i = 0; i < 6; ++i) {
      __m256 rows[6];
      KernelRows(t[i], rows);
      for (int j = 0; j < 6; ++j) _mm256_storeu_ps(u + (size_t)(i * 6 + j) * plane + (size_t)c * out + k, rows[j]);
    }
  }
}

// V[xi][tile][0..in) for one tile from the input (zero outside it).
CMEDL_AVX2 inline void TransformInputTile(const float* x, const Problem& p, int64_t tile, int64_t tile_in_chunk,
                                          int64_t chunk, float* v) {
  int64_t image, row0, col0;
  p.TileOrigin(tile, &image, &row0, &col0);
  row0 -= p.pad_top;  // the input tile starts `pad` rows and columns before the output tile
  col0 -= p.pad_left;
  const bool inside = row0 >= 0 && col0 >= 0 && row0 + kInput <= p.h && col0 + kInput <= p.w;
  const float* base = x + (size_t)image * p.h * p.w * p.in;
  const size_t plane = (size_t)chunk * p.in;
  float* out = v + (size_t)tile_in_chunk * p.in;
  for (int64_t c = 0; c < p.in; c += 8) {
    __m256 d[6][6];
    for (int i = 0; i < 6; ++i) {
      const int64_t row = row0 + i;
      for (int j = 0; j < 6; ++j) {
        const int64_t col = col0 + j;
        if (inside || (row >= 0 && row < p.h && col >= 0 && col < p.w)) {
          d[i][j] = _mm256_loadu_ps(base + ((size_t)row * p.w + col) * p.in + c);
        } else {
          d[i][j] = _mm256_setzero_ps();
        }
      }
    }
    __m256 s[6][6];  // B^T d
    for (int j = 0; j < 6; ++j) {
      const __m256 column[6] = {d[0][j], d[1][j], d[2][j], d[3][j], d[4][j], d[5][j]};
      __m256 rows[6];
      InputRows(column, rows);
      for (int i = 0; i < 6; ++i) s[i][j] = rows[i];
    }
    for (int i = 0; i < 6; ++i) {
      __m256 rows[6];
      InputRows(s[i], rows);
      for (int j = 0; j < 6; ++j) _mm256_storeu_ps(out + (i * 6 + j) * plane + c, rows[j]);
    }
  }
}

// y tile from M[xi][tile][0..out), cropped to the output.
CMEDL_AVX2 inline void TransformOutputTile(const float* m, const Problem& p, int64_t tile, int64_t tile_in_chunk,
                                           int64_t chunk, float* y) {
  int64_t image, row0, col0;
  p.TileOrigin(tile, &image, &row0, &col0);
  const int rows_here = (int)std::min<int64_t>(kTile, p.out_h - row0);
  const int cols_here = (int)std::min<int64_t>(kTile, p.out_w - col0);
  float* base = y + (size_t)image * p.out_h * p.out_w * p.out;
  const size_t plane = (size_t)chunk * p.out;
  const float* in = m + (size_t)tile_in_chunk * p.out;
  for (int64_t k = 0; k < p.out; k += 8) {
    __m256 s[4][6];  // A^T m
    for (int j = 0; j < 6; ++j) {
      __m256 column[6];
      for (int i = 0; i < 6; ++i) column[i] = _mm256_loadu_ps(in + (i * 6 + j) * plane + k);
      __m256 rows[4];
      OutputRows(column, rows);
      for (int i = 0; i < 4; ++i) s[i][j] = rows[i];
    }
    for (int i = 0; i < rows_here; ++i) {
      __m256 o[4];
      OutputRows(s[i], o);
      for (int j = 0; j < cols_here; ++j) {
        _mm256_storeu_ps(base + ((size_t)(row0 + i) * p.out_w + col0 + j) * p.out + k, o[j]);
      }
    }
  }
}

// (A dy A^T)[xi][tile][0..out) for one tile of the output gradient (zero past the output).
CMEDL_AVX2 inline void TransformGradientTile(const float* dy, const Problem& p, int64_t tile, int64_t tile_in_chunk,
                                             int64_t chunk, float* dm) {
  int64_t image, row0, col0;
  p.TileOrigin(tile, &image, &row0, &col0);
  const float* base = dy + (size_t)image * p.out_h * p.out_w * p.out;
  const size_t plane = (size_t)chunk * p.out;
  float* out = dm + (size_t)tile_in_chunk * p.out;
  for (int64_t k = 0; k < p.out; k += 8) {
    __m256 v[4][4];
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) {
        const bool inside = row0 + i < p.out_h && col0 + j < p.out_w;
        v[i][j] = inside ? _mm256_loadu_ps(base + ((size_t)(row0 + i) * p.out_w + col0 + j) * p.out + k)
                         : _mm256_setzero_ps();
      }
    }
    __m256 s[6][4];  // A v
    for (int j = 0; j < 4; ++j) {
      const __m256 column[4] = {v[0][j], v[1][j], v[2][j], v[3][j]};
      __m256 rows[6];
      GradientRows(column, rows);
      for (int i = 0; i < 6; ++i) s[i][j] = rows[i];
    }
    for (int i = 0; i < 6; ++i) {
      __m256 rows[6];
      GradientRows(s[i], rows);
      for (int j = 0; j < 6; ++j) _mm256_storeu_ps(out + (i * 6 + j) * plane + k, rows[j]);
    }
  }
}

// HWIO kernel gradient row c from dU[xi][c][0..out).
CMEDL_AVX2 inline void KernelGradientRow(const float* du, int64_t in, int64_t out, int64_t c, float* dkernel) {
  const size_t plane = (size_t)in * out;
  for (int64_t k = 0; k < out; k += 8) {
    __m256 s[3][6];  // G^T x
    for (int j = 0; j < 6; ++j) {
      __m256 column[6];
      for (int i = 0; i < 6; ++i) column[i] = _mm256_loadu_ps(du + (size_t)(i * 6 + j) * plane + (size_t)c * out + k);
      __m256 rows[3];
      KernelGradientRows(column, rows);
      for (int i = 0; i < 3; ++i) s[i][j] = rows[i];
    }
    for (int i = 0; i < 3; ++i) {
      __m256 g[3];
      KernelGradientRows(s[i], g);
      for (int j = 0; j < 3; ++j) _mm256_storeu_ps(dkernel + ((size_t)(i * 3 + j) * in + c) * out + k, g[j]);
    }
  }
}

// Tiles per chunk: V and M of a chunk take at most ~8 MB (last-level cache), but at least 16 tiles (the transforms
// split a chunk across threads and the GEMMs run per position, so the chunk size only bounds the cache use).
inline int64_t ChunkTiles(const Problem& p) {
  const int64_t bytes_per_tile = (int64_t)kPoints * (p.in + p.out) * 4;
  return std::max<int64_t>(16, std::min<int64_t>(p.Tiles(), (8 << 20) / bytes_per_tile));
}

// 36 GEMMs, one per position, each single-threaded: in parallel over the positions, and with more threads than
// half the positions also over blocks of each GEMM's `rows` (its output rows). gemm(xi, begin, end) computes output
// rows [begin, end) of position xi over the whole contraction and returns dnnl_sgemm's status; false if any failed.
// Every output element comes from one single-threaded GEMM whose blocks depend on (rows, threads) only, so the
// result does not depend on which thread ran what. The caller runs with one OpenMP thread (onednn_conv.cc's Run).
template <typename Gemm>
bool ForEachPoint(int threads, int64_t rows, const Gemm& gemm) {
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(rows, (2 * (int64_t)threads + kPoints - 1) / kPoints));
  std::atomic<bool> ok{true};
  cmedl_pool::ForEach(kPoints * splits, threads, [&](int64_t task) {
    const int xi = static_cast<int>(task / splits);
    const int64_t part = task % splits, begin = rows * part / splits, end = rows * (part + 1) / splits;
    if (begin < end && gemm(xi, begin, end) != dnnl_success) ok = false;
  });
  return ok;
}

// y = conv(x, kernel) (flip = false), or the input gradient's convolution of the output gradient with the flipped,
// in/out-swapped kernel (flip = true; `kernel` is the forward's HWIO kernel (3, 3, p.out, p.in)). False if a GEMM
// failed.
inline bool Convolve(const float* x, const float* kernel, float* y, const Problem& p, bool flip, int threads) {
  static std::vector<float> u_storage, v_storage, m_storage;
  // U[xi] is (kernel in x kernel out) of the HWIO kernel: (p.in x p.out), or (p.out x p.in) when flipped.
  const int64_t kin = flip ? p.out : p.in, kout = flip ? p.in : p.out;
  float* u = Buffer(u_storage, (size_t)kPoints * kin * kout);
  cmedl_pool::ForEach(kin, threads, [&](int64_t c) { TransformKernelRow(kernel, kin, kout, c, flip, u); });
  const int64_t tiles = p.Tiles(), chunk = ChunkTiles(p);
  float* v = Buffer(v_storage, (size_t)kPoints * chunk * p.in);
  float* m = Buffer(m_storage, (size_t)kPoints * chunk * p.out);
  for (int64_t first = 0; first < tiles; first += chunk) {
    const int64_t count = std::min(chunk, tiles - first);
    cmedl_pool::ForEach(count, threads, [&](int64_t t) { TransformInputTile(x, p, first + t, t, chunk, v); });
    const bool ok = ForEachPoint(threads, count, [&](int xi, int64_t begin, int64_t end) {
      const float* vx = v + ((size_t)xi * chunk + begin) * p.in;
      const float* ux = u + (size_t)xi * kin * kout;
      float* mx = m + ((size_t)xi * chunk + begin) * p.out;
      // M (rows x out) = V (rows x in) . U, U stored (in x out), or (out x in) and read transposed.
      return dnnl_sgemm('N', flip ? 'T' : 'N', end - begin, p.out, p.in, 1.f, vx, p.in, ux, flip ? p.in : p.out, 0.f,
                        mx, p.out);
    });
    if (!ok) return false;
    cmedl_pool::ForEach(count, threads, [&](int64_t t) { TransformOutputTile(m, p, first + t, t, chunk, y); });
  }
  return true;
}

// dkernel (3, 3, p.in, p.out) of y = conv(x, kernel), given dy (n, out_h, out_w, out). False if a GEMM failed.
inline bool KernelGradient(const float* x, const float* dy, float* dkernel, const Problem& p, int threads) {
  static std::vector<float> du_storage, v_storage, m_storage;
  const int64_t tiles = p.Tiles(), chunk = ChunkTiles(p);
  if (tiles == 0) {  // an empty output: no tile ever clears dU
    std::fill_n(dkernel, (size_t)9 * p.in * p.out, 0.f);
    return true;
  }
  float* du = Buffer(du_storage, (size_t)kPoints * p.in * p.out);
  float* v = Buffer(v_storage, (size_t)kPoints * chunk * p.in);
  float* dm = Buffer(m_storage, (size_t)kPoints * chunk * p.out);
  for (int64_t first = 0; first < tiles; first += chunk) {
    const int64_t count = std::min(chunk, tiles - first);
    cmedl_pool::ForEach(count, threads, [&](int64_t t) {
      TransformInputTile(x, p, first + t, t, chunk, v);
      TransformGradientTile(dy, p, first + t, t, chunk, dm);
    });
    const float beta = first == 0 ? 0.f : 1.f;
    const bool ok = ForEachPoint(threads, p.in, [&](int xi, int64_t begin, int64_t end) {
      // dU rows [begin, end) (of in x out) += V^T (those rows of in x count) . dM (count x out)
      return dnnl_sgemm('T', 'N', end - begin, p.out, count, 1.f, v + (size_t)xi * chunk * p.in + begin, p.in,
                        dm + (size_t)xi * chunk * p.out, p.out, beta, du + ((size_t)xi * p.in + begin) * p.out, p.out);
    });
    if (!ok) return false;
  }
  cmedl_pool::ForEach(p.in, threads, [&](int64_t c) { KernelGradientRow(du, p.in, p.out, c, dkernel); });
  return true;
}

#endif  // CMEDL_WINOGRAD_X86

}  // namespace cmedl_winograd
