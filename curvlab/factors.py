"""Deprecated path: moved to :mod:`curvlab.capture.factors` (see :mod:`curvlab._moved`)."""

from curvlab._moved import moved

moved(__name__)
