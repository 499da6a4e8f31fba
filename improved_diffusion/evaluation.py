"""
Sample-quality metrics as openai/guided-diffusion's evaluations/evaluator.py
defines them (SPEC §14), in PyTorch.

The metrics are plain functions of features, usable with any network:
`frechet_distance` (FID, sFID; `frechet_distance_to_features` for few samples),
`inception_score` and `precision_recall`.
The features come from the FID Inception-v3 (`FIDInceptionV3`), written here
in plain torch with the module names of pytorch-fid's network, so that its
weights file (WEIGHTS_FILENAME) loads unchanged: pytorch-fid itself builds on
torchvision, which cannot be installed beside the CPU build of torch that this
project pins. One forward gives all three kinds of features:

- "pool": the 2048 pool-3 features (FID, precision and recall);
- "logits": the 1008 class logits, the pool features times the softmax
  layer's weights without its bias, as the evaluator takes them (IS);
- "spatial": the first 7 channels of the 17 x 17 `mixed_6/conv` map
  (Mixed_6d's 1x1 branch), flattened to 2023 features (sFID).

Images go in as uint8 [N x H x W x 3] and are resized to 299 x 299 the way
TensorFlow 1's bilinear resize inside the evaluator's graph does (no half-pixel
offset), then mapped to [-1, 1] as (x - 128) / 128.
"""

import hashlib
import json
import os
import sys
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from . import dist_util, logger
from .image_datasets import list_image_files, load_image
from .io_util import atomic_open
from .image_output import GRID_MAX_IMAGES, GRID_MIN_SIDE, enlarge, image_grid, to_uint8_images, write_png
from .sample_seeds import draw_labels, sample_generators
from .sharding import chunks, rank_indices

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
INCEPTION_SIZE = 299
NUM_CLASSES = 1008
POOL_FEATURES = 2048
SPATIAL_CHANNELS = 7
SPATIAL_FEATURES = SPATIAL_CHANNELS * 17 * 17
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "bmp", "webp")
NEAREST_K = 3
MIN_IMAGES = NEAREST_K + 1
STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "pool")
REFERENCE_LIMIT = 50000  # training images scored against during training, evenly spaced over the folder
REFERENCE_CACHE = "eval_reference_stats.npz"
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class EvaluationError(ValueError):
    """Inputs or weights that the evaluation cannot use; the message says how to fix them."""


# ---------------------------------------------------------------- metrics


def feature_statistics(features):
    """float [N x D] -> (mu [D], sigma [D x D]): the Gaussian fit of FID, in float64."""
    features = _feature_matrix(features)
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def _feature_matrix(features):
    """float64 [N x D] with N >= 2, or an EvaluationError."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise EvaluationError(f"feature statistics need at least 2 feature vectors [N x D], got shape {features.shape}")
    return features


def _psd_sqrt(sigma):
    """The symmetric square root of a positive semi-definite matrix (negative rounding-error eigenvalues -> 0)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(sigma)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """
    The Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau
    1982; FID: Heusel et al. 2017, eq. 6), in float64.

    tr((sigma1 sigma2)^(1/2)) is computed as the sum of the square roots of the
    eigenvalues of sigma1^(1/2) sigma2 sigma1^(1/2), a similar, symmetric
    positive semi-definite matrix: no scipy, and no complex parts for the
    singular covariances of few samples.

    :param mu1, mu2: float [D]; sigma1, sigma2: float [D x D] covariances.
    """
    mu1, mu2, sigma1, sigma2 = _float64(mu1, mu2, sigma1, sigma2)
    _check_statistics(mu1, sigma1, mu2, sigma2.shape)
    root1 = _psd_sqrt(sigma1)
    return _frechet(mu1, mu2, sigma1.trace() + sigma2.trace(), root1 @ sigma2 @ root1)


