"""The metrics of evaluation.py against independent computations, the FID Inception-v3's outputs, and its inputs."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from improved_diffusion import eval_images, evaluation
from improved_diffusion import inception as fid_inception  # the name "inception" is the network fixture
from improved_diffusion.evaluation import EvaluationError

scipy_linalg = pytest.importorskip("scipy.linalg")


def random_covariance(rng, dim, samples=None):
    """A random positive-definite (or, with few `samples`, singular) [dim x dim] covariance."""
    points = rng.normal(size=(samples or 3 * dim, dim)) * rng.uniform(0.2, 3.0, size=dim)
    return np.atleast_2d(np.cov(points, rowvar=False))


# ---------------------------------------------------------------- Fréchet distance


def test_frechet_distance_matches_scipy_sqrtm_on_random_statistics():
    rng = np.random.default_rng(0)
    for dim in (1, 4, 12):
        mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
        sigma1, sigma2 = random_covariance(rng, dim), random_covariance(rng, dim)
        cross = scipy_linalg.sqrtm(sigma1 @ sigma2).real
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * cross)
        assert evaluation.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_commuting_covariances_has_its_closed_form():
    """Covariances with one eigenbasis: d^2 = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(1)
    basis, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.1, 4.0, 6), rng.uniform(0.1, 4.0, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = evaluation.frechet_distance(mu1, basis @ np.diag(a) @ basis.T, mu2, basis @ np.diag(b) @ basis.T)
    assert got == pytest.approx(expected, rel=1e-9)
    assert evaluation.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_is_symmetric_zero_on_itself_and_finite_for_singular_covariances():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    sigma1, sigma2 = random_covariance(rng, 10, samples=4), random_covariance(rng, 10, samples=5)
    forward = evaluation.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert forward == pytest.approx(evaluation.frechet_distance(mu2, sigma2, mu1, sigma1), rel=1e-7)
    assert abs(evaluation.frechet_distance(mu1, sigma1, mu1, sigma1)) < 1e-7 * np.trace(sigma1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * scipy_linalg.sqrtm(sigma1 @ sigma2).real)
    assert forward == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("samples", [2, 5, 12, 30])
def test_frechet_distance_to_features_has_the_closed_form_of_commuting_covariances(samples):
    """
    Features whose covariance shares sigma1's eigenbasis: d^2 = |mu1 - mu2|^2 +
    sum (sqrt(a_i) - sqrt(b_i))^2, with b_i = 0 past the samples' rank. The
    N x N route (N <= D) is exact; the D x D one adds square roots of rounding
    errors for each zero eigenvalue.
    """
    dim, rng = 12, np.random.default_rng(samples)
    rank = min(samples - 1, dim)
    basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    centred, _ = np.linalg.qr(np.column_stack([np.ones(samples), rng.normal(size=(samples, samples - 1))]))
    spread = rng.uniform(0.5, 3.0, size=rank)
    # Orthonormal columns orthogonal to the ones vector: the samples' mean is mu2, their covariance diagonal.
    offsets = centred[:, 1 : rank + 1] * spread @ basis[:, :rank].T * (samples - 1) ** 0.5
    a, b = rng.uniform(0.1, 4.0, dim), np.concatenate([spread**2, np.zeros(dim - rank)])
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    sigma1 = basis @ np.diag(a) @ basis.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = evaluation.frechet_distance_to_features(mu1, sigma1, mu2 + offsets)
    assert got == pytest.approx(expected, rel=1e-10)
    full = evaluation.frechet_distance(mu1, sigma1, *evaluation.feature_statistics(mu2 + offsets))
    assert full == pytest.approx(expected, rel=1e-7)
    with pytest.raises(EvaluationError, match="mismatched statistics"):
        evaluation.frechet_distance_to_features(mu1[:4], sigma1[:4, :4], mu2 + offsets)


def test_feature_statistics_are_mean_and_unbiased_covariance_in_float64():
    features = np.random.default_rng(3).normal(size=(50, 3)).astype(np.float32)
    mu, sigma = evaluation.feature_statistics(features)
    centered = features.astype(np.float64) - features.mean(0, dtype=np.float64)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, centered.T @ centered / 49, rtol=1e-12)
    with pytest.raises(EvaluationError, match="at least 2"):
        evaluation.feature_statistics(features[:1])


def test_frechet_distance_rejects_statistics_of_different_widths():
    with pytest.raises(EvaluationError, match="mismatched statistics"):
        evaluation.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------- Inception Score


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = evaluation.inception_score(np.zeros((40, 10)), split_size=10)
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_distinct_classes_is_the_number_of_classes():
    classes = 7
    logits = 60.0 * np.eye(classes)[np.arange(35) % classes]
    mean, _ = evaluation.inception_score(logits, split_size=35)
    assert mean == pytest.approx(classes, rel=1e-6)


