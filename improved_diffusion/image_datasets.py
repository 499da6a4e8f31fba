"""
Endless, exactly resumable batches of training images read from a folder.

`load_data` finds every .jpg/.jpeg/.png/.gif file under a folder (recursively,
local or any blobfile path), gives each process its own shard, checks every
file of the shard before training starts, and returns an `ImageDataIterator`.
Each epoch visits the shard in an order drawn from a NumPy generator seeded by
(seed, shard, epoch), so the iterator's position is three integers and a
resumed run sees exactly the batches the uninterrupted one would have.

Images are preprocessed as in the reference: halved with a box filter while
the short side is at least twice the target size, resized with bicubic
filtering so the short side is the target size, center-cropped, converted to
RGB and scaled to [-1, 1]. **New:** the target may be H x W (image_size a
pair): the image is then resized to cover H x W by the same rule (the side
that limits the scale playing the short side's part) and cropped to H x W,
at the center or, with `random_crop`, at a position drawn with the epoch's
order and flips (so resumed runs see the same crops).
"""

import atexit
import concurrent.futures
import itertools
import signal
import warnings
import weakref
from typing import NamedTuple

import blobfile as bf
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from . import dist_util
from .io_util import is_local

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")
_PROBE_THREADS = 8  # overlaps reads from network storage
_PROBE_CHUNK = 256
# Float value of each uint8 level, computed as (v / 127.5 - 1) in float32.
IMAGE_MODES = {1: "L", 3: "RGB"}  # PIL mode that images become, by image_channels
_LEVELS = np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1)


def load_data(
    *,
    data_dir,
    batch_size,
    image_size,
    class_cond=False,
    deterministic=False,
    random_flip=False,
    seed=0,
    shard=None,
    num_shards=None,
    num_workers=1,
    allow_mixed_channels=False,
    image_channels=3,
    random_crop=False,
):
    """
    An endless iterator of `(images, cond)` batches over the images in `data_dir`.

    `images` is float32 [N x C x H x W] in [-1, 1] with N = `batch_size`,
    H x W = `image_size` and C = `image_channels`; `cond` is {"y": int64 labels [N]} with `class_cond`,
    else {}. The class of a file is its name's prefix before the first "_",
    numbered in sorted order of all class names in the folder. The last
    incomplete batch of each epoch is dropped.

    :param image_size: S (square images, the reference's) or a pair (H, W).
    :param deterministic: visit each epoch in file order instead of shuffled.
    :param random_flip: mirror each image horizontally with probability 1/2.
    :param random_crop: crop each resized image to H x W at a uniformly drawn
        position instead of the center (before the flip).
    :param seed: seeds the epoch orders, flips and crops (with shard and epoch).
    :param shard, num_shards: this process reads files[shard::num_shards] of
        the sorted list; default: the torch.distributed rank and world size
        when a process group exists (then every rank must call this), else 0, 1.
    :param num_workers: decoding processes (0: decode in this process).
    :param allow_mixed_channels: accept images with different channel counts
        (grayscale, RGB, RGBA, CMYK, as in raw ImageNet); all become RGB.
    :param image_channels: 3 (RGB, the reference's) or 1 (every image
        converted to grayscale, whatever its mode; mixed modes are then fine).
    :raises ValueError: naming the folder or file, for a missing folder, a
        folder without images, a shard with fewer images than one batch, a
        file that is not a readable image, images with different channel
        counts, or (with `class_cond`) a file name without "_".
    """
    _check_arguments(batch_size, image_size, seed, num_workers)
    check_image_channels(image_channels)
    files = list_image_files(data_dir)
    class_names, labels = _class_labels(files) if class_cond else (None, None)
    shard, num_shards, collective = _resolve_shard(shard, num_shards)
    local_files = files[shard::num_shards]
    report = _survey_shard(local_files, len(files), shard, num_shards, batch_size, data_dir)
    reports = dist_util.all_gather_object(report) if collective else [report]
    _raise_data_errors(reports, allow_mixed_channels or image_channels == 1)
    return ImageDataIterator(
        local_files,
        labels[shard::num_shards] if class_cond else None,
        image_size=image_size,
        batch_size=batch_size,
        deterministic=deterministic,
        random_flip=random_flip,
        seed=seed,
        shard=shard,
        num_workers=num_workers,
        class_names=class_names,
        image_channels=image_channels,
        random_crop=random_crop,
    )


