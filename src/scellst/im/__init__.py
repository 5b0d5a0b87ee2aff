"""Image: nucleus segmentation, cell crops and embeddings, and the training of image models (SSL, segmenters)."""

from ._crops import CellCrops, StainNormalizer, cell_crops
from ._embed import embed_cells, shape_features
from ._neighbourhood import context_feature_names, neighbourhood_features
from ._segment import nucleus_scale_um, segment_nuclei
from ._segmentation_tiles import registration_shifts, segmentation_tiles
from ._segmenter import train_segmenter
from ._self_segmenter import self_train_segmenter
from ._ssl import train_ssl

__all__ = [
    "CellCrops",
    "StainNormalizer",
    "cell_crops",
    "context_feature_names",
    "embed_cells",
    "neighbourhood_features",
    "nucleus_scale_um",
    "registration_shifts",
    "segment_nuclei",
    "segmentation_tiles",
    "self_train_segmenter",
    "shape_features",
    "train_segmenter",
    "train_ssl",
]
