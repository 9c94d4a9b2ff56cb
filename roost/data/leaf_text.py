"""Text features for raw-text LEAF sets (Sent140): the text of a row, words, vocabulary, vectors.

Rules, applied in this order:

* **Text of an entry.** An ``x`` entry that is a string is the text itself. An entry that is
  a row of fields (a list) gives the field at ``text_field`` when that is set; when it is
  None, the *last* string field of the row, not counting a final ``"training"`` field (the
  constant last column of Sentiment140 rows ``[tweet_id, date, "NO_QUERY", user, text,
  "training"]``, so for Sent140 this is index 4, the tweet). A row without such a field, or
  whose ``text_field`` is missing or not a string, is an error naming the file, user and row.
* **Kind of an entry** (for ``features=auto``): text when it is a string or a row holding a
  string, numeric otherwise. One user's rows must all be of one kind.
* **Words.** The text is lower-cased and split into maximal runs of letters and digits
  (regex ``[^\\W_]+``): ``"Don't STOP-me_now!"`` gives ``don t stop me now``.
* **Vocabulary.** The ``vocab_size`` most frequent words of the *train* texts (counting
  every occurrence), ties broken alphabetically, most frequent first; every word when there
  are fewer. Words outside it are out of vocabulary (OOV).
* **Bag of words.** A float32 vector of ``len(vocab) + 1`` raw counts: position ``r`` counts
  the vocabulary's word ``r``, the last position counts the OOV words.
* **Token ids.** int64, ``seq_len`` per text: word ``r`` of the vocabulary is id ``r + 1``,
  an OOV word is ``len(vocab) + 1``, and ``0`` is padding. The first ``seq_len`` words are
  kept; shorter texts are padded with 0 at the end. A model embeds ``len(vocab) + 2`` ids.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np

__all__ = [
    "SENT140_LAST_FIELD",
    "bag_of_words",
    "build_vocab",
    "encode_texts",
    "entry_text",
    "record_kind",
    "record_texts",
    "token_ids",
    "tokenize",
]

SENT140_LAST_FIELD = "training"
"""The constant last field of Sentiment140 rows; never taken as the text by default."""

_WORD = re.compile(r"[^\W_]+")


def tokenize(text: str) -> list[str]:
    """The words of ``text``: lower-cased runs of letters and digits."""
    return _WORD.findall(text.lower())


def entry_text(entry: Any, text_field: int | None) -> str:
    """The text of one ``x`` entry (see the module docstring); ValueError says what is wrong."""
    if isinstance(entry, str):
        return entry
    if not isinstance(entry, list):
        raise ValueError(f"is {type(entry).__name__}, expected a text or a row of fields")
    if text_field is not None:
        if text_field >= len(entry):
            raise ValueError(f"has {len(entry)} fields, no data.text_field={text_field}")
        value = entry[text_field]
        if not isinstance(value, str):
            raise ValueError(f"field {text_field} is {value!r}, not text (data.text_field)")
        return value
    last = len(entry) - 1
    for i in range(last, -1, -1):
        value = entry[i]
        if isinstance(value, str) and not (i == last and value == SENT140_LAST_FIELD):
            return value
    raise ValueError(
        f"has no text field (a string other than a final {SENT140_LAST_FIELD!r}); "
        "set data.text_field=INDEX or data.features=numeric"
    )


def record_texts(where: str, x: Sequence[Any], text_field: int | None) -> list[str]:
    """The texts of one user's ``x`` entries; errors name ``where`` and the entry."""
    texts = []
    for j, entry in enumerate(x):
        try:
            texts.append(entry_text(entry, text_field))
        except ValueError as e:
            raise ValueError(f"{where}: x[{j}] {e}") from None
    return texts


def _is_text(entry: Any) -> bool:
    return isinstance(entry, str) or (
        isinstance(entry, list) and any(isinstance(v, str) for v in entry)
    )


def record_kind(where: str, x: Sequence[Any]) -> Literal["numeric", "text"]:
    """Whether one user's ``x`` holds numeric feature rows or text; a mix is a ValueError."""
    try:
        if np.asarray(x).dtype.kind in "biuf":
            return "numeric"
    except ValueError:  # ragged rows: look at them one by one
        pass
    text = [_is_text(entry) for entry in x]
    if all(text):
        return "text"
    if not any(text):
        return "numeric"
    raise ValueError(
        f"{where}: x mixes numeric rows (x[{text.index(False)}]) and text rows "
        f"(x[{text.index(True)}]); a LEAF set holds one kind"
    )


def build_vocab(texts: Iterable[str], vocab_size: int) -> list[str]:
    """The ``vocab_size`` most frequent words of ``texts``, ties alphabetical."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    counts = Counter(word for text in texts for word in tokenize(text))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [word for word, _ in ranked[:vocab_size]]


def bag_of_words(texts: Sequence[str], vocab: Sequence[str]) -> np.ndarray:
    """Word counts, float32 (len(texts), len(vocab) + 1); the last column counts OOV words."""
    index = {word: r for r, word in enumerate(vocab)}
    oov = len(vocab)
    out = np.zeros((len(texts), len(vocab) + 1), dtype=np.float32)
    for i, text in enumerate(texts):
        for word in tokenize(text):
            out[i, index.get(word, oov)] += 1
    return out


def token_ids(texts: Sequence[str], vocab: Sequence[str], seq_len: int) -> np.ndarray:
    """Word ids, int64 (len(texts), seq_len): vocabulary word r is r + 1, OOV len(vocab) + 1,
    padding 0 at the end; the first ``seq_len`` words of each text are kept."""
    index = {word: r + 1 for r, word in enumerate(vocab)}
    oov = len(vocab) + 1
    out = np.zeros((len(texts), seq_len), dtype=np.int64)
    for i, text in enumerate(texts):
        ids = [index.get(word, oov) for word in tokenize(text)[:seq_len]]
        out[i, : len(ids)] = ids
    return out


def encode_texts(
    where: str,
    mode: Literal["bag_of_words", "token_ids"],
    train: Sequence[str],
    test: Sequence[str] | None,
    vocab_size: int,
    seq_len: int,
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Model inputs of the train and test texts with the train texts' vocabulary, and the
    number of token ids (``len(vocab) + 2`` for token_ids, 0 for bag_of_words).

    ``where`` names the train texts in the error raised when they hold no word at all."""
    vocab = build_vocab(train, vocab_size)
    if not vocab:
        raise ValueError(f"{where} hold no words (runs of letters or digits)")
    if mode == "token_ids":
        x_test = None if test is None else token_ids(test, vocab, seq_len)
        return token_ids(train, vocab, seq_len), x_test, len(vocab) + 2
    return bag_of_words(train, vocab), None if test is None else bag_of_words(test, vocab), 0
