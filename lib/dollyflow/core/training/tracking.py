"""MLflow tracking, optional (engine-free).

The driver (the job, or the torchrun entry point) creates the run: params (the resolved config),
tags (dataset table and Delta version, manifest sha256, shard dir, fingerprint). Rank 0 logs
metrics per optimizer step and per evaluation to that run while training. The driver then logs
the artifacts (model card, config, provenance, metrics.jsonl, the loss plot of the run report as a PNG) and, when
``mlflow.transformers`` imports, the model with the transformers flavour. If live logging from
rank 0 failed (a worker that cannot reach the tracking server), the driver logs the metrics from
``metrics.jsonl`` afterwards. Where MLflow is not installed, tracking is off with a message and
training runs the same.

Tracking URI: ``train.mlflow_tracking_uri``, else ``databricks`` on Databricks, else
``$MLFLOW_TRACKING_URI``, else a file store ``<warehouse>/mlruns`` for a local warehouse
(``MLFLOW_ALLOW_FILE_STORE=true`` is set for that store only).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from dollyflow.core.plots import plot_loss
from dollyflow.core.storage import is_uri

MAX_PARAM_CHARS = 6000


def available() -> bool:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(t: dict, warehouse: str, on_databricks: bool) -> tuple[str | None, str, str]:
    """(tracking URI or None, experiment name, a line saying what was chosen and why)."""
    if not t.get("mlflow", True):
        return None, "", "MLflow tracking off (train.mlflow=false)"
    if not available():
        return None, "", "MLflow tracking off: mlflow is not installed (pip install mlflow-skinny)"
    experiment = t.get("mlflow_experiment") or ("/Shared/dollyflow" if on_databricks else "dollyflow")
    uri = t.get("mlflow_tracking_uri") or ""
    if not uri:
        if on_databricks:
            uri = "databricks"
        elif os.environ.get("MLFLOW_TRACKING_URI"):
            uri = os.environ["MLFLOW_TRACKING_URI"]
        elif warehouse and not is_uri(warehouse):
            uri = "file:" + os.path.join(os.path.abspath(warehouse), "mlruns")
        else:
            return None, "", (f"MLflow tracking off: no tracking server (warehouse {warehouse!r} is not local); "
                              "set train.mlflow_tracking_uri or MLFLOW_TRACKING_URI")
    if uri.startswith("file:"):
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"   # our own local store, chosen here
    return uri, experiment, f"MLflow tracking at {uri}, experiment {experiment}"


def _client(uri: str):
    if uri.startswith("file:"):
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            text = json.dumps(v, default=str) if not isinstance(v, str) else v
            out[key] = text[:MAX_PARAM_CHARS]
    return out


def start_run(uri: str, experiment: str, run_name: str, params: dict, tags: dict) -> str:
    """Create the run (experiment created when missing); returns its id."""
    from mlflow.entities import Param, RunTag

    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
    items = [Param(k, v) for k, v in flatten(params).items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    client.log_batch(run.info.run_id, tags=[RunTag("mlflow.runName", run_name)])
    return run.info.run_id


class MetricLogger:
    """Rank 0's live metric logging; the first failure disables it (and is reported)."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.run_id = run_id
        self.error: str | None = None
        self.client = None
        self.logged = 0
        if uri and run_id:
            try:
                self.client = _client(uri)
            except Exception as exc:  # noqa: BLE001 - tracking must never stop training
                self.error = f"{type(exc).__name__}: {exc}"

    @property
    def live(self) -> bool:
        return self.client is not None and self.error is None

    def log(self, step: int, metrics: dict) -> None:
        if not self.live:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and v == v]
        try:
            for i in range(0, len(items), 1000):
                self.client.log_batch(self.run_id, metrics=items[i:i + 1000])
            self.logged += 1
        except Exception as exc:  # noqa: BLE001
            self.error = f"{type(exc).__name__}: {exc}"
            print(f"[dollyflow train] MLflow logging stopped ({self.error}); the driver logs the metrics "
                  "from metrics.jsonl after training", file=sys.stderr, flush=True)


def metric_rows(entries: list[dict]) -> list[tuple[int, dict]]:
    """(step, {name: value}) from metrics.jsonl entries (per-category eval losses flattened)."""
    rows = []
    for e in entries:
        m = {k: v for k, v in e.items() if isinstance(v, (int, float)) and k not in ("step", "kind")}
        for cat, d in (e.get("eval_loss_per_category") or {}).items():
            m[f"eval_loss.{cat}"] = d["loss"]
        rows.append((int(e.get("step", 0)), m))
    return rows


