"""
Costs of evaluation.py: FID Inception-v3 feature extraction (images/s),
precision and recall of two sets of random feature vectors (time and peak
memory), one Fréchet distance of 2048-wide statistics, and one of a few
samples' features against such statistics (as during training).

    python benchmarks/bench_eval.py [--batch_size 32] [--batches 3] [--image_size 32]
        [--num_vectors 50000] [--width 2048] [--fid_samples 1000] [--device cpu|cuda]

Each measurement runs in a fresh process (forked from a server that has
imported torch and evaluation.py, and nothing else), so its peak resident
memory (ru_maxrss) is its own; the table gives it beside the process's
resident memory before the measured call. The network has random weights:
the speed does not depend on them. Prints a Markdown table.
"""

import argparse
import multiprocessing
import resource
import time

import numpy as np
import torch

from improved_diffusion import evaluation, inception


def rss_mib():
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_features(args):
    """(seconds per batch, images/s) of extract_features after one warm-up batch."""
    model = inception.FIDInceptionV3().eval().to(args.device)
    images = np.random.default_rng(0).integers(0, 256, (args.batch_size, args.image_size, args.image_size, 3),
                                               dtype=np.uint8)
    inception.extract_features(model, images)
    start = time.perf_counter()
    for _ in range(args.batches):
        inception.extract_features(model, images)
    seconds = (time.perf_counter() - start) / args.batches
    return f"{seconds:.3f} s/batch", f"{args.batch_size / seconds:.1f} images/s"


def time_precision_recall(args):
    """Seconds of one precision_recall on two sets of num_vectors x width random vectors."""
    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.standard_normal((args.num_vectors, args.width), dtype=np.float32))
    fake = torch.from_numpy(rng.standard_normal((args.num_vectors, args.width), dtype=np.float32) * 1.1)
    start = time.perf_counter()
    precision, recall = evaluation.precision_recall(real, fake, device=args.device)
    return f"{time.perf_counter() - start:.1f} s", f"precision {precision:.3f}, recall {recall:.3f}"


def time_frechet(args):
    """Seconds of one frechet_distance of two width x width covariances."""
    rng = np.random.default_rng(0)
    stats = [evaluation.feature_statistics(rng.standard_normal((args.width + 10, args.width))) for _ in range(2)]
    start = time.perf_counter()
    evaluation.frechet_distance(*stats[0], *stats[1])
    return f"{time.perf_counter() - start:.2f} s", "-"


def time_frechet_to_features(args):
    """Seconds of one frechet_distance_to_features of fid_samples vectors against width-wide statistics."""
    rng = np.random.default_rng(0)
    stats = evaluation.feature_statistics(rng.standard_normal((args.width + 10, args.width)))
    features = rng.standard_normal((args.fid_samples, args.width))
    start = time.perf_counter()
    evaluation.frechet_distance_to_features(*stats, features)
    return f"{time.perf_counter() - start:.2f} s", "-"


def run_measurement(queue, name, args):
    before = rss_mib()
    queue.put((*MEASUREMENTS[name][1](args), before, rss_mib()))


MEASUREMENTS = {
    "features": ("FID Inception-v3 features, batch {batch_size} of {image_size} px (resized to 299)", time_features),
    "precision_recall": ("precision_recall, 2 x {num_vectors} vectors of width {width}, k = 3",
                         time_precision_recall),
    "frechet": ("frechet_distance of {width}-wide statistics", time_frechet),
    "frechet_to_features": ("frechet_distance_to_features, {fid_samples} samples against {width}-wide statistics",
                            time_frechet_to_features),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--num_vectors", type=int, default=50000)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--fid_samples", type=int, default=1000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "improved_diffusion.evaluation"])
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| measurement | time | result | RSS before (MiB) | peak RSS (MiB) |")
    print("| --- | --- | --- | --- | --- |")
    for name, (label, _) in MEASUREMENTS.items():
        queue = context.Queue()
        process = context.Process(target=run_measurement, args=(queue, name, args))
        process.start()
        seconds, result, before, peak = queue.get()
        process.join()
        print(f"| {label.format(**vars(args))} | {seconds} | {result} | {before:.0f} | {peak:.0f} |", flush=True)


if __name__ == "__main__":
    main()
