"""The tiny pythia-architecture model the tests and the local demo train; model sources (kinds,
the private cache keyed by immutable identities: file:// listings, the MLflow registry)."""
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


def test_tiny_model_runs_with_the_dolly_tokenizer(tiny_model_factory, tokenizer_path):
    from dollyflow.core.tokens import load_tokenizer
    tok = load_tokenizer(str(tokenizer_path))
    model = tiny_model_factory(len(tok))
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    assert sum(p.numel() for p in model.parameters()) < 10_000_000
    ids = tok("### Instruction:\nSay hi.\n\n### Response:\n", return_tensors="pt")["input_ids"]
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(out.loss)
    # same seed, same weights: runs are reproducible
    again = tiny_model_factory(len(tok))
    assert torch.equal(next(model.parameters()), next(again.parameters()))


def test_load_model_tiny_needs_vocab():
    from dollyflow.core.model import load_model
    with pytest.raises(ValueError, match="vocab_size"):
        load_model("tiny-gpt-neox")


# ---------------------------------------------------------------------------------------------
# model sources: which kind, the cache's location and keys


def _copy_with_weights_byte(src, dst, byte: bytes):
    """A copy of model directory ``src`` whose weights differ from it in their last byte only
    (same file names and sizes, other content: another sha256)."""
    import shutil
    shutil.copytree(src, dst)
    w = dst / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1] + byte)
    return dst


def test_source_kinds_a_missing_path_is_an_error_not_a_hub_download(tmp_path, monkeypatch):
    from dollyflow.core.model import source_kind

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "model").mkdir()
    assert source_kind("model") == "dir" and source_kind(str(tmp_path / "model")) == "dir"
    for hub in ("EleutherAI/pythia-410m", "databricks/dolly-v2-3b@main", "org/name@0123abc"):
        assert source_kind(hub) == "hub", hub
    assert source_kind("runs:/abc/model") == "mlflow" and source_kind("models:/dolly@champion") == "mlflow"
    assert source_kind("s3://b/m") == "uri" and source_kind("file:///x") == "uri"
    # paths the user meant: the first segment exists here, a leading . / ~, more than one /
    for missing in ("out/dolly-lora", "./dolly-lora", "../x/y", "~/nope/model", "a/b/c", "org/name/", "/abs/x"):
        with pytest.raises(FileNotFoundError, match="does not exist") as e:
            source_kind(missing)
        assert str(Path(missing).expanduser().absolute()).rstrip("/").split("/")[-1] in str(e.value), missing
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "out" / "dolly-lora")):
        source_kind("out/dolly-lora")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        source_kind("file")


def test_the_cache_is_a_private_directory_of_this_user(tmp_path, monkeypatch):
    import tempfile

    from dollyflow.core.model import CACHE_ENV, model_cache_root

    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    root = Path(model_cache_root())
    assert root == tmp_path / f"dollyflow-models-{os.getuid()}"
    assert root.is_dir() and (root.stat().st_mode & 0o777) == 0o700 and root.stat().st_uid == os.getuid()
    assert model_cache_root() == str(root)                  # checked again, accepted again
    root.chmod(0o777)                                       # someone made it writable by everyone
    with pytest.raises(PermissionError, match=r"writable by other users \(mode 777\)"):
        model_cache_root()
    root.chmod(0o700)
    # $DOLLYFLOW_MODEL_CACHE: created 0700, and the same checks
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine" / "cache"))
    assert Path(model_cache_root()).stat().st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o775)
    shared.chmod(0o775)
    monkeypatch.setenv(CACHE_ENV, str(shared))
    with pytest.raises(PermissionError, match="writable by other users"):
        model_cache_root()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "mine" / "cache")
    monkeypatch.setenv(CACHE_ENV, str(link))
    with pytest.raises(PermissionError, match="symbolic link"):
        model_cache_root()
    # a directory another user owns (prepared in /tmp under the predictable name): refused
    if os.getuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
    else:
        theirs = Path("/")                                  # root's, and not writable by us
    monkeypatch.setenv(CACHE_ENV, str(theirs))
    with pytest.raises(PermissionError, match=r"belongs to uid \d+, not to this user"):
        model_cache_root()


