"""Cell embeddings: CoNSeP linear probe, HER2ST spot-level prediction, throughput and a nearest-neighbour gallery.

Usage (from the repository root, with ../shared/data present):

    python benchmarks/embeddings.py [--skip-consep] [--skip-her2st] [--skip-throughput]
        [--consep-epochs 15] [--her2st-epochs 6] [--her2st-max-cells 30000] [--seeds 0 1 2] [--reuse]

1. CoNSeP (224 patches, 4 classes): every embedding (morphology, random-init ResNet, MoCo v3 SSL trained on the
   CoNSeP cells without labels, ImageNet EfficientNet-Lite0) -> logistic-regression probe of the nucleus class,
   7-fold cross-validation grouped by source image (never the same image in train and test).
2. HER2ST: SSL on the cells of C2-C5 (no expression used), then the same MIL model (top 50 HVG) trained on C2-C4
   with each embedding and scored on C5 (mean spot Pearson).
3. Throughput: crop extraction + embedding in cells per second, SSL seconds per epoch for 100k cells, peak memory.
4. A gallery PNG of nearest neighbours in SSL space (benchmarks/results/ssl_neighbours.png).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import CACHE, DATA, her2st_section, peak_memory_gib

METHODS = ("morphology", "random", "ssl", "efficientnet-lite0")


def probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """Mean accuracy and balanced accuracy of a logistic-regression probe, folds grouped by source image."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    acc, bacc = [], []
    for tr, te in GroupKFold(n_splits=7).split(x, y, groups):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1))
        clf.fit(x[tr], y[tr])
        pred = clf.predict(x[te])
        acc.append(accuracy_score(y[te], pred))
        bacc.append(balanced_accuracy_score(y[te], pred))
    return float(np.mean(acc)), float(np.mean(bacc))


def embed(sdata, method: str, encoder=None, key: str | None = None) -> float:
    import scellst

    t = time.perf_counter()
    scellst.im.embed_cells(
        sdata, method=method, encoder=encoder, key_added=key or method, overwrite=True, show_progress_bar=False
    )
    return time.perf_counter() - t


def consep(epochs: int) -> None:
    import scellst

    sdata = scellst.datasets.consep(path=DATA / "consep")
    nuclei = sdata.shapes["nuclei"]
    y = nuclei["class"].astype(str).to_numpy()
    groups = nuclei["source_image"].to_numpy()
    print(f"CoNSeP: {len(nuclei):,} nuclei, classes {dict(nuclei['class'].value_counts())}", flush=True)
    enc_path = CACHE / "ssl_consep.pt"
    t = time.perf_counter()
    for p in (enc_path, Path(str(enc_path) + ".ckpt")):
        p.unlink(missing_ok=True)
    scellst.im.train_ssl(sdata, path=enc_path, epochs=epochs, seed=0, show_progress_bar=False)
    Path(str(enc_path) + ".ckpt").unlink()
    print(f"SSL on CoNSeP cells: {epochs} epochs in {time.perf_counter() - t:.0f} s", flush=True)
    print(f"{'embedding':>20} {'dim':>5} {'accuracy':>9} {'balanced':>9} {'embed s':>8}")
    for method in METHODS:
        dt = embed(sdata, method, encoder=enc_path if method == "ssl" else None)
        x = np.asarray(sdata.tables[method].X)
        acc, bacc = probe(x, y, groups)
        print(f"{method:>20} {x.shape[1]:>5} {acc:>9.3f} {bacc:>9.3f} {dt:>8.1f}", flush=True)
    majority = (y == "spindle").mean()
    print(f"{'majority class':>20} {'':>5} {majority:>9.3f} {0.25:>9.3f}")
    gallery(sdata, "ssl", CACHE / "ssl_neighbours.png")


