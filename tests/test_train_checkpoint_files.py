"""Checkpoint sets on disk: safe writes, incomplete or damaged sets, bad pickles, missing files, retention."""

import pathlib
import shutil

import pytest
import torch
from _train_helpers import assert_same, make_loop, set_names, single_thread, train_env  # noqa: F401 (fixture)

from improved_diffusion import checkpointing, io_util, logger
from improved_diffusion.io_util import CheckpointError, load_checkpoint

pytestmark = pytest.mark.usefixtures("train_env")

RATE = "0.99"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run of 4 steps with complete sets at steps 2 and 4."""
    log_dir = tmp_path_factory.mktemp("finished")
    with single_thread(), torch.random.fork_rng():
        make_loop(log_dir, max_steps=4, save_interval=2).run_loop()
    logger.reset()
    return log_dir


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A private copy of finished_run."""
    return pathlib.Path(shutil.copytree(finished_run, tmp_path / "run"))


def checkpoint_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".pt")


def test_crash_mid_save_keeps_the_previous_set(tmp_path, monkeypatch):
    real_replace, calls = io_util.os.replace, []

    def crashing_replace(src, dst):
        if str(dst).endswith(".pt"):
            calls.append(dst)
        if len(calls) == 6 and str(dst).endswith(".pt"):  # set 2 has 4 files; then set 4's model, then its EMA
            raise OSError("injected crash while writing")
        real_replace(src, dst)

    monkeypatch.setattr(io_util.os, "replace", crashing_replace)
    loop = make_loop(tmp_path, max_steps=4, save_interval=2)
    with pytest.raises(OSError, match="injected crash"):
        loop.run_loop()
    # The failed save removed the model file it had written of set 4 (a failed save leaves no part of its set).
    assert checkpoint_files(tmp_path) == sorted(set_names(2, (RATE,)) + ["state000002.pt"])
    for name in checkpoint_files(tmp_path):
        load_checkpoint(tmp_path / name)  # every file under a final name is whole
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert checkpointing.latest_complete(str(tmp_path)).endswith("model000002.pt")


def test_incomplete_set_is_refused_naming_the_newest_complete_one(run_copy):
    (run_copy / "state000004.pt").unlink()
    with pytest.raises(CheckpointError) as info:
        make_loop(run_copy, resume_checkpoint=str(run_copy / "model000004.pt"))
    message = str(info.value)
    assert "state000004.pt is missing" in message and "model000002.pt" in message


def test_resume_auto_and_directory_pick_the_newest_complete_set(run_copy):
    (run_copy / "state000004.pt").unlink()
    assert make_loop(run_copy, resume_checkpoint="auto").step == 2
    assert make_loop(run_copy / "elsewhere", resume_checkpoint=str(run_copy)).step == 2
    assert make_loop(run_copy / "fresh", resume_checkpoint="auto").step == 0


def test_resume_refuses_a_file_that_is_not_a_model_file(run_copy):
    with pytest.raises(ValueError, match="--resume_checkpoint .*opt000004.pt.*modelNNNNNN.pt"):
        make_loop(run_copy, resume_checkpoint=str(run_copy / "opt000004.pt"))


@pytest.mark.parametrize("name", ["model000004.pt", "opt000004.pt", "state000004.pt"])
def test_truncated_checkpoint_is_an_error_naming_it(run_copy, name):
    path = run_copy / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{path}.*truncated"):
        make_loop(run_copy, resume_checkpoint=str(run_copy / "model000004.pt"))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("name", ["model000004.pt", f"ema_{RATE}_000004.pt", "state000004.pt"])
def test_malicious_pickle_is_rejected_without_running(run_copy, tmp_path, name):
    marker = tmp_path / "pwned"
    torch.save({"payload": _Exploit(marker)}, run_copy / name)
    with pytest.raises(CheckpointError, match=name):
        make_loop(run_copy, resume_checkpoint=str(run_copy / "model000004.pt"))
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["ema", "opt"])
def test_missing_ema_or_optimizer_file_is_an_error(run_copy, kind):
    name = f"ema_{RATE}_000004.pt" if kind == "ema" else "opt000004.pt"
    (run_copy / name).unlink()
    with pytest.raises(CheckpointError, match=f"{name} is missing.*--allow_partial_resume"):
        make_loop(run_copy, resume_checkpoint=str(run_copy / "model000004.pt"))


