"""
scripts/reconstruct_ema.py on a folder of power-function EMA snapshots of a
tiny UNet (weights moved by a random walk, tracked with PowerFunctionEMA):
the reconstruction against a profile tracked directly, sampling from the
written file by --model_path alone, and every error path.
"""

import importlib.util
import os
import pathlib
import re
import shutil

import numpy as np
import pytest
import torch
from _in_process import run_in_process

from improved_diffusion.io_util import atomic_torch_save, load_checkpoint
from improved_diffusion.posthoc_ema import PowerFunctionEMA, snapshot_filename
from improved_diffusion.run_flags import write_run_flags
from improved_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "reconstruct_ema.py"
FLAGS = dict(model_and_diffusion_defaults(), image_size=8, num_channels=32, num_res_blocks=1,
             attention_resolutions="", diffusion_steps=20, noise_schedule="cosine", learn_sigma=True)
NUM_UPDATES = 300
INTERVAL = 20
COMPARED_AT = (160, NUM_UPDATES)

spec = importlib.util.spec_from_file_location("reconstruct_ema", SCRIPT)
reconstruct_ema = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reconstruct_ema)


def build_model():
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**FLAGS)
    return model


def state_with(model, values):
    """The model's state dict with `values` in place of its parameters."""
    state = model.state_dict()
    for (name, _), value in zip(model.named_parameters(), values):
        state[name] = value.clone()
    return state


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """
    A run folder: flags.json and snapshots of sigma_rel 0.05 and 0.10 every
    INTERVAL updates; returns (folder, {step: the directly tracked 0.08 state dict}).
    """
    folder = tmp_path_factory.mktemp("run")
    write_run_flags(str(folder), FLAGS)
    model = build_model()
    params = [p.detach() for p in model.parameters()]
    tracker = PowerFunctionEMA(params, [0.05, 0.08, 0.10])
    gen = torch.Generator().manual_seed(1)
    tracked = {}
    with torch.no_grad():
        for n in range(1, NUM_UPDATES + 1):
            for p in params:
                p.add_(torch.randn(p.shape, generator=gen), alpha=0.01).add_(0.001)
            tracker.update(n)
            if n % INTERVAL == 0:
                for std in (0.05, 0.10):
                    atomic_torch_save(state_with(model, tracker.average(std)), str(folder / snapshot_filename(std, n)))
            if n in COMPARED_AT:
                tracked[n] = {std: state_with(model, tracker.average(std)) for std in (0.05, 0.08, 0.10)}
    return folder, tracked


