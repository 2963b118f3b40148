"""Checkpoint selection, fingerprints, provenance and model card, DeepSpeed presets, train config
checks (milliseconds, no Spark, no training)."""
import dataclasses
import json
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest

from dollyflow.config import ConfigError, TrainConfig, load_config
from dollyflow.core.training import checkpoint, dsconfig, model_dir
from dollyflow.core.training.spec import TrainSettings


def make_ckpt(root, step, complete=True, started=True, fingerprint="fp", **info):
    path = os.path.join(root, checkpoint.tag(step))
    os.makedirs(path)
    if started:
        checkpoint.mark_started(path, {"step": step})
    with open(os.path.join(path, "mp_rank_00_model_states.pt"), "wb") as f:
        f.write(b"weights-%d" % step)
    with open(os.path.join(path, "zero_pp_rank_0_mp_rank_00_optim_states.pt"), "wb") as f:
        f.write(b"optimizer")
    if complete:
        names = checkpoint.checkpoint_files(path)
        files = {**checkpoint.hash_files(path, names, 0, 2), **checkpoint.hash_files(path, names, 1, 2)}
        checkpoint.mark_complete(path, {"step": step, "fingerprint": fingerprint, **info}, files)
    return path


def test_half_written_checkpoint_is_never_picked(tmp_path):
    root = str(tmp_path)
    make_ckpt(root, 10)
    make_ckpt(root, 20)
    make_ckpt(root, 30, complete=False)                       # killed while saving
    bad = make_ckpt(root, 40, complete=False)
    open(os.path.join(bad, checkpoint.MARKER), "w").write("{not json")   # a torn marker
    os.makedirs(os.path.join(root, "step-x"))                 # not a checkpoint name
    c = checkpoint.latest_complete(root)
    assert c.step == 20 and c.complete
    assert checkpoint.latest_complete(root, fingerprint="other") is None
    assert checkpoint.remove_incomplete(root) == ["step-00000030", "step-00000040"]
    assert [c.step for c in checkpoint.list_checkpoints(root)] == [10, 20]
    assert checkpoint.latest_complete(str(tmp_path / "missing")) is None


def test_prune_keeps_the_newest_of_its_fingerprint(tmp_path):
    root = str(tmp_path)
    for s in (10, 20, 30, 40):
        make_ckpt(root, s)
    make_ckpt(root, 5, fingerprint="another-run")
    assert checkpoint.prune(root, 2, "fp") == ["step-00000010", "step-00000020"]
    assert [c.step for c in checkpoint.list_checkpoints(root)] == [5, 30, 40]
    assert checkpoint.prune(root, 0) == []


def test_rng_state_round_trip_without_pickles(tmp_path):
    torch = pytest.importorskip("torch")
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    random.gauss(0, 1), np.random.standard_normal()       # cached gaussians are part of the state
    checkpoint.save_rng(str(tmp_path), rank=3)
    expect = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.standard_normal(), torch.rand(1).item())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    checkpoint.load_rng(str(tmp_path), rank=3)
    assert (random.random(), random.gauss(0, 1), np.random.rand(), np.random.standard_normal(),
            torch.rand(1).item()) == expect
    # JSON and safetensors only: nothing a loader would have to unpickle
    assert sorted(os.listdir(tmp_path)) == ["rng-rank3.json", "rng-rank3.safetensors"]
    json.loads((tmp_path / "rng-rank3.json").read_text())


# ---- issue 18: checkpoints are checksummed, verified before a resume, removed only where ours


def test_marker_records_every_file_and_a_changed_truncated_or_extra_file_is_refused(tmp_path):
    root = str(tmp_path)
    path = make_ckpt(root, 10)
    c = checkpoint.latest_complete(root)
    assert set(c.info["files"]) == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    assert all(len(v["sha256"]) == 64 for v in c.info["files"].values())
    assert checkpoint.quick_check(c) == [] and checkpoint.verify_share(c, 0, 2) + checkpoint.verify_share(c, 1, 2) == []

    weights = os.path.join(path, "mp_rank_00_model_states.pt")
    with open(weights, "r+b") as f:                           # same size, one byte changed
        f.write(b"W")
    problems = checkpoint.verify_share(c, 0, 1)
    assert problems == ["step-00000010/mp_rank_00_model_states.pt: sha256 differs from complete.json "
                        "(tampered or corrupted)"]
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint .*step-00000010 is refused: "
                                                         r"step-00000010/mp_rank_00_model_states.pt: sha256"):
        raise checkpoint.refusal(c, problems)
    with open(weights, "wb") as f:                            # truncated
        f.write(b"w")
    assert "step-00000010/mp_rank_00_model_states.pt: 1 bytes, 10 when it was written (truncated or changed)" \
        in checkpoint.quick_check(c)
    with open(os.path.join(path, "evil.pt"), "wb") as f:      # a file that is not the checkpoint's
        f.write(b"x")
    assert "step-00000010/evil.pt: not a file of this checkpoint (unlisted in complete.json)" in checkpoint.quick_check(c)


