// A parallel-for whose helper threads join when they are running, used instead of OpenMP teams by the library's
// kernels (Winograd, one-channel) and by oneDNN's kernels split by batch; included by onednn_conv.cc.
//
// Why: XLA runs its own fusions on the same cores while a convolution runs. An OpenMP parallel region splits its
// work statically and ends in a barrier, so a team thread that XLA's threads have pushed off a core stalls the whole
// call, and libgomp's idle team threads spin between regions, taking CPU time from XLA's threads. Here the calling
// thread claims blocks of the loop itself; a helper that is not running when the loop starts takes no share, the
// caller never waits for a helper to arrive, only for blocks already claimed to finish, and idle helpers spin 10 us
// (the gaps between one convolution's loops) before sleeping on a condition variable. What that changed in the
// step's time and CPU time: docs/performance.md.
//
// Claims: one 64-bit state word = generation (32 bits) | helpers allowed (8) | blocks left (24). A claim is a CAS
// that decrements "blocks left" of the generation the helper saw, so a claim can only succeed while that loop is
// published: the caller waits until every claimed block is done before it publishes the next loop, and the loop's
// parameters, written before the caller's store of the state word, are read only after a successful claim.
//
// Determinism: which thread runs a block depends on scheduling, but the blocks themselves do not: the partition of
// [0, n) depends on (n, threads) only (Blocks, BlockSize), and the body is told the index of the block it runs. A
// reduction keeps one partial result per block and adds them in block order (never one per thread), so its result
// is the same in every run with the same thread count.

#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include <omp.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define CMEDL_PAUSE() _mm_pause()
#else
#define CMEDL_PAUSE() std::this_thread::yield()
#endif

namespace cmedl_pool {

// body(begin, end, block): indices [begin, end), the block-th of the loop's blocks (see Blocks).
using Body = std::function<void(int64_t, int64_t, int64_t)>;

constexpr int kMaxThreads = 256;

inline int ClampThreads(int threads) { return std::max(1, std::min(threads, kMaxThreads)); }

// The size of the blocks For(n, threads, ...) splits [0, n) into: up to 8 blocks per thread.
inline int64_t BlockSize(int64_t n, int threads) {
  threads = ClampThreads(threads);
  return threads == 1 ? std::max<int64_t>(1, n) : std::max<int64_t>(1, (n + 8 * threads - 1) / (8 * threads));
}

// How many blocks For(n, threads, ...) runs (block indices 0 .. Blocks - 1); a function of (n, threads) only.
inline int64_t Blocks(int64_t n, int threads) {
  if (n <= 0) return 0;
  const int64_t block = BlockSize(n, threads);
  return (n + block - 1) / block;
}

class Pool {
 public:
  static Pool& Get() {
    static Pool* pool = new Pool();  // never destroyed: its threads outlive static destructors
    return *pool;
  }

  // Runs body over the Blocks(n, threads) blocks of [0, n), on the calling thread and up to threads - 1 helpers.
  // One caller at a time (the library's executor thread; not re-entrant: body must not call For). Helpers set their
  // OpenMP thread count to 1 (oneDNN primitives created for one thread and sgemm run single-threaded there); the
  // caller's own count is the caller's business. An exception thrown by body on any thread is rethrown here, after
  // every claimed block has finished (the first one, if several).
  void For(int64_t n, int threads, const Body& body) {
    if (n <= 0) return;
    threads = ClampThreads(threads);
    const int64_t block = BlockSize(n, threads);
    const int64_t blocks = Blocks(n, threads);
    if (blocks == 1) {
      body(0, n, 0);
      return;
    }
    StartHelpers(threads - 1);
    body_ = &body;
    n_ = n;
    block_ = block;
    done_.store(0, std::memory_order_relaxed);
    error_ = nullptr;
    generation_ = (generation_ + 1) & 0xffffffffu;  // 32 bits in the state word; wraps after ~4e9 loops
    if (generation_ == 0) generation_ = 1;           // 0: no loop yet (a new helper has seen it)
    const uint64_t generation = generation_;
    state_.store((generation << 32) | (uint64_t(threads - 1) << 24) | uint64_t(blocks), std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_all();
    }
    Work(generation, 0);
    // Only blocks a helper has claimed can be left; wait for them (a preempted helper: give it the core).
    for (int spins = 0; done_.load(std::memory_order_acquire) < blocks; ++spins) {
      if (spins < 4096) {
        CMEDL_PAUSE();
      } else {
        std::this_thread::yield();
      }
    }
    if (error_) std::rethrow_exception(error_);
  }

