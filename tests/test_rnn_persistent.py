"""The opt-in persistent CUDA recurrence (csrc/cuda/rnn_persistent.cu): the sequence modules with
the path forced on (torch.ops.convrnn._persistent_rnn(1)) against torch.nn's LSTM, GRU and RNN
on CUDA (cuDNN, TF32 off) and against our own step loop, forward and every gradient, over
batch 1 to 300 (several staged chunks), T = 1, odd hidden sizes, both directions, packed
(unsorted) input, no hx, the two benchmark shapes, half types and determinism.  Every CUDA
test checks that the persistent kernels really ran (their launch counter grew), so a silent
fall-back to the step loop cannot pass for them.  Test ids carry "cuda" (the GPU script runs
-k cuda); the one CPU test checks that the switch leaves the CPU path bit for bit alone.

Half precision follows helpers.py: ours may be off the float32 result by at most 2x torch's
own half error plus one ulp."""
import pytest
import torch

from helpers import HALF_DTYPES, assert_half_ok, dtype_id, half_atol, import_ck, needs_cuda, switched
from test_rnn_layers import (assert_runs_identical, compare, exact_float32, make_inputs, make_pair,  # noqa: F401
                             run)  # (exact_float32: an autouse fixture)

ck = import_ck("nn")
OPS = torch.ops.convrnn

# cuDNN sums in its own blocked order; ours in a fixed order of its own (see test_rnn_layers)
TOL32 = dict(rtol=5e-4, atol=5e-4)


def persistent_mode(on=True):
    """The persistent path on or off; .launches counts the persistent kernel launches."""
    return switched(OPS._persistent_rnn, on)


def stack_mode(on=True):
    """The stacked kernel (every layer of a unidirectional stack in one launch, inference) on or
    off; .launches counts its launches."""
    return switched(OPS._persistent_rnn_stack, on)


def packed_lengths(t, b, seed):
    """b lengths in [1, t], the longest t, in no particular order."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[int(torch.randint(0, b, (1,), generator=g))] = t
    return lengths.tolist()


def inputs_for(module, variant, dtype, t, b, seed=0):
    inputs = make_inputs(module, "no_hx" if variant == "no_hx" else "plain", dtype, "cuda", t=t, b=b, seed=seed)
    if variant == "packed":
        inputs["lengths"], inputs["sorted"] = packed_lengths(t, b, seed), False
    return inputs


NAMES = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
# (T, B, I, H): T = 1 and B = 1; the generation and training benchmark sizes; odd H (H * 4 bytes
# not a multiple of 16: the scalar staging path); B = 300 (the backward stages its operand in
# several chunks of batch rows).
SHAPES = {"T1_B1": (1, 1, 7, 16), "B1_H128": (9, 1, 65, 128), "B32_H256": (6, 32, 33, 256),
          "B3_H37": (5, 3, 5, 37), "B300_H64": (3, 300, 6, 64)}


@needs_cuda
@pytest.mark.parametrize("variant", ["plain", "packed", "no_hx"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", NAMES)
def test_cuda_persistent_matches_torch(name, shape, bidirectional, variant):
    t, b, i, h = SHAPES[shape]
    ours, theirs = make_pair(name, bidirectional=bidirectional, dtype=torch.float32, input_size=i, hidden=h,
                             device="cuda", scale=1.0)
    with persistent_mode() as mode:
        compare(ours, theirs, inputs_for(ours, variant, torch.float32, t, b), f"{name} {shape} {variant}", TOL32)
    assert mode.launches == 2 * (2 if bidirectional else 1), "the persistent kernels did not run"


@needs_cuda
@pytest.mark.parametrize("name", ["lstm", "gru"])
@pytest.mark.parametrize("case", ["training", "generation"])
def test_cuda_persistent_bench_shapes(name, case):
    """The issue's benchmark sequences: T50 B32 I128 H256 and T100 B1 I65 H128, 2 layers."""
    t, b, i, h = (50, 32, 128, 256) if case == "training" else (100, 1, 65, 128)
    ours, theirs = make_pair(name, num_layers=2, dtype=torch.float32, input_size=i, hidden=h, device="cuda",
                             scale=1.0)
    with persistent_mode() as mode:
        compare(ours, theirs, inputs_for(ours, "plain", torch.float32, t, b), f"{name} {case}", TOL32)
    assert mode.launches == 4, f"expected 2 layers x (forward + backward) persistent launches, got {mode.launches}"


