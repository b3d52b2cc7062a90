"""Optimisation: the K-FAC optimizer and the training loop with its schedules and checkpoints.

* :mod:`curvlab.optim.kfac` — K-FAC (Martens & Grosse 2015; seed F.4): damping, KL clipping, momentum,
  factor moving averages, preconditioning through the layer adapters.
* :mod:`curvlab.optim.train` — ``curvlab train``: the run folder, schedules (seed F.3), the four
  optimizers, factor checkpoints during training and exact resumption.
"""
