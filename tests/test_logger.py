import csv
import json
import os
import pathlib
import re
import sys
import tempfile

import numpy as np
import pytest
import torch
from _launch import LAUNCH_VARS

from improved_diffusion import logger

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV_VARS = LAUNCH_VARS + ("OPENAI_LOGDIR", "OPENAI_LOG_FORMAT", "OPENAI_LOG_FORMAT_MPI")


@pytest.fixture(autouse=True)
def fresh_logger(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    logger.reset()
    yield
    logger.reset()


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_dump_writes_every_format_and_returns_plain_numbers(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["log", "csv", "json"])
    logger.logkv("step", 3)
    logger.logkv_mean("loss", 1.0)
    logger.logkv_mean("loss", 2.0)
    logger.log("hello", 42)
    kvs = logger.dumpkvs()
    assert kvs == {"step": 3, "loss": 1.5}
    text = (tmp_path / "log.txt").read_text()
    assert "Logging to" in text and "hello 42" in text
    assert re.search(r"\| loss\s+\| 1\.5\s+\|", text) and re.search(r"\| step\s+\| 3\s+\|", text)
    assert read_csv(tmp_path / "progress.csv") == [["loss", "step"], ["1.5", "3"]]
    assert json.loads((tmp_path / "progress.json").read_text()) == kvs
    assert logger.dumpkvs() == {}


def test_csv_rewrites_header_for_later_keys_and_keeps_rows(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs="csv")
    logger.logkv("a", 1)
    logger.dumpkvs()
    logger.logkv("b", 2)
    logger.logkv("a", 3)
    logger.dumpkvs()
    logger.logkv("b", 4)
    logger.dumpkvs()
    assert read_csv(tmp_path / "progress.csv") == [["a", "b"], ["1", ""], ["3", "2"], ["", "4"]]


def test_reconfiguring_the_same_folder_appends(tmp_path):
    for value in (1, 2):
        logger.configure(dir=str(tmp_path), format_strs="log,csv")
        logger.logkv("a", value)
        logger.dumpkvs()
        logger.log(f"run {value}")
    logger.reset()
    assert read_csv(tmp_path / "progress.csv") == [["a"], ["1"], ["2"]]
    text = (tmp_path / "log.txt").read_text()
    assert "run 1" in text and "run 2" in text


def test_tensor_means_are_read_back_only_at_dump(tmp_path, monkeypatch):
    logger.configure(dir=str(tmp_path), format_strs="")
    reads = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(1) or real_item(t))
    weight = torch.tensor(2.0, requires_grad=True)
    for value in (1.0, 2.0, 4.0):
        logger.logkv_mean("loss", weight * value)
    logger.logkv("lr", torch.tensor(0.5))
    assert reads == []
    kvs = logger.dumpkvs()
    assert kvs == {"loss": pytest.approx(14.0 / 3), "lr": 0.5}
    assert type(kvs["loss"]) is float and len(reads) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_means_do_not_synchronize_until_dump(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs="")
    losses = torch.arange(4.0, device="cuda", requires_grad=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for loss in losses:
            logger.logkv_mean("loss", loss * 2)
        logger.logkv("half", losses.sum().half())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logger.dumpkvs() == {"loss": 3.0, "half": 6.0}


def test_low_precision_tensors_are_averaged_in_float32(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs="")
    for _ in range(300):
        logger.logkv_mean("x", torch.tensor(1.0, dtype=torch.bfloat16))
    logger.logkv_mean("count", torch.tensor(3))
    assert logger.dumpkvs() == {"x": 1.0, "count": 3.0}


def test_logkv_mean_rejects_tensors_of_several_values(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs="")
    with pytest.raises(ValueError, match="shape"):
        logger.logkv_mean("loss", torch.ones(3))


def test_environment_chooses_folder_and_formats(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "run"))
    monkeypatch.setenv("OPENAI_LOG_FORMAT", "stdout,csv")
    logger.configure()
    assert logger.get_dir() == str(tmp_path / "run")
    logger.logkv("a", 0.123456)
    logger.dumpkvs()
    assert "| a " in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "run")) == ["progress.csv"]