def frechet_distance_to_features(mu1, sigma1, features):
    """
    frechet_distance of N(mu1, sigma1) and the Gaussian fit (feature_statistics)
    of `features` [N x D]. For N <= D it works in N x N: with sigma2 = B B^T,
    B the centred features over sqrt(N - 1) [D x N], the matrix B^T sigma1 B
    has the nonzero eigenvalues of sigma1^(1/2) sigma2 sigma1^(1/2), so the
    cost is O(D^2 N) instead of O(D^3) (a few samples against D = 2048).
    """
    features = _feature_matrix(features)
    count, dim = features.shape
    if count > dim:
        return frechet_distance(mu1, sigma1, *feature_statistics(features))
    mu1, sigma1, features = _float64(mu1, sigma1, features)
    mu2 = features.mean(dim=0)
    _check_statistics(mu1, sigma1, mu2, (dim, dim))
    # The centred features span at most N - 1 directions: in an orthonormal basis of the vectors orthogonal
    # to (1, ..., 1) (Helmert's), B^T sigma1 B loses the zero eigenvalue whose rounding error a square root
    # would magnify.
    b = (features - mu2).T @ _helmert_basis(count, features.dtype) / (count - 1) ** 0.5
    return _frechet(mu1, mu2, sigma1.trace() + b.square().sum(), b.T @ sigma1 @ b)


def _helmert_basis(count, dtype):
    """[N x N-1] orthonormal columns orthogonal to (1, ..., 1): column k is (1, ..., 1, -k, 0, ...) / sqrt(k (k + 1))."""
    k = torch.arange(1, count, dtype=dtype)
    rows = torch.arange(count, dtype=dtype)[:, None]
    basis = torch.where(rows < k, 1.0, torch.where(rows == k, -k, 0.0))
    return basis / (k * (k + 1)).sqrt()


def _float64(*arrays):
    return [torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in arrays]


def _check_statistics(mu1, sigma1, mu2, sigma2_shape):
    if mu1.shape != mu2.shape or sigma1.shape != sigma2_shape or sigma1.shape != mu1.shape * 2:
        raise EvaluationError(
            f"Fréchet distance of mismatched statistics: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
            f"sigma {tuple(sigma1.shape)} vs {tuple(sigma2_shape)} (they must come from the same features)"
        )


def _frechet(mu1, mu2, trace_sum, middle):
    """d^2 from tr(sigma1) + tr(sigma2) and a symmetric PSD matrix whose eigenvalues are those of sigma1 sigma2."""
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    # d^2 = |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))
    return float((mu1 - mu2).square().sum() + trace_sum - 2 * trace_sqrt)


