"""One training step of our hand-written ResNet against PyTorch.

Two cases, float32, identical architectures and weights, in one run:

- ``resnet_tiny`` on 1x8x8 inputs (scikit-learn digits size), batch 256;
- ``resnet18`` in the CIFAR layout on 3x32x32 inputs, batch 128.

A step is forward, a 10-class linear head with softmax cross-entropy, backward, and an
SGD step (momentum 0.9, weight decay 1e-4), the same for both; the first step's losses are
recorded as a check that both sides compute the same thing.

How it is measured (CPU, the default): PyTorch gets as many threads as NumPy's BLAS, and
runs in a subprocess started by this run. With both libraries in one process, OpenBLAS's
pthreads and PyTorch's OpenMP threads (which spin after each parallel region) fought over
the 2 cores and slowed *both* sides several-fold, even after a bare ``import torch``.
Steps run in three alternating blocks (ours, PyTorch, ..., each after a warm-up step), so
that slow phases of the shared machine hit both alike. Reported: the medians, the best
step of each side (noise only ever adds time, so the ratio of the bests is the steadier
figure), every sample, and the load average, so a reader can judge the noise. The float32
matmul peak (the best of 5 products) is measured before and after the cases, and the
higher of the two is the peak; the convolution and linear FLOPs (forward + backward = 3 x
forward, 2 FLOPs per multiply-add) give the achieved GFLOP/s as a fraction of it; since
the machine's speed drifts by 2x within minutes, a peak is also measured just before each
of our blocks and the block's fraction taken against it (``..._paired``, the median over
blocks). The profile wraps timers around the functional pairs: seconds per step by
operation type.

``--backend cupy`` runs ours on the GPU against PyTorch on CUDA, in true float32 on both
sides: PyTorch's own default lets cuDNN convolutions use TF32 tensor cores, so its peer
turns that off (``--tf32`` allows TF32 in both instead). The JSON's ``precision`` says which.

Run:  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_resnet.py [--quick]
Writes benchmarks/results/bench_resnet.json (or ..._cupy.json) and prints it.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from swav_ref import fused
from swav_ref.backend import asarray, get_backend, set_tf32, synchronize, to_numpy
from swav_ref.nn import SGD, Linear, functional as F, layers as L
from swav_ref.nn.resnet import ResNet, resnet18, resnet_tiny

RESULTS = Path(__file__).resolve().parent / "results"


def blas_threads() -> int:
    """NumPy's BLAS thread count (threadpoolctl when installed, else 2)."""
    try:
        from threadpoolctl import threadpool_info

        counts = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
        return counts[0] if counts else 2
    except ImportError:
        return 2


def matmul_peak(xp, n: int, repeats: int) -> float:
    """GFLOP/s of a square float32 matmul on the backend (the best of ``repeats``: a peak)."""
    rng = np.random.default_rng(0)
    a = asarray(rng.random((n, n), dtype=np.float32), xp)
    b = asarray(rng.random((n, n), dtype=np.float32), xp)
    xp.matmul(a, b)
    synchronize(xp)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        xp.matmul(a, b)
        synchronize(xp)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


def count_flops(net: ResNet, head: Linear, x) -> float:
    """Forward FLOPs of the convolutions and the head (2 per multiply-add) for one batch."""
    flops = [2.0 * x.shape[0] * head.in_features * head.out_features]
    convs = [m for _, m in net.named_modules() if isinstance(m, L.Conv2d)]
    for conv in convs:

        def recording(inp, conv=conv, fwd=conv._forward):
            out, cache = fwd(inp)
            n, o, h, w = out.shape
            flops.append(2.0 * n * o * h * w * conv.in_channels * conv.kernel_size**2)
            return out, cache

        conv._forward = recording  # an instance attribute shadowing the method, removed below
    net.eval()
    net.forward(x)
    net.train()
    for conv in convs:
        del conv._forward
    return sum(flops)


# -- the two step functions ----------------------------------------------------------------


def make_ours(net: ResNet, head: Linear, sync: bool = True):
    """Our training step ``step(x, y)``. ``sync``: return the loss as a Python float (one
    host sync per step, as a training loop's log); else the loss array, nothing waited for
    (the caller synchronises, as ``bench_gpu.py`` does around its timings)."""
    opt_net, opt_head = SGD(net, 0.9, 1e-4), SGD(head, 0.9, 1e-4)

    def step(x, y):
        features = net.forward(x)
        loss, cache = F.softmax_cross_entropy_forward(head.forward(features), y)
        net.backward(head.backward(F.softmax_cross_entropy_backward(1.0, cache)))
        opt_net.step(0.01)
        opt_head.step(0.01)
        net.zero_grad()
        head.zero_grad()
        return float(loss) if sync else loss

    return step


