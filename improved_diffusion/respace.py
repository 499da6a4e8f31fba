"""
Timestep respacing: a diffusion process over a subset of a base process's
steps (IDDPM section 4), so a model trained with T steps samples in fewer.
"""

import json
import math

import blobfile as bf
import numpy as np
import torch

from .errors import InputError
from .gaussian_diffusion import GaussianDiffusion

# Spellings "<name>N" that place N steps by a rule over the whole process.
SPACINGS = ("ddim", "trailing", "quad", "logsnr", "karras")
KARRAS_RHO = 7.0


def space_timesteps(num_timesteps, section_counts, betas=None):
    """
    The timesteps of a T-step process to keep.

    :param num_timesteps: T, the number of steps in the base process.
    :param section_counts: one of
        - "ddimN": DDIM's evenly strided N steps;
        - "trailingN", "quadN", "logsnrN", "karrasN": N steps placed by the
          rules of _spaced_steps (every one includes T - 1);
        - a path ending in ".json": a JSON list of increasing timesteps;
        - a list of ints (or a comma-separated string) splitting T into equal
          sections, each keeping that many evenly spaced steps. "10,15,20"
          keeps 10 steps from the first third, 15 from the second and 20 from
          the last.
    :param betas: the base process's betas; "logsnrN" and "karrasN" need them.
    :return: a set of the kept step indices.
    """
    if isinstance(section_counts, str):
        if section_counts.endswith(".json"):
            return _json_timesteps(num_timesteps, section_counts)
        for name in SPACINGS:
            if section_counts.startswith(name):
                count = _parse_count(section_counts[len(name):], section_counts)
                if name == "ddim":
                    return _ddim_timesteps(num_timesteps, count)
                return _spaced_steps(name, num_timesteps, count, betas)
        section_counts = [_parse_count(x, section_counts) for x in section_counts.split(",")]
    if not section_counts:
        raise ValueError("section_counts is empty: give at least one count, e.g. [50] or 'ddim50'")
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start = 0
    kept = []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        kept += _section_steps(start, size, count)
        start += size
    return set(kept)


def _spaced_steps(name, num_timesteps, count, betas):
    """
    `count` distinct timesteps of a T-step process by a named rule, k = 0 ... N-1:
    trailing: round(T - k T / N) - 1 (Lin et al. 2023, Table 2);
    quad: round((T - 1)(1 - k / (N - 1))^2), quadratic in time over the whole process;
    logsnr: uniform in lambda = log(sqrt(abar) / sqrt(1 - abar)) from step T - 1 to step 0;
    karras: sigma = sqrt((1 - abar) / abar) from sigma_max to sigma_min with
    rho = 7 (Karras et al. 2022, eq. 5).
    Each target goes to the nearest unused base timestep.
    """
    if not 1 <= count <= num_timesteps:
        raise ValueError(
            f"cannot take {count} distinct steps ({name}{count}) from a process of T = {num_timesteps} "
            f"diffusion steps; ask for between 1 and {num_timesteps}"
        )
    k = np.arange(count, dtype=np.float64)
    grid = np.arange(num_timesteps, dtype=np.float64)
    if name == "trailing":
        targets = np.array([round(num_timesteps - i * num_timesteps / count) - 1 for i in range(count)], float)
    elif name == "quad":
        frac = k / (count - 1) if count > 1 else k
        targets = (num_timesteps - 1) * (1 - frac) ** 2
    else:
        grid = _log_snr(num_timesteps, betas, f"{name}{count}")
        if np.isinf(grid[-1]) and count > 1:
            # abar_{T-1} = 0 (zero terminal SNR): step T - 1 and count - 1 steps over the finite range.
            return {num_timesteps - 1} | _lambda_steps(name, grid[:-1], count - 1)
        return _lambda_steps(name, grid, count)
    return _nearest_unused(grid, targets)


def _lambda_steps(name, grid, count):
    """`count` steps of lambda grid [T] from grid[-1] to grid[0]: uniform in lambda, or Karras's rho in sigma."""
    first, last = grid[-1], grid[0]
    frac = np.arange(count, dtype=np.float64) / max(count - 1, 1)
    if name == "logsnr":
        targets = first + (last - first) * frac
    else:
        # Karras et al. eq. 5 in sigma = exp(-lambda), matched in log sigma.
        inv_rho = 1.0 / KARRAS_RHO
        sigma_max, sigma_min = math.exp(-first), math.exp(-last)
        sigmas = (sigma_max**inv_rho + frac * (sigma_min**inv_rho - sigma_max**inv_rho)) ** KARRAS_RHO
        targets = -np.log(sigmas)
    return _nearest_unused(grid, targets)


def _log_snr(num_timesteps, betas, spelling):
    """lambda_t = log(sqrt(abar_t) / sqrt(1 - abar_t)) of the base process, [T] float64."""
    if betas is None:
        raise ValueError(
            f"timestep respacing {spelling!r} places steps by the noise schedule: pass the base process's "
            f"betas, space_timesteps(T, {spelling!r}, betas=betas)"
        )
    betas = np.asarray(betas, dtype=np.float64)
    if betas.shape != (num_timesteps,):
        raise ValueError(f"betas has shape {list(betas.shape)}, expected [{num_timesteps}] for T = {num_timesteps}")
    alphas_cumprod = np.cumprod(1.0 - betas)
    with np.errstate(divide="ignore"):
        return 0.5 * (np.log(alphas_cumprod) - np.log1p(-alphas_cumprod))


