// Device helpers shared by the dispatch and combine kernels: the layout, system-scope signalling,
// the bounded spin, 16-byte vector access and dtype conversion.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/check.h"
#include "ep.h"

namespace pk::ep {

constexpr int kMaxRanks = 8;       // one host: the flags area holds 8 sources per parity
constexpr int kMaxTopK = 16;       // routing slots per token kept in registers / shared memory
constexpr int kMaxTile = 32;       // rows one block stages per step (shared arrays are sized for it)
constexpr int kThreads = 512;      // 16 warps: enough 16-byte accesses in flight per SM to cover NVLink latency
constexpr int kChunk = 16;         // bytes per vector access
// Chunks a thread loads before it stores them: independent loads in flight per thread.
constexpr int kUnroll = 4;

// Sequence-number / done-counter slots in the workspace, one per kernel kind.
enum Kind { kDispatchSend = 0, kDispatchRecv = 1, kCombineSend = 2, kCombineRecv = 3 };

constexpr long long kDispatchFlagsOff = 0;
constexpr long long kCombineFlagsOff = 128;
constexpr long long kWsSeqOff = 0;
constexpr long long kWsDoneOff = 32;
constexpr long long kWsRowCounterOff = 64;
constexpr long long kWsExpertCounterOff = 128;

struct Layout {
  int world, rank, local_experts, capacity, top_k;
  long long counts_off, counts_stride, drows_off, drow, crows_off, crow, shared_bytes, workspace_bytes;

