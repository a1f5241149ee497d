# python benchmarks/rnn_seq_ab.py [rounds]: the sequence cases of convrnn_kernels/bench/rnn.py as
# an interleaved A/B (PYTHONPATH=<repo>), for a shared machine where the bench harness rows drift.
# Interleaved A/B timing: per round one call of ours and one of torch (order alternating); reports
# median ms of each and the median of per-round ratios (robust to load drift on a shared machine).
import statistics, sys, time, torch, convrnn_kernels as ck
torch.manual_seed(0)
def case(kind, t, b, i, h, train):
    tm = getattr(torch.nn, kind)(i, h, num_layers=2); om = getattr(ck.nn, kind)(i, h, num_layers=2); om.load_state_dict(tm.state_dict())
    x = torch.randn(t, b, i, requires_grad=train)
    def mk(m):
        if train:
            def f():
                out, _ = m(x); out.backward(torch.ones_like(out))
        else:
            def f():
                with torch.no_grad(): m(x)
        return f
    return mk(om), mk(tm)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 30
for label, args in [("lstm training T50 B32 fwd+bwd", ("LSTM", 50, 32, 128, 256, True)),
                    ("lstm generation T100 B1 fwd", ("LSTM", 100, 1, 65, 128, False)),
                    ("lstm training T50 B32 fwd", ("LSTM", 50, 32, 128, 256, False)),
                    ("gru training T50 B32 fwd+bwd", ("GRU", 50, 32, 128, 256, True)),
                    ("gru generation T100 B1 fwd", ("GRU", 100, 1, 65, 128, False))]:
    o, t = case(*args)
    for f in (o, t, o, t): f()
    to, tt, r = [], [], []
    for k in range(rounds):
        pair = [(o, to), (t, tt)] if k % 2 == 0 else [(t, tt), (o, to)]
        for f, acc in pair:
            t0 = time.perf_counter(); f(); acc.append((time.perf_counter() - t0) * 1e3)
        r.append(tt[-1] / to[-1])
    print(f"{label:32s} ours {statistics.median(to):8.3f} ms  torch {statistics.median(tt):8.3f} ms  speed-up {statistics.median(r):.2f}x (ratio median; min-based {min(tt)/min(to):.2f}x)", flush=True)
