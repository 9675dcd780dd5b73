"""Error paths that no other test reached: each guard is called once with the input it
exists to refuse, and the message must name the problem.

Where the guarded code would otherwise run on (a gradient of the wrong shape that
broadcasts, a list of gradients that ``zip`` truncates), the bad input is chosen so that a
missing guard gives a silently wrong result rather than some other error; the match on the
guard's own words keeps a later, unrelated exception from passing for it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from swav_ref import backend as B
from swav_ref.checkpoint import CheckpointError, save_checkpoint
from swav_ref.deepcluster import spherical_kmeans
from swav_ref.nn import functional as F
from swav_ref.swav import sinkhorn_codes, swapped_prediction_loss, swav_loss
from swav_ref.swav.head import SwAVHead
from swav_ref.train import load_trainer_checkpoint


def _zeros(xp, shape, dtype="float64"):
    return B.asarray(np.zeros(shape), xp, dtype)


def _normal(xp, rng, shape):
    return B.asarray(rng.normal(size=shape), xp, "float64")


# -- sinkhorn_codes ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 4), (3, 0)])
def test_sinkhorn_codes_refuses_an_empty_axis(backend, shape):
    """Zero samples or zero prototypes: without the guard the max over an empty axis
    fails with the array library's own words (or codes of shape (0, K) come back)."""
    with pytest.raises(ValueError, match=rf"sinkhorn_codes: scores has an empty axis, shape \({shape[0]}, {shape[1]}\)"):
        sinkhorn_codes(_zeros(backend, shape))


@pytest.mark.parametrize("dtype", ["int64", "bool"])
def test_sinkhorn_codes_refuses_scores_that_are_not_floating_point(backend, dtype):
    """Integer (or boolean) scores would be iterated in float32 and the codes cast back to
    the input's dtype: all zeros for integers (every code is below 1), all True for bool."""
    with pytest.raises(ValueError, match="sinkhorn_codes: scores must be a floating-point array, got"):
        sinkhorn_codes(_zeros(backend, (3, 2), dtype))


# -- swav_loss ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6,), (6, 5, 1)])
def test_swav_loss_refuses_scores_that_are_not_2d(backend, shape):
    """The loss's own 2-D check, naming the stacked layout. Without it, 3-D scores reach
    Sinkhorn, whose message ("(batch, prototypes)") does not say how the crops are stacked."""
    with pytest.raises(ValueError, match=r"scores must be 2-D \(n_crops \* batch_size, K\), got shape"):
        swav_loss(_zeros(backend, shape), 3)


def test_swapped_prediction_loss_refuses_codes_of_another_dtype_than_the_scores(backend):
    """float32 codes against float64 scores would silently promote (NumPy) or fail inside
    the arithmetic (array_api_strict); the loss's dtype must be the scores'."""
    scores = _zeros(backend, (6, 5))
    codes = [_zeros(backend, (3, 5), "float32"), _zeros(backend, (3, 5))]
    with pytest.raises(ValueError, match=r"codes of crop 0 are \S*float32, scores are \S*float64"):
        swapped_prediction_loss(scores, codes, 3)


# -- SwAVHead.backward -------------------------------------------------------------------


def test_swav_head_backward_without_a_pending_forward_is_refused():
    """A backward with no forward cache would pop from an empty list (IndexError) or,
    worse, use a stale cache."""
    head = SwAVHead(6, 0, 4, (5,), dtype="float64", rng=0)
    with pytest.raises(RuntimeError, match="SwAVHead.backward called with no pending forward"):
        head.backward([np.ones((3, 5))])


@pytest.mark.parametrize(("sets", "n_grads"), [((5,), 2), ((5, 3), 1)])
def test_swav_head_backward_refuses_the_wrong_number_of_prototype_sets(sets, n_grads):
    """One score gradient per prototype set: zip would drop the extra ones, or leave a set
    without a gradient, with no error."""
    head = SwAVHead(6, 0, 4, sets, dtype="float64", rng=0)
    head.forward(np.ones((3, 6)))
    dscores = [np.ones((3, sets[0]))] * n_grads
    with pytest.raises(ValueError, match=rf"SwAVHead.backward: {n_grads} score gradients for {len(sets)} prototype sets"):
        head.backward(dscores)
    head.backward([np.ones((3, k)) for k in sets])  # the refusal lost nothing: the forward is still pending


