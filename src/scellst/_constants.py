"""Every default element, column and ``uns``/``attrs`` key used by scellst, in one place."""

from __future__ import annotations


class Key:
    """Default element names in a SpatialData object."""

    IMAGE = "he"
    SPOTS = "spots"
    SPOTS_COUNTS = "spots_counts"
    SPOTS_PREDICTED = "spots_predicted"
    NUCLEI = "nuclei"
    NUCLEI_LABELS = "nuclei_labels"
    EMBEDDINGS_SUFFIX = "_embeddings"
    EXPRESSION_SUFFIX = "_expression"
    TRUE_CELLS = "true_cells"
    TRUE_EXPRESSION = "true_expression"
    XENIUM_CELLS = "xenium_cells"
    XENIUM_NUCLEI = "xenium_nuclei"
    XENIUM_TABLE = "xenium_table"


class Col:
    """Column names in tables and GeoDataFrames."""

    SPOT_ID = "spot_id"
    CELL_ID = "cell_id"
    REGION = "region"
    CELL_TYPE = "cell_type"
    RADIUS = "radius"
    N_CELLS = "n_cells"
    PREDICTED_TYPE = "predicted_type"


class Attr:
    """Keys of ``sdata.attrs`` and ``table.uns`` written by scellst."""

    ROOT = "scellst"  # sdata.attrs["scellst"] and table.uns["scellst"]
    MICRONS_PER_PIXEL = "microns_per_pixel"  # sdata.attrs["scellst"]["microns_per_pixel"][image_key]
    SHAPES_SOURCE = "shapes_source"  # sdata.attrs["scellst"]["shapes_source"][shapes_key] = image_key
    XENIUM = "xenium"  # sdata.attrs["scellst"]["xenium"]["pixel_size_um"]: `global` is in Xenium pixels
    RUN = "run"  # sdata.attrs["scellst"]["run"]: what a store made by `run_predict` was made from (for resume)


VISIUM_SPOT_DIAMETER_UM = 55.0
VISIUM_SPOT_PITCH_UM = 100.0
ST_SPOT_DIAMETER_UM = 100.0
ST_SPOT_PITCH_UM = 200.0
TARGET_SUM = 1e4
