"""
Flow matching (improved_diffusion/flow.py): the velocity parameterization and
loss on fixed draws, the logit-normal and uniform times, the default Euler
sampler written out and compared step for step, and the samplers on an exact
model (a Gaussian mixture): convergence at their order to the exact
probability-flow solution and in distribution to the exact data moments.
"""

import json
import math

import numpy as np
import pytest
import torch

from improved_diffusion.evaluation import feature_statistics, frechet_distance
from improved_diffusion.flow import FlowDiffusion
from improved_diffusion.mixture import GaussianMixture

SMOOTH = GaussianMixture([0.3, 0.7], [[-0.4, 0.2], [0.4, -0.1]], [0.3, 0.25])
SHARP = GaussianMixture(
    [0.2, 0.3, 0.25, 0.25], [[-0.5, -0.5], [0.5, 0.5], [-0.5, 0.5], [0.6, -0.4]], [0.1, 0.15, 0.08, 0.12]
)
DETERMINISTIC = ("ddim", "euler", "heun", "plms", "dpmpp_2m", "dpmpp_3m", "unipc")
ORDERS = {"ddim": 1, "euler": 1, "heun": 2, "plms": 2, "dpmpp_2m": 2, "dpmpp_3m": 2, "unipc": 3}


class AffineVelocity:
    """u(x, s) = 0.5 x + 0.001 s; records the timesteps it is given."""

    def __init__(self):
        self.seen = []

    def __call__(self, x, timesteps, **kwargs):
        self.seen.append(timesteps.clone())
        return 0.5 * x + 0.001 * timesteps.view(-1, *([1] * (x.ndim - 1)))


def x_T(n, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rms(a, b):
    return ((a - b) ** 2).sum(1).mean().sqrt().item()


def frechet_to_exact(samples, mixture):
    mean, cov = mixture.moments()
    return frechet_distance(*feature_statistics(samples.numpy()), mean.numpy(), cov.numpy())


def exact_solution(mixture, noise, times):
    """The probability-flow ODE from t_0 noise at times[0] to times[-1], then x0-hat there."""
    x = mixture.flow_ode_solution(noise * times[0], times[0], times[-1], steps=400)
    return mixture.denoise(x, 1 - times[-1], times[-1])


# ---------------------------------------------------------------- the objective


def test_denoise_and_the_loss_on_fixed_draws():
    flow = FlowDiffusion()
    model = AffineVelocity()
    x_start = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noise = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 0.8, 1.0], dtype=torch.float64)
    out = flow.training_losses(model, x_start, noise=noise, t=t)
    for i, ti in enumerate(t.tolist()):
        x_t = (1 - ti) * x_start[i] + ti * noise[i]
        velocity = 0.5 * x_t + 0.001 * 1000 * ti
        assert out["loss"][i].item() == pytest.approx(((velocity - (noise[i] - x_start[i])) ** 2).mean().item(),
                                                      rel=1e-12)
    torch.testing.assert_close(model.seen[0], 1000 * t)
    torch.testing.assert_close(out["mse"], out["loss"])
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(flow.denoise(model, x, t), x - t.view(-1, 1, 1, 1) * (0.5 * x + t.view(-1, 1, 1, 1)))


@pytest.mark.parametrize("time_sampling", ["logit_normal", "uniform"])
def test_training_draws_come_from_the_generator_t_first_then_the_noise(time_sampling):
    flow = FlowDiffusion(logit_mean=0.4, logit_std=0.7, time_sampling=time_sampling)
    model = AffineVelocity()
    x_start = torch.zeros(6, 1, 2, 2)
    state = torch.random.get_rng_state()
    out = flow.training_losses(model, x_start, generator=torch.Generator().manual_seed(9))
    assert torch.equal(torch.random.get_rng_state(), state), "the global RNG is not touched"
    hand = torch.Generator().manual_seed(9)
    if time_sampling == "uniform":
        t = torch.rand(6, generator=hand)
    else:
        t = torch.sigmoid(0.4 + 0.7 * torch.randn(6, generator=hand))
    noise = torch.randn(6, 1, 2, 2, generator=hand)
    torch.testing.assert_close(out["loss"], flow.training_losses(model, x_start, noise=noise, t=t)["loss"])


@pytest.mark.parametrize("time_sampling", ["logit_normal", "uniform"])
def test_time_distributions_and_their_quartiles(time_sampling):
    flow = FlowDiffusion(logit_mean=-0.5, logit_std=1.3, time_sampling=time_sampling)
    t = flow.sample_t(200_000, "cpu", generator=torch.Generator().manual_seed(0))
    assert 0 <= t.min() and t.max() < 1
    if time_sampling == "uniform":
        assert abs(t.mean().item() - 0.5) < 0.005 and abs(t.var().item() - 1 / 12) < 0.002
    else:
        logit = torch.log(t / (1 - t))
        assert abs(logit.mean().item() + 0.5) < 0.01 and abs(logit.std().item() - 1.3) < 0.01
    quartile = flow.noise_level_quartile(t)
    shares = torch.bincount(quartile, minlength=4).double() / len(t)
    assert quartile.dtype == torch.int64 and (shares - 0.25).abs().max() < 0.005, shares
    by_quartile = [t[quartile == q] for q in range(4)]
    assert all(a.max() <= b.min() for a, b in zip(by_quartile, by_quartile[1:])), "0 is the least noise"


# ---------------------------------------------------------------- sampling


