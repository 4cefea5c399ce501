#include <cstdint>

#include "../common/check.h"
#include "../common/stream.h"
#include "device.h"

namespace pk {
namespace {

// One element of kBytes bytes per thread and iteration; a grid-stride loop over the matrix.
template <int kBytes>
struct Chunk;
template <> struct Chunk<16> { using type = uint4; };
template <> struct Chunk<8> { using type = uint2; };
template <> struct Chunk<4> { using type = unsigned int; };
template <> struct Chunk<2> { using type = unsigned short; };
template <> struct Chunk<1> { using type = unsigned char; };

template <int kBytes>
__global__ void copy_2d_kernel(char* __restrict__ dst, std::int64_t dst_stride, const char* __restrict__ src,
                               std::int64_t src_stride, std::int64_t rows, std::int64_t chunks_per_row) {
  using T = typename Chunk<kBytes>::type;
  const std::int64_t total = rows * chunks_per_row;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t r = i / chunks_per_row, c = i % chunks_per_row;
    *reinterpret_cast<T*>(dst + r * dst_stride + c * kBytes) =
        *reinterpret_cast<const T*>(src + r * src_stride + c * kBytes);
  }
}

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 8;  // enough resident warps to keep several loads in flight per SM

template <int kBytes>
void launch(char* dst, std::int64_t dst_stride, const char* src, std::int64_t src_stride, std::int64_t rows,
            std::int64_t row_bytes, cudaStream_t stream) {
  int device = 0, sms = 0;
  PK_CUDA_CHECK(cudaGetDevice(&device));
  PK_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const std::int64_t chunks = row_bytes / kBytes;
  const std::int64_t needed = (rows * chunks + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(needed < sms * kBlocksPerSm ? needed : sms * kBlocksPerSm);
  copy_2d_kernel<kBytes><<<blocks, kThreads, 0, stream>>>(dst, dst_stride, src, src_stride, rows, chunks);
  PK_LAUNCH_CHECK();
}

}  // namespace

void copy_2d(std::uintptr_t dst, std::int64_t dst_row_stride, std::uintptr_t src, std::int64_t src_row_stride,
             std::int64_t rows, std::int64_t row_bytes, std::uintptr_t stream) {
  require_device();
  PK_CHECK(rows >= 0, "rows: expected >= 0, got ", rows);
  PK_CHECK(row_bytes >= 0, "row_bytes: expected >= 0, got ", row_bytes);
  PK_CHECK(rows <= 1 || dst_row_stride >= row_bytes, "dst_row_stride: rows would overlap (", dst_row_stride,
           " < ", row_bytes, ")");
  PK_CHECK(src_row_stride >= 0, "src_row_stride: expected >= 0, got ", src_row_stride);
  if (rows == 0 || row_bytes == 0) return;
  PK_CHECK(dst != 0 && src != 0, "dst/src: null pointer");
  // The widest access every address in the matrix is aligned to.
  const std::uint64_t bits = dst | src | static_cast<std::uint64_t>(dst_row_stride) |
                             static_cast<std::uint64_t>(src_row_stride) | static_cast<std::uint64_t>(row_bytes);
  char* d = as_ptr<char>(dst);
  const char* s = as_ptr<const char>(src);
  cudaStream_t st = as_stream(stream);
  if (bits % 16 == 0) return launch<16>(d, dst_row_stride, s, src_row_stride, rows, row_bytes, st);
  if (bits % 8 == 0) return launch<8>(d, dst_row_stride, s, src_row_stride, rows, row_bytes, st);
  if (bits % 4 == 0) return launch<4>(d, dst_row_stride, s, src_row_stride, rows, row_bytes, st);
  if (bits % 2 == 0) return launch<2>(d, dst_row_stride, s, src_row_stride, rows, row_bytes, st);
  return launch<1>(d, dst_row_stride, s, src_row_stride, rows, row_bytes, st);
}

}  // namespace pk
