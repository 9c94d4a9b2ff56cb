"""Client state stores: round trips, round stamps and rollback on resume, torn writes,
several processes on one file, validation, and memory that does not grow with the number
of clients."""

from __future__ import annotations

import io
import multiprocessing
import os
import struct
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

import roost.state.disk
from roost.state import (
    STATE_FILE_NAME,
    ClientStateStore,
    DiskStateStore,
    InMemoryStateStore,
    make_state_store,
    open_shared_store,
)

SPEC = {"c": 5, "g": 3}
CLIENTS = 10
KINDS = ["memory", "disk"]


def _state(value: float, spec: dict[str, int] = SPEC) -> dict[str, torch.Tensor]:
    return {
        n: torch.arange(s, dtype=torch.float32) * 0.5 + value + i
        for i, (n, s) in enumerate(spec.items())
    }


def _assert_state(got: dict[str, torch.Tensor] | None, value: float) -> None:
    assert got is not None
    expected = _state(value)
    assert list(got) == list(expected)
    for name, t in expected.items():
        assert torch.equal(got[name], t), (name, got[name], t)


def _saved(checkpoint_state: dict[str, Any]) -> dict[str, Any]:
    """Through torch.save / torch.load(weights_only=True), as in checkpoint.pt."""
    buf = io.BytesIO()
    torch.save(checkpoint_state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _resumed(kind: str, directory: Path, checkpoint_state: dict[str, Any]) -> ClientStateStore:
    """The store of a run resumed (in a new process) from a checkpoint."""
    return make_state_store(kind, SPEC, CLIENTS, directory, checkpoint=_saved(checkpoint_state))


@pytest.mark.parametrize("kind", KINDS)
def test_put_get_round_trip(kind, tmp_path):
    store = make_state_store(kind, SPEC, CLIENTS, tmp_path)
    assert isinstance(store, ClientStateStore)
    assert store.get(3) is None
    source = _state(1.0)
    store.put(3, source)
    source["c"].add_(100.0)  # the store kept its own copy
    got = store.get(3)
    _assert_state(got, 1.0)
    assert got is not None
    got["g"].mul_(0.0)  # ... and hands out fresh tensors
    _assert_state(store.get(3), 1.0)
    assert store.get(4) is None
    store.put(4, _state(2.0))
    store.put(3, _state(3.0))  # twice in a round: the last one counts
    _assert_state(store.get(3), 3.0)
    _assert_state(store.get(4), 2.0)
    store.close()
    store.close()


@pytest.mark.parametrize("kind", KINDS)
def test_resume_rolls_back_puts_after_the_committed_round(kind, tmp_path):
    store = make_state_store(kind, SPEC, CLIENTS, tmp_path)
    store.begin_round(1)
    store.put(0, _state(1.0))
    store.put(1, _state(10.0))
    store.commit(1)
    store.begin_round(2)
    store.put(0, _state(2.0))
    store.commit(2)
    round2 = store.checkpoint_state()
    store.begin_round(3)
    store.put(0, _state(3.0))
    store.put(2, _state(30.0))
    _assert_state(store.get(0), 3.0)
    _assert_state(store.get(2), 30.0)
    # Killed here, before round 3's checkpoint: the resumed run sees round 2.
    resumed = _resumed(kind, tmp_path, round2)
    assert (resumed.committed_round, resumed.current_round) == (2, 3)  # type: ignore[attr-defined]
    _assert_state(resumed.get(0), 2.0)
    _assert_state(resumed.get(1), 10.0)
    assert resumed.get(2) is None
    resumed.begin_round(3)
    resumed.put(0, _state(3.5))
    _assert_state(resumed.get(0), 3.5)
    resumed.commit(3)
    round3 = resumed.checkpoint_state()
    resumed.close()
    again = _resumed(kind, tmp_path, round3)
    _assert_state(again.get(0), 3.5)
    _assert_state(again.get(1), 10.0)
    assert again.get(2) is None
    # restore() on a live store rolls back too.
    again.begin_round(4)
    again.put(1, _state(40.0))
    again.restore(_saved(round3))
    _assert_state(again.get(1), 10.0)
    again.close()
    store.close()


@pytest.mark.parametrize("kind", KINDS)
def test_writes_of_a_killed_run_are_never_read_after_resume(kind, tmp_path):
    """A copy written by the killed run in round 3 is stamped round 3 too: it must not pass
    for the resumed run's own round-3 write (before the client's put, or for a client the
    resumed run does not train), nor become committed when the resumed run commits 3."""
    store = make_state_store(kind, SPEC, CLIENTS, tmp_path)
    store.put(0, _state(1.0))
    store.put(1, _state(10.0))
    store.commit(1)
    round1 = store.checkpoint_state()
    store.put(0, _state(2.0))  # killed run, round 2: never checkpointed
    store.put(1, _state(20.0))
    resumed = _resumed(kind, tmp_path, round1)
    resumed.begin_round(2)
    _assert_state(resumed.get(0), 1.0)  # the task reads the state before it puts
    _assert_state(resumed.get(1), 10.0)
    resumed.put(0, _state(2.5))
    resumed.commit(2)  # client 1 not trained in the resumed round 2
    _assert_state(resumed.get(1), 10.0)
    round2 = resumed.checkpoint_state()
    resumed.close()
    again = _resumed(kind, tmp_path, round2)
    _assert_state(again.get(0), 2.5)
    _assert_state(again.get(1), 10.0)
    again.close()
    store.close()


@pytest.mark.parametrize("kind", KINDS)
def test_rounds_without_a_commit_keep_the_committed_state(kind, tmp_path):
    store = make_state_store(kind, SPEC, CLIENTS, tmp_path)
    store.begin_round(1)
    store.put(5, _state(1.0))
    store.commit(1)
    round1 = store.checkpoint_state()
    for r in (2, 3, 4):  # e.g. checkpoints every few rounds: both copies must not be used up
        store.begin_round(r)
        store.put(5, _state(float(r)))
        _assert_state(store.get(5), float(r))
    resumed = _resumed(kind, tmp_path, round1)
    _assert_state(resumed.get(5), 1.0)
    resumed.close()
    store.close()


@pytest.mark.parametrize("kind", KINDS)
def test_rounds_only_go_forward(kind, tmp_path):
    store = make_state_store(kind, SPEC, CLIENTS, tmp_path)
    assert store.current_round == 1  # type: ignore[attr-defined]
    store.begin_round(2)
    store.commit(2)
    assert (store.committed_round, store.current_round) == (2, 3)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="already committed"):
        store.begin_round(2)
    with pytest.raises(ValueError, match="already committed"):
        store.commit(1)
    store.begin_round(5)
    with pytest.raises(ValueError, match="already at round 5"):
        store.begin_round(4)
    store.commit(2)  # again: a no-op
    store.close()


