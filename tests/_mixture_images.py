"""
Exact models for the restoration tests: a Gaussian mixture over 3 x 4 x 4
images with its optimal denoiser (improved_diffusion.mixture), and the
closed-form posterior of such a mixture given a linear measurement
y = A x + n, n ~ N(0, sigma_y^2 I):

    p(x | y) = sum_k w'_k N(x; m_k, S_k), with, for component k (mean mu_k, covariance s_k^2 I),
    G_k = s_k^2 A^T (s_k^2 A A^T + sigma_y^2 I)^-1,
    m_k = mu_k + G_k (y - A mu_k),   S_k = s_k^2 (I - G_k A),
    w'_k proportional to w_k N(y; A mu_k, s_k^2 A A^T + sigma_y^2 I)

(the conditioning formulas of a jointly Gaussian (x, y) within each component);
and GaussianPath, a noise process of any nodes (alpha_k, sigma_k) with that
mixture's exact denoiser, to run the methods on paths other than the DDPM family's.
"""

import math

import torch

from improved_diffusion.mixture import GaussianMixture
from improved_diffusion.noise_process import NoiseProcess, Nodes
from improved_diffusion.script_util import create_gaussian_diffusion

C, H, W = 3, 4, 4
D = C * H * W
SHAPE = (C, H, W)


def image_model(mixture, base, mean_type="EPSILON", learned_sigma=False):
    """The exact model of `mixture` for images [N x C x H x W] of a diffusion whose base process is `base`."""
    flat = mixture.model(base.alphas_cumprod, mean_type=mean_type, learned_sigma=learned_sigma,
                         timestep_scale=1000.0 / base.num_timesteps)

    def model(x, t, **kwargs):
        out = flat(x.flatten(1), t)
        return out.view(x.shape[0], -1, *x.shape[2:])

    return model


def diffusion_pair(respacing, steps=1000, schedule="linear", **flags):
    """(the spaced diffusion, its base process), the model seeing timesteps scaled to [0, 1000)."""
    spaced = create_gaussian_diffusion(steps=steps, noise_schedule=schedule, timestep_respacing=respacing,
                                       rescale_timesteps=True, **flags)
    base = create_gaussian_diffusion(steps=steps, noise_schedule=schedule, rescale_timesteps=True, **flags)
    return spaced, base


def operator_matrix(operator):
    """A as a float64 matrix [M x D] over the measured coordinates (rows that are all zero dropped)."""
    basis = torch.eye(D, dtype=torch.float64).view(D, *SHAPE)
    a = operator(basis).reshape(D, -1).T
    return a[a.abs().sum(1) > 0]


def exact_posterior(mixture, a, y, sigma_y=0.0):
    """(weights [K], means [K x D], covariances [K x D x D]) of p(x | y = A x + n), float64."""
    log_weights, means, covariances = [], [], []
    identity = torch.eye(D, dtype=torch.float64)
    for weight, mu, std in zip(mixture.weights, mixture.means, mixture.stds):
        s2 = std**2
        measured = s2 * a @ a.T + sigma_y**2 * torch.eye(a.shape[0], dtype=torch.float64)
        residual = y - a @ mu
        solved = torch.linalg.solve(measured, residual)
        gain = s2 * torch.linalg.solve(measured, a).T
        log_weights.append(torch.log(weight) - 0.5 * torch.logdet(measured) - 0.5 * residual @ solved)
        means.append(mu + gain @ residual)
        covariances.append(s2 * (identity - gain @ a))
    return torch.softmax(torch.stack(log_weights), 0), torch.stack(means), torch.stack(covariances)


def mixture_moments(weights, means, covariances):
    """Mean [D] and covariance [D x D] of a Gaussian mixture."""
    mean = weights @ means
    second = torch.einsum("k,kij->ij", weights, covariances + torch.einsum("ki,kj->kij", means, means))
    return mean, second - torch.outer(mean, mean)


def _sqrtm(matrix):
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(samples, mean, covariance):
    """||m - mean||^2 + tr(S + covariance - 2 (S^1/2 covariance S^1/2)^1/2) for the samples' moments m, S."""
    samples = samples.double().flatten(1)
    m, s = samples.mean(0), torch.cov(samples.T)
    root = _sqrtm(s)
    return float(((m - mean) ** 2).sum() + torch.trace(s + covariance - 2 * _sqrtm(root @ covariance @ root)))


def shares(mixture, samples):
    """The share of samples [N x ...] whose most likely component (under the prior mixture) is each k, [K]."""
    x = samples.double().flatten(1)
    log_p = (torch.log(mixture.weights) - mixture.dim * torch.log(mixture.stds)
             - 0.5 * ((x[:, None, :] - mixture.means) ** 2).sum(-1) / mixture.stds**2)
    return torch.bincount(log_p.argmax(1), minlength=len(mixture.weights)).double() / len(x)


