"""Restoration on a GPU: no step of any method copies between host and device or reads a device value back."""

import pytest
import torch

from improved_diffusion.operators import Colorize, Deblur, Inpaint, SuperRes, make_mask
from improved_diffusion.restoration import restore
from improved_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = [
    ("sdedit", "dpmpp_2m", None, {"t_start": 0.6}),
    ("replace", "ddpm", "inpaint", {}),
    ("repaint", "heun", "super_res", {"jump_length": 2, "jump_n_sample": 2}),
    ("ddnm", "unipc", "deblur", {}),
    ("ddnm", "ddpm", "colorize", {}),
    ("dps", "ddim", "super_res", {"scale": 0.5}),
]


def operator_of(task, sigma_y):
    return {
        None: None,
        "inpaint": Inpaint(make_mask("box", 16, 16), sigma_y=sigma_y),
        "super_res": SuperRes(2, sigma_y=sigma_y),
        "deblur": Deblur(1.0, 5, sigma_y=sigma_y),
        "colorize": Colorize(3, sigma_y=sigma_y),
    }[task]


@pytest.mark.parametrize("method, sampler, task, args", CASES)
def test_restoration_steps_make_no_host_sync(method, sampler, task, args):
    flags = dict(model_and_diffusion_defaults(), image_size=16, num_channels=32, num_res_blocks=1,
                 attention_resolutions="8", learn_sigma=True, diffusion_steps=100, noise_schedule="cosine",
                 timestep_respacing="logsnr6")
    model, diffusion = create_model_and_diffusion(**flags)
    model = model.cuda().eval()
    x = torch.rand(4, 3, 16, 16, device="cuda") * 2 - 1
    operator = operator_of(task, sigma_y=0.05)
    operator = None if operator is None else operator.to("cuda")
    y = x if operator is None else operator(x)
    run = lambda: restore(diffusion, model, y, operator, method=method, sampler=sampler,  # noqa: E731
                          generator=torch.Generator("cuda").manual_seed(0), **args)
    run()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        restored = run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert restored.device.type == "cuda" and torch.isfinite(restored).all()
