"""Exact resume: a run interrupted at any checkpoint and resumed ends bitwise where the uninterrupted run does."""

import csv

import pytest
from _train_helpers import (
    TINY_MODEL,
    SyntheticData,
    assert_same_files,
    kill_group,
    make_loop,
    set_names,
    run_script,
    start_script,
    tiny_flags,
    train_env,  # noqa: F401 (fixture)
    wait_for,
    write_images,
)

from improved_diffusion import script_util
from improved_diffusion.resample import create_named_schedule_sampler

RATES = ("0.9999", "0.99")

pytestmark = pytest.mark.usefixtures("train_env")


def loop_args(max_steps, resume=""):
    """A run with dropout, microbatches, two EMA rates and the loss-second-moment sampler."""
    flags = tiny_flags(dropout=0.1, diffusion_steps=4)
    _, diffusion = script_util.create_model_and_diffusion(**flags)
    return {
        "model_flags": flags,
        "data": SyntheticData(batch_size=4),
        "batch_size": 4,
        "microbatch": 2,
        "ema_rate": ",".join(RATES),
        "save_interval": 3,
        "max_steps": max_steps,
        "resume_checkpoint": resume,
        "schedule_sampler": create_named_schedule_sampler("loss-second-moment", diffusion),
    }


def test_resumed_loop_matches_the_uninterrupted_one(tmp_path):
    make_loop(tmp_path / "whole", **loop_args(max_steps=12)).run_loop()
    make_loop(tmp_path / "parts", **loop_args(max_steps=4)).run_loop()
    resumed = make_loop(tmp_path / "parts", **loop_args(max_steps=12, resume=str(tmp_path / "parts" / "model000003.pt")))
    assert resumed.step == 3
    resumed.run_loop()
    for step in (6, 12):
        assert_same_files(tmp_path / "whole", tmp_path / "parts", set_names(step, RATES))


@pytest.mark.parametrize("options", [
    {},
    # The update's options and the post-hoc EMA profiles resume exactly too (SPEC 17, 20).
    {"grad_clip": 0.5, "lr_warmup_steps": 6, "ema_std": "0.05,0.10", "ema_snapshot_interval": 1},
], ids=["plain", "clip_warmup_posthoc"])
def test_kill_9_then_resume_matches_the_uninterrupted_script_run(tmp_path, options):
    images = write_images(tmp_path / "images", 6)
    flags = dict(
        TINY_MODEL, data_dir=images, batch_size=2, microbatch=1, dropout=0.1, random_flip=True,
        ema_rate=",".join(RATES), save_interval=2, log_interval=2, **options,
    )
    killed = start_script("image_train.py", dict(flags, max_steps=100000), tmp_path / "killed")
    wait_for(tmp_path / "killed" / "state000004.pt", killed)
    kill_group(killed)
    status, _, err = run_script("image_train.py", dict(flags, max_steps=8), tmp_path / "whole")
    assert status == 0, err
    resume = dict(flags, max_steps=8, resume_checkpoint=tmp_path / "killed" / "model000004.pt")
    status, _, err = run_script("image_train.py", resume, tmp_path / "resumed")
    assert status == 0, err
    for step in (6, 8):
        assert_same_files(tmp_path / "whole", tmp_path / "resumed", set_names(step, RATES))
    assert not (tmp_path / "resumed" / "model000004.pt").exists()
    snapshots = sorted(p.name for p in (tmp_path / "resumed").glob("phema_*.pt"))
    assert len(snapshots) == (8 if options else 0)  # steps 5 to 8, two profiles
    assert_same_files(tmp_path / "whole", tmp_path / "resumed", snapshots)
    if options:
        with open(tmp_path / "whole" / "progress.csv", newline="") as f:
            assert all(float(row["grad_norm"]) > options["grad_clip"] for row in csv.DictReader(f)), "clipped"


