"""
Flow matching (rectified flow: Liu et al. 2023, Lipman et al. 2023) as a noise
process (noise_process.py): the straight path

    x_t = (1 - t) x_0 + t eps   (alpha = 1 - t, sigma = t),

a network u(x_t, 1000 t) trained to predict the velocity eps - x_0 with the
loss mean_flat((u - (eps - x_0))^2), at times t from a logit-normal
distribution (Esser et al. 2024, section 3.1: t = sigmoid(m + s n)) or
uniform ones. Then x0_hat = x_t - t u and eps_hat = x_t + (1 - t) u. Its
default sampler is Euler in t with uniform steps (x' = x + (t' - t) u); every
sampler of samplers.py runs on it too (Euler, Heun and PLMS step in t, the
path's own "linear" coordinates).

What the network sees, and so what a classifier for cond_fn sees: x_t and
1000 t as its timesteps argument (call_model); cond_fn returns the gradient
of log p(y | x_t). guidance_interval is in t.
"""

import math
import statistics

import torch

from . import samplers
from .nn import mean_flat
from .noise_process import NoiseProcess, Nodes, as_levels, noise_for, noise_like, per_sample
from .respace import karras_sigmas, log_snr_sigmas, node_list, read_spacing_file, split_spacing

TIME_SAMPLINGS = ("logit_normal", "uniform")
# The node spacings of a flow: "uniform" and "trailing" are both uniform in t.
FLOW_SPACINGS = ("uniform", "trailing", "karras", "logsnr")
QUARTILES = (0.25, 0.5, 0.75)


