"""GPU benchmarks: ours on CuPy against PyTorch on the same GPU, in the same run.

The cases come in two groups, run in this order (``--cases required``, ``--cases probes``,
or ``--cases all``, the default, for both): the numbers the GPU check exists for first, so
that a run cut short by a time limit, or a probe that breaks, cannot lose them.

Required:

1. a training step of resnet18 (CIFAR layout, 3x32x32, batch 256, float32): forward,
   linear head, cross-entropy, backward, SGD, against the same network and weights in
   torch, with true float32 products in both (``fp32``: TF32 off in torch,
   ``cudnn.allow_tf32`` and ``cuda.matmul.allow_tf32`` False; ours
   :func:`swav_ref.backend.set_tf32` False); ours with the fused kernels and with the plain
   CuPy code;
2. a full SwAV training step with CIFAR-10's augmentation (2x32 + 6x16 crops, flips,
   colour jitter, greyscale, made on the GPU; resnet18, LARS), images per second, fused
   kernels against the plain CuPy code, with the CuPy memory pool's bytes;
3. SwAV's Sinkhorn codes, B=4096, K=3000: ours (fused kernels, and the plain CuPy code)
   against the official loop in torch (``bench_loss.torch_sinkhorn``);
4. the swapped loss, forward + backward, B=4096, K=3000, 2+6 crops: ours against the
   official formula under torch autograd (``bench_loss.torch_loss``);
5. the resnet18 step of 1. with TF32 tensor cores allowed in both libraries (``tf32``,
   PyTorch's default for convolutions).

Probes (where the remaining time goes, and what might pay next):

6. one resnet18 step of each variant profiled by operation kind (``profile_ms``,
   ``profile_plain_ms``, ``profile_tf32_ms``: device time between CUDA events, the two
   GEMMs of a convolution's backward told apart);
7. CUDA graphs: the resnet18 step (batch 256 and the host floor's 8, TF32 off) recorded
   once by stream capture and replayed, against the same step issued op by op and against
   torch. A replay costs the host one launch, so it times the device's work alone: if it
   is much faster than the eager step, the host is the limit and graphs would pay (the
   training loop would then need the learning rate in device memory, as a kernel argument
   is frozen into the graph, and a memory pool safe under capture); if not, the device's
   kernels are. CuPy 14 refuses every cuBLAS call during a capture (seen on the H200 run
   of 2026-11-29), and the step's layers are cuBLAS products: the case is then
   recorded as ``unavailable``, with the library's words, not as a failure;
8. the same step on a batch of 8 (``host_floor``): the device has almost nothing to do, so
   this is the host's cost of issuing the step's launches (see ``bench_launches.py``);
9. the host time of one launch and of one view, ours against torch's;
10. BatchNorm's per-channel sums of products: our batched matmul against ``sum(a * b)``.

Every case records ``ours_ms`` and the peer's time (``torch_ms``, or ``peer_ms`` with
the peer named in ``what``), medians of interleaved rounds (``bench_loss.median_times``).
A case that fails is recorded as ``{"error": ..., "traceback": [...]}`` under its name and
the next one runs; the file is rewritten after every case (``running`` names the case in
progress, ``finished`` is set at the end), so a run killed from outside keeps what it
measured. The exit status is 1 when a case failed. The file also records how it was made
(``command``, ``argv``), the library versions and the GPU's name.
``benchmarks/report.py`` turns the file into the README's table.

Run on a machine with an NVIDIA GPU:  python benchmarks/bench_gpu.py --out FILE.json
``--backend numpy --small`` runs every case at toy sizes against torch on the CPU: a
rehearsal of the script itself (the test suite runs it), not a benchmark; ``--small``
alone falls back to NumPy where CuPy is missing. A rehearsal must be given ``--out``: the
default paths hold the committed GPU results. Its resnet18 steps use resnet18's layers at
1/8 width (``bench_resnet.py``'s ``resnet18_narrow``, which issues exactly resnet18's
operations, as ``tests/test_report.py`` checks), so that each takes milliseconds, not most
of a second; and each timing stops after ``--repeats`` rounds instead of running for at
least half a second.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_loss import make_scores, median_times, torch_loss, torch_sinkhorn  # noqa: E402
from bench_resnet import (  # noqa: E402  (the CPU benchmark's step and precision settings)
    CASES,
    case_inputs,
    make_ours,
    make_torch,
    precision_label,
    torch_tf32,
)

from gpu_equivalence import provenance  # noqa: E402

from swav_ref import fused  # noqa: E402
from swav_ref.nn import functional as F  # noqa: E402
from swav_ref.backend import BackendUnavailableError, Random, get_backend, set_tf32, synchronize  # noqa: E402

SIZES = {"full": dict(batch=4096, prototypes=3000, images=256, floor_images=8, swav_batch=256,
                     prototypes_step=3000, hidden=2048, net="resnet18", min_seconds=0.5),
         "small": dict(batch=64, prototypes=30, images=8, floor_images=2, swav_batch=8, prototypes_step=3000,
                       hidden=32, net="resnet18_narrow", min_seconds=0.0)}
#: How each network of ``SIZES`` is named in a case's description.
NET_LABELS = {"resnet18": "resnet18", "resnet18_narrow": "resnet18 at 1/8 width"}


class Setup:
    """The backend pair under test: ours on ``xp``, torch on ``device``."""

    def __init__(self, backend: str, torch):
        self.xp = get_backend(backend)
        self.torch = torch
        self.device = "cuda" if backend == "cupy" else "cpu"

    def sync(self) -> None:
        synchronize(self.xp)
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def precision(self, tf32: bool) -> None:
        """The same float32 product rule for both libraries."""
        set_tf32(self.xp, tf32)
        torch_tf32(self.torch, tf32)


@contextlib.contextmanager
def op_profile(s: Setup):
    """Time spent per kind of operation while the block runs, in ms, as a dict filled in
    when the block ends. On the GPU each call is bracketed by CUDA events (no sync inside
    the step; the events are read once at the end), so the numbers are device time; on the
    CPU, wall time. Rows marked "in ..." are also inside that row: conv backward minus its
    dX GEMM and col2im is the dW GEMM."""
    from swav_ref.nn import SGD
    from swav_ref.nn import functional as F

    patches = [(F, "im2col", "im2col"), (F, "col2im", "col2im"),
               (F, "conv2d_forward", "conv forward (GEMM + im2col)"),
               (F, "conv2d_backward", "conv backward (2 GEMMs + col2im)"),
               (F, "_matmul_into", "dX GEMM (in conv backward)"),
               (F, "batchnorm_forward", "BatchNorm forward"), (F, "batchnorm_backward", "BatchNorm backward"),
               (F, "_row_dot", "BatchNorm channel sums of products (in BatchNorm)"),
               (F, "relu_forward", "ReLU forward"), (F, "relu_backward", "ReLU backward"),
               (F, "add_forward", "residual add"), (SGD, "step", "optimiser step")]
    gpu = s.device == "cuda"
    marks: list[tuple[str, object, object]] = []

    def wrap(fn, label):
        def timed_call(*args, **kwargs):
            start = s.xp.cuda.Event() if gpu else time.perf_counter()
            if gpu:
                start.record()
            out = fn(*args, **kwargs)
            if gpu:
                end = s.xp.cuda.Event()
                end.record()
            else:
                end = time.perf_counter()
            marks.append((label, start, end))
            return out
        return timed_call

    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for (owner, name, label), (_, _, fn) in zip(patches, originals):
        setattr(owner, name, wrap(fn, label))
    totals: dict[str, float] = {}
    try:
        yield totals
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
        s.sync()
        for label, start, end in marks:
            ms = s.xp.cuda.get_elapsed_time(start, end) if gpu else 1e3 * (end - start)
            totals[label] = totals.get(label, 0.0) + ms


def _case(what: str, ours_s: float, peer_s: float | None = None, peer_key: str = "torch_ms", **extra) -> dict:
    case = {"what": what, "ours_ms": 1e3 * ours_s, **extra}
    if peer_s is not None:
        case[peer_key] = 1e3 * peer_s
        case["ratio"] = ours_s / peer_s
    return case


def _scores(s: Setup, size: dict):
    """The 8 crops' scores (cosines, float32) on both sides, and the batch ``b``."""
    b = size["batch"]
    host = make_scores(b, size["prototypes"])  # 8 crops of b rows
    return s.xp.asarray(host), s.torch.from_numpy(host).to(s.device), b