def gallery(sdata, key: str, out: Path, n_queries: int = 8, k: int = 7) -> None:
    """Query cells (first column, one per class where possible) and their nearest neighbours in embedding space."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.neighbors import NearestNeighbors

    import scellst

    x = np.asarray(sdata.tables[key].X)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    nuclei = sdata.shapes["nuclei"]
    cls = nuclei["class"].astype(str).to_numpy()
    rng = np.random.default_rng(1)
    queries = [rng.choice(np.flatnonzero(cls == c)) for c in np.unique(cls) for _ in range(2)][:n_queries]
    nn = NearestNeighbors(n_neighbors=k + 1).fit(x)
    _, idx = nn.kneighbors(x[queries])
    crops = scellst.im.cell_crops(sdata, "nuclei")
    fig, axes = plt.subplots(len(queries), k + 1, figsize=(1.2 * (k + 1), 1.3 * len(queries)))
    for r, row in enumerate(idx):
        imgs = crops.get(row)
        for c, (i, img) in enumerate(zip(row, imgs, strict=True)):
            ax = axes[r, c]
            ax.imshow(img.transpose(1, 2, 0))
            ax.set_title(cls[i][:5], fontsize=7, color="k" if cls[i] == cls[row[0]] else "r")
            ax.axis("off")
    fig.suptitle(f"Nearest neighbours in {key} space (first column: query; red: other class)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    same = np.mean([[cls[j] == cls[row[0]] for j in row[1:]] for row in nn.kneighbors(x[:2000])[1]])
    print(f"gallery: {out}; {k}-NN class agreement over 2,000 cells: {same:.3f}", flush=True)


def her2st(
    epochs: int,
    max_cells: int,
    n_genes: int,
    seeds: list[int],
    reuse: bool,
    methods: list[str],
    n_models: int = 1,
    tag: str = "",
) -> None:
    import scellst

    sections = ["C2", "C3", "C4", "C5"]
    slides = {s: her2st_section(s) for s in sections}
    enc_path = CACHE / (f"ssl_her2st_{tag}.pt" if tag else "ssl_her2st.pt")
    if not (reuse and enc_path.exists()):
        t = time.perf_counter()
        for p in (enc_path, Path(str(enc_path) + ".ckpt")):  # a fresh run, even after an interrupted one
            p.unlink(missing_ok=True)
        scellst.im.train_ssl(
            list(slides.values()), path=enc_path, epochs=epochs, max_cells=max_cells, seed=0, show_progress_bar=False
        )
        Path(str(enc_path) + ".ckpt").unlink()
        print(f"SSL on HER2ST C2-C5 cells ({max_cells:,} sampled): {epochs} epochs in {time.perf_counter() - t:.0f} s")
    print(f"{'embedding':>20} {'seed':>5} {'Pearson':>8} {'Spearman':>9} {'embed s (4 sections)':>21}", flush=True)
    for method in methods:
        key = "nuclei_embeddings" if method == "morphology" else f"nuclei_{method}"
        if method == "ssl" and tag:
            key = f"nuclei_ssl_{tag}"
        dt = 0.0
        if method != "morphology" and not (reuse and all(key in s.tables for s in slides.values())):
            for s in slides.values():
                dt += embed(s, method, encoder=enc_path if method == "ssl" else None, key=key)
        for seed in seeds:
            model = scellst.tl.train(
                [slides[s] for s in sections[:3]],
                table_key=key,
                n_top_genes=n_genes,
                seed=seed,
                n_models=n_models,
                show_progress_bar=False,
            )
            test = slides["C5"]
            scellst.tl.predict(test, model, table_key=key, overwrite=True)
            corr = scellst.bench.evaluate(test)
            print(
                f"{method:>20} {seed:>5} {corr['pearson'].mean():>8.3f} {corr['spearman'].mean():>9.3f} {dt:>21.1f}",
                flush=True,
            )


def throughput() -> None:
    import scellst

    sdata = her2st_section("C5", verbose=False)
    n = len(sdata.shapes["nuclei"])
    crops = scellst.im.cell_crops(sdata, "nuclei")
    t = time.perf_counter()
    for _ in crops.iter_tiles():
        pass
    dt_crop = time.perf_counter() - t
    print(f"crop extraction alone: {n / dt_crop:,.0f} cells/s ({n:,} cells of C5)")
    for method in ("random", "efficientnet-lite0"):
        dt = embed(sdata, method, key="tmp_throughput")
        print(f"crops + {method} embedding: {n / dt:,.0f} cells/s")
    t = time.perf_counter()
    path = CACHE / "ssl_timing.pt"
    for p in (path, Path(str(path) + ".ckpt")):
        p.unlink(missing_ok=True)
    enc = scellst.im.train_ssl(sdata, path=path, epochs=1, seed=0, show_progress_bar=False)
    sec = enc.history["seconds"][0]
    print(
        f"SSL (resnet_tiny, batch 256): {sec:.0f} s per epoch of {n:,} cells -> {sec * 100_000 / n:.0f} s per 100k cells"
    )
    for p in (path, Path(str(path) + ".ckpt")):
        p.unlink(missing_ok=True)
    print(
        f"total incl. crop caching {time.perf_counter() - t:.0f} s; peak memory (max RSS) {peak_memory_gib():.2f} GiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-consep", action="store_true")
    parser.add_argument("--skip-her2st", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--consep-epochs", type=int, default=15)
    parser.add_argument("--her2st-epochs", type=int, default=6)
    parser.add_argument("--her2st-max-cells", type=int, default=30000)
    parser.add_argument("--n-genes", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="MIL training seeds on HER2ST")
    parser.add_argument("--reuse", action="store_true", help="reuse the HER2ST encoder and embedding tables")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--n-models", type=int, default=1, help="MIL ensemble size on HER2ST")
    parser.add_argument(
        "--ssl-tag", default="", help="name a separate HER2ST encoder and table (e.g. a longer run beside the default)"
    )
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    if not args.skip_consep:
        consep(args.consep_epochs)
    if not args.skip_her2st:
        her2st(
            args.her2st_epochs,
            args.her2st_max_cells,
            args.n_genes,
            args.seeds,
            args.reuse,
            args.methods,
            args.n_models,
            args.ssl_tag,
        )
    if not args.skip_throughput:
        throughput()
    print(f"peak memory (max RSS): {peak_memory_gib():.2f} GiB")


if __name__ == "__main__":
    main()
