"""
Helpers shared by the dataset preparation scripts in this folder.

- `resize_center_crop`: the resize rule `improved_diffusion.load_data` applies
  (SPEC §9), so an image written at size S is read back unchanged.
- `build_folder`: writes an output folder all-or-nothing. Files go to a
  temporary sibling `OUT.partial-XXXX`; a marker file `.complete` (JSON: the
  settings that produced the folder and the image count) is written last and
  the folder is renamed to `OUT` only then. A folder without the marker is
  never mistaken for a finished one.
"""

import json
import os
import shutil
import tempfile

from PIL import Image

MARKER = ".complete"


class PrepError(Exception):
    """A dataset source or output folder is missing, malformed or in the way."""


def resize_center_crop(image, size):
    """
    Resize a PIL image so its short side is `size`, center-crop to a square.

    While the image is at least twice the target it is halved with a box
    filter; the remaining step is bicubic. Returns an RGB image `size x size`.
    """
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    left = (image.width - size) // 2
    top = (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def read_marker(folder):
    """The parsed marker of a finished output folder, or None if there is none."""
    path = os.path.join(folder, MARKER)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            marker = json.load(f)
        except ValueError:
            marker = None
    if not isinstance(marker, dict):
        raise PrepError(f"{path} is not a valid marker file; pass --overwrite to rebuild")
    return marker


def build_folder(out_dir, settings, write, overwrite=False, log=print):
    """
    Create `out_dir` by running `write(tmp_dir)` in a temporary sibling folder.

    :param settings: JSON-serializable dict describing the inputs (source,
        sizes, ...); stored in the marker and compared on reruns.
    :param write: callable filling the folder it is given and returning the
        number of images written.
    :param overwrite: replace an existing `out_dir`, only once the new one is
        complete.
    :return: the marker dict of the finished folder.
    :raises PrepError: `out_dir` exists and is not a finished folder with the
        same settings, and `overwrite` is False.
    """
    out_dir = os.path.abspath(out_dir)
    existing = _check_existing(out_dir, settings, overwrite)
    if existing is not None:
        log(f"{out_dir} is already complete ({existing['images']} images); nothing to do")
        return existing
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=name + ".partial-", dir=parent)
    try:
        marker = {"settings": settings, "images": write(tmp_dir)}
        with open(os.path.join(tmp_dir, MARKER), "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=2, sort_keys=True)
            f.write("\n")
        _swap_in(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    log(f"wrote {marker['images']} images to {out_dir}")
    return marker


def _check_existing(out_dir, settings, overwrite):
    """Return the marker if `out_dir` is already finished as asked; raise if it is in the way."""
    if not os.path.exists(out_dir):
        return None
    if not os.path.isdir(out_dir):
        raise PrepError(f"output path {out_dir} exists and is not a folder")
    if overwrite or not os.listdir(out_dir):
        return None
    marker = read_marker(out_dir)
    if marker is None:
        raise PrepError(
            f"output folder {out_dir} is not empty and has no {MARKER} marker "
            f"(not a finished output of this script); pass --overwrite to replace it"
        )
    if marker.get("settings") != settings:
        raise PrepError(
            f"output folder {out_dir} was built with different settings "
            f"({marker.get('settings')} instead of {settings}); pass --overwrite to replace it"
        )
    return marker


def _swap_in(tmp_dir, out_dir):
    """Rename the finished `tmp_dir` to `out_dir`, removing any old `out_dir` after the swap."""
    if not os.path.exists(out_dir):
        os.rename(tmp_dir, out_dir)
        return
    parent, name = os.path.split(out_dir)
    old_dir = tempfile.mkdtemp(prefix=name + ".old-", dir=parent)
    os.rename(out_dir, os.path.join(old_dir, name))
    os.rename(tmp_dir, out_dir)
    shutil.rmtree(old_dir)


def run_cli(main):
    """Run `main()`, turning a PrepError into a one-line message and exit status 1."""
    try:
        main()
    except PrepError as exc:
        raise SystemExit(f"error: {exc}") from None
