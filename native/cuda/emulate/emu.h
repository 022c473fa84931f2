// Host emulation of the CUDA execution model, just enough for
// native/cuda/deform_kernels.cu (testing only; see emulate.py).
//
// Every block of a launch runs in turn; its threads are real std::threads
// sharing one dynamic shared-memory buffer and a std::barrier for
// __syncthreads(), so barrier misuse deadlocks here as it would on a GPU and
// out-of-block indexing shows up as wrong results. The CUDA headers provide
// the types (dim3, __half, cudaError_t); the few runtime calls the launchers
// make are stubbed in emu_api.cpp.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__
#define __forceinline__ inline
#define __launch_bounds__(...)
using std::min;
using std::max;
struct EmuCtx { uint3 tid, bid; dim3 bdim, gdim; std::barrier<>* bar; unsigned char* smem; };
inline thread_local EmuCtx emu_ctx;
#define threadIdx (emu_ctx.tid)
#define blockIdx (emu_ctx.bid)
#define blockDim (emu_ctx.bdim)
#define gridDim (emu_ctx.gdim)
inline void __syncthreads() { emu_ctx.bar->arrive_and_wait(); }
inline unsigned char* emu_smem() { return emu_ctx.smem; }
inline float atomicAdd(float* a, float v) { return std::atomic_ref<float>(*a).fetch_add(v); }
inline double atomicAdd(double* a, double v) { return std::atomic_ref<double>(*a).fetch_add(v); }
inline size_t emu_smem_limit = 227 * 1024;
template <typename K, typename... Args>
void emu_launch(K kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  if (smem > emu_smem_limit) { fprintf(stderr, "smem too large %zu\n", smem); abort(); }
  const unsigned nt = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::vector<unsigned char> buf(smem + 16, 0xCD);
        std::barrier<> bar(nt);
        std::vector<std::thread> threads;
        for (unsigned tz = 0; tz < block.z; ++tz)
          for (unsigned ty = 0; ty < block.y; ++ty)
            for (unsigned tx = 0; tx < block.x; ++tx)
              threads.emplace_back([&, tx, ty, tz] {
                emu_ctx.tid = uint3{tx, ty, tz};
                emu_ctx.bid = uint3{bx, by, bz};
                emu_ctx.bdim = block;
                emu_ctx.gdim = grid;
                emu_ctx.bar = &bar;
                emu_ctx.smem = buf.data();
                kernel(args...);
              });
        for (auto& t : threads) t.join();
      }
}
