from typing import Literal

import pytest

from vaekit.errors import ConfigError, UnknownPluginError
from vaekit.registry import PluginSpec, Registry, coerce


def test_spec_parsing_joins_list_values():
    spec = PluginSpec.parse("conv:channels=32,64,hidden=128")
    assert spec.name == "conv"
    assert spec.options == {"channels": "32,64", "hidden": "128"}
    assert str(spec) == "conv:channels=32,64,hidden=128"


def test_spec_from_table():
    spec = PluginSpec.parse({"name": "mlp", "hidden": [10, 20]})
    assert spec == PluginSpec("mlp", {"hidden": [10, 20]})


@pytest.mark.parametrize("bad", [":x=1", "conv:32", "conv:=3"])
def test_spec_parse_errors(bad):
    with pytest.raises(ConfigError):
        PluginSpec.parse(bad)


class Thing:
    """A thing.

    :param width: how wide.
    """

    def __init__(self, input_shape, *, width: int = 3, ratio: float = 0.5, flag: bool = False,
                 sizes: tuple[int, ...] = (1, 2), mode: Literal["a", "b"] = "a"):
        self.args = dict(input_shape=input_shape, width=width, ratio=ratio, flag=flag, sizes=sizes, mode=mode)


def test_options_come_from_keyword_only_parameters():
    reg = Registry("encoder")
    reg.register("thing", Thing)
    info = reg.get("thing")
    assert list(info.options) == ["width", "ratio", "flag", "sizes", "mode"]
    assert info.options["width"].help == "how wide."
    assert info.summary == "A thing."
    built = reg.build(PluginSpec.parse("thing:width=7,flag=true,sizes=4,5,6,mode=b"), input_shape=(1,))
    assert built.args == dict(input_shape=(1,), width=7, ratio=0.5, flag=True, sizes=(4, 5, 6), mode="b")


def test_duplicate_name_names_both_owners():
    reg = Registry("encoder")
    reg.owner = "first-dist"
    reg.register("thing", Thing)
    reg.owner = "second-dist"
    with pytest.raises(ValueError, match="first-dist.*second-dist"):
        reg.register("thing", Thing)


def test_unknown_name_lists_known_and_closest():
    reg = Registry("prior")
    reg.register("gaussian", Thing)
    reg.register("none", Thing)
    with pytest.raises(UnknownPluginError) as e:
        reg.get("gausian")
    assert "known priors: gaussian, none" in str(e.value)
    assert "did you mean 'gaussian'" in str(e.value)


def test_unknown_option_and_bad_value():
    reg = Registry("encoder")
    reg.register("thing", Thing)
    with pytest.raises(ConfigError, match="no option 'widht'.*did you mean 'width'"):
        reg.resolve_options(PluginSpec.parse("thing:widht=3"))
    with pytest.raises(ConfigError, match="option 'width'"):
        reg.resolve_options(PluginSpec.parse("thing:width=wide"))
    with pytest.raises(ConfigError, match="one of a, b"):
        reg.resolve_options(PluginSpec.parse("thing:mode=c"))


def test_option_without_default_is_rejected():
    def factory(*, needed: int):
        return needed

    with pytest.raises(ValueError, match="needs a default"):
        Registry("dataset").register("x", factory)


@pytest.mark.parametrize(
    "value,typ,expected",
    [("3", int, 3), (3.0, int, 3), ("1e-3", float, 1e-3), ("off", bool, False), ([1, 2], tuple[int, ...], (1, 2)),
     ("none", int | None, None), ("5", int | None, 5)],
)
def test_coerce(value, typ, expected):
    assert coerce(value, typ) == expected


@pytest.mark.parametrize("value,typ", [("2.5", int), (True, int), ("maybe", bool), ("x", float)])
def test_coerce_errors(value, typ):
    with pytest.raises(ConfigError):
        coerce(value, typ)
