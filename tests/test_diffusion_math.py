"""Identities the diffusion math must satisfy on any schedule and input."""

import math

import numpy as np
import pytest
import torch

from improved_diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,
)
from improved_diffusion.losses import discretized_gaussian_log_likelihood, normal_kl
from improved_diffusion.respace import SpacedDiffusion, space_timesteps

from diffusion_probe import ProbeModel

SCHEDULES = [("linear", 1000), ("cosine", 4000), ("cosine", 50), ("linear", 37)]


def make(schedule="cosine", steps=100, mean=ModelMeanType.EPSILON, var=ModelVarType.FIXED_SMALL,
         loss=LossType.MSE, respacing=None, rescale=False):
    kwargs = dict(
        betas=get_named_beta_schedule(schedule, steps),
        model_mean_type=mean, model_var_type=var, loss_type=loss, rescale_timesteps=rescale,
    )
    if respacing is None:
        return GaussianDiffusion(**kwargs)
    return SpacedDiffusion(use_timesteps=space_timesteps(steps, respacing), **kwargs)


@pytest.mark.parametrize("schedule,steps", SCHEDULES)
def test_q_sample_is_inverted_by_the_xstart_predictor(schedule, steps):
    """x_0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps recovers the data wherever abar is not tiny."""
    diffusion = make(schedule, steps)
    gen = torch.Generator().manual_seed(0)
    x_start = torch.rand(64, 3, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x_start.shape, generator=gen, dtype=torch.float64)
    usable = np.nonzero(diffusion.alphas_cumprod > 1e-2)[0]
    t = torch.from_numpy(usable[torch.randint(len(usable), (64,), generator=gen).numpy()])
    x_t = diffusion.q_sample(x_start, t, noise=noise)
    recovered = diffusion._predict_xstart_from_eps(x_t, t, noise)
    torch.testing.assert_close(recovered, x_start, rtol=0, atol=1e-5)