def check_image_channels(image_channels):
    """ValueError unless `image_channels` is 1 (grayscale) or 3 (RGB)."""
    if image_channels not in IMAGE_MODES:
        raise ValueError(f"--image_channels {image_channels} must be 3 (RGB) or 1 (grayscale)")


def image_hw(image_size):
    """(H, W) of an image size given as S (square) or as a pair (H, W); ValueError otherwise."""
    pair = (image_size, image_size) if _is_integer(image_size) else image_size
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_is_integer(v) and v >= 1 for v in pair)):
        raise ValueError(f"image_size must be an integer >= 1 or a pair (H, W) of them, got {image_size!r}")
    return int(pair[0]), int(pair[1])


def _is_integer(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_arguments(batch_size, image_size, seed, num_workers):
    image_hw(image_size)
    for name, value, least in (("batch_size", batch_size, 1), ("seed", seed, 0), ("num_workers", num_workers, 0)):
        if not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def list_image_files(data_dir):
    """
    Every image file under `data_dir`, walking folders depth first in sorted
    name order (the order the reference lists them in).

    :raises ValueError: if `data_dir` is missing, not a folder or holds no image.
    """
    if not data_dir:
        raise ValueError("data_dir is empty: give the folder that holds the training images")
    if not bf.exists(data_dir):
        raise ValueError(f"data_dir {data_dir} does not exist")
    if not bf.isdir(data_dir):
        raise ValueError(f"data_dir {data_dir} is not a folder")
    files = _walk(data_dir)
    if not files:
        extensions = ", ".join("." + e for e in IMAGE_EXTENSIONS)
        raise ValueError(f"no image files in {data_dir} (searched all subfolders for {extensions}, in any case)")
    return files


def _walk(folder):
    found = []
    for name in sorted(bf.listdir(folder)):
        path = bf.join(folder, name)
        if "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS:
            found.append(path)
        elif bf.isdir(path):
            found.extend(_walk(path))
    return found


def _class_labels(files):
    """(sorted class names, the class index of each file) from the prefixes before "_"."""
    prefixes = []
    for path in files:
        name = bf.basename(path)
        if "_" not in name:
            raise ValueError(
                f"class_cond needs file names that start with their class and an underscore "
                f"(like dog_0001.png), but {path} has no '_'"
            )
        prefixes.append(name.split("_", 1)[0])
    class_names = sorted(set(prefixes))
    index = {name: i for i, name in enumerate(class_names)}
    return class_names, [index[p] for p in prefixes]


def _resolve_shard(shard, num_shards):
    """(shard, num_shards, whether the ranks of a process group must agree on errors)."""
    if (shard is None) != (num_shards is None):
        raise ValueError("give both shard and num_shards, or neither")
    if shard is None:
        if dist_util.is_initialized():
            return dist_util.get_rank(), dist_util.get_world_size(), True
        return 0, 1, False
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, num_shards), got shard={shard}, num_shards={num_shards}")
    return shard, num_shards, False


class _ShardReport(NamedTuple):
    """What one shard's check found: an error message or None, and one file per channel count."""

    error: object
    channels: dict


def _survey_shard(files, total, shard, num_shards, batch_size, data_dir):
    if len(files) < batch_size:
        return _ShardReport(
            f"{data_dir} has {total} images; shard {shard} of {num_shards} gets {len(files)}, "
            f"fewer than one batch of {batch_size}: lower the batch size or use fewer processes",
            {},
        )
    channels = {}
    chunks = [files[i : i + _PROBE_CHUNK] for i in range(0, len(files), _PROBE_CHUNK)]
    pool = concurrent.futures.ThreadPoolExecutor(_PROBE_THREADS)
    try:
        results = itertools.chain.from_iterable(pool.map(_probe_all, chunks))
        for path, (count, error) in zip(files, results):
            if error is not None:
                return _ShardReport(error, channels)
            channels.setdefault(count, path)
    finally:
        pool.shutdown(cancel_futures=True)
    return _ShardReport(None, channels)