def _nearest_unused(grid, targets):
    """For each target in turn, the index of the nearest grid value not taken yet (a set of ints)."""
    order = np.argsort(grid, kind="stable")
    values = grid[order]
    taken = set()
    for target in targets:
        right = int(np.searchsorted(values, target))
        left = right - 1
        while True:
            left_gap = target - values[left] if left >= 0 else np.inf
            right_gap = values[right] - target if right < len(values) else np.inf
            pick = left if left_gap <= right_gap else right
            if int(order[pick]) not in taken:
                break
            if pick == left:
                left -= 1
            else:
                right += 1
        taken.add(int(order[pick]))
    return taken


def _json_timesteps(num_timesteps, path):
    """The timesteps listed in a JSON file: a non-empty list of increasing ints in [0, T - 1]."""
    if not bf.exists(path):
        raise InputError(f"timestep respacing file {path} does not exist")
    with bf.BlobFile(path, "r") as f:
        try:
            steps = json.load(f)
        except json.JSONDecodeError as exc:
            raise InputError(f"timestep respacing file {path} is not valid JSON: {exc}") from None
    valid = (
        isinstance(steps, list)
        and steps
        and all(isinstance(s, int) and not isinstance(s, bool) for s in steps)
        and all(a < b for a, b in zip(steps, steps[1:]))
        and 0 <= steps[0]
        and steps[-1] < num_timesteps
    )
    if not valid:
        raise InputError(
            f"timestep respacing file {path} must hold a non-empty JSON list of strictly increasing "
            f"integer timesteps in [0, {num_timesteps - 1}] (as search_timesteps.py writes), got "
            f"{json.dumps(steps)[:200]}"
        )
    return set(steps)


def _parse_count(text, section_counts):
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"cannot parse timestep respacing {section_counts!r}: use 'ddimN', 'trailingN', 'quadN', "
            f"'logsnrN', 'karrasN', a .json list of timesteps, or comma-separated counts like '10,15,20'"
        ) from None


def _ddim_timesteps(num_timesteps, desired_count):
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired_count:
            return set(range(0, num_timesteps, stride))
    raise ValueError(
        f"cannot take exactly {desired_count} evenly strided steps (ddim{desired_count}) from "
        f"{num_timesteps} diffusion steps; pick a count that some stride gives, "
        f"or use section counts such as '{desired_count}'"
    )


def _section_steps(start, size, count):
    """`count` steps spread evenly over [start, start + size), rounding ties to even."""
    if size < count:
        raise ValueError(f"cannot take {count} steps from a section of {size} steps")
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    steps = []
    position = 0.0
    for _ in range(count):
        steps.append(start + round(position))
        position += stride
    return steps


class SpacedDiffusion(GaussianDiffusion):
    """
    A diffusion process that keeps some steps of a base process.

    :param use_timesteps: the base-process steps to keep (a collection of ints).
    :param kwargs: the GaussianDiffusion arguments of the base process.
    """

    def __init__(self, use_timesteps, **kwargs):
        base = GaussianDiffusion(**kwargs)
        self.use_timesteps = set(int(t) for t in use_timesteps)
        self.original_num_steps = base.num_timesteps
        bad = sorted(t for t in self.use_timesteps if not 0 <= t < base.num_timesteps)
        if not self.use_timesteps or bad:
            raise ValueError(
                f"use_timesteps must be a non-empty set of steps in [0, {base.num_timesteps - 1}]"
                + (f"; got out-of-range steps {bad[:5]}" if bad else "")
            )
        self.timestep_map = sorted(self.use_timesteps)
        kwargs["betas"] = _respaced_betas(base.alphas_cumprod, self.timestep_map)
        super().__init__(**kwargs)
        self._timestep_map_tensors = {}

    def _call_model(self, model, x, t, model_kwargs):
        return self._wrap_model(model)(x, t, **(model_kwargs or {}))

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self)

    def _scale_timesteps(self, t):
        # The wrapped model scales timesteps itself, against the base process's T.
        return t

    def _timestep_map_on(self, device):
        """timestep_map as an int64 tensor on `device`, made once per device."""
        key = str(device)
        if key not in self._timestep_map_tensors:
            self._timestep_map_tensors[key] = torch.tensor(self.timestep_map, dtype=torch.long, device=device)
        return self._timestep_map_tensors[key]


def _respaced_betas(alphas_cumprod, kept):
    """Betas of the kept steps: beta' = 1 - abar_i / abar_(previous kept) (IDDPM eq. 19)."""
    betas = []
    last_alpha_cumprod = 1.0
    for i in kept:
        betas.append(1 - alphas_cumprod[i] / last_alpha_cumprod)
        last_alpha_cumprod = alphas_cumprod[i]
    return np.array(betas, dtype=np.float64)


class _WrappedModel:
    """
    Calls a base-process model with a spaced process's timesteps: index t
    becomes timestep_map[t], scaled to [0, 1000) when rescale_timesteps.
    """

    def __init__(self, model, diffusion):
        self.model = model
        self.diffusion = diffusion
        self.rescale_timesteps = diffusion.rescale_timesteps
        self.original_num_steps = diffusion.original_num_steps

    @property
    def timestep_map(self):
        return self.diffusion.timestep_map

    def __call__(self, x, ts, **kwargs):
        new_ts = self.diffusion._timestep_map_on(ts.device)[ts]
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)
