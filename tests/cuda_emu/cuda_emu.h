// A CPU emulator for the subset of CUDA that gammacl's kernels (csrc/*.cu) use, so the test suite
// can run the real kernel source on a machine without a GPU (tests/test_cuda_emu.py).
//
// csrc/cuda_epilogue.cuh includes <gammacl_cuda_device.h>; the emulator build finds this
// directory's version of it (which includes this header) instead of csrc/platform/'s, and the .cu
// files are then compiled by the host compiler. What is emulated, and how:
//   * a launch GC_LAUNCH(grid, block, stream, kernel)(args...) runs the blocks one after another;
//     the threads of a block are cooperative fibers (ucontext) on one OS thread, switched only at
//     __syncthreads and warp shuffles, so `__shared__` (defined as `static`) is the running block's
//     shared memory; it starts with whatever the previous block or launch left there, as
//     uninitialised shared memory would, so a read before the write it should wait for sees stale
//     values (and GAMMACL_EMU_ORDER=reverse, below, different ones);
//   * __syncthreads is a barrier over all threads of the block, __shfl_xor_sync one over the 32
//     lanes of a warp (a value exchange through a slot array). Every thread must reach every
//     barrier: a thread that exits while others wait, or barriers reached by only part of a block
//     or warp, are reported as an error of the launch (cudaGetLastError), as a divergent barrier
//     would hang or misbehave on a GPU;
//   * ex2.approx.ftz.f32 is exp2f with results below FLT_MIN flushed to 0; __half / __nv_bfloat16
//     are c10::Half / c10::BFloat16 (round-to-nearest-even conversions, as __float2*_rn).
// Not emulated: concurrency between blocks (they run one at a time; GAMMACL_EMU_ORDER=reverse
// flips the order, which exposes order dependences), memory-model effects, timing. Out-of-bounds
// accesses are plain host accesses: the tests surround buffers with NaN guards to see them.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ucontext.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorLaunchFailure = 719,
};

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline float __half2float(__half x) { return static_cast<float>(x); }
inline __half __float2half_rn(float x) { return __half(x); }
inline float __bfloat162float(__nv_bfloat16 x) { return static_cast<float>(x); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return __nv_bfloat16(x); }
// the emulator is built with -ffp-contract=off (build.py): a plain product is rounded once
inline float __fmul_rn(float x, float y) { return x * y; }
inline double __dmul_rn(double x, double y) { return x * y; }

inline uint3 threadIdx{0, 0, 0};
inline uint3 blockIdx{0, 0, 0};
inline dim3 blockDim{1, 1, 1};
inline dim3 gridDim{1, 1, 1};

