from __future__ import annotations

import logging

logger = logging.getLogger("scellst")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s [scellst] %(message)s"))
    logger.addHandler(_handler)
    if logger.level == logging.NOTSET:  # keep a level the user set before importing scellst
        logger.setLevel(logging.INFO)
    logger.propagate = False