  __host__ __device__ long long dispatch_row(int parity, int src, long long slot) const {
    return drows_off + ((static_cast<long long>(parity) * world + src) * capacity + slot) * drow;
  }
  __host__ __device__ long long combine_row(int parity, int src, long long slot) const {
    return crows_off + ((static_cast<long long>(parity) * world + src) * capacity + slot) * crow;
  }
  __host__ __device__ long long counts(int parity, int src) const {
    return counts_off + (static_cast<long long>(parity) * world + src) * counts_stride;
  }
};

// The layout from Python, checked for consistency (a wrong offset would write outside the block).
inline Layout parse_layout(const LayoutVec& v) {
  PK_CHECK(v.size() == 13, "layout: expected 13 integers, got ", static_cast<long long>(v.size()));
  Layout L{static_cast<int>(v[0]), static_cast<int>(v[1]), static_cast<int>(v[2]), static_cast<int>(v[3]),
           static_cast<int>(v[4]), v[5], v[6], v[7], v[8], v[9], v[10], v[11], v[12]};
  PK_CHECK(L.world >= 1 && L.world <= kMaxRanks, "layout: world size must be 1..", kMaxRanks, ", got ", L.world);
  PK_CHECK(L.rank >= 0 && L.rank < L.world, "layout: rank ", L.rank, " outside the group of ", L.world);
  PK_CHECK(L.top_k >= 1 && L.top_k <= kMaxTopK, "layout: top_k must be 1..", kMaxTopK, ", got ", L.top_k);
  PK_CHECK(L.local_experts >= 1 && L.local_experts <= kThreads, "layout: local experts must be 1..", kThreads,
           ", got ", L.local_experts);
  PK_CHECK(L.capacity >= 1, "layout: capacity must be positive, got ", L.capacity);
  PK_CHECK(L.counts_off >= 256 && L.counts_stride >= 4 * (2 + L.local_experts) && L.counts_stride % 16 == 0,
           "layout: bad counts area");
  PK_CHECK(L.drows_off >= L.counts(2, 0) && L.drow % kChunk == 0 && L.drows_off % kChunk == 0,
           "layout: bad dispatch rows area");
  PK_CHECK(L.crows_off >= L.dispatch_row(2, 0, 0) && L.crow % kChunk == 0 && L.crows_off % kChunk == 0,
           "layout: bad combine rows area");
  PK_CHECK(L.combine_row(2, 0, 0) <= L.shared_bytes, "layout: the areas exceed the shared block (",
           L.combine_row(2, 0, 0), " > ", L.shared_bytes, " bytes)");
  PK_CHECK(L.workspace_bytes >= kWsExpertCounterOff + 4LL * kMaxRanks * L.local_experts,
           "layout: workspace too small");
  return L;
}

// ---- system-scope signalling ------------------------------------------------------------------

__device__ __forceinline__ std::uint64_t ld_acquire_sys(const std::uint64_t* p) {
  std::uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(std::uint64_t* p, std::uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ std::uint64_t global_timer_ns() {
  std::uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Spin until *flag == want; false after timeout_ns (the peer is dead or never came).
__device__ __forceinline__ bool wait_flag(const std::uint64_t* flag, std::uint64_t want, std::uint64_t timeout_ns) {
  const std::uint64_t start = global_timer_ns();
  while (ld_acquire_sys(flag) != want) {
    if (global_timer_ns() - start > timeout_ns) return false;
  }
  return true;
}

// Record an error (code, and the rank waited for) in host-mapped memory, which the host reads without
// a sync. Plain volatile stores: atomics on host memory need platform support that PCIe hosts lack.
// Several blocks may write; any of their codes tells the host the call failed.
__device__ __forceinline__ void raise_error(int* error, int code, int peer) {
  volatile int* e = error;
  e[1] = peer;
  __threadfence_system();
  e[0] = code;
  __threadfence_system();
}

// True in every thread of the block that finished last among the grid's blocks. Every thread's earlier
// stores (local and to peers) are fenced at system scope before its block counts itself done, so what
// the last block publishes afterwards (with a release store) covers the whole grid's writes.
__device__ __forceinline__ bool last_block(unsigned* done) {
  __shared__ bool is_last;
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    is_last = atomicAdd(done, 1u) == gridDim.x - 1;
    if (is_last) __threadfence_system();
  }
  __syncthreads();
  return is_last;
}

// ---- memory access ----------------------------------------------------------------------------

// Read-only input (x, expert_out): the non-coherent path, no L1 allocation (each byte is read once).
__device__ __forceinline__ uint4 ld_input(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Data that peers wrote (received rows, counts): read at L2, never from a possibly stale L1 line.
__device__ __forceinline__ uint4 ld_received(const void* p) { return __ldcg(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ int ld_received_int(const int* p) { return __ldcg(p); }

__device__ __forceinline__ void st_vec(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }

// ---- dtype conversion of a 16-byte chunk ------------------------------------------------------

__device__ __forceinline__ void add_chunk(float* acc, uint4 v, float w, int dtype) {
  const unsigned words[4] = {v.x, v.y, v.z, v.w};
  if (dtype == 2) {
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] += w * __uint_as_float(words[i]);
    return;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float lo, hi;
    if (dtype == 0) {
      const __nv_bfloat162 pair = *reinterpret_cast<const __nv_bfloat162*>(&words[i]);
      lo = __low2float(pair);
      hi = __high2float(pair);
    } else {
      const __half2 pair = *reinterpret_cast<const __half2*>(&words[i]);
      lo = __low2float(pair);
      hi = __high2float(pair);
    }
    acc[2 * i] += w * lo;
    acc[2 * i + 1] += w * hi;
  }
}

__device__ __forceinline__ uint4 pack_chunk(const float* acc, int dtype) {
  unsigned words[4];
  if (dtype == 2) {
#pragma unroll
    for (int i = 0; i < 4; ++i) words[i] = __float_as_uint(acc[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (dtype == 0) {
        const __nv_bfloat162 pair = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
        words[i] = *reinterpret_cast<const unsigned*>(&pair);
      } else {
        const __half2 pair = __floats2half2_rn(acc[2 * i], acc[2 * i + 1]);
        words[i] = *reinterpret_cast<const unsigned*>(&pair);
      }
    }
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

__host__ __device__ __forceinline__ std::uint64_t* flags(char* base, long long area, int parity, int src) {
  return reinterpret_cast<std::uint64_t*>(base + area) + parity * kMaxRanks + src;
}

struct Workspace {
  std::uint64_t* seq;
  unsigned* done;
  unsigned* row_counter;     // [kMaxRanks]
  unsigned* expert_counter;  // [W][E_local]
};

inline Workspace workspace_of(std::uintptr_t ws) {
  char* p = reinterpret_cast<char*>(ws);
  return Workspace{reinterpret_cast<std::uint64_t*>(p + kWsSeqOff), reinterpret_cast<unsigned*>(p + kWsDoneOff),
                   reinterpret_cast<unsigned*>(p + kWsRowCounterOff),
                   reinterpret_cast<unsigned*>(p + kWsExpertCounterOff)};
}

inline void check_launch_shape(int blocks, int tile) {
  PK_CHECK(blocks >= 1 && blocks <= 65535, "blocks: expected 1..65535, got ", blocks);
  PK_CHECK(tile >= 1 && tile <= kMaxTile, "tile: expected 1..", kMaxTile, ", got ", tile);
}

}  // namespace pk::ep
