"""
Write scikit-learn's handwritten digits as an image folder: the bundled dataset.

The data are the 1,797 8x8 images of `sklearn.datasets.load_digits` (shipped
inside scikit-learn, nothing is downloaded), gray levels 0..16 with the digit
bright on a dark background. Each image is written as an RGB PNG (R = G = B,
white digit on black, as in the data) named `{digit}_{index:05d}.png`, so
`load_data(..., class_cond=True)` numbers the classes 0..9 exactly as the
digits they show.

Upscaling from 8x8 to `--image_size` is bicubic, done on floating-point gray
levels and rounded once at the end. Bicubic gives smooth, continuous strokes
that look like pen on paper; nearest-neighbour would turn each source pixel
into a visible square block (a grid pattern the model would have to learn),
bilinear blurs the strokes more, and Lanczos adds ringing around them.

    python datasets/digits.py --out_dir data/digits --image_size 32
"""

import argparse
import os

import numpy as np
from PIL import Image

try:
    from . import prep_util
except ImportError:  # run as a script: python datasets/digits.py
    import prep_util

SOURCE = "sklearn.datasets.load_digits"
MAX_LEVEL = 16


def load_digit_arrays():
    """The digits as (images float [N x 8 x 8] in 0..16, labels int [N])."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise prep_util.PrepError("the digits dataset needs scikit-learn: pip install scikit-learn") from exc
    digits = load_digits()
    return digits.images, digits.target


def render_digit(levels, image_size):
    """
    Upscale one 8x8 array of gray levels (0..16) to an RGB PIL image.

    :param image_size: output side in pixels, at least 8.
    """
    gray = Image.fromarray(np.asarray(levels, dtype=np.float32) * np.float32(255.0 / MAX_LEVEL))
    gray = gray.resize((image_size, image_size), resample=Image.BICUBIC)
    pixels = np.clip(np.rint(np.asarray(gray)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert("RGB")


def write_digits(out_dir, image_size=32, overwrite=False, log=print):
    """
    Write all 1,797 digits to `out_dir` as `{digit}_{index:05d}.png`.

    Rerunning with the same `image_size` on a finished folder does nothing;
    see prep_util.build_folder for the overwrite rules.

    :return: the marker dict of the finished folder.
    """
    if image_size < 8:
        raise prep_util.PrepError(f"--image_size must be at least 8 (the digits are 8x8), got {image_size}")

    def write(folder):
        images, labels = load_digit_arrays()
        for index, (levels, label) in enumerate(zip(images, labels)):
            render_digit(levels, image_size).save(os.path.join(folder, f"{label}_{index:05d}.png"))
        return len(images)

    settings = {"source": SOURCE, "image_size": image_size}
    return prep_util.build_folder(out_dir, settings, write, overwrite=overwrite, log=log)


def main():
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="data/digits", help="folder to create (default: data/digits)")
    parser.add_argument("--image_size", type=int, default=32, help="side of the written images, >= 8 (default: 32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args()
    write_digits(args.out_dir, args.image_size, overwrite=args.overwrite)


if __name__ == "__main__":
    prep_util.run_cli(main)
