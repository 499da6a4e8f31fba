"""Shared by the golden and regression tests: run a `diffusion` case the golden README's way and compare."""

import torch

from improved_diffusion.gaussian_diffusion import LossType, ModelMeanType, ModelVarType, get_named_beta_schedule
from improved_diffusion.respace import SpacedDiffusion, space_timesteps

from diffusion_probe import ProbeModel


def assert_rel(actual, expected, rtol=2e-5, atol=0.0, name=""):
    """
    Elementwise |a - e| <= rtol * max(|e|, 0.05 max|e|) + atol: relative, with a
    floor for entries near zero (float32 rounding of their neighbours' scale).
    """
    actual = torch.as_tensor(actual).double()
    expected = torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    scale = expected.abs().clamp(min=0.05 * float(expected.abs().max()) + 1e-12)
    err = ((actual - expected).abs() - atol).clamp(min=0) / scale
    assert err.max().item() <= rtol, f"{name}: max relative error {err.max().item():.3g} > {rtol}"


def build_case_diffusion(case):
    respacing = case["respacing"] or [case["steps"]]
    return SpacedDiffusion(
        use_timesteps=space_timesteps(case["steps"], respacing),
        betas=get_named_beta_schedule(case["schedule"], case["steps"]),
        model_mean_type=ModelMeanType[case["mean_type"]],
        model_var_type=ModelVarType[case["var_type"]],
        loss_type=LossType[case["loss_type"]],
        rescale_timesteps=case["rescale_timesteps"],
    )


def run_case(case):
    """Every call the golden README lists for a `diffusion` case, on this implementation."""
    diffusion = build_case_diffusion(case)
    model = ProbeModel(case["model_out_channels"])
    kw = {"y": case["y"]}
    x_start, x_t, t = case["x_start"], case["x_t"], case["t"]
    got = {
        "timestep_map": diffusion.timestep_map,
        "betas": diffusion.betas,
        "q_sample": diffusion.q_sample(x_start, t, noise=case["noise"]),
        "q_mean_variance": diffusion.q_mean_variance(x_start, t),
        "q_posterior_mean_variance": diffusion.q_posterior_mean_variance(x_start, x_t, t),
        "training_losses": diffusion.training_losses(model, x_start, t, model_kwargs=kw, noise=case["noise"]),
        "ddim_sample": diffusion.ddim_sample(model, x_t, t, clip_denoised=True, model_kwargs=kw, eta=0.0),
        "ddim_reverse_sample": diffusion.ddim_reverse_sample(
            model, x_t, case["t_reverse"], clip_denoised=False, model_kwargs=kw
        ),
    }
    for clip in (True, False):
        got[f"p_mean_variance_clip{clip}"] = diffusion.p_mean_variance(
            model, x_t, t, clip_denoised=clip, model_kwargs=kw
        )
    if "ddim_sample_loop" in case["expected"]:
        got["ddim_sample_loop"] = diffusion.ddim_sample_loop(
            model, x_start.shape, noise=case["loop_noise"], clip_denoised=True,
            model_kwargs=kw, eta=0.0, device=torch.device("cpu"),
        )
    return got


def compare(got, expected, name, rtol=2e-5):
    if isinstance(expected, dict):
        assert set(got) == set(expected), f"{name}: keys {sorted(got)} != {sorted(expected)}"
        for key in expected:
            compare(got[key], expected[key], f"{name}/{key}", rtol)
    elif isinstance(expected, (tuple, list)) and not isinstance(got, list):
        assert len(got) == len(expected), name
        for i, (g, e) in enumerate(zip(got, expected)):
            compare(g, e, f"{name}[{i}]", rtol)
    elif name.endswith("timestep_map"):
        assert list(got) == torch.as_tensor(expected).tolist(), name
    elif name.endswith("/betas"):
        assert_rel(got, expected, rtol=1e-10, name=name)
    else:
        assert_rel(got, expected, rtol=rtol, name=name)


def tolerance(case, key):
    """
    2e-5, except where the probe's float32 sin (which differs from the
    reference machine's by ~1e-7) is amplified: over a 45-step loop, and by
    1/posterior_mean_coef1 (up to ~1e3) when x_0 is recovered from x_{t-1}.
    """
    if key == "ddim_sample_loop" or (key == "ddim_reverse_sample" and case["mean_type"] == "PREVIOUS_X"):
        return 2e-4
    return 2e-5


def check_case(case, label):
    """Run a diffusion case and compare every expected output it holds."""
    got = run_case(case)
    for key, expected in case["expected"].items():
        compare(got[key], expected, f"{label}/{key}", rtol=tolerance(case, key))


def case_label(i, case):
    return (
        f"case {i} ({case['schedule']} {case['steps']} '{case['respacing']}' {case['mean_type']} "
        f"{case['var_type']} {case['loss_type']} rescale={case['rescale_timesteps']})"
    )
