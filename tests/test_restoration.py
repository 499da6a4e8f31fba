"""
restoration.py's methods on exact models: RePaint's schedule worked out by
hand, the identities between methods (SDEdit from the start is unconditional
sampling; RePaint without resampling is replacement; DPS's step is the
sampler's step minus the gradient of the residual through the model),
measurement consistency (DDNM's A(x) = y with every sampler; replace and
RePaint keep the known pixels), DDNM+ under measurement noise, the cost in
model evaluations, and the errors that name the fix.
"""

import pytest
import torch
from _mixture_images import SHAPE, checkerboard, diffusion_pair, image_model, left_known, three_components

from improved_diffusion import restoration, samplers
from improved_diffusion.operators import Colorize, Deblur, Inpaint, SuperRes
from improved_diffusion.restoration import repaint_schedule, restore

N = 6


@pytest.fixture(scope="module")
def mixture():
    pattern = torch.full(SHAPE, 0.4, dtype=torch.float64)
    return three_components(pattern, pattern + checkerboard(0.3))


@pytest.fixture(scope="module")
def exact(mixture):
    """(spaced diffusion of 20 steps, the exact eps model), float32 images."""
    diffusion, base = diffusion_pair("20", steps=200)
    return diffusion, image_model(mixture, base)


@pytest.fixture(scope="module")
def truth(mixture):
    """N images of the mixture, in [-1, 1] as images are (a sampler clips x0_hat there)."""
    return mixture.sample(N, generator=torch.Generator().manual_seed(0)).float().view(N, *SHAPE).clamp(-1, 1)


def seeded(seed=1):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- RePaint's schedule


def test_repaint_schedule_small_cases_by_hand():
    # 5 steps, jumps of 2 at indices 0 and 2 (the multiples of 2 below 5 - 2), once each (2 passes).
    assert repaint_schedule(5, 2, 2) == [4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0, -1]
    # jumps of 1 at 0, 1, 2, twice each.
    assert repaint_schedule(4, 1, 3) == [3, 2, 3, 2, 3, 2, 1, 2, 1, 2, 1, 0, 1, 0, 1, 0, -1]
    # no multiple of 10 lies below 10 - 10: no jump; one pass is no resampling.
    assert repaint_schedule(10, 10, 10) == list(range(9, -2, -1))
    assert repaint_schedule(7, 2, 1) == list(range(6, -2, -1))


def test_repaint_schedule_on_the_papers_setting():
    schedule = repaint_schedule(250, 10, 10)
    moves = [b - a for a, b in zip(schedule, schedule[1:])]
    assert set(moves) == {-1, 1}
    # 250 steps down to -1, plus 24 jump points (0, 10, ..., 230) x 9 jumps x 10 steps each way.
    assert moves.count(-1) == 250 + 24 * 9 * 10 and moves.count(1) == 24 * 9 * 10
    assert len(schedule) == 1 + 2410 + 2160
    assert schedule[:20] == list(range(249, 229, -1)) and schedule[20:30] == list(range(231, 241))
    assert schedule[-12:] == [10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, -1]
    visits = {index: schedule.count(index) for index in (249, 241, 240, 235, 230, 10, 5, 0, -1)}
    # 240 is the top of the 9 jumps from 230; 235 is passed up and down 9 times; 230 and 10 are
    # the bottom of their own jumps (9 + 1) and the top of the jumps below (9); 0 the bottom only.
    assert visits == {249: 1, 241: 1, 240: 10, 235: 19, 230: 19, 10: 19, 5: 19, 0: 10, -1: 1}


def test_repaint_schedule_rejects_counts_below_one():
    with pytest.raises(ValueError, match="at least 1"):
        repaint_schedule(10, 0, 10)


# ---------------------------------------------------------------- identities


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m", "heun"])
def test_sdedit_from_the_start_is_unconditional_sampling_from_the_same_noise(exact, truth, sampler):
    diffusion, model = exact
    noise = torch.randn(truth.shape, generator=seeded(3))
    expected = diffusion.sample_loop(model, truth.shape, sampler=sampler, noise=noise, generator=seeded(),
                                     clip_denoised=False)
    for operator in (None, SuperRes(2)):
        y = truth if operator is None else operator(truth)
        got = restore(diffusion, model, y, operator, method="sdedit", sampler=sampler, noise=noise,
                      generator=seeded(), clip_denoised=False, t_start=1.0)
        assert torch.equal(got, expected)


def test_sdedit_at_a_small_t_start_stays_close_to_the_input(exact, truth):
    diffusion, model = exact
    unconditional = diffusion.sample_loop(model, truth.shape, sampler="ddim", generator=seeded())
    near = restore(diffusion, model, truth, None, method="sdedit", generator=seeded(), t_start=0.1)
    far = restore(diffusion, model, truth, None, method="sdedit", generator=seeded(), t_start=0.7)
    distance = {name: (x - truth).flatten(1).norm(dim=1).mean() for name, x in
                [("near", near), ("far", far), ("unconditional", unconditional)]}
    assert distance["near"] < 0.3 * distance["unconditional"], distance
    assert distance["near"] < distance["far"], distance


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "heun"])
def test_repaint_without_resampling_is_replace(exact, truth, sampler):
    diffusion, model = exact
    operator = Inpaint(left_known())
    y = operator(truth)
    replaced = restore(diffusion, model, y, operator, method="replace", sampler=sampler, generator=seeded())
    repainted = restore(diffusion, model, y, operator, method="repaint", sampler=sampler, generator=seeded(),
                        jump_length=3, jump_n_sample=1)
    assert torch.equal(replaced, repainted)