class FlowDiffusion(NoiseProcess):
    """
    :param logit_mean, logit_std: t = sigmoid(logit_mean + logit_std n) in training.
    :param time_sampling: "logit_normal", or "uniform" (t ~ U(0, 1)).
    :param t_min: the least noisy node of the karras and logsnr spacings (and
        1 - t_min their noisiest; their lambda = log((1 - t) / t) is infinite at t = 1).
    :param timestep_respacing: the nodes the samplers walk when sample_loop
        is given none (see sampling_times; "": uniform with its `steps`).
    """

    output_name = "the flow's velocity"

    def __init__(self, logit_mean=0.0, logit_std=1.0, time_sampling="logit_normal", t_min=1e-3,
                 timestep_respacing=""):
        if logit_std <= 0:
            raise ValueError(f"logit_std={logit_std}: the spread of logit(t) in training, --logit_std, must be > 0")
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling must be one of {', '.join(TIME_SAMPLINGS)}, got {time_sampling!r}")
        if not 0 < t_min < 0.5:
            raise ValueError(f"t_min={t_min} must lie in (0, 0.5)")
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)
        self.time_sampling = time_sampling
        self.t_min = float(t_min)
        # The quartiles of the training times: of U(0, 1), or sigmoid of the normal's.
        self.quartile_bounds = QUARTILES if time_sampling == "uniform" else tuple(
            1 / (1 + math.exp(-(self.logit_mean + self.logit_std * statistics.NormalDist().inv_cdf(q))))
            for q in QUARTILES
        )
        self.timestep_respacing = timestep_respacing
        if timestep_respacing:
            self.sampling_times(timestep_respacing)

    def call_model(self, model, x, t, model_kwargs=None):
        """
        The network (or a classifier, or cond_fn) as the flow calls it: model(x_t, 1000 t, **model_kwargs).

        :param x: [N x C x ...] x_t; t: [N] times in [0, 1].
        """
        return model(x, 1000 * t, **(model_kwargs or {}))

    def pred_xstart_from_output(self, output, x, t):
        """x0_hat = x_t - t u, [N x C x ...], for the velocity u = output at times t ([N])."""
        return x - per_sample(t, x) * output

    def denoise(self, model, x, t, model_kwargs=None):
        """x0_hat = x_t - t u(x_t, 1000 t), [N x C x ...], for x [N x C x ...] and t a float or an [N] tensor."""
        t = as_levels(t, x, "times")
        return self.pred_xstart_from_output(self.model_output(model, x, t, model_kwargs), x, t)

    # ----------------------------------------------------------------- training

    def sample_t(self, batch_size, device, generator=None):
        """The training times, float32 [batch_size] from `generator`: logit-normal, or uniform in [0, 1)."""
        if self.time_sampling == "uniform":
            return torch.rand(batch_size, generator=generator, device=device)
        return torch.sigmoid(self.logit_mean + self.logit_std * noise_like((batch_size,), device, generator))

    sample_training_levels = sample_t  # the NoiseProcess interface's name

    def training_losses_at(self, model, x_start, levels, model_kwargs=None, generator=None):
        """training_losses at the [N] times t = `levels` (the NoiseProcess interface)."""
        return self.training_losses(model, x_start, model_kwargs, t=levels, generator=generator)

    def noise_level_quartile(self, t):
        """The quartile of the training distribution of t each [N] t lies in: int64 [N], 0 = least noise."""
        t = torch.as_tensor(t)
        quartile = torch.zeros(t.shape, dtype=torch.int64, device=t.device)
        for bound in self.quartile_bounds:
            quartile += (t > bound).long()
        return quartile

    def training_losses(self, model, x_start, model_kwargs=None, noise=None, t=None, generator=None):
        """
        The flow-matching loss for one batch: mean_flat((u(x_t, 1000 t) - (eps - x_0))^2).

        :param x_start: the [N x C x ...] data x_0.
        :param noise: optional standard normal eps; t: optional [N] times (or one
            float). What is not given is drawn from `generator`: t first, then eps.
        :return: dict of [N] tensors "loss" and "mse" (the same here).
        """
        if t is None:
            t = self.sample_t(x_start.shape[0], x_start.device, generator)
        t = as_levels(t, x_start, "times")
        noise = noise_for(x_start, noise, generator)
        x_t = (1 - per_sample(t, x_start)) * x_start + per_sample(t, x_start) * noise
        mse = mean_flat((self.model_output(model, x_t, t, model_kwargs) - (noise - x_start)) ** 2)
        return {"loss": mse, "mse": mse}

    # ----------------------------------------------------------------- sampling

    def sampling_times(self, timestep_respacing=None, steps=50):
        """
        The sampling nodes' times, noisiest first (then t = 0 ends the walk):
        "uniformN" or "trailingN" (t = 1 - k / N, the default with N = steps),
        "karrasN" (rho = 7 in sigma / alpha = t / (1 - t)) and "logsnrN"
        (uniform in lambda = log((1 - t) / t)) between t = 1 - t_min and t_min,
        or a .json list of times in (0, 1] (or such a list itself). None: the
        process's own timestep_respacing.

        :return: a list of N floats, decreasing.
        """
        if timestep_respacing is None:
            timestep_respacing = self.timestep_respacing
        if isinstance(timestep_respacing, (list, tuple)):
            return self._node_times(timestep_respacing, "the node list")
        name, count = split_spacing(timestep_respacing or f"uniform{steps}", FLOW_SPACINGS, "a flow")
        if name == "json":
            return self._node_times(read_spacing_file(count), f"node spacing file {count}")
        if name in ("uniform", "trailing"):
            return [1 - k / count for k in range(count)]
        ratio_max, ratio_min = (1 - self.t_min) / self.t_min, self.t_min / (1 - self.t_min)
        if name == "karras":
            ratios = karras_sigmas(ratio_max, ratio_min, count)
        else:
            ratios = log_snr_sigmas(ratio_max, ratio_min, count)
        return (ratios / (1 + ratios)).tolist()

    @staticmethod
    def _node_times(values, source):
        return node_list(values, source, lambda v: 0 < v <= 1,
                         "flow times t in (0, 1] (integer timesteps are for DDPM-family models, sigmas for EDM)")

    def sampling_nodes(self, timestep_respacing=None, steps=50):
        """The Nodes at sampling_times(...): alpha = 1 - t, sigma = t, "linear" coordinates (Euler and Heun in t)."""
        times = self.sampling_times(timestep_respacing, steps)
        return Nodes(alpha=[1 - t for t in times] + [1.0], sigma=times + [0.0], times=times, timesteps=times,
                     coordinates="linear")

    def sample_loop(self, model, shape, sampler="euler", steps=50, noise=None, *, timestep_respacing=None,
                    clip_denoised=True, denoised_fn=None, model_kwargs=None, device=None, progress=False, eta=None,
                    generator=None, cond_fn=None, guidance_scale=1.0, guidance_interval=None, null_label=None):
        """
        Samples by Euler in t over `steps` uniform steps (the default) or any
        sampler of samplers.SAMPLERS.

        :param noise: standard normal [N x C x ...] noise: x at the first node is t_0 noise.
        :param timestep_respacing: the nodes (see sampling_times); default uniform with `steps`.
        :param clip_denoised, ...: as samplers.sample_loop_progressive;
            guidance_interval is in t.
        :return: the [N x C x ...] samples.
        """
        return samplers.last_sample(self.sample_loop_progressive(
            model, shape, sampler=sampler, steps=steps, noise=noise, timestep_respacing=timestep_respacing,
            clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs, device=device,
            progress=progress, eta=eta, generator=generator, cond_fn=cond_fn, guidance_scale=guidance_scale,
            guidance_interval=guidance_interval, null_label=null_label,
        ))

    def sample_loop_progressive(self, model, shape, sampler="euler", steps=50, noise=None, *,
                                timestep_respacing=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                                device=None, progress=False, eta=None, generator=None, cond_fn=None,
                                guidance_scale=1.0, guidance_interval=None, null_label=None):
        """Like sample_loop, but yield each step's {"sample", "pred_xstart"}, noisiest first."""
        yield from samplers.sample_loop_progressive(
            self, model, shape, sampler=sampler, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs, device=device, progress=progress, eta=eta, generator=generator,
            cond_fn=cond_fn, guidance_scale=guidance_scale, guidance_interval=guidance_interval,
            null_label=null_label, nodes=self.sampling_nodes(timestep_respacing, steps),
        )