def inception_score(logits, split_size=5000):
    """
    Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), with
    p(y) the mean prediction of each split of `split_size` consecutive samples
    (the last split may be shorter).

    :param logits: float [N x K] class logits.
    :return: (mean, std) of the score over the splits.
    """
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if logits.ndim != 2 or len(logits) == 0:
        raise EvaluationError(f"inception_score needs logits [N x K] with N >= 1, got shape {tuple(logits.shape)}")
    scores = []
    for start in range(0, len(logits), split_size):
        log_p = F.log_softmax(logits[start : start + split_size], dim=1)
        log_p_y = torch.logsumexp(log_p, dim=0) - np.log(len(log_p))
        kl = (log_p.exp() * (log_p - log_p_y)).sum(dim=1)
        scores.append(float(kl.mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _as_float_tensor(features, device):
    """NumPy array or tensor [N x D] -> float32 tensor on `device` (the tensor's own device when None)."""
    features = torch.as_tensor(features)
    if features.ndim != 2:
        raise EvaluationError(f"features must be [N x D], got shape {tuple(features.shape)}")
    return features.to(device=device or features.device, dtype=torch.float32)


def _squared_distances(a, b, b_norms):
    """|a_i - b_j|^2 for a [M x D], b [N x D] with b_norms = |b_j|^2 [N] -> [M x N], never negative."""
    return (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b_norms).clamp_(min=0)


def manifold_radii(features, k=3, batch_size=1000):
    """
    The squared distance of each feature vector to its k-th nearest neighbour
    among the others (Kynkäänniemi et al. 2019, eq. 2's NN_k). The distances
    are computed in blocks of `batch_size` x `batch_size`, only on and above
    the diagonal: each block serves its rows and, transposed, its columns.

    :param features: float tensor [N x D], N > k.
    :return: float tensor [N].
    """
    norms = features.square().sum(1)
    nearest = torch.full((len(features), k + 1), float("inf"), dtype=features.dtype, device=features.device)
    for i in range(0, len(features), batch_size):
        for j in range(i, len(features), batch_size):
            block = _squared_distances(features[i : i + batch_size], features[j : j + batch_size],
                                       norms[j : j + batch_size])
            _keep_smallest(nearest, i, block)
            if j != i:
                _keep_smallest(nearest, j, block.T)
    return nearest[:, k]


def _keep_smallest(nearest, start, block):
    """Keep in nearest[start:start + len(block)] [B x m] the m smallest of its values and of each row of `block`."""
    rows = slice(start, start + len(block))
    candidates = torch.cat([nearest[rows], block], dim=1)
    nearest[rows] = candidates.topk(nearest.shape[1], dim=1, largest=False).values


def precision_recall(real_features, fake_features, k=3, batch_size=1000, device=None):
    """
    Improved precision and recall (Kynkäänniemi et al. 2019, eqs. 1-3): the
    fraction of fake samples inside the real manifold (the union of balls
    around each real sample reaching its k-th nearest real neighbour), and of
    real samples inside the fake manifold. Distances are computed `batch_size`
    rows at a time, so at most batch_size x max(N, M) of them exist at once.

    :param real_features: float [N x D]; fake_features: float [M x D]; N, M > k.
    :return: (precision, recall) as floats.
    """
    real = _as_float_tensor(real_features, device)
    fake = _as_float_tensor(fake_features, real.device)
    if min(len(real), len(fake)) <= k or real.shape[1] != fake.shape[1]:
        raise EvaluationError(
            f"precision and recall with k = {k} need more than {k} feature vectors of one width on each side, "
            f"got {tuple(real.shape)} real and {tuple(fake.shape)} fake"
        )
    real_radii, fake_radii = manifold_radii(real, k, batch_size), manifold_radii(fake, k, batch_size)
    fake_norms = fake.square().sum(1)
    fake_inside = torch.zeros(len(fake), dtype=torch.bool, device=real.device)
    real_inside = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    for start in range(0, len(real), batch_size):
        block = _squared_distances(real[start : start + batch_size], fake, fake_norms)
        real_inside[start : start + batch_size] = (block <= fake_radii).any(1)
        fake_inside |= (block <= real_radii[start : start + batch_size, None]).any(0)
    return float(fake_inside.double().mean()), float(real_inside.double().mean())


# ---------------------------------------------------------------- the FID Inception-v3


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


def find_weights(path=""):
    """`path`, or the first existing default path; raises EvaluationError saying where to put the file."""
    if path:
        if not os.path.isfile(path):
            raise EvaluationError(f"--inception_weights {path} does not exist (expected the file {WEIGHTS_FILENAME})")
        return path
    for candidate in default_weights_paths():
        if os.path.isfile(candidate):
            return candidate
    raise EvaluationError(
        f"no Inception weights found: download {WEIGHTS_FILENAME} from {WEIGHTS_URL} (pytorch-fid's release) "
        f"and put it at {default_weights_paths()[0]}, or pass its path with --inception_weights PATH "
        "(nothing is downloaded at run time)"
    )


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


# ---------------------------------------------------------------- image inputs


class NpzImages:
    """The `arr_0` of an npz (uint8 [N x H x W x C], C = 3 or 1), read in batches without loading it whole."""

    def __init__(self, path):
        self.path = path
        try:
            with zipfile.ZipFile(path) as archive, archive.open(self._member(archive)) as f:
                version = np.lib.format.read_magic(f)
                shape, fortran_order, dtype = _NPY_HEADER_READERS[version](f)
                self.offset = f.tell()
        except (OSError, zipfile.BadZipFile, ValueError) as exc:
            raise EvaluationError(f"cannot read {path} as an npz file: {exc}") from exc
        if dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3) or fortran_order:
            raise EvaluationError(
                f"{path}: arr_0 is {dtype} {list(shape)}{' (Fortran order)' if fortran_order else ''}; "
                "it must be uint8 [N x H x W x 3] (or x 1, grayscale) in C order, as image_sample.py and ADM's "
                "reference batches write it"
            )
        self.num_images, self.image_shape = shape[0], tuple(shape[1:])

    def _member(self, archive):
        if "arr_0.npy" not in archive.namelist():
            names = ", ".join(n.removesuffix(".npy") for n in archive.namelist()) or "nothing"
            raise EvaluationError(f"{self.path} has no arr_0 (it holds {names}): save the images as its first array")
        return "arr_0.npy"

    def batches(self, batch_size, wanted=lambda index: True):
        """Yield (batch index, uint8 [B x H x W x C]) for the batches whose index `wanted` accepts."""
        row_bytes = int(np.prod(self.image_shape))
        with zipfile.ZipFile(self.path) as archive, archive.open("arr_0.npy") as f:
            for index, start in enumerate(range(0, self.num_images, batch_size)):
                if not wanted(index):
                    continue
                count = min(batch_size, self.num_images - start)
                f.seek(self.offset + start * row_bytes)
                data = np.frombuffer(bytearray(f.read(count * row_bytes)), dtype=np.uint8)
                yield index, data.reshape(count, *self.image_shape)


class FolderImages:
    """The images of a folder and its subfolders (sorted, depth first), as RGB, all of one size."""

    def __init__(self, path):
        self.path = path
        self.files = _walk_images(path)
        if not self.files:
            raise EvaluationError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {path} or its subfolders")
        sizes = {}
        for file in self.files:
            with Image.open(file) as image:
                sizes.setdefault(image.size, file)
        if len(sizes) > 1:
            examples = ", ".join(f"{file} is {w}x{h}" for (w, h), file in list(sizes.items())[:2])
            raise EvaluationError(f"images in {path} differ in size ({examples}): resize them to one size first")
        (width, height), = sizes
        self.num_images, self.image_shape = len(self.files), (height, width, 3)

    def batches(self, batch_size, wanted=lambda index: True):
        """Yield (batch index, uint8 [B x H x W x 3]) for the batches whose index `wanted` accepts."""
        for index, start in enumerate(range(0, self.num_images, batch_size)):
            if wanted(index):
                yield index, np.stack([_read_rgb(file) for file in self.files[start : start + batch_size]])


def _walk_images(folder):
    found = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            found.extend(_walk_images(path))
        elif name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
            found.append(path)
    return found


def _read_rgb(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def open_images(path):
    """NpzImages for an .npz file, FolderImages for a folder; EvaluationError otherwise."""
    if os.path.isdir(path):
        return FolderImages(path)
    if os.path.isfile(path):
        return NpzImages(path)
    raise EvaluationError(f"{path} does not exist: give an .npz with arr_0 uint8 [N x H x W x 3] or an image folder")


def check_inputs(named_readers):
    """
    Fail unless every input has at least MIN_IMAGES images and all have one image size.

    :param named_readers: dict of name -> NpzImages or FolderImages.
    """
    for name, reader in named_readers.items():
        if reader.num_images < MIN_IMAGES:
            raise EvaluationError(
                f"{name} {reader.path} has {reader.num_images} image(s); the metrics need at least {MIN_IMAGES} "
                f"(precision and recall measure each image's {NEAREST_K} nearest neighbours; FID wants thousands)"
            )
    shapes = {f"{name} {reader.path}": reader.image_shape[:2] for name, reader in named_readers.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{where} is {h}x{w}" for where, (h, w) in shapes.items())
        raise EvaluationError(f"the inputs differ in image size ({listed}): compare images of one size")


# ---------------------------------------------------------------- features over ranks and statistics


def dataset_features(model, reader, batch_size, desc="features"):
    """
    Features of every image of `reader`, batch b on rank b % world_size: each
    batch is the same whatever the number of ranks, and so are its features.

    :return: on rank 0, dict of float32 [N x F] arrays in image order (the
        keys of FIDInceptionV3.forward); None on the other ranks.
    """
    rank, world_size = dist_util.get_rank(), dist_util.get_world_size()
    mine = []
    total = sum(len(range(start, min(start + batch_size, reader.num_images)))
                for index, start in enumerate(range(0, reader.num_images, batch_size)) if index % world_size == rank)
    with tqdm(total=total, desc=desc, unit="image", disable=rank != 0, file=sys.stderr) as bar:
        for index, images in reader.batches(batch_size, wanted=lambda i: i % world_size == rank):
            mine.append((index, extract_features(model, images, dist_util.dev())))
            bar.update(len(images))
    return _gather_in_order(mine)


def reference_statistics(features):
    """The cached form of a reference's features: Gaussian fits of pool and spatial features, and the pool ones."""
    mu, sigma = feature_statistics(features["pool"])
    mu_s, sigma_s = feature_statistics(features["spatial"])
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s, "pool": features["pool"]}


def input_fingerprint(reader, weights_path):
    """A digest of the input's files (names, sizes, modification times) and of the weights file's bytes."""
    files = [reader.path] if isinstance(reader, NpzImages) else reader.files
    listing = [(os.path.relpath(f, reader.path), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
    identity = [os.path.abspath(reader.path), getattr(reader, "image_size", None), listing]
    if getattr(reader, "image_channels", 3) != 3:
        identity.append(reader.image_channels)
    digest = hashlib.sha256(json.dumps(identity).encode())
    with open(weights_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_cached_statistics(path, fingerprint):
    """The statistics cached at `path` for `fingerprint`, or None (no file, another input or other weights)."""
    try:
        with np.load(path) as cached:
            if str(cached["fingerprint"]) != fingerprint:
                return None
            return {key: cached[key] for key in STATS_KEYS}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def save_statistics(path, stats, fingerprint):
    """Write the statistics to `path` atomically; False (and a warning) if the folder is not writable."""
    try:
        with atomic_open(path) as f:
            np.savez(f, fingerprint=np.array(fingerprint), **stats)
    except OSError as exc:
        print(f"warning: cannot cache the reference statistics at {path} ({exc}); they will be computed again",
              file=sys.stderr)
        return False
    return True


def score(ref_stats, sample_features, split_size=5000):
    """
    The evaluator's metrics of samples against a reference.

    :param ref_stats: reference_statistics of the reference.
    :param sample_features: dict of the samples' "pool", "logits" and "spatial" features.
    :return: dict of floats: inception_score (and _std), fid, sfid, precision, recall.
    """
    inception_mean, inception_std = inception_score(sample_features["logits"], split_size)
    precision, recall = precision_recall(ref_stats["pool"], sample_features["pool"], NEAREST_K,
                                         device=dist_util.dev())
    return {
        "inception_score": inception_mean,
        "inception_score_std": inception_std,
        "fid": frechet_distance_to_features(ref_stats["mu"], ref_stats["sigma"], sample_features["pool"]),
        "sfid": frechet_distance_to_features(ref_stats["mu_s"], ref_stats["sigma_s"], sample_features["spatial"]),
        "precision": precision,
        "recall": recall,
    }


# ---------------------------------------------------------------- FID during training


class TrainingImages:
    """
    A training folder's images as training sees them (resized and centre-cropped
    to `image_size`, RGB or, with image_channels 1, grayscale), at most `limit`
    of them, evenly spaced in file order.
    """

    def __init__(self, data_dir, image_size, limit=REFERENCE_LIMIT, image_channels=3):
        files = list_image_files(data_dir)
        if len(files) > limit:
            files = [files[i * len(files) // limit] for i in range(limit)]
        self.path, self.files, self.image_size, self.image_channels = data_dir, files, image_size, image_channels
        self.num_images, self.image_shape = len(files), (image_size, image_size, image_channels)

    def batches(self, batch_size, wanted=lambda index: True):
        """Yield (batch index, uint8 [B x S x S x C]) for the batches whose index `wanted` accepts."""
        for index, start in enumerate(range(0, self.num_images, batch_size)):
            if wanted(index):
                files = self.files[start : start + batch_size]
                yield index, np.stack([load_image(f, self.image_size, self.image_channels) for f in files])


class TrainingEvaluator:
    """
    Scores `num_samples` samples of a model against its training data (SPEC
    §14): sample i starts from the noise of sample_seeds' generator (seed, i),
    so every evaluation of a run draws the same noise, whatever the ranks.
    The training data's statistics are computed at construction, on all
    ranks, and cached in `log_dir` (reused by a run resumed there).

    :param diffusion: the (respaced) diffusion to sample with.
    :param num_classes: class labels are drawn per sample when > 0.
    :param image_channels: 3 (RGB) or 1 (grayscale samples and training images).
    """

    def __init__(self, *, diffusion, data_dir, image_size, num_samples, batch_size, log_dir, sampler="ddim",
                 num_classes=0, seed=0, weights_path="", image_channels=3):
        weights_path = find_weights(weights_path)
        self.network = load_inception(weights_path, dist_util.dev())
        self.diffusion, self.sampler, self.seed = diffusion, sampler, seed
        self.num_samples, self.batch_size, self.num_classes = num_samples, batch_size, num_classes
        self.image_size, self.image_channels, self.log_dir = image_size, image_channels, log_dir
        reference = TrainingImages(data_dir, image_size, image_channels=image_channels)
        if min(num_samples, reference.num_images) < MIN_IMAGES:
            raise EvaluationError(
                f"--eval_num_samples {num_samples} with {reference.num_images} training image(s): the metrics need "
                f"at least {MIN_IMAGES} of each (precision and recall measure {NEAREST_K} nearest neighbours)"
            )
        self.ref_stats = self._reference_statistics(reference, weights_path)

    def _reference_statistics(self, reference, weights_path):
        """The training data's statistics on rank 0 (cached in log_dir/REFERENCE_CACHE); None elsewhere."""
        path = os.path.join(self.log_dir, REFERENCE_CACHE)
        fingerprint = input_fingerprint(reference, weights_path) if dist_util.get_rank() == 0 else None
        cached = load_cached_statistics(path, fingerprint) if fingerprint else None
        if dist_util.broadcast_object(cached is not None):
            return cached
        features = dataset_features(self.network, reference, self.batch_size, desc="training data features")
        if features is None:
            return None
        stats = reference_statistics(features)
        save_statistics(path, stats, fingerprint)
        return stats

    def __call__(self, model, step):
        """
        Sample with `model` (on every rank), score, and write the grid as a PNG
        in log_dir and to the logger's tensorboard output.

        :return: dict of the metrics (score's keys), the same on every rank.
        """
        parts, first_images = [], None
        indices = rank_indices(self.num_samples, dist_util.get_rank(), dist_util.get_world_size())
        for chunk in chunks(indices, self.batch_size):
            images = self._sample(model, chunk)
            first_images = images if first_images is None else first_images
            parts.append((chunk.start, extract_features(self.network, images)))
        features = _gather_in_order(parts)
        metrics = score(self.ref_stats, features) if features is not None else None
        if dist_util.get_rank() == 0:
            grid = image_grid(enlarge(first_images[:GRID_MAX_IMAGES], GRID_MIN_SIDE))
            write_png(os.path.join(self.log_dir, f"eval_samples_{step:06d}.png"), grid)
            logger.log_image("eval_samples", grid, step)
        return dist_util.broadcast_object(metrics)

    @torch.inference_mode()
    def _sample(self, model, chunk):
        """uint8 [len(chunk) x S x S x C] samples for these sample indices."""
        device = dist_util.dev()
        model_kwargs = {}
        if self.num_classes:
            model_kwargs["y"] = draw_labels(self.seed, chunk, self.num_classes).to(device)
        shape = (len(chunk), self.image_channels, self.image_size, self.image_size)
        x = self.diffusion.sample_loop(model, shape, sampler=self.sampler, model_kwargs=model_kwargs, device=device,
                                       generator=sample_generators(self.seed, chunk, device))
        return to_uint8_images(x)


def _gather_in_order(parts):
    """Every rank's [(first index, features)] concatenated in index order on rank 0; None elsewhere."""
    if dist_util.get_world_size() > 1:
        gathered = [None] * dist_util.get_world_size() if dist_util.get_rank() == 0 else None
        dist.gather_object(parts, gathered, dst=0)
        if dist_util.get_rank() != 0:
            return None
        parts = [part for rank_parts in gathered for part in rank_parts]
    parts.sort(key=lambda part: part[0])
    return {key: np.concatenate([features[key] for _, features in parts]) for key in parts[0][1]}
