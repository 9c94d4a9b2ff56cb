"""scikit-learn digits, through sklearn and through the staged digits.csv.gz."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from roost.data import build_dataset
from roost.data.digits import DigitsConfig, load_digits_data, read_digits_csv
from roost.registry import ConfigError

SHARED = (Path(__file__).parents[2] / "../shared/data").resolve()
DIGITS_CSV = SHARED / "sklearn_digits" / "digits.csv.gz"

# Class sizes of the 1,797 digits (PROVENANCE.md: 174-183 per class).
CLASS_SIZES = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_sklearn_digits_split() -> None:
    pytest.importorskip("sklearn")
    data = load_digits_data(DigitsConfig(), seed=0)
    assert data.test is not None
    assert len(data.train) + len(data.test) == 1797
    # stratified: each class sends round(0.2 * size) to test, 36+36+35+37+36+36+36+36+35+36
    assert np.bincount(data.test.y.numpy()).tolist() == [round(0.2 * c) for c in CLASS_SIZES]
    assert len(data.test) == 359
    assert data.train.x.shape == (1438, 1, 8, 8) and data.train.x.dtype == torch.float32
    assert float(data.train.x.max()) == 1.0 and float(data.train.x.min()) == 0.0
    assert data.info.input_shape == (1, 8, 8) and data.info.num_classes == 10
    assert data.groups is None
    other = load_digits_data(DigitsConfig(), seed=1)
    assert other.test is not None and not torch.equal(other.test.x, data.test.x)
    plain = load_digits_data(DigitsConfig(stratify=False, test_fraction=0.5), seed=0)
    assert plain.test is not None and len(plain.test) == 898  # round(0.5 * 1797), half to even
    whole = load_digits_data(DigitsConfig(test_fraction=0), seed=0)
    assert whole.test is None and len(whole.train) == 1797


def test_csv_matches_sklearn() -> None:
    if not DIGITS_CSV.is_file():
        pytest.skip(f"{DIGITS_CSV} not present")
    pixels, labels = read_digits_csv(DIGITS_CSV)
    assert pixels.shape == (1797, 64) and np.bincount(labels).tolist() == CLASS_SIZES
    from_csv = load_digits_data(DigitsConfig(path=str(DIGITS_CSV)), seed=0)
    pytest.importorskip("sklearn")
    from_sklearn = load_digits_data(DigitsConfig(), seed=0)
    assert torch.equal(from_csv.train.x, from_sklearn.train.x)
    assert from_csv.test is not None and from_sklearn.test is not None
    assert torch.equal(from_csv.test.y, from_sklearn.test.y)


def test_malformed_csv(tmp_path: Path) -> None:
    bad = tmp_path / "digits.csv"
    bad.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match=r"digits.csv: expected rows of 65 columns"):
        read_digits_csv(bad)
    bad.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"digits.csv: not a digits CSV"):
        read_digits_csv(bad)


def test_config_errors() -> None:
    with pytest.raises(ConfigError) as e:
        build_dataset("digits", {"path": "/no/digits.csv.gz"}, "iid", {}, 5, 0)
    assert e.value.key == "data.path"
    with pytest.raises(ConfigError) as e:
        build_dataset("digits", {"test_fraction": 1.5}, "iid", {}, 5, 0)
    assert e.value.key == "data.test_fraction"
    with pytest.raises(ConfigError) as e:
        build_dataset("digits", {"bogus": 1}, "iid", {}, 5, 0)
    assert e.value.key == "data.bogus" and "path" in str(e.value)


def test_missing_sklearn_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn` fail
    with pytest.raises(ImportError, match=r"pip install 'roost\[data\]'"):
        load_digits_data(DigitsConfig(), seed=0)
    if DIGITS_CSV.is_file():  # the csv path needs no sklearn
        assert len(load_digits_data(DigitsConfig(path=str(DIGITS_CSV)), seed=0).train) == 1438


def test_import_does_not_load_sklearn() -> None:
    code = "import sys, roost.data; print('sklearn' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
