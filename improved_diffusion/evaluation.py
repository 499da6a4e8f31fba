"""
Sample-quality metrics as openai/guided-diffusion's evaluations/evaluator.py
defines them (SPEC §14), in PyTorch, and the scoring of samples with them.

The metrics are plain functions of features, usable with any network:
`frechet_distance` (FID, sFID; `frechet_distance_to_features` for few samples),
`inception_score` and `precision_recall`. `score` computes all of them from
the FID Inception-v3's features (inception.py) of samples against a
reference's statistics (`reference_statistics`), and `TrainingEvaluator`
does so during training. The image inputs are read by eval_images.py; the
features of whole image sets and their cache are eval_features.py's.
"""

import os

import numpy as np
import torch
import torch.nn.functional as F

from . import dist_util, logger
from .eval_errors import EvaluationError
from .eval_features import dataset_features, gather_in_order, input_fingerprint, load_cached_statistics, save_statistics
from .eval_images import TrainingImages
from .image_datasets import image_hw
from .image_output import GRID_MAX_IMAGES, GRID_MIN_SIDE, enlarge, image_grid, to_uint8_images, write_png
from .inception import extract_features, find_weights, load_inception
from .sample_seeds import draw_labels, sample_generators
from .sharding import chunks, rank_indices

NEAREST_K = 3
MIN_IMAGES = NEAREST_K + 1
REFERENCE_CACHE = "eval_reference_stats.npz"

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


# ---------------------------------------------------------------- scoring


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


def reference_statistics(features):
    """The cached form of a reference's features: Gaussian fits of pool and spatial features, and the pool ones."""
    mu, sigma = feature_statistics(features["pool"])
    mu_s, sigma_s = feature_statistics(features["spatial"])
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s, "pool": features["pool"]}


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


class TrainingEvaluator:
    """
    Scores `num_samples` samples of a model against its training data (SPEC
    §14): sample i starts from the noise of sample_seeds' generator (seed, i),
    so every evaluation of a run draws the same noise, whatever the ranks.
    The training data's statistics are computed at construction, on all
    ranks, and cached in `log_dir` (reused by a run resumed there).

    :param diffusion: the (respaced) diffusion to sample with.
    :param image_size: S (square) or (H, W), as the model was trained.
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
        features = gather_in_order(parts)
        metrics = score(self.ref_stats, features) if features is not None else None
        if dist_util.get_rank() == 0:
            grid = image_grid(enlarge(first_images[:GRID_MAX_IMAGES], GRID_MIN_SIDE))
            write_png(os.path.join(self.log_dir, f"eval_samples_{step:06d}.png"), grid)
            logger.log_image("eval_samples", grid, step)
        return dist_util.broadcast_object(metrics)

    @torch.inference_mode()
    def _sample(self, model, chunk):
        """uint8 [len(chunk) x H x W x C] samples for these sample indices."""
        device = dist_util.dev()
        model_kwargs = {}
        if self.num_classes:
            model_kwargs["y"] = draw_labels(self.seed, chunk, self.num_classes).to(device)
        shape = (len(chunk), self.image_channels, *image_hw(self.image_size))
        x = self.diffusion.sample_loop(model, shape, sampler=self.sampler, model_kwargs=model_kwargs, device=device,
                                       generator=sample_generators(self.seed, chunk, device))
        return to_uint8_images(x)