def test_a_checkpoint_without_checksums_is_not_loaded(tmp_path):
    path = os.path.join(tmp_path, checkpoint.tag(10))
    os.makedirs(path)
    with open(os.path.join(path, checkpoint.MARKER), "w") as f:
        json.dump({"step": 10, "fingerprint": "fp"}, f)      # the marker older versions wrote
    (problem,) = checkpoint.quick_check(checkpoint.latest_complete(str(tmp_path)))
    assert "lists no file checksums" in problem


def test_only_dollyflows_checkpoints_are_removed(tmp_path):
    root = str(tmp_path)
    mine = make_ckpt(root, 10, fingerprint="old")
    with open(os.path.join(mine, "notes.txt"), "w") as f:     # a user's file inside our checkpoint
        f.write("keep me")
    users = make_ckpt(root, 20, complete=False, started=False)   # a step-* directory we did not make
    make_ckpt(root, 30, fingerprint="new")
    gone, kept = checkpoint.remove_other_runs(root, "new")
    assert gone == [] and kept == [mine]
    assert sorted(os.listdir(mine)) == ["notes.txt"]           # our files went, the user's stayed
    assert os.path.isfile(os.path.join(users, "mp_rank_00_model_states.pt"))
    assert checkpoint.remove_incomplete(root) == []            # not ours: never removed
    assert [c.step for c in checkpoint.list_checkpoints(root) if c.complete] == [30]


def test_fingerprint_names_what_differs():
    t = TrainConfig().__dict__
    a = model_dir.fingerprint(model_name="m", manifest_sha256="abc", train=t, processes=2)
    b = model_dir.fingerprint(model_name="m", manifest_sha256="abc", train=dict(t, eval_steps=7, output_dir="x"),
                           processes=2)
    assert a["sha256"] == b["sha256"]                         # intervals and paths do not change the weights
    c = model_dir.fingerprint(model_name="m", manifest_sha256="abd", train=dict(t, learning_rate=1e-4), processes=4)
    diff = model_dir.differences(a["fields"], c["fields"])
    assert a["sha256"] != c["sha256"]
    assert any(d.startswith("train.learning_rate: 5e-06 -> 0.0001") for d in diff)
    assert any(d.startswith("manifest_sha256") for d in diff) and any(d.startswith("processes: 2 -> 4") for d in diff)


def test_provenance_and_card(tmp_path):
    assert model_dir.read_provenance(str(tmp_path)) is None
    prov = {"name": "m", "base_model": "EleutherAI/pythia-70m", "method": "lora", "launcher": "torchrun",
            "processes": 2, "run_id": "r1",
            "dataset": {"source": {"table": "silver", "location": "/wh/silver", "version": 3}, "shard_dir": "/s",
                        "manifest_sha256": "f" * 64, "shards": [{"file": "train-00000-of-00001.parquet",
                                                                 "records": 5, "sha256": "a" * 64}]},
            "metrics": {"train_loss": 1.5, "eval_loss": 2.0,
                        "eval_loss_per_category": {"open_qa": {"loss": 2.25, "records": 3, "tokens": 9}}},
            "config": {"train": {"learning_rate": 5e-6}}, "fingerprint": {"sha256": "e" * 64}}
    model_dir.write_provenance(str(tmp_path), prov)
    model_dir.write_card(str(tmp_path), prov)
    back = model_dir.read_provenance(str(tmp_path))
    assert back["format"] == model_dir.FORMAT and back["run_id"] == "r1"
    card = (tmp_path / "README.md").read_text()
    assert "base_model: EleutherAI/pythia-70m" in card
    assert "| Delta version | 3 |" in card and "`silver`" in card
    assert "| open_qa | 3 | 2.2500 |" in card
    assert "a" * 64 in card and '"learning_rate": 5e-06' in card


