"""Building blocks of the seed F.2 models with batch norm: ghost batch norm, channel-wise weight norm.

**Ghost batch normalisation** (Hoffer et al. 2017; seed F.2, ghost batch size 32). In training mode a
batch of ``N`` examples is cut, in order, into ghost batches of ``ghost_batch`` examples (the last one
holds the remainder ``N mod ghost_batch`` if that is not zero), and each ghost batch is batch-normalised
with its *own* statistics: for channel ``c`` of ghost batch ``j``, over its examples and pixels,

    mu_jc = mean(x),   sigma2_jc = mean((x - mu_jc)^2),
    y = gamma_c (x - mu_jc) / sqrt(sigma2_jc + eps) + beta_c.

This is exactly what :func:`torch.nn.functional.batch_norm` does when called on each ghost batch in
turn, including the running statistics, which are updated once per ghost batch in order
(``r <- (1 - m) r + m stat_j``, the variance unbiased with ``n_j / (n_j - 1)``); the implementation
computes all ghost batches at once. In eval mode the running statistics are used, like
:class:`torch.nn.BatchNorm2d`. Examples interact only within their ghost batch, so the training
objective does not depend on the batch size (the reason the seed uses it).

**Channel-wise weight normalisation** (seed F.2: "constraining the Frobenius norm of each
convolutional channel to be exactly 1"). Every normalised convolution is an ordinary ``nn.Conv2d``
without bias whose weight ``W`` (the parameter itself, shape ``(c_out, c_in, kh, kw)``) satisfies
``||W[c]||_F = 1`` for each output channel ``c``. The constraint is kept by *projection*: after each
optimiser step the training loop calls :func:`project_weights_` (or registers
:func:`attach_weight_projection` on the optimiser once), which divides each output channel by its
norm. Because each such conv is followed by batch norm, the loss does not change when a channel is
rescaled, so its gradient is orthogonal to the channel and a step only leaves the sphere at second
order; the projection brings it back. K-FAC factors and saved weights refer to this ``W`` directly.

A model with normalised convolutions lists their module paths in its ``weight_normalized`` attribute.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from curvlab.errors import ModelError

__all__ = [
    "GhostBatchNorm2d",
    "attach_weight_projection",
    "channel_norms",
    "normalize_channels_",
    "project_weights_",
    "weight_normalized_convs",
]


class GhostBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode statistics are taken per ghost batch of examples.

    Same parameters and buffers as ``nn.BatchNorm2d`` (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``, which counts ghost batches); ``momentum`` must be a
    number (no cumulative averaging). See the module docstring for the math.
    """

    def __init__(
        self, num_features: int, ghost_batch: int = 32, *, eps: float = 1e-5, momentum: float = 0.1
    ) -> None:
        if ghost_batch < 1:
            raise ModelError(f"ghost batch size must be a positive integer, got {ghost_batch}")
        if momentum is None:
            raise ModelError("ghost batch norm needs a numeric momentum (cumulative averaging unsupported)")
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.ghost_batch = ghost_batch

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch={self.ghost_batch}"

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``(N, C, H, W)``: per ghost batch in training mode, running stats in eval mode."""
        self._check_input_dim(x)
        if not self.training:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        outputs, means, variances = [], [], []
        for chunks in _ghost_chunks(x, self.ghost_batch):
            out, mean, var = self._normalize(chunks)
            outputs.append(out)
            means.append(mean)
            variances.append(var)
        self._update_running_stats(torch.cat(means), torch.cat(variances))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def _normalize(self, chunks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``chunks`` ``(K, G, C, H, W)``: each of the K ghost batches normalised with its own stats.

        The K ghost batches are folded into the channel axis, ``(G, K*C, H, W)``, so that one call of
        the fused batch-norm kernel normalises every (ghost batch, channel) pair with its own mean and
        variance; temporary running buffers with momentum 1 receive those statistics. Returns the
        output ``(K*G, C, H, W)`` and the per-ghost-batch mean and unbiased variance, ``(K, C)``.
        """
        k, g, c, h, w = chunks.shape
        if g * h * w < 2:
            raise ModelError(
                f"ghost batch norm: a ghost batch of {g} example(s) at {h}x{w} has one value per "
                f"channel; use a batch size that does not leave a remainder of 1 modulo the ghost "
                f"batch {self.ghost_batch}"
            )
        folded = chunks.transpose(0, 1).reshape(g, k * c, h, w) if k > 1 else chunks[0]
        mean = torch.zeros(k * c, dtype=self.running_mean.dtype, device=chunks.device)
        var = torch.ones_like(mean)
        weight = None if self.weight is None else self.weight.repeat(k)
        bias = None if self.bias is None else self.bias.repeat(k)
        out = F.batch_norm(folded, mean, var, weight, bias, True, 1.0, self.eps)
        if k > 1:
            out = out.reshape(g, k, c, h, w).transpose(0, 1).reshape(k * g, c, h, w)
        return out, mean.view(k, c), var.view(k, c)

    @torch.no_grad()
    def _update_running_stats(self, means: Tensor, variances: Tensor) -> None:
        """Apply ``r <- (1 - m) r + m stat_j`` for ghost batches ``j = 1..K`` in order, in closed form.

        After K updates ``r_K = (1 - m)^K r_0 + sum_j m (1 - m)^(K - j) stat_j``; the variance
        statistic is the unbiased ``sigma2_j n_j / (n_j - 1)``, as in ``torch.nn.functional.batch_norm``.
        """
        m = self.momentum
        k = means.shape[0]
        decay = (1.0 - m) ** torch.arange(k - 1, -1, -1, dtype=torch.float64, device=means.device)
        weights = (m * decay).to(means.dtype).unsqueeze(1)
        self.running_mean.mul_((1.0 - m) ** k).add_((weights * means).sum(0))
        self.running_var.mul_((1.0 - m) ** k).add_((weights * variances).sum(0))
        self.num_batches_tracked.add_(k)


