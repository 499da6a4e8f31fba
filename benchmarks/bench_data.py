"""
Images per second of image_datasets.load_data on a folder of random PNGs.

    python benchmarks/bench_data.py [--num_images 2000] [--source_size 64]
        [--image_size 64] [--batch_size 64] [--batches 60] [--workers 0,1,2]

Creates the folder in a temporary directory (or reuses --data_dir), times
load_data itself (listing and checking every file) and then `--batches`
batches after one warm-up batch, for each worker count. Prints a Markdown
table.
"""

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image

from improved_diffusion.image_datasets import load_data


def make_pngs(folder, count, size):
    """`count` random RGB PNGs of `size` x `size` pixels, named for 10 classes."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"c{i % 10}_{i:06d}.png"))


def measure(data_dir, args, workers):
    """(seconds in load_data, images per second over the timed batches)."""
    start = time.perf_counter()
    data = load_data(data_dir=data_dir, batch_size=args.batch_size, image_size=args.image_size, class_cond=True,
                     random_flip=True, num_workers=workers)
    setup = time.perf_counter() - start
    next(data)
    start = time.perf_counter()
    for _ in range(args.batches):
        next(data)
    rate = args.batches * args.batch_size / (time.perf_counter() - start)
    data.close()
    return setup, rate


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="")
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--source_size", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--workers", default="0,1,2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data_dir or os.path.join(scratch, "pngs")
        if not args.data_dir:
            make_pngs(data_dir, args.num_images, args.source_size)
        print(f"{args.num_images} PNGs of {args.source_size}px -> {args.image_size}px, batch {args.batch_size}")
        print("| num_workers | load_data (s) | images/s |")
        print("| --- | --- | --- |")
        for workers in (int(w) for w in args.workers.split(",")):
            setup, rate = measure(data_dir, args, workers)
            print(f"| {workers} | {setup:.2f} | {rate:.0f} |", flush=True)


if __name__ == "__main__":
    main()
