"""Data pipelines: small-image data sets, ImageNet-style folders through NVIDIA DALI, splits."""

from data_pipelines.image_folder import (
    DaliImageIterator,
    ImageFolder,
    scan_image_folder,
    split_image_folder,
)
from data_pipelines.loaders import ArrayLoader
from data_pipelines.small_images import SMALL_DATASETS, ImageArrays, load_small_dataset
from data_pipelines.splits import epoch_shard, stratified_sample, stratified_split

__all__ = [
    "SMALL_DATASETS",
    "ArrayLoader",
    "DaliImageIterator",
    "ImageArrays",
    "ImageFolder",
    "epoch_shard",
    "load_small_dataset",
    "scan_image_folder",
    "split_image_folder",
    "stratified_sample",
    "stratified_split",
]