def _probe_all(paths):
    return [_probe(path) for path in paths]


def _probe(path):
    """(channel count, None) if `path`'s header and structure check out, else (None, message)."""
    try:
        with _open(path) as f, Image.open(f) as image:
            mode = image.mode
            image.verify()
    except Exception as exc:
        return None, f"cannot read image {path}: {exc}"
    return _channel_count(mode), None


def _open(path):
    """A binary file object for a local path (plain open, faster) or a blobfile URL."""
    return open(path, "rb") if is_local(path) else bf.BlobFile(path, "rb")


def _channel_count(mode):
    """Channels of a PIL mode, palette images counting as the colors they hold."""
    return {"P": 3, "PA": 4}.get(mode, Image.getmodebands(mode))


def _raise_data_errors(reports, allow_mixed_channels=False):
    """Raise the first shard's error, or one about mixed channel counts, identically on every rank."""
    for report in reports:
        if report.error is not None:
            raise ValueError(report.error)
    examples = {}
    for report in reports:
        for count, path in report.channels.items():
            examples.setdefault(count, path)
    if len(examples) > 1 and not allow_mixed_channels:
        kinds = "; ".join(f"{path} has {count}" for count, path in sorted(examples.items()))
        raise ValueError(
            f"images with different numbers of channels in one dataset ({kinds}); "
            f"convert them all to one mode (such as RGB) first, or pass --allow_mixed_channels True "
            f"to convert each to RGB while loading"
        )


class _BatchSpec(NamedTuple):
    """One batch to decode: shard-local file indices, flips, crop positions (or None), and the position after it."""

    indices: np.ndarray
    flips: np.ndarray
    crops: object
    epoch: int
    next_index: int


class _Schedule(NamedTuple):
    """Which images, flipped or not and cropped where, make up each batch of each epoch of one shard."""

    num_images: int
    batch_size: int
    seed: int
    shard: int
    deterministic: bool
    random_flip: bool
    random_crop: bool = False

    def epoch_draws(self, epoch):
        """
        (order of shard-local indices [num_images], flip flags [num_images],
        crop positions float [num_images x 2] in [0, 1) or None) for `epoch`,
        listed by position in the epoch; drawn in this order from one generator.
        """
        rng = np.random.default_rng([self.seed, self.shard, epoch])
        order = np.arange(self.num_images) if self.deterministic else rng.permutation(self.num_images)
        flips = rng.random(self.num_images) < 0.5 if self.random_flip else np.zeros(self.num_images, dtype=bool)
        crops = rng.random((self.num_images, 2)) if self.random_crop else None
        return order, flips, crops

    def batches(self, epoch, index):
        """Endless _BatchSpecs from position (`epoch`, `index`: images already taken in that epoch) on."""
        while True:
            order, flips, crops = self.epoch_draws(epoch)
            while index + self.batch_size <= self.num_images:
                end = index + self.batch_size
                yield _BatchSpec(order[index:end], flips[index:end], None if crops is None else crops[index:end],
                                 epoch, end)
                index = end
            epoch, index = epoch + 1, 0


def _ignore_stop_signals(_worker_id):
    """
    Decoding workers leave SIGTERM and SIGINT to the training process: a
    scheduler that signals every process of a job must not kill them before
    the training process has saved. They are stopped by their iterator's
    close(), or by its finalizer when it is collected or at exit (below),
    since multiprocessing's own exit handler would stop them with SIGTERM.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# The finalizers of every DataLoader iterator still running (see ImageDataIterator.__next__).
_LIVE_LOADERS = set()


@atexit.register  # registered after torch's and multiprocessing's exit handlers, so it runs before them
def _stop_live_loaders():
    for finalizer in list(_LIVE_LOADERS):
        finalizer()


def _shutdown_loader(batches):
    """Stop a DataLoader iterator's workers (its private method, looked up: absent with num_workers=0)."""
    _LIVE_LOADERS.difference_update([f for f in _LIVE_LOADERS if not f.alive])
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


