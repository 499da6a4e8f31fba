"""
Samplers driven by the exact noise predictor of a Gaussian mixture, whose
optimal eps is known in closed form, must reproduce the data distribution.
"""

import numpy as np
import pytest
import torch

from improved_diffusion.gaussian_diffusion import LossType, ModelMeanType, ModelVarType, get_named_beta_schedule
from improved_diffusion.respace import SpacedDiffusion, space_timesteps

WEIGHTS = torch.tensor([0.3, 0.7], dtype=torch.float64)
MEANS = torch.tensor([-0.6, 0.5], dtype=torch.float64)
STDS = torch.tensor([0.15, 0.2], dtype=torch.float64)
STEPS = 1000


class MixtureEpsModel:
    """
    E[eps | x_t] for 1-D data from a Gaussian mixture. At base timestep tau,
    x_t ~ sum_k w_k N(sqrt(abar) mu_k, v_k) with v_k = abar s_k² + 1 - abar, and
    E[eps | x_t] = sum_k r_k(x_t) sqrt(1 - abar) (x_t - sqrt(abar) mu_k) / v_k.
    """

    def __init__(self, alphas_cumprod):
        self.alphas_cumprod = torch.from_numpy(alphas_cumprod)

    def __call__(self, x, ts):
        abar = self.alphas_cumprod[ts.long()].view(-1, 1, 1, 1, 1)
        x = x.double().unsqueeze(-1)
        variances = abar * STDS**2 + 1 - abar
        centered = x - abar.sqrt() * MEANS
        log_r = torch.log(WEIGHTS) - 0.5 * torch.log(variances) - 0.5 * centered**2 / variances
        r = torch.softmax(log_r, dim=-1)
        return (r * (1 - abar).sqrt() * centered / variances).sum(-1)


def spaced(respacing, var=ModelVarType.FIXED_SMALL):
    return SpacedDiffusion(
        use_timesteps=space_timesteps(STEPS, respacing),
        betas=get_named_beta_schedule("cosine", STEPS),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=var,
        loss_type=LossType.MSE,
    )


def true_samples(n, seed):
    gen = torch.Generator().manual_seed(seed)
    component = torch.multinomial(WEIGHTS, n, replacement=True, generator=gen)
    return MEANS[component] + STDS[component] * torch.randn(n, generator=gen, dtype=torch.float64)


def wasserstein1(a, b):
    """W1 between two equally sized 1-D samples."""
    return (torch.sort(a.flatten()).values - torch.sort(b.flatten()).values).abs().mean().item()


@pytest.fixture(scope="module")
def model():
    return MixtureEpsModel(spaced([STEPS]).alphas_cumprod)


def x_T(n, seed):
    return torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


N = 4000


def test_ddim_approaches_the_data_distribution_as_steps_grow(model):
    reference = true_samples(N, 1)
    noise_floor = wasserstein1(true_samples(N, 2), reference)
    distances = []
    for steps in (5, 25, 200):
        samples = spaced(f"ddim{steps}").ddim_sample_loop(model, (N, 1, 1, 1), noise=x_T(N, 3), clip_denoised=False)
        distances.append(wasserstein1(samples, reference))
    assert distances[0] > distances[1] > distances[2], distances
    assert distances[2] < 4 * noise_floor, (distances, noise_floor)


def test_ancestral_sampling_with_1000_steps_matches_the_distribution(model):
    reference = true_samples(N, 4)
    noise_floor = wasserstein1(true_samples(N, 5), reference)
    samples = spaced([STEPS]).p_sample_loop(
        model, (N, 1, 1, 1), noise=x_T(N, 6), clip_denoised=False, generator=torch.Generator().manual_seed(7)
    )
    assert wasserstein1(samples, reference) < 3 * noise_floor
    share_left = (samples < 0).double().mean().item()
    assert abs(share_left - WEIGHTS[0].item()) < 4 * np.sqrt(0.3 * 0.7 / N)


def test_ddim_inversion_reconstructs_better_with_more_steps(model):
    """DDIM Table 2's trend: encode x_0 to x_T and decode it back; the error falls as steps grow."""
    x_start = true_samples(500, 8).view(-1, 1, 1, 1)
    errors = []
    for steps in (10, 50, 250):
        diffusion = spaced(f"ddim{steps}")
        latents = diffusion.ddim_reverse_sample_loop(model, x_start, clip_denoised=False)
        decoded = diffusion.ddim_sample_loop(model, x_start.shape, noise=latents, clip_denoised=False)
        errors.append((decoded - x_start).abs().mean().item())
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.01, errors


def test_ddim_inversion_yields_gaussian_latents(model):
    x_start = true_samples(2000, 9).view(-1, 1, 1, 1)
    latents = spaced("ddim100").ddim_reverse_sample_loop(model, x_start, clip_denoised=False)
    assert abs(latents.mean().item()) < 0.1 and abs(latents.std().item() - 1) < 0.1
