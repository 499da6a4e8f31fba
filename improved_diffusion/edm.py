"""
EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models") as a noise process (noise_process.py): the network's
preconditioning (Table 1), its training loss and noise-level distribution
(section 5) and its samplers (Algorithms 1 and 2), on which every sampler of
samplers.py runs too.

The path is x = x_0 + sigma n (alpha = 1). The denoiser is

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)),
    c_skip = sigma_d^2 / (sigma^2 + sigma_d^2),   c_out = sigma sigma_d / sqrt(sigma^2 + sigma_d^2),
    c_in = 1 / sqrt(sigma^2 + sigma_d^2),          c_noise = ln(sigma) / 4,

trained with ln sigma ~ N(P_mean, P_std^2) on
lambda(sigma) ||D(x_0 + sigma n; sigma) - x_0||^2, lambda = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2.

What the network sees, and so what a classifier for cond_fn sees: the scaled
input c_in x and c_noise = ln(sigma) / 4 as its timesteps argument
(call_model). cond_fn is called the same way and returns the gradient of
log p(y | input) with respect to its input c_in x; the process turns it into
the gradient with respect to x (times c_in, the chain rule). guidance_interval
is in sigma.
"""

import math
import statistics

import numpy as np
import torch

from . import samplers
from .nn import mean_flat
from .noise_process import NoiseProcess, Nodes, as_levels, noise_for, noise_like, per_sample
from .respace import karras_sigmas, log_snr_sigmas, node_list, read_spacing_file, split_spacing

# The node spacings of EDM: "uniform" and "trailing" are both uniform in sigma.
EDM_SPACINGS = ("karras", "logsnr", "uniform", "trailing")
# Standard normal quantiles of the quartile boundaries.
QUARTILE_Z = tuple(statistics.NormalDist().inv_cdf(q) for q in (0.25, 0.5, 0.75))


def _log(value):
    return value.log() if isinstance(value, torch.Tensor) else math.log(value)