def test_inception_score_matches_its_formula_over_uneven_splits():
    logits = np.random.default_rng(4).normal(scale=3.0, size=(23, 5))
    scores = []
    for start in range(0, 23, 10):
        p = np.exp(logits[start : start + 10])
        p /= p.sum(1, keepdims=True)
        p_y = p.mean(0)
        scores.append(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p_y)), axis=1))))
    mean, std = evaluation.inception_score(logits, split_size=10)
    assert len(scores) == 3
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-8)


# ---------------------------------------------------------------- precision and recall


def brute_force_precision_recall(real, fake, k):
    """Kynkäänniemi et al.'s definition with explicit loops, in float64."""
    real, fake = real.astype(np.float64), fake.astype(np.float64)

    def radius(points, i):
        return sorted(np.linalg.norm(points[i] - q) for j, q in enumerate(points) if j != i)[k - 1]

    def inside(x, points):
        return any(np.linalg.norm(x - q) <= radius(points, j) for j, q in enumerate(points))

    return np.mean([inside(f, real) for f in fake]), np.mean([inside(r, fake) for r in real])


def test_precision_recall_match_brute_force_on_overlapping_sets():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(30, 4)).astype(np.float32)
    fake = (rng.normal(size=(22, 4)) * 0.7 + 0.8).astype(np.float32)
    for k in (1, 3):
        expected = brute_force_precision_recall(real, fake, k)
        assert 0 < expected[0] < 1 and 0 < expected[1] < 1
        assert evaluation.precision_recall(real, fake, k=k) == pytest.approx(expected, abs=1e-12)


def test_manifold_radii_are_kth_neighbour_distances():
    points = np.random.default_rng(6).normal(size=(12, 3))
    distances = np.linalg.norm(points[:, None] - points[None], axis=2)
    expected = np.sort(distances, axis=1)[:, 3] ** 2
    got = evaluation.manifold_radii(torch.tensor(points), k=3, batch_size=5)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-8)


def test_precision_recall_in_batches_equal_all_at_once():
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(41, 6)), rng.normal(size=(37, 6)) + 0.5
    whole = evaluation.precision_recall(real, fake, batch_size=1000)
    assert 0 < whole[0] < 1 and 0 < whole[1] < 1
    for batch_size in (1, 4, 40):
        assert evaluation.precision_recall(real, fake, batch_size=batch_size) == whole


def test_precision_recall_limiting_cases():
    rng = np.random.default_rng(8)
    real = rng.normal(size=(20, 5))
    assert evaluation.precision_recall(real, real.copy()) == (1.0, 1.0)
    assert evaluation.precision_recall(real, rng.normal(size=(15, 5)) + 100.0) == (0.0, 0.0)
    # Fakes all at one real point: everything inside the real manifold, but the fakes' balls have radius 0.
    collapsed = np.repeat(real[:1], 10, axis=0)
    assert evaluation.precision_recall(real, collapsed) == (1.0, 1 / 20)


def test_precision_recall_need_more_than_k_vectors_of_one_width():
    with pytest.raises(EvaluationError, match="more than 3 feature vectors"):
        evaluation.precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))
    with pytest.raises(EvaluationError, match="of one width"):
        evaluation.precision_recall(np.zeros((10, 2)), np.zeros((10, 3)))


# ---------------------------------------------------------------- the network


def test_tf1_resize_samples_at_i_times_in_over_out():
    x = torch.randn(1, 2, 5, 3, dtype=torch.float64)
    out = fid_inception.resize_bilinear_tf1(x, 7)
    expected = np.zeros((1, 2, 7, 7))
    for i, j in itertools.product(range(7), range(7)):
        y, z = i * 5 / 7, j * 3 / 7
        y0, z0 = int(y), int(z)
        y1, z1 = min(y0 + 1, 4), min(z0 + 1, 2)
        a, b = y - y0, z - z0
        v = x[0].numpy()
        expected[0, :, i, j] = ((1 - a) * (1 - b) * v[:, y0, z0] + (1 - a) * b * v[:, y0, z1]
                                + a * (1 - b) * v[:, y1, z0] + a * b * v[:, y1, z1])
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)
    square = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(fid_inception.resize_bilinear_tf1(square, 4), square)


def random_inception(seed=0):
    """
    A FIDInceptionV3 with random weights whose activations keep their scale
    through the depth (He initialisation, random batch-norm statistics), in
    eval mode: the real weights cannot be downloaded here.
    """
    generator = torch.Generator().manual_seed(seed)
    model = fid_inception.FIDInceptionV3().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0, (2 / fan_in) ** 0.5, generator=generator)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.1, 0.1, generator=generator)
        model.fc.weight.normal_(0, 0.05, generator=generator)
        model.fc.bias.fill_(1.0)
    return model


