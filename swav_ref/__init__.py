"""swav_ref: SwAV from first principles.

Sub-packages, from the bottom up:

- :mod:`swav_ref.backend` -- which array library (NumPy, CuPy, array-api-strict).
- :mod:`swav_ref.ot` -- optimal transport: Sinkhorn-Knopp, exact OT, the dessert example.
- :mod:`swav_ref.nn` -- a tiny deep-learning kit with hand-written backward passes.
- :mod:`swav_ref.swav` -- the SwAV objective: codes, swapped loss, head, queue.
- :mod:`swav_ref.data` -- datasets and multi-crop augmentation.
- :mod:`swav_ref.train`, :mod:`swav_ref.evaluate`, :mod:`swav_ref.cli` -- the product.
"""

__version__ = "0.1.0"
