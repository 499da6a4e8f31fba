"""Shared pieces of the training tests: tiny models, image folders, script runs and launches, checkpoint comparison."""

import contextlib
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from _in_process import run_in_process
from _launch import BIN, MPIEXEC, ROOT, kill_tree, run_command, start_command
from PIL import Image

from improved_diffusion import logger, script_util
from improved_diffusion.io_util import load_checkpoint
from improved_diffusion.train_util import TrainLoop

# A model small enough for a CPU step in tens of milliseconds.
TINY_MODEL = {
    "image_size": 8,
    "num_channels": 32,
    "num_res_blocks": 1,
    "attention_resolutions": "",
    "diffusion_steps": 8,
    "noise_schedule": "cosine",
    "learn_sigma": True,
}


@contextlib.contextmanager
def single_thread():
    """One torch thread inside the block: on a shared 2-core machine two threads can be ~40x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def train_env():
    """
    Run an in-process training test with one thread, then put back torch's
    global random state and close the logger it configured.
    """
    with single_thread(), torch.random.fork_rng():
        yield
    logger.reset()


def tiny_flags(**overrides):
    """Model flags for TINY_MODEL with `overrides`."""
    return {**script_util.model_and_diffusion_defaults(), **TINY_MODEL, **overrides}


def cli_flags(flags):
    """['--key', 'value', ...] for a dict of flags."""
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))]


class SyntheticData:
    """
    An endless iterator of [batch x 3 x size x size] images in [-1, 1] (batch
    i is seeded by i), with NaN batches at the indices in `nan_batches` and a
    position that state_dict()/load_state_dict() save and restore.
    """

    def __init__(self, batch_size=2, image_size=8, nan_batches=()):
        self.batch_size = batch_size
        self.image_size = image_size
        self.nan_batches = set(nan_batches)
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self):
        g = torch.Generator().manual_seed(self.index)
        images = torch.rand(self.batch_size, 3, self.image_size, self.image_size, generator=g) * 2 - 1
        if self.index in self.nan_batches:
            images[0, 0, 0, 0] = float("nan")
        self.index += 1
        return images, {}

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]


def make_loop(log_dir, data=None, model_flags=None, **loop_args):
    """A TrainLoop on a freshly seeded TINY_MODEL logging (csv, log) to `log_dir`."""
    flags = model_flags or tiny_flags()
    logger.configure(dir=str(log_dir), format_strs=["csv", "log"])
    torch.manual_seed(0)
    model, diffusion = script_util.create_model_and_diffusion(**flags)
    args = {
        "batch_size": 2,
        "microbatch": -1,
        "lr": 1e-3,
        "ema_rate": "0.99",
        "log_interval": 2,
        "save_interval": 1000,
        "resume_checkpoint": "",
        "seed": 0,
        "run_flags": flags,
    }
    args.update(loop_args)
    return TrainLoop(model=model, diffusion=diffusion, data=data or SyntheticData(), **args)


def snapshot(loop):
    """Copies of the weights, EMA and AdamW state of `loop`."""
    return {
        "params": [p.detach().clone() for p in loop.params],
        "ema": [[p.clone() for p in ema] for ema in loop.ema_params],
        "opt": {k: v.clone() for s in loop.opt.state.values() for k, v in s.items()},
    }


def any_param_changed(loop, before):
    """Whether any weight of `loop` differs from the snapshot `before`."""
    return any(p.detach().ne(q).any() for p, q in zip(loop.params, before["params"]))


def assert_same(a, b, where="value"):
    """Recursive bitwise equality of tensors, dicts, lists and plain values."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{where}: tensors differ"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_files(dir_a, dir_b, names):
    """The checkpoint files `names` hold bitwise the same data in both folders."""
    for name in names:
        assert_same(load_checkpoint(pathlib.Path(dir_a, name)), load_checkpoint(pathlib.Path(dir_b, name)), name)


def set_names(step, rates=("0.9999",)):
    """The model, EMA and optimizer file names of the set of `step`."""
    return [f"model{step:06d}.pt", *(f"ema_{r}_{step:06d}.pt" for r in rates), f"opt{step:06d}.pt"]


def write_images(folder, count, size=8, mode="RGB", prefix="img"):
    """`count` random PNGs of `size` x `size` in `folder` (created); returns the folder."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(count)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
        Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(folder / f"{prefix}_{i}.png")
    return folder


def script_env(log_dir, threads=1):
    """The environment for a training script writing to `log_dir`."""
    env = dict(os.environ)
    env.update(
        OPENAI_LOGDIR=str(log_dir),
        OPENAI_LOG_FORMAT="stdout,log,csv",
        OMP_NUM_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
    )
    return env


def launcher(kind, ranks):
    """
    The command prefix that starts `ranks` processes of a Python script:
    "python" or "process" (a fresh interpreter), "mpiexec", "torchrun".
    """
    if kind in ("python", "process"):
        return [sys.executable]
    if kind == "mpiexec":
        if MPIEXEC is None:
            pytest.skip("mpiexec not installed (pip install mpich mpi4py)")
        return [MPIEXEC, "-n", str(ranks), sys.executable]
    if kind == "torchrun":
        return [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={ranks}"]
    raise ValueError(kind)


def script_command(script, flags, kind, ranks):
    """The command line of scripts/`script` with `flags` under launcher `kind` with `ranks` processes."""
    return launcher(kind, ranks) + [str(ROOT / "scripts" / script)] + cli_flags(flags)


def start_script(script, flags, log_dir, kind="python", ranks=1):
    """
    Start scripts/`script` in a real process (a fresh interpreter for "python",
    or the ranks of a launcher) in its own session; returns a
    _launch.Launch (a subprocess.Popen whose communicate() gives the text
    written to stdout and stderr).
    """
    return start_command(script_command(script, flags, kind, ranks), env=script_env(log_dir), cwd=ROOT)


def run_script(script, flags, log_dir, kind="python", ranks=1, timeout=180):
    """
    Run scripts/`script` to the end; returns (returncode, stdout, stderr).
    kind "python" runs it in this process (_in_process.run_in_process, as
    `python script.py` would; `timeout` does not apply); "process",
    "mpiexec" and "torchrun" launch real processes, killed past `timeout`.
    """
    if kind == "python":
        result = run_in_process(ROOT / "scripts" / script, cli_flags(flags), env=script_env(log_dir), cwd=ROOT)
        return result.returncode, result.stdout, result.stderr
    try:
        result = run_command(script_command(script, flags, kind, ranks), env=script_env(log_dir), cwd=ROOT,
                             timeout=timeout)
    except subprocess.TimeoutExpired as late:
        raise AssertionError(f"{script} did not finish in {timeout}s\n{late.output}\n{late.stderr}") from None
    return result.returncode, result.stdout, result.stderr


def wait_for(path, proc, min_lines=0, timeout=120):
    """
    Wait until `path` exists (and has more than `min_lines` lines); fail if
    `proc` ends first or time runs out.
    """
    path = pathlib.Path(path)
    deadline = time.monotonic() + timeout
    while not (path.exists() and (not min_lines or len(path.read_text().splitlines()) > min_lines)):
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended (status {proc.returncode}) before {path} was ready\n{out}\n{err}")
        if time.monotonic() > deadline:
            kill_group(proc)
            raise AssertionError(f"{path} was not ready in {timeout}s")
        time.sleep(0.05)


def kill_group(proc):
    """SIGKILL what start_script started (its session and every process below it: kill -9), and reap it."""
    kill_tree(proc)
