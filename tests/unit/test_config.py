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
    # quickstart's tuned local training (lr 0.2, batch 10, 5 epochs) survives the switch:
    # fedprox takes the same three parameters
    alg = cfg.config("algorithm")
    assert (alg.lr, alg.batch_size, alg.local_epochs) == (0.2, 10, 5)
    assert cfg.run.rounds == 3
    assert cfg.notes == ()


def test_switching_drops_only_what_the_new_choice_does_not_take_and_says_so():
    cfg = resolve(
        apply_overrides(
            load_config_source("quickstart"),
            ["algorithm=fedprox", "algorithm.mu=0.1", "algorithm=fedadam", "model=cnn"],
        )
    )
    alg = cfg.config("algorithm")
    assert (cfg.name("algorithm"), alg.lr, alg.batch_size, alg.local_epochs) == (
        "fedadam",
        0.2,
        10,
        5,
    )
    # mlp's hidden=(64,) is not a width cnn takes (one int): dropped, cnn keeps 512
    assert cfg.config("model").hidden == 512
    assert cfg.notes == (
        "algorithm=fedadam does not take mu=0.1 (set for fedprox); dropped",
        "model=cnn does not take hidden=[64] (set for mlp); dropped",
    )


def test_a_field_set_after_the_switch_is_the_users_not_carried():
    # a carried value is replaced by an explicit one; an explicit bad value still errors
    cfg = resolve(
        apply_overrides(load_config_source("quickstart"), ["model=cnn", "model.hidden=128"])
    )
    assert cfg.config("model").hidden == 128 and cfg.notes == ()
    with pytest.raises(ConfigError, match=r"model.hidden=64,64: expected an integer"):
        resolve(
            apply_overrides(load_config_source("quickstart"), ["model=cnn", "model.hidden=64,64"])
        )


def test_runtime_field_set_before_selecting_the_runtime_survives():
    cfg = resolve(
        apply_overrides(load_config_source("quickstart"), ["runtime.device=cpu", "runtime=workers"])
    )
    assert (cfg.name("runtime"), cfg.config("runtime").device) == ("workers", "cpu")


def _leaf_folder(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        data = {
            "users": ["a", "b", "c"],
            "num_samples": [2, 2, 2],
            "user_data": {u: {"x": [[0.0, 1.0], [1.0, 0.0]], "y": [0, 1]} for u in "abc"},
        }
        (tmp_path / split / "d.json").write_text(json.dumps(data))
    return tmp_path


def test_data_with_natural_clients_gets_them_on_a_preset(tmp_path):
    leaf = _leaf_folder(tmp_path)
    cfg = resolve(
        apply_overrides(load_config_source("quickstart"), ["data=leaf", f"data.path={leaf}"])
    )
    # quickstart's dirichlet into 100 clients is replaced by one client per writer
    assert (cfg.name("partition"), cfg.run.clients) == ("natural", None)
    assert cfg.notes == (
        "data=leaf has natural clients, so the run uses partition=natural (not dirichlet) "
        "and every natural client (not clients=100); set partition= or clients= to choose "
        "otherwise",
    )


@pytest.mark.parametrize(
    ("extra", "partition", "clients"),
    [
        (["clients=2"], "natural", 2),  # the user's clients, natural partition
        (["partition=iid"], "iid", 100),  # the user's partition keeps the preset's clients
        (["partition=dirichlet"], "dirichlet", 100),
    ],
)
def test_natural_data_follows_only_what_the_user_left_open(tmp_path, extra, partition, clients):
    leaf = _leaf_folder(tmp_path)
    tree = apply_overrides(load_config_source("quickstart"), [*extra, "data=leaf"])
    cfg = resolve(apply_overrides(tree, [f"data.path={leaf}"]))
    assert (cfg.name("partition"), cfg.run.clients) == (partition, clients)


def test_data_without_natural_clients_keeps_the_presets_partition(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"")  # never read: resolve only
    cfg = resolve(
        apply_overrides(load_config_source("quickstart"), ["data=mnist", f"data.path={tmp_path}"])
    )
    assert (cfg.name("partition"), cfg.run.clients, cfg.notes) == ("dirichlet", 100, ())


def test_file_on_a_preset_switches_by_the_same_rules(tmp_path):
    leaf = _leaf_folder(tmp_path / "leaf") if (tmp_path / "leaf").mkdir() is None else None
    f = tmp_path / "run.toml"
    f.write_text(
        f'preset = "quickstart"\nalgorithm = "fedprox"\n[data]\nname = "leaf"\npath = "{leaf}"\n'
    )
    cfg = resolve(load_config_source(str(f)))
    assert (cfg.config("algorithm").lr, cfg.name("partition"), cfg.run.clients) == (
        0.2,
        "natural",
        None,
    )


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
        (
            ["algorithm=fedfoo"],
            "algorithm=fedfoo: allowed: amble, deprune, ditto, fedadagrad, fedadam",
        ),
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
