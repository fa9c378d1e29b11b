"""The two dependency lists agree, and the install never asks for torchvision."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _conda_pip_names() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    return {_name(r) for r in pip_lists[0]}


def test_environment_yml_lists_the_same_packages_as_pyproject():
    project = _pyproject()
    wanted = {_name(r) for r in project["dependencies"]}
    wanted |= {_name(r) for r in project["optional-dependencies"]["dev"]}
    wanted |= {_name(r) for r in project["optional-dependencies"]["cpu"]}
    assert _conda_pip_names() == wanted


def test_no_dependency_list_asks_for_torchvision():
    project = _pyproject()
    everything = list(project["dependencies"]) + [r for rs in project["optional-dependencies"].values() for r in rs]
    assert "torchvision" not in {_name(r) for r in everything}
    assert "torchvision" not in _conda_pip_names()


def test_onnxruntime_and_onnxruntime_gpu_are_never_in_one_extra():
    for extra, reqs in _pyproject()["optional-dependencies"].items():
        names = {_name(r) for r in reqs}
        assert not {"onnxruntime", "onnxruntime-gpu"} <= names, extra


def test_the_environment_has_no_torchvision_installed():
    # torchvision from PyPI breaks diffusers beside the CPU torch wheel; the install must not pull it.
    found = subprocess.run([sys.executable, "-m", "pip", "show", "torchvision"], capture_output=True)
    assert found.returncode != 0


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make run" in readme
    assert re.search(r"^make test$", ci, flags=re.M)
