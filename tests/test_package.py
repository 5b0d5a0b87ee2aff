from __future__ import annotations

import subprocess
import sys


def test_import_does_not_load_torch():
    code = "import sys, scellst; assert 'torch' not in sys.modules, 'torch imported'; print(scellst.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_public_namespaces():
    import scellst

    for ns, names in {
        "io": ["visium", "from_spots", "from_image", "read_nuclei", "set_microns_per_pixel"],
        "pp": ["segment_nuclei", "assign_cells", "select_genes"],
        "tl": ["embed_cells", "train", "predict", "evaluate", "cross_validate", "train_segmenter"],
        "pl": ["expression"],
        "datasets": ["synthetic_tissue", "her2st"],
    }.items():
        module = getattr(scellst, ns)
        for name in names:
            assert callable(getattr(module, name)), f"scellst.{ns}.{name}"
