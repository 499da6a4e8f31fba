"""
An exact diffusion model: for data from a Gaussian mixture the optimal
denoiser is known in closed form, so samplers can be measured against the
true probability-flow solution and the true data distribution without
training anything, on any Gaussian path (noise_process.py).

Data x_0 ~ sum_k w_k N(mu_k, s_k^2 I) in D dimensions. Under
x = alpha x_0 + sigma eps, x ~ sum_k w_k N(alpha mu_k, v_k I) with
v_k = alpha^2 s_k^2 + sigma^2, and with the posterior weights r_k(x) of the
components,

    E[x_0 | x] = sum_k r_k (mu_k + alpha s_k^2 (x - alpha mu_k) / v_k),
    E[eps | x] = (x - alpha E[x_0 | x]) / sigma.

The DDPM family has alpha = sqrt(abar), sigma = sqrt(1 - abar); EDM alpha = 1;
flow matching alpha = 1 - t, sigma = t. Each process's exact model returns
what that process's network is trained to output, written here from the
papers' formulas (not from the processes' own code, which the tests check).
"""

import math

import torch

from .respace import interpolate_alphas_cumprod


class GaussianMixture:
    """
    :param weights: [K] mixture weights (normalized here).
    :param means: [K x D] component means.
    :param stds: [K] isotropic component standard deviations.
    """

    def __init__(self, weights, means, stds):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = self.weights / self.weights.sum()
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        self.dim = self.means.shape[1]

    def sample(self, n, generator=None):
        """n draws of x_0, float64 [n x D]."""
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[component] + self.stds[component, None] * noise

    def moments(self):
        """The exact mean [D] and covariance [D x D] of x_0."""
        mean = self.weights @ self.means
        second = torch.einsum("k,ki,kj->ij", self.weights, self.means, self.means)
        second = second + (self.weights @ self.stds**2) * torch.eye(self.dim, dtype=torch.float64)
        return mean, second - torch.outer(mean, mean)

    def path_posterior_weights(self, x, alpha, sigma):
        """r_k(x), [N x K], for x [N x D] = alpha x_0 + sigma eps, alpha and sigma floats or [N x 1]."""
        x = x.double()
        alpha, sigma = _column(alpha, x), _column(sigma, x)
        variances = alpha**2 * self.stds**2 + sigma**2
        centered = x[:, None, :] - alpha[:, :, None] * self.means
        log_r = (
            torch.log(self.weights)
            - 0.5 * self.dim * torch.log(variances)
            - 0.5 * (centered**2).sum(-1) / variances
        )
        return torch.softmax(log_r, dim=-1)

    def denoise(self, x, alpha, sigma):
        """E[x_0 | x], float64 [N x D], for x [N x D] = alpha x_0 + sigma eps (alpha, sigma floats or [N x 1])."""
        x = x.double()
        alpha, sigma = _column(alpha, x), _column(sigma, x)
        variances = alpha**2 * self.stds**2 + sigma**2
        r = self.path_posterior_weights(x, alpha, sigma)
        gain = (alpha * self.stds**2 / variances)[:, :, None]
        per_component = self.means + gain * (x[:, None, :] - alpha[:, :, None] * self.means)
        return (r[:, :, None] * per_component).sum(1)

    def posterior_weights(self, x_t, abar):
        """r_k(x_t), [N x K], for x_t [N x D] at abar [N x 1] of the DDPM family."""
        abar = torch.as_tensor(abar, dtype=torch.float64)
        return self.path_posterior_weights(x_t, abar.sqrt(), (1 - abar).sqrt())

    def pred_xstart(self, x_t, abar):
        """E[x_0 | x_t], float64 [N x D], for x_t [N x D] and abar a float or [N x 1] (DDPM family)."""
        abar = torch.as_tensor(abar, dtype=torch.float64)
        return self.denoise(x_t, abar.sqrt(), (1 - abar).sqrt())

    def eps(self, x_t, abar):
        """E[eps | x_t], float64 [N x D] (DDPM family)."""
        abar = torch.as_tensor(abar, dtype=torch.float64).expand(x_t.shape[0], 1)
        return (x_t.double() - abar.sqrt() * self.pred_xstart(x_t, abar)) / (1 - abar).sqrt()

    def model(self, alphas_cumprod, mean_type="EPSILON", learned_sigma=False, timestep_scale=1.0,
              fractional_timesteps=False):
        """
        A model(x, timesteps) for a DDPM-family diffusion whose model sees these timesteps.

        :param alphas_cumprod: abar per timestep the model receives (a base
            process's table; timesteps are divided by timestep_scale first).
        :param mean_type: "EPSILON", "START_X" or "VELOCITY" (v = alpha eps - sigma x_0).
        :param learned_sigma: append D zero channels (the middle of a learned range).
        :param fractional_timesteps: read abar at fractional timesteps, linear in
            log abar between the table's entries (continuous_timesteps); else at
            the nearest integer timestep.
        """
        return _MixtureModel(self, torch.as_tensor(alphas_cumprod, dtype=torch.float64), mean_type,
                             learned_sigma, timestep_scale, fractional_timesteps)

    def edm_model(self, sigma_data=0.5):
        """
        The network F of an EDM process (Karras et al. 2022, Table 1), called
        as F(c_in x, c_noise): with sigma = exp(4 c_noise), the F whose
        D = c_skip x + c_out F is E[x_0 | x] for x = x_0 + sigma n.
        """
        return _MixtureEDMModel(self, sigma_data)

    def flow_model(self):
        """
        The velocity network of a flow-matching process, called as u(x_t, 1000 t):
        E[eps - x_0 | x_t] for x_t = (1 - t) x_0 + t eps, which is (x_t - E[x_0 | x_t]) / t.
        """
        return _MixtureFlowModel(self)

    def path_ode_solution(self, x, path, start, end, steps=2000):
        """
        x at path time `end` on the probability-flow ODE from x at `start`, by
        RK4 with `steps` uniform steps in the path's time s, where
        dx/ds = alpha'(s) E[x_0 | x] + sigma'(s) E[eps | x].

        :param path: s -> (alpha, sigma, dalpha/ds, dsigma/ds), Python floats.
        """
        h = (end - start) / steps
        x = x.double()
        for i in range(steps):
            s = start + i * h
            k1 = self._path_slope(x, path, s)
            k2 = self._path_slope(x + 0.5 * h * k1, path, s + 0.5 * h)
            k3 = self._path_slope(x + 0.5 * h * k2, path, s + 0.5 * h)
            k4 = self._path_slope(x + h * k3, path, s + h)
            x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        return x

    def _path_slope(self, x, path, s):
        alpha, sigma, dalpha, dsigma = path(s)
        pred_xstart = self.denoise(x, alpha, sigma)
        return dalpha * pred_xstart + dsigma * (x - alpha * pred_xstart) / sigma

    def ode_solution(self, x_T, abar_start, abar_end, steps=2000):
        """
        x at abar_end on the probability-flow ODE of the DDPM family from x_T at
        abar_start: path_ode_solution in lambda = log(alpha / sigma), where
        alpha = sigmoid(2 lambda)^(1/2), sigma = sigmoid(-2 lambda)^(1/2).
        """
        return self.path_ode_solution(x_T, _vp_path, _half_log_snr(abar_start), _half_log_snr(abar_end), steps)

    def edm_ode_solution(self, x, sigma_start, sigma_end, steps=2000):
        """x at sigma_end on EDM's probability-flow ODE (alpha = 1) from x at sigma_start, RK4 in log sigma."""
        return self.path_ode_solution(x, _edm_path, math.log(sigma_start), math.log(sigma_end), steps)

    def flow_ode_solution(self, x, t_start, t_end, steps=2000):
        """
        x at t_end on the flow's probability-flow ODE (alpha = 1 - t, sigma = t)
        from x at t_start, RK4 in log t (where dx / dlog t = x - E[x_0 | x]: smooth
        down to small t, and finite at t = 1).
        """
        return self.path_ode_solution(x, _flow_path, math.log(t_start), math.log(t_end), steps)