class ImageDataIterator:
    """
    Endless iterator of `(images, cond)` batches over one shard of files, with
    `state_dict()` / `load_state_dict()` for exact resumption. Built by `load_data`.

    Attributes: `files` (this shard's, in listing order), `num_images`,
    `class_names` (sorted class prefixes of the whole dataset, or None
    without class labels).
    """

    def __init__(self, files, labels, *, image_size, batch_size, deterministic, random_flip, seed, shard,
                 num_workers, class_names=None, image_channels=3, random_crop=False):
        self.files = list(files)
        self.num_images = len(self.files)
        self.class_names = class_names
        self._decoder = _BatchDecoder(self.files, None if labels is None else np.asarray(labels, np.int64),
                                      image_hw(image_size), image_channels)
        self._schedule = _Schedule(self.num_images, batch_size, seed, shard, deterministic, random_flip, random_crop)
        self._num_workers = num_workers
        self._position = (0, 0)
        self._batches = None

    def __iter__(self):
        return self

    def __next__(self):
        """The next batch: float32 images [N x C x H x W] in [-1, 1] and the cond dict."""
        if self._batches is None:
            # The loader's own generator: seeding its workers must not draw from
            # torch's global generator, which dropout uses (exact resume).
            loader = DataLoader(self._decoder, batch_size=None, sampler=self._schedule.batches(*self._position),
                                num_workers=self._num_workers, collate_fn=_as_is,
                                generator=torch.Generator().manual_seed(self._schedule.seed),
                                worker_init_fn=_ignore_stop_signals)
            self._batches = iter(loader)
            # Stops the workers on close(), when this iterator is collected, or at exit
            # (_stop_live_loaders, before multiprocessing's exit handler, which cannot stop
            # workers that ignore SIGTERM), even while a traceback still holds the loader's iterator.
            self._finalizer = weakref.finalize(self, _shutdown_loader, self._batches)
            _LIVE_LOADERS.add(self._finalizer)
        images, labels, epoch, index = next(self._batches)
        self._position = (epoch, index)
        return images, ({} if labels is None else {"y": labels})

    def state_dict(self):
        """The position after the last batch returned, as plain data."""
        epoch, index = self._position
        return {"epoch": epoch, "index": index, "seed": self._schedule.seed, "shard": self._schedule.shard,
                "num_images": self.num_images}

    def load_state_dict(self, state):
        """Continue from a `state_dict()`: the next batch is the one that followed it."""
        if (state["shard"], state["num_images"]) != (self._schedule.shard, self.num_images):
            warnings.warn(
                f"data position saved for shard {state['shard']} of {state['num_images']} images, restored "
                f"into shard {self._schedule.shard} of {self.num_images}: the order will not match the saved run"
            )
        self.close()
        self._schedule = self._schedule._replace(seed=int(state["seed"]))
        self._position = (int(state["epoch"]), int(state["index"]))

    def epoch_plan(self, epoch):
        """(order of shard-local indices [num_images], flip flags [num_images]) for `epoch`."""
        order, flips, _ = self._schedule.epoch_draws(epoch)
        return order, flips

    def crop_plan(self, epoch):
        """
        The crop positions of `epoch`, float [num_images x 2] in [0, 1) listed
        as epoch_plan's order (None without random_crop): image k of the epoch
        is cropped at top = floor(u * (h - H + 1)), left = floor(v * (w - W + 1))
        of its h x w resized pixels, for (u, v) = crop_plan(epoch)[k].
        """
        return self._schedule.epoch_draws(epoch)[2]

    def close(self):
        """Stop the decoding workers now; the next batch starts new ones."""
        if self._batches is not None:
            self._batches = None
            self._finalizer()


def _as_is(batch):
    return batch


