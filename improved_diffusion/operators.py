"""
Linear measurement operators for restoration (SPEC 19): y = A x + n for
images x in [-1, 1], [N x C x H x W], with Gaussian measurement noise n of
standard deviation sigma_y.

Each operator is callable as A(x) and gives what the restoration methods of
restoration.py need: the Moore-Penrose pseudo-inverse A+ y (`pinv`), the
adjoint A^T y (`adjoint`), DDNM's range-null-space correction
x <- x - s A+ (A x - y) (`project`; s = 1 gives A+ y + (I - A+ A) x) and the
measurement itself, noise included (`measure`). A+ A is the orthogonal
projection onto the part of x that y measures.

`has_known_part` marks the operators whose rows are orthogonal with equal
norms, so that A+ = A^T / ||row||^2: the measured part of x is y copied in
(pixels for inpainting, block means for super-resolution, the channel mean
for colorization), never amplified. Only those have the "known part" that
replace and RePaint paste into x_t; a blur measures each frequency at its own
gain, and its pseudo-inverse divides by gains down to `cutoff`.
"""

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F

from .noise_process import noise_like

MASK_KINDS = ("half", "box", "random")


class Operator:
    """
    The interface: A(x) for x [N x C x H x W], pinv, adjoint, and the
    measurement noise `sigma_y` (>= 0).
    """

    has_known_part = False

    def __init__(self, sigma_y=0.0):
        if not sigma_y >= 0:
            raise ValueError(f"sigma_y={sigma_y}: the measurement noise's standard deviation must be >= 0")
        self.sigma_y = float(sigma_y)

    def __call__(self, x):
        raise NotImplementedError

    def pinv(self, y):
        """A+ y: the least-norm x with A x = y (for y in A's range), [N x C x H x W]."""
        raise NotImplementedError

    def adjoint(self, y):
        """A^T y, [N x C x H x W]."""
        raise NotImplementedError

    def check_shape(self, shape):
        """Raise a ValueError naming both when images of `shape` ([N x C x H x W]) do not fit this operator."""

    def to(self, device):
        """This operator with its tensors on `device` (itself when it holds none)."""
        return self

    def measure(self, x, generator=None):
        """y = A(x) + sigma_y n, n standard normal from `generator` (a torch.Generator, one per image, or None)."""
        y = self(x)
        if self.sigma_y == 0:
            return y
        return y + self.sigma_y * noise_like(y.shape, y.device, generator, y.dtype)

    def project(self, x, y, scale=1.0):
        """
        x - scale A+ (A x - y): with scale 1, A+ y + (I - A+ A) x, the x that
        agrees with y on the measured part and keeps x on the rest (Wang et al.
        2023, eq. 6); DDNM+ scales the correction down where y is noisy.
        """
        correction = self.pinv(self(x) - y)
        return x - correction if scale == 1 else x - scale * correction

    def as_image(self, y):
        """y drawn as an image of x's shape (A+ y: what the measurement shows of x)."""
        return self.pinv(y)


class Inpaint(Operator):
    """
    Keep the known pixels: A x = m * x (y keeps x's shape, 0 where unknown).

    :param mask: 1 = known, 0 = unknown; [C x H x W] for every image or
        [N x C x H x W] for each (C may be 1: the same mask for every channel).
    """

    has_known_part = True

    def __init__(self, mask, sigma_y=0.0):
        super().__init__(sigma_y)
        mask = torch.as_tensor(mask)
        if mask.ndim not in (3, 4):
            raise ValueError(f"the mask is {list(mask.shape)}: give it as [C x H x W] or [N x C x H x W], 1 = known")
        mask = mask.float()
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("the mask must hold only 0 (unknown) and 1 (known)")
        self.mask = mask

    def __call__(self, x):
        return x * self.mask

    def pinv(self, y):
        return y * self.mask

    adjoint = pinv

    def project(self, x, y, scale=1.0):
        """x with its known pixels moved to y's by `scale` (at scale 1 they are y's, bit for bit)."""
        weight = self.mask if scale == 1 else self.mask * scale
        return torch.lerp(x, y, weight.to(x.dtype))

    def check_shape(self, shape):
        n, c, h, w = shape
        mask_shape = tuple(self.mask.shape)
        batch, channels, size = mask_shape[:-3], mask_shape[-3], mask_shape[-2:]
        if size != (h, w) or channels not in (1, c) or batch not in ((), (n,)):
            raise ValueError(
                f"the mask is {list(mask_shape)} and the images are [{n} x {c} x {h} x {w}]: give a mask of "
                f"{h}x{w} pixels with 1 or {c} channels ([C x H x W], or [N x C x H x W] with N = {n})"
            )

    def to(self, device):
        moved = copy.copy(self)
        moved.mask = self.mask.to(device)
        return moved


class SuperRes(Operator):
    """Average pooling over factor x factor blocks: y is [N x C x H/factor x W/factor]."""

    has_known_part = True

    def __init__(self, factor, sigma_y=0.0):
        super().__init__(sigma_y)
        if not (isinstance(factor, int) and factor >= 1):
            raise ValueError(f"factor={factor!r}: the super-resolution factor must be an integer >= 1")
        self.factor = factor

    def __call__(self, x):
        return F.avg_pool2d(x, self.factor)

    def pinv(self, y):
        # A A^T = I / factor^2, so A+ = factor^2 A^T: each block's pixels copy its mean.
        return y.repeat_interleave(self.factor, dim=-2).repeat_interleave(self.factor, dim=-1)

    def adjoint(self, y):
        return self.pinv(y) / self.factor**2

    def check_shape(self, shape):
        h, w = shape[-2:]
        if h % self.factor or w % self.factor:
            raise ValueError(
                f"images of {h}x{w} pixels do not split into {self.factor}x{self.factor} blocks: use a factor "
                f"that divides both sides"
            )