def torch_block(torch):
    """PyTorch's BasicBlock with our parameter names: ``Block(cin, cout, stride)``."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return torch.relu(out + (x if self.downsample is None else self.downsample(x)))

    return Block


def torch_mirror(torch, in_channels, widths, blocks):
    """The same network in PyTorch, with our parameter names (so state dicts load). Also the
    oracle of tests/test_resnet.py, so the benchmark's peer is the network the tests check."""
    nn = torch.nn
    Block = torch_block(torch)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(widths[0])
            cin = widths[0]
            for i, (w, n) in enumerate(zip(widths, blocks)):
                layers = [Block(cin if b == 0 else w, w, (1 if i == 0 else 2) if b == 0 else 1) for b in range(n)]
                setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
                cin = w

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            for i in range(len(widths)):
                x = getattr(self, f"layer{i + 1}")(x)
            return x.mean(dim=(2, 3))

    return Net()


def make_torch(torch, net: ResNet, head: Linear, device: str, sync: bool = True):
    """The same step in torch, on copies of our weights (``sync`` as in :func:`make_ours`)."""
    model = torch_mirror(torch, net.in_channels, net.widths, net.blocks)
    model.load_state_dict({k: torch.from_numpy(to_numpy(v)) for k, v in net.state_dict().items()})
    fc = torch.nn.Linear(head.in_features, head.out_features)
    fc.load_state_dict({k: torch.from_numpy(to_numpy(v)) for k, v in head.state_dict().items()})
    model, fc = model.to(device), fc.to(device)
    params = list(model.parameters()) + list(fc.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(fc(model(x)), y)
        loss.backward()
        opt.step()
        return loss.item() if sync else loss  # the same one sync per step as ours

    return step


# -- profiling ---------------------------------------------------------------------------

PROFILED = {
    "im2col (in conv forward)": "im2col",
    "conv forward (GEMM + rest)": "conv2d_forward",
    "col2im (in conv backward)": "col2im",
    "conv backward (2 GEMMs + rest)": "conv2d_backward",
    "batchnorm forward": "batchnorm_forward",
    "batchnorm backward": "batchnorm_backward",
    "relu forward": "relu_forward",
    "relu backward": "relu_backward",
}


def profile_ours(step, x, y, repeats: int, xp=np) -> dict:
    """Seconds per step by operation type (timers wrapped around the functional pairs);
    GEMM time is the conv total minus its im2col/col2im part. On a GPU each timed call is
    bracketed by device synchronisations, which costs some overlap: read it as shares."""
    totals = collections.defaultdict(float)
    saved = {}
    for label, name in PROFILED.items():
        fn = getattr(F, name)
        saved[name] = fn

        def timed(*args, _fn=fn, _label=label, **kwargs):
            synchronize(xp)
            t0 = time.perf_counter()
            out = _fn(*args, **kwargs)
            synchronize(xp)
            totals[_label] += time.perf_counter() - t0
            return out

        setattr(F, name, timed)
    try:
        t0 = time.perf_counter()
        for _ in range(repeats):
            step(x, y)
        wall = (time.perf_counter() - t0) / repeats
    finally:
        for name, fn in saved.items():
            setattr(F, name, fn)
    per_step = {k: v / repeats for k, v in totals.items()}
    per_step["conv forward (GEMM + rest)"] -= per_step["im2col (in conv forward)"]
    per_step["conv backward (2 GEMMs + rest)"] -= per_step["col2im (in conv backward)"]
    per_step["everything else (loss, head, optimiser, adds, pooling)"] = wall - sum(per_step.values())
    return {"step_s": round(wall, 4), "per_op_s": {k: round(v, 4) for k, v in per_step.items()},
            "per_op_fraction": {k: round(v / wall, 3) for k, v in per_step.items()}}  # fmt: skip


# -- the run -----------------------------------------------------------------------------

CASES = {
    "resnet_tiny": (lambda **kw: resnet_tiny(1, rng=0, **kw), 64, (1, 8, 8)),
    "resnet18": (lambda **kw: resnet18(3, rng=0, **kw), 512, (3, 32, 32)),
    # resnet18's layers at 1/8 width, on 16x16 images: the host-time case of bench_host.py
    "resnet18_narrow": (lambda **kw: ResNet(3, (8, 16, 32, 64), (2, 2, 2, 2), rng=0, **kw), 64, (3, 16, 16)),
}


def build_case(name: str, xp):
    make_net, feature_dim, shape = CASES[name]
    return make_net(xp=xp), Linear(feature_dim, 10, rng=1, xp=xp), shape


def case_inputs(shape, batch):
    rng = np.random.default_rng(0)
    return rng.normal(size=(batch,) + shape).astype(np.float32), rng.integers(0, 10, size=batch)


def time_steps(step, inputs, repeats: int) -> list[float]:
    """Seconds of ``repeats`` steps, after one warm-up step (allocations, lazy set-up).
    Each step ends with a host sync (its loss), so GPU timings are complete too."""
    step(*inputs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(*inputs)
        times.append(time.perf_counter() - t0)
    return times


def torch_in_subprocess(case: str, batch: int, repeats: int, threads: int, device: str, weights: Path,
                        tf32: bool = False) -> dict:
    """Time PyTorch's step in a fresh process (see the module notes for why)."""
    cmd = [sys.executable, __file__, "--torch-peer", case, "--batch", str(batch), "--repeats", str(repeats),
           "--threads", str(threads), "--device", device, "--weights", str(weights)]  # fmt: skip
    if tf32:
        cmd.append("--tf32")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"torch peer failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def torch_tf32(torch, enabled: bool) -> None:
    """TF32 in PyTorch as in ours: for convolutions (cuDNN, on by PyTorch's default) and
    for matrix products alike."""
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled


def precision_label(tf32: bool) -> str:
    """How both sides of a comparison multiply float32, for the JSON and the report."""
    return "TF32 allowed in both" if tf32 else "true float32 in both (TF32 off)"


def torch_peer(case: str, batch: int, repeats: int, threads: int, device: str, weights: str,
               tf32: bool = False) -> None:
    """Entry point of the subprocess: build the mirror, load our weights, time, print JSON.
    TF32 as ours (``tf32``): PyTorch's default would let its convolutions use it regardless."""
    import torch

    torch.set_num_threads(threads)
    torch_tf32(torch, tf32)
    net, head, shape = build_case(case, np)
    state = np.load(weights)
    net.load_state_dict({k[4:]: state[k] for k in state.files if k.startswith("net.")})
    head.load_state_dict({k[5:]: state[k] for k in state.files if k.startswith("head.")})
    x, y = case_inputs(shape, batch)
    step = make_torch(torch, net, head, device)
    inputs = (torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
    first_loss = step(*inputs)
    times = time_steps(step, inputs, repeats)
    print(json.dumps({"times": times, "first_loss": first_loss, "torch_version": torch.__version__}))


def run_case(name, xp, batch, repeats, threads, use_torch, profile, peak_n, tf32=False):
    net, head, shape = build_case(name, xp)
    x_host, y_host = case_inputs(shape, batch)
    x, y = asarray(x_host, xp), asarray(y_host, xp)
    flops = 3.0 * count_flops(net, head, x)
    device = "cuda" if xp.__name__.startswith("cupy") else "cpu"
    times = {"ours": [], "torch": []}
    first_loss = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.npz"
        state = {f"net.{k}": to_numpy(v) for k, v in net.state_dict().items()}
        state.update({f"head.{k}": to_numpy(v) for k, v in head.state_dict().items()})
        np.savez(weights, **state)
        ours = make_ours(net, head)
        first_loss["ours"] = ours(x, y)
        blocks = 3
        paired = []  # (median step of a block, matmul peak measured just before it)
        for _ in range(blocks):  # alternating blocks
            block_peak = matmul_peak(xp, peak_n, 3)
            block = time_steps(ours, (x, y), -(-repeats // blocks))
            paired.append((statistics.median(block), block_peak))
            times["ours"] += block
            if use_torch:
                peer = torch_in_subprocess(name, batch, -(-repeats // blocks), threads, device, weights, tf32)
                times["torch"] += peer["times"]
                first_loss["torch"] = peer["first_loss"]
    ours_s = statistics.median(times["ours"])
    ours_best = min(times["ours"])
    result = {
        "batch": batch,
        "input": list(shape),
        "train_gflop_per_step": round(flops / 1e9, 3),
        "ours_step_s": round(ours_s, 6),
        "ours_step_s_all": [round(t, 6) for t in times["ours"]],
        "ours_gflops": round(flops / ours_s / 1e9, 1),
        "ours_best_step_s": round(ours_best, 6),
        "ours_best_gflops": round(flops / ours_best / 1e9, 1),
        # the machine's speed drifts: each block against the peak measured just before it
        "ours_fraction_of_matmul_peak_paired": round(
            statistics.median(flops / t / 1e9 / pk for t, pk in paired), 3
        ),
        "matmul_peak_per_block_gflops": [round(pk, 1) for _, pk in paired],
        "first_step_loss": first_loss,
    }
    if use_torch:
        torch_s = statistics.median(times["torch"])
        result.update(
            torch_step_s=round(torch_s, 6),
            torch_step_s_all=[round(t, 6) for t in times["torch"]],
            torch_gflops=round(flops / torch_s / 1e9, 1),
            ratio_ours_over_torch=round(ours_s / torch_s, 3),
            torch_best_step_s=round(min(times["torch"]), 6),
            ratio_best_ours_over_best_torch=round(ours_best / min(times["torch"]), 3),
        )
    if profile:
        result["profile_ours"] = profile_ours(make_ours(net, head), x, y, max(1, repeats // 2), xp)
    print(f"{name}: " + json.dumps({k: v for k, v in result.items() if not k.endswith("_all")}), flush=True)
    return result


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches and fewer repeats")
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per side (median reported)")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-operation profile")
    parser.add_argument("--blas-threads", type=int, default=None,
                        help="limit NumPy's BLAS (threadpoolctl) and PyTorch to this many threads")  # fmt: skip
    parser.add_argument("--tf32", action="store_true",
                        help="cupy: allow TF32 tensor cores in both libraries (default: true float32 in both)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_resnet[_cupy].json)")
    parser.add_argument("--torch-peer", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--device", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torch_peer:
        torch_peer(args.torch_peer, args.batch, args.repeats, args.threads, args.device, args.weights, args.tf32)
        return None
    xp = get_backend(args.backend)
    gpu = args.backend == "cupy"
    if args.tf32 and not gpu:
        parser.error("--tf32 applies to --backend cupy only (CPUs have no TF32)")
    set_tf32(xp, args.tf32)
    repeats = args.repeats or (4 if args.quick else 6)
    if args.blas_threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.blas_threads, user_api="blas")
    threads = blas_threads()
    load_before = os.getloadavg()
    use_torch = importlib.util.find_spec("torch") is not None
    peak_n = (8192 if gpu else 2048) if args.quick else (16384 if gpu else 4096)
    peak_before = matmul_peak(xp, peak_n, 5)
    print(f"matmul peak: {peak_before:.1f} GFLOP/s float32 on {args.backend}, {threads} BLAS threads", flush=True)
    tiny_batch, r18_batch = (64, 32) if args.quick else (256, 128)
    profile = not args.no_profile
    cases = {
        "resnet_tiny": run_case("resnet_tiny", xp, tiny_batch, repeats * 3, threads, use_torch, profile, peak_n, args.tf32),
        "resnet18": run_case("resnet18", xp, r18_batch, repeats, threads, use_torch, profile, peak_n, args.tf32),
    }
    peak_after = matmul_peak(xp, peak_n, 5)
    peak = max(peak_before, peak_after)  # the machine's speed drifts: the higher is the peak
    for case in cases.values():
        for side in ("ours", "ours_best", "torch"):
            if f"{side}_gflops" in case:
                case[f"{side}_fraction_of_matmul_peak"] = round(case[f"{side}_gflops"] / peak, 3)
    result = {
        "benchmark": "bench_resnet",
        "what": "one SGD training step (forward, linear head + cross-entropy, backward, optimiser), float32",
        "backend": args.backend,
        "fused_kernels": fused.applies(xp, xp.float32),  # CuPy: the kernels of swav_ref.fused
        "tf32": args.tf32,
        "precision": precision_label(args.tf32),
        "quick": args.quick,
        "threads": threads,
        "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "matmul_peak_gflops": round(peak, 1),
        "matmul_peak_gflops_before_after": [round(peak_before, 1), round(peak_after, 1)],
        "numpy_version": np.__version__,
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "targets": {"resnet18_ratio_max": 1.3, "resnet18_fraction_of_peak_min": 0.6},
        "cases": cases,
    }
    out = Path(args.out) if args.out else RESULTS / f"bench_resnet{'_cupy' if gpu else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
