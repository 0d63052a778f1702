"""Where the files that ship with vitscale are: ``configs/`` (experiments) and ``ds_configs/``
(DeepSpeed presets) sit at the top of the source tree and, in an installed (non-editable) copy,
inside the package (setup.py maps them there)."""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent


def shipped(folder: str) -> list[Path]:
    """The places a shipped folder (``configs``, ``ds_configs``) can be, source tree first."""
    return [_PACKAGE.parent / folder, _PACKAGE / folder]
