"""Safe loading: the package never uses pickle or an unrestricted torch.load."""

from __future__ import annotations

import re
from pathlib import Path

import dualsft

SRC = Path(dualsft.__file__).parent


def test_no_pickle_and_no_unsafe_torch_load():
    offenders = []
    for f in sorted(SRC.rglob("*.py")):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\b(import\s+pickle|from\s+pickle|cPickle|dill|joblib|pickle\.)", code):
                offenders.append(f"{f.name}:{n}: {line.strip()}")
            if "torch.load(" in code and "weights_only=True" not in code:
                offenders.append(f"{f.name}:{n}: {line.strip()}")
            if re.search(r"\btorch\.save\(|\bnp\.save\(|allow_pickle\s*=\s*True", code):
                offenders.append(f"{f.name}:{n}: {line.strip()}")
    assert not offenders, "unsafe serialisation:\n" + "\n".join(offenders)
