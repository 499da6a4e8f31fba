"""
Post-hoc EMA (improved_diffusion/posthoc_ema.py): sigma_rel <-> gamma, beta,
the tracked profiles against the paper's power-function profile, the
least-squares reconstruction against profiles tracked directly, exact resume
of the tracker, and the snapshot files.
"""

import io
import math

import numpy as np
import pytest
import torch

from improved_diffusion import posthoc_ema
from improved_diffusion.posthoc_ema import (
    PowerFunctionEMA,
    combine_state_dicts,
    exp_to_std,
    fit_profile,
    list_snapshots,
    posthoc_coefficients,
    power_ema_beta,
    representable_std_range,
    snapshot_filename,
    std_to_exp,
)


def sigma_rel_of(gamma):
    """The paper's Eq. 123, written out: the relative std of p(tau) ~ tau^gamma on (0, 1]."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def profile_weights(gamma, n):
    """The power-function profile (gamma + 1) tau^gamma / n^(gamma + 1) integrated over each (k-1, k], k = 1..n."""
    k = np.arange(1, n + 1, dtype=np.float64)
    return (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / float(n) ** (gamma + 1)


# ----- sigma_rel, gamma and beta ---------------------------------------------------------


@pytest.mark.parametrize("std", [0.001, 0.01, 0.05, 0.08, 0.1, 0.2, 0.28, 0.2886])
def test_std_to_exp_solves_the_paper_relation(std):
    gamma = std_to_exp(std)
    assert isinstance(gamma, float) and gamma > 0
    assert sigma_rel_of(gamma) == pytest.approx(std, rel=1e-13)


def test_std_to_exp_matches_the_exponents_quoted_in_the_paper():
    # EDM2, section 3: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
    assert std_to_exp(0.05) == pytest.approx(16.97, abs=0.005)
    assert std_to_exp(0.10) == pytest.approx(6.94, abs=0.005)


def test_exp_to_std_and_std_to_exp_invert_each_other_on_arrays_and_scalars():
    gammas = np.geomspace(1e-4, 1e5, 301)
    stds = exp_to_std(gammas)
    assert isinstance(stds, np.ndarray) and stds.shape == gammas.shape
    assert np.all(np.diff(stds) < 0)  # sigma_rel falls as gamma grows
    np.testing.assert_allclose(std_to_exp(stds), gammas, rtol=1e-10)
    np.testing.assert_allclose(stds, [sigma_rel_of(g) for g in gammas], rtol=1e-14)
    grid = np.linspace(0.002, 0.288, 143).reshape(11, 13)
    np.testing.assert_allclose(exp_to_std(std_to_exp(grid)), grid, rtol=1e-13)
    assert exp_to_std(std_to_exp(0.07)) == pytest.approx(0.07, rel=1e-14)


def test_the_ends_of_the_domain():
    assert exp_to_std(1e-12) == pytest.approx(1 / math.sqrt(12), rel=1e-11)  # gamma -> 0: the plain average
    assert exp_to_std(1e6) * 1e6 == pytest.approx(1.0, rel=1e-5)  # gamma -> inf: sigma_rel ~ 1/gamma


@pytest.mark.parametrize("std", [0.0, -0.1, 1 / math.sqrt(12), 0.3, float("nan"), float("inf")])
def test_std_outside_the_domain_is_refused(std):
    with pytest.raises(ValueError, match=r"outside \(0, 0\.2887\)"):
        std_to_exp(std)
    with pytest.raises(ValueError, match="outside"):
        std_to_exp(np.array([0.05, std]))


@pytest.mark.parametrize("gamma", [0.0, -0.5, -2.0, float("nan"), float("inf")])
def test_exponent_outside_the_domain_is_refused(gamma):
    with pytest.raises(ValueError, match="must be finite and > 0"):
        exp_to_std(gamma)


@pytest.mark.parametrize("std", [0.01, 0.05, 0.1, 0.25])
@pytest.mark.parametrize("n", [1, 2, 3, 10, 1000, 123456])
def test_beta_is_the_formula(std, n):
    gamma = std_to_exp(std)
    assert sigma_rel_of(gamma) == pytest.approx(std, rel=1e-12)
    beta = power_ema_beta(std, n)
    assert isinstance(beta, float)
    assert beta == pytest.approx((1 - 1 / n) ** (gamma + 1), rel=1e-14, abs=0.0)


def test_beta_starts_at_zero_and_grows():
    assert power_ema_beta(0.08, 1) == 0.0
    betas = [power_ema_beta(0.08, n) for n in range(1, 500)]
    assert all(b < c < 1 for b, c in zip(betas, betas[1:]))
    assert power_ema_beta(0.05, 100) < power_ema_beta(0.10, 100)  # shorter profile: more weight on the new weights


@pytest.mark.parametrize("n", [0, -1, 2.5])
def test_beta_refuses_update_numbers_below_one(n):
    with pytest.raises(ValueError, match="integer >= 1"):
        power_ema_beta(0.05, n)


def test_parse_stds():
    assert posthoc_ema.parse_stds("0.05,0.1") == [0.05, 0.1]
    assert posthoc_ema.parse_stds(" 0.08 ") == [0.08]
    for text, message in [
        ("0.05,0.05", "more than once"),
        ("0.0801", "more than 3 decimals"),
        ("0.3", "outside"),
        ("0", "outside"),
        ("0.05,x", "'x' is not a number"),
        ("", "is not a number"),
    ]:
        with pytest.raises(ValueError, match=message):
            posthoc_ema.parse_stds(text)
    with pytest.raises(ValueError, match="no sigma_rel given"):
        posthoc_ema.check_stds([])


# ----- the tracked profile is the power-function profile ----------------------------------


def track_one_hot(stds, num_updates, record_at):
    """
    Run PowerFunctionEMA on a float64 vector whose value after update n is
    the n-th unit vector: each average is then exactly the weight it gives
    every update's weights (the recursion unrolled). {(std, n): weights [n]}.
    """
    theta = torch.zeros(num_updates, dtype=torch.float64)
    tracker = PowerFunctionEMA([theta], stds)
    recorded = {}
    for n in range(1, num_updates + 1):
        theta.zero_()
        theta[n - 1] = 1.0
        tracker.update(n)
        if n in record_at:
            for std in stds:
                recorded[std, n] = tracker.average(std)[0][:n].numpy().copy()
    return recorded


def test_a_tracked_profile_is_the_power_function_profile():
    stds = [0.02, 0.05, 0.1, 0.2, 0.28]
    steps = [1, 2, 7, 60, 400]
    recorded = track_one_hot(stds, max(steps), set(steps))
    for std in stds:
        gamma = std_to_exp(std)
        for n in steps:
            expected = profile_weights(gamma, n)
            np.testing.assert_allclose(recorded[std, n], expected, rtol=1e-9, atol=1e-15, err_msg=f"{std} {n}")
            np.testing.assert_allclose(posthoc_ema.unrolled_weights(n, std), expected, rtol=1e-9, atol=1e-15)
            assert recorded[std, n].sum() == pytest.approx(1.0, abs=1e-12)
    # Its relative standard deviation (over update times) approaches sigma_rel as n grows.
    weights = recorded[0.05, 400]
    times = np.arange(1, 401) - 0.5
    mean = weights @ times
    assert math.sqrt(weights @ (times - mean) ** 2) / 400 == pytest.approx(0.05, rel=0.01)


def test_unrolled_weights_are_zero_after_the_step():
    weights = posthoc_ema.unrolled_weights(5, 0.1, num_updates=9)
    assert weights.shape == (9,) and np.all(weights[5:] == 0) and weights[:5].sum() == pytest.approx(1.0)


# ----- reconstruction from snapshots against a profile tracked directly ---------------------

NUM_UPDATES = 2000
INTERVALS = [500, 200, 100, 50]


@pytest.fixture(scope="module")
def synthetic_training():
    """
    2000 updates of a one-hot vector (whose averages are the profiles' weights)
    and of a float32 random walk, tracked with sigma_rel 0.05, 0.08 and 0.10,
    with a snapshot of every profile every 50 updates.
    """
    stds = [0.05, 0.08, 0.10]
    gen = torch.Generator().manual_seed(0)
    one_hot = torch.zeros(NUM_UPDATES, dtype=torch.float64)
    walk = torch.zeros(64, 32)
    trackers = PowerFunctionEMA([one_hot], stds), PowerFunctionEMA([walk], stds)
    snapshots = {}
    for n in range(1, NUM_UPDATES + 1):
        one_hot.zero_()
        one_hot[n - 1] = 1.0
        walk.add_(torch.randn(walk.shape, generator=gen) * 0.01 + 0.002)
        for tracker in trackers:
            tracker.update(n)
        if n % min(INTERVALS) == 0:
            for std in stds:
                snapshots[n, std] = tuple(t.average(std)[0].clone() for t in trackers)
    return snapshots


def reconstruct_from(snapshots, interval, out_std, in_stds=(0.05, 0.10)):
    keys = [(n, std) for n in range(interval, NUM_UPDATES + 1, interval) for std in in_stds]
    fit = fit_profile([n for n, _ in keys], [std for _, std in keys], NUM_UPDATES, out_std)
    weights = sum(c * snapshots[k][0] for c, k in zip(fit.coefficients, keys))
    walk = combine_state_dicts(({"w": snapshots[k][1]} for k in keys), fit.coefficients)["w"]
    return fit, weights.numpy(), walk


def test_posthoc_coefficients_reproduce_a_tracked_profile(synthetic_training):
    tracked = synthetic_training[NUM_UPDATES, 0.08][0].numpy()
    np.testing.assert_allclose(tracked, profile_weights(std_to_exp(0.08), NUM_UPDATES), rtol=1e-8, atol=1e-15)
    errors = []
    for interval in INTERVALS:
        fit, weights, _ = reconstruct_from(synthetic_training, interval, 0.08)
        assert fit.coefficients.sum() == pytest.approx(1.0, abs=1e-12)
        error = np.linalg.norm(weights - tracked) / np.linalg.norm(tracked)
        # The fit's closed-form error (continuous profiles) is the error of the per-update weights.
        assert fit.relative_error == pytest.approx(error, rel=0.05)
        errors.append(error)
    assert errors[0] < 0.05 and errors[-1] < 1e-3, errors
    assert all(b < 0.5 * a for a, b in zip(errors, errors[1:])), errors  # more snapshots, smaller error


def test_reconstructed_parameters_are_close_to_the_tracked_ones(synthetic_training):
    tracked = synthetic_training[NUM_UPDATES, 0.08][1]
    spread = (synthetic_training[NUM_UPDATES, 0.05][1] - synthetic_training[NUM_UPDATES, 0.10][1]).norm()
    assert spread > 0.1 * tracked.norm() / 64  # the two tracked lengths differ clearly
    misses = []
    for interval in INTERVALS:
        _, _, walk = reconstruct_from(synthetic_training, interval, 0.08)
        assert walk.dtype == torch.float32
        misses.append(((walk - tracked).norm() / spread).item())
    assert misses[-1] < 2e-3 and misses[-1] < misses[0], misses


def test_a_tracked_profile_is_found_exactly_when_its_snapshot_is_there(synthetic_training):
    keys = [(n, std) for n in (1000, 2000) for std in (0.05, 0.08, 0.10)]
    coefficients = posthoc_coefficients([n for n, _ in keys], [s for _, s in keys], 2000, 0.08)
    assert coefficients[keys.index((2000, 0.08))] == pytest.approx(1.0, abs=1e-6)
    assert np.abs(np.delete(coefficients, keys.index((2000, 0.08)))).max() < 1e-6


def test_snapshots_after_the_output_step_get_no_weight():
    steps = [100, 200, 300, 400, 500, 600]
    coefficients = posthoc_coefficients(steps + steps, [0.05] * 6 + [0.1] * 6, 400, 0.07)
    later = [i for i, s in enumerate(steps + steps) if s > 400]
    assert np.all(coefficients[later] == 0.0)
    earlier = [i for i, s in enumerate(steps + steps) if s <= 400]
    np.testing.assert_array_equal(
        coefficients[earlier], posthoc_coefficients(steps[:4] * 2, [0.05] * 4 + [0.1] * 4, 400, 0.07)
    )
    with pytest.raises(ValueError, match="the first is at step 100"):
        posthoc_coefficients(steps, [0.05] * 6, 99, 0.07)


def test_fit_profile_refuses_bad_shapes_and_steps():
    with pytest.raises(ValueError, match="1-D of the same nonzero length"):
        fit_profile([100, 200], [0.05], 200, 0.08)
    with pytest.raises(ValueError, match="1-D of the same nonzero length"):
        fit_profile([], [], 200, 0.08)
    with pytest.raises(ValueError, match=">= 1"):
        fit_profile([0, 200], [0.05, 0.1], 200, 0.08)
    with pytest.raises(ValueError, match="outside"):
        fit_profile([100, 200], [0.05, 0.1], 200, 0.5)


def test_representable_range():
    steps = list(range(200, 2001, 200))
    in_steps, in_stds = steps + steps, [0.05] * 10 + [0.1] * 10
    lo, hi = representable_std_range(in_steps, in_stds, 2000)
    assert lo < 0.05 and 0.1 < hi < posthoc_ema.MAX_STD
    limit = posthoc_ema.MAX_RELATIVE_ERROR
    for std in (lo, hi, 0.05, 0.075, 0.1):
        assert fit_profile(in_steps, in_stds, 2000, std).relative_error <= limit
    for std in (lo / 1.03, hi * 1.03, 0.01):
        assert fit_profile(in_steps, in_stds, 2000, std).relative_error > limit
    # More frequent snapshots cover more.
    dense = list(range(50, 2001, 50))
    lo_dense, hi_dense = representable_std_range(dense + dense, [0.05] * 40 + [0.1] * 40, 2000)
    assert lo_dense < lo and hi_dense > hi
    # A wanted step long after the last snapshot: nothing is representable.
    assert representable_std_range([100, 100], [0.05, 0.1], 2000) is None


# ----- the tracker --------------------------------------------------------------------------


def random_params(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]


def step_params(params, gen):
    for p in params:
        p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def test_the_first_update_copies_the_weights():
    params = random_params(0)
    tracker = PowerFunctionEMA(params, [0.05, 0.1])
    for p in params:
        p.mul_(3.0)
    tracker.update(1)
    for std in (0.05, 0.1):
        assert all(torch.equal(a, p) for a, p in zip(tracker.average(std), params))
    with pytest.raises(KeyError, match="0.07 is not tracked"):
        tracker.average(0.07)


def test_updates_must_come_in_order():
    tracker = PowerFunctionEMA(random_params(0), [0.05])
    with pytest.raises(ValueError, match="n = 1 next"):
        tracker.update(2)
    tracker.update(1)
    with pytest.raises(ValueError, match="n = 2 next"):
        tracker.update(1)


def test_state_dict_round_trip_continues_bitwise():
    gen = torch.Generator().manual_seed(1)
    params = random_params(0)
    tracker = PowerFunctionEMA(params, [0.05, 0.1])
    for n in range(1, 38):
        step_params(params, gen)
        tracker.update(n)
    buffer = io.BytesIO()
    torch.save({"posthoc_ema": tracker.state_dict(), "params": params}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_params = [p.clone() for p in saved["params"]]
    resumed = PowerFunctionEMA(resumed_params, [0.05, 0.1])
    resumed.load_state_dict(saved["posthoc_ema"])
    assert resumed.num_updates == 37
    resumed_gen = torch.Generator()
    resumed_gen.set_state(gen.get_state())
    for n in range(38, 70):
        step_params(params, gen)
        step_params(resumed_params, resumed_gen)
        tracker.update(n)
        resumed.update(n)
    for std in (0.05, 0.1):
        for a, b in zip(tracker.average(std), resumed.average(std)):
            assert torch.equal(a, b)
        assert not torch.equal(tracker.average(std)[0], params[0])


def test_load_state_dict_refuses_other_stds_and_shapes():
    tracker = PowerFunctionEMA(random_params(0), [0.05, 0.1])
    with pytest.raises(ValueError, match="resume with the same --ema_std"):
        PowerFunctionEMA(random_params(0), [0.05]).load_state_dict(tracker.state_dict())
    with pytest.raises(ValueError, match="other shapes"):
        PowerFunctionEMA([torch.zeros(2), torch.zeros(7)], [0.05, 0.1]).load_state_dict(tracker.state_dict())


def test_tracker_refuses_bad_stds():
    with pytest.raises(ValueError, match="more than once"):
        PowerFunctionEMA(random_params(0), [0.05, 0.05])
    with pytest.raises(ValueError, match="outside"):
        PowerFunctionEMA(random_params(0), [0.3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tracker_update_makes_no_host_sync_on_cuda():
    params = [p.cuda() for p in random_params(0)]
    tracker = PowerFunctionEMA(params, [0.05, 0.1])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for n in range(1, 20):
            params[0].add_(1.0)
            tracker.update(n)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    expected = profile_weights(std_to_exp(0.05), 19) @ (np.arange(1, 20) + params[0][0, 0].item() - 19)
    assert tracker.average(0.05)[0][0, 0].item() == pytest.approx(expected, rel=1e-5)


# ----- snapshot files and their combination -------------------------------------------------


def test_combine_state_dicts_accumulates_in_float64_and_keeps_dtypes():
    first = {"a": torch.tensor([1.0, 2.0]), "h": torch.tensor([1.0], dtype=torch.float16),
             "count": torch.tensor(3)}
    second = {"a": torch.tensor([3.0, 1e-8]), "h": torch.tensor([2.0], dtype=torch.float16),
              "count": torch.tensor(7)}
    out = combine_state_dicts(iter([first, second]), [1.5, -0.5])
    assert list(out) == ["a", "h", "count"]
    assert out["a"].dtype == torch.float32 and out["h"].dtype == torch.float16
    expected_a = torch.tensor([1.5 * 1.0 - 0.5 * 3.0, 1.5 * 2.0 - 0.5 * np.float32(1e-8).item()], dtype=torch.float64)
    assert torch.equal(out["a"], expected_a.float())
    assert out["h"].item() == 0.5
    assert out["count"].item() == 7  # non-float entries: the last (newest) state dict's


def test_combine_state_dicts_names_the_odd_one_out():
    good = {"a": torch.zeros(2)}
    with pytest.raises(ValueError, match="b.pt has other keys than a.pt"):
        combine_state_dicts([good, {"b": torch.zeros(2)}], [0.5, 0.5], names=["a.pt", "b.pt"])
    with pytest.raises(ValueError, match=r"b.pt: a has shape \(3,\), a.pt's \(2,\)"):
        combine_state_dicts([good, {"a": torch.zeros(3)}], [0.5, 0.5], names=["a.pt", "b.pt"])
    with pytest.raises(ValueError, match="1 state dicts for 2 coefficients"):
        combine_state_dicts([good], [0.5, 0.5])


def test_list_snapshots(tmp_path):
    names = [snapshot_filename(0.1, 2000), snapshot_filename(0.05, 2000), snapshot_filename(0.05, 1000),
             snapshot_filename(0.05, 1234567)]
    others = ["model002000.pt", "ema_0.9999_002000.pt", "phema_0.05_001000.pt", "phema_0.050_1000.pt",
              ".phema_0.050_003000.pt.abc.tmp", "ema_std0.080_002000.pt"]
    for name in names + others:
        (tmp_path / name).write_bytes(b"")
    assert names[0] == "phema_0.100_002000.pt"
    assert list_snapshots(str(tmp_path)) == [
        (1000, 0.05, str(tmp_path / "phema_0.050_001000.pt")),
        (2000, 0.05, str(tmp_path / "phema_0.050_002000.pt")),
        (2000, 0.1, str(tmp_path / "phema_0.100_002000.pt")),
        (1234567, 0.05, str(tmp_path / "phema_0.050_1234567.pt")),
    ]
    assert list_snapshots(str(tmp_path / "missing")) == []
