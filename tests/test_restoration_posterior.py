"""
Restorations against the exact posterior. With a Gaussian-mixture prior over
3 x 4 x 4 images and a linear measurement, p(x | y) is a Gaussian mixture in
closed form (_mixture_images.exact_posterior); with the mixture's exact
denoiser as the model, each method's draws of one y are compared with it:
the Frechet distance of their moments to the posterior's, against the
distance that as many exact posterior draws have (the floor), and the share
of draws in each component against the exact posterior weights.

Two priors per operator (inpainting the left half, 2x super-resolution):
  - "independent": the components differ only where y does not look (the
    unknown half; the within-block pattern), so known and unknown parts are
    independent and replacing the known part is exact (Song et al. 2021);
  - "correlated": the components differ on both parts, so the known part says
    which component the unknown part must come from. Replacement is biased
    there (its unknown part settles on a component before the noised known
    part can tell it which; Lugmayr et al. 2022, section 4.2), DDNM too (it
    promises A x = y, not the posterior), RePaint's resampling at its paper's
    setting removes most of the bias, and DPS (an approximation of the
    posterior) fits y and leaves out the component y rules out.
"""

import pytest
import torch
from _mixture_images import (
    SHAPE,
    diffusion_pair,
    exact_draws,
    exact_posterior,
    frechet_distance,
    image_model,
    left_known,
    mixture_moments,
    operator_matrix,
    priors,
    shares,
    std_error,
)

from improved_diffusion.operators import Inpaint, SuperRes
from improved_diffusion.restoration import restore

N = 2000


def operator_of(task):
    return Inpaint(left_known()) if task == "inpaint" else SuperRes(2)


class Case:
    """One y of one prior and operator: the exact posterior, its draws' floor, and restorations of y."""

    def __init__(self, task, prior):
        self.mixture = priors(task)[prior]
        self.operator = operator_of(task)
        truth = self.mixture.means[0] + 0.15 * torch.randn(self.mixture.dim, generator=torch.Generator().manual_seed(1),
                                                          dtype=torch.float64)
        a = operator_matrix(self.operator)
        self.weights, means, covariances = exact_posterior(self.mixture, a, a @ truth)
        self.mean, self.covariance = mixture_moments(self.weights, means, covariances)
        self.floor = frechet_distance(exact_draws(self.weights, means, covariances, N), self.mean, self.covariance)
        self.y = self.operator(truth.float().view(1, *SHAPE)).expand(N, -1, -1, -1).contiguous()

    def restore(self, method, sampler="ddpm", respacing="100", **args):
        diffusion, base = diffusion_pair(respacing)
        model = image_model(self.mixture, base)
        x = restore(diffusion, model, self.y, self.operator, method=method, sampler=sampler,
                    generator=torch.Generator().manual_seed(2), clip_denoised=False, **args)
        return x, frechet_distance(x, self.mean, self.covariance), shares(self.mixture, x)

    def measurement_error(self, x):
        return (self.operator(x) - self.y).flatten(1).norm(dim=1).mean()


@pytest.fixture(scope="module", params=["inpaint", "super_res"])
def task(request):
    return request.param


@pytest.mark.parametrize("method", ["replace", "ddnm"])
def test_where_known_and_unknown_parts_are_independent_replace_and_ddnm_sample_the_posterior(task, method):
    case = Case(task, "independent")
    assert torch.allclose(case.weights, case.mixture.weights), "y says nothing about the component here"
    x, distance, got = case.restore(method)
    assert distance < 3 * case.floor, (distance, case.floor)
    for k in range(3):
        assert abs(got[k] - case.weights[k]) < 4 * std_error(float(case.weights[k]), N), (got, case.weights)


@pytest.fixture(scope="module")
def correlated(task):
    """The correlated case of the task, and its replace and repaint restorations."""
    case = Case(task, "correlated")
    return case, {"replace": case.restore("replace"),
                  "repaint": case.restore("repaint", respacing="250", jump_length=10, jump_n_sample=10)}


def test_the_correlated_posterior_is_split_between_two_components(correlated):
    case, _ = correlated
    # y matches components 0 and 2 equally (they agree on what y measures) and rules out component 1.
    assert case.weights[1] < 1e-6 and abs(case.weights[0] - 0.5) < 1e-6


def test_replace_is_biased_where_known_and_unknown_parts_correlate(correlated):
    case, restored = correlated
    x, distance, got = restored["replace"]
    assert torch.allclose(case.operator(x), case.y, atol=2e-6)
    # The unknown part settles on "like component 0" with the prior's odds 1 : 2 (components 1 and 2
    # share it) before the noised known part rules component 1 out: too few draws in component 0.
    assert case.weights[0] - got[0] > 0.05, (got, case.weights)
    assert distance > 10 * case.floor, (distance, case.floor)


def test_repaints_resampling_removes_most_of_replaces_bias(correlated):
    """RePaint at its paper's setting: 250 steps, jumps of 10 steps, 10 passes."""
    case, restored = correlated
    x, distance, got = restored["repaint"]
    _, replace_distance, replace_got = restored["replace"]
    assert torch.allclose(case.operator(x), case.y, atol=2e-6)
    assert abs(got[0] - case.weights[0]) < 0.5 * abs(replace_got[0] - case.weights[0]), (got, replace_got)
    assert abs(got[0] - case.weights[0]) < 4 * std_error(0.5, N), (got, case.weights)
    assert distance < 0.3 * replace_distance and distance < 10 * case.floor, (distance, replace_distance, case.floor)


def test_ddnm_keeps_y_exactly_and_is_biased_as_replace_is(correlated):
    case, _ = correlated
    x, distance, got = case.restore("ddnm", sampler="ddim")
    torch.testing.assert_close(case.operator(x), case.y, rtol=0, atol=2e-6)
    assert got[1] == 0 and case.weights[0] - got[0] > 0.05, (got, case.weights)


def test_dps_fits_y_and_leaves_out_the_component_y_rules_out(correlated):
    """DPS at 250 ancestral steps fits y and stays in the posterior's support (it favours component 0, ~0.66 here)."""
    case, _ = correlated
    x, distance, got = case.restore("dps", respacing="250", scale=0.1)
    unconditional, unconditional_distance, _ = case.restore("sdedit", respacing="250", t_start=1.0)
    assert case.measurement_error(x) < 0.1 * case.measurement_error(unconditional)
    assert got[1] < 0.01, got
    assert distance < 0.1 * unconditional_distance, (distance, unconditional_distance)