@needs_cuda
@pytest.mark.parametrize("cluster", [0, 1, 2])
@pytest.mark.parametrize("variant", ["plain", "packed"])
@pytest.mark.parametrize("name", NAMES)
def test_cuda_persistent_cluster_modes(name, variant, cluster, monkeypatch):
    """CONVRNN_PERSISTENT_CLUSTER (read per call): 0 grid barrier only; 1 small grids as one
    thread-block cluster; 2 (the default) clusters exchanging through distributed shared memory.
    Batch 5, H 96 (small enough for a cluster on sm_90+), both directions, two layers: each mode
    against cuDNN, and the launches counted by the barrier they used (H200, 2026-11-26: mode 2
    ran its 4 forwards through shared memory and its 4 backwards as plain clusters)."""
    monkeypatch.setenv("CONVRNN_PERSISTENT_CLUSTER", str(cluster))
    ours, theirs = make_pair(name, num_layers=2, bidirectional=True, dtype=torch.float32, input_size=12, hidden=96,
                             device="cuda", scale=1.0)
    before = OPS._persistent_rnn_launches()
    with persistent_mode() as mode:
        compare(ours, theirs, inputs_for(ours, variant, torch.float32, 9, 5, seed=4), f"{name} cluster {cluster}",
                TOL32)
    used = [a - b for a, b in zip(OPS._persistent_rnn_launches(), before)]
    assert mode.launches == 8 and sum(used) == 8, used
    if cluster == 0 or torch.cuda.get_device_capability()[0] < 9:
        assert used == [8, 0, 0], used
    elif cluster == 1:
        assert used == [0, 8, 0], used
    else:  # the forwards exchange h through shared memory; the backwards' cells would each store
        # G (or 1) values into every block, which the plan model may rank below staging from L2
        assert used[0] == 0 and used[2] >= 4, used


@needs_cuda
@pytest.mark.parametrize("variant", ["plain", "packed"])
@pytest.mark.parametrize("name", NAMES)
def test_cuda_persistent_matches_step_loop(name, variant):
    """Persistent vs our own step loop (cuBLAS + the fused cells): the same formulas, other sums."""
    ours, _ = make_pair(name, num_layers=2, bidirectional=True, dtype=torch.float32, input_size=12, hidden=48,
                        device="cuda", scale=1.0)
    inputs = inputs_for(ours, variant, torch.float32, 7, 5, seed=3)
    with persistent_mode(False):
        outs, grads, gouts = run(ours, inputs)
    with persistent_mode() as mode:
        pouts, pgrads, _ = run(ours, inputs, gouts)
    assert mode.launches == 8
    for k in outs:
        if outs[k].is_floating_point():
            torch.testing.assert_close(pouts[k], outs[k], rtol=2e-5, atol=2e-5, msg=lambda m: f"{k}: {m}")
        else:
            assert torch.equal(pouts[k], outs[k])
    for k in grads:
        torch.testing.assert_close(pgrads[k], grads[k], rtol=2e-5, atol=2e-5, msg=lambda m: f"grad {k}: {m}")


