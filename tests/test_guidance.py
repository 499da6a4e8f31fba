"""
Classifier-free guidance (samplers.ClassifierFreeGuidance) on an exact
class-conditional model: a Gaussian mixture whose classes are its components,
with the null label meaning the whole mixture.
"""

import numpy as np
import pytest
import torch

from improved_diffusion import samplers
from improved_diffusion.gaussian_diffusion import LossType, ModelMeanType, ModelVarType, get_named_beta_schedule
from improved_diffusion.mixture import GaussianMixture
from improved_diffusion.respace import SpacedDiffusion, space_timesteps

MEANS = [[-0.5, 0.0], [0.5, 0.0]]
STDS = [0.2, 0.2]
NULL = 2


class ConditionalMixture:
    """eps of component y for y < NULL, of the whole mixture for y == NULL; counts its forwards and batch sizes."""

    def __init__(self, alphas_cumprod):
        self.parts = [GaussianMixture([1.0], [m], [s]).model(alphas_cumprod) for m, s in zip(MEANS, STDS)]
        self.whole = GaussianMixture([0.5, 0.5], MEANS, STDS).model(alphas_cumprod)
        self.batches = []

    def __call__(self, x, t, y):
        self.batches.append(len(x))
        out = self.whole(x, t)
        for label, part in enumerate(self.parts):
            out = torch.where((y == label).view(-1, 1), part(x, t), out)
        return out


def spaced(spec="logsnr10"):
    betas = get_named_beta_schedule("linear", 1000)
    return SpacedDiffusion(use_timesteps=space_timesteps(1000, spec, betas=betas), betas=betas,
                           model_mean_type=ModelMeanType.EPSILON, model_var_type=ModelVarType.FIXED_SMALL,
                           loss_type=LossType.MSE)


@pytest.fixture
def setup():
    diffusion = spaced()
    model = ConditionalMixture(np.cumprod(1 - get_named_beta_schedule("linear", 1000)))
    noise = torch.randn(400, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.arange(400) % 2
    return diffusion, model, noise, labels


def sample(diffusion, model, noise, labels, sampler="dpmpp_2m", **kwargs):
    return diffusion.sample_loop(model, noise.shape, sampler, noise=noise, clip_denoised=False,
                                 model_kwargs={"y": labels}, null_label=NULL,
                                 generator=torch.Generator().manual_seed(1), **kwargs)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m", "unipc"])
def test_scale_1_is_conditional_sampling_bit_for_bit(setup, sampler):
    diffusion, model, noise, labels = setup
    plain = diffusion.sample_loop(model, noise.shape, sampler, noise=noise, clip_denoised=False,
                                  model_kwargs={"y": labels}, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sample(diffusion, model, noise, labels, sampler, guidance_scale=1.0), plain,
                               rtol=0, atol=0)


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m"])
def test_scale_0_is_unconditional_sampling_bit_for_bit(setup, sampler):
    diffusion, model, noise, labels = setup
    unconditional = sample(diffusion, model, noise, torch.full_like(labels, NULL), sampler)
    torch.testing.assert_close(sample(diffusion, model, noise, labels, sampler, guidance_scale=0.0),
                               unconditional, rtol=0, atol=0)


def test_the_doubled_batch_gives_the_numbers_of_two_separate_forwards(setup):
    diffusion, model, noise, labels = setup
    scale = 3.0

    def two_forwards(x, t, y):
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, NULL))
        return uncond + scale * (cond - uncond)

    model.batches.clear()
    guided = sample(diffusion, model, noise, labels, guidance_scale=scale)
    assert model.batches == [800] * 10, "one forward of the doubled batch per step"
    reference = diffusion.sample_loop(two_forwards, noise.shape, "dpmpp_2m", noise=noise, clip_denoised=False,
                                      model_kwargs={"y": labels})
    torch.testing.assert_close(guided, reference, rtol=0, atol=1e-12)


def test_guidance_concentrates_samples_on_their_class(setup):
    diffusion, model, noise, labels = setup
    sides = lambda out: ((out[:, 0] > 0).long() == labels).double().mean().item()
    spread = lambda out: out[labels == 1, 0].std().item()
    plain, guided = sample(diffusion, model, noise, labels), sample(diffusion, model, noise, labels, guidance_scale=4.0)
    assert sides(plain) > 0.95 and sides(guided) >= sides(plain)
    assert spread(guided) < 0.8 * spread(plain), "guidance trades diversity for class fidelity"


def test_guidance_interval_guides_only_inside_it(setup):
    diffusion, model, noise, labels = setup
    lo, hi = 200, 700
    inside = [t for t in diffusion.timestep_map if lo <= t <= hi]
    model.batches.clear()
    sample(diffusion, model, noise, labels, guidance_scale=3.0, guidance_interval=(lo, hi))
    assert sorted(model.batches) == [400] * (10 - len(inside)) + [800] * len(inside)
    empty = sample(diffusion, model, noise, labels, guidance_scale=3.0, guidance_interval=(1000, 2000))
    torch.testing.assert_close(empty, sample(diffusion, model, noise, labels), rtol=0, atol=0)


