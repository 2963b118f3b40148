"""lm-evaluation-harness on a local model directory (``evaluate.harness_tasks``), engine-free.

:func:`run_harness` runs ``lm_eval.simple_evaluate`` with lm-eval's Hugging Face model class
(``HFLM``: the model directory's safetensors weights and tokenizer, ``trust_remote_code=False``)
on a list of task entries and returns plain JSON-ready scores::

    {"lm_eval_version": "0.4.13", "device": "cpu", "dtype": "float32", "offline": True,
     "seconds": 1.4, "tasks": {"dolly_mc": {"acc": 0.6, "acc_stderr": 0.24, "samples": 5}}}

Each entry of ``tasks`` is either

- the **name** of a task, group or tag lm-eval knows (``hellaswag``, ``arc_easy``; glob patterns
  such as ``mmlu_*`` too). lm-eval's built-in tasks download their data from the Hugging Face
  hub: they need a cluster with hub access;
- a **path** to a task YAML file (``.yaml``/``.yml``) or to a directory of them (every task it
  defines runs, and their names also resolve other entries). A task file whose data is a local
  JSONL file runs offline.

When every entry is a path, the run is offline: ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``,
``TRANSFORMERS_OFFLINE`` and ``HF_EVALUATE_OFFLINE`` are set (and the already imported
libraries' flags switched) for its duration, so nothing reaches the hub; a local task file that
names a hub dataset fails then, saying so. Metrics come from lm-eval itself (``acc``,
``acc_norm``, ``exact_match`` ... are built in); avoid metrics that HF ``evaluate`` loads from
the hub at run time.

A local task, ``dolly_mc.yaml``, with its items in ``dolly_mc.jsonl`` (one JSON object a line:
``{"question": "...", "choices": ["...", "...", "..."], "label": 1}``)::

    task: dolly_mc
    dataset_path: json                 # datasets' JSON loader: local files, no hub
    dataset_kwargs:
      data_files:
        test: /Volumes/main/dolly/eval/dolly_mc.jsonl    # absolute (relative: to the driver's cwd)
    test_split: test
    output_type: multiple_choice       # scores each choice's log-likelihood after the prompt
    doc_to_text: "Question: {{question}}\\nAnswer:"
    doc_to_choice: "{{choices}}"
    doc_to_target: label               # index of the right choice
    metric_list:
      - metric: acc                    # the right choice has the highest log-likelihood
        aggregation: mean
        higher_is_better: true
      - metric: acc_norm               # the same, per byte of the choice
        aggregation: mean
        higher_is_better: true

and ``evaluate.harness_tasks=[/Volumes/main/dolly/eval/dolly_mc.yaml]``
(:func:`dollyflow.testing.harness_task.write_choice_task` writes such a pair). Generation tasks
(``output_type: generate_until`` with ``metric: exact_match``) work the same way.

Scores per task: each metric under lm-eval's name (``acc``; a metric of a filter other than
``none`` as lm-eval writes it, ``exact_match,strict-match``), its standard error as
``<metric>_stderr`` (None where lm-eval has none), and ``samples``, the items scored (after
``limit``). A group's row carries its aggregate and the sum of its tasks' samples.

An unknown task name, a missing file or a task that fails to load (bad YAML, missing data) is
a :class:`~dollyflow.config.ConfigError` naming ``evaluate.harness_tasks`` and the entry.
Seeds (python, numpy, torch, few-shot sampling) are all ``seed``: two runs of the same model and
tasks on the same device give the same scores.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import math
import os
import sys
import time
from pathlib import Path

from dollyflow.config.errors import ConfigError
from dollyflow.core.models.device import pick_device, pick_dtype
from dollyflow.core.models.files import tokenizer_dir_for, weight_files

KEY = "evaluate.harness_tasks"
#: lm-eval's bootstrap draws for the standard errors of metrics without a closed form (BLEU, F1 ...).
BOOTSTRAP_ITERS = 1000
_YAML = (".yaml", ".yml")
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_EVALUATE_OFFLINE")
# the module flags the hub libraries read their offline switch from (set from the environment at import)
_OFFLINE_FLAGS = (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                  ("datasets.config", "HF_DATASETS_OFFLINE"), ("evaluate.config", "HF_EVALUATE_OFFLINE"))


def is_path(entry: str) -> bool:
    """A task entry that names a file or directory (rather than a task lm-eval knows)."""
    return entry.lower().endswith(_YAML) or "/" in entry or os.sep in entry or os.path.exists(entry)


def lm_eval_version() -> str:
    from importlib.metadata import version
    return version("lm_eval")


def _require():
    try:
        importlib.import_module("lm_eval")
    except ImportError as e:
        raise ConfigError(f"{KEY} is set but lm-evaluation-harness is not installed ({e}): "
                          "pip install 'dollyflow[harness]' (or lm-eval)") from e


@contextlib.contextmanager
def hub_offline(enabled: bool):
    """While active (when ``enabled``): the hub libraries refuse to go online. Their flags are
    read from the environment when they are imported, so the imported ones are switched too;
    both are restored afterwards. ``DISABLE_MULTIPROC`` keeps lm-eval's bootstrap in this
    process (no fork of a Spark driver)."""
    saved_env = {k: os.environ.get(k) for k in (*_OFFLINE_ENV, "DISABLE_MULTIPROC")}
    saved_flags = []
    try:
        os.environ["DISABLE_MULTIPROC"] = "1"
        if enabled:
            for k in _OFFLINE_ENV:
                os.environ[k] = "1"
            for mod, attr in _OFFLINE_FLAGS:
                m = sys.modules.get(mod)
                if m is None:
                    with contextlib.suppress(ImportError):
                        m = importlib.import_module(mod)
                if m is not None and hasattr(m, attr):
                    saved_flags.append((m, attr, getattr(m, attr)))
                    setattr(m, attr, True)
        yield
    finally:
        for m, attr, value in reversed(saved_flags):
            setattr(m, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _dir_tasks(path: Path) -> list[str]:
    """The leaf tasks a directory of task YAMLs defines."""
    from lm_eval.tasks import TaskManager
    return list(TaskManager(include_path=str(path), include_defaults=False).all_subtasks)


def resolve_entries(entries: list[str]) -> tuple[list[tuple[str, list[str]]], list[str], bool]:
    """Check ``entries`` and work out how to load them: ([(entry, specs for lm-eval)],
    include paths, offline). Errors name :data:`KEY` and the entry."""
    from lm_eval.tasks import TaskManager

    if not entries:
        raise ConfigError(f"{KEY} is empty: nothing to run")
    include: list[str] = []
    plan: list[tuple[str, list[str] | None]] = []
    for entry in entries:
        if not isinstance(entry, str) or not entry.strip():
            raise ConfigError(f"{KEY}: {entry!r} is neither a task name nor a path")
        if not is_path(entry):
            plan.append((entry, None))
            continue
        p = Path(entry).expanduser()
        if p.is_dir():
            names = _dir_tasks(p)
            if not names:
                raise ConfigError(f"{KEY}: the directory {entry!r} holds no lm-eval task YAML")
            include.append(str(p.resolve()))
            plan.append((entry, names))
        elif p.is_file():
            if not p.name.lower().endswith(_YAML):
                raise ConfigError(f"{KEY}: {entry!r} is not a task YAML file (.yaml or .yml)")
            plan.append((entry, [str(p.resolve())]))
        else:
            raise ConfigError(f"{KEY}: the task file {entry!r} does not exist")
    offline = all(specs is not None for _, specs in plan)
    if not offline:
        manager = TaskManager(include_path=include or None)
        known = manager.all_tasks
        for i, (entry, specs) in enumerate(plan):
            if specs is not None:
                continue
            if entry in known:
                plan[i] = (entry, [entry])
                continue
            matched = manager.match_tasks([entry]) if any(c in entry for c in "*?[") else []
            if not matched:
                close = difflib.get_close_matches(entry, known, n=5)
                hint = f"; close: {', '.join(close)}" if close else ""
                raise ConfigError(f"{KEY}: unknown task {entry!r}: not a task, group or tag of lm-eval "
                                  f"{lm_eval_version()}{' or of ' + ', '.join(include) if include else ''}, and "
                                  f"not a path to a task YAML{hint}")
            plan[i] = (entry, sorted(matched))
    return [(e, s) for e, s in plan if s is not None], include, offline


def _number(v):
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, float)):
        return None if isinstance(v, float) and not math.isfinite(v) else v
    try:
        f = float(v)     # numpy scalars
    except (TypeError, ValueError):
        return None      # lm-eval's "N/A"
    return f if math.isfinite(f) else None


def task_scores(results: dict) -> dict[str, dict]:
    """lm-eval's result dict -> {task or group: {metric: value, metric_stderr: value, samples: n}}."""
    n = {t: int(s.get("effective", s.get("original", 0))) for t, s in (results.get("n-samples") or {}).items()}
    subtasks = results.get("group_subtasks") or {}

    def samples(name: str, seen=()) -> int:
        if name in n:
            return n[name]
        return sum(samples(c, (*seen, name)) for c in subtasks.get(name, []) if c not in seen)

    out: dict[str, dict] = {}
    for task, row in (results.get("results") or {}).items():
        scores: dict = {}
        for key, value in row.items():
            if "," not in key:
                continue          # alias, name, sample_len
            metric, filt = key.split(",", 1)
            stderr = metric.endswith("_stderr")
            base = metric[:-len("_stderr")] if stderr else metric
            name = base if filt == "none" else f"{base},{filt}"
            scores[f"{name}_stderr" if stderr else name] = _number(value)
        scores["samples"] = samples(task)
        out[task] = scores
    return out