def test_a_rewritten_uri_directory_is_fetched_again(dolly_model_dir, tmp_path, monkeypatch):
    """The cache is keyed by the directory's listing, not its URI: rewriting the weights (same
    names and sizes) makes the next resolve download the new model, not return the stale copy."""
    from dollyflow.core.model import locate_model, model_digest, resolve_model_dir

    monkeypatch.setenv("DOLLYFLOW_MODEL_CACHE", str(tmp_path / "cache"))
    src = _copy_with_weights_byte(dolly_model_dir, tmp_path / "current", b"\x00")
    uri = f"file://{src}"
    first = resolve_model_dir(uri)
    assert model_digest(first) == model_digest(str(src))
    assert resolve_model_dir(uri) == first                  # unchanged: the cached copy
    before = locate_model(uri)
    w = src / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1] + b"\x01")            # a new model in place, same size
    after = locate_model(uri)
    assert after.kind == "uri" and after.key != before.key and after.identity.startswith(f"{uri} listing-sha256:")
    second = resolve_model_dir(uri)
    assert second != first and model_digest(second) == model_digest(str(src)) != model_digest(first)
    # the driver's pinned identity no longer matches a directory rewritten since: a worker refuses it
    from dollyflow.core.model import fetch_model
    w.write_bytes(w.read_bytes()[:-1] + b"\x02")
    monkeypatch.setenv("DOLLYFLOW_MODEL_CACHE", str(tmp_path / "other-machine"))
    with pytest.raises(RuntimeError, match="changed since it was resolved"):
        fetch_model(after)


def test_mlflow_registry_sources_resolve_to_the_current_version(dolly_model_dir, tmp_path, monkeypatch):
    """models:/name@alias and models:/name/latest are resolved to a model version first, and the
    cache is keyed by that version: moving the alias (or registering a newer version) makes the
    next resolve download the model it now points at."""
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from dollyflow.core.model import locate_model, model_digest, resolve_model_dir

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("DOLLYFLOW_MODEL_CACHE", str(tmp_path / "cache"))
    store = f"file://{tmp_path / 'mlruns'}"                 # a local tracking + registry store, offline
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", store)
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    experiment = client.create_experiment("infer-sources")
    client.create_registered_model("dolly")
    dirs, versions = [], []
    for i, byte in enumerate((b"\x00", b"\x01")):
        d = _copy_with_weights_byte(dolly_model_dir, tmp_path / f"v{i + 1}", byte)
        run = client.create_run(experiment)
        client.log_artifacts(run.info.run_id, str(d), "model")
        client.set_terminated(run.info.run_id)
        mv = client.create_model_version("dolly", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
        dirs.append(d)
        versions.append(mv)
        if i == 0:
            client.set_registered_model_alias("dolly", "champion", mv.version)
            champion = resolve_model_dir("models:/dolly@champion")
            assert model_digest(champion) == model_digest(str(d))
    # v2 registered: latest moves, the alias has not
    assert model_digest(resolve_model_dir("models:/dolly@champion")) == model_digest(str(dirs[0]))
    latest = locate_model("models:/dolly/latest")
    assert latest.pinned == "models:/dolly/2" and versions[1].run_id in latest.identity
    assert model_digest(resolve_model_dir("models:/dolly/latest")) == model_digest(str(dirs[1]))
    # the alias moves to v2: the next resolve is v2, not the cached v1
    client.set_registered_model_alias("dolly", "champion", versions[1].version)
    moved = resolve_model_dir("models:/dolly@champion")
    assert moved != champion and model_digest(moved) == model_digest(str(dirs[1]))
    assert locate_model("models:/dolly@champion").describe() == {
        "kind": "mlflow", "source": "models:/dolly@champion", "resolved": "models:/dolly/2",
        "identity": latest.identity}
