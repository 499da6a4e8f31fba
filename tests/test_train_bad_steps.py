"""Non-finite losses or gradients: skipped without touching weights, EMA or AdamW; logged; a long streak ends the run."""

import csv

import pytest
from _train_helpers import (  # noqa: F401 (fixture)
    SyntheticData,
    any_param_changed,
    assert_same,
    make_loop,
    snapshot,
    train_env,
)

from improved_diffusion.train_util import INITIAL_LG_LOSS_SCALE, TrainingError

pytestmark = pytest.mark.usefixtures("train_env")


def read_rows(log_dir):
    with open(log_dir / "progress.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_nan_batch_leaves_weights_ema_and_optimizer_untouched(tmp_path):
    data = SyntheticData(nan_batches={1})
    loop = make_loop(tmp_path, data=data)
    loop.run_step(*next(data))
    before = snapshot(loop)
    loop.run_step(*next(data))
    assert_same(snapshot(loop), before)
    loop.run_step(*next(data))
    assert any_param_changed(loop, before)


def test_nan_step_is_logged_and_the_run_goes_on(tmp_path):
    make_loop(tmp_path, data=SyntheticData(nan_batches={2}), max_steps=6).run_loop()
    rows = read_rows(tmp_path)
    assert [r["bad_steps"] for r in rows] == ["0", "1", "0"]
    assert [r["step"] for r in rows] == ["2", "4", "6"]
    assert "skipped 1 step(s) with a non-finite loss or gradient" in (tmp_path / "log.txt").read_text()


def test_a_long_streak_of_nan_steps_ends_the_run(tmp_path):
    loop = make_loop(
        tmp_path, data=SyntheticData(nan_batches=range(100)), max_bad_steps=5, log_interval=100, max_steps=50
    )
    with pytest.raises(TrainingError, match="5 steps in a row had a non-finite loss or gradient.*--max_bad_steps 5"):
        loop.run_loop()
    assert loop.step == 5


def test_fp16_loss_scale_grows_on_finite_steps_and_drops_on_overflow(tmp_path):
    growth = 0.25
    loop = make_loop(
        tmp_path, data=SyntheticData(nan_batches={5}), use_fp16=True, fp16_scale_growth=growth,
        log_interval=1, max_steps=6,
    )
    loop.run_loop()
    rows = read_rows(tmp_path)
    assert rows[5]["bad_steps"] == "1"
    lg = INITIAL_LG_LOSS_SCALE
    for row in rows:
        lg += -1.0 if row["bad_steps"] == "1" else growth
        assert float(row["lg_loss_scale"]) == lg
    assert loop.lg_loss_scale.item() == lg


def test_bf16_training_takes_finite_steps(tmp_path):
    loop = make_loop(tmp_path, use_bf16=True, max_steps=2)
    before = snapshot(loop)
    loop.run_loop()
    row = read_rows(tmp_path)[-1]
    assert row["bad_steps"] == "0" and float(row["grad_norm"]) > 0
    assert any_param_changed(loop, before)


def test_fp16_and_bf16_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--use_fp16 and --use_bf16"):
        make_loop(tmp_path, use_fp16=True, use_bf16=True)
