// Rotary embedding of q and k rows by a float32 cos/sin table, with the paged latent-cache write fused in:
// the CUDA side of pykernels.apply_rotary and pykernels.rope_and_cache (pykernels/rope.py has the math).
//
// One launch does, for every token t with position p = positions[t]:
//   q_dst[t, h, :] = rotate(q_src[t, h, :], p)                     for every head h (q_dst may be q_src)
//   k_dst[r, L : L + d] = rotate(k_src[t, :], p),  k_dst[r, :L] = latent[t, :]
//     with r = slots[t] (rope_and_cache: a paged-cache row; -1 = skip) or r = t when slots is 0 (apply_rotary).
// cos_sin is [max_position, d] float32: cos in columns [0, d/2), sin in [d/2, d).
// Bad values never cause an out-of-bounds access: a position outside [0, max_position) rotates nothing and
// (unless copy_bad_rows) writes nothing; a slot outside [-1, k_dst_rows) writes nothing; either raises a
// bit in *flag (1: position, 2: slot) with atomicOr. Strides are in elements.
#pragma once

#include <cstdint>

namespace pk {

// dtype codes shared with pykernels/rope.py
enum RopeDtype : int { kRopeFloat32 = 0, kRopeFloat16 = 1, kRopeBFloat16 = 2 };

void rope_rows(std::uintptr_t q_src, std::int64_t q_src_stride_t, std::int64_t q_src_stride_h, std::uintptr_t q_dst,
               std::int64_t q_dst_stride_t, std::int64_t q_dst_stride_h, std::uintptr_t k_src,
               std::int64_t k_src_stride_t, std::uintptr_t k_dst, std::int64_t k_dst_stride_t,
               std::int64_t k_dst_rows, std::uintptr_t latent, std::int64_t latent_stride_t, std::int64_t latent_dim,
               std::uintptr_t positions, bool positions_int32, std::uintptr_t cos_sin, std::int64_t max_position,
               std::uintptr_t slots, bool slots_int32, std::uintptr_t flag, std::int64_t tokens, std::int64_t heads,
               std::int64_t rotary_dim, int dtype, bool interleaved, bool copy_bad_rows, std::uintptr_t stream);

// An empty kernel <<<1, 32>>>: the launch-overhead reference of the rope benchmark.
void empty_kernel(std::uintptr_t stream);

}  // namespace pk
