"""
The files image_restore.py reads: the images to restore (an npz as
image_sample.py writes it, or a folder of image files) and inpainting masks
(a PNG or an npz; the named ones are operators.make_mask's), each checked against
the model's image size and channel count, with an InputError naming the
file, both shapes and the fix.
"""

import os

import numpy as np
import torch
from PIL import Image

from .errors import InputError
from .operators import MASK_KINDS

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "gif")


def _describe(height, width, channels):
    return f"{height}x{width} with {channels} channel{'s' if channels != 1 else ''}"


def read_images(path):
    """
    The images of an npz (arr_0 uint8 [N x H x W x C], C = 1 or 3; arr_1
    int labels, optional) or of a folder's image files (sorted by name;
    grayscale files as 1 channel, others as RGB).

    :return: (uint8 NumPy [N x H x W x C], int64 labels [N] or None).
    """
    if os.path.isdir(path):
        return _read_folder(path), None
    if not os.path.isfile(path):
        raise InputError(
            f"--input {path} does not exist: give an npz (arr_0 uint8 [N x H x W x C]) or a folder of PNGs"
        )
    try:
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read --input {path} as an npz: {exc}") from exc
    images = arrays.get("arr_0")
    if images is None or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        found = "no arr_0" if images is None else f"arr_0 {images.dtype} {list(images.shape)}"
        raise InputError(
            f"--input {path} holds {found}: it must hold arr_0 uint8 [N x H x W x C] with C = 1 or 3, as "
            "image_sample.py writes it"
        )
    if len(images) == 0:
        raise InputError(f"--input {path} holds no images (arr_0 is empty)")
    labels = arrays.get("arr_1")
    if labels is not None and (labels.ndim != 1 or len(labels) != len(images)):
        raise InputError(f"--input {path}: arr_1 must hold one label per image, got shape {list(labels.shape)}")
    return images, None if labels is None else labels.astype(np.int64)


def _read_folder(folder):
    files = sorted(
        name for name in os.listdir(folder) if name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS
        and os.path.isfile(os.path.join(folder, name))
    )
    if not files:
        raise InputError(
            f"--input {folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)}): put the images to restore "
            "there, or give an npz"
        )
    images = [_read_image(os.path.join(folder, name)) for name in files]
    shapes = {image.shape: name for image, name in zip(images, files)}
    if len(shapes) > 1:
        examples = ", ".join(f"{name} is {_describe(*shape)}" for shape, name in list(shapes.items())[:2])
        raise InputError(f"the images in --input {folder} differ ({examples}): give images of one size and mode")
    return np.stack(images)


def _read_image(path):
    """uint8 [H x W x C]: C = 1 for a grayscale file, else 3 (RGB)."""
    try:
        with Image.open(path) as image:
            gray = image.mode in ("1", "L", "LA", "I", "I;16", "F")
            pixels = np.asarray(image.convert("L" if gray else "RGB"))
    except OSError as exc:
        raise InputError(f"cannot read the image {path}: {exc}") from exc
    return pixels[..., None] if gray else pixels


def check_images(images, path, height, width, channels):
    """An InputError naming both when the images [N x H x W x C] are not the model's size and channel count."""
    if tuple(images.shape[1:]) != (height, width, channels):
        raise InputError(
            f"--input {path} holds images of {_describe(*images.shape[1:])} and the model makes "
            f"{_describe(height, width, channels)}: give images of the model's size and channels "
            f"(--image_size and --image_channels come from the model's flags.json)"
        )


def read_mask(path, height, width, channels, num_images):
    """
    Inpainting's mask from a file, for images of H x W with C channels, 1 = known.

    :param path: a PNG (white = known; grayscale: one channel for all, RGB:
        one per channel) or an npz (arr_0 [H x W], [H x W x C] or
        [N x H x W x C]; nonzero, or >= 128 for uint8, = known).
    :param num_images: N, the number of input images a per-image mask must have.
    :return: float tensor [C' x H x W] or [N x C' x H x W], C' = 1 or C.
    """
    if not os.path.isfile(path):
        raise InputError(f"--mask {path} is neither a file nor one of {', '.join(MASK_KINDS)}")
    values = _read_mask_npz(path) if path.lower().endswith(".npz") else _read_image(path) >= 128
    if values.ndim == 2:
        values = values[..., None]
    mask = torch.from_numpy(np.ascontiguousarray(np.moveaxis(values.astype(np.float32), -1, -3)))
    size, mask_channels, batch = tuple(mask.shape[-2:]), mask.shape[-3], tuple(mask.shape[:-3])
    if size != (height, width) or mask_channels not in (1, channels) or batch not in ((), (num_images,)):
        count = f"{batch[0]} masks of " if batch else ""
        raise InputError(
            f"--mask {path} is {count}{_describe(*size, mask_channels)} and the model's images are "
            f"{_describe(height, width, channels)}: give a mask of {height}x{width} with 1 or {channels} channels"
            + (f", one for all images or one per input image ({num_images})" if batch else "")
        )
    return mask


def _read_mask_npz(path):
    try:
        with np.load(path) as data:
            values = data["arr_0"] if "arr_0" in data.files else None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read --mask {path} as an npz: {exc}") from exc
    if values is None or values.ndim not in (2, 3, 4):
        raise InputError(f"--mask {path} must hold arr_0 [H x W], [H x W x C] or [N x H x W x C] (1 = known)")
    return values >= 128 if values.dtype == np.uint8 else values != 0
