"""
Search the N timesteps at which a sampler does best on a given model, in the
manner of Chen et al. 2024 ("GITS", trajectory regularity): on a small batch,
a fine-step reference trajectory over a grid of candidate timesteps; the local
error of every jump between grid points; the N-node path of least total error
by dynamic programming; then the path, and the fixed spacings, scored by the
sampler's real error against the reference, and the best refined by moving one
timestep at a time while that error falls.

Any process of this library: the DDPM family's nodes are integer base
timesteps, EDM's noise levels sigma and a flow's times t (floats). In every
one a larger node is a noisier one.
"""

import numpy as np
from tqdm.auto import tqdm

from .gaussian_diffusion import GaussianDiffusion
from .noise_process import combine, ddim_update
from .respace import SpacedDiffusion, space_timesteps

FIXED_SPACINGS = ("trailing", "logsnr", "karras")


def fixed_spacings(base):
    """The spellings the search is compared with: trailing, logsnr and karras (EDM: uniform for trailing)."""
    return FIXED_SPACINGS if is_discrete(base) else ("uniform", "logsnr", "karras")


def is_discrete(base):
    """Whether `base`'s nodes are integer timesteps (the DDPM family)."""
    return isinstance(base, GaussianDiffusion)


def spaced_nodes(base, spelling):
    """The nodes of a --timestep_respacing spelling of `base`, increasing (ints, or floats for EDM and flow)."""
    if is_discrete(base):
        return sorted(space_timesteps(base.num_timesteps, spelling, betas=base.betas))
    return sorted(base.sampling_nodes(spelling).times)


def respaced(base, timesteps):
    """`base` walking the nodes `timesteps` (a SpacedDiffusion of the full-length DDPM process, else a copy)."""
    if not is_discrete(base):
        return base.with_nodes(sorted(timesteps))
    return SpacedDiffusion(
        use_timesteps=timesteps,
        betas=base.betas,
        model_mean_type=base.model_mean_type,
        model_var_type=base.model_var_type,
        loss_type=base.loss_type,
        rescale_timesteps=base.rescale_timesteps,
    )


def reference_trajectory(base, model, x_T, grid, sampler, model_kwargs=None, clip_denoised=True, progress=False):
    """
    The sampler over every grid timestep from x_T.

    :param grid: increasing nodes, [G], the last the noisiest (T - 1).
    :return: (xs, pred_xstarts, final): x at each grid node, noisiest first
        ([G] list of [B x ...]), the x0-hats there, and the clean end.
    """
    xs, pred_xstarts = [x_T], []
    for out in respaced(base, grid).sample_loop_progressive(
        model, x_T.shape, sampler, noise=x_T, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
        progress=progress,
    ):
        xs.append(out["sample"])
        pred_xstarts.append(out["pred_xstart"])
    return xs[:-1], pred_xstarts, xs[-1]


def jump_costs(base, grid, xs, pred_xstarts, final):
    """
    cost[i, j], i < j (grid nodes, noisiest first; j = G is the clean end):
    mean squared error of one DDIM step from the reference x at node i to node
    j against the reference x there (the local error GITS minimizes).

    :return: float64 [G x G+1] numpy array, inf where j <= i.
    """
    nodes = respaced(base, grid).sampling_nodes()
    targets = xs + [final]
    size = len(grid)
    cost = np.full((size, size + 1), np.inf)
    for i in range(size):
        alpha, sigma = nodes.alpha[i], nodes.sigma[i]
        eps = combine((1 / sigma, xs[i]), (-alpha / sigma, pred_xstarts[i]))
        for j in range(i + 1, size + 1):
            step = ddim_update(pred_xstarts[i], eps, nodes.alpha[j], nodes.sigma[j] ** 2)
            cost[i, j] = ((step - targets[j]) ** 2).mean().item()
    return cost