namespace gammacl_emu {

inline float ex2_approx_ftz(float x) {
  const float y = std::exp2(x);
  return y < FLT_MIN ? 0.0f : y;  // NaN compares false and stays NaN
}

// The running block: its fibers, barrier state and the warp-shuffle exchange slots.
struct Block {
  int n = 0;
  std::vector<ucontext_t> ctx;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<char> done;
  ucontext_t main_ctx;
  int cur = -1;
  const std::function<void()>* body = nullptr;
  uint64_t progress = 0;  // arrivals + exits: a scheduler pass without any means a deadlock
  int arrived = 0;
  uint64_t gen = 0;
  std::vector<int> warp_arrived;
  std::vector<uint64_t> warp_gen;
  std::vector<uint64_t> slot;
};

inline Block* g_block = nullptr;
inline std::string g_error;     // first launch error since the last cudaGetLastError()
inline std::string g_reported;  // the error cudaGetLastError() last returned
constexpr size_t kStack = 64 * 1024;

inline void yield_to_scheduler() {
  Block& b = *g_block;
  swapcontext(&b.ctx[b.cur], &b.main_ctx);
}

inline void fiber_entry() {
  (*g_block->body)();
  g_block->done[g_block->cur] = 1;
  ++g_block->progress;
}  // returns to main_ctx through uc_link

inline void block_barrier() {
  Block& b = *g_block;
  const uint64_t gen = b.gen;
  ++b.progress;
  if (++b.arrived == b.n) {
    b.arrived = 0;
    ++b.gen;
    return;
  }
  while (b.gen == gen) yield_to_scheduler();
}

inline void warp_barrier(int w) {
  Block& b = *g_block;
  const uint64_t gen = b.warp_gen[w];
  ++b.progress;
  if (++b.warp_arrived[w] == 32) {
    b.warp_arrived[w] = 0;
    ++b.warp_gen[w];
    return;
  }
  while (b.warp_gen[w] == gen) yield_to_scheduler();
}

template <typename T>
T shfl_xor(T v, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a value wider than 8 bytes");
  Block& b = *g_block;
  const int t = b.cur;  // b.cur changes while this fiber waits
  const int w = t / 32, lane = t % 32;
  std::memcpy(&b.slot[t], &v, sizeof(T));
  warp_barrier(w);
  T r;
  std::memcpy(&r, &b.slot[w * 32 + ((lane ^ lane_mask) & 31)], sizeof(T));
  warp_barrier(w);
  return r;
}

// GAMMACL_EMU_ORDER=reverse runs the blocks of a launch, and the threads of a block between two
// barriers, in reverse order. Kernels without races give bitwise-identical results either way
// (tests/test_cuda_emu.py compares): a shared-memory read that races a write of another thread,
// or a block that reads what another block of the same launch writes, shows up as a difference.
inline bool reverse_order() {
  const char* v = std::getenv("GAMMACL_EMU_ORDER");
  return v != nullptr && std::string(v) == "reverse";
}

// Runs body() as one kernel launch; errors go to g_error.
inline void run(dim3 grid, dim3 block, const std::function<void()>& body) {
  // CUDA's launch limits (cudaErrorInvalidConfiguration on a GPU): 1..1024 threads per block
  // (whole warps here: the kernels' shuffles assume them), grid.x < 2^31, grid.y, grid.z <= 65535,
  // no zero dimension.
  const int n = static_cast<int>(block.x * block.y * block.z);
  if (n <= 0 || n > 1024 || n % 32 != 0 || block.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    if (g_error.empty())
      g_error = "emulated launch: invalid configuration: grid (" + std::to_string(grid.x) + ", " +
                std::to_string(grid.y) + ", " + std::to_string(grid.z) + "), block of " +
                std::to_string(n) + " threads";
    return;
  }
  Block b;
  b.n = n;
  b.ctx.resize(n);
  b.stacks.resize(n);
  b.done.assign(n, 0);
  b.warp_arrived.assign(n / 32, 0);
  b.warp_gen.assign(n / 32, 0);
  b.slot.assign(n, 0);
  b.body = &body;
  for (auto& s : b.stacks) s.reset(new char[kStack]);
  Block* saved = g_block;
  g_block = &b;
  gridDim = grid;
  blockDim = block;
  const bool rev = reverse_order();
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  for (uint64_t q = 0; q < nblocks; ++q) {
    const uint64_t lin = rev ? nblocks - 1 - q : q;
    const unsigned bx = static_cast<unsigned>(lin % grid.x);
    const unsigned by = static_cast<unsigned>((lin / grid.x) % grid.y);
    const unsigned bz = static_cast<unsigned>(lin / (uint64_t(grid.x) * grid.y));
    blockIdx = uint3{bx, by, bz};
    b.arrived = 0;
    std::fill(b.warp_arrived.begin(), b.warp_arrived.end(), 0);
    std::fill(b.done.begin(), b.done.end(), 0);
    for (int t = 0; t < n; ++t) {
      getcontext(&b.ctx[t]);
      b.ctx[t].uc_stack.ss_sp = b.stacks[t].get();
      b.ctx[t].uc_stack.ss_size = kStack;
      b.ctx[t].uc_link = &b.main_ctx;
      makecontext(&b.ctx[t], fiber_entry, 0);
    }
    int live = n;
    while (live > 0) {
      const uint64_t before = b.progress;
      for (int k = 0; k < n; ++k) {
        const int t = rev ? n - 1 - k : k;
        if (b.done[t]) continue;
        b.cur = t;
        threadIdx = uint3{static_cast<unsigned>(t % block.x),
                          static_cast<unsigned>((t / block.x) % block.y),
                          static_cast<unsigned>(t / (block.x * block.y))};
        swapcontext(&b.main_ctx, &b.ctx[t]);
        if (b.done[t]) --live;
      }
      if (live > 0 && b.progress == before) {
        // every live thread waits at a barrier that cannot complete: abandon the launch
        if (g_error.empty())
          g_error = "emulated launch: divergent barrier (" + std::to_string(live) + " of " +
                    std::to_string(n) + " threads wait in block (" + std::to_string(bx) + ", " +
                    std::to_string(by) + ", " + std::to_string(bz) + "))";
        g_block = saved;
        return;
      }
    }
  }
  g_block = saved;
}

template <typename... P>
struct Launcher {
  dim3 grid, block;
  void (*kernel)(P...);
  template <typename... Args>
  void operator()(Args&&... args) const {
    std::tuple<P...> params(std::forward<Args>(args)...);  // converted as a real launch would
    auto k = kernel;
    run(grid, block, [&params, k] { std::apply(k, params); });
  }
};

template <typename... P>
Launcher<P...> launcher(dim3 grid, dim3 block, void (*kernel)(P...)) {
  return Launcher<P...>{grid, block, kernel};
}

}  // namespace gammacl_emu

#define GC_LAUNCH(grid, block, stream, ...) \
  ::gammacl_emu::launcher(dim3(grid), dim3(block), __VA_ARGS__)

inline void __syncthreads() { gammacl_emu::block_barrier(); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  (void)mask;  // every caller passes the full warp (0xffffffff)
  return gammacl_emu::shfl_xor(v, lane_mask);
}

inline cudaError_t cudaGetLastError() {
  if (gammacl_emu::g_error.empty()) return cudaSuccess;
  gammacl_emu::g_reported = std::move(gammacl_emu::g_error);
  gammacl_emu::g_error.clear();
  return cudaErrorLaunchFailure;
}
