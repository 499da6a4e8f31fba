"""
The FID Inception-v3 (SPEC §14): the network, its weights (found, downloaded
once into torch hub's cache, loaded) and the features of images.

`FIDInceptionV3` is TensorFlow's 2015-12-05 Inception graph that FID is
defined with, written in plain torch with the module names of pytorch-fid's
port, so that its weights file (WEIGHTS_FILENAME) loads unchanged: pytorch-fid
itself builds on torchvision, which cannot be installed beside the CPU build
of torch that this project pins. One forward gives all three kinds of
features the metrics use:

- "pool": the 2048 pool-3 features (FID, precision and recall);
- "logits": the 1008 class logits, the pool features times the softmax
  layer's weights without its bias, as the evaluator takes them (IS);
- "spatial": the first 7 channels of the 17 x 17 `mixed_6/conv` map
  (Mixed_6d's 1x1 branch), flattened to 2023 features (sFID).

Images go in as uint8 [N x H x W x 3] and are resized to 299 x 299 the way
TensorFlow 1's bilinear resize inside the evaluator's graph does (no half-pixel
offset), then mapped to [-1, 1] as (x - 128) / 128.

When the weights file is in none of default_weights_paths(), find_weights
downloads it from pytorch-fid's release into torch hub's checkpoint cache,
checking its sha256, unless the environment variable OFFLINE_VARIABLE is set.
"""

import contextlib
import fcntl
import hashlib
import http.client
import os
import sys
import urllib.request

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .eval_errors import EvaluationError
from .io_util import atomic_local_path

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
WEIGHTS_SHA256_PREFIX = "6726825d"  # the start of the file's sha256, as its name carries it
DOWNLOAD_TIMEOUT = 30.0  # seconds a connection may stay silent before the download is given up
OFFLINE_VARIABLE = "IMPROVED_DIFFUSION_OFFLINE"  # set (to anything but "" or "0"): never download
INCEPTION_SIZE = 299
NUM_CLASSES = 1008
POOL_FEATURES = 2048
SPATIAL_CHANNELS = 7
SPATIAL_FEATURES = SPATIAL_CHANNELS * 17 * 17


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (TensorFlow's eps 0.001), ReLU."""

    def __init__(self, in_channels, out_channels, **conv_args):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_args)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x):
    """3x3 average pooling that, like TensorFlow's, leaves the zero padding out of the average."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b-d (35 x 35): 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        branches = [
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_3x3(x)),
        ]
        return torch.cat(branches, 1)


class InceptionB(nn.Module):
    """Mixed_6a: 35 x 35 -> 17 x 17."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        branches = [
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ]
        return torch.cat(branches, 1)


class InceptionC(nn.Module):
    """Mixed_6b-e (17 x 17): factorized 7x7 branches."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        double = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            double = conv(double)
        branches = [
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            double,
            self.branch_pool(_avg_pool_3x3(x)),
        ]
        return torch.cat(branches, 1)


class InceptionD(nn.Module):
    """Mixed_7a: 17 x 17 -> 8 x 8."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        seven = x
        for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            seven = conv(seven)
        branches = [self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, kernel_size=3, stride=2)]
        return torch.cat(branches, 1)


class InceptionE(nn.Module):
    """
    Mixed_7b-c (8 x 8): split 1x3 / 3x1 branches. The graph's last block
    (`max_pool=True`) pools its pooled branch by maximum, not by average.
    """

    def __init__(self, in_channels, max_pool=False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_3x3(x)
        branches = [
            self.branch1x1(x),
            self.branch3x3_2a(single),
            self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double),
            self.branch3x3dbl_3b(double),
            self.branch_pool(pooled),
        ]
        return torch.cat(branches, 1)


def resize_bilinear_tf1(x, size):
    """
    Bilinear resize as TensorFlow 1's ResizeBilinear (align_corners=False, no
    half-pixel centers): output pixel i samples input position i * in / out.

    :param x: float [N x C x H x W] -> [N x C x size x size].
    """
    for dim in (2, 3):
        length = x.shape[dim]
        position = torch.arange(size, dtype=torch.float64, device=x.device) * (length / size)
        low = position.floor().long().clamp(max=length - 1)
        high = (low + 1).clamp(max=length - 1)
        shape = [1, 1, 1, 1]
        shape[dim] = size
        weight = (position - low).to(x.dtype).view(shape)
        x_low, x_high = x.index_select(dim, low), x.index_select(dim, high)
        x = x_low + (x_high - x_low) * weight
    return x


