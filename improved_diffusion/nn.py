"""Small layers and helpers shared by the diffusion process and the UNet."""

import math

import torch
import torch.utils.checkpoint
from torch import nn


class SiLU(nn.SiLU):
    """SiLU activation, x * sigmoid(x) (kept as a named class for the reference's API)."""


class GroupNorm32(nn.GroupNorm):
    """
    GroupNorm computed in float32 and cast back to the input's dtype.

    On CPU, bfloat16 and float16 inputs go straight to the kernel, which
    computes in float32 from float32 parameters and rounds once at the end:
    the same numbers without the two conversion copies.
    """

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            if self._mixed_kernel(x):
                return super().forward(x)
            return super().forward(x.float()).type(x.dtype)

    def _mixed_kernel(self, x):
        """Whether the kernel takes x as it is: 16-bit on CPU with float32 parameters."""
        low_precision = x.dtype in (torch.bfloat16, torch.float16)
        return x.device.type == "cpu" and low_precision and self.weight.dtype == torch.float32


class Dropout(nn.Dropout):
    """
    nn.Dropout whose CPU training mask is drawn by comparing uniform samples
    with p, about twice as fast as the bernoulli_ sampling of F.dropout; other
    devices (which have fused dropout kernels), eval mode, p = 0 and p = 1
    use nn.Dropout itself.
    """

    def forward(self, x):
        if x.device.type != "cpu" or not self.training or not 0 < self.p < 1:
            return super().forward(x)
        keep = torch.rand(x.shape, device=x.device) >= self.p
        return x * keep.to(x.dtype).mul_(1 / (1 - self.p))


def conv_nd(dims, *args, **kwargs):
    """A 1-D, 2-D or 3-D convolution module."""
    convs = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    if dims not in convs:
        raise ValueError(f"unsupported dimensions: {dims} (expected 1, 2 or 3)")
    return convs[dims](*args, **kwargs)


def linear(*args, **kwargs):
    """A linear module."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """A 1-D, 2-D or 3-D average pooling module."""
    pools = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    if dims not in pools:
        raise ValueError(f"unsupported dimensions: {dims} (expected 1, 2 or 3)")
    return pools[dims](*args, **kwargs)


def update_ema(target_params, source_params, rate=0.99):
    """
    Move target parameters toward source parameters in place:
    target = rate * target + (1 - rate) * source, with one multi-tensor kernel.
    """
    targets = [p.detach() for p in target_params]
    sources = [p.detach() for p in source_params]
    if targets:
        torch._foreach_lerp_(targets, sources, 1.0 - rate)


def zero_module(module):
    """Zero out the parameters of a module and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module, scale):
    """Scale the parameters of a module and return it."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


def mean_flat(tensor):
    """Mean over all non-batch dimensions: [N x ...] -> [N]."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def normalization(channels):
    """GroupNorm with 32 groups, computed in float32."""
    if channels % 32 != 0:
        raise ValueError(
            f"GroupNorm(32) cannot split {channels} channels: use a width "
            f"(--num_channels times each channel_mult) that is a multiple of 32"
        )
    return GroupNorm32(32, channels)


def timestep_embedding(timesteps, dim, max_period=10000):
    """
    Sinusoidal timestep embeddings (Transformer positional encoding).

    :param timesteps: a 1-D tensor of N indices, one per batch element (may be fractional).
    :param dim: the width of the embedding.
    :param max_period: the lowest frequency's period.
    :return: an [N x dim] float32 tensor.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def checkpoint(func, inputs, params, flag):
    """
    Evaluate func(*inputs), recomputing its activations in the backward pass
    when flag is true (non-reentrant torch.utils.checkpoint).

    :param params: kept for the reference's signature; the non-reentrant
                   implementation finds the parameters by itself.
    """
    del params
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)