class Colorize(Operator):
    """The mean over the color channels: y is [N x 1 x H x W]."""

    has_known_part = True

    def __init__(self, channels=3, sigma_y=0.0):
        super().__init__(sigma_y)
        if channels < 2:
            raise ValueError(f"colorization needs images of 2 or more channels, not {channels}")
        self.channels = channels

    def __call__(self, x):
        return x.mean(dim=1, keepdim=True)

    def pinv(self, y):
        # A A^T = I / C, so A+ = C A^T: every channel copies the mean.
        return y.expand(-1, self.channels, *y.shape[2:])

    def adjoint(self, y):
        return self.pinv(y) / self.channels

    def check_shape(self, shape):
        if shape[1] != self.channels:
            raise ValueError(
                f"the images have {shape[1]} channels and the colorization operator {self.channels}: "
                "colorize a model of 3 channels (--image_channels 3)"
            )


class Deblur(Operator):
    """
    A Gaussian blur: a size x size kernel of standard deviation sigma (pixels),
    normalized to sum 1, applied circularly (the image wraps at its edges), so
    the Fourier transform diagonalizes A and its pseudo-inverse is exact: A+
    divides each frequency by the kernel's gain K where |K| > cutoff and zeroes
    it elsewhere (Moore-Penrose with that tolerance; the kernel's peak gain is 1).
    """

    def __init__(self, sigma, size, sigma_y=0.0, cutoff=1e-3):
        super().__init__(sigma_y)
        if not sigma > 0 or not (isinstance(size, int) and size >= 1 and size % 2 == 1):
            raise ValueError(f"Deblur(sigma={sigma}, size={size}): give a sigma > 0 and an odd kernel size")
        if not 0 < cutoff < 1:
            raise ValueError(f"cutoff={cutoff}: the pseudo-inverse's tolerance must lie in (0, 1)")
        self.sigma, self.size, self.cutoff = float(sigma), size, float(cutoff)
        self._gains = {}

    def kernel(self, dtype=torch.float32, device=None):
        """The [size x size] kernel, summing to 1."""
        offsets = torch.arange(self.size, dtype=dtype, device=device) - self.size // 2
        weights = torch.exp(-0.5 * (offsets / self.sigma) ** 2)
        kernel = torch.outer(weights, weights)
        return kernel / kernel.sum()

    def gains(self, height, width, dtype, device):
        """(K, the pseudo-inverse's 1 / K or 0): the real frequency response, [H x W//2+1] each, made once per size."""
        key = (height, width, dtype, str(device))
        if key not in self._gains:
            placed = torch.zeros(height, width, dtype=dtype, device=device)
            placed[: self.size, : self.size] = self.kernel(dtype, device)
            # Centred on pixel (0, 0), the symmetric kernel has a real transform.
            placed = torch.roll(placed, shifts=(-(self.size // 2), -(self.size // 2)), dims=(0, 1))
            gain = torch.fft.rfft2(placed).real
            kept = gain.abs() > self.cutoff
            inverse = torch.where(kept, 1 / torch.where(kept, gain, torch.ones_like(gain)), torch.zeros_like(gain))
            self._gains[key] = (gain, inverse)
        return self._gains[key]

    def _filter(self, x, which):
        height, width = x.shape[-2:]
        response = self.gains(height, width, x.dtype, x.device)[which]
        return torch.fft.irfft2(torch.fft.rfft2(x) * response, s=(height, width))

    def __call__(self, x):
        return self._filter(x, 0)

    def pinv(self, y):
        return self._filter(y, 1)

    def adjoint(self, y):
        # The kernel is symmetric: A is its own adjoint.
        return self._filter(y, 0)

    def as_image(self, y):
        return y

    def check_shape(self, shape):
        h, w = shape[-2:]
        if self.size > min(h, w):
            raise ValueError(f"a {self.size}x{self.size} blur kernel is larger than {h}x{w} images: use a smaller size")


def make_mask(kind, height, width, seed=0):
    """
    A named inpainting mask, [1 x H x W] float, 1 = known:
    "half" (the left half known, the right half to fill), "box" (a centred
    box of half the height and width to fill), "random" (each pixel known
    with probability 1/2, drawn from `seed`).
    """
    mask = torch.ones(1, height, width)
    if kind == "half":
        mask[..., width // 2 :] = 0
    elif kind == "box":
        top, left = height // 4, width // 4
        mask[..., top : top + math.ceil(height / 2), left : left + math.ceil(width / 2)] = 0
    elif kind == "random":
        rng = np.random.default_rng(seed)
        mask[0] = torch.from_numpy((rng.random((height, width)) < 0.5).astype(np.float32))
    else:
        raise ValueError(f"unknown mask {kind!r}: use one of {', '.join(MASK_KINDS)}, a PNG or an npz")
    return mask
