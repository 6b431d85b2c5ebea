"""The spec-file helper shared by configs, search spaces and recipes (orchestrator/spec_files.py): the strict base,
the name rule, the first pydantic error without pydantic's internal location steps, and ``file:line`` of a key."""

from __future__ import annotations

from typing import Annotated, Literal

import pytest
from pydantic import AfterValidator, Field, ValidationError

from orchestrator.errors import UserError
from orchestrator.spec_files import StrictModel, first_error, is_name, read_spec_file


def _even(v: int) -> int:
    if v % 2:
        raise ValueError(f"{v} is odd")
    return v


class Cat(StrictModel):
    kind: Literal["cat"] = "cat"
    lives: Annotated[int, AfterValidator(_even)] = 8


class Dog(StrictModel):
    kind: Literal["dog"] = "dog"
    bark: bool = True


class Home(StrictModel):
    pet: Annotated[Cat | Dog, Field(discriminator="kind")] = Cat()
    rooms: list[int] = []
    owner: str


def error_of(tree) -> ValidationError:
    with pytest.raises(ValidationError) as err:
        Home.model_validate(tree)
    return err.value


def test_union_tags_and_validator_steps_are_not_keys():
    err = error_of({"owner": "a", "pet": {"kind": "cat", "lives": 3}})
    assert err.errors()[0]["loc"] == ("pet", "cat", "lives")  # what pydantic reports
    first = first_error(err, union_tags={"pet": ("cat", "dog")})
    assert (first.loc, first.dotted, first.message, first.more) == (("pet", "lives"), "pet.lives", "3 is odd", 0)
    assert isinstance(first.cause, ValueError) and first.input == 3 and first.has_input
    assert first_error(err).loc == ("pet", "cat", "lives")  # without the tags: kept


def test_unknown_and_missing_keys_and_the_count_of_the_others():
    err = error_of({"pet": {"kind": "dog", "meow": 1}, "rooms": ["x", 2, "y"]})
    raw = err.errors()
    assert len(raw) == 4 and raw[0]["type"] == "extra_forbidden"
    first = first_error(err, union_tags={"pet": ("cat", "dog")})
    assert (first.dotted, first.message, first.counted("m")) == ("pet.meow", "unknown key", "m (+3 more)")
    missing = error_of({})
    assert first_error(missing).message == "required key missing"
    assert first_error(missing, missing=None).message == missing.errors()[0]["msg"] == "Field required"
    assert first_error(missing).counted("m") == "m"


def test_strict_models_refuse_unknown_keys():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Dog.model_validate({"bark": False, "wag": True})


@pytest.mark.parametrize(
    "text,ok",
    [
        ("smoke", True),
        ("a.b_c-1", True),
        ("9lives", True),
        (".hidden", False),
        ("..", False),
        ("a/b", False),
        ("", False),
        ("-x", False),
        ("a b", False),
    ],
)
def test_names(text, ok):
    assert is_name(text) is ok


def test_name_length_limit():
    assert is_name("a" * 100, 100) and not is_name("a" * 101, 100) and is_name("a" * 101)


def test_a_spec_file_names_the_line_of_a_key(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: x\nspace:\n  train.lr:\n    uniform: [1, 2]\n", encoding="utf-8")
    spec = read_spec_file(path, what="search space file")
    assert spec.tree == {"name": "x", "space": {"train.lr": {"uniform": [1, 2]}}} and spec.text.startswith("name")
    assert spec.where("space", "train.lr", "uniform") == f"{path}:4"
    assert spec.where("space", "train.lr", "grid") == f"{path}:3"  # the deepest key found
    assert spec.where() == spec.where("nope") == str(path)
    err = spec.fail("bad", ("space",), field="space")
    assert isinstance(err, UserError) and str(err) == f"{path}:2:space: bad"
    with pytest.raises(UserError, match="search space file not found"):
        read_spec_file(tmp_path / "missing.yaml", what="search space file")