def bench_sinkhorn(s: Setup, size: dict, repeats: int) -> dict:
    from swav_ref.swav import sinkhorn_codes

    scores, scores_t, b = _scores(s, size)
    k = size["prototypes"]
    first = scores[:b]
    with fused.disabled():
        plain_codes = sinkhorn_codes(first)
    gap = float(s.xp.max(s.xp.abs(sinkhorn_codes(first) - plain_codes)))

    def codes():
        return sinkhorn_codes(first)

    # fused.disabled() is a contextlib context manager, so it also wraps a function
    t = median_times({"fused": codes, "plain": fused.disabled()(codes),
                      "torch": lambda: torch_sinkhorn(s.torch, scores_t[:b])}, repeats, s.sync, size["min_seconds"])
    return {
        f"sinkhorn_B{b}_K{k}": _case(f"SwAV Sinkhorn codes, B={b}, K={k}, 3 iterations: ours (fused kernels) vs "
                                     "the official loop in torch", t["fused"], t["torch"],
                                     max_abs_difference_fused_vs_plain=gap),
        f"sinkhorn_B{b}_K{k}_plain": _case(f"SwAV Sinkhorn codes, B={b}, K={k}: ours (plain CuPy code) vs "
                                           "the official loop in torch", t["plain"], t["torch"]),
    }