@pytest.fixture(scope="module")
def inception():
    return random_inception()


def test_network_gives_pool_logits_and_spatial_features_from_one_forward(inception):
    images = np.random.default_rng(9).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    features = fid_inception.extract_features(inception, images)
    assert features["pool"].shape == (2, 2048)
    assert features["logits"].shape == (2, 1008)
    assert features["spatial"].shape == (2, 7 * 17 * 17)
    # The evaluator's logits leave the softmax layer's bias out.
    weight = inception.fc.weight.detach().numpy()
    np.testing.assert_allclose(features["logits"], features["pool"] @ weight.T, rtol=1e-4, atol=1e-5)
    assert np.all(features["spatial"] >= 0) and np.all(features["pool"] >= 0)
    assert not np.allclose(features["pool"][0], features["pool"][1])


def test_weights_load_strictly_and_bad_files_are_named(inception, tmp_path):
    path = tmp_path / fid_inception.WEIGHTS_FILENAME
    torch.save(inception.state_dict(), path)
    loaded = fid_inception.load_inception(str(path))
    torch.testing.assert_close(loaded.state_dict(), inception.state_dict())
    state = inception.state_dict()
    state.pop("fc.bias")
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(EvaluationError, match="is not the FID Inception-v3 state dict"):
        fid_inception.load_inception(str(tmp_path / "partial.pth"))
    with pytest.raises(EvaluationError, match="does not exist"):
        fid_inception.load_inception(str(tmp_path / "missing.pth"))


def test_missing_weights_error_says_which_file_to_put_where(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(EvaluationError) as error:
        fid_inception.find_weights("")
    message = str(error.value)
    assert fid_inception.WEIGHTS_FILENAME in message and fid_inception.WEIGHTS_URL in message
    assert str(tmp_path / "hub" / "checkpoints" / fid_inception.WEIGHTS_FILENAME) in message
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / fid_inception.WEIGHTS_FILENAME).write_bytes(b"")
    assert fid_inception.find_weights("") == str(tmp_path / "hub" / "checkpoints" / fid_inception.WEIGHTS_FILENAME)


# ---------------------------------------------------------------- image inputs


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_images_are_read_in_batches(tmp_path, save):
    images = np.random.default_rng(10).integers(0, 256, size=(7, 4, 5, 3), dtype=np.uint8)
    save(tmp_path / "x.npz", images, np.arange(7))
    reader = eval_images.open_images(str(tmp_path / "x.npz"))
    assert reader.num_images == 7 and reader.image_shape == (4, 5, 3)
    batches = list(reader.batches(3))
    assert [index for index, _ in batches] == [0, 1, 2]
    np.testing.assert_array_equal(np.concatenate([b for _, b in batches]), images)
    (index, last), = reader.batches(3, wanted=lambda i: i == 2)
    assert index == 2
    np.testing.assert_array_equal(last, images[6:])


@pytest.mark.parametrize(
    "arrays, needle",
    [
        ({"images": np.zeros((2, 4, 4, 3), np.uint8)}, "has no arr_0"),
        ({"arr_0": np.zeros((2, 4, 4, 3), np.float32)}, "must be uint8"),
        ({"arr_0": np.zeros((2, 4, 4), np.uint8)}, "must be uint8"),
    ],
)
def test_bad_npz_files_are_named(tmp_path, arrays, needle):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(EvaluationError, match=needle):
        eval_images.open_images(str(tmp_path / "bad.npz"))


def test_folder_images_are_rgb_in_sorted_order_and_of_one_size(tmp_path):
    rng = np.random.default_rng(11)
    pixels = rng.integers(0, 256, size=(3, 6, 6, 3), dtype=np.uint8)
    (tmp_path / "sub").mkdir()
    Image.fromarray(pixels[0]).save(tmp_path / "a.png")
    Image.fromarray(pixels[1]).save(tmp_path / "sub" / "b.png")
    Image.fromarray(pixels[2, :, :, 0], "L").save(tmp_path / "c.png")
    reader = eval_images.open_images(str(tmp_path))
    (_, batch), = reader.batches(8)
    np.testing.assert_array_equal(batch[0], pixels[0])
    np.testing.assert_array_equal(batch[1], np.repeat(pixels[2, :, :, :1], 3, axis=2))
    np.testing.assert_array_equal(batch[2], pixels[1])
    Image.fromarray(rng.integers(0, 256, size=(8, 6, 3), dtype=np.uint8)).save(tmp_path / "d.png")
    with pytest.raises(EvaluationError, match="differ in size"):
        eval_images.open_images(str(tmp_path))
    with pytest.raises(EvaluationError, match="does not exist"):
        eval_images.open_images(str(tmp_path / "nothing"))