def test_only_the_owner_moves_the_rounds(tmp_path):
    owner = make_state_store("disk", SPEC, CLIENTS, tmp_path)
    assert isinstance(owner, DiskStateStore)
    worker = open_shared_store(owner.share())
    with pytest.raises(RuntimeError, match="only the handle"):
        worker.commit(1)
    with pytest.raises(RuntimeError, match="only the handle"):
        worker.begin_round(2)
    owner.begin_round(4)
    assert worker.current_round == 4  # followed through the file
    worker.close()
    owner.close()


# --------------------------------------------------------------------------- torn writes


def _newest_copy(store: DiskStateStore, cid: int) -> tuple[int, int]:
    """(copy, offset) of the copy of ``cid`` with the highest round stamp."""
    with open(store.path, "rb") as f:
        stamps = []
        for copy in (0, 1):
            f.seek(store.copy_offset(cid, copy))
            magic, _, rnd = struct.unpack("<8sQq", f.read(24))
            stamps.append((rnd if magic.startswith(b"ROOST") else -1, copy))
    copy = max(stamps)[1]
    return copy, store.copy_offset(cid, copy)


def _scribble(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_a_corrupt_copy_is_never_returned(tmp_path):
    store = DiskStateStore(tmp_path / "s.bin", SPEC, CLIENTS, create=True)
    store.put(7, _state(1.0))
    store.commit(1)
    store.put(7, _state(2.0))
    store.commit(2)
    copy2, offset2 = _newest_copy(store, 7)
    _scribble(store.path, offset2 + 64 + 4, b"\x7f\x7f\x7f\x7f")  # a payload float
    with pytest.warns(RuntimeWarning, match="client 7: checksum mismatch"):
        got = store.get(7)
    _assert_state(got, 1.0)  # the older valid copy
    _scribble(store.path, store.copy_offset(7, 1 - copy2) + 64, b"\0" * 8)
    with pytest.warns(RuntimeWarning, match="checksum mismatch"):
        assert store.get(7) is None  # nothing valid left: no state rather than garbage
    # A corrupt header field is caught as well (the CRC covers it).
    store.put(8, _state(1.0))
    store.commit(3)
    store.put(8, _state(2.0))  # pending in round 4
    _, offset = _newest_copy(store, 8)
    _scribble(store.path, offset + 24, struct.pack("<q", 9))  # client id 8 -> 9
    _assert_state(store.get(8), 1.0)  # not its copy any more: ignored
    _scribble(store.path, offset + 24, struct.pack("<q", 8))
    _assert_state(store.get(8), 2.0)
    store.close()


def test_a_put_killed_midway_leaves_the_previous_state(tmp_path, monkeypatch):
    store = DiskStateStore(tmp_path / "s.bin", SPEC, CLIENTS, create=True)
    store.put(2, _state(1.0))
    store.commit(1)
    checkpoint = store.checkpoint_state()
    calls = []
    real = roost.state.disk._pwrite_all

    def dies_before_the_header(fd, buffers, offset):
        calls.append(offset)
        if len(calls) == 3:  # invalidate, payload, then the header: killed here
            raise KeyboardInterrupt
        real(fd, buffers, offset)

    monkeypatch.setattr(roost.state.disk, "_pwrite_all", dies_before_the_header)
    with pytest.raises(KeyboardInterrupt):
        store.put(2, _state(2.0))
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an invalidated copy is not even a warning
        _assert_state(store.get(2), 1.0)
    # Torn the other way: the new header landed, part of the payload did not.
    store.put(2, _state(2.0))
    _, offset = _newest_copy(store, 2)
    _scribble(store.path, offset + 64 + 16, _state(1.0)["c"][4:].numpy().tobytes())
    with pytest.warns(RuntimeWarning, match="client 2: checksum mismatch"):
        _assert_state(store.get(2), 1.0)
    store.close()
    resumed = make_state_store("disk", SPEC, CLIENTS, tmp_path, checkpoint=_saved(checkpoint))
    assert isinstance(resumed, DiskStateStore) and resumed.path == store.path
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the torn copy is from after the checkpoint
        _assert_state(resumed.get(2), 1.0)
    resumed.close()


# --------------------------------------------------------------------------- processes


def _write_clients(info: dict[str, Any], clients: list[int], value: float) -> int:
    store = open_shared_store(info)
    for cid in clients:
        store.put(cid, _state(value + cid))
    store.flush()
    pid = os.getpid()
    store.close()
    return pid


def _read_clients(info: dict[str, Any], clients: list[int]) -> list[dict[str, torch.Tensor] | None]:
    store = open_shared_store(info)
    try:
        return [store.get(cid) for cid in clients]
    finally:
        store.close()


def test_processes_share_one_file(tmp_path):
    owner = make_state_store("disk", SPEC, CLIENTS, tmp_path)
    assert isinstance(owner, DiskStateStore)
    info = owner.share()
    spawn = multiprocessing.get_context("spawn")
    with (
        ProcessPoolExecutor(2, mp_context=spawn) as writers,
        ProcessPoolExecutor(1, mp_context=spawn) as reader,
    ):
        reader_pid = reader.submit(os.getpid)  # start it while the writers start
        owner.begin_round(1)
        round1 = [
            writers.submit(_write_clients, info, [0, 1, 2, 3, 4], 100.0),
            writers.submit(_write_clients, info, [5, 6, 7, 8, 9], 100.0),
        ]
        writer_pids = {f.result() for f in round1}
        assert reader_pid.result() not in writer_pids and os.getpid() not in writer_pids
        owner.commit(1)
        checkpoint = owner.checkpoint_state()
        owner.begin_round(2)  # the workers follow the owner's round through the file
        writers.submit(_write_clients, info, [0], 200.0).result()
        got = reader.submit(_read_clients, info, list(range(CLIENTS))).result()
        _assert_state(got[0], 200.0)
        for cid in range(1, CLIENTS):
            _assert_state(got[cid], 100.0 + cid)
        owner.restore(checkpoint)  # the round-2 write rolled back for every process
        got = reader.submit(_read_clients, info, [0, 1]).result()
        _assert_state(got[0], 100.0)
        _assert_state(got[1], 101.0)
    owner.close()


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kind", KINDS)
def test_put_validates_names_sizes_and_dtype(kind, tmp_path):
    store = make_state_store(kind, SPEC, CLIENTS, tmp_path)
    good = _state(0.0)
    with pytest.raises(ValueError, match=r"client 3: state 'g' has shape \(4,\); .* 3 elements"):
        store.put(3, {**good, "g": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"client 3: state 'c' has shape \(5, 1\)"):
        store.put(3, {**good, "c": torch.zeros(5, 1)})
    with pytest.raises(ValueError, match=r"client 3: state 'c' has dtype torch.float64"):
        store.put(3, {**good, "c": torch.zeros(5, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"client 3: .*missing \['g'\]"):
        store.put(3, {"c": good["c"]})
    with pytest.raises(ValueError, match=r"client 3: .*unexpected \['h'\]"):
        store.put(3, {**good, "h": torch.zeros(1)})
    with pytest.raises(ValueError, match="client id 10 is out of range"):
        store.put(CLIENTS, good)
    with pytest.raises(ValueError, match="client id -1 is out of range"):
        store.get(-1)
    assert store.get(3) is None
    store.close()


def test_a_store_only_reopens_with_its_spec(tmp_path):
    store = make_state_store("disk", SPEC, CLIENTS, tmp_path)
    checkpoint = store.checkpoint_state()
    path = tmp_path / STATE_FILE_NAME
    with pytest.raises(ValueError, match="holds client state spec"):
        DiskStateStore(path, {"c": 5, "g": 4}, CLIENTS)
    with pytest.raises(ValueError, match="holds 10 clients"):
        DiskStateStore(path, SPEC, 11)
    with pytest.raises(ValueError, match="not a Roost client state file"):
        (tmp_path / "junk").write_bytes(b"hello")
        DiskStateStore(tmp_path / "junk")
    with pytest.raises(ValueError, match="of a 'disk' store, not a 'memory' one"):
        InMemoryStateStore(SPEC).restore(checkpoint)
    store.close()


def test_make_state_store(tmp_path):
    assert isinstance(make_state_store("disk", {}, CLIENTS, tmp_path), InMemoryStateStore)
    assert not (tmp_path / STATE_FILE_NAME).exists()  # stateless: no file
    with pytest.raises(ValueError, match="expected 'memory' or 'disk'"):
        make_state_store("redis", SPEC, CLIENTS, tmp_path)
    temp = make_state_store("disk", SPEC, CLIENTS, None)  # a run without a run directory
    assert isinstance(temp, DiskStateStore)
    temp.put(1, _state(1.0))
    directory = temp.path.parent
    assert directory.exists()
    temp.close()
    assert not directory.exists()


# --------------------------------------------------------------------------- memory


def test_disk_file_is_sparse_and_its_checkpoint_small(tmp_path):
    spec = {"x": 1_660_000}  # a 1.66 M-parameter model, 100,000 clients: 1.3 TB of slots
    store = DiskStateStore(tmp_path / "s.bin", spec, 100_000, create=True)
    assert os.path.getsize(store.path) > 1.3e12
    x = torch.ones(1_660_000)
    for cid in (0, 50_000, 99_999):
        store.put(cid, {"x": x * cid})
    store.commit(1)
    assert store.allocated_nbytes() < 3 * 6.7e6 + 2e6  # three states, not 1.3 TB
    assert torch.equal(store.get(99_999)["x"], x * 99_999)  # type: ignore[index]
    buf = io.BytesIO()
    torch.save(store.checkpoint_state(), buf)
    assert len(buf.getvalue()) < 4096
    store.close()


def test_in_memory_store_accounts_its_bytes():
    size = 262_144  # 1 MiB of float32
    store = InMemoryStateStore({"x": size}, 3_000)
    x = torch.zeros(size)
    for cid in range(4):
        store.put(cid, {"x": x})
    assert store.nbytes == 4 * 2**20  # so 3,000 clients would hold 3,000 MiB
    store.commit(1)
    assert store.nbytes == 4 * 2**20
    store.put(0, {"x": x})  # pending next to the committed copy until the next commit
    assert store.nbytes == 5 * 2**20
    store.commit(2)
    assert store.nbytes == 4 * 2**20
    assert len(store) == 4


def _rss() -> int:
    return psutil.Process().memory_info().rss


@pytest.mark.parametrize(
    ("clients", "size", "bound_mib"),
    [
        (1_000, 65_536, 32),  # 1,000 x 256 KiB = 250 MiB
        pytest.param(3_000, 262_144, 64, marks=pytest.mark.slow),  # 3,000 x 1 MiB = 3 GiB
    ],
)
def test_disk_store_memory_does_not_grow_with_the_clients(tmp_path, clients, size, bound_mib):
    """Every client's state written and read back through one store, RSS growing less than
    ``bound_mib`` (the slow case: 3,000 clients x 1 MiB, 3 GiB, within 64 MiB; the default
    one is the same at a twelfth of the volume, as writing 3 GiB to a fresh file takes
    ~10 s of disk).

    The store holds one state at a time (the tensor a get returns) and maps nothing, so
    the file's pages sit in the page cache and not in this process's RSS. The bound leaves
    room for the allocator's and interpreter's slack while being 2% (13%) of the data:
    keeping even one state in fifty (in eight), or the mapped file pages, would break it.
    The in-memory store would hold it all (test_in_memory_store_accounts_its_bytes).
    """
    path = tmp_path / "big.bin"
    store = DiskStateStore(path, {"x": size}, clients, create=True)
    try:
        x = torch.zeros(size)
        for _ in range(3):  # warm up the allocator and the code paths
            store.put(0, {"x": x})
            store.get(0)
        base = _rss()
        peak = base
        for cid in range(clients):
            x[0], x[-1] = cid, -cid
            store.put(cid, {"x": x})
            if cid % 50 == 0:
                peak = max(peak, _rss())
        store.commit(1)
        for cid in range(clients):
            got = store.get(cid)
            assert got is not None
            assert got["x"][0].item() == cid and got["x"][-1].item() == -cid
            del got
            if cid % 50 == 0:
                peak = max(peak, _rss())
        peak = max(peak, _rss())
        grew = (peak - base) / 2**20
        assert grew < bound_mib, f"RSS grew by {grew:.1f} MiB for {clients * size / 2**18:.0f} MiB"
    finally:
        store.close()
        path.unlink()
