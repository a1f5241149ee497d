// The Python module convrnn_kernels._C: importing it registers every op with the
// dispatcher (the TORCH_LIBRARY blocks in the other files); it adds build_info() and the
// recurrent cells' and the image ops' eager autograd entry points (rnn_cells_autograd.cpp,
// image_ops_autograd.cpp).
#include <torch/extension.h>

#include <string>
#include <vector>

#include "once_differentiable.h"

namespace convrnn {
void bind_cell_autograd(pybind11::module& m);    // rnn_cells_autograd.cpp
void bind_image_autograd(pybind11::module& m);   // image_ops_autograd.cpp
}  // namespace convrnn

namespace {

// Which of the CPU kernel clones (CONVRNN_CPU_CLONES) the loader picks on this CPU.
std::string cpu_kernel_level() {
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4 (AVX-512)";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3 (AVX2, FMA)";
  return "x86-64 baseline";
#else
  return "portable";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  convrnn::bind_cell_autograd(m);
  convrnn::bind_image_autograd(m);
  m.def(
      "with_double_backward_error",
      [](const std::string& op, std::vector<at::Tensor> outputs, const std::vector<at::Tensor>& grads_in) {
        return convrnn::with_double_backward_error(op, std::move(outputs), grads_in);
      },
      "A backward's gradients (computed without recording) as aliases whose grad_fn raises the op's "
      "double-backward error; the error node's edges: the node being evaluated's and the incoming "
      "gradients' (ops/_common.py's once_differentiable).");
  m.def("build_info", [] {
    pybind11::dict d;
#ifdef CONVRNN_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
    d["cuda_archs"] = std::string(CONVRNN_CUDA_ARCHS);
    d["openmp"] = static_cast<bool>(CONVRNN_OPENMP);
    d["version"] = std::string(CONVRNN_VERSION);
#if defined(TORCH_VERSION_MAJOR) && defined(TORCH_VERSION_MINOR)
    d["torch_built_against"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);
#endif
    d["cpu_kernels"] = cpu_kernel_level();
    return d;
  }, "What this build of the extension contains.");
}
