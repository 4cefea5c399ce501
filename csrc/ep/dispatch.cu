// Dispatch over NVLink: the sender's kernel and the receiver's kernel (see ep.h for the memory layout).
#include <cub/block/block_scan.cuh>

#include "../common/stream.h"
#include "common.cuh"

namespace pk::ep {
namespace {

// Sender. Per tile of `tile` tokens: phase 1, a warp per token finds the ranks its K experts live on,
// takes one slot per destination rank (atomic row counter) and one index per (rank, expert) pair
// (atomic pair counter), and writes the routing metadata after the row in every destination slot;
// phase 2, the block copies the tile's rows, each 16-byte chunk loaded once and stored to every
// destination. The block that finishes last writes the counts to every rank, publishes the flags and
// resets the counters for the next call.
// NOTES: T <= capacity, so a slot never exceeds the receiver's area; the order of rows within a
// (source, expert) pair is the order of the atomics (combine uses the recorded positions, so any order
// gives the same sums).
template <typename Id>
__global__ void __launch_bounds__(kThreads)
    dispatch_send_kernel(Layout L, const std::uint64_t* __restrict__ peers, Workspace ws, const char* __restrict__ x,
                         long long x_stride, int row_bytes, const Id* __restrict__ ids,
                         const float* __restrict__ weights, long long tokens, long long num_experts,
                         int* __restrict__ pos_out, int tile) {
  __shared__ long long s_dst[kMaxTile][kMaxRanks];  // byte offset of token i's row in rank r's block, -1: not sent
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int W = L.world, K = L.top_k, El = L.local_experts;
  const int parity = static_cast<int>(ws.seq[kDispatchSend] & 1);
  const int chunks = row_bytes / kChunk;

  for (long long t0 = static_cast<long long>(blockIdx.x) * tile; t0 < tokens;
       t0 += static_cast<long long>(gridDim.x) * tile) {
    const int n = static_cast<int>(min(static_cast<long long>(tile), tokens - t0));
    for (int i = warp; i < n; i += warps) {
      const long long t = t0 + i;
      int e = -1, dest = -1;
      if (lane < K) {
        const long long id = static_cast<long long>(ids[t * K + lane]);
        if (id >= 0 && id < num_experts) {  // out-of-range ids are skipped like -1
          e = static_cast<int>(id);
          dest = e / El;
        }
      }
      int slot = -1;
      for (int r = 0; r < W; ++r) {
        if (__any_sync(0xffffffffu, dest == r) && lane == r) slot = static_cast<int>(atomicAdd(&ws.row_counter[r], 1u));
      }
      if (lane < W) pos_out[t * W + lane] = slot;
      int e_loc = -1, idx = 0;
      if (e >= 0) {
        e_loc = e - dest * El;
        idx = static_cast<int>(atomicAdd(&ws.expert_counter[dest * El + e_loc], 1u));
      }
      const float w = lane < K ? weights[t * K + lane] : 0.f;
      for (int r = 0; r < W; ++r) {
        const int s = __shfl_sync(0xffffffffu, slot, r);
        const long long off = s >= 0 ? L.dispatch_row(parity, L.rank, s) : -1;
        if (lane == 0) s_dst[i][r] = off;
        if (s >= 0 && lane < K) {
          int* meta = reinterpret_cast<int*>(reinterpret_cast<char*>(peers[r]) + off + row_bytes);
          const bool mine = dest == r;
          meta[lane] = mine ? e_loc : -1;
          meta[K + lane] = mine ? idx : 0;
          meta[2 * K + lane] = __float_as_int(mine ? w : 0.f);
        }
      }
    }
    __syncthreads();
    const int items = n * chunks;
    for (int first = threadIdx.x; first < items; first += blockDim.x * kUnroll) {
      uint4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int item = first + u * blockDim.x;
        if (item < items) v[u] = ld_input(x + (t0 + item / chunks) * x_stride + (item % chunks) * kChunk);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int item = first + u * blockDim.x;
        if (item < items) {
          const int i = item / chunks, c = item % chunks;
#pragma unroll
          for (int r = 0; r < kMaxRanks; ++r) {
            const long long off = r < W ? s_dst[i][r] : -1;
            if (off >= 0) st_vec(reinterpret_cast<char*>(peers[r]) + off + c * kChunk, v[u]);
          }
        }
      }
    }
    __syncthreads();
  }

