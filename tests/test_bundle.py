"""The Databricks asset bundle (databricks.yml + resources/*.yml).

- every job and the Volume load into the maintained ``databricks-bundles`` classes (``Job``,
  ``Volume``: unknown keys, bad enum values and wrong types raise) after the bundle's variables
  are substituted for each target, and a typo'd key is refused;
- ``dolly_pipeline`` runs the six jobs in order, data tasks on the CPU cluster, train, infer and
  evaluate on the GPU ML-runtime cluster with the Spark conf TorchDistributor needs;
- every task's parameters resolve, through the CLI's own argument parser and ``load_config``,
  to a valid configuration for that job (env databricks), and the train/infer settings fit the
  GPU cluster the task runs on;
- every task's entry point is a console script of the built wheel and loads, from the wheel
  alone, to a callable.
"""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
JOB_ORDER = ["ingest", "dedupe", "filter", "tokenize", "train", "infer", "evaluate"]
REF = re.compile(r"\$\{([A-Za-z0-9_.\-]+)\}")
DYNAMIC = re.compile(r"\{\{([A-Za-z0-9_.\-]+)\}\}")
RUN_ID = "987654321"


# ---------------------------------------------------------------------------------------------
# reading the bundle the way `databricks bundle validate` does (include, targets, ${...})


def read_bundle() -> dict:
    """databricks.yml with every ``include:`` file merged into its ``resources``."""
    root = yaml.safe_load((REPO / "databricks.yml").read_text())
    resources = root.setdefault("resources", {})
    for pattern in root.get("include", []):
        files = sorted(REPO.glob(pattern))
        assert files, f"include pattern {pattern!r} matches no file"
        for f in files:
            part = yaml.safe_load(f.read_text())
            assert set(part) == {"resources"}, f"{f.name}: only a resources mapping belongs in an included file"
            for kind, items in part["resources"].items():
                clash = set(items) & set(resources.get(kind, {}))
                assert not clash, f"{f.name}: {kind} {sorted(clash)} defined twice"
                resources.setdefault(kind, {}).update(items)
    return root


def target_variables(bundle: dict, target: str, **overrides) -> dict:
    """Variable values for a target: defaults <- targets.<target>.variables <- --var overrides."""
    values = {name: spec["default"] for name, spec in bundle["variables"].items()}
    for name, value in (bundle["targets"][target].get("variables") or {}).items():
        assert name in values, f"target {target} sets undeclared variable {name}"
        values[name] = value
    values.update(overrides)
    return values


def substitute(node, lookup):
    """Replace ``${a.b}`` references; a string that is one reference keeps the value's type."""
    if isinstance(node, dict):
        return {k: substitute(v, lookup) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute(v, lookup) for v in node]
    if isinstance(node, str):
        whole = REF.fullmatch(node)
        if whole:
            return lookup(whole.group(1))
        return REF.sub(lambda m: str(lookup(m.group(1))), node)
    return node


def resolve(bundle: dict, target: str, **var_overrides) -> dict:
    """The bundle's resources for ``target`` with every ${var.*}, ${bundle.*} and
    ${resources.*} reference resolved; an unknown reference fails."""
    variables = target_variables(bundle, target, **var_overrides)
    resolved_resources: dict = {}

    def lookup(ref: str):
        head, _, rest = ref.partition(".")
        if head == "var":
            assert rest in variables, f"${{{ref}}}: undeclared variable"
            return variables[rest]
        if head == "bundle":
            known = {"target": target, "name": bundle["bundle"]["name"]}
            assert rest in known, f"${{{ref}}}: unknown bundle field"
            return known[rest]
        if head == "resources":
            kind, key, field = rest.split(".", 2)
            assert kind in resolved_resources and key in resolved_resources[kind], f"${{{ref}}}: unknown resource"
            assert field in resolved_resources[kind][key], f"${{{ref}}}: resource has no field {field}"
            return resolved_resources[kind][key][field]
        raise AssertionError(f"${{{ref}}}: unknown reference")

    res = bundle["resources"]
    for kind in ("volumes", "jobs"):   # volumes first: jobs refer to the Volume's name
        resolved_resources[kind] = {k: substitute(v, lookup) for k, v in res.get(kind, {}).items()}
    assert set(res) <= {"volumes", "jobs"}, f"unexpected resource kinds {sorted(set(res))}"
    return resolved_resources


