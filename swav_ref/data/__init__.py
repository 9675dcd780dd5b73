"""Data: image datasets on the host, multi-crop augmentation on the backend.

- :mod:`swav_ref.data.datasets` -- digits, CIFAR-10 (binary), image folders; uint8 (N, C, H, W).
- :mod:`swav_ref.data.image_files` -- which files of a folder are images, and how one is read.
- :mod:`swav_ref.data.errors` -- :class:`DatasetError`, for bad data on disk.
- :mod:`swav_ref.data.multicrop` -- SwAV's multi-crop views, made with Array-API calls so
  that they run on the GPU under CuPy.
"""

from swav_ref.data.datasets import (
    ARRAYS,
    DATASETS,
    DatasetError,
    ImageDataset,
    channel_stats,
    load_cifar10,
    load_dataset,
    load_digits_dataset,
    load_image_folder,
    split_dataset,
)
from swav_ref.data.multicrop import (
    CropParams,
    MultiCrop,
    MultiCropConfig,
    default_config,
    denormalize,
    show_crops,
)

__all__ = [
    "ARRAYS",
    "DATASETS",
    "CropParams",
    "DatasetError",
    "ImageDataset",
    "MultiCrop",
    "MultiCropConfig",
    "channel_stats",
    "default_config",
    "denormalize",
    "load_cifar10",
    "load_dataset",
    "load_digits_dataset",
    "load_image_folder",
    "show_crops",
    "split_dataset",
]