class FIDInceptionV3(nn.Module):
    """
    The Inception-v3 of TensorFlow's 2015-12-05 graph that FID is defined
    with, under the parameter names of pytorch-fid's port (its weights file
    loads with strict=True).
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(POOL_FEATURES, NUM_CLASSES)

    def forward(self, images):
        """
        :param images: uint8 or float (0..255) [N x 3 x H x W].
        :return: dict of float tensors: "pool" [N x 2048], "logits" [N x 1008],
            "spatial" [N x 2023].
        """
        x = resize_bilinear_tf1(images.float(), INCEPTION_SIZE)
        x = (x - 128) / 128
        for stem in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3):
            x = stem(x)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, kernel_size=3, stride=2)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        spatial = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS]
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = x.mean(dim=(2, 3))
        return {
            "pool": pool,
            "logits": pool @ self.fc.weight.T,
            "spatial": spatial.permute(0, 2, 3, 1).flatten(1),
        }


def default_weights_paths():
    """Where the weights file is looked for: torch hub's checkpoint cache (where pytorch-fid downloads it)."""
    return [os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILENAME)]


class WeightsDownloadError(EvaluationError):
    """The weights file could not be downloaded (no connection, a refusal, a timeout) or failed its checksum."""


def find_weights(path="", *, url=WEIGHTS_URL, sha256_prefix=WEIGHTS_SHA256_PREFIX, timeout=DOWNLOAD_TIMEOUT):
    """
    The path of the weights file: `path` when given, else the first existing
    default path, else the file downloaded from `url` into the first default
    path (download_weights; not when OFFLINE_VARIABLE is set).

    :raises EvaluationError: for a `path` that does not exist, or when no
        weights can be had, saying which file to put where (and why the
        download failed).
    """
    if path:
        if not os.path.isfile(path):
            raise EvaluationError(f"--inception_weights {path} does not exist (expected the file {WEIGHTS_FILENAME})")
        return path
    for candidate in default_weights_paths():
        if os.path.isfile(candidate):
            return candidate
    destination = default_weights_paths()[0]
    try:
        if os.environ.get(OFFLINE_VARIABLE, "") not in ("", "0"):
            raise WeightsDownloadError(f"downloads are off: {OFFLINE_VARIABLE} is set")
        return download_weights(destination, url=url, sha256_prefix=sha256_prefix, timeout=timeout)
    except WeightsDownloadError as exc:
        raise EvaluationError(
            f"no Inception weights found, and they could not be downloaded ({exc}): download "
            f"{WEIGHTS_FILENAME} from {url} (pytorch-fid's release) and put it at {destination}, "
            "or pass its path with --inception_weights PATH"
        ) from exc


def download_weights(destination, *, url=WEIGHTS_URL, sha256_prefix=WEIGHTS_SHA256_PREFIX, timeout=DOWNLOAD_TIMEOUT,
                     progress=True):
    """
    Download `url` to `destination` (with a progress bar on stderr) unless it
    exists; keep it only if its sha256 starts with `sha256_prefix`. The file
    is written under a temporary name beside `destination` and renamed, and
    processes of one machine download it once (they wait for each other).

    :param timeout: seconds the connection may stay silent.
    :return: `destination`.
    :raises WeightsDownloadError: naming the cause; nothing is left behind.
    """
    folder = os.path.dirname(os.path.abspath(destination))
    try:
        os.makedirs(folder, exist_ok=True)
        with _locked(folder):
            if os.path.isfile(destination):  # another process downloaded it while this one waited
                return destination
            with atomic_local_path(destination) as tmp:
                digest = _fetch(url, tmp, timeout, progress)
                if not digest.startswith(sha256_prefix):
                    raise WeightsDownloadError(
                        f"the file at {url} has sha256 {digest}, which does not start with {sha256_prefix}: "
                        "refused, nothing was kept"
                    )
    except WeightsDownloadError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError and timeouts are OSErrors
        raise WeightsDownloadError(f"cannot download {url} to {folder}: {exc}") from exc
    return destination


def _fetch(url, path, timeout, progress):
    """Write what `url` serves to `path`; return its sha256 (hex)."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=timeout) as response, open(path, "wb") as f, tqdm(
        total=response.length, unit="B", unit_scale=True, desc=f"downloading {os.path.basename(url)}",
        disable=not progress, file=sys.stderr,
    ) as bar:
        for chunk in iter(lambda: response.read(1 << 20), b""):
            f.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(folder):
    """Hold an exclusive lock on `folder` (flock: other processes wait here); no lock where flock is not supported."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def load_inception(path="", device="cpu"):
    """The FIDInceptionV3 with the weights of find_weights(path), in eval mode on `device`."""
    path = find_weights(path)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EvaluationError(f"cannot read the Inception weights {path}: {exc}") from exc
    model = FIDInceptionV3()
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise EvaluationError(f"{path} is not the FID Inception-v3 state dict {WEIGHTS_FILENAME}: {exc}") from exc
    return model.to(device).eval().requires_grad_(False)


@torch.inference_mode()
def extract_features(model, images, device=None):
    """
    :param images: uint8 NumPy [N x H x W x C], C = 3 or 1 (grayscale, seen as equal R, G and B).
    :return: dict of float32 NumPy arrays, as FIDInceptionV3.forward's keys.
    """
    device = device or next(model.parameters()).device
    batch = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2)
    batch = batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch
    return {key: value.float().cpu().numpy() for key, value in model(batch).items()}
