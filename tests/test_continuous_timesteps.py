"""
Fractional timesteps for the DDPM family (SPEC 18, continuous_timesteps):
abar interpolated linearly in log abar between integer timesteps, the
spellings' exact node values, the model fed the matching fractional
timestep, and the effect on an exact model (a Gaussian mixture).
"""

import json

import numpy as np
import pytest
import torch

from improved_diffusion.gaussian_diffusion import (
    LossType,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,
    rescale_zero_terminal_snr,
)
from improved_diffusion.mixture import GaussianMixture
from improved_diffusion.respace import SpacedDiffusion, interpolate_alphas_cumprod, space_timesteps

T = 1000
BETAS = get_named_beta_schedule("linear", T)
ALPHAS_CUMPROD = np.cumprod(1 - BETAS)
SMOOTH = GaussianMixture([0.3, 0.7], [[-0.4, 0.2], [0.4, -0.1]], [0.3, 0.25])


def half_log_snr(abar):
    return 0.5 * (np.log(abar) - np.log1p(-abar))


def spaced(spec, continuous_timesteps=True, betas=BETAS, rescale_timesteps=False):
    use_timesteps = space_timesteps(len(betas), spec, betas=betas, continuous_timesteps=continuous_timesteps)
    return on_timesteps(use_timesteps, continuous_timesteps, betas, rescale_timesteps)


def on_timesteps(use_timesteps, continuous_timesteps=True, betas=BETAS, rescale_timesteps=False):
    return SpacedDiffusion(
        use_timesteps=use_timesteps, continuous_timesteps=continuous_timesteps, betas=betas,
        model_mean_type=ModelMeanType.EPSILON, model_var_type=ModelVarType.FIXED_SMALL, loss_type=LossType.MSE,
        rescale_timesteps=rescale_timesteps,
    )


def rms_error(samples, exact):
    """sqrt(mean ||samples - exact||^2) over the batch, [N x D] each."""
    return ((samples - exact) ** 2).sum(1).mean().sqrt().item()


# ---------------------------------------------------------------- interpolation


@pytest.mark.parametrize("betas", [BETAS, get_named_beta_schedule("cosine", 300), rescale_zero_terminal_snr(BETAS)],
                         ids=["linear", "cosine", "zero_terminal_snr"])
def test_interpolated_abar_is_the_table_at_every_integer(betas):
    table = np.cumprod(1 - betas)
    np.testing.assert_array_equal(interpolate_alphas_cumprod(table, np.arange(len(table))), table)
    np.testing.assert_array_equal(interpolate_alphas_cumprod(table, np.arange(len(table)).astype(float)), table)


def test_between_integers_log_abar_is_linear():
    steps = np.arange(T - 1)
    for frac in (0.25, 0.5, 0.9):
        got = np.log(interpolate_alphas_cumprod(ALPHAS_CUMPROD, steps + frac))
        expected = (1 - frac) * np.log(ALPHAS_CUMPROD[:-1]) + frac * np.log(ALPHAS_CUMPROD[1:])
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        interpolate_alphas_cumprod(ALPHAS_CUMPROD, [999.5])


# ---------------------------------------------------------------- exact node values


def test_trailing_and_quad_are_their_formulas_unrounded():
    assert sorted(space_timesteps(T, "trailing3", continuous_timesteps=True), reverse=True) == [
        T - k * T / 3 - 1 for k in range(3)
    ]
    assert space_timesteps(T, "uniform7", continuous_timesteps=True) == space_timesteps(
        T, "trailing7", continuous_timesteps=True)
    quad = sorted(space_timesteps(T, "quad6", continuous_timesteps=True), reverse=True)
    assert quad == pytest.approx([(T - 1) * (1 - k / 5) ** 2 for k in range(6)], rel=1e-15)


