"""
Post-hoc EMA: power-function averages of the weights tracked during training,
stored as snapshots, and combined after training into an average of any
length (Karras et al. 2024, "Analyzing and Improving the Training Dynamics
of Diffusion Models", section 3 and appendix C).

A power-function profile with exponent gamma > 0 averages the weights
theta(tau) seen up to time t with the density

    p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),   0 < tau <= t,

whose relative standard deviation (width over t) is sigma_rel. Training
tracks it with the recursion

    theta_hat_n = beta_n theta_hat_(n-1) + (1 - beta_n) theta_n,
    beta_n = (1 - 1/n)^(gamma + 1),

after optimizer update n = 1, 2, ... (theta_n: the weights after update n;
beta_1 = 0, so the average starts as the weights). Unrolled, update k's
weights receive ((k/n)^(gamma+1) - ((k-1)/n)^(gamma+1)) = the integral of
p_n over (k-1, k]: the tracked average is exactly the continuous profile
applied to weights that stay constant between updates. A skipped update
(weights unchanged) still counts as one.

Snapshots of several profiles at several updates span a family of profiles;
the least-squares combination of them that is closest to a wanted profile
(in L2 over tau, where inner products of power-function profiles are closed
form) gives an average of that length after the fact.

Files: a snapshot of profile sigma_rel at update N is `phema_{std:.3f}_{N:06d}.pt`
(snapshot_filename), a plain state dict with the model's keys; sigma_rel
values therefore carry at most 3 decimals (check_stds).
"""

import math
import re
from typing import NamedTuple

import blobfile as bf
import numpy as np
import torch

MAX_STD = 1.0 / math.sqrt(12.0)  # sigma_rel of gamma -> 0: the plain average of all weights so far
STD_DECIMALS = 3  # the decimals of sigma_rel in snapshot file names
# The largest relative L2 error of a reconstructed profile taken as representable: about the distance
# between the profiles of sigma_rel 0.080 and 0.0845 (0.020 and 0.0214, 0.200 and 0.207), so an accepted
# reconstruction is about as close to the wanted profile as that of a sigma_rel 4-7% away.
MAX_RELATIVE_ERROR = 0.05
RIDGE = 1e-10  # Tikhonov weight on the normalized Gram matrix (see fit_profile)

# A snapshot's file name (snapshot_filename), its step the one group: checkpointing.py prunes by it too.
SNAPSHOT_FILE = rf"phema_\d+\.\d{{{STD_DECIMALS}}}_(\d{{6,}})\.pt"
_SNAPSHOT_RE = re.compile(rf"^{SNAPSHOT_FILE}$")


# ----- sigma_rel and the exponent ----------------------------------------------------


def exp_to_std(exp):
    """
    sigma_rel of the power-function profile with exponent gamma = `exp`
    (the paper's Eq. 123): sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))).

    :param exp: gamma, a float or array; every value finite and > 0.
    :return: a float for a scalar input, else an array; values in (0, 1/sqrt(12)).
    :raises ValueError: for gamma <= 0 or not finite (gamma in (-1, 0] gives
        valid profiles too, but sigma_rel is not monotone there; 0 is the plain
        average, which has no length to reconstruct).
    """
    gamma = np.asarray(exp, dtype=np.float64)
    bad = ~(np.isfinite(gamma) & (gamma > 0))
    if bad.any():
        raise ValueError(f"power-function EMA exponent {float(gamma[bad].ravel()[0])} must be finite and > 0")
    std = np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))
    return float(std) if std.ndim == 0 else std


def std_to_exp(std):
    """
    The exponent gamma of the power-function profile with relative standard
    deviation sigma_rel = `std`, inverting Eq. 123 as the paper's Eq. 126
    does: the positive root of the cubic

        f(gamma) = sigma_rel^2 (gamma + 2)^2 (gamma + 3) - (gamma + 1) = 0.

    For sigma_rel in (0, 1/sqrt(12)) f(0) = 12 sigma_rel^2 - 1 < 0, f is
    convex for gamma > 0 and f(1/sigma_rel) > 0, so the root is unique and
    Newton's method from 1/sigma_rel decreases to it monotonically.

    :param std: sigma_rel, a float or array, each in (0, 1/sqrt(12) ~ 0.2887).
    :return: a float for a scalar input, else an array.
    :raises ValueError: for sigma_rel outside (0, 1/sqrt(12)) or not finite.
    """
    sigma = np.asarray(std, dtype=np.float64)
    bad = ~(np.isfinite(sigma) & (sigma > 0) & (sigma < MAX_STD))
    if bad.any():
        raise ValueError(
            f"sigma_rel {float(sigma[bad].ravel()[0])} is outside (0, {MAX_STD:.4f}): a power-function EMA profile "
            f"has 0 < sigma_rel < 1/sqrt(12) (1/sqrt(12) is the plain average of all weights)"
        )
    s2 = sigma**2
    gamma = 1.0 / sigma
    for _ in range(200):
        f = s2 * (gamma + 2) ** 2 * (gamma + 3) - (gamma + 1)
        df = s2 * (gamma + 2) * (3 * gamma + 8) - 1
        step = f / df
        gamma = gamma - step
        if np.all(np.abs(step) <= 1e-15 * gamma):
            break
    return float(gamma) if gamma.ndim == 0 else gamma


