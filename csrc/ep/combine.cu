// Combine over NVLink: the expert side reduces per received token row and sends one row back; the
// source side adds the rows of each token's ranks (see ep.h for the memory layout).
#include "../common/stream.h"
#include "common.cuh"

namespace pk::ep {
namespace {

// Expert side. Per tile of received token rows: phase 1, the rows of recv_x each (source, slot, k)
// was expanded into, and their weights, into shared memory; phase 2, per 16-byte chunk,
// partial = Σ_k w_k · expert_out[row_k] in float32, stored in the dtype into the source's combine slot.
// The last block publishes the flag to every source.
__global__ void __launch_bounds__(kThreads)
    combine_send_kernel(Layout L, const std::uint64_t* __restrict__ peers, Workspace ws, int dtype,
                        const char* __restrict__ expert_out, long long out_stride, long long rows_in, int row_bytes,
                        const float* __restrict__ recv_w, const int* __restrict__ comb_rows,
                        const int* __restrict__ src_count, int tile) {
  __shared__ int s_rows[kMaxRanks];
  __shared__ int s_row[kMaxTile][kMaxTopK];    // expert_out row of slot k, -1: none
  __shared__ float s_w[kMaxTile][kMaxTopK];
  __shared__ long long s_out[kMaxTile];        // byte offset of the partial row in the source's block
  __shared__ int s_peer[kMaxTile];             // the source rank
  const int W = L.world, K = L.top_k;
  const std::uint64_t seq = ws.seq[kCombineSend];
  const int parity = static_cast<int>(seq & 1);
  const int chunks = row_bytes / kChunk;
  if (threadIdx.x < W) s_rows[threadIdx.x] = min(max(src_count[threadIdx.x], 0), L.capacity);
  __syncthreads();
  long long received = 0;
  for (int s = 0; s < W; ++s) received += s_rows[s];

  for (long long j0 = static_cast<long long>(blockIdx.x) * tile; j0 < received;
       j0 += static_cast<long long>(gridDim.x) * tile) {
    const int n = static_cast<int>(min(static_cast<long long>(tile), received - j0));
    for (int i = threadIdx.x; i < n * K; i += blockDim.x) {
      const int r = i / K, k = i % K;
      int s = 0;
      long long p = j0 + r;
      while (p >= s_rows[s]) p -= s_rows[s++];
      const int row = comb_rows[(s * static_cast<long long>(L.capacity) + p) * K + k];
      const bool valid = row >= 0 && row < rows_in;
      s_row[r][k] = valid ? row : -1;
      s_w[r][k] = valid ? recv_w[row] : 0.f;
      if (k == 0) {
        s_out[r] = L.combine_row(parity, L.rank, p);
        s_peer[r] = s;
      }
    }
    __syncthreads();
    for (int item = threadIdx.x; item < n * chunks; item += blockDim.x) {
      const int i = item / chunks, c = item % chunks;
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int k = 0; k < K; ++k) {
        const int row = s_row[i][k];
        if (row >= 0) add_chunk(acc, ld_input(expert_out + row * out_stride + c * kChunk), s_w[i][k], dtype);
      }
      st_vec(reinterpret_cast<char*>(peers[s_peer[i]]) + s_out[i] + c * kChunk, pack_chunk(acc, dtype));
    }
    __syncthreads();
  }
  if (last_block(&ws.done[kCombineSend])) {
    if (threadIdx.x < W) {
      st_release_sys(flags(reinterpret_cast<char*>(peers[threadIdx.x]), kCombineFlagsOff, parity, L.rank), seq + 1);
    }
    if (threadIdx.x == 0) {
      ws.done[kCombineSend] = 0;
      ws.seq[kCombineSend] = seq + 1;
    }
  }
}

// Source side: waits for every rank's flag, then y[t] = Σ_r partial_r[pos[t, r]] (float32) over the
// ranks t was sent to; a token with no expert gets 0.
__global__ void __launch_bounds__(kThreads)
    combine_recv_kernel(Layout L, char* __restrict__ base, Workspace ws, int dtype, const int* __restrict__ pos,
                        long long tokens, char* __restrict__ y, long long y_stride, int row_bytes, int tile,
                        std::uint64_t timeout_ns, int* error) {
  __shared__ long long s_src[kMaxTile][kMaxRanks];  // byte offset of rank r's partial row of token i, -1: none
  __shared__ bool s_failed;
  const int W = L.world;
  const std::uint64_t seq = ws.seq[kCombineRecv];
  const int parity = static_cast<int>(seq & 1);
  const int chunks = row_bytes / kChunk;
  if (threadIdx.x == 0) s_failed = false;
  __syncthreads();
  if (threadIdx.x < W) {
    if (!wait_flag(flags(base, kCombineFlagsOff, parity, threadIdx.x), seq + 1, timeout_ns)) {
      raise_error(error, kErrCombineTimeout, threadIdx.x);
      s_failed = true;
    }
  }
  __syncthreads();
  // NOTES: a failed block leaves without counting itself done (see dispatch_recv_kernel).
  if (s_failed) return;
  for (long long t0 = static_cast<long long>(blockIdx.x) * tile; t0 < tokens;
       t0 += static_cast<long long>(gridDim.x) * tile) {
    const int n = static_cast<int>(min(static_cast<long long>(tile), tokens - t0));
    for (int i = threadIdx.x; i < n * W; i += blockDim.x) {
      const int r = i % W, t = i / W;
      const int p = pos[(t0 + t) * W + r];
      s_src[t][r] = p >= 0 && p < L.capacity ? L.combine_row(parity, r, p) : -1;
    }
    __syncthreads();
    for (int item = threadIdx.x; item < n * chunks; item += blockDim.x) {
      const int i = item / chunks, c = item % chunks;
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int r = 0; r < W; ++r) {
        const long long off = s_src[i][r];
        if (off >= 0) add_chunk(acc, ld_received(base + off + c * kChunk), 1.f, dtype);
      }
      st_vec(y + (t0 + i) * y_stride + c * kChunk, pack_chunk(acc, dtype));
    }
    __syncthreads();
  }
  if (last_block(&ws.done[kCombineRecv]) && threadIdx.x == 0) {
    ws.done[kCombineRecv] = 0;
    ws.seq[kCombineRecv] = seq + 1;
  }
}