class _BatchDecoder:
    """Turns a _BatchSpec into (images, labels or None, epoch, next index); runs in loader workers."""

    def __init__(self, files, labels, image_size, image_channels):
        self.files = files
        self.labels = labels
        self.image_size = image_size
        self.image_channels = image_channels

    def __getitem__(self, spec):
        crops = [None] * len(spec.indices) if spec.crops is None else spec.crops
        pixels = np.stack([self._pixels(i, flip, crop) for i, flip, crop in zip(spec.indices, spec.flips, crops)])
        images = torch.from_numpy(_LEVELS[pixels.transpose(0, 3, 1, 2)])
        labels = None if self.labels is None else torch.from_numpy(self.labels[spec.indices])
        return images, labels, spec.epoch, spec.next_index

    def _pixels(self, i, flip, crop):
        pixels = load_image(self.files[i], self.image_size, self.image_channels, crop_position=crop)
        return pixels[:, ::-1] if flip else pixels


class ImageDataset(Dataset):
    """
    The reference's map-style dataset over one shard of `image_paths` (every
    num_shards-th path from index `shard`): item i is (float32 [3 x S x S] in
    [-1, 1], preprocessed as load_data's images, and {"y": int64 class} when
    `classes` is given, else {}). load_data does not use it.

    :param resolution: the image size S.
    :param classes: one integer class per path, or None.
    """

    def __init__(self, resolution, image_paths, classes=None, shard=0, num_shards=1):
        super().__init__()
        self.resolution = resolution
        self.local_images = list(image_paths)[shard::num_shards]
        self.local_classes = None if classes is None else list(classes)[shard::num_shards]

    def __len__(self):
        return len(self.local_images)

    def __getitem__(self, idx):
        pixels = load_image(self.local_images[idx], self.resolution)
        out = {} if self.local_classes is None else {"y": np.array(self.local_classes[idx], dtype=np.int64)}
        return _LEVELS[pixels.transpose(2, 0, 1)], out


def load_image(path, image_size, image_channels=3, crop_position=None):
    """
    The image at `path` as uint8 [H x W x C] (C = image_channels), preprocessed as for training.

    :param image_size: S (H = W = S) or (H, W).
    :param crop_position: None (center crop) or (u, v) in [0, 1)^2 (see crop).
    """
    try:
        with _open(path) as f:
            image = Image.open(f)
            image.load()
    except Exception as exc:
        raise ValueError(f"cannot decode image {path}: {exc}") from exc
    return crop(resize_to_cover(image, image_size, image_channels), image_size, crop_position)


def resize_and_center_crop(image, image_size, image_channels=3):
    """
    A PIL image as uint8 [H x W x C] (image_size S or (H, W)), RGB for C = 3
    and grayscale for C = 1: resized to cover H x W (resize_to_cover), then
    center-cropped.
    """
    return crop(resize_to_cover(image, image_size, image_channels), image_size)


def resize_to_cover(image, image_size, image_channels=3):
    """
    A PIL image as uint8 [h x w x C] with h >= H and w >= W, one of them equal
    (image_size S or (H, W)): box-halved while it would still cover H x W
    (for a square target: while the short side is at least 2 S), then
    bicubic-resized by the factor that makes it just cover H x W (each side
    rounded); resizing happens in the image's own mode, before the conversion
    to RGB (C = 3) or grayscale (C = 1).
    """
    height, width = image_hw(image_size)
    while image.height >= 2 * height and image.width >= 2 * width:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = max(height / image.height, width / image.width)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    return np.asarray(image.convert(IMAGE_MODES[image_channels])).reshape(image.height, image.width, -1)


def crop(pixels, image_size, position=None):
    """
    An H x W window of pixels [h x w x C] (image_size S or (H, W)): centered
    (offsets rounded down) when `position` is None, else at top =
    floor(u (h - H + 1)), left = floor(v (w - W + 1)) for position (u, v) in
    [0, 1)^2, so that every placement is equally likely for uniform (u, v).
    """
    height, width = image_hw(image_size)
    if position is None:
        top, left = (pixels.shape[0] - height) // 2, (pixels.shape[1] - width) // 2
    else:
        top = int(position[0] * (pixels.shape[0] - height + 1))
        left = int(position[1] * (pixels.shape[1] - width + 1))
    return pixels[top : top + height, left : left + width]
