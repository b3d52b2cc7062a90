"""Optimisation: the K-FAC optimizer and the training loop with its schedules and checkpoints.

* :mod:`curvlab.optim.kfac` — K-FAC (Martens & Grosse 2015; seed F.4): damping, KL clipping, momentum,
  factor moving averages, preconditioning through the layer adapters.
* :mod:`curvlab.optim.train` — ``curvlab train``: the run itself (build, loop, factor checkpoints
  during training, exact resumption), built from
  :mod:`~curvlab.optim.config` (``TrainConfig`` and its checks),
  :mod:`~curvlab.optim.schedules` (seed F.3: the learning rate, the saved steps),
  :mod:`~curvlab.optim.batches` (the data order, each process's share of a batch),
  :mod:`~curvlab.optim.optimizers` (the four optimizers behind one interface) and
  :mod:`~curvlab.optim.runfolder` (the run folder's files).
"""
