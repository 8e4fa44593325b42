"""Data: arrays and batches, image decoding and fetching, the data set registry with the built-in
sets, the user formats, label noise, and the preparation of a run's data.

Importing this package registers the built-in data sets (``benchmarks``, ``paper``) and formats (``user``).
"""

from . import benchmarks, paper, user  # noqa: F401  (each registers its data sets or formats)
from .arrays import DeviceImages, ImageData
from .prepare import TrainData, data_check, prepare_data
from .sources import check_data, load_dataset, register_dataset

__all__ = ["DeviceImages", "ImageData", "TrainData", "check_data", "data_check", "load_dataset", "prepare_data",
           "register_dataset"]
