"""The trainer's parts, each small and tested on its own.

* :mod:`.labels` — each cell's typed perturbation (``ko:STAT1``, ``drug:drugA@10uM``) from the screen's labels,
  kinds, doses and times, and the model's perturbation vocabulary.
* :mod:`.pairing` — the control cell each training cell is predicted from (optimal transport by default).
* :mod:`.holdout` — the cells kept out of training: the user's ``holdout`` and the validation verdict's
  (a share of each context's cells, perturbations or a context held out whole).
* :mod:`.batching` — (source cell, perturbation, target cell) pairs → padded tensors. Pairs
  that share a source cell share its prompt: the cell is encoded once and several
  responses attend to it (the training twin of the shared-prefix generation engine).
  :class:`~.batching.StepBatches` is the batch of every step (a process's share of it under
  a multi-process launch).
* :mod:`.loss` — the response-only loss, with the no-repeat gene mask for gene-level models;
  :class:`~.loss.Objective` is a run's loss with its rules, weights and extras.
* :mod:`.kernels` — the fastest attention kernel, precision and thread count, measured; compiling.
* :mod:`.schedule` — the learning rate at a step (warm-up, then cosine over steps or time).
* :mod:`.checkpoint` — atomic, resumable checkpoints that never replace a good one with a partial one,
  and resuming from one (:func:`~.checkpoint.resume`).
* :mod:`.loop` — the optimizer loop that ties them together under a step and time budget, and the
  validation loss.
* :mod:`.weights`, :mod:`.embeddings` — the loss's token weights, gene embeddings from the data.

:func:`virtualcell.train.train` is the entry point that prepares the data and calls them.
"""
