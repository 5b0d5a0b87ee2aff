"""Spot-level views of cell tables."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._constants import Col, Key
from .._utils import get_key
from ..models._mil import apply_scaling, slide_stats
from ._train import DEFAULT_SCALING

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def spot_embeddings(
    sdata: SpatialData,
    shapes_key: str = Key.NUCLEI,
    *,
    table_key: str | None = None,
    spots_key: str = Key.SPOTS,
    embedding_scaling: Literal["quantile", "slide", "global"] = DEFAULT_SCALING,
) -> AnnData:
    """The mean cell embedding of each spot: the spot-level view of any cell embedding table.

    The cell features are first scaled within the slide as the learners see them (``"quantile"``: per-slide normal
    scores, the default of :func:`scellst.tl.train`; ``"slide"``: per-slide z-scores; ``"global"``: unscaled), then
    averaged over the cells of each spot (weighted by their overlap when the cells were assigned by overlap). Feeds
    spot-level classifiers or baselines, e.g. with the embedding of :func:`scellst.tl.train_contrastive`.

    Parameters
    ----------
    sdata
        A SpatialData object whose cells were assigned to spots (:func:`scellst.pp.assign_cells`) and embedded.
    shapes_key
        The nucleus shapes.
    table_key
        The cell embedding table (default ``f"{shapes_key}_embeddings"``).
    spots_key
        The spot shapes.
    embedding_scaling
        How the cell features are scaled before averaging.

    Returns
    -------
    An AnnData of the spots that hold at least one cell (in the order of the spot shapes) x the table's features,
    with ``obs['n_cells']``.
    """
    import anndata as ad

    from ..models._mil import EMBEDDING_SCALINGS
    from ._train import _spot_groups, embedding_table_key

    if embedding_scaling not in EMBEDDING_SCALINGS:
        raise ValueError(f"`embedding_scaling` must be one of {EMBEDDING_SCALINGS}, got {embedding_scaling!r}.")
    shapes_key = get_key(sdata, "shapes", shapes_key, what="nucleus shapes")
    spots_key = get_key(sdata, "shapes", spots_key, what="spot shapes")
    emb = sdata.tables[embedding_table_key(sdata, shapes_key, table_key)]
    if Col.SPOT_ID not in emb.obs:
        raise ValueError(
            f"The embedding table has no 'spot_id': run `scellst.pp.assign_cells(sdata, {shapes_key!r}, {spots_key!r})` "
            "and embed the cells again."
        )
    groups, weights = _spot_groups(sdata, emb, shapes_key, spots_key)
    raw = np.asarray(emb.X, dtype=np.float32)
    if embedding_scaling == "global":
        x = raw
    else:
        x = apply_scaling(raw, embedding_scaling, slide_stats(raw, embedding_scaling, None, None))
    spots = [s for s in sdata.shapes[spots_key].index.astype(str) if s in groups]
    out = np.zeros((len(spots), x.shape[1]), np.float32)
    for i, s in enumerate(spots):
        w = None if weights is None else weights[s]
        out[i] = np.average(x[groups[s]], axis=0, weights=w)
    obs = pd.DataFrame({"n_cells": [len(groups[s]) for s in spots]}, index=pd.Index(spots, name=None))
    return ad.AnnData(X=out, obs=obs, var=pd.DataFrame(index=list(emb.var_names)))
