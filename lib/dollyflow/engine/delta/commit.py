"""Commits: what one write or merge committed (:class:`Commit`), and the metadata that finds it.

Every write carries a unique write id (with its job and run id) in its commit's metadata;
:func:`history_meta` reads them back from a history entry of either backend, so a write finds
*its own* commit, never "the latest version".
"""
from __future__ import annotations

import json

COMMIT_RETRIES = 20          # merges retried after a conflicting concurrent commit


class Commit(int):
    """What one :meth:`DeltaStore.write` or :meth:`DeltaStore.merge` call committed.

    It *is* the version its own commit got (an ``int``, so ``store.write(...) == 3`` works), and
    carries that commit's numbers, read from the commit itself: ``rows`` (rows the commit added:
    written rows of an append or overwrite, inserted + updated rows of a merge), ``inserted``,
    ``updated``, ``operation``, ``metrics`` (the commit's operation metrics), ``read_version``
    (the table version the commit was based on, when known) and ``write_id``. ``committed`` is
    False when nothing was committed (an empty append with ``skip_empty``, a merge of no rows);
    the version is then the table's version at that moment.
    """

    version: int
    operation: str
    rows: int
    inserted: int
    updated: int
    metrics: dict
    write_id: str
    committed: bool
    read_version: int | None

    def __new__(cls, version: int, *, operation: str, rows: int, inserted: int | None = None,
                updated: int = 0, metrics: dict | None = None, write_id: str = "", committed: bool = True,
                read_version: int | None = None):
        self = super().__new__(cls, int(version))
        self.version = int(version)
        self.operation = operation
        self.rows = int(rows)
        self.inserted = int(rows if inserted is None else inserted)
        self.updated = int(updated)
        self.metrics = dict(metrics or {})
        self.write_id = write_id
        self.committed = committed
        self.read_version = None if read_version is None else int(read_version)
        return self

    def __str__(self) -> str:          # formats as the version number, like the int it is
        return str(self.version)

    def __format__(self, spec: str) -> str:
        return format(self.version, spec)

    def __repr__(self) -> str:
        return (f"Commit(version={self.version}, operation={self.operation!r}, rows={self.rows}, "
                f"inserted={self.inserted}, updated={self.updated}, committed={self.committed})")

    def as_dict(self) -> dict:
        return {"version": self.version, "operation": self.operation, "rows": self.rows,
                "inserted": self.inserted, "updated": self.updated, "committed": self.committed,
                "read_version": self.read_version}


def user_metadata(job: str, run_id: str, write_id: str = "") -> str:
    """The JSON a commit carries as its ``userMetadata``: job, run_id, write_id."""
    return json.dumps({"job": job, "run_id": run_id, "write_id": write_id}, sort_keys=True)


def commit_options(job: str, run_id: str, write_id: str) -> dict[str, str]:
    """A delta-rs commit's custom metadata: job, run_id, write_id and the same as userMetadata."""
    return {"job": job, "run_id": run_id, "write_id": write_id,
            "userMetadata": user_metadata(job, run_id, write_id)}


def history_meta(entry: dict) -> dict:
    """job, run_id, write_id of a history entry: delta-rs keeps them as top-level custom metadata,
    Delta Spark inside the ``userMetadata`` JSON."""
    meta: dict = {}
    raw = entry.get("userMetadata")
    if raw:
        try:
            parsed = json.loads(raw)
            if isinstance(parsed, dict):
                meta.update(parsed)
        except ValueError:
            pass
    for k in ("job", "run_id", "write_id"):
        if entry.get(k):
            meta[k] = entry[k]
    return meta
