"""Tests for the dataset preparation scripts in datasets/."""

import io
import os
import pathlib
import pickle
import re
import struct
import sys
import tarfile

import numpy as np
import pytest
from _in_process import run_in_process
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from datasets import cifar10, digits, lsun_bedroom, prep_util  # noqa: E402

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def run_script(name, *args):
    """Run datasets/NAME.py from the repository root as a user would (in this process)."""
    return run_in_process(f"datasets/{name}.py", args, cwd=ROOT)


def read_rgb(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def siblings(path):
    """Names in the parent of `path` other than `path` itself (leftover temporary folders)."""
    return sorted(name for name in os.listdir(path.parent) if name != path.name)


# --- resize rule -------------------------------------------------------------


def test_resize_center_crop_gives_square_rgb():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 300), dtype=np.uint8))
    out = prep_util.resize_center_crop(image, 40)
    assert out.size == (40, 40) and out.mode == "RGB"


def test_resize_center_crop_at_target_size_only_crops():
    pixels = np.random.default_rng(1).integers(0, 256, (80, 64, 3), dtype=np.uint8)
    out = prep_util.resize_center_crop(Image.fromarray(pixels), 64)
    np.testing.assert_array_equal(np.asarray(out), pixels[8:72])


def test_resize_center_crop_halves_with_box_filter():
    # 256x128 -> 32: halved twice (box) to 64x32, then bicubic at scale 1, then center crop.
    # Two rounded box steps stay within 2 levels of the exact 4x4 means; one bicubic step would not (~34).
    pixels = np.random.default_rng(2).integers(0, 256, (128, 256, 3)).astype(np.float64)
    out = np.asarray(prep_util.resize_center_crop(Image.fromarray(pixels.astype(np.uint8)), 32)).astype(np.float64)
    block_means = pixels.astype(np.uint8).reshape(32, 4, 64, 4, 3).mean(axis=(1, 3))
    assert np.abs(out - block_means[:, 16:48]).max() <= 2.0


# --- all-or-nothing output folders ----------------------------------------------


def write_files(count):
    def write(folder):
        for i in range(count):
            pathlib.Path(folder, f"a_{i}.png").write_bytes(b"x")
        return count

    return write


def test_build_folder_writes_marker_and_leaves_no_temporaries(tmp_path):
    out = tmp_path / "out"
    marker = prep_util.build_folder(out, {"k": 1}, write_files(3), log=lambda msg: None)
    assert marker == {"settings": {"k": 1}, "images": 3}
    assert prep_util.read_marker(out) == marker
    assert sorted(os.listdir(out)) == [".complete", "a_0.png", "a_1.png", "a_2.png"]
    assert siblings(out) == []


def test_build_folder_failure_leaves_nothing(tmp_path):
    out = tmp_path / "out"

    def write(folder):
        write_files(2)(folder)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        prep_util.build_folder(out, {}, write, log=lambda msg: None)
    assert not out.exists() and siblings(out) == []


def test_build_folder_refuses_foreign_folder_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(prep_util.PrepError, match="--overwrite"):
        prep_util.build_folder(out, {}, write_files(1), log=lambda msg: None)
    assert (out / "mine.txt").read_text() == "keep"
    prep_util.build_folder(out, {}, write_files(1), overwrite=True, log=lambda msg: None)
    assert sorted(os.listdir(out)) == [".complete", "a_0.png"] and siblings(out) == []


def test_build_folder_uses_an_existing_empty_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    prep_util.build_folder(out, {}, write_files(1), log=lambda msg: None)
    assert sorted(os.listdir(out)) == [".complete", "a_0.png"] and siblings(out) == []


def test_failed_overwrite_keeps_the_old_folder(tmp_path):
    out = tmp_path / "out"
    prep_util.build_folder(out, {"v": 1}, write_files(2), log=lambda msg: None)

    def failing(folder):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        prep_util.build_folder(out, {"v": 2}, failing, overwrite=True, log=lambda msg: None)
    assert prep_util.read_marker(out)["settings"] == {"v": 1} and siblings(out) == []


def test_build_folder_rerun_is_a_noop(tmp_path):
    out = tmp_path / "out"
    prep_util.build_folder(out, {"v": 1}, write_files(2), log=lambda msg: None)
    messages = []
    marker = prep_util.build_folder(out, {"v": 1}, write_files(5), log=messages.append)
    assert marker["images"] == 2 and len(os.listdir(out)) == 3
    assert "already complete" in messages[0]
    with pytest.raises(prep_util.PrepError, match="different settings"):
        prep_util.build_folder(out, {"v": 2}, write_files(5), log=lambda msg: None)


def test_build_folder_rejects_a_corrupt_marker(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".complete").write_text("[1, 2")
    with pytest.raises(prep_util.PrepError, match=r"\.complete is not a valid marker"):
        prep_util.build_folder(out, {}, write_files(1), log=lambda msg: None)


