"""Analyses on the NQM: steps to a target risk (bisection on t), minimised over learning-rate and
momentum / averaging-decay grids; the optimal learning rate per batch size (seed E.5, E.6). The
straightforward reference loop is :mod:`curvlab.nqm.reference`, the optimised piecewise-constant
schedule (seed E.7) :mod:`curvlab.nqm.schedule`; their names are importable from here too.

Definitions (docs/nqm.md):

* ``R(t; B) = Σ_i ½ h_i (D_i(t) E[θ_i(0)²] + N_i(t) c_i/B)`` — the expected risk after t constant-rate
  steps, split into the B-independent convergence part ``F(t)`` and noise part ``G(t)``:
  ``R = F(t) + G(t)/B``.
* ``steps(B)`` of one setting: the smallest integer t in ``[0, t_max]`` with ``R(t; B) < C`` found by
  bisection on t (``lo = 0``, ``hi = t_max``, ``mid = ⌊(lo+hi)/2⌋``), assuming R decreases in t; ``-1``
  ("never") if the setting diverges (any dimension unstable) or ``R(t_max; B) ≥ C``.
* Over a grid the minimum and the first minimiser in (lr, decay) order are reported — what a Python
  loop over the grid with a strict ``<`` keeps (:func:`curvlab.nqm.reference.reference_sweep`).

Fast path (:func:`steps_to_target`): the risk of a block of grid points is evaluated at one t per point
from precomputed roots (:class:`_Block`), vectorised over points and dimensions; the bisection runs for
all points and batch sizes at once. In exact mode with many dimensions it first solves a binned copy of
the problem (cheap), bisects exactly only the most promising points, and then *verifies*: one exact
evaluation of every grid point at the best step count ``T*`` per batch size; any point with
``R(T*) < C`` is bisected too. With R decreasing in t that finds every point with ``steps ≤ T*``, so the
minimum and the first minimiser equal the exhaustive search's.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from curvlab.nqm.dynamics import ema_system, momentum_system, sgd_stable
from curvlab.nqm.problem import Problem, binned, preconditioned

KINDS = ("sgd", "momentum", "ema")
DEFAULT_T_MAX = 10**9
_BLOCK_ELEMENTS = 1 << 17  # entries per evaluation block: arrays stay in cache
_TINY_LOG = -1e300  # stands for log 0 so that 0·log 0 = 0 and t·log 0 = −∞ without NaN
#: Names that moved to their own modules and are still importable from here (see :func:`__getattr__`).
_MOVED = {
    "point_risk": "curvlab.nqm.reference",
    "point_stable": "curvlab.nqm.reference",
    "reference_steps": "curvlab.nqm.reference",
    "reference_sweep": "curvlab.nqm.reference",
    "PWCResult": "curvlab.nqm.schedule",
    "pwc_risk_torch": "curvlab.nqm.schedule",
    "optimal_pwc": "curvlab.nqm.schedule",
}


def __getattr__(name: str) -> Any:
    """A name of :data:`_MOVED`, from its module (looked up on use: those modules import this one)."""
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------ grids


def paper_lr_grid(kind: str = "sgd", num: int = 100) -> np.ndarray:
    """The notebook's learning-rate grids: ``logspace(-5, 0.5, 100)`` for SGD, ``logspace(-8, 1, 100)``
    with momentum or averaging."""
    return np.logspace(-5, 0.5, num) if kind == "sgd" else np.logspace(-8, 1, num)


def paper_decay_grid(num: int = 20) -> np.ndarray:
    """The notebook's momentum / averaging-decay grid ``1 − logspace(-5, 0, 20)`` (from 0.99999 down to 0)."""
    return 1.0 - np.logspace(-5, 0, num)


