"""Two ranks under mpiexec and torchrun: identical replicas, the same run either way, exact resume after kill -9."""

import signal

import pytest
from _launch import signal_tree
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

# Microbatches and the loss-second-moment sampler (warmed up after 40 losses: step 5 with 2 x 4 per step).
FLAGS = dict(
    TINY_MODEL, diffusion_steps=4, batch_size=4, microbatch=2, schedule_sampler="loss-second-moment",
    dropout=0.1, save_interval=2, log_interval=2, check_replicas=True,
)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"), 16)


@pytest.fixture(scope="module")
def mpi_run(images, tmp_path_factory):
    """8 steps on 2 ranks under mpiexec; returns the log directory."""
    log_dir = tmp_path_factory.mktemp("mpi")
    status, out, err = run_script("image_train.py", dict(FLAGS, data_dir=images, max_steps=8), log_dir, "mpiexec", 2)
    assert status == 0, out + err
    return log_dir


def test_two_ranks_under_mpiexec_keep_identical_replicas(mpi_run):
    log = (mpi_run / "log.txt").read_text()
    for step in (2, 4, 6, 8):
        assert f"replicas identical at step {step} on 2 rank(s)" in log


def test_two_ranks_under_torchrun_match_the_mpiexec_run(mpi_run, images, tmp_path):
    status, out, err = run_script("image_train.py", dict(FLAGS, data_dir=images, max_steps=4), tmp_path, "torchrun", 2)
    assert status == 0, out + err
    assert "replicas identical at step 4 on 2 rank(s)" in (tmp_path / "log.txt").read_text()
    assert_same_files(mpi_run, tmp_path, set_names(4))


def test_two_ranks_kill_9_then_resume_matches_the_uninterrupted_run(mpi_run, images, tmp_path):
    flags = dict(FLAGS, data_dir=images)
    killed = start_script("image_train.py", dict(flags, max_steps=100000), tmp_path / "killed", "mpiexec", 2)
    wait_for(tmp_path / "killed" / "state000004.pt", killed)
    kill_group(killed)
    resume = dict(flags, max_steps=8, resume_checkpoint=tmp_path / "killed" / "model000004.pt")
    status, out, err = run_script("image_train.py", resume, tmp_path / "resumed", "mpiexec", 2)
    assert status == 0, out + err
    for step in (6, 8):
        assert_same_files(mpi_run, tmp_path / "resumed", set_names(step))


def test_data_error_is_reported_cleanly_by_every_rank(tmp_path):
    folder = write_images(tmp_path / "images", 4)
    (folder / "img_9.png").write_bytes(b"garbage")
    status, out, err = run_script("image_train.py", dict(FLAGS, data_dir=folder, batch_size=2), tmp_path, "mpiexec", 2)
    assert status != 0
    assert (out + err).count("error: cannot read image") == 2, out + err
    assert "img_9.png" in err and "Traceback" not in out + err, out + err


@pytest.mark.parametrize("kind", ["mpiexec", "torchrun"])
@pytest.mark.parametrize("everyone", [True, False], ids=["every-process", "launcher-only"])
def test_sigterm_saves_one_complete_set_on_two_ranks(images, tmp_path, kind, everyone):
    """
    SIGTERM to every process (a preempting scheduler) or to the launcher alone
    (which forwards it): the ranks agree on one step boundary and save it.
    """
    flags = dict(FLAGS, data_dir=images, save_interval=100000, log_interval=1, check_replicas=False)
    proc = start_script("image_train.py", flags, tmp_path, kind, 2)
    wait_for(tmp_path / "progress.csv", proc, min_lines=1)
    if everyone:
        signal_tree(proc, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    states = sorted(tmp_path.glob("state*.pt"))
    assert len(states) == 1, f"status {proc.returncode}\n{out}\n{err}"
    step = int(states[0].stem[len("state") :])
    assert {p.name for p in tmp_path.glob(f"*{step:06d}.pt")} == {*set_names(step), f"state{step:06d}.pt"}
    assert f"stopped by SIGTERM after saving step {step}" in (tmp_path / "log.txt").read_text()
    if kind == "mpiexec":  # torchrun's agent reports a signal it received as a failure (status 1) itself
        assert proc.returncode == 0, err
