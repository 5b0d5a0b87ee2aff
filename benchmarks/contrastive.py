"""Batch-agnostic contrastive image-expression learning (TPIRBAE) on HER2ST, leave-one-section-out (C2-C5).

Usage (from the repository root, with ../shared/data present):

    python benchmarks/contrastive.py [--parts prepare classify pearson] [--sections C2 C3 C4 C5] [--seed 0]
        [--folds C4 C5] [--skip-pearson EfficientNet SSL]

- ``prepare``: segments and embeds the four sections (cached, see ``_common.her2st_section``), then adds two more
  cell embeddings of the nuclei inside spots to each cached store: ImageNet EfficientNet-Lite0 (``efficientnet``) and
  a short MoCo v3 SSL encoder trained on the cells of the four sections without expression (``ssl``; 4 epochs of
  20,000 cells).
- ``classify``: for each held-out section, ``tl.train_contrastive`` on the three others (with and without the
  batch-agnostic gene encoder), then the HER2ST expression cluster of each labelled spot is predicted from the image
  alone: a logistic regression on the spot's mean cell embedding, trained on the three other sections. Balanced
  accuracy per held-out section for the morphology, SSL, EfficientNet-Lite0 and both contrastive embeddings. Batch
  mixing: silhouette of the spot embeddings by section and by cluster, over the four sections.
- ``pearson``: the MIL learner (``tl.train``, the default ensemble) on each embedding, spot-level Pearson on the held-out
  section over the top 50 HVG of the training sections.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from _common import CACHE, DATA, her2st_section, peak_memory_gib

SECTIONS = ("C2", "C3", "C4", "C5")
SSL_EPOCHS, SSL_CELLS = 4, 20_000


def _embed_spot_cells(sdata, key: str, **kwargs) -> None:
    """Embed only the nuclei inside spots (the only ones the spot-level comparisons read) and write the table."""
    from spatialdata import SpatialData

    import scellst

    nuclei = sdata.shapes["nuclei"]
    view = SpatialData(images=dict(sdata.images), shapes={"nuclei": nuclei[nuclei["spot_id"].notna()]})
    view.attrs.update(sdata.attrs)
    scellst.im.embed_cells(view, key_added=key, show_progress_bar=False, **kwargs)
    sdata.tables[key] = view.tables[key]
    sdata.write_element(key)


def prepare(sections) -> dict:
    """The cached sections, each with ``efficientnet`` and ``ssl`` tables of the nuclei in spots (computed once)."""
    import scellst

    slides = {s: her2st_section(s) for s in sections}
    for s, sdata in slides.items():
        if "efficientnet" not in sdata.tables:
            t = time.perf_counter()
            _embed_spot_cells(sdata, "efficientnet", method="efficientnet-lite0")
            print(f"{s}: EfficientNet-Lite0 embedding in {time.perf_counter() - t:.0f} s", flush=True)
    enc = CACHE / "ssl_her2st_contrastive.pt"
    if not enc.exists():
        t = time.perf_counter()
        scellst.im.train_ssl(
            list(slides.values()), path=enc, epochs=SSL_EPOCHS, max_cells=SSL_CELLS, seed=0, show_progress_bar=False
        )
        print(
            f"SSL on the cells of {'-'.join(sections)}: {SSL_EPOCHS} epochs of {SSL_CELLS:,} cells in "
            f"{time.perf_counter() - t:.0f} s",
            flush=True,
        )
    for s, sdata in slides.items():
        if "ssl" not in sdata.tables:
            t = time.perf_counter()
            _embed_spot_cells(sdata, "ssl", method="ssl", encoder=enc)
            print(f"{s}: SSL embedding in {time.perf_counter() - t:.0f} s", flush=True)
    return slides


CLUSTERS = "her2st/cluster_labels/{}-cluster-annotation.tsv.gz"
N_GENES = 50
FIXED = {
    "morphology": "nuclei_embeddings",
    "SSL (MoCo v3, short)": "ssl",
    "EfficientNet-Lite0 (ImageNet)": "efficientnet",
}
CONTRASTIVE = {"contrastive, batch-agnostic gene encoder": True, "contrastive, plain gene encoder (ablation)": False}


def clusters(section: str) -> pd.Series:
    """HER2ST expression cluster of each labelled spot (clusters were made per patient, shared by C2-C5)."""
    df = pd.read_csv(DATA / CLUSTERS.format(section), sep="\t")
    return pd.Series(df["label"].to_numpy(), index=[f"{x}x{y}" for x, y in zip(df["x"], df["y"], strict=True)])


def light(sdata):
    """An in-memory view of a cached section (shapes and tables, no image): fold tables never reach the cache."""
    from spatialdata import SpatialData

    out = SpatialData(shapes=dict(sdata.shapes), tables=dict(sdata.tables))
    out.attrs.update(sdata.attrs)
    return out


def spot_table(sdata, key: str, labels: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Mean scaled cell embedding and cluster of each labelled spot."""
    import scellst

    spots = scellst.tl.spot_embeddings(sdata, table_key=key)
    keep = spots.obs_names.isin(labels.index)
    return np.asarray(spots.X[keep]), labels.loc[spots.obs_names[keep]].to_numpy()