def exact_draws(weights, means, covariances, n, seed=0):
    """n draws of the posterior mixture, float64 [n x D]."""
    g = torch.Generator().manual_seed(seed)
    component = torch.multinomial(weights, n, replacement=True, generator=g)
    identity = torch.eye(D, dtype=torch.float64)
    factors = torch.stack([torch.linalg.cholesky(c + 1e-12 * identity) for c in covariances])
    return means[component] + torch.einsum("nij,nj->ni", factors[component], torch.randn(n, D, generator=g,
                                                                                          dtype=torch.float64))


def three_components(pattern_a, pattern_b, std=0.15):
    """Equal-weight mixture of pattern_a, -pattern_a and pattern_b (each [C x H x W]), std `std` each."""
    means = torch.stack([pattern_a, -pattern_a, pattern_b]).reshape(3, D)
    return GaussianMixture([1 / 3] * 3, means, [std] * 3)


def left_known():
    """The inpainting mask of the tests: the left half of every row known, [1 x H x W]."""
    mask = torch.zeros(1, H, W)
    mask[..., : W // 2] = 1
    return mask


def checkerboard(amplitude):
    """+-amplitude in a checkerboard of 1-pixel squares, [C x H x W]: zero mean over every 2 x 2 block."""
    rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    return (amplitude * (1 - 2 * ((rows + cols) % 2))).double().expand(C, H, W)


def priors(task):
    """{"independent": mixture, "correlated": mixture} for the task's operator."""
    if task == "inpaint":
        known = left_known().double().expand(*SHAPE)
        level = torch.where(known.bool(), 0.4, 0.0)
        unknown = 1 - known
        independent = torch.stack([level + 0.4 * unknown, level - 0.4 * unknown, level]).reshape(3, -1)
        correlated = three_components(torch.full(SHAPE, 0.4, dtype=torch.float64), 0.4 * (known - unknown))
    else:
        pattern = checkerboard(0.3)
        independent = torch.stack([0.3 + pattern, 0.3 - pattern, torch.full(SHAPE, 0.3, dtype=torch.float64)])
        independent = independent.reshape(3, -1)
        correlated = three_components(0.3 + pattern, 0.3 - pattern)
    return {"independent": GaussianMixture([0.5, 0.3, 0.2], independent, [0.15] * 3), "correlated": correlated}


def std_error(p, n):
    return math.sqrt(p * (1 - p) / n)


class GaussianPath(NoiseProcess):
    """
    A noise process given by its nodes alone, x = alpha_k x_0 + sigma_k eps at
    node k (the last node clean), whose model is called with the node index
    and predicts x_0: the interface of noise_process.py without the DDPM
    family's arithmetic, for any Gaussian path (EDM's alpha = 1, a flow's
    alpha = 1 - t).
    """

    def __init__(self, alpha, sigma, coordinates="karras"):
        self.alpha, self.sigma, self.coordinates = list(alpha) + [1.0], list(sigma) + [0.0], coordinates

    def sampling_nodes(self):
        count = len(self.alpha) - 1
        return Nodes(alpha=self.alpha, sigma=self.sigma, times=list(range(count)), timesteps=list(range(count)),
                     coordinates=self.coordinates)

    def call_model(self, model, x, t, model_kwargs=None):
        return model(x, t, **(model_kwargs or {}))

    model_output = call_model

    def pred_xstart_from_output(self, output, x, t):
        return output

    def exact_model(self, mixture):
        """
        The mixture's E[x_0 | x] at each node: its DDPM-family denoiser of
        x / sqrt(alpha^2 + sigma^2) at abar = alpha^2 / (alpha^2 + sigma^2).
        """
        alpha, sigma = torch.tensor(self.alpha, dtype=torch.float64), torch.tensor(self.sigma, dtype=torch.float64)
        scale = (alpha**2 + sigma**2).sqrt()

        def model(x, t, **kwargs):
            k = t.long().cpu()
            flat = x.double().cpu().flatten(1) / scale[k, None]
            return mixture.pred_xstart(flat, (alpha[k] / scale[k])[:, None] ** 2).view_as(x).to(x.dtype)

        return model


def edm_like(count=100, sigma_max=20.0, sigma_min=0.01):
    """alpha = 1, sigma geometric from sigma_max to sigma_min (EDM's path), count noisy nodes."""
    ratio = (sigma_min / sigma_max) ** (1 / (count - 1))
    return GaussianPath([1.0] * count, [sigma_max * ratio**k for k in range(count)])


def flow_like(count=100):
    """alpha = 1 - t, sigma = t for t from 1 (pure noise, alpha = 0) down in even steps (rectified flow's path)."""
    times = [1 - k / count for k in range(count)]
    return GaussianPath([1 - t for t in times], times, coordinates="linear")
