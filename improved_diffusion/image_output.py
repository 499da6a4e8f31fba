"""
Images out of a sampling run: float tensors to uint8 arrays and back, the
npz of SPEC §10 (written atomically), a PNG grid beside it and, on request,
one PNG per sample.
"""

import io
import math

import blobfile as bf
import numpy as np
import torch
from PIL import Image

from . import logger
from .io_util import atomic_folder, atomic_open, atomic_write_bytes

GRID_MAX_IMAGES = 64
GRID_MIN_SIDE = 32  # smaller samples are shown enlarged in the grid (the npz keeps them as they are)


def to_uint8_images(x):
    """float [N x C x H x W] in [-1, 1] -> uint8 NumPy [N x H x W x C], rounded to the nearest level."""
    x = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def from_uint8_images(images, device):
    """uint8 NumPy [N x H x W x C] -> float32 tensor [N x C x H x W] in [-1, 1] on `device`."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


def write_npz(path, **arrays):
    """Save NumPy arrays (memory-mapped ones are streamed) as an npz at `path`, atomically."""
    with atomic_open(path) as f:
        np.savez(f, **arrays)


def write_png(path, image):
    """Save a uint8 [H x W x C] image (C = 1 or 3) as a PNG, atomically."""
    atomic_write_bytes(path, png_bytes(image))


def png_bytes(image):
    """A uint8 [H x W x C] image (C = 1 or 3) encoded as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def enlarge(images, min_side):
    """
    Repeat each pixel k times along each axis, with the least k that makes
    both sides at least min_side: uint8 [N x H x W x C] -> [N x kH x kW x C].
    """
    factor = max(1, math.ceil(min_side / min(images.shape[1:3])))
    return images.repeat(factor, axis=1).repeat(factor, axis=2)


def image_grid(images, pad=2, columns=None):
    """
    Tile images row by row in a grid separated by `pad` black pixels.

    :param images: uint8 [N x H x W x C], N >= 1.
    :param columns: images per row (None: a near-square grid).
    :return: uint8 [rows*(H+pad)+pad x cols*(W+pad)+pad x C].
    """
    n, h, w, c = images.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for k, image in enumerate(images):
        top, left = pad + (k // cols) * (h + pad), pad + (k % cols) * (w + pad)
        grid[top : top + h, left : left + w] = image
    return grid


def save_samples(images, labels=None, save_pngs=False, log_dir=None, name="samples"):
    """
    Write {name}_{N}x{H}x{W}x{C}.npz (arr_0 images, arr_1 labels when given),
    a PNG grid of the first GRID_MAX_IMAGES beside it (enlarged to GRID_MIN_SIDE
    pixels when smaller) and, with `save_pngs`, a
    folder with one PNG per sample; print the paths.

    :param images: uint8 [N x H x W x C].
    :param labels: int [N] or None.
    :return: (npz_path, grid_path).
    """
    log_dir = log_dir or logger.get_dir()
    stem = bf.join(log_dir, f"{name}_" + "x".join(str(d) for d in images.shape))
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}
    write_npz(stem + ".npz", **arrays)
    write_png(stem + "_grid.png", image_grid(enlarge(images[:GRID_MAX_IMAGES], GRID_MIN_SIDE)))
    print(f"samples: {stem}.npz\ngrid: {stem}_grid.png", flush=True)
    if save_pngs:
        with atomic_folder(stem + "_pngs") as folder:
            for index, image in enumerate(images):
                with bf.BlobFile(bf.join(folder, f"{index:06d}.png"), "wb") as f:
                    f.write(png_bytes(image))
        print(f"pngs: {stem}_pngs/", flush=True)
    return stem + ".npz", stem + "_grid.png"
