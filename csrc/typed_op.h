// A typed handle of a convrnn op, for C++ code that calls another op through the dispatcher
// (the sequence layers' step loop, the cells' eager autograd): findSchemaOrThrow once, into a
// function-local static at the call site.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace convrnn {

template <typename Fn>
c10::TypedOperatorHandle<Fn> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

}  // namespace convrnn
