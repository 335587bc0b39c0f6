"""Local model loading must never reach the network, and must not leave the process offline.

transformers and huggingface_hub honour HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, and
huggingface_hub freezes them into `constants.HF_HUB_OFFLINE` when it is first imported. We set
them while a model loads and put everything back afterwards, so the Hub screen and `/api/pull`
in the same process still work (and a user who set them keeps them).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

_KEYS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


@contextmanager
def local_only() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in _KEYS}
    os.environ.update({k: "1" for k in _KEYS})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        constants = sys.modules.get("huggingface_hub.constants")
        if constants is not None:
            constants.HF_HUB_OFFLINE = _truthy(saved["HF_HUB_OFFLINE"]) or _truthy(saved["TRANSFORMERS_OFFLINE"])
