"""The timestep spellings of SPEC 11: trailingN, quadN, logsnrN, karrasN and a .json list."""

import json
import math

import numpy as np
import pytest

from improved_diffusion.gaussian_diffusion import get_named_beta_schedule
from improved_diffusion.respace import space_timesteps

T = 1000
BETAS = get_named_beta_schedule("linear", T)
LAMBDA = 0.5 * np.log(np.cumprod(1 - BETAS) / (1 - np.cumprod(1 - BETAS)))


def steps(spec, num_timesteps=T, betas=BETAS):
    return sorted(space_timesteps(num_timesteps, spec, betas=betas), reverse=True)


def test_trailing_is_lin_et_al_table_2():
    assert steps("trailing10") == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert steps("trailing3") == [round(T - k * T / 3) - 1 for k in range(3)] == [999, 666, 332]


def test_quad_is_quadratic_over_the_whole_process():
    expected = [round((T - 1) * (1 - k / 9) ** 2) for k in range(10)]
    assert steps("quad10") == expected and expected[0] == T - 1 and expected[-1] == 0


def test_logsnr_is_uniform_in_lambda_between_the_end_steps():
    got = steps("logsnr10")
    assert got[0] == T - 1 and got[-1] == 0
    targets = np.linspace(LAMBDA[-1], LAMBDA[0], 10)
    for t, target in zip(got, targets):
        # The nearest base timestep in lambda to each target.
        assert abs(LAMBDA[t] - target) == np.abs(LAMBDA - target).min()


def test_karras_is_rho_7_in_sigma():
    got = steps("karras8")
    sigma = np.exp(-LAMBDA)
    ramp = np.linspace(0, 1, 8)
    targets = (sigma[-1] ** (1 / 7) + ramp * (sigma[0] ** (1 / 7) - sigma[-1] ** (1 / 7))) ** 7
    assert got[0] == T - 1 and got[-1] == 0
    for t, target in zip(got, targets):
        assert abs(math.log(sigma[t]) - math.log(target)) == np.abs(np.log(sigma) - math.log(target)).min()


@pytest.mark.parametrize("name", ["trailing", "quad", "logsnr", "karras"])
@pytest.mark.parametrize("count", [1, 2, 37, 250, 1000])
def test_every_spelling_gives_exactly_n_distinct_steps_in_range(name, count):
    got = space_timesteps(T, f"{name}{count}", betas=BETAS)
    assert len(got) == count and all(0 <= t < T for t in got) and (T - 1) in got


def test_collisions_take_the_nearest_unused_timestep():
    # 200 logsnr targets crowd the first steps of a linear schedule: several round to
    # the same timestep there, and each later one moves to the nearest free neighbour.
    got = steps("logsnr200")
    assert got[-12:] == list(range(11, -1, -1))


@pytest.mark.parametrize("name", ["trailing", "quad", "logsnr", "karras"])
def test_more_steps_than_the_process_has_is_an_error_naming_t(name):
    with pytest.raises(ValueError, match="T = 1000"):
        space_timesteps(T, f"{name}1001", betas=BETAS)


def test_lambda_spacings_need_the_schedule():
    with pytest.raises(ValueError, match="betas=betas"):
        space_timesteps(T, "logsnr10")


def test_json_list_is_read_as_the_timesteps(tmp_path):
    path = tmp_path / "steps.json"
    path.write_text(json.dumps([0, 10, 500, 999]))
    assert space_timesteps(T, str(path)) == {0, 10, 500, 999}


@pytest.mark.parametrize(
    "content",
    ["[]", "[3, 2, 1]", "[1, 1, 2]", "[0, 1000]", "[-1, 5]", "[0.5, 3]", '{"steps": [1]}', "[true, 2]", "not json"],
)
def test_a_json_file_that_is_not_increasing_ints_in_range_is_an_error(tmp_path, content):
    path = tmp_path / "steps.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="steps.json"):
        space_timesteps(T, str(path))


def test_a_missing_json_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        space_timesteps(T, str(tmp_path / "nope.json"))


def test_existing_spellings_are_unchanged():
    assert space_timesteps(T, "ddim10") == set(range(0, 1000, 100))
    assert space_timesteps(100, "10,20") == space_timesteps(100, [10, 20])
