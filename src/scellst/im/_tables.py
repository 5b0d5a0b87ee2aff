"""Writing per-nucleus feature tables that annotate the nucleus shapes."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .._constants import Attr, Col
from .._utils import shapes_centroids, write_element


def _write_table(sdata, shapes_key, x, var_names, *, key_added, overwrite, uns) -> None:
    """Store per-nucleus features as a table annotating the shapes (spot assignment and centroids kept)."""
    import anndata as ad
    from spatialdata.models import TableModel

    nuclei = sdata.shapes[shapes_key]
    ids = nuclei.index.to_numpy()
    obs = pd.DataFrame(
        {Col.CELL_ID: ids, Col.REGION: pd.Categorical([shapes_key] * len(ids))}, index=pd.Index(ids.astype(str))
    )
    if Col.SPOT_ID in nuclei:
        obs[Col.SPOT_ID] = pd.Categorical(nuclei[Col.SPOT_ID].to_numpy())
    adata = ad.AnnData(X=np.asarray(x, dtype=np.float32), obs=obs, var=pd.DataFrame(index=list(var_names)))
    adata.obsm["spatial"] = shapes_centroids(nuclei)
    adata.uns[Attr.ROOT] = uns
    table = TableModel.parse(adata, region=shapes_key, region_key=Col.REGION, instance_key=Col.CELL_ID)
    write_element(sdata, key_added, table, overwrite=overwrite, what=f"{table.n_obs:,} cells x {table.n_vars} features")
