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

// Defines fn(): the typed handle of op `name` of C++ type `type`, looked up once.
#define CONVRNN_OP_HANDLE(fn, type, name)                                  \
  const c10::TypedOperatorHandle<type>& fn() {                            \
    static const c10::TypedOperatorHandle<type> h = typed_op<type>(name); \
    return h;                                                             \
  }

}  // namespace convrnn
