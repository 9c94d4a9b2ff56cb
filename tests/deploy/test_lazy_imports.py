"""Roost without the ``deploy`` extra: importing the package, its CLI, runner and engine, and
``roost.deploy`` itself loads neither grpc, protobuf nor cryptography (what
:mod:`roost.deploy._deps` promises), and a missing dependency is an ImportError naming
the extra. Each check runs in a fresh interpreter, since this one has imported them all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from roost.deploy._deps import INSTALL_HINT, missing_extra

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("grpc", "google.protobuf", "cryptography")

# Prints, after each step, which of HEAVY are in sys.modules (a module or any submodule).
STEPS = """
import json, sys
HEAVY = ("grpc", "google.protobuf", "cryptography")
def loaded():
    return [h for h in HEAVY if any(m == h or m.startswith(h + ".") for m in sys.modules)]
seen = {}
import roost, roost.cli, roost.runner, roost.engine
seen["roost, roost.cli, roost.runner, roost.engine"] = loaded()
import roost.deploy
seen["roost.deploy"] = loaded()
roost.deploy.Backoff, roost.deploy.WireError
import roost.deploy._deps, roost.deploy.backoff, roost.deploy.errors
seen["backoff, errors, _deps"] = loaded()
import roost.deploy.keys
seen["roost.deploy.keys"] = loaded()
roost.deploy.DeployServer
seen["roost.deploy.DeployServer"] = loaded()
print(json.dumps(seen))
"""


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def seen() -> dict[str, list[str]]:
    proc = run(STEPS)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_roost_its_cli_runner_and_engine_load_no_deploy_dependency(seen):
    """The simulator's modules must work without the extra: none of the three loaded."""
    assert seen["roost, roost.cli, roost.runner, roost.engine"] == []


def test_importing_roost_deploy_and_its_light_modules_loads_none(seen):
    """roost.deploy's __init__ is lazy (a module __getattr__), and backoff, errors (whose
    status codes are strings) and _deps import nothing heavy, even through the lazy
    attributes roost.deploy.Backoff and roost.deploy.WireError."""
    assert seen["roost.deploy"] == []
    assert seen["backoff, errors, _deps"] == []


def test_keys_loads_only_cryptography_and_the_server_loads_grpc_and_protobuf(seen):
    """The positive control that the check can see an import: roost.deploy.keys ("imports
    only cryptography (not grpc)") loads exactly cryptography; the lazy attribute
    roost.deploy.DeployServer then loads grpc and the generated protobuf code."""
    assert seen["roost.deploy.keys"] == ["cryptography"]
    assert seen["roost.deploy.DeployServer"] == list(HEAVY)


def test_an_unknown_name_of_roost_deploy_is_an_attribute_error():
    import roost.deploy

    with pytest.raises(AttributeError, match=r"module 'roost\.deploy' has no attribute 'Nope'"):
        roost.deploy.Nope  # noqa: B018


def test_missing_extra_names_the_package_the_cause_and_the_deploy_extra():
    """The exact message, with and without the original error quoted."""
    cause = ModuleNotFoundError("No module named 'grpc'")
    e = missing_extra("grpcio", cause)
    assert isinstance(e, ImportError)
    assert INSTALL_HINT == "pip install 'roost[deploy]'"
    assert str(e) == (
        "roost.deploy needs grpcio (No module named 'grpc'), which comes with the deploy "
        "extra: pip install 'roost[deploy]'"
    )
    assert str(missing_extra("cryptography")) == (
        "roost.deploy needs cryptography, which comes with the deploy extra: "
        "pip install 'roost[deploy]'"
    )


def test_a_deploy_module_without_grpc_raises_the_extras_import_error():
    """With grpc made unimportable (None in sys.modules), importing roost.deploy.tls raises
    ImportError naming grpcio and the deploy extra, from the original ImportError."""
    code = """
import sys
sys.modules["grpc"] = None
try:
    import roost.deploy.tls
except ImportError as e:
    print(type(e.__cause__).__name__)
    print(e)
"""
    proc = run(code)
    assert proc.returncode == 0, proc.stderr
    cause, message = proc.stdout.splitlines()
    assert cause == "ModuleNotFoundError"
    assert message.startswith("roost.deploy needs grpcio (")
    assert message.endswith("), which comes with the deploy extra: pip install 'roost[deploy]'")


def test_roost_keys_without_cryptography_is_one_error_line_naming_the_extra(tmp_path):
    """``roost keys`` with cryptography unimportable exits 2 with one stderr line naming the
    deploy extra, and creates nothing."""
    target = tmp_path / "fed"
    code = f"""
import sys
sys.modules["cryptography"] = None
from roost.cli import main
sys.exit(main(["keys", {str(target)!r}, "--nodes", "1"]))
"""
    proc = run(code)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("roost: error: roost.deploy needs cryptography (")
    assert proc.stderr.endswith(
        "), which comes with the deploy extra: pip install 'roost[deploy]'\n"
    )
    assert proc.stderr.count("\n") == 1
    assert not target.exists()
