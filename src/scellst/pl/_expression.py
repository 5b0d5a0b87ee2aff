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


def _lognorm_table(table, genes: Sequence[str], *, region: str):
    """Per-cell ``log1p`` CP10k of a table of counts, as a table annotating the shapes ``region``."""
    import anndata as ad
    from spatialdata.models import TableModel

    from ..pp._genes import lognorm

    attrs = table.uns["spatialdata_attrs"]
    obs = pd.DataFrame(
        {"region": pd.Categorical([region] * table.n_obs), "instance": table.obs[attrs["instance_key"]].to_numpy()}
    )
    obs.index = table.obs_names
    out = ad.AnnData(X=lognorm(table, genes), obs=obs, var=pd.DataFrame(index=list(genes)))
    return TableModel.parse(out, region=region, region_key="region", instance_key="instance")


def _gene_values(table, gene: str) -> np.ndarray:
    x = table[:, gene].X
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    return x.ravel().astype(float)


def _as_discs(shapes, region_of: str | None = None):
    """Cells drawn as discs (far faster than polygons at slide scale).

    A disc has the nucleus' area, or reaches half-way to the nearest other cell when that is larger, so that cells
    stay visible on a whole-tissue panel.
    """
    import geopandas as gpd
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import get_transformation

    geom = shapes.geometry
    if (geom.geom_type == "Point").all():
        radius = shapes[Col.RADIUS].to_numpy()
        centres = geom.to_numpy()
    else:
        radius = np.sqrt(geom.area.to_numpy() / np.pi)
        centres = geom.centroid.to_numpy()
    if len(centres) > 1:  # at least half-way to the nearest neighbour, so that small nuclei stay visible
        import shapely
        from scipy.spatial import cKDTree

        xy = shapely.get_coordinates(centres)
        nearest = cKDTree(xy).query(xy, k=2)[0][:, 1]
        reach = np.minimum(nearest, np.percentile(nearest, 75))  # isolated cells do not grow into large discs
        radius = np.maximum(radius, 0.45 * reach)
    discs = gpd.GeoDataFrame({Col.RADIUS: radius}, geometry=centres, index=shapes.index)
    return ShapesModel.parse(discs, transformations=get_transformation(shapes, get_all=True))


def _microns_per_unit(sdata, image_key: str, cs: str) -> float | None:
    """Microns per unit of the coordinate system ``cs``, from the image's pixel size and its transformation."""
    from .._utils import affine_scale, affine_to_cs, get_microns_per_pixel

    try:
        mpp = get_microns_per_pixel(sdata, image_key)
    except ValueError:
        return None
    units_per_pixel = affine_scale(affine_to_cs(sdata.images[image_key], cs))
    return mpp / units_per_pixel if units_per_pixel > 0 else None


def _scale_bar(ax, um_per_unit: float, length_um: float | None) -> None:
    from matplotlib.offsetbox import AnchoredOffsetbox, AuxTransformBox, TextArea, VPacker
    from matplotlib.patches import Rectangle

    x0, x1 = ax.get_xlim()
    width_um = abs(x1 - x0) * um_per_unit
    if length_um is None:
        target = width_um / 5
        magnitude = 10 ** np.floor(np.log10(max(target, 1e-9)))
        length_um = float(max((m * magnitude for m in (1, 2, 5) if m * magnitude <= target), default=magnitude))
    length = length_um / um_per_unit
    bar = AuxTransformBox(ax.transData)
    y0, y1 = ax.get_ylim()
    bar.add_artist(Rectangle((0, 0), length, abs(y1 - y0) / 120, color="black"))
    label = TextArea(f"{length_um:g} µm")
    box = VPacker(children=[bar, label], align="center", pad=2, sep=2)
    ax.add_artist(AnchoredOffsetbox(loc="lower right", child=box, frameon=True, pad=0.3, borderpad=0.5))


def _lognorm_spot_table(sdata: SpatialData, spot_table_key: str, genes: Sequence[str]):
    """The measured spots' ``log1p`` CP10k, annotating the spot shapes."""
    counts = sdata.tables[spot_table_key]
    return _lognorm_table(counts, genes, region=counts.uns["spatialdata_attrs"]["region"])