def bench_loss(s: Setup, size: dict, repeats: int) -> dict:
    from swav_ref.swav import swav_loss

    scores, scores_t, b = _scores(s, size)
    k = size["prototypes"]
    t = median_times({"ours": lambda: swav_loss(scores, b), "torch": lambda: torch_loss(s.torch, scores_t, b, False)},
                     repeats, s.sync, size["min_seconds"])
    return {f"swav_loss_fwd_bwd_B{b}_K{k}_2+6crops": _case(
        f"SwAV loss forward + backward, B={b}, K={k}, 2+6 crops: ours vs torch autograd (official loop)",
        t["ours"], t["torch"])}


def resnet18_steps(s: Setup, batch: int, arch: str = "resnet18"):
    """Three training steps of resnet18 on the same ``batch`` of 3x32x32 images (those of
    ``bench_resnet.py``, without its per-step sync): ours with the fused kernels, ours with
    the plain CuPy code, and torch's on copies of our weights. ``arch="resnet18_narrow"``
    (``--small``): the same layers at 1/8 width."""
    from swav_ref.nn import Linear
    from swav_ref.nn.resnet import resnet18

    if arch == "resnet18_narrow":
        net = CASES["resnet18_narrow"][0](xp=s.xp, dtype="float32")
    else:
        net = resnet18(3, xp=s.xp, dtype="float32", rng=Random(0))
    head = Linear(net.out_dim, 10, xp=s.xp, dtype="float32", rng=Random(1))
    x_np, y_np = case_inputs((3, 32, 32), batch)
    x, y = s.xp.asarray(x_np), s.xp.asarray(y_np)
    tx, ty = s.torch.tensor(x_np, device=s.device), s.torch.tensor(y_np, device=s.device)
    step, peer_step = make_ours(net, head, sync=False), make_torch(s.torch, net, head, s.device, sync=False)

    def ours():
        return step(x, y)

    return ours, fused.disabled()(ours), (lambda: peer_step(tx, ty))


