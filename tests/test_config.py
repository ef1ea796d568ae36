"""The typed YAML config loader: unknown keys, wrong types, ranges and combinations are errors
that name the key."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from mg_ray.config import ConfigError, apply_overrides, check, flatten, from_mapping, to_dict
from mg_ray.train.config import load_config


@dataclass
class Inner:
    rate: float = 0.1
    mode: Literal["a", "b"] = "a"
    sizes: tuple[int, int] = (1, 2)

    def validate(self):
        check(self.rate > 0, "rate", "a number > 0", self.rate)


@dataclass
class Outer:
    name: str = "x"
    count: int = 1
    inner: Inner = field(default_factory=Inner)
    maybe: int | None = None


def test_defaults_and_nested_values():
    cfg = from_mapping(Outer, {"count": 3, "inner": {"rate": 2, "sizes": [3, 4]}})
    assert cfg.count == 3 and cfg.inner.rate == 2.0 and cfg.inner.sizes == (3, 4)
    assert to_dict(cfg) == {
        "name": "x",
        "count": 3,
        "inner": {"rate": 2.0, "mode": "a", "sizes": [3, 4]},
        "maybe": None,
    }


@pytest.mark.parametrize(
    "data, message",
    [
        ({"cuont": 1}, "cuont: unknown key; allowed keys are count, inner, maybe, name"),
        ({"count": "3"}, "count: expected an integer, got '3'"),
        ({"count": True}, "count: expected an integer, got True"),
        ({"inner": {"rate": -1}}, "inner.rate: expected a number > 0, got -1.0"),
        ({"inner": {"mode": "c"}}, "inner.mode: expected one of 'a', 'b', got 'c'"),
        ({"inner": {"sizes": [1]}}, "inner.sizes: expected a list of 2 items, got [1]"),
        ({"inner": {"bogus": 1}}, "inner.bogus: unknown key"),
        ({"maybe": "no"}, "maybe: expected an integer, got 'no'"),
    ],
)
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        from_mapping(Outer, data)
    assert message in str(err.value)


def test_yaml_file_errors_name_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: optim\.lr: expected a number > 0"):
        load_config(str(path), {})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"), {})
    path.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path), {})
    with pytest.raises(ConfigError, match="neither a YAML file nor a preset"):
        load_config("huge", {})


def test_overrides_and_flatten():
    data = apply_overrides({"inner": {"rate": 1}}, {"inner.mode": "b", "count": 2})
    assert data == {"inner": {"rate": 1, "mode": "b"}, "count": 2}
    assert flatten(data) == {"inner.rate": 1, "inner.mode": "b", "count": 2}


def test_a_fingerprint_counts_what_a_definition_sets_not_the_settings_it_leaves_default():
    from mg_ray.config import fingerprint
    from mg_ray.tune.space import Parameter, SearchSpace, StudySettings, definition_fingerprint

    @dataclass
    class Old:
        trials: int = 4
        parameters: dict = field(default_factory=dict)
        source: str = "<memory>"

    @dataclass
    class New(Old):  # a later mg-ray adds a setting, with a default
        tpe_startup_trials: int | None = None

    lr = {"optim.lr": Parameter("float", low=0.01, high=0.1, log=True)}
    assert fingerprint(Old(8, lr, "a.yaml")) == fingerprint(New(8, lr, "b.yaml"))
    assert fingerprint(New(8, lr)) != fingerprint(New(8, lr, tpe_startup_trials=3))
    assert fingerprint(Old(8, lr)) != fingerprint(Old(6, lr))
    wider = {"optim.lr": Parameter("float", low=0.01, high=0.2, log=True)}
    assert fingerprint(Old(8, lr)) != fingerprint(Old(8, wider))  # a searched range counts
    space = SearchSpace(parameters=lr)
    assert definition_fingerprint(space) == definition_fingerprint(
        SearchSpace(parameters=lr, study=StudySettings(num_trials=4))  # the default, written out
    )
