import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
GOLDEN_DIR = ROOT.parent / "shared" / "golden"

# One thread: subprocess tests (two ranks, workers) run beside the in-process ones.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def golden_dir():
    """The reference's golden outputs (../shared/golden), or a clean skip."""
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden data not found at {GOLDEN_DIR} (only present beside the dev checkout)")
    return GOLDEN_DIR
