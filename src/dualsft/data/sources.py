"""Where a data split comes from: a file, a saved HF ``datasets`` folder, or a Hub dataset by name.

Every option that takes a data file (``--pool``, ``--target``, ``--train-file``, ``--test``, ...) takes a
*source spec*:

    data/pool.jsonl                     JSONL, or JSON (a list of objects, or {"data": [...]})
    data/saved                          a folder written by ``Dataset(Dict).save_to_disk``: split "train"
                                        (or its only split)
    data/saved@test                     the same folder, split "test"
    hf://owner/name                     ``datasets.load_dataset("owner/name", None, split="train")``
    hf://owner/name:config@test         ``datasets.load_dataset("owner/name", "config", split="test")``
    ...?prompt=problem&response=solution
                                        read the prompt and response from these columns (any spec above)

A path that exists as written is always a path (so a file named ``a@b.jsonl`` still reads). Mapped columns
become ``prompt``/``completion`` in the records dualsft keeps and writes (``selection/subset.jsonl``), so
later stages read those files without the mapping.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl

from dualsft.errors import DataFormatError
from dualsft.io import iter_jsonl

HUB = "hf://"
SPELLINGS = ("FILE.jsonl", "FOLDER[@split]", "hf://owner/name[:config][@split]", "...?prompt=COL&response=COL")


@dataclass(frozen=True)
class DataSource:
    """A parsed source spec.

    kind: "file" (JSONL/JSON), "disk" (a ``save_to_disk`` folder) or "hub" (``datasets.load_dataset``).
    location: the file or folder path, or the dataset name given to ``load_dataset`` (a Hub id or a local
    folder of data files). config / split: ``load_dataset``'s ``name`` and ``split`` (None: the default).
    columns: (prompt column, response column), or None to detect the schema per record.
    """

    spec: str
    kind: Literal["file", "disk", "hub"]
    location: str
    config: str | None = None
    split: str | None = None
    columns: tuple[str, str] | None = None

    @property
    def is_plain_path(self) -> bool:
        """A file or folder read as is (no split, no column mapping): fingerprinted by its bytes, as always."""
        return self.kind != "hub" and self.split is None and self.columns is None


def parse_source(spec: str | Path) -> DataSource:
    """Parse a source spec (module docstring); raises DataFormatError naming the spec and the spellings."""
    spec = str(spec)
    if not spec:
        raise DataFormatError(f"empty data source; use one of {', '.join(SPELLINGS)}")
    if Path(spec).exists():
        return DataSource(spec, "disk" if Path(spec).is_dir() else "file", spec)
    base, columns = _split_columns(spec)
    if base.startswith(HUB):
        rest, split = _split_last(base[len(HUB):], "@")
        name, config = _split_last(rest, ":")
        if not name:
            raise DataFormatError(f"data source {spec!r}: no dataset name after {HUB}; use {SPELLINGS[2]}")
        return DataSource(spec, "hub", name, config, split, columns)
    path, split = (base, None) if Path(base).exists() else _split_last(base, "@")
    p = Path(path)
    if not p.exists():
        raise DataFormatError(f"data file {path} does not exist (source {spec!r}; spellings: {', '.join(SPELLINGS)})")
    if split is not None and not p.is_dir():
        raise DataFormatError(f"data source {spec!r}: @{split} names a split, but {path} is a file, not a saved "
                              "dataset folder; drop the @split")
    return DataSource(spec, "disk" if p.is_dir() else "file", path, None, split, columns)


def _split_last(text: str, sep: str) -> tuple[str, str | None]:
    """("a/b", "x") from "a/b<sep>x" where sep comes after the last "/" (a folder name may hold it); else (text, None)."""
    head, slash, tail = text.rpartition("/")
    if sep not in tail:
        return text, None
    left, _, value = tail.rpartition(sep)
    if not value:
        raise DataFormatError(f"data source {text!r}: nothing after {sep!r}")
    return head + slash + left, value


def _split_columns(spec: str) -> tuple[str, tuple[str, str] | None]:
    if "?" not in spec:
        return spec, None
    base, _, query = spec.rpartition("?")
    try:
        pairs = dict(parse_qsl(query, strict_parsing=True))
    except ValueError:
        pairs = {}
    if set(pairs) != {"prompt", "response"}:
        raise DataFormatError(f"data source {spec!r}: the column mapping must be ?prompt=COLUMN&response=COLUMN, "
                              f"got ?{query}")
    return base, (pairs["prompt"], pairs["response"])


def read_records(src: DataSource) -> list[tuple[str, Any]]:
    """(where, raw record) for every record of the source, in order; ``where`` (``file:line``,
    ``spec[i]``) goes into every later error. Mapped columns are renamed prompt/completion."""
    if src.kind == "file":
        records = _read_file(Path(src.location))
    else:
        rows, names = _read_dataset(src)
        if src.columns:
            missing = [c for c in src.columns if c not in names]
            if missing:
                raise DataFormatError(f"{src.spec}: column(s) {missing} not in the dataset; available columns: "
                                      f"{names}")
        records = [(f"{src.spec}[{i}]", r) for i, r in enumerate(rows)]
    if not records:
        raise DataFormatError(f"{src.spec}: no examples in the file")
    return [(where, map_columns(r, src.columns, where)) for where, r in records]


def map_columns(record: Any, columns: tuple[str, str] | None, where: str) -> Any:
    """``record`` with columns (prompt, response) renamed ``prompt``/``completion`` (the completion schema);
    raises DataFormatError listing the record's columns when one is missing."""
    if columns is None or not isinstance(record, dict):
        return record
    missing = [c for c in columns if c not in record]
    if missing:
        raise DataFormatError(f"{where}: column(s) {missing} missing; available columns: {sorted(record)}")
    drop = {*columns, "messages"}  # so the mapped pair is THE schema when the record is read again
    return {**{k: v for k, v in record.items() if k not in drop}, "prompt": record[columns[0]],
            "completion": record[columns[1]]}


