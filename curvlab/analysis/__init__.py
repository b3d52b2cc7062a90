"""Analyses of captured curvature (seed appendix E).

* :mod:`curvlab.analysis.spectrum` — eigendecompositions of the factors and the whole-network K-FAC
  eigenspectrum (E.1, Fig. 9).
* :mod:`curvlab.analysis.powerlaw` — the rank law ``λ_(i) ≈ c i^-s`` of the sorted spectrum (E.4, Fig. 12).
* :mod:`curvlab.analysis.gradcov` — per-example gradients in the Kronecker-factored eigenbasis: their
  variance against the curvature along each direction (E.2, Fig. 10); a run of ``curvlab gradcov``
  (the jvp cross-check, the summary, the output file) is :mod:`curvlab.analysis.gradcov_run`.
* :mod:`curvlab.analysis.curvature` — Fisher/GGN-vector products (Schraudolph 2002): ``v^T F v``.

Analyses read checkpoints through :mod:`curvlab.io` and use :mod:`curvlab.capture` for the layer math.
"""
