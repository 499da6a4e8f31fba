"""
Timestep respacing: a diffusion process over a subset of a base process's
steps (IDDPM section 4), so a model trained with T steps samples in fewer.
"""

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps, section_counts):
    """
    The timesteps of a T-step process to keep.

    :param num_timesteps: T, the number of steps in the base process.
    :param section_counts: "ddimN" for DDIM's evenly strided N steps; or a list
        of ints (or a comma-separated string) splitting T into equal sections,
        each keeping that many evenly spaced steps. "10,15,20" keeps 10 steps
        from the first third, 15 from the second and 20 from the last.
    :return: a set of the kept step indices.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            return _ddim_timesteps(num_timesteps, _parse_count(section_counts[len("ddim"):], section_counts))
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


def _parse_count(text, section_counts):
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"cannot parse timestep respacing {section_counts!r}: use 'ddimN' or comma-separated counts like '10,15,20'"
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
