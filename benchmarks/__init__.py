"""Benchmarks: curvlab against peers and baselines on the same work, in one process, as ratios."""
