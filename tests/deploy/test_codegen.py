"""``roost/deploy/_generated/`` is exactly what ``python -m roost.deploy.codegen`` writes
from ``roost_deploy.proto`` (the promise of :mod:`roost.deploy.codegen`'s docstring): a
hand edit, a proto changed without regenerating, or files from another grpcio-tools
fail here."""

from __future__ import annotations

import pytest

pytest.importorskip("grpc_tools")

from roost.deploy import codegen

REGENERATE = "regenerate with: python -m roost.deploy.codegen"


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("codegen") / "out"  # missing: generate creates it
    return out, codegen.generate(out)


def test_generate_writes_the_three_outputs(regenerated):
    """generate(out) creates ``out`` and returns out/roost_deploy_pb2.py, .pyi and
    _grpc.py, in that order, and writes nothing else there."""
    out, written = regenerated
    names = ["roost_deploy_pb2.py", "roost_deploy_pb2.pyi", "roost_deploy_pb2_grpc.py"]
    assert written == [out / n for n in names]
    assert sorted(p.name for p in out.iterdir()) == names


def test_the_committed_files_were_made_by_the_installed_grpcio_tools(regenerated):
    """The header records the grpcio-tools version; the output depends on it, so a
    difference here (rather than a byte mismatch below) means: regenerate."""
    for name in codegen.OUTPUTS:
        first = (codegen.GENERATED / name).read_text().splitlines()[0]
        expected = codegen.HEADER.format(version=codegen.tools_version()).splitlines()[0]
        assert first == expected, f"{name}: {first!r}; {REGENERATE}"


@pytest.mark.parametrize("name", codegen.OUTPUTS)
def test_regenerated_output_is_byte_identical_to_the_committed_file(regenerated, name):
    """Byte for byte, each committed file equals protoc's output with HEADER prepended."""
    out, _ = regenerated
    fresh = (out / name).read_bytes()
    committed = (codegen.GENERATED / name).read_bytes()
    assert fresh.startswith(codegen.HEADER.format(version=codegen.tools_version()).encode())
    assert fresh == committed, f"roost/deploy/_generated/{name} is stale; {REGENERATE}"


def test_the_grpc_module_imports_the_messages_by_their_package_path(regenerated):
    """The proto is mapped to roost/deploy/_generated/, so protoc's _grpc module imports
    ``roost.deploy._generated.roost_deploy_pb2`` (a bare ``import roost_deploy_pb2`` would
    work only with _generated on sys.path)."""
    out, _ = regenerated
    text = (out / "roost_deploy_pb2_grpc.py").read_text()
    assert "from roost.deploy._generated import roost_deploy_pb2 as " in text
    assert "\nimport roost_deploy_pb2" not in text


def test_the_generated_service_has_the_methods_the_transport_calls():
    """_proto.SERVICE and METHODS (the paths the server registers and the client calls)
    are the proto's service and its five methods."""
    pytest.importorskip("google.protobuf")
    from roost.deploy._proto import METHODS, SERVICE, pb

    (service,) = pb.DESCRIPTOR.services_by_name.values()
    assert service.full_name == SERVICE == "roost.deploy.v1.Deploy"
    assert {m.name: f"/{SERVICE}/{m.name}" for m in service.methods} == METHODS


def test_main_writes_to_out_and_prints_each_path(tmp_path, capsys):
    """``python -m roost.deploy.codegen --out DIR`` exits 0 and prints the three paths."""
    assert codegen.main(["--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [str(tmp_path / n) for n in codegen.OUTPUTS]
    for n in codegen.OUTPUTS:
        assert (tmp_path / n).read_bytes() == (codegen.GENERATED / n).read_bytes()


def test_the_deploy_extra_asks_for_the_protobuf_the_generated_code_checks_for():
    """roost_deploy_pb2.py calls ``ValidateProtobufRuntimeVersion(PUBLIC, MAJOR, MINOR,
    PATCH, ...)`` at import: a runtime of another major, or older than the gencode, raises.
    So the ``deploy`` extra must ask for ``protobuf>=MAJOR.MINOR.PATCH,<MAJOR+1`` (with
    ``protobuf>=4.25`` a fresh install could pick a protobuf that cannot import it)."""
    import re
    from pathlib import Path

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the tomli dependency
        import tomli as tomllib

    text = (codegen.GENERATED / "roost_deploy_pb2.py").read_text()
    call = re.search(r"ValidateProtobufRuntimeVersion\(\s*[\w.]+,\s*(\d+),\s*(\d+),\s*(\d+),", text)
    assert call is not None
    major, minor, patch = (int(g) for g in call.groups())
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    deploy = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["deploy"]
    (spec,) = [d for d in deploy if d.startswith("protobuf")]
    assert spec == f"protobuf>={major}.{minor}.{patch},<{major + 1}"
