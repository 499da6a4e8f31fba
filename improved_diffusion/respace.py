"""
Timestep respacing: a diffusion process over a subset of a base process's
steps (IDDPM section 4), so a model trained with T steps samples in fewer; with
continuous_timesteps, over fractional timesteps placed exactly where a spacing
rule puts them (SPEC 18; DPM-Solver's discrete-to-continuous wrapper, Lu et al.
2022a, appendix), abar between integer timesteps interpolated linearly in log abar.
Also the node rules the continuous processes (EDM, flow) share.
"""

import json
import math

import blobfile as bf
import numpy as np
import torch

from .errors import InputError
from .gaussian_diffusion import GaussianDiffusion

# Spellings "<name>N" that place N steps by a rule over the whole process ("uniform" is "trailing").
SPACINGS = ("ddim", "trailing", "uniform", "quad", "logsnr", "karras")
# The spellings with exact fractional node values (continuous_timesteps=True).
CONTINUOUS_SPACINGS = ("trailing", "uniform", "quad", "logsnr", "karras")
KARRAS_RHO = 7.0


def space_timesteps(num_timesteps, section_counts, betas=None, continuous_timesteps=False):
    """
    The timesteps of a T-step process to keep.

    :param num_timesteps: T, the number of steps in the base process.
    :param section_counts: one of
        - "ddimN": DDIM's evenly strided N steps;
        - "trailingN" (or "uniformN"), "quadN", "logsnrN", "karrasN": N steps
          placed by the rules of _spaced_steps (every one includes T - 1);
        - a path ending in ".json": a JSON list of increasing timesteps;
        - a list of ints (or a comma-separated string) splitting T into equal
          sections, each keeping that many evenly spaced steps. "10,15,20"
          keeps 10 steps from the first third, 15 from the second and 20 from
          the last.
    :param betas: the base process's betas; "logsnrN" and "karrasN" need them.
    :param continuous_timesteps: return the rules' exact fractional timesteps
        (floats in [0, T - 1]) instead of the nearest unused integer ones; a
        .json list may then hold fractional timesteps. "ddimN" and section
        counts have no continuous form (an error says so).
    :return: a set of the kept step indices (ints, or floats when continuous).
    """
    if isinstance(section_counts, str):
        if section_counts.endswith(".json"):
            return _json_timesteps(num_timesteps, section_counts, continuous_timesteps)
        for name in SPACINGS:
            if section_counts.startswith(name):
                count = _parse_count(section_counts[len(name):], section_counts)
                if name == "ddim":
                    _check_discrete_only(section_counts, continuous_timesteps)
                    return _ddim_timesteps(num_timesteps, count)
                return _spaced_steps(name, num_timesteps, count, betas, continuous_timesteps)
        section_counts = [_parse_count(x, section_counts) for x in section_counts.split(",")]
    _check_discrete_only(f"section counts {section_counts}", continuous_timesteps)
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


def _check_discrete_only(spelling, continuous_timesteps):
    if continuous_timesteps:
        raise ValueError(
            f"timestep respacing {spelling} has no continuous form: continuous_timesteps (--continuous_timesteps) "
            f"works with {', '.join(s + 'N' for s in CONTINUOUS_SPACINGS)} and .json lists; drop it or use one of those"
        )