def dynamic(params: list[str], job: dict, **job_params) -> list[str]:
    """Fill Databricks' dynamic value references ({{job.run_id}}, {{job.parameters.<name>}})."""
    values = {p["name"]: p["default"] for p in job.get("parameters", [])}
    assert set(job_params) <= set(values), f"unknown job parameters {sorted(set(job_params) - set(values))}"
    values.update(job_params)

    def fill(m):
        ref = m.group(1)
        if ref == "job.run_id":
            return RUN_ID
        if ref.startswith("job.parameters."):
            name = ref.split(".", 2)[2]
            assert name in values, f"{{{{{ref}}}}}: the job declares no parameter {name}"
            return str(values[name])
        raise AssertionError(f"{{{{{ref}}}}}: unsupported dynamic value reference")

    return [DYNAMIC.sub(fill, p) for p in params]


BUNDLE = read_bundle()
TARGETS = sorted(BUNDLE["targets"])


def task_config(job: dict, task: dict, **job_params):
    """The task's parameters through the CLI's own parser and load_config, as the wheel task runs them."""
    from dollyflow.cli import job_parser
    from dollyflow.config import load_config

    entry = task["python_wheel_task"]["entry_point"]
    name = entry.removeprefix("dollyflow-")
    params = dynamic(task["python_wheel_task"]["parameters"], job, **job_params)
    args = job_parser(entry).parse_args(params)
    return load_config(name, args.overrides, preset=args.preset, env=args.env, conf=args.conf)


# ---------------------------------------------------------------------------------------------
# structure


def test_bundle_layout_targets_and_artifact():
    assert BUNDLE["bundle"]["name"] == "dollyflow"
    assert BUNDLE["include"] == ["resources/*.yml"]
    assert set(BUNDLE["resources"]["jobs"]) == {"dolly_pipeline", "dolly_batch_inference"}
    for name in BUNDLE["resources"]["jobs"]:   # one file per job, named after it
        part = yaml.safe_load((REPO / "resources" / f"{name}.yml").read_text())
        assert list(part["resources"]["jobs"]) == [name]
    assert BUNDLE["targets"]["dev"] == {**BUNDLE["targets"]["dev"], "mode": "development", "default": True}
    assert BUNDLE["targets"]["prod"]["mode"] == "production"
    (artifact,) = BUNDLE["artifacts"].values()
    assert artifact["type"] == "whl" and artifact["path"] == "."
    assert "wheel" in artifact["build"] and "-w dist" in artifact["build"]
    for var in ("catalog", "schema", "volume", "raw_files", "preset", "gpu_node_type", "gpu_workers",
                "gpus_per_worker", "gpu_processes", "deepspeed"):
        assert BUNDLE["variables"][var].get("description"), var
    # every declared variable is used somewhere
    text = "\n".join(p.read_text() for p in [REPO / "databricks.yml", *(REPO / "resources").glob("*.yml")])
    unused = [v for v in BUNDLE["variables"] if f"${{var.{v}}}" not in text]
    assert not unused, f"declared but unused variables: {unused}"


@pytest.mark.parametrize("target", TARGETS)
def test_resources_load_into_databricks_bundles_classes(target):
    pytest.importorskip("databricks.bundles", reason="databricks-bundles is not installed (dev extra)")
    from databricks.bundles.core import Variable
    from databricks.bundles.jobs import Job
    from databricks.bundles.volumes import Volume

    res = resolve(BUNDLE, target)
    jobs = {name: Job.from_dict(copy.deepcopy(spec)) for name, spec in res["jobs"].items()}
    volumes = {name: Volume.from_dict(copy.deepcopy(spec)) for name, spec in res["volumes"].items()}
    assert volumes["files"].volume_type.value == "MANAGED"
    # nothing left unresolved: a leftover ${...} would load as a Variable (its repr is the reference)
    assert "${" not in repr(jobs) + repr(volumes) and not isinstance(jobs["dolly_pipeline"].name, Variable)
    assert not isinstance(volumes["files"].catalog_name, Variable)
    # the classes kept what the YAML said (a field silently dropped would show here)
    for name, job in jobs.items():
        loaded = job.as_dict()
        assert _cast_like(res["jobs"][name], loaded) == loaded