def bench_resnet18_step(s: Setup, size: dict, repeats: int, tf32: bool = False) -> dict:
    """The resnet18 step, ours (fused kernels; in fp32 the plain code too) against torch,
    both libraries with the same float32 product rule (``tf32``)."""
    batch, label = size["images"], NET_LABELS[size["net"]]
    ours, ours_plain, peer = resnet18_steps(s, batch, size["net"])
    fns = {"fused": ours, "torch": peer} if tf32 else {"fused": ours, "torch": peer, "plain": ours_plain}
    s.precision(tf32)
    try:
        t = median_times(fns, repeats, s.sync, size["min_seconds"])
    finally:
        s.precision(False)
    rule, key = precision_label(tf32), f"resnet18_cifar_step_b{batch}_{'tf32' if tf32 else 'fp32'}"
    out = {key: _case(f"{label} training step, batch {batch}, 3x32x32, {rule}: ours (fused kernels) vs torch",
                      t["fused"], t["torch"], ours_images_per_s=batch / t["fused"],
                      torch_images_per_s=batch / t["torch"])}
    if "plain" in t:
        out[key + "_plain"] = _case(f"{label} training step, batch {batch}, {rule}: ours (plain CuPy code) vs torch",
                                    t["plain"], t["torch"])
    return out


@contextlib.contextmanager
def device_time(s: Setup):
    """The block's time in ms, as ``{"ms": ...}`` filled in when it ends: between two CUDA
    events on the GPU (device time), wall time on the CPU."""
    gpu, out = s.device == "cuda", {}
    if gpu:
        start, end = s.xp.cuda.Event(), s.xp.cuda.Event()
        start.record()
    else:
        t0 = time.perf_counter()
    yield out
    if gpu:
        end.record()
        end.synchronize()
        out["ms"] = s.xp.cuda.get_elapsed_time(start, end)
    else:
        out["ms"] = 1e3 * (time.perf_counter() - t0)


def bench_resnet18_profile(s: Setup, size: dict, repeats: int) -> dict:
    """One resnet18 step of each variant (fused and plain, TF32 off; fused with TF32) profiled
    by kind of operation (:func:`op_profile`): where the step's time goes. The row compares
    the whole profiled step, fused against plain (the events add a little to both)."""
    batch, label = size["images"], NET_LABELS[size["net"]]
    ours, ours_plain, _ = resnet18_steps(s, batch, size["net"])
    profiles, whole = {}, {}
    try:
        for variant, step, tf32 in (("fused", ours, False), ("plain", ours_plain, False), ("tf32", ours, True)):
            s.precision(tf32)
            step()  # warm: kernels compiled, buffers pooled
            s.sync()
            with op_profile(s) as profiles[variant], device_time(s) as whole[variant]:
                step()
    finally:
        s.precision(False)
    return {f"resnet18_cifar_step_b{batch}_profile": _case(
        f"{label} training step, batch {batch}, TF32 off, one step profiled by kind of operation: fused kernels "
        "vs the plain CuPy code", whole["fused"]["ms"] / 1e3, whole["plain"]["ms"] / 1e3, peer_key="peer_ms",
        tf32_ms=whole["tf32"]["ms"], profile_ms=profiles["fused"], profile_plain_ms=profiles["plain"],
        profile_tf32_ms=profiles["tf32"])}


class CaptureUnsupported(Exception):
    """The GPU library refused a call during stream capture: CuPy 14 refuses every cuBLAS
    call then, and the step's convolutions and linear layers are cuBLAS
    matrix products. A limit of the library, recorded as such, not a failed case."""


