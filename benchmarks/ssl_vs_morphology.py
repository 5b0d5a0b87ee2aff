"""HER2ST: an SSL embedding table against the morphology features, alone and concatenated with them.

Usage (from the repository root, after `benchmarks/embeddings.py` has written the SSL table into the cached
sections, e.g. `python benchmarks/embeddings.py --skip-consep --skip-throughput --her2st-epochs 12
--her2st-max-cells 50000 --ssl-tag long --seeds 0 1 2 --methods ssl`):

    python benchmarks/ssl_vs_morphology.py [--table nuclei_ssl_long]

Prints, for the morphology table, the SSL table and their concatenation (morphology features next to the SSL
features of the same cells): the C5 mean spot Pearson of models trained on C2-C4 for MIL seeds 0/1/2 (top 50 HVG,
default `tl.train` settings), and the leave-one-section-out mean Pearson per held-out section (`bench.cross_validate`).
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
from _common import her2st_section, peak_memory_gib

SECTIONS = ["C2", "C3", "C4", "C5"]


def main() -> None:
    import anndata as ad

    import scellst

    parser = argparse.ArgumentParser()
    parser.add_argument("--table", default="nuclei_ssl_long", help="SSL embedding table of the cached sections")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    slides = {s: her2st_section(s, verbose=False) for s in SECTIONS}
    for name, sdata in slides.items():
        if args.table not in sdata.tables:
            raise SystemExit(f"{name} has no table {args.table!r}; run benchmarks/embeddings.py first (see above).")
        ssl, morph = sdata.tables[args.table], sdata.tables["nuclei_embeddings"]
        if not (ssl.obs["cell_id"].astype(str).to_numpy() == morph.obs["cell_id"].astype(str).to_numpy()).all():
            raise SystemExit(f"{name}: the two tables list the cells in different orders.")
        both = ad.AnnData(
            X=np.column_stack([np.asarray(morph.X), np.asarray(ssl.X)]).astype(np.float32),
            obs=ssl.obs.copy(),
            uns=copy.deepcopy(dict(ssl.uns)),
        )
        both.obsm["spatial"] = np.asarray(ssl.obsm["spatial"])
        both.uns["scellst"]["method"] = "morphology+ssl"
        sdata.tables["morphology_ssl"] = both  # in memory only
    for key in ("nuclei_embeddings", args.table, "morphology_ssl"):
        per_seed = []
        for seed in args.seeds:
            model = scellst.tl.train(
                [slides[s] for s in SECTIONS[:3]], table_key=key, n_top_genes=50, seed=seed, show_progress_bar=False
            )
            test = scellst.bench.evaluate(slides["C5"], model, table_key=key)
            per_seed.append(float(test["pearson"].mean()))
        cv = scellst.bench.cross_validate(slides, table_key=key, baselines=(), n_genes=50)
        folds = cv.groupby("fold")["pearson"].mean()
        print(
            f"{key:>18}: C5 seeds {' / '.join(f'{r:.3f}' for r in per_seed)} (mean {np.mean(per_seed):.3f}) | "
            f"LOSO {' / '.join(f'{k} {v:.3f}' for k, v in folds.items())} (mean {folds.mean():.3f})",
            flush=True,
        )
    print(f"peak memory (max RSS): {peak_memory_gib():.2f} GiB")


if __name__ == "__main__":
    main()