def _ghost_chunks(x: Tensor, ghost_batch: int) -> Iterator[Tensor]:
    """Views ``(K, G, C, H, W)`` of the full ghost batches, then ``(1, R, C, H, W)`` of the remainder."""
    n = x.shape[0]
    full = n - n % ghost_batch
    if full:
        yield x[:full].reshape(full // ghost_batch, ghost_batch, *x.shape[1:])
    if full < n:
        yield x[full:].unsqueeze(0)


# --------------------------------------------------------------------------- weight normalisation


def channel_norms(weight: Tensor) -> Tensor:
    """``||W[c]||_F`` for each output channel ``c`` of a weight ``(c_out, ...)``, in float64."""
    return weight.detach().flatten(1).to(torch.float64).norm(dim=1)


@torch.no_grad()
def normalize_channels_(weight: Tensor) -> Tensor:
    """Divide each output channel of ``weight`` by its Frobenius norm, in place; returns ``weight``.

    A channel that is exactly zero cannot be normalised and is left as it is.
    """
    norms = channel_norms(weight)
    scale = torch.where(norms > 0, 1.0 / norms, torch.ones_like(norms))
    weight.mul_(scale.to(weight.dtype).view(-1, *([1] * (weight.dim() - 1))))
    return weight


@torch.no_grad()
def init_weight_normalized_convs_(model: nn.Module) -> tuple[str, ...]:
    """He-normal init of every conv, projected to unit norm per output channel; BN and ``fc`` keep
    PyTorch's defaults. Returns the convs' module paths (the model's ``weight_normalized``)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            normalize_channels_(module.weight)
            names.append(name)
    return tuple(names)


def weight_normalized_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """``(path, conv)`` of every convolution listed in ``model.weight_normalized`` (empty if none)."""
    paths = getattr(model, "weight_normalized", ())
    return [(path, model.get_submodule(path)) for path in paths]


def project_weights_(model: nn.Module) -> None:
    """Restore ``||W[c]||_F = 1`` on every normalised conv of ``model`` (a no-op for other models).

    Call after every optimiser step (any optimiser, K-FAC included).
    """
    for _, conv in weight_normalized_convs(model):
        normalize_channels_(conv.weight)


def attach_weight_projection(optimizer: torch.optim.Optimizer, model: nn.Module) -> RemovableHandle:
    """Run :func:`project_weights_` after every ``optimizer.step()`` (a step post-hook)."""
    return optimizer.register_step_post_hook(lambda *_: project_weights_(model))
