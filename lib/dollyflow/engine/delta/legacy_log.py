"""Commit logs written by dollyflow's offline backend before it kept the job name in ``userMetadata``.

Those commits carried ``job`` (a string) as a top-level field of their ``commitInfo``. Delta's own
commitInfo has a ``job`` field too, a struct (jobId, jobName, runId, ...), and Delta Spark cannot
parse a log holding a string there (``CANNOT_PARSE_JSON_FIELD`` / ``MALFORMED_RECORD_IN_PARSING``
on every load); delta-rs reads such a table as any other. This module, free of Spark, reads the
JSON commit files through :mod:`dollyflow.core.storage` (local paths and URIs alike):

- :func:`legacy_commit`: the first such commit of a table (None when there is none), reading only
  the ``_delta_log/*.json`` commit files and stopping at the first hit; cached per table per process.
- :func:`legacy_tables`: the tables under a folder (the store's schema location) that have one.
- :func:`upgrade_log`: rewrite those commits in place, ``job`` moved into ``userMetadata``, so Delta
  Spark reads the table: local tables only, after a backup copy of ``_delta_log``, each file written
  to a temporary file with the original's modification time (Delta's commit timestamp) and renamed
  over it; checked against the table's history before and after, and restored on any failure.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from dollyflow.core.object_store import storage_options
from dollyflow.core.storage import absolute, file_lock, filesystem, join
from dollyflow.engine.delta.commit import history_meta

LOG_DIR = "_delta_log"
COMMIT_FILE = re.compile(r"^(\d{20})\.json$")
BACKUP_PREFIX = "_delta_log.backup-"      # beside _delta_log; '_' keeps it out of every Delta listing
UPGRADE_COMMAND = "dollyflow tables upgrade-log"

_cache: dict[str, LegacyCommit | None] = {}
_cache_lock = threading.Lock()


@dataclass(frozen=True)
class LegacyCommit:
    """The first commit of ``table`` whose commitInfo holds a top-level, non-struct ``job``."""
    table: str        # the table's path or URI
    version: int
    file: str         # the commit file (path or URI)
    job: object       # the value found there (the job name)

    @property
    def name(self) -> str:
        """The table's folder name (its logical name under the schema location)."""
        return self.table.rstrip("/").rsplit("/", 1)[-1]


def is_legacy_info(info: dict) -> bool:
    """A top-level ``job`` that is not Delta's struct (a dict) nor null: what the old offline
    backend wrote, and what Delta Spark cannot parse."""
    return isinstance(info, dict) and info.get("job") is not None and not isinstance(info["job"], dict)


def _commit_files(table: str) -> list[tuple[int, str]]:
    """(version, path inside the filesystem) of the table's JSON commit files, oldest first."""
    fs, root = filesystem(join(table, LOG_DIR))
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    out = []
    for info in infos:
        m = COMMIT_FILE.match(info.base_name)
        if m and info.type == pafs.FileType.File:
            out.append((int(m.group(1)), info.path))
    return sorted(out)


def _legacy_line(text: str) -> dict | None:
    """The commitInfo of a commit file's text when it holds a legacy ``job``, else None."""
    for line in text.splitlines():
        if '"commitInfo"' not in line or '"job"' not in line:     # cheap: most lines are skipped unparsed
            continue
        try:
            action = json.loads(line)
        except ValueError:
            continue
        info = action.get("commitInfo") if isinstance(action, dict) else None
        if is_legacy_info(info):
            return info
    return None


def _scan(table: str) -> LegacyCommit | None:
    fs, _ = filesystem(join(table, LOG_DIR))
    for version, path in _commit_files(table):
        try:
            with fs.open_input_stream(path) as f:
                text = f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:            # removed by a log cleanup meanwhile
            continue
        info = _legacy_line(text)
        if info is not None:
            return LegacyCommit(table, version, join(table, LOG_DIR, path.rsplit("/", 1)[-1]), info["job"])
    return None