def replayable(s: Setup, step):
    """``step`` recorded once as a CUDA graph (CuPy stream capture, on a stream of its own)
    and returned as a function that replays it and waits for it; on the CPU, ``step``
    itself, so that the rehearsal runs the case's plumbing. The step must not read the
    device from the host (ours and bench_resnet's do not, by design).

    A probe, not a training loop: the replay writes to the addresses the capture used,
    which nothing else uses while the benchmark runs."""
    if s.device != "cuda":
        return step
    # A non-blocking stream does not wait for the default one, where CuPy 14's asarray copies
    # the inputs asynchronously: let them land first.
    s.sync()
    stream = s.xp.cuda.Stream(non_blocking=True)
    with stream:
        step()  # warm on this stream: kernels compiled, memory pooled for this stream
        stream.synchronize()
        stream.begin_capture()
        try:
            step()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                stream.end_capture()  # leave capture mode; its own error would hide the first one
            if isinstance(exc, NotImplementedError) and "capture" in str(exc):
                raise CaptureUnsupported(str(exc)) from exc
            raise
        graph = stream.end_capture()

    def replay():
        graph.launch(stream=stream)
        stream.synchronize()
    return replay


def bench_graph_replay(s: Setup, size: dict, repeats: int) -> dict:
    """The resnet18 step eager and replayed from a CUDA graph, TF32 off (see item 8 of
    the module notes)."""
    out = {}
    s.precision(False)
    label = NET_LABELS[size["net"]]
    for batch in (size["images"], size["floor_images"]):
        ours, _, peer = resnet18_steps(s, batch, size["net"])
        key = f"resnet18_cifar_step_b{batch}_graph_replay"
        try:
            replay = replayable(s, ours)
        except CaptureUnsupported as exc:
            out[key] = {"what": f"{label} training step, batch {batch}, replayed from a CUDA graph: not "
                                f"measurable here, the capture was refused ({exc})", "unavailable": str(exc)}
            continue
        t = median_times({"eager": ours, "graph": replay, "torch": peer}, repeats, s.sync, size["min_seconds"])
        rehearsal = "" if s.device == "cuda" else " (CPU rehearsal: no graph, the step itself)"
        out[key] = _case(f"{label} training step, batch {batch}, TF32 off, replayed from a CUDA graph: ours vs "
                         f"torch{rehearsal}", t["graph"], t["torch"], eager_ms=1e3 * t["eager"],
                         graph_over_eager=t["graph"] / t["eager"])
    return out


def bench_host_floor(s: Setup, size: dict, repeats: int) -> dict:
    """The resnet18 step on a tiny batch, where the device has almost nothing to do: the
    time is then the host's, issuing launches (divide by ``bench_launches.py``'s count of
    kernels per step for the cost of one). TF32 off in both."""
    batch, label = size["floor_images"], NET_LABELS[size["net"]]
    ours, ours_plain, peer = resnet18_steps(s, batch, size["net"])
    s.precision(False)
    t = median_times({"fused": ours, "plain": ours_plain, "torch": peer}, repeats, s.sync, size["min_seconds"])
    key = f"resnet18_cifar_step_b{batch}_host_floor"
    return {key: _case(f"{label} training step, batch {batch} (host-bound: launch overhead), fused kernels: "
                       "ours vs torch", t["fused"], t["torch"]),
            key + "_plain": _case(f"{label} training step, batch {batch} (host-bound), plain CuPy code: ours vs "
                                  "torch", t["plain"], t["torch"])}


