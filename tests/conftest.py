import os
import pathlib

import pytest
import torch
from _train_helpers import TINY_MODEL, run_script, write_images

ROOT = pathlib.Path(__file__).resolve().parent.parent
GOLDEN_DIR = ROOT.parent / "shared" / "golden"

# One thread: the scripts the tests run in this process, and the real launches (two ranks, data workers) that run
# beside them.
torch.set_num_threads(1)

# No test downloads the FID Inception weights (every script the tests start or run inherits this); the tests of
# the download serve a file of their own over http://127.0.0.1 and clear the variable themselves.
os.environ["IMPROVED_DIFFUSION_OFFLINE"] = "1"

# The files that keep a worker busy longest (CPU-seconds: 80 to 15, the real launches of ranks and the cold
# torch.compile of test_e2e.py the largest part), longest first: with --no-loadscope-reorder (make test),
# pytest-xdist hands out files in collection order, so the short ones come last and no worker is left alone with
# a long one.
LONGEST_FIRST = ("test_e2e.py", "test_train_distributed.py", "test_benchmarks_digits.py", "test_train_eval.py",
                 "test_objective_scripts.py", "test_restoration_posterior.py", "test_samplers.py", "test_image_eval.py", "test_checkpoint_saving.py", "test_train_scripts.py",
                 "test_dist_util.py", "test_classifier_sample.py", "test_benchmarks.py", "test_image_datasets.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST
               else len(LONGEST_FIRST))


@pytest.fixture(scope="session")
def golden_dir():
    """The reference's golden outputs (../shared/golden), or a clean skip."""
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden data not found at {GOLDEN_DIR} (only present beside the dev checkout)")
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory):
    """Eight random 8x8 RGB PNGs (_train_helpers.write_images)."""
    return write_images(tmp_path_factory.mktemp("tiny_images"), 8)


@pytest.fixture(scope="session")
def tiny_run(tiny_images, tmp_path_factory):
    """
    image_train.py for 4 steps of TINY_MODEL on tiny_images (batches of 2,
    logs and checkpoint sets at steps 2 and 4), trained once per test
    process for every file that reads it: (log dir, status, stdout, stderr).
    """
    log_dir = tmp_path_factory.mktemp("tiny_run")
    flags = dict(TINY_MODEL, data_dir=tiny_images, batch_size=2, log_interval=2, save_interval=2, max_steps=4)
    return (log_dir, *run_script("image_train.py", flags, log_dir))