void check_dtype_rows(int dtype, std::int64_t row_bytes, const Layout& L) {
  PK_CHECK(dtype >= 0 && dtype <= 2, "dtype: expected 0 (bf16), 1 (fp16) or 2 (fp32), got ", dtype);
  PK_CHECK(row_bytes > 0 && row_bytes % kChunk == 0 && row_bytes <= L.crow,
           "row_bytes: expected a positive multiple of 16 that fits a combine row, got ", row_bytes);
}

}  // namespace

void combine_send(const LayoutVec& layout, std::uintptr_t peers, std::uintptr_t workspace, int dtype,
                  std::uintptr_t expert_out, std::int64_t out_stride, std::int64_t rows_in, std::int64_t row_bytes,
                  std::uintptr_t recv_w, std::uintptr_t comb_rows, std::uintptr_t src_count, int blocks, int tile,
                  std::uintptr_t stream) {
  require_device();
  const Layout L = parse_layout(layout);
  check_launch_shape(blocks, tile);
  check_dtype_rows(dtype, row_bytes, L);
  PK_CHECK(rows_in >= 0, "rows_in: expected >= 0, got ", rows_in);
  PK_CHECK(out_stride % kChunk == 0 && expert_out % kChunk == 0, "expert_out: the rows must be 16-byte aligned");
  PK_CHECK(peers != 0 && workspace != 0 && comb_rows != 0 && src_count != 0 &&
               (rows_in == 0 || (expert_out != 0 && recv_w != 0)),
           "combine_send: null pointer");
  combine_send_kernel<<<blocks, kThreads, 0, as_stream(stream)>>>(
      L, as_ptr<const std::uint64_t>(peers), workspace_of(workspace), dtype, as_ptr<const char>(expert_out),
      out_stride, rows_in, static_cast<int>(row_bytes), as_ptr<const float>(recv_w), as_ptr<const int>(comb_rows),
      as_ptr<const int>(src_count), tile);
  PK_LAUNCH_CHECK();
}

void combine_recv(const LayoutVec& layout, std::uintptr_t base, std::uintptr_t workspace, int dtype,
                  std::uintptr_t pos, std::int64_t tokens, std::uintptr_t y, std::int64_t y_stride,
                  std::int64_t row_bytes, int blocks, int tile, std::uint64_t timeout_ns, std::uintptr_t error,
                  std::uintptr_t stream) {
  require_device();
  const Layout L = parse_layout(layout);
  check_launch_shape(blocks, tile);
  check_dtype_rows(dtype, row_bytes, L);
  PK_CHECK(tokens >= 0 && tokens <= L.capacity, "tokens: expected 0..", L.capacity, ", got ", tokens);
  PK_CHECK(y_stride % kChunk == 0 && y % kChunk == 0, "y: the rows must be 16-byte aligned");
  PK_CHECK(base != 0 && workspace != 0 && error != 0 && (tokens == 0 || (pos != 0 && y != 0)),
           "combine_recv: null pointer");
  combine_recv_kernel<<<blocks, kThreads, 0, as_stream(stream)>>>(
      L, as_ptr<char>(base), workspace_of(workspace), dtype, as_ptr<const int>(pos), tokens, as_ptr<char>(y),
      y_stride, static_cast<int>(row_bytes), tile, timeout_ns, as_ptr<int>(error));
  PK_LAUNCH_CHECK();
}

}  // namespace pk::ep
