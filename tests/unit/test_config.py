"""Presets, files and overrides resolve to one validated tree; bad input says what is wrong."""

import json

import pytest

from roost.config import (
    ConfigFileError,
    apply_overrides,
    load_config_source,
    resolve,
)
from roost.registry import ConfigError


def test_override_selects_component_and_sets_its_fields():
    tree = apply_overrides(
        load_config_source("quickstart"), ["algorithm=fedprox", "algorithm.mu=0.01", "rounds=3"]
    )
    cfg = resolve(tree)
    assert cfg.name("algorithm") == "fedprox"
    assert cfg.config("algorithm").mu == 0.01
    # quickstart's lr 0.1 belonged to fedavg; switching algorithm starts from its defaults
    assert cfg.config("algorithm").lr == type(cfg.config("algorithm"))().lr
    assert cfg.run.rounds == 3


def test_setting_a_field_keeps_the_presets_other_fields():
    cfg = resolve(apply_overrides(load_config_source("quickstart"), ["algorithm.lr=0.3"]))
    assert (cfg.config("algorithm").lr, cfg.config("algorithm").batch_size) == (0.3, 10)


def test_resolved_tree_round_trips_through_json():
    cfg = resolve(load_config_source("w1"))
    again = resolve(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["roundz=3"], "roundz=3: unknown key; allowed:"),
        (["rounds=0"], "rounds=0: must be >= 1"),
        (["algorithm=fedfoo"], "algorithm=fedfoo: allowed: ditto, fedadagrad, fedadam, fedavg"),
        (["model.hidden=abc"], "model.hidden=abc: expected an integer"),
        (["rounds"], "rounds=: expected KEY=VALUE"),
        (["optimizer.lr=1"], "optimizer.lr=1: unknown section 'optimizer'"),
    ],
)
def test_bad_overrides_raise_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        resolve(apply_overrides(load_config_source("quickstart"), overrides))
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_toml_file_with_preset_base_and_component_table(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('preset = "w1"\nrounds = 2\n[algorithm]\nname = "fedprox"\nmu = 0.1\n')
    cfg = resolve(load_config_source(str(f)))
    assert (cfg.run.rounds, cfg.run.clients, cfg.name("algorithm")) == (2, 1000, "fedprox")
    assert cfg.config("algorithm").mu == 0.1


def test_yaml_and_json_files(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("rounds: 4\nclients: 20\nmodel: cnn\ndata: digits\npartition: iid\n")
    assert resolve(load_config_source(str(y))).name("model") == "cnn"
    j = tmp_path / "run.json"
    j.write_text(json.dumps({"rounds": 4, "clients": 20, "partition": {"name": "iid"}}))
    assert resolve(load_config_source(str(j))).run.clients == 20


def test_file_parse_errors_say_where(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = 3\nclients = = 4\n")
    with pytest.raises(ConfigFileError, match=r"bad.toml: invalid TOML: .*line 2"):
        load_config_source(str(bad))
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("rounds: 3\nmodel: [mlp\n")
    with pytest.raises(ConfigFileError, match=r"bad.yaml: invalid YAML: line \d+, column"):
        load_config_source(str(bad_yaml))


def test_missing_source_lists_presets():
    with pytest.raises(ConfigError, match="no such preset or file; presets: quickstart, w1, w2"):
        load_config_source("nonexistent-preset")
