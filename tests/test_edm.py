"""
EDM (improved_diffusion/edm.py) against Karras et al. 2022: Table 1's
preconditioning and the section 5 loss written out here from the paper,
Algorithms 1 and 2 written out here and compared step for step, and the
samplers on an exact model (a Gaussian mixture, whose denoiser is closed
form): convergence at their order to the exact probability-flow solution and
in distribution to the exact data moments.
"""

import json
import math

import numpy as np
import pytest
import torch

from improved_diffusion import samplers
from improved_diffusion.edm import EDMDiffusion
from improved_diffusion.evaluation import feature_statistics, frechet_distance
from improved_diffusion.mixture import GaussianMixture

SMOOTH = GaussianMixture([0.3, 0.7], [[-0.4, 0.2], [0.4, -0.1]], [0.3, 0.25])
SHARP = GaussianMixture(
    [0.2, 0.3, 0.25, 0.25], [[-0.5, -0.5], [0.5, 0.5], [-0.5, 0.5], [0.6, -0.4]], [0.1, 0.15, 0.08, 0.12]
)
DETERMINISTIC = ("ddim", "euler", "heun", "plms", "dpmpp_2m", "dpmpp_3m", "unipc")
# Observed orders, as on the DDPM family (tests/test_samplers.py): DPM-Solver++(3M)'s
# first-order first step bounds its global order at 2.
ORDERS = {"ddim": 1, "euler": 1, "heun": 2, "plms": 2, "dpmpp_2m": 2, "dpmpp_3m": 2, "unipc": 3}


