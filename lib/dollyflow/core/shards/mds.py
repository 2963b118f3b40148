"""Exporting a shard directory as Mosaic Streaming (MDS) datasets (optional: needs the
``mosaicml-streaming`` package, imported only when used)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from dollyflow.core.shards.manifest import read_manifest
from dollyflow.core.shards.shard_file import read_table
from dollyflow.core.storage import join


def mds_available() -> bool:
    """Whether ``mosaicml-streaming`` can be imported here."""
    try:
        import streaming  # noqa: F401
    except Exception:  # ImportError, or its own imports (torchvision) failing
        return False
    return True


def export_mds(directory: str | Path, out_dir: str | Path | None = None,
               splits: Sequence[str] | None = None) -> dict[str, str]:
    """Write each split of a shard directory as a Mosaic Streaming (MDS) dataset under
    ``out_dir/<split>`` (default ``<directory>/mds``). Columns: input_ids (ndarray:int32),
    response_start and length (int32), record_id and category (str). Needs the
    ``mosaicml-streaming`` package; raises a clear error when it cannot be imported."""
    try:
        from streaming import MDSWriter
    except Exception as exc:  # pragma: no cover - depends on the optional package
        raise RuntimeError("MDS export needs the mosaicml-streaming package (pip install "
                           f"mosaicml-streaming); it could not be imported: {exc}") from exc
    directory = Path(directory)
    out_root = Path(out_dir) if out_dir else directory / "mds"
    manifest = read_manifest(directory)
    columns = {"record_id": "str", "category": "str", "input_ids": "ndarray:int32",
               "response_start": "int32", "length": "int32"}
    written = {}
    for split in splits or sorted(manifest["splits"]):
        target = out_root / split
        with MDSWriter(out=str(target), columns=columns, compression="zstd") as w:
            for entry in manifest["splits"][split]["shards"]:
                t = read_table(join(str(directory), entry["file"]))
                for row in t.to_pylist():
                    w.write({"record_id": row["record_id"], "category": row["category"] or "",
                             "input_ids": np.asarray(row["input_ids"], dtype=np.int32),
                             "response_start": int(row["response_start"]), "length": int(row["length"])})
        written[split] = str(target)
    return written
