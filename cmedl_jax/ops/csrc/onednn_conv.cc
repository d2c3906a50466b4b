// oneDNN 2-D convolutions (forward, input gradient, kernel gradient) as XLA FFI handlers for XLA:CPU.
//
// Built on first use by cmedl_jax/ops/onednn.py (g++ against the onednn-devel-cpu-gomp headers and jaxlib's
// FFI headers). Layouts are the ones cmedl_jax uses everywhere: activations NHWC, kernels HWIO (kh, kw, in, out),
// float32. oneDNN picks its own (blocked) kernel layout; the HWIO kernel is reordered into it on every call (it
// changes every step) and the kernel gradient is reordered back.
//
// Primitives are created once per geometry and thread count, and cached (creation costs far more than a small
// convolution). All calls of the process, from every XLA thread and CPU device, run one at a time on one executor
// thread (below), which shares each call out over `threads` threads (the caller passes the process's cores) with
// the pool of work_pool.h: the library's kernels split their loops, oneDNN's run as single-threaded primitives on
// parts of the batch (RunOnednn); a batch smaller than `threads` runs as one primitive with an OpenMP team.
// Scratchpad and reorder buffers are thread-local: one set on the executor and one per pool helper. Optional
// per-geometry timing: CmedlOnednnProfile* at the end.
//
// With the `winograd` attribute set, 3x3 stride-1 convolutions run as Winograd F(4x4, 3x3) instead on AVX2 CPUs
// (winograd.h: a quarter of the direct convolution's multiplications, ~1e-5 relative error), on the same executor
// thread.

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <future>
#include <map>
#include <new>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <string>
#include <unordered_map>
#include <vector>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "thin_conv.h"
#include "winograd.h"
#include "work_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

enum Kind : char { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// All int64, no padding bytes: the raw bytes are the cache key.
struct Geometry {
  int64_t n, h, w, cin, out_h, out_w, cout, kh, kw, stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right,
      dilation_h, dilation_w, threads, winograd;

  // The oneDNN primitive cache's key; the winograd flag does not change a oneDNN primitive (only whether one runs).
  std::string Key(Kind kind) const {
    Geometry primitive = *this;
    primitive.winograd = 0;
    std::string key(reinterpret_cast<const char*>(&primitive), sizeof(primitive));
    key.push_back(kind);
    return key;
  }
  memory::desc Src() const { return memory::desc({n, cin, h, w}, dt::f32, tag::nhwc); }
  memory::desc Dst() const { return memory::desc({n, cout, out_h, out_w}, dt::f32, tag::nhwc); }
  memory::desc AnyWeights() const { return memory::desc({cout, cin, kh, kw}, dt::f32, tag::any); }
  memory::desc HwioWeights() const { return memory::desc({cout, cin, kh, kw}, dt::f32, tag::hwio); }
  memory::dims Strides() const { return {stride_h, stride_w}; }
  memory::dims Dilations() const { return {dilation_h - 1, dilation_w - 1}; }  // oneDNN counts from 0
  memory::dims PadLow() const { return {pad_top, pad_left}; }
  memory::dims PadHigh() const { return {pad_bottom, pad_right}; }
  // The caller asked for Winograd (winograd.h) and this geometry has it.
  bool UsesWinograd() const {
    return winograd != 0 && out_h == h + pad_top + pad_bottom - 2 && out_w == w + pad_left + pad_right - 2 &&
           cmedl_winograd::Eligible(kh, kw, stride_h, stride_w, dilation_h, dilation_w, cin, cout, pad_top, pad_left);
  }
  // One channel on one side (thin_conv.h): always; oneDNN pads the single channel to its 8-channel blocks.
  bool UsesThin(Kind kind) const {
    return out_h == (h + pad_top + pad_bottom - kh) / stride_h + 1 &&
           out_w == (w + pad_left + pad_right - kw) / stride_w + 1 &&
           cmedl_thin::Eligible(kh, kw, stride_h, stride_w, dilation_h, dilation_w, cin, cout, pad_top, pad_left,
                                kind == kBackwardData);
  }
};

// A growable 64-byte aligned thread-local buffer (scratchpad, reordered kernel).
class AlignedBuffer {
 public:
  void* Get(size_t bytes) {
    if (storage_.size() < bytes + 64) storage_.resize(bytes + 64);
    auto address = reinterpret_cast<uintptr_t>(storage_.data());
    return reinterpret_cast<void*>((address + 63) & ~uintptr_t{63});
  }

