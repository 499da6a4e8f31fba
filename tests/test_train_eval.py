"""image_train.py --eval_interval: fid in progress.csv at the expected steps, the same after kill -9 and resume."""

import csv

import pytest
import torch
from _train_helpers import (
    TINY_MODEL,
    assert_same_files,
    kill_group,
    run_script,
    set_names,
    start_script,
    wait_for,
    write_images,
)
from test_evaluation import random_inception

METRICS = ("fid", "sfid", "inception_score", "precision", "recall")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval_train")
    weights = folder / "random_inception.pth"
    torch.save(random_inception(seed=2).state_dict(), weights)
    flags = dict(
        TINY_MODEL, data_dir=write_images(folder / "images", 8), batch_size=2, log_interval=2, save_interval=4,
        ema_rate="0.5", lr=3e-3,
        eval_interval=4, eval_num_samples=4, eval_timestep_respacing="4", inception_weights=weights,
    )
    return flags


def rows(log_dir):
    with open(log_dir / "progress.csv", newline="") as f:
        return {int(float(row["step"])): row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
    """An uninterrupted 10-step run, and one killed after its step-4 checkpoint and resumed to step 10."""
    root = tmp_path_factory.mktemp("runs")
    killed = start_script("image_train.py", dict(setup, max_steps=100000), root / "killed")
    wait_for(root / "killed" / "state000004.pt", killed, timeout=240)
    kill_group(killed)
    status, _, err = run_script("image_train.py", dict(setup, max_steps=10), root / "whole")
    assert status == 0, err
    resume = dict(setup, max_steps=10, resume_checkpoint=root / "killed" / "model000004.pt")
    status, _, err = run_script("image_train.py", resume, root / "resumed")
    assert status == 0, err
    return root


def test_metrics_are_logged_every_eval_interval_and_after_the_last_step_with_a_sample_grid(runs):
    with open(runs / "whole" / "progress.csv", newline="") as f:
        steps = [int(float(row["step"])) for row in csv.DictReader(f)]
    assert steps == [2, 4, 6, 8, 10]
    for step, row in rows(runs / "whole").items():
        logged = all(row.get(key) not in (None, "") for key in METRICS)
        assert logged == (step in (4, 8, 10)), (step, row)
        assert row["loss"] not in (None, ""), row
    assert float(rows(runs / "whole")[8]["fid"]) > 0 and 0 <= float(rows(runs / "whole")[8]["precision"]) <= 1
    assert (runs / "whole" / "eval_reference_stats.npz").is_file()
    for step in (4, 8, 10):
        assert (runs / "whole" / f"eval_samples_{step:06d}.png").is_file()


def test_metrics_after_kill_and_resume_equal_the_uninterrupted_run(runs):
    whole, killed, resumed = rows(runs / "whole"), rows(runs / "killed"), rows(runs / "resumed")
    for key in METRICS:
        assert killed[4][key] == whole[4][key], key
        assert resumed[8][key] == whole[8][key], key
        assert resumed[10][key] == whole[10][key], key
    assert float(whole[4]["fid"]) != float(whole[8]["fid"])
    assert_same_files(runs / "whole", runs / "resumed", set_names(10, rates=("0.5",)))


@pytest.mark.parametrize(
    "overrides, needle, expected_status",
    [
        (dict(eval_interval=3), "--eval_interval 3 must be a positive multiple of --log_interval 2", 2),
        (dict(eval_num_samples=3), "--eval_num_samples 3", 1),
        (dict(eval_sampler="fast"), "unknown --eval_sampler 'fast'", 2),
        (dict(inception_weights="/nonexistent/w.pth"), "--inception_weights /nonexistent/w.pth does not exist", 1),
    ],
)
def test_bad_eval_flags_fail_before_training(setup, tmp_path, overrides, needle, expected_status):
    status, out, err = run_script("image_train.py", dict(setup, max_steps=2, **overrides), tmp_path)
    assert status == expected_status
    assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "model000002.pt").exists()


def test_evaluator_scores_the_model_and_sends_the_grid_to_tensorboard(setup, tmp_path):
    pytest.importorskip("tensorboard")
    from test_logger import read_tensorboard

    from improved_diffusion import evaluation, logger, script_util

    flags = {**script_util.model_and_diffusion_defaults(), **TINY_MODEL, "timestep_respacing": "2"}
    model, diffusion = script_util.create_model_and_diffusion(**flags)
    logger.configure(dir=str(tmp_path), format_strs="tensorboard")
    try:
        evaluator = evaluation.TrainingEvaluator(
            diffusion=diffusion, data_dir=str(write_images(tmp_path / "images", 5, size=12)), image_size=8,
            num_samples=4, batch_size=3, log_dir=str(tmp_path), weights_path=str(setup["inception_weights"]),
        )
        assert evaluator.ref_stats["pool"].shape == (5, 2048)
        first = evaluator(model.eval(), step=3)
        assert evaluator(model, step=5) == first
    finally:
        logger.reset()
    assert sorted(first) == sorted(["inception_score_std", *METRICS])
    assert [image.step for image in read_tensorboard(tmp_path / "tb").Images("eval_samples")] == [3, 5]
    assert (tmp_path / "eval_samples_000003.png").is_file()
