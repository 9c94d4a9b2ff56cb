"""CIFAR-10/100 python-version batches written here in their own format, malformed and
hostile pickles, and one run on them."""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from roost.data import build_dataset
from roost.data.cifar import (
    CifarConfig,
    UnsafePickleError,
    load_cifar_data,
    read_cifar_batch,
    safe_load_pickle,
)
from roost.registry import ConfigError


class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Protocol 2 as Python 2's cPickle wrote CIFAR: a Python 2 ``str`` (here: bytes) is a
    SHORT_BINSTRING / BINSTRING, which ``encoding="bytes"`` reads back as bytes."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def pickled(obj: Any, writer: str = "py2") -> bytes:
    """``obj`` pickled with protocol 2: by Python 2 (``py2``, numpy 1's module names) or by
    this Python (``py3``: bytes become ``_codecs.encode(str, "latin1")`` calls)."""
    if writer == "py3":
        return pickle.dumps(obj, protocol=2)
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(
        b"cnumpy._core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\n_reconstruct\n"
    )


def batch(rows: np.ndarray, label_lists: dict[bytes, list[int]], name: bytes) -> dict[bytes, Any]:
    """A batch dict as in the real files (bytes keys, a uint8 array, lists of ints)."""
    return {
        b"batch_label": name,
        **label_lists,
        b"data": rows,
        b"filenames": [b"img_%d.png" % i for i in range(len(rows))],
    }


def write(path: Path, obj: Any, writer: str = "py2") -> Path:
    path.write_bytes(pickled(obj, writer))
    return path


# CIFAR-10: five train batches of 3, 2, 4, 1, 2 rows (12 images) and a test batch of 5.
TRAIN_SIZES = (3, 2, 4, 1, 2)
TRAIN_LABELS = [[0, 1, 2], [3, 4], [5, 6, 7, 8], [9], [1, 1]]
TEST_LABELS = [9, 0, 0, 3, 3]