def test_missing_ema_is_accepted_with_the_flag_and_starts_from_the_model(run_copy):
    (run_copy / f"ema_{RATE}_000004.pt").unlink()
    loop = make_loop(run_copy, resume_checkpoint=str(run_copy / "model000004.pt"), allow_partial_resume=True)
    assert loop.step == 4
    assert_same(loop.ema_params[0], [p.detach() for p in loop.params])
    assert "incomplete set" in (run_copy / "log.txt").read_text()


def test_missing_optimizer_is_accepted_with_the_flag_and_starts_afresh(run_copy):
    (run_copy / "opt000004.pt").unlink()
    loop = make_loop(run_copy, resume_checkpoint=str(run_copy / "model000004.pt"), allow_partial_resume=True)
    assert loop.step == 4 and not loop.opt.state
    saved_ema = load_checkpoint(run_copy / f"ema_{RATE}_000004.pt")
    assert_same(loop.ema_params[0], [saved_ema[n] for n, _ in loop.model.named_parameters()])


def test_missing_state_is_accepted_with_the_flag_and_reseeds_for_the_step(run_copy):
    (run_copy / "state000004.pt").unlink()
    loop = make_loop(run_copy, resume_checkpoint=str(run_copy / "model000004.pt"), allow_partial_resume=True)
    fresh = make_loop(run_copy / "fresh")
    assert loop.step == 4 and not torch.equal(loop.generator.get_state(), fresh.generator.get_state())


def test_another_number_of_ranks_is_refused_unless_allowed(run_copy):
    state = load_checkpoint(run_copy / "state000004.pt")
    state["world_size"], state["ranks"] = 2, state["ranks"] * 2
    torch.save(state, run_copy / "state000004.pt")
    resume = str(run_copy / "model000004.pt")
    with pytest.raises(CheckpointError, match="2 rank.*this run has 1.*--allow_partial_resume"):
        make_loop(run_copy, resume_checkpoint=resume)
    assert make_loop(run_copy, resume_checkpoint=resume, allow_partial_resume=True).step == 4


def test_an_optimizer_file_in_the_reference_format_is_resumed(run_copy):
    opt = load_checkpoint(run_copy / "opt000004.pt")
    for group in opt["param_groups"]:
        for key in ("fused", "foreach", "capturable", "differentiable", "decoupled_weight_decay"):
            group.pop(key, None)
    for param_state in opt["state"].values():
        param_state["step"] = int(param_state["step"])  # torch < 1.12 saved a number
    torch.save(opt, run_copy / "opt000004.pt")
    loop = make_loop(run_copy, resume_checkpoint=str(run_copy / "model000004.pt"), max_steps=5)
    loop.run_loop()
    steps = {s["step"].item() for s in load_checkpoint(run_copy / "opt000005.pt")["state"].values()}
    assert steps == {5.0}


def test_keep_checkpoints_keeps_the_newest_complete_sets(tmp_path):
    (tmp_path / "model000000.pt").write_bytes(b"stale, incomplete")
    make_loop(tmp_path, max_steps=5, save_interval=1, keep_checkpoints=2).run_loop()
    assert checkpoint_files(tmp_path) == sorted(
        set_names(4, (RATE,)) + set_names(5, (RATE,)) + ["state000004.pt", "state000005.pt"]
    )


def test_temporaries_of_a_killed_save_are_removed_by_the_next_save(tmp_path):
    stale = [".model000002.pt.k3x9q_a1.tmp", f".ema_{RATE}_000002.pt.zz81mw0p.tmp", ".state000002.pt.abc.tmp"]
    for name in stale:
        (tmp_path / name).write_bytes(b"cut short by kill -9")
    (tmp_path / ".notes.tmp").write_text("not ours")
    make_loop(tmp_path, max_steps=1, save_interval=1).run_loop()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == [".notes.tmp"]
    log = (tmp_path / "log.txt").read_text()
    assert all(f"removed {name}, left by a save that was cut short" in log for name in stale)
