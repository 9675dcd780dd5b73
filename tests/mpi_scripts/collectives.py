"""Run under ``mpiexec -n 2``: every collective of MPICommunicator, checked on each rank.

Usage: ``mpiexec -n 2 python collectives.py OUT_DIR``. Each rank asserts its own results and
writes them to ``OUT_DIR/rank<r>.json`` (files, because the ranks' stdout lines can
interleave), which tests/test_distributed.py checks again against values it computes itself.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout too

import numpy as np  # noqa: E402

from swav_ref.backend import to_numpy  # noqa: E402
from swav_ref.distributed import (  # noqa: E402
    MPICommunicator,
    get_communicator,
    install_abort_on_exception,
)

comm = get_communicator()
install_abort_on_exception(comm)  # a failed assert below ends the job instead of hanging it
assert isinstance(comm, MPICommunicator), f"expected MPI, got {type(comm).__name__}"
rank, size = comm.rank, comm.size


def local(q):
    """The array rank ``q`` contributes: different on every rank."""
    return np.arange(6, dtype=np.float64).reshape(2, 3) * (q + 1) - 4.0 * q


x = local(rank)
before = x.copy()
total = comm.allreduce_sum(x)
mean = comm.allreduce_mean(x)
largest = comm.allreduce_max(x)
np.testing.assert_array_equal(x, before)  # inputs are not modified
np.testing.assert_allclose(total, sum(local(q) for q in range(size)))
np.testing.assert_allclose(mean, sum(local(q) for q in range(size)) / size)
np.testing.assert_allclose(largest, np.max([local(q) for q in range(size)], axis=0))
assert total.dtype == np.float64 and isinstance(total, np.ndarray)

# float32 and 0-d arrays keep their dtype and shape; Python numbers reduce too.
f32 = comm.allreduce_sum(np.full((3,), rank + 1, dtype=np.float32))
assert f32.dtype == np.float32, f32.dtype
scalar = comm.allreduce_sum(np.asarray(float(rank)))
assert scalar.shape == (), scalar.shape
py_sum = comm.allreduce_sum(rank + 1)

# array_api_strict arrays are staged through host memory and come back as strict arrays.
strict_ok = None
try:
    import array_api_strict as xps
except ImportError:
    pass
else:
    s = comm.allreduce_sum(xps.asarray(x))
    assert type(s).__module__.startswith("array_api_strict"), type(s)
    np.testing.assert_allclose(to_numpy(s), to_numpy(total))
    b = comm.broadcast(xps.asarray(x), root=1)
    np.testing.assert_allclose(to_numpy(b), local(1))
    strict_ok = True

# CuPy arrays (only where CuPy sees a GPU): CUDA-aware MPI or host staging, CuPy back out.
cupy_ok = None
try:
    from swav_ref.backend import get_backend

    cp = get_backend("cupy")
except Exception:
    pass
else:
    c = comm.allreduce_sum(cp.asarray(x))
    assert type(c).__module__.startswith("cupy"), type(c)
    np.testing.assert_allclose(cp.asnumpy(c), total)
    m = comm.allreduce_max(cp.asarray(x, dtype=cp.float32))
    assert m.dtype == cp.float32
    np.testing.assert_allclose(cp.asnumpy(m), largest)
    b = comm.broadcast(cp.asarray(x), root=1)
    np.testing.assert_allclose(cp.asnumpy(b), local(1))
    cupy_ok = True

# broadcast from each root; non-root inputs are left alone.
received = {}
for root in range(size):
    y = local(rank)
    got = comm.broadcast(y, root=root)
    np.testing.assert_array_equal(y, local(rank))
    np.testing.assert_allclose(got, local(root))
    received[root] = got.tolist()

config = comm.broadcast_object({"seed": 1234, "from": rank} if comm.is_root else None)
assert config == {"seed": 1234, "from": 0}, config

# a shape mismatch is refused on every rank, not a hang or a corrupted buffer.
try:
    comm.broadcast(np.zeros(3 + rank))
except ValueError as exc:
    mismatch = str(exc)
else:
    mismatch = None
assert mismatch is not None

comm.barrier()
results = {
    "rank": rank,
    "size": size,
    "local": [comm.local_rank, comm.local_size],
    "describe": comm.describe(),
    "sum": total.tolist(),
    "mean": mean.tolist(),
    "max": largest.tolist(),
    "float32": [str(f32.dtype), f32.tolist()],
    "scalar_shape": list(scalar.shape),
    "py_sum": py_sum,
    "broadcast": received,
    "object": config,
    "strict": strict_ok,
    "cupy": cupy_ok,
    "mismatch": mismatch,
}
Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(results))
print(f"rank {rank}: {comm.describe()}", flush=True)