def cifar10_rows(seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    train = [rng.integers(0, 256, (n, 3072), dtype=np.uint8) for n in TRAIN_SIZES]
    # data_batch_2's first row (train image 3): green at pixel row 5, column 7 is 200,
    # blue at (31, 31) is 17, red at (0, 0) is 255
    train[1][0, 1 * 1024 + 5 * 32 + 7] = 200
    train[1][0, 2 * 1024 + 31 * 32 + 31] = 17
    train[1][0, 0] = 255
    return train, rng.integers(0, 256, (5, 3072), dtype=np.uint8)


def make_cifar10(folder: Path, writer: str = "py2") -> tuple[list[np.ndarray], np.ndarray]:
    folder.mkdir(parents=True)
    train, test = cifar10_rows()
    for i, (rows, labels) in enumerate(zip(train, TRAIN_LABELS, strict=True), 1):
        name = b"training batch %d of 5" % i
        write(folder / f"data_batch_{i}", batch(rows, {b"labels": labels}, name), writer)
    write(folder / "test_batch", batch(test, {b"labels": TEST_LABELS}, b"testing batch 1"), writer)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    meta = {b"num_cases_per_batch": 10000, b"label_names": names, b"num_vis": 3072}
    write(folder / "batches.meta", meta, writer)
    return train, test


FINE = [0, 99, 42, 42, 7, 13]
COARSE = [4, 19, 5, 5, 1, 2]
TEST_FINE, TEST_COARSE = [99, 3, 3], [19, 0, 0]


def make_cifar100(folder: Path, writer: str = "py2") -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
    test = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    labels = {b"fine_labels": FINE, b"coarse_labels": COARSE}
    write(folder / "train", batch(train, labels, b"training batch 1 of 1"), writer)
    test_labels = {b"fine_labels": TEST_FINE, b"coarse_labels": TEST_COARSE}
    write(folder / "test", batch(test, test_labels, b"testing batch 1 of 1"), writer)
    meta = {b"fine_label_names": [b"f%d" % i for i in range(100)]}
    meta[b"coarse_label_names"] = [b"c%d" % i for i in range(20)]
    write(folder / "meta", meta, writer)
    return train, test


@pytest.fixture
def cifar10(tmp_path: Path) -> Path:
    make_cifar10(tmp_path / "cifar-10-batches-py")
    return tmp_path / "cifar-10-batches-py"


@pytest.mark.parametrize("writer", ["py2", "py3"])
def test_cifar10_pixels_labels_and_splits(tmp_path: Path, writer: str) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    train_rows, test_rows = make_cifar10(folder, writer)
    if writer == "py2":  # the real files' spelling of numpy's reconstructor
        assert b"cnumpy.core.multiarray\n_reconstruct\n" in (folder / "test_batch").read_bytes()
    else:
        assert b"c_codecs\nencode\n" in (folder / "test_batch").read_bytes()
    data = load_cifar_data(CifarConfig(path=str(folder)))
    assert data.train.x.shape == (12, 3, 32, 32) and data.train.x.dtype == torch.float32
    assert data.test is not None and data.test.x.shape == (5, 3, 32, 32)
    assert data.train.y.dtype == torch.int64
    assert data.info.input_shape == (3, 32, 32) and data.info.num_classes == 10
    assert data.groups is None
    # train image 3 is data_batch_2's row 0 (batches 1..5 in order, batch 1 has 3 rows)
    x = data.train.x
    assert x[3, 1, 5, 7].item() == pytest.approx(200 / 255, abs=1e-7)
    assert x[3, 2, 31, 31].item() == pytest.approx(17 / 255, abs=1e-7)
    assert x[3, 0, 0, 0].item() == 1.0
    # every pixel: channel c, row r, column k of image i is byte c*1024 + r*32 + k / 255
    rows = np.concatenate(train_rows)
    rng = np.random.default_rng(2)
    for i, c, r, k in zip(*(rng.integers(0, hi, 200) for hi in (12, 3, 32, 32)), strict=True):
        assert x[i, c, r, k].item() == np.float32(rows[i, c * 1024 + r * 32 + k]) / 255
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert data.test.x[4, 2, 0, 1].item() == np.float32(test_rows[4, 2048 + 1]) / 255
    # labels: batches concatenated in order
    assert data.train.y.tolist() == [label for part in TRAIN_LABELS for label in part]
    assert np.bincount(data.train.y.numpy(), minlength=10).tolist() == [
        1, 3, 1, 1, 1, 1, 1, 1, 1, 1,
    ]  # fmt: skip
    assert np.bincount(data.test.y.numpy(), minlength=10).tolist() == [
        2, 0, 0, 2, 0, 0, 0, 0, 0, 1,
    ]  # fmt: skip


def test_cifar100_fine_and_coarse(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    train_rows, _ = make_cifar100(folder)
    fine = load_cifar_data(CifarConfig(path=str(folder)))  # labels=fine is the default
    assert fine.info.num_classes == 100 and fine.info.input_shape == (3, 32, 32)
    assert fine.train.y.tolist() == FINE
    assert fine.test is not None and fine.test.y.tolist() == TEST_FINE
    assert len(fine.train) == 6 and len(fine.test) == 3
    coarse = load_cifar_data(CifarConfig(path=str(folder), labels="coarse"))
    assert coarse.info.num_classes == 20
    assert coarse.train.y.tolist() == COARSE
    assert coarse.test is not None and coarse.test.y.tolist() == TEST_COARSE
    assert torch.equal(coarse.train.x, fine.train.x)
    assert fine.train.x[5, 1, 31, 0].item() == np.float32(train_rows[5, 1024 + 31 * 32]) / 255


def test_the_extraction_folder_and_tilde_are_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_cifar100(tmp_path / "cifar-100-python")
    data = load_cifar_data(CifarConfig(path=str(tmp_path)))  # the folder holding it
    assert data.info.num_classes == 100
    monkeypatch.setenv("HOME", str(tmp_path))
    ds = build_dataset("cifar", {"path": "~/cifar-100-python"}, "iid", {}, 3, seed=0)
    assert ds.num_clients == 3 and sum(ds.num_examples(i) for i in range(3)) == 6
    assert ds.info.num_classes == 100


def test_normalize_uses_the_train_channel_stats(cifar10: Path) -> None:
    plain = load_cifar_data(CifarConfig(path=str(cifar10)))
    norm = load_cifar_data(CifarConfig(path=str(cifar10), normalize=True))
    for c in range(3):
        channel = plain.train.x[:, c].double()
        mean, std = channel.mean().item(), channel.std(correction=0).item()
        assert norm.train.x[:, c].double().mean().item() == pytest.approx(0, abs=1e-6)
        assert norm.train.x[:, c].double().std(correction=0).item() == pytest.approx(1, abs=1e-6)
        assert plain.test is not None and norm.test is not None
        want = (plain.test.x[:, c].double() - mean) / std
        assert torch.allclose(norm.test.x[:, c].double(), want, atol=1e-5)
    assert torch.equal(norm.train.y, plain.train.y)


def test_a_hostile_pickle_is_refused_and_not_run(cifar10: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    (cifar10 / "data_batch_2").write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(UnsafePickleError, match=r"data_batch_2: refused to load the global "):
        load_cifar_data(CifarConfig(path=str(cifar10)))
    with pytest.raises(UnsafePickleError, match=rf"{os.system.__module__}\.system"):
        safe_load_pickle(cifar10 / "data_batch_2")
    # hidden inside an otherwise valid batch, with protocol 4, as the labels
    rows = np.zeros((1, 3072), np.uint8)
    hidden = cifar10 / "test_batch"
    hidden.write_bytes(pickle.dumps({b"data": rows, b"labels": Evil()}, protocol=4))
    with pytest.raises(UnsafePickleError, match=r"test_batch: .*system"):
        read_cifar_batch(hidden, b"labels", 10)
    assert not marker.exists()

    other = tmp_path / "eval.pkl"
    other.write_bytes(pickle.dumps({b"data": eval}, protocol=4))
    with pytest.raises(UnsafePickleError, match=r"eval\.pkl: .*builtins\.eval"):
        safe_load_pickle(other)
    # _codecs.encode is let through for latin-1 only (Python 3's protocol-2 bytes)
    rot13 = tmp_path / "rot13.pkl"
    rot13.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(UnsafePickleError, match=r"rot13\.pkl: .*rot13"):
        safe_load_pickle(rot13)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_uint8_arrays_of_every_protocol_load(tmp_path: Path, protocol: int) -> None:
    rows = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({b"data": rows, b"labels": [3, 4]}, protocol=protocol))
    data, labels = read_cifar_batch(path, b"labels", 10)
    assert np.array_equal(data, rows) and labels.tolist() == [3, 4]


def test_malformed_batches_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "data_batch_1"

    def bad(obj: Any, pattern: str, label_key: bytes = b"labels") -> None:
        write(path, obj)
        with pytest.raises(ValueError, match=pattern):
            read_cifar_batch(path, label_key, 10)

    rows = np.zeros((2, 3072), np.uint8)
    bad(
        {b"data": np.zeros((2, 3071), np.uint8), b"labels": [0, 1]},
        r"data_batch_1: b'data' has 3071 columns, expected 3072",
    )
    bad(
        {b"data": np.zeros((2, 3072)), b"labels": [0, 1]},
        r"data_batch_1: b'data' is a float64 array of shape \(2, 3072\), expected a 2-d uint8",
    )
    bad({b"data": [1, 2], b"labels": [0, 1]}, r"b'data' is a list, expected a 2-d uint8 array")
    bad({b"labels": [0, 1]}, r"data_batch_1: no b'data' entry \(keys: b'labels'\)")
    bad({b"data": rows, b"labels": [0]}, r"b'data' has 2 rows but b'labels' 1 labels")
    bad({b"data": rows, b"labels": [0, 10]}, r"data_batch_1: b'labels'\[1\] is 10, expected 0..9")
    bad({b"data": rows, b"labels": [0, -1]}, r"b'labels'\[1\] is -1, expected 0..9")
    bad({b"data": rows, b"labels": [b"a", b"b"]}, r"b'labels' is .*expected a list of ints")
    bad({b"data": rows, b"labels": [0, 1]}, r"no b'fine_labels' entry", b"fine_labels")
    bad([rows], r"data_batch_1: holds a list, expected a dict")

    whole = pickled({b"data": rows, b"labels": [0, 1]})
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"data_batch_1: not a readable CIFAR batch pickle"):
        read_cifar_batch(path, b"labels", 10)
    path.write_bytes(b"\x1f\x8b\x08 this is a gzip header, not a pickle")
    with pytest.raises(ValueError, match=r"data_batch_1: not a readable CIFAR batch pickle"):
        read_cifar_batch(path, b"labels", 10)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"data_batch_1: not a readable .*EOFError"):
        read_cifar_batch(path, b"labels", 10)
    with pytest.raises(FileNotFoundError, match=r"absent: no such CIFAR batch file"):
        read_cifar_batch(tmp_path / "absent", b"labels", 10)


