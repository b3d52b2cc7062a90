"""The whole-network Kronecker eigenspectrum, never materialised (seed E.1, Fig. 9; E.4, Fig. 12).

Math (design.md, "Math conventions"). A layer's Fisher block ``F ~= S (x) A`` (seed eq. 13) has the
eigenvalues ``λ_S[i] λ_A[j]``, the products of its factors' eigenvalues; the whole-network K-FAC
eigenspectrum is the multiset of these products over all layers.

**The Kronecker spectrum** (:class:`KroneckerSpectrum`): counts, histograms, quantiles, top-k and
exact order statistics of the products, from the sorted factor eigenvalues, without materialising
the products (see the class docstring for the algorithm: a count above ``t`` is a ``searchsorted``
of ``t / λ`` per row, checked against the actual products; an order statistic is a bisection on the
bit patterns of floats, with :class:`_ThresholdPool` and :class:`_EndpointBoundaries`, until a
bracket holds few enough products to enumerate).

numpy only: no torch, no h5py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from curvlab.errors import OptionError

# --------------------------------------------------------------------------------------------------
# The Kronecker spectrum


@dataclass
class _Pair:
    """One layer's factor spectra, as the counting needs them: ``rows`` the shorter (positive
    entries, descending), ``zero_rows`` how many zeros it had, ``cols`` the longer (ascending)."""

    rows: np.ndarray
    zero_rows: int
    cols: np.ndarray


def _as_spectrum(x: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{what}: expected a non-empty 1-D array of eigenvalues, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: eigenvalues must be finite")
    if (arr < 0).any():
        raise ValueError(f"{what}: eigenvalues must be >= 0 (clip round-off first), min {arr.min():.3g}")
    return np.sort(arr + 0.0)  # + 0.0 turns -0.0 into 0.0


class KroneckerSpectrum:
    """The multiset ``{λ_S[i] λ_A[j]}`` over one or more layers, never materialised.

    ``pairs``: per layer ``(eigenvalues of S, eigenvalues of A)``, 1-D, ``>= 0``, any order. Every
    product is the float64 product ``fl(λ_S[i] * λ_A[j])`` of the float64 eigenvalues, exactly what
    ``np.outer(λ_S, λ_A)`` holds, and every answer is exact for that multiset: counts are exact,
    order statistics are actual products.

    **Counting** (design.md, "Whole-network K-FAC eigenspectrum"). For one layer let ``r`` be the
    shorter factor's spectrum and ``c`` the longer one's, both sorted. Since ``fl(r_i * c_j)`` is
    non-decreasing in ``c_j``, the products of row ``i`` above ``t`` are a suffix of ``c``: with
    ``b_i(t) = #{j : fl(r_i c_j) <= t}``, ``#{products > t} = Σ_i (len(c) - b_i(t))``, summed over
    layers. ``b_i`` comes from ``np.searchsorted(c, t / r_i)``, checked against the actual products
    of its two neighbours (monotonicity makes that enough) and, where rounding in ``t / r_i``, ties
    or underflow make it wrong, found by bisection on the products: a count cannot be wrong. Cost
    ``O(len(r) log len(c))`` per threshold, memory ``O(len(r) + len(c))``.

    **Order statistics**: the r-th largest product is the smallest float ``t`` with
    ``count_above(t) < r``. It is found by bisection on the bit patterns of non-negative floats
    (monotone in the value, so this is bisection in log space) until the bracket ``(lo, hi]`` holds
    at most ``max(2^16, 2 * rows)`` products, which are then enumerated and sorted — a small set of
    actual products. Ranks are solved together, a bisection step at a time.

    Exact zeros (products of a zero eigenvalue, or products that underflow) are counted in
    ``num_zeros``; :meth:`min_positive`, :meth:`bottom` and :meth:`condition_number` exclude them.

    A spectrum of at most ``dense_limit`` products (default 2^21: 16 MiB) is instead materialised and
    sorted once, on first use, which answers many queries faster; ``dense_limit=0`` never does.
    """

    def __init__(
        self, pairs: Sequence[tuple[np.ndarray, np.ndarray]], *, dense_limit: int = 1 << 21
    ) -> None:
        pairs = list(pairs)
        if not pairs:
            raise ValueError("KroneckerSpectrum needs at least one (S eigenvalues, A eigenvalues) pair")
        self._pairs: list[_Pair] = []
        self._raw: list[tuple[np.ndarray, np.ndarray]] = []
        count = 0
        trace = 0.0
        for k, (s, a) in enumerate(pairs):
            s = _as_spectrum(s, f"layer {k}: S")
            a = _as_spectrum(a, f"layer {k}: A")
            self._raw.append((s, a))
            rows, cols = (s, a) if s.size <= a.size else (a, s)
            zeros = int(np.searchsorted(rows, 0.0, side="right"))
            # Rows descending: the queries t / rows[i] of one threshold then increase, which numpy's
            # searchsorted follows ~1.7x faster than decreasing ones.
            self._pairs.append(_Pair(rows=rows[zeros:][::-1].copy(), zero_rows=zeros, cols=cols))
            count += s.size * a.size
            trace += math.fsum(s) * math.fsum(a)
        #: Number of products (Σ over layers of len(S) * len(A)).
        self.count: int = int(count)
        #: Σ_i Σ_j λ_S[i] λ_A[j] = Σ over layers of (Σ λ_S)(Σ λ_A): the trace of the K-FAC Fisher.
        self.trace: float = float(trace)
        self.dense_limit = int(dense_limit)
        self._sorted: np.ndarray | None = None  # ascending, only when count <= dense_limit
        self._total_rows = sum(p.rows.size for p in self._pairs)
        if not math.isfinite(self.max()):
            raise ValueError("the largest product overflows float64 (eigenvalues must stay below ~1e154)")
        #: Number of products equal to 0.0 (zero eigenvalues, or underflow).
        self.num_zeros: int = self.count - self.count_above(0.0)

    # --- basic figures ----------------------------------------------------------------------------

    @property
    def num_positive(self) -> int:
        """Number of products > 0."""
        return self.count - self.num_zeros

    @property
    def num_layers(self) -> int:
        return len(self._pairs)

    def max(self) -> float:
        """The largest product, ``max_layers fl(max λ_S * max λ_A)``."""
        return max(float(s[-1]) * float(a[-1]) for s, a in self._raw)  # IEEE products, as numpy's

    def min_positive(self) -> float:
        """The smallest product > 0 (exact zeros excluded). ValueError if every product is 0."""
        if self.num_positive == 0:
            raise ValueError("every product is 0: there is no smallest positive eigenvalue")
        best, underflow = self._smallest_products()
        if underflow:  # some layer's smallest product rounds to 0: take the exact order statistic
            return float(self.values_at_ranks([self.num_positive])[0])
        return best

    def _smallest_products(self) -> tuple[float, bool]:
        """``min over layers of fl(min positive λ_S * min positive λ_A)``, and whether any of those
        products underflowed to 0 (then smaller positive products may exist elsewhere)."""
        best, underflow = math.inf, False
        for s, a in self._raw:
            sp, ap = s[s > 0], a[a > 0]
            if sp.size and ap.size:
                v = float(sp[0] * ap[0])
                underflow |= v == 0.0
                if v > 0:
                    best = min(best, v)
        return best, underflow

    def condition_number(self) -> float:
        """``max / min_positive`` (over the positive products; ``inf`` if there are none)."""
        return self.max() / self.min_positive() if self.num_positive else math.inf

    # --- counting ---------------------------------------------------------------------------------

    def _dense(self) -> np.ndarray | None:
        if self._sorted is None and self.count <= self.dense_limit:
            products = np.concatenate([np.multiply.outer(s, a).ravel() for s, a in self._raw])
            products.sort()
            self._sorted = products
        return self._sorted

    def count_above(self, t: float | np.ndarray) -> int | np.ndarray:
        """Number of products ``> t`` (an int; an int64 array for an array of thresholds)."""
        ts = np.asarray(t, dtype=np.float64)
        if np.isnan(ts).any():
            raise ValueError("count_above: threshold is NaN")
        flat = ts.ravel()
        dense = self._dense()
        if dense is not None:
            out = dense.size - np.searchsorted(dense, flat, side="right")
        else:
            out = np.zeros(flat.size, dtype=np.int64)
            for pair in self._pairs:
                out += self._pair_count_above(pair, flat)
        out = out.astype(np.int64).reshape(ts.shape)
        return int(out) if out.ndim == 0 else out

    def _pair_count_above(self, pair: _Pair, ts: np.ndarray) -> np.ndarray:
        m = pair.cols.size
        out = np.where(ts < 0, pair.zero_rows * m, 0).astype(np.int64)
        if pair.rows.size == 0:
            return out
        chunk = max(1, (1 << 18) // pair.rows.size)  # at most ~2 MiB per (rows x thresholds) array
        for start in range(0, ts.size, chunk):
            part = ts[start : start + chunk]
            b = _first_above(pair.rows, pair.cols, part)
            out[start : start + chunk] += (m - b).sum(axis=1)
        return out

    def count_at_least(self, t: float | np.ndarray) -> int | np.ndarray:
        """Number of products ``>= t`` (products are floats: ``>= t`` is ``> prevfloat(t)``)."""
        ts = np.asarray(t, dtype=np.float64)
        return self.count_above(np.nextafter(ts, -np.inf))

    def histogram(self, edges: np.ndarray) -> np.ndarray:
        """Exact counts of products in each bin ``[edges[k], edges[k+1])``.

        Every bin is half-open, the last one too (unlike ``np.histogram``): to include the largest
        product, end the edges above :meth:`max`, e.g. at ``np.nextafter(max, inf)``. ``edges``
        must be strictly increasing. Products outside ``[edges[0], edges[-1])`` are not counted.
        """
        e = np.asarray(edges, dtype=np.float64)
        if e.ndim != 1 or e.size < 2 or not np.isfinite(e).all() or (np.diff(e) <= 0).any():
            raise ValueError("histogram: edges must be a finite, strictly increasing 1-D array of >= 2")
        at_least = self.count_at_least(e)
        return (at_least[:-1] - at_least[1:]).astype(np.int64)

    # --- order statistics -------------------------------------------------------------------------

    def values_at_ranks(self, ranks: Sequence[int] | np.ndarray) -> np.ndarray:
        """The exact value of the r-th largest product for each rank ``r`` (1-based, vectorised).

        Rank 1 is :meth:`max`, rank ``count`` the smallest product (0 if there are zeros). Ties
        count with multiplicity: the values at ranks ``r`` and ``r + 1`` are equal when the product
        occurs twice.
        """
        r = np.asarray(ranks)
        if r.size and (r.dtype.kind not in "iu" or r.min() < 1 or r.max() > self.count):
            raise ValueError(f"values_at_ranks: ranks must be integers in [1, {self.count}]")
        r = r.astype(np.int64)
        dense = self._dense()
        if dense is not None:
            return dense[dense.size - r]
        out = np.zeros(r.shape, dtype=np.float64)
        positive = r <= self.num_positive
        if positive.any():
            unique, inverse = np.unique(r[positive], return_inverse=True)
            out[positive] = self._solve_ranks(unique)[inverse]
        return out

    def _solve_ranks(self, ranks: np.ndarray) -> np.ndarray:
        """Values at sorted, unique ranks ``1 <= r <= num_positive``: bracket, then enumerate.

        All ranks share one pool of thresholds whose exact counts are known; each rank's bracket
        ``(lo, hi]`` is the tightest pair of pool thresholds around it. Rounds add thresholds until
        every bracket holds at most ``limit`` products (or one float): interpolation in the pool
        (count against the bit pattern of ``t``, i.e. log t) aims at the rank first, then at
        ``rank ± limit/4``, so a smooth spectrum needs ~3 counts per rank; every third round bisects
        instead (bits), which bounds the worst case. Exactness comes only from the counts and the
        final enumeration, never from the interpolation.
        """
        limit = max(1 << 16, 2 * self._total_rows)
        best, underflow = self._smallest_products()
        start = 0.0 if underflow else float(np.nextafter(best, 0.0))  # every positive product is above
        pool = _ThresholdPool(np.array([start, self.max()]), np.array([self.num_positive, 0]))
        pool.add(self, _bit_grid(start, self.max(), 32))
        for round_ in range(256):
            lo, hi, c_lo, c_hi = pool.brackets(ranks)
            active = (c_lo - c_hi > limit) & (hi.view(np.int64) - lo.view(np.int64) > 1)
            if not active.any():
                break
            r, lo_a, hi_a = ranks[active], lo[active], hi[active]
            if round_ % 3 == 2:
                proposals = _bit_midpoint(lo_a, hi_a)
            else:
                spread = 0 if round_ == 0 else limit // 4
                targets = np.concatenate([r - spread, r + spread]) if spread else r
                guess = pool.interpolate(targets)
                reps = targets.size // r.size
                proposals = _clamp_inside(guess, np.tile(lo_a, reps), np.tile(hi_a, reps))
            pool.add(self, proposals)
        return self._enumerate_brackets(ranks, *pool.brackets(ranks))

    def _enumerate_brackets(
        self, ranks: np.ndarray, lo: np.ndarray, hi: np.ndarray, c_lo: np.ndarray, c_hi: np.ndarray
    ) -> np.ndarray:
        """The answer of each rank from the products in its bracket ``(lo, hi]``.

        Brackets are intervals between consecutive pool thresholds, so they never overlap and
        neighbours share endpoints: the column boundaries are computed once per endpoint, in
        ascending order, and each bracket's products are enumerated once for all its ranks.
        """
        out = np.empty(ranks.size)
        single = hi.view(np.int64) - lo.view(np.int64) <= 1
        out[single] = hi[single]  # the bracket (lo, hi] holds one float
        todo = np.nonzero(~single)[0]
        if todo.size == 0:
            return out
        ends = np.unique(np.concatenate([lo[todo], hi[todo]]))
        where_lo = np.searchsorted(ends, lo[todo])
        boundaries = _EndpointBoundaries(self._pairs, ends)
        order = np.argsort(where_lo, kind="stable")
        i = 0
        while i < order.size:
            k = where_lo[order[i]]
            group = [todo[order[i]]]
            while i + 1 < order.size and where_lo[order[i + 1]] == k:
                i += 1
                group.append(todo[order[i]])
            i += 1
            products = self._products_between(boundaries.get(k), boundaries.get(k + 1))
            positions = np.array([ranks[g] - c_hi[g] - 1 for g in group])  # 0-based from the top
            chosen = np.partition(-products, positions)[positions]
            out[group] = -chosen
        return out

    def _products_between(self, start: list[np.ndarray], stop: list[np.ndarray]) -> np.ndarray:
        """Products of columns ``[start_i, stop_i)`` of every row, for every layer."""
        parts = []
        for pair, b0, b1 in zip(self._pairs, start, stop, strict=True):
            if pair.rows.size:
                parts.append(_gather_products(pair, b0, b1))
        return np.concatenate(parts) if parts else np.empty(0)

    def _products_in(self, lo: float, hi: float) -> np.ndarray:
        """Every product ``p`` with ``lo < p <= hi`` (``lo >= 0``), unsorted."""
        parts = []
        for pair in self._pairs:
            if pair.rows.size:
                start, stop = _first_above(pair.rows, pair.cols, np.array([lo, hi]))
                parts.append(_gather_products(pair, start, stop))
        return np.concatenate(parts) if parts else np.empty(0)

    def quantiles(self, qs: float | Sequence[float] | np.ndarray) -> np.ndarray:
        """Exact quantiles of the products (zeros included), the inverted-CDF definition.

        For ``N`` products sorted ascending ``p_(0) <= ... <= p_(N-1)``, quantile ``q`` in
        ``[0, 1]`` is ``p_(k)`` with ``k = ceil(N q) - 1`` clipped to ``[0, N-1]`` (Hyndman & Fan's
        type 1, numpy's ``method="inverted_cdf"``, computed with numpy's floating-point steps): the
        smallest product ``x`` with ``#{p <= x} >= N q``, always an actual product.
        """
        q = np.asarray(qs, dtype=np.float64)
        if np.isnan(q).any() or (q < 0).any() or (q > 1).any():
            raise ValueError("quantiles: every q must be in [0, 1]")
        virtual = self.count * q - 1  # numpy's inverted_cdf: floor, then +1 if a fraction is left
        k = np.floor(virtual)
        k = k + (virtual - k > 0)
        k = np.clip(k, 0, self.count - 1).astype(np.int64)
        return self.values_at_ranks(self.count - k).reshape(q.shape)

    def top(self, k: int) -> np.ndarray:
        """The ``k`` largest products, descending (all of them if ``k >= count``)."""
        k = min(int(k), self.count)
        if k <= 0:
            return np.empty(0)
        dense = self._dense()
        if dense is not None:
            return dense[::-1][:k].copy()
        v = float(self.values_at_ranks([k])[0])
        above = -np.sort(-self._products_in(v, self.max())) if v < self.max() else np.empty(0)
        return np.concatenate([above, np.full(k - above.size, v)])

    def bottom(self, k: int) -> np.ndarray:
        """The ``k`` smallest *positive* products, ascending (exact zeros excluded: see
        :attr:`num_zeros`); all positive ones if ``k >= num_positive``."""
        k = min(int(k), self.num_positive)
        if k <= 0:
            return np.empty(0)
        dense = self._dense()
        if dense is not None:
            return dense[self.num_zeros : self.num_zeros + k].copy()
        v = float(self.values_at_ranks([self.num_positive - k + 1])[0])  # the k-th smallest positive
        below = np.sort(self._products_in(0.0, np.nextafter(v, 0.0)))
        return np.concatenate([below, np.full(k - below.size, v)])

    def sorted_values(self, max_count: int = 50_000_000) -> np.ndarray:
        """All products, descending (materialised: ``8 * count`` bytes). OptionError if
        ``count > max_count``."""
        if self.count > max_count:
            raise OptionError(
                f"the spectrum has {self.count} products, more than max_count={max_count} to materialise"
            )
        dense = self._dense()
        if dense is not None:
            return dense[::-1].copy()
        products = np.concatenate([np.multiply.outer(s, a).ravel() for s, a in self._raw])
        products.sort()
        return products[::-1].copy()


class _ThresholdPool:
    """Thresholds ``t`` (ascending) with their exact ``count_above(t)`` (non-increasing)."""

    def __init__(self, t: np.ndarray, counts: np.ndarray) -> None:
        self.t = np.asarray(t, dtype=np.float64)
        self.c = np.asarray(counts, dtype=np.int64)

    def add(self, spectrum: KroneckerSpectrum, t: np.ndarray) -> None:
        new = np.setdiff1d(np.asarray(t, dtype=np.float64), self.t)
        if new.size == 0:
            return
        t_all = np.concatenate([self.t, new])
        c_all = np.concatenate([self.c, np.asarray(spectrum.count_above(new), dtype=np.int64)])
        order = np.argsort(t_all, kind="stable")
        self.t, self.c = t_all[order], c_all[order]

    def brackets(self, ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per rank ``r``: the tightest ``(lo, hi, count(lo), count(hi))`` with ``count(lo) >= r >
        count(hi)``, i.e. the r-th largest product lies in ``(lo, hi]``."""
        j = np.searchsorted(-self.c, -ranks, side="right") - 1  # last threshold with count >= r
        return self.t[j], self.t[j + 1], self.c[j], self.c[j + 1]

    def interpolate(self, targets: np.ndarray) -> np.ndarray:
        """Thresholds where ``count_above`` is expected to equal ``targets``: piecewise linear in
        (log(count + 1), bits of t), the bits being a monotone stand-in for log t that also covers 0."""
        y = np.log1p(self.c[::-1].astype(np.float64))  # ascending
        x = self.t[::-1].view(np.int64).astype(np.float64)
        bits = np.interp(np.log1p(np.maximum(targets, 0).astype(np.float64)), y, x)
        return np.round(bits).astype(np.int64).view(np.float64)