def cheapest_path(cost, num_nodes):
    """
    The num_nodes grid nodes from node 0 whose jumps, then the jump to the
    clean end, cost least in total (dynamic programming over nodes used).

    :return: list of node indices, increasing (0 first).
    """
    size = cost.shape[0]
    best = np.full((num_nodes + 1, size), np.inf)
    came_from = np.zeros((num_nodes + 1, size), dtype=int)
    best[1, 0] = 0.0
    for used in range(2, num_nodes + 1):
        for j in range(1, size):
            totals = best[used - 1, :j] + cost[:j, j]
            came_from[used, j] = int(np.argmin(totals))
            best[used, j] = totals[came_from[used, j]]
    last = int(np.argmin(best[num_nodes] + cost[:, size]))
    path = [last]
    for used in range(num_nodes, 1, -1):
        path.append(came_from[used, path[-1]])
    return path[::-1]


def path_error(base, model, x_T, timesteps, sampler, final, model_kwargs=None, clip_denoised=True):
    """RMS distance of the sampler's samples over `timesteps` to the reference end `final`."""
    samples = respaced(base, timesteps).sample_loop(
        model, x_T.shape, sampler, noise=x_T, clip_denoised=clip_denoised, model_kwargs=model_kwargs
    )
    return ((samples - final) ** 2).mean().sqrt().item()


def search_timesteps(base, model, x_T, num_steps, sampler, grid_size=100, refine_rounds=2,
                     model_kwargs=None, clip_denoised=True, progress=False):
    """
    The search of this module's docstring.

    :param base: the full-length GaussianDiffusion of the model, or its EDM or flow process.
    :param x_T: the [B x C x ...] starting noise of the batch.
    :return: (timesteps, errors): the best increasing nodes found (num_steps
        base timesteps, or floats for EDM and flow) and {name: RMS error} for
        "search", each of fixed_spacings(base) and "refined".
    """
    if is_discrete(base):
        grid = sorted(set(spaced_nodes(base, f"logsnr{min(grid_size, base.num_timesteps)}")) | {base.num_timesteps - 1})
    else:
        grid = spaced_nodes(base, f"logsnr{grid_size}")
    run = dict(model_kwargs=model_kwargs, clip_denoised=clip_denoised)
    xs, pred_xstarts, final = reference_trajectory(base, model, x_T, grid, sampler, progress=progress, **run)
    descending = list(reversed(grid))
    path = cheapest_path(jump_costs(base, grid, xs, pred_xstarts, final), num_steps)
    candidates = {"search": sorted(descending[i] for i in path)}
    for name in fixed_spacings(base):
        candidates[name] = spaced_nodes(base, f"{name}{num_steps}")
    errors = {name: path_error(base, model, x_T, steps, sampler, final, **run) for name, steps in candidates.items()}
    start = min(errors, key=errors.get)
    floor = -1 if is_discrete(base) else grid[0]
    refined, errors["refined"] = _refine(base, model, x_T, candidates[start], errors[start], sampler, final,
                                         refine_rounds, progress, run, floor)
    return refined, errors


def _refine(base, model, x_T, timesteps, error, sampler, final, rounds, progress, run, floor):
    """Coordinate descent: move each node but the noisiest by a few steps while the real error falls."""
    timesteps = list(timesteps)
    moves = list(range(len(timesteps) - 1)) * rounds
    for k in tqdm(moves, desc="refining", disable=not progress):
        for delta in _deltas(timesteps, k, is_discrete(base), floor):
            trial = sorted(timesteps[:k] + [timesteps[k] + delta] + timesteps[k + 1 :])
            trial_error = path_error(base, model, x_T, trial, sampler, final, **run)
            if trial_error < error:
                timesteps, error = trial, trial_error
                break
    return timesteps, error


def _deltas(timesteps, k, discrete, floor):
    """
    Moves of node k (not the last, the noisiest) a quarter of the way to its
    neighbours (to `floor`, excluded, below the first), either side, staying
    distinct: whole timesteps when `discrete`.
    """
    low = timesteps[k - 1] if k > 0 else floor
    high = timesteps[k + 1]
    deltas = []
    for limit in (low, high):
        delta = (limit - timesteps[k]) / 4
        delta = int(round(delta)) if discrete else delta
        if delta and low < timesteps[k] + delta < high:
            deltas.append(delta)
    return deltas