def _cast_like(spec, loaded):
    """The YAML with scalars written as the classes write them (ints in str maps become str)."""
    if isinstance(spec, dict) and isinstance(loaded, dict):
        return {k: _cast_like(v, loaded.get(k)) for k, v in spec.items()}
    if isinstance(spec, list) and isinstance(loaded, list) and len(spec) == len(loaded):
        return [_cast_like(a, b) for a, b in zip(spec, loaded)]
    if isinstance(loaded, str) and not isinstance(spec, str):
        return str(spec)
    return spec


@pytest.mark.parametrize("where,key,typo", [
    (("tasks", 0), "python_wheel_task", "python_wheel_taks"),
    (("tasks", 3, "python_wheel_task"), "entry_point", "entry_pointt"),
    (("job_clusters", 1, "new_cluster"), "spark_conf", "spark_confs"),
    ((), "max_concurrent_runs", "max_concurent_runs"),
])
def test_a_typo_in_a_job_is_refused(where, key, typo):
    pytest.importorskip("databricks.bundles", reason="databricks-bundles is not installed (dev extra)")
    from databricks.bundles.jobs import Job

    spec = copy.deepcopy(resolve(BUNDLE, "dev")["jobs"]["dolly_pipeline"])
    node = spec
    for step in where:
        node = node[step]
    node[typo] = node.pop(key)
    with pytest.raises(ValueError, match=f"Unexpected field '{typo}'"):
        Job.from_dict(spec)
    bad_enum = copy.deepcopy(resolve(BUNDLE, "dev")["jobs"]["dolly_pipeline"])
    bad_enum["job_clusters"][0]["new_cluster"]["data_security_mode"] = "SINGLE"
    with pytest.raises(ValueError, match="DataSecurityMode"):
        Job.from_dict(bad_enum)


def test_a_typo_in_the_volume_is_refused():
    pytest.importorskip("databricks.bundles", reason="databricks-bundles is not installed (dev extra)")
    from databricks.bundles.volumes import Volume

    spec = dict(resolve(BUNDLE, "dev")["volumes"]["files"])
    spec["volume_typ"] = spec.pop("volume_type")
    with pytest.raises(ValueError, match="Unexpected field 'volume_typ'"):
        Volume.from_dict(spec)


def test_unresolved_references_fail():
    broken = copy.deepcopy(BUNDLE)
    broken["resources"]["jobs"]["dolly_pipeline"]["tasks"][0]["python_wheel_task"]["parameters"].append(
        "tables.schema=${var.shema}")
    with pytest.raises(AssertionError, match="undeclared variable"):
        resolve(broken, "dev")


def test_pipeline_tasks_clusters_and_gpu_conf():
    jobs_in_setup = re.search(r"^JOBS = (\[.*\])$", (REPO / "setup.py").read_text(), re.M).group(1)
    assert json.loads(jobs_in_setup.replace("'", '"')) == JOB_ORDER

    variables = target_variables(BUNDLE, "prod")
    job = resolve(BUNDLE, "prod")["jobs"]["dolly_pipeline"]
    tasks = job["tasks"]
    assert [t["task_key"] for t in tasks] == JOB_ORDER
    for prev, task in zip([None] + JOB_ORDER, tasks):
        assert task.get("depends_on", []) == ([{"task_key": prev}] if prev else [])
        name = task["task_key"]
        wheel = task["python_wheel_task"]
        assert wheel["package_name"] == "dollyflow" and wheel["entry_point"] == f"dollyflow-{name}"
        assert {"whl": "./dist/*.whl"} in task["libraries"]
        assert (REPO / "jobs" / f"{name}.py").is_file() and (REPO / "conf" / "jobs" / f"{name}.yaml").is_file()
        assert (REPO / "lib" / "dollyflow" / "jobs" / f"{name}.py").is_file()
        assert task["job_cluster_key"] == ("gpu" if name in ("train", "infer", "evaluate") else "cpu")
        # no library may drag a torch build onto the cluster: the ML runtime's CUDA torch stays
        for lib in task["libraries"]:
            assert "torch" not in json.dumps(lib), lib
    clusters = {c["job_cluster_key"]: c["new_cluster"] for c in job["job_clusters"]}
    gpu, cpu = clusters["gpu"], clusters["cpu"]
    assert "-gpu-ml-" in gpu["spark_version"] and "-ml-" not in cpu["spark_version"]
    assert gpu["num_workers"] == variables["gpu_workers"] and gpu["node_type_id"] == variables["gpu_node_type"]
    assert gpu["spark_conf"]["spark.task.resource.gpu.amount"] == "1"
    assert int(gpu["spark_conf"]["spark.executor.resource.gpu.amount"]) == variables["gpus_per_worker"]
    batch = resolve(BUNDLE, "prod")["jobs"]["dolly_batch_inference"]
    assert [t["task_key"] for t in batch["tasks"]] == ["infer"]
    assert batch["job_clusters"][0]["new_cluster"] == {k: v for k, v in gpu.items()}


