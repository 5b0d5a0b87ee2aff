"""Reading model files saved with ``torch.save`` (weights only, no pickled code)."""

from __future__ import annotations

from pathlib import Path


def load_payload(path: str | Path, *, what: str) -> dict:
    """The dictionary stored in a model file, with clear errors for a missing or unreadable file."""
    import torch

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what[0].upper()}{what[1:]} {str(path)!r} does not exist.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{str(path)!r} is not a readable {what} ({err}).") from err
    if not isinstance(payload, dict):
        raise ValueError(f"{str(path)!r} is not a {what}.")
    return payload


def save_payload(payload: dict, path: str | Path) -> Path:
    """Write a model file with ``torch.save`` atomically: a temporary file, then a rename (never half-written)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path
