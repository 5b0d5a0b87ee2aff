"""Visium HD: Space Ranger bins (2, 8, 16 um) and cell segmentations, read through spatialdata-io."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import Attr, Col, Key
from .._logging import logger
from .._utils import set_microns_per_pixel

if TYPE_CHECKING:
    from spatialdata import SpatialData

HD_CELLS = "hd_cells"  # Space Ranger 4 cell segmentations (expanded nuclei) and their counts
HD_NUCLEI = "hd_nuclei"


def hd_bin_sizes(path: str | Path) -> list[int]:
    """The bin sizes (um) of a Visium HD Space Ranger folder (``binned_outputs/square_XXXum``)."""
    binned = Path(path) / "binned_outputs"
    if not binned.is_dir():
        return []
    found = (re.fullmatch(r"square_(\d{3})um", p.name) for p in binned.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def is_visium_hd(path: str | Path) -> bool:
    """Whether ``path`` is a Visium HD Space Ranger folder (it has ``binned_outputs/square_XXXum``)."""
    return bool(hd_bin_sizes(path))


def _dataset_id(path: Path, dataset_id: str | None) -> str | None:
    """What to pass to spatialdata-io: a prefixed ``{id}_feature_slice.h5`` fixes the id; else the folder name."""
    if (path / "feature_slice.h5").exists():
        return dataset_id or path.name
    prefixed = sorted(path.glob("*_feature_slice.h5"))
    if not prefixed:
        raise FileNotFoundError(
            f"{str(path)!r} has no `feature_slice.h5`: it is not a Visium HD Space Ranger `outs` folder (or the file "
            "was not copied with it)."
        )
    return dataset_id  # None: spatialdata-io takes the id from the file name


def _bin_elements(raw, dataset_id: str, bin_um: int, shapes_key: str, table_key: str, mpp: float) -> tuple:
    """One bin size's squares and counts, under scellst's keys (spot ids: the Space Ranger barcodes)."""
    from spatialdata.models import ShapesModel, TableModel

    name = f"square_{bin_um:03d}um"
    table = raw.tables[name]
    squares = raw.shapes[f"{dataset_id}_{name}"]
    instance_key = table.uns["spatialdata_attrs"]["instance_key"]
    barcodes = pd.Series(table.obs_names.astype(str), index=table.obs[instance_key].to_numpy())
    shapes = squares.copy()
    shapes.index = pd.Index(barcodes.reindex(shapes.index).to_numpy(), name=Col.SPOT_ID)
    shapes = ShapesModel.parse(shapes)  # the copy keeps the transformations of the squares
    obs = table.obs.drop(columns=[c for c in (instance_key, "region") if c in table.obs]).copy()
    obs[Col.SPOT_ID] = table.obs_names.astype(str)
    obs[Col.REGION] = pd.Categorical([shapes_key] * table.n_obs)
    adata = table.copy()
    adata.obs = obs
    del adata.uns["spatialdata_attrs"]
    adata.uns[Attr.ROOT] = {
        "platform": "visium_hd",
        "bin_size_um": float(bin_um),
        "spot_diameter_um": float(bin_um),
        "dataset_id": dataset_id,
        "microns_per_pixel": mpp,
    }
    return shapes, TableModel.parse(adata, region=shapes_key, region_key=Col.REGION, instance_key=Col.SPOT_ID)


def _segmentation_elements(raw, dataset_id: str, kind: str, key: str) -> tuple | None:
    """Space Ranger 4 segmentations (``cell_segmentations``/``nucleus_segmentations``) renamed to ``key``."""
    from spatialdata.models import ShapesModel, TableModel

    shapes_name = f"{dataset_id}_{kind}"
    if shapes_name not in raw.shapes or kind not in raw.tables:
        return None
    src = raw.shapes[shapes_name]
    shapes = ShapesModel.parse(src.copy())  # the copy keeps its transformations
    table = raw.tables[kind].copy()
    table.obs[Col.REGION] = pd.Categorical([key] * table.n_obs)
    del table.uns["spatialdata_attrs"]
    return shapes, TableModel.parse(table, region=key, region_key=Col.REGION, instance_key=Col.CELL_ID)


def visium_hd(
    path: str | Path,
    *,
    bin_size: int = 8,
    extra_bin_sizes: Sequence[int] = (),
    fullres_image: str | Path | None = None,
    dataset_id: str | None = None,
    image_key: str = Key.IMAGE,
    spots_key: str = Key.SPOTS,
    table_key: str = Key.SPOTS_COUNTS,
    **kwargs: Any,
) -> SpatialData:
    """Read a 10x Visium HD Space Ranger folder through :func:`spatialdata_io.visium_hd` into scellst's layout.

    The bins of ``bin_size`` become the spots that training uses: their squares in ``shapes[spots_key]`` (indexed by
    the Space Ranger barcodes) and their raw counts in ``tables[table_key]``. Other bin sizes are kept when asked
    for, and Space Ranger 4 cell and nucleus segmentations are kept when the folder has them.

    Parameters
    ----------
    path
        The Space Ranger ``outs`` folder (with ``binned_outputs/square_XXXum/`` and ``feature_slice.h5``).
    bin_size
        The bin size in um that becomes the spots (2, 8 or 16). 8 um bins (about 700,000 per capture area) are
        the usual choice; 2 um bins (about 11 million) are mostly summed into cells (:func:`scellst.pp.bins_to_cells`).
    extra_bin_sizes
        Other bin sizes to keep, as ``shapes[f"{spots_key}_{size:03d}um"]`` and ``tables[f"{table_key}_{size:03d}um"]``.
    fullres_image
        The full-resolution H&E given to Space Ranger (default: the file in ``microscope_image/``). Without it the
        hires image (too coarse for nuclei) is used and a warning is logged.
    dataset_id
        Names the coordinate system (default: the prefix of ``{id}_feature_slice.h5``, else the folder name).
    image_key, spots_key, table_key
        Names given to the H&E image, the bins of ``bin_size`` and their count table.
    kwargs
        Passed to :func:`spatialdata_io.visium_hd` (e.g. ``filtered_counts_file=False``).

    Returns
    -------
    A SpatialData with ``images[image_key]``, ``shapes[spots_key]``, ``tables[table_key]`` (raw counts;
    ``uns['scellst']['bin_size_um']``), the extra bins, and ``shapes['hd_cells']`` with ``tables['hd_cells_counts']``
    (and ``'hd_nuclei'``) when Space Ranger segmented cells. The microns per pixel of the image come from the Space Ranger scale factors
    and are recorded.
    """
    import spatialdata_io
    from spatialdata import SpatialData

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Visium HD folder {str(path)!r} does not exist.")
    available = hd_bin_sizes(path)
    if not available:
        raise ValueError(
            f"{str(path)!r} has no `binned_outputs/square_XXXum/` folders: it is not a Visium HD Space Ranger `outs` "
            "folder. For Visium (55 um spots) use `scellst.io.visium`."
        )
    wanted = [int(bin_size), *(int(b) for b in extra_bin_sizes if int(b) != int(bin_size))]
    missing = [b for b in wanted if b not in available]
    if missing:
        raise ValueError(f"Bin sizes {missing} um are not in {str(path)!r}; it has {available} um.")
    factors_file = path / "binned_outputs" / f"square_{bin_size:03d}um" / "spatial" / "scalefactors_json.json"
    if not factors_file.exists():
        raise FileNotFoundError(f"{str(factors_file)!r} not found: it gives the microns per pixel of the image.")
    factors = json.loads(factors_file.read_text())
    raw = spatialdata_io.visium_hd(
        path,
        dataset_id=_dataset_id(path, dataset_id),
        load_segmentations_only=False,
        load_nucleus_segmentations=True,
        bin_size=wanted,
        bins_as_squares=True,
        fullres_image_file=fullres_image,
        **kwargs,
    )
    suffix = f"_square_{bin_size:03d}um"
    dataset_id = next(k[: -len(suffix)] for k in raw.shapes if k.endswith(suffix))  # spatialdata-io's choice

    full_key = next((k for k in raw.images if k.endswith("_full_image")), None)
    hires_key = next((k for k in raw.images if k.endswith("_hires_image")), None)
    if full_key is not None:
        main_key = full_key
        mpp = float(factors.get("microns_per_pixel") or bin_size / float(factors["spot_diameter_fullres"]))
    elif hires_key is not None:
        main_key = hires_key
        mpp = bin_size / (float(factors["spot_diameter_fullres"]) * float(factors["tissue_hires_scalef"]))
        logger.warning(
            f"No full-resolution image found: using the hires image ({mpp:.2f} um/px). Nuclei are hard to segment "
            "at this resolution; pass `fullres_image=` for real work."
        )
    else:
        raise ValueError("The Visium HD folder has no image; pass `fullres_image=`.")
    implied = bin_size / float(factors["spot_diameter_fullres"])
    if full_key is not None and not np.isclose(mpp, implied, rtol=1e-3):
        raise ValueError(
            f"{str(factors_file)!r} is inconsistent: microns_per_pixel {mpp:g} but {bin_size} um bins of "
            f"{factors['spot_diameter_fullres']:g} px ({implied:g} um/px)."
        )

    images = {image_key: raw.images[main_key]}
    if hires_key is not None and hires_key != main_key:
        images[f"{image_key}_hires"] = raw.images[hires_key]
    shapes, tables = {}, {}
    for b in wanted:
        s_key = spots_key if b == bin_size else f"{spots_key}_{b:03d}um"
        t_key = table_key if b == bin_size else f"{table_key}_{b:03d}um"
        shapes[s_key], tables[t_key] = _bin_elements(raw, dataset_id, b, s_key, t_key, mpp)
    for kind, key in (("cell_segmentations", HD_CELLS), ("nucleus_segmentations", HD_NUCLEI)):
        found = _segmentation_elements(raw, dataset_id, kind, key)
        if found is not None:
            shapes[key], tables[f"{key}_counts"] = found
    sdata = SpatialData(images=images, shapes=shapes, tables=tables)
    set_microns_per_pixel(sdata, image_key, microns_per_pixel=mpp)
    main = tables[table_key]
    logger.info(
        f"Read Visium HD {dataset_id!r}: {main.n_obs:,} bins of {bin_size} um x {main.n_vars:,} genes, image "
        f"{main_key!r} -> {image_key!r} at {mpp:.3f} um/px (coordinate system {dataset_id!r})"
        + (f"; Space Ranger cells kept as {HD_CELLS!r}" if HD_CELLS in shapes else "")
    )
    return sdata