def test_default_folder_is_a_new_temporary_one(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    logger.configure(format_strs="log")
    name = os.path.basename(logger.get_dir())
    assert os.path.dirname(logger.get_dir()) == str(tmp_path)
    assert re.fullmatch(r"openai-\d{4}(-\d\d){5}-\d{6}", name)
    assert (tmp_path / name / "log.txt").exists()


def test_first_use_configures_a_default_logger(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path))
    logger.log("no configure needed")
    assert "no configure needed" in (tmp_path / "log.txt").read_text()


def test_other_ranks_write_nothing_unless_asked(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    logger.configure(dir=str(tmp_path))
    logger.log("quiet")
    logger.logkv("a", 1)
    assert logger.dumpkvs() == {"a": 1}
    assert os.listdir(tmp_path) == []
    logger.configure(dir=str(tmp_path), format_strs="log")
    logger.log("asked")
    assert "asked" in (tmp_path / "log-rank001.txt").read_text()


def test_levels_filter_text(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs="log")
    logger.debug("hidden")
    logger.set_level(logger.WARN)
    logger.info("hidden too")
    logger.warn("shown")
    logger.set_level(logger.DEBUG)
    logger.debug("detail")
    text = (tmp_path / "log.txt").read_text()
    assert "hidden" not in text and "shown" in text and "detail" in text


def test_long_cells_are_cut_in_tables(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs="log")
    logger.logkv("k" * 40, "v" * 40)
    logger.dumpkvs()
    text = (tmp_path / "log.txt").read_text()
    assert "k" * 27 + "..." in text and "k" * 28 not in text


def test_unknown_format_lists_known_ones(tmp_path):
    with pytest.raises(ValueError, match="stdout, log, csv, json"):
        logger.configure(dir=str(tmp_path), format_strs="tensorbored")


def test_scoped_configure_restores_previous_logger(tmp_path):
    logger.configure(dir=str(tmp_path / "outer"), format_strs="log")
    with logger.scoped_configure(dir=str(tmp_path / "inner"), format_strs="log"):
        logger.log("inside")
        assert logger.get_dir() == str(tmp_path / "inner")
    logger.log("outside")
    assert logger.get_dir() == str(tmp_path / "outer")
    assert "outside" in (tmp_path / "outer" / "log.txt").read_text()
    assert "outside" not in (tmp_path / "inner" / "log.txt").read_text()


class FakeComm:
    """Stands in for an MPI communicator of two ranks whose other rank sent `other`."""

    def __init__(self, rank, other):
        self.rank, self.other = rank, other

    def Get_rank(self):
        return self.rank

    def gather(self, obj, root=0):
        return [obj, self.other] if self.rank == root else None


def test_comm_averages_over_ranks_weighted_by_counts(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs="csv", comm=FakeComm(0, {"loss": (4.0, 3), "name": ("b", 1)}))
    logger.logkv_mean("loss", 0.0)
    logger.logkv("name", "a")
    assert logger.dumpkvs() == {"loss": 3.0, "name": "a"}
    logger.configure(dir=str(tmp_path / "r1"), format_strs="csv", comm=FakeComm(1, None))
    logger.logkv_mean("loss", 1.0)
    assert logger.dumpkvs() == {}


def test_profile_kv_times_a_block(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs="")
    with logger.profile_kv("io"):
        pass
    assert logger.dumpkvs()["wait_io"] >= 0.0


def read_tensorboard(folder):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_tensorboard_writes_every_number_as_a_scalar_at_its_step(tmp_path):
    pytest.importorskip("tensorboard")
    logger.configure(dir=str(tmp_path), format_strs="csv,tensorboard")
    for step, loss in ((5, 0.25), (10, 0.125)):
        logger.logkv("step", step)
        logger.logkv_mean("loss", torch.tensor(loss))
        logger.logkv("phase", "train")
        logger.dumpkvs()
    logger.logkv("fid", 42.5)
    logger.dumpkvs()
    logger.reset()
    events = read_tensorboard(tmp_path / "tb")
    assert sorted(events.Tags()["scalars"]) == ["fid", "loss", "step"]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(5, 0.25), (10, 0.125)]
    assert [(e.step, e.value) for e in events.Scalars("fid")] == [(3, 42.5)]


