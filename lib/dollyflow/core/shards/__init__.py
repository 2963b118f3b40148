"""Training shards: planning balanced by tokens, the manifest, versions under a root, a reader
for the trainer and an optional MDS export (engine-free: pyarrow and numpy only, no Spark, no Delta).

A shard directory holds::

    manifest.json                      what the shards hold (see :func:`build_manifest`)
    tokenizer/                         the exact tokenizer used (load_tokenizer(dir/"tokenizer"))
    train-00000-of-00008.parquet ...   record_id, category, input_ids list<int32>,
    test-00000-of-00001.parquet  ...   response_start int32, length int32

The trainer needs only this directory: :class:`ShardDataset` yields ``input_ids`` and Dolly's
``labels`` (``-100`` up to and including ``### Response:\\n``), :func:`collate` pads a batch.

Each split's shards are contiguous ranges of (split key, record id), in shard order, balanced by
tokens (:func:`plan_shards`: every shard's tokens within one record of the mean; records inside a
shard ordered by split key). Split keys are hashes, so every shard is a uniform sample of its
split.

Shard directories are versioned: each tokenize run writes a new one under a *shards root*
(``<root>/v<silver version>-<run id>/``) and, only once it is complete and verified, switches
the root's pointer file ``LATEST.json`` to it (:func:`write_pointer`, an atomic replace or a
single object PUT). Nothing is deleted or moved before that, so readers always see a complete
set, on object stores as well. :func:`resolve_shard_dir` turns a root or a directory into the
directory to read. Every path here may be local, a FUSE mount or a URI (:mod:`dollyflow.core.storage`).

The modules, each importing its siblings directly:

- :mod:`.plan`: which shard each record goes to (:func:`plan_shards`, :func:`shard_starts`);
- :mod:`.shard_file`: one shard file: schema, name, stats, :func:`write_shard`;
- :mod:`.manifest`: ``manifest.json``: :func:`build_manifest`, read/write, :func:`manifest_sha256`;
- :mod:`.verify`: :func:`verify_shards`, a directory against its manifest;
- :mod:`.versions`: versions under a root, the ``LATEST.json`` pointer, re-run and pruning checks;
- :mod:`.reader`: :class:`ShardDataset` and :func:`collate` for the trainer;
- :mod:`.mds`: the optional Mosaic Streaming export.
"""
from dollyflow.core.shards.manifest import (FORMAT, FORMAT_VERSION, MANIFEST, TOKENIZER_DIR, build_manifest,
                                            manifest_sha256, merge_stats, read_manifest, write_manifest)
from dollyflow.core.shards.mds import export_mds, mds_available
from dollyflow.core.shards.plan import plan_shards, shard_count, shard_starts
from dollyflow.core.shards.reader import ShardDataset, collate, labels_array
from dollyflow.core.shards.shard_file import (SHARD_SCHEMA, histogram_edges, read_table, shard_file_name,
                                              shard_stats, write_shard)
from dollyflow.core.shards.verify import STATS_COLUMNS, verify_shards
from dollyflow.core.shards.versions import (POINTER, POINTER_FORMAT, prune_versions, read_pointer,
                                            resolve_shard_dir, shard_settings, shard_versions, unchanged_shards,
                                            version_dir_name, write_pointer)

__all__ = [
    # plan
    "plan_shards", "shard_count", "shard_starts",
    # one shard file
    "SHARD_SCHEMA", "histogram_edges", "read_table", "shard_file_name", "shard_stats", "write_shard",
    # manifest
    "FORMAT", "FORMAT_VERSION", "MANIFEST", "TOKENIZER_DIR", "build_manifest", "manifest_sha256", "merge_stats",
    "read_manifest", "write_manifest",
    # verification
    "STATS_COLUMNS", "verify_shards",
    # versions under a root
    "POINTER", "POINTER_FORMAT", "prune_versions", "read_pointer", "resolve_shard_dir", "shard_settings",
    "shard_versions", "unchanged_shards", "version_dir_name", "write_pointer",
    # the trainer's reader
    "ShardDataset", "collate", "labels_array",
    # Mosaic Streaming export
    "export_mds", "mds_available",
]