 private:
  std::vector<char> storage_;
};

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// A layout reorder with a user scratchpad (thread-local): like the convolutions, one reorder may run on several
// pool threads at once (parts of a batch), which oneDNN allows only for primitives without a library scratchpad.
struct Reorder {
  Reorder() = default;
  Reorder(const memory::desc& from, const memory::desc& to) {
    dnnl::reorder::primitive_desc pd(Engine(), from, Engine(), to, UserScratchpad());
    primitive = dnnl::reorder(pd);
    scratchpad = pd.scratchpad_desc();
  }
  void Run(dnnl::stream& stream, memory& from, memory& to) const {
    std::unordered_map<int, memory> args{{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}};
    if (scratchpad.get_size() > 0) {
      thread_local AlignedBuffer buffer;
      args.insert({DNNL_ARG_SCRATCHPAD, memory(scratchpad, Engine(), buffer.Get(scratchpad.get_size()))});
    }
    primitive.execute(stream, args);
  }
  dnnl::reorder primitive;
  memory::desc scratchpad;
};

struct CachedPrimitive {
  dnnl::primitive primitive;
  memory::desc weights;  // the primitive's kernel layout
  memory::desc scratchpad;
  bool needs_reorder = false;
  Reorder weights_reorder;  // HWIO -> weights (forward, data gradient) or weights -> HWIO (kernel gradient)
  // Kernel gradient only: the primitive's input and output-gradient layouts and the reorders from NHWC.
  memory::desc src, dst;
  bool reorder_src = false, reorder_dst = false;
  Reorder src_reorder, dst_reorder;
};

std::mutex cache_mutex;
std::unordered_map<std::string, std::shared_ptr<CachedPrimitive>> cache;

std::shared_ptr<CachedPrimitive> Lookup(const Geometry& g, Kind kind) {
  const std::string key = g.Key(kind);
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto entry = std::make_shared<CachedPrimitive>();
  dnnl::convolution_forward::primitive_desc forward(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, g.Src(), g.AnyWeights(),
      g.Dst(), g.Strides(), g.Dilations(), g.PadLow(), g.PadHigh(), UserScratchpad());
  if (kind == kForward) {
    entry->primitive = dnnl::convolution_forward(forward);
    entry->weights = forward.weights_desc();
    entry->scratchpad = forward.scratchpad_desc();
  } else if (kind == kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.AnyWeights(), g.Dst(), g.Strides(),
        g.Dilations(), g.PadLow(), g.PadHigh(), forward, UserScratchpad());
    entry->primitive = dnnl::convolution_backward_data(pd);
    entry->weights = pd.weights_desc();
    entry->scratchpad = pd.scratchpad_desc();
  } else {
    const memory::desc any_src({g.n, g.cin, g.h, g.w}, dt::f32, tag::any);
    const memory::desc any_dst({g.n, g.cout, g.out_h, g.out_w}, dt::f32, tag::any);
    dnnl::convolution_forward::primitive_desc forward_any(
        Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, any_src, g.AnyWeights(),
        any_dst, g.Strides(), g.Dilations(), g.PadLow(), g.PadHigh(), UserScratchpad());
    dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, any_src, g.AnyWeights(), any_dst, g.Strides(),
        g.Dilations(), g.PadLow(), g.PadHigh(), forward_any, UserScratchpad());
    entry->primitive = dnnl::convolution_backward_weights(pd);
    entry->weights = pd.diff_weights_desc();
    entry->scratchpad = pd.scratchpad_desc();
    entry->src = pd.src_desc();
    entry->dst = pd.diff_dst_desc();
    entry->reorder_src = !(entry->src == g.Src());
    entry->reorder_dst = !(entry->dst == g.Dst());
    if (entry->reorder_src) {
      entry->src_reorder = Reorder(g.Src(), entry->src);
    }
    if (entry->reorder_dst) {
      entry->dst_reorder = Reorder(g.Dst(), entry->dst);
    }
  }
  entry->needs_reorder = !(entry->weights == g.HwioWeights());
  if (entry->needs_reorder) {
    const memory::desc from = kind == kBackwardWeights ? entry->weights : g.HwioWeights();
    const memory::desc to = kind == kBackwardWeights ? g.HwioWeights() : entry->weights;
    entry->weights_reorder = Reorder(from, to);
  }
  std::lock_guard<std::mutex> lock(cache_mutex);
  return cache.emplace(key, entry).first->second;
}