def power_ema_beta(std, n):
    """
    beta at optimizer update n (n = 1, 2, ...) of the profile sigma_rel = `std`:
    (1 - 1/n)^(gamma + 1) (the paper's Eq. 127 with t counted in updates).
    A Python float; 0 at n = 1.
    """
    return _beta(std_to_exp(std), n)


def _beta(exp, n):
    if n < 1 or int(n) != n:
        raise ValueError(f"update number n={n!r} must be an integer >= 1 (n counts optimizer updates from 1)")
    return (1.0 - 1.0 / n) ** (exp + 1.0)


def check_stds(stds):
    """
    The list of sigma_rel values `stds` as floats, checked for use as tracked
    profiles or reconstruction targets.

    :raises ValueError: for an empty list, a value outside (0, 1/sqrt(12)),
        one with more than 3 decimals (file names keep 3) or a repeated value.
    """
    values = [float(s) for s in stds]
    if not values:
        raise ValueError("no sigma_rel given: pass one or more values, e.g. 0.05,0.10")
    for value in values:
        std_to_exp(value)
        if round(value, STD_DECIMALS) != value:
            raise ValueError(
                f"sigma_rel {value!r} has more than {STD_DECIMALS} decimals; file names keep {STD_DECIMALS}, "
                f"so use e.g. {round(value, STD_DECIMALS)}"
            )
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"sigma_rel {repeated[0]} is given more than once; give each value once")
    return values


def parse_stds(text):
    """The comma-separated sigma_rel values in `text` (e.g. "0.05,0.10"), checked by check_stds."""
    values = []
    for item in str(text).split(","):
        try:
            values.append(float(item))
        except ValueError:
            raise ValueError(f"{item.strip()!r} is not a number; give sigma_rel values such as 0.05,0.10") from None
    return check_stds(values)


# ----- least squares between profiles -------------------------------------------------


def _profile_inner_products(steps_a, exps_a, steps_b, exps_b):
    """
    [A x B] inner products (integral over tau) of the profiles p_(t_a) with
    exponents gamma_a and p_(t_b) with gamma_b, the matrices of the paper's
    Algorithm 3 (appendix C). Integrating the product up to the earlier time,
    with s = min(t_a, t_b) / max(t_a, t_b) and g the exponent of the later one,

        <p_a, p_b> = (gamma_a + 1)(gamma_b + 1) s^g / ((gamma_a + gamma_b + 1) max(t_a, t_b)).
    """
    t_a, g_a = steps_a[:, None], exps_a[:, None]
    t_b, g_b = steps_b[None, :], exps_b[None, :]
    later = np.maximum(t_a, t_b)
    g_later = np.where(t_a >= t_b, g_a, g_b)
    return (g_a + 1) * (g_b + 1) * (np.minimum(t_a, t_b) / later) ** g_later / ((g_a + g_b + 1) * later)


class ProfileFit(NamedTuple):
    """coefficients: [S] float64 weights of the snapshots (summing to 1); relative_error: ||fit - p|| / ||p||."""

    coefficients: np.ndarray
    relative_error: float