# --- digits --------------------------------------------------------------------


def test_write_digits_folder(tmp_path):
    out = tmp_path / "digits"
    digits.write_digits(out, 12, log=lambda msg: None)
    names = sorted(name for name in os.listdir(out) if name.endswith(".png"))
    assert len(names) == 1797
    assert all(re.fullmatch(r"\d_\d{5}\.png", name) for name in names)
    levels, labels = digits.load_digit_arrays()
    counts = np.bincount([int(name[0]) for name in names], minlength=10)
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=10))
    first = read_rgb(out / f"{labels[0]}_00000.png")
    assert first.shape == (12, 12, 3)
    assert (first[..., 0] == first[..., 1]).all() and (first[..., 0] == first[..., 2]).all()
    np.testing.assert_array_equal(first, np.asarray(digits.render_digit(levels[0], 12)))
    assert prep_util.read_marker(out)["images"] == 1797


def test_render_digit_keeps_levels_at_native_size():
    levels, _ = digits.load_digit_arrays()
    pixels = np.asarray(digits.render_digit(levels[5], 8))[..., 0]
    np.testing.assert_array_equal(pixels, np.rint(levels[5] * 255 / 16).astype(np.uint8))


def test_write_digits_rejects_small_size(tmp_path):
    with pytest.raises(prep_util.PrepError, match="at least 8"):
        digits.write_digits(tmp_path / "digits", 4)
    assert not (tmp_path / "digits").exists()


def test_digits_cli_is_idempotent(tmp_path):
    out = tmp_path / "digits"
    first = run_script("digits", "--out_dir", out, "--image_size", 8)
    assert first.returncode == 0, first.stderr
    stamp = os.stat(out / "0_00000.png").st_mtime_ns
    again = run_script("digits", "--out_dir", out, "--image_size", 8)
    assert again.returncode == 0 and "already complete" in again.stdout
    assert os.stat(out / "0_00000.png").st_mtime_ns == stamp
    other = run_script("digits", "--out_dir", out, "--image_size", 10)
    assert other.returncode == 1 and "--overwrite" in other.stderr
    replaced = run_script("digits", "--out_dir", out, "--image_size", 10, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert read_rgb(out / "0_00000.png").shape == (10, 10, 3) and siblings(out) == []


# --- CIFAR-10 --------------------------------------------------------------------


def cifar_pickle(obj):
    """Pickle as the published archive does, naming numpy's array rebuilder by its old module path."""
    return pickle.dumps(obj, protocol=3).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def make_cifar_files(per_batch=2, test_count=3, seed=0):
    """File name -> bytes of a tiny archive in the CIFAR-10 python format, and the arrays in it."""
    rng = np.random.default_rng(seed)
    files = {"batches.meta": cifar_pickle({b"label_names": [n.encode() for n in CIFAR_NAMES], b"num_vis": 3072})}
    arrays = {}
    for name, count in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test_count)]:
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, count)]
        files[name] = cifar_pickle({b"batch_label": name.encode(), b"labels": labels, b"data": data})
        arrays[name] = (data, labels)
    return files, arrays


def write_tar(path, files, folder="cifar-10-batches-py"):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def cifar_archive(tmp_path):
    files, arrays = make_cifar_files()
    return write_tar(tmp_path / "cifar-10-python.tar.gz", files), arrays


def check_cifar_output(out, arrays):
    train = sorted(os.listdir(out / "train"))
    test = sorted(os.listdir(out / "test"))
    assert len(train) == 10 and len(test) == 3
    expected = [(data, labels) for name, (data, labels) in arrays.items() if name.startswith("data_batch")]
    rows = np.concatenate([data for data, _ in expected])
    labels = [label for _, batch_labels in expected for label in batch_labels]
    for index in (0, 3, 9):
        image = read_rgb(out / "train" / f"{CIFAR_NAMES[labels[index]]}_{index:05d}.png")
        np.testing.assert_array_equal(image, rows[index].reshape(3, 32, 32).transpose(1, 2, 0))
    data, test_labels = arrays["test_batch"]
    image = read_rgb(out / "test" / f"{CIFAR_NAMES[test_labels[2]]}_00002.png")
    np.testing.assert_array_equal(image[5, 7], data[2].reshape(3, 32, 32)[:, 5, 7])
    assert prep_util.read_marker(out)["images"] == 13


def test_cifar_from_archive(tmp_path, cifar_archive):
    archive, arrays = cifar_archive
    cifar10.convert_cifar10(archive, tmp_path / "cifar", log=lambda msg: None)
    check_cifar_output(tmp_path / "cifar", arrays)


