"""GPU benchmarks: ours on CuPy against PyTorch on the same GPU, in the same run.

1. SwAV's Sinkhorn codes, B=4096, K=3000 (ours vs the official loop in torch);
2. the swapped loss, forward + backward (ours vs torch autograd), B=4096, K=3000, 2+6 crops;
3. a training step of resnet18 (CIFAR layout, 3x32x32, batch 256, float32): forward, linear
   head, cross-entropy, backward, SGD (ours vs the same network and weights in torch);
4. images per second of a full SwAV training step (2x32 + 6x16 crops, augmentation on the
   GPU, resnet18, LARS), ours alone (no torch peer for the whole recipe).

Run on a machine with an NVIDIA GPU:  python benchmarks/bench_gpu.py --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_resnet import torch_mirror  # noqa: E402  (the same torch network as the CPU benchmark)

from swav_ref.backend import Random, get_backend, to_numpy  # noqa: E402


def timed(fn, sync, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs, synchronised before and after."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_sinkhorn_and_loss(cp, torch, repeats):
    from swav_ref.swav import sinkhorn_codes, swav_loss

    b, k, crops = 4096, 3000, 8
    rng = np.random.default_rng(0)
    z = rng.normal(size=(crops * b, 32)).astype(np.float32)
    c = rng.normal(size=(k, 32)).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    scores_np = z @ c.T
    scores = cp.asarray(scores_np)
    tscores = torch.tensor(scores_np, device="cuda")

    def torch_codes(out, eps=0.05, iters=3):
        q = torch.exp(out / eps).t()
        q /= torch.sum(q)
        kk, bb = q.shape
        for _ in range(iters):
            q /= torch.sum(q, dim=1, keepdim=True)
            q /= kk
            q /= torch.sum(q, dim=0, keepdim=True)
            q /= bb
        q *= bb
        return q.t()

    sync_cp = cp.cuda.get_current_stream().synchronize
    sync_t = torch.cuda.synchronize
    out = {}
    ours = timed(lambda: sinkhorn_codes(scores[:b]), sync_cp, repeats)
    peer = timed(lambda: torch_codes(tscores[:b]), sync_t, repeats)
    out["sinkhorn_B4096_K3000"] = {"ours_ms": 1e3 * ours, "torch_ms": 1e3 * peer, "ratio": ours / peer}

    def torch_loss():
        s = tscores.clone().requires_grad_(True)
        loss = 0.0
        for i in (0, 1):
            with torch.no_grad():
                q = torch_codes(s[b * i : b * (i + 1)].detach())
            sub = 0.0
            for v in range(crops):
                if v != i:
                    sub = sub - torch.mean(torch.sum(q * torch.log_softmax(s[b * v : b * (v + 1)] / 0.1, dim=1), dim=1))
            loss = loss + sub / (crops - 1)
        (loss / 2).backward()
        return s.grad

    ours = timed(lambda: swav_loss(scores, b), sync_cp, repeats)
    peer = timed(torch_loss, sync_t, repeats)
    out["swav_loss_fwd_bwd_B4096_K3000_2+6crops"] = {"ours_ms": 1e3 * ours, "torch_ms": 1e3 * peer, "ratio": ours / peer}
    return out


def bench_resnet18_step(cp, torch, repeats, batch=256):
    from swav_ref.nn import SGD, Linear
    from swav_ref.nn import functional as F
    from swav_ref.nn.resnet import resnet18

    net = resnet18(3, xp=cp, dtype="float32", rng=Random(0))
    head = Linear(net.out_dim, 10, xp=cp, dtype="float32", rng=Random(1))
    rng = np.random.default_rng(0)
    x_np = rng.normal(size=(batch, 3, 32, 32)).astype(np.float32)
    y_np = rng.integers(0, 10, size=batch)
    x, y = cp.asarray(x_np), cp.asarray(y_np)
    opt_net, opt_head = SGD(net, 0.9, 1e-4), SGD(head, 0.9, 1e-4)

    def ours():
        loss, cache = F.softmax_cross_entropy_forward(head.forward(net.forward(x)), y)
        net.backward(head.backward(F.softmax_cross_entropy_backward(1.0, cache)))
        opt_net.step(0.01), opt_head.step(0.01)
        net.zero_grad(), head.zero_grad()
        return loss

    model = torch_mirror(torch, 3, net.widths, net.blocks)
    model.load_state_dict({k: torch.from_numpy(to_numpy(v)) for k, v in net.state_dict().items()})
    model = model.cuda()
    fc = torch.nn.Linear(net.out_dim, 10).cuda()
    opt = torch.optim.SGD(list(model.parameters()) + list(fc.parameters()), lr=0.01, momentum=0.9, weight_decay=1e-4)
    tx, ty = torch.tensor(x_np, device="cuda"), torch.tensor(y_np, device="cuda")

    def peer():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(fc(model(tx)), ty)
        loss.backward()
        opt.step()
        return loss

    t_ours = timed(ours, cp.cuda.get_current_stream().synchronize, repeats)
    t_peer = timed(peer, torch.cuda.synchronize, repeats)
    return {"resnet18_cifar_step_b256": {"ours_ms": 1e3 * t_ours, "torch_ms": 1e3 * t_peer, "ratio": t_ours / t_peer,
                                         "ours_images_per_s": batch / t_ours, "torch_images_per_s": batch / t_peer}}


def bench_swav_step(repeats, batch=256):
    from swav_ref.data.datasets import ImageDataset
    from swav_ref.train import TrainConfig, Trainer

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(batch * 2, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=batch * 2)
    ds = ImageDataset(images, labels, tuple(str(i) for i in range(10)), "synthetic-cifar")
    cfg = TrainConfig(backend="cupy", arch="resnet18", batch_size=batch, n_crops=(2, 6), crop_sizes=(32, 16),
                      min_scale=(0.14, 0.05), max_scale=(1.0, 0.14), n_prototypes=(3000,), hidden_dim=2048,
                      feat_dim=128, epochs=1000, out_dir="/tmp/swav_gpu_bench", progress=False)
    trainer = Trainer(cfg, train_set=ds, test_set=ds)
    cp = trainer.xp
    idx = np.arange(batch)
    step = lambda: trainer.train_step(trainer.make_crops(idx), idx)  # noqa: E731
    t = timed(step, cp.cuda.get_current_stream().synchronize, repeats)
    return {"swav_step_resnet18_2x32+6x16_b256": {"ours_ms": 1e3 * t, "images_per_s": batch / t}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_gpu.json")
    args = p.parse_args(argv)
    cp = get_backend("cupy")
    import torch

    dev = cp.cuda.runtime.getDeviceProperties(0)
    result = {"benchmark": "bench_gpu", "date": time.strftime("%Y-%m-%d"), "machine": dev["name"].decode(),
              "host": platform.node(), "cupy": cp.__version__, "torch": torch.__version__,
              "command": "python benchmarks/bench_gpu.py", "cases": {}}
    for name, fn in [("sinkhorn_and_loss", lambda: bench_sinkhorn_and_loss(cp, torch, args.repeats)),
                     ("resnet18", lambda: bench_resnet18_step(cp, torch, args.repeats)),
                     ("swav_step", lambda: bench_swav_step(args.repeats))]:
        try:
            result["cases"].update(fn())
        except Exception as exc:  # record and go on: one failing case must not hide the others
            result["cases"][name] = {"error": f"{type(exc).__name__}: {exc}"}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result["cases"], indent=2), flush=True)
    return result


if __name__ == "__main__":
    main()
