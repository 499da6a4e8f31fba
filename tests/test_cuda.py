"""
GPU paths: no host synchronization in the sampling loops, autocast on CUDA,
and a train -> sample run through the real scripts on NCCL. Skipped without CUDA.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from improved_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = dict(
    image_size=16, num_channels=32, num_res_blocks=1, attention_resolutions="8", learn_sigma=True,
    diffusion_steps=100, noise_schedule="cosine", class_cond=True, num_classes=10,
)


def tiny_model_and_diffusion(**overrides):
    flags = model_and_diffusion_defaults()
    flags.update(TINY, **overrides)
    model, diffusion = create_model_and_diffusion(**flags)
    return model.cuda().eval(), diffusion


@pytest.mark.parametrize("use_ddim", [True, False])
def test_sampling_loops_make_no_host_sync(use_ddim):
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="ddim10")
    loop = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
    kwargs = {"y": torch.arange(4, device="cuda")}
    loop(model, (4, 3, 16, 16), model_kwargs=kwargs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sample = loop(model, (4, 3, 16, 16), model_kwargs=kwargs, generator=torch.Generator("cuda").manual_seed(0))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert sample.device.type == "cuda" and torch.isfinite(sample).all()


@pytest.mark.parametrize(
    "sampler", ["ddpm", "ddim", "plms", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc"]
)
def test_every_sampler_makes_no_host_sync(sampler):
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="logsnr8")
    kwargs = {"y": torch.arange(4, device="cuda")}
    diffusion.sample_loop(model, (4, 3, 16, 16), sampler, model_kwargs=kwargs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sample = diffusion.sample_loop(model, (4, 3, 16, 16), sampler, model_kwargs=kwargs,
                                       generator=torch.Generator("cuda").manual_seed(0))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert sample.device.type == "cuda" and torch.isfinite(sample).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_forward_is_close_to_float32(dtype):
    torch.manual_seed(0)
    model, _ = tiny_model_and_diffusion()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x = torch.randn(4, 3, 16, 16, device="cuda")
    t = torch.tensor([1, 10, 50, 99], device="cuda")
    y = torch.tensor([0, 3, 5, 9], device="cuda")
    with torch.no_grad():
        reference = model(x, t, y=y)
        with torch.autocast("cuda", dtype=dtype):
            mixed = model(x, t, y=y)
    assert torch.isfinite(mixed).all()
    error = (mixed.float() - reference).norm() / reference.norm()
    assert error < 0.05, error


def _write_pngs(folder, count=16):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i % 4}_{i:03d}.png")


def _run(script, args, log_dir):
    env = dict(os.environ, OPENAI_LOGDIR=str(log_dir))
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.parametrize("precision", ["--use_fp16", "--use_bf16"])
def test_train_then_sample_on_gpu(tmp_path, precision):
    _write_pngs(tmp_path / "data")
    flags = [f"--{k}={v}" for k, v in TINY.items()]
    run_dir = tmp_path / "run"
    _run("image_train.py", ["--data_dir", str(tmp_path / "data"), "--batch_size", "4", "--max_steps", "3",
                            "--save_interval", "3", precision, "True", *flags], run_dir)
    assert (run_dir / "model000003.pt").exists() and (run_dir / "opt000003.pt").exists()
    progress = (run_dir / "progress.csv").read_text()
    if precision == "--use_fp16":
        assert "lg_loss_scale" in progress
    _run("image_sample.py", ["--model_path", str(run_dir / "model000003.pt"), "--use_ddim", "True",
                             "--timestep_respacing", "ddim5", "--num_samples", "5", "--batch_size", "2"], tmp_path / "samples")
    with np.load(tmp_path / "samples" / "samples_5x16x16x3.npz") as data:
        assert data["arr_0"].shape == (5, 16, 16, 3) and data["arr_0"].dtype == np.uint8
        assert data["arr_1"].shape == (5,)
