"""
image_train.py and super_res_train.py as a user runs them: outputs and data
errors (in this process), signals (to real processes).
"""

import csv
import json
import os
import signal

import pytest
from _train_helpers import TINY_MODEL, run_script, start_script, wait_for, write_images

TRAIN = dict(TINY_MODEL, batch_size=2, log_interval=2, save_interval=2)


def test_image_train_writes_checkpoints_logs_and_flags(tiny_run):
    log_dir, status, _, err = tiny_run
    assert status == 0, err
    for step in (2, 4):
        for name in (f"model{step:06d}.pt", f"ema_0.9999_{step:06d}.pt", f"opt{step:06d}.pt", f"state{step:06d}.pt"):
            assert (log_dir / name).is_file()
    assert "step" in (log_dir / "log.txt").read_text()
    flags = json.loads((log_dir / "flags.json").read_text())
    assert flags["image_size"] == 8 and flags["num_channels"] == 32 and flags["seed"] == 0


def test_progress_csv_has_the_reference_log_keys(tiny_run):
    log_dir = tiny_run[0]
    with open(log_dir / "progress.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["2", "4"] and rows[-1]["samples"] == "8"
    assert {"loss", "mse", "vb", "grad_norm", "loss_q0", "mse_q0", "vb_q0"} <= set(rows[0])


def assert_one_line_error(status, err, *needles, expected_status=1):
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == expected_status, err
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors, err
    for needle in needles:
        assert str(needle) in errors[-1], err


def test_empty_folder_is_a_clean_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    status, _, err = run_script("image_train.py", dict(TRAIN, data_dir=empty), tmp_path / "log")
    assert_one_line_error(status, err, empty)


def test_fewer_images_than_a_batch_is_a_clean_error(tmp_path):
    folder = write_images(tmp_path / "few", 3)
    status, _, err = run_script("image_train.py", dict(TRAIN, data_dir=folder, batch_size=4), tmp_path / "log")
    assert_one_line_error(status, err, folder, "fewer than one batch")


def test_undecodable_file_is_a_clean_error_naming_it(tmp_path):
    folder = write_images(tmp_path / "bad", 4)
    (folder / "img_9.png").write_bytes(b"not a png at all")
    status, _, err = run_script("image_train.py", dict(TRAIN, data_dir=folder), tmp_path / "log")
    assert_one_line_error(status, err, folder / "img_9.png")


def test_mixed_channel_counts_are_a_clean_error(tmp_path):
    folder = write_images(tmp_path / "mixed", 4)
    write_images(folder, 1, mode="RGBA", prefix="alpha")
    status, _, err = run_script("image_train.py", dict(TRAIN, data_dir=folder), tmp_path / "log")
    assert_one_line_error(status, err, folder / "alpha_0.png", "channels")


def test_missing_data_dir_flag_is_a_clean_error(tmp_path):
    status, _, err = run_script("image_train.py", TRAIN, tmp_path / "log")
    assert_one_line_error(status, err, "--data_dir", expected_status=2)


def test_truncated_checkpoint_is_a_clean_error_naming_it(tiny_run, tiny_images, tmp_path):
    model = tmp_path / "model000004.pt"
    model.write_bytes((tiny_run[0] / "model000004.pt").read_bytes()[:1000])
    flags = dict(TRAIN, data_dir=tiny_images, resume_checkpoint=model, allow_partial_resume=True)
    status, _, err = run_script("image_train.py", flags, tmp_path / "log")
    assert_one_line_error(status, err, model)


@pytest.mark.parametrize(
    "signum, to_group, expected_status",
    [(signal.SIGTERM, False, 0), (signal.SIGTERM, True, 0), (signal.SIGINT, True, 130)],
    ids=["kill-pid", "sigterm-to-job", "ctrl-c"],
)
def test_signal_saves_at_a_step_boundary_and_exits(tiny_images, tmp_path, signum, to_group, expected_status):
    """To the process, or to its whole group with the data workers (a scheduler's SIGTERM, a terminal's Ctrl-C)."""
    flags = dict(TRAIN, data_dir=tiny_images, log_interval=1, save_interval=100000)
    proc = start_script("image_train.py", flags, tmp_path)
    wait_for(tmp_path / "progress.csv", proc, min_lines=1)  # a header and a row: training has begun
    (os.killpg if to_group else os.kill)(proc.pid, signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == expected_status, err
    states = sorted(tmp_path.glob("state*.pt"))
    assert len(states) == 1 and (tmp_path / states[0].name.replace("state", "model")).is_file()
    step = int(states[0].stem[len("state"):])
    assert f"stopped by {signal.Signals(signum).name} after saving step {step}" in (tmp_path / "log.txt").read_text()


def test_super_res_train_trains_a_few_steps(tiny_images, tmp_path):
    flags = dict(TRAIN, data_dir=tiny_images, large_size=8, small_size=4, max_steps=2)
    del flags["image_size"]
    status, _, err = run_script("super_res_train.py", flags, tmp_path)
    assert status == 0, err
    assert (tmp_path / "state000002.pt").is_file() and (tmp_path / "progress.csv").is_file()