def bench_launch_overhead(s: Setup, size: dict, repeats: int, launches: int = 2000) -> dict:
    """The host's cost of one launch: ``launches`` additions of two 1-element arrays in a
    row (the device does nothing worth timing), ours (a CuPy element-wise launch) against
    torch's; and of one CuPy view (a reshape), against torch's. Multiplied by the counts
    of ``bench_launches.py`` this is the floor under a step that the GPU cannot lower."""
    xp, torch = s.xp, s.torch
    a, b = xp.ones((1,), dtype=xp.float32), xp.ones((1,), dtype=xp.float32)
    ta, tb = torch.ones(1, device=s.device), torch.ones(1, device=s.device)

    def repeat(fn):
        def run():
            for _ in range(launches):
                fn()
        return run

    t = median_times({"ours_add": repeat(lambda: a + b), "torch_add": repeat(lambda: ta + tb),
                      "ours_view": repeat(lambda: xp.reshape(a, (1, 1))), "torch_view": repeat(lambda: ta.view(1, 1))},
                     repeats, s.sync, size["min_seconds"])
    per = {k: v / launches for k, v in t.items()}
    return {"launch_overhead_add": _case("host time of one element-wise launch (1-element add): ours vs torch",
                                         per["ours_add"], per["torch_add"]),
            "launch_overhead_view": _case("host time of one view (reshape): ours vs torch", per["ours_view"],
                                          per["torch_view"])}


def bench_row_dot(s: Setup, size: dict, repeats: int) -> dict:
    """BatchNorm's per-channel sums of products, ``functional._row_dot`` (a batched matrix
    product, C dot products of length M: the faster form on the CPU) against the plain
    ``sum(a * b, axis=1)``, at the shapes of resnet18's first and last stages; on CuPy also
    against a ``cupy.ReductionKernel`` that multiplies as it sums (one launch, no (C, M)
    temporary). Which form suits the GPU is an open question this case answers."""
    from swav_ref.nn.functional import _row_dot

    xp = s.xp
    fns = {"matmul": lambda a, b: _row_dot(a, b), "sum": lambda a, b: xp.sum(a * b, axis=1)}
    if s.device == "cuda":
        kernel = xp.ReductionKernel("T x, T w", "T y", "x * w", "a + b", "y = a", "0", "bench_row_dot")
        fns["reduction_kernel"] = lambda a, b: kernel(a, b, axis=1)
    out = {}
    for channels, side in ((64, 32), (512, 4)):
        m = side * side * size["images"]
        rng = np.random.default_rng(0)
        a = xp.asarray(rng.normal(size=(channels, m)).astype(np.float32))
        b = xp.asarray(rng.normal(size=(channels, m)).astype(np.float32))
        t = median_times({name: (lambda fn=fn: fn(a, b)) for name, fn in fns.items()}, repeats, s.sync,
                         size["min_seconds"])
        for peer in [name for name in fns if name != "matmul"]:
            label = "sum(a * b, axis=1)" if peer == "sum" else "a ReductionKernel (one launch)"
            key = f"bn_row_dot_C{channels}_M{m}" + ("" if peer == "sum" else f"_vs_{peer}")
            out[key] = _case(f"BatchNorm channel sums of products, C={channels}, M={m}: batched matmul (ours) vs "
                             f"{label}", t["matmul"], t[peer], peer_key="peer_ms")
    return out


