"""TrainSpec: what the driver hands every rank, a typed frozen dataclass (engine-free, no torch).

:func:`~dollyflow.core.training.prepare.prepare` builds it; a launcher ships ``spec.to_dict()``
(JSON) to the ranks and each rank rebuilds it with :meth:`TrainSpec.from_dict`, which fails at
once on an unknown or a missing key, naming it (``train.batch_sze``), so a misspelt key or a
driver and ranks of different versions stop before anything trains. The loop reads
``spec.train.batch_size``; the launchers read ``spec.processes`` and ``spec.launcher``.

The ``train`` and ``model`` sections have exactly the fields of the config's
:class:`~dollyflow.config.TrainConfig` and :class:`~dollyflow.config.ModelConfig` (their types
and documentation are there; the sections are frozen copies, so the config stays the one place
a training setting is declared).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from dollyflow.config import ModelConfig, TrainConfig


class SpecError(ValueError):
    """A spec dict that does not match :class:`TrainSpec` (an unknown or a missing key)."""


class _Section:
    """``from_dict`` (every field present, nothing else) and ``to_dict`` for a frozen dataclass;
    ``_sections`` names the fields that are sections themselves (None allowed where optional)."""

    _sections: ClassVar[dict[str, type]] = {}
    _optional: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def from_dict(cls, data: dict, where: str = ""):
        if not isinstance(data, dict):
            raise SpecError(f"{where.rstrip('.') or cls.__name__}: expected an object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise SpecError(f"{cls.__name__}: unknown key {where + str(key)!r}")
        for key in names:
            if key not in data:
                raise SpecError(f"{cls.__name__}: missing key {where + key!r}")
        kw = {}
        for key in names:
            value, section = data[key], cls._sections.get(key)
            if section is not None and not (value is None and key in cls._optional):
                value = section.from_dict(value, f"{where}{key}.")
            kw[key] = value
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _frozen_copy(config_cls: type, name: str, doc: str) -> type:
    """A frozen dataclass with ``config_cls``'s fields (names and types, no defaults: a spec
    carries every value)."""
    return dataclasses.make_dataclass(name, [(f.name, f.type) for f in dataclasses.fields(config_cls)],
                                      bases=(_Section,), frozen=True,
                                      namespace={"__doc__": doc, "__module__": __name__})


TrainSettings = _frozen_copy(TrainConfig, "TrainSettings", "The ``train:`` section (TrainConfig's fields), frozen.")
ModelSettings = _frozen_copy(ModelConfig, "ModelSettings", "The ``model:`` section (ModelConfig's fields), frozen.")


@dataclass(frozen=True)
class TrackingRun(_Section):
    """The MLflow run the driver started for this training run (rank 0 logs metrics into it)."""

    uri: str
    experiment: str
    run_id: str


@dataclass(frozen=True)
class Fingerprint(_Section):
    """What the trained weights depend on (``fields``) and its ``sha256``."""

    sha256: str
    fields: dict


@dataclass(frozen=True)
class TrainSpec(_Section):
    """One training run as every rank sees it."""

    run_id: str
    train: TrainSettings
    model: ModelSettings
    config: dict                    # the whole job config, redacted (written as training_config.json)
    deepspeed_presets: dict         # preset name -> DeepSpeed JSON, loaded on the driver
    mlflow: TrackingRun | None      # None: tracking off
    shard_dir: str                  # the verified shard directory
    manifest_sha256: str
    output_dir: str                 # where the ranks write the model (a sibling while replacing one)
    final_output_dir: str           # train.output_dir: where the model ends up
    checkpoint_dir: str
    fingerprint: Fingerprint
    processes: int                  # ranks
    launcher: str                   # torch_distributor | torchrun | horovod

    _sections: ClassVar[dict[str, type]] = {"train": TrainSettings, "model": ModelSettings,
                                            "mlflow": TrackingRun, "fingerprint": Fingerprint}
    _optional: ClassVar[frozenset[str]] = frozenset({"mlflow"})
