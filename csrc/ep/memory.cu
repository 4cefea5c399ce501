// Shared memory blocks, CUDA IPC handles and the host-visible error flags of the NVLink backend.
#include <cstring>

#include "../common/check.h"
#include "ep.h"

namespace pk::ep {

std::uintptr_t alloc_shared(int device, std::int64_t bytes) {
  require_device();
  PK_CHECK(bytes > 0, "bytes: expected a positive size, got ", bytes);
  PK_CUDA_CHECK(cudaSetDevice(device));
  void* ptr = nullptr;
  PK_CUDA_CHECK(cudaMalloc(&ptr, static_cast<size_t>(bytes)));
  PK_CUDA_CHECK(cudaMemset(ptr, 0, static_cast<size_t>(bytes)));
  PK_CUDA_CHECK(cudaDeviceSynchronize());
  return reinterpret_cast<std::uintptr_t>(ptr);
}

void free_shared(int device, std::uintptr_t ptr) {
  PK_CUDA_CHECK(cudaSetDevice(device));
  PK_CUDA_CHECK(cudaFree(reinterpret_cast<void*>(ptr)));
}

std::string ipc_handle(int device, std::uintptr_t ptr) {
  PK_CUDA_CHECK(cudaSetDevice(device));
  cudaIpcMemHandle_t handle;
  PK_CUDA_CHECK(cudaIpcGetMemHandle(&handle, reinterpret_cast<void*>(ptr)));
  return std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

std::uintptr_t ipc_open(int device, const std::string& handle) {
  PK_CHECK(handle.size() == sizeof(cudaIpcMemHandle_t), "handle: expected ", sizeof(cudaIpcMemHandle_t),
           " bytes, got ", handle.size());
  PK_CUDA_CHECK(cudaSetDevice(device));
  cudaIpcMemHandle_t h;
  std::memcpy(&h, handle.data(), sizeof(h));
  void* ptr = nullptr;
  PK_CUDA_CHECK(cudaIpcOpenMemHandle(&ptr, h, cudaIpcMemLazyEnablePeerAccess));
  return reinterpret_cast<std::uintptr_t>(ptr);
}

void ipc_close(int device, std::uintptr_t ptr) {
  PK_CUDA_CHECK(cudaSetDevice(device));
  PK_CUDA_CHECK(cudaIpcCloseMemHandle(reinterpret_cast<void*>(ptr)));
}

std::pair<std::uintptr_t, std::uintptr_t> alloc_error_flags() {
  require_device();
  void* host = nullptr;
  PK_CUDA_CHECK(cudaHostAlloc(&host, 4 * sizeof(int), cudaHostAllocMapped | cudaHostAllocPortable));
  std::memset(host, 0, 4 * sizeof(int));
  void* dev = nullptr;
  PK_CUDA_CHECK(cudaHostGetDevicePointer(&dev, host, 0));
  return {reinterpret_cast<std::uintptr_t>(host), reinterpret_cast<std::uintptr_t>(dev)};
}

void free_error_flags(std::uintptr_t host_ptr) { PK_CUDA_CHECK(cudaFreeHost(reinterpret_cast<void*>(host_ptr))); }

}  // namespace pk::ep
