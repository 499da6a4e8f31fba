"""
Classifier guidance against openai/guided-diffusion's own outputs (the
`gd_cond` cases of ../shared/golden/guided/cases.pt): condition_mean,
condition_score, ddim_sample and ddim_sample_loop with a cond_fn.
"""

import pytest
import torch

from improved_diffusion.gaussian_diffusion import LossType, ModelMeanType, ModelVarType, get_named_beta_schedule
from improved_diffusion.respace import SpacedDiffusion, space_timesteps

from diffusion_probe import ProbeModel
from golden_compare import assert_rel


def cond_fn(x, t, y):
    """The golden README's cond_fn: cos(0.7 x + 0.001 t) (0.1 + 0.01 y), t and y broadcast per sample."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    return torch.cos(0.7 * x + 0.001 * t.float().view(shape)) * (0.1 + 0.01 * y.float().view(shape))


@pytest.fixture(scope="module")
def cond_cases(golden_dir):
    cases = torch.load(golden_dir / "guided" / "cases.pt", weights_only=True)
    return [case for case in cases if case["kind"] == "gd_cond"]


def build(case):
    return SpacedDiffusion(
        use_timesteps=space_timesteps(case["steps"], case["respacing"]),
        betas=get_named_beta_schedule(case["schedule"], case["steps"]),
        model_mean_type=ModelMeanType[case["mean_type"]],
        model_var_type=ModelVarType[case["var_type"]],
        loss_type=LossType.MSE,
        rescale_timesteps=False,
    )


def test_guided_diffusion_cond_cases_match(cond_cases):
    assert cond_cases, "no gd_cond cases in cases.pt"
    for index, case in enumerate(cond_cases):
        diffusion = build(case)
        model = ProbeModel(case["model_out_channels"])
        x, t, kw = case["x"], case["t"], {"y": case["y"]}
        expected = case["expected"]
        pmv = diffusion.p_mean_variance(model, x, t, clip_denoised=True, model_kwargs=kw)
        assert_rel(diffusion.condition_mean(cond_fn, pmv, x, t, model_kwargs=kw), expected["condition_mean"],
                   name=f"case {index} condition_mean")
        score = diffusion.condition_score(cond_fn, pmv, x, t, model_kwargs=kw)
        for key, value in expected["condition_score"].items():
            assert_rel(score[key], value, name=f"case {index} condition_score[{key}]")
        step = diffusion.ddim_sample(model, x, t, clip_denoised=True, model_kwargs=kw, cond_fn=cond_fn, eta=0.0)
        for key, value in expected["ddim_sample"].items():
            assert_rel(step[key], value, name=f"case {index} ddim_sample[{key}]")
        loop = diffusion.ddim_sample_loop(model, x.shape, noise=case["loop_noise"], clip_denoised=True,
                                          model_kwargs=kw, cond_fn=cond_fn, device=torch.device("cpu"), eta=0.0)
        assert_rel(loop, expected["ddim_sample_loop"], name=f"case {index} ddim_sample_loop")
