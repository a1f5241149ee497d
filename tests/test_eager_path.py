"""The eager fast path (convrnn_kernels/ops/_common.py): plain eager calls run the op below
the autograd key through the op's own autograd Function (for the image ops its C++ twin,
csrc/image_ops_autograd.cpp); tracing and transforms take
the dispatcher's registered autograd.  Both routes must give the same values, gradients and
output layouts, and each must be taken where it should."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from helpers import import_ck

ck = import_ck("max_pool2d", "conv2d")
OPS = torch.ops.convrnn


def _cases(device):
    """(name, our functional call, the same through torch.ops (dispatcher autograd), inputs)."""
    x = torch.randn(2, 4, 9, 9, device=device)
    w = torch.randn(6, 4, 3, 3, device=device)
    b = torch.randn(6, device=device)
    return [
        ("max_pool2d", lambda x: ck.max_pool2d(x, 3, 2, 1),
         lambda x: OPS.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], False, False, x.requires_grad)[0], [x]),
        ("avg_pool2d", lambda x: ck.avg_pool2d(x, 3, 2, 1),
         lambda x: OPS.avg_pool2d(x, [3, 3], [2, 2], [1, 1], False, True, None), [x]),
        ("local_response_norm", lambda x: ck.local_response_norm(x, 3, 1e-2, 0.75, 2.0),
         lambda x: OPS.local_response_norm(x, 3, 1e-2, 0.75, 2.0), [x]),
        ("conv2d", lambda x, w, b: ck.conv2d(x, w, b, 1, 1),
         lambda x, w, b: OPS.conv2d(x, w, b, [1, 1], [1, 1], [1, 1], 1), [x, w, b]),
    ]


@pytest.mark.parametrize("channels_last", [False, True])
def test_eager_and_dispatcher_routes_agree(device, channels_last):
    for name, ours, dispatched, inputs in _cases(device):
        if channels_last:
            inputs = [t.to(memory_format=torch.channels_last) if t.dim() == 4 else t for t in inputs]
        a = [t.detach().clone().requires_grad_() for t in inputs]
        b = [t.detach().clone().requires_grad_() for t in inputs]
        ya, yb = ours(*a), dispatched(*b)
        # the eager route's node is the op Function's C++ twin (csrc/image_ops_autograd.cpp); the
        # dispatcher's is torch's generated one around the registered Python formula
        assert "CppNode" in ya.grad_fn.name(), (name, ya.grad_fn.name())
        assert "CppNode" not in yb.grad_fn.name(), (name, yb.grad_fn.name())
        torch.testing.assert_close(ya, yb, rtol=0, atol=0, msg=name)
        assert ya.stride() == yb.stride(), name
        g = torch.randn_like(ya)
        ga = torch.autograd.grad(ya, a, g)
        gb = torch.autograd.grad(yb, b, g)
        for u, v in zip(ga, gb):
            torch.testing.assert_close(u, v, rtol=0, atol=0, msg=name)
            assert u.stride() == v.stride(), name


def test_no_grad_needed_gives_no_graph(device):
    for name, ours, _, inputs in _cases(device):
        y = ours(*inputs)
        assert y.grad_fn is None and not y.requires_grad, name
        req = [t.detach().clone().requires_grad_() for t in inputs]
        with torch.no_grad():
            assert ours(*req).grad_fn is None, name
        with torch.inference_mode():
            assert ours(*req).grad_fn is None, name


def test_only_needed_inputs_get_gradients(device):
    # float64: no TF32 on either side on CUDA (cuDNN and our conv2d use it for float32 by default)
    x = torch.randn(2, 4, 9, 9, device=device, dtype=torch.float64)
    w = torch.randn(6, 4, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    y = ck.conv2d(x, w, None, 1, 1)
    (gw,) = torch.autograd.grad(y.sum(), [w])
    expected = torch.nn.functional.conv2d(x, w, None, 1, 1)
    (ew,) = torch.autograd.grad(expected.sum(), [w])
    torch.testing.assert_close(gw, ew, rtol=1e-10, atol=1e-10)


def test_fake_tensors_take_the_dispatcher_route():
    with FakeTensorMode():
        x = torch.randn(2, 4, 9, 9, requires_grad=True)
        y = ck.max_pool2d(x, 3, 2, 1)
        assert y.shape == (2, 4, 5, 5)
        assert not type(y.grad_fn).__name__.endswith("FunctionBackward")


def test_lstm_layers_take_the_eager_route_and_match_torch():
    torch.manual_seed(0)
    ref = torch.nn.LSTM(5, 7, num_layers=2)
    ours = ck.nn.LSTM(5, 7, num_layers=2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 5, requires_grad=True)
    y, _ = ours(x)
    assert type(y.grad_fn).__name__ == "LstmLayerFunctionBackward"
    y_ref, _ = ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    g, = torch.autograd.grad(y.sum(), [x])
    g_ref, = torch.autograd.grad(y_ref.sum(), [x])
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


def _python_route(args):
    """The route as ops/_common.py's call() decided it in Python before _C.eager_route."""
    plain = (torch.Tensor, torch.nn.Parameter)
    grad = False
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in plain:
                return 0
            grad = grad or a.requires_grad
    if torch._C._is_tracing() or torch._C._are_functorch_transforms_active() or torch._C._is_any_autocast_enabled():
        return 0
    return 2 if grad and torch.is_grad_enabled() else 1


class _Sub(torch.Tensor):
    pass


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated")
def test_eager_route_matches_the_python_tests():
    """_C.eager_route (csrc/module.cpp) takes the decisions call() took in Python: argument
    types, the JIT tracer, functorch transforms, autocast and grad mode."""
    from convrnn_kernels import _C

    x = torch.randn(2, 3)
    p = torch.nn.Parameter(torch.randn(3))
    cases = [(x,), (x, p), (x, p.detach(), None, 2, False), (x, x.as_subclass(_Sub)), (), (None, 1.5)]
    seen = []
    for args in cases:
        for ctx in (torch.enable_grad, torch.no_grad, torch.inference_mode,
                    lambda: torch.autocast("cpu", dtype=torch.bfloat16)):
            with ctx():
                got, want = _C.eager_route(args), _python_route(args)
            assert got == want, (args, ctx, got, want)
            seen.append(got)
    assert set(seen) == {0, 1, 2}
    # functorch: inside vmap both say "dispatcher"
    routes = []

    def f(a):
        routes.append((_C.eager_route((a,)), _python_route((a,))))
        return a * 2

    torch.func.vmap(f)(torch.randn(3, 2))
    assert routes == [(0, 0)]
    # the JIT tracer
    routes.clear()
    torch.jit.trace(f, (torch.randn(2),), check_trace=False)
    assert routes == [(0, 0)]


def test_no_grad_route_matches_the_dispatcher(device):
    """Without a gradient, ops with a C++ eager Function run through it (ops/_common.py, call):
    the same values and strides as the op called below autograd, and no graph."""
    for name, ours, dispatched, inputs in _cases(device):
        req = [t.detach().clone().requires_grad_() for t in inputs]
        with torch.no_grad():
            ya, yb = ours(*req), dispatched(*req)
        assert ya.grad_fn is None and not ya.requires_grad, name
        torch.testing.assert_close(ya, yb, rtol=0, atol=0, msg=name)
        assert ya.stride() == yb.stride(), name