# ---------------------------------------------------------------------------------------------
# every task's parameters are a valid config for its job, fit for the cluster it runs on


@pytest.mark.parametrize("target", TARGETS)
def test_every_task_resolves_to_a_valid_databricks_config(target):
    from dollyflow.config import shards_root

    variables = target_variables(BUNDLE, target)
    jobs = resolve(BUNDLE, target)["jobs"]
    volume = f"/Volumes/{variables['catalog']}/{variables['schema']}/{variables['volume']}"
    cfgs = {}
    for job_name, job in jobs.items():
        for task in job["tasks"]:
            cfg = task_config(job, task)
            cfgs[(job_name, task["task_key"])] = cfg
            assert cfg.job == task["task_key"] and cfg.env == "databricks" and cfg.preset == variables["preset"]
            assert cfg.tables.catalog == variables["catalog"] and cfg.tables.schema == variables["schema"]
            assert cfg.tables.backend == "native" and cfg.tables.files_root() == volume
            assert cfg.run_id == f"job-{RUN_ID}-{task['task_key']}"
            assert cfg.model.name == f"EleutherAI/{variables['preset']}"

    assert cfgs["dolly_pipeline", "ingest"].ingest.input == f"{volume}/{variables['raw_files']}"
    assert shards_root(cfgs["dolly_pipeline", "tokenize"]) == f"{volume}/shards/silver"

    train = cfgs["dolly_pipeline", "train"].train
    processes = variables["gpu_workers"] * variables["gpus_per_worker"]
    assert variables["gpu_processes"] == processes, "gpu_processes must be gpu_workers x gpus_per_worker"
    assert train.launcher == "torch_distributor" and train.local_mode is False and train.use_gpu is True
    assert train.processes == processes
    assert train.deepspeed == variables["deepspeed"] == "a10" and train.precision == "bf16"
    preset = json.loads((REPO / "conf" / "deepspeed" / f"{train.deepspeed}.json").read_text())
    assert preset["bf16"]["enabled"] in (True, "auto") and preset["zero_optimization"]["stage"] == 3
    assert train.output_dir.startswith(f"{volume}/models/") and train.method == variables["train_method"]
    assert train.overwrite is variables["train_overwrite"]
    # the pipeline's infer scores with the model its train task wrote, one task per GPU
    infer = cfgs["dolly_pipeline", "infer"].infer
    assert infer.model == train.output_dir and infer.device == "auto" and infer.split == "test"
    assert infer.partitions == processes
    batch = cfgs["dolly_batch_inference", "infer"].infer
    assert batch.model == train.output_dir and batch.input_table == "silver" and batch.query == ""
    assert batch.split == "all" and batch.key_columns == ["record_id"] and batch.device == "auto"
    # the pipeline's evaluate compares the predictions of the model the train task wrote
    evaluate = cfgs["dolly_pipeline", "evaluate"].evaluate
    assert evaluate.models == [train.output_dir]


def test_batch_inference_job_parameters_reach_the_config():
    job = resolve(BUNDLE, "prod")["jobs"]["dolly_batch_inference"]
    (task,) = job["tasks"]
    query = "SELECT ticket_id, body AS instruction, '' AS context FROM main.support.tickets WHERE lang = 'en'"
    cfg = task_config(job, task, query=query, model="models:/dolly/3", key_columns="[ticket_id]",
                      split="all")
    assert cfg.infer.query == query and cfg.infer.model == "models:/dolly/3"
    assert cfg.infer.key_columns == ["ticket_id"]
    from dollyflow.config import ConfigError
    with pytest.raises(ConfigError, match="infer.split"):
        task_config(job, task, split="holdout")


