"""``roost keys DIR --nodes N [--host NAME] [--no-client-certs] [--force]`` through the
in-process CLI (:func:`roost.cli.main`): the files of :mod:`roost.deploy.keys`'s docstring,
their permissions, the allow-list, the server certificate's names, and the refusal to
overwrite."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest

pytest.importorskip("cryptography")

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from roost.cli import main
from roost.deploy.auth import AllowList, NodeKey
from roost.deploy.keys import make_federation

TOP = ["allowlist.txt", "ca.key", "ca.pem", "server.key", "server.pem"]
NODE_FILES = ["client.key", "client.pem", "node.key", "node.pub"]


def expected_files(nodes: int, client_certs: bool = True) -> list[str]:
    per_node = NODE_FILES if client_certs else ["node.key", "node.pub"]
    return sorted(TOP + [f"nodes/node-{i}/{name}" for i in range(nodes) for name in per_node])


def files_in(root: Path) -> list[str]:
    """Every file under ``root`` (temporary files included), relative, sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def snapshot(root: Path) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name in files_in(root)}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_writes_every_documented_file_and_nothing_else(tmp_path, capsys):
    """3 nodes: the 5 top-level files and 4 per node (keys.py's docstring), no temporary
    file left behind; the summary names the allow-list of 3 keys and node-0 to node-2."""
    root = tmp_path / "fed"
    assert main(["keys", str(root), "--nodes", "3"]) == 0
    assert files_in(root) == expected_files(3)
    out = capsys.readouterr().out
    assert f"{root}/allowlist.txt: the server's allow-list of 3 node keys" in out
    assert f"{root}/nodes/node-0 to node-2: node.key, node.pub, client.pem, client.key" in out


def test_private_keys_are_0600_and_new_directories_0700(tmp_path):
    """``*.key`` are secrets (mode 0600); certificates, public keys and the allow-list are
    0644; every directory keys creates (DIR's missing parent included) is 0700, while
    tmp_path, which existed, keeps its mode."""
    before = mode(tmp_path)
    root = tmp_path / "parent" / "fed"
    assert main(["keys", str(root), "--nodes", "2"]) == 0
    for name in expected_files(2):
        assert mode(root / name) == (0o600 if name.endswith(".key") else 0o644), name
    for d in [
        tmp_path / "parent",
        root,
        root / "nodes",
        root / "nodes/node-0",
        root / "nodes/node-1",
    ]:
        assert mode(d) == 0o700, d
    assert mode(tmp_path) == before


def test_allowlist_holds_exactly_the_nodes_and_their_public_keys(tmp_path):
    """allowlist.txt parses with AllowList.load and lists node-0..node-3, in order, each
    with the public key of the node.key NodeKey.load reads (4 distinct keys); node.pub is
    that node's allow-list line."""
    root = tmp_path / "fed"
    assert main(["keys", str(root), "--nodes", "4"]) == 0
    allowed = AllowList.load(root / "allowlist.txt")
    ids = ["node-0", "node-1", "node-2", "node-3"]
    assert list(allowed.nodes) == ids
    keys = {n: NodeKey.load(root / "nodes" / n) for n in ids}
    for n, key in keys.items():
        assert key.node_id == n
        assert allowed.key_of(n) == key.public_bytes
        assert (root / "nodes" / n / "node.pub").read_text() == key.public_line() + "\n"
    assert len({k.public_bytes for k in keys.values()}) == 4
    assert (root / "allowlist.txt").read_text() == "".join(
        keys[n].public_line() + "\n" for n in ids
    )