def test_each_restoration_depends_only_on_its_own_generator(exact, truth):
    diffusion, model = exact
    operator = Inpaint(left_known())
    y = operator(truth)
    together = restore(diffusion, model, y, operator, method="repaint", sampler="ddpm",
                       generator=[seeded(10 + i) for i in range(N)], jump_length=2, jump_n_sample=2)
    alone = restore(diffusion, model, y[2:3], operator, method="repaint", sampler="ddpm", generator=[seeded(12)],
                    jump_length=2, jump_n_sample=2)
    assert torch.equal(together[2:3], alone)


def test_dps_is_the_samplers_step_minus_the_residual_gradient_through_the_model(mixture, truth):
    diffusion, base = diffusion_pair("3", steps=200)
    model = image_model(mixture, base)
    operator = SuperRes(2)
    y = operator(truth)
    noise = torch.randn(truth.shape, generator=seeded(4))
    got = restore(diffusion, model, y, operator, method="dps", sampler="ddim", noise=noise, scale=0.3)
    # By hand: Chung et al.'s Algorithm 1 with zeta = scale / ||y - A x0_hat||, over DDIM's steps.
    x = noise
    for index in (2, 1, 0):
        x = x.detach().requires_grad_(True)
        t = torch.full((N,), index)
        out = diffusion.ddim_sample(model, x, t)
        residual = (y - operator(out["pred_xstart"])).flatten(1).norm(dim=1)
        squared = (residual**2).sum()
        (gradient,) = torch.autograd.grad(squared, x)
        x = out["sample"].detach() - 0.3 / residual.detach().view(-1, 1, 1, 1) * gradient
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- measurement consistency


@pytest.mark.parametrize("sampler", sorted(samplers.SAMPLERS))
@pytest.mark.parametrize("operator", [Inpaint(left_known()), SuperRes(2), Colorize(3)], ids=lambda o: type(o).__name__)
def test_ddnm_restorations_agree_with_the_measurement_to_float_precision(exact, truth, operator, sampler):
    diffusion, model = exact
    y = operator(truth)
    x = restore(diffusion, model, y, operator, method="ddnm", sampler=sampler, generator=seeded())
    assert x.isfinite().all()
    torch.testing.assert_close(operator(x), y, rtol=0, atol=2e-6)


@pytest.mark.parametrize("mean_type", ["START_X", "VELOCITY", "learned_sigma"])
def test_ddnm_is_consistent_for_every_model_output_and_respacing(mixture, truth, mean_type):
    learned = mean_type == "learned_sigma"
    flags = {"predict_xstart": mean_type == "START_X", "predict_v": mean_type == "VELOCITY", "learn_sigma": learned}
    diffusion, base = diffusion_pair("karras7", steps=100, schedule="cosine", **flags)
    model = image_model(mixture, base, "EPSILON" if learned else mean_type, learned_sigma=learned)
    operator = SuperRes(2)
    y = operator(truth)
    for sampler in ("ddpm", "ddim", "dpmpp_2m"):
        x = restore(diffusion, model, y, operator, method="ddnm", sampler=sampler, generator=seeded())
        torch.testing.assert_close(operator(x), y, rtol=0, atol=2e-6)


def test_ddnm_deblurring_agrees_with_the_measurement_on_the_frequencies_it_keeps(exact, truth):
    diffusion, model = exact
    operator = Deblur(1.0, 3, cutoff=0.2)
    y = operator(truth)
    x = restore(diffusion, model, y, operator, method="ddnm", generator=seeded())
    # A A+ projects onto the kept frequencies; there the restoration reproduces y.
    kept = operator(operator.pinv(operator(x) - y))
    assert kept.abs().max() < 2e-6
    assert (operator(x) - y).abs().max() > 1e-3, "the cut frequencies are the model's, not y's"


@pytest.mark.parametrize("method", ["replace", "repaint"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "euler", "heun"])
def test_replace_and_repaint_keep_the_known_pixels(exact, truth, method, sampler):
    diffusion, model = exact
    mask = left_known()
    operator = Inpaint(mask)
    y = operator(truth)
    args = {"jump_length": 3, "jump_n_sample": 2} if method == "repaint" else {}
    x = restore(diffusion, model, y, operator, method=method, sampler=sampler, generator=seeded(), **args)
    known = mask.bool().expand_as(x)
    assert torch.equal(x[known], truth[known])
    assert not torch.equal(x[~known], truth[~known])