def test_gpu_variables_can_be_changed_together():
    res = resolve(BUNDLE, "prod", gpu_workers=4, gpus_per_worker=8, gpu_processes=32, deepspeed="a100",
                  gpu_node_type="p4d.24xlarge")
    job = res["jobs"]["dolly_pipeline"]
    cfg = task_config(job, next(t for t in job["tasks"] if t["task_key"] == "train"))
    assert cfg.train.processes == 32 and cfg.train.deepspeed == "a100"
    gpu = {c["job_cluster_key"]: c["new_cluster"] for c in job["job_clusters"]}["gpu"]
    assert gpu["node_type_id"] == "p4d.24xlarge" and gpu["spark_conf"]["spark.executor.resource.gpu.amount"] == 8


# ---------------------------------------------------------------------------------------------
# the wheel the tasks install


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("dollyflow-*.whl")
    return wheel


@pytest.mark.slow
def test_every_task_entry_point_is_in_the_wheel_and_loads_from_it(built_wheel, tmp_path):
    with zipfile.ZipFile(built_wheel) as z:
        entry_text = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))).decode()
        z.extractall(tmp_path / "site")
    from configparser import ConfigParser
    parser = ConfigParser()
    parser.read_string(entry_text)
    scripts = dict(parser["console_scripts"])
    tasks = [(job, t) for job in resolve(BUNDLE, "prod")["jobs"].values() for t in job["tasks"]]
    assert {t["python_wheel_task"]["entry_point"] for _, t in tasks} == {f"dollyflow-{j}" for j in JOB_ORDER}
    for _, task in tasks:
        assert task["python_wheel_task"]["package_name"] == "dollyflow"
        assert task["python_wheel_task"]["entry_point"] in scripts
    # Load each entry point from the extracted wheel alone (not this checkout) and resolve the
    # task's parameters against the conf/ the wheel carries.
    probe = [{"entry": t["python_wheel_task"]["entry_point"], "value": scripts[t["python_wheel_task"]["entry_point"]],
              "params": dynamic(t["python_wheel_task"]["parameters"], job)} for job, t in tasks]
    code = r"""
import json, sys
from importlib.metadata import EntryPoint
import dollyflow, dollyflow.config as c
out = {"package": dollyflow.__file__, "conf": str(c.conf_dir()), "tasks": []}
for p in json.loads(sys.argv[1]):
    fn = EntryPoint(p["entry"], p["value"], "console_scripts").load()
    from dollyflow.cli import job_parser
    a = job_parser(p["entry"]).parse_args(p["params"])
    cfg = c.load_config(p["entry"].split("-", 1)[1], a.overrides, preset=a.preset, env=a.env)
    out["tasks"].append([p["entry"], callable(fn), f"{fn.__module__}:{fn.__name__}", cfg.env, cfg.tables.files_root()])
print(json.dumps(out))
"""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "site"), "PYTHONNOUSERSITE": "1"}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(probe)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    site = str(tmp_path / "site")
    assert got["package"].startswith(site) and got["conf"] == f"{site}/dollyflow/_conf"
    assert len(got["tasks"]) == len(tasks)
    for entry, is_callable, module, env_name, root in got["tasks"]:
        assert is_callable and module == f"dollyflow.cli:{entry.split('-', 1)[1]}"
        assert env_name == "databricks" and root.startswith("/Volumes/")


@pytest.mark.slow
def test_wheel_requirements_leave_the_runtime_torch_alone(built_wheel):
    """The GPU ML runtime ships CUDA torch and transformers: the wheel's hard requirements name
    neither (pip would otherwise fetch another torch build), and the bundle's own libraries don't."""
    with zipfile.ZipFile(built_wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    hard = [r for r in requires if "extra ==" not in r]
    assert hard and not any(re.match(r"(torch|transformers|pyspark|deepspeed)\b", r) for r in hard), hard
    torch_reqs = [r for r in requires if re.match(r"torch\b", r)]
    assert torch_reqs and all('extra == "train"' in r for r in torch_reqs)
    assert any(r.startswith("databricks-bundles") and 'extra == "dev"' in r for r in requires)
