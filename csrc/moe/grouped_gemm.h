// Hopper (sm_90a) grouped GEMM of the MoE prefill, warp specialized: the CUDA side of
// pykernels/moe_gemm_sm90.py (which has the contract in Python terms and the checks).
//
// Rows r < rows of expert e are [offsets[e-1], offsets[e]) (offsets: int32 [E] cumulative row ends; rows past
// offsets[E-1] belong to no expert and are not written). a is [rows, k] bf16, w is [E, w_rows, k] bf16, both
// with k contiguous (k % 8 == 0: 16-byte rows).
//   gate_up (w = w13, w_rows = 2 n_out):  out[r, n] = silu(a[r] . w[e, n]) * (a[r] . w[e, n_out + n])
//   down    (w = w2,  w_rows = n_out):    out[r, n] = a[r] . w[e, n]
//     with pair (int32 [rows], the route of each sorted row) and weights (float32, one per route):
//                                         out[pair[r], n] = weights[pair[r]] * (a[r] . w[e, n])
// out is bf16 with row stride n_out; n_out a multiple of 8. float32 accumulation, one rounding at the store.
#pragma once

#include <cstdint>

namespace pk {

void grouped_gemm_sm90(std::uintptr_t a, std::int64_t k, std::uintptr_t w, std::int64_t experts, std::int64_t w_rows,
                       std::uintptr_t out, std::int64_t n_out, std::uintptr_t offsets, std::int64_t rows,
                       std::uintptr_t pair, std::uintptr_t weights, bool gate_up, std::uintptr_t stream);

}  // namespace pk
