"""Raw-text LEAF sets (Sent140): text fields, vocabulary, bag of words, token ids, the per-user
split of a one-split folder, malformed text input, the staged Sent140 file, and short runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from roost.cli import main
from roost.data import ArrayFederatedDataset, DatasetInfo, build_dataset
from roost.data.leaf import (
    LeafConfig,
    leaf_files,
    load_leaf_data,
    split_users,
    user_test_count,
)
from roost.data.leaf_text import build_vocab, entry_text, record_texts, tokenize
from roost.models import MODELS, build_model
from roost.registry import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SENT140 = ROOT.parent / "shared" / "data" / "sent140_leaf"
DATE = "Mon Apr 06 22:19:45 PDT 2009"


def tweet(user: str, text: str, tweet_id: int = 1) -> list[str]:
    """One row as Sent140 stores it."""
    return [str(tweet_id), DATE, "NO_QUERY", user, text, "training"]


def write_leaf(path: Path, users: dict[str, tuple[list[Any], list[int]]]) -> Path:
    doc = {
        "users": list(users),
        "num_samples": [len(y) for _, y in users.values()],
        "user_data": {u: {"x": x, "y": y} for u, (x, y) in users.items()},
    }
    path.write_text(json.dumps(doc))
    return path


def tweets(user: str, texts: list[str]) -> list[list[str]]:
    return [tweet(user, text, i) for i, text in enumerate(texts)]


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """Train and test files. Train words: love 3; hate, i, it, mondays 2; again, this 1."""
    write_leaf(
        tmp_path / "s_train_0.json",
        {
            "alice": (tweets("alice", ["I love love this!", "Hate Mondays."]), [1, 0]),
            "bob": (tweets("bob", ["love it", "mondays again", "I hate it"]), [1, 0, 0]),
        },
    )
    write_leaf(tmp_path / "s_test_0.json", {"bob": (tweets("bob", ["Love, LOVE again?"]), [1])})
    return tmp_path


TRAIN_TEXTS = ["I love love this!", "Hate Mondays.", "love it", "mondays again", "I hate it"]


def test_words_and_text_field() -> None:
    words = ["don", "t", "stop", "me", "now", "bob", "2day"]
    assert tokenize("Don't STOP-me_now! @Bob 2day") == words
    assert tokenize("Café ÜBER") == ["café", "über"]
    row = tweet("bob", "the tweet")
    assert entry_text(row, None) == "the tweet"  # index 4: the last text before "training"
    assert entry_text(row, 3) == "bob"
    assert entry_text("a raw string", None) == "a raw string"
    # a tweet whose text is "training" is still the text: only the final field is skipped
    assert entry_text(tweet("bob", "training"), None) == "training"
    assert entry_text(["only", 1.5], None) == "only"


def test_vocabulary_is_most_frequent_train_words_ties_alphabetical() -> None:
    assert build_vocab(TRAIN_TEXTS, 100) == [
        "love", "hate", "i", "it", "mondays", "again", "this",
    ]  # fmt: skip
    # the cut at 3 falls among the four words seen twice: hate and i win alphabetically
    assert build_vocab(TRAIN_TEXTS, 3) == ["love", "hate", "i"]


def test_bag_of_words_of_a_known_tweet(small: Path) -> None:
    data = load_leaf_data(LeafConfig(path=str(small), vocab_size=5), seed=0)
    # vocab = love, hate, i, it, mondays; the 6th position counts OOV words
    assert data.info.input_shape == (6,) and data.info.vocab_size == 0
    assert data.info.num_classes == 2
    assert data.train.x.dtype == torch.float32
    # "I love love this!": love 2, i 1, and "this" is out of the vocabulary
    assert data.train.x[0].tolist() == [2, 0, 1, 0, 0, 1]
    assert data.train.x[3].tolist() == [0, 0, 0, 0, 1, 1]  # "mondays again"
    # the test tweet is encoded with the train vocabulary: "again" is OOV there too
    assert data.test is not None and data.test.x.tolist() == [[2, 0, 0, 0, 0, 1]]
    assert data.train.y.tolist() == [1, 0, 1, 0, 0] and data.test.y.tolist() == [1]
    assert data.groups is not None and data.groups.tolist() == [0, 0, 1, 1, 1]
    assert data.test_groups is not None and data.test_groups.tolist() == [1]


def test_token_ids_padding_and_truncation(small: Path) -> None:
    cfg = LeafConfig(path=str(small), features="token_ids", vocab_size=5, seq_len=3)
    data = load_leaf_data(cfg, seed=0)
    # ids: pad 0, love 1, hate 2, i 3, it 4, mondays 5, OOV 6
    assert data.info.input_shape == (3,) and data.info.vocab_size == 7
    assert data.train.x.dtype == torch.int64
    assert data.train.x.tolist() == [
        [3, 1, 1],  # "I love love this!" keeps its first 3 words
        [2, 5, 0],  # "Hate Mondays." padded with 0
        [1, 4, 0],  # "love it"
        [5, 6, 0],  # "mondays again": again is OOV
        [3, 2, 4],  # "I hate it"
    ]
    assert data.test is not None and data.test.x.tolist() == [[1, 1, 6]]
    model = build_model("text_classifier", MODELS.config("text_classifier", {}), data.info)
    assert model(data.train.x).shape == (5, 2)


def test_text_classifier_leaves_padding_out_of_the_mean() -> None:
    info = DatasetInfo((4,), 2, vocab_size=5)
    model = build_model("text_classifier", MODELS.config("text_classifier", {}), info)
    padded = model(torch.tensor([[1, 2, 0, 0], [1, 2, 1, 2]]))
    assert torch.allclose(padded[0], padded[1])  # mean of (1, 2) either way
    with pytest.raises(ValueError, match="text_classifier needs token ids"):
        build_model("text_classifier", MODELS.config("text_classifier", {}), DatasetInfo((4,), 2))


def test_bag_of_words_gives_mlp_and_token_ids_do_not(small: Path) -> None:
    data = load_leaf_data(LeafConfig(path=str(small), features="token_ids"), seed=0)
    with pytest.raises(ValueError, match="model=mlp needs float features"):
        build_model("mlp", MODELS.config("mlp", {}), data.info)


def write_one_split(folder: Path, sizes: list[int]) -> Path:
    """One unnamed file, user u with sizes[u] tweets labelled 0, 1, 0, 1, ..."""
    folder.mkdir(exist_ok=True)
    users = {}
    for u, n in enumerate(sizes):
        texts = [f"tweet {i} of user {u}" for i in range(n)]
        users[f"u{u}"] = (tweets(f"u{u}", texts), [i % 2 for i in range(n)])
    return write_leaf(folder / "all_data_niid_0_keep_0.json", users)


def test_one_split_folder_is_split_per_user(tmp_path: Path) -> None:
    write_one_split(tmp_path, [1, 2, 3, 10, 11, 25])
    assert leaf_files(tmp_path) == ([tmp_path / "all_data_niid_0_keep_0.json"], [])
    # test share max(1, floor(0.2 n)), none for a single tweet: 0, 1, 1, 2, 2, 5
    assert [user_test_count(n, 0.2) for n in (1, 2, 3, 10, 11, 25)] == [0, 1, 1, 2, 2, 5]
    params = {"path": str(tmp_path), "test_fraction": 0.2}
    ds = build_dataset("leaf", params, "natural", {}, None, seed=3)
    assert isinstance(ds, ArrayFederatedDataset) and ds.num_clients == 6
    assert [ds.num_examples(i) for i in range(6)] == [1, 1, 2, 8, 9, 20]
    tests = [ds.client_test_data(i) for i in range(6)]
    assert tests[0] is None
    assert [0 if t is None else len(t) for t in tests] == [0, 1, 1, 2, 2, 5]
    central = ds.test_data()
    assert central is not None and len(central) == 11
    # the held-out tweets of user u are drawn by default_rng([seed, 6, u]); user 5 (25
    # tweets) starts at example 1 + 2 + 3 + 10 + 11 = 27
    keys = np.repeat(np.arange(6), [1, 2, 3, 10, 11, 25])
    train_idx, test_idx = split_users(keys, 0.2, seed=3)
    held = np.sort(np.random.default_rng([3, 6, 5]).permutation(25)[:5])
    assert test_idx[-5:].tolist() == (27 + held).tolist()
    assert sorted([*train_idx, *test_idx]) == list(range(52))
    labels = np.concatenate([np.arange(n) % 2 for n in (1, 2, 3, 10, 11, 25)])
    assert central.y.tolist() == labels[test_idx].tolist()
    again = build_dataset("leaf", params, "natural", {}, None, seed=3)
    other = build_dataset("leaf", params, "natural", {}, None, seed=4)
    t5, t5_again, t5_other = (d.client_test_data(5) for d in (ds, again, other))
    assert t5 is not None and t5_again is not None and t5_other is not None
    assert torch.equal(t5.x, t5_again.x) and not torch.equal(t5.x, t5_other.x)
    # test_fraction=0 keeps every tweet for training, with no test split
    whole = load_leaf_data(LeafConfig(path=str(tmp_path), test_fraction=0), seed=3)
    assert len(whole.train) == 52 and whole.test is None


def test_test_only_named_files_are_split_too(tmp_path: Path) -> None:
    write_leaf(tmp_path / "x_test_9.json", {"a": (tweets("a", ["yes", "no", "maybe"]), [1, 0, 1])})
    data = load_leaf_data(LeafConfig(path=str(tmp_path)), seed=0)
    assert len(data.train) == 2 and data.test is not None and len(data.test) == 1


def expect_error(folder: Path, match: str, **params: Any) -> None:
    """Loading fails with a one-line ValueError matching ``match``."""
    with pytest.raises(ValueError, match=match) as e:
        load_leaf_data(LeafConfig(path=str(folder), **params), seed=0)
    assert "\n" not in str(e.value)


def test_malformed_text_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad_train_0.json"
    write_leaf(bad, {"u": ([tweet("u", "fine"), [12345, "training"]], [1, 0])})
    expect_error(tmp_path, r"bad_train_0.json: user 'u': x\[1\] has no text field")
    write_leaf(bad, {"u": ([tweet("u", "fine")], [1])})
    expect_error(
        tmp_path, r"bad_train_0.json: user 'u': x\[0\] has 6 fields, no .*=9", text_field=9
    )
    write_leaf(bad, {"u": ([[12345, DATE, "NO_QUERY", "u", "fine", "training"]], [1])})
    expect_error(tmp_path, r"x\[0\] field 0 is 12345, not text", text_field=0)
    write_leaf(bad, {"u": ([[0.5, 1.5]], [1])})
    expect_error(tmp_path, r"user 'u': x\[0\] has no text field", features="bag_of_words")
    # numeric and text rows mixed, within one user and across users
    write_leaf(bad, {"u": ([[0.5, 1.5], tweet("u", "hi")], [1, 0])})
    expect_error(tmp_path, r"user 'u': x mixes numeric rows \(x\[0\]\) and text rows \(x\[1\]\)")
    write_leaf(bad, {"n": ([[0.5, 1.5]], [1]), "t": ([tweet("t", "hi")], [0])})
    expect_error(tmp_path, r"user 't': x holds text rows but .*user 'n' holds numeric rows")
    write_leaf(bad, {"u": ([tweet("u", "hi")], [1, 0])})
    expect_error(tmp_path, r"user 'u': x has 1 entries but y has 2 labels")
    write_leaf(bad, {"u": ([tweet("u", "hi")], ["positive"])})
    expect_error(tmp_path, r"user 'u': y must be a list of integer labels >= 0")
    write_leaf(bad, {"u": ([tweet("u", "!!! ..."), tweet("u", ":)")], [1, 0])})
    expect_error(tmp_path, r"the train texts hold no words", test_fraction=0)
    for key, value in [("vocab_size", 0), ("seq_len", 0), ("text_field", -1)]:
        with pytest.raises(ConfigError) as c:
            build_dataset("leaf", {"path": str(tmp_path), key: value}, "natural", {}, None, 0)
        assert c.value.key == f"data.{key}" and "must be" in str(c.value)
    with pytest.raises(ConfigError, match="allowed: auto, numeric, bag_of_words, token_ids"):
        build_dataset("leaf", {"path": str(tmp_path), "features": "words"}, "natural", {}, None, 0)


def test_record_texts_names_the_entry() -> None:
    with pytest.raises(ValueError, match=r"^f.json: user 'u': x\[1\] is dict"):
        record_texts("f.json: user 'u'", ["ok", {"text": "no"}], None)


@pytest.fixture(scope="module")
def sent140() -> Path:
    if not SENT140.is_dir():
        pytest.skip(f"{SENT140} is not here")
    return SENT140


def test_staged_sent140_counts(sent140: Path) -> None:
    # PROVENANCE.md section 7: 2,875 users and 16,025 tweets, 9,717 positive, 6,308 negative.
    data = load_leaf_data(LeafConfig(path=str(sent140)), seed=0)
    assert data.test is not None and data.groups is not None and data.test_groups is not None
    assert len(data.train) + len(data.test) == 16025
    labels = torch.cat([data.train.y, data.test.y])
    assert int((labels == 1).sum()) == 9717 and int((labels == 0).sum()) == 6308
    assert len(np.unique(data.groups)) == 2875  # every user keeps a train tweet (3 or more)
    assert len(np.unique(data.test_groups)) == 2875  # and holds out at least one
    assert data.info.input_shape == (1001,) and data.info.num_classes == 2
    # the default text field of every row is index 4, the tweet
    doc = json.loads(next(sent140.glob("*.json")).read_text())
    first = doc["users"][0]
    x = doc["user_data"][first]["x"]
    assert record_texts(first, x, None) == [row[4] for row in x]


def test_staged_sent140_as_token_ids(sent140: Path) -> None:
    params = {"path": str(sent140), "features": "token_ids", "vocab_size": 500}
    ds = build_dataset("leaf", params, "natural", {}, None, seed=0)
    assert ds.num_clients == 2875
    assert ds.info.input_shape == (25,) and ds.info.vocab_size == 502


def write_separable(folder: Path) -> Path:
    """4 users x 10 tweets; the label is whether the tweet says good (1) or bad (0)."""
    folder.mkdir()
    fillers = ["today", "at work", "with friends", "this morning", "again"] * 2
    users = {}
    for u in range(4):
        labels = [(i + u) % 2 for i in range(10)]
        texts = [f"Feeling {'good' if y else 'bad'} {fillers[i]}!" for i, y in enumerate(labels)]
        users[f"user{u}"] = (tweets(f"user{u}", texts), labels)
    return write_leaf(folder / "tiny_test_9.json", users)


@pytest.mark.parametrize(
    "mode", [["data.features=bag_of_words"], ["data.features=token_ids", "model=text_classifier"]]
)
def test_short_run_on_a_separable_set(tmp_path: Path, mode: list[str]) -> None:
    write_separable(tmp_path / "tiny")
    out = tmp_path / "run"
    argv = [
        "run",
        "quickstart",
        "data=leaf",
        f"data.path={tmp_path / 'tiny'}",
        "data.test_fraction=0.2",
        *mode,
        "partition=natural",
        "clients=4",
        "clients_per_round=4",
        "rounds=5",
        "threads=1",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    # 2 of each user's 10 tweets are held out: 8 in all, 6 good and 2 bad at seed 0, so
    # always answering "good" scores 0.75. One word, good or bad, decides every label, both
    # words are in every user's train tweets and the fillers come with both labels, so both
    # models separate them: accuracy 1.0 (reached by round 3 of 5).
    held_out = load_leaf_data(LeafConfig(path=str(tmp_path / "tiny"), test_fraction=0.2), 0).test
    assert held_out is not None and held_out.y.tolist().count(1) == 6 and len(held_out) == 8
    assert summary["rounds"] == 5 and summary["final_accuracy"] == 1.0
