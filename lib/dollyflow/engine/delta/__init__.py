"""Every Delta read and write in dollyflow goes through this package.

One API (:class:`DeltaStore`, :mod:`~dollyflow.engine.delta.store`), two backends behind one
interface (:mod:`~dollyflow.engine.delta.backend`):

- native (:mod:`~dollyflow.engine.delta.native`): the JVM has Delta (Databricks; spark-submit with
  the Delta packages): ``format("delta")`` and ``delta.tables.DeltaTable``. Tables are Unity
  Catalog ``catalog.schema.table`` when ``tables.catalog`` is set, else paths under
  ``tables.warehouse``.
- offline (:mod:`~dollyflow.engine.delta.offline`): no Delta jars (a laptop, CI): Spark's own
  Parquet writer for distributed writes, one delta-rs commit of exactly the files written
  (:mod:`~dollyflow.engine.delta.offline_commits`), native Parquet scans of the version's files
  for reads, delta-rs for merge and history; the ``delta`` data source over delta-rs
  (:mod:`~dollyflow.engine.delta.offline_source`).

``tables.backend: auto`` picks native when Delta's JVM classes are there and says why
(:attr:`DeltaStore.backend_reason`); ``native`` fails at once, with what to do, when they are not.

Every write and merge returns a :class:`Commit` (:mod:`~dollyflow.engine.delta.commit`): the
version *its own* commit got and that commit's row counts, found in the table's history by a
unique write id stored in the commit's metadata (never "the latest version", which another writer
may have made). Merges are retried on conflicts with concurrent writers, so an insert-only merge
on a key keeps one row per key however many jobs run at once. Nothing here changes the Spark
session's settings for longer than one call: the Parquet timestamp encoding is a per-write option,
and the one setting Delta offers for a merge's commit metadata is restored to exactly what the user
had.

Table names come from config only and must be plain identifiers
(:mod:`~dollyflow.engine.delta.refs`).
"""
from dollyflow.engine.delta.backend import BackendError, DeltaBackend, choose_backend
from dollyflow.engine.delta.commit import COMMIT_RETRIES, Commit
from dollyflow.engine.delta.native import MERGE_METADATA_CONF, NativeBackend, session_conf
from dollyflow.engine.delta.offline import OfflineBackend
from dollyflow.engine.delta.parts import TIMESTAMP_OPTION, PartSink
from dollyflow.engine.delta.refs import TableRef, resolve
from dollyflow.engine.delta.store import DeltaStore

__all__ = [
    "BackendError",
    "COMMIT_RETRIES",
    "Commit",
    "DeltaBackend",
    "DeltaStore",
    "MERGE_METADATA_CONF",
    "NativeBackend",
    "OfflineBackend",
    "PartSink",
    "TIMESTAMP_OPTION",
    "TableRef",
    "choose_backend",
    "resolve",
    "session_conf",
]