@dataclass(frozen=True)
class Grid:
    """Hyper-parameter grid of one optimiser: ``lrs × decays`` (decay = β for momentum, γ for the
    average, ``[0]`` for SGD), preconditioning power ``precond``. Point ``g = l·len(decays) + m``."""

    kind: str
    lrs: np.ndarray
    decays: np.ndarray = field(default_factory=lambda: np.zeros(1))
    precond: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        lrs = np.atleast_1d(np.asarray(self.lrs, dtype=np.float64))
        decays = np.atleast_1d(np.asarray(self.decays, dtype=np.float64))
        if self.kind == "sgd":
            decays = np.zeros(1)
        if lrs.size == 0 or not np.all(np.isfinite(lrs)) or np.any(lrs <= 0):
            raise ValueError("learning rates must be finite and positive")
        if decays.size == 0 or np.any(decays < 0) or np.any(decays >= 1) or not np.all(np.isfinite(decays)):
            raise ValueError("momentum / averaging decays must lie in [0, 1)")
        if not 0.0 <= float(self.precond) <= 1.0:
            raise ValueError(f"the preconditioning power must lie in [0, 1], got {self.precond}")
        object.__setattr__(self, "lrs", lrs)
        object.__setattr__(self, "decays", decays)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.lrs.size, self.decays.size)

    @property
    def size(self) -> int:
        return self.lrs.size * self.decays.size

    def point(self, g) -> tuple[np.ndarray, np.ndarray]:
        """``(lr, decay)`` of flat point indices ``g``."""
        g = np.asarray(g)
        return self.lrs[g // self.decays.size], self.decays[g % self.decays.size]


# ----------------------------------------------------------------------------- blocks of settings


def entry_weights(problem: Problem, precond: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(h_eff, c_eff, w_det, w_noise)``: the curvature and noise the optimiser sees, and the risk
    weights ``½ h counts a0`` (convergence) and ``½ h counts c_eff`` (noise, per unit 1/B)."""
    h_eff, c_eff = preconditioned(problem.h, problem.c, precond)
    w_det = 0.5 * problem.h * problem.counts * problem.a0
    w_noise = 0.5 * problem.h * problem.counts * c_eff
    return h_eff, c_eff, w_det, w_noise


class _Block:
    """F(t), G(t) of P settings (rows) over all entries (columns), for one t ≥ 1 per row.

    Everything that does not depend on t — roots, stationary moments, readout coefficients — is
    computed once; each evaluation is then a few exponentials (complex roots: one exp and one sin/cos
    pair, only on the entries that have complex roots) and two weighted row sums.
    """

    def __init__(self, kind: str, lr: np.ndarray, decay: np.ndarray, h: np.ndarray, w_det: np.ndarray,
                 w_noise: np.ndarray) -> None:
        self.kind = kind
        self.rows = lr.size
        self.w_det = w_det
        lr2, decay2, h2 = lr[:, None], decay[:, None], h[None, :]
        with np.errstate(all="ignore"):
            if kind == "sgd":
                x = lr2 * h2
                self.stable = sgd_stable(lr2, h2).all(axis=1)
                self.log_r2 = 2.0 * np.where(x < 1.0, np.log1p(-x), np.log(np.abs(1.0 - x)))
                self.log_r2[~np.isfinite(self.log_r2)] = _TINY_LOG
                self.coef_noise = w_noise * lr2**2 / (x * (2.0 - x))
                self.g_inf = self.coef_noise.sum(axis=1)
                return
            system = (momentum_system if kind == "momentum" else ema_system)(lr2, decay2, h2)
            self.stable = system.stable.all(axis=1)
            shape = system.s.shape
            s11, s22, s12 = (np.broadcast_to(v, shape) for v in system.stationary)
            stat = s11 if system.readout == 0 else s22
            self.g_inf = (w_noise * stat).sum(axis=1)
            self.c11 = (w_noise * s11).ravel()
            self.c12 = (2.0 * w_noise * s12).ravel()
            self.c22 = (w_noise * s22).ravel()
            if system.readout == 0:  # momentum: (x, y) = (U_t − β U_{t−1}, −αβ U_{t−1})
                self.kx = np.broadcast_to(system.m11 - system.s, shape).ravel()
                self.ky = np.broadcast_to(system.m12, shape).ravel()
            else:  # average: (x, y) = ((1−γ) r U_{t−1}, U_t − r U_{t−1})
                self.kx = np.broadcast_to(system.m21, shape).ravel()
                self.ky = np.broadcast_to(system.m22 - system.s, shape).ravel()
            self.readout = system.readout
            roots = system.roots
            cplx = np.broadcast_to(roots.complex_, shape).ravel()
            row = np.broadcast_to(np.arange(self.rows)[:, None], shape).ravel()
            self.ci = np.flatnonzero(cplx)
            self.ri = np.flatnonzero(~cplx)
            self.c_row = row[self.ci]
            self.r_row = row[self.ri]
            rho = np.broadcast_to(roots.rho, shape).ravel()[self.ci]
            phi = np.broadcast_to(roots.phi, shape).ravel()[self.ci]
            sin_phi = np.broadcast_to(roots.sin_phi, shape).ravel()[self.ci]
            self.c_rho, self.c_phi = rho, phi
            self.c_log_rho = np.log(rho)
            self.c_inv_sin = 1.0 / sin_phi
            self.c_cot = np.cos(phi) / sin_phi
            r1 = np.broadcast_to(roots.r1, shape).ravel()[self.ri]
            q = np.broadcast_to(roots.q, shape).ravel()[self.ri]
            self.r_r1 = r1
            self.r_neg = r1 < 0.0
            log_r1 = np.log(np.abs(r1))
            self.r_log_r1 = np.where(np.isfinite(log_r1), log_r1, _TINY_LOG)
            log_q = np.log(np.abs(q))
            self.r_log_q = np.where(np.isfinite(log_q), log_q, _TINY_LOG)
            self.r_q = q
            self.r_one_minus_q = np.where(q == 1.0, 1.0, 1.0 - q)
            self.r_qneg = q < 0.0
            self.r_qone = q == 1.0

    def _subset(self, index: np.ndarray, row_of: np.ndarray, rows: np.ndarray | None):
        """Entries of the wanted rows (repeats allowed): positions in the branch arrays, flat positions
        in the output (wanted row k occupies ``k·E … k·E + E − 1``), and the wanted-row number."""
        if rows is None:
            return slice(None), index, row_of
        bounds = np.searchsorted(row_of, np.arange(self.rows + 1))
        start, count = bounds[rows], np.diff(bounds)[rows]
        total = int(count.sum())
        owner = np.repeat(np.arange(rows.size), count)
        keep = np.repeat(start - np.cumsum(count) + count, count) + np.arange(total)
        columns = index[keep] - row_of[keep] * self.w_det.size
        return keep, owner * self.w_det.size + columns, owner

    def _lucas(self, t: np.ndarray, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Flat ``(U_t, U_{t−1})`` for every entry of the selected rows, t ≥ 1 given per selected row."""
        n = (self.rows if rows is None else rows.size) * self.w_det.size
        u_t = np.empty(n)
        u_prev = np.empty(n)
        tf = t.astype(np.float64)
        if self.ci.size:
            keep, out, row = self._subset(self.ci, self.c_row, rows)
            # ρ^{t−1} < e^{−100}: |U| < e^{−100}/sin φ, terms below 1e-40 of any risk: skip their sin/cos
            exponent = (tf[row] - 1.0) * self.c_log_rho[keep]
            live = np.flatnonzero(exponent > -100.0)
            u_prev[out] = 0.0
            u_t[out] = 0.0
            if live.size:
                sub = np.arange(self.ci.size)[keep][live]
                base = np.exp(exponent[live])
                angle = tf[row[live]] * self.c_phi[sub]
                st, ct = np.sin(angle), np.cos(angle)
                where = out[live]
                u_prev[where] = base * st * self.c_inv_sin[sub]
                u_t[where] = base * self.c_rho[sub] * (st * self.c_cot[sub] + ct)
        if self.ri.size:
            keep, out, row = self._subset(self.ri, self.r_row, rows)
            tr = tf[row]
            power = np.exp((tr - 1.0) * self.r_log_r1[keep])
            odd = (t[row] - 1) % 2 == 1
            power = np.where(self.r_neg[keep] & odd, -power, power)
            em = np.expm1(tr * self.r_log_q[keep])
            one_minus_q = self.r_one_minus_q[keep]
            # Σ_{k<t} q^k: −expm1(t log q)/(1 − q) for q ≥ 0 (accurate as q → 1), t at q = 1
            geo = -em / one_minus_q
            qneg = self.r_qneg[keep]
            if qneg.any():
                sign = np.where(t[row] % 2 == 1, -1.0, 1.0)
                geo = np.where(qneg, (1.0 - sign * (1.0 + em)) / one_minus_q, geo)
            geo = np.where(self.r_qone[keep], tr, geo)
            u_prev[out] = power * geo
            u_t[out] = power * self.r_r1[keep] * (1.0 + self.r_q[keep] * geo)
        return u_t, u_prev

    def parts(self, t: np.ndarray, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(F, G)`` per row at integer times ``t`` ≥ 1 (one per row, or per entry of ``rows`` when only
        those rows are wanted); non-finite where diverging."""
        t = np.asarray(t, dtype=np.int64)
        n_rows = self.rows if rows is None else rows.size
        pick = slice(None) if rows is None else rows
        with np.errstate(all="ignore"):
            if self.kind == "sgd":
                decay = np.exp(t[:, None].astype(np.float64) * self.log_r2[pick])
                return decay @ self.w_det, self.g_inf[pick] - (decay * self.coef_noise[pick]).sum(axis=1)
            u_t, u_prev = self._lucas(t, rows)
            shape = (n_rows, self.w_det.size)
            kx, ky = (k.reshape(self.rows, -1)[pick].ravel() for k in (self.kx, self.ky))
            if self.readout == 0:
                x = u_t + kx * u_prev
                y = ky * u_prev
                det = x * x
            else:
                x = kx * u_prev
                y = u_t + ky * u_prev
                det = (x + y) ** 2
            c11, c12, c22 = (c.reshape(self.rows, -1)[pick].ravel() for c in (self.c11, self.c12, self.c22))
            quad = c11 * x * x + c12 * x * y + c22 * y * y
            f = det.reshape(shape) @ self.w_det
            g = self.g_inf[pick] - quad.reshape(shape).sum(axis=1)
        return f, g


def _blocks(problem: Problem, grid: Grid, points: np.ndarray, block_elements: int = _BLOCK_ELEMENTS):
    """Yield ``(slice into points, _Block)`` covering ``points`` in blocks of about ``block_elements``."""
    h_eff, _, w_det, w_noise = entry_weights(problem, grid.precond)
    rows = max(1, block_elements // max(problem.size, 1))
    for start in range(0, points.size, rows):
        sel = slice(start, min(start + rows, points.size))
        lr, decay = grid.point(points[sel])
        yield sel, _Block(grid.kind, lr, decay, h_eff, w_det, w_noise)


# ------------------------------------------------------------------------------------- bisection


def _bisect_block(block: _Block, initial_risk: float, inv_batch: np.ndarray, target: float,
                  t_max: int) -> np.ndarray:
    """Steps to ``R < target`` for every (batch size, row) of a block: array (len(inv_batch), rows)."""
    nb, rows = inv_batch.size, block.rows
    if initial_risk < target:
        return np.broadcast_to(np.where(block.stable, 0, -1), (nb, rows)).astype(np.int64)
    f, g = block.parts(np.full(rows, t_max))
    with np.errstate(all="ignore"):
        reach = (f[None, :] + g[None, :] * inv_batch[:, None]) < target
    reach &= block.stable[None, :]
    lo = np.zeros((nb, rows), dtype=np.int64)
    hi = np.full((nb, rows), t_max, dtype=np.int64)
    for b in range(nb):
        active = reach[b].copy()
        while True:
            active &= hi[b] - lo[b] > 1
            if not active.any():
                break
            mid = np.where(active, (lo[b] + hi[b]) // 2, hi[b])
            f, g = block.parts(np.maximum(mid, 1))
            with np.errstate(invalid="ignore"):
                ok = (f + g * inv_batch[b]) < target
            hi[b] = np.where(active & ok, mid, hi[b])
            lo[b] = np.where(active & ~ok, mid, lo[b])
    return np.where(reach, hi, -1)


def _risk_at(block: _Block, t: np.ndarray, inv_batch, rows: np.ndarray | None = None) -> np.ndarray:
    f, g = block.parts(np.maximum(t, 1), rows)
    stable = block.stable if rows is None else block.stable[rows]
    with np.errstate(invalid="ignore"):
        return np.where(stable, f + g * inv_batch, np.inf)


# --------------------------------------------------------------------------------------- sweeps


@dataclass
class SweepResult:
    """Steps to target per batch size, minimised over a grid (``steps = -1``: never reached)."""

    target: float
    batch_sizes: np.ndarray
    steps: np.ndarray
    lr: np.ndarray
    decay: np.ndarray
    grid: Grid
    mode: str
    steps_grid: np.ndarray | None = None  # (batch sizes, lrs, decays) with strategy="exhaustive"
    stats: dict = field(default_factory=dict)

    @property
    def effective_lr(self) -> np.ndarray:
        """``α/(1−β)`` for momentum (the effective learning rate), α otherwise."""
        if self.grid.kind == "momentum":
            return self.lr / (1.0 - self.decay)
        return self.lr.copy()

    def records(self) -> list[dict]:
        """One JSON-ready dict per batch size (``steps`` None when never reached)."""
        out = []
        for i, b in enumerate(self.batch_sizes):
            reached = self.steps[i] >= 0
            rec = {
                "batch_size": int(b),
                "steps": int(self.steps[i]) if reached else None,
                "lr": float(self.lr[i]) if reached else None,
            }
            if self.grid.kind == "momentum":
                rec["momentum"] = float(self.decay[i]) if reached else None
                rec["effective_lr"] = float(self.effective_lr[i]) if reached else None
            if self.grid.kind == "ema":
                rec["ema_decay"] = float(self.decay[i]) if reached else None
            out.append(rec)
        return out


def _check_sweep_args(problem: Problem, target: float, batch_sizes, t_max: int) -> np.ndarray:
    batch = np.atleast_1d(np.asarray(batch_sizes, dtype=np.float64))
    if batch.size == 0 or np.any(batch <= 0) or not np.all(np.isfinite(batch)):
        raise ValueError("batch sizes must be finite and positive")
    if not (np.isfinite(target) and target > 0):
        raise ValueError(f"the target risk must be finite and positive, got {target}")
    if int(t_max) < 1:
        raise ValueError(f"t_max must be a positive integer, got {t_max}")
    return batch


def _best(steps: np.ndarray) -> np.ndarray:
    """Flat index of the first minimum of non-negative steps per row, -1 where none."""
    masked = np.where(steps >= 0, steps, np.iinfo(np.int64).max)
    idx = np.argmin(masked, axis=-1)
    return np.where(np.take_along_axis(steps, idx[..., None], -1)[..., 0] >= 0, idx, -1)


def _exhaustive(problem: Problem, grid: Grid, batch: np.ndarray, target: float, t_max: int,
                progress: Callable | None = None) -> np.ndarray:
    """Bisection for every (batch size, grid point): array (batch sizes, grid.size)."""
    points = np.arange(grid.size)
    steps = np.empty((batch.size, grid.size), dtype=np.int64)
    r0 = problem.initial_risk()
    for sel, block in _blocks(problem, grid, points):
        steps[:, sel] = _bisect_block(block, r0, 1.0 / batch, target, t_max)
        if progress:
            progress(sel.stop - sel.start)
    return steps


def _solve_pairs(problem: Problem, grid: Grid, batch_index: np.ndarray, points: np.ndarray,
                 batch: np.ndarray, target: float, t_max: int) -> np.ndarray:
    """Exact bisection for the given (batch index, point) pairs."""
    out = np.empty(points.size, dtype=np.int64)
    r0 = problem.initial_risk()
    for b in np.unique(batch_index):
        mine = np.flatnonzero(batch_index == b)
        for sel, block in _blocks(problem, grid, points[mine]):
            out[mine[sel]] = _bisect_block(block, r0, np.array([1.0 / batch[b]]), target, t_max)[0]
    return out


def _coarse_steps(problem: Problem, grid: Grid, batch: np.ndarray, target: float, t_max: int,
                  iterations: int = 12) -> np.ndarray:
    """Approximate steps (bisection on log t to ~0.5 %) for every (batch size, point): for ranking only."""
    out = np.full((batch.size, grid.size), np.inf)
    for sel, block in _blocks(problem, grid, np.arange(grid.size)):
        f, g = block.parts(np.full(block.rows, t_max))
        for b in range(batch.size):
            with np.errstate(invalid="ignore"):
                reach = block.stable & ((f + g / batch[b]) < target)
            lo = np.zeros(block.rows)
            hi = np.full(block.rows, math.log(t_max))
            for _ in range(iterations):
                mid = 0.5 * (lo + hi)
                fm, gm = block.parts(np.maximum(np.rint(np.exp(mid)), 1).astype(np.int64))
                with np.errstate(invalid="ignore"):
                    ok = (fm + gm / batch[b]) < target
                hi = np.where(ok, mid, hi)
                lo = np.where(ok, lo, mid)
            out[b, sel] = np.where(reach, np.exp(hi), np.inf)
    return out


def _grid_stable(problem: Problem, grid: Grid) -> np.ndarray:
    """Stability of every grid point (all entries), from the largest curvature seen (eqs. 22, 35)."""
    h_eff, _ = preconditioned(problem.h, problem.c, grid.precond)
    lr, decay = grid.point(np.arange(grid.size))
    x_max, x_min = lr * h_eff.max(), lr * h_eff.min()
    bound = 2.0 * (1.0 + decay) if grid.kind == "momentum" else 2.0
    return (x_min > 0.0) & (x_max < bound)


def slow_bound(problem: Problem, grid: Grid, t: np.ndarray, anchors: int = 48) -> np.ndarray:
    """A lower bound on the risk of every grid point at times ``t`` (shape (n,)) → (n, grid.size).

    For real roots ``0 ≤ r2 ≤ r1 < 1`` the convergence factor of eqs. 33/48,
    ``(r1^{t+1}(1−r2) − r2^{t+1}(1−r1))/(r1 − r2)``, is at least ``r1^t``; ``r1`` decreases with h, so all
    entries with ``h ≤ h_k`` (inside the real-root region: ``αh ≤ (1−√β)²`` for momentum, ``αh ≤ 1`` for
    SGD and the average) contribute at least ``r1(h_k)^{2t} Σ_{h ≤ h_k} ½ h a0``. The noise part is ≥ 0.
    The maximum over anchors ``h_k`` bounds R(t) from below — cheap (anchors × points), and rigorous.
    """
    h_eff, _, w_det, _ = entry_weights(problem, grid.precond)
    order = np.argsort(-h_eff, kind="stable")
    hs = h_eff[order]
    suffix = np.cumsum(w_det[order][::-1])[::-1]
    pick = np.unique(np.round(np.geomspace(1, hs.size, anchors)).astype(np.int64) - 1)
    hk, wk = hs[pick][None, :], suffix[pick][None, :]
    lr, decay = grid.point(np.arange(grid.size))
    lr, decay = lr[:, None], decay[:, None]
    x = lr * hk
    with np.errstate(all="ignore"):
        if grid.kind == "momentum":
            valid = x <= (1.0 - np.sqrt(decay)) ** 2
            s_ = 1.0 + decay - x
            r1 = 0.5 * (s_ + np.sqrt(np.maximum(s_ * s_ - 4.0 * decay, 0.0)))
        else:
            valid = x <= 1.0
            r1 = 1.0 - x
        log_r1 = np.where(valid & (r1 > 0.0), np.log(np.where(r1 > 0.0, r1, 1.0)), -np.inf)
        terms = np.exp(2.0 * np.asarray(t, dtype=np.float64)[:, None, None] * log_r1[None]) * wk[None]
    return np.where(np.isfinite(terms), terms, 0.0).max(axis=2)


def _screened(problem: Problem, grid: Grid, batch: np.ndarray, target: float, t_max: int,
              candidates: int, progress: Callable | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Binned screening, exact bisection of the best candidates, exact verification at ``T*``.

    Returns the minimum steps and the first minimiser per batch size, and counters. The verification
    evaluates ``R(T*_b; B_b)`` exactly for every grid point except those that provably cannot be below
    the target: unstable points, points with ``slow_bound(T*_b) ≥ C``, and points with
    ``R(t_max; B_b) ≥ C`` (which never count, as in the reference).
    """
    nb = batch.size
    unsolved = -2
    solved = np.full((nb, grid.size), unsolved, dtype=np.int64)
    coarse = _coarse_steps(binned(problem), grid, batch, target, t_max)
    chosen = np.argsort(coarse, axis=1, kind="stable")[:, : min(candidates, grid.size)]
    b_idx = np.repeat(np.arange(nb), chosen.shape[1])
    solved[b_idx, chosen.ravel()] = _solve_pairs(problem, grid, b_idx, chosen.ravel(), batch, target, t_max)

    def best_of(row: np.ndarray) -> tuple[int, int]:
        idx = _best(np.where(row == unsolved, -1, row)[None, :])[0]
        return (int(row[idx]), int(idx)) if idx >= 0 else (-1, -1)

    t_check = np.array([best_of(solved[b])[0] for b in range(nb)])
    t_check = np.where(t_check >= 0, t_check, t_max)
    maybe = _grid_stable(problem, grid)[None, :] & (slow_bound(problem, grid, t_check) < target * (1 - 1e-9))
    maybe &= solved == unsolved
    rows = np.flatnonzero(maybe.any(axis=0))
    if progress:
        progress(grid.size - rows.size)  # screened out without an exact evaluation
    below = np.zeros((nb, grid.size), dtype=bool)
    evaluated = 0
    for sel, block in _blocks(problem, grid, rows):
        pts = rows[sel]
        f_max, g_max = block.parts(np.full(block.rows, t_max))
        with np.errstate(invalid="ignore"):
            need = maybe[:, pts] & ((f_max[None, :] + g_max[None, :] / batch[:, None]) < target)
        which_b, wanted = np.nonzero(need)  # every (batch size, row) pair at once, each at its T*
        if wanted.size:
            risk = _risk_at(block, t_check[which_b], 1.0 / batch[which_b], wanted)
            below[which_b, pts[wanted]] = risk < target
            evaluated += wanted.size
        if progress:
            progress(sel.stop - sel.start)
    extra_b, extra_p = np.nonzero(below)
    if extra_b.size:
        solved[extra_b, extra_p] = _solve_pairs(problem, grid, extra_b, extra_p, batch, target, t_max)
    steps = np.empty(nb, dtype=np.int64)
    best = np.empty(nb, dtype=np.int64)
    for b in range(nb):
        steps[b], best[b] = best_of(solved[b])
    stats = {
        "candidates": int(chosen.shape[1]),
        "verified_points": int(rows.size),
        "verified_evaluations": int(evaluated),
        "verified_extra": int(extra_b.size),
        "exact_bisections": int((solved != unsolved).sum()),
    }
    return steps, best, stats


def steps_to_target(problem: Problem, target: float, batch_sizes: Sequence[float], grid: Grid, *,
                    t_max: int = DEFAULT_T_MAX, strategy: str = "auto", candidates: int = 8,
                    progress: bool = False) -> SweepResult:
    """Minimum steps to reach expected risk ``< target`` per batch size over ``grid`` (seed E.5, E.6).

    ``strategy``: ``"exhaustive"`` (every grid point bisected, also returns ``steps_grid``),
    ``"screened"`` (binned screening + exact candidates + exact verification; same answers when the
    risk decreases in t), ``"auto"`` (screened for exact problems with more than 400 entries).
    """
    batch = _check_sweep_args(problem, target, batch_sizes, t_max)
    t_max = int(t_max)
    if strategy not in ("auto", "exhaustive", "screened"):
        raise ValueError(f"unknown strategy {strategy!r}")
    if strategy == "auto":
        strategy = "screened" if problem.size > 400 else "exhaustive"
    if problem.initial_risk() < target:
        strategy = "exhaustive"  # every stable setting needs 0 steps: nothing to bisect
    bar = _progress_bar(progress, grid.size, "grid points")
    update = bar.update if bar is not None else None
    try:
        steps_grid = None
        stats: dict = {"strategy": strategy}
        if strategy == "exhaustive":
            steps_grid = _exhaustive(problem, grid, batch, float(target), t_max, update)
            best = _best(steps_grid)
            picked = np.take_along_axis(steps_grid, np.maximum(best, 0)[:, None], 1)[:, 0]
            steps = np.where(best >= 0, picked, -1)
            steps_grid = steps_grid.reshape(batch.size, *grid.shape)
        else:
            steps, best, more = _screened(problem, grid, batch, float(target), t_max, candidates, update)
            stats.update(more)
    finally:
        if bar is not None:
            bar.close()
    lr, decay = grid.point(np.maximum(best, 0))
    lr = np.where(best >= 0, lr, np.nan)
    decay = np.where(best >= 0, decay, np.nan)
    return SweepResult(float(target), batch, steps, lr, decay, grid, problem.mode, steps_grid, stats)


def _progress_bar(enabled: bool, total: int, unit: str):
    """A bar on stderr when ``enabled`` and stderr is a terminal (:mod:`curvlab.progress`), else ``None``."""
    from curvlab.progress import stderr_is_terminal

    if not enabled or not stderr_is_terminal():
        return None
    from curvlab.progress import progress_bar

    return progress_bar(total=total, unit=unit)
