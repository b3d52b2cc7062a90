"""The values the command line offers for its options, importable without torch.

``curvlab --help``, ``curvlab --version`` and ``curvlab info`` must not pay for importing torch (2-4 s),
yet building the parsers needs the valid values of ``--model``, ``--device``, ``--fisher``,
``--optimizer`` and ``--schedule`` and the description of ``--data``. Each tuple is defined here once;
the module that gives it meaning imports it from here and keeps exporting it under its old name:

* :data:`DEVICE_CHOICES` — :mod:`curvlab.device` (``auto`` = CUDA when a GPU is visible, else the CPU);
* :data:`FISHER_TYPES`, :data:`LOSS_NAMES` — :mod:`curvlab.capture.loss` (empirical, Monte-Carlo and exact
  Fisher: the logit-gradient vectors whose outer products are the loss Hessian's square root; the losses);
* :data:`DATA_SOURCES` — :mod:`curvlab.io.data` (the spec strings of the data sets);
* :data:`OPTIMIZERS`, :data:`SCHEDULES` — :mod:`curvlab.optim.train` (the schedules of seed F.3).

:data:`MODEL_NAMES` is a copy: the registry in :mod:`curvlab.models` (which imports every model, hence
torch) stays the truth, and ``tests/test_cli_imports.py`` checks that the two agree.
"""

from __future__ import annotations

#: The registered model names, sorted: ``curvlab.models.available_models()`` without importing torch.
MODEL_NAMES: tuple[str, ...] = ("mlp", "resnet32", "resnet8", "simple_cnn", "transformer_shallow", "vgg11")

DEVICE_CHOICES = ("auto", "cpu", "cuda")

FISHER_TYPES = ("empirical", "mc", "exact")

#: The losses of ``--loss`` (:mod:`curvlab.capture.loss`): softmax cross-entropy, squared error, binary
#: cross-entropy with logits.
LOSS_NAMES = ("cross-entropy", "mse", "bce")

#: One line describing the data sources, for ``--help``.
DATA_SOURCES = (
    "digits (scikit-learn's bundled 8x8 digits, embedded), "
    "cifar10:PATH (a CIFAR-10 folder, python-pickle or binary batches, or its parent), "
    "npz:PATH (an .npz with arrays x and integer labels y), "
    "pystdlib (token sequences of the running Python's standard-library sources, embedded), "
    "text:PATH (token sequences of a UTF-8 text file)"
)

#: The names of the built-in data sources (``npz:PATH`` is a source; ``mydata.py:load`` is a data factory).
DATA_SOURCE_NAMES = ("digits", "cifar10", "npz", "pystdlib", "text")

OPTIMIZERS = ("sgd", "momentum", "adam", "kfac")
SCHEDULES = ("constant", "linear-decay")
