"""The trainer's parts, each small and tested on its own.

* :mod:`.batching` — (source cell, perturbation, target cell) pairs → padded tensors. Pairs
  that share a source cell share its prompt: the cell is encoded once and several
  responses attend to it (the training twin of the shared-prefix generation engine).
* :mod:`.loss` — the response-only loss, with the no-repeat gene mask for gene-level models.
* :mod:`.schedule` — the learning rate at a step (warm-up, then cosine over steps or time).
* :mod:`.checkpoint` — atomic, resumable checkpoints that never replace a good one with a partial one.
* :mod:`.loop` — the optimizer loop that ties them together under a step and time budget.

:func:`virtualcell.train.train` is the entry point that prepares the data and calls them.
"""