def _column(value, x):
    """A float or [N x 1] value as a float64 [N x 1] tensor for x [N x D]."""
    return torch.as_tensor(value, dtype=torch.float64).expand(x.shape[0], 1)


def _half_log_snr(abar):
    return 0.5 * (math.log(abar) - math.log1p(-abar))


def _vp_path(lam):
    """(alpha, sigma, dalpha/dlambda, dsigma/dlambda) of the DDPM family at lambda."""
    alpha, sigma = 1 / math.sqrt(1 + math.exp(-2 * lam)), 1 / math.sqrt(1 + math.exp(2 * lam))
    return alpha, sigma, alpha * sigma**2, -sigma * alpha**2


def _edm_path(log_sigma):
    """(alpha, sigma, dalpha/ds, dsigma/ds) of EDM at s = log sigma."""
    sigma = math.exp(log_sigma)
    return 1.0, sigma, 0.0, sigma


def _flow_path(log_t):
    """(alpha, sigma, dalpha/ds, dsigma/ds) of the flow at s = log t."""
    t = math.exp(log_t)
    return 1 - t, t, -t, t


class _MixtureModel:
    def __init__(self, mixture, alphas_cumprod, mean_type, learned_sigma, timestep_scale, fractional_timesteps):
        if mean_type not in ("EPSILON", "START_X", "VELOCITY"):
            raise ValueError(f"mean_type must be EPSILON, START_X or VELOCITY, got {mean_type!r}")
        self.mixture = mixture
        self.alphas_cumprod = alphas_cumprod
        self.mean_type = mean_type
        self.learned_sigma = learned_sigma
        self.timestep_scale = timestep_scale
        self.fractional_timesteps = fractional_timesteps

    def __call__(self, x, timesteps, **kwargs):
        """x: [N x D] -> [N x D] (or [N x 2D] with learned_sigma), in x's dtype."""
        steps = timesteps.double().cpu() / self.timestep_scale
        if self.fractional_timesteps:
            abar = torch.from_numpy(interpolate_alphas_cumprod(self.alphas_cumprod.numpy(), steps.numpy()))
        else:
            abar = self.alphas_cumprod[torch.round(steps).long()]
        abar = abar.view(-1, 1)
        pred_xstart = self.mixture.pred_xstart(x.cpu(), abar)
        eps = (x.cpu().double() - abar.sqrt() * pred_xstart) / (1 - abar).sqrt()
        out = {
            "EPSILON": eps,
            "START_X": pred_xstart,
            "VELOCITY": abar.sqrt() * eps - (1 - abar).sqrt() * pred_xstart,
        }[self.mean_type]
        if self.learned_sigma:
            out = torch.cat([out, torch.zeros_like(out)], dim=1)
        return out.to(device=x.device, dtype=x.dtype)