@pytest.mark.parametrize("schedule,steps", SCHEDULES)
def test_posterior_matches_bayes_rule(schedule, steps):
    """
    q(x_{t-1} | x_t, x_0) ∝ N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}) N(x_t; sqrt(alpha_t) x_{t-1}, beta_t):
    precisions add, and the mean is the precision-weighted combination.
    """
    diffusion = make(schedule, steps)
    gen = torch.Generator().manual_seed(1)
    t = torch.randint(1, steps, (32,), generator=gen)
    x_start = torch.randn(32, 2, generator=gen, dtype=torch.float64)
    x_t = torch.randn(32, 2, generator=gen, dtype=torch.float64)
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(x_start, x_t, t)

    abar_prev = torch.from_numpy(diffusion.alphas_cumprod_prev)[t][:, None]
    beta = torch.from_numpy(diffusion.betas)[t][:, None]
    alpha = 1 - beta
    precision = 1 / (1 - abar_prev) + alpha / beta
    bayes_mean = (abar_prev.sqrt() * x_start / (1 - abar_prev) + alpha.sqrt() * x_t / beta) / precision
    assert variance.dtype == log_variance.dtype == torch.float32
    torch.testing.assert_close(variance.double(), (1 / precision).expand_as(variance), rtol=2e-6, atol=0)
    torch.testing.assert_close(log_variance.double(), torch.log(1 / precision).expand_as(variance), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(mean, bayes_mean, rtol=1e-5, atol=1e-5)


def test_posterior_at_t0_is_the_data():
    diffusion = make("linear", 100)
    x_start, x_t = torch.randn(4, 3), torch.randn(4, 3)
    mean, variance, _ = diffusion.q_posterior_mean_variance(x_start, x_t, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(mean, x_start)
    assert (variance == 0).all()


@pytest.mark.parametrize("mean_type", [ModelMeanType.EPSILON, ModelMeanType.START_X])
def test_ddim_eta_one_is_ddpm_ancestral_step(mean_type):
    """With eta = 1, sigma_t^2 is the DDPM posterior variance and the DDIM step equals the DDPM step."""
    diffusion = make("cosine", 200, mean=mean_type, var=ModelVarType.FIXED_SMALL)
    model = ProbeModel(3)
    x = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    t = torch.randint(1, 200, (16,), generator=torch.Generator().manual_seed(3))
    ddim = diffusion.ddim_sample(model, x, t, clip_denoised=False, eta=1.0, generator=torch.Generator().manual_seed(4))
    ddpm = diffusion.p_sample(model, x, t, clip_denoised=False, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ddim["sample"], ddpm["sample"], rtol=1e-4, atol=1e-4)


def test_ddim_eta_one_sigma_formula_is_posterior_std():
    diffusion = make("linear", 300)
    abar, abar_prev = diffusion.alphas_cumprod, diffusion.alphas_cumprod_prev
    sigma = np.sqrt((1 - abar_prev) / (1 - abar)) * np.sqrt(1 - abar / abar_prev)
    np.testing.assert_allclose(sigma**2, diffusion.posterior_variance, rtol=1e-10)


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("var", [ModelVarType.FIXED_LARGE, ModelVarType.LEARNED_RANGE])
def test_spacing_that_keeps_every_step_is_the_base_process(rescale, var):
    base = make("cosine", 120, var=var, rescale=rescale)
    spaced = make("cosine", 120, var=var, rescale=rescale, respacing=[120])
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped"):
        np.testing.assert_allclose(getattr(spaced, name), getattr(base, name), rtol=1e-12)
    model = ProbeModel(6 if var == ModelVarType.LEARNED_RANGE else 3)
    x = torch.randn(8, 3, 4, 4)
    t = torch.randint(0, 120, (8,))
    out_base = base.p_mean_variance(model, x, t)
    out_spaced = spaced.p_mean_variance(model, x, t)
    for key in out_base:
        torch.testing.assert_close(out_spaced[key], out_base[key])


def test_spaced_process_calls_the_model_with_base_timesteps():
    seen = []

    def model(x, ts):
        seen.append(ts.clone())
        return torch.zeros_like(x)

    spaced = make("linear", 1000, respacing="ddim10", rescale=True)
    spaced.ddim_sample_loop(model, (2, 1, 2, 2))
    assert spaced.timestep_map == list(range(0, 1000, 100))
    assert [float(ts[0]) for ts in seen] == [float(i) for i in range(900, -1, -100)]
    spaced = make("linear", 1000, respacing="ddim10", rescale=False)
    seen.clear()
    spaced.ddim_sample_loop(model, (2, 1, 2, 2))
    assert [int(ts[0]) for ts in seen] == list(range(900, -1, -100))


def test_kl_of_equal_gaussians_is_zero_and_positive_otherwise():
    gen = torch.Generator().manual_seed(5)
    mean, logvar = torch.randn(100, generator=gen), torch.randn(100, generator=gen)
    assert normal_kl(mean, logvar, mean, logvar).abs().max() < 1e-6
    other = normal_kl(mean, logvar, mean + 0.5, logvar - 0.3)
    assert (other > 0).all()
    # Closed form for 1-D Gaussians: log(s2/s1) + (s1² + (m1 - m2)²) / (2 s2²) - 1/2.
    s1, s2 = torch.exp(0.5 * logvar), torch.exp(0.5 * (logvar - 0.3))
    closed = torch.log(s2 / s1) + (s1**2 + 0.25) / (2 * s2**2) - 0.5
    torch.testing.assert_close(other, closed, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.7, -1.0), (-0.95, -5.0), (0.2, 1.0)])
def test_discretized_likelihood_sums_to_one_over_256_bins(mean, log_scale):
    x = torch.arange(256, dtype=torch.float32) / 127.5 - 1
    means = torch.full_like(x, mean)
    log_scales = torch.full_like(x, log_scale)
    total = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales).exp().sum()
    assert abs(total.item() - 1) < 1e-4