@pytest.mark.parametrize("method", ["replace", "repaint"])
def test_replace_and_repaint_reproduce_block_means_and_gray_levels(exact, truth, method):
    diffusion, model = exact
    args = {"jump_length": 3, "jump_n_sample": 2} if method == "repaint" else {}
    for operator in (SuperRes(2), Colorize(3)):
        y = operator(truth)
        x = restore(diffusion, model, y, operator, method=method, sampler="ddpm", generator=seeded(), **args)
        torch.testing.assert_close(operator(x), y, rtol=0, atol=2e-6)


def test_ddnm_plus_scales_the_correction_to_the_next_nodes_noise(exact):
    diffusion, _ = exact
    nodes = diffusion.sampling_nodes()
    assert restoration.ddnm_scale(nodes, 3, 0.0) == 1.0
    for k in range(nodes.num_steps):
        expected = min(1.0, nodes.sigma[k + 1] / (nodes.alpha[k + 1] * 0.1))
        assert restoration.ddnm_scale(nodes, k, 0.1) == pytest.approx(expected)
    assert restoration.ddnm_scale(nodes, 0, 0.1) == 1.0 and restoration.ddnm_scale(nodes, nodes.num_steps - 1, 0.1) == 0


def test_ddnm_plus_denoises_a_noisy_measurement_where_ddnm_copies_its_noise(exact, mixture):
    diffusion, model = exact
    truth = mixture.sample(64, generator=seeded(7)).float().view(64, *SHAPE).clamp(-1, 1)
    noisy = SuperRes(2, sigma_y=0.2)
    y = noisy.measure(truth, generator=seeded(8))
    clean_y = noisy(truth)
    plus = restore(diffusion, model, y, noisy, method="ddnm", generator=seeded())
    copied = restore(diffusion, model, y, SuperRes(2), method="ddnm", generator=seeded())
    torch.testing.assert_close(noisy(copied), y, rtol=0, atol=2e-6)
    error_plus = (noisy(plus) - clean_y).flatten(1).norm(dim=1).mean()
    error_copied = (noisy(copied) - clean_y).flatten(1).norm(dim=1).mean()
    assert error_plus < 0.75 * error_copied, (error_plus, error_copied)


# ---------------------------------------------------------------- cost and errors


class CountingModel:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, t, **kwargs):
        self.calls += 1
        return self.model(x, t, **kwargs)


@pytest.mark.parametrize(
    "method, sampler, args",
    [
        ("ddnm", "ddim", {}), ("ddnm", "heun", {}), ("ddnm", "plms", {}), ("replace", "heun", {}),
        ("repaint", "ddpm", {"jump_length": 3, "jump_n_sample": 3}),
        ("repaint", "heun", {"jump_length": 2, "jump_n_sample": 2}),
        ("sdedit", "dpmpp_2m", {"t_start": 0.3}), ("sdedit", "plms", {"t_start": 0.45}), ("dps", "ddim", {}),
    ],
)
def test_model_evaluations_counts_the_model_calls(exact, truth, method, sampler, args):
    diffusion, model = exact
    counting = CountingModel(model)
    operator = Inpaint(left_known())
    restore(diffusion, counting, operator(truth), operator, method=method, sampler=sampler, generator=seeded(),
            **args)
    assert counting.calls == restoration.model_evaluations(method, sampler, 20, **args)


@pytest.mark.parametrize(
    "method, sampler, operator, args, needles",
    [
        ("replace", "ddim", Deblur(1.0, 3), {}, ["Deblur", "use ddnm or dps"]),
        ("repaint", "ddpm", Deblur(1.0, 3), {}, ["Deblur", "use ddnm or dps"]),
        ("dps", "dpmpp_2m", SuperRes(2), {}, ["dpmpp_2m", "ddpm, ddim, euler, heun"]),
        ("repaint", "unipc", SuperRes(2), {}, ["unipc", "ddpm, ddim, euler, heun"]),
        ("ddnm", "ddim", None, {}, ["needs an operator"]),
        ("inpaint", "ddim", SuperRes(2), {}, ["unknown restoration method", "sdedit, replace, repaint, ddnm, dps"]),
        ("ddnm", "nope", SuperRes(2), {}, ["unknown sampler 'nope'"]),
        ("sdedit", "ddim", None, {"t_start": 0.0}, ["t_start=0.0", "(0, 1]"]),
        ("sdedit", "ddim", None, {"t_start": 1.5}, ["t_start=1.5", "(0, 1]"]),
        ("dps", "ddim", SuperRes(2), {"scale": 0.0}, ["scale=0.0", "> 0"]),
        ("ddnm", "ddim", SuperRes(2), {"t_start": 0.5}, ["ddnm takes no t_start"]),
    ],
)
def test_restore_errors_name_the_fix(exact, truth, method, sampler, operator, args, needles):
    diffusion, model = exact
    y = truth if operator is None else operator(truth)
    with pytest.raises(ValueError) as info:
        restore(diffusion, model, y, operator, method=method, sampler=sampler, **args)
    for needle in needles:
        assert needle in str(info.value)
