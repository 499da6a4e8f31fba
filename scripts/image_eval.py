"""
Score samples against reference images: Inception Score, FID, sFID, precision
and recall, as openai/guided-diffusion's evaluations/evaluator.py defines them,
with the FID Inception-v3 in PyTorch (improved_diffusion/inception.py, evaluation.py).

    python scripts/image_eval.py REF SAMPLES [--inception_weights PATH] [--batch_size B] [--output JSON]

REF and SAMPLES are each an npz whose arr_0 is uint8 [N x H x W x 3] (ADM's
reference batches, image_sample.py's samples) or a folder of images. The
reference's statistics are cached (REF.fid_stats.npz, or --ref_stats) and
reused while REF and the weights stay the same. Run on several ranks with
mpiexec or torchrun: the numbers are the same as on one.
"""

import os

from improved_diffusion import cli, dist_util, eval_features, eval_images, evaluation, inception
from improved_diffusion.errors import InputError, UsageError
from improved_diffusion.flags import parse
from improved_diffusion.io_util import atomic_write_json

ROWS = (
    ("Inception Score", "inception_score"),
    ("FID", "fid"),
    ("sFID", "sfid"),
    ("Precision", "precision"),
    ("Recall", "recall"),
)
FEW_IMAGES = 2048  # below the feature width, FID's covariance is singular and the score strongly biased


def parse_args(argv=None):
    args, _ = parse("image_eval", argv, __doc__)
    if args.batch_size < 1:
        raise UsageError("--batch_size must be at least 1")
    stem = args.samples.rstrip("/")
    args.output = args.output or (stem.removesuffix(".npz") + "_eval.json")
    args.ref_stats = args.ref_stats or args.ref.rstrip("/") + ".fid_stats.npz"
    return args


def reference_statistics(model, reader, args, weights_path):
    """On rank 0, REF's cached statistics or newly computed (and cached) ones; None on the other ranks."""
    fingerprint = eval_features.input_fingerprint(reader, weights_path) if dist_util.get_rank() == 0 else None
    cached = eval_features.load_cached_statistics(args.ref_stats, fingerprint) if fingerprint else None
    if dist_util.broadcast_object(cached is not None):
        print(f"reference statistics from {args.ref_stats}", flush=True)
        return cached
    features = eval_features.dataset_features(model, reader, args.batch_size, desc="reference features")
    if features is None:
        return None
    stats = evaluation.reference_statistics(features)
    if eval_features.save_statistics(args.ref_stats, stats, fingerprint):
        print(f"reference statistics cached in {args.ref_stats}", flush=True)
    return stats


def format_table(metrics):
    """The metrics as an aligned two-column table."""
    lines = []
    for label, key in ROWS:
        value = f"{metrics[key]:.4f}"
        if key == "inception_score":
            value += f" ± {metrics['inception_score_std']:.4f}"
        lines.append(f"{label:<16} {value}")
    return "\n".join(lines)


@cli.script
def main(argv=None):
    args = parse_args(argv)
    dist_util.setup_dist()
    try:
        readers = {"REF": eval_images.open_images(args.ref), "SAMPLES": eval_images.open_images(args.samples)}
        evaluation.check_inputs(readers)
        weights_path = inception.find_weights(args.inception_weights)
        model = inception.load_inception(weights_path, dist_util.dev())
    except evaluation.EvaluationError as exc:
        raise InputError(str(exc)) from exc
    if dist_util.get_rank() == 0 and min(r.num_images for r in readers.values()) < FEW_IMAGES:
        print(f"note: fewer than {FEW_IMAGES} images on one side: FID and sFID are strongly biased upwards "
              "(papers use 50,000 samples)", flush=True)
    ref_stats = reference_statistics(model, readers["REF"], args, weights_path)
    features = eval_features.dataset_features(model, readers["SAMPLES"], args.batch_size, desc="sample features")
    if dist_util.get_rank() == 0:
        metrics = evaluation.score(ref_stats, features)
        print(format_table(metrics), flush=True)
        record = dict(metrics, ref=os.path.abspath(args.ref), samples=os.path.abspath(args.samples),
                      num_ref=readers["REF"].num_images, num_samples=readers["SAMPLES"].num_images,
                      inception_weights=os.path.abspath(weights_path))
        atomic_write_json(args.output, record)
        print(f"wrote {args.output}", flush=True)
    dist_util.barrier()


if __name__ == "__main__":
    main()
