"""
Gaussian diffusion: noise schedules, the forward process q, the learned reverse
process p, DDPM and DDIM samplers and the training losses. GaussianDiffusion is
the DDPM family's noise process (noise_process.py) at its integer timesteps:
every sampler of samplers.py walks it.

Equations cite Ho et al. 2020 ("DDPM"), Nichol & Dhariwal 2021 ("IDDPM") and
Song et al. 2020 ("DDIM").
"""

import enum
import math

import numpy as np
import torch
from . import samplers
from .losses import discretized_gaussian_log_likelihood, normal_kl
from .nn import mean_flat
from .noise_process import NoiseProcess, Nodes, condition_eps, ddim_update, noise_for, noise_like, process_xstart

BETA_SCHEDULES = ("linear", "cosine")


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """
    A fixed beta schedule by name; committed schedules never change.

    :return: a 1-D float64 numpy array of num_diffusion_timesteps betas.
    """
    if schedule_name == "linear":
        # DDPM's linear schedule, stretched so that any T keeps its endpoints' meaning.
        scale = 1000 / num_diffusion_timesteps
        if scale * 0.02 > 1:
            raise ValueError(
                f"the linear schedule needs at least 20 diffusion steps (its last beta is "
                f"20 / steps), got {num_diffusion_timesteps}; use more steps or the cosine schedule"
            )
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        # IDDPM eq. 17: alpha_bar(t) = cos²((t/T + s) / (1 + s) · π/2) with s = 0.008.
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ValueError(
        f"unknown beta schedule {schedule_name!r}; known schedules: {', '.join(BETA_SCHEDULES)}"
    )


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """
    Betas that discretize a cumulative product alpha_bar(t) over t in [0, 1].

    :param alpha_bar: a function of t in [0, 1] giving the product of (1 - beta) up to t.
    :param max_beta: the largest beta allowed, to avoid a singularity at t = 1.
    :return: a 1-D float64 numpy array.
    """
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        # IDDPM eq. 19: beta_t = min(1 - alpha_bar(t) / alpha_bar(t - 1), 0.999).
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


class ModelMeanType(enum.Enum):
    """What the model predicts."""

    PREVIOUS_X = enum.auto()  # the model predicts x_{t-1}
    START_X = enum.auto()  # the model predicts x_0
    EPSILON = enum.auto()  # the model predicts the noise
    VELOCITY = enum.auto()  # the model predicts v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022)


