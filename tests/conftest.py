import os
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
GOLDEN_DIR = ROOT.parent / "shared" / "golden"

# One thread: subprocess tests (two ranks, workers) run beside the in-process ones.
torch.set_num_threads(1)

# No test downloads the FID Inception weights (every script the tests start inherits this); the tests of the
# download serve a file of their own over http://127.0.0.1 and clear the variable themselves.
os.environ["IMPROVED_DIFFUSION_OFFLINE"] = "1"

# The files that keep a worker busy longest (30 s to 2 min each with AVX2 kernels), longest first: pytest-xdist
# hands out files in collection order, so the short ones come last and no worker is left alone with a long one.
LONGEST_FIRST = ("test_e2e.py", "test_benchmarks_digits.py", "test_samplers.py", "test_benchmarks.py",
                 "test_train_eval.py", "test_classifier_sample.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST
               else len(LONGEST_FIRST))


@pytest.fixture(scope="session")
def golden_dir():
    """The reference's golden outputs (../shared/golden), or a clean skip."""
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden data not found at {GOLDEN_DIR} (only present beside the dev checkout)")
    return GOLDEN_DIR