def run_harness(model_dir: str, tasks: list[str], *, device: str = "auto", batch_size: int = 8,
                limit: int | None = None, seed: int = 1234) -> dict:
    """Run lm-eval's ``tasks`` (names and/or task YAML paths, see the module docstring) on the
    model in the local directory ``model_dir``; ``device``: ``auto`` (CUDA when there, else the
    CPU), ``cpu``, ``cuda``, ``cuda:<i>``; ``limit``: items per task (None: all)."""
    _require()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    t0 = time.time()
    weight_files(model_dir)        # safetensors only: refuses pickled weights before transformers sees them
    plan, include, offline = resolve_entries(list(tasks))
    try:
        dev = pick_device(device)
    except RuntimeError as e:
        raise ConfigError(f"evaluate.harness_device: {e}") from e
    dtype = str(pick_dtype(dev)).replace("torch.", "")
    with hub_offline(offline):
        manager = TaskManager(include_path=include or None, include_defaults=not offline)
        loaded, seen = [], set()
        for entry, specs in plan:
            specs = [s for s in specs if s not in seen]
            seen.update(specs)
            if not specs:
                continue
            try:
                got = manager.load(specs)
            except Exception as e:   # lm-eval raises KeyError, ValueError, datasets' and yaml's errors
                hint = (" (task files run offline: their data must be local files, e.g. dataset_path: json "
                        "with dataset_kwargs.data_files)") if offline else ""
                raise ConfigError(f"{KEY}: the task {entry!r} failed to load: {type(e).__name__}: {e}{hint}") from e
            loaded += [*got["groups"].values()] or [*got["tasks"].values()]
        lm = HFLM(pretrained=model_dir, tokenizer=tokenizer_dir_for(model_dir), device=dev, dtype=dtype,
                  batch_size=int(batch_size), trust_remote_code=False)
        results = lm_eval.simple_evaluate(
            model=lm, tasks=loaded, task_manager=manager, limit=limit, log_samples=False,
            bootstrap_iters=BOOTSTRAP_ITERS, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed)
    del lm
    return {"lm_eval_version": lm_eval_version(), "device": dev, "dtype": dtype, "offline": offline,
            "limit": limit, "seed": seed, "seconds": round(time.time() - t0, 2), "tasks": task_scores(results)}
