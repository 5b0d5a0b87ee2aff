"""Model, encoder, segmenter and checkpoint files are read as plain data: a crafted file cannot run code."""

from __future__ import annotations

import pytest
import torch

import scellst


class _Payload:
    """Unpickling this object would create the file ``marker`` (arbitrary code execution)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def crafted(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "crafted.pt"
    torch.save({"format_version": 1, "config": _Payload(marker)}, path)
    return path, marker


def test_a_crafted_model_file_cannot_run_code(crafted):
    path, marker = crafted
    loaders = [
        scellst.tl.load_model,
        scellst.models.ScellstModel.load,
        scellst.models.CellEncoder.load,
        scellst.models.NucleusUNet.load,
        scellst.models.encoder_from_weights,
    ]
    for load in loaders:
        with pytest.raises(ValueError, match="not a readable"):
            load(path)
        assert not marker.exists(), f"{load.__qualname__} ran code from the file"


def test_a_crafted_training_checkpoint_cannot_run_code(processed, crafted, tmp_path):
    path, marker = crafted
    ckdir = tmp_path / "ckpt"
    ckdir.mkdir()
    path.rename(ckdir / "member_0.pt")
    with pytest.raises(ValueError, match="not a readable training checkpoint"):
        scellst.tl.train(
            processed, n_models=1, max_epochs=2, checkpoint_dir=ckdir, resume=True, show_progress_bar=False
        )
    assert not marker.exists()