def test_logsnr_nodes_are_exactly_uniform_in_the_interpolated_lambda():
    nodes = sorted(space_timesteps(T, "logsnr10", betas=BETAS, continuous_timesteps=True), reverse=True)
    assert nodes[0] == T - 1 and nodes[-1] == 0
    lam = half_log_snr(interpolate_alphas_cumprod(ALPHAS_CUMPROD, nodes))
    np.testing.assert_allclose(lam, np.linspace(lam[0], lam[-1], 10), rtol=0, atol=1e-9)
    # The integer spacing only approaches it.
    integer = half_log_snr(ALPHAS_CUMPROD[sorted(space_timesteps(T, "logsnr10", betas=BETAS), reverse=True)])
    assert np.abs(np.diff(integer) - np.diff(lam)).max() > 1e-2


def test_karras_nodes_are_exactly_rho_7_in_sigma():
    nodes = sorted(space_timesteps(T, "karras8", betas=BETAS, continuous_timesteps=True), reverse=True)
    sigma = np.exp(-half_log_snr(interpolate_alphas_cumprod(ALPHAS_CUMPROD, nodes)))
    ramp = np.linspace(0, 1, 8)
    expected = (sigma[0] ** (1 / 7) + ramp * (sigma[-1] ** (1 / 7) - sigma[0] ** (1 / 7))) ** 7
    np.testing.assert_allclose(sigma, expected, rtol=1e-9)


def test_zero_terminal_snr_keeps_the_last_step_and_spaces_the_rest():
    betas = rescale_zero_terminal_snr(BETAS)
    nodes = sorted(space_timesteps(T, "logsnr6", betas=betas, continuous_timesteps=True), reverse=True)
    assert nodes[0] == T - 1 and nodes[1] == T - 2 and nodes[-1] == 0
    lam = half_log_snr(interpolate_alphas_cumprod(np.cumprod(1 - betas), nodes[1:]))
    np.testing.assert_allclose(np.diff(lam), np.full(4, lam[1] - lam[0]), atol=1e-9)


def test_a_json_list_may_hold_fractional_timesteps(tmp_path):
    path = tmp_path / "steps.json"
    path.write_text(json.dumps([0, 10.5, 998.25]))
    assert space_timesteps(T, str(path), continuous_timesteps=True) == {0.0, 10.5, 998.25}
    with pytest.raises(ValueError, match="strictly increasing integer timesteps"):
        space_timesteps(T, str(path))


# ---------------------------------------------------------------- the process


class Recorder:
    """An eps model of zeros that records the timesteps it is given."""

    def __init__(self):
        self.seen = []

    def __call__(self, x, timesteps, **kwargs):
        self.seen.append(timesteps.clone())
        return torch.zeros_like(x)


@pytest.mark.parametrize("rescale_timesteps", [False, True])
def test_the_model_sees_the_fractional_timesteps(rescale_timesteps):
    diffusion = spaced("logsnr7", rescale_timesteps=rescale_timesteps)
    np.testing.assert_allclose(diffusion.alphas_cumprod, interpolate_alphas_cumprod(ALPHAS_CUMPROD,
                                                                                    diffusion.timestep_map), rtol=1e-12)
    assert any(t != int(t) for t in diffusion.timestep_map)
    model = Recorder()
    diffusion.sample_loop(model, (3, 2), "dpmpp_2m")
    scale = 1000 / T if rescale_timesteps else 1.0
    for seen, step in zip(model.seen, sorted(diffusion.timestep_map, reverse=True)):
        assert seen.dtype == torch.float32 and seen.shape == (3,)
        torch.testing.assert_close(seen, torch.full((3,), step * scale, dtype=torch.float32))


def test_integer_nodes_walk_as_the_integer_process():
    """trailing10 of T = 1000 falls on integers: the continuous process is the integer one."""
    continuous, integer = spaced("trailing10"), spaced("trailing10", continuous_timesteps=False)
    assert continuous.timestep_map == integer.timestep_map
    np.testing.assert_array_equal(continuous.alphas_cumprod, integer.alphas_cumprod)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sampler in ("ddim", "dpmpp_2m", "unipc"):
        got = continuous.sample_loop(SMOOTH.model(ALPHAS_CUMPROD, fractional_timesteps=True), noise.shape, sampler,
                                     noise=noise, clip_denoised=False)
        expected = integer.sample_loop(SMOOTH.model(ALPHAS_CUMPROD), noise.shape, sampler, noise=noise,
                                       clip_denoised=False)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("spec", ["ddim10", "10,20", [5, 5]])
