"""Deprecated path: moved to :mod:`curvlab.analysis.spectrum` (see :mod:`curvlab._moved`)."""

from curvlab._moved import moved

moved(__name__)
