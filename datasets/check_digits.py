"""
Check that generated digit samples show the digits they were asked for.

Reads the npz the sampler writes (`arr_0` uint8 [N x S x S x 3], `arr_1` the
requested labels [N]) and maps every sample to scikit-learn's 8x8 digit
space: the mean of the color channels, an area-average (box) downsample to
8x8, gray levels rescaled to 0..16. A logistic-regression classifier reads
the result. It is trained on the real digits rendered at size S exactly as
datasets/digits.py writes them and mapped back the same way, so a perfect
sample looks to it like a training image; 25% of the real digits are held out
to report its own accuracy.

Reported: the share of samples classified as the requested digit, the mean
probability the classifier gives the requested digit, a per-digit table, and
the share of samples that lie as close to some real digit as real digits do
(nearest-neighbour distance in the 8x8 space within the 99th percentile of
held-out real digits'); noise or blobs fail that test even when the
classifier happens to name the right digit.

    python datasets/check_digits.py samples_100x32x32x3.npz --min_share 0.8

exits with status 1 when the share is below --min_share (default 0: report only).
"""

import argparse
import functools
import os
import zipfile

import numpy as np
from PIL import Image

try:
    from . import digits, prep_util
except ImportError:  # run as a script: python datasets/check_digits.py
    import digits
    import prep_util

NUM_CLASSES = 10
FEATURE_SIDE = 8
HELD_OUT = 0.25
NEIGHBOUR_QUANTILE = 0.99


def to_features(images):
    """
    Map images to the classifier's input: float [N x 64] gray levels in 0..16.

    :param images: uint8 [N x H x W x C] with C 1 or 3, or [N x H x W].
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        images = images.mean(axis=-1)
    if images.ndim != 3 or min(images.shape[1:]) < FEATURE_SIDE:
        raise prep_util.PrepError(
            f"expected images [N x H x W x 3] (or 1 channel) with H, W >= {FEATURE_SIDE}, got shape {images.shape}"
        )
    small = [
        np.asarray(Image.fromarray(image).resize((FEATURE_SIDE, FEATURE_SIDE), resample=Image.BOX))
        for image in images
    ]
    return np.stack(small).reshape(len(images), -1) * np.float32(digits.MAX_LEVEL / 255.0)


@functools.lru_cache(maxsize=4)
def fit_classifier(image_size):
    """
    Train the checker for samples of side `image_size`.

    :return: dict with the fitted `classifier`, `neighbours` (nearest-neighbour
        index of the training digits), `max_distance` (the in-distribution
        threshold) and `accuracy` on the held-out real digits.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.neighbors import NearestNeighbors

    levels, labels = digits.load_digit_arrays()
    features = to_features(np.stack([np.asarray(digits.render_digit(x, image_size)) for x in levels]))
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=HELD_OUT, stratify=labels, random_state=0
    )
    classifier = LogisticRegression(max_iter=5000).fit(x_train / digits.MAX_LEVEL, y_train)
    neighbours = NearestNeighbors(n_neighbors=1).fit(x_train)
    return {
        "classifier": classifier,
        "neighbours": neighbours,
        "max_distance": float(np.quantile(neighbours.kneighbors(x_test)[0], NEIGHBOUR_QUANTILE)),
        "accuracy": float(classifier.score(x_test / digits.MAX_LEVEL, y_test)),
    }


