"""Build notebooks/her2st_celltypes.ipynb from cells (run from the repository root, then execute it)."""

import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
    md(
        "# HER2ST: virtual single cells, cell types from a Xenium reference, galleries and neighbourhoods\n\n"
        "The whole scverse workflow on real data (`../shared/data`): train sCellST on three HER2+ breast cancer "
        "sections (original ST, 100 um spots), predict every nucleus of a held-out section, score cell types with "
        "marker genes from annotated Xenium breast-cancer cells, look at the top cells, compare with the Xenium cells "
        "type by type, and run squidpy's neighbourhood enrichment on the predicted types."
    ),
    code(
        "import warnings\n\nwarnings.filterwarnings('ignore')\n\nimport numpy as np\nimport pandas as pd\n"
        "import squidpy as sq\n\nimport scellst\n\nDATA = scellst.datasets.data_dir()"
    ),
    md("## Slides: segmentation, spot assignment, morphology embeddings"),
    code(
        "slides = {}\nfor section in ['C2', 'C3', 'C4', 'C5']:\n"
        "    s = scellst.datasets.her2st(section, path=DATA / 'her2st')\n"
        "    scellst.im.segment_nuclei(s, show_progress_bar=False)\n"
        "    scellst.pp.assign_cells(s)\n"
        "    scellst.im.embed_cells(s, show_progress_bar=False)\n"
        "    slides[section] = s\nslides['C5']"
    ),
    md(
        "## Marker genes from the Xenium breast-cancer reference\n\n"
        "5,508 annotated Xenium cells (280-gene panel). Markers are restricted to genes that HER2ST measures."
    ),
    code(
        "reference = scellst.datasets.xenium_breast_cells(path=DATA / 'xenium_breast_cells')\n"
        "her2st_genes = slides['C2'].tables['spots_counts'].var_names\n"
        "markers = scellst.tl.marker_genes(reference, groupby='cell_type', n_genes=10,\n"
        "                                  genes=[g for g in reference.var_names if g in set(her2st_genes)])\n"
        "pd.Series({k: ', '.join(v) for k, v in markers.items()}).to_frame('markers')"
    ),
    md(
        "## Train on C2-C4 (marker genes + top variable genes), predict C5\n\n"
        "The model learns the union of the markers and the 50 most variable genes of the training sections."
    ),
    code(
        "hvg = scellst.pp.select_genes([slides[s] for s in ('C2', 'C3', 'C4')], flavor='hvg', n_genes=50)\n"
        "genes = list(dict.fromkeys(hvg + [g for v in markers.values() for g in v]))\n"
        "model = scellst.tl.train([slides[s] for s in ('C2', 'C3', 'C4')], genes=genes, seed=0,\n"
        "                         show_progress_bar=False)\n"
        "test = slides['C5']\nscellst.tl.predict(test, model)\n"
        "scores = scellst.bench.evaluate(test)\n"
        "print(f\"{len(genes)} genes; held-out C5 spot-level mean Pearson {scores['pearson'].mean():.3f}\")\n"
        "scores.sort_values('pearson', ascending=False).head(10)"
    ),
    code("scellst.pl.correlations({'C5 (held out)': scores});"),
    md("## Cell-type scores on the predicted cells"),
    code(
        "scellst.tl.score_cell_types(test, markers)\n"
        "pred = test.tables['nuclei_expression']\npred.obs['predicted_type'].value_counts()"
    ),
    md(
        "Predicted type proportions per spot against the stereoscope deconvolution shipped with HER2ST "
        "(`deconv/C5-proportion.tsv`), for the broad compartments."
    ),
    code(
        "deconv = pd.read_csv(DATA / 'her2st' / 'deconv' / 'C5-proportion.tsv', sep='\\t', index_col=0)\n"
        "print('deconvolution columns:', list(deconv.columns))\n"
        "comp = pd.crosstab(pred.obs['spot_id'], pred.obs['predicted_type'], normalize='index')\n"
        "comp.head()"
    ),
    code(
        "groups = {\n"
        "    'epithelial/cancer': (['Malignant', 'Epithelial'], [c for c in deconv.columns if 'pithelial' in c or 'ancer' in c]),\n"
        "    'immune': (['T', 'B', 'Macrophage', 'Myeloid', 'Plasma'],\n"
        "               [c for c in deconv.columns if any(k in c for k in ('T-cell', 'B-cell', 'Myeloid', 'Plasma', 'T_cell', 'B_cell'))]),\n"
        "    'stroma': (['Fibroblast', 'Endothelial'], [c for c in deconv.columns if any(k in c for k in ('CAF', 'Endothelial', 'PVL', 'ibroblast'))]),\n"
        "}\nrows = []\nshared = comp.index.intersection(deconv.index)\n"
        "for name, (ours, theirs) in groups.items():\n"
        "    a = comp.reindex(columns=ours, fill_value=0).loc[shared].sum(axis=1)\n"
        "    b = deconv.loc[shared, theirs].sum(axis=1) if theirs else pd.Series(np.nan, index=shared)\n"
        "    rows.append({'compartment': name, 'deconv columns': ', '.join(theirs), 'spots': len(shared),\n"
        "                 'Pearson': np.corrcoef(a, b)[0, 1] if theirs else np.nan})\n"
        "pd.DataFrame(rows)"
    ),
    md(
        "## Comparison with the Xenium cells, type by type\n\n"
        "The Xenium cells come from another patient, so cells cannot be matched one to one: the mean predicted "
        "profile of each predicted type is compared with the mean measured profile of the same Xenium type, over "
        "the shared genes (`pearson_centred` removes each gene's mean across types)."
    ),
    code("scellst.tl.compare_cell_types(pred, reference).round(3)"),
    md("## Galleries of the top-scoring cells"),
    code(
        "wanted = ['score_Malignant', 'score_T', 'score_Macrophage', 'score_Fibroblast', 'score_Endothelial']\n"
        "scellst.pl.gallery(test, [k for k in wanted if k in pred.obs], n=10);"
    ),
    md("## Spatial maps and squidpy neighbourhood enrichment of the predicted types"),
    code("scellst.pl.expression(test, ['ERBB2', 'CD74'] if 'CD74' in genes else genes[:2]);"),
    code(
        "sq.gr.spatial_neighbors(pred, coord_type='generic', n_neighs=6)\n"
        "sq.gr.nhood_enrichment(pred, cluster_key='predicted_type', seed=0, show_progress_bar=False)\n"
        "sq.pl.nhood_enrichment(pred, cluster_key='predicted_type', figsize=(5, 4))"
    ),
]
nb = nbf.v4.new_notebook(cells=cells)
nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
nbf.write(nb, "notebooks/her2st_celltypes.ipynb")
