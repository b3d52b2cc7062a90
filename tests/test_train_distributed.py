"""``curvlab train`` under ``torchrun``: batch slices, loss scaling, Monte-Carlo labels independent of the
split, and two processes reproducing the single-process run (uneven slices included)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchrun_util import h5_differences, torchrun

from curvlab.capture.factors import collect_factors
from curvlab.capture.loss import logit_gradient_samples, sample_categorical
from curvlab.commands import main
from curvlab.optim.kfac import KFAC, mean_cross_entropy
from curvlab.optim.train import loss_scale, shard

REPO = Path(__file__).resolve().parents[1]

# Two processes add the same terms in another order (DDP's gradient all-reduce, the factor sums, the
# loss average), so they differ from one process by float32 rounding, amplified a little by a few
# steps. Measured on the runs below (3 steps, batch 63 cut 32 + 31): at most 3.1e-7 of a dataset's
# largest value (weights and factors; K-FAC mc the largest, adam and momentum 1.2e-7) and 1.7e-7
# relative in the losses. The tolerances are ~100x that. Measured with the mistakes they guard
# against: Monte-Carlo labels drawn per slice (no ``rows``) move the weights and factors by 2.9e-2,
# unscaled slice losses (each slice's mean weighted 1/2 instead of n_r/B) by 4.8e-2.
WEIGHT_RTOL = 5e-5
LOSS_RTOL = 2e-5


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread each (the 2-core machine is shared with the two worker processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ slices and the loss


@pytest.mark.parametrize(("total", "world"), [(63, 2), (64, 2), (10, 3), (7, 7), (5, 4)])
def test_shard_cuts_like_array_split(total, world):
    """Contiguous slices covering the batch once, sizes as ``numpy.array_split`` (differ by ≤ 1)."""
    expected = np.array_split(np.arange(total), world)
    for rank in range(world):
        offset, count = shard(total, rank, world)
        np.testing.assert_array_equal(np.arange(offset, offset + count), expected[rank])


def test_scaled_slice_losses_average_to_the_whole_batch_gradient():
    """``(1/W) Σ_r ∇(W n_r/B · L_r) = ∇ L`` (what DDP's gradient average gives) and the average of
    the scaled losses is ``L``, for uneven slices and a loss with label locations (float64: rounding
    only, 1e-12)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 5).double()
    B, T, W = 11, 3, 3
    x = torch.randn(B, T, 4, dtype=torch.float64)
    y = torch.randint(0, 5, (B, T))

    def gradient(inputs, labels, scale=1.0):
        model.zero_grad()
        loss = mean_cross_entropy(model(inputs), labels) * scale
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    whole_loss, whole = gradient(x, y)
    losses, grads = [], []
    for rank in range(W):
        offset, count = shard(B, rank, W)
        part = slice(offset, offset + count)
        loss, grad = gradient(x[part], y[part], loss_scale(count, B, W))
        losses.append(loss)
        grads.append(grad)
    torch.testing.assert_close(sum(losses) / W, whole_loss, rtol=1e-12, atol=0)
    for k, g in enumerate(whole):
        torch.testing.assert_close(sum(grad[k] for grad in grads) / W, g, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------ Monte-Carlo labels


def test_inverse_cdf_sampler_draws_the_categorical_distribution():
    """Frequencies of 200 000 draws within 5 standard errors of ``p``; a class of probability 0 never."""
    p = torch.tensor([0.5, 0.0, 0.2, 0.299, 0.001], dtype=torch.float32)
    n = 200_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    labels = sample_categorical(p.expand(n, -1), u)
    freq = torch.bincount(labels, minlength=5).double() / n
    se = (p.double() * (1 - p.double()) / n).sqrt()
    assert freq[1] == 0
    assert torch.all((freq - p.double()).abs() <= 5 * se + 1e-12), (freq, p)
    # the edges: u = 0 takes the first class of positive probability, u → 1 the last one
    edges = sample_categorical(torch.tensor([[0.0, 0.3, 0.7, 0.0]] * 2),
                               torch.tensor([0.0, 1 - 2**-53], dtype=torch.float64))
    assert edges.tolist() == [1, 2]


def test_a_slice_of_the_batch_gets_the_labels_of_the_whole_draw():
    """``rows=(offset, total)`` on examples ``offset …`` of a batch = those rows of the whole batch's
    draw, with the generator left in the same state (here with label locations and 2 samples)."""
    logits = torch.randn(7, 3, 6, generator=torch.Generator().manual_seed(0))
    whole_gen, part_gen = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    whole = list(logit_gradient_samples(logits, None, "mc", mc_samples=2, generator=whole_gen))
    part = list(logit_gradient_samples(logits[2:5], None, "mc", mc_samples=2, generator=part_gen,
                                       rows=(2, 7)))
    for (u_whole, w_whole), (u_part, w_part) in zip(whole, part, strict=True):
        assert w_whole == w_part == 0.5
        assert torch.equal(u_whole[2:5], u_part)
    assert torch.equal(whole_gen.get_state(), part_gen.get_state())
    with pytest.raises(ValueError, match="do not fit"):
        list(logit_gradient_samples(logits[2:5], None, "mc", generator=part_gen, rows=(5, 7)))


def test_kfac_initial_factors_equal_collect_factors_with_its_seed():
    """K-FAC's first estimate draws batch ``k``'s labels with seed ``(seed, k)``, like collect_factors
    (so dealing the batches out to processes does not change it), and leaves the training generator
    alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 5, generator=gen, dtype=torch.float64),
                torch.randint(0, 3, (6,), generator=gen)) for _ in range(3)]
    expected = collect_factors(model, batches, fisher="mc", seed=4)
    with KFAC(model, lr=0.1, damping=1e-2, seed=4) as opt:
        before = opt.generator.get_state()
        opt.initialize_factors(batches)
        assert torch.equal(opt.generator.get_state(), before)
        running = opt.running_factors()
    for name, f in expected.items():
        np.testing.assert_allclose(running[name].A, f.A, rtol=1e-12)
        np.testing.assert_allclose(running[name].S, f.S, rtol=1e-12)


# ------------------------------------------------------------------------------ 1 vs 2 processes


def _args(run: Path, *extra: str, steps: int = 3) -> list[str]:
    # batch 63: slices of 32 and 31 examples; eigendecompositions at steps 0 and 2; steps 0, 2, 3 saved
    return ["train", "--model", "mlp", "--data", "digits", "--examples", "256", "--batch-size", "63",
            "--steps", str(steps), "--save-steps", "2", "--factor-examples", "100", "--quiet", "-o", str(run),
            *extra]


def _metrics(run: Path) -> list[dict]:
    with open(run / "metrics.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


KFAC_OPTIONS = ["--optimizer", "kfac", "--factor-update-every", "1", "--inverse-update-every", "2"]


@pytest.mark.parametrize(("options", "resume_at"), [
    ([*KFAC_OPTIONS, "--fisher", "mc"], 2),
    ([*KFAC_OPTIONS, "--fisher", "empirical"], None),
    (["--optimizer", "adam"], None),
    # digit 3 as the ignored label: the slices hold different numbers of counted labels (loss scale
    # W K_r / K, K-FAC's T_loss added up) and examples left out of the factors
    ([*KFAC_OPTIONS, "--fisher", "mc", "--ignore-index", "3"], None),
], ids=["kfac-mc-resumed", "kfac-empirical", "adam", "kfac-ignore-index"])
def test_two_processes_reproduce_one(tmp_path, capsys, options, resume_at):
    """The same checkpoint (weights and factors of steps 0, 2, 3) and losses as one process, up to
    rounding; process 0 alone writes and prints. ``resume_at``: the two-process run stops at that
    step and a second two-process ``--resume`` finishes it (every process reads the state file,
    K-FAC's factors and Monte-Carlo generator included)."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_args(one, *options)) == 0
    capsys.readouterr()
    runs = [_args(two, *options)]
    if resume_at is not None:
        runs = [_args(two, *options, steps=resume_at), ["train", "--resume", "--steps", "3", "-o", str(two)]]
    for args in runs:
        result = torchrun(args, cwd=REPO)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("trained mlp") == 1, result.stdout  # one summary, from process 0
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))  # no stray files from process 1
    assert h5_differences(one / "ckpt.h5", two / "ckpt.h5", rtol=WEIGHT_RTOL) == []
    m1, m2 = _metrics(one), _metrics(two)
    assert [r["step"] for r in m1] == [1, 2, 3]
    assert [(r["step"], r["lr"]) for r in m2] == [(r["step"], r["lr"]) for r in m1]
    np.testing.assert_allclose([r["loss"] for r in m2], [r["loss"] for r in m1], rtol=LOSS_RTOL)
    if "kfac" in options:
        np.testing.assert_allclose([r["nu"] for r in m2], [r["nu"] for r in m1], rtol=WEIGHT_RTOL)