// One oneDNN primitive call of geometry g (its own OpenMP thread count: the caller's). kForward: src -> dst.
// kBackwardData: dst (output gradient) -> src (input gradient). kBackwardWeights: src, dst -> weights (kernel
// gradient). Throws (dnnl::error, std::bad_alloc).
void RunPrimitive(Kind kind, const Geometry& g, float* src, float* weights, float* dst) {
  auto entry = Lookup(g, kind);
  thread_local dnnl::stream stream(Engine());
  thread_local AlignedBuffer scratch_buffer, weights_buffer;
  memory src_mem(g.Src(), Engine(), src), dst_mem(g.Dst(), Engine(), dst);
  memory hwio(g.HwioWeights(), Engine(), weights);
  memory kernel = hwio;
  if (entry->needs_reorder) {
    kernel = memory(entry->weights, Engine(), weights_buffer.Get(entry->weights.get_size()));
  }
  memory scratchpad(entry->scratchpad, Engine(), scratch_buffer.Get(entry->scratchpad.get_size()));
  if (kind == kForward) {
    if (entry->needs_reorder) entry->weights_reorder.Run(stream, hwio, kernel);
    entry->primitive.execute(stream, {{DNNL_ARG_SRC, src_mem}, {DNNL_ARG_WEIGHTS, kernel},
                                      {DNNL_ARG_DST, dst_mem}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
  } else if (kind == kBackwardData) {
    if (entry->needs_reorder) entry->weights_reorder.Run(stream, hwio, kernel);
    entry->primitive.execute(stream, {{DNNL_ARG_DIFF_SRC, src_mem}, {DNNL_ARG_WEIGHTS, kernel},
                                      {DNNL_ARG_DIFF_DST, dst_mem}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
  } else {
    thread_local AlignedBuffer src_buffer, dst_buffer;
    memory src_in = src_mem, dst_in = dst_mem;
    if (entry->reorder_src) {
      src_in = memory(entry->src, Engine(), src_buffer.Get(entry->src.get_size()));
      entry->src_reorder.Run(stream, src_mem, src_in);
    }
    if (entry->reorder_dst) {
      dst_in = memory(entry->dst, Engine(), dst_buffer.Get(entry->dst.get_size()));
      entry->dst_reorder.Run(stream, dst_mem, dst_in);
    }
    entry->primitive.execute(stream, {{DNNL_ARG_SRC, src_in}, {DNNL_ARG_DIFF_WEIGHTS, kernel},
                                      {DNNL_ARG_DIFF_DST, dst_in}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
    if (entry->needs_reorder) entry->weights_reorder.Run(stream, kernel, hwio);
  }
  stream.wait();
}

// oneDNN's kernels on the pool: the batch split into up to 2 parts per thread (kernel gradients: 1), each part a
// single-threaded primitive (its kernel gradient a partial sum, added at the end in part order). The parts are
// fixed batch ranges and each partial kernel belongs to its part, not to the thread that ran it, so the result is the
// same in every run with the same thread count. A batch smaller than the thread count runs as one call with an
// OpenMP team (oneDNN splits its work statically by OpenMP thread number).
void RunOnednn(Kind kind, const Geometry& g, float* src, float* weights, float* dst) {
  const int threads = static_cast<int>(g.threads);
  // Up to 2 parts per thread balance late helpers; kernel gradients: one per thread (each part is a whole kernel).
  const int64_t parts = std::min<int64_t>(g.n, (kind == kBackwardWeights ? 1 : 2) * threads);
  if (threads <= 1 || g.n < threads) {
    omp_set_num_threads(threads);
    RunPrimitive(kind, g, src, weights, dst);
    return;
  }
  omp_set_num_threads(1);
  const int64_t src_image = g.h * g.w * g.cin, dst_image = g.out_h * g.out_w * g.cout;
  const int64_t kernel_size = g.kh * g.kw * g.cin * g.cout;
  static std::vector<float> partial_storage;  // the executor's
  float* partial = nullptr;
  if (kind == kBackwardWeights) {
    partial_storage.resize((size_t)(parts - 1) * kernel_size);
    partial = partial_storage.data();
  }
  // A part's exception (dnnl::error, bad_alloc) is rethrown here by the pool, after the other parts finished.
  cmedl_pool::ForEach(parts, threads, [&](int64_t part) {
    const int64_t first = g.n * part / parts, count = g.n * (part + 1) / parts - first;
    Geometry piece = g;
    piece.n = count;
    piece.threads = 1;
    float* piece_weights = kind == kBackwardWeights && part > 0 ? partial + (part - 1) * kernel_size : weights;
    RunPrimitive(kind, piece, src + first * src_image, piece_weights, dst + first * dst_image);
  });
  if (kind == kBackwardWeights) {
    cmedl_pool::ParallelFor(kernel_size, threads, [&](int64_t begin, int64_t end, int64_t) {
      for (int64_t part = 1; part < parts; ++part) {
        const float* from = partial + (part - 1) * kernel_size;
        for (int64_t i = begin; i < end; ++i) weights[i] += from[i];
      }
    });
  }
}

// kForward: src -> dst. kBackwardData: dst (output gradient) -> src (input gradient). kBackwardWeights: src, dst
// -> weights (kernel gradient).
ffi::Error Run(Kind kind, const Geometry& g, float* src, float* weights, float* dst) {
  // The library's kernels share their work out on the pool (work_pool.h); their oneDNN sgemm calls run
  // single-threaded.
  omp_set_num_threads(1);
  try {
#if CMEDL_WINOGRAD_X86
    if (g.UsesWinograd()) {
      // The forward problem; the input gradient is its flipped-kernel convolution of dy, padded by 2 - padding.
      const cmedl_winograd::Problem forward{g.n, g.h, g.w, g.cin, g.out_h, g.out_w, g.cout, g.pad_top, g.pad_left};
      const int threads = static_cast<int>(g.threads);
      bool ok;
      if (kind == kForward) {
        ok = cmedl_winograd::Convolve(src, weights, dst, forward, /*flip=*/false, threads);
      } else if (kind == kBackwardData) {
        const cmedl_winograd::Problem backward{g.n, g.out_h, g.out_w, g.cout, g.h, g.w, g.cin, 2 - g.pad_top,
                                               2 - g.pad_left};
        ok = cmedl_winograd::Convolve(dst, weights, src, backward, /*flip=*/true, threads);
      } else {
        ok = cmedl_winograd::KernelGradient(src, dst, weights, forward, threads);
      }
      return ok ? ffi::Error::Success()
                : ffi::Error(ffi::ErrorCode::kInternal, "Winograd convolution: oneDNN's sgemm failed");
    }
    if (g.UsesThin(kind)) {
      const cmedl_thin::Problem p{g.n,    g.h,  g.w,  g.cin,      g.out_h,   g.out_w,
                                  g.cout, g.kh, g.kw, g.stride_h, g.pad_top, g.pad_left};
      const int threads = static_cast<int>(g.threads);
      if (kind == kForward) {
        cmedl_thin::Forward(src, weights, dst, p, threads);
      } else if (kind == kBackwardData) {
        cmedl_thin::BackwardData(dst, weights, src, p, threads);
      } else {
        cmedl_thin::KernelGradient(src, dst, weights, p, threads);
      }
      return ffi::Error::Success();
    }
#endif
    RunOnednn(kind, g, src, weights, dst);
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution failed: ") + e.what());
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "oneDNN convolution: out of memory");
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution failed: ") + e.what());
  }
  return ffi::Error::Success();
}

// Every call runs on this one thread (and the pool's helpers), one call at a time, while the XLA thread that issued
// it waits. XLA issues independent convolutions from several of its threads at once; run there, each call would
// start an OpenMP team of its own (cores^2 threads in all) and the concurrent teams oversubscribe the cores
// (docs/performance.md: the convolutions' busy time with and without this executor).
class Executor {
 public:
  static Executor& Get() {
    static Executor* executor = new Executor();  // never destroyed: its thread outlives static destructors
    return *executor;
  }
  ffi::Error Run(std::function<ffi::Error()> job) {
    std::packaged_task<ffi::Error()> task(std::move(job));
    std::future<ffi::Error> done = task.get_future();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(&task);
    }
    ready_.notify_one();
    return done.get();
  }

 private:
  Executor() { std::thread([this] { Loop(); }).detach(); }
  void Loop() {
    for (;;) {
      std::packaged_task<ffi::Error()>* task;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ready_.wait(lock, [this] { return !queue_.empty(); });
        task = queue_.front();
        queue_.pop_front();
      }
      (*task)();
    }
  }
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::packaged_task<ffi::Error()>*> queue_;
};

// Optional timing of the calls (CmedlOnednnProfile* below): per kind and geometry, and the wall time during which
// at least one call was running.
struct Profile {
  std::mutex mutex;
  bool enabled = false;
  int in_flight = 0;
  std::chrono::steady_clock::time_point busy_since;
  double busy_seconds = 0;
  std::map<std::string, std::pair<int64_t, double>> per_key;  // text key -> (calls, seconds)
  std::set<std::thread::id> running_threads;  // the OS threads the calls ran on (the executor's: one)
};
Profile& GetProfile() {
  static Profile* profile = new Profile();
  return *profile;
}

ffi::Error Timed(Kind kind, const Geometry& g, const std::function<ffi::Error()>& job) {
  Profile& p = GetProfile();
  bool enabled;
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    enabled = p.enabled;
    if (enabled && p.in_flight++ == 0) p.busy_since = std::chrono::steady_clock::now();
  }
  if (!enabled) return job();  // not under the profile's lock: profile_start/stop never wait for a convolution
  const auto start = std::chrono::steady_clock::now();
  ffi::Error result = job();
  const auto end = std::chrono::steady_clock::now();
  char key[256];
  std::snprintf(key, sizeof(key), "%s n%ld %ldx%ldx%ld -> %ldx%ldx%ld k%ldx%ld s%ld%s",
                kind == kForward ? "fwd" : kind == kBackwardData ? "dx " : "dw ", (long)g.n, (long)g.h, (long)g.w,
                (long)g.cin, (long)g.out_h, (long)g.out_w, (long)g.cout, (long)g.kh, (long)g.kw, (long)g.stride_h,
                g.UsesWinograd() ? " winograd" : g.UsesThin(kind) ? " thin" : "");
  std::lock_guard<std::mutex> lock(p.mutex);
  auto& entry = p.per_key[key];
  entry.first += 1;
  entry.second += std::chrono::duration<double>(end - start).count();
  p.running_threads.insert(std::this_thread::get_id());
  if (--p.in_flight == 0) p.busy_seconds += std::chrono::duration<double>(end - p.busy_since).count();
  return result;
}

ffi::Error Dispatch(Kind kind, const Geometry& g, float* src, float* weights, float* dst) {
  std::function<ffi::Error()> job = [=, &g] { return Run(kind, g, src, weights, dst); };
  try {
    return Executor::Get().Run([&] { return Timed(kind, g, job); });
  } catch (const std::exception& e) {  // e.g. no thread could be started, or the profile's bookkeeping
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution failed: ") + e.what());
  }
}

Geometry MakeGeometry(ffi::Span<const int64_t> nhwc_in, ffi::Span<const int64_t> hwio,
                      ffi::Span<const int64_t> nhwc_out, int64_t stride_h, int64_t stride_w, int64_t pad_top,
                      int64_t pad_bottom, int64_t pad_left, int64_t pad_right, int64_t dilation_h,
                      int64_t dilation_w, int64_t threads, int64_t winograd) {
  return Geometry{nhwc_in[0], nhwc_in[1], nhwc_in[2], nhwc_in[3], nhwc_out[1], nhwc_out[2], nhwc_out[3],
                  hwio[0],    hwio[1],    stride_h,   stride_w,   pad_top,     pad_bottom,  pad_left,
                  pad_right,  dilation_h, dilation_w, threads,    winograd};
}

}  // namespace

#define CMEDL_CONV_ATTRS int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_bottom, \
    int64_t pad_left, int64_t pad_right, int64_t dilation_h, int64_t dilation_w, int64_t threads, int64_t winograd
#define CMEDL_CONV_ATTR_VALUES stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, dilation_h, \
    dilation_w, threads, winograd

static ffi::Error ConvForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> y,
                              CMEDL_CONV_ATTRS) {
  Geometry g = MakeGeometry(x.dimensions(), kernel.dimensions(), y->dimensions(), CMEDL_CONV_ATTR_VALUES);
  return Dispatch(kForward, g, x.typed_data(), kernel.typed_data(), y->typed_data());
}