def classify(train_xy, test_xy, seed: int) -> float:
    """Balanced accuracy of a logistic regression (C chosen by leave-one-section-out within the training sections)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import GridSearchCV, LeaveOneGroupOut
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([a for a, _, _ in train_xy])
    y = np.concatenate([b for _, b, _ in train_xy])
    groups = np.concatenate([np.full(len(b), g) for _, b, g in train_xy])
    pipe = make_pipeline(
        StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=5000, random_state=seed)
    )
    grid = GridSearchCV(
        pipe, {"logisticregression__C": [0.001, 0.01, 0.1, 1.0]}, cv=LeaveOneGroupOut(), scoring="balanced_accuracy"
    )
    grid.fit(x, y, groups=groups)
    return float(balanced_accuracy_score(test_xy[1], grid.predict(test_xy[0])))


def silhouettes(xs: list[np.ndarray], ys: list[np.ndarray]) -> tuple[float, float]:
    """Silhouette by section and by cluster of the spots of all sections (standardised, 20 principal components)."""
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score
    from sklearn.preprocessing import StandardScaler

    x = StandardScaler().fit_transform(np.concatenate(xs))
    x = PCA(n_components=min(20, x.shape[1]), random_state=0).fit_transform(x)
    section = np.concatenate([np.full(len(a), i) for i, a in enumerate(xs)])
    return float(silhouette_score(x, section)), float(silhouette_score(x, np.concatenate(ys)))


def run_folds(
    slides: dict, parts: list[str], seed: int, folds: list[str] | None = None, skip_pearson: tuple[str, ...] = ()
) -> pd.DataFrame:
    """Per held-out section: contrastive models on the three others, then classification and/or MIL Pearson."""
    import scellst

    labels = {s: clusters(s) for s in slides}
    views = {s: light(sd) for s, sd in slides.items()}
    rows = []
    for test in folds or list(slides):
        train = [s for s in slides if s != test]
        keys = dict(FIXED)
        for label, agnostic in CONTRASTIVE.items():
            t = time.perf_counter()
            model = scellst.tl.train_contrastive(
                [views[s] for s in train], batch_agnostic=agnostic, seed=seed, show_progress_bar=False
            )
            seconds = time.perf_counter() - t
            key = "contrastive_" + ("batch" if agnostic else "plain")
            for s in slides:
                scellst.tl.embed_contrastive(views[s], model, key_added=key, overwrite=True)
            keys[label] = key
            latent = {}
            for s in slides:
                counts = views[s].tables["spots_counts"]
                lab = labels[s].reindex(counts.obs_names)
                ok = lab.notna().to_numpy()
                x = counts[ok, model.genes].X
                latent[s] = (model.expression_latent(x.toarray() if hasattr(x, "toarray") else x), lab[ok].to_numpy())
            sil_sec, sil_clu = silhouettes([v[0] for v in latent.values()], [v[1] for v in latent.values()])
            rows.append(
                {
                    "fold": test,
                    "embedding": label.replace("contrastive", "gene latent"),
                    "part": "silhouette",
                    "section": sil_sec,
                    "cluster": sil_clu,
                }
            )
            print(
                f"  {test}: {label}: trained in {seconds:.0f} s (best epoch {model.params['best_epoch']}); "
                f"gene latent silhouette by section {sil_sec:.3f}, by cluster {sil_clu:.3f}",
                flush=True,
            )
        for label, key in keys.items():
            tables = {s: spot_table(views[s], key, labels[s]) for s in slides}
            if "classify" in parts:
                acc = classify([(*tables[s], s) for s in train], tables[test], seed)
                sil_sec, sil_clu = silhouettes([tables[s][0] for s in slides], [tables[s][1] for s in slides])
                rows.append({"fold": test, "embedding": label, "part": "classify", "balanced_accuracy": acc})
                rows.append(
                    {"fold": test, "embedding": label, "part": "silhouette", "section": sil_sec, "cluster": sil_clu}
                )
                print(
                    f"  {test}: {label}: balanced accuracy {acc:.3f}; silhouette by section {sil_sec:.3f}, "
                    f"by cluster {sil_clu:.3f}",
                    flush=True,
                )
            if "pearson" in parts and not any(word.lower() in label.lower() for word in skip_pearson):
                t = time.perf_counter()
                genes = scellst.pp.select_genes([views[s] for s in train], n_genes=N_GENES)
                model = scellst.tl.train(
                    [views[s] for s in train], genes=genes, table_key=key, seed=seed, show_progress_bar=False
                )
                r = scellst.bench.evaluate(views[test], model, table_key=key)["pearson"].mean()
                rows.append(
                    {
                        "fold": test,
                        "embedding": label,
                        "part": "pearson",
                        "pearson": r,
                        "seconds": time.perf_counter() - t,
                    }
                )
                print(f"  {test}: {label}: MIL spot Pearson {r:.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
    return pd.DataFrame(rows)


def report(df: pd.DataFrame) -> None:
    pd.set_option("display.width", 200)
    for part, column in (("classify", "balanced_accuracy"), ("pearson", "pearson")):
        sub = df[df["part"] == part]
        if sub.empty:
            continue
        table = sub.pivot_table(index="embedding", columns="fold", values=column, sort=False)
        table["mean"] = table.mean(axis=1)
        print(f"\n{column} on the held-out section:\n{table.round(3).to_string()}")
    sil = df[df["part"] == "silhouette"].groupby("embedding", sort=False)[["section", "cluster"]].mean()
    print(f"\nsilhouette of the spots of C2-C5 (mean over folds; lower by section = better mixed):\n{sil.round(3)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", nargs="+", default=["prepare", "classify", "pearson"])
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", nargs="+", default=None, help="held-out sections to run (default: every section)")
    parser.add_argument(
        "--skip-pearson", nargs="+", default=(), help="embeddings (words of their label) not fed to the MIL learner"
    )
    args = parser.parse_args()
    t0 = time.perf_counter()
    slides = prepare(args.sections)
    print(f"prepared in {time.perf_counter() - t0:.0f} s; peak memory {peak_memory_gib():.2f} GiB", flush=True)
    fold_parts = [p for p in args.parts if p in ("classify", "pearson")]
    if fold_parts:
        t0 = time.perf_counter()
        df = run_folds(slides, fold_parts, args.seed, args.folds, tuple(args.skip_pearson))
        report(df)
        print(f"\nfolds in {time.perf_counter() - t0:.0f} s; peak memory {peak_memory_gib():.2f} GiB")


if __name__ == "__main__":
    main()