# -- spherical_kmeans --------------------------------------------------------------------


def test_spherical_kmeans_refuses_an_unknown_init():
    """A misspelt init ("kmeans++") must not be taken for an array of centroids."""
    x = np.eye(4)
    with pytest.raises(ValueError, match=r"spherical_kmeans: unknown init 'kmeans\+\+'; use 'k-means\+\+', 'random'"):
        spherical_kmeans(x, 2, 1, B.Random(0), init="kmeans++")


# -- nn.functional -----------------------------------------------------------------------


def test_batchnorm_running_statistics_need_a_training_mode_forward(backend):
    """An eval-mode cache holds the running statistics themselves, not the batch's: updating
    from it would feed them back in (and inflate the running variance by the m / (m - 1)
    correction meant for a batch variance)."""
    x = _normal(backend, np.random.default_rng(0), (4, 3))
    ones, zeros = _zeros(backend, (3,)) + 1.0, _zeros(backend, (3,))
    _, cache = F.batchnorm_forward(x, ones, zeros, zeros, ones, training=False)
    with pytest.raises(ValueError, match="running statistics are only updated from a training-mode forward"):
        F.batchnorm_update_running(zeros, ones, cache)


def _conv(xp, rng):
    x, w = _normal(xp, rng, (2, 2, 5, 6)), _normal(xp, rng, (3, 2, 3, 3))
    out, cache = F.conv2d_forward(x, w, None, 1, 1)  # out (2, 3, 5, 6)
    # 6 channels for 3, same size: without the check the reshape to (3, ...) succeeds
    return F.conv2d_backward, cache, out.shape, (2, 6, 5, 3), r"dout must be \(N, 3, H_out, W_out\), got \(2, 6, 5, 3\)"


def _batchnorm(xp, rng):
    x = _normal(xp, rng, (2, 3, 4, 5))
    ones, zeros = _zeros(xp, (3,)) + 1.0, _zeros(xp, (3,))
    out, cache = F.batchnorm_forward(x, ones, zeros)
    # H and W swapped: the same number of values per channel, so the rows line up silently
    return F.batchnorm_backward, cache, out.shape, (2, 3, 5, 4), \
        r"dout has shape \(2, 3, 5, 4\), the forward output had \(2, 3, 4, 5\)"


def _linear(xp, rng):
    out, cache = F.linear_forward(_normal(xp, rng, (4, 3)), _normal(xp, rng, (2, 3)), _normal(xp, rng, (2,)))
    # one row for four: without the check, NumPy's matmul fails in its own words, naming no layer
    return F.linear_backward, cache, out.shape, (1, 2), r"dout must be \(4, 2\), got \(1, 2\)"


def _global_avg_pool(xp, rng):
    out, cache = F.global_avg_pool_forward(_normal(xp, rng, (2, 3, 4, 4)))
    # transposed: (3, 2) reshapes to (3, 1, 1, 2) as well as (2, 3) does
    return F.global_avg_pool_backward, cache, out.shape, (3, 2), r"dout must be \(2, 3\), got \(3, 2\)"


def _maxpool(xp, rng):
    out, cache = F.maxpool2d_forward(_normal(xp, rng, (2, 3, 4, 4)), 2)  # out (2, 3, 2, 2)
    # (2, 3, 1, 1) broadcasts against the winners' mask
    return F.maxpool2d_backward, cache, out.shape, (2, 3, 1, 1), r"dout must be \(2, 3, 2, 2\), got \(2, 3, 1, 1\)"


@pytest.mark.parametrize("case", [_conv, _batchnorm, _linear, _global_avg_pool, _maxpool],
                         ids=["conv2d", "batchnorm", "linear", "global_avg_pool", "maxpool2d"])
