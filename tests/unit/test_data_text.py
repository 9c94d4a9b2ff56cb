"""Text split by speaker: parsing, window arithmetic, splits, and Tiny Shakespeare's counts."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from roost.data import ArrayFederatedDataset, build_dataset
from roost.data.text import TextConfig, char_windows, load_text_data, read_speeches, speaker_texts
from roost.registry import ConfigError

SHARED = (Path(__file__).parents[2] / "../shared/data").resolve()
SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"

PLAY = """ALICE:
abcdefghij
klm

BOB:
no

A stage direction without a speaker

ALICE:
xyz

CAROL:
"""


def test_parse_speeches() -> None:
    assert read_speeches(PLAY) == [("ALICE", "abcdefghij\nklm"), ("BOB", "no"), ("ALICE", "xyz")]
    assert speaker_texts(PLAY) == {"ALICE": "abcdefghij\nklm\nxyz", "BOB": "no"}


def test_char_windows() -> None:
    ids = np.arange(10)
    x, y = char_windows(ids, seq_len=3, stride=2)
    # L=10: (10 - 3 - 1) // 2 + 1 = 4 windows starting at 0, 2, 4, 6
    assert x.tolist() == [[0, 1, 2], [2, 3, 4], [4, 5, 6], [6, 7, 8]]
    assert y.tolist() == [3, 5, 7, 9]
    assert char_windows(ids, seq_len=10, stride=1)[0].shape == (0, 10)


def test_small_play(tmp_path: Path) -> None:
    path = tmp_path / "play.txt"
    path.write_text(PLAY)
    cfg = {"path": str(path), "seq_len": 4, "stride": 2, "test_fraction": 0.5}
    ds = build_dataset("text", cfg, "auto", {}, None, seed=0)
    assert isinstance(ds, ArrayFederatedDataset)
    vocab = sorted(set(PLAY))
    assert ds.info.vocab_size == ds.info.num_classes == len(vocab)
    assert ds.info.input_shape == (4,)
    # ALICE's 18 characters give (18 - 5) // 2 + 1 = 7 windows: 4 train, 3 test.
    # BOB's 2 characters give none, so only ALICE is a client.
    assert ds.num_clients == 1
    alice = speaker_texts(PLAY)["ALICE"]
    decode = lambda row: "".join(vocab[i] for i in row)  # noqa: E731
    train = ds.client_data(0)
    assert [decode(r) for r in train.x.tolist()] == ["abcd", "cdef", "efgh", "ghij"]
    assert decode(train.y.tolist()) == "egi\n"  # the chars at 4, 6, 8, 10
    test = ds.client_test_data(0)
    assert test is not None and [decode(r) for r in test.x.tolist()] == ["ij\nk", "\nklm", "lm\nx"]
    assert decode(test.y.tolist()) == alice[12::2][:3] == "l\ny"
    central = ds.test_data()
    assert central is not None and torch.equal(central.x, test.x)
    capped = build_dataset("text", {**cfg, "max_test": 2}, "natural", {}, None, seed=0)
    capped_test = capped.test_data()
    assert capped_test is not None and [decode(r) for r in capped_test.x.tolist()] == [
        "ij\nk",
        "\nklm",
    ]  # windows floor(0 * 3 / 2) = 0 and floor(1 * 3 / 2) = 1
    dropped = build_dataset("text", {**cfg, "seq_len": 1, "min_chars": 3}, "natural", {}, None, 0)
    assert dropped.num_clients == 1  # BOB (2 chars) is dropped by min_chars=3


def test_bad_text_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        build_dataset("text", {"path": str(tmp_path / "none.txt")}, "auto", {}, None, 0)
    assert e.value.key == "data.path"
    path = tmp_path / "play.txt"
    path.write_text(PLAY)
    with pytest.raises(ConfigError) as e:
        build_dataset("text", {"path": str(path), "stride": 0}, "auto", {}, None, 0)
    assert e.value.key == "data.stride"
    with pytest.raises(ConfigError) as e:
        build_dataset("text", {"path": str(path), "seqlen": 5}, "auto", {}, None, 0)
    assert e.value.key == "data.seqlen" and "seq_len" in str(e.value)
    (tmp_path / "prose.txt").write_text("no speeches here\n\njust prose\n")
    with pytest.raises(ValueError, match=r"prose\.txt: no speeches found"):
        load_text_data(TextConfig(path=str(tmp_path / "prose.txt")), 0)


@pytest.fixture(scope="module")
def shakespeare() -> str:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present")
    return SHAKESPEARE.read_text()


def test_tiny_shakespeare_speakers(shakespeare: str) -> None:
    # PROVENANCE.md section 5: 1,115,394 characters, 65 distinct; 299 speakers, 141 of them
    # with at least 1,000 characters and 145 with at least 10 speeches; GLOUCESTER 211,
    # DUKE VINCENTIO 189, MENENIUS 161 speeches. We find 7,097 speeches where PROVENANCE
    # says 7,095: two speeches (SAMPSON's, MARIANA's) follow two blank lines instead of one,
    # and a split on exactly "\n\n" misses them; any run of blank lines separates blocks here.
    assert len(shakespeare) == 1115394 and len(set(shakespeare)) == 65
    speeches = read_speeches(shakespeare)
    assert len(speeches) == 7097
    counts = Counter(s for s, _ in speeches)
    assert len(counts) == 299
    assert counts.most_common(3) == [
        ("GLOUCESTER", 211),
        ("DUKE VINCENTIO", 189),
        ("MENENIUS", 161),
    ]
    assert sum(c >= 10 for c in counts.values()) == 145
    texts = speaker_texts(shakespeare)
    assert sum(len(t) >= 1000 for t in texts.values()) == 141


def test_tiny_shakespeare_dataset(shakespeare: str) -> None:
    texts = speaker_texts(shakespeare)
    windows = [max(0, (len(t) - 80 - 1) // 8 + 1) for t in texts.values()]  # seq_len 80, stride 8
    n_test = [int(0.1 * w) for w in windows]
    ds = build_dataset("text", {"path": str(SHAKESPEARE), "min_chars": 1000}, "auto", {}, None, 0)
    assert ds.num_clients == 141
    assert ds.info.input_shape == (80,) and ds.info.vocab_size == 65
    kept = [i for i, t in enumerate(texts.values()) if len(t) >= 1000]
    assert [ds.num_examples(c) for c in range(141)] == [windows[i] - n_test[i] for i in kept]
    test = ds.test_data()
    assert test is not None and len(test) == 2000 and test.x.dtype == torch.int64
    first = ds.client_data(0)  # "First Citizen", the first speaker of the file
    vocab = sorted(set(shakespeare))
    assert "".join(vocab[i] for i in first.x[0].tolist()) == texts["First Citizen"][:80]
    assert vocab[int(first.y[0])] == texts["First Citizen"][80]
    client_test = ds.client_test_data(0)
    assert client_test is not None and len(client_test) == n_test[0]