def fit_profile(in_steps, in_stds, out_step, out_std):
    """
    The combination of snapshot profiles closest to the profile `out_std` at
    update `out_step` (the paper's Algorithm 3), constrained to sum to 1 so
    that it is an average of the weights.

    Minimizes ||sum_i c_i p_i - p_out||^2 over tau subject to sum_i c_i = 1,
    in float64. Profiles of snapshots close in time and length are nearly
    collinear and their Gram matrix close to singular, so the Gram matrix is
    normalized to unit diagonal (each profile scaled to norm 1) and a ridge
    RIDGE * I added before solving: combinations of the scaled profiles whose
    norm is below about sqrt(RIDGE) times their coefficients' norm are damped
    instead of being bought with huge coefficients of opposite signs (which
    would amplify the float32 rounding of the snapshots). With 2 profiles
    snapshotted every 1/1000 of the run it changes the fit's error by < 5%.

    :param in_steps: [S] updates at which the snapshots were taken (>= 1).
    :param in_stds: [S] their sigma_rel.
    :param out_step: the update of the wanted average (>= 1). Snapshots after
        it average later weights: they get weight 0.
    :param out_std: sigma_rel of the wanted average.
    :return: ProfileFit.
    """
    all_steps = np.asarray(in_steps, dtype=np.float64)
    all_stds = np.asarray(in_stds, dtype=np.float64)
    if all_steps.ndim != 1 or all_stds.shape != all_steps.shape or all_steps.size == 0:
        raise ValueError(
            f"in_steps and in_stds must be 1-D of the same nonzero length, got shapes {all_steps.shape} "
            f"and {all_stds.shape}"
        )
    if not (np.all(all_steps >= 1) and out_step >= 1):
        raise ValueError("snapshot and output steps must be >= 1 (they count optimizer updates)")
    used = all_steps <= out_step
    if not used.any():
        raise ValueError(
            f"every snapshot is later than step {out_step} (the first is at step {int(all_steps.min())}); "
            f"reconstruct at a step at or after the first snapshot"
        )
    steps, stds = all_steps[used], all_stds[used]
    exps = np.asarray(std_to_exp(stds), dtype=np.float64).reshape(-1)
    out_t = np.array([float(out_step)])
    out_g = np.array([std_to_exp(float(out_std))])
    gram = _profile_inner_products(steps, exps, steps, exps)
    target = _profile_inner_products(steps, exps, out_t, out_g)[:, 0]
    target_norm2 = _profile_inner_products(out_t, out_g, out_t, out_g)[0, 0]
    scale = 1.0 / np.sqrt(np.diag(gram))
    size = steps.size
    kkt = np.zeros((size + 1, size + 1))
    kkt[:size, :size] = gram * scale[:, None] * scale[None, :] + RIDGE * np.eye(size)
    kkt[:size, size] = kkt[size, :size] = scale
    rhs = np.append(target * scale, 1.0)
    coefficients = np.linalg.solve(kkt, rhs)[:size] * scale
    error2 = target_norm2 - 2 * coefficients @ target + coefficients @ gram @ coefficients
    all_coefficients = np.zeros(all_steps.shape)
    all_coefficients[used] = coefficients
    return ProfileFit(all_coefficients, float(np.sqrt(max(error2, 0.0) / target_norm2)))


def posthoc_coefficients(in_steps, in_stds, out_step, out_std):
    """
    [S] float64 weights (summing to 1) with which the snapshots taken at
    updates `in_steps` with profiles `in_stds` (1-D, equal length) combine
    into the profile `out_std` at update `out_step`; see fit_profile.
    """
    return fit_profile(in_steps, in_stds, out_step, out_std).coefficients


def representable_std_range(in_steps, in_stds, out_step, max_relative_error=MAX_RELATIVE_ERROR, num=200):
    """
    The sigma_rel range the snapshots can represent at update `out_step`:
    the smallest and largest sigma_rel, of `num` log-spaced values in
    [0.001, 1/sqrt(12)), whose fit_profile relative error is at most
    `max_relative_error`; None if none is.
    """
    grid = np.geomspace(1e-3, MAX_STD * (1 - 1e-9), num)
    good = [s for s in grid if fit_profile(in_steps, in_stds, out_step, s).relative_error <= max_relative_error]
    return (float(good[0]), float(good[-1])) if good else None


def unrolled_weights(step, std, num_updates=None):
    """
    [num_updates] float64 weight that the average of profile `std` after
    update `step` gives the weights after each update k = 1..num_updates
    (default `step`; zero beyond `step`): ((k/t)^(g+1) - ((k-1)/t)^(g+1)),
    the profile p_t integrated over (k-1, k].
    """
    gamma = std_to_exp(std)
    num_updates = step if num_updates is None else num_updates
    k = np.arange(1, num_updates + 1, dtype=np.float64)
    new_share = np.ones_like(k)  # 1 - ((k-1)/k)^(g+1), without cancellation for large k
    new_share[1:] = -np.expm1((gamma + 1) * np.log1p(-1.0 / k[1:]))
    weights = (k / step) ** (gamma + 1) * new_share
    weights[k > step] = 0.0
    return weights


# ----- tracking during training ----------------------------------------------------------