def paper_coefficients(sigma, sigma_data):
    """Karras et al. 2022, Table 1 (and section 5's lambda), written out."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / math.sqrt(sigma**2 + sigma_data**2)
    c_in = 1 / math.sqrt(sigma**2 + sigma_data**2)
    c_noise = 0.25 * math.log(sigma)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return c_skip, c_out, c_in, c_noise, weight


class AffineNetwork:
    """F(input, c_noise) = 0.7 input + 0.2 c_noise (+ a channel offset); records what it is given."""

    def __init__(self):
        self.seen = []

    def __call__(self, x_in, c_noise, **kwargs):
        self.seen.append((x_in.clone(), c_noise.clone()))
        offset = torch.arange(x_in.shape[1], dtype=x_in.dtype).view(1, -1, *([1] * (x_in.ndim - 2)))
        return 0.7 * x_in + 0.2 * c_noise.view(-1, *([1] * (x_in.ndim - 1))) + 0.05 * offset


def x_T(n, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rms(a, b):
    return ((a - b) ** 2).sum(1).mean().sqrt().item()


def frechet_to_exact(samples, mixture):
    mean, cov = mixture.moments()
    return frechet_distance(*feature_statistics(samples.numpy()), mean.numpy(), cov.numpy())


def exact_solution(mixture, noise, sigmas):
    """The probability-flow ODE from sigma_0 noise at sigmas[0] to sigmas[-1], then D there."""
    x = mixture.edm_ode_solution(noise * sigmas[0], sigmas[0], sigmas[-1], steps=1000)
    return mixture.denoise(x, 1.0, sigmas[-1])


# ---------------------------------------------------------------- preconditioning and loss


@pytest.mark.parametrize("sigma_data", [0.5, 0.3])
def test_coefficients_are_table_1(sigma_data):
    edm = EDMDiffusion(sigma_data=sigma_data)
    sigmas = [0.002, 0.05, 0.5, 1.7, 80.0]
    for sigma in sigmas:
        expected = paper_coefficients(sigma, sigma_data)
        assert edm.coefficients(sigma) + (edm.loss_weight(sigma),) == pytest.approx(expected, rel=1e-12)
    as_tensor = edm.coefficients(torch.tensor(sigmas, dtype=torch.float64))
    for k, values in enumerate(as_tensor):
        expected = [paper_coefficients(sigma, sigma_data)[k] for sigma in sigmas]
        np.testing.assert_allclose(values.numpy(), expected, rtol=1e-12)


def test_denoise_is_the_preconditioned_network():
    edm = EDMDiffusion(sigma_data=0.4)
    network = AffineNetwork()
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = torch.tensor([0.01, 1.0, 30.0], dtype=torch.float64)
    denoised = edm.denoise(network, x, sigma)
    for i, s in enumerate(sigma.tolist()):
        c_skip, c_out, c_in, c_noise, _ = paper_coefficients(s, 0.4)
        x_in, seen_noise = network.seen[0][0][i], network.seen[0][1][i]
        torch.testing.assert_close(x_in, c_in * x[i], rtol=1e-12, atol=0)
        assert seen_noise.item() == pytest.approx(c_noise, rel=1e-12)
        offset = 0.05 * torch.arange(2, dtype=torch.float64).view(2, 1, 1)
        expected = c_skip * x[i] + c_out * (0.7 * c_in * x[i] + 0.2 * c_noise + offset)
        torch.testing.assert_close(denoised[i], expected, rtol=1e-12, atol=1e-12)
    # One float sigma is every sample's.
    torch.testing.assert_close(edm.denoise(network, x, 1.0), edm.denoise(network, x, torch.ones(3, dtype=torch.float64)))


def test_training_loss_on_fixed_draws_is_section_5():
    edm = EDMDiffusion()
    network = AffineNetwork()
    x_start = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64).clamp(-1, 1)
    noise = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigma = torch.tensor([0.003, 0.2, 1.5, 60.0], dtype=torch.float64)
    out = edm.training_losses(network, x_start, noise=noise, sigma=sigma)
    for i, s in enumerate(sigma.tolist()):
        c_skip, c_out, c_in, c_noise, weight = paper_coefficients(s, 0.5)
        x = x_start[i] + s * noise[i]
        offset = 0.05 * torch.arange(3, dtype=torch.float64).view(3, 1, 1)
        denoised = c_skip * x + c_out * (0.7 * c_in * x + 0.2 * c_noise + offset)
        assert out["mse"][i].item() == pytest.approx(((denoised - x_start[i]) ** 2).mean().item(), rel=1e-10)
        assert out["loss"][i].item() == pytest.approx(weight * ((denoised - x_start[i]) ** 2).mean().item(), rel=1e-10)


def test_training_draws_come_from_the_generator_sigma_first_then_the_noise():
    edm = EDMDiffusion(P_mean=-0.8, P_std=1.5)
    network = AffineNetwork()
    x_start = torch.zeros(5, 1, 2, 2)
    state = torch.random.get_rng_state()
    out = edm.training_losses(network, x_start, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.random.get_rng_state(), state), "the global RNG is not touched"
    hand = torch.Generator().manual_seed(7)
    sigma = torch.exp(-0.8 + 1.5 * torch.randn(5, generator=hand))
    noise = torch.randn(5, 1, 2, 2, generator=hand)
    torch.testing.assert_close(out["loss"], edm.training_losses(network, x_start, noise=noise, sigma=sigma)["loss"])
    again = edm.training_losses(network, x_start, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(again["loss"], out["loss"], rtol=0, atol=0)


def test_sigma_is_log_normal_and_its_quartiles_split_it_evenly():
    edm = EDMDiffusion(P_mean=-1.2, P_std=1.2)
    sigma = edm.sample_sigma(200_000, "cpu", generator=torch.Generator().manual_seed(0))
    assert abs(sigma.log().mean().item() + 1.2) < 0.01 and abs(sigma.log().std().item() - 1.2) < 0.01
    quartile = edm.noise_level_quartile(sigma)
    assert quartile.dtype == torch.int64
    shares = torch.bincount(quartile, minlength=4).double() / len(sigma)
    assert (shares - 0.25).abs().max() < 0.005, shares
    # 0 is the least noise: the quartiles are ordered by sigma.
    by_quartile = [sigma[quartile == q] for q in range(4)]
    assert all(a.max() <= b.min() for a, b in zip(by_quartile, by_quartile[1:]))
    assert by_quartile[1].max().item() == pytest.approx(math.exp(-1.2), rel=1e-3)


# ---------------------------------------------------------------- the paper's samplers, step for step


def karras_sigmas(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Karras et al. eq. 5, t_{i<N}, written out (t_N = 0 is added by the algorithms below)."""
    return [(sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
            for i in range(n)]


def algorithm_2(mixture, latents, n, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, generator=None):
    """Karras et al. 2022, Algorithm 2 (Algorithm 1 when s_churn = 0), with D exact; returns (x, evaluations)."""
    t = karras_sigmas(n) + [0.0]
    x = latents * t[0]
    evaluations = 0

    def denoise(x, sigma):
        nonlocal evaluations
        evaluations += 1
        return mixture.denoise(x, 1.0, sigma)

    for i in range(n):
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= t[i] <= s_tmax else 0.0
        t_hat = t[i] + gamma * t[i]
        if gamma > 0:
            x = x + math.sqrt(t_hat**2 - t[i] ** 2) * s_noise * torch.randn(x.shape, generator=generator,
                                                                          dtype=x.dtype)
        d = (x - denoise(x, t_hat)) / t_hat
        x_next = x + (t[i + 1] - t_hat) * d
        if t[i + 1] != 0:
            d_prime = (x_next - denoise(x_next, t[i + 1])) / t[i + 1]
            x_next = x + (t[i + 1] - t_hat) * (0.5 * d + 0.5 * d_prime)
        x = x_next
    return x, evaluations


def counting(model):
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        return model(*args, **kwargs)

    return wrapped, calls


def test_the_default_sampler_is_algorithm_1():
    noise = x_T(64)
    model, calls = counting(SHARP.edm_model())
    out = EDMDiffusion().sample_loop(model, noise.shape, noise=noise, clip_denoised=False)
    expected, evaluations = algorithm_2(SHARP, noise, 18)
    assert len(calls) == evaluations == 35 == samplers.model_evaluations("heun", 18)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_s_churn_is_algorithm_2():
    noise = x_T(64)
    churn = dict(s_churn=30.0, s_tmin=0.05, s_tmax=10.0, s_noise=1.007)
    out = EDMDiffusion().sample_loop(SHARP.edm_model(), noise.shape, steps=12, noise=noise, clip_denoised=False,
                                     generator=torch.Generator().manual_seed(3), **churn)
    expected, _ = algorithm_2(SHARP, noise, 12, generator=torch.Generator().manual_seed(3), **churn)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    deterministic, _ = algorithm_2(SHARP, noise, 12)
    assert rms(out, deterministic) > 1e-3, "the churn added noise"


# ---------------------------------------------------------------- on the exact model


def _slope(counts, errors):
    """Least-squares slope of -log(error) against log(count): the observed order."""
    return -np.polyfit(np.log(counts), np.log(errors), 1)[0]


@pytest.fixture(scope="module")
def reference():
    """Every karrasN and logsnrN spacing runs from sigma_max to sigma_min: one exact solution serves all."""
    noise = x_T(400, seed=1)
    return noise, exact_solution(SMOOTH, noise, EDMDiffusion().sampling_sigmas("karras20"))


@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_deterministic_samplers_converge_at_their_order(reference, sampler):
    """On logsnrN nodes (uniform steps in lambda, where the multistep solvers are built)."""
    noise, exact = reference
    edm = EDMDiffusion()
    counts = (20, 40, 80, 160)
    errors = [rms(edm.sample_loop(SMOOTH.edm_model(), noise.shape, sampler, noise=noise, clip_denoised=False,
                                  timestep_respacing=f"logsnr{count}"), exact) for count in counts]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    slope = _slope(counts[1:], errors[1:])
    assert ORDERS[sampler] - 0.3 < slope < ORDERS[sampler] + 0.6, (slope, errors)


def test_algorithm_1_with_18_steps_has_the_accuracy_of_its_order(reference):
    """
    35 evaluations of Algorithm 1 against the exact solution: the error is what
    second order predicts from finer runs (C N^-2, C measured at N = 72 and 144),
    to within 30%.
    """
    noise, exact = reference
    edm = EDMDiffusion()
    errors = {n: rms(edm.sample_loop(SMOOTH.edm_model(), noise.shape, steps=n, noise=noise, clip_denoised=False),
                     exact) for n in (18, 36, 72, 144)}
    constant = errors[144] * 144**2
    assert errors[72] * 72**2 == pytest.approx(constant, rel=0.1), errors
    assert errors[18] == pytest.approx(constant / 18**2, rel=0.3), errors
    assert errors[18] < 0.05, "35 evaluations come within 5% of the data's scale"


@pytest.mark.parametrize("run", [dict(sampler="heun", s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003),
                                 dict(sampler="dpmpp_2m_sde"), dict(sampler="ddpm")],
                         ids=["algorithm_2", "dpmpp_2m_sde", "ddpm"])
def test_stochastic_samplers_converge_in_distribution(run):
    n = 20_000
    floor = frechet_to_exact(SHARP.sample(n, torch.Generator().manual_seed(3)), SHARP)
    distances = []
    for steps in (10, 40, 160):
        out = EDMDiffusion().sample_loop(SHARP.edm_model(), (n, 2), steps=steps, noise=x_T(n, 4),
                                         clip_denoised=False, generator=torch.Generator().manual_seed(5), **run)
        distances.append(frechet_to_exact(out, SHARP))
    assert distances[0] > distances[1] > distances[2], distances
    assert distances[2] < 10 * floor + 2e-4, (distances, floor)


# ---------------------------------------------------------------- nodes


def test_the_spacings_name_the_nodes(tmp_path):
    edm = EDMDiffusion(sigma_min=0.01, sigma_max=50.0)
    expected = [(50 ** (1 / 5) + i / 7 * (0.01 ** (1 / 5) - 50 ** (1 / 5))) ** 5 for i in range(8)]
    assert edm.sampling_sigmas("karras8", rho=5.0) == pytest.approx(expected, rel=1e-12)
    assert edm.sampling_sigmas(steps=8, rho=5.0) == pytest.approx(expected, rel=1e-12)
    assert edm.sampling_sigmas("logsnr5") == pytest.approx(np.geomspace(50, 0.01, 5).tolist(), rel=1e-12)
    assert edm.sampling_sigmas("uniform5") == pytest.approx([50, 37.5025, 25.005, 12.5075, 0.01], rel=1e-12)
    assert edm.sampling_sigmas("trailing5") == edm.sampling_sigmas("uniform5")
    path = tmp_path / "sigmas.json"
    path.write_text(json.dumps([0.5, 20, 3]))
    assert edm.sampling_sigmas(str(path)) == [20.0, 3.0, 0.5]
    nodes = edm.sampling_nodes(str(path))
    assert nodes.alpha == [1.0] * 4 and nodes.sigma == [20.0, 3.0, 0.5, 0.0] and nodes.prior_std == 20.0


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("sigma_min, sigma_max", [(1.0, 1.0), (80.0, 0.002), (0.0, 80.0)])
def test_sigma_min_must_lie_below_sigma_max(sigma_min, sigma_max):
    with pytest.raises(ValueError, match="0 < --sigma_min < --sigma_max"):
        EDMDiffusion(sigma_min=sigma_min, sigma_max=sigma_max)


def test_bad_training_distributions_are_errors():
    with pytest.raises(ValueError, match="--P_std"):
        EDMDiffusion(P_std=0.0)
    with pytest.raises(ValueError, match="--sigma_data"):
        EDMDiffusion(sigma_data=-0.5)


@pytest.mark.parametrize("content", ["[0, 10, 500, 999]", "[99, 199, 999]", "[]", "[1, 1]", "[true, 2]",
                                     '{"sigmas": [1]}'])
def test_a_json_spacing_of_another_kind_is_an_error(tmp_path, content):
    path = tmp_path / "nodes.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"nodes\.json.*EDM noise levels sigma in \[sigma_min, sigma_max\]"):
        EDMDiffusion().sampling_sigmas(str(path))


def test_an_unknown_spacing_lists_the_known_ones():
    with pytest.raises(ValueError, match="'karrasN', 'logsnrN', 'uniformN', 'trailingN'"):
        EDMDiffusion().sampling_sigmas("ddim10")


def test_a_network_with_learned_variance_channels_is_an_error():
    def doubled(x_in, c_noise):
        return torch.cat([x_in, x_in], dim=1)

    with pytest.raises(ValueError, match="--learn_sigma False"):
        EDMDiffusion().sample_loop(doubled, (2, 3, 4, 4), steps=2)


def test_s_churn_is_for_the_heun_and_euler_samplers():
    with pytest.raises(ValueError, match="use sampler='heun' or drop s_churn"):
        EDMDiffusion().sample_loop(SMOOTH.edm_model(), (2, 2), "dpmpp_2m", s_churn=10.0)
    with pytest.raises(ValueError, match="s_churn=-1.0"):
        EDMDiffusion().sample_loop(SMOOTH.edm_model(), (2, 2), s_churn=-1.0)