def _read_file(path: Path) -> list[tuple[str, Any]]:
    if path.suffix != ".json":
        return [(f"{path}:{ln}", r) for ln, r in iter_jsonl(path)]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: a .json data file must hold a list of objects")
    return [(f"{path}[{i}]", r) for i, r in enumerate(data)]


def _read_dataset(src: DataSource) -> tuple[list[dict], list[str]]:
    """(rows as dicts, column names) of a saved folder or a ``load_dataset`` split."""
    try:
        import datasets  # optional dependency
    except ImportError as e:
        raise DataFormatError(f"{src.spec}: reading HF datasets needs `pip install datasets`") from e
    if src.kind == "disk":
        ds = datasets.load_from_disk(src.location)
    else:
        try:  # the Hub (or its cache, or a local folder of data files); network and format errors alike
            ds = datasets.load_dataset(src.location, src.config, split=src.split or "train")
        except Exception as e:  # noqa: BLE001 - one typed error with the spec for every loader failure
            raise DataFormatError(f"{src.spec}: datasets.load_dataset({src.location!r}, {src.config!r}, "
                                  f"split={src.split or 'train'!r}) failed: {' '.join(str(e).split())}") from e
    ds = pick_split(ds, src)
    return [dict(r) for r in ds], list(ds.column_names)


def pick_split(ds: Any, src: DataSource) -> Any:
    """The split ``src`` names from a DatasetDict (default: "train", else its only split); a Dataset as is."""
    if not isinstance(ds, dict):  # a Dataset (a DatasetDict is a dict of split -> Dataset)
        if src.split is not None and src.kind == "disk":
            raise DataFormatError(f"{src.spec}: {src.location} holds one Dataset, not a DatasetDict with splits; "
                                  "drop the @split")
        return ds
    splits = list(ds)
    if src.split is not None:
        if src.split not in splits:
            raise DataFormatError(f"{src.spec}: no split {src.split!r}; available splits: {splits}")
        return ds[src.split]
    if "train" in splits or len(splits) == 1:
        return ds["train" if "train" in splits else splits[0]]
    raise DataFormatError(f"{src.spec}: no 'train' split and several others {splits}; name one as @split")


def source_fingerprint(spec: str | Path) -> dict[str, Any]:
    """The metadata entry that identifies a source: ``{"path", "fingerprint"}``, plus ``"source"`` (kind,
    name, config, split, columns, sha256 of the records) for a dataset split or a column mapping.

    A plain file or folder keeps its byte fingerprint (``runs.file_fingerprint``), so the metadata of runs
    made before sources existed still matches."""
    from dualsft.runs import file_fingerprint

    src = parse_source(spec)
    if src.is_plain_path:
        return {"path": str(spec), "fingerprint": file_fingerprint(src.location)}
    content = records_sha256([r for _, r in read_records(src)])
    # a local folder is named by its last component (paths are recorded relative to the working directory, so
    # the same folder is spelled differently from elsewhere); a Hub dataset by its full name
    local = src.kind == "disk" or Path(src.location).exists()
    name = Path(src.location).name if local else src.location
    ident = {"kind": src.kind, "name": name, "config": src.config, "split": src.split,
             "columns": list(src.columns) if src.columns else None, "content_sha256": content}
    fp = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return {"path": str(spec), "fingerprint": fp, "source": ident}


def records_sha256(records: list[Any]) -> str:
    """sha256 of the records as canonical JSON (sorted keys; non-JSON values by str), in order."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, default=str, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()

