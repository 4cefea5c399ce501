// Streams and pointers cross the binding as plain integers (torch's `cuda_stream`, `data_ptr()`),
// so the extension links nothing but the CUDA runtime.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pk {

inline cudaStream_t as_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

template <typename T>
inline T* as_ptr(std::uintptr_t address) { return reinterpret_cast<T*>(address); }

}  // namespace pk