def check_samples(images, labels):
    """
    Score samples against the digits they were conditioned on.

    :param images: uint8 [N x S x S x 3] (as in the sampler's arr_0).
    :param labels: int [N] requested digits 0..9 (arr_1).
    :return: dict with `share` (classified as requested), `mean_confidence`
        (mean probability of the requested digit), `in_distribution`,
        `classifier_accuracy`, `num_samples`, `image_size` and `per_class`, a
        list of dicts (`digit`, `requested`, `share`, `confidence`,
        `predicted`: how many samples were classified as that digit).
    """
    images = np.asarray(images)
    if images.ndim not in (3, 4) or images.shape[1] != images.shape[2]:
        raise prep_util.PrepError(f"expected square images [N x S x S x 3], got shape {images.shape}")
    labels = _check_labels(labels, len(images))
    model = fit_classifier(int(images.shape[1]))
    features = to_features(images)
    probs = model["classifier"].predict_proba(features / digits.MAX_LEVEL)
    correct = probs.argmax(axis=1) == labels
    confidence = probs[np.arange(len(labels)), labels]
    distances = model["neighbours"].kneighbors(features)[0][:, 0]
    return {
        "num_samples": len(labels),
        "image_size": int(images.shape[1]),
        "classifier_accuracy": model["accuracy"],
        "share": float(correct.mean()),
        "mean_confidence": float(confidence.mean()),
        "in_distribution": float((distances <= model["max_distance"]).mean()),
        "per_class": _per_class(labels, probs.argmax(axis=1), correct, confidence),
    }


def _check_labels(labels, count):
    labels = np.asarray(labels)
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise prep_util.PrepError(f"expected {count} integer labels, got shape {labels.shape} of {labels.dtype}")
    if count == 0:
        raise prep_util.PrepError("no samples to check")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise prep_util.PrepError(f"labels must be digits 0..{NUM_CLASSES - 1}, found {labels.min()}..{labels.max()}")
    return labels


def _per_class(labels, predicted, correct, confidence):
    rows = []
    for digit in range(NUM_CLASSES):
        mask = labels == digit
        rows.append(
            {
                "digit": digit,
                "requested": int(mask.sum()),
                "share": float(correct[mask].mean()) if mask.any() else None,
                "confidence": float(confidence[mask].mean()) if mask.any() else None,
                "predicted": int((predicted == digit).sum()),
            }
        )
    return rows


def format_report(result):
    """A human-readable summary of a check_samples result."""
    size = result["image_size"]
    lines = [
        f"classifier accuracy on held-out real digits ({size}x{size}): {result['classifier_accuracy']:.3f}",
        f"samples: {result['num_samples']}",
        f"classified as the requested digit: {result['share']:.3f}",
        f"mean probability of the requested digit: {result['mean_confidence']:.3f}",
        f"as close to a real digit as real digits are: {result['in_distribution']:.3f}",
        "digit  requested  share  confidence  predicted",
    ]
    for row in result["per_class"]:
        share = "-" if row["share"] is None else f"{row['share']:.3f}"
        confidence = "-" if row["confidence"] is None else f"{row['confidence']:.3f}"
        lines.append(f"{row['digit']:>5}  {row['requested']:>9}  {share:>5}  {confidence:>10}  {row['predicted']:>9}")
    return "\n".join(lines)


def load_samples(path):
    """(images, labels) from a sampler npz; PrepError naming the file if it is not one."""
    if not os.path.isfile(path):
        raise prep_util.PrepError(f"samples file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise prep_util.PrepError(f"cannot read {path} as an npz file ({exc})") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise prep_util.PrepError(f"{path} holds a single array; expected an npz with arr_0 and arr_1")
    with data:
        if "arr_0" not in data.files or "arr_1" not in data.files:
            raise prep_util.PrepError(
                f"{path} needs arr_0 (images) and arr_1 (labels); sample a class-conditional model "
                f"(--class_cond True) to get labels"
            )
        try:
            return data["arr_0"], data["arr_1"]
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise prep_util.PrepError(f"cannot read the arrays in {path} ({exc})") from exc


def main():
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", help="npz written by scripts/image_sample.py with --class_cond True")
    parser.add_argument("--min_share", type=float, default=0.0, help="fail (exit 1) below this share (default: 0)")
    args = parser.parse_args()
    result = check_samples(*load_samples(args.samples))
    print(format_report(result))
    if result["share"] < args.min_share:
        raise SystemExit(f"FAIL: share {result['share']:.3f} is below --min_share {args.min_share}")


if __name__ == "__main__":
    prep_util.run_cli(main)
