import os
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
GOLDEN_DIR = ROOT.parent / "shared" / "golden"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def golden_dir():
    """The reference's golden outputs (../shared/golden), or a clean skip."""
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden data not found at {GOLDEN_DIR} (only present beside the dev checkout)")
    return GOLDEN_DIR
