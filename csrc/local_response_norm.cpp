// Schema of local_response_norm and the checks its CPU and CUDA wrappers share.
#include "local_response_norm.h"

#include <torch/library.h>

namespace convrnn {

Lrn lrn_geometry(const char* op, const at::Tensor& input, int64_t size) {
  TORCH_CHECK(input.dim() >= 3, "convrnn.", op, ": input must have at least 3 dimensions (N, C, *), but got shape ",
              input.sizes());
  check_floating(op, "input", input);
  TORCH_CHECK(size > 0, "convrnn.", op, ": size must be greater than zero, but got ", size);
  Lrn g;
  g.N = input.size(0);
  g.C = input.size(1);
  g.S = 1;
  for (int64_t d = 2; d < input.dim(); ++d) g.S *= input.size(d);
  g.channels_last = image_format(input) == at::MemoryFormat::ChannelsLast;
  return g;
}

Lrn lrn_backward_geometry(const char* op, const at::Tensor& grad_output, const at::Tensor& input, int64_t size) {
  const Lrn g = lrn_geometry(op, input, size);
  check_same(op, "grad_output", grad_output, "input", input);
  check_shape(op, "grad_output", grad_output, input.sizes());
  return g;
}

}  // namespace convrnn

TORCH_LIBRARY_FRAGMENT(convrnn, m) {
  m.def("local_response_norm(Tensor input, int size, float alpha, float beta, float k) -> Tensor");
  m.def(
      "local_response_norm_backward(Tensor grad_output, Tensor input, int size, float alpha, float beta, float k) "
      "-> Tensor");
}
