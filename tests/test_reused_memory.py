"""The recurrent layers' CPU buffers of 1-32 MiB come from a pool kept between calls
(csrc/cpu/reused_memory.h): a buffer is handed out again only when no tensor holds it any more.
These tests hold outputs, views and saved tensors across calls and check that nothing they see
changes, that the pool is used, and that results are the same bits with the pool on and off."""
import threading

import pytest
import torch

import convrnn_kernels as ck
from helpers import switched

OPS = torch.ops.convrnn

# T50 B32 H256 (the benchmark's training shape): each layer's output, cell states, input
# projection and workspace are 1.6-6.6 MB, inside the pool's sizes
T, B, I, H = 50, 32, 128, 256


def _lstm(seed=0, layers=2):
    torch.manual_seed(seed)
    return ck.nn.LSTM(I, H, num_layers=layers)


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, B, I, generator=g)


def test_switch_errors_name_the_op():
    before, _ = OPS._reuse_memory(-1)
    with pytest.raises(RuntimeError, match=r"convrnn\._reuse_memory: mode"):
        OPS._reuse_memory(2)
    assert OPS._reuse_memory(-1)[0] == before


@torch.no_grad()
def test_buffers_come_back_once_dropped():
    m = _lstm()
    with switched(OPS._reuse_memory, True) as s:
        for seed in range(3):
            m(_data(seed))  # dropped at once
    assert s.launches > 0  # the later calls got the earlier calls' buffers


@torch.no_grad()
def test_held_outputs_and_views_are_never_reused():
    m = _lstm()
    with switched(OPS._reuse_memory, True):
        kept = []
        for seed in range(4):
            out, (h, c) = m(_data(seed))
            # keep the output whole, only a view of it, or only the final states
            held = {0: out, 1: out[3:7], 2: out.transpose(0, 1), 3: h}[seed]
            kept.append((held, held.clone()))
        for held, want in kept:
            assert torch.equal(held, want)
        ptrs = [held.untyped_storage().data_ptr() for held, _ in kept]
        assert len(set(ptrs)) == len(ptrs)


def test_saved_tensors_survive_other_calls():
    """A graph's saved buffers (output, cell states, workspace) stay its own while other calls
    run: the backward after them matches the backward run at once."""
    m = _lstm()
    x = _data(0).requires_grad_()
    grad = torch.randn(T, B, H, generator=torch.Generator().manual_seed(5))
    with switched(OPS._reuse_memory, True):
        out, _ = m(x)
        (want,) = torch.autograd.grad(out, x, grad, retain_graph=True)
        for seed in range(1, 4):  # other forwards and backwards in between
            o2, _ = m(_data(seed).requires_grad_())
            o2.sum().backward()
        (got,) = torch.autograd.grad(out, x, grad)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_same_bits_with_and_without_the_pool(kind):
    torch.manual_seed(0)
    m = getattr(ck.nn, kind)(I, H, num_layers=2)
    results = []
    for on in (False, True, True):
        with switched(OPS._reuse_memory, on):
            m.zero_grad(set_to_none=True)
            x = _data(1).requires_grad_()
            out, hn = m(x)
            hn = hn if isinstance(hn, tuple) else (hn,)
            loss = (out * torch.linspace(-1, 1, H)).sum() + sum(t.sum() for t in hn)
            loss.backward()
            results.append([out.detach(), *[t.detach() for t in hn], x.grad] + [p.grad for p in m.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@torch.no_grad()
def test_threads_get_their_own_buffers():
    m = _lstm(layers=1)
    want = {seed: m(_data(seed))[0] for seed in range(4)}
    got, errors = {}, []

    def run(seed):
        try:
            for _ in range(3):
                got[seed] = m(_data(seed))[0]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with switched(OPS._reuse_memory, True):
        threads = [threading.Thread(target=run, args=(seed,)) for seed in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    for seed in want:
        assert torch.equal(got[seed], want[seed])