def test_cifar_from_extracted_folder(tmp_path):
    files, arrays = make_cifar_files(seed=1)
    folder = tmp_path / "src" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    cifar10.convert_cifar10(folder, tmp_path / "a", log=lambda msg: None)
    check_cifar_output(tmp_path / "a", arrays)
    cifar10.convert_cifar10(folder.parent, tmp_path / "b", log=lambda msg: None)
    check_cifar_output(tmp_path / "b", arrays)


def test_cifar_cli(tmp_path, cifar_archive):
    archive, arrays = cifar_archive
    out = tmp_path / "cifar"
    result = run_script("cifar10", archive, "--out_dir", out)
    assert result.returncode == 0, result.stderr
    check_cifar_output(out, arrays)
    again = run_script("cifar10", archive, "--out_dir", out)
    assert again.returncode == 0 and "already complete" in again.stdout


def py2_batch_pickle(data, labels):
    """
    The opcodes a Python 2 pickler (as used for the published archive) writes for a batch:
    strings are byte strings and the array is rebuilt through numpy.core.multiarray.
    """

    def string(value):
        return pickle.BINSTRING + struct.pack("<i", len(value)) + value

    def small_ints(values):
        return b"".join(pickle.BININT1 + bytes([v]) for v in values)

    array = (
        b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n"
        + small_ints([0]) + pickle.TUPLE1 + string(b"b") + pickle.TUPLE3 + pickle.REDUCE
        + pickle.MARK + small_ints([1]) + pickle.BININT + struct.pack("<i", data.shape[0])
        + pickle.BININT + struct.pack("<i", data.shape[1]) + pickle.TUPLE2
        + b"cnumpy\ndtype\n" + string(b"u1") + small_ints([0, 1]) + pickle.TUPLE3 + pickle.REDUCE
        + pickle.MARK + small_ints([3]) + string(b"|") + pickle.NONE * 3
        + (pickle.BININT + struct.pack("<i", -1)) * 2 + small_ints([0]) + pickle.TUPLE + pickle.BUILD
        + pickle.NEWFALSE + string(data.tobytes()) + pickle.TUPLE + pickle.BUILD
    )
    return (
        pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.MARK
        + string(b"data") + array
        + string(b"labels") + pickle.EMPTY_LIST + pickle.MARK + small_ints(labels) + pickle.APPENDS
        + pickle.SETITEMS + pickle.STOP
    )


def test_cifar_reads_python2_pickles():
    data = np.random.default_rng(4).integers(0, 256, (3, 3072), dtype=np.uint8)
    images, labels = cifar10.load_batch({"data_batch_1": py2_batch_pickle(data, [4, 0, 9])}, "data_batch_1", 10)
    assert labels == [4, 0, 9]
    np.testing.assert_array_equal(images[1], data[1].reshape(3, 32, 32).transpose(1, 2, 0))


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_cifar_refuses_code_in_pickles(tmp_path):
    files, _ = make_cifar_files()
    target = tmp_path / "pwned"
    files["data_batch_3"] = pickle.dumps({b"data": _Exploit(target), b"labels": []})
    archive = write_tar(tmp_path / "evil.tar.gz", files)
    with pytest.raises(prep_util.PrepError, match=r"data_batch_3.*forbidden global"):
        cifar10.convert_cifar10(archive, tmp_path / "cifar", log=lambda msg: None)
    assert not target.exists()
    assert sorted(os.listdir(tmp_path)) == ["evil.tar.gz"]


def test_cifar_missing_member(tmp_path):
    files, _ = make_cifar_files()
    del files["test_batch"]
    archive = write_tar(tmp_path / "part.tar.gz", files)
    with pytest.raises(prep_util.PrepError, match=r"part\.tar\.gz.*missing test_batch"):
        cifar10.convert_cifar10(archive, tmp_path / "cifar", log=lambda msg: None)
    assert not (tmp_path / "cifar").exists()


def test_cifar_missing_or_corrupt_source(tmp_path):
    with pytest.raises(prep_util.PrepError, match=r"not found.*--download"):
        cifar10.convert_cifar10(tmp_path / "nope.tar.gz", tmp_path / "cifar", log=lambda msg: None)
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x1f\x8b" + bytes(range(200)))
    with pytest.raises(prep_util.PrepError, match=r"junk\.tar\.gz.*gzip"):
        cifar10.convert_cifar10(junk, tmp_path / "cifar", log=lambda msg: None)
    assert not (tmp_path / "cifar").exists()