def legacy_commit(table: str, refresh: bool = False) -> LegacyCommit | None:
    """The oldest commit of the Delta table at ``table`` (path or URI) that dollyflow's old offline
    backend wrote with a top-level ``job`` in its commitInfo; None when there is none (or no table).
    Cached per table for the process (``refresh`` reads the log again): the offline backend of
    this version never writes such a commit, and :func:`upgrade_log` refreshes what it rewrote."""
    key = absolute(str(table)).rstrip("/")
    with _cache_lock:
        if not refresh and key in _cache:
            return _cache[key]
    found = _scan(key)
    with _cache_lock:
        _cache[key] = found
    return found


def legacy_tables(root: str, refresh: bool = False) -> list[LegacyCommit]:
    """The first legacy commit of every Delta table directly under ``root`` (the store's schema
    location), by table name; folders without a ``_delta_log`` are skipped."""
    fs, base = filesystem(root)
    out = []
    for info in sorted(fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)), key=lambda i: i.base_name):
        if info.type != pafs.FileType.Directory or info.base_name.startswith((".", "_")):
            continue
        found = legacy_commit(join(str(root).rstrip("/"), info.base_name), refresh=refresh)
        if found is not None:
            out.append(found)
    return out


def describe(found: list[LegacyCommit]) -> str:
    """``bronze (from version 0), runs (from version 3) (e.g. <first file>)``: the tables, their
    first legacy commit, and one such file to look at."""
    return ", ".join(f"{c.name} (from version {c.version})" for c in found) + (f" (e.g. {found[0].file})" if found else "")


# -- the upgrade ------------------------------------------------------------------------------------

class UpgradeRefused(Exception):
    """The log cannot be rewritten safely; nothing was changed."""


@dataclass
class Upgrade:
    """What :func:`upgrade_log` did to one table."""
    table: str
    versions: list[int] = field(default_factory=list)     # the commits rewritten
    backup: str | None = None                            # the copy of _delta_log taken first

    def as_dict(self) -> dict:
        return {"table": self.table, "versions": self.versions, "backup": self.backup}


def upgraded_info(info: dict, version: int, table: str) -> dict:
    """``info`` with its top-level ``job`` moved into ``userMetadata`` (JSON: job, run_id, write_id,
    as the offline backend writes it now). An existing ``userMetadata`` JSON object keeps its keys
    and gains ``job``; one that is not a JSON object, or names another job, is refused (rewriting it
    would lose or change what it says)."""
    out = dict(info)
    job = out.pop("job")
    raw = out.get("userMetadata")
    if raw is None or raw == "":
        meta = {"job": job, "run_id": out.get("run_id", ""), "write_id": out.get("write_id", "")}
    else:
        try:
            meta = json.loads(raw)
        except (TypeError, ValueError):
            meta = None
        if not isinstance(meta, dict):
            raise UpgradeRefused(f"{table}: version {version}'s commitInfo has job={job!r} and a userMetadata that "
                                 f"is not a JSON object ({raw!r}); moving the job there would change it")
        if "job" in meta and meta["job"] != job:
            raise UpgradeRefused(f"{table}: version {version}'s commitInfo has job={job!r} but its userMetadata "
                                 f"names job={meta['job']!r}")
        meta = {**meta, "job": job}
    out["userMetadata"] = json.dumps(meta, sort_keys=True)
    return out


def _rewrite(text: str, version: int, table: str) -> str | None:
    """The commit file's text with every legacy commitInfo line upgraded; other lines byte for byte."""
    lines = text.split("\n")
    changed = False
    for i, line in enumerate(lines):
        if '"commitInfo"' not in line or '"job"' not in line:
            continue
        action = json.loads(line)
        info = action.get("commitInfo") if isinstance(action, dict) else None
        if not is_legacy_info(info):
            continue
        action["commitInfo"] = upgraded_info(info, version, table)
        lines[i] = json.dumps(action, separators=(",", ":"), ensure_ascii=False)
        changed = True
    return "\n".join(lines) if changed else None