def test_generation_config_stops_at_end(tokenizer_path):
    from dollyflow.core.tokens import load_tokenizer
    tok = load_tokenizer(tokenizer_path)
    gen = model_dir.generation_config(tok)
    assert gen.eos_token_id == tok.convert_tokens_to_ids("### End")
    assert gen.pad_token_id == tok.eos_token_id
    assert (gen.top_p, gen.top_k, gen.max_new_tokens, gen.do_sample) == (0.92, 0, 256, True)


def train_settings(**kw):
    return TrainSettings.from_dict(dict(dataclasses.asdict(TrainConfig()), **kw))


@pytest.mark.parametrize("name", dsconfig.PRESETS)
def test_presets_fill_every_auto(name):
    preset = dsconfig.load_preset(name)
    precision = {"a100": "bf16", "a10": "bf16", "v100": "fp16", "cpu": "fp32"}[name]
    ds = dsconfig.fill(preset, train_settings(batch_size=6, grad_accum=2), world_size=8, total_steps=100,
                       hidden_size=2560, precision=precision)
    assert "auto" not in json.dumps(ds)
    assert ds["train_batch_size"] == 6 * 2 * 8 and ds["train_micro_batch_size_per_gpu"] == 6
    assert ds["optimizer"]["params"]["lr"] == 5e-6 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] == (precision == "bf16") and ds["fp16"]["enabled"] == (precision == "fp16")
    assert ds["scheduler"] == {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 5e-6,
                                                              "warmup_num_steps": 50, "warmup_type": "log"}}
    z = ds["zero_optimization"]
    assert z["stage"] == (2 if name == "cpu" else 3)
    assert z["reduce_bucket_size"] == 2560 * 2560
    if name in ("a10", "v100"):
        assert z["offload_optimizer"]["device"] == "cpu"
    if name != "cpu":
        assert z["stage3_gather_16bit_weights_on_model_save"] is True


