"""Deprecated path: moved to :mod:`curvlab.analysis.powerlaw` (see :mod:`curvlab._moved`)."""

from curvlab._moved import moved

moved(__name__)