  if (last_block(&ws.done[kDispatchSend])) {
    // Read again, not kept live through the copy loops: only this (last) block changes it.
    const std::uint64_t seq = ws.seq[kDispatchSend];
    for (int r = 0; r < W; ++r) {
      int* counts = reinterpret_cast<int*>(reinterpret_cast<char*>(peers[r]) + L.counts(parity, L.rank));
      for (int j = threadIdx.x; j < 2 + El; j += blockDim.x) {
        counts[j] = j == 0 ? static_cast<int>(__ldcg(&ws.row_counter[r]))
                  : j == 1 ? K
                           : static_cast<int>(__ldcg(&ws.expert_counter[r * El + j - 2]));
      }
    }
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x < W) {
      st_release_sys(flags(reinterpret_cast<char*>(peers[threadIdx.x]), kDispatchFlagsOff, parity, L.rank), seq + 1);
    }
    for (int j = threadIdx.x; j < W * El; j += blockDim.x) ws.expert_counter[j] = 0;
    if (threadIdx.x < kMaxRanks) ws.row_counter[threadIdx.x] = 0;
    if (threadIdx.x == 0) {
      ws.done[kDispatchSend] = 0;
      ws.seq[kDispatchSend] = seq + 1;
    }
  }
}

constexpr int kModeWait = 1, kModeExpand = 2, kModePad = 4;

