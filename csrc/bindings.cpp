// pykernels._C: every kernel takes raw device addresses, sizes and a cudaStream_t as integers.
// Python validates and allocates with torch; the C++ side checks the sizes it is given again.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "device/device.h"
#include "ep/ep.h"
#include "moe/grouped_gemm.h"
#include "rope/rope.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pykernels CUDA kernels (raw pointers + cudaStream_t; links only the CUDA runtime)";

  py::class_<pk::DeviceProperties>(m, "DeviceProperties")
      .def_readonly("name", &pk::DeviceProperties::name)
      .def_readonly("major", &pk::DeviceProperties::major)
      .def_readonly("minor", &pk::DeviceProperties::minor)
      .def_readonly("multiprocessors", &pk::DeviceProperties::multiprocessors)
      .def_readonly("total_memory_bytes", &pk::DeviceProperties::total_memory_bytes)
      .def_readonly("l2_cache_bytes", &pk::DeviceProperties::l2_cache_bytes)
      .def_readonly("shared_memory_per_block_optin", &pk::DeviceProperties::shared_memory_per_block_optin)
      .def_readonly("memory_bus_width_bits", &pk::DeviceProperties::memory_bus_width_bits)
      .def_readonly("memory_clock_khz", &pk::DeviceProperties::memory_clock_khz);

  m.def("device_count", &pk::device_count, "Number of CUDA devices; 0 without a driver or GPU.");
  m.def("device_properties", &pk::device_properties, py::arg("device"));
  m.def("copy_2d", &pk::copy_2d, py::arg("dst"), py::arg("dst_row_stride"), py::arg("src"),
        py::arg("src_row_stride"), py::arg("rows"), py::arg("row_bytes"), py::arg("stream"),
        "dst[r, :row_bytes] = src[r, :row_bytes] over rows; strides in bytes; the GIL is released.",
        py::call_guard<py::gil_scoped_release>());

  m.def("rope_rows", &pk::rope_rows, py::arg("q_src"), py::arg("q_src_stride_t"), py::arg("q_src_stride_h"),
        py::arg("q_dst"), py::arg("q_dst_stride_t"), py::arg("q_dst_stride_h"), py::arg("k_src"),
        py::arg("k_src_stride_t"), py::arg("k_dst"), py::arg("k_dst_stride_t"), py::arg("k_dst_rows"),
        py::arg("latent"), py::arg("latent_stride_t"), py::arg("latent_dim"), py::arg("positions"),
        py::arg("positions_int32"), py::arg("cos_sin"), py::arg("max_position"), py::arg("slots"),
        py::arg("slots_int32"), py::arg("flag"), py::arg("tokens"), py::arg("heads"), py::arg("rotary_dim"),
        py::arg("dtype"), py::arg("interleaved"), py::arg("copy_bad_rows"), py::arg("stream"),
        "Rotary embedding of q/k rows with the fused paged-cache write (csrc/rope/rope.h); the GIL is released.",
        py::call_guard<py::gil_scoped_release>());
  m.def("empty_kernel", &pk::empty_kernel, py::arg("stream"), "Launch an empty kernel <<<1, 32>>> (launch-overhead reference).",
        py::call_guard<py::gil_scoped_release>());

  m.def("grouped_gemm_sm90", &pk::grouped_gemm_sm90, py::arg("a"), py::arg("k"), py::arg("w"), py::arg("experts"),
        py::arg("w_rows"), py::arg("out"), py::arg("n_out"), py::arg("offsets"), py::arg("rows"), py::arg("pair"),
        py::arg("weights"), py::arg("gate_up"), py::arg("stream"),
        "Warp-specialized grouped GEMM of the MoE prefill (csrc/moe/grouped_gemm.h); the GIL is released.",
        py::call_guard<py::gil_scoped_release>());

  // pk.ep NVLink backend (pykernels/ep/nvlink.py); the launches release the GIL.
  m.def("ep_alloc_shared", &pk::ep::alloc_shared, py::arg("device"), py::arg("bytes"));
  m.def("ep_free_shared", &pk::ep::free_shared, py::arg("device"), py::arg("ptr"));
  m.def("ep_ipc_handle", [](int device, std::uintptr_t ptr) { return py::bytes(pk::ep::ipc_handle(device, ptr)); },
        py::arg("device"), py::arg("ptr"));
  m.def("ep_ipc_open", &pk::ep::ipc_open, py::arg("device"), py::arg("handle"));
  m.def("ep_ipc_close", &pk::ep::ipc_close, py::arg("device"), py::arg("ptr"));
  m.def("ep_alloc_error_flags", &pk::ep::alloc_error_flags);
  m.def("ep_free_error_flags", &pk::ep::free_error_flags, py::arg("host_ptr"));
  m.def("ep_dispatch_send", &pk::ep::dispatch_send, py::call_guard<py::gil_scoped_release>());
  m.def("ep_dispatch_recv", &pk::ep::dispatch_recv, py::call_guard<py::gil_scoped_release>());
  m.def("ep_combine_send", &pk::ep::combine_send, py::call_guard<py::gil_scoped_release>());
  m.def("ep_combine_recv", &pk::ep::combine_recv, py::call_guard<py::gil_scoped_release>());

  m.attr("cuda_version") = CUDART_VERSION;
  m.attr("cuda_architectures") = PYKERNELS_CUDA_ARCHITECTURES;
}
