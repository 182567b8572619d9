"""Training data: image-set layouts (class folders, CSV / Google Landmarks v2,
retrieval-SfM-120k), datasets with deterministic per-(epoch, index) augmentation,
class-balanced batch sampling and retrieval augmentations.

Nothing here runs a model; mining is :mod:`imret.mining`.
"""

from .datasets import (
    SFM_SPLITS,
    BadImage,
    ImageListDataset,
    LazyImages,
    LabelledImages,
    TupleDataset,
    cid2filename,
    collate_images,
    collate_tuples,
    find_bad_images,
    gldv2_path,
    load_csv_dataset,
    load_folder_dataset,
    load_sfm120k,
)
from .samplers import ClassBalancedBatchSampler
from .transforms import OUTPUT_MODES, RetrievalAugment, TorchvisionTransform, Transform, sample_rng

__all__ = [
    "SFM_SPLITS",
    "OUTPUT_MODES",
    "BadImage",
    "ClassBalancedBatchSampler",
    "ImageListDataset",
    "LazyImages",
    "LabelledImages",
    "RetrievalAugment",
    "TorchvisionTransform",
    "Transform",
    "TupleDataset",
    "cid2filename",
    "collate_images",
    "collate_tuples",
    "find_bad_images",
    "gldv2_path",
    "load_csv_dataset",
    "load_folder_dataset",
    "load_sfm120k",
    "sample_rng",
]
