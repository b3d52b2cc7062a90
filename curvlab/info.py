"""Deprecated path: moved to :mod:`curvlab.io.info` (see :mod:`curvlab._moved`)."""

from curvlab._moved import moved

moved(__name__)
