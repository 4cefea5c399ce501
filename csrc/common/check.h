// Argument and CUDA-status checks for the extension.
//
// PK_CHECK throws std::invalid_argument, which pybind11 turns into Python's ValueError, so a bad
// size that slipped past the Python checks still gets a clear error naming the argument.
// PK_CUDA_CHECK throws std::runtime_error (RuntimeError) carrying the CUDA error string.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

namespace pk {

// Messages are built with std::string and std::to_string, not iostreams: a libstdc++ linked into the
// module statically can crash in locale code when the process also loaded the shared one (seen on the
// GPU image).
inline std::string to_text(const char* s) { return s; }
inline std::string to_text(const std::string& s) { return s; }
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
inline std::string to_text(T value) { return std::to_string(value); }

template <typename... Args>
[[noreturn]] inline void throw_invalid(const char* file, int line, const Args&... args) {
  std::string msg;
  ((msg += to_text(args)), ...);
  throw std::invalid_argument(msg + " [" + file + ":" + std::to_string(line) + "]");
}

inline void cuda_check(cudaError_t status, const char* what, const char* file, int line) {
  if (status == cudaSuccess) return;
  throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(status) + " (" + cudaGetErrorString(status) +
                           ") [" + file + ":" + std::to_string(line) + "]");
}

// The device that runs a launch must exist; a machine without a GPU gets one clear message.
inline void require_device() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear the sticky "no device" status
    throw std::runtime_error("pykernels._C: no CUDA device (the extension is built, but this machine has no usable GPU)");
  }
}

}  // namespace pk

#define PK_CHECK(cond, ...) \
  do {                      \
    if (!(cond)) ::pk::throw_invalid(__FILE__, __LINE__, __VA_ARGS__); \
  } while (0)

#define PK_CUDA_CHECK(expr) ::pk::cuda_check((expr), #expr, __FILE__, __LINE__)

// After a launch: a bad configuration shows here, not at the next unrelated call.
#define PK_LAUNCH_CHECK() PK_CUDA_CHECK(cudaGetLastError())