def test_fill_cosine_stage_override_and_leftover_auto():
    ds = dsconfig.fill(dsconfig.load_preset("cpu"), train_settings(lr_scheduler="cosine", zero_stage=3, min_lr_ratio=0.1),
                       world_size=2, total_steps=40, hidden_size=64, precision="fp32")
    assert ds["scheduler"]["type"] == "WarmupCosineLR"
    assert ds["scheduler"]["params"]["total_num_steps"] == 40 and ds["scheduler"]["params"]["cos_min_ratio"] == 0.1
    assert ds["zero_optimization"]["stage"] == 3
    with pytest.raises(ValueError, match="'auto' left for zero_optimization.sub_group_size"):
        dsconfig.fill({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, train_settings(), world_size=1,
                      total_steps=1, hidden_size=8, precision="fp32")


def test_auto_preset_and_precision():
    assert dsconfig.auto_preset({"cuda": False}) == "cpu"
    assert dsconfig.auto_preset({"cuda": True, "bf16": True, "memory_gib": 79.6}) == "a100"
    assert dsconfig.auto_preset({"cuda": True, "bf16": True, "memory_gib": 22.0}) == "a10"
    assert dsconfig.auto_preset({"cuda": True, "bf16": False, "memory_gib": 32}) == "v100"
    a100 = dsconfig.load_preset("a100")
    assert dsconfig.resolve_precision("auto", a100, {"cuda": False}) == "fp32"
    assert dsconfig.resolve_precision("auto", a100, {"cuda": True, "bf16": True}) == "bf16"
    assert dsconfig.resolve_precision("auto", a100, {"cuda": True, "bf16": False}) == "fp16"
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        dsconfig.resolve_precision("bf16", a100, {"cuda": False})


def test_train_config_defaults_are_dollys_and_tiny_is_fast():
    t = load_config("train").train
    assert (t.epochs, t.learning_rate, t.warmup_steps, t.batch_size, t.eval_steps, t.save_steps, t.seed,
            t.pad_to_multiple_of, t.gradient_checkpointing, t.lr_scheduler) == (
        2, 5e-6, 50, 6, 50, 200, 42, 8, True, "constant")
    tiny = load_config("train", preset="tiny").train
    assert tiny.processes == 2 and tiny.learning_rate > 1e-4


@pytest.mark.parametrize("override, key", [
    ("train.launcher=mpirun", "train.launcher"), ("train.method=qlora", "train.method"),
    ("train.batch_size=0", "train.batch_size"), ("train.learning_rate=0", "train.learning_rate"),
    ("train.lora_dropout=1.5", "train.lora_dropout"), ("train.zero_stage=4", "train.zero_stage"),
    ("train.processes=-1", "train.processes"), ("train.precision=int8", "train.precision"),
    ("train.lr_scheduler=linear", "train.lr_scheduler"), ("train.grad_accum=0", "train.grad_accum"),
])
def test_train_range_checks_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("train", [override])


def test_exponent_without_a_dot_is_a_float():
    assert load_config("train", ["train.learning_rate=5e-6"]).train.learning_rate == 5e-6
    with pytest.raises(ConfigError, match="train.learning_rate: expected float"):
        load_config("train", ["train.learning_rate=fast"])


def test_no_warmup_starts_at_the_peak():
    ds = dsconfig.fill(dsconfig.load_preset("cpu"), train_settings(warmup_steps=0, learning_rate=1e-3), world_size=1,
                       total_steps=10, hidden_size=8, precision="fp32")
    assert ds["scheduler"]["params"]["warmup_min_lr"] == ds["scheduler"]["params"]["warmup_max_lr"] == 1e-3
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 1
    cos = dsconfig.fill(dsconfig.load_preset("cpu"), train_settings(warmup_steps=0, lr_scheduler="cosine"), world_size=1,
                        total_steps=10, hidden_size=8, precision="fp32")
    assert cos["scheduler"]["params"]["warmup_min_ratio"] == 1.0


@pytest.mark.slow
def test_logging_the_model_leaves_the_process_tracking_uri_alone(dolly_model_dir, tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports $MLFLOW_TRACKING_URI; the train job's model logging must
    undo it, or the next train job in the same process (a pipeline, a notebook) tracks into the
    previous run's store."""
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("mlflow.transformers")
    from dollyflow.core.training import tracking

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"file:{tmp_path / 'mlruns'}"
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("t"))
    got = tracking._log_transformers_model(uri, run.info.run_id, str(dolly_model_dir))
    assert got["model_logged"], got
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert mlflow.get_tracking_uri() != uri


# ---- issue 18: one train job per output directory; replacing a model removes only ours


def test_a_second_train_job_on_one_output_dir_fails_naming_the_holder(tmp_path):
    import socket

    from dollyflow.core.training.lease import Lease, OutputLocked, lease_path, read

    out = str(tmp_path / "models" / "m")
    with Lease(out, "run-a", heartbeat_seconds=0.05) as a:
        first = read(lease_path(out))["heartbeat"]
        with pytest.raises(OutputLocked, match=rf"in use by run 'run-a' on host {socket.gethostname()}"):
            Lease(out, "run-b").acquire()
        import time
        time.sleep(0.3)
        assert read(lease_path(out))["heartbeat"] > first       # the holder's heartbeat goes on
        assert a.holds()
    assert not os.path.exists(lease_path(out))                  # released


def test_a_stale_lease_is_taken_over(tmp_path):
    from dollyflow.core.training.lease import Lease, lease_path, read

    out = str(tmp_path / "m")
    os.makedirs(tmp_path, exist_ok=True)
    with open(lease_path(out), "w") as f:                       # a driver that died an hour ago
        json.dump({"run_id": "dead-run", "host": "gone", "heartbeat": 0, "token": "x"}, f)
    with Lease(out, "run-c", stale_seconds=60) as lease:
        assert lease.taken_over["run_id"] == "dead-run" and read(lease_path(out))["run_id"] == "run-c"
    leftovers = [p for p in os.listdir(tmp_path) if "lease" in p]
    assert leftovers == []


def test_torchrun_user_form_is_the_train_job_without_spark(monkeypatch):
    """``python -m dollyflow.launch.torchrun ARGS`` becomes ``python -m dollyflow train --no-spark
    ARGS``: the launcher parses no argv and imports neither the CLI nor the jobs."""
    import subprocess
    import sys

    from dollyflow.launch import torchrun

    code = ("import sys, dollyflow.launch.torchrun\n"
            "bad = [m for m in sys.modules if m == 'dollyflow.cli' or m.startswith('dollyflow.jobs')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    seen = []
    monkeypatch.setattr(torchrun.os, "execv", lambda path, argv: seen.append((path, argv)))
    torchrun.main(["--preset", "tiny", "train.processes=2"])
    assert seen == [(sys.executable, [sys.executable, "-m", "dollyflow", "train", "--no-spark", "--preset", "tiny",
                                      "train.processes=2"])]


def test_status_dir_cleanup_stays_below_runs(tmp_path):
    from dollyflow.launch.common import cleanup

    out = tmp_path / "model"
    (out / ".runs").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ValueError, match="does not lie below"):
        cleanup(SimpleNamespace(output_dir=str(out), run_id=".."))   # would have been the model directory
    assert (out / "model.safetensors").read_bytes() == b"weights"


def _model_dir(path, fingerprint, weights=b"w", extra=()):
    os.makedirs(path, exist_ok=True)
    for name, data in (("config.json", b"{}"), ("model.safetensors", weights), ("README.md", b"card"), *extra):
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    return model_dir.write_provenance(path, {"fingerprint": {"sha256": fingerprint},
                                          "files": model_dir.list_files(path, ("checkpoints", ".runs"))})


def test_swap_in_replaces_only_what_the_project_wrote(tmp_path):
    out, new, prev = str(tmp_path / "m"), str(tmp_path / ".m.next-b"), str(tmp_path / ".m.prev-b")
    _model_dir(out, "a", b"old weights")
    make_ckpt(os.path.join(out, "checkpoints"), 10, fingerprint="a")
    with open(os.path.join(out, "my-notes.txt"), "w") as f:       # the user's own files
        f.write("mine")
    os.makedirs(os.path.join(out, "eval-results"))
    with open(os.path.join(out, "eval-results", "scores.csv"), "w") as f:
        f.write("1,2")
    _model_dir(new, "b", b"new weights")
    done = model_dir.swap_in(new, out, prev)
    assert sorted(done["carried"]) == ["eval-results", "my-notes.txt"] and done["kept"] is None
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == b"new weights"
    assert model_dir.read_provenance(out)["fingerprint"]["sha256"] == "b"
    assert open(os.path.join(out, "my-notes.txt")).read() == "mine"
    assert open(os.path.join(out, "eval-results", "scores.csv")).read() == "1,2"
    assert not os.path.exists(prev) and not os.path.exists(new)


def test_swap_in_keeps_a_user_file_whose_name_the_new_model_uses(tmp_path):
    out, new, prev = str(tmp_path / "m"), str(tmp_path / ".m.next-b"), str(tmp_path / ".m.prev-b")
    _model_dir(out, "a")
    with open(os.path.join(out, "adapter"), "w") as f:            # not ours, and the new model has adapter/
        f.write("user's")
    _model_dir(new, "b")
    os.makedirs(os.path.join(new, "adapter"))
    done = model_dir.swap_in(new, out, prev)
    assert done["kept"] == prev and os.listdir(prev) == ["adapter"]
    assert open(os.path.join(prev, "adapter")).read() == "user's"


@pytest.mark.parametrize("name", ["..", ".", "/", "a/..", "Org/My Model!", "../../etc"])
def test_default_output_dir_is_always_below_models(name, tmp_path):
    from dollyflow.core.storage import check_within
    from dollyflow.core.training.prepare import default_output_dir, model_short_name

    cfg = load_config("train", [f"tables.warehouse={tmp_path}", f"model.name={name}"])
    out = default_output_dir(cfg, "ab" * 32)
    check_within(out, f"{tmp_path}/models")
    assert model_short_name(name) not in ("", ".", "..") and "/" not in model_short_name(name)


def test_a_tampered_file_list_cannot_lead_a_removal_outside(tmp_path):
    """The provenance's and the checkpoint marker's file lists name what may be removed; a listed
    '../x' (an edited or forged list) is refused, never followed."""
    victim = tmp_path / "precious.txt"
    victim.write_text("keep")
    root = str(tmp_path / "ckpts")
    path = make_ckpt(root, 10, fingerprint="old")
    c = checkpoint.latest_complete(root)
    c.info["files"]["../../precious.txt"] = {"sha256": "x", "bytes": 4}
    checkpoint.mark_complete(path, {k: v for k, v in c.info.items() if k != "files"}, c.info["files"])
    with pytest.raises(ValueError, match="does not lie below"):
        checkpoint.remove_other_runs(root, "new")
    out, new, prev = str(tmp_path / "m"), str(tmp_path / ".m.next-b"), str(tmp_path / ".m.prev-b")
    prov = _model_dir(out, "a")
    model_dir.write_provenance(out, dict(prov, files={**prov["files"], "../precious.txt": 4}))
    _model_dir(new, "b")
    with pytest.raises(ValueError, match="does not lie below"):
        model_dir.swap_in(new, out, prev)
    assert victim.read_text() == "keep"
