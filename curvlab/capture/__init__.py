"""Capture: what a network's forward and backward passes give K-FAC (seed eqs. 13, 15, 16).

* :mod:`curvlab.capture.layers` — one adapter per module type, turning a layer's inputs ``a`` and output
  gradients ``g`` into the normal form ``[batch, locations, features]``; the layer math written once
  (:mod:`~curvlab.capture.normal_form`), with convolutions in :mod:`~curvlab.capture.conv`,
  ``nn.MultiheadAttention`` in :mod:`~curvlab.capture.attention` and normalisation layers in
  :mod:`~curvlab.capture.norms`.
* :mod:`curvlab.capture.coverage` — which entries a model gets, and why each other trainable parameter
  gets none.
* :mod:`curvlab.capture.loss` — the losses (softmax cross-entropy, squared error, binary cross-entropy)
  and their Fisher types (empirical, Monte-Carlo, exact): the logit-gradient vectors whose outer
  products are the Fisher, the exact ones the columns of the loss Hessian's square root; the
  Monte-Carlo draws of a whole batch are :mod:`curvlab.capture.sampling`.
* :mod:`curvlab.capture.task` — how a batch goes into the model and where its logits are.
* :mod:`curvlab.capture.factors` — hooks and accumulation: ``A = E[a a^T]``, ``S = E[g g^T]`` per layer
  (the running sums of each entry in :mod:`~curvlab.capture.sums`).

Imports go down only: capture uses :mod:`curvlab.io` to write checkpoints, never the analyses.
"""