def _sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(san.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return dns, ips


def test_server_certificate_names_loopback_and_each_host_and_the_chain_verifies(tmp_path):
    """server.pem is the server certificate followed by the CA's; its SANs are exactly
    localhost, 127.0.0.1, ::1 and the two --host values (a DNS name and an IP address, each
    in its SAN type); it and each client certificate (CN node-I) are signed by ca.pem, with
    the server-auth and client-auth extended key usages."""
    root = tmp_path / "fed"
    args = ["keys", str(root), "--nodes", "2", "--host", "fl.example.org", "--host", "10.0.0.7"]
    assert main(args) == 0
    ca = x509.load_pem_x509_certificate((root / "ca.pem").read_bytes())
    chain = x509.load_pem_x509_certificates((root / "server.pem").read_bytes())
    assert len(chain) == 2 and chain[1] == ca
    server = chain[0]
    assert _sans(server) == ({"localhost", "fl.example.org"}, {"127.0.0.1", "::1", "10.0.0.7"})
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.0.0.7") in san.get_values_for_type(x509.IPAddress)
    server.verify_directly_issued_by(ca)
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    for i in range(2):
        client = x509.load_pem_x509_certificate(
            (root / "nodes" / f"node-{i}" / "client.pem").read_bytes()
        )
        cn = client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        assert [a.value for a in cn] == [f"node-{i}"]
        client.verify_directly_issued_by(ca)
        eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_without_hosts_the_server_certificate_names_only_loopback(tmp_path):
    root = tmp_path / "fed"
    assert main(["keys", str(root), "--nodes", "1"]) == 0
    server = x509.load_pem_x509_certificates((root / "server.pem").read_bytes())[0]
    assert _sans(server) == ({"localhost"}, {"127.0.0.1", "::1"})


def test_no_client_certs_omits_the_client_certificates(tmp_path, capsys):
    """--no-client-certs: each node has node.key and node.pub only (no client.pem or
    client.key), and the summary lists just those two."""
    root = tmp_path / "fed"
    assert main(["keys", str(root), "--nodes", "2", "--no-client-certs"]) == 0
    assert files_in(root) == expected_files(2, client_certs=False)
    assert "node-0 to node-1: node.key, node.pub each" in capsys.readouterr().out


def test_running_again_without_force_fails_and_changes_nothing(tmp_path, capsys):
    """A second run into the same DIR exits 2 with one error line naming an existing file
    (ca.pem, the first planned) and --force; every file stays byte-identical and no
    temporary file appears."""
    root = tmp_path / "fed"
    assert main(["keys", str(root), "--nodes", "2"]) == 0
    capsys.readouterr()
    before = snapshot(root)
    assert main(["keys", str(root), "--nodes", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"roost: error: {root} already holds keys ({root / 'ca.pem'}, ")
    assert "use --force" in err and err.count("\n") == 1
    assert snapshot(root) == before


def test_one_existing_file_is_enough_to_refuse_and_nothing_is_written(tmp_path, capsys):
    """Only nodes/node-1/node.pub exists: the run names it and writes no other file."""
    root = tmp_path / "fed"
    stray = root / "nodes" / "node-1" / "node.pub"
    stray.parent.mkdir(parents=True)
    stray.write_text("not mine\n")
    assert main(["keys", str(root), "--nodes", "2"]) == 2
    assert f"already holds keys ({stray})" in capsys.readouterr().err
    assert files_in(root) == ["nodes/node-1/node.pub"]
    assert stray.read_text() == "not mine\n"


def test_force_rewrites_every_file_with_new_keys(tmp_path):
    """--force replaces all 13 files of a 2-node federation: every file's bytes differ (new
    CA, server and node keys), the allow-list holds the new node keys, private keys are
    still 0600, and there are no leftovers."""
    root = tmp_path / "fed"
    assert main(["keys", str(root), "--nodes", "2"]) == 0
    before = snapshot(root)
    old_key = NodeKey.load(root / "nodes" / "node-0").public_bytes
    assert main(["keys", str(root), "--nodes", "2", "--force"]) == 0
    after = snapshot(root)
    assert sorted(after) == sorted(before) == expected_files(2)
    assert len(after) == 13
    assert [n for n in after if after[n] == before[n]] == []
    new_key = NodeKey.load(root / "nodes" / "node-0").public_bytes
    assert new_key != old_key
    assert AllowList.load(root / "allowlist.txt").key_of("node-0") == new_key
    assert mode(root / "ca.key") == mode(root / "nodes" / "node-1" / "node.key") == 0o600


def test_force_without_client_certs_removes_the_old_client_certificates(tmp_path, capsys):
    """--force --no-client-certs after a run with client certificates: the old client.pem
    and client.key (signed by the CA just replaced) are removed, not left beside the new
    keys; the summary says which."""
    root = tmp_path / "fed"
    assert main(["keys", str(root), "--nodes", "2"]) == 0
    capsys.readouterr()
    assert main(["keys", str(root), "--nodes", "2", "--no-client-certs", "--force"]) == 0
    assert files_in(root) == expected_files(2, client_certs=False)
    out = capsys.readouterr().out
    assert (
        f"{root}: removed the previous federation's nodes/node-0/client.pem, "
        "nodes/node-0/client.key, nodes/node-1/client.pem, nodes/node-1/client.key\n"
    ) in out


def test_force_with_fewer_nodes_removes_the_nodes_no_longer_on_the_allow_list(tmp_path, capsys):
    """--force --nodes 2 after --nodes 3: nodes/node-2, whose key the new allow-list does
    not hold, goes (its 4 files and the directory); node-0 and node-1 get new keys."""
    root = tmp_path / "fed"
    assert main(["keys", str(root), "--nodes", "3"]) == 0
    capsys.readouterr()
    assert main(["keys", str(root), "--nodes", "2", "--force"]) == 0
    assert files_in(root) == expected_files(2)
    assert not (root / "nodes" / "node-2").exists()
    assert list(AllowList.load(root / "allowlist.txt").nodes) == ["node-0", "node-1"]
    for n in ("node-0", "node-1"):
        key = NodeKey.load(root / "nodes" / n)
        assert AllowList.load(root / "allowlist.txt").key_of(n) == key.public_bytes
    out = capsys.readouterr().out
    assert (
        "removed the previous federation's nodes/node-2/node.key, nodes/node-2/node.pub, "
        "nodes/node-2/client.pem, nodes/node-2/client.key\n"
    ) in out


def test_force_leaves_files_roost_keys_does_not_make(tmp_path, capsys):
    """Files a user put in DIR survive --force, and so do the node directories holding
    them: DIR/notes.txt, nodes/node-2/notes.txt (node-2's roost files go, the directory
    stays), nodes/extra/node.key (not a node-I directory) and nodes/node-1/state.bin."""
    root = tmp_path / "fed"
    assert main(["keys", str(root), "--nodes", "3"]) == 0
    mine = {
        "notes.txt": b"top\n",
        "nodes/node-2/notes.txt": b"node-2\n",
        "nodes/extra/node.key": b"not roost's\n",
        "nodes/node-1/state.bin": b"\x00\x01",
    }
    for name, data in mine.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    capsys.readouterr()
    assert main(["keys", str(root), "--nodes", "1", "--no-client-certs", "--force"]) == 0
    assert files_in(root) == sorted(expected_files(1, client_certs=False) + list(mine))
    assert {name: (root / name).read_bytes() for name in mine} == mine
    out = capsys.readouterr().out
    assert "notes.txt" not in out and "extra" not in out and "state.bin" not in out


def test_make_federation_reports_what_force_removed(tmp_path):
    """The Federation returned lists the removed files (none on a first run or without
    anything stale), in node order (node-10 after node-2)."""
    root = tmp_path / "fed"
    first = make_federation(root, 11, client_certs=False)
    assert first.removed == ()
    assert make_federation(root, 11, client_certs=False, force=True).removed == ()
    fed = make_federation(root, 2, client_certs=False, force=True)
    stale = [f"node-{i}" for i in range(2, 11)]
    assert fed.removed == tuple(
        root / "nodes" / n / name for n in stale for name in ("node.key", "node.pub")
    )
    assert sorted(p.name for p in (root / "nodes").iterdir()) == ["node-0", "node-1"]


def test_nodes_must_be_at_least_one(tmp_path, capsys):
    """--nodes 0 is bad input: exit 2, one error line, and DIR is not created."""
    root = tmp_path / "fed"
    assert main(["keys", str(root), "--nodes", "0"]) == 2
    assert capsys.readouterr().err == "roost: error: --nodes must be >= 1, got 0\n"
    assert not root.exists()
