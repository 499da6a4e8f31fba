"""
The restoration methods on noise processes other than the DDPM family's:
EDMDiffusion and FlowDiffusion with a Gaussian mixture's exact networks, and,
through the interface alone (noise_process.py), an EDM-like path (alpha = 1,
sigma from 20 down, x_T scaled by sigma_max) and a flow-like one (alpha =
1 - t, sigma = t, pure noise with alpha = 0 at the first node), each with a
Gaussian mixture's exact denoiser. SDEdit from the start is the process's
own sampling, DDNM is consistent with every sampler, RePaint without
resampling is replace, and where known and unknown parts are independent
replace samples the exact posterior, which checks the noise levels that
replace pastes and RePaint re-noises with on these paths.
"""

import pytest
import torch
from _mixture_images import (
    SHAPE,
    edm_like,
    exact_draws,
    exact_posterior,
    flow_like,
    frechet_distance,
    left_known,
    mixture_moments,
    operator_matrix,
    priors,
    shares,
    std_error,
)

from improved_diffusion import samplers
from improved_diffusion.edm import EDMDiffusion
from improved_diffusion.flow import FlowDiffusion
from improved_diffusion.operators import Colorize, Inpaint, SuperRes
from improved_diffusion.restoration import restore

PATHS = {"edm": edm_like, "flow": flow_like}


@pytest.fixture(scope="module", params=sorted(PATHS))
def path(request):
    mixture = priors("inpaint")["independent"]
    process = PATHS[request.param]()
    return process, process.exact_model(mixture), mixture


def images(mixture, n, seed=0):
    return mixture.sample(n, generator=torch.Generator().manual_seed(seed)).float().view(n, *SHAPE).clamp(-1, 1)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler", "dpmpp_2m"])
def test_sdedit_from_the_start_is_the_processs_own_sampling(path, sampler):
    process, model, mixture = path
    truth = images(mixture, 4)
    noise = torch.randn(truth.shape, generator=torch.Generator().manual_seed(1))
    *_, last = samplers.sample_loop_progressive(process, model, truth.shape, sampler, noise=noise,
                                                generator=torch.Generator().manual_seed(2))
    got = restore(process, model, truth, None, method="sdedit", sampler=sampler, noise=noise,
                  generator=torch.Generator().manual_seed(2), t_start=1.0)
    assert torch.equal(got, last["sample"])