def swav_step(backend: str, batch: int, prototypes: int, hidden: int, feat_dim: int = 128, arch: str = "resnet18",
              **overrides):
    """One full SwAV training step (CIFAR-10's multi-crop recipe on synthetic 32x32 images:
    2x32 + 6x16 crops, flips, colour jitter, greyscale, no blur, CIFAR-10's mean and std; the
    augmentation made on the backend; resnet18, projection head, prototypes, Sinkhorn, LARS)
    as a function of no arguments (its ``trainer`` attribute holds the trainer), on the same
    ``batch`` of images each time. ``overrides``: more :class:`~swav_ref.config.TrainConfig`
    fields (e.g. a queue, which the first epoch's start then creates)."""
    import tempfile

    from swav_ref.data.datasets import ARRAYS, ImageDataset
    from swav_ref.data.multicrop import MultiCrop, default_config
    from swav_ref.train import TrainConfig, Trainer

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(batch * 2, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=batch * 2)
    ds = ImageDataset(images, labels, tuple(str(i) for i in range(10)), "synthetic-cifar")
    recipe = default_config("cifar10")  # what `swav-ref train --dataset cifar10` augments with
    cfg = TrainConfig(backend=backend, dataset=ARRAYS, arch=arch, batch_size=batch, n_crops=recipe.n_crops,
                      crop_sizes=recipe.sizes, min_scale=recipe.min_scale, max_scale=recipe.max_scale,
                      n_prototypes=(prototypes,), hidden_dim=hidden, feat_dim=feat_dim, epochs=1000,
                      out_dir=str(Path(tempfile.gettempdir()) / "swav_step_bench"), progress=False, **overrides)
    trainer = Trainer(cfg, train_set=ds, test_set=ds)
    # Arrays get the general recipe (ImageNet's blur) and their own channel statistics; a
    # CIFAR-10 run gets the CIFAR recipe, normalised by CIFAR-10's constants (the recipe's).
    trainer.mean, trainer.std = recipe.mean, recipe.std
    trainer.multicrop = MultiCrop(recipe, trainer.xp, trainer.dtype)
    trainer._start_epoch(0)  # what fit() does first (creates the queue, if asked for)
    idx = np.arange(batch)

    def step():
        trainer.train_step(trainer.make_crops(idx), idx)
    step.trainer = trainer  # for the tests: what the step trains with
    return step


def pool_bytes(s: Setup) -> dict:
    """The CuPy memory pool's ``total_bytes`` (held from the device: as freed blocks stay in
    the pool, its high-water mark since the last ``free_all_blocks``) and ``used_bytes``
    (held by live arrays); nothing on NumPy. Never fails the case it describes."""
    if s.device != "cuda":
        return {}
    try:
        pool = s.xp.get_default_memory_pool()
        return {"pool_total_bytes": int(pool.total_bytes()), "pool_used_bytes": int(pool.used_bytes())}
    except Exception as exc:
        return {"pool_error": f"{type(exc).__name__}: {exc}"}


def free_pool(s: Setup) -> None:
    """Return the pool's unused blocks to the device, so that the next case's
    ``pool_total_bytes`` counts that case's own memory. The convolutions' kept column
    buffers (``F.SCRATCH``, several GB after a resnet18 step at batch 256) hold their
    blocks in use, so they are let go first."""
    F.SCRATCH.clear()
    gc.collect()
    if s.device == "cuda":
        with contextlib.suppress(Exception):
            s.xp.get_default_memory_pool().free_all_blocks()


def bench_swav_step(s: Setup, size: dict, repeats: int) -> dict:
    batch = size["swav_batch"]
    free_pool(s)
    step = swav_step("cupy" if s.device == "cuda" else "numpy", batch, size["prototypes_step"], size["hidden"])
    t = median_times({"fused": step, "plain": fused.disabled()(step)}, repeats, s.sync, size["min_seconds"])
    return {f"swav_step_resnet18_2x32+6x16_b{batch}": _case(
        f"full SwAV step, CIFAR-10 augmentation, resnet18, 2x32 + 6x16 crops, batch {batch}, LARS: fused kernels vs "
        f"the plain CuPy code ({batch / t['fused']:.0f} vs {batch / t['plain']:.0f} images/s)", t["fused"], t["plain"],
        peer_key="peer_ms", images_per_s=batch / t["fused"], plain_images_per_s=batch / t["plain"], **pool_bytes(s))}


#: The cases, most important first (see the module notes): a run cut short keeps the first.
REQUIRED = (("resnet18_fp32", bench_resnet18_step), ("swav_step", bench_swav_step), ("sinkhorn", bench_sinkhorn),
            ("loss", bench_loss), ("resnet18_tf32", functools.partial(bench_resnet18_step, tf32=True)))
PROBES = (("resnet18_profile", bench_resnet18_profile), ("graph_replay", bench_graph_replay),
          ("host_floor", bench_host_floor), ("launch_overhead", bench_launch_overhead), ("row_dot", bench_row_dot))