def test_the_default_sampler_is_euler_in_t_with_uniform_steps():
    """x_{t'} = x_t + (t' - t) u(x_t, 1000 t) from t = 1 down to 0 in `steps` equal steps."""
    noise = x_T(64)
    model = SHARP.flow_model()
    out = FlowDiffusion().sample_loop(model, noise.shape, steps=12, noise=noise, clip_denoised=False)
    x = noise
    for k in range(12):
        t, t_next = 1 - k / 12, 1 - (k + 1) / 12
        x = x + (t_next - t) * model(x, torch.full((64,), 1000 * t, dtype=torch.float64))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def logsnr_reference():
    noise = x_T(400, seed=1)
    return noise, exact_solution(SMOOTH, noise, FlowDiffusion().sampling_times("logsnr20"))


@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_deterministic_samplers_converge_at_their_order(logsnr_reference, sampler):
    """logsnrN nodes, uniform in lambda from t = 1 - t_min to t_min: one exact solution serves every N."""
    noise, exact = logsnr_reference
    flow = FlowDiffusion()
    counts = (20, 40, 80, 160)
    errors = [rms(flow.sample_loop(SMOOTH.flow_model(), noise.shape, sampler, noise=noise, clip_denoised=False,
                                   timestep_respacing=f"logsnr{count}"), exact) for count in counts]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    slope = -np.polyfit(np.log(counts[1:]), np.log(errors[1:]), 1)[0]
    assert ORDERS[sampler] - 0.3 < slope < ORDERS[sampler] + 0.6, (slope, errors)


@pytest.fixture(scope="module")
def uniform_references():
    """The exact solutions from t = 1 to the last node 1 / N of the default nodes, N = 20, 40, 80."""
    noise = x_T(400, seed=2)
    return noise, {count: exact_solution(SMOOTH, noise, FlowDiffusion().sampling_times(steps=count))
                   for count in (20, 40, 80)}


@pytest.mark.parametrize("sampler", ["euler", "heun", "plms"])
def test_the_t_steppers_converge_at_their_order_from_pure_noise(uniform_references, sampler):
    """On the default nodes (from t = 1, where alpha = 0): Euler, Heun and PLMS step in t, finite there."""
    noise, exact = uniform_references
    counts = sorted(exact)
    errors = [rms(FlowDiffusion().sample_loop(SMOOTH.flow_model(), noise.shape, sampler, steps=count, noise=noise,
                                              clip_denoised=False), exact[count]) for count in counts]
    slope = -np.polyfit(np.log(counts), np.log(errors), 1)[0]
    assert ORDERS[sampler] - 0.3 < slope < ORDERS[sampler] + 0.6, (slope, errors)


@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "ddpm"])
def test_stochastic_samplers_converge_in_distribution(sampler):
    n = 20_000
    floor = frechet_to_exact(SHARP.sample(n, torch.Generator().manual_seed(3)), SHARP)
    distances = []
    for steps in (10, 40, 160):
        out = FlowDiffusion().sample_loop(SHARP.flow_model(), (n, 2), sampler, steps=steps, noise=x_T(n, 4),
                                          clip_denoised=False, generator=torch.Generator().manual_seed(5))
        distances.append(frechet_to_exact(out, SHARP))
    assert distances[0] > distances[1] > distances[2], distances
    assert distances[2] < 10 * floor + 2e-4, (distances, floor)


def test_the_spacings_name_the_nodes(tmp_path):
    flow = FlowDiffusion(t_min=0.01)
    assert flow.sampling_times(steps=4) == [1.0, 0.75, 0.5, 0.25]
    assert flow.sampling_times("trailing4") == flow.sampling_times("uniform4") == [1.0, 0.75, 0.5, 0.25]
    lam = [math.log((1 - t) / t) for t in flow.sampling_times("logsnr5")]
    np.testing.assert_allclose(lam, np.linspace(math.log(0.01 / 0.99), math.log(0.99 / 0.01), 5), atol=1e-12)
    ratios = [t / (1 - t) for t in flow.sampling_times("karras6")]
    ends = 0.99 / 0.01, 0.01 / 0.99
    expected = [(ends[0] ** (1 / 7) + i / 5 * (ends[1] ** (1 / 7) - ends[0] ** (1 / 7))) ** 7 for i in range(6)]
    np.testing.assert_allclose(ratios, expected, rtol=1e-10)
    path = tmp_path / "times.json"
    path.write_text(json.dumps([0.2, 1, 0.6]))
    assert flow.sampling_times(str(path)) == [1.0, 0.6, 0.2]
    nodes = flow.sampling_nodes(str(path))
    assert nodes.alpha == pytest.approx([0.0, 0.4, 0.8, 1.0]) and nodes.sigma == [1.0, 0.6, 0.2, 0.0]


# ---------------------------------------------------------------- errors


def test_bad_time_distributions_are_errors():
    with pytest.raises(ValueError, match="--logit_std"):
        FlowDiffusion(logit_std=0.0)
    with pytest.raises(ValueError, match="logit_normal, uniform"):
        FlowDiffusion(time_sampling="beta")


@pytest.mark.parametrize("content", ["[0, 10, 500, 999]", "[0.5, 1.5]", "[0.0, 0.5]", "[]", "[0.5, 0.5]"])
def test_a_json_spacing_of_another_kind_is_an_error(tmp_path, content):
    path = tmp_path / "nodes.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"nodes\.json.*flow times t in \(0, 1\]"):
        FlowDiffusion().sampling_times(str(path))


def test_a_network_with_learned_variance_channels_is_an_error():
    with pytest.raises(ValueError, match="--learn_sigma False"):
        FlowDiffusion().sample_loop(lambda x, t: torch.cat([x, x], dim=1), (2, 3, 4, 4), steps=2)
