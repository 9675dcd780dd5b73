"""The communicator: data-parallel training over MPI processes, or a no-op for one process.

SwAV needs only a handful of collective operations across workers: the mean of the
gradients (one all-reduce of all of them flattened into one vector); inside Sinkhorn, the
global batch size, the total mass and the prototype marginals (sums) and each prototype's
largest score (a maximum, for the shift that keeps ``exp`` finite); the batch statistics
of synchronised BatchNorm and the k-means sums of DeepCluster-v2 (sums); a broadcast of the
initial weights and of k-means' seeds; a barrier around checkpoints; and a way to stop
every process when one fails. This module gives them one small interface with two
implementations::

    comm = get_communicator()          # MPI under mpiexec/srun, else a single process
    print(comm.describe())
    install_abort_on_exception(comm)   # one rank crashing ends the job instead of hanging
    flat_grads = comm.allreduce_mean(flat_grads)   # one array in, the same array type out

:class:`SingleProcessCommunicator`
    rank 0 of 1; every collective returns its input unchanged (no copies).
:class:`MPICommunicator`
    wraps ``mpi4py.MPI.COMM_WORLD`` (the ``mpi`` extra: ``pip install "swav_ref[mpi]"``).
    NumPy arrays go to MPI as buffers; CuPy arrays go directly when the MPI library is
    CUDA-aware and are staged through host memory otherwise; other Array-API arrays are
    staged through host memory. The result always has the input's namespace and dtype.

mpi4py is imported only when the environment says the program was started by an MPI
launcher, because importing ``mpi4py.MPI`` initialises MPI.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Any, Mapping

import numpy as np

from swav_ref.backend import array_namespace, asarray, is_cupy, to_numpy

__all__ = [
    "MPIUnavailableError",
    "MPICommunicator",
    "SingleProcessCommunicator",
    "detect_mpi_launch",
    "get_communicator",
    "install_abort_on_exception",
]

_MPI_EXTRA_HINT = ('install the mpi extra: pip install "swav_ref[mpi]" (mpi4py and mpich; on Windows mpi4py, '
                   "with Microsoft's MS-MPI installed from Microsoft)")

#: Environment variables that MPI launchers set in every process they start, as
#: (rank variable, size variable). MPICH/Hydra and Intel MPI set PMI_*, Open MPI sets
#: OMPI_COMM_WORLD_*, PMIx-based launchers set PMIX_RANK (and no size); Intel MPI's
#: MPI_LOCALRANKID / MPI_LOCALNRANKS are the rank within a node, used only where none of the
#: others says more (enough to tell that a launcher started the process). Slurm's srun
#: (SLURM_PROCID, SLURM_NTASKS) is read separately, see :func:`detect_mpi_launch`.
_LAUNCHER_VARIABLES = (
    ("PMI_RANK", "PMI_SIZE"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("PMIX_RANK", None),
    ("MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)


class MPIUnavailableError(RuntimeError):
    """Started by an MPI launcher with several processes, but mpi4py cannot be imported."""


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def detect_mpi_launch(
    environ: Mapping[str, str] | None = None,
) -> tuple[bool, int | None, int | None]:
    """Whether this process was started by an MPI launcher, read from the environment.

    Returns
    -------
    (launched, rank, size)
        ``rank`` and ``size`` as the launcher announced them, ``None`` where it did not
        (PMIx announces no size). Slurm counts only when ``SLURM_NTASKS > 1``: a plain
        ``python`` inside an allocation also sees ``SLURM_PROCID=0``.
    """
    env = os.environ if environ is None else environ
    launched, rank, size = False, None, None
    for rank_var, size_var in _LAUNCHER_VARIABLES:
        if rank_var in env or (size_var is not None and size_var in env):
            launched = True
            rank = rank if rank is not None else _int_or_none(env.get(rank_var))
            if size_var is not None:
                size = size if size is not None else _int_or_none(env.get(size_var))
    slurm_tasks = _int_or_none(env.get("SLURM_NTASKS"))
    if "SLURM_PROCID" in env and slurm_tasks is not None and slurm_tasks > 1:
        launched = True
        rank = rank if rank is not None else _int_or_none(env.get("SLURM_PROCID"))
        size = size if size is not None else slurm_tasks
    return launched, rank, size


def get_communicator(environ: Mapping[str, str] | None = None):
    """The communicator for this process.

    An :class:`MPICommunicator` over ``MPI.COMM_WORLD`` when the environment shows an MPI
    launcher (see :func:`detect_mpi_launch`) and mpi4py imports; a
    :class:`SingleProcessCommunicator` otherwise.

    Raises
    ------
    MPIUnavailableError
        launched with more than one process (or as a rank other than 0) but mpi4py is not
        installed: each process would otherwise train alone, silently.
    """
    launched, rank, size = detect_mpi_launch(environ)
    if not launched:
        return SingleProcessCommunicator()
    try:
        from mpi4py import MPI  # initialises MPI
    except ImportError as exc:
        several = (size is not None and size > 1) or (rank is not None and rank > 0)
        if several:
            raise MPIUnavailableError(
                f"started by an MPI launcher as rank {rank} of "
                f"{size if size is not None else 'an unknown number of processes'}, "
                f"but mpi4py cannot be imported ({exc}); {_MPI_EXTRA_HINT}"
            ) from exc
        return SingleProcessCommunicator()
    return MPICommunicator(MPI.COMM_WORLD)


def _check_floating(x: Any, what: str) -> None:
    xp = array_namespace(x)
    if not xp.isdtype(x.dtype, "real floating"):
        raise ValueError(f"{what} needs a real floating-point array, got dtype {x.dtype}")


class SingleProcessCommunicator:
    """One process, no MPI: rank 0 of 1. Collectives return their input itself."""

    rank = 0
    size = 1
    local_rank = 0  # this process's place among the processes on its machine
    local_size = 1
    is_root = True

    def describe(self, gpu: bool = True) -> str:
        """One line for logs: ``"single process (no MPI)"`` (``gpu`` as the MPI one's)."""
        return "single process (no MPI)"

    def allreduce_sum(self, x: Any) -> Any:
        return x

    def allreduce_mean(self, x: Any) -> Any:
        if not isinstance(x, (int, float)):
            _check_floating(x, "allreduce_mean")
        return x

    def allreduce_max(self, x: Any) -> Any:
        return x

    def broadcast(self, x: Any, root: int = 0) -> Any:
        if root != 0:
            raise ValueError(f"root {root} out of range for 1 process")
        return x

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        if root != 0:
            raise ValueError(f"root {root} out of range for 1 process")
        return obj

    def barrier(self) -> None:
        pass

    def abort(self, message: str, code: int = 1) -> None:
        """Print ``message`` to stderr and exit with ``code``."""
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(code)


def _detect_cuda_aware(MPI: Any, environ: Mapping[str, str]) -> tuple[bool, str]:
    """Whether the MPI library can read CuPy (device) buffers, and how we know."""
    query = getattr(MPI, "Query_cuda_support", None)  # mpi4py >= 4 with MPIX support
    if query is not None:
        try:
            return bool(query()), "MPI.Query_cuda_support()"
        except Exception:  # the library lacks the extension: fall back to the environment
            pass
    if environ.get("MPICH_GPU_SUPPORT_ENABLED") == "1":
        return True, "MPICH_GPU_SUPPORT_ENABLED=1"
    if environ.get("OMPI_MCA_opal_cuda_support", "").lower() in ("1", "true"):
        return True, "OMPI_MCA_opal_cuda_support"
    return False, "no CUDA support reported by the MPI library"


def _c_contiguous(x: Any) -> Any:
    """``x`` itself when C-contiguous, else a C-ordered copy (NumPy or CuPy; keeps 0-d)."""
    return x if x.flags.c_contiguous else x.copy(order="C")


class MPICommunicator:
    """Collectives over an mpi4py communicator (default ``MPI.COMM_WORLD``).

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        the communicator; default ``MPI.COMM_WORLD``.
    cuda_aware : bool or None
        pass CuPy arrays to MPI directly (``True``) or stage them through host memory
        (``False``); ``None`` (default) detects it, see :meth:`describe`.

    Attributes
    ----------
    rank : int
        this process's place among all the processes, 0 to ``size - 1``.
    size : int
        the number of processes.
    local_rank : int
        this process's place among the processes on its machine (the ranks that share its
        memory and its GPUs): the local rank picks the GPU.
    local_size : int
        the number of processes on this machine.
    cuda_aware : bool
        whether CuPy arrays go to MPI directly.

    Notes
    -----
    Every method is collective: all ranks must call it, in the same order, with arrays of
    the same shape and dtype. Array collectives return an array of the input's namespace
    and dtype (a new one, except :meth:`broadcast` on the root, which returns its input);
    the input is never modified.
    """

    def __init__(self, comm: Any = None, *, cuda_aware: bool | None = None):
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        # The ranks that share this machine (and its GPUs): the local rank picks the GPU.
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        if cuda_aware is None:
            self.cuda_aware, self._cuda_reason = _detect_cuda_aware(MPI, os.environ)
        else:
            self.cuda_aware, self._cuda_reason = bool(cuda_aware), "set by the caller"

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def describe(self, gpu: bool = True) -> str:
        """One line for logs: the processes, this rank, the MPI library and, when ``gpu``
        (a run on CuPy), how CuPy arrays reach it (directly, or staged through host memory,
        and why)."""
        # Some libraries pad the version string with NUL characters or spaces ("MPICH Version:
        # 5.0.2" with six); keep its first line, its words one space apart.
        library = self._MPI.Get_library_version().replace("\x00", "").strip()
        library = " ".join(library.splitlines()[0].split())
        how_cupy_arrays_go = (
            "CuPy arrays passed to CUDA-aware MPI directly"
            if self.cuda_aware
            else "CuPy arrays staged through host memory"
        )
        line = (f"MPI: {self.size} processes, this is rank {self.rank}, local rank {self.local_rank} "
                f"of {self.local_size} on this machine ({library})")
        return f"{line}; {how_cupy_arrays_go} ({self._cuda_reason})" if gpu else line

    # -- array collectives --------------------------------------------------------------
    def _mpi_buffers(self, x: Any) -> tuple[Any, Any, Any]:
        """``(namespace, send buffer, to_result)``: a contiguous array MPI can read, and a
        function that turns a buffer of the same kind back into the input's namespace."""
        xp = array_namespace(x)
        if xp is np or (is_cupy(xp) and self.cuda_aware):
            send = _c_contiguous(x)
            if is_cupy(xp):
                # MPI knows nothing of CuPy's stream: finish pending kernels before it reads.
                xp.cuda.get_current_stream().synchronize()
            return xp, send, lambda buf: buf
        # A fresh, writable host copy (CuPy's .get() already made one; a DLPack view of an
        # array_api_strict array may be read-only and must not be written by MPI).
        host = np.array(to_numpy(x), order="C", copy=None if is_cupy(xp) else True)
        return xp, host, lambda buf: asarray(buf, xp)

    def _allreduce(self, x: Any, op: Any) -> Any:
        if isinstance(x, (int, float)):
            return self.comm.allreduce(x, op=op)
        _, send, to_result = self._mpi_buffers(x)
        out = array_namespace(send).empty_like(send)  # NumPy, or CuPy when CUDA-aware
        self.comm.Allreduce(send, out, op=op)
        return to_result(out)

    def allreduce_sum(self, x: Any) -> Any:
        r"""Elementwise :math:`\sum_r x^{(r)}` over ranks, returned on every rank."""
        return self._allreduce(x, self._MPI.SUM)

    def allreduce_mean(self, x: Any) -> Any:
        r"""Elementwise :math:`\frac{1}{R}\sum_r x^{(r)}` (floating-point arrays only)."""
        if not isinstance(x, (int, float)):
            _check_floating(x, "allreduce_mean")
        return self.allreduce_sum(x) / self.size

    def allreduce_max(self, x: Any) -> Any:
        r"""Elementwise :math:`\max_r x^{(r)}` over ranks."""
        return self._allreduce(x, self._MPI.MAX)

    def broadcast(self, x: Any, root: int = 0) -> Any:
        """``root``'s array on every rank; every rank passes an array of the same shape and
        dtype (its values are ignored off the root). A mismatch raises ``ValueError`` on
        every rank rather than corrupting memory or hanging."""
        self._check_root(root)
        _, buf, to_result = self._mpi_buffers(x)
        signature = (tuple(buf.shape), str(buf.dtype))
        root_signature = self.comm.bcast(signature, root=root)
        agreed = self.comm.allreduce(int(signature == root_signature), op=self._MPI.MIN)
        if not agreed:
            culprit = (
                f"rank {self.rank} holds {signature}" if signature != root_signature
                else "another rank holds a different (shape, dtype)"
            )
            raise ValueError(
                f"broadcast: {culprit}, root {root} holds {root_signature}; every rank must "
                "pass the same shape and dtype"
            )
        if self.rank != root:
            # Receive into a fresh array, so the caller's array (or a view) is left alone. Not
            # a copy: on CuPy a copy is a kernel queued on the stream, which MPI's write into
            # the buffer would race with; an allocation queues nothing.
            buf = array_namespace(buf).empty_like(buf)
        self.comm.Bcast(buf, root=root)
        return x if self.rank == root else to_result(buf)

    # -- everything else ----------------------------------------------------------------
    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        """``root``'s picklable Python object on every rank (configs, seeds, metadata)."""
        self._check_root(root)
        return self.comm.bcast(obj, root=root)

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, message: str, code: int = 1) -> None:
        """Print ``message`` with this rank's number and end every process of the job."""
        print(f"[rank {self.rank}/{self.size}] {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # The launcher forwards a rank's output on its own schedule, and the abort kills the
        # ranks at once: without a moment's grace the message was lost, once in a few runs.
        time.sleep(0.5)
        self.comm.Abort(code)
        # MPICH (the PyPI wheel) returns from MPI_Abort and leaves its launcher to end the
        # processes a moment later: this one must not go on meanwhile
        os._exit(code)

    def _check_root(self, root: int) -> None:
        if not 0 <= root < self.size:
            raise ValueError(f"root {root} out of range for {self.size} processes")


def install_abort_on_exception(comm: Any) -> None:
    """Make an uncaught exception on any rank end the whole MPI job.

    Without this, a rank that dies leaves the others waiting forever in their next
    collective. The hook prints the rank and the traceback to stderr, then calls
    ``comm.abort`` (``MPI_Abort``), so the launcher exits with an error. For a single
    process nothing is installed: Python's default behaviour already ends the program.
    ``KeyboardInterrupt`` also aborts, so Ctrl-C stops every rank.
    """
    if comm.size == 1 or getattr(sys.excepthook, "aborts_the_mpi_job", False):
        return  # one process, or installed already (by the CLI, or an earlier Trainer)
    previous = sys.excepthook

    def abort_on_exception(exc_type, exc, tb):
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        try:
            comm.abort(f"uncaught exception, aborting the job:\n{text}", code=1)
        except Exception:  # abort itself failed: at least show the error the usual way
            previous(exc_type, exc, tb)

    abort_on_exception.aborts_the_mpi_job = True
    sys.excepthook = abort_on_exception
