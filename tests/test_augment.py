"""``curvlab train --augment``: random crop with padding and horizontal flip (seed F.1), seeded, resumable."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from curvlab.commands import main
from curvlab.errors import OptionError
from curvlab.io.checkpoint import load
from curvlab.optim import augment
from curvlab.optim.train import TrainConfig, train


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reference(x, dy, dx, flips, padding, fill):
    """Pad with the fill value, cut the window, then mirror: the textbook definition, one image at a time."""
    out = []
    for b in range(x.shape[0]):
        padded = torch.stack([F.pad(x[b, c], (padding,) * 4, value=float(fill[c]))
                              for c in range(x.shape[1])])
        window = padded[:, dy[b] : dy[b] + x.shape[2], dx[b] : dx[b] + x.shape[3]]
        out.append(torch.flip(window, dims=[2]) if flips[b] else window)
    return torch.stack(out)


def test_crop_and_flip_match_pad_cut_mirror():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 3, 5, 7, generator=gen)
    fill = torch.tensor([-1.5, 0.25, 2.0])
    for padding in (1, 2, 3):
        dy, dx, flips = augment.draw(64, padding, True, gen)
        assert int(dy.min()) == 0 and int(dy.max()) == 2 * padding and flips.any() and (~flips).any()
        torch.testing.assert_close(augment.apply(x, dy, dx, flips, padding, fill),
                                   _reference(x, dy, dx, flips, padding, fill), rtol=0, atol=0)
    dy, dx, flips = augment.draw(64, 2, False, gen)
    assert not flips.any()  # crop only


def test_draws_are_a_function_of_seed_and_step_and_do_not_depend_on_the_split():
    aug = augment.Augmenter(["crop"], 1, torch.zeros(1), seed=5)
    x = torch.randn(10, 1, 8, 8)
    whole = aug(x, step=7, rows=(0, 10))
    torch.testing.assert_close(aug(x, 7, (0, 10)), whole, rtol=0, atol=0)  # same seed and step: same
    parts = torch.cat([aug(x[:4], 7, (0, 10)), aug(x[4:], 7, (4, 10))])  # two processes' slices
    torch.testing.assert_close(parts, whole, rtol=0, atol=0)
    assert not torch.equal(aug(x, 8, (0, 10)), whole)  # another step draws anew
    assert not torch.equal(augment.Augmenter(["crop"], 1, torch.zeros(1), seed=6)(x, 7, (0, 10)), whole)


def test_options_are_checked():
    assert augment.parse_augment("flip,crop") == ["crop", "flip"]
    assert augment.parse_augment("none") == [] and augment.parse_augment(None) == []
    with pytest.raises(OptionError, match="choose from"):
        augment.parse_augment("rotate")
    with pytest.raises(OptionError, match="mirrored digit"):
        augment.check_augment(["crop", "flip"], "digits", (1, 8, 8))
    augment.check_augment(["crop", "flip"], "cifar10:/x", (3, 32, 32))
    with pytest.raises(OptionError, match="sequences"):
        augment.check_augment(["crop"], "pystdlib", (32,))
    assert augment.default_padding(32, 32) == 4 and augment.default_padding(8, 8) == 1
    # the black level of digits is the standardised 0 pixel: the digits' own background
    from curvlab.io.data import load_dataset

    data = load_dataset("digits", limit=50)
    assert float(data.x.min()) == pytest.approx(float(augment.black_level("digits", 1)[0]))


SMALL = {"model": "simple_cnn", "model_args": {"channels": [4, 8], "hidden": 16}, "data": "digits",
         "examples": 96, "batch_size": 16, "factor_examples": 32}


def test_resumed_augmented_run_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    from curvlab.io.checkpoint import writer

    config = TrainConfig(**SMALL, optimizer="kfac", steps=8, save_every=4, augment=["crop"], lr=0.05)
    whole, broken, plain = (str(tmp_path / name) for name in ("whole", "broken", "plain"))
    train(config, whole, progress=False)
    real = writer._mark_complete

    def dying(group):
        if int(group.attrs["step"]) == 8:
            raise KeyboardInterrupt("killed while saving")
        real(group)

    with monkeypatch.context() as patch:
        patch.setattr(writer, "_mark_complete", dying)
        with pytest.raises(KeyboardInterrupt):
            train(config, broken, progress=False)
    assert train(config, broken, resume=True, progress=False)["resumed_from"] == 4
    a, b = load(os.path.join(whole, "ckpt.h5")), load(os.path.join(broken, "ckpt.h5"))
    for key, value in a.steps[8].weights.items():
        np.testing.assert_array_equal(b.steps[8].weights[key], value, err_msg=key)
    # and the augmentation did something: the same run without it ends elsewhere
    train(TrainConfig(**SMALL, optimizer="kfac", steps=8, save_every=4, lr=0.05), plain, progress=False)
    c = load(os.path.join(plain, "ckpt.h5"))
    assert any(not np.array_equal(c.steps[8].weights[k], v) for k, v in a.steps[8].weights.items())
    with open(os.path.join(whole, "config.json"), encoding="utf-8") as handle:
        assert json.load(handle)["train"]["augment"] == ["crop"]


def test_command_line(tmp_path, capsys):
    run = str(tmp_path / "run")
    base = ["train", "--model", "mlp", "--model-arg", "widths=8", "--examples", "64", "--batch-size", "16",
            "--steps", "2", "--quiet", "-o", run]
    assert main([*base, "--augment", "crop,flip"]) == 2
    assert "mirrored digit" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(run, "ckpt.h5"))
    assert main([*base, "--augment", "crop", "--augment-padding", "2"]) == 0
    with open(os.path.join(run, "config.json"), encoding="utf-8") as handle:
        stored = json.load(handle)["train"]
    assert stored["augment"] == ["crop"] and stored["augment_padding"] == 2
    assert main([*base, "--resume", "--steps", "3"]) == 0  # the stored augmentation carries over
