// Expert-parallel dispatch/combine over NVLink for the GPUs of one host (pk.ep.Buffer, backend "nvlink").
//
// Every rank owns one cudaMalloc'ed block of "shared" memory, opened by the other ranks through CUDA IPC.
// Senders store token rows straight into the receiver's block with 16-byte stores and then publish a
// 64-bit flag with st.release.sys; receivers spin on their own flags with ld.acquire.sys (bounded by a
// timeout that raises a host-visible error flag instead of hanging). Counts travel the same way, so a
// call needs no host round trip and can be captured in a CUDA graph.
//
// Shared block of a rank (offsets from the Python side, pykernels/ep/nvlink.py, checked here):
//   [0, 128)            dispatch flags  u64 [2 parities][8 source ranks]
//   [128, 256)          combine flags   u64 [2][8]
//   counts_off          int32 [2][W][counts_stride/4]: per source: rows sent here, K, pairs per local expert
//   drows_off           dispatch rows [2][W][capacity][drow]: hidden bytes, then int32 local expert [K],
//                       int32 index within (source, expert) [K], float32 weight [K]
//   crows_off           combine rows  [2][W][capacity][crow]: one weighted partial sum per token row
// Parity = call count & 1: a sender can run at most one call ahead of a receiver (stream order on both
// sides), so alternating two sets of slots never overwrites data that is still being read.
//
// Local workspace (device memory of the rank, zeroed once): u64 sequence numbers [4] (one per kernel
// kind), u32 block-done counters [4], u32 rows per destination [8], u32 pairs per (destination, expert).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace pk::ep {

// Shared memory and IPC. `device` is the CUDA ordinal the memory lives on / is mapped into.
std::uintptr_t alloc_shared(int device, std::int64_t bytes);           // zeroed
void free_shared(int device, std::uintptr_t ptr);
std::string ipc_handle(int device, std::uintptr_t ptr);                 // cudaIpcMemHandle_t bytes
std::uintptr_t ipc_open(int device, const std::string& handle);
void ipc_close(int device, std::uintptr_t ptr);
// A small zeroed int32 [4] error array in mapped pinned memory: (host address, device address).
std::pair<std::uintptr_t, std::uintptr_t> alloc_error_flags();
void free_error_flags(std::uintptr_t host_ptr);

// Error codes the kernels leave in the error array (index 0: the first error; 1: the rank it waited for).
constexpr int kErrDispatchTimeout = 1;
constexpr int kErrCombineTimeout = 2;
constexpr int kErrTopkMismatch = 3;

// layout = [world, rank, local_experts, capacity, top_k, counts_off, counts_stride, drows_off, drow,
//           crows_off, crow, shared_bytes, workspace_bytes]
using LayoutVec = std::vector<std::int64_t>;

// Sender side of dispatch: rows (and routing metadata) of x into the receivers' blocks, slot positions
// into pos_out int32 [T, W] (-1 where a token does not go), then counts and the flag to every rank.
void dispatch_send(const LayoutVec& layout, std::uintptr_t peers, std::uintptr_t workspace, std::uintptr_t x,
                   std::int64_t x_stride, std::int64_t row_bytes, std::uintptr_t ids, int ids_bytes,
                   std::uintptr_t weights, std::int64_t tokens, std::int64_t num_experts, std::uintptr_t pos_out,
                   int blocks, int tile, std::uintptr_t stream);

// Receiver side. mode bits: 1 = wait for every source's flag (then tokens_per_expert int32 [E_local] and
// src_count int32 [W] are written and the receive sequence advances), 2 = expand the received rows into
// recv_x [rows_out, row_bytes] grouped by local expert (+ recv_ids, recv_w, comb_rows int32 [W*capacity, K]),
// 4 = mark rows past the valid ones as padding (id -1, weight 0).
void dispatch_recv(const LayoutVec& layout, std::uintptr_t base, std::uintptr_t workspace, int mode,
                   std::uintptr_t recv_x, std::int64_t rows_out, std::int64_t row_bytes, std::uintptr_t recv_ids,
                   std::uintptr_t recv_w, std::uintptr_t tokens_per_expert, std::uintptr_t src_count,
                   std::uintptr_t comb_rows, int blocks, int tile, std::uint64_t timeout_ns, std::uintptr_t error,
                   std::uintptr_t stream);

// Expert side of combine: per received token row, Σ_k weight · expert_out[row of k] (float32, stored in
// the dtype) into the source's block, then the flag. dtype: 0 bf16, 1 fp16, 2 fp32.
void combine_send(const LayoutVec& layout, std::uintptr_t peers, std::uintptr_t workspace, int dtype,
                  std::uintptr_t expert_out, std::int64_t out_stride, std::int64_t rows_in, std::int64_t row_bytes,
                  std::uintptr_t recv_w, std::uintptr_t comb_rows, std::uintptr_t src_count, int blocks, int tile,
                  std::uintptr_t stream);

// Source side of combine: y[t] = Σ over the ranks t went to of their partial row (float32 sum).
void combine_recv(const LayoutVec& layout, std::uintptr_t base, std::uintptr_t workspace, int dtype,
                  std::uintptr_t pos, std::int64_t tokens, std::uintptr_t y, std::int64_t y_stride,
                  std::int64_t row_bytes, int blocks, int tile, std::uint64_t timeout_ns, std::uintptr_t error,
                  std::uintptr_t stream);

}  // namespace pk::ep