def test_tensorboard_takes_images_from_log_image(tmp_path):
    pytest.importorskip("tensorboard")
    logger.configure(dir=str(tmp_path), format_strs="tensorboard")
    logger.log_image("samples", np.zeros((6, 4, 3), dtype=np.uint8), step=7)
    logger.reset()
    (image,) = read_tensorboard(tmp_path / "tb").Images("samples")
    assert (image.step, image.width, image.height) == (7, 4, 6)


def test_tensorboard_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        logger.configure(dir=str(tmp_path), format_strs="tensorboard")


def test_profile_decorates_a_function_and_times_each_call(tmp_path, monkeypatch):
    logger.configure(dir=str(tmp_path), format_strs="")
    clock = iter([100.0, 101.0, 200.0, 203.0, 300.0, 306.0])
    monkeypatch.setattr(logger.time, "time", lambda: next(clock))

    @logger.profile("work")
    def work(x):
        return 2 * x

    assert work(3) == 6 and work(4) == 8
    with logger.profile("block"):
        pass
    assert logger.dumpkvs() == {"wait_work": 2.0, "wait_block": 6.0}


def load_plot_progress():
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_progress", ROOT / "scripts" / "plot_progress.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_progress(folder, fid_steps=()):
    logger.configure(dir=str(folder), format_strs="csv")
    for step in range(0, 50, 10):
        logger.logkvs({"step": step, "loss": 1.0 / (step + 1), "mse": 0.5 / (step + 1), "vb": 0.1})
        if step in fid_steps:
            logger.logkv("fid", 300.0 - step)
        logger.dumpkvs()
    logger.reset()


def test_plot_progress_reads_loss_terms_and_fid_at_their_steps(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    plot_progress = load_plot_progress()
    write_progress(tmp_path / "plain")
    write_progress(tmp_path / "eval", fid_steps=(20, 40))
    series = plot_progress.read_progress(str(tmp_path / "eval" / "progress.csv"))
    assert series["fid"] == ([20.0, 40.0], [280.0, 260.0])
    assert series["loss"][0] == [0.0, 10.0, 20.0, 30.0, 40.0]
    plot_progress.main([str(tmp_path / "plain")])
    plot_progress.main([str(tmp_path / "eval"), "--output", str(tmp_path / "eval.png")])
    with Image.open(tmp_path / "plain" / "progress.png") as plain, Image.open(tmp_path / "eval.png") as with_fid:
        assert plain.size == (800, 400) and with_fid.size == (800, 700)
        assert len(np.unique(np.asarray(plain.convert("RGB")).reshape(-1, 3), axis=0)) > 2


def test_plot_progress_errors_name_the_problem(tmp_path, capsys):
    plot_progress = load_plot_progress()

    def error_of(argv):
        with pytest.raises(SystemExit) as info:
            plot_progress.main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
        return err

    assert "does not exist" in error_of([str(tmp_path)])
    write_progress(tmp_path)
    pytest.importorskip("matplotlib")
    assert "none of the columns nll" in error_of([str(tmp_path), "--keys", "nll"])


def test_reference_helpers_weighted_mean_and_launcher_rank(monkeypatch):
    class FakeComm:
        rank = 0

        def gather(self, value):
            return [value, {"loss": (3.0, 3), "name": ("x", 1)}]

    merged = logger.mpi_weighted_mean(FakeComm(), {"loss": (1.0, 1)})
    assert merged["loss"] == pytest.approx(2.5) and merged["name"] == "x"
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "RANK"):
        monkeypatch.delenv(name, raising=False)
    assert logger.get_rank_without_mpi_import() == 0
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    assert logger.get_rank_without_mpi_import() == 3
    assert issubclass(logger.HumanOutputFormat, (logger.KVWriter, logger.SeqWriter))