class EDMDiffusion(NoiseProcess):
    """
    :param sigma_data: sigma_d, the data's standard deviation.
    :param sigma_min, sigma_max: the noise levels the sampling nodes span.
    :param P_mean, P_std: ln sigma ~ N(P_mean, P_std^2) in training.
    :param timestep_respacing: the nodes the samplers walk when sample_loop
        is given none (see sampling_sigmas; "": karras with its `steps`).
    """

    output_name = "EDM's F (Table 1)"

    def __init__(self, sigma_data=0.5, sigma_min=0.002, sigma_max=80.0, P_mean=-1.2, P_std=1.2,
                 timestep_respacing=""):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"sigma_min={sigma_min} and sigma_max={sigma_max}: EDM samples between them and needs "
                "0 < --sigma_min < --sigma_max"
            )
        if sigma_data <= 0:
            raise ValueError(f"sigma_data={sigma_data}: the data's standard deviation --sigma_data must be > 0")
        if P_std <= 0:
            raise ValueError(f"P_std={P_std}: the spread of ln sigma in training, --P_std, must be > 0")
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.P_mean = float(P_mean)
        self.P_std = float(P_std)
        self.timestep_respacing = timestep_respacing
        if timestep_respacing:
            self.sampling_sigmas(timestep_respacing)

    # ---------------------------------------------------------- preconditioning

    def coefficients(self, sigma):
        """(c_skip, c_out, c_in, c_noise) of Table 1 at sigma (a float, or a tensor of any shape, alike)."""
        variance = sigma**2 + self.sigma_data**2
        root = variance**0.5
        return self.sigma_data**2 / variance, sigma * self.sigma_data / root, 1 / root, _log(sigma) / 4

    def loss_weight(self, sigma):
        """lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 (section 5), float or tensor alike."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def call_model(self, model, x, t, model_kwargs=None):
        """
        The network F (or a classifier, or cond_fn) as EDM calls it: model(c_in x, c_noise, **model_kwargs).

        :param x: [N x C x ...] noisy data; t: [N] noise levels sigma.
        """
        _, _, c_in, c_noise = self.coefficients(t)
        return model(per_sample(c_in, x) * x, c_noise, **(model_kwargs or {}))

    def pred_xstart_from_output(self, output, x, t):
        """D(x; sigma) = c_skip x + c_out F, [N x C x ...], for F = output at noise levels t ([N])."""
        c_skip, c_out, _, _ = self.coefficients(t)
        return per_sample(c_skip, x) * x + per_sample(c_out, x) * output

    def condition_gradient(self, cond_fn, x, t, model_kwargs=None):
        """grad_x log p(y | x): cond_fn's gradient with respect to its input c_in x, times c_in."""
        _, _, c_in, _ = self.coefficients(t)
        return per_sample(c_in, x) * self.call_model(cond_fn, x, t, model_kwargs)

    def denoise(self, model, x, sigma, model_kwargs=None):
        """
        D(x; sigma), [N x C x ...], for x [N x C x ...] and sigma a float or an [N] tensor.
        """
        sigma = as_levels(sigma, x)
        return self.pred_xstart_from_output(self.model_output(model, x, sigma, model_kwargs), x, sigma)

    # ----------------------------------------------------------------- training

    def sample_sigma(self, batch_size, device, generator=None):
        """The training noise levels: ln sigma ~ N(P_mean, P_std^2), float32 [batch_size], drawn from `generator`."""
        return torch.exp(self.P_mean + self.P_std * noise_like((batch_size,), device, generator))

    sample_training_levels = sample_sigma  # the NoiseProcess interface's name

    def training_losses_at(self, model, x_start, levels, model_kwargs=None, generator=None):
        """training_losses at the [N] noise levels sigma = `levels` (the NoiseProcess interface)."""
        return self.training_losses(model, x_start, model_kwargs, sigma=levels, generator=generator)

    def noise_level_quartile(self, sigma):
        """The quartile of the training distribution of sigma each [N] sigma lies in: int64 [N], 0 = least noise."""
        log_sigma = torch.as_tensor(sigma).log()
        quartile = torch.zeros(log_sigma.shape, dtype=torch.int64, device=log_sigma.device)
        for z in QUARTILE_Z:
            quartile += (log_sigma > self.P_mean + self.P_std * z).long()
        return quartile

    def training_losses(self, model, x_start, model_kwargs=None, noise=None, sigma=None, generator=None):
        """
        EDM's loss for one batch (section 5): mean_flat(lambda(sigma) (D(x_0 + sigma n; sigma) - x_0)^2).

        :param x_start: the [N x C x ...] data x_0.
        :param noise: optional standard normal n; sigma: optional [N] noise levels
            (or one float). What is not given is drawn from `generator`: sigma first, then n.
        :return: dict of [N] tensors: "loss", and "mse" = mean_flat((D - x_0)^2).
        """
        if sigma is None:
            sigma = self.sample_sigma(x_start.shape[0], x_start.device, generator)
        sigma = as_levels(sigma, x_start)
        noise = noise_for(x_start, noise, generator)
        denoised = self.denoise(model, x_start + per_sample(sigma, x_start) * noise, sigma, model_kwargs)
        mse = mean_flat((denoised - x_start) ** 2)
        return {"loss": self.loss_weight(sigma) * mse, "mse": mse}

    # ----------------------------------------------------------------- sampling

    def sampling_sigmas(self, timestep_respacing=None, steps=18, rho=7.0):
        """
        The sampling nodes' sigmas, largest first (then 0 ends the walk):
        "karrasN" (rho-spacing of eq. 5 from sigma_max to sigma_min, the default
        with N = steps), "logsnrN" (uniform in lambda = -ln sigma), "uniformN" or
        "trailingN" (uniform in sigma), or a .json list of sigmas in
        [sigma_min, sigma_max] (or such a list itself). None: the process's own
        timestep_respacing.

        :return: a list of N floats, decreasing.
        """
        if timestep_respacing is None:
            timestep_respacing = self.timestep_respacing
        if isinstance(timestep_respacing, (list, tuple)):
            return self._node_sigmas(timestep_respacing, "the node list")
        name, count = split_spacing(timestep_respacing or f"karras{steps}", EDM_SPACINGS, "an EDM process")
        if name == "json":
            return self._node_sigmas(read_spacing_file(count), f"node spacing file {count}")
        if name == "karras":
            sigmas = karras_sigmas(self.sigma_max, self.sigma_min, count, rho)
        elif name == "logsnr":
            sigmas = log_snr_sigmas(self.sigma_max, self.sigma_min, count)
        else:
            sigmas = np.linspace(self.sigma_max, self.sigma_min, count)
        return sigmas.tolist()

    def _node_sigmas(self, values, source):
        return node_list(
            values, source, lambda v: self.sigma_min <= v <= self.sigma_max,
            f"EDM noise levels sigma in [sigma_min, sigma_max] = [{self.sigma_min}, {self.sigma_max}] (integer "
            "timesteps are for DDPM-family models)",
        )

    def sampling_nodes(self, timestep_respacing=None, steps=18, rho=7.0):
        """The Nodes at sampling_sigmas(...): alpha = 1, "karras" coordinates (Euler and Heun in sigma)."""
        sigmas = self.sampling_sigmas(timestep_respacing, steps, rho)
        return Nodes(alpha=[1.0] * (len(sigmas) + 1), sigma=sigmas + [0.0], times=sigmas, timesteps=sigmas,
                     coordinates="karras")

    def churn(self, nodes, s_churn, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
        """
        Algorithm 2's noise increase over `nodes` (a samplers.Churn), None when s_churn = 0:
        gamma_k = min(S_churn / N, sqrt(2) - 1) where S_tmin <= sigma_k <= S_tmax, sigma_hat_k = (1 + gamma_k) sigma_k,
        and x += sqrt(sigma_hat_k^2 - sigma_k^2) S_noise z before step k.
        """
        if s_churn < 0 or s_noise < 0:
            raise ValueError(f"s_churn={s_churn} and s_noise={s_noise} must be >= 0")
        if s_churn == 0:
            return None
        sigmas = nodes.sigma[:-1]
        gamma = min(s_churn / len(sigmas), math.sqrt(2) - 1)
        raised = [(1 + gamma) * s if s_tmin <= s <= s_tmax else s for s in sigmas]
        raised_nodes = Nodes(alpha=nodes.alpha, sigma=raised + [0.0], times=raised, timesteps=raised,
                             coordinates=nodes.coordinates)
        return samplers.Churn(raised_nodes, [math.sqrt(r**2 - s**2) * s_noise for r, s in zip(raised, sigmas)])

    def sample_loop(self, model, shape, sampler="heun", steps=18, rho=7.0, noise=None, s_churn=0.0, s_tmin=0.0,
                    s_tmax=math.inf, s_noise=1.0, *, timestep_respacing=None, clip_denoised=True, denoised_fn=None,
                    model_kwargs=None, device=None, progress=False, eta=None, generator=None, cond_fn=None,
                    guidance_scale=1.0, guidance_interval=None, null_label=None):
        """
        Samples by EDM's deterministic sampler (the default: Algorithm 1, Heun
        on the Karras rho = 7 nodes with an Euler last step, 2 steps - 1
        evaluations), its stochastic one (s_churn > 0: Algorithm 2, with
        "heun" or "euler") or any sampler of samplers.SAMPLERS.

        :param noise: standard normal [N x C x ...] latents: x at the first node is sigma_0 noise.
        :param timestep_respacing: the nodes (see sampling_sigmas); default
            karras with `steps` and `rho`.
        :param s_churn, s_tmin, s_tmax, s_noise: Algorithm 2's S_churn, S_tmin, S_tmax, S_noise.
        :param clip_denoised, ...: as samplers.sample_loop_progressive;
            guidance_interval is in sigma.
        :return: the [N x C x ...] samples.
        """
        return samplers.last_sample(self.sample_loop_progressive(
            model, shape, sampler=sampler, steps=steps, rho=rho, noise=noise, s_churn=s_churn, s_tmin=s_tmin,
            s_tmax=s_tmax, s_noise=s_noise, timestep_respacing=timestep_respacing, clip_denoised=clip_denoised,
            denoised_fn=denoised_fn, model_kwargs=model_kwargs, device=device, progress=progress, eta=eta,
            generator=generator, cond_fn=cond_fn, guidance_scale=guidance_scale,
            guidance_interval=guidance_interval, null_label=null_label,
        ))

    def sample_loop_progressive(self, model, shape, sampler="heun", steps=18, rho=7.0, noise=None, s_churn=0.0,
                                s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, *, timestep_respacing=None,
                                clip_denoised=True, denoised_fn=None, model_kwargs=None, device=None,
                                progress=False, eta=None, generator=None, cond_fn=None, guidance_scale=1.0,
                                guidance_interval=None, null_label=None):
        """Like sample_loop, but yield each step's {"sample", "pred_xstart"}, noisiest first."""
        nodes = self.sampling_nodes(timestep_respacing, steps, rho)
        yield from samplers.sample_loop_progressive(
            self, model, shape, sampler=sampler, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs, device=device, progress=progress, eta=eta, generator=generator,
            cond_fn=cond_fn, guidance_scale=guidance_scale, guidance_interval=guidance_interval,
            null_label=null_label, nodes=nodes, churn=self.churn(nodes, s_churn, s_tmin, s_tmax, s_noise),
        )