def _spaced_steps(name, num_timesteps, count, betas, continuous_timesteps=False):
    """
    `count` distinct timesteps of a T-step process by a named rule, k = 0 ... N-1:
    trailing (= uniform): T - k T / N - 1 (Lin et al. 2023, Table 2, which rounds it);
    quad: (T - 1)(1 - k / (N - 1))^2, quadratic in time over the whole process;
    logsnr: uniform in lambda = log(sqrt(abar) / sqrt(1 - abar)) from step T - 1 to step 0;
    karras: sigma = sqrt((1 - abar) / abar) from sigma_max to sigma_min with
    rho = 7 (Karras et al. 2022, eq. 5).
    Each target goes to the nearest unused base timestep, or with
    continuous_timesteps is kept as it is (logsnr and karras: the fractional
    timestep whose interpolated lambda is the target).
    """
    if not 1 <= count <= num_timesteps:
        raise ValueError(
            f"cannot take {count} distinct steps ({name}{count}) from a process of T = {num_timesteps} "
            f"diffusion steps; ask for between 1 and {num_timesteps}"
        )
    grid = np.arange(num_timesteps, dtype=np.float64)
    if name in ("trailing", "uniform"):
        positions = [num_timesteps - i * num_timesteps / count for i in range(count)]
        targets = np.array([p - 1 if continuous_timesteps else round(p) - 1 for p in positions], float)
    elif name == "quad":
        targets = (num_timesteps - 1) * (1 - spacing_ramp(count)) ** 2
    else:
        grid = _log_snr(num_timesteps, betas, f"{name}{count}")
        if np.isinf(grid[-1]) and count > 1:
            # abar_{T-1} = 0 (zero terminal SNR): step T - 1 and count - 1 steps over the finite range.
            rest = _lambda_steps(name, grid[:-1], count - 1, continuous_timesteps)
            return {float(num_timesteps - 1) if continuous_timesteps else num_timesteps - 1} | rest
        return _lambda_steps(name, grid, count, continuous_timesteps)
    if continuous_timesteps:
        return set(float(t) for t in targets)
    return _nearest_unused(grid, targets)


def spacing_ramp(count):
    """k / (count - 1) for k = 0 ... count - 1 (0 alone for one node), float64."""
    return np.arange(count, dtype=np.float64) / max(count - 1, 1)


