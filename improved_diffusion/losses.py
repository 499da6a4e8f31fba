"""
Divergences and likelihoods between Gaussians, used by the variational bound.
"""

import math

import torch


def normal_kl(mean1, logvar1, mean2, logvar2):
    """
    KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    Any argument but one may be a Python float; the result broadcasts like the
    tensor arguments.
    """
    tensor = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if tensor is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    logvar1, logvar2 = (
        v if isinstance(v, torch.Tensor) else torch.tensor(v).to(tensor) for v in (logvar1, logvar2)
    )
    # KL of two Gaussians: ½(−1 + log σ2² − log σ1² + σ1²/σ2² + (μ1 − μ2)²/σ2²).
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """A fast tanh approximation of the standard normal CDF, elementwise."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """
    Log-likelihood (nats) of a Gaussian discretized into the 256 bins of uint8 images.

    :param x: [N x C x ...] targets, uint8 values rescaled to [-1, 1].
    :param means: the Gaussian means, shape of x.
    :param log_scales: the Gaussian log standard deviations, shape of x.
    :return: log probabilities, shape of x. The edge bins reach to -inf and +inf.
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(
            f"x, means and log_scales must have one shape, got "
            f"{tuple(x.shape)}, {tuple(means.shape)}, {tuple(log_scales.shape)}"
        )
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_bin_mass = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, log_bin_mass),
    )