// Receiver. Waits (mode 1) for every source's flag, reads the counts, and computes where each
// (source, local expert) run of rows starts in recv_x: experts in order, sources in order within an
// expert. Expands (mode 2) every received token row into its K' <= K expert rows: phase 1, a warp per
// row reads the metadata and writes ids, weights and the combine map; phase 2, the block copies.
__global__ void __launch_bounds__(kThreads)
    dispatch_recv_kernel(Layout L, char* __restrict__ base, Workspace ws, int mode, char* __restrict__ recv_x,
                         long long rows_out, int row_bytes, int* __restrict__ recv_ids, float* __restrict__ recv_w,
                         int* __restrict__ tokens_per_expert, int* __restrict__ src_count, int* __restrict__ comb_rows,
                         int tile, std::uint64_t timeout_ns, int* error) {
  extern __shared__ int smem[];  // s_cnt [W][E_local] pairs per (source, expert); s_off [W][E_local] first row
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ int s_rows[kMaxRanks];
  __shared__ int s_total;
  __shared__ bool s_failed;
  __shared__ int s_dst[kMaxTile][kMaxTopK];
  __shared__ long long s_src[kMaxTile];
  const int W = L.world, K = L.top_k, El = L.local_experts;
  int* s_cnt = smem;
  int* s_off = smem + W * El;
  const bool wait = mode & kModeWait;
  const std::uint64_t seq = wait ? ws.seq[kDispatchRecv] : ws.seq[kDispatchRecv] - 1;
  const int parity = static_cast<int>(seq & 1);

  if (threadIdx.x == 0) s_failed = false;
  __syncthreads();
  if (wait && threadIdx.x < W) {
    if (!wait_flag(flags(base, kDispatchFlagsOff, parity, threadIdx.x), seq + 1, timeout_ns)) {
      raise_error(error, kErrDispatchTimeout, threadIdx.x);
      s_failed = true;
    }
  }
  __syncthreads();
  if (!s_failed) {
    for (int j = threadIdx.x; j < W * El; j += blockDim.x) {
      s_cnt[j] = ld_received_int(reinterpret_cast<const int*>(base + L.counts(parity, j / El)) + 2 + j % El);
    }
    if (threadIdx.x < W) {
      const int* c = reinterpret_cast<const int*>(base + L.counts(parity, threadIdx.x));
      s_rows[threadIdx.x] = min(max(ld_received_int(c), 0), L.capacity);  // a bad count never leaves the area
      if (s_rows[threadIdx.x] > 0 && ld_received_int(c + 1) != K) {
        raise_error(error, kErrTopkMismatch, threadIdx.x);
        s_failed = true;
      }
    }
  }
  __syncthreads();
  // NOTES: after a timeout or a K mismatch (block-uniform s_failed) the block leaves without counting
  // itself done: the receive sequence stops and the buffer stays failed; the host raises from the flag.
  if (s_failed) return;

  // Thread e: the rows of expert e from each source; then an exclusive scan over experts.
  int expert_rows = 0;
  if (threadIdx.x < El) {
    for (int s = 0; s < W; ++s) {
      s_off[s * El + threadIdx.x] = expert_rows;
      expert_rows += s_cnt[s * El + threadIdx.x];
    }
  }
  int expert_start, total;
  Scan(scan_storage).ExclusiveSum(expert_rows, expert_start, total);
  if (threadIdx.x < El) {
    for (int s = 0; s < W; ++s) s_off[s * El + threadIdx.x] += expert_start;
  }
  if (threadIdx.x == 0) s_total = total;
  if (wait && blockIdx.x == 0) {
    if (threadIdx.x < El) tokens_per_expert[threadIdx.x] = expert_rows;
    if (threadIdx.x < W) src_count[threadIdx.x] = s_rows[threadIdx.x];
  }
  __syncthreads();

  if (mode & kModeExpand) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const int chunks = row_bytes / kChunk;
    long long received = 0;
    for (int s = 0; s < W; ++s) received += s_rows[s];
    for (long long j0 = static_cast<long long>(blockIdx.x) * tile; j0 < received;
         j0 += static_cast<long long>(gridDim.x) * tile) {
      const int n = static_cast<int>(min(static_cast<long long>(tile), received - j0));
      for (int i = warp; i < n; i += warps) {
        int s = 0;
        long long p = j0 + i;
        while (p >= s_rows[s]) p -= s_rows[s++];
        const long long off = L.dispatch_row(parity, s, p);
        if (lane < K) {
          const int* meta = reinterpret_cast<const int*>(base + off + row_bytes);
          const int e = ld_received_int(meta + lane), idx = ld_received_int(meta + K + lane);
          int dst = -1;
          if (e >= 0 && e < El && idx >= 0 && idx < s_cnt[s * El + e] && s_off[s * El + e] + idx < rows_out) {
            dst = s_off[s * El + e] + idx;
            recv_ids[dst] = e;
            recv_w[dst] = __int_as_float(ld_received_int(meta + 2 * K + lane));
          }
          comb_rows[(s * static_cast<long long>(L.capacity) + p) * K + lane] = dst;
          s_dst[i][lane] = dst;
        }
        if (lane == 0) s_src[i] = off;
      }
      __syncthreads();
      const int items = n * chunks;
      for (int first = threadIdx.x; first < items; first += blockDim.x * kUnroll) {
        uint4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int item = first + u * blockDim.x;
          if (item < items) v[u] = ld_received(base + s_src[item / chunks] + (item % chunks) * kChunk);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int item = first + u * blockDim.x;
          if (item >= items) continue;
          const int i = item / chunks, c = item % chunks;
          for (int k = 0; k < K; ++k) {
            const int dst = s_dst[i][k];
            if (dst >= 0) st_vec(recv_x + static_cast<long long>(dst) * row_bytes + c * kChunk, v[u]);
          }
        }
      }
      __syncthreads();
    }
  }
  if (mode & kModePad) {
    for (long long d = s_total + static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; d < rows_out;
         d += static_cast<long long>(gridDim.x) * blockDim.x) {
      recv_ids[d] = -1;
      recv_w[d] = 0.f;
    }
  }
  if (wait && last_block(&ws.done[kDispatchRecv]) && threadIdx.x == 0) {
    ws.done[kDispatchRecv] = 0;
    ws.seq[kDispatchRecv] = seq + 1;
  }
}

}  // namespace

