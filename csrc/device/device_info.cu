#include "../common/check.h"
#include "device.h"

namespace pk {

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

DeviceProperties device_properties(int device) {
  require_device();
  PK_CHECK(device >= 0 && device < device_count(), "device: expected an index in [0, ", device_count(),
           "), got ", device);
  cudaDeviceProp p{};
  PK_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  int mem_clock_khz = 0, bus_width = 0;
  // Not in cudaDeviceProp under CUDA 13: read them as attributes.
  PK_CUDA_CHECK(cudaDeviceGetAttribute(&mem_clock_khz, cudaDevAttrMemoryClockRate, device));
  PK_CUDA_CHECK(cudaDeviceGetAttribute(&bus_width, cudaDevAttrGlobalMemoryBusWidth, device));
  return DeviceProperties{p.name,
                          p.major,
                          p.minor,
                          p.multiProcessorCount,
                          static_cast<std::int64_t>(p.totalGlobalMem),
                          static_cast<std::int64_t>(p.l2CacheSize),
                          static_cast<std::int64_t>(p.sharedMemPerBlockOptin),
                          bus_width,
                          mem_clock_khz};
}

}  // namespace pk
