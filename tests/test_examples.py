"""The worked examples in examples/ train and reach their results: each test imports an
example and calls its main(argv), on CUDA when present (as the examples do).

Thresholds (measured on CPU with one thread, seeds 0-7; examples/README.md has the runs):
  lenet5_digits  the full run (30 epochs, about 10 s): test accuracy >= 95%; seeds 0-5 gave
                 97.1-98.4%.
  char_lstm      --short (200 steps): "hell" -> "ello" exactly; the loss over the text falls
                 from about 4.1 nats/char (uniform over 61 characters) to below 2.6, under the
                 3.14 that the text's character frequencies alone give; seeds 0-4 gave 2.11-2.18.
  captioning     --short (8 epochs): held-out exact-match accuracy >= 60% (chance: 1 in 264);
                 seeds 0-7 gave 79.6-98.6%.
"""
import importlib.util
import os
import sys

import pytest
import torch

from helpers import ROOT, import_ck

import_ck()
EXAMPLES = os.path.join(ROOT, "examples")


def run_example(name, argv):
    """Import examples/<name>.py and run its main(argv); torch's thread count is restored."""
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)  # the examples import their _common.py
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        return module.main(argv)
    finally:
        torch.set_num_threads(threads)


def test_lenet5_digits_reaches_95_percent():
    pytest.importorskip("sklearn")
    result = run_example("lenet5_digits", [])
    assert result["test_accuracy"] >= 0.95


def test_char_lstm_learns_hello_and_the_text():
    result = run_example("char_lstm", ["--short"])
    assert result["hello_predicted"] == "ello"
    assert result["hello_spelled"] == "hello"
    assert result["start_loss"] > 3.9
    assert result["end_loss"] < 2.6
    assert result["sample"].startswith("Alice ") and len(result["sample"]) == 306


def test_captioning_short_run_captions_held_out_images():
    result = run_example("captioning", ["--short"])
    assert result["exact_match"] >= 0.6
