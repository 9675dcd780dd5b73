"""swav_ref: SwAV from first principles.

Sub-packages, from the bottom up:

- :mod:`swav_ref.backend` -- which array library (NumPy, CuPy, array-api-strict).
- :mod:`swav_ref.fused` -- fused CUDA kernels for the CuPy backend, where they pay.
- :mod:`swav_ref.ot` -- optimal transport: Sinkhorn-Knopp, exact OT, the dessert example.
- :mod:`swav_ref.nn` -- a tiny deep-learning kit with hand-written backward passes.
- :mod:`swav_ref.swav` -- the SwAV objective: codes, swapped loss, head, queue.
- :mod:`swav_ref.data` -- datasets and multi-crop augmentation.
- :mod:`swav_ref.deepcluster` -- DeepCluster-v2: memory bank, spherical k-means, targets.
- :mod:`swav_ref.config`, :mod:`swav_ref.train`, :mod:`swav_ref.resume` -- a run's settings,
  the trainer, and its checkpoints (written atomically by :mod:`swav_ref.checkpoint`), data-
  parallel through :mod:`swav_ref.distributed`.
- :mod:`swav_ref.evaluate`, :mod:`swav_ref.results`, :mod:`swav_ref.encoder`,
  :mod:`swav_ref.experiment` -- the linear probe and kNN, the results table, a trained
  encoder, and the comparison behind ``swav-ref demo`` (every method against the baselines).
- :mod:`swav_ref.cli`, :mod:`swav_ref.plots`, :mod:`swav_ref.exercises` -- the command line,
  the figures, and the notebooks' self-checks.
"""

__version__ = "0.1.0"
