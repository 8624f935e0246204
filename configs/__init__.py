"""fastctx's training configs (YAML), shipped as the package `fastctx.configs`.

A config is found by name: `config_path("apcnet_r18-d8_synthetic")` is the
file `apcnet_r18-d8_synthetic.yaml` next to this module. The schema and the
loader are in `fastctx.engine.config`.
"""
from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
SUFFIX = ".yaml"


def config_names() -> list[str]:
    """Names of the shipped configs (file names without .yaml), sorted."""
    return sorted(p.name[: -len(SUFFIX)] for p in CONFIG_DIR.glob(f"*{SUFFIX}"))


def config_path(name: str) -> Path:
    """The YAML file of the shipped config `name` (with or without the .yaml suffix).

    Raises FileNotFoundError listing the shipped configs when there is none.
    """
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    path = CONFIG_DIR / f"{stem}{SUFFIX}"
    if "/" in stem or "\\" in stem or not path.is_file():
        raise FileNotFoundError(f"no shipped config named {name!r}; available: {', '.join(config_names())}")
    return path


__all__ = ["CONFIG_DIR", "config_names", "config_path"]