 private:
  static constexpr uint64_t kBlocksMask = (1u << 24) - 1;
  static_assert(kMaxThreads - 1 <= 0xff, "helpers allowed: 8 bits of the state word");
  static_assert(8 * kMaxThreads <= kBlocksMask, "blocks left: 24 bits of the state word");

  Pool() = default;

  // Claims and runs blocks of `generation` until none is left (or another loop was published).
  void Work(uint64_t generation, int worker) {
    uint64_t state = state_.load(std::memory_order_acquire);
    for (;;) {
      if ((state >> 32) != generation || (state & kBlocksMask) == 0) return;
      if (worker > 0 && worker > int((state >> 24) & 0xff)) return;
      if (!state_.compare_exchange_weak(state, state - 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        continue;
      }
      const int64_t index = int64_t((state & kBlocksMask) - 1);  // blocks are claimed from the last one down
      const int64_t begin = index * block_, end = std::min(n_, begin + block_);
      try {
        (*body_)(begin, end, index);
      } catch (...) {  // on a helper it would end the process; the caller rethrows it
        std::lock_guard<std::mutex> lock(error_mutex_);
        if (!error_) error_ = std::current_exception();
      }
      done_.fetch_add(1, std::memory_order_release);
      state = state_.load(std::memory_order_acquire);
    }
  }

  void StartHelpers(int count) {
    while (started_ < count) {
      const int worker = started_ + 1;
      std::thread([this, worker] { HelperLoop(worker); }).detach();  // may throw: the slot stays free
      started_ = worker;
    }
  }

  void HelperLoop(int worker) {
    omp_set_num_threads(1);
    uint64_t seen = 0;
    for (;;) {
      uint64_t generation = state_.load(std::memory_order_acquire) >> 32;
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicroseconds);
      while (generation == seen && std::chrono::steady_clock::now() < spin_until) {
        for (int i = 0; i < 64 && generation == seen; ++i) {
          CMEDL_PAUSE();
          generation = state_.load(std::memory_order_acquire) >> 32;
        }
      }
      if (generation == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleeping_.fetch_add(1, std::memory_order_seq_cst);
        wake_.wait(lock, [&] { return (state_.load(std::memory_order_seq_cst) >> 32) != seen; });
        sleeping_.fetch_sub(1, std::memory_order_seq_cst);
        generation = state_.load(std::memory_order_acquire) >> 32;
      }
      seen = generation;
      Work(generation, worker);
    }
  }

  static constexpr int kSpinMicroseconds = 10;

  // Claims (helpers' CAS) and completions (the caller's polling) on separate cache lines.
  alignas(64) std::atomic<uint64_t> state_{0};
  alignas(64) std::atomic<int64_t> done_{0};
  alignas(64) std::atomic<int> sleeping_{0};
  uint64_t generation_ = 0;  // the caller's
  int started_ = 0;          // the caller's
  // The loop's parameters: written by the caller before it publishes the state word, read after a claim.
  const Body* body_ = nullptr;
  int64_t n_ = 0, block_ = 1;
  std::mutex error_mutex_;
  std::exception_ptr error_;  // the first exception of the loop; read by the caller after the loop
  std::mutex mutex_;
  std::condition_variable wake_;
};

// Runs body over the blocks of [0, n) with `threads` threads (see Pool::For).
inline void ParallelFor(int64_t n, int threads, const Body& body) { Pool::Get().For(n, threads, body); }

// Runs f(i) for i in [0, n) with `threads` threads (see Pool::For).
template <typename F>
void ForEach(int64_t n, int threads, const F& f) {
  ParallelFor(n, threads, [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t i = begin; i < end; ++i) f(i);
  });
}

}  // namespace cmedl_pool
