"""TrainSpec: what crosses to the ranks is typed and frozen, and a misspelt or missing key fails at once."""
import dataclasses
import json

import pytest

from dollyflow.config import ModelConfig, TrainConfig
from dollyflow.core.training.spec import SpecError, TrainSettings, TrainSpec, TrackingRun


def spec_dict(**kw) -> dict:
    d = {"run_id": "r1", "train": dataclasses.asdict(TrainConfig()), "model": dataclasses.asdict(ModelConfig()),
         "config": {"job": "train"}, "deepspeed_presets": {"cpu": {"zero_optimization": {"stage": 2}}},
         "mlflow": {"uri": "file:/tmp/mlruns", "experiment": "dollyflow", "run_id": "abc"},
         "shard_dir": "/shards/v1", "manifest_sha256": "a" * 64, "output_dir": "/models/.m.next-x",
         "final_output_dir": "/models/m", "checkpoint_dir": "/models/.m.next-x/checkpoints",
         "fingerprint": {"sha256": "f" * 64, "fields": {"processes": 2}}, "processes": 2,
         "launcher": "torchrun"}
    d.update(kw)
    return d


def test_round_trip_through_json_is_typed_and_equal():
    spec = TrainSpec.from_dict(spec_dict())
    assert spec.train.batch_size == TrainConfig().batch_size and spec.model.name == ModelConfig().name
    assert isinstance(spec.mlflow, TrackingRun) and spec.mlflow.run_id == "abc"
    assert spec.fingerprint.sha256 == "f" * 64 and spec.processes == 2
    back = TrainSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec and back.to_dict() == spec_dict()
    assert [f.name for f in dataclasses.fields(TrainSettings)] == [f.name for f in dataclasses.fields(TrainConfig)]


def test_frozen():
    spec = TrainSpec.from_dict(spec_dict())
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.train.batch_size = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.processes = 1


def test_tracking_off_is_none():
    spec = TrainSpec.from_dict(spec_dict(mlflow=None))
    assert spec.mlflow is None and spec.to_dict()["mlflow"] is None


def test_unknown_and_missing_keys_fail_naming_them():
    with pytest.raises(SpecError, match=r"TrainSpec: unknown key 'proceses'"):
        TrainSpec.from_dict(spec_dict(proceses=2))
    d = spec_dict()
    d["train"]["batch_sze"] = d["train"].pop("batch_size")
    with pytest.raises(SpecError, match=r"TrainSettings: unknown key 'train\.batch_sze'"):
        TrainSpec.from_dict(d)
    d = spec_dict()
    del d["train"]["seed"]
    with pytest.raises(SpecError, match=r"TrainSettings: missing key 'train\.seed'"):
        TrainSpec.from_dict(d)
    d = spec_dict()
    del d["checkpoint_dir"]
    with pytest.raises(SpecError, match=r"missing key 'checkpoint_dir'"):
        TrainSpec.from_dict(d)
    with pytest.raises(SpecError, match=r"mlflow: expected an object, got str"):
        TrainSpec.from_dict(spec_dict(mlflow="file:/tmp"))
