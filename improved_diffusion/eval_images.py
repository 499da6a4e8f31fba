"""
The image sets the evaluation reads, each as batches of uint8 [B x H x W x C]:
an npz's `arr_0` (NpzImages), a folder of image files (FolderImages), and a
training folder as training sees it (TrainingImages).
"""

import os
import zipfile

import numpy as np
from PIL import Image

from .eval_errors import EvaluationError
from .image_datasets import image_hw, list_image_files, load_image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "bmp", "webp")
REFERENCE_LIMIT = 50000  # training images scored against during training, evenly spaced over the folder
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


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


class TrainingImages:
    """
    A training folder's images as training sees them (resized and centre-cropped
    to `image_size`, S or (H, W), RGB or, with image_channels 1, grayscale), at
    most `limit` of them, evenly spaced in file order.
    """

    def __init__(self, data_dir, image_size, limit=REFERENCE_LIMIT, image_channels=3):
        files = list_image_files(data_dir)
        if len(files) > limit:
            files = [files[i * len(files) // limit] for i in range(limit)]
        self.path, self.files, self.image_size, self.image_channels = data_dir, files, image_size, image_channels
        self.num_images, self.image_shape = len(files), (*image_hw(image_size), image_channels)

    def batches(self, batch_size, wanted=lambda index: True):
        """Yield (batch index, uint8 [B x H x W x C]) for the batches whose index `wanted` accepts."""
        for index, start in enumerate(range(0, self.num_images, batch_size)):
            if wanted(index):
                files = self.files[start : start + batch_size]
                yield index, np.stack([load_image(f, self.image_size, self.image_channels) for f in files])
