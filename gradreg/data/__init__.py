"""Data: the dataset registry, benchmark readers, outlier pools and the OODDataModule."""

from gradreg.data import benchmarks, outliers  # noqa: F401  (register the benchmark readers and outlier pools)
from gradreg.data.datasets import DATASETS, ID_SPECS, DatasetFileError, DatasetNotFoundError, ImageSpec, build_dataset
from gradreg.data.module import OODDataModule

__all__ = [
    "DATASETS",
    "ID_SPECS",
    "DatasetFileError",
    "DatasetNotFoundError",
    "ImageSpec",
    "OODDataModule",
    "build_dataset",
]
