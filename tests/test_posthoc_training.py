"""
Post-hoc EMA in training (SPEC §17): --ema_std profiles tracked by the
training core, their snapshots written with the checkpoint sets, restored
exactly on resume, retained with --keep_checkpoints as the sets are; a
tracked profile reconstructed from the others' snapshots by
scripts/reconstruct_ema.py, ever closer with more snapshots; train,
reconstruct and sample end to end; the classifier's profiles; the errors.
"""

import shutil

import numpy as np
import pytest
import torch
from _train_helpers import (
    TINY_MODEL,
    assert_same_files,
    make_loop,
    run_script,
    single_thread,
    tiny_flags,
    train_env,  # noqa: F401 (fixture)
    write_images,
)
from test_flags import load_script

from improved_diffusion import logger
from improved_diffusion.io_util import CheckpointError, load_checkpoint
from improved_diffusion.posthoc_ema import list_snapshots, snapshot_filename
from improved_diffusion.run_flags import write_run_flags

STDS = (0.05, 0.08, 0.10)
STEPS, INTERVAL = 60, 5

RECONSTRUCT = load_script("reconstruct_ema")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained STEPS steps with --ema_std 0.05,0.08,0.10, a snapshot every INTERVAL steps."""
    log_dir = tmp_path_factory.mktemp("posthoc")
    with single_thread(), torch.random.fork_rng():
        make_loop(log_dir, max_steps=STEPS, save_interval=20, ema_std=",".join(map(str, STDS)),
                  ema_snapshot_interval=INTERVAL).run_loop()
    logger.reset()
    write_run_flags(str(log_dir), tiny_flags())
    return log_dir


def test_snapshots_are_written_with_the_sets_every_interval(trained):
    assert list_snapshots(str(trained)) == [
        (step, std, str(trained / snapshot_filename(std, step)))
        for step in range(INTERVAL, STEPS + 1, INTERVAL) for std in STDS
    ]
    state = load_checkpoint(trained / "state000060.pt")["posthoc_ema"]
    assert state["stds"] == list(STDS) and state["num_updates"] == STEPS
    model = load_checkpoint(trained / "model000060.pt")
    for std, average in zip(STDS, state["averages"]):
        snapshot = load_checkpoint(trained / snapshot_filename(std, STEPS))
        assert snapshot.keys() == model.keys()
        assert all(torch.equal(a, snapshot[name]) for a, name in zip(average, model))


def relative_miss(state, tracked):
    """||state - tracked 0.08|| / ||tracked 0.05 - tracked 0.10|| over the weights."""
    miss = sum(((state[k].double() - tracked[0.08][k].double()) ** 2).sum() for k in state)
    spread = sum(((tracked[0.05][k].double() - tracked[0.10][k].double()) ** 2).sum() for k in state)
    return (miss / spread).sqrt().item()


def reconstruct_from(trained, folder, every, capsys):
    """Reconstruct 0.08 at STEPS from every `every`-th snapshot of 0.05 and 0.10 (copied into `folder`)."""
    folder.mkdir()
    shutil.copy(trained / "flags.json", folder)
    for step in range(every * INTERVAL, STEPS + 1, every * INTERVAL):
        for std in (0.05, 0.10):
            shutil.copy(trained / snapshot_filename(std, step), folder)
    RECONSTRUCT.main(["--log_dir", str(folder), "--ema_std", "0.08"])
    assert f"coefficients of {2 * (STEPS // (every * INTERVAL))} snapshots" in capsys.readouterr().out
    return load_checkpoint(folder / f"ema_std0.080_{STEPS:06d}.pt")


def test_a_tracked_profile_is_reconstructed_from_the_others_ever_closer_with_more_snapshots(
    trained, tmp_path, capsys
):
    tracked = {std: load_checkpoint(trained / snapshot_filename(std, STEPS)) for std in STDS}
    misses = [relative_miss(reconstruct_from(trained, tmp_path / f"every{k}", k, capsys), tracked) for k in (4, 2, 1)]
    assert misses[2] < 0.01, misses
    assert misses[0] > misses[1] > misses[2], misses


def test_train_reconstruct_and_sample_from_the_file_alone(tmp_path):
    images = write_images(tmp_path / "images", 4)
    run = tmp_path / "run"
    flags = dict(TINY_MODEL, data_dir=images, batch_size=2, max_steps=6, save_interval=3, ema_std="0.05,0.10")
    status, _, err = run_script("image_train.py", flags, run)
    assert status == 0, err
    assert sorted(p.name for p in run.glob("phema_*")) == [
        snapshot_filename(std, step) for std in (0.05, 0.10) for step in (3, 6)]
    status, out, err = run_script("reconstruct_ema.py", {"log_dir": run, "ema_std": "0.07"}, tmp_path / "log")
    assert status == 0, err
    made = run / "ema_std0.070_000006.pt"
    assert f"wrote {made}" in out
    status, _, err = run_script("image_sample.py", {"model_path": made, "sampler": "ddim", "timestep_respacing": "4",
                                                    "num_samples": 2, "batch_size": 2}, tmp_path / "samples")
    assert status == 0, err
    with np.load(tmp_path / "samples" / "samples_2x8x8x3.npz") as data:
        assert data["arr_0"].shape == (2, 8, 8, 3) and data["arr_0"].dtype == np.uint8


@pytest.mark.usefixtures("train_env")
def test_retention_removes_the_snapshots_of_removed_sets_and_never_reconstructed_files(tmp_path):
    reconstructed = tmp_path / "ema_std0.080_000002.pt"
    reconstructed.write_bytes(b"a file of reconstruct_ema.py")
    make_loop(tmp_path, max_steps=12, save_interval=4, keep_checkpoints=2, ema_std="0.05",
              ema_snapshot_interval=2).run_loop()
    names = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".pt")
    # Sets 8 and 12 are kept; the snapshots written with them are those of steps 6 to 12.
    assert [n for n in names if n.startswith("phema")] == [snapshot_filename(0.05, s) for s in (6, 8, 10, 12)]
    assert [n for n in names if n.startswith("state")] == ["state000008.pt", "state000012.pt"]
    assert reconstructed.read_bytes() == b"a file of reconstruct_ema.py"


@pytest.mark.usefixtures("train_env")
def test_a_resumed_run_writes_bitwise_the_snapshots_of_the_uninterrupted_one(tmp_path):
    args = dict(ema_std="0.05,0.10", save_interval=4, ema_snapshot_interval=3)
    make_loop(tmp_path / "whole", max_steps=12, **args).run_loop()
    make_loop(tmp_path / "parts", max_steps=4, **args).run_loop()
    make_loop(tmp_path / "parts", max_steps=12, resume_checkpoint="auto", **args).run_loop()
    names = [snapshot_filename(std, step) for step in (3, 6, 9, 12) for std in (0.05, 0.10)]
    assert_same_files(tmp_path / "whole", tmp_path / "parts", names + ["model000012.pt", "opt000012.pt"])


@pytest.mark.usefixtures("train_env")
def test_resuming_with_other_profiles_names_the_fix(tmp_path):
    make_loop(tmp_path, max_steps=2, save_interval=2, ema_std="0.05").run_loop()
    with pytest.raises(CheckpointError, match=r"--ema_std 0\.05, this run 0\.05,0\.1: resume with the run's "
                                              r"--ema_std, or pass --allow_partial_resume True"):
        make_loop(tmp_path, resume_checkpoint="auto", ema_std="0.05,0.10")
    loop = make_loop(tmp_path, resume_checkpoint="auto", ema_std="0.05,0.10", allow_partial_resume=True)
    assert loop.posthoc.num_updates == 2
    assert all(torch.equal(a, p) for a, p in zip(loop.posthoc.average(0.10), loop.params))
    assert "the profiles start from the current weights" in (tmp_path / "log.txt").read_text()


def test_the_classifier_tracks_profiles_and_resumes_them_exactly(tmp_path):
    from test_classifier_train import RUN_FLAGS, labeled_images, train

    data = {"data_dir": labeled_images(tmp_path / "train", per_class=3)}
    flags = dict(RUN_FLAGS, ema_std="0.05,0.10", eval_interval=100)
    assert train(tmp_path / "whole", iterations=6, **data, **flags) == 0
    assert train(tmp_path / "parts", iterations=3, **data, **flags) == 0
    assert train(tmp_path / "parts", iterations=6, resume_checkpoint="auto", **data, **flags) == 0
    names = [snapshot_filename(std, step) for step in (3, 6) for std in (0.05, 0.10)]
    assert_same_files(tmp_path / "whole", tmp_path / "parts", names)
    snapshot = load_checkpoint(tmp_path / "whole" / snapshot_filename(0.10, 6))
    assert snapshot.keys() == load_checkpoint(tmp_path / "whole" / "model000006.pt").keys()


@pytest.mark.parametrize(
    "ema_std, needle",
    [
        ("0.05,0.3", "sigma_rel 0.3 is outside (0, 0.2887)"),
        ("0.05,0.05", "sigma_rel 0.05 is given more than once; give each value once"),
        ("0,0.1", "sigma_rel 0.0 is outside"),
        ("0.1,fast", "'fast' is not a number"),
    ],
)
def test_bad_ema_std_values_exit_2_naming_the_fix(tmp_path, monkeypatch, capsys, ema_std, needle):
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "log"))
    try:
        load_script("image_train").main(["--data_dir", str(tmp_path), "--ema_std", ema_std])
        status = 0
    except SystemExit as exc:
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2 and err.startswith(f"error: --ema_std {ema_std}: ") and err.count("\n") == 1, err
    assert needle in err, err
    assert not (tmp_path / "log").exists(), "nothing is written before the check"