def test_learned_variance_channels_come_from_the_conditional_half():
    def model(x, t, y):
        return torch.cat([x * y.view(-1, 1), y.view(-1, 1).expand_as(x).double()], dim=1)

    guidance = samplers.ClassifierFreeGuidance(model, 2.0, NULL)
    x, y = torch.ones(3, 2, dtype=torch.float64), torch.tensor([0, 1, 0])
    out = guidance.guided(x, torch.zeros(3), y)
    torch.testing.assert_close(out[:, 2:], y.view(-1, 1).expand(3, 2).double())
    torch.testing.assert_close(out[:, :2], (NULL + 2.0 * (y - NULL)).view(-1, 1).expand(3, 2).double())


def test_guidance_without_labels_or_null_label_is_an_error(setup):
    diffusion, model, noise, labels = setup
    with pytest.raises(ValueError, match="model_kwargs\\['y'\\]"):
        diffusion.sample_loop(model, noise.shape, "ddim", noise=noise, guidance_scale=2.0)
    with pytest.raises(ValueError, match="--class_dropout_prob"):
        diffusion.sample_loop(model, noise.shape, "ddim", noise=noise, model_kwargs={"y": labels}, guidance_scale=2.0)


def test_the_null_label_is_found_through_wrappers_and_only_where_trained():
    from improved_diffusion.model_loading import AutocastModel
    from improved_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

    flags = dict(model_and_diffusion_defaults(), image_size=8, num_channels=32, num_res_blocks=1,
                 attention_resolutions="", class_cond=True, num_classes=10)
    guided = create_model_and_diffusion(**dict(flags, class_dropout_prob=0.1))[0]
    plain = create_model_and_diffusion(**flags)[0]
    assert samplers.null_label_of(guided) == 10 and samplers.null_label_of(AutocastModel(guided)) == 10
    assert samplers.null_label_of(plain) is None and samplers.null_label_of(torch.nn.Linear(2, 2)) is None


def exact_posterior_cond_fn(mixture, alphas_cumprod):
    """cond_fn = grad_x log p(y | x_t): the mixture's exact component posterior r_y(x_t) as the classifier."""
    table = torch.as_tensor(alphas_cumprod, dtype=torch.float64)

    def cond_fn(x, t, y):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_r = mixture.posterior_weights(x_in, table[t].view(-1, 1)).log()
            return torch.autograd.grad(log_r[torch.arange(len(y)), y].sum(), x_in)[0]

    return cond_fn


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_classifier_guidance_with_the_exact_posterior_is_the_class_model(setup, sampler):
    """Score form at scale 1: eps - sqrt(1 - abar) grad log p(y | x_t) is the class component's eps exactly."""
    diffusion, model, noise, labels = setup
    alphas_cumprod = np.cumprod(1 - get_named_beta_schedule("linear", 1000))
    mixture = GaussianMixture([0.5, 0.5], MEANS, STDS)
    unconditional = mixture.model(alphas_cumprod)
    guided = diffusion.sample_loop(unconditional, noise.shape, sampler, noise=noise, clip_denoised=False,
                                   model_kwargs={"y": labels}, cond_fn=exact_posterior_cond_fn(mixture, alphas_cumprod))
    conditional = diffusion.sample_loop(model, noise.shape, sampler, noise=noise, clip_denoised=False,
                                        model_kwargs={"y": labels})
    torch.testing.assert_close(guided, conditional, rtol=0, atol=1e-7)


def test_classifier_guided_ddpm_with_the_exact_posterior_samples_the_class_component():
    """
    Mean form (Algorithm 1), all 1000 DDPM steps: each class's samples have its
    component's share of the right half-plane (0.994), mean and spread (seen:
    shares 0.99, means within 0.01, stds 0.20 for 0.2).
    """
    diffusion = spaced("1000")
    alphas_cumprod = np.cumprod(1 - get_named_beta_schedule("linear", 1000))
    mixture = GaussianMixture([0.5, 0.5], MEANS, STDS)
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.arange(1000) % 2
    out = diffusion.sample_loop(mixture.model(alphas_cumprod), noise.shape, "ddpm", noise=noise, clip_denoised=False,
                                model_kwargs={"y": labels}, cond_fn=exact_posterior_cond_fn(mixture, alphas_cumprod),
                                generator=torch.Generator().manual_seed(1))
    unguided = diffusion.sample_loop(mixture.model(alphas_cumprod), noise.shape, "ddpm", noise=noise,
                                     clip_denoised=False, generator=torch.Generator().manual_seed(1))
    for label, (mean, std) in enumerate(zip(MEANS, STDS)):
        part = out[labels == label]
        assert ((part[:, 0] > 0).long() == label).double().mean() > 0.975
        torch.testing.assert_close(part.mean(0), torch.tensor(mean, dtype=torch.float64), rtol=0, atol=0.03)
        torch.testing.assert_close(part.std(0), torch.full((2,), std, dtype=torch.float64), rtol=0.1, atol=0)
    assert ((unguided[:, 0] > 0).long() == labels).double().mean() < 0.6, "without guidance the classes are ignored"