class _MixtureEDMModel:
    def __init__(self, mixture, sigma_data):
        self.mixture = mixture
        self.sigma_data = sigma_data

    def __call__(self, x_in, c_noise, **kwargs):
        """c_in x [N x D] and c_noise [N] -> F [N x D], in x_in's dtype."""
        sigma = torch.exp(4 * c_noise.double().cpu()).view(-1, 1)
        sd2 = self.sigma_data**2
        # Karras et al. 2022, Table 1: c_in = 1 / sqrt(sigma^2 + sd^2), c_skip = sd^2 / (sigma^2 + sd^2),
        # c_out = sigma sd / sqrt(sigma^2 + sd^2); F = (D - c_skip x) / c_out.
        x = x_in.double().cpu() * torch.sqrt(sigma**2 + sd2)
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / torch.sqrt(sigma**2 + sd2)
        out = (self.mixture.denoise(x, 1.0, sigma) - c_skip * x) / c_out
        return out.to(device=x_in.device, dtype=x_in.dtype)


class _MixtureFlowModel:
    def __init__(self, mixture):
        self.mixture = mixture

    def __call__(self, x, timesteps, **kwargs):
        """x_t [N x D] and 1000 t [N] -> u [N x D], in x's dtype."""
        t = (timesteps.double().cpu() / 1000).view(-1, 1)
        x64 = x.double().cpu()
        out = (x64 - self.mixture.denoise(x64, 1 - t, t)) / t
        return out.to(device=x.device, dtype=x.dtype)
