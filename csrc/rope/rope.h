// Rotary embedding of q and k rows with the paged latent-cache write fused in: the CUDA side of
// pykernels.apply_rotary and pykernels.rope_and_cache (pykernels/rope.py has the math).
//
// One launch does, for every token t with position p = positions[t]:
//   q_dst[t, h, :] = rotate(q_src[t, h, :], p)                     for every head h (q_dst may be q_src)
//   k_dst[r, L : L + d] = rotate(k_src[t, :], p),  k_dst[r, :L] = latent[t, :]
//     with r = slots[t] (rope_and_cache: a paged-cache row; -1 = skip) or r = t when slots is 0 (apply_rotary).
// cos/sin are computed, not read from a table: pair i of position p turns by the float32 angle
// float(p) * inv_freq[i] (the product YarnRotary's table holds), and cos/sin are scaled by cos_sin_scale
// (YarnRotary's mscale ratio). inv_freq is float32 [rotary_dim / 2] on the device.
// Bad values never cause an out-of-bounds access: a position outside [0, max_position) rotates nothing and
// (unless copy_bad_rows) writes nothing; a slot outside [-1, k_dst_rows) writes nothing; either raises a
// bit in *flag (1: position, 2: slot) with atomicOr. Strides are in elements.
// Launch shape: CTAs of `threads` threads (a multiple of 32 in [32, 256]), each thread moving
// `units_per_thread` (1, 2, 4 or 8) units of 16 bytes (see rope.cu); `streaming` marks every global access
// evict-first (.cs: the data is touched once).
#pragma once

#include <cstdint>

namespace pk {

// dtype codes shared with pykernels/rope.py
enum RopeDtype : int { kRopeFloat32 = 0, kRopeFloat16 = 1, kRopeBFloat16 = 2 };

void rope_rows(std::uintptr_t q_src, std::int64_t q_src_stride_t, std::int64_t q_src_stride_h, std::uintptr_t q_dst,
               std::int64_t q_dst_stride_t, std::int64_t q_dst_stride_h, std::uintptr_t k_src,
               std::int64_t k_src_stride_t, std::uintptr_t k_dst, std::int64_t k_dst_stride_t,
               std::int64_t k_dst_rows, std::uintptr_t latent, std::int64_t latent_stride_t, std::int64_t latent_dim,
               std::uintptr_t positions, bool positions_int32, std::uintptr_t inv_freq, double cos_sin_scale,
               std::int64_t max_position, std::uintptr_t slots, bool slots_int32, std::uintptr_t flag,
               std::int64_t tokens, std::int64_t heads, std::int64_t rotary_dim, int dtype, bool interleaved,
               bool copy_bad_rows, int threads, int units_per_thread, bool streaming, std::uintptr_t stream);

// An empty kernel <<<1, 32>>>: the launch-overhead reference of the rope benchmark.
void empty_kernel(std::uintptr_t stream);

}  // namespace pk