void dispatch_send(const LayoutVec& layout, std::uintptr_t peers, std::uintptr_t workspace, std::uintptr_t x,
                   std::int64_t x_stride, std::int64_t row_bytes, std::uintptr_t ids, int ids_bytes,
                   std::uintptr_t weights, std::int64_t tokens, std::int64_t num_experts, std::uintptr_t pos_out,
                   int blocks, int tile, std::uintptr_t stream) {
  require_device();
  const Layout L = parse_layout(layout);
  check_launch_shape(blocks, tile);
  PK_CHECK(tokens >= 0 && tokens <= L.capacity, "tokens: expected 0..", L.capacity, " (the capacity), got ", tokens);
  PK_CHECK(row_bytes > 0 && row_bytes % kChunk == 0 && row_bytes + 12LL * L.top_k <= L.drow,
           "row_bytes: expected a positive multiple of 16 that fits a dispatch row, got ", row_bytes);
  PK_CHECK(x_stride % kChunk == 0 && x % kChunk == 0, "x: the rows must be 16-byte aligned");
  PK_CHECK(ids_bytes == 4 || ids_bytes == 8, "ids_bytes: expected 4 or 8, got ", ids_bytes);
  PK_CHECK(num_experts == static_cast<std::int64_t>(L.world) * L.local_experts, "num_experts: expected ",
           L.world * L.local_experts, ", got ", num_experts);
  // NOTES: with tokens == 0, x, ids, weights and pos_out are empty tensors, whose CUDA data_ptr() is 0;
  // the kernel still launches (>= 1 block) to send zero counts and raise the flags the peers wait for.
  PK_CHECK(peers != 0 && workspace != 0 &&
               (tokens == 0 || (x != 0 && ids != 0 && weights != 0 && pos_out != 0)),
           "dispatch_send: null pointer");
  const Workspace ws = workspace_of(workspace);
  auto* s = as_stream(stream);
  if (ids_bytes == 4) {
    dispatch_send_kernel<int><<<blocks, kThreads, 0, s>>>(
        L, as_ptr<const std::uint64_t>(peers), ws, as_ptr<const char>(x), x_stride, static_cast<int>(row_bytes),
        as_ptr<const int>(ids), as_ptr<const float>(weights), tokens, num_experts, as_ptr<int>(pos_out), tile);
  } else {
    dispatch_send_kernel<long long><<<blocks, kThreads, 0, s>>>(
        L, as_ptr<const std::uint64_t>(peers), ws, as_ptr<const char>(x), x_stride, static_cast<int>(row_bytes),
        as_ptr<const long long>(ids), as_ptr<const float>(weights), tokens, num_experts, as_ptr<int>(pos_out), tile);
  }
  PK_LAUNCH_CHECK();
}

void dispatch_recv(const LayoutVec& layout, std::uintptr_t base, std::uintptr_t workspace, int mode,
                   std::uintptr_t recv_x, std::int64_t rows_out, std::int64_t row_bytes, std::uintptr_t recv_ids,
                   std::uintptr_t recv_w, std::uintptr_t tokens_per_expert, std::uintptr_t src_count,
                   std::uintptr_t comb_rows, int blocks, int tile, std::uint64_t timeout_ns, std::uintptr_t error,
                   std::uintptr_t stream) {
  require_device();
  const Layout L = parse_layout(layout);
  check_launch_shape(blocks, tile);
  PK_CHECK(mode >= 1 && mode <= 7, "mode: expected a combination of 1 (wait), 2 (expand), 4 (pad), got ", mode);
  PK_CHECK(rows_out >= 0, "rows_out: expected >= 0, got ", rows_out);
  PK_CHECK(row_bytes > 0 && row_bytes % kChunk == 0 && row_bytes + 12LL * L.top_k <= L.drow,
           "row_bytes: expected a positive multiple of 16 that fits a dispatch row, got ", row_bytes);
  PK_CHECK(base != 0 && workspace != 0 && error != 0 && tokens_per_expert != 0 && src_count != 0 && comb_rows != 0,
           "dispatch_recv: null pointer");
  PK_CHECK(rows_out == 0 || (recv_x != 0 && recv_ids != 0 && recv_w != 0), "dispatch_recv: null output pointer");
  PK_CHECK(recv_x % kChunk == 0, "recv_x: expected a 16-byte aligned address");
  const int smem = 2 * L.world * L.local_experts * static_cast<int>(sizeof(int));
  dispatch_recv_kernel<<<blocks, kThreads, smem, as_stream(stream)>>>(
      L, as_ptr<char>(base), workspace_of(workspace), mode, as_ptr<char>(recv_x), rows_out,
      static_cast<int>(row_bytes), as_ptr<int>(recv_ids), as_ptr<float>(recv_w), as_ptr<int>(tokens_per_expert),
      as_ptr<int>(src_count), as_ptr<int>(comb_rows), tile, timeout_ns, as_ptr<int>(error));
  PK_LAUNCH_CHECK();
}

}  // namespace pk::ep