def test_backward_refuses_a_gradient_of_the_wrong_shape(backend, case):
    """Each backward checks its incoming gradient's shape before using the cache. The bad
    shapes are ones the arithmetic would otherwise accept (a silently wrong gradient), but
    for linear, where no such shape exists. The refused call must leave the cache usable
    (conv's is used up by a backward)."""
    rng = np.random.default_rng(0)
    backward, cache, good_shape, bad_shape, match = case(backend, rng)
    with pytest.raises(ValueError, match=match):
        backward(_zeros(backend, bad_shape), cache)
    backward(_zeros(backend, tuple(good_shape)), cache)


# -- train.load_trainer_checkpoint --------------------------------------------------------


@pytest.mark.parametrize(("metadata", "shown"), [({"format": "swav_ref.encoder/1"}, "format 'swav_ref.encoder/1'"),
                                                 ({"epoch": 3}, "it names no format: written by save_checkpoint")])
def test_load_trainer_checkpoint_refuses_a_checkpoint_of_another_format(tmp_path, metadata, shown):
    """A valid swav_ref checkpoint that a Trainer did not write (another format, or none):
    without the check, the missing "config" would surface as a bare KeyError."""
    path = save_checkpoint(tmp_path / "other.npz", {"w": np.zeros(3)}, metadata)
    with pytest.raises(CheckpointError, match=rf"other\.npz: not a swav_ref trainer checkpoint \({shown}"):
        load_trainer_checkpoint(path)


def test_load_trainer_checkpoint_refuses_a_workers_local_file(tmp_path):
    """checkpoint.rank0.step10.local.npz has the trainer's format but only a worker's queue
    or memory bank: a bare KeyError 'config' before."""
    from swav_ref.resume import CHECKPOINT_FORMAT

    path = save_checkpoint(tmp_path / "checkpoint.rank0.step10.local.npz", {"queue.embeddings": np.zeros(3)},
                           {"format": CHECKPOINT_FORMAT, "step": 10})
    with pytest.raises(CheckpointError, match="a worker's local state file.*checkpoint.npz beside it"):
        load_trainer_checkpoint(path)


