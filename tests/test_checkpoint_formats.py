"""Checkpoints in safetensors: reading and writing by suffix, sets in either format, scripts/convert_checkpoint.py."""

import sys

import pytest
import torch
from _in_process import run_in_process
from _train_helpers import ROOT, assert_same, make_loop, set_names, tiny_flags, train_env  # noqa: F401 (fixture)

from improved_diffusion import checkpoint_layout, checkpointing, dist_util, script_util
from improved_diffusion.checkpointing import CheckpointSet
from improved_diffusion.io_util import CheckpointError, atomic_save_checkpoint, load_checkpoint

safetensors_torch = pytest.importorskip("safetensors.torch")

sys.path.insert(0, str(ROOT / "scripts"))
import convert_checkpoint  # noqa: E402

RATE = "0.99"


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model, _ = script_util.create_model_and_diffusion(**tiny_flags())
    return model


def test_a_model_saved_both_ways_loads_to_identical_tensors(tmp_path):
    model = tiny_model()
    state = model.state_dict()
    atomic_save_checkpoint(state, tmp_path / "model.pt")
    atomic_save_checkpoint(state, tmp_path / "model.safetensors")
    from_pt = dist_util.load_state_dict(str(tmp_path / "model.pt"))
    from_safetensors = dist_util.load_state_dict(str(tmp_path / "model.safetensors"))
    assert_same(from_safetensors, from_pt)
    assert_same(from_safetensors, state)
    # The file is a standard safetensors file, with the metadata Hugging Face's loaders look for.
    with safetensors_torch.safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"} and set(f.keys()) == set(state)
    # Both load strictly into a fresh model of the same flags and give the same outputs.
    outputs = []
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 5])
    for loaded in (from_pt, from_safetensors):
        fresh = checkpoint_layout.load_model_state_dict(tiny_model(seed=1), loaded, tiny_flags())
        outputs.append(fresh.eval()(x, t))
    assert torch.equal(outputs[0], outputs[1])


def test_tied_views_and_non_contiguous_tensors_are_written_as_their_values(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"base": base, "tied": base, "transposed": base.T, "row": base[1], "every_other": base[:, ::2]}
    atomic_save_checkpoint(state, tmp_path / "shared.safetensors")
    loaded = load_checkpoint(tmp_path / "shared.safetensors")
    assert_same(loaded, {name: value.contiguous() for name, value in state.items()})
    # A module with tied weights loads strictly from the file it saved.
    tied = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    atomic_save_checkpoint(tied.state_dict(), tmp_path / "tied.safetensors")
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    fresh[1].weight = fresh[0].weight
    fresh.load_state_dict(load_checkpoint(tmp_path / "tied.safetensors"), strict=True)
    assert_same(fresh.state_dict(), tied.state_dict())


def test_safetensors_with_missing_tensors_fails_naming_them(tmp_path):
    state = tiny_model().state_dict()
    dropped = ["out.2.bias", "input_blocks.1.0.in_layers.0.weight"]
    path = tmp_path / "model000002.safetensors"
    atomic_save_checkpoint({k: v for k, v in state.items() if k not in dropped}, path)
    with pytest.raises(ValueError) as error:
        checkpoint_layout.load_model_state_dict(tiny_model(), dist_util.load_state_dict(str(path)), tiny_flags(),
                                          source=str(path))
    message = str(error.value)
    assert str(path) in message and "2 missing keys" in message
    assert all(name in message for name in dropped)


def test_values_that_are_not_tensors_are_refused_naming_them(tmp_path):
    with pytest.raises(CheckpointError, match="'step' is a int.*as a .pt file"):
        atomic_save_checkpoint({"w": torch.ones(2), "step": 3}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_truncated_safetensors_file_is_named(tmp_path):
    path = tmp_path / "model000002.safetensors"
    atomic_save_checkpoint({"w": torch.ones(100)}, path)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match=f"{path}.*truncated"):
        dist_util.load_state_dict(str(path))


