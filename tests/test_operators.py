"""
The measurement operators of restoration (improved_diffusion/operators.py):
each A written out by hand and compared with the operator's matrix, pinv
against the Moore-Penrose pseudo-inverse of that matrix, the adjoint against
its transpose, DDNM's projection, the measurement noise, the masks and the
errors that name both shapes.
"""

import math

import numpy as np
import pytest
import torch

from improved_diffusion.operators import Colorize, Deblur, Inpaint, SuperRes, make_mask

C, H, W = 3, 4, 6
D = C * H * W


def matrix_of(function, shape):
    """The matrix [out x in] of a linear function of tensors of `shape` ([1 x ...]), from the basis vectors."""
    size = math.prod(shape[1:])
    basis = torch.eye(size, dtype=torch.float64).view(size, *shape[1:])
    return function(basis).reshape(size, -1).T


def measurement_shape(operator):
    return tuple(operator(torch.zeros(1, C, H, W, dtype=torch.float64)).shape)


def inpaint_mask():
    mask = torch.zeros(C, H, W)
    mask[:, :, :3] = 1
    mask[1, 0, 5] = 1  # a known pixel in one channel only
    return mask


def by_hand_blur(sigma, size):
    """The circular Gaussian blur of 1 x C x H x W images as a [D x D] matrix, from the kernel formula."""
    r = size // 2
    weights = np.exp(-0.5 * ((np.arange(size) - r) / sigma) ** 2)
    kernel = np.outer(weights, weights) / np.outer(weights, weights).sum()
    a = np.zeros((C, H, W, C, H, W))
    for c in range(C):
        for i in range(H):
            for j in range(W):
                for u in range(size):
                    for v in range(size):
                        a[c, i, j, c, (i + u - r) % H, (j + v - r) % W] += kernel[u, v]
    return torch.from_numpy(a.reshape(D, D))


def by_hand(name):
    """(operator, its matrix written out from its definition)."""
    if name == "inpaint":
        mask = inpaint_mask()
        return Inpaint(mask), torch.diag(mask.flatten().double())
    if name == "super_res":
        a = torch.zeros(C, H // 2, W // 2, C, H, W, dtype=torch.float64)
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    a[c, i // 2, j // 2, c, i, j] = 0.25
        return SuperRes(2), a.reshape(-1, D)
    if name == "colorize":
        a = torch.zeros(H, W, C, H, W, dtype=torch.float64)
        for i in range(H):
            for j in range(W):
                a[i, j, :, i, j] = 1 / 3
        return Colorize(3), a.reshape(-1, D)
    if name == "deblur":
        return Deblur(1.2, 3, cutoff=0.3), by_hand_blur(1.2, 3)
    raise ValueError(name)


OPERATORS = ("inpaint", "super_res", "colorize", "deblur")


@pytest.mark.parametrize("name", OPERATORS)
def test_each_operator_is_the_matrix_of_its_definition(name):
    operator, expected = by_hand(name)
    got = matrix_of(operator, (1, C, H, W))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", OPERATORS)
def test_pinv_is_the_moore_penrose_pseudo_inverse_and_adjoint_the_transpose(name):
    operator, a = by_hand(name)
    out_shape = measurement_shape(operator)
    pinv = matrix_of(operator.pinv, out_shape)
    adjoint = matrix_of(operator.adjoint, out_shape)
    torch.testing.assert_close(adjoint, a.T, rtol=0, atol=1e-12)
    # Moore-Penrose with the operator's tolerance: singular values at or below the cutoff count as zero.
    rtol = operator.cutoff if name == "deblur" else 1e-10
    torch.testing.assert_close(pinv, torch.linalg.pinv(a, rtol=rtol), rtol=0, atol=1e-10)


def test_the_blur_test_case_does_cut_frequencies():
    """The deblur case above keeps some singular values and drops others, so its pinv test checks the cutoff."""
    singular = torch.linalg.svdvals(by_hand_blur(1.2, 3))
    assert (singular > 0.3).any() and (singular <= 0.3).any() and singular.max() == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["inpaint", "super_res", "colorize"])
def test_projection_puts_y_on_the_measured_part_and_keeps_the_rest(name):
    operator, a = by_hand(name)
    assert operator.has_known_part
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, C, H, W, generator=g, dtype=torch.float64)
    y = operator(torch.randn(2, C, H, W, generator=g, dtype=torch.float64))
    projected = operator.project(x, y)
    torch.testing.assert_close(operator(projected), y, rtol=0, atol=1e-12)
    # (I - A+ A) x: the unmeasured part is x's own.
    null = torch.eye(D, dtype=torch.float64) - torch.linalg.pinv(a) @ a
    torch.testing.assert_close(projected.flatten(1) @ null.T, x.flatten(1) @ null.T, rtol=0, atol=1e-12)
    half = operator.project(x, y, scale=0.5)
    torch.testing.assert_close(half, x - 0.5 * operator.pinv(operator(x) - y))


