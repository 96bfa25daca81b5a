"""`dualsft info`: what is installed and where the embedded model and cache are."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from dualsft.config import opt
from dualsft.models import EMBEDDED_MODEL, cache_dir, embedded_wheel_folder
from dualsft.runs import versions

HELP = "show versions, the cache folder and whether the embedded model is installed"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InfoConfig:
    load: bool = opt(False, "also load the embedded model once (converts it into the cache on first use)")


CONFIG = InfoConfig


def main(cfg: InfoConfig) -> int:
    info = {"versions": versions(), "cache": str(cache_dir()), "embedded_model": EMBEDDED_MODEL}
    try:
        info["embedded_wheel"] = str(embedded_wheel_folder())
    except Exception as e:  # report, don't fail: info is a diagnostic
        info["embedded_wheel"] = f"missing: {e}"
    if cfg.load:
        from dualsft.models import load_model

        m = load_model(None)
        info["embedded_params"] = sum(p.numel() for p in m.parameters())
    print(json.dumps(info, indent=2))
    return 0