def test_cifar_malformed_batch(tmp_path):
    files, _ = make_cifar_files()
    files["data_batch_2"] = cifar_pickle({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    archive = write_tar(tmp_path / "bad.tar.gz", files)
    with pytest.raises(prep_util.PrepError, match=r"data_batch_2.*uint8 array"):
        cifar10.convert_cifar10(archive, tmp_path / "cifar", log=lambda msg: None)
    assert not (tmp_path / "cifar").exists() and siblings(tmp_path / "cifar") == ["bad.tar.gz"]


# --- LSUN ------------------------------------------------------------------------


def encode(pixels, fmt):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def make_lmdb(path, values):
    lmdb = pytest.importorskip("lmdb")
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in values.items():
            txn.put(key, value)
    env.close()
    return path


@pytest.fixture
def lsun_images():
    rng = np.random.default_rng(3)
    shapes = [(40, 60, 3), (70, 33, 3), (20, 20, 3), (64, 96, 3)]
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in shapes]


def test_lsun_convert(tmp_path, lsun_images):
    values = {f"{i:040x}".encode(): encode(pixels, "PNG" if i % 2 else "WEBP") for i, pixels in enumerate(lsun_images)}
    source = make_lmdb(tmp_path / "bedroom_train_lmdb", values)
    out = tmp_path / "lsun"
    lsun_bedroom.convert_lsun(source, out, image_size=16, log=lambda msg: None)
    names = sorted(name for name in os.listdir(out) if name.endswith(".png"))
    assert names == [f"bedroom_{i:07d}.png" for i in range(4)]
    expected = prep_util.resize_center_crop(Image.fromarray(lsun_images[1]), 16)
    np.testing.assert_array_equal(read_rgb(out / "bedroom_0000001.png"), np.asarray(expected))
    assert all(read_rgb(out / name).shape == (16, 16, 3) for name in names)
    assert prep_util.read_marker(out)["images"] == 4


def test_lsun_cli_max_images(tmp_path, lsun_images):
    values = {f"{i:04d}".encode(): encode(pixels, "JPEG") for i, pixels in enumerate(lsun_images)}
    source = make_lmdb(tmp_path / "db", values)
    out = tmp_path / "lsun"
    result = run_script("lsun_bedroom", source, "--out_dir", out, "--image_size", 8, "--max_images", 2)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == [".complete", "bedroom_0000000.png", "bedroom_0000001.png"]
    again = run_script("lsun_bedroom", source, "--out_dir", out, "--image_size", 8, "--max_images", 2)
    assert again.returncode == 0 and "already complete" in again.stdout


def test_lsun_bad_value_names_the_key(tmp_path, lsun_images):
    values = {b"good": encode(lsun_images[0], "PNG"), b"broken": b"not an image"}
    source = make_lmdb(tmp_path / "db", values)
    with pytest.raises(prep_util.PrepError, match=r"key broken"):
        lsun_bedroom.convert_lsun(source, tmp_path / "lsun", image_size=8, log=lambda msg: None)
    assert not (tmp_path / "lsun").exists()


def test_lsun_missing_database(tmp_path):
    pytest.importorskip("lmdb")
    (tmp_path / "empty").mkdir()
    with pytest.raises(prep_util.PrepError, match=r"empty.*data\.mdb"):
        lsun_bedroom.convert_lsun(tmp_path / "empty", tmp_path / "lsun", log=lambda msg: None)
    assert not (tmp_path / "lsun").exists()


def test_lsun_without_lmdb_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmdb", None)
    with pytest.raises(prep_util.PrepError, match="pip install lmdb"):
        lsun_bedroom.convert_lsun(tmp_path / "db", tmp_path / "lsun", log=lambda msg: None)


# --- reading the folders back ---------------------------------------------------------


def test_load_data_reads_the_digits_folder(tmp_path):
    image_datasets = pytest.importorskip("improved_diffusion.image_datasets")
    out = tmp_path / "digits"
    digits.write_digits(out, 8, log=lambda msg: None)
    data = image_datasets.load_data(data_dir=str(out), batch_size=16, image_size=8, class_cond=True)
    images, cond = next(data)
    assert tuple(images.shape) == (16, 3, 8, 8)
    assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0
    assert set(cond["y"].tolist()) <= set(range(10))


def test_lsun_output_is_read_back_unchanged(tmp_path, lsun_images):
    image_datasets = pytest.importorskip("improved_diffusion.image_datasets")
    values = {f"{i:04d}".encode(): encode(pixels, "PNG") for i, pixels in enumerate(lsun_images)}
    out = tmp_path / "lsun"
    lsun_bedroom.convert_lsun(make_lmdb(tmp_path / "db", values), out, image_size=16, log=lambda msg: None)
    for i, pixels in enumerate(lsun_images):
        written = out / f"bedroom_{i:07d}.png"
        np.testing.assert_array_equal(image_datasets.load_image(str(written), 16), read_rgb(written))
        ours = np.asarray(prep_util.resize_center_crop(Image.fromarray(pixels), 16))
        np.testing.assert_array_equal(ours, image_datasets.resize_and_center_crop(Image.fromarray(pixels), 16))