def expression(
    sdata: SpatialData,
    genes: str | Sequence[str],
    *,
    image_key: str | None = None,
    spots_key: str = Key.SPOTS,
    spot_table_key: str = Key.SPOTS_COUNTS,
    shapes_key: str = Key.NUCLEI,
    table_key: str | None = None,
    truth_key: str | None = None,
    truth_shapes_key: str | None = None,
    coordinate_system: str | None = None,
    cmap: str = "viridis",
    scale_bar_um: float | None = None,
    figsize_per_panel: tuple[float, float] = (5.0, 5.0),
    save: str | Path | None = None,
) -> Figure:
    """Measured spot expression beside predicted cell expression (and the true cells when known), one row per gene.

    Every panel shows log-normalised expression (``log1p`` of counts per 10,000) over the H&E image on one colour
    scale per gene (1st-99th percentile of all panels), with axes in microns (or pixels of the coordinate system when
    its unit is not microns) and a scale bar. Drawn with spatialdata-plot.

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
    truth_key, truth_shapes_key
        A table of true per-cell counts (e.g. ``"true_expression"`` of :func:`scellst.datasets.synthetic_tissue`)
        and the shapes it annotates (default: its annotated region), drawn as a first column, log-normalised per cell.
    coordinate_system
        Coordinate system to draw in (default: one shared by the image and the nuclei).
    cmap
        Colour map.
    figsize_per_panel
        Size of one panel in inches.
    scale_bar_um
        Length of the scale bar in microns (default: a round length near a fifth of the panel width).
    save
        Path of an image file to write.

    Returns
    -------
    The matplotlib figure.
    """
    import matplotlib.pyplot as plt
    import spatialdata_plot  # noqa: F401  (registers the .pl accessor)
    from matplotlib.colors import Normalize
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

    view = {
        "images": {image_key: sdata.images[image_key]},
        "shapes": {shapes_key: _as_discs(sdata.shapes[shapes_key])},
        "tables": {table_key: predicted},
    }
    panels: list[tuple[str, str, str]] = []  # (shapes, table, title)
    if truth_key is not None:
        truth = sdata.tables[get_key(sdata, "tables", truth_key, what="true expression table")]
        missing = [g for g in genes if g not in truth.var_names]
        if missing:
            raise KeyError(f"Genes missing from the truth table {truth_key!r}: {missing}.")
        region = truth.uns["spatialdata_attrs"]["region"]
        truth_shapes_key = truth_shapes_key or (region if isinstance(region, str) else region[0])
        view["shapes"]["_truth"] = _as_discs(sdata.shapes[truth_shapes_key], region_of=truth_shapes_key)
        view["tables"]["_truth_table"] = _lognorm_table(truth, genes, region="_truth")
        panels.append(("_truth", "_truth_table", "true cells"))
    if has_spots:
        view["shapes"][spots_key] = sdata.shapes[spots_key]
        view["tables"]["_measured"] = _lognorm_spot_table(sdata, spot_table_key, genes)
        panels.append((spots_key, "_measured", "measured spots"))
    panels.append((shapes_key, table_key, "predicted cells"))
    small = SpatialData(**view)

    um_per_unit = _microns_per_unit(sdata, image_key, cs)
    unit = "µm" if um_per_unit is not None and abs(um_per_unit - 1) < 1e-6 else f"{cs} units"
    ncols = len(panels)
    fig, axes = plt.subplots(
        len(genes),
        ncols,
        figsize=(figsize_per_panel[0] * ncols + 1.0, figsize_per_panel[1] * len(genes)),
        squeeze=False,
        layout="constrained",
    )
    for row, gene in enumerate(genes):
        values = np.concatenate([_gene_values(small.tables[t], gene) for _, t, _ in panels])
        lo, hi = np.nanpercentile(values, [1, 99]) if values.size else (0.0, 1.0)
        norm = Normalize(vmin=float(lo), vmax=float(max(hi, lo + 1e-6)))
        for col, (shapes, table, title) in enumerate(panels):
            ax = axes[row, col]
            small.pl.render_images(image_key, colorbar=False).pl.render_shapes(
                shapes,
                color=gene,
                table_name=table,
                cmap=cmap,
                norm=norm,
                fill_alpha=0.9,
                method="matplotlib",
                colorbar=False,
            ).pl.show(coordinate_systems=cs, ax=ax, title=f"{gene}: {title}", colorbar=False)
            ax.set_xlabel(f"x ({unit})")
            ax.set_ylabel(f"y ({unit})" if col == 0 else "")
            if um_per_unit is not None:
                _scale_bar(ax, um_per_unit, scale_bar_um)
        sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
        fig.colorbar(sm, ax=list(axes[row]), shrink=0.8, label=f"{gene}, log1p(CP10k)")
    if save is not None:
        fig.savefig(save, dpi=120)
    return fig
