// Minimal CPU emulation of the CUDA runtime features that csrc/cuda/splitzip_cuda.cu uses, so that the REAL
// kernel source can be compiled with a host C++ compiler and tested without a GPU:
//   g++ -std=c++17 -O1 -DSPLITZIP_CUDA_EMU -x c++ -shared -fPIC -pthread -I csrc/include -I csrc/cuda
//       csrc/cuda/splitzip_cuda.cu -o libsplitzip_cuda_emu.so   (tests/test_codec_cuda_emu.py does this)
//
// Model: "device memory" is host memory. A launch runs its blocks on a few OS threads (blocks really run
// concurrently, so decoupled look-backs and the last-block pattern see other blocks in flight); inside a block
// the 256 threads are cooperative fibers (ucontext) with real barrier semantics for __syncthreads and the warp
// intrinsics (__shfl_*, __ballot_sync, __any_sync, __reduce_add_sync, __syncwarp: every lane of the warp must
// take part, as the kernels guarantee). __shared__ variables are thread_local, i.e. one copy per running block.
// __CUDA_ARCH__ is defined (900) so that the device branches of the kernels are the ones compiled.
// Not emulated: anything the kernels do not use. Intended for tests only; slow (a context switch per thread per
// barrier).
#pragma once

#if !defined(SPLITZIP_CUDA_EMU)
#error "cuda_emu.h is only for SPLITZIP_CUDA_EMU builds"
#endif

#include <ucontext.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>
#include <type_traits>
#include <vector>

#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 900
#endif
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __align__(n) alignas(n)

// ---- runtime types -------------------------------------------------------------------------------------------------
enum cudaError { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
typedef enum cudaError cudaError_t;
typedef struct CUstream_st* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
inline uint2 make_uint2(unsigned int x, unsigned int y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return uint4{x, y, z, w}; }
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace sz_emu {

inline std::atomic<int> g_sm_count{4};         // what cudaDevAttrMultiProcessorCount reports
inline std::atomic<int> g_blocks_per_sm{2};    // what the occupancy query reports
inline std::atomic<int> g_workers{3};          // OS threads running blocks concurrently
inline std::atomic<long> g_timeout_ms{120000};  // a launch that makes no progress this long aborts

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  dim3 tid;
  bool done = false;
};

struct WarpState {
  int live = 32;
  int count = 0;
  unsigned gen = 0;
  uint64_t buf[32];
};

struct BlockState {
  int live = 0;
  int count = 0;
  unsigned gen = 0;
  WarpState warps[32];
  const std::function<void()>* body = nullptr;
};

inline thread_local Fiber* t_cur = nullptr;
inline thread_local BlockState* t_block = nullptr;
inline thread_local ucontext_t t_sched;
inline thread_local dim3 t_blockIdx;
inline thread_local dim3 t_gridDim;
inline thread_local dim3 t_blockDim;
inline thread_local uint64_t t_progress = 0;

inline void yield() { swapcontext(&t_cur->ctx, &t_sched); }

inline void fiber_main() {
  t_block->body[0]();
  t_cur->done = true;
  BlockState& B = *t_block;
  --B.live;  // exited threads no longer hold barriers back
  if (B.count > 0 && B.count == B.live) {
    B.count = 0;
    ++B.gen;
  }
  WarpState& W = B.warps[t_cur->tid.x / 32];
  --W.live;
  if (W.count > 0 && W.count == W.live) {
    W.count = 0;
    ++W.gen;
  }
  ++t_progress;
  swapcontext(&t_cur->ctx, &t_sched);
}

inline void barrier(int& count, unsigned& gen, int live) {
  const unsigned g = gen;
  if (++count == live) {
    count = 0;
    ++gen;
    ++t_progress;
    return;
  }
  while (gen == g) yield();
  ++t_progress;
}

inline void run_block(const std::function<void()>& body, unsigned nthreads, std::vector<Fiber>& fibers) {
  constexpr size_t kStack = 256 * 1024;
  BlockState B;
  B.live = int(nthreads);
  B.body = &body;
  for (unsigned w = 0; w < (nthreads + 31) / 32; ++w)
    B.warps[w].live = int(nthreads - 32 * w < 32 ? nthreads - 32 * w : 32);
  t_block = &B;
  if (fibers.size() < nthreads) fibers.resize(nthreads);
  for (unsigned t = 0; t < nthreads; ++t) {
    Fiber& f = fibers[t];
    if (!f.stack) f.stack = static_cast<char*>(std::malloc(kStack));
    f.tid = dim3(t);
    f.done = false;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
  }
  auto last = std::chrono::steady_clock::now();
  uint64_t seen = t_progress;
  while (B.live > 0) {
    for (unsigned t = 0; t < nthreads; ++t) {
      Fiber& f = fibers[t];
      if (f.done) continue;
      t_cur = &f;
      swapcontext(&t_sched, &f.ctx);
    }
    if (t_progress != seen) {
      seen = t_progress;
      last = std::chrono::steady_clock::now();
    } else {
      std::this_thread::yield();
      if (std::chrono::steady_clock::now() - last > std::chrono::milliseconds(g_timeout_ms.load())) {
        std::fprintf(stderr, "sz_emu: block %u made no progress (deadlock?)\n", t_blockIdx.x);
        std::abort();
      }
    }
  }
  t_cur = nullptr;
  t_block = nullptr;
}

template <typename K, typename... A>
void launch(K kernel, dim3 grid, unsigned nthreads, A... args) {
  const std::function<void()> body = [=]() { kernel(args...); };
  std::atomic<unsigned> next{0};
  const unsigned nblocks = grid.x;
  auto worker = [&]() {
    std::vector<Fiber> fibers;
    t_gridDim = grid;
    t_blockDim = dim3(nthreads);
    for (;;) {
      const unsigned b = next.fetch_add(1);
      if (b >= nblocks) break;
      t_blockIdx = dim3(b);
      run_block(body, nthreads, fibers);
    }
    for (Fiber& f : fibers) std::free(f.stack);
  };
  const int nw = g_workers.load() < 1 ? 1 : g_workers.load();
  std::vector<std::thread> threads;
  for (int i = 1; i < nw && unsigned(i) < nblocks; ++i) threads.emplace_back(worker);
  worker();
  for (auto& t : threads) t.join();
}

inline WarpState& warp() { return t_block->warps[t_cur->tid.x / 32]; }
inline int lane() { return int(t_cur->tid.x % 32); }
inline void warp_barrier() {
  WarpState& W = warp();
  barrier(W.count, W.gen, W.live);
}

template <typename T>
T exchange(T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "warp exchange of at most 64 bits");
  WarpState& W = warp();
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  W.buf[lane()] = bits;
  warp_barrier();
  uint64_t r = W.buf[src_lane & 31];
  warp_barrier();
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}

