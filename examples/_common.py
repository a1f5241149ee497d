"""What every example does before it trains: parse the command line (--short, --seed,
--threads, --device plus the example's own options), pick the device, seed the RNGs and
set the number of CPU threads."""
import argparse
import os
import random
import time

import numpy as np
import torch


def parser(description):
    """An ArgumentParser with the options every example takes; add yours, then call setup()."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--short", action="store_true", help="a small training budget (what the tests run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=default_threads(),
                   help="CPU threads for torch (default: the cores this process may use, at most 4)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def default_threads():
    # These models are small: past a few threads the CPU kernels' work per thread gets too
    # thin to pay for the synchronisation, and on a shared machine more threads only compete.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, cores or 1))


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