def test_without_the_package_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    atomic_save_checkpoint({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    for name in ("safetensors", "safetensors.torch"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    with pytest.raises(CheckpointError, match=r"reading .*w.safetensors needs .*pip install safetensors"):
        load_checkpoint(tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="--save_format safetensors needs .*pip install safetensors"):
        checkpointing.check_save_format("safetensors")
    checkpointing.check_save_format("pt")
    with pytest.raises(ValueError, match="--save_format 'npz': expected one of pt, safetensors"):
        checkpointing.check_save_format("npz")


# ---------------------------------------------------------------- checkpoint sets


def save_set(folder, step, save_format, rates=(RATE,)):
    """A set of small distinct tensors for `step`; returns its CheckpointSet."""
    ckpt = CheckpointSet(str(folder), step, list(rates), save_format=save_format)
    weights = {"w": torch.full((3,), float(step))}
    ckpt.save(weights, {rate: weights for rate in rates}, {"state": {}, "param_groups": []}, {"step": step})
    return ckpt


def test_a_safetensors_set_names_its_model_and_ema_files_so_and_keeps_the_sidecars_pt(tmp_path):
    ckpt = save_set(tmp_path, 3, "safetensors", rates=("0.9999", "0.99"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ema_0.9999_000003.safetensors", "ema_0.99_000003.safetensors", "model000003.safetensors",
        "opt000003.pt", "state000003.pt",
    ]
    assert ckpt.model == str(tmp_path / "model000003.safetensors")
    assert_same(load_checkpoint(ckpt.emas["0.99"]), {"w": torch.full((3,), 3.0)})
    assert load_checkpoint(ckpt.state) == {"step": 3}


def test_complete_sets_resume_plans_and_retention_handle_both_formats(tmp_path):
    for step, save_format in ((1, "pt"), (2, "safetensors"), (3, "pt"), (4, "safetensors")):
        save_set(tmp_path, step, save_format)
    (tmp_path / "model000005.safetensors").write_bytes(b"incomplete: no state file")
    assert checkpointing.complete_steps(str(tmp_path)) == [1, 2, 3, 4]
    assert checkpointing.latest_complete(str(tmp_path)) == str(tmp_path / "model000004.safetensors")
    for resume in ("auto", str(tmp_path), str(tmp_path / "model000004.safetensors")):
        ckpt, missing, _ = checkpointing.plan_resume(resume, str(tmp_path), [RATE])
        assert (ckpt.step, ckpt.save_format, missing) == (4, "safetensors", [])
        assert ckpt.emas[RATE] == str(tmp_path / f"ema_{RATE}_000004.safetensors")
    (tmp_path / f"ema_{RATE}_000004.safetensors").unlink()
    _, missing, message = checkpointing.plan_resume(str(tmp_path / "model000004.safetensors"), "", [RATE])
    assert missing == [str(tmp_path / f"ema_{RATE}_000004.safetensors")] and "is missing" in message
    stale = [".model000004.safetensors.x1.tmp", f".ema_{RATE}_000002.safetensors.y2.tmp", ".opt000003.pt.z3.tmp"]
    for name in stale:
        (tmp_path / name).write_bytes(b"cut short")
    assert checkpointing.remove_stale_temporaries(str(tmp_path)) == sorted(stale)
    checkpointing.prune(str(tmp_path), keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model000004.safetensors", "model000005.safetensors", "opt000004.pt", "state000004.pt",
    ]


@pytest.mark.usefixtures("train_env")
def test_a_run_resumed_from_a_safetensors_set_continues_as_from_the_pt_set(tmp_path):
    make_loop(tmp_path / "pt", max_steps=2, save_interval=2).run_loop()
    st_dir = tmp_path / "safetensors"
    st_dir.mkdir()
    for name in set_names(2, (RATE,)) + ["state000002.pt"]:
        source = tmp_path / "pt" / name
        if name.startswith(("model", "ema")):
            convert_checkpoint.convert(str(source), str(st_dir / name.replace(".pt", ".safetensors")))
        else:
            (st_dir / name).write_bytes(source.read_bytes())
    loops = [make_loop(tmp_path / "pt", max_steps=4, resume_checkpoint=str(tmp_path / "pt" / "model000002.pt")),
             make_loop(st_dir, max_steps=4, resume_checkpoint=str(st_dir / "model000002.safetensors"))]
    for loop in loops:
        assert loop.step == 2
        loop.run_loop()
    assert_same([p.detach() for p in loops[1].params], [p.detach() for p in loops[0].params])
    assert_same(loops[1].ema_params, loops[0].ema_params)


# ---------------------------------------------------------------- convert_checkpoint.py


def test_convert_round_trips_bitwise_in_both_directions(tmp_path, capsys):
    state = tiny_model().state_dict()
    state["half"] = torch.randn(5, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    torch.save(state, tmp_path / "model.pt")
    convert_checkpoint.main([str(tmp_path / "model.pt"), str(tmp_path / "model.safetensors")])
    convert_checkpoint.main([str(tmp_path / "model.safetensors"), str(tmp_path / "back.pt")])
    assert "wrote" in capsys.readouterr().out
    assert_same(safetensors_torch.load_file(str(tmp_path / "model.safetensors")), state)
    assert_same(torch.load(tmp_path / "back.pt", weights_only=True), state)
    convert_checkpoint.main([str(tmp_path / "back.pt"), str(tmp_path / "again.safetensors")])
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "model.safetensors").read_bytes()


@pytest.mark.parametrize("argv", [["a.pt", "b.pt"], ["a.safetensors", "b.safetensors"], ["only_one.pt"]])
def test_convert_usage_errors_exit_2_with_one_error_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert_checkpoint.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len([line for line in err.splitlines() if "error:" in line]) == 1, err


def test_convert_bad_inputs_exit_1_naming_the_file(tmp_path):
    torch.save({"state": {}, "param_groups": []}, tmp_path / "opt000002.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    cases = {
        "missing.pt": "missing.pt",
        "broken.safetensors": "broken.safetensors",
        "opt000002.pt": "opt000002.pt holds more than tensors",
    }
    for name, needle in cases.items():
        output = "out.pt" if name.endswith(".safetensors") else "out.safetensors"
        result = run_in_process(ROOT / "scripts" / "convert_checkpoint.py", [tmp_path / name, tmp_path / output],
                                cwd=ROOT)
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert needle in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / output).exists()
