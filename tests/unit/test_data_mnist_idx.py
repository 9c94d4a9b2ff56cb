"""IDX reading (files written here, plain and gzip), malformed files, and the staged MNIST."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from roost.data import build_dataset
from roost.data.mnist_idx import (
    MnistConfig,
    load_mnist_data,
    read_idx_images,
    read_idx_labels,
)
from roost.registry import ConfigError

SHARED = (Path(__file__).parents[2] / "../shared/data").resolve()
MNIST = SHARED / "mnist"


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX: magic 0x0000080<ndim>, big-endian sizes, raw bytes."""
    magic = 0x800 + array.ndim  # 2051 for 3-d images, 2049 for 1-d labels
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(6, 5, 4), dtype=np.uint8)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_round_trip(tmp_path: Path, images: np.ndarray, suffix: str) -> None:
    labels = np.array([3, 1, 4, 1, 5, 9], dtype=np.uint8)
    got_images = read_idx_images(write_idx(tmp_path / f"img-idx3-ubyte{suffix}", images))
    got_labels = read_idx_labels(write_idx(tmp_path / f"lab-idx1-ubyte{suffix}", labels))
    assert got_images.dtype == np.uint8 and got_images.shape == (6, 5, 4)
    assert np.array_equal(got_images, images)
    assert np.array_equal(got_labels, labels)


def test_malformed_files_name_the_file(tmp_path: Path, images: np.ndarray) -> None:
    labels_file = write_idx(tmp_path / "labels-idx1-ubyte", np.arange(6, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"labels-idx1-ubyte: magic number 2049, expected 2051"):
        read_idx_images(labels_file)

    truncated = tmp_path / "short-idx3-ubyte.gz"
    truncated.write_bytes(gzip.compress(idx_bytes(images)[:-7]))
    with pytest.raises(ValueError, match=r"short-idx3-ubyte.gz: 129 bytes, expected 136"):
        read_idx_images(truncated)  # header 16 + 6*5*4 = 136 bytes

    broken_gzip = tmp_path / "broken-idx3-ubyte.gz"
    broken_gzip.write_bytes(gzip.compress(idx_bytes(images))[:30])
    with pytest.raises(ValueError, match=r"broken-idx3-ubyte\.gz"):
        read_idx_images(broken_gzip)

    tiny = tmp_path / "tiny-idx1-ubyte"
    tiny.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="tiny-idx1-ubyte: 2 bytes, too short"):
        read_idx_labels(tiny)

    with pytest.raises(FileNotFoundError, match="absent-idx1-ubyte"):
        read_idx_labels(tmp_path / "absent-idx1-ubyte")


def test_folder_with_both_splits(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    train_images = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    test_images = rng.integers(0, 256, (8, 28, 28), dtype=np.uint8)
    # mixed spellings: plain hyphenated, dotted, and gzip
    write_idx(tmp_path / "train-images-idx3-ubyte", train_images)
    write_idx(tmp_path / "train-labels.idx1-ubyte", np.arange(20, dtype=np.uint8) % 10)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test_images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(8, dtype=np.uint8))
    data = load_mnist_data(MnistConfig(path=str(tmp_path)), seed=0)
    assert data.train.x.shape == (20, 1, 28, 28) and data.train.x.dtype == torch.float32
    assert data.test is not None and data.test.x.shape == (8, 1, 28, 28)
    assert torch.equal(data.train.x[:, 0], torch.from_numpy(train_images.astype(np.float32) / 255))
    assert data.test.y.tolist() == list(range(8))
    assert data.info.input_shape == (1, 28, 28) and data.info.num_classes == 10
    assert data.groups is None


def test_missing_labels_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no IDX images"):
        load_mnist_data(MnistConfig(path=str(tmp_path)), seed=0)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        load_mnist_data(MnistConfig(path=str(tmp_path)), seed=0)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match=r"2 images but .* 3 labels"):
        load_mnist_data(MnistConfig(path=str(tmp_path)), seed=0)


def test_bad_path_names_the_key() -> None:
    with pytest.raises(ConfigError) as e:
        build_dataset("mnist", {"path": "/no/such/dir"}, "iid", {}, 10, seed=0)
    assert e.value.key == "data.path"
    with pytest.raises(ConfigError) as e:
        build_dataset("mnist", {}, "iid", {}, 10, seed=0)
    assert e.value.key == "data.path"


@pytest.fixture(scope="module")
def staged() -> Path:
    if not (MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"{MNIST} not present")
    return MNIST


def test_staged_mnist_labels(staged: Path) -> None:
    # PROVENANCE.md section 8: 10,000 test labels with these per-digit counts; 60,000 train labels.
    t10k = read_idx_labels(staged / "t10k-labels-idx1-ubyte.gz")
    expected = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert np.bincount(t10k).tolist() == expected
    assert len(read_idx_labels(staged / "train-labels-idx1-ubyte.gz")) == 60000


def test_staged_mnist_t10k_is_split(staged: Path) -> None:
    # Only t10k has images, so its 10,000 examples are split 80/20, stratified: each digit
    # sends round(0.2 * count) to test, 196+227+206+202+196+178+192+206+195+202 = 2,000.
    data = load_mnist_data(MnistConfig(path=str(staged)), seed=0)
    assert data.test is not None
    assert len(data.train) == 8000 and len(data.test) == 2000
    assert data.train.x.shape[1:] == (1, 28, 28)
    assert float(data.train.x.min()) == 0.0 and float(data.train.x.max()) == 1.0
    assert data.info.num_classes == 10
    counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert np.bincount(data.test.y.numpy()).tolist() == [round(0.2 * c) for c in counts]
    again = load_mnist_data(MnistConfig(path=str(staged)), seed=0)
    assert torch.equal(again.test.y, data.test.y) if again.test is not None else False
    ds = build_dataset("mnist", {"path": str(staged)}, "shards", {}, 40, seed=0)
    assert ds.num_clients == 40
    assert sum(ds.num_examples(i) for i in range(40)) == 8000
