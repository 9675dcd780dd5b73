"""Run under ``mpiexec -n 2``: two workers with batch B each must take exactly the steps of
one worker with batch 2B (sync BatchNorm, distributed Sinkhorn, averaged gradients).

Each rank also runs the single-process reference (it is deterministic) and compares, step
by step: the loss, its share of the codes, and every parameter after the update. Rank 0
writes the largest differences as JSON to the path given as the first argument.
"""

import json
import sys
import tempfile

import numpy as np

from swav_ref.backend import Random, to_numpy
from swav_ref.data.datasets import load_digits_dataset, split_dataset
from swav_ref.distributed import SingleProcessCommunicator, get_communicator, install_abort_on_exception
from swav_ref.train import TrainConfig, Trainer

comm = get_communicator()
install_abort_on_exception(comm)
assert comm.size == 2, f"run me with mpiexec -n 2 (size is {comm.size})"
rank, B = comm.rank, 16
train, test = split_dataset(load_digits_dataset().subset(np.arange(200)), test_fraction=0.2, seed=0)
common = dict(dtype="float64", n_crops=(2, 2), crop_sizes=(8, 6), min_scale=(0.5, 0.3), max_scale=(1.0, 0.6),
              hidden_dim=32, feat_dim=16, n_prototypes=(10,), epochs=2, warmup_epochs=1, base_lr=0.5,
              freeze_prototypes_niters=2, sync_bn=True, progress=False, log_every=1)
dist = Trainer(TrainConfig(batch_size=B, out_dir=tempfile.mkdtemp(), **common), comm=comm, train_set=train, test_set=test)
ref = Trainer(TrainConfig(batch_size=2 * B, out_dir=tempfile.mkdtemp(), **common), comm=SingleProcessCommunicator(),
              train_set=train, test_set=test)
assert dist.steps_per_epoch == ref.steps_per_epoch

worst = {"loss": 0.0, "codes": 0.0, "params": 0.0, "steps": 0}
rows = slice(rank * B, (rank + 1) * B)
for step in range(6):
    epoch, s = divmod(step, ref.steps_per_epoch)
    indices = ref.batch_indices(epoch, s)
    np.testing.assert_array_equal(dist.batch_indices(epoch, s), indices[rows])
    crops = ref.multicrop(ref.xp.asarray(train.images[indices]), Random(1000 + step))  # one set of crops
    ref_loss, ref_codes = ref.train_step(crops, indices)
    loss, codes = dist.train_step([c[rows] for c in crops], indices[rows])
    mean_loss = float(comm.allreduce_sum(np.reshape(np.asarray(loss), (1,)))[0]) / comm.size
    worst["loss"] = max(worst["loss"], abs(mean_loss - float(ref_loss)))
    for a, b in zip(codes, ref_codes):
        worst["codes"] = max(worst["codes"], float(np.max(np.abs(to_numpy(a) - to_numpy(b)[rows]))))
    ref_state = ref.model.state_dict()
    for name, value in dist.model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        worst["params"] = max(worst["params"], float(np.max(np.abs(to_numpy(value) - to_numpy(ref_state[name])))))
    worst["steps"] = step + 1

if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(worst, f)
print(f"rank {rank}: {worst}", flush=True)