inline unsigned ballot(bool pred) {
  WarpState& W = warp();
  W.buf[lane()] = pred ? 1 : 0;
  warp_barrier();
  unsigned m = 0;
  for (int l = 0; l < 32; ++l) m |= unsigned(W.buf[l] & 1) << l;
  warp_barrier();
  return m;
}

}  // namespace sz_emu

#define threadIdx (::sz_emu::t_cur->tid)
#define blockIdx (::sz_emu::t_blockIdx)
#define gridDim (::sz_emu::t_gridDim)
#define blockDim (::sz_emu::t_blockDim)

// ---- intrinsics ------------------------------------------------------------------------------------------------
inline void __syncthreads() {
  sz_emu::BlockState& B = *sz_emu::t_block;
  sz_emu::barrier(B.count, B.gen, B.live);
}
inline void __syncwarp(unsigned = 0xFFFFFFFFu) { sz_emu::warp_barrier(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) { sz_emu::yield(); }

template <typename T>
T __shfl_sync(unsigned, T v, int src) { return sz_emu::exchange(v, src); }
template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned d) {
  const int l = sz_emu::lane();
  const T o = sz_emu::exchange(v, l >= int(d) ? l - int(d) : l);
  return l >= int(d) ? o : v;
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int m) { return sz_emu::exchange(v, sz_emu::lane() ^ m); }
inline unsigned __ballot_sync(unsigned, bool pred) { return sz_emu::ballot(pred); }
inline int __any_sync(unsigned, bool pred) { return sz_emu::ballot(pred) != 0; }
inline unsigned __reduce_add_sync(unsigned, unsigned v) {
  sz_emu::WarpState& W = sz_emu::warp();
  W.buf[sz_emu::lane()] = v;
  sz_emu::warp_barrier();
  unsigned s = 0;
  for (int l = 0; l < 32; ++l) s += unsigned(W.buf[l]);
  sz_emu::warp_barrier();
  return s;
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffs(unsigned v) { return __builtin_ffs(int(v)); }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (uint64_t(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) {
    const unsigned sel = (s >> (4 * i)) & 0xFu;
    unsigned b = unsigned(v >> (8 * (sel & 7u))) & 0xFFu;
    if (sel & 8u) b = (b & 0x80u) ? 0xFFu : 0u;  // sign replication
    r |= b << (8 * i);
  }
  return r;
}
inline unsigned __dp4a(unsigned a, unsigned b, unsigned c) {
  for (int i = 0; i < 4; ++i) c += ((a >> (8 * i)) & 0xFFu) * ((b >> (8 * i)) & 0xFFu);
  return c;
}
template <typename T>
T __ldg(const T* p) { return *p; }
template <typename T>
T __ldcg(const T* p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }

inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline unsigned atomicOr(unsigned* p, unsigned v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  unsigned long long old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
inline unsigned atomicCAS(unsigned* p, unsigned cmp, unsigned v) {
  __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return cmp;
}

// ---- runtime API ---------------------------------------------------------------------------------------------------
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = sz_emu::g_sm_count.load();
  return cudaSuccess;
}
template <typename K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* nb, K, int, size_t) {
  *nb = sz_emu::g_blocks_per_sm.load();
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }

// knobs for tests (the emulated "GPU" size and concurrency)
extern "C" inline __attribute__((used, visibility("default"))) void sz_emu_configure(int sm_count, int blocks_per_sm,
                                                                                    int workers) {
  sz_emu::g_sm_count = sm_count;
  sz_emu::g_blocks_per_sm = blocks_per_sm;
  sz_emu::g_workers = workers;
}
