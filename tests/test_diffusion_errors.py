"""Bad input to the diffusion core gets an error that names the problem and the fix."""

import numpy as np
import pytest
import torch

from improved_diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,
)
from improved_diffusion.resample import (
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)
from improved_diffusion.respace import SpacedDiffusion, space_timesteps

from diffusion_probe import ProbeModel


def make(betas=None, var=ModelVarType.FIXED_LARGE):
    return GaussianDiffusion(
        betas=get_named_beta_schedule("cosine", 50) if betas is None else betas,
        model_mean_type=ModelMeanType.EPSILON, model_var_type=var, loss_type=LossType.MSE,
    )


def test_unknown_schedule_lists_the_known_ones():
    with pytest.raises(ValueError, match="'quadratic'.*linear, cosine"):
        get_named_beta_schedule("quadratic", 100)


def test_linear_schedule_with_too_few_steps():
    with pytest.raises(ValueError, match="at least 20 diffusion steps"):
        get_named_beta_schedule("linear", 10)


@pytest.mark.parametrize("betas", [np.array([0.1, 0.0, 0.2]), np.array([0.5, 1.5]), np.array([-0.1]), np.array([np.nan])])
def test_betas_outside_unit_interval(betas):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        make(betas)


def test_betas_not_one_dimensional():
    with pytest.raises(ValueError, match="1-D"):
        make(np.full((2, 3), 0.1))


@pytest.mark.parametrize("steps,spec,needles", [
    (1000, "ddim3000", ["3000", "1000"]),
    (100, "ddim60", ["ddim60", "100"]),
    (100, [60, 10], ["60", "50"]),
    (100, "ddimx", ["ddimx"]),
])
def test_impossible_respacing_names_count_and_steps(steps, spec, needles):
    with pytest.raises(ValueError) as info:
        space_timesteps(steps, spec)
    for needle in needles:
        assert needle in str(info.value)


def test_use_timesteps_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 49\]"):
        SpacedDiffusion(
            use_timesteps={0, 50}, betas=get_named_beta_schedule("cosine", 50),
            model_mean_type=ModelMeanType.EPSILON, model_var_type=ModelVarType.FIXED_LARGE,
            loss_type=LossType.MSE,
        )


def test_model_without_learned_sigma_channels():
    diffusion = make(var=ModelVarType.LEARNED_RANGE)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="6 output channels.*learn_sigma True"):
        diffusion.p_mean_variance(ProbeModel(3), x, torch.tensor([1, 2]))


def test_model_with_unexpected_learned_sigma_channels():
    diffusion = make(var=ModelVarType.FIXED_LARGE)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="3 output channels.*learn_sigma"):
        diffusion.training_losses(ProbeModel(6), x, torch.tensor([1, 2]))


@pytest.mark.parametrize("t", [torch.tensor([0, 50]), torch.tensor([-1, 3])])
def test_timesteps_out_of_range(t):
    with pytest.raises(ValueError, match=r"\[0, 49\]"):
        make().q_sample(torch.randn(2, 3), t)


def test_timesteps_must_be_integers_of_batch_length():
    with pytest.raises(TypeError, match="integer"):
        make().q_sample(torch.randn(2, 3), torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        make().q_sample(torch.randn(2, 3), torch.tensor([1, 2, 3]))


def test_reverse_ddim_refuses_eta():
    diffusion = make()
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="eta=0.0"):
        diffusion.ddim_reverse_sample(ProbeModel(3), x, torch.tensor([1, 2]), eta=0.5)
    with pytest.raises(ValueError, match="eta=0.0"):
        diffusion.ddim_reverse_sample_loop(ProbeModel(3), x, eta=1.0)


def test_unknown_schedule_sampler():
    with pytest.raises(ValueError, match="uniform, loss-second-moment"):
        create_named_schedule_sampler("importance", make())


def test_loss_second_moment_state_round_trip_resumes_identically():
    diffusion = make()
    sampler = LossSecondMomentResampler(diffusion, history_per_term=2)
    rng = np.random.default_rng(0)
    for _ in range(200):
        sampler.update_with_local_losses(torch.from_numpy(rng.integers(0, 50, 4)), torch.rand(4).double())
    assert sampler._warmed_up()
    restored = LossSecondMomentResampler(diffusion, history_per_term=2)
    state = sampler.state_dict()
    restored.load_state_dict(state)
    np.testing.assert_array_equal(restored.weights(), sampler.weights())
    draws = [s.sample(16, "cpu", generator=torch.Generator().manual_seed(3)) for s in (sampler, restored)]
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    with pytest.raises(ValueError, match="history"):
        LossSecondMomentResampler(diffusion, history_per_term=3).load_state_dict(state)


def test_importance_weights_are_inverse_probabilities():
    diffusion = make()
    sampler = LossSecondMomentResampler(diffusion, history_per_term=1, uniform_prob=0.0)
    losses = np.linspace(1, 2, 50)
    sampler.update_with_all_losses(list(range(50)), list(losses))
    p = losses / losses.sum()
    t, w = sampler.sample(1000, "cpu", generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(w.numpy(), 1 / (50 * p[t.numpy()]), rtol=1e-6)
    t, w = UniformSampler(diffusion).sample(8, "cpu")
    assert (w == 1).all() and t.dtype == torch.int64 and ((t >= 0) & (t < 50)).all()