GROUPS = {"required": REQUIRED, "probes": PROBES, "all": REQUIRED + PROBES}
RESULTS = Path(__file__).resolve().parent / "results"
#: Where each group goes by default (report.py reads both names).
DEFAULT_OUT = {"required": RESULTS / "bench_gpu.json", "probes": RESULTS / "bench_gpu_probes.json",
               "all": RESULTS / "bench_gpu.json"}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--backend", choices=("cupy", "numpy"), default=None,
                   help="cupy (default), or numpy: rehearse the script on the CPU against torch CPU (with --small "
                        "and --out)")
    p.add_argument("--small", action="store_true", help="toy sizes, to rehearse the script (NumPy without CuPy)")
    p.add_argument("--cases", choices=tuple(GROUPS), default="all",
                   help="required: the resnet18 step, the SwAV step, Sinkhorn, the loss, TF32; probes: profile, CUDA "
                        "graphs, host floor, launch cost, BatchNorm sums; all: both, in that order")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file (default benchmarks/results/bench_gpu.json, bench_gpu_probes.json for --cases "
                        "probes); required for a rehearsal")
    args = p.parse_args(argv)
    if args.backend is None:
        args.backend = "cupy"
        if args.small and not _have_cupy():
            args.backend = "numpy"
            print("bench_gpu: --small without CuPy: rehearsing on NumPy (as --backend numpy)", file=sys.stderr)
    if args.out is None:
        if args.backend != "cupy" or args.small:  # never over the committed H200 numbers
            p.error("a rehearsal (--backend numpy or --small) needs --out, e.g. --out /tmp/bench_gpu.json: the "
                    "default path holds the committed GPU results")
        args.out = DEFAULT_OUT[args.cases]
    return args


def _have_cupy() -> bool:
    try:
        get_backend("cupy")
    except BackendUnavailableError:
        return False
    return True


def make_setup(backend: str, torch) -> Setup:
    try:
        return Setup(backend, torch)
    except BackendUnavailableError as exc:
        raise SystemExit(f"bench_gpu: {exc}\nTo rehearse the script on a CPU: python benchmarks/bench_gpu.py "
                         "--backend numpy --small --out /tmp/bench_gpu.json") from exc


def run_case(s: Setup, size: dict, repeats: int, fn) -> dict:
    """The case's entries, or one entry ``{"error", "traceback"}``: a failing case is
    recorded and must not stop the next."""
    try:
        return fn(s, size, repeats)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc().splitlines()[-12:]}
    finally:
        s.precision(False)  # whatever the case left, the next starts with true float32


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    s = make_setup(args.backend, torch)
    size = SIZES["small" if args.small else "full"]
    info = provenance("benchmarks/bench_gpu.py", argv, s.xp)
    info["versions"]["torch"] = torch.__version__
    machine = info.get("gpu") or (f"CPU ({platform.machine()}), rehearsal" if s.device != "cuda" else "GPU")
    result = {"benchmark": "bench_gpu", "date": time.strftime("%Y-%m-%d"), "machine": machine,
              "host": platform.node(), **info["versions"], **info, "small": args.small,
              "fused_kernels": fused.enabled(), "case_group": args.cases, "cases": {}, "case_seconds": {},
              "running": None, "finished": False}

    def write() -> None:  # after every case: a run killed from outside keeps what it measured
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))

    for name, fn in GROUPS[args.cases]:
        result["running"] = name
        write()
        t0 = time.perf_counter()
        entries = run_case(s, size, args.repeats, fn)
        result["case_seconds"][name] = time.perf_counter() - t0
        result["cases"].update({name: entries} if "error" in entries else entries)
        print(f"bench_gpu: {name} ({result['case_seconds'][name]:.1f} s)\n{json.dumps(entries, indent=2)}", flush=True)
    result["running"], result["finished"] = None, True
    write()
    return result


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        done = main()
        raise SystemExit(1 if any("error" in c for c in done["cases"].values()) else 0)
