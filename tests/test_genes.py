from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import scellst
from scellst.pp._genes import gene_filter, rmax


def test_select_genes_flavors(processed):
    hvg = scellst.pp.select_genes(processed, flavor="hvg", n_genes=10)
    svg = scellst.pp.select_genes(processed, flavor="svg", n_genes=10)
    rx = scellst.pp.select_genes(processed, flavor="rmax", n_genes=10)
    for genes in (hvg, svg, rx):
        assert len(genes) == 10
        assert len(set(genes)) == 10
    # cell-type markers vary between spots far more than housekeeping genes
    housekeeping = {"ACTB", "GAPDH", "B2M", "MALAT1"}
    assert not housekeeping & set(hvg[:5])
    assert not housekeeping & set(svg[:5])
    assert scellst.pp.select_genes(processed, flavor=["EPCAM", "CD3E"]) == ["EPCAM", "CD3E"]
    with pytest.raises(KeyError, match="missing"):
        scellst.pp.select_genes(processed, flavor=["EPCAM", "NOPE"])
    with pytest.raises(ValueError, match="Unknown gene selection flavor"):
        scellst.pp.select_genes(processed, flavor="magic")


def test_select_genes_is_batch_aware_across_slides(processed):
    genes = scellst.pp.select_genes([processed, processed], flavor="hvg", n_genes=5)
    assert len(genes) == 5


def test_rmax_matches_its_definition():
    rng = np.random.default_rng(0)
    poisson = rng.poisson(5.0, size=(4000, 1))
    overdispersed = rng.poisson(rng.gamma(1.0, 5.0, size=(4000, 1)))
    table = ad.AnnData(X=np.hstack([poisson, overdispersed]).astype(np.float32), var=pd.DataFrame(index=["p", "o"]))
    r = rmax([table], ["p", "o"])
    assert r["p"] < 0.15  # Poisson: variance = mean, no signal above the noise
    # gamma-Poisson with shape 1 and mean 5: var = 5 + 25, so rmax = sqrt(1 - 5/30) = 0.913
    assert r["o"] == pytest.approx(np.sqrt(1 - 5 / 30), abs=0.03)


def test_gene_filter_thresholds():
    x = np.zeros((100, 3), dtype=np.float32)
    x[:, 0] = 3  # 300 counts, every spot
    x[:5, 1] = 50  # 250 counts, 5 % of spots
    x[:, 2] = 1  # 100 counts
    table = ad.AnnData(X=x, var=pd.DataFrame(index=["keep", "rare", "low"]))
    assert gene_filter([table]) == ["keep"]
    assert gene_filter([table], min_spot_fraction=0.05) == ["keep", "rare"]
    table.var_names = ["MT-CO1", "rare", "low"]
    with pytest.raises(ValueError, match="No gene passes"):
        gene_filter([table], exclude_mt=True)
