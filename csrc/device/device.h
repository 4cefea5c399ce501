// Device queries and a strided 2-D copy: the smallest real kernel, exercising the build, the
// binding and the pointer/stream conventions every other kernel uses.
#pragma once

#include <cstdint>
#include <string>

namespace pk {

struct DeviceProperties {
  std::string name;
  int major, minor;
  int multiprocessors;
  std::int64_t total_memory_bytes;
  std::int64_t l2_cache_bytes;
  std::int64_t shared_memory_per_block_optin;
  int memory_bus_width_bits;
  int memory_clock_khz;
};

// Number of CUDA devices, 0 when there is no driver or no GPU (never throws).
int device_count();
DeviceProperties device_properties(int device);

// dst[r, c] = src[r, c] for a [rows, row_bytes] byte matrix with row strides in bytes.
// Uses the widest access (16, 8, 4, 2 or 1 bytes) that the pointers, strides and row length allow.
void copy_2d(std::uintptr_t dst, std::int64_t dst_row_stride, std::uintptr_t src, std::int64_t src_row_stride,
             std::int64_t rows, std::int64_t row_bytes, std::uintptr_t stream);

}  // namespace pk
