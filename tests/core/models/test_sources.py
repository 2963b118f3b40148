"""Model sources: kinds, resolution to immutable identities (file:// listings, the MLflow registry),
fetching once per machine into the private cache; a model directory's weights and digest."""
import os
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from dollyflow.core.models.cache import CACHE_ENV, model_cache_root  # noqa: E402
from dollyflow.core.models.fetch import fetch_model, resolve_model_dir  # noqa: E402
from dollyflow.core.models.files import model_digest, weight_files  # noqa: E402
from dollyflow.core.models.loading import load_for_generation  # noqa: E402
from dollyflow.core.models.sources import locate_model, source_kind  # noqa: E402


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


def test_model_sources_digest_and_safetensors_only(dolly_model_dir, tmp_path):
    d = str(dolly_model_dir)
    assert source_kind(d) == "dir" and resolve_model_dir(d) == d
    assert source_kind("EleutherAI/pythia-410m") == "hub"
    assert source_kind("runs:/abc/model") == "mlflow" and source_kind("s3://b/m") == "uri"
    with pytest.raises(FileNotFoundError):
        source_kind(str(tmp_path / "missing" / "model"))
    digest = model_digest(d)
    assert len(digest) == 64 and model_digest(d) == digest
    copy = tmp_path / "copy"
    shutil.copytree(dolly_model_dir, copy)
    assert model_digest(str(copy)) == digest            # content, not location
    (copy / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes()[:-1] + b"\x00")
    assert model_digest(str(copy)) != digest
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        weight_files(str(pickled))


def test_file_uri_sources_are_fetched_once_per_machine(dolly_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DOLLYFLOW_MODEL_CACHE", str(tmp_path / "cache"))
    uri = f"file://{dolly_model_dir}"
    local = resolve_model_dir(uri)
    assert local.startswith(str(tmp_path / "cache")) and model_digest(local) == model_digest(str(dolly_model_dir))
    mtime = (tmp_path / "cache").stat().st_mtime_ns
    assert resolve_model_dir(uri) == local and (tmp_path / "cache").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_mlflow_run_uri_loads_the_logged_directory(dolly_model_dir, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("DOLLYFLOW_MODEL_CACHE", str(tmp_path / "cache"))
    # set_tracking_uri also exports MLFLOW_TRACKING_URI: undo both, or the train job of a later
    # test in this process would track into this test's store
    tracking = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)   # the original value comes back at teardown
    mlflow.set_tracking_uri(tracking)
    try:
        with mlflow.start_run() as active:
            mlflow.log_artifacts(str(dolly_model_dir), artifact_path="model")
        uri = f"runs:/{active.info.run_id}/model"
        local = resolve_model_dir(uri)
    finally:
        mlflow.set_tracking_uri(None)
    assert model_digest(local) == model_digest(str(dolly_model_dir))
    model, tok = load_for_generation(local)
    assert len(tok) == model.get_input_embeddings().num_embeddings
