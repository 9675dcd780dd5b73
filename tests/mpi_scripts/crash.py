"""Run under ``mpiexec -n 2``: rank 1 raises while rank 0 waits in a barrier.

Without install_abort_on_exception, rank 0 would wait forever; with it, rank 1 prints its
traceback and calls MPI_Abort, and the launcher ends the whole job with an error.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout too

from swav_ref.distributed import get_communicator, install_abort_on_exception  # noqa: E402

comm = get_communicator()
install_abort_on_exception(comm)
if comm.rank == 1:
    raise RuntimeError("deliberate failure on rank 1")
comm.barrier()  # never returns: rank 1 does not arrive
time.sleep(60)
print("rank 0 passed the barrier; the abort did not happen", flush=True)
