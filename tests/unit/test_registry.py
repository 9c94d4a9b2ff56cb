"""Config coercion and validation errors name the key, the value and what is allowed."""

from dataclasses import dataclass
from typing import Literal

import pytest

from roost.registry import ConfigError, Registry, build_config, check


@dataclass(frozen=True)
class Demo:
    rate: float = 0.1
    steps: int = 3
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    widths: tuple[int, ...] = (1, 2)
    limit: float | None = None

    def __post_init__(self) -> None:
        check(self.rate > 0, "rate", self.rate, "must be > 0")


def test_strings_from_the_command_line_are_coerced_to_field_types():
    cfg = build_config(
        Demo,
        {
            "rate": "0.5",
            "steps": "7",
            "flag": "true",
            "mode": "b",
            "widths": "4,5",
            "limit": "none",
        },
        "demo",
    )
    assert cfg == Demo(0.5, 7, True, "b", (4, 5), None)


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ConfigError) as e:
        build_config(Demo, {"rte": "1"}, "demo")
    assert (
        str(e.value) == "demo.rte=1: unknown key; allowed: flag, limit, mode, rate, steps, widths"
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"steps": "1.5"}, "demo.steps=1.5: expected an integer"),
        ({"flag": "maybe"}, "demo.flag=maybe: expected true or false"),
        ({"mode": "c"}, "demo.mode=c: allowed: a, b"),
        ({"rate": "-1"}, "demo.rate=-1: must be > 0"),
    ],
)
def test_bad_values_name_key_value_and_rule(values, message):
    with pytest.raises(ConfigError) as e:
        build_config(Demo, values, "demo")
    assert str(e.value) == message


def test_registry_unknown_name_lists_names():
    reg: Registry[object] = Registry("thing")
    reg.register("one", Demo)(object)
    reg.register("two", Demo)(object)
    with pytest.raises(ConfigError, match=r"^thing=three: allowed: one, two$"):
        reg.get("three")
