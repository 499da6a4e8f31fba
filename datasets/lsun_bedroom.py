"""
Turn an LSUN LMDB export (for example `bedroom_train_lmdb/`) into an image folder.

Each LMDB value is an encoded image (WebP in the official export; JPEG and
PNG work too). Images are taken in key order, resized so the short side is
`--image_size` (halving with a box filter while at least twice as large, then
bicubic: the rule `load_data` applies, so it reads them back unchanged),
center-cropped to a square and saved as lossless PNG `bedroom_{index:07d}.png`.
PNG avoids a second round of lossy compression, at a disk cost of roughly
150 KB per 256x256 image (about 450 GB for the 3 million training images);
`--max_images` writes only the first N.

Needs the optional `lmdb` package (pip install lmdb).

    python datasets/lsun_bedroom.py bedroom_train_lmdb --out_dir data/lsun_bedroom --image_size 256
"""

import argparse
import io
import os

from PIL import Image
from tqdm import tqdm

try:
    from . import prep_util
except ImportError:  # run as a script: python datasets/lsun_bedroom.py
    import prep_util

PREFIX = "bedroom"


def _lmdb():
    """The optional lmdb module, or a PrepError saying how to install it."""
    try:
        import lmdb
    except ImportError as exc:
        raise prep_util.PrepError("reading LSUN needs the lmdb package: pip install lmdb") from exc
    return lmdb


def open_lmdb(path):
    """Open an LMDB folder read-only; PrepError if lmdb is missing or the folder is not an LMDB."""
    lmdb = _lmdb()
    if not os.path.isfile(os.path.join(path, "data.mdb")):
        raise prep_util.PrepError(
            f"LMDB folder not found or incomplete: {path} "
            f"(expected a folder such as bedroom_train_lmdb holding data.mdb)"
        )
    try:
        return lmdb.open(os.fspath(path), readonly=True, lock=False, readahead=False, meminit=False)
    except lmdb.Error as exc:
        raise prep_util.PrepError(f"cannot open {path} as an LMDB database ({exc})") from exc


def decode_image(value, key, path):
    """Decode one LMDB value to a PIL image, naming the key and database on failure."""
    try:
        image = Image.open(io.BytesIO(value))
        image.load()
    except Exception as exc:  # PIL raises several types for bad data
        name = key.decode("ascii", "backslashreplace")
        raise prep_util.PrepError(f"{path}: the value of key {name} is not a decodable image ({exc})") from exc
    return image


def write_images(env, path, folder, image_size, max_images):
    """Resize and save the first `max_images` (None: all) images of `env`; return the count."""
    total = env.stat()["entries"] if max_images is None else min(max_images, env.stat()["entries"])
    if total == 0:
        raise prep_util.PrepError(f"{path} holds no entries")
    try:
        with env.begin(write=False) as txn:
            entries = zip(range(total), txn.cursor())
            for index, (key, value) in tqdm(entries, total=total, unit="img"):
                image = prep_util.resize_center_crop(decode_image(value, key, path), image_size)
                image.save(os.path.join(folder, f"{PREFIX}_{index:07d}.png"))
    except _lmdb().Error as exc:
        raise prep_util.PrepError(f"error reading {path} ({exc})") from exc
    return total


def convert_lsun(lmdb_dir, out_dir, image_size=256, max_images=None, overwrite=False, log=print):
    """
    Write the images of an LSUN LMDB export to `out_dir`.

    :param max_images: write only the first N images (None: all).
    :return: the marker dict of the finished folder.
    """
    if image_size < 1:
        raise prep_util.PrepError(f"--image_size must be positive, got {image_size}")
    if max_images is not None and max_images < 1:
        raise prep_util.PrepError(f"--max_images must be positive, got {max_images}")

    def write(folder):
        env = open_lmdb(lmdb_dir)
        try:
            return write_images(env, lmdb_dir, folder, image_size, max_images)
        finally:
            env.close()

    settings = {"source": os.path.abspath(lmdb_dir), "image_size": image_size, "max_images": max_images}
    return prep_util.build_folder(out_dir, settings, write, overwrite=overwrite, log=log)


def main():
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lmdb_dir", help="the LMDB folder of the export (holding data.mdb)")
    parser.add_argument("--out_dir", default="data/lsun_bedroom", help="folder to create (default: data/lsun_bedroom)")
    parser.add_argument("--image_size", type=int, default=256, help="side of the written images (default: 256)")
    parser.add_argument("--max_images", type=int, default=None, help="write only the first N images (default: all)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args()
    convert_lsun(args.lmdb_dir, args.out_dir, args.image_size, args.max_images, overwrite=args.overwrite)


if __name__ == "__main__":
    prep_util.run_cli(main)
