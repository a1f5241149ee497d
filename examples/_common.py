"""What every example does before it trains: parse the command line (--short, --seed,
--threads, --device plus the example's own options), pick the device, seed the RNGs and
set the number of CPU threads."""
import argparse
import random
import time

import numpy as np
import torch

# One CPU thread by default.  These models are small: each op has too little work to split
# over threads (the LSTMs run two small ops per time step), and on the busy, shared 2-core
# machine they were measured on, a second OpenMP thread waiting for a core made training 4-8
# times slower (--short runs, one thread / two: char_lstm 25-49 s / 202-210 s, lenet5_digits
# 9.5 s / 78 s; the same results either way).  On a quiet machine with more cores, try --threads.
THREADS = 1


def parser(description):
    """An ArgumentParser with the options every example takes; add yours, then call setup()."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--short", action="store_true", help="a small training budget (what the tests run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=THREADS,
                   help="CPU threads for torch (default 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def setup(args):
    """Seed Python's, NumPy's and torch's RNGs and set torch's CPU threads; returns the device."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)  # seeds the CUDA generators too
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, {args.threads} CPU thread(s), seed {args.seed}" + (", short run" if args.short else ""))
    return device


class Timer:
    """Seconds since construction, for the progress lines."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self):
        return time.perf_counter() - self.start
