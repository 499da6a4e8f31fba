"""How long a run lasts and what its steps are called: lr_anneal_steps, max_steps, checkpoint numbering, log keys."""

import csv

import pytest
from _train_helpers import SyntheticData, make_loop, train_env  # noqa: F401 (fixture)

from improved_diffusion.io_util import load_checkpoint

pytestmark = pytest.mark.usefixtures("train_env")


def lr_of_last_step(log_dir, step):
    return load_checkpoint(log_dir / f"opt{step:06d}.pt")["param_groups"][0]["lr"]


def test_lr_anneal_steps_decays_linearly_and_ends_the_run(tmp_path):
    loop = make_loop(tmp_path, lr=1e-3, lr_anneal_steps=4)
    loop.run_loop()
    assert loop.step == 4
    assert abs(lr_of_last_step(tmp_path, 4) - 1e-3 * (1 - 3 / 4)) < 1e-15


def test_max_steps_ends_the_run_without_touching_the_schedule(tmp_path):
    loop = make_loop(tmp_path, lr=1e-3, lr_anneal_steps=10, max_steps=3)
    loop.run_loop()
    assert loop.step == 3
    assert abs(lr_of_last_step(tmp_path, 3) - 1e-3 * (1 - 2 / 10)) < 1e-15


def test_checkpoint_numbers_count_optimizer_steps(tmp_path):
    loop = make_loop(tmp_path, save_interval=3, max_steps=3)
    loop.run_loop()
    state = load_checkpoint(tmp_path / "opt000003.pt")["state"]
    assert {s["step"].item() for s in state.values()} == {3.0}
    assert not list(tmp_path.glob("model000000.pt"))


def test_log_keys_include_loss_terms_quartiles_and_grad_norm(tmp_path):
    make_loop(tmp_path, data=SyntheticData(batch_size=16), batch_size=16, log_interval=2, max_steps=2).run_loop()
    with open(tmp_path / "progress.csv", newline="") as f:
        keys = set(next(csv.reader(f)))
    terms = {"loss", "mse", "vb"}
    expected = {"step", "samples", "grad_norm"} | terms | {f"{k}_q{q}" for k in terms for q in range(4)}
    assert expected <= keys