static ffi::Error ConvBackwardData(ffi::Buffer<ffi::F32> g_out, ffi::Buffer<ffi::F32> kernel,
                                   ffi::ResultBuffer<ffi::F32> dx, CMEDL_CONV_ATTRS) {
  Geometry g = MakeGeometry(dx->dimensions(), kernel.dimensions(), g_out.dimensions(), CMEDL_CONV_ATTR_VALUES);
  return Dispatch(kBackwardData, g, dx->typed_data(), kernel.typed_data(), g_out.typed_data());
}

static ffi::Error ConvBackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g_out,
                                      ffi::ResultBuffer<ffi::F32> dkernel, CMEDL_CONV_ATTRS) {
  Geometry g = MakeGeometry(x.dimensions(), dkernel->dimensions(), g_out.dimensions(), CMEDL_CONV_ATTR_VALUES);
  return Dispatch(kBackwardWeights, g, x.typed_data(), dkernel->typed_data(), g_out.typed_data());
}

#define CMEDL_CONV_BINDING                                                                                \
  ffi::Ffi::Bind()                                                                                        \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                       \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                       \
      .Ret<ffi::Buffer<ffi::F32>>()                                                                       \
      .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_top")                       \
      .Attr<int64_t>("pad_bottom").Attr<int64_t>("pad_left").Attr<int64_t>("pad_right")                   \
      .Attr<int64_t>("dilation_h").Attr<int64_t>("dilation_w").Attr<int64_t>("threads")                   \
      .Attr<int64_t>("winograd")