@needs_cuda
@pytest.mark.parametrize("variant", ["plain", "packed"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", NAMES)
def test_cuda_persistent_half_types(name, dtype, variant):
    ours, theirs = make_pair(name, num_layers=2, bidirectional=True, dtype=dtype, input_size=24, hidden=64,
                             device="cuda", scale=1.0)
    _, ref32 = make_pair(name, num_layers=2, bidirectional=True, dtype=torch.float32, input_size=24, hidden=64,
                         device="cuda", scale=1.0)
    ref32.load_state_dict({k: v.float() for k, v in theirs.state_dict().items()})
    inputs = inputs_for(ours, variant, dtype, 8, 6, seed=1)
    with persistent_mode() as mode:
        outs, grads, gouts = run(ours, inputs)
    assert mode.launches == 8
    with persistent_mode(False):
        souts, sgrads, _ = run(ours, inputs, gouts)
    touts, tgrads, _ = run(theirs, inputs, gouts)
    inputs32 = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    routs, rgrads, _ = run(ref32, inputs32, {k: v.float() for k, v in gouts.items()})
    for k in ("output", "h_n", "c_n"):
        if k in outs:
            assert_half_ok_or_as_step_loop(outs[k], touts[k], souts[k], routs[k], f"{name} {k}")
    for k in grads:
        assert_half_ok_or_as_step_loop(grads[k], tgrads[k], sgrads[k], rgrads[k], f"{name} grad {k}")


def assert_half_ok_or_as_step_loop(ours, torch_half, step_loop, ref32, what):
    """The half-type rule against cuDNN, or, where our step loop misses it too, no larger an
    error than the step loop's plus one ulp.  Measured on an H200 (2026-11-26): float16 ReLU
    RNN, packed, grad x: the persistent path and the step loop both 2.71e-2 (the same element),
    cuDNN 9.1e-4, a difference of the two paths' shared ReLU backward from cuDNN's
    (benchmarks/NOTES-rnn-seq.md); everywhere else the persistent path met the rule."""
    try:
        assert_half_ok(ours, torch_half, ref32, what)
    except AssertionError:
        finite = ~ref32.isnan()
        err = (ours.float() - ref32.float())[finite].abs().max().item()
        err_loop = (step_loop.float() - ref32.float())[finite].abs().max().item()
        assert err <= err_loop + half_atol(ours.dtype, ref32[finite]), \
            f"{what}: error {err:.3g} misses the rule against cuDNN and exceeds the step loop's {err_loop:.3g}"


@needs_cuda
@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_tanh"])
def test_cuda_persistent_deterministic(name):
    ours, _ = make_pair(name, num_layers=2, bidirectional=True, dtype=torch.float32, input_size=16, hidden=96,
                        device="cuda", scale=1.0)
    inputs = inputs_for(ours, "packed", torch.float32, 9, 11)
    with persistent_mode():
        assert_runs_identical(ours, inputs)


@needs_cuda
@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_relu"])
def test_cuda_persistent_inference(name):
    """Under no_grad (need_backward=False: no workspace written) the same output and states."""
    ours, _ = make_pair(name, num_layers=2, dtype=torch.float32, input_size=10, hidden=40, device="cuda", scale=1.0)
    x = torch.randn(12, 4, 10, device="cuda")
    with persistent_mode() as mode, stack_mode(False):  # (the stacked kernel: test_cuda_stack_*)
        with torch.no_grad():
            lean = ours(x)
        full = ours(x)
    assert mode.launches == 4
    flat = lambda r: [r[0]] + (list(r[1]) if isinstance(r[1], tuple) else [r[1]])  # noqa: E731
    for a, b in zip(flat(lean), flat(full)):
        assert torch.equal(a, b.detach())


@needs_cuda
def test_cuda_persistent_declines_float64():
    """float64 is not instantiated: the step loop runs, and the results stay right."""
    ours, theirs = make_pair("lstm", dtype=torch.float64, device="cuda")
    with persistent_mode() as mode:
        compare(ours, theirs, make_inputs(ours, "plain", torch.float64, "cuda"), "lstm float64",
                dict(rtol=1e-10, atol=1e-11))
    assert mode.launches == 0


@needs_cuda
@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_tanh"])
def test_cuda_persistent_sanitizer_subset(name):
    """Small, so that gpu_check.sh's compute-sanitizer memcheck run covers the kernels
    (-k "cuda and sanitizer"): packed, bidirectional, odd H, forward and backward."""
    ours, theirs = make_pair(name, bidirectional=True, dtype=torch.float32, input_size=5, hidden=37, device="cuda",
                             scale=1.0)
    with persistent_mode() as mode:
        compare(ours, theirs, inputs_for(ours, "packed", torch.float32, 4, 3), f"{name} sanitizer", TOL32)
    assert mode.launches == 4


def test_persistent_switch_leaves_cpu_alone():
    """The switch is for CUDA only: on the CPU both settings give the same bits, and it answers
    what it was set to."""
    ours, _ = make_pair("lstm", num_layers=2, bidirectional=True, dtype=torch.float32)
    inputs = make_inputs(ours, "packed_unsorted", torch.float32)
    with persistent_mode(False):
        o1, g1, gouts = run(ours, inputs)
    with persistent_mode() as mode:
        assert OPS._persistent_rnn()[0] == 1
        o2, g2, _ = run(ours, inputs, gouts)
    assert mode.launches == 0
    for k in o1:
        assert torch.equal(o1[k], o2[k])
    for k in g1:
        assert torch.equal(g1[k], g2[k])
    with pytest.raises(RuntimeError, match=r"convrnn\._persistent_rnn: mode"):
        OPS._persistent_rnn(2)


# ---- the kernels emulated on the CPU (no GPU needed) ----------------------------------------------
#
# tests/native/rnn_persistent_emulation.cpp runs csrc/cuda/rnn_persistent.cuh, the source nvcc
# compiles, with a CPU thread per CUDA thread, under explicit plans (units per block, batch rows
# per chunk) chosen to reach every code path: a ragged last block, several chunks, k split over
# warps, H * sizeof(T) a multiple of 16 bytes or not (vector or scalar staging), packed input in
# both directions.  Reference: our CPU layer ops, on the same x_proj and saved tensors.

EMU_CELLS = {"lstm": (0, "lstm_layer"), "gru": (1, "gru_layer"), "rnn_tanh": (2, "rnn_layer"),
             "rnn_relu": (3, "rnn_layer")}
# id: (H, units, chunk): 4 blocks the last with 1 unit, 2 chunks of 8 rows (k split 2 ways
# forward, 8 ways backward); one block, one chunk; 3 blocks of 4 units, chunks of 5 rows
EMU_PLANS = {"ragged": (10, 3, 8), "one_block": (10, 10, 16), "vec": (12, 4, 5),
             # one chunk holds the batch (the exchange through peers' shared memory needs it)
             "ragged_one_chunk": (10, 3, 16), "vec_one_chunk": (12, 4, 11)}
EMU_T, EMU_B = 4, 11
EMU_LENGTHS = [4, 4, 3, 3, 2, 2, 2, 1, 1, 1, 1]


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    import shutil
    import os
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    from torch.utils.cpp_extension import load
    from helpers import ROOT
    return load("convrnn_persistent_emulation", [os.path.join(ROOT, "tests", "native", "rnn_persistent_emulation.cpp")],
                extra_include_paths=[os.path.join(ROOT, "csrc")], extra_cflags=["-O1"],
                build_directory=str(tmp_path_factory.mktemp("emulation")), verbose=False)


def _emu_layer(name, h, dtype, packed, reverse, grad_out=True, seed=0, b=EMU_B):
    """Inputs of a layer op and our CPU op's forward and backward results on them (packed: the
    EMU_LENGTHS batch; else b rows every step)."""
    cell, op = EMU_CELLS[name]
    g = {0: 4, 1: 3}.get(cell, 1)
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(dtype)  # noqa: E731
    bs = torch.tensor([sum(1 for n in EMU_LENGTHS if n > t) for t in range(EMU_T)]) if packed else None
    b = EMU_B if packed else b
    n = int(bs.sum()) if packed else EMU_T * b
    a = {"x": rnd(n, g * h) if packed else rnd(EMU_T, b, g * h), "h0": rnd(b, h, scale=0.8),
         "c0": rnd(b, h) if cell == 0 else None, "w": rnd(g * h, h, scale=0.4), "bi": rnd(g * h), "bh": rnd(g * h),
         "bs": bs}
    fwd = getattr(OPS, op)
    if cell == 0:
        res = fwd(a["x"], a["h0"], a["c0"], a["w"], a["bi"], a["bh"], None, bs, reverse, True)
    elif cell == 1:
        res = fwd(a["x"], a["h0"], a["w"], a["bi"], a["bh"], bs, reverse, True)
    else:
        res = fwd(a["x"], a["h0"], a["w"], a["bi"], a["bh"], bs, reverse, cell == 3)
    a["out"] = res[0].reshape(n, h)
    a["gout"] = rnd(n, h) if grad_out else None
    a["ghn"], a["gcn"] = rnd(b, h), (rnd(b, h) if cell == 0 else None)
    gout = None if a["gout"] is None else a["gout"].reshape(res[0].shape)
    bwd = getattr(OPS, op + "_backward")
    if cell == 0:
        a["cs"], a["ws"] = res[3], res[4]
        grads = bwd(gout, a["ghn"], a["gcn"], a["h0"], a["c0"], a["w"], None, res[0], res[3], res[4], res[5], bs,
                    reverse)
    elif cell == 1:
        a["cs"], a["ws"] = None, res[2]
        grads = bwd(gout, a["ghn"], a["h0"], a["w"], res[0], res[2], bs, reverse)
    else:
        a["cs"], a["ws"] = None, None
        grads = bwd(gout, a["ghn"], a["h0"], a["w"], res[0], bs, reverse, cell == 3)
    return a, res, grads


# (layout, plan, sync): every layout under the richest plan, a few under the others (each case
# runs ~1000 threads through the step barrier: seconds).  sync: 0 grid barrier, 1 the grid as one
# cluster (its barrier, staging from L2), 2 the cluster exchanging the operand through its
# blocks' shared memory (the emulation maps a peer's shared memory; the barrier is the grid's).
EMU_CASES = [(layout, "ragged", 0) for layout in ("plain", "packed", "packed_reverse", "plain_reverse")] + [
    ("packed_reverse", "one_block", 0), ("plain", "vec", 0), ("packed", "vec", 0), ("packed_reverse", "ragged", 1)] + [
    (layout, "ragged_one_chunk", 2) for layout in ("plain", "packed", "packed_reverse")] + [
    ("plain_reverse", "vec_one_chunk", 2)]


@pytest.mark.parametrize("layout,plan,sync", EMU_CASES, ids=[f"{la}-{pl}-sync{sy}" for la, pl, sy in EMU_CASES])
@pytest.mark.parametrize("name", list(EMU_CELLS))
def test_emulated_kernels_match_cpu_ops(emulation, name, layout, plan, sync):
    h, units, chunk = EMU_PLANS[plan]
    cell = EMU_CELLS[name][0]
    packed, reverse = layout.startswith("packed"), layout.endswith("reverse")
    a, res, grads = _emu_layer(name, h, torch.float32, packed, reverse, grad_out=plan != "one_block")
    x = a["x"].reshape(-1, a["x"].shape[-1])
    out, cs, ws = emulation.forward(cell, x, a["h0"], a["c0"], a["w"], a["bi"], a["bh"], a["bs"], EMU_B, reverse,
                                    True, units, chunk, sync)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, a["out"], **tol, msg=lambda m: f"out: {m}")
    if cell == 0:
        torch.testing.assert_close(cs, res[3], **tol, msg=lambda m: f"cs: {m}")
    if cell <= 1:
        torch.testing.assert_close(ws, res[-1] if cell == 1 else res[4], **tol, msg=lambda m: f"workspace: {m}")
    g_hidden, g_input, dh, dc = emulation.backward(cell, a["gout"], a["out"], a["cs"], a["ws"], a["h0"], a["c0"],
                                                   a["w"], a["ghn"], a["gcn"], a["bs"], EMU_B, reverse, units, chunk,
                                                   sync)
    gx = grads[0].reshape(-1, grads[0].shape[-1])
    torch.testing.assert_close(g_input if cell == 1 else g_hidden, gx, **tol, msg=lambda m: f"grad x_proj: {m}")
    torch.testing.assert_close(dh, grads[1], **tol, msg=lambda m: f"grad h0: {m}")
    if cell == 0:
        torch.testing.assert_close(dc, grads[2], **tol, msg=lambda m: f"grad c0: {m}")
    if cell == 1:
        torch.testing.assert_close(g_hidden.sum(0), grads[4], **tol, msg=lambda m: f"grad b_hh: {m}")


@pytest.mark.parametrize("sync", [0, 2])
@pytest.mark.parametrize("h,units", [(10, 3), (12, 4)], ids=["ragged", "vec"])
@pytest.mark.parametrize("name", list(EMU_CELLS))
def test_emulated_kernels_batch1(emulation, name, h, units, sync):
    """Batch 1 (generation): the products take the one-row path (row_products)."""
    cell = EMU_CELLS[name][0]
    a, res, grads = _emu_layer(name, h, torch.float32, False, False, b=1, seed=5)
    x = a["x"].reshape(-1, a["x"].shape[-1])
    out, cs, _ = emulation.forward(cell, x, a["h0"], a["c0"], a["w"], a["bi"], a["bh"], None, 1, False, True, units, 1,
                                   sync)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, a["out"], **tol, msg=lambda m: f"out: {m}")
    if cell == 0:
        torch.testing.assert_close(cs, res[3], **tol, msg=lambda m: f"cs: {m}")
    g_hidden, g_input, dh, dc = emulation.backward(cell, a["gout"], a["out"], a["cs"], a["ws"], a["h0"], a["c0"],
                                                   a["w"], a["ghn"], a["gcn"], None, 1, False, units, 1, sync)
    gx = grads[0].reshape(-1, grads[0].shape[-1])
    torch.testing.assert_close(g_input if cell == 1 else g_hidden, gx, **tol, msg=lambda m: f"grad x_proj: {m}")
    torch.testing.assert_close(dh, grads[1], **tol, msg=lambda m: f"grad h0: {m}")
    if cell == 0:
        torch.testing.assert_close(dc, grads[2], **tol, msg=lambda m: f"grad c0: {m}")


