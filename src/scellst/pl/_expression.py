"""Measured spots beside predicted cells, drawn with spatialdata-plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import Col, Key
from .._utils import get_key, shared_coordinate_system

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from spatialdata import SpatialData


def _lognorm_spot_table(sdata: SpatialData, spot_table_key: str, genes: Sequence[str]):
    import anndata as ad
    from spatialdata.models import TableModel

    from ..pp._genes import lognorm

    counts = sdata.tables[spot_table_key]
    attrs = counts.uns["spatialdata_attrs"]
    obs = counts.obs[[attrs["region_key"], attrs["instance_key"]]].copy()
    table = ad.AnnData(X=lognorm(counts, genes), obs=obs, var=pd.DataFrame(index=list(genes)))
    return TableModel.parse(
        table, region=attrs["region"], region_key=attrs["region_key"], instance_key=attrs["instance_key"]
    )


def expression(
    sdata: SpatialData,
    genes: str | Sequence[str],
    *,
    image_key: str | None = None,
    spots_key: str = Key.SPOTS,
    spot_table_key: str = Key.SPOTS_COUNTS,
    shapes_key: str = Key.NUCLEI,
    table_key: str | None = None,
    coordinate_system: str | None = None,
    cmap: str = "viridis",
    figsize_per_panel: tuple[float, float] = (5.0, 5.0),
    save: str | Path | None = None,
) -> Figure:
    """Measured spot expression beside predicted cell expression, one row per gene.

    Both panels show log-normalised expression (``log1p`` of counts per 10,000) over the H&E image, so the
    colour scales are comparable. Drawn with spatialdata-plot.

    Parameters
    ----------
    sdata
        The SpatialData object (not modified).
    genes
        One gene or a list of genes (they must have been predicted).
    image_key
        The H&E image; ``None`` for the only image.
    spots_key, spot_table_key
        Spot shapes and their count table (the left panels; skipped when absent, e.g. on H&E-only slides).
    shapes_key, table_key
        Nucleus shapes and the predicted table (default ``f"{shapes_key}_expression"``).
    coordinate_system
        Coordinate system to draw in (default: one shared by the image and the nuclei).
    cmap
        Colour map.
    figsize_per_panel
        Size of one panel in inches.
    save
        Path of an image file to write.

    Returns
    -------
    The matplotlib figure.
    """
    import matplotlib.pyplot as plt
    import spatialdata_plot  # noqa: F401  (registers the .pl accessor)
    from spatialdata import SpatialData

    genes = [genes] if isinstance(genes, str) else list(genes)
    if not genes:
        raise ValueError("Pass at least one gene.")
    image_key = get_key(sdata, "images", image_key, what="H&E image")
    shapes_key = get_key(sdata, "shapes", shapes_key, what="nucleus shapes")
    table_key = table_key or f"{shapes_key}{Key.EXPRESSION_SUFFIX}"
    table_key = get_key(sdata, "tables", table_key, what="predicted cell table")
    predicted = sdata.tables[table_key]
    missing = [g for g in genes if g not in predicted.var_names]
    if missing:
        raise KeyError(
            f"Genes not predicted in {table_key!r}: {missing}. Predicted genes: {list(predicted.var_names)[:20]}"
        )
    cs = coordinate_system or shared_coordinate_system(sdata, image_key, shapes_key)
    has_spots = spots_key in sdata.shapes and spot_table_key in sdata.tables
    if has_spots:
        has_spots = all(g in sdata.tables[spot_table_key].var_names for g in genes)

    cells = sdata.shapes[shapes_key]
    # nuclei drawn as discs of equal area: far faster than polygons, and the same picture at slide scale
    import geopandas as gpd
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import get_transformation

    cell_points = gpd.GeoDataFrame(
        {Col.RADIUS: np.sqrt(cells.geometry.area.to_numpy() / np.pi)},
        geometry=cells.geometry.centroid.to_numpy(),
        index=cells.index,
    )
    cell_points = ShapesModel.parse(cell_points, transformations=get_transformation(cells, get_all=True))
    view = {
        "images": {image_key: sdata.images[image_key]},
        "shapes": {shapes_key: cell_points},
        "tables": {table_key: predicted},
    }
    if has_spots:
        view["shapes"][spots_key] = sdata.shapes[spots_key]
        view["tables"]["_measured"] = _lognorm_spot_table(sdata, spot_table_key, genes)
    small = SpatialData(**view)

    ncols = 2 if has_spots else 1
    fig, axes = plt.subplots(
        len(genes), ncols, figsize=(figsize_per_panel[0] * ncols, figsize_per_panel[1] * len(genes)), squeeze=False
    )
    for row, gene in enumerate(genes):
        col = 0
        if has_spots:
            small.pl.render_images(image_key, colorbar=False).pl.render_shapes(
                spots_key, color=gene, table_name="_measured", cmap=cmap, fill_alpha=0.9
            ).pl.show(coordinate_systems=cs, ax=axes[row, 0], title=f"{gene}: measured spots")
            col = 1
        small.pl.render_images(image_key, colorbar=False).pl.render_shapes(
            shapes_key, color=gene, table_name=table_key, cmap=cmap, fill_alpha=0.9, method="matplotlib"
        ).pl.show(coordinate_systems=cs, ax=axes[row, col], title=f"{gene}: predicted cells")
    fig.tight_layout()
    if save is not None:
        fig.savefig(save, dpi=120)
    return fig