def test_spellings_without_a_continuous_form_are_errors(spec):
    with pytest.raises(ValueError, match="no continuous form"):
        space_timesteps(T, spec, continuous_timesteps=True)


def test_fractional_timesteps_need_continuous_timesteps():
    with pytest.raises(ValueError, match="continuous_timesteps=True"):
        SpacedDiffusion(use_timesteps={0, 10.5}, betas=BETAS, model_mean_type=ModelMeanType.EPSILON,
                        model_var_type=ModelVarType.FIXED_SMALL, loss_type=LossType.MSE)


@pytest.fixture(scope="module")
def exact_end():
    """The exact probability-flow solution from step T - 1 to step 0, then x0-hat: every logsnrN's target."""
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = SMOOTH.ode_solution(noise, ALPHAS_CUMPROD[-1], ALPHAS_CUMPROD[0], steps=1000)
    return noise, SMOOTH.pred_xstart(x, ALPHAS_CUMPROD[0])


def logsnr_errors(spec, sampler, noise, exact):
    """RMS errors to the exact solution of `sampler` on the integer and the continuous spacing."""
    errors = []
    for continuous in (False, True):
        model = SMOOTH.model(ALPHAS_CUMPROD, fractional_timesteps=continuous)
        out = spaced(spec, continuous_timesteps=continuous).sample_loop(model, noise.shape, sampler, noise=noise,
                                                                       clip_denoised=False)
        errors.append(rms_error(out, exact))
    return errors


def uniform_lambda_walk(sampler, noise, count):
    """
    ddim or dpmpp_2m written from the papers on `count` nodes exactly uniform in
    lambda from step T - 1 to step 0, then x_0 = x0-hat; the mixture's own
    denoiser at each (alpha, sigma). DPM-Solver++(2M) (Lu et al. 2022b,
    Algorithm 2) with equal steps: D = 1.5 m_k - 0.5 m_(k-1), first order at the
    first step and, below 15 steps, at the last step between timesteps.
    """
    lam = np.linspace(half_log_snr(ALPHAS_CUMPROD[-1]), half_log_snr(ALPHAS_CUMPROD[0]), count)
    alpha, sigma = np.sqrt(1 / (1 + np.exp(-2 * lam))), np.sqrt(1 / (1 + np.exp(2 * lam)))
    x, previous = noise, None
    for k in range(count):
        pred_xstart = SMOOTH.denoise(x, alpha[k], sigma[k])
        if k == count - 1:
            return pred_xstart
        second_order = sampler == "dpmpp_2m" and previous is not None and k < count - 2
        d = 1.5 * pred_xstart - 0.5 * previous if second_order else pred_xstart
        # DPM-Solver++ eq. 9 with x0-hat held at d over the step (DDIM, Song et al. 2020, eq. 12 with eta = 0).
        x = sigma[k + 1] / sigma[k] * x - alpha[k + 1] * np.expm1(-(lam[k + 1] - lam[k])) * d
        previous = pred_xstart


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_the_continuous_logsnr_walk_is_the_solver_on_exactly_uniform_lambda(exact_end, sampler):
    """
    First node T - 1, last node 0, then x_0; the model sees the interpolated
    abar at every node: the fractional process's walk is the solver on the
    ideal nodes, up to float32 round-off, the model's float32 timestep and
    ddim_sample's float32 coefficients (seen: at most 3.1e-7 for ddim and
    1.6e-8 for dpmpp_2m; the integer spacing's walk is 5.9e-4 and 2.2e-3 off).
    """
    noise, _ = exact_end
    got = spaced("logsnr10").sample_loop(SMOOTH.model(ALPHAS_CUMPROD, fractional_timesteps=True), noise.shape,
                                         sampler, noise=noise, clip_denoised=False)
    torch.testing.assert_close(got, uniform_lambda_walk(sampler, noise, 10), rtol=0, atol=2e-6)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "unipc"])