class ModelVarType(enum.Enum):
    """
    How the reverse-process variance is chosen. LEARNED_RANGE (IDDPM) makes the
    model output an interpolation weight between FIXED_SMALL and FIXED_LARGE.
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()  # raw MSE loss (and the variational bound when learning variances)
    RESCALED_MSE = enum.auto()  # MSE plus the variational bound scaled like RESCALED_KL
    KL = enum.auto()  # the variational lower bound
    RESCALED_KL = enum.auto()  # the variational bound times num_timesteps

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


_LEARNED_VARIANCES = (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)

# The float64 tables copied to each device that reads them.
_TABLE_NAMES = (
    "log_betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "alphas_cumprod_next",
    "one_minus_alphas_cumprod",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "recip_posterior_mean_coef1",
    "posterior_mean_coef2_over_coef1",
    "fixed_large_variance",
    "fixed_large_log_variance",
)


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    """
    The reference's helper, kept for notebooks that import it: a 1-D NumPy
    array read at [N] timesteps, as float32 broadcast to broadcast_shape. The
    diffusion itself reads its cached device tables instead.
    """
    values = torch.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    return values.view(-1, *([1] * (len(broadcast_shape) - 1))).expand(broadcast_shape)


def rescale_zero_terminal_snr(betas):
    """
    Betas whose sqrt(abar) is shifted and scaled so that abar at the last step
    is exactly 0 and at the first unchanged (Lin et al. 2023, Algorithm 1).

    :param betas: a 1-D array of betas; returns a new float64 array, the last beta 1.
    """
    sqrt_abar = np.sqrt(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = np.append(abar[0], abar[1:] / abar[:-1])
    return 1.0 - alphas


def _check_betas(betas):
    if betas.ndim != 1 or len(betas) == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not ((betas > 0).all() and (betas <= 1).all()):
        raise ValueError(
            f"betas must lie in (0, 1], got min {betas.min()} and max {betas.max()}; "
            "use get_named_beta_schedule or betas_for_alpha_bar"
        )


class GaussianDiffusion(NoiseProcess):
    """
    Utilities for training and sampling diffusion models; the DDPM family's
    noise process (alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t)) at its
    integer timesteps.

    :param betas: a 1-D array of betas in (0, 1], one per timestep from T = 0 upward.
    :param model_mean_type: a ModelMeanType, what the model outputs.
    :param model_var_type: a ModelVarType, how the variance is obtained.
    :param loss_type: a LossType.
    :param rescale_timesteps: pass the model timesteps scaled to [0, 1000) as
        floats, as the original DDPM code did.
    :param snr_gamma: > 0 weights the mse term by min-SNR-gamma (Hang et al.
        2023; see _snr_weights); 0 leaves it unweighted.
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type, rescale_timesteps=False,
                 snr_gamma=0.0):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps
        if snr_gamma < 0 or (snr_gamma > 0 and loss_type.is_vb()):
            raise ValueError(
                f"snr_gamma={snr_gamma}: min-SNR weighting takes a gamma > 0 and weights the mse term, "
                "which a KL loss (--use_kl True) does not have; drop --snr_gamma or --use_kl"
            )
        self.snr_gamma = snr_gamma

        betas = np.array(betas, dtype=np.float64)
        _check_betas(betas)
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        self._compute_tables(betas)
        self._device_tables = {}
        self._nodes = None

    def _compute_tables(self, betas):
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        with np.errstate(divide="ignore"):  # infinite where abar = 0 (zero terminal SNR); never read there
            self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
            self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # DDPM eq. 7: q(x_{t-1} | x_t, x_0) has variance beta_t (1 - abar_{t-1}) / (1 - abar_t).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The variance is 0 at t = 0, so its log starts from the next entry.
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        self.log_betas = np.log(betas)
        self.recip_posterior_mean_coef1 = 1.0 / self.posterior_mean_coef1
        self.posterior_mean_coef2_over_coef1 = self.posterior_mean_coef2 / self.posterior_mean_coef1
        self.fixed_large_variance = np.append(first, betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)

    # ----------------------------------------------------------------- tables

    def _tables(self, device):
        """The float64 tables as tensors on `device`, copied once per device."""
        key = str(device)
        if key not in self._device_tables:
            dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
            self._device_tables[key] = {
                name: torch.from_numpy(getattr(self, name)).to(device=device, dtype=dtype)
                for name in _TABLE_NAMES
            }
        return self._device_tables[key]

    def _extract(self, name, t, broadcast_shape):
        """
        Read table `name` at timesteps t: gathered in float64, cast to float32
        and shaped [N x 1 x ...] to broadcast against broadcast_shape, so that
        arithmetic on the coefficients stays per-sample.
        """
        values = self._tables(t.device)[name][t].float()
        return values.view(-1, *([1] * (len(broadcast_shape) - 1)))

    def _check_timesteps(self, t, batch_size):
        """Clear errors for bad timestep tensors; range checks only where they cost no sync."""
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError("timesteps t must be an integer tensor of shape [N]")
        if t.shape != (batch_size,):
            raise ValueError(f"timesteps t must have shape [{batch_size}], got {list(t.shape)}")
        if t.device.type == "cpu" and t.numel() and (t.min() < 0 or t.max() >= self.num_timesteps):
            raise ValueError(
                f"timesteps must lie in [0, {self.num_timesteps - 1}] for this "
                f"{self.num_timesteps}-step process, got values from {int(t.min())} to {int(t.max())}"
            )

    def _scale_timesteps(self, t):
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    # --------------------------------------------------------- forward process

    def q_mean_variance(self, x_start, t):
        """
        The distribution q(x_t | x_0) (DDPM eq. 4).

        :param x_start: the [N x C x ...] noiseless inputs.
        :param t: [N] timestep indices (0 means one step of noise).
        :return: (mean, variance, log_variance), each of x_start's shape.
        """
        self._check_timesteps(t, x_start.shape[0])
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start.shape).expand(x_start.shape)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.shape).expand(x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None, generator=None):
        """
        Draw x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (DDPM eq. 4).

        :param noise: optional [N x C x ...] standard normal noise to use.
        :param generator: a torch.Generator (or one per sample) for the noise.
        """
        self._check_timesteps(t, x_start.shape[0])
        noise = noise_for(x_start, noise, generator)
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """
        The posterior q(x_{t-1} | x_t, x_0) (DDPM eqs. 6–7).

        :return: (mean, variance, log_variance_clipped), each of x_t's shape.
        """
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {list(x_start.shape)} != x_t shape {list(x_t.shape)}")
        self._check_timesteps(t, x_t.shape[0])
        return self._q_posterior(x_start, x_t, t)

    def _q_posterior(self, x_start, x_t, t):
        mean = (
            self._extract("posterior_mean_coef1", t, x_t.shape) * x_start
            + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t.shape).expand(x_t.shape)
        log_variance_clipped = self._extract("posterior_log_variance_clipped", t, x_t.shape).expand(x_t.shape)
        return mean, variance, log_variance_clipped

    # --------------------------------------------------------- reverse process

    def call_model(self, model, x, t, model_kwargs=None):
        """
        The model (or a classifier, or cond_fn) called as this process calls it:
        model(x, timesteps, **model_kwargs) with the timesteps it was trained
        on (t itself, or scaled to [0, 1000) when rescale_timesteps).

        :param x: the [N x C x ...] x_t; t: [N] timestep indices of this process.
        """
        return model(x, self._scale_timesteps(t), **(model_kwargs or {}))

    def _check_model_output(self, model_output, x):
        """Raise a clear error when the model's channel count does not fit the variance type."""
        channels = x.shape[1]
        learned = self.model_var_type in _LEARNED_VARIANCES
        expected = 2 * channels if learned else channels
        got = model_output.shape[1] if model_output.ndim > 1 else None
        if model_output.shape[0] == x.shape[0] and got == expected and model_output.shape[2:] == x.shape[2:]:
            return
        hint = (
            "the model may have been built without learn_sigma (set --learn_sigma True)"
            if learned and got == channels
            else "the model may have been built with learn_sigma (set --learn_sigma True)"
            if not learned and got == 2 * channels
            else "check the model's out_channels"
        )
        raise ValueError(
            f"the model returned shape {list(model_output.shape)} for input {list(x.shape)}; "
            f"{self.model_var_type.name} variance needs {expected} output channels: {hint}"
        )

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """
        Apply the model to get p(x_{t-1} | x_t) and a prediction of x_0.

        :param model: called as model(x, timesteps, **model_kwargs).
        :param x: the [N x C x ...] tensor x_t.
        :param t: [N] timestep indices.
        :param clip_denoised: clamp pred_xstart to [-1, 1].
        :param denoised_fn: applied to pred_xstart before clamping.
        :return: dict with "mean", "variance", "log_variance" and "pred_xstart".
        """
        self._check_timesteps(t, x.shape[0])
        model_output = self.call_model(model, x, t, model_kwargs)
        return self._p_mean_variance_from_output(model_output, x, t, clip_denoised, denoised_fn)

    def _p_mean_variance_from_output(self, model_output, x, t, clip_denoised=True, denoised_fn=None):
        """p_mean_variance given the model's [N x C(or 2C) x ...] output."""
        mean_output, var_values = self._split_output(model_output, x)
        if var_values is not None:
            log_variance = self._learned_log_variance(var_values, t, x.shape)
            variance = torch.exp(log_variance)
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            variance = self._extract("fixed_large_variance", t, x.shape).expand(x.shape)
            log_variance = self._extract("fixed_large_log_variance", t, x.shape).expand(x.shape)
        else:
            variance = self._extract("posterior_variance", t, x.shape).expand(x.shape)
            log_variance = self._extract("posterior_log_variance_clipped", t, x.shape).expand(x.shape)
        pred_xstart = self._pred_xstart(mean_output, x, t, clip_denoised, denoised_fn)
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            mean = mean_output
        else:
            mean, _, _ = self._q_posterior(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def _split_output(self, model_output, x):
        """(mean part [N x C x ...], variance part or None) of a checked model output."""
        self._check_model_output(model_output, x)
        if self.model_var_type in _LEARNED_VARIANCES:
            return torch.split(model_output, x.shape[1], dim=1)
        return model_output, None

    def _pred_xstart(self, mean_output, x, t, clip_denoised, denoised_fn):
        """x_0 predicted from the mean part of the model output, then denoised_fn and clipping."""
        return process_xstart(self.pred_xstart_from_output(mean_output, x, t), clip_denoised, denoised_fn)

    def pred_xstart_from_output(self, output, x, t):
        """
        x_0 from the mean part of the model's output ([N x C x ...], any
        ModelMeanType) at x = x_t and [N] timesteps t, before denoised_fn and clipping.
        """
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            return self._predict_xstart_from_xprev(x, t, output)
        if self.model_mean_type == ModelMeanType.START_X:
            return output
        if self.model_mean_type == ModelMeanType.VELOCITY:
            # Salimans & Ho 2022, eq. (v): x_0 = sqrt(abar) x_t - sqrt(1 - abar) v.
            return (
                self._extract("sqrt_alphas_cumprod", t, x.shape) * x
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x.shape) * output
            )
        return self._predict_xstart_from_eps(x, t, output)

    @property
    def predicts_eps(self):
        """Whether the model's mean channels are eps_hat itself."""
        return self.model_mean_type == ModelMeanType.EPSILON

    def model_output(self, model, x, t, model_kwargs=None):
        """The mean channels of the model's output at [N] timesteps t, [N x C x ...] (learned variances dropped)."""
        mean_output, _ = self._split_output(self.call_model(model, x, t, model_kwargs), x)
        return mean_output

    def _model_pred_xstart(self, model, x, t, clip_denoised, denoised_fn, model_kwargs):
        """Call the model and predict x_0 only (DDIM needs neither the mean nor the variance)."""
        self._check_timesteps(t, x.shape[0])
        return self._pred_xstart(self.model_output(model, x, t, model_kwargs), x, t, clip_denoised, denoised_fn)

    def _learned_log_variance(self, var_values, t, shape):
        if self.model_var_type == ModelVarType.LEARNED:
            return var_values
        # IDDPM eq. 15: interpolate between log beta_t and log beta~_t in log space.
        min_log = self._extract("posterior_log_variance_clipped", t, shape)
        max_log = self._extract("log_betas", t, shape)
        frac = (var_values + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def _predict_xstart_from_eps(self, x_t, t, eps):
        # DDPM eq. 4 solved for x_0: x_0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps.
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        # DDPM eq. 7 solved for x_0: x_0 = (mu - coef2 x_t) / coef1.
        return (
            self._extract("recip_posterior_mean_coef1", t, x_t.shape) * xprev
            - self._extract("posterior_mean_coef2_over_coef1", t, x_t.shape) * x_t
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        # DDPM eq. 4 solved for eps: the reference's form, or one that stays finite
        # where abar = 0 (a zero-terminal-SNR schedule).
        if self.alphas_cumprod[-1] == 0:
            return (
                x_t - self._extract("sqrt_alphas_cumprod", t, x_t.shape) * pred_xstart
            ) / self._extract("sqrt_one_minus_alphas_cumprod", t, x_t.shape)
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart
        ) / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape)

    # ---------------------------------------------------------------- samplers

    def p_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, generator=None, cond_fn=None
    ):
        """
        Draw x_{t-1} from the model (DDPM algorithm 2, one step), shifting the
        mean by cond_fn's gradient when given (condition_mean).

        :return: dict with "sample" ([N x C x ...]) and "pred_xstart".
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs)
        noise = noise_like(x.shape, x.device, generator, x.dtype)
        sample = out["mean"] + self._nonzero_mask(t, x) * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """
        Classifier guidance on the mean (Dhariwal & Nichol 2021, Algorithm 1):
        mean + variance * grad log p(y | x_t), with cond_fn(x, t, **model_kwargs)
        given the timesteps the model sees.

        :return: the [N x C x ...] shifted mean.
        """
        gradient = self.call_model(cond_fn, x, t, model_kwargs)
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """
        Classifier guidance on the score (Dhariwal & Nichol 2021, Algorithm 2):
        eps' = eps - sqrt(1 - abar_t) grad log p(y | x_t), with pred_xstart and
        mean recomputed from eps'.

        :return: a copy of p_mean_var with the new "pred_xstart" and "mean".
        """
        out = dict(p_mean_var)
        out["pred_xstart"] = self._condition_xstart(cond_fn, p_mean_var["pred_xstart"], x, t, model_kwargs)
        out["mean"], _, _ = self._q_posterior(out["pred_xstart"], x, t)
        return out

    def _condition_xstart(self, cond_fn, pred_xstart, x, t, model_kwargs):
        eps = self._predict_eps_from_xstart(x, t, pred_xstart)
        sigma = self._extract("sqrt_one_minus_alphas_cumprod", t, x.shape)
        eps = condition_eps(eps, sigma, self.call_model(cond_fn, x, t, model_kwargs))
        return self._predict_xstart_from_eps(x, t, eps)

    @staticmethod
    def _nonzero_mask(t, x):
        """1 where t != 0, else 0 (no noise is added at the last step), shaped [N x 1 x ...]."""
        return (t != 0).float().view(-1, *([1] * (x.ndim - 1)))

    def ddim_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0, generator=None,
        cond_fn=None,
    ):
        """
        Draw x_{t-1} with DDIM (DDIM eq. 12); eta = 0 is deterministic, eta = 1
        has DDPM's posterior variance. cond_fn guides the score (condition_score).

        :return: dict with "sample" and "pred_xstart".
        """
        pred_xstart = self._model_pred_xstart(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if cond_fn is not None:
            pred_xstart = self._condition_xstart(cond_fn, pred_xstart, x, t, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, pred_xstart)
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x.shape)
        # DDIM eq. 16: sigma_t(eta), in abar (the reference's float32 arithmetic).
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        noise = None
        if not (isinstance(eta, (int, float)) and eta == 0):
            noise = self._nonzero_mask(t, x) * noise_like(x.shape, x.device, generator, x.dtype)
        sample = ddim_update(pred_xstart, eps, torch.sqrt(alpha_bar_prev), 1 - alpha_bar_prev, sigma, noise)
        return {"sample": sample, "pred_xstart": pred_xstart}

    def ddim_reverse_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0
    ):
        """
        Step x_t to x_{t+1} along the deterministic DDIM path (DDIM eq. 12 run
        forward, the ODE of section 4.3).

        :return: dict with "sample" (x_{t+1}) and "pred_xstart".
        """
        if eta != 0.0:
            raise ValueError(f"the reverse DDIM path is deterministic and needs eta=0.0, got eta={eta}")
        pred_xstart = self._model_pred_xstart(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, pred_xstart)
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x.shape)
        sample = pred_xstart * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": sample, "pred_xstart": pred_xstart}

    # ------------------------------------------------- the noise-process interface

    def base_timesteps(self):
        """The base-process timestep of each of this process's timesteps, ascending (0 ... T-1 here)."""
        return list(range(self.num_timesteps))

    def sampling_nodes(self):
        """
        The walk over every timestep of this process, T-1 first (noise_process.Nodes,
        made once): alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t), "karras"
        coordinates, the timesteps the indices T-1 ... 0 and the times the base
        timesteps; x_T is N(0, I), as the reference draws it.
        """
        if self._nodes is None:
            abar = np.append(self.alphas_cumprod[::-1], 1.0)
            with np.errstate(divide="ignore"):
                lam = 0.5 * (np.log(abar) - np.log1p(-abar))
            self._nodes = Nodes(
                alpha=np.sqrt(abar), sigma=np.sqrt(1.0 - abar), lam=lam, times=self.base_timesteps()[::-1],
                timesteps=list(range(self.num_timesteps - 1, -1, -1)), coordinates="karras", prior_std=1.0,
            )
        return self._nodes

    def ancestral_step(self, denoiser, x, nodes, k, t, generator=None):
        """The ancestral step at timesteps t: p_sample, with learned variances and cond_fn on the mean."""
        return self.p_sample(denoiser.model_at(nodes.times[k]), x, t, clip_denoised=denoiser.clip_denoised,
                             denoised_fn=denoiser.denoised_fn_at(nodes, k), model_kwargs=denoiser.model_kwargs,
                             generator=generator, cond_fn=denoiser.cond_fn)

    def ddim_step(self, denoiser, x, nodes, k, t, eta=0.0, generator=None):
        """The DDIM step at timesteps t: ddim_sample, the reference's arithmetic."""
        return self.ddim_sample(denoiser.model_at(nodes.times[k]), x, t, clip_denoised=denoiser.clip_denoised,
                                denoised_fn=denoiser.denoised_fn_at(nodes, k), model_kwargs=denoiser.model_kwargs, eta=eta,
                                generator=generator, cond_fn=denoiser.cond_fn)

    def sample_loop(self, model, shape, sampler="ddim", noise=None, clip_denoised=True, denoised_fn=None,
                    model_kwargs=None, device=None, progress=False, eta=None, generator=None, cond_fn=None,
                    guidance_scale=1.0, guidance_interval=None, null_label=None):
        """
        Generate samples with a sampler of samplers.SAMPLERS ("ddpm", "ddim",
        "plms", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc")
        over this process's timesteps; arguments as samplers.sample_loop_progressive.

        :return: the final [N x C x ...] samples.
        """
        return samplers.last_sample(self.sample_loop_progressive(
            model, shape, sampler=sampler, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs, device=device, progress=progress, eta=eta, generator=generator,
            cond_fn=cond_fn, guidance_scale=guidance_scale, guidance_interval=guidance_interval,
            null_label=null_label,
        ))

    def sample_loop_progressive(self, model, shape, sampler="ddim", noise=None, clip_denoised=True,
                                denoised_fn=None, model_kwargs=None, device=None, progress=False, eta=None,
                                generator=None, cond_fn=None, guidance_scale=1.0, guidance_interval=None,
                                null_label=None):
        """Like sample_loop, but yield each step's {"sample", "pred_xstart"}, noisiest first."""
        yield from samplers.sample_loop_progressive(
            self, model, shape, sampler=sampler, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs, device=device, progress=progress, eta=eta, generator=generator,
            cond_fn=cond_fn, guidance_scale=guidance_scale, guidance_interval=guidance_interval,
            null_label=null_label,
        )

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                      model_kwargs=None, device=None, progress=False, generator=None, cond_fn=None):
        """
        Generate samples with ancestral sampling from x_T ~ N(0, I).

        :param shape: the [N x C x ...] shape of the samples.
        :param noise: optional x_T of that shape.
        :param generator: a torch.Generator (or one per sample) for all noise drawn.
        :return: the final [N x C x ...] samples.
        """
        return self.sample_loop(model, shape, sampler="ddpm", noise=noise, clip_denoised=clip_denoised,
                                denoised_fn=denoised_fn, model_kwargs=model_kwargs, device=device,
                                progress=progress, generator=generator, cond_fn=cond_fn)

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                  model_kwargs=None, device=None, progress=False, generator=None, cond_fn=None):
        """Like p_sample_loop, but yield each step's p_sample dict, from t = T-1 down to 0."""
        yield from self.sample_loop_progressive(model, shape, sampler="ddpm", noise=noise,
                                                clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                                model_kwargs=model_kwargs, device=device, progress=progress,
                                                generator=generator, cond_fn=cond_fn)

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                         model_kwargs=None, device=None, progress=False, eta=0.0, generator=None, cond_fn=None):
        """Generate samples with DDIM; arguments as p_sample_loop, plus eta."""
        return self.sample_loop(model, shape, sampler="ddim", noise=noise, clip_denoised=clip_denoised,
                                denoised_fn=denoised_fn, model_kwargs=model_kwargs, device=device,
                                progress=progress, eta=eta, generator=generator, cond_fn=cond_fn)

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                     model_kwargs=None, device=None, progress=False, eta=0.0, generator=None,
                                     cond_fn=None):
        """Like ddim_sample_loop, but yield each step's ddim_sample dict, from t = T-1 down to 0."""
        yield from self.sample_loop_progressive(model, shape, sampler="ddim", noise=noise,
                                                clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                                model_kwargs=model_kwargs, device=device, progress=progress,
                                                eta=eta, generator=generator, cond_fn=cond_fn)

    def ddim_reverse_sample_loop(self, model, x, clip_denoised=True, denoised_fn=None,
                                 model_kwargs=None, progress=False, eta=0.0):
        """
        Encode images to x_T along the deterministic DDIM path (DDIM section 4.3);
        ddim_sample_loop with noise=x_T decodes them back.

        :param x: the [N x C x ...] images x_0.
        :return: the [N x C x ...] latents x_T.
        """
        return samplers.last_sample(self.ddim_reverse_sample_loop_progressive(
            model, x, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs,
            progress=progress, eta=eta,
        ))

    def ddim_reverse_sample_loop_progressive(self, model, x, clip_denoised=True, denoised_fn=None,
                                             model_kwargs=None, progress=False, eta=0.0):
        """Like ddim_reverse_sample_loop, but yield each step's dict, from t = 0 up to T-1."""
        if eta != 0.0:
            raise ValueError(f"the reverse DDIM path is deterministic and needs eta=0.0, got eta={eta}")
        order = torch.arange(self.num_timesteps, device=x.device)

        def step(x, k):
            t = order[k].expand(x.shape[0])
            return self.ddim_reverse_sample(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                            model_kwargs=model_kwargs)

        yield from samplers.walk(step, x, self.num_timesteps, progress)

    # ------------------------------------------------------------------ losses

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """The reference's form of _vb_terms_from_output: calls the model itself."""
        model_output = self.call_model(model, x_t, t, model_kwargs)
        return self._vb_terms_from_output(model_output, x_start, x_t, t, clip_denoised)

    def _vb_terms_from_output(self, model_output, x_start, x_t, t, clip_denoised=True):
        """
        One term of the variational bound, in bits: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
        for t > 0 and the discretized decoder NLL at t = 0 (DDPM eq. 5).

        :return: dict with "output" ([N]) and "pred_xstart".
        """
        true_mean, _, true_log_variance = self._q_posterior(x_start, x_t, t)
        out = self._p_mean_variance_from_output(model_output, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses_at(self, model, x_start, levels, model_kwargs=None, generator=None):
        """training_losses at the [N] timesteps `levels` (the NoiseProcess interface)."""
        return self.training_losses(model, x_start, levels, model_kwargs=model_kwargs, generator=generator)

    def noise_level_quartile(self, levels):
        """The quarter of the T timesteps each of the [N] timesteps lies in: floor(4 t / T), int64 [N]."""
        return torch.div(4 * levels, self.num_timesteps, rounding_mode="floor").long()

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None, generator=None):
        """
        Training losses for one batch (DDPM eq. 14, IDDPM eq. 16).

        :param x_start: the [N x C x ...] data.
        :param t: [N] timestep indices.
        :param noise: optional noise for q_sample.
        :return: dict of [N] tensors: "loss", plus "mse" and "vb" where they apply.
        """
        self._check_timesteps(t, x_start.shape[0])
        if noise is None:
            noise = noise_like(x_start.shape, x_start.device, generator, x_start.dtype)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = self.call_model(model, x_t, t, model_kwargs)
        if self.loss_type.is_vb():
            loss = self._vb_terms_from_output(model_output, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                loss = loss * self.num_timesteps
            return {"loss": loss}
        return self._mse_losses(model_output, x_start, x_t, t, noise)

    def _mse_losses(self, model_output, x_start, x_t, t, noise):
        terms = {}
        model_output, var_values = self._split_output(model_output, x_t)
        if var_values is not None:
            # The bound trains only the variance: the mean output is detached (IDDPM section 3.1).
            frozen_out = torch.cat([model_output.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_from_output(frozen_out, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        target = {
            ModelMeanType.PREVIOUS_X: lambda: self._q_posterior(x_start, x_t, t)[0],
            ModelMeanType.START_X: lambda: x_start,
            ModelMeanType.EPSILON: lambda: noise,
            ModelMeanType.VELOCITY: lambda: (
                self._extract("sqrt_alphas_cumprod", t, x_t.shape) * noise
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x_t.shape) * x_start
            ),
        }[self.model_mean_type]()
        terms["mse"] = mean_flat((target - model_output) ** 2)
        if self.snr_gamma > 0:
            terms["mse"] = terms["mse"] * self._snr_weights(t)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _snr_weights(self, t):
        """
        Min-SNR-gamma loss weights, [N] (Hang et al. 2023, eq. 7 and its
        parameterizations): with SNR_t = abar / (1 - abar), min(SNR, gamma) / SNR
        for eps (written min(1, gamma / SNR), finite at SNR = 0), min(SNR, gamma)
        for x_0 and min(SNR, gamma) / (SNR + 1) for v.
        """
        abar = self._tables(t.device)["alphas_cumprod"][t]
        snr = abar / (1 - abar)
        clipped = snr.clamp(max=self.snr_gamma)
        if self.model_mean_type == ModelMeanType.EPSILON:
            weights = (self.snr_gamma / snr).clamp(max=1.0)
        elif self.model_mean_type == ModelMeanType.START_X:
            weights = clipped
        elif self.model_mean_type == ModelMeanType.VELOCITY:
            weights = clipped / (snr + 1)
        else:
            raise ValueError("min-SNR weighting is defined for eps, x_0 and v prediction, not PREVIOUS_X")
        return weights.float()

    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension, [N]."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(qt_mean, qt_log_variance, 0.0, 0.0)) / math.log(2.0)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None, generator=None):
        """
        The whole variational bound in bits per dimension, with its per-timestep terms.

        :param x_start: the [N x C x ...] data.
        :return: dict with "total_bpd" and "prior_bpd" ([N]) and "vb", "xstart_mse"
            and "mse" ([N x T], column t for timestep t).
        """
        terms = {"vb": [], "xstart_mse": [], "mse": []}
        n = x_start.shape[0]
        for step in reversed(range(self.num_timesteps)):
            t = torch.full((n,), step, device=x_start.device, dtype=torch.long)
            noise = noise_like(x_start.shape, x_start.device, generator, x_start.dtype)
            x_t = self.q_sample(x_start, t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised, model_kwargs)
            terms["vb"].append(out["output"])
            terms["xstart_mse"].append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            terms["mse"].append(mean_flat((eps - noise) ** 2))
        result = {name: torch.stack(values[::-1], dim=1) for name, values in terms.items()}
        result["prior_bpd"] = self._prior_bpd(x_start)
        result["total_bpd"] = result["vb"].sum(dim=1) + result["prior_bpd"]
        return result
