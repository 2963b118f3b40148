"""The ``dollyflow`` command: the only argv parser; its console scripts and ``python -m``."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dollyflow import cli
from dollyflow.config import load_defaults
from dollyflow.jobs import ORDER, installed, job_module

REPO = Path(__file__).resolve().parents[2]
LIB = REPO / "lib"


def _run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dollyflow", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={"PYTHONPATH": str(LIB), "PATH": "/usr/bin:/bin"})


def test_python_m_dollyflow_is_the_command():
    done = _run("--help")
    assert done.returncode == 0, done.stderr
    for cmd in ["pipeline", "report", "quickstart", "config", *ORDER]:
        assert cmd in done.stdout
    bad = _run("no-such-command")
    assert bad.returncode == 2 and "usage: dollyflow" in bad.stderr


def test_config_describe_documents_every_key_with_its_default():
    done = _run("config", "train", "--describe")
    assert done.returncode == 0, done.stderr
    described = yaml.safe_load(done.stdout)
    defaults = load_defaults("train").to_dict()
    assert described["train"] == defaults["train"] and described["model"] == defaults["model"]
    assert done.stdout.count("#") >= len(defaults["train"])    # a comment per key at least
    bad = _run("config", "bogus", "--describe")
    assert bad.returncode == 2 and "unknown job 'bogus'" in bad.stderr


def test_every_job_has_its_console_script_and_no_main():
    setup = (REPO / "setup.py").read_text()
    for job in ORDER:
        assert callable(getattr(cli, job))
        assert not hasattr(job_module(job), "main"), f"dollyflow.jobs.{job} parses no argv: cli does"
    assert 'f"dollyflow-{job}=dollyflow.cli:{job}"' in setup
    assert installed() == ORDER


def test_spark_submit_scripts_hand_argv_to_the_cli():
    for job in ORDER:
        text = (REPO / "jobs" / f"{job}.py").read_text()
        assert f'run_job("{job}", sys.argv[1:])' in text


def test_unknown_job_is_refused():
    with pytest.raises(ValueError, match="unknown job 'bogus'"):
        job_module("bogus")


def test_config_errors_exit_2_naming_the_key(capsys):
    assert cli.main(["ingest", "ingest.no_such_key=1"]) == 2
    assert "ingest.no_such_key" in capsys.readouterr().err
    assert cli.main(["train", "--no-spark", "train.batch_size=-1"]) == 2
    assert "train.batch_size" in capsys.readouterr().err
