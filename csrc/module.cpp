// The Python module convrnn_kernels._C: importing it registers every op with the
// dispatcher (the TORCH_LIBRARY blocks in the other files); it adds build_info() and the
// recurrent cells' and the image ops' eager autograd entry points (rnn_cells_autograd.cpp,
// image_ops_autograd.cpp).
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
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

// The route of a plain eager call (ops/_common.py, call): 0 the dispatcher's (an argument is a
// tensor subclass, or the JIT tracer, a functorch transform or autocast is on), 1 no gradient
// needed, 2 a gradient needed (grad mode on and a tensor argument requiring grad).  The same
// tests as the Python ones it replaced (type(a) in (Tensor, Parameter); torch._C._is_tracing,
// _are_functorch_transforms_active, _is_any_autocast_enabled, is_grad_enabled) in one call:
// 0.09 us against 1.1-1.3 us for a cell's six tensors (timeit, this project's CPU machine).
int eager_route(const pybind11::tuple& args) {
  bool grad = false;
  for (const pybind11::handle a : args) {
    PyObject* o = a.ptr();
    if (!THPVariable_Check(o)) continue;
    if (!THPVariable_CheckExact(o)) return 0;  // a subclass (Parameter passes)
    grad = grad || THPVariable_Unpack(o).requires_grad();
  }
  if (torch::jit::tracer::isTracing()) return 0;
  const c10::impl::LocalDispatchKeySet tls = c10::impl::tls_local_dispatch_key_set();
  if (tls.included_.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
      tls.included_.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode)) {
    return 0;
  }
  // autocast is on for a device where its key is not excluded
  if (!(c10::autocast_dispatch_keyset - tls.excluded_).empty()) return 0;
  return grad && at::GradMode::is_enabled() ? 2 : 1;
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
  m.def("eager_route", &eager_route,
        "The route of a plain eager call of an op with these arguments: 0 the dispatcher, 1 no "
        "gradient, 2 a gradient (ops/_common.py's call).");
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