def test_deblur_is_not_a_known_part_operator():
    assert not Deblur(1.0, 3).has_known_part


@pytest.mark.parametrize("name", OPERATORS)
def test_measure_adds_sigma_y_times_the_generators_normal_draw(name):
    operator, _ = by_hand(name)
    x = torch.rand(2, C, H, W) * 2 - 1
    assert torch.equal(operator.measure(x), operator(x)), "sigma_y 0: the exact measurement"
    operator.sigma_y = 0.3
    y = operator.measure(x, generator=torch.Generator().manual_seed(5))
    draw = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(y - operator(x), 0.3 * draw)


def test_inpaint_takes_a_per_image_mask_and_a_one_channel_mask():
    x = torch.randn(2, C, H, W)
    per_image = torch.stack([torch.ones(1, H, W), torch.zeros(1, H, W)])
    y = Inpaint(per_image)(x)
    assert torch.equal(y[0], x[0]) and torch.equal(y[1], torch.zeros_like(x[1]))
    Inpaint(per_image).check_shape(x.shape)


@pytest.mark.parametrize(
    "mask, shape, needles",
    [
        (torch.ones(C, H, W + 1), (2, C, H, W), [f"[{C}, {H}, {W + 1}]", f"[2 x {C} x {H} x {W}]"]),
        (torch.ones(2, H, W), (2, C, H, W), ["[2, 4, 6]", "1 or 3 channels"]),
        (torch.ones(5, 1, H, W), (2, C, H, W), ["[5, 1, 4, 6]", "N = 2"]),
    ],
)
def test_a_mask_that_does_not_fit_the_images_names_both(mask, shape, needles):
    with pytest.raises(ValueError) as info:
        Inpaint(mask).check_shape(shape)
    for needle in needles:
        assert needle in str(info.value)


def test_bad_operator_arguments_fail_clearly():
    with pytest.raises(ValueError, match="only 0"):
        Inpaint(torch.full((1, H, W), 0.5))
    with pytest.raises(ValueError, match="sigma_y"):
        SuperRes(2, sigma_y=-1)
    with pytest.raises(ValueError, match="divides"):
        SuperRes(4).check_shape((1, C, H, W))
    with pytest.raises(ValueError, match="odd"):
        Deblur(1.0, 4)
    with pytest.raises(ValueError, match="larger than"):
        Deblur(1.0, 5).check_shape((1, C, H, W))
    with pytest.raises(ValueError, match="3 channels"):
        Colorize(3).check_shape((1, 1, H, W))


def test_named_masks():
    half = make_mask("half", 4, 6)
    assert half.shape == (1, 4, 6) and half[..., :3].eq(1).all() and half[..., 3:].eq(0).all()
    box = make_mask("box", 8, 8)
    expected = torch.ones(1, 8, 8)
    expected[:, 2:6, 2:6] = 0
    assert torch.equal(box, expected)
    random = make_mask("random", 32, 32, seed=3)
    assert torch.equal(random, make_mask("random", 32, 32, seed=3))
    assert not torch.equal(random, make_mask("random", 32, 32, seed=4))
    assert set(random.unique().tolist()) == {0.0, 1.0} and 0.4 < random.mean() < 0.6
    with pytest.raises(ValueError, match="half, box, random"):
        make_mask("circle", 8, 8)