XLA_FFI_DEFINE_HANDLER_SYMBOL(CmedlOnednnConvForward, ConvForward, CMEDL_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(CmedlOnednnConvBackwardData, ConvBackwardData, CMEDL_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(CmedlOnednnConvBackwardWeights, ConvBackwardWeights, CMEDL_CONV_BINDING);

// Profiling hooks for cmedl_jax.ops.onednn.profile_start / profile_stop (ctypes).
extern "C" void CmedlOnednnProfileStart() {
  Profile& p = GetProfile();
  std::lock_guard<std::mutex> lock(p.mutex);
  p.enabled = true;
  p.busy_seconds = 0;
  p.per_key.clear();
  p.running_threads.clear();
}

// Stops profiling and writes "calls seconds key" lines, then "busy <seconds> <threads>", into `out` (truncated to
// `size`); returns the text's length.
extern "C" int64_t CmedlOnednnProfileStop(char* out, int64_t size) {
  Profile& p = GetProfile();
  std::lock_guard<std::mutex> lock(p.mutex);
  p.enabled = false;
  std::string text;
  char line[320];
  for (const auto& [key, stats] : p.per_key) {
    std::snprintf(line, sizeof(line), "%ld %.6f %s\n", (long)stats.first, stats.second, key.c_str());
    text += line;
  }
  std::snprintf(line, sizeof(line), "busy %.6f %ld\n", p.busy_seconds, (long)p.running_threads.size());
  text += line;
  if (size > 0) {
    std::strncpy(out, text.c_str(), size - 1);
    out[size - 1] = 0;
  }
  return (int64_t)text.size();
}
