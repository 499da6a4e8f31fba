"""
The training options of SPEC §20 on the training core: --grad_clip (the
update uses the clipped gradient, the logged norm is the one before),
--lr_warmup_steps (the ramp) (both resumed bitwise after kill -9: test_train_resume.py);
--save_format (a model saved as .pt and as .safetensors samples alike); and
--init_checkpoint (fine-tuning from this library's weights with another class
count, or from a published guided-diffusion layout, strictly). Also, the
classifier on the training core: its steps read nothing back from the
device, and a set it cannot write ends the run naming the set to resume from.
"""

import ast
import csv

import numpy as np
import pytest
import torch
from _train_helpers import (
    TINY_MODEL,
    make_loop,
    run_script,
    tiny_flags,
    train_env,  # noqa: F401 (fixture)
    write_images,
)
from test_flags import load_script

from improved_diffusion import flags as flag_table
from improved_diffusion import logger, script_util
from improved_diffusion.checkpointing import CheckpointSaveError
from improved_diffusion.io_util import load_checkpoint
from improved_diffusion.run_flags import write_run_flags
from improved_diffusion.train_util import load_init_weights


pytestmark = pytest.mark.usefixtures("train_env")


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


# ---------------------------------------------------------------- --grad_clip


def test_the_update_uses_the_gradient_clipped_to_the_global_norm(tmp_path):
    max_norm = 0.05
    # The gradient of the first batch, unclipped, from a twin of the loop (same weights, same draws).
    twin = make_loop(tmp_path / "twin")
    batch, cond = next(twin.data)
    twin.forward_backward(batch, cond)
    grads = [p.grad.clone() for p in twin.params]
    norm = flat(grads).double().norm().item()
    assert norm > 10 * max_norm, "the test needs a gradient that gets clipped"
    clipped = [g * (max_norm / (norm + 1e-6)) for g in grads]
    # AdamW's first step, written out (Loshchilov & Hutter, Algorithm 2): m = (1 - b1) g, v = (1 - b2) g^2,
    # theta -= lr * m_hat / (sqrt(v_hat) + eps) with m_hat = m / (1 - b1), v_hat = v / (1 - b2).
    lr, eps = 1e-3, 1e-8
    expected = [p.detach() - lr * g / (g.abs() + eps) for p, g in zip(twin.params, clipped)]

    loop = make_loop(tmp_path / "run", grad_clip=max_norm, log_interval=1, max_steps=1)
    loop.run_loop()  # its first batch is the twin's
    first_moments = [loop.opt.state[p]["exp_avg"] for p in loop.params]
    torch.testing.assert_close(flat(first_moments), flat(clipped) * 0.1, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(flat(loop.params).detach(), flat(expected), rtol=0, atol=1e-7)
    with open(tmp_path / "run" / "progress.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert float(row["grad_norm"]) == pytest.approx(norm, rel=1e-5), "grad_norm is the norm before clipping"


def test_a_gradient_within_the_bound_is_left_as_it_is(tmp_path):
    plain, bounded = make_loop(tmp_path / "plain"), make_loop(tmp_path / "bounded", grad_clip=1e6)
    batch, cond = next(plain.data)
    plain.run_step(batch, cond)
    bounded.run_step(batch, cond)
    assert torch.equal(flat(plain.params), flat(bounded.params))


# ---------------------------------------------------------------- --lr_warmup_steps


def test_the_learning_rate_ramps_up_over_the_warmup_then_follows_the_schedule(tmp_path):
    lr, warmup, anneal = 2e-3, 4, 8
    loop = make_loop(tmp_path, lr=lr, lr_warmup_steps=warmup, lr_anneal_steps=anneal)
    rates = []
    for _ in range(6):
        loop.run_step(*next(loop.data))
        rates.append(loop.opt.param_groups[0]["lr"])
    # Update n = s + 1 (s updates before it): lr * (1 - s / anneal) * min(1, n / warmup).
    expected = [lr * (1 - s / anneal) * min(1.0, (s + 1) / warmup) for s in range(6)]
    assert rates == pytest.approx(expected, rel=1e-12)
    assert rates[0] == pytest.approx(lr / 4 * 1.0) and rates[3] == pytest.approx(lr * 5 / 8)


# ---------------------------------------------------------------- the classifier reads nothing back


def test_a_classifier_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    from test_classifier_train import make_loop as make_classifier_loop

    loop = make_classifier_loop(tmp_path, microbatch=1, log_interval=2)
    reads = []
    # (Not __bool__: on CPU, and only there, q_sample checks the range of the timesteps.)
    for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _n=name, _real=real, **k: reads.append(_n) or
                            _real(t, *a, **k))
    loop.run_step(*next(loop.data))
    loop.run_step(*next(loop.data))
    assert reads == [], f"a classifier step read {reads} back from the device"
    row = logger.dumpkvs()  # the row reads the interval's sums once
    monkeypatch.undo()
    assert reads and {"train_loss", "train_acc@1", "train_loss_q0"} <= set(row)


def test_a_classifier_set_that_cannot_be_written_names_the_set_to_resume_from(tmp_path):
    from test_classifier_train import make_loop as make_classifier_loop

    (tmp_path / "opt000004.pt").mkdir()  # an obstacle where the set of step 4 puts its optimizer file
    loop = make_classifier_loop(tmp_path, iterations=4, save_interval=2)
    with pytest.raises(CheckpointSaveError, match=r"checkpoint set of step 4 .*opt000004\.pt failed.*"
                                                  r"--resume_checkpoint .*model000002\.pt"):
        loop.run_loop()
    assert loop.saved_step == 2 and not (tmp_path / "model000004.pt").exists()


# ---------------------------------------------------------------- --save_format


def test_a_model_saved_as_pt_and_as_safetensors_gives_the_same_samples(tmp_path):
    flags = tiny_flags()
    for save_format in ("pt", "safetensors"):
        make_loop(tmp_path / save_format, max_steps=2, save_interval=2, save_format=save_format).run_loop()
        write_run_flags(str(tmp_path / save_format), flags)
    assert {p.name for p in (tmp_path / "safetensors").iterdir()} >= {
        "model000002.safetensors", "ema_0.99_000002.safetensors", "opt000002.pt", "state000002.pt"}
    samples = {}
    for path in (tmp_path / "pt" / "ema_0.99_000002.pt", tmp_path / "safetensors" / "ema_0.99_000002.safetensors"):
        out = tmp_path / f"samples_{path.suffix[1:]}"
        status, _, err = run_script("image_sample.py", {"model_path": path, "sampler": "ddim", "num_samples": 3,
                                                        "batch_size": 3, "seed": 1}, out)
        assert status == 0, err
        with np.load(out / "samples_3x8x8x3.npz") as data:
            samples[path.suffix] = data["arr_0"]
    assert np.array_equal(samples[".pt"], samples[".safetensors"])
    assert samples[".pt"].std() > 0


# ---------------------------------------------------------------- --init_checkpoint


class ClassImages:
    """Endless batches of one fixed image pattern with labels of `classes` classes (a task learned fast)."""

    def __init__(self, classes, batch_size=4):
        g = torch.Generator().manual_seed(7)
        self.image = (torch.rand(3, 8, 8, generator=g) * 2 - 1).clamp(-0.8, 0.8)
        self.classes, self.batch_size, self.index = classes, batch_size, 0

    def __iter__(self):
        return self

    def __next__(self):
        labels = torch.arange(self.index, self.index + self.batch_size) % self.classes
        self.index += self.batch_size
        return self.image.expand(self.batch_size, -1, -1, -1).clone(), {"y": labels}


def class_flags(classes):
    return tiny_flags(class_cond=True, num_classes=classes, learn_sigma=False)


@pytest.fixture(scope="module")
def three_class_model(tmp_path_factory):
    """The EMA-free model file of 60 steps on ClassImages(3)."""
    log_dir = tmp_path_factory.mktemp("three_classes")
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        make_loop(log_dir, data=ClassImages(3), model_flags=class_flags(3), batch_size=4, lr=3e-3, max_steps=60,
                  save_interval=60).run_loop()
    logger.reset()
    return log_dir / "model000060.pt"


def first_loss(log_dir, classes, **options):
    loop = make_loop(log_dir, data=ClassImages(classes), model_flags=class_flags(classes), batch_size=4, **options)
    return loop, loop.run_step(*next(ClassImages(classes))).item()


def test_fine_tuning_with_another_class_count_keeps_every_weight_but_the_label_embedding(
    three_class_model, tmp_path
):
    trained = load_checkpoint(three_class_model)
    fresh_loop, fresh_loss = first_loss(tmp_path / "fresh", 5, lr=0.0)
    loop, loss = first_loss(tmp_path / "tuned", 5, lr=0.0, init_checkpoint=str(three_class_model))
    assert loop.step == 1 and loop.saved_step is None
    state = loop.model.state_dict()
    assert state["label_emb.weight"].shape == (5, trained["label_emb.weight"].shape[1])
    assert torch.equal(state["label_emb.weight"], fresh_loop.model.state_dict()["label_emb.weight"])
    for key, value in trained.items():
        if key != "label_emb.weight":
            assert torch.equal(state[key], value), key
    assert loss < 0.3 * fresh_loss, (loss, fresh_loss)
    log = (tmp_path / "tuned" / "log.txt").read_text()
    assert log.count("label embedding has") == 1
    assert "its label embedding has 3 rows, this model's 5 (--num_classes 5)" in log
    # A fresh start: no optimizer state from the checkpoint's run, and both EMAs start from the loaded weights.
    assert all(s["step"].item() == 1 for s in loop.opt.state.values())


def test_fine_tuning_with_the_same_classes_loads_every_weight_and_says_nothing(three_class_model, tmp_path):
    loop = make_loop(tmp_path, data=ClassImages(3), model_flags=class_flags(3),
                     init_checkpoint=str(three_class_model))
    assert_same_state(loop.model.state_dict(), load_checkpoint(three_class_model))
    assert all(torch.equal(e, p) for e, p in zip(loop.ema_params[0], loop.params))
    assert "label embedding" not in (tmp_path / "log.txt").read_text()


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_another_mismatch_fails_naming_the_flag(three_class_model, tmp_path):
    with pytest.raises(ValueError, match=r"--num_channels 64 \(the weights say 32\)"):
        make_loop(tmp_path, model_flags=dict(class_flags(3), num_channels=64), init_checkpoint=str(three_class_model))
    with pytest.raises(ValueError, match=r"--class_cond False \(the weights say True\)"):
        make_loop(tmp_path, model_flags=tiny_flags(learn_sigma=False), init_checkpoint=str(three_class_model))


def read_listing(path):
    """(this library's flags for the listing's guided-diffusion command line, {name: meta tensor of its shape})."""
    first, _, *lines = path.read_text().strip().split("\n")
    names = flag_table.MODEL_AND_DIFFUSION + flag_table.MODEL_EXTRAS
    parsed, _ = flag_table.parse_with([flag_table.FLAGS[n] for n in names], first.removeprefix("# flags:").split())
    weights = {}
    for line in lines:
        name, shape = line.split(" ", 1)
        weights[name] = torch.empty(ast.literal_eval(shape), device="meta")
    return vars(parsed), weights


def meta_model(flags):
    with torch.device("meta"):
        return script_util.model_from_flags(flags)


def test_a_published_layout_loads_strictly_with_matching_flags(golden_dir):
    flags, weights = read_listing(golden_dir / "guided" / "keys" / "adm_64x64_diffusion.txt")
    assert load_init_weights(meta_model(flags), weights, flags, source="64x64_diffusion.pt") is None
    extra = dict(weights, **{"out.9.weight": torch.empty(3, device="meta")})
    with pytest.raises(ValueError, match="1 unexpected keys: out.9.weight"):
        load_init_weights(meta_model(flags), extra, flags, source="64x64_diffusion.pt")
    ten_classes = dict(flags, num_classes=10)
    note = load_init_weights(meta_model(ten_classes), weights, ten_classes, source="64x64_diffusion.pt")
    assert "its label embedding has 1000 rows, this model's 10 (--num_classes 10)" in note
    fewer_blocks = dict(flags, num_res_blocks=2)
    with pytest.raises(ValueError, match=r"--num_res_blocks 2 \(the weights say 3\)"):
        load_init_weights(meta_model(fewer_blocks), weights, fewer_blocks, source="64x64_diffusion.pt")


@pytest.mark.parametrize(
    "argv, status, needles",
    [
        (["--init_checkpoint", "INIT", "--resume_checkpoint", "INIT"], 2,
         ["--init_checkpoint", "--resume_checkpoint", "exclude each other"]),
        (["--grad_clip", "-1"], 2, ["--grad_clip -1.0 must be >= 0"]),
        (["--lr_warmup_steps", "-3"], 2, ["--lr_warmup_steps -3 must be >= 0"]),
        (["--save_format", "npz"], 2, ["--save_format", "'npz'"]),
        (["--init_checkpoint", "MISSING"], 1, ["MISSING"]),
    ],
)
def test_bad_options_fail_with_one_error_line(tmp_path, three_class_model, monkeypatch, capsys, argv, status, needles):
    images = write_images(tmp_path / "images", 4)
    names = {"INIT": str(three_class_model), "MISSING": str(tmp_path / "missing.pt")}
    argv = [names.get(a, a) for a in argv]
    needles = [names.get(n, n) for n in needles]
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "log"))
    monkeypatch.setenv("OPENAI_LOG_FORMAT", "log")
    flags = dict(TINY_MODEL, data_dir=images, batch_size=2, max_steps=1)
    try:
        load_script("image_train").main([*(x for k, v in flags.items() for x in (f"--{k}", str(v))), *argv])
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        logger.reset()
    err = capsys.readouterr().err
    assert code == status, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


def test_resume_auto_with_init_checkpoint_starts_from_the_weights_then_resumes_the_run(three_class_model, tmp_path):
    args = dict(data=ClassImages(3), model_flags=class_flags(3), init_checkpoint=str(three_class_model),
                resume_checkpoint="auto", max_steps=2, save_interval=2)
    first = make_loop(tmp_path, **args)
    assert first.step == 0 and "starting from the weights in" in (tmp_path / "log.txt").read_text()
    first.run_loop()
    again = make_loop(tmp_path, **dict(args, max_steps=4))
    assert again.step == 2 and "only starts a run" in (tmp_path / "log.txt").read_text()
    assert_same_state(again.model.state_dict(), load_checkpoint(tmp_path / "model000002.pt"))