def test_a_bad_batch_inside_the_folder_names_it(cifar10: Path) -> None:
    rows = np.zeros((2, 3072), np.uint8)
    write(cifar10 / "data_batch_4", {b"data": rows, b"labels": [0, 12]})
    with pytest.raises(ValueError, match=r"data_batch_4: b'labels'\[1\] is 12, expected 0..9"):
        load_cifar_data(CifarConfig(path=str(cifar10)))


def test_missing_files_and_unknown_folders(tmp_path: Path, cifar10: Path) -> None:
    (cifar10 / "data_batch_3").unlink()
    (cifar10 / "test_batch").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"CIFAR-10 folder without data_batch_3, test_batch; expected data_batch_1, "
        r"data_batch_2, data_batch_3, data_batch_4, data_batch_5 and test_batch",
    ):
        load_cifar_data(CifarConfig(path=str(cifar10)))

    c100 = tmp_path / "c100"
    make_cifar100(c100)
    (c100 / "test").unlink()
    with pytest.raises(FileNotFoundError, match=r"CIFAR-100 folder without test"):
        load_cifar_data(CifarConfig(path=str(c100)))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"empty: no CIFAR batch files; expected a CIFAR-10"
    ):
        load_cifar_data(CifarConfig(path=str(empty)))

    both = tmp_path / "both"
    make_cifar10(both)
    write(both / "train", {})
    with pytest.raises(ValueError, match=r"both CIFAR-10 .* and CIFAR-100"):
        load_cifar_data(CifarConfig(path=str(both)))


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    for params in ({}, {"path": str(tmp_path / "nope")}):
        with pytest.raises(ConfigError) as e:
            build_dataset("cifar", params, "iid", {}, 2, seed=0)
        assert e.value.key == "data.path" and "cifar-10-batches-py" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_dataset("cifar", {"path": str(tmp_path), "labels": "medium"}, "iid", {}, 2, seed=0)
    assert e.value.key == "data.labels" and "fine, coarse" in str(e.value)


def test_a_run_on_cifar10_with_the_cnn(cifar10: Path) -> None:
    from roost.runner import run

    tree = {
        "rounds": 1,
        "clients": 2,
        "clients_per_round": 2,
        "eval_every": 1,
        "data": {"name": "cifar", "path": str(cifar10)},
        "partition": {"name": "iid"},
        "model": {"name": "cnn"},
        "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 4},
    }
    history = run(tree)
    assert history.num_clients == 2 and history.final["round"] == 1
    evaluated = history.last_evaluated()
    assert math.isfinite(evaluated["loss"]) and 0 <= evaluated["accuracy"] <= 1
    assert math.isfinite(history.final["train_loss"])