def test_training_losses_vb_trains_only_the_variance():
    diffusion = make("cosine", 100, var=ModelVarType.LEARNED_RANGE, loss=LossType.RESCALED_MSE)
    weight = torch.ones(6, requires_grad=True)

    def model(x, ts):
        out = ProbeModel(6)(x, ts)
        return out * weight.view(1, 6, 1, 1)

    x_start = torch.rand(4, 3, 4, 4) * 2 - 1
    terms = diffusion.training_losses(model, x_start, torch.tensor([0, 10, 50, 99]))
    (grad,) = torch.autograd.grad(terms["vb"].sum(), weight)
    assert (grad[:3] == 0).all() and (grad[3:] != 0).any()
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_calc_bpd_loop_columns_are_timesteps_and_total_adds_up():
    diffusion = make("cosine", 6, var=ModelVarType.FIXED_LARGE)
    calls = []

    def model(x, ts):
        calls.append(int(ts[0]))
        return ProbeModel(3)(x, ts)

    x_start = (torch.randint(0, 256, (3, 3, 4, 4)).float() / 127.5) - 1
    out = diffusion.calc_bpd_loop(model, x_start, generator=torch.Generator().manual_seed(0))
    assert calls == [5, 4, 3, 2, 1, 0]
    for key in ("vb", "mse", "xstart_mse"):
        assert out[key].shape == (3, 6)
    # Column t is the term at timestep t: the t = 0 column is the decoder NLL.
    t0 = torch.zeros(3, dtype=torch.long)
    noise = torch.randn(x_start.shape, generator=_generator_after_draws(5, x_start.shape))
    x_t = diffusion.q_sample(x_start, t0, noise=noise)
    expected = diffusion._vb_terms_bpd(model, x_start, x_t, t0)["output"]
    torch.testing.assert_close(out["vb"][:, 0], expected)
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])
    assert (out["prior_bpd"] >= 0).all()


def _generator_after_draws(draws, shape):
    gen = torch.Generator().manual_seed(0)
    for _ in range(draws):
        torch.randn(shape, generator=gen)
    return gen


def test_loops_are_reproducible_with_a_generator():
    diffusion = make("linear", 30, var=ModelVarType.FIXED_LARGE)
    model = ProbeModel(3)
    runs = [
        diffusion.p_sample_loop(model, (3, 3, 4, 4), generator=torch.Generator().manual_seed(7)) for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    other = diffusion.p_sample_loop(model, (3, 3, 4, 4), generator=torch.Generator().manual_seed(8))
    assert not torch.equal(runs[0], other)


def test_per_sample_generators_make_samples_independent_of_the_batch():
    diffusion = make("linear", 30, var=ModelVarType.FIXED_LARGE)
    model = ProbeModel(3)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    together = diffusion.ddim_sample_loop(model, (4, 3, 4, 4), eta=0.5, generator=gens([10, 11, 12, 13]))
    alone = diffusion.ddim_sample_loop(model, (2, 3, 4, 4), eta=0.5, generator=gens([12, 13]))
    torch.testing.assert_close(together[2:], alone)


def test_sampling_steps_build_no_tensor_from_numpy(monkeypatch):
    diffusion = make("cosine", 400, var=ModelVarType.LEARNED_RANGE, respacing="ddim20", rescale=True)
    model = ProbeModel(6)
    diffusion.ddim_sample_loop(model, (2, 3, 4, 4))

    def forbidden(*args, **kwargs):
        raise AssertionError("a sampling step built a tensor from host data")

    monkeypatch.setattr(torch, "from_numpy", forbidden)
    monkeypatch.setattr(torch, "tensor", forbidden)
    monkeypatch.setattr(torch, "as_tensor", forbidden)
    diffusion.ddim_sample_loop(model, (2, 3, 4, 4))
    diffusion.p_sample_loop(model, (2, 3, 4, 4))


def test_device_tables_are_cached():
    diffusion = make("cosine", 10)
    first = diffusion._tables(torch.device("cpu"))
    assert diffusion._tables(torch.device("cpu")) is first
    assert first["alphas_cumprod"].dtype == torch.float64


def test_linear_schedule_endpoints_scale_with_steps():
    betas = get_named_beta_schedule("linear", 4000)
    assert betas[0] == pytest.approx(0.25e-4) and betas[-1] == pytest.approx(0.005)
    cosine = get_named_beta_schedule("cosine", 1000)
    assert cosine.max() <= 0.999 and math.isclose(
        np.cumprod(1 - cosine)[0], math.cos(1 / 1000 / 1.008 * math.pi / 2 + 0.008 / 1.008 * math.pi / 2) ** 2
        / math.cos(0.008 / 1.008 * math.pi / 2) ** 2, rel_tol=1e-12,
    )


def test_reference_extract_helper_matches_the_cached_tables():
    from improved_diffusion.gaussian_diffusion import _extract_into_tensor

    diffusion = make("cosine", 40)
    t = torch.tensor([0, 7, 39])
    got = _extract_into_tensor(diffusion.posterior_variance, t, (3, 2, 4))
    assert got.shape == (3, 2, 4)
    torch.testing.assert_close(got, diffusion._extract("posterior_variance", t, (3, 2, 4)).expand(3, 2, 4))