@pytest.mark.parametrize("sampler", sorted(samplers.SAMPLERS))
def test_ddnm_is_consistent_on_every_path_with_every_sampler(path, sampler):
    process, model, mixture = path
    truth = images(mixture, 4)
    for operator in (Inpaint(left_known()), SuperRes(2), Colorize(3)):
        y = operator(truth)
        x = restore(process, model, y, operator, method="ddnm", sampler=sampler,
                    generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(operator(x), y, rtol=0, atol=2e-6)


def test_repaint_without_resampling_is_replace_and_both_keep_the_known_pixels(path):
    process, model, mixture = path
    truth = images(mixture, 4)
    operator = Inpaint(left_known())
    y = operator(truth)
    replaced = restore(process, model, y, operator, method="replace", sampler="ddpm",
                       generator=torch.Generator().manual_seed(4))
    single = restore(process, model, y, operator, method="repaint", sampler="ddpm",
                     generator=torch.Generator().manual_seed(4), jump_length=5, jump_n_sample=1)
    resampled = restore(process, model, y, operator, method="repaint", sampler="ddpm",
                        generator=torch.Generator().manual_seed(4), jump_length=5, jump_n_sample=3)
    assert torch.equal(replaced, single)
    known = left_known().bool().expand_as(y)
    assert torch.equal(resampled[known], truth[known]) and resampled.isfinite().all()


@pytest.mark.parametrize("method", ["replace", "repaint"])
def test_where_the_parts_are_independent_replace_and_repaint_sample_the_posterior(path, method):
    process, model, mixture = path
    n = 2000
    operator = Inpaint(left_known())
    truth = mixture.means[0] + 0.15 * torch.randn(mixture.dim, generator=torch.Generator().manual_seed(1),
                                                  dtype=torch.float64)
    a = operator_matrix(operator)
    weights, means, covariances = exact_posterior(mixture, a, a @ truth)
    mean, covariance = mixture_moments(weights, means, covariances)
    floor = frechet_distance(exact_draws(weights, means, covariances, n), mean, covariance)
    y = operator(truth.float().view(1, *SHAPE)).expand(n, -1, -1, -1).contiguous()
    args = {"jump_length": 5, "jump_n_sample": 3} if method == "repaint" else {}
    x = restore(process, model, y, operator, method=method, sampler="ddpm", clip_denoised=False,
                generator=torch.Generator().manual_seed(5), **args)
    assert frechet_distance(x, mean, covariance) < 3 * floor
    got = shares(mixture, x)
    for k in range(3):
        assert abs(got[k] - weights[k]) < 4 * std_error(float(weights[k]), n), (got, weights)


# ---------------------------------------------------------------- EDM (edm.py) and flow matching (flow.py)


def flat_model(model):
    """A model of flat [N x D] inputs (the mixture's) as one of [N x C x H x W] images."""
    return lambda x, t, **kwargs: model(x.flatten(1), t).view_as(x)


@pytest.fixture(scope="module", params=["edm", "flow"])
def process(request):
    """(process, its nodes of 100 steps, the mixture's exact network for it, the mixture)."""
    mixture = priors("inpaint")["independent"]
    if request.param == "edm":
        edm = EDMDiffusion()
        return edm, edm.sampling_nodes(steps=100), flat_model(mixture.edm_model(edm.sigma_data)), mixture
    flow = FlowDiffusion()
    return flow, flow.sampling_nodes(steps=100), flat_model(mixture.flow_model()), mixture


@pytest.mark.parametrize("sampler", ["heun", "euler", "dpmpp_2m"])
def test_sdedit_from_the_start_is_edm_and_flow_sampling(process, sampler):
    diffusion, nodes, model, mixture = process
    truth = images(mixture, 4)
    noise = torch.randn(truth.shape, generator=torch.Generator().manual_seed(1))
    expected = diffusion.sample_loop(model, truth.shape, sampler=sampler, steps=100, noise=noise)
    got = restore(diffusion, model, truth, None, method="sdedit", sampler=sampler, noise=noise, nodes=nodes,
                  t_start=1.0)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m", "unipc", "ddpm"])
def test_ddnm_on_edm_and_flow_agrees_with_the_measurement(process, sampler):
    diffusion, nodes, model, mixture = process
    truth = images(mixture, 4)
    for operator in (Inpaint(left_known()), SuperRes(2)):
        y = operator(truth)
        x = restore(diffusion, model, y, operator, method="ddnm", sampler=sampler, nodes=nodes,
                    generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(operator(x), y, rtol=0, atol=2e-6)


def test_replace_on_edm_and_flow_samples_the_posterior_where_the_parts_are_independent(process):
    diffusion, nodes, model, mixture = process
    n = 2000
    operator = Inpaint(left_known())
    truth = mixture.means[0] + 0.15 * torch.randn(mixture.dim, generator=torch.Generator().manual_seed(1),
                                                  dtype=torch.float64)
    a = operator_matrix(operator)
    weights, means, covariances = exact_posterior(mixture, a, a @ truth)
    mean, covariance = mixture_moments(weights, means, covariances)
    floor = frechet_distance(exact_draws(weights, means, covariances, n), mean, covariance)
    y = operator(truth.float().view(1, *SHAPE)).expand(n, -1, -1, -1).contiguous()
    x = restore(diffusion, model, y, operator, method="replace", sampler="ddpm", nodes=nodes, clip_denoised=False,
                generator=torch.Generator().manual_seed(5))
    assert torch.equal(x[left_known().bool().expand_as(x)], y[left_known().bool().expand_as(y)])
    assert frechet_distance(x, mean, covariance) < 3 * floor
    got = shares(mixture, x)
    for k in range(3):
        assert abs(got[k] - weights[k]) < 4 * std_error(float(weights[k]), n), (got, weights)
