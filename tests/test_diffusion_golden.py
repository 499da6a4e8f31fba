"""Faithfulness: the diffusion core reproduces the reference's golden outputs."""

import pytest
import torch

from improved_diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,
)
from improved_diffusion.losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl
from improved_diffusion.nn import timestep_embedding
from improved_diffusion.resample import LossSecondMomentResampler
from improved_diffusion.respace import space_timesteps

from golden_compare import assert_rel, case_label, check_case


@pytest.fixture(scope="module")
def cases(golden_dir):
    return torch.load(golden_dir / "diffusion_cases.pt", weights_only=True)


def of_kind(cases, kind):
    selected = [c for c in cases if c["kind"] == kind]
    assert selected, f"no {kind} cases in the golden file"
    return selected


def test_schedules(cases):
    for case in of_kind(cases, "schedule"):
        diffusion = GaussianDiffusion(
            betas=get_named_beta_schedule(case["name"], case["steps"]),
            model_mean_type=ModelMeanType.EPSILON,
            model_var_type=ModelVarType.FIXED_LARGE,
            loss_type=LossType.MSE,
        )
        for attr, expected in case["expected"].items():
            assert_rel(getattr(diffusion, attr), expected, rtol=1e-10, name=f"{case['name']}/{attr}")


def test_spacing(cases):
    for case in of_kind(cases, "spacing"):
        if case["expected"] == "ValueError":
            with pytest.raises(ValueError):
                space_timesteps(case["num_timesteps"], case["section_counts"])
        else:
            assert sorted(space_timesteps(case["num_timesteps"], case["section_counts"])) == case["expected"]


def test_losses(cases):
    for case in of_kind(cases, "losses"):
        exp = case["expected"]
        m1, lv1, m2, lv2 = case["mean1"], case["logvar1"], case["mean2"], case["logvar2"]
        assert_rel(normal_kl(m1, lv1, m2, lv2), exp["normal_kl"], name="normal_kl")
        assert_rel(normal_kl(m1, lv1, 0.0, 0.0), exp["normal_kl_scalar"], name="normal_kl_scalar")
        assert_rel(approx_standard_normal_cdf(m1 * 3), exp["approx_standard_normal_cdf"], name="cdf")
        assert_rel(
            discretized_gaussian_log_likelihood(case["x"], means=m1, log_scales=0.5 * lv1),
            exp["discretized_gaussian_log_likelihood"],
            name="discretized",
        )


def test_timestep_embedding(cases):
    # Phases reach 1000 rad, whose float32 spacing is 6e-5: the reference's CPU
    # rounds exp() of some frequencies one ulp differently, moving cos/sin by that much.
    for case in of_kind(cases, "timestep_embedding"):
        got = timestep_embedding(case["timesteps"], case["dim"])
        assert_rel(got, case["expected"], atol=6e-5, name="embedding")


def test_resampler(cases):
    for case in of_kind(cases, "resampler"):

        class Stub:
            num_timesteps = case["num_timesteps"]

        sampler = LossSecondMomentResampler(Stub(), case["history_per_term"], case["uniform_prob"])
        sampler.update_with_all_losses(case["ts"], case["losses"])
        assert_rel(sampler.weights(), case["expected"]["weights"], rtol=1e-10, name="weights")


def test_diffusion_cases(cases):
    selected = of_kind(cases, "diffusion")
    assert any("ddim_sample_loop" in c["expected"] for c in selected)
    for i, case in enumerate(selected):
        check_case(case, case_label(i, case))