def _gather_products(pair: _Pair, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """``rows[i] * cols[j]`` for ``start[i] <= j < stop[i]``, every row ``i``."""
    lengths = stop - start
    total = int(lengths.sum())
    if total <= 0:
        return np.empty(0)
    row = np.repeat(np.arange(pair.rows.size), lengths)
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    col = np.arange(total) - offsets + start[row]
    return pair.rows[row] * pair.cols[col]


class _EndpointBoundaries:
    """Column boundaries ``b(t)`` of every layer for ascending thresholds ``ends``, computed in
    chunks on demand and kept only while needed (memory: one chunk of ``rows x 32`` per layer)."""

    def __init__(self, pairs: list[_Pair], ends: np.ndarray, chunk: int = 32) -> None:
        self.pairs, self.ends, self.chunk = pairs, ends, chunk
        self.first = -1
        self.blocks: list[np.ndarray] = []

    def get(self, k: int) -> list[np.ndarray]:
        if not self.first <= k < self.first + self.chunk or self.first < 0:
            self.first = k
            part = self.ends[k : k + self.chunk]
            self.blocks = [
                _first_above(p.rows, p.cols, part) if p.rows.size else np.zeros((part.size, 0), np.int64)
                for p in self.pairs
            ]
        return [block[k - self.first] for block in self.blocks]


def _bit_grid(low: float, high: float, n: int) -> np.ndarray:
    """``n`` thresholds evenly spaced in bit pattern strictly between ``low`` and ``high`` (>= 0)."""
    a, b = np.array([low, high]).view(np.int64)
    return np.unique(np.linspace(a, b, n + 2)[1:-1].astype(np.int64)).view(np.float64)


def _bit_midpoint(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    a, b = lo.view(np.int64), hi.view(np.int64)
    return (a + (b - a) // 2).view(np.float64)  # no int64 overflow


def _clamp_inside(t: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``t`` moved strictly inside ``(lo, hi)`` (by bit pattern; brackets here are > 1 float wide)."""
    bits = np.clip(t.view(np.int64), lo.view(np.int64) + 1, hi.view(np.int64) - 1)
    return bits.view(np.float64)


def _first_above(rows: np.ndarray, cols: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """``b[k, i] = #{j : fl(rows[i] * cols[j]) <= ts[k]}`` for positive ``rows``, sorted ``cols``.

    That is the index of the first column whose product exceeds ``ts[k]``. The candidate
    ``searchsorted(cols, ts[k] / rows[i])`` is checked against the actual products on both sides
    (by monotonicity of ``fl(r * c)`` in ``c`` the two neighbours suffice); where rounding in the
    division, ties or underflow make it wrong, the boundary is found by bisection on the products.
    Threshold-major layout: for one threshold the queries ``t / rows[i]`` are monotone, which keeps
    ``searchsorted`` cache-friendly.
    """
    m = cols.size
    r = rows[None, :]
    t = ts[:, None]
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        b = np.searchsorted(cols, t / r, side="right")
    low_side = cols[np.maximum(b - 1, 0)] * r > t  # a column below b already exceeds t
    low_side &= b > 0
    high_side = cols[np.minimum(b, m - 1)] * r <= t  # column b does not exceed t
    high_side &= b < m
    wrong = np.nonzero((low_side | high_side).ravel())[0]
    if wrong.size:
        flat = b.reshape(-1)  # a view: the fixes land in b
        below = low_side.reshape(-1)[wrong]
        lo = np.where(below, 0, flat[wrong] + 1)  # the boundary lies in [lo, hi]
        hi = np.where(below, flat[wrong] - 1, m)
        row_of = np.broadcast_to(r, b.shape).reshape(-1)[wrong]
        t_of = np.broadcast_to(t, b.shape).reshape(-1)[wrong]
        open_ = np.nonzero(lo < hi)[0]
        while open_.size:
            a, z = lo[open_], hi[open_]
            mid = (a + z) // 2
            above = row_of[open_] * cols[mid] > t_of[open_]
            hi[open_] = np.where(above, mid, z)
            lo[open_] = np.where(above, a, mid + 1)
            open_ = open_[lo[open_] < hi[open_]]
        flat[wrong] = lo
    return b
