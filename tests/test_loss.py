"""Fisher logit-gradient vectors (curvlab/capture/loss.py): their weighted outer products are the
loss Hessian.

For logits ``(B, L, C)`` (L label locations per example, e.g. tokens) the Hessian of an example's summed
loss is block diagonal, ``blockdiag_l(diag(p_l) − p_l p_l^T)``. The exact columns must give it to rounding
(float64: 1e-14); Monte-Carlo labels give it in expectation (checked within 5 standard errors).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curvlab.capture.loss import EXACT_PASS_LIMIT, exact_passes, logit_gradient_samples, loss_hessian
from curvlab.errors import OptionError


def _block_hessian(logits: torch.Tensor) -> torch.Tensor:
    """``(B, L·C, L·C)``: the per-location Hessians on the diagonal, zero between locations."""
    b, locations, c = logits.shape
    blocks = loss_hessian(logits)  # (B, L, C, C)
    dense = torch.zeros(b, locations * c, locations * c, dtype=logits.dtype)
    for loc in range(locations):
        dense[:, loc * c : (loc + 1) * c, loc * c : (loc + 1) * c] = blocks[:, loc]
    return dense


def _outer_sum(samples, shape) -> torch.Tensor:
    total = torch.zeros(shape[0], shape[1] * shape[2], shape[1] * shape[2], dtype=torch.float64)
    for u, weight in samples:
        flat = u.reshape(shape[0], -1)
        total += weight * flat[:, :, None] * flat[:, None, :]
    return total


@pytest.mark.parametrize("shape", [(4, 1, 5), (3, 4, 5), (2, 7, 3)])
def test_exact_columns_give_the_block_diagonal_hessian(shape):
    logits = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    samples = list(logit_gradient_samples(logits, None, "exact"))
    assert len(samples) == exact_passes(shape) == shape[1] * shape[2]
    np.testing.assert_allclose(_outer_sum(samples, shape), _block_hessian(logits), atol=1e-14)


def test_exact_columns_of_plain_classifier_logits():
    logits = torch.randn(6, 4, dtype=torch.float64)
    samples = list(logit_gradient_samples(logits, None, "exact"))
    assert len(samples) == 4
    total = sum(w * u[:, :, None] * u[:, None, :] for u, w in samples)
    np.testing.assert_allclose(total, loss_hessian(logits), atol=1e-14)


def test_too_many_exact_passes_is_a_clear_error():
    logits = torch.zeros(1, 100, EXACT_PASS_LIMIT // 100 + 1)
    with pytest.raises(OptionError, match=r"takes \d+ backward passes per batch .*use the mc Fisher"):
        next(logit_gradient_samples(logits, None, "exact"))


def test_mc_labels_give_the_block_diagonal_hessian_in_expectation():
    """Independent labels per location: the cross-location products average out."""
    shape = (2, 3, 4)
    logits = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    draws = 20_000
    gen = torch.Generator().manual_seed(2)
    samples = list(logit_gradient_samples(logits, None, "mc", mc_samples=draws, generator=gen))
    flat = torch.stack([u.reshape(shape[0], -1) for u, _ in samples])  # (draws, B, L·C)
    outer = flat[..., :, None] * flat[..., None, :]
    mean, se = outer.mean(0), outer.std(0) / draws**0.5
    expected = _block_hessian(logits)
    assert torch.all((mean - expected).abs() <= 5 * se + 1e-12)


# --------------------------------------------------------------------------------------------------
# Every loss × Fisher type against torch.func on the loss itself (torch's own functional losses)
# --------------------------------------------------------------------------------------------------

import torch.nn.functional as F  # noqa: E402
from torch.func import grad, hessian  # noqa: E402

from curvlab.capture.loss import (  # noqa: E402
    BinaryCrossEntropy,
    CrossEntropy,
    MeanSquaredError,
    loss_from_attrs,
    make_loss,
)
from curvlab.errors import CheckpointError, DataError  # noqa: E402

IGNORE = -100


def _case(name: str, seed: int = 0, scale: float = 1.5):
    """``(loss, logits (B, L, K), labels, reference per-example loss of one example)``; the reference is
    torch's own loss with ``reduction="sum"`` over the example's terms (not curvlab's code)."""
    gen = torch.Generator().manual_seed(seed)
    b, locations, k = 4, 3, 5
    logits = torch.randn(b, locations, k, generator=gen, dtype=torch.float64) * scale
    if name.startswith("ce"):
        labels = torch.randint(0, k, (b, locations), generator=gen)
        smoothing = 0.2 if name == "ce_smooth" else 0.0
        ignore = IGNORE if name == "ce_ignore" else None
        if ignore is not None:
            labels[0, 1] = labels[2, 0] = IGNORE
            labels[3] = IGNORE  # an example with no counted label
        loss = CrossEntropy(ignore_index=ignore, label_smoothing=smoothing)

        def reference(z, y):
            skip = IGNORE if ignore is not None else -1000  # -1000: no label is ignored
            return F.cross_entropy(z.reshape(-1, k), y.reshape(-1), reduction="sum",
                                   label_smoothing=smoothing, ignore_index=skip)

        return loss, logits, labels, reference
    if name == "mse":
        targets = torch.randn(b, locations, k, generator=gen, dtype=torch.float64)
        return MeanSquaredError(), logits, targets, lambda z, y: F.mse_loss(z, y, reduction="sum")
    targets = torch.rand(b, locations, k, generator=gen, dtype=torch.float64)
    targets[:2] = targets[:2].round()  # hard labels and probabilities
    return BinaryCrossEntropy(), logits, targets, (
        lambda z, y: F.binary_cross_entropy_with_logits(z, y, reduction="sum"))


CASES = ["ce", "ce_smooth", "ce_ignore", "mse", "bce"]


def _flat_outer(u: torch.Tensor) -> torch.Tensor:
    flat = u.reshape(u.shape[0], -1)
    return flat[:, :, None] * flat[:, None, :]


@pytest.mark.parametrize("name", CASES)
def test_empirical_and_exact_equal_torch_func_gradient_and_hessian(name):
    """float64: curvlab's closed forms and torch.func's autodiff of torch's losses agree to 1e-12."""
    loss, logits, labels, reference = _case(name)
    grads = torch.stack([grad(reference)(logits[n], labels[n]) for n in range(len(logits))])
    hessians = torch.stack([hessian(reference)(logits[n], labels[n]).reshape(15, 15) for n in range(4)])
    [(u, w)] = list(logit_gradient_samples(logits, labels, "empirical", loss=loss))
    assert w == 1.0
    np.testing.assert_allclose(u, grads, atol=1e-12)
    columns = list(logit_gradient_samples(logits, labels, "exact", loss=loss))
    np.testing.assert_allclose(sum(w * _flat_outer(u) for u, w in columns), hessians, atol=1e-12)
    # the quadratic form of the jvp route, on random directions
    v = torch.randn(logits.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    expected = torch.einsum("ni,nij,nj->n", v.reshape(4, -1), hessians, v.reshape(4, -1))
    np.testing.assert_allclose(loss.quadratic_form(logits, v, labels), expected, atol=1e-12)
    np.testing.assert_allclose(loss.per_example(logits, labels),
                               [float(reference(logits[n], labels[n])) for n in range(4)], atol=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_exact_passes_skip_what_counts_nowhere(name):
    loss, logits, labels, _ = _case(name)
    passes = len(list(logit_gradient_samples(logits, labels, "exact", loss=loss)))
    assert loss.exact_passes(logits.shape) == 15
    # ce_ignore: every location is counted by some example, so no location is skipped here
    assert passes == 15
    if name == "ce_ignore":
        labels = labels.clone()
        labels[:, 2] = IGNORE  # location 2 ignored by every example: its 5 columns are not taken
        assert len(list(logit_gradient_samples(logits, labels, "exact", loss=loss))) == 10
        assert loss.num_examples(logits, labels) == 3 and loss.num_terms(logits, labels) == 4


@pytest.mark.parametrize("name", CASES)
def test_mc_gives_the_hessian_within_monte_carlo_error(name):
    """The mean of ``u u^T`` over 8,000 draws is within 5 standard errors (measured from the draws,
    per entry) of torch.func's Hessian, for all 900 entries at once (a 5σ miss has probability ~6e-7
    per entry; measured over the five losses: median |error| / SE 0.64-0.73, as for a normal's 0.67,
    largest 3.6 with 20,000 draws). Logits of scale 0.7 keep every class probability above ~2 %: a
    class drawn a handful of times makes the sample SE of its products unreliable (heavy tails), which
    is the test's limit, not the estimator's."""
    loss, logits, labels, reference = _case(name, seed=1, scale=0.7)
    hessians = torch.stack([hessian(reference)(logits[n], labels[n]).reshape(15, 15) for n in range(4)])
    draws = 8_000
    gen = torch.Generator().manual_seed(2)
    outer = torch.stack([_flat_outer(u) for u, w in logit_gradient_samples(
        logits, labels, "mc", loss=loss, mc_samples=draws, generator=gen)])
    mean, se = outer.mean(0), outer.std(0) / draws**0.5
    assert torch.all((mean - hessians).abs() <= 5 * se + 1e-12)
    # the estimate is informative: the SE is small against the Hessian's scale
    assert float(se.max()) < 0.03 * float(hessians.abs().max())


@pytest.mark.parametrize("name", ["mse", "bce", "ce_ignore"])
def test_mc_draws_of_a_slice_are_those_of_the_whole_batch(name):
    loss, logits, labels, _ = _case(name)
    whole = list(logit_gradient_samples(logits, labels, "mc", loss=loss, mc_samples=2,
                                        generator=torch.Generator().manual_seed(3)))
    part = list(logit_gradient_samples(logits[1:3], labels[1:3], "mc", loss=loss, mc_samples=2,
                                       generator=torch.Generator().manual_seed(3), rows=(1, 4)))
    for (u, _), (v, _) in zip(whole, part, strict=True):
        torch.testing.assert_close(u[1:3], v, rtol=0, atol=0)


@pytest.mark.parametrize("name", CASES)
def test_mean_is_torchs_mean_reduction(name):
    loss, logits, labels, _ = _case(name)
    if name.startswith("ce"):
        module = torch.nn.CrossEntropyLoss(ignore_index=IGNORE, label_smoothing=loss.label_smoothing)
        expected = module(logits.reshape(-1, 5), labels.reshape(-1))
    elif name == "mse":
        expected = torch.nn.MSELoss()(logits, labels)
    else:
        expected = torch.nn.BCEWithLogitsLoss()(logits, labels)
    torch.testing.assert_close(loss.mean(logits, labels), expected, rtol=1e-13, atol=0)


def test_label_smoothing_changes_only_the_empirical_fisher():
    _, logits, labels, _ = _case("ce")
    plain, smooth = CrossEntropy(), CrossEntropy(label_smoothing=0.3)
    for fisher in ("exact", "mc"):
        a = [u for u, _ in logit_gradient_samples(logits, labels, fisher, loss=plain,
                                                  generator=torch.Generator().manual_seed(0))]
        b = [u for u, _ in logit_gradient_samples(logits, labels, fisher, loss=smooth,
                                                  generator=torch.Generator().manual_seed(0))]
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    [(u, _)] = logit_gradient_samples(logits, labels, "empirical", loss=plain)
    [(v, _)] = logit_gradient_samples(logits, labels, "empirical", loss=smooth)
    assert not torch.allclose(u, v)


def test_ignored_labels_count_nowhere():
    """Ignored locations have u = 0 for every Fisher type; changing their label changes nothing."""
    loss, logits, labels, _ = _case("ce_ignore")
    ignored = labels == IGNORE
    for fisher in ("empirical", "mc", "exact"):
        for u, _ in logit_gradient_samples(logits, labels, fisher, loss=loss, mc_samples=3,
                                           generator=torch.Generator().manual_seed(0)):
            assert torch.all(u[ignored] == 0)
    assert loss.num_terms(logits, labels) == 12 - 5 and loss.num_examples(logits, labels) == 3
    assert loss.example_mask(labels).tolist() == [True, True, True, False]


def _raises(error, match, fn, *args):
    with pytest.raises(error, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)


def test_wrong_heads_and_labels_are_one_line_errors():
    ce = CrossEntropy()
    z = torch.randn(6, 4)
    _raises(OptionError, r"logits of shape \(6,\): cross-entropy expects \(batch, classes\)", ce.check,
            torch.randn(6), torch.zeros(6, dtype=torch.long))
    _raises(OptionError, r"1 output per location .* not a classifier .*--loss mse", ce.check,
            torch.randn(6, 1), torch.zeros(6, dtype=torch.long))
    _raises(DataError, r"hold -100 \(padding\) but no ignore_index .*--ignore-index -100", ce.check,
            z, torch.tensor([0, 1, -100, 2, 3, 0]))
    _raises(DataError, r"labels must be in \[0, 4\) for 4 classes, found 7", ce.check, z,
            torch.tensor([0, 1, 7, 2, 3, 0]))
    _raises(DataError, r"labels must be in \[0, 4\) for 4 classes, found -3",
            CrossEntropy(ignore_index=-100).check, z, torch.tensor([0, -100, -3, 2, 3, 0]))
    _raises(DataError, r"integer class indices", ce.check, z, torch.zeros(6))
    _raises(DataError, r"labels of shape \(6, 1\) do not fit logits \(6, 4\).* labels of shape \(6,\)",
            ce.check, z, torch.zeros(6, 1, dtype=torch.long))
    _raises(DataError, r"NaN or infinite", ce.check, z.clone().fill_(float("nan")), None)
    _raises(DataError, r"mse targets of shape \(6,\) do not fit outputs \(6, 4\)", MeanSquaredError().check,
            z, torch.zeros(6))
    _raises(DataError, r"bce targets must be in \[0, 1\].* found 2", BinaryCrossEntropy().check, z,
            torch.full((6, 4), 2.0))
    # a 1-output regression head takes (B,) targets as (B, 1); integer targets become floats
    targets = MeanSquaredError().check(torch.randn(6, 1), torch.arange(6))
    assert targets.shape == (6, 1) and targets.dtype == torch.float32


def test_make_loss_and_the_checkpoint_record():
    assert make_loss() == CrossEntropy() and make_loss("mse") == MeanSquaredError()
    with pytest.raises(OptionError, match="--ignore-index is an option of cross-entropy, not of mse"):
        make_loss("mse", ignore_index=-100)
    with pytest.raises(OptionError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        make_loss(label_smoothing=1.5)
    with pytest.raises(OptionError, match="unknown loss 'hinge'"):
        make_loss("hinge")
    smooth = CrossEntropy(ignore_index=-100, label_smoothing=0.1)
    assert smooth.to_attrs() == {"loss": "cross-entropy", "loss_ignore_index": -100,
                                 "loss_label_smoothing": 0.1}
    assert loss_from_attrs(smooth.to_attrs()) == smooth
    assert loss_from_attrs({"fisher_type": "mc"}) == CrossEntropy()  # files before the loss was recorded
    assert loss_from_attrs({"loss": np.str_("bce")}) == BinaryCrossEntropy()
    assert loss_from_attrs({"loss": "cross-entropy", "loss_ignore_index": np.int64(-1)}).ignore_index == -1
    for attrs, match in [({"loss": "hinge"}, "unknown loss 'hinge'"),
                         ({"loss": "mse", "loss_ignore_index": 3}, "option of cross-entropy"),
                         ({"loss": "cross-entropy", "loss_ignore_index": 1.5}, "not an integer"),
                         ({"loss": "cross-entropy", "loss_label_smoothing": "0.1"}, "not a number"),
                         ({"loss": "cross-entropy", "loss_label_smoothing": 7.0}, r"in \[0, 1\]"),
                         ({"loss": "cross-entropy", "loss_margin": 1.0}, "unknown loss option")]:
        with pytest.raises(CheckpointError, match=match):
            loss_from_attrs(attrs, "x.h5: step 3")
