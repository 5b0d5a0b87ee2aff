"""Applying a contrastive image-expression model (:func:`scellst.tl.train_contrastive`) to the cells of a slide."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import Attr
from .._logging import logger
from .._utils import instance_ids, provenance, scellst_attrs, source_image_key

if TYPE_CHECKING:
    from anndata import AnnData

    from ..models._contrastive import ContrastiveModel

# base embeddings that embed_cells can compute again from the image alone (no encoder file needed)
RECOMPUTABLE_BASES = ("morphology", "shape", "efficientnet-lite0")


def resolve_model(model: Any) -> ContrastiveModel:
    from ..models._contrastive import ContrastiveModel

    if isinstance(model, ContrastiveModel):
        return model
    if isinstance(model, str | Path):
        return ContrastiveModel.load(model)
    raise TypeError(f"Expected a ContrastiveModel or the path of its file, got {type(model).__name__}.")


def write_contrastive(
    sdata, shapes_key: str, model: ContrastiveModel, base: AnnData, *, key_added: str, overwrite: bool
) -> None:
    """Apply ``model`` to the base features ``base`` of the cells of ``shapes_key`` and write the table."""
    from ..models._mil import apply_scaling, slide_stats
    from ._tables import _write_table

    names = list(base.var_names)
    if names != model.feature_names:
        missing = [f for f in model.feature_names if f not in names]
        raise ValueError(
            f"The cell features ({len(names)}) are not those the contrastive model was trained on "
            f"({len(model.feature_names)}, {model.base.get('method', 'unknown')!r} embedding"
            f"{'; missing e.g. ' + ', '.join(missing[:3]) if missing else ''}): embed the cells with "
            f"`scellst.im.embed_cells(sdata, method={model.base.get('method', 'morphology')!r}, ...)` and the same "
            "settings first."
        )
    ids = sdata.shapes[shapes_key].index.astype(str)
    rows = pd.Index(instance_ids(base).astype(str)).get_indexer(ids)
    if (rows < 0).any():
        raise ValueError(
            f"{int((rows < 0).sum()):,} nuclei of {shapes_key!r} have no row in the base feature table; embed the "
            "cells of these shapes again (`scellst.im.embed_cells(..., overwrite=True)`)."
        )
    raw = np.asarray(base.X, dtype=np.float32)[rows]
    x = apply_scaling(raw, model.embedding_scaling, slide_stats(raw, model.embedding_scaling, None, None))
    out = model.embed(x)
    uns = provenance(
        {
            "method": "contrastive",
            "base": model.base,
            "embedding_scaling": model.embedding_scaling,
            "batch_agnostic": model.config.batch_agnostic,
            "genes": len(model.genes),
            "context_um": [],
        },
        function="embed_contrastive",
        shapes_key=shapes_key,
    )
    _write_table(
        sdata,
        shapes_key,
        out,
        [f"contrastive_{i}" for i in range(out.shape[1])],
        key_added=key_added,
        overwrite=overwrite,
        uns=uns,
    )
    logger.info(f"Wrote the contrastive embedding of {len(out):,} cells to {key_added!r}")


def base_view(sdata, shapes_key: str, image_key: str | None, model: ContrastiveModel):
    """An in-memory view (same image, shapes and pixel size) to compute a model's base features on, and their options.

    The base features are never written to the user's store; only the learned embedding is.
    """
    import copy

    from spatialdata import SpatialData

    method = model.base.get("method", "unknown")
    if method not in RECOMPUTABLE_BASES:
        raise ValueError(
            f"This contrastive model reads {method!r} cell features, which need their own encoder: embed the cells "
            f"with it first (`scellst.im.embed_cells(sdata, method={method!r}, encoder=...)`), then call "
            "`scellst.tl.embed_contrastive(sdata, model)`."
        )
    images = {}
    if method != "shape":  # outlines only: no image is read
        image_key = source_image_key(sdata, shapes_key, image_key)
        images = {image_key: sdata.images[image_key]}
    light = SpatialData(images=images, shapes={shapes_key: sdata.shapes[shapes_key]})
    light.attrs[Attr.ROOT] = copy.deepcopy(scellst_attrs(sdata))
    options: dict[str, Any] = {
        "method": method,
        "image_key": image_key,
        "context_um": model.base.get("context_um") or None,
    }
    if "ring_um" in model.base:
        options["ring_um"] = float(model.base["ring_um"])
    return light, options