def test_exact_nodes_help_where_rounding_crowds_the_spacing(exact_end, sampler):
    """
    logsnr200 of T = 1000: the integer spacing must take consecutive steps from 0
    up where its targets crowd (lambda steps up to 0.39 against 0.049), the
    continuous one keeps every lambda step equal; the second- and third-order
    solvers, built for smooth steps, gain from it (seen: dpmpp_2m 7.5e-5 against
    1.1e-4, unipc 4.7e-6 against 4.9e-5).
    """
    integer, continuous = logsnr_errors("logsnr200", sampler, *exact_end)
    assert continuous < 0.8 * integer, (continuous, integer)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "unipc"])
def test_where_rounding_barely_moves_the_nodes_the_errors_agree(exact_end, sampler):
    """
    logsnr10 of T = 1000: rounding moves each lambda step by at most 0.025 of
    1.07, and the errors agree within a few percent, in the integer spacing's
    favour here (seen, integer against continuous: ddim 0.12143 against
    0.12168, dpmpp_2m 1.5616e-2 against 1.5922e-2, unipc 2.0293e-2 against
    2.0857e-2). Exactly uniform lambda is a rule, not the error's minimum:
    test_the_spacings_differ_only_by_where_their_nodes_lie shows the gap is the
    nodes' displacement, and which side it favours changes with N and the data.
    """
    integer, continuous = logsnr_errors("logsnr10", sampler, *exact_end)
    assert continuous == pytest.approx(integer, rel=0.05)


@pytest.mark.parametrize("count", [10, 12])
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "unipc"])
def test_the_spacings_differ_only_by_where_their_nodes_lie(exact_end, sampler, count):
    """
    The fractional process walked along nodes (1 - s) t_exact + s t_integer,
    s = 0, 1/4, ..., 1, from logsnrN's exact nodes to its integer ones: at s = 1
    it is the integer process, and between, the error to the exact solution
    moves steadily (nearly linearly) in s, the first-order change of a solver's
    error under a small shift of its nodes (here at most 0.025 in lambda).
    Uniform lambda is no stationary point of that error, so a shift either way
    can lower it: from s = 0 to 1 the errors went (ddim, dpmpp_2m, unipc)
    N = 10: 0.12168 -> 0.12143, 1.592e-2 -> 1.562e-2, 2.086e-2 -> 2.029e-2;
    N = 12: 0.10143 -> 0.10151, 1.580e-2 -> 1.691e-2, 1.765e-2 -> 1.913e-2.
    On other mixtures the sign at either N differs again (logsnr12 on one
    Gaussian, mean (0.3, -0.2), std 0.1: unipc 7.5e-4 exact against 3.7e-4 rounded).
    """
    noise, exact = exact_end
    exact_nodes = np.array(sorted(space_timesteps(T, f"logsnr{count}", betas=BETAS, continuous_timesteps=True)))
    integer_nodes = np.array(sorted(space_timesteps(T, f"logsnr{count}", betas=BETAS)), dtype=np.float64)
    model = SMOOTH.model(ALPHAS_CUMPROD, fractional_timesteps=True)
    errors = []
    for s in np.linspace(0, 1, 5):
        nodes = (1 - s) * exact_nodes + s * integer_nodes
        out = on_timesteps(nodes.tolist()).sample_loop(model, noise.shape, sampler, noise=noise, clip_denoised=False)
        errors.append(rms_error(out, exact))
    integer = spaced(f"logsnr{count}", continuous_timesteps=False).sample_loop(
        SMOOTH.model(ALPHAS_CUMPROD), noise.shape, sampler, noise=noise, clip_denoised=False)
    torch.testing.assert_close(out, integer, rtol=0, atol=1e-12)
    changes = np.diff(errors)
    assert np.all(np.sign(changes) == np.sign(changes[0])), errors
    np.testing.assert_allclose(changes, changes.mean(), rtol=0.15, err_msg=str(errors))
