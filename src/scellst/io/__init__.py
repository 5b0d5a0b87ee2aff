"""Readers: bring H&E images and spot transcriptomics into a scellst SpatialData."""

from .._utils import get_microns_per_pixel, image_level0, set_microns_per_pixel
from ._nuclei import read_nuclei
from ._readers import file_microns_per_pixel, from_image, from_spots, read, visium
from ._visium_hd import visium_hd
from ._xenium import add_cells, read_alignment, xenium

__all__ = [
    "add_cells",
    "file_microns_per_pixel",
    "from_image",
    "from_spots",
    "get_microns_per_pixel",
    "image_level0",
    "read",
    "read_alignment",
    "read_nuclei",
    "set_microns_per_pixel",
    "visium",
    "visium_hd",
    "xenium",
]
