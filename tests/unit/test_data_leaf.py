"""LEAF JSON: the staged FEMNIST shards, the flat-file layout, and malformed input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from roost.data import ArrayFederatedDataset, build_dataset
from roost.data.leaf import LeafConfig, leaf_files, load_leaf_data, read_leaf_file
from roost.registry import ConfigError

SHARED = (Path(__file__).parents[2] / "../shared/data").resolve()
FEMNIST = SHARED / "femnist_leaf"


@pytest.fixture(scope="module")
def femnist() -> ArrayFederatedDataset:
    if not (FEMNIST / "train").is_dir():
        pytest.skip(f"{FEMNIST} not present")
    ds = build_dataset("leaf", {"path": str(FEMNIST)}, "auto", {}, None, seed=0)
    assert isinstance(ds, ArrayFederatedDataset)
    return ds


def test_femnist_counts(femnist: ArrayFederatedDataset) -> None:
    # PROVENANCE.md section 6: 6 shards, 31 writers, 4,536 train and 518 test samples,
    # all 62 classes, 784-pixel images.
    assert femnist.num_clients == 31
    assert sum(femnist.num_examples(i) for i in range(31)) == 4536
    test = femnist.test_data()
    assert test is not None and len(test) == 518
    assert femnist.info.input_shape == (1, 28, 28) and femnist.info.num_classes == 62
    assert len(torch.unique(femnist.train.y)) == 62


def test_femnist_clients_follow_file_order(femnist: ArrayFederatedDataset) -> None:
    # Shard 0's users are f3313_11, f3137_47, ... with num_samples 155, 162, 164, 161, 137.
    assert [femnist.num_examples(i) for i in range(5)] == [155, 162, 164, 161, 137]
    client = femnist.client_data(0)
    assert client.x.shape == (155, 1, 28, 28) and client.x.dtype == torch.float32
    assert float(client.x.max()) <= 1.0 and float(client.x.min()) >= 0.0


def test_femnist_per_client_tests(femnist: ArrayFederatedDataset) -> None:
    # Each shard's train and test files list the same writers, so every client has a test
    # split, and together they are the whole test set.
    sizes = []
    for i in range(31):
        part = femnist.client_test_data(i)
        assert part is not None and len(part) > 0
        sizes.append(len(part))
    assert sum(sizes) == 518
    first = read_leaf_file(FEMNIST / "test" / "all_data_0_niid_05_keep_0_test_9.json")[0]
    assert first[0] == "f3313_11"
    part0 = femnist.client_test_data(0)
    assert part0 is not None and part0.y.tolist() == first[2].tolist()


def test_femnist_files() -> None:
    if not (FEMNIST / "train").is_dir():
        pytest.skip(f"{FEMNIST} not present")
    train_files, test_files = leaf_files(FEMNIST)
    assert train_files[0].name == "all_data_0_niid_05_keep_0_train_9.json"
    assert len(train_files) == 6 and len(test_files) == 6


def write_leaf(path: Path, users: dict[str, tuple[list[list[float]], list[int]]]) -> None:
    doc = {
        "users": list(users),
        "num_samples": [len(y) for _, y in users.values()],
        "user_data": {u: {"x": x, "y": y} for u, (x, y) in users.items()},
    }
    path.write_text(json.dumps(doc))


def test_flat_layout_merges_users_and_keeps_flat_features(tmp_path: Path) -> None:
    write_leaf(tmp_path / "a_train_0.json", {"u1": ([[1, 2, 3]], [0]), "u2": ([[4, 5, 6]], [1])})
    write_leaf(tmp_path / "b_train_0.json", {"u3": ([[0, 0, 1]], [2]), "u1": ([[7, 8, 9]], [1])})
    write_leaf(tmp_path / "a_test_0.json", {"u2": ([[1, 1, 1], [2, 2, 2]], [0, 1])})
    ds = build_dataset("leaf", {"path": str(tmp_path), "num_classes": 5}, "natural", {}, None, 0)
    assert ds.num_clients == 3  # u1, u2, u3 in order of first appearance
    assert ds.info.input_shape == (3,) and ds.info.num_classes == 5
    u1 = ds.client_data(0)
    assert u1.x.tolist() == [[1, 2, 3], [7, 8, 9]] and u1.y.tolist() == [0, 1]
    assert ds.client_test_data(0) is None  # u1 has no test examples
    u2_test = ds.client_test_data(1)
    assert u2_test is not None and u2_test.y.tolist() == [0, 1]
    two = build_dataset("leaf", {"path": str(tmp_path)}, "natural", {}, 2, 0)
    assert two.num_clients == 2 and two.info.num_classes == 3
    with pytest.raises(ConfigError) as e:
        build_dataset("leaf", {"path": str(tmp_path)}, "natural", {}, 4, 0)
    assert e.value.key == "clients"


def test_malformed_leaf_files(tmp_path: Path) -> None:
    (tmp_path / "bad_train_0.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad_train_0.json: not valid JSON"):
        load_leaf_data(LeafConfig(path=str(tmp_path)), 0)

    (tmp_path / "bad_train_0.json").write_text(json.dumps({"users": ["a"], "user_data": {}}))
    with pytest.raises(ValueError, match=r"bad_train_0.json: user 'a' is listed .* no user_data"):
        load_leaf_data(LeafConfig(path=str(tmp_path)), 0)

    # Sent140-style raw tweets are not numeric features (features=auto reads them as text)
    tweet = ["1467810369", "Mon Apr 06", "NO_QUERY", "someone", "hello", "training"]
    write_leaf(tmp_path / "bad_train_0.json", {"someone": ([tweet], [1])})  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"bad_train_0.json: user 'someone'.*Sent140"):
        load_leaf_data(LeafConfig(path=str(tmp_path), features="numeric"), 0)

    write_leaf(tmp_path / "bad_train_0.json", {"u": ([[1.0], [2.0]], [0])})
    with pytest.raises(ValueError, match=r"user 'u': .* got x shape \(2, 1\) and 1 labels"):
        load_leaf_data(LeafConfig(path=str(tmp_path)), 0)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no LEAF JSON files"):
        load_leaf_data(LeafConfig(path=str(empty)), 0)
    with pytest.raises(ConfigError) as e:
        build_dataset("leaf", {"path": str(tmp_path / "nope")}, "auto", {}, None, 0)
    assert e.value.key == "data.path"