def finish_run(uri: str, run_id: str, *, output_dir: str, entries: list[dict], backfill: bool,
               log_model: bool, status: str = "FINISHED") -> dict:
    """Artifacts, metrics backfill and the transformers-flavour model; ends the run."""
    from mlflow.entities import Metric

    client = _client(uri)
    info = {"artifacts": [], "model_logged": False, "model_error": None, "model_uri": None}
    if backfill:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, s) for s, m in metric_rows(entries) for k, v in m.items()]
        for i in range(0, len(items), 1000):
            client.log_batch(run_id, metrics=items[i:i + 1000])
    for name in ("README.md", "dollyflow_model.json", "metrics.jsonl", "training_config.json", "deepspeed_config.json"):
        p = Path(output_dir, name)
        if p.is_file():
            client.log_artifact(run_id, str(p))
            info["artifacts"].append(name)
    with tempfile.TemporaryDirectory() as tmp:   # the run report's loss plot, as a PNG artifact
        png = Path(tmp, "loss_curve.png")
        try:
            png.write_bytes(plot_loss(entries))
        except ImportError as exc:   # matplotlib absent: the metrics are logged, MLflow draws them
            info["loss_curve"] = f"not drawn: {exc}"
        else:
            client.log_artifact(run_id, str(png))
            info["artifacts"].append("loss_curve.png")
    if log_model and Path(output_dir, "config.json").is_file():
        info.update(_log_transformers_model(uri, run_id, output_dir))
    client.set_terminated(run_id, status=status)
    return info


def _log_transformers_model(uri: str, run_id: str, output_dir: str) -> dict:
    """``mlflow.transformers.log_model`` of the output directory (offline: no hub lookups)."""
    try:
        import mlflow
        import mlflow.transformers
    except Exception as exc:  # noqa: BLE001 - the flavour is optional
        return {"model_logged": False, "model_error": f"mlflow.transformers not importable: {exc}"}
    # mlflow.set_tracking_uri also exports $MLFLOW_TRACKING_URI to the whole process: restore it
    # (and mlflow's global URI) afterwards, or the next train job in this process would track
    # into this run's store
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MLFLOW_TRACKING_URI")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # mlflow 3.x does not take a directory path here, and its requirement inference wants
        # torchvision: pass the loaded components (in their saved dtype) and pinned requirements.
        model = AutoModelForCausalLM.from_pretrained(output_dir, dtype="auto")
        tok = AutoTokenizer.from_pretrained(output_dir)
        reqs = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
                "accelerate", "safetensors"]
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.transformers.log_model(transformers_model={"model": model, "tokenizer": tok}, name="model",
                                                 task="text-generation", pip_requirements=reqs)
        return {"model_logged": True, "model_error": None, "model_uri": info.model_uri}
    except Exception as exc:  # noqa: BLE001 - the run and the model directory stay valid without it
        return {"model_logged": False, "model_error": f"{type(exc).__name__}: {exc}"[:500]}
    finally:
        mlflow.set_tracking_uri(None)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def log_to_run(uri: str, run_id: str, metrics: dict[str, float], *, tags: dict[str, str] | None = None,
               artifacts: dict[str, bytes] | None = None, skip_if_tag: tuple[str, str] | None = None) -> dict:
    """Log ``metrics`` (step 0), ``tags`` and ``artifacts`` (file name -> content, at the
    artifact root) to the existing run ``run_id``, leaving its status alone (a finished training
    run stays finished). ``skip_if_tag`` ``(key, value)``: when the run already has that tag,
    log nothing (``status: already logged``). Raises what MLflow raises (an unknown run, an
    unreachable server): the caller decides whether that fails anything."""
    from mlflow.entities import Metric, RunTag

    client = _client(uri)
    run = client.get_run(run_id)
    if skip_if_tag and run.data.tags.get(skip_if_tag[0]) == skip_if_tag[1]:
        return {"status": "already logged", "metrics": 0, "artifacts": []}
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, 0) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i:i + 1000])
    names = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in (artifacts or {}).items():
            path = Path(tmp, name)
            path.write_bytes(content)
            client.log_artifact(run_id, str(path))
            names.append(name)
    if tags:   # last: the skip tag marks a complete logging
        client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])
    return {"status": "logged", "metrics": len(items), "artifacts": names}
