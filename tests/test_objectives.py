"""
SPEC 15's training objectives at the library level: v-prediction, min-SNR-gamma
weighting and the zero-terminal-SNR rescale (Salimans & Ho 2022, Hang et al.
2023, Lin et al. 2023).
"""

import numpy as np
import pytest
import torch

from improved_diffusion import samplers
from improved_diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,
    rescale_zero_terminal_snr,
)
from improved_diffusion.mixture import GaussianMixture
from improved_diffusion.respace import SpacedDiffusion, space_timesteps

MIXTURE = GaussianMixture([0.3, 0.7], [[-0.4, 0.2], [0.4, -0.1]], [0.3, 0.25])


def diffusion(mean_type="EPSILON", betas=None, snr_gamma=0.0, loss_type=LossType.MSE, var_type="FIXED_SMALL"):
    betas = get_named_beta_schedule("cosine", 100) if betas is None else betas
    return GaussianDiffusion(betas=betas, model_mean_type=ModelMeanType[mean_type],
                             model_var_type=ModelVarType[var_type], loss_type=loss_type, snr_gamma=snr_gamma)


def test_v_eps_and_x0_conversions_invert_each_other():
    d = diffusion("VELOCITY")
    gen = torch.Generator().manual_seed(0)
    x_start, noise = torch.randn(6, 3, 4, 4, generator=gen), torch.randn(6, 3, 4, 4, generator=gen)
    t = torch.tensor([0, 10, 40, 70, 98, 99])
    x_t = d.q_sample(x_start, t, noise=noise)
    alpha = torch.from_numpy(d.sqrt_alphas_cumprod)[t].float().view(-1, 1, 1, 1)
    sigma = torch.from_numpy(d.sqrt_one_minus_alphas_cumprod)[t].float().view(-1, 1, 1, 1)
    v = alpha * noise - sigma * x_start
    pred_xstart = d._pred_xstart(v, x_t, t, clip_denoised=False, denoised_fn=None)
    torch.testing.assert_close(pred_xstart, x_start, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d._predict_eps_from_xstart(x_t, t, pred_xstart), noise, rtol=1e-3, atol=1e-3)
    # The training target of a v model is that v: a model that outputs it has zero loss.
    loss = d.training_losses(lambda x, ts: v, x_start, t, noise=noise)["mse"]
    assert loss.max() < 1e-10


@pytest.mark.parametrize("mean_type", ["EPSILON", "START_X", "VELOCITY"])
def test_min_snr_weights_follow_their_formulas(mean_type):
    gamma = 5.0
    d, plain = diffusion(mean_type, snr_gamma=gamma), diffusion(mean_type)
    t = torch.arange(0, 100, 7)
    x_start = torch.randn(len(t), 3, 4, 4, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(len(t), 3, 4, 4, generator=torch.Generator().manual_seed(2))
    model = lambda x, ts: torch.zeros_like(x)
    weighted = d.training_losses(model, x_start, t, noise=noise)["mse"]
    unweighted = plain.training_losses(model, x_start, t, noise=noise)["mse"]
    abar = d.alphas_cumprod[t.numpy()]
    snr = abar / (1 - abar)
    expected = {
        "EPSILON": np.minimum(snr, gamma) / snr,
        "START_X": np.minimum(snr, gamma),
        "VELOCITY": np.minimum(snr, gamma) / (snr + 1),
    }[mean_type]
    np.testing.assert_allclose((weighted / unweighted).numpy(), expected, rtol=1e-5)


def test_snr_gamma_with_a_kl_loss_is_an_error():
    with pytest.raises(ValueError, match="--use_kl"):
        diffusion(snr_gamma=5.0, loss_type=LossType.RESCALED_KL)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_zero_terminal_rescale(schedule):
    betas = get_named_beta_schedule(schedule, 1000)
    rescaled = rescale_zero_terminal_snr(betas)
    d, original = diffusion("VELOCITY", rescaled), diffusion("VELOCITY", betas)
    assert d.alphas_cumprod[-1] == 0.0
    np.testing.assert_allclose(d.alphas_cumprod[0], original.alphas_cumprod[0], rtol=1e-12)
    assert np.all(np.diff(d.alphas_cumprod) < 0)
    for name in ("posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
                 "posterior_mean_coef2", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_betas"):
        assert np.all(np.isfinite(getattr(d, name))), name


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc"])
@pytest.mark.parametrize("mean_type", ["VELOCITY", "START_X"])
def test_sampling_from_zero_terminal_snr_is_finite_and_right(sampler, mean_type):
    betas = rescale_zero_terminal_snr(get_named_beta_schedule("linear", 1000))
    # Ancestral sampling with the small posterior variance needs more steps to get the spread right.
    steps = 250 if sampler == "ddpm" else 25
    spaced = SpacedDiffusion(use_timesteps=space_timesteps(1000, f"trailing{steps}"), betas=betas,
                             model_mean_type=ModelMeanType[mean_type], model_var_type=ModelVarType.FIXED_SMALL,
                             loss_type=LossType.MSE)
    assert spaced.alphas_cumprod[-1] == 0.0, "trailing spacing starts at abar = 0"
    model = MIXTURE.model(np.cumprod(1 - betas), mean_type)
    n = 4000
    out = spaced.sample_loop(model, (n, 2), sampler, clip_denoised=False, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
    mean, cov = MIXTURE.moments()
    assert (out.mean(0) - mean).abs().max() < 0.05
    assert (torch.cov(out.T) - cov).abs().max() < 0.05


@pytest.mark.parametrize("sampler", samplers.NEED_NONZERO_ABAR)
def test_samplers_in_x_over_alpha_refuse_abar_zero(sampler):
    betas = rescale_zero_terminal_snr(get_named_beta_schedule("linear", 100))
    d = diffusion("VELOCITY", betas)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        d.sample_loop(MIXTURE.model(d.alphas_cumprod, "VELOCITY"), (2, 2), sampler)


def test_eps_model_at_abar_zero_is_an_error_that_says_so():
    d = diffusion("EPSILON", rescale_zero_terminal_snr(get_named_beta_schedule("linear", 100)))
    with pytest.raises(ValueError, match="predicts x_0"):
        d.sample_loop(MIXTURE.model(d.alphas_cumprod), (2, 2), "dpmpp_2m")