@pytest.mark.parametrize("sync", [0, 2])
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_emulated_kernels_bfloat16(emulation, name, sync):
    """2-byte elements (H = 16: vector staging) against our float32 CPU ops on the same values."""
    cell = EMU_CELLS[name][0]
    chunk = 8 if sync == 0 else 16
    a, res, grads = _emu_layer(name, 16, torch.float32, True, True)
    bf = {k: (v.bfloat16() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in a.items()}
    x = bf["x"].reshape(-1, bf["x"].shape[-1])
    out, _, _ = emulation.forward(cell, x, bf["h0"], bf["c0"], bf["w"], bf["bi"], bf["bh"], bf["bs"], EMU_B, True,
                                  True, 4, chunk, sync)
    tol = dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(out.float(), a["out"], **tol)
    g_hidden, g_input, dh, _ = emulation.backward(cell, bf["gout"], bf["out"], bf["cs"], bf["ws"], bf["h0"], bf["c0"],
                                                  bf["w"], bf["ghn"], bf["gcn"], bf["bs"], EMU_B, True, 4, chunk, sync)
    torch.testing.assert_close((g_input if cell == 1 else g_hidden).float(), grads[0].reshape(g_hidden.shape[0], -1),
                               **tol)
    torch.testing.assert_close(dh.float(), grads[1], **tol)


H100_SMEM_OPTIN = 232448  # bytes of shared memory a block may opt in to on H100/H200


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("case", ["training", "generation", "big_batch"])
def test_plan_candidates(emulation, case, direction):
    """The host's plan model on the benchmark shapes (LSTM, float32): every candidate fits in
    shared memory, stages 8-row multiples (or the whole batch), and the fastest modelled is the
    one benchmarks/NOTES-rnn-seq.md predicts from."""
    b, h = {"training": (32, 256), "generation": (1, 128), "big_batch": (300, 512)}[case]
    rows_per_unit, k = (4, h) if direction == "forward" else (1, 4 * h)
    plans = emulation.plan_candidates(rows_per_unit, k, b, h, 4, H100_SMEM_OPTIN)
    assert plans
    for units, blocks, chunk, smem, _, sync in plans:
        assert blocks == -(-h // units) and smem <= H100_SMEM_OPTIN and sync == 0
        assert chunk == b if b < 8 else (chunk % 8 == 0 and 8 <= chunk <= -(-b // 8) * 8)
    assert [p[4] for p in plans] == sorted(p[4] for p in plans)
    expected = {("training", "forward"): 4, ("training", "backward"): 8, ("generation", "forward"): 4,
                ("generation", "backward"): 4}
    if (case, direction) in expected:
        assert plans[0][0] == expected[case, direction], plans[:3]


@pytest.mark.parametrize("dsmem", [True, False])
@pytest.mark.parametrize("case", ["training", "generation"])
def test_plan_candidates_cluster(emulation, case, dsmem):
    """With clusters of up to 16 blocks allowed (sm_90+), the model offers each grid that small as
    one cluster too, and with the operand in peers' shared memory only where one chunk holds the
    whole batch twice over; generation (batch 1, H = 128) then runs as a cluster (the forward
    exchanging h through shared memory, the backward staging from L2), training
    (batch 32, H = 256: 16 blocks would do 4x the products each) keeps the grid plan."""
    b, h = {"training": (32, 256), "generation": (1, 128)}[case]
    for rows_per_unit, k in ((4, h), (1, 4 * h)):
        plans = emulation.plan_candidates(rows_per_unit, k, b, h, 4, H100_SMEM_OPTIN, 16, dsmem)
        grid = emulation.plan_candidates(rows_per_unit, k, b, h, 4, H100_SMEM_OPTIN)
        assert [p for p in plans if p[5] == 0] == grid
        for units, blocks, chunk, smem, _, sync in plans:
            assert sync == 0 or blocks <= 16
            assert sync != 2 or (dsmem and chunk >= b and smem <= H100_SMEM_OPTIN)
        if case == "generation":  # forward through distributed shared memory; the backward's cells
            # would each store 4 values into 16 blocks: staging from L2 measured faster (H200)
            assert plans[0][5] == (2 if dsmem and rows_per_unit == 4 else 1) and plans[0][1] <= 16, plans[:3]
        else:
            assert plans[0] == grid[0], plans[:3]


# ---- the stacked forward (every layer of a unidirectional stack in one kernel, inference) ----

MODULES = {"lstm": ("LSTM", {}), "gru": ("GRU", {}), "rnn_tanh": ("RNN", {"nonlinearity": "tanh"}),
           "rnn_relu": ("RNN", {"nonlinearity": "relu"})}


def _stack_inputs(name, layers, h, b, t=5, i=7, bias=True, seed=0):
    """torch.nn's module on the CPU (float32), an input, states, and the stacked kernel's
    arguments: layer 0's input projection and every layer's weights."""
    kind, kw = MODULES[name]
    torch.manual_seed(seed)
    module = getattr(torch.nn, kind)(i, h, num_layers=layers, bias=bias, **kw).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(2.0)  # out of the linear range of the activations
    x = torch.randn(t, b, i)
    h0 = torch.randn(layers, b, h) * 0.8
    c0 = torch.randn(layers, b, h) if kind == "LSTM" else None
    get = lambda n: getattr(module, n, None)  # noqa: E731
    w = {"x": torch.nn.functional.linear(x, module.weight_ih_l0).reshape(t * b, -1).detach(),
         "w_ih": [get(f"weight_ih_l{l}").detach() for l in range(1, layers)],
         "w_hh": [get(f"weight_hh_l{l}").detach() for l in range(layers)],
         "b_ih": [get(f"bias_ih_l{l}").detach() if bias else None for l in range(layers)],
         "b_hh": [get(f"bias_hh_l{l}").detach() if bias else None for l in range(layers)]}
    with torch.no_grad():
        ref = module(x, (h0, c0) if c0 is not None else h0)
    return module, x, h0, c0, w, ref


# (layers, H, B, units per layer, bias): ragged blocks of unequal units, batch 1 (the one-row
# products), three layers, a batch that needs the tile products, no biases
STACK_CASES = {"2l_ragged": (2, 10, 3, [3, 2], True), "2l_b1": (2, 12, 1, [4, 2], True),
               "3l": (3, 8, 2, [4, 4, 8], True), "2l_b9_nobias": (2, 6, 9, [2, 3], False)}


@pytest.mark.parametrize("case", list(STACK_CASES))
@pytest.mark.parametrize("name", list(EMU_CELLS))
def test_emulated_stack_matches_torch(emulation, name, case):
    layers, h, b, units, bias = STACK_CASES[case]
    cell = EMU_CELLS[name][0]
    _, _, h0, c0, w, ref = _stack_inputs(name, layers, h, b, bias=bias)
    out, hn, cn = emulation.stack_forward(cell, w["x"], h0, c0, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], b, units)
    tol = dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out, ref[0].reshape(-1, h), **tol, msg=lambda m: f"output: {m}")
    h_ref = ref[1][0] if cell == 0 else ref[1]
    torch.testing.assert_close(hn, h_ref, **tol, msg=lambda m: f"h_n: {m}")
    if cell == 0:
        torch.testing.assert_close(cn, ref[1][1], **tol, msg=lambda m: f"c_n: {m}")


def test_emulated_stack_bfloat16(emulation):
    """2-byte elements: the stacked LSTM in bfloat16 against torch's float32 module."""
    _, _, h0, c0, w, ref = _stack_inputs("lstm", 2, 16, 2)
    bf = lambda v: [t.bfloat16() if t is not None else None for t in v]  # noqa: E731
    out, hn, cn = emulation.stack_forward(0, w["x"].bfloat16(), h0.bfloat16(), c0.bfloat16(), bf(w["w_ih"]),
                                          bf(w["w_hh"]), bf(w["b_ih"]), bf(w["b_hh"]), 2, [8, 4])
    tol = dict(rtol=4e-2, atol=4e-2)
    torch.testing.assert_close(out.float(), ref[0].reshape(-1, 16), **tol)
    torch.testing.assert_close(cn.float(), ref[1][1], **tol)


@pytest.mark.parametrize("case", ["generation", "h256", "b8"])
def test_stack_plans(emulation, case):
    """The stacked plans: at most 16 blocks, within shared memory, fastest modelled first; the
    generation shape (2 layers, batch 1, H 128, LSTM float32) gets 4 layer-0 blocks of 32 units
    and 8 layer-1 blocks of 16 (equal products a block); H 256 in float32 does not fit."""
    layers, b, h, elem = {"generation": (2, 1, 128, 4), "h256": (2, 1, 256, 4), "b8": (3, 8, 64, 2)}[case]
    plans = emulation.stack_plans(layers, b, h, 4, elem, H100_SMEM_OPTIN)
    for units, blocks, smem, _ in plans:
        assert len(units) == layers and blocks == sum(-(-h // u) for u in units) <= 16 and smem <= H100_SMEM_OPTIN
    assert [p[3] for p in plans] == sorted(p[3] for p in plans)
    if case == "generation":
        assert plans[0][:2] == ([32, 16], 12), plans[:3]
    elif case == "h256":
        assert plans == []
    else:
        assert plans


# ---- the stacked kernel on the GPU (inference: every layer in one launch, sm_90+) ----

def _stack_runs():
    """Whether the stacked kernel can run here (one thread-block cluster: sm_90+)."""
    return torch.cuda.get_device_capability()[0] >= 9


# (T, B, I, H, layers): the generation benchmark; three layers, odd batch; ragged blocks (H 37);
# batch 8 (the tile products)
STACK_SHAPES = {"generation": (100, 1, 65, 128, 2), "L3_B5_H96": (9, 5, 12, 96, 3), "B3_H37": (6, 3, 5, 37, 2),
                "B8_H64": (7, 8, 16, 64, 2)}


@needs_cuda
@pytest.mark.parametrize("shape", list(STACK_SHAPES))
@pytest.mark.parametrize("name", NAMES)
def test_cuda_stack_matches_torch(name, shape):
    """Under no_grad a unidirectional stack runs as ONE stacked launch: against cuDNN, and
    against our layer-by-layer path (the same formulas, other sums)."""
    t, b, i, h, layers = STACK_SHAPES[shape]
    ours, theirs = make_pair(name, num_layers=layers, dtype=torch.float32, input_size=i, hidden=h, device="cuda",
                             scale=1.0)
    inputs = inputs_for(ours, "plain", torch.float32, t, b, seed=2)
    hx = (inputs["h"], inputs["c"]) if name == "lstm" else inputs["h"]
    with torch.no_grad():
        with persistent_mode(), stack_mode() as stacked:
            got = ours(inputs["x"], hx)
        with persistent_mode(), stack_mode(False) as off:
            layered = ours(inputs["x"], hx)
        want = theirs(inputs["x"], hx)
    assert stacked.launches == (1 if _stack_runs() else 0) and off.launches == 0
    flat = lambda r: [r[0]] + (list(r[1]) if isinstance(r[1], tuple) else [r[1]])  # noqa: E731
    for what, a, b_, c in zip(("output", "h_n", "c_n"), flat(got), flat(want), flat(layered)):
        torch.testing.assert_close(a, b_, **TOL32, msg=lambda m: f"{name} {shape} {what} vs cuDNN: {m}")
        torch.testing.assert_close(a, c, rtol=2e-5, atol=2e-5, msg=lambda m: f"{name} {shape} {what} vs layers: {m}")


@needs_cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_tanh"])
def test_cuda_stack_half_types(name, dtype):
    t, b, i, h, layers = STACK_SHAPES["L3_B5_H96"]
    ours, theirs = make_pair(name, num_layers=layers, dtype=dtype, input_size=i, hidden=h, device="cuda", scale=1.0)
    _, ref32 = make_pair(name, num_layers=layers, dtype=torch.float32, input_size=i, hidden=h, device="cuda",
                         scale=1.0)
    ref32.load_state_dict({k: v.float() for k, v in theirs.state_dict().items()})
    inputs = inputs_for(ours, "plain", dtype, t, b, seed=3)
    hx = (inputs["h"], inputs["c"]) if name == "lstm" else inputs["h"]
    hx32 = tuple(v.float() for v in hx) if name == "lstm" else hx.float()
    with torch.no_grad():
        with persistent_mode(), stack_mode() as stacked:
            got = ours(inputs["x"], hx)
        with persistent_mode(), stack_mode(False):
            layered = ours(inputs["x"], hx)
        want, ref = theirs(inputs["x"], hx), ref32(inputs["x"].float(), hx32)
    assert stacked.launches == (1 if _stack_runs() else 0)
    flat = lambda r: [r[0]] + (list(r[1]) if isinstance(r[1], tuple) else [r[1]])  # noqa: E731
    for what, a, w, lay, r in zip(("output", "h_n", "c_n"), flat(got), flat(want), flat(layered), flat(ref)):
        assert_half_ok_or_as_step_loop(a, w, lay, r, f"{name} {what}")


@needs_cuda
def test_cuda_stack_declines_what_it_cannot_hold():
    """H 512 in float32 (no plan of <= 16 blocks holds the weights), float64, bidirectional and
    batches over 8 (kStackMaxBatch) run layer by layer: no stacked launch, the results still torch's."""
    for kwargs, dtype, b in ((dict(hidden=512), torch.float32, 2), (dict(hidden=16), torch.float64, 2),
                             (dict(hidden=16, bidirectional=True), torch.float32, 2),
                             (dict(hidden=16), torch.float32, 9), (dict(hidden=16), torch.float32, 4096)):
        ours, theirs = make_pair("lstm", num_layers=2, dtype=dtype, input_size=8, device="cuda", scale=1.0, **kwargs)
        inputs = inputs_for(ours, "plain", dtype, 3, b, seed=1)
        with torch.no_grad(), stack_mode() as stacked:
            got = ours(inputs["x"], (inputs["h"], inputs["c"]))
            want = theirs(inputs["x"], (inputs["h"], inputs["c"]))
        assert stacked.launches == 0, kwargs
        torch.testing.assert_close(got[0], want[0], **(TOL32 if dtype == torch.float32 else {}))


@needs_cuda
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_cuda_stack_deterministic(name):
    t, b, i, h, layers = STACK_SHAPES["L3_B5_H96"]
    ours, _ = make_pair(name, num_layers=layers, dtype=torch.float32, input_size=i, hidden=h, device="cuda", scale=1.0)
    x = torch.randn(t, b, i, device="cuda")
    with torch.no_grad(), stack_mode():
        first = ours(x)
        for _ in range(3):
            again = ours(x)
            assert torch.equal(again[0], first[0])


@needs_cuda
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_cuda_stack_sanitizer_subset(name):
    """Small, for gpu_check.sh's compute-sanitizer run (-k "cuda and sanitizer"): the stacked
    kernel with ragged blocks, three layers."""
    ours, theirs = make_pair(name, num_layers=3, dtype=torch.float32, input_size=5, hidden=37, device="cuda",
                             scale=1.0)
    x = torch.randn(4, 3, 5, device="cuda")
    with torch.no_grad(), stack_mode() as stacked:
        got, want = ours(x), theirs(x)
    assert stacked.launches == (1 if _stack_runs() else 0)
    torch.testing.assert_close(got[0], want[0], **TOL32)


@needs_cuda
@pytest.mark.parametrize("variant", ["batch_first", "unbatched", "no_hx", "eval_dropout"])
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_cuda_stack_module_variants(name, variant):
    """The module's own reshaping around the stack: batch_first, unbatched input, no hx, and
    dropout in eval mode (not applied, so the stack serves it)."""
    ours, theirs = make_pair(name, num_layers=2, dtype=torch.float32, input_size=9, hidden=48, device="cuda",
                             scale=1.0, batch_first=variant == "batch_first",
                             dropout=0.3 if variant == "eval_dropout" else 0.0)
    ours.eval(), theirs.eval()
    inputs = make_inputs(ours, {"unbatched": "unbatched", "no_hx": "no_hx"}.get(variant, "plain"), torch.float32,
                         "cuda", t=6, b=3, seed=6)
    hx = None
    if "h" in inputs:
        hx = (inputs["h"], inputs["c"]) if name == "lstm" else inputs["h"]
    with torch.no_grad(), stack_mode() as stacked:
        got, want = ours(inputs["x"], hx), theirs(inputs["x"], hx)
    assert stacked.launches == (1 if _stack_runs() else 0)
    torch.testing.assert_close(got[0], want[0], **TOL32)
    for a, b in zip(got[1] if name == "lstm" else [got[1]], want[1] if name == "lstm" else [want[1]]):
        torch.testing.assert_close(a, b, **TOL32)