def _history_jobs(table: str) -> dict[int, object]:
    """version -> job name, as the offline backend reads the history (top level or userMetadata)."""
    from deltalake import DeltaTable
    return {int(h["version"]): history_meta(h).get("job") for h in DeltaTable(table, storage_options=storage_options(table)).history()}


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def upgrade_log(table: str, dry_run: bool = False) -> Upgrade:
    """Rewrite the legacy commits of the local Delta table at ``table`` so Delta Spark reads it:
    each commitInfo's top-level ``job`` goes into ``userMetadata`` (nothing else changes; the
    history keeps every job name, run id and write id, and each file its modification time, which
    is Delta's commit timestamp). Safe against failures and against a second upgrade:

    - every new file is computed (and refused, naming the version, if a commit cannot be moved)
      before anything is written;
    - ``_delta_log`` is copied to ``_delta_log.backup-<UTC time>`` beside it first;
    - each file is written to a temporary file in ``_delta_log``, fsynced, given the original's
      times, and renamed over the original (atomic: a reader sees the old file or the new one),
      only if the original is still the file that was read;
    - the history (version -> job) must read the same afterwards; on any failure the rewritten
      files are put back from the backup.

    Commits other writers add meanwhile are new files and are not touched; one an older dollyflow
    adds is found by the check at the end (run the upgrade again). Object stores (no rename, and
    a rewrite would change the commit timestamps) are refused. ``dry_run``: report only."""
    fs, root = filesystem(table)
    if not isinstance(fs, pafs.LocalFileSystem):
        raise UpgradeRefused(f"{table}: {UPGRADE_COMMAND} rewrites local tables only (an object store has no atomic "
                             "rename, and a rewrite would change the commits' timestamps); copy the table to a local "
                             "folder, upgrade it there and copy it back, or start a fresh tables.warehouse")
    log_dir = os.path.join(root, LOG_DIR)
    if not os.path.isdir(log_dir):
        raise UpgradeRefused(f"{table}: not a Delta table (no {LOG_DIR})")
    result = Upgrade(table)
    with file_lock(os.path.join(root, "_dollyflow_upgrade.lock")):
        plan = []                                     # (version, path, new text, stat of the original)
        for version, path in _commit_files(root):
            with open(path, "rb") as f:
                data = f.read()
            st = os.stat(path)
            new = _rewrite(data.decode("utf-8"), version, table)
            if new is not None:
                plan.append((version, path, new.encode("utf-8"), st))
        result.versions = [v for v, *_ in plan]
        if dry_run or not plan:
            legacy_commit(table, refresh=True)
            return result
        before = _history_jobs(root)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        backup = os.path.join(root, f"{BACKUP_PREFIX}{stamp}")
        if os.path.exists(backup):
            raise UpgradeRefused(f"{table}: {backup} exists already; wait a second and run again")
        shutil.copytree(log_dir, backup, copy_function=shutil.copy2)
        result.backup = backup
        done: list[str] = []
        try:
            for version, path, new, st in plan:
                now = os.stat(path)
                if (now.st_size, now.st_mtime_ns, now.st_ino) != (st.st_size, st.st_mtime_ns, st.st_ino):
                    raise UpgradeRefused(f"{table}: {path} changed while it was being upgraded")
                tmp = os.path.join(log_dir, f".{os.path.basename(path)}.upgrade-{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    f.write(new)
                    f.flush()
                    os.fsync(f.fileno())
                os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
                os.replace(tmp, path)
                done.append(path)
            _fsync_dir(log_dir)
            after = _history_jobs(root)
            if after != before:
                changed = sorted(v for v in set(before) | set(after) if before.get(v) != after.get(v))
                raise UpgradeRefused(f"{table}: the history read differently after the rewrite (versions {changed})")
        except BaseException:
            for path in done:                       # put the originals back (times included)
                tmp = path + f".restore-{os.getpid()}.tmp"
                shutil.copy2(os.path.join(backup, os.path.basename(path)), tmp)
                os.replace(tmp, path)
            for leftover in os.listdir(log_dir):
                if leftover.endswith(f".upgrade-{os.getpid()}.tmp"):
                    os.remove(os.path.join(log_dir, leftover))
            legacy_commit(table, refresh=True)
            raise
    left = legacy_commit(table, refresh=True)
    if left is not None:
        raise UpgradeRefused(f"{table}: version {left.version} still has a top-level job (an older dollyflow "
                             f"committed it during the upgrade?); run {UPGRADE_COMMAND} again")
    return result