class PowerFunctionEMA:
    """
    Power-function EMAs of a list of tensors, one per sigma_rel.

    A training loop calls update(n) after optimizer update n (n = 1, 2, ...,
    every update, skipped ones included), keeps state_dict() in its run
    state and writes average(std) as snapshots (snapshot_filename).

    :param params: the tensors the optimizer updates (e.g. list(model.parameters()));
        the averages are kept in their dtype and on their device.
    :param stds: sigma_rel values (check_stds).
    """

    def __init__(self, params, stds):
        self.params = [p.detach() for p in params]
        self.stds = check_stds(stds)
        self._exps = [std_to_exp(s) for s in self.stds]
        self.averages = [[p.clone() for p in self.params] for _ in self.stds]
        self.num_updates = 0

    def update(self, n):
        """
        Fold in the weights after optimizer update n (must be num_updates + 1).
        beta is a Python float, so nothing waits for the device.
        """
        if n != self.num_updates + 1:
            raise ValueError(
                f"update({n}) after {self.num_updates} updates: call update(n) once after each optimizer "
                f"update, n = {self.num_updates + 1} next"
            )
        for exp, average in zip(self._exps, self.averages):
            beta = _beta(exp, n)
            if beta == 0.0:
                torch._foreach_copy_(average, self.params)
            else:
                torch._foreach_lerp_(average, self.params, 1.0 - beta)
        self.num_updates = n

    def average(self, std):
        """The averaged tensors of profile `std`, in the order of params (live: copy before changing them)."""
        for value, average in zip(self.stds, self.averages):
            if value == float(std):
                return average
        raise KeyError(f"sigma_rel {std} is not tracked here (tracked: {', '.join(map(str, self.stds))})")

    def restart(self, num_updates):
        """Every profile from the current params, as if they had not changed for `num_updates` updates."""
        for average in self.averages:
            torch._foreach_copy_(average, self.params)
        self.num_updates = int(num_updates)

    def state_dict(self):
        """
        {"stds", "num_updates", "averages"}: everything an exact continuation
        needs. The averages are the live tensors: torch.save the dict (or copy
        them) before the next update.
        """
        return {"stds": list(self.stds), "num_updates": self.num_updates, "averages": self.averages}

    def load_state_dict(self, state):
        """Restore a state_dict() of a tracker of the same stds and tensor shapes (copied into place)."""
        if [float(s) for s in state["stds"]] != self.stds:
            raise ValueError(
                f"the saved post-hoc EMA tracks sigma_rel {state['stds']}, this one {self.stds}: "
                f"resume with the same --ema_std"
            )
        for saved, average in zip(state["averages"], self.averages):
            if [tuple(t.shape) for t in saved] != [tuple(t.shape) for t in average]:
                raise ValueError("the saved post-hoc EMA holds tensors of other shapes than the model's parameters")
            torch._foreach_copy_(average, list(saved))
        self.num_updates = int(state["num_updates"])


# ----- snapshot files and their combination ----------------------------------------------


def snapshot_filename(std, step):
    """The file name of the snapshot of profile `std` after update `step`: phema_{std:.3f}_{step:06d}.pt."""
    return f"phema_{float(std):.{STD_DECIMALS}f}_{int(step):06d}.pt"


def list_snapshots(log_dir):
    """The snapshots in `log_dir` as (step, std, path), sorted by step then std; [] if there are none."""
    if not bf.isdir(log_dir):
        return []
    found = []
    for name in bf.listdir(log_dir):
        match = _SNAPSHOT_RE.match(name)
        if match:
            found.append((int(match.group(1)), float(name.split("_")[1]), bf.join(log_dir, name)))
    return sorted(found)


def combine_state_dicts(state_dicts, coefficients, names=None):
    """
    sum_i coefficients[i] * state_dicts[i] for the floating-point entries,
    accumulated in float64 and cast back to each entry's dtype; other entries
    (integer buffers) are taken from the last state dict, so pass them in
    step order to take them from the newest snapshot.

    :param state_dicts: an iterable of state dicts with the same keys and
        shapes; it is consumed once, so a generator that loads one file at a
        time keeps a single snapshot in memory.
    :param coefficients: [S] weights, one per state dict.
    :param names: optional [S] labels (e.g. file paths) for error messages.
    """
    coefficients = [float(c) for c in np.asarray(coefficients, dtype=np.float64).reshape(-1)]
    names = names if names is not None else [f"state dict {i}" for i in range(len(coefficients))]
    total = None
    last = None
    count = 0
    for count, (state, coefficient, name) in enumerate(zip(state_dicts, coefficients, names), start=1):
        if total is None:
            total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in state.items() if v.is_floating_point()}
            keys = list(state)
        elif list(state) != keys:
            raise ValueError(f"{name} has other keys than {names[0]}: {sorted(set(state) ^ set(keys))[:5]}")
        for key, acc in total.items():
            value = state[key]
            if value.shape != acc.shape:
                raise ValueError(f"{name}: {key} has shape {tuple(value.shape)}, {names[0]}'s {tuple(acc.shape)}")
            acc.add_(value.detach().to("cpu", torch.float64), alpha=coefficient)
        last = state
    if count != len(coefficients):
        raise ValueError(f"{count} state dicts for {len(coefficients)} coefficients")
    return {k: total[k].to(v.dtype) if k in total else v for k, v in last.items()}
