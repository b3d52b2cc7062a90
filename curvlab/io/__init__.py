"""Files in and out: the checkpoint format, atomic outputs, data sets, model restoration.

* :mod:`curvlab.io.checkpoint` — the HDF5 factor checkpoint (format, validation, reading, crash-safe writing).
* :mod:`curvlab.io.atomic` — outputs written to a temporary file and renamed into place.
* :mod:`curvlab.io.data` — the embedded data sets and the user's CIFAR-10 / npz / text files.
* :mod:`curvlab.io.restore` — a model rebuilt from a checkpoint's ``/model`` config and weights.
* :mod:`curvlab.io.info` — what ``curvlab info`` reports about a checkpoint.

Nothing here imports torch at module level except :mod:`~curvlab.io.data` and :mod:`~curvlab.io.restore`.
"""
