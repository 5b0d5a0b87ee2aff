"""Choosing the torch device that training and inference run on."""

from __future__ import annotations


def resolve_device(device: str):
    """The :class:`torch.device` for ``device``.

    ``device`` is ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
    An unknown name, or a GPU that this torch cannot use, is a :class:`ValueError` that says what to pass instead.
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"`device` must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; got {device!r}.") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"`device={device!r}` but this torch sees no CUDA GPU (a CPU-only build, or no driver); pass "
                "device='cpu' (or 'auto'), or install a CUDA build of torch."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"`device={device!r}`: only {torch.cuda.device_count()} CUDA device(s) are visible.")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"`device={device!r}` but MPS is not available here; pass device='cpu' (or 'auto').")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"`device` must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; got {device!r}.")
    return dev