def fresh_copy(run_dir, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(run_dir[0], folder)
    return folder


def run_main(argv, capsys):
    """(exit status, stdout, stderr) of reconstruct_ema.main(argv)."""
    try:
        reconstruct_ema.main([str(a) for a in argv])
        status = 0
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def the_error_line(err):
    """The one error line of stderr (argparse may print a usage line before it); no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error: " in line]
    assert len(lines) == 1, err
    return lines[0]


def relative_miss(state, tracked):
    """||state - tracked 0.08|| / ||tracked 0.05 - tracked 0.10|| over the parameters."""
    miss = sum(((state[k].double() - tracked[0.08][k].double()) ** 2).sum() for k in tracked[0.08])
    spread = sum(((tracked[0.05][k].double() - tracked[0.10][k].double()) ** 2).sum() for k in tracked[0.08])
    return (miss / spread).sqrt().item()


def test_reconstructs_the_tracked_profile(run_dir, tmp_path, capsys):
    folder = fresh_copy(run_dir, tmp_path)
    status, out, err = run_main(["--log_dir", folder, "--ema_std", "0.08"], capsys)
    assert status == 0, err
    path = folder / f"ema_std0.080_{NUM_UPDATES:06d}.pt"
    assert f"wrote {path}" in out
    lines = re.findall(r"^  (phema_\S+) -> ([-+]\d\.\d+)$", out, flags=re.M)
    assert [name for name, _ in lines] == [
        snapshot_filename(std, n) for n in range(INTERVAL, NUM_UPDATES + 1, INTERVAL) for std in (0.05, 0.10)
    ]
    assert sum(float(c) for _, c in lines) == pytest.approx(1.0, abs=1e-5)
    error = float(re.search(r"relative error of the profile: (\S+)", out).group(1))
    assert 0 < error < 0.01
    state = load_checkpoint(str(path))
    model = build_model()
    model.load_state_dict(state)  # strict: the model's keys exactly
    assert relative_miss(state, run_dir[1][NUM_UPDATES]) < 0.01


def test_an_earlier_step_uses_the_snapshots_up_to_it(run_dir, tmp_path, capsys):
    folder = fresh_copy(run_dir, tmp_path)
    status, out, err = run_main(["--log_dir", folder, "--ema_std", "0.08", "--step", 160], capsys)
    assert status == 0, err
    names = re.findall(r"^  (phema_\S+) ->", out, flags=re.M)
    assert names and all(int(name[-9:-3]) <= 160 for name in names)
    assert len(names) == 2 * (160 // INTERVAL)
    state = load_checkpoint(str(folder / "ema_std0.080_000160.pt"))
    assert relative_miss(state, run_dir[1][160]) < 0.01


def test_a_step_between_snapshots_misses_the_weights_after_the_last(run_dir, tmp_path, capsys):
    folder = fresh_copy(run_dir, tmp_path)
    status, _, err = run_main(["--log_dir", folder, "--ema_std", "0.08", "--step", 150], capsys)
    line = the_error_line(err)
    assert status == 2 and "the 14 snapshots up to step 150 (sigma_rel 0.050, 0.100, the last at step 140)" in line
    assert not list(folder.glob("ema_std*.pt"))


def test_several_stds_write_one_file_each_and_the_result_samples(run_dir, tmp_path, capsys):
    folder = fresh_copy(run_dir, tmp_path)
    status, out, err = run_main(["--log_dir", folder, "--ema_std", "0.06,0.12"], capsys)
    assert status == 0, err
    made = sorted(p.name for p in folder.glob("ema_std*.pt"))
    assert made == [f"ema_std0.060_{NUM_UPDATES:06d}.pt", f"ema_std0.120_{NUM_UPDATES:06d}.pt"]
    assert out.count("relative error of the profile") == 2
    first, second = (load_checkpoint(str(folder / name)) for name in made)
    assert not torch.equal(first["out.2.weight"], second["out.2.weight"])
    log_dir = tmp_path / "samples"
    env = dict(os.environ, OPENAI_LOGDIR=str(log_dir), OMP_NUM_THREADS="1")
    args = ["--model_path", folder / made[0], "--use_ddim", "True", "--timestep_respacing", "ddim3",
            "--num_samples", "2", "--batch_size", "2"]
    result = run_in_process(ROOT / "scripts" / "image_sample.py", args, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    with np.load(log_dir / "samples_2x8x8x3.npz") as data:
        assert data["arr_0"].shape == (2, 8, 8, 3) and data["arr_0"].dtype == np.uint8


def test_no_snapshots_says_training_needs_ema_std(tmp_path, capsys):
    status, _, err = run_main(["--log_dir", tmp_path, "--ema_std", "0.08"], capsys)
    line = the_error_line(err)
    assert status == 2
    assert f"--log_dir {tmp_path}: no post-hoc EMA snapshots" in line and "train with --ema_std" in line


def test_an_unrepresentable_std_names_the_range_that_is(run_dir, tmp_path, capsys):
    folder = fresh_copy(run_dir, tmp_path)
    status, _, err = run_main(["--log_dir", folder, "--ema_std", "0.01"], capsys)
    line = the_error_line(err)
    assert status == 2 and "--ema_std 0.01" in line and "cannot represent sigma_rel 0.01" in line
    lo, hi = map(float, re.search(r"they cover sigma_rel (\S+) to (\S+):", line).groups())
    assert 0.01 < lo < 0.05 and 0.1 < hi < 0.2887
    assert not list(folder.glob("ema_std*.pt"))
    status, _, err = run_main(["--log_dir", folder, "--ema_std", f"{lo},{hi}"], capsys)  # both ends work
    assert status == 0, err
    below = round(lo - 0.002, 3)
    status, _, err = run_main(["--log_dir", folder, "--ema_std", str(below)], capsys)
    assert status == 2 and f"cannot represent sigma_rel {below}" in the_error_line(err)


def test_a_step_long_after_the_snapshots_represents_nothing(run_dir, tmp_path, capsys):
    folder = fresh_copy(run_dir, tmp_path)
    status, _, err = run_main(["--log_dir", folder, "--ema_std", "0.08", "--step", 5000], capsys)
    assert status == 2 and "they represent no sigma_rel that well" in the_error_line(err)


def test_a_step_before_the_first_snapshot_names_it(run_dir, tmp_path, capsys):
    folder = fresh_copy(run_dir, tmp_path)
    status, _, err = run_main(["--log_dir", folder, "--ema_std", "0.08", "--step", INTERVAL - 1], capsys)
    line = the_error_line(err)
    assert status == 2
    assert f"--step {INTERVAL - 1} is before the first snapshot ({snapshot_filename(0.05, INTERVAL)}, " \
           f"step {INTERVAL}); pass --step {INTERVAL} or later" in line


@pytest.mark.parametrize("argv, flag, message", [
    (["--ema_std", "0.3"], "--ema_std 0.3", "outside (0, 0.2887)"),
    (["--ema_std", "0"], "--ema_std 0", "outside (0, 0.2887)"),
    (["--ema_std", "0.05,0.08,0.05"], "--ema_std 0.05,0.08,0.05", "given more than once"),
    (["--ema_std", "0.0805"], "--ema_std 0.0805", "more than 3 decimals"),
    (["--ema_std", "big"], "--ema_std big", "'big' is not a number"),
    (["--ema_std", "0.08", "--step", "0"], "--step 0", "must be >= 1"),
    (["--ema_std", "0.08", "--step", "x"], "--step", "invalid int value"),
    ([], "--ema_std", "required"),
])
def test_usage_errors_exit_2_naming_the_flag(run_dir, argv, flag, message, capsys):
    status, _, err = run_main(["--log_dir", run_dir[0], *argv], capsys)
    line = the_error_line(err)
    assert status == 2 and flag in line and message in line


def test_a_corrupt_snapshot_exits_1_naming_the_file(run_dir, tmp_path):
    folder = fresh_copy(run_dir, tmp_path)
    bad = folder / snapshot_filename(0.10, 100)
    bad.write_bytes(bad.read_bytes()[:500])
    result = run_in_process(SCRIPT, ["--log_dir", folder, "--ema_std", "0.08"], cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: cannot load {bad} as a checkpoint")
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert not list(folder.glob("ema_std*.pt")) and not list(folder.glob(".ema_std*"))


def test_a_snapshot_of_another_model_exits_1_naming_the_file(run_dir, tmp_path, capsys):
    folder = fresh_copy(run_dir, tmp_path)
    odd = folder / snapshot_filename(0.05, 200)
    state = load_checkpoint(str(odd))
    state["extra.weight"] = torch.zeros(3)
    atomic_torch_save(state, str(odd))
    status, _, err = run_main(["--log_dir", folder, "--ema_std", "0.08"], capsys)
    assert status == 1
    assert err.startswith(f"error: {odd} has other keys than ") and len(err.splitlines()) == 1


def test_runs_as_a_script(run_dir, tmp_path):
    folder = fresh_copy(run_dir, tmp_path)
    result = run_in_process(SCRIPT, ["--log_dir", folder, "--ema_std", "0.09"], cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    assert (folder / f"ema_std0.090_{NUM_UPDATES:06d}.pt").exists() and result.stderr == ""
