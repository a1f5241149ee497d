"""Helpers shared by the fake kernels of every op."""
import functools

import torch
from torch._prims_common import suggest_memory_format

from .. import _C


def memory_format_of(input):
    """The memory format the C++ kernels give their outputs: the input's suggested one for
    4-D images (as torch's own kernels do), contiguous otherwise."""
    return suggest_memory_format(input) if input.dim() == 4 else torch.contiguous_format


def empty_like_input(input):
    """A fake gradient (or same-shaped output) for `input`."""
    return torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=memory_format_of(input))


# ---- the eager fast path ----
#
# Every op's autograd formula is registered with the dispatcher (torch.library.register_autograd),
# so torch.ops.convrnn.* is differentiable on its own and torch.compile / torch.export trace it
# with the fake kernels.  That route runs torch's generic Python autograd kernel on every call
# (argument flattening, a generated Function, a Python redispatch): about 14 us per call when
# no gradient is needed and 35-40 us when one is, measured on this project's 2-core CPU machine
# (benchmarks/NOTES.md, "host overhead").  Kernels of tens of microseconds (small pooling layers on
# a GPU, a batch-1 RNN step) were timed as that overhead.  In plain eager mode the functional
# wrappers therefore call the op below the autograd key, through the op's own
# torch.autograd.Function (same setup_context and backward as registered) when a gradient is
# needed, and through its C++ eager Function, where it has one, when none is.  Anything that
# traces or transforms (torch.compile, torch.export, jit tracing,
# functorch transforms, tensor subclasses such as FakeTensor or DTensor) and autocast (whose
# kernels, ops/autocast.py, sit above autograd) take the dispatcher route unchanged.

_below_autograd = torch._C._AutoDispatchBelowAutograd
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def below_autograd(op, *args):
    """op(*args) with the autograd keys excluded: the forward of every op's Function."""
    with _below_autograd():
        return op(*args)


_is_compiling = torch.compiler.is_compiling
_is_tracing = torch._C._is_tracing  # torch.jit.is_tracing() outside TorchScript
_functorch_active = torch._C._are_functorch_transforms_active
_autocast_enabled = torch._C._is_any_autocast_enabled  # autocast's casts must be recorded by autograd

_FUNCTIONS = {}  # op -> how eager calls apply its autograd: its OpFunction's apply, or OpFunction.eager
_NO_GRAD = {}  # op -> its C++ eager Function where it has one: applied without a gradient, it records nothing
_route = _C.eager_route


def call(op, *args):
    """Runs op(*args) (an OpOverload of an OpFunction) as the dispatcher would, with
    autograd through the op's OpFunction when a gradient is needed; see above.  Which route is
    one C++ call (_C.eager_route: the argument types, the tracer, functorch, autocast and grad
    mode; 0.09 us where the same tests in Python took 1.1-1.3 us at a cell's six tensors).  Without a
    gradient an op with a C++ eager Function runs through it (its forward calls the op below the
    autograd keys; no node is recorded), ~1 us cheaper than the OpOverload's boxed call."""
    if _is_compiling():
        return op(*args)
    route = _route(args)
    if route == 2:
        return _FUNCTIONS[op](*args)
    if route == 1:
        fast = _NO_GRAD.get(op)
        if fast is not None:
            return fast(*args)
        with _below_autograd():
            return op(*args)
    return op(*args)


# ---- backward formulas are differentiable once ----
#
# The backward ops (convrnn::*_backward) have no derivative of their own.  Under create_graph a
# backward's results would then be constants to a second backward: torch's fallback for such ops
# only warns, so gradient penalties, Hessian-vector products and MAML got second-order gradients
# that were silently None or zero.  As with torch.autograd.function.once_differentiable, the
# results come out with an error node as their grad_fn instead, and differentiating them raises an
# error that names the op; unlike its DelayedError over detached copies, our error node keeps the
# edges of the node being evaluated (the forward's inputs) and of the incoming gradients, so that a
# second-order gradient asked of a weight (autograd.grad(penalty, weight), allow_unused or not)
# raises rather than coming back None (csrc/once_differentiable.h, shared with the C++ nodes of the
# eager route).

def once_differentiable(op_name, backward):
    """backward (ctx, *grads) -> gradients, run without recording; under create_graph (grad mode on
    in the backward) its tensors come out with an error node as their grad_fn.  Traced or
    transformed backwards (torch.compile, functorch, tensor subclasses) are left as they are."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled() or _is_compiling() or _is_tracing() or _functorch_active():
            return outputs
        single = not isinstance(outputs, tuple)
        outs = (outputs,) if single else outputs
        if not all(type(t) in _PLAIN for t in outs if isinstance(t, torch.Tensor)):
            return outputs
        where = [i for i, t in enumerate(outs) if isinstance(t, torch.Tensor)]
        tensors = _C.with_double_backward_error(op_name, [outs[i] for i in where],
                                                [g for g in grads if isinstance(g, torch.Tensor)])
        wrapped = list(outs)
        for i, t in zip(where, tensors):
            wrapped[i] = t
        return wrapped[0] if single else tuple(wrapped)

    return wrapper


class OpFunction(torch.autograd.Function):
    """Base of every op's torch.autograd.Function.  A subclass names its op
    (`op_name = "max_pool2d"`) and defines two static methods:
    save(ctx, inputs, output), what the backward needs, and backward(ctx, *grad_outputs).
    The class then gets op (torch.ops.convrnn.<op>.default) and a forward that runs the op
    below the autograd key and calls save; save and backward are registered with the
    dispatcher as the op's autograd formula (torch.library.register_autograd, where save is
    the setup_context).  The forward takes ctx (the old-style signature) because
    Function.apply binds the arguments with inspect.signature on every call of a Function
    that defines setup_context: ~25 us a call.

    A subclass may also set `eager` to a C++ function applying a torch::autograd::Function
    that saves and differentiates exactly as save and backward do; eager calls then use it
    instead of this class.  For ops so small that the Python node is most of their cost (the
    recurrent cells: csrc/rnn_cells_autograd.cpp)."""

    eager = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.op = getattr(torch.ops.convrnn, cls.op_name).default
        _FUNCTIONS[cls.op] = cls.apply if cls.eager is None else cls.eager
        if cls.eager is not None:
            _NO_GRAD[cls.op] = cls.eager
        save = cls.save

        def forward(ctx, *args):
            output = below_autograd(cls.op, *args)
            save(ctx, args, output)
            return output

        cls.forward = staticmethod(forward)
        cls.backward = staticmethod(once_differentiable(cls.op_name, cls.backward))
        torch.library.register_autograd(f"convrnn::{cls.op_name}", cls.backward, setup_context=save)