def karras_sigmas(sigma_max, sigma_min, count, rho=KARRAS_RHO):
    """Karras et al. 2022, eq. 5: count sigmas from sigma_max down to sigma_min, uniform in sigma^(1/rho); float64."""
    inv_rho = 1.0 / rho
    return (sigma_max**inv_rho + spacing_ramp(count) * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho


def log_snr_sigmas(sigma_max, sigma_min, count):
    """count sigmas from sigma_max down to sigma_min uniform in lambda = -log sigma (geometric); float64."""
    first, last = -math.log(sigma_max), -math.log(sigma_min)
    return np.exp(-(first + (last - first) * spacing_ramp(count)))


def _lambda_steps(name, grid, count, continuous_timesteps=False):
    """
    `count` steps of lambda grid [T'] from grid[-1] to grid[0]: uniform in
    lambda, or Karras's rho in sigma; the nearest unused grid steps, or the
    exact fractional timesteps with continuous_timesteps.
    """
    first, last = grid[-1], grid[0]
    if name == "logsnr":
        targets = first + (last - first) * spacing_ramp(count)
    else:
        # Karras et al. eq. 5 in sigma = exp(-lambda), matched in log sigma.
        targets = -np.log(karras_sigmas(math.exp(-first), math.exp(-last), count))
    if not continuous_timesteps:
        return _nearest_unused(grid, targets)
    timesteps = _timesteps_at_lambda(grid, targets)
    # The rule's ends are the grid's own end steps, whatever the round trip through lambda rounds.
    timesteps[0] = len(grid) - 1
    if count > 1:
        timesteps[-1] = 0
    return set(float(t) for t in timesteps)


def split_spacing(spelling, names, process="this process"):
    """
    A node spacing of a continuous-time process (EDM, flow): ("json", path) for
    a path ending in .json, else (name, N) for "<name>N" with name in `names`
    and N >= 1; a clear error naming `process` and listing the spellings otherwise.
    """
    if spelling.endswith(".json"):
        return "json", spelling
    for name in names:
        if spelling.startswith(name) and spelling[len(name):].isdigit() and int(spelling[len(name):]) >= 1:
            return name, int(spelling[len(name):])
    raise ValueError(
        f"cannot parse the node spacing {spelling!r} of {process}: use "
        f"{', '.join(repr(n + 'N') for n in names)} with N >= 1, or a .json list of nodes"
    )


def _timesteps_at_lambda(grid, targets):
    """
    The fractional timesteps whose lambda, with log abar linear between integer
    timesteps (interpolate_alphas_cumprod), equals each target; grid is the
    lambda of the integer timesteps (finite, decreasing). Float64 array.
    """
    log_abar = -np.logaddexp(0.0, -2 * grid)  # log abar = log sigmoid(2 lambda)
    wanted = -np.logaddexp(0.0, -2 * np.asarray(targets, dtype=np.float64))
    # -log abar increases with the timestep: find each wanted value's interval.
    rising = -log_abar
    index = np.clip(np.searchsorted(rising, -wanted, side="right") - 1, 0, len(grid) - 2)
    frac = (-wanted - rising[index]) / (rising[index + 1] - rising[index])
    return np.clip(index + frac, 0, len(grid) - 1)


def interpolate_alphas_cumprod(alphas_cumprod, timesteps):
    """
    abar at fractional timesteps, linear in log abar between the integer ones
    (SPEC 18); exactly the table at every integer timestep.

    :param alphas_cumprod: the base process's [T] table (float64).
    :param timesteps: values in [0, T - 1].
    :return: a float64 array of timesteps' shape.
    """
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    timesteps = np.asarray(timesteps, dtype=np.float64)
    last = len(alphas_cumprod) - 1
    if timesteps.size and (timesteps.min() < 0 or timesteps.max() > last):
        raise ValueError(
            f"fractional timesteps must lie in [0, {last}] for a {last + 1}-step process, got values from "
            f"{timesteps.min()} to {timesteps.max()}"
        )
    index = np.minimum(np.floor(timesteps).astype(np.int64), last)
    frac = timesteps - index
    start, end = alphas_cumprod[index], alphas_cumprod[np.minimum(index + 1, last)]
    with np.errstate(divide="ignore", invalid="ignore"):
        # abar_i (abar_{i+1} / abar_i)^frac; 0 beyond a zero-terminal-SNR step's start.
        between = start * np.exp(frac * (np.log(end) - np.log(start)))
    return np.where(frac > 0, between, start)


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


def read_spacing_file(path):
    """The JSON value in a spacing file, with clear errors for a missing file or one that is not JSON."""
    if not bf.exists(path):
        raise InputError(f"timestep respacing file {path} does not exist")
    with bf.BlobFile(path, "r") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise InputError(f"timestep respacing file {path} is not valid JSON: {exc}") from None


def node_list(values, source, in_range, description):
    """
    The nodes of a continuous-time process listed by a user (a .json file or
    a list), largest first as floats: a non-empty list of distinct numbers,
    each with in_range(v); else a ValueError naming `source` and saying what
    was expected (`description`).
    """
    if not (is_number_list(values) and len(set(values)) == len(values) and all(in_range(v) for v in values)):
        raise ValueError(f"{source} must hold a non-empty JSON list of distinct {description}, got {str(values)[:200]}")
    return sorted((float(v) for v in values), reverse=True)


def is_number_list(value):
    """Whether value is a non-empty list of ints and floats (no bools)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )


def _json_timesteps(num_timesteps, path, continuous_timesteps=False):
    """
    The timesteps listed in a JSON file: a non-empty list of increasing ints in
    [0, T - 1] (numbers, fractional ones too, with continuous_timesteps).
    """
    steps = read_spacing_file(path)
    kind = "" if continuous_timesteps else "integer "
    valid = (
        is_number_list(steps)
        and (continuous_timesteps or all(isinstance(s, int) for s in steps))
        and all(a < b for a, b in zip(steps, steps[1:]))
        and 0 <= steps[0]
        and steps[-1] <= num_timesteps - 1
    )
    if not valid:
        raise InputError(
            f"timestep respacing file {path} must hold a non-empty JSON list of strictly increasing "
            f"{kind}timesteps in [0, {num_timesteps - 1}] (as search_timesteps.py writes), got "
            f"{json.dumps(steps)[:200]}"
        )
    return set(float(s) for s in steps) if continuous_timesteps else set(steps)


def _parse_count(text, section_counts):
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"cannot parse timestep respacing {section_counts!r}: use 'ddimN', 'trailingN' (or 'uniformN'), "
            f"'quadN', 'logsnrN', 'karrasN', a .json list of timesteps, or comma-separated counts like '10,15,20'"
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

    :param use_timesteps: the base-process steps to keep (a collection of ints;
        of numbers in [0, T - 1] with continuous_timesteps).
    :param continuous_timesteps: the kept timesteps may be fractional: abar
        there is interpolated linearly in log abar (interpolate_alphas_cumprod)
        and the model sees the fractional timestep (scaled to [0, 1000) when
        rescale_timesteps, else a float timestep in base-process units).
    :param kwargs: the GaussianDiffusion arguments of the base process.
    """

    def __init__(self, use_timesteps, continuous_timesteps=False, **kwargs):
        base = GaussianDiffusion(**kwargs)
        use_timesteps = list(use_timesteps)
        if not continuous_timesteps and any(t != int(t) for t in use_timesteps):
            raise ValueError(
                f"use_timesteps holds fractional timesteps {sorted(t for t in use_timesteps if t != int(t))[:5]}: "
                "pass continuous_timesteps=True to keep them"
            )
        self.continuous_timesteps = continuous_timesteps
        self.use_timesteps = set(float(t) if continuous_timesteps else int(t) for t in use_timesteps)
        self.original_num_steps = base.num_timesteps
        bad = sorted(t for t in self.use_timesteps if not 0 <= t <= base.num_timesteps - 1)
        if not self.use_timesteps or bad:
            raise ValueError(
                f"use_timesteps must be a non-empty set of steps in [0, {base.num_timesteps - 1}]"
                + (f"; got out-of-range steps {bad[:5]}" if bad else "")
            )
        self.timestep_map = sorted(self.use_timesteps)
        if continuous_timesteps:
            kept_alphas_cumprod = interpolate_alphas_cumprod(base.alphas_cumprod, self.timestep_map)
        else:
            kept_alphas_cumprod = base.alphas_cumprod[self.timestep_map]
        kwargs["betas"] = _respaced_betas(kept_alphas_cumprod)
        super().__init__(**kwargs)
        self._timestep_map_tensors = {}

    def call_model(self, model, x, t, model_kwargs=None):
        """The model called with the base-process timesteps of indices t (see _WrappedModel)."""
        return self._wrap_model(model)(x, t, **(model_kwargs or {}))

    def base_timesteps(self):
        """The base-process timestep of each index: timestep_map."""
        return list(self.timestep_map)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self)

    def _scale_timesteps(self, t):
        # The wrapped model scales timesteps itself, against the base process's T.
        return t

    def _timestep_map_on(self, device):
        """timestep_map on `device` (int64, or float64 (float32 on MPS) when continuous), made once per device."""
        key = str(device)
        if key not in self._timestep_map_tensors:
            dtype = torch.long
            if self.continuous_timesteps:
                dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
            self._timestep_map_tensors[key] = torch.tensor(self.timestep_map, dtype=dtype, device=device)
        return self._timestep_map_tensors[key]


def _respaced_betas(kept_alphas_cumprod):
    """Betas of the kept steps: beta' = 1 - abar_i / abar_(previous kept) (IDDPM eq. 19)."""
    betas = []
    last_alpha_cumprod = 1.0
    for alpha_cumprod in kept_alphas_cumprod:
        betas.append(1 - alpha_cumprod / last_alpha_cumprod)
        last_alpha_cumprod = alpha_cumprod
    return np.array(betas, dtype=np.float64)


class _WrappedModel:
    """
    Calls a base-process model with a spaced process's timesteps: index t
    becomes timestep_map[t], scaled to [0, 1000) when rescale_timesteps; a
    fractional timestep is passed as float32.
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
        elif new_ts.is_floating_point():
            new_ts = new_ts.float()
        return self.model(x, new_ts, **kwargs)
