"""
Saving checkpoints: streamed into the file (no second copy of the state in
memory), and a save that fails ends the run with one error that names the
lost set and the complete one to resume from, leaving nothing half written.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from _launch import run_command
from _train_helpers import (
    ROOT,
    TINY_MODEL,
    assert_same_files,
    make_loop,
    run_script,
    set_names,
    train_env,  # noqa: F401 (fixture)
)

from improved_diffusion import checkpointing
from improved_diffusion.checkpointing import CheckpointSaveError, CheckpointSet
from improved_diffusion.io_util import load_checkpoint

RATE = "0.99"
TRAIN = dict(TINY_MODEL, batch_size=2, log_interval=2, save_interval=2, max_steps=4)

# Run in a fresh interpreter: the peak resident memory (VmHWM, reset through /proc/self/clear_refs) and the
# peak of Python's own allocations (tracemalloc) while one state of about STATE_BYTES is saved.
MEASURE_SAVE = """
import json, sys, tracemalloc
import torch
from improved_diffusion.io_util import atomic_save_checkpoint

def vm_kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

path, state_bytes = sys.argv[1], int(sys.argv[2])
state = {f"layer{i}.weight": torch.full((state_bytes // 4 // 8,), float(i)) for i in range(8)}
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident size starts again from the current one
    resident = vm_kib("VmRSS")
except OSError:
    resident = None
tracemalloc.start()
atomic_save_checkpoint(state, path)
traced_peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({
    "state_bytes": sum(t.nbytes for t in state.values()),
    "extra_resident": None if resident is None else (vm_kib("VmHWM") - resident) * 1024,
    "traced_peak": traced_peak,
}))
"""


@pytest.mark.parametrize("name", ["state.pt", "state.safetensors"])
def test_saving_a_state_holds_no_second_copy_of_it(tmp_path, name):
    if name.endswith(".safetensors"):
        pytest.importorskip("safetensors")
    script = tmp_path / "measure_save.py"
    script.write_text(MEASURE_SAVE)
    state_bytes = 200 * 2**20
    result = run_command([sys.executable, str(script), str(tmp_path / name), str(state_bytes)], cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.splitlines()[-1])
    assert measured["state_bytes"] == state_bytes
    # The whole process while saving: the state plus at most a tenth of it (a copy would double it).
    assert measured["traced_peak"] <= 0.1 * state_bytes, measured
    if measured["extra_resident"] is not None:
        assert measured["extra_resident"] <= 0.1 * state_bytes, measured
    loaded = load_checkpoint(tmp_path / name)
    assert [float(loaded[f"layer{i}.weight"][-1]) for i in range(8)] == [float(i) for i in range(8)]


# ---------------------------------------------------------------- a save that fails


def save_set(folder, step, save_format="pt"):
    ckpt = CheckpointSet(str(folder), step, [RATE], save_format=save_format)
    weights = {"w": torch.full((4,), float(step))}
    ckpt.save(weights, {RATE: weights}, {"state": {}, "param_groups": []}, {"step": step})
    return ckpt


@pytest.mark.parametrize("save_format", ["pt", "safetensors"])
def test_a_failed_save_removes_its_files_and_names_the_set_to_resume_from(tmp_path, save_format):
    if save_format == "safetensors":
        pytest.importorskip("safetensors")
    earlier = save_set(tmp_path, 2, save_format)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    (tmp_path / "opt000004.pt").mkdir()  # the optimizer file cannot be renamed into place: after model and EMA
    with pytest.raises(CheckpointSaveError) as error:
        save_set(tmp_path, 4, save_format)
    assert isinstance(error.value, ValueError) and isinstance(error.value, OSError)
    message = str(error.value)
    assert f"checkpoint set of step 4 in {tmp_path}" in message
    assert "opt000004.pt failed" in message and "Is a directory" in message
    assert f"--resume_checkpoint {earlier.model}" in message
    (tmp_path / "opt000004.pt").rmdir()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing of step 4, no temporaries


def test_a_failed_first_save_says_there_is_no_set_to_resume_from(tmp_path):
    (tmp_path / "model000002.pt").mkdir()
    with pytest.raises(CheckpointSaveError, match=f"no complete checkpoint set in {tmp_path} to resume from"):
        save_set(tmp_path, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["model000002.pt"]


@pytest.mark.usefixtures("train_env")
def test_train_loop_save_raises_the_save_error(tmp_path):
    (tmp_path / f"ema_{RATE}_000004.pt").mkdir()
    loop = make_loop(tmp_path, max_steps=4, save_interval=2)
    with pytest.raises(CheckpointSaveError, match="step 4.*--resume_checkpoint .*model000002.pt"):
        loop.run_loop()
    assert loop.saved_step == 2


@pytest.fixture(scope="module")
def whole_run(tiny_run):
    """image_train.py for 4 steps (TRAIN) with sets at 2 and 4, on a roomy disk (conftest's tiny_run)."""
    log_dir, status, _, err = tiny_run
    assert status == 0, err
    return log_dir


def assert_one_error_line_per_rank(status, err, ranks, *needles):
    assert (status == 1 if ranks == 1 else status != 0) and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == ranks and len(set(errors)) == 1, err
    for needle in needles:
        assert str(needle) in errors[0], err


@pytest.fixture
def small_tmpfs(tmp_path):
    """mount(size) -> a folder on a tmpfs of `size` bytes (skipped when tmpfs cannot be mounted here)."""
    mounted = []

    def mount(size):
        folder = tmp_path / "tmpfs"
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_full_disk_during_training_ends_with_one_error_and_the_earlier_set_resumes(
    tiny_images, whole_run, small_tmpfs, tmp_path
):
    sizes = {p.name: p.stat().st_size for p in whole_run.iterdir()}
    set_4 = sum(size for name, size in sizes.items() if "000004" in name)
    rest = sum(size for name, size in sizes.items() if "000004" not in name)
    # Room for everything but half of the set of step 4 (each file rounded up to whole pages, plus slack for logs).
    pages = sum(-(-size // 4096) for name, size in sizes.items() if "000004" not in name) * 4096
    full = small_tmpfs(pages + 64 * 1024 + set_4 // 2)
    assert rest < pages + set_4 // 2 < rest + set_4

    status, _, err = run_script("image_train.py", dict(TRAIN, data_dir=tiny_images), full)
    assert_one_error_line_per_rank(status, err, 1, f"checkpoint set of step 4 in {full}", "No space left on device",
                                   f"--resume_checkpoint {full / 'model000002.pt'}")
    assert not [p.name for p in full.iterdir() if "000004" in p.name or p.name.endswith(".tmp")]
    set_2 = set_names(2, ("0.9999",)) + ["state000002.pt"]
    assert_same_files(full, whole_run, set_2)  # the earlier set is whole and holds what the run saved

    resumed = tmp_path / "resumed"
    status, _, err = run_script("image_train.py", dict(TRAIN, data_dir=tiny_images,
                                                      resume_checkpoint=full / "model000002.pt"), resumed)
    assert status == 0, err
    assert_same_files(resumed, whole_run, set_names(4, ("0.9999",)))


def test_every_rank_ends_with_the_same_error_line(tiny_images, tmp_path):
    log_dir = tmp_path / "two_ranks"
    (log_dir / "opt000004.pt").mkdir(parents=True)
    status, _, err = run_script("image_train.py", dict(TRAIN, data_dir=tiny_images), log_dir, kind="mpiexec", ranks=2)
    assert_one_error_line_per_rank(status, err, 2, f"checkpoint set of step 4 in {log_dir}", "Is a directory",
                                   f"--resume_checkpoint {log_dir / 'model000002.pt'}")
    assert checkpointing.latest_complete(str(log_dir)) == str(log_dir / "model000002.pt")
    assert sorted(p.name for p in log_dir.iterdir() if "000004" in p.name) == ["opt000004.pt"]  # the obstacle
