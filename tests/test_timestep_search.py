"""The timestep search (timestep_search.py): its dynamic program and the whole search on an exact model."""

import itertools

import numpy as np
import torch

from improved_diffusion.gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from improved_diffusion.gaussian_diffusion import get_named_beta_schedule
from improved_diffusion.mixture import GaussianMixture
from improved_diffusion.respace import space_timesteps
from improved_diffusion.timestep_search import cheapest_path, path_error, reference_trajectory, search_timesteps


def brute_force(cost, num_nodes):
    """The cheapest increasing path from node 0 over num_nodes nodes, then the clean end, by enumeration."""
    size = cost.shape[0]
    best = None
    for inner in itertools.combinations(range(1, size), num_nodes - 1):
        path = (0, *inner)
        total = sum(cost[a, b] for a, b in zip(path, path[1:])) + cost[path[-1], size]
        if best is None or total < best[0]:
            best = (total, list(path))
    return best


def test_cheapest_path_is_the_optimum_of_every_path():
    rng = np.random.default_rng(0)
    for size, num_nodes in [(6, 1), (6, 3), (8, 4), (9, 9)]:
        cost = np.triu(rng.uniform(0.1, 2.0, size=(size, size + 1)), k=1)
        cost[np.tril_indices(size, 0, size + 1)] = np.inf
        path = cheapest_path(cost, num_nodes)
        total = sum(cost[a, b] for a, b in zip(path, path[1:])) + cost[path[-1], size]
        expected_total, _ = brute_force(cost, num_nodes)
        assert len(path) == num_nodes and path[0] == 0 and path == sorted(set(path))
        assert np.isclose(total, expected_total)


def test_search_on_an_exact_model_beats_the_fixed_spacings():
    mixture = GaussianMixture([0.2, 0.3, 0.25, 0.25], [[-0.5, -0.5], [0.5, 0.5], [-0.5, 0.5], [0.6, -0.4]],
                              [0.1, 0.15, 0.08, 0.12])
    betas = get_named_beta_schedule("linear", 1000)
    base = GaussianDiffusion(betas=betas, model_mean_type=ModelMeanType.EPSILON,
                             model_var_type=ModelVarType.FIXED_SMALL, loss_type=LossType.MSE)
    model = mixture.model(base.alphas_cumprod)
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    timesteps, errors = search_timesteps(base, model, x_T, 6, "dpmpp_2m", grid_size=60, clip_denoised=False)
    assert len(timesteps) == 6 and timesteps == sorted(set(timesteps)) and timesteps[-1] == 999
    assert set(errors) == {"search", "trailing", "logsnr", "karras", "refined"}
    assert errors["refined"] <= min(errors["trailing"], errors["logsnr"], errors["karras"])
    # The dynamic program alone already beats trailing and karras spacings on this model.
    assert errors["search"] < min(errors["trailing"], errors["karras"]), errors
    # The reported error is the sampler's real error over the returned timesteps.
    final = reference_trajectory(
        base, model, x_T, sorted(space_timesteps(1000, "logsnr60", betas=betas) | {999}), "dpmpp_2m",
        clip_denoised=False)[2]
    assert np.isclose(path_error(base, model, x_T, timesteps, "dpmpp_2m", final, clip_denoised=False),
                      errors["refined"])
