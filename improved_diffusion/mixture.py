"""
An exact diffusion model: for data from a Gaussian mixture the optimal
denoiser is known in closed form, so samplers can be measured against the
true probability-flow solution and the true data distribution without
training anything.

Data x_0 ~ sum_k w_k N(mu_k, s_k^2 I) in D dimensions. Under
x_t = alpha x_0 + sigma eps (alpha = sqrt(abar), sigma = sqrt(1 - abar)),
x_t ~ sum_k w_k N(alpha mu_k, v_k I) with v_k = alpha^2 s_k^2 + sigma^2, and with
the posterior weights r_k(x_t) of the components,

    E[x_0 | x_t] = sum_k r_k (mu_k + alpha s_k^2 (x_t - alpha mu_k) / v_k),
    E[eps | x_t] = (x_t - alpha E[x_0 | x_t]) / sigma.
"""

import math

import torch


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

    def posterior_weights(self, x_t, abar):
        """r_k(x_t), [N x K], for x_t [N x D] at abar [N x 1]."""
        alpha = abar.sqrt()
        variances = abar * self.stds**2 + 1 - abar
        centered = x_t[:, None, :] - alpha[:, :, None] * self.means
        log_r = (
            torch.log(self.weights)
            - 0.5 * self.dim * torch.log(variances)
            - 0.5 * (centered**2).sum(-1) / variances
        )
        return torch.softmax(log_r, dim=-1)

    def pred_xstart(self, x_t, abar):
        """E[x_0 | x_t], float64 [N x D], for x_t [N x D] and abar a float or [N x 1]."""
        x_t = x_t.double()
        abar = torch.as_tensor(abar, dtype=torch.float64).expand(x_t.shape[0], 1)
        alpha = abar.sqrt()
        variances = abar * self.stds**2 + 1 - abar
        r = self.posterior_weights(x_t, abar)
        gain = (alpha * self.stds**2 / variances)[:, :, None]
        per_component = self.means + gain * (x_t[:, None, :] - alpha[:, :, None] * self.means)
        return (r[:, :, None] * per_component).sum(1)

    def eps(self, x_t, abar):
        """E[eps | x_t], float64 [N x D]."""
        abar = torch.as_tensor(abar, dtype=torch.float64).expand(x_t.shape[0], 1)
        return (x_t.double() - abar.sqrt() * self.pred_xstart(x_t, abar)) / (1 - abar).sqrt()

    def model(self, alphas_cumprod, mean_type="EPSILON", learned_sigma=False, timestep_scale=1.0):
        """
        A model(x, timesteps) for a diffusion whose model sees these timesteps.

        :param alphas_cumprod: abar per timestep the model receives (a base
            process's table; timesteps are divided by timestep_scale first).
        :param mean_type: "EPSILON", "START_X" or "VELOCITY" (v = alpha eps - sigma x_0).
        :param learned_sigma: append D zero channels (the middle of a learned range).
        """
        return _MixtureModel(self, torch.as_tensor(alphas_cumprod, dtype=torch.float64), mean_type,
                             learned_sigma, timestep_scale)

    def ode_solution(self, x_T, abar_start, abar_end, steps=2000):
        """
        x at abar_end on the probability-flow ODE from x_T at abar_start, by RK4
        in lambda = log(alpha / sigma) with `steps` uniform steps, where
        dx / dlambda = alpha (E[x_0 | x] - alpha x) (the derivative of Lu et
        al. 2022b's exact solution).
        """
        lam_start, lam_end = _half_log_snr(abar_start), _half_log_snr(abar_end)
        h = (lam_end - lam_start) / steps
        x = x_T.double()
        for i in range(steps):
            lam = lam_start + i * h
            k1 = self._ode_slope(x, lam)
            k2 = self._ode_slope(x + 0.5 * h * k1, lam + 0.5 * h)
            k3 = self._ode_slope(x + 0.5 * h * k2, lam + 0.5 * h)
            k4 = self._ode_slope(x + h * k3, lam + h)
            x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        return x

    def _ode_slope(self, x, lam):
        abar = 1 / (1 + math.exp(-2 * lam))
        alpha = math.sqrt(abar)
        return alpha * (self.pred_xstart(x, abar) - alpha * x)


def _half_log_snr(abar):
    return 0.5 * (math.log(abar) - math.log1p(-abar))


class _MixtureModel:
    def __init__(self, mixture, alphas_cumprod, mean_type, learned_sigma, timestep_scale):
        if mean_type not in ("EPSILON", "START_X", "VELOCITY"):
            raise ValueError(f"mean_type must be EPSILON, START_X or VELOCITY, got {mean_type!r}")
        self.mixture = mixture
        self.alphas_cumprod = alphas_cumprod
        self.mean_type = mean_type
        self.learned_sigma = learned_sigma
        self.timestep_scale = timestep_scale

    def __call__(self, x, timesteps, **kwargs):
        """x: [N x D] -> [N x D] (or [N x 2D] with learned_sigma), in x's dtype."""
        index = torch.round(timesteps.double() / self.timestep_scale).long().cpu()
        abar = self.alphas_cumprod[index].view(-1, 1)
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
