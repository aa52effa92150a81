"""Registry behaviour, and the error every kit registry gives for an unknown name."""

import pytest

from abd_plugin.kit.datasets import load_dataset
from abd_plugin.kit.models import get_model
from abd_plugin.kit.registry import Registry, UnknownNameError
from abd_plugin.kit.triggers import get_trigger


def make_registry() -> Registry:
    reg: Registry = Registry("widget", "widgets.names()")

    @reg.register("b")
    def _b(scale: int = 1) -> int:
        return 2 * scale

    @reg.register("a")
    def _a() -> str:
        return "a"

    return reg


def test_register_get_names():
    reg = make_registry()
    assert reg.names() == ["a", "b"]
    assert reg.get("a") == "a"
    assert reg.get("b", scale=5) == 10
    assert "a" in reg and "zzz" not in reg and len(reg) == 2


def test_duplicate_name_is_rejected():
    reg = make_registry()
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(lambda: None)


def test_unknown_name_lists_known_names_and_how_to_list():
    reg = make_registry()
    with pytest.raises(UnknownNameError) as info:
        reg.get("c")
    message = str(info.value)
    assert "'c'" in message and "a, b" in message and "widgets.names()" in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "call, known, hint",
    [
        (lambda: get_trigger("nope"), "badnet_grid", "list_triggers()"),
        (lambda: get_model("nope"), "wrn16_1", "list_models()"),
        (lambda: load_dataset("nope", "train"), "mnist5k", "list_datasets()"),
    ],
)
def test_kit_registries_raise_helpful_errors(call, known, hint):
    with pytest.raises(ValueError) as info:  # UnknownNameError is also a ValueError
        call()
    assert known in str(info.value) and hint in str(info.value)