def test_load_trainer_checkpoint_refuses_a_plain_npz(tmp_path):
    """A NumPy archive of arrays (no swav_ref metadata) is refused by the checkpoint layer
    underneath, with the same exception type."""
    path = tmp_path / "plain.npz"
    np.savez(path, w=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a swav_ref checkpoint: missing keys"):
        load_trainer_checkpoint(path)


# -- the metadata of a trainer checkpoint (its checksum has no key: anyone can forge one) ---
def _trainer_file(tmp_path, drop=(), **changes):
    """A tiny checkpoint in the trainer's format, without training: the head's weights of
    a config with hidden_dim 16, feat_dim 8 and 10 prototypes (only their shapes are read)."""
    from swav_ref.resume import CHECKPOINT_FORMAT
    from swav_ref.train import TrainConfig

    config = TrainConfig(hidden_dim=16, feat_dim=8, n_prototypes=(10,)).to_dict()
    arrays = {"model.backbone.conv1.weight": np.zeros((4, 1, 3, 3), np.float32),
              "model.head.projection.0.weight": np.zeros((16, 64), np.float32),
              "model.head.projection.3.weight": np.zeros((8, 16), np.float32),
              "model.head.prototypes0.weight": np.zeros((10, 8), np.float32)}
    meta = {"format": CHECKPOINT_FORMAT, "config": config, "step": 5, "steps_per_epoch": 5, "world_size": 1,
            "normalisation": {"mean": [0.3], "std": [0.37]},
            "data": {"name": "digits/train", "n_images": 160, "image_shape": [1, 8, 8]},
            "local_ranks": [], "local_files": [], "monitor_fired": False, "written_by": "swav_ref 0.1.0",
            "log": [{"kind": "step", "step": 0, "loss": 2.3}]}
    for key in drop:
        meta.pop(key)
    for key, value in changes.items():
        if key.startswith("config_"):
            meta["config"] = {**meta["config"], key[len("config_"):]: value}
        else:
            meta[key] = value
    return save_checkpoint(tmp_path / "crafted.npz", arrays, meta)


def test_load_trainer_checkpoint_reads_old_checkpoints_without_the_later_entries(tmp_path):
    """Only step and config are required: the entries added later (normalisation, data,
    per-worker files, the log...) may be missing, as in checkpoints of older versions."""
    load_trainer_checkpoint(_trainer_file(tmp_path))
    old = _trainer_file(tmp_path, drop=("steps_per_epoch", "world_size", "normalisation", "data", "local_ranks",
                                        "local_files", "monitor_fired", "written_by", "log"))
    assert load_trainer_checkpoint(old)[2].feat_dim == 8


def test_what_a_trainer_saves_loads_even_where_the_checks_could_be_stricter(tmp_path):
    """A data set handed over from Python may have no name, and a backslash is part of a
    file name on POSIX: checkpoints that save like this must load (review of the checks)."""
    load_trainer_checkpoint(_trainer_file(tmp_path, data={"name": None, "n_images": 160, "image_shape": [1, 8, 8]}))
    if os.sep == "/":
        load_trainer_checkpoint(_trainer_file(tmp_path, world_size=1, local_ranks=[0],
                                              local_files=["a\\b.rank0.step5.local.npz"]))


def test_an_npz_of_another_program_is_not_a_checkpoint_whatever_its_members(tmp_path):
    """np.savez_compressed's file was refused for its compressed member, which reads as a
    damaged checkpoint; it is no checkpoint at all."""
    path = tmp_path / "other.npz"
    np.savez_compressed(path, a=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a swav_ref checkpoint: missing keys"):
        load_trainer_checkpoint(path)


@pytest.mark.parametrize(("changes", "match"), [
    (dict(config=[1]), "its config is a list, not a dict"),
    (dict(config_epochs="x"), "its config is not a valid configuration: --epochs 'x'"),
    (dict(step="abc"), "its step is 'abc', not a whole number"),
    (dict(step=True), "its step is True, not a whole number"),
    (dict(steps_per_epoch=0), "its steps_per_epoch is 0, not a whole number"),
    (dict(written_by=["swav_ref"]), r"its written_by is \['swav_ref'\], not the name and version of a program"),
    (dict(written_by="x" * 201), "its written_by is 'xxxxxxxxxxxx...xxxxxxxxxxxxx', not the name and version"),
    (dict(world_size=None, local_ranks=[0], local_files=["x.npz"]), "its world_size is missing, yet local_ranks"),
    (dict(local_ranks="abc"), "its local_ranks is 'abc', not a list of worker ranks"),
    (dict(local_ranks=[0], local_files=["../../etc/passwd"]), r"its local_files is \['../../etc/passwd'\], not a list"),
    (dict(local_ranks=[0], local_files=["/etc/passwd"]), "its local_files is"),
    (dict(local_ranks=[0], local_files=[".."]), "its local_files is"),
    (dict(local_ranks=[0], local_files=[7]), "its local_files is"),
    (dict(log={"a": 1}), "its log is a dict, not a list of records"),
    (dict(log=5), "its log is a int, not a list of records"),
    (dict(log=[{"kind": "step", "loss": "abc"}]), "its log holds a step record whose loss is 'abc'"),
    (dict(normalisation=[1]), "its normalisation is \\[1\\], not"),
    (dict(normalisation={"mean": "abc", "std": "xyz"}), "its normalisation is"),
    (dict(normalisation={"mean": [0.3], "std": [0.0]}), r"its normalisation std is \[0.0\]: each must be a number in \(0, 1\]"),
    (dict(normalisation={"mean": [float("nan")], "std": [0.37]}), r"its normalisation mean is \[nan\]"),
    (dict(normalisation={"mean": [1e308], "std": [0.37]}), r"its normalisation mean is \[1e\+308\]"),
    (dict(normalisation={"mean": [0.3] * 3, "std": [0.37] * 3}), "its normalisation mean has 3 value.*takes 1 channel"),
    (dict(data="digits"), "its data is 'digits', not a dict"),
    (dict(data={"n_images": 5}), "its data image_shape is None, not three positive whole numbers"),
    (dict(data={"n_images": 5, "image_shape": 5}), "its data image_shape is 5"),
    (dict(data={"n_images": -1, "image_shape": [1, 8, 8]}), "its data n_images is -1"),
])
def test_load_trainer_checkpoint_names_the_entry_of_bad_metadata(tmp_path, changes, match):
    """Each of these ended in a bare AttributeError, TypeError, KeyError or ValueError, in
    eval after its raw-pixel evaluation, or in a resume after the model was built."""
    path = _trainer_file(tmp_path, **{k: v for k, v in changes.items() if v is not None},
                         drop=[k for k, v in changes.items() if v is None])
    with pytest.raises(CheckpointError, match=rf"crafted\.npz: {match}"):
        load_trainer_checkpoint(path)


def test_load_trainer_checkpoint_requires_the_step(tmp_path):
    with pytest.raises(CheckpointError, match=r"crafted\.npz: its step is missing"):
        load_trainer_checkpoint(_trainer_file(tmp_path, drop=("step",)))


@pytest.mark.parametrize(("setting", "shown"), [
    (dict(hidden_dim=10**9), r"model\.head\.projection\.0\.weight is \(16, 64\), the configuration makes it \(1000000000, \*\)"),
    (dict(hidden_dim=0), r"model\.head\.projection\.weight is missing"),
    (dict(feat_dim=10**8), r"model\.head\.prototypes0\.weight is \(10, 8\), the configuration makes it \(10, 100000000\)"),
    (dict(n_prototypes=[10**9]), r"prototypes0\.weight is \(10, 8\), the configuration makes it \(1000000000, 8\)"),
    (dict(method="deepcluster-v2", n_prototypes=[10, 10**9]), r"prototypes1\.weight is missing"),
])
def test_load_trainer_checkpoint_refuses_a_configuration_its_weights_contradict(tmp_path, setting, shown):
    """A resume built the model of the checkpoint's configuration before comparing shapes:
    hidden_dim 10**9 was a MemoryError, not an error about the file."""
    path = _trainer_file(tmp_path, **{f"config_{k}": v for k, v in setting.items()})
    with pytest.raises(CheckpointError, match=r"crafted\.npz: the configuration disagrees with the checkpoint's own "
                                              rf"weights \(.*{shown}"):
        load_trainer_checkpoint(path)


def test_load_trainer_checkpoint_refuses_a_queue_its_state_does_not_hold(tmp_path):
    """A SwAV run past its queue's first epoch keeps the queue in its workers' files: a
    configuration with a queue (of 10**12 rows, say) and no such file is not this run's."""
    path = _trainer_file(tmp_path, step=12, config_queue_length=10**12, config_epoch_queue_starts=2)
    with pytest.raises(CheckpointError, match=r"crafted\.npz: the configuration disagrees with the checkpoint's own "
                                              r"state \(--queue-length 1000000000000 from epoch 2, but at step 12"):
        load_trainer_checkpoint(path)
    load_trainer_checkpoint(_trainer_file(tmp_path, step=10, config_queue_length=10**12, config_epoch_queue_starts=2))


def test_an_image_dataset_prints_as_a_summary_and_three_axes_get_a_hint():
    """print(dataset) printed every pixel; (N, H, W) images were refused without a word
    on the missing channel axis."""
    import numpy as np

    from swav_ref.data.datasets import ImageDataset

    images = np.zeros((5, 8, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"add its axis: images\[:, None\]"):
        ImageDataset(images, name="mine")
    labelled = ImageDataset(images[:, None], np.arange(5) % 2, name="mine")
    assert repr(labelled) == "ImageDataset('mine': 5 images of 1x8x8 uint8, 2 classes)"
    assert str(ImageDataset(images[:, None])) == "ImageDataset('images': 5 images of 1x8x8 uint8, unlabelled)"
