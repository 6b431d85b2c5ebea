"""The loss sections and the families they build: each parameter is declared once, in the config section, and
reaches the family's constructor argument of the same name (``build_loss`` is generic); the defaults agree; the
one experiment-dependent value (``relevance: auto``) is resolved by the section's hook; and a family registered
later brings its own section, selectable by ``loss.family`` like the built-in ones."""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Mapping
from typing import Literal

import pytest
import torch

import methods
from methods import EmbeddingBatch, LossOutput
from methods import registry as family_registry
from methods.families import ITR_TEMPERATURE, LossFamily, build_temperature
from orchestrator.config import (
    LossSection,
    PositiveFloat,
    RelevanceLossSection,
    TemperatureConfig,
    loss_families,
    register_loss_section,
    validate_config,
)
from orchestrator.errors import UserError
from orchestrator.losses import build_loss

#: the families' Temperature modules, by the section field that configures them (state_dict names kept)
TEMPERATURE_MODULES = {
    "temperature": "tau",
    "csa_temperature": "csa_tau",
    "usa_image_temperature": "usa_image_tau",
    "usa_text_temperature": "usa_text_tau",
}
#: attributes named unlike their field
ATTRIBUTE = {"relevance": "relevance_source"}
TEACHERS = {"image": "synthetic:attributes", "text": "synthetic:attributes"}


def section_class(family: str) -> type[LossSection]:
    return type(validate_config({"loss": {"family": family}, "teachers": TEACHERS}).loss)


@pytest.mark.parametrize("family", loss_families())
def test_section_fields_are_the_constructor_arguments_with_the_same_defaults(family):
    """Every field but ``family`` is a constructor argument of the same name; their defaults are equal (a
    temperature: the mapping of its fields), except ``relevance``, whose ``auto`` the experiment resolves."""
    params = inspect.signature(family_registry.family_class(family)).parameters
    defaults = section_class(family)().model_dump(exclude={"family"})
    assert defaults, family
    for name, value in defaults.items():
        assert name in params, f"{family}: field {name} is no argument of the family"
        if name == "relevance":
            assert value == "auto" and params[name].default in {"exact", "teacher"}
            continue
        default = params[name].default
        assert (dict(default) if isinstance(default, Mapping) else default) == value, (family, name)


def test_every_registered_family_has_a_section():
    assert set(loss_families()) == set(methods.families()) == {"infonce", "triplet", "listwise", "bcls", "cusa"}


#: for each family, every field set to a valid value other than its default
NON_DEFAULT = {
    "infonce": {
        "temperature": {"init": 0.07, "min": 0.02, "max": 0.2, "learnable": False},
        "reduction": "class_mean",
        "multi_positive": False,
    },
    "triplet": {"margin": 0.3, "mining": "selhn", "soft_negative_tau": 0.2, "selhn_eps": 0.05, "multi_positive": False},
    "listwise": {
        "weight": 0.3,
        "tau": 0.05,
        "margin": 0.25,
        "mining": "soft_negative",
        "t2i_relevance": "as_released",
        "relevance": "teacher",
        "rescale": False,
        "chunk_size": 8,
        "kernel": "torch",
        "multi_positive": False,
    },
    "bcls": {
        "margin": 0.15,
        "mining": "hardest",
        "soft_negative_tau": 0.1,
        "kendall_weight": 0.5,
        "gap": 0.1,
        "surrogate": "tanh",
        "surrogate_temperature": 0.3,
        "window": 4,
        "hard_k": 3,
        "t2i_relevance": "as_released",
        "relevance": "teacher",
        "rescale": True,
        "chunk_size": 16,
        "kernel": "torch",
        "multi_positive": False,
    },
    "cusa": {
        "temperature": {"init": 0.06, "min": 0.02, "max": 0.3, "learnable": False},
        "reduction": "sum",
        "alpha": 0.2,
        "beta": 0.7,
        "csa_temperature": {"init": 0.5, "min": 0.2, "max": 0.9, "learnable": False},
        "usa_image_temperature": {"init": 0.3, "min": 0.25, "max": 0.8, "learnable": True},
        "usa_text_temperature": {"init": 0.6, "min": 0.15, "max": 0.7, "learnable": False},
        "teacher_temperature": 0.8,
        "csa_mode": "dot",
        "multi_positive": False,
    },
}


def test_the_non_default_values_cover_every_field():
    for family in loss_families():
        assert set(NON_DEFAULT[family]) == set(section_class(family).model_fields) - {"family"}, family


@pytest.mark.parametrize("family", sorted(NON_DEFAULT))
def test_build_loss_gives_the_family_every_field(family):
    """Each non-default value is what the built module holds (a temperature: its init, clamp and learnability)."""
    values = NON_DEFAULT[family]
    default = section_class(family)().model_dump(exclude={"family"})
    assert all(values[k] != default[k] for k in values), "a value equal to its default proves nothing"
    cfg = validate_config(
        {"loss": {"family": family, **values}, "teachers": TEACHERS, "train": {"batch_sampler": "unique_images"}}
    )
    module = build_loss(cfg)
    assert type(module) is family_registry.family_class(family)
    for name, value in values.items():
        if name in TEMPERATURE_MODULES:
            tau = getattr(module, TEMPERATURE_MODULES[name])
            assert (float(tau.value.detach()), tau.low, tau.high, tau.value.requires_grad) == pytest.approx(
                (value["init"], value["min"], value["max"], value["learnable"]), rel=1e-6
            ), name
        else:
            assert getattr(module, ATTRIBUTE.get(name, name)) == value, name


@pytest.mark.parametrize("family", ["listwise", "bcls"])
@pytest.mark.parametrize(
    "relevance,text_teacher,data,resolved",
    [
        ("auto", None, "synthetic", "exact"),
        ("auto", "synthetic:attributes", "synthetic", "teacher"),
        ("teacher", "synthetic:attributes", "synthetic", "teacher"),
        ("exact", None, "synthetic", "exact"),
    ],
)
def test_relevance_auto_is_resolved_from_the_experiment(family, relevance, text_teacher, data, resolved):
    cfg = validate_config(
        {
            "loss": {"family": family, "relevance": relevance},
            "teachers": {"text": text_teacher},
            "data": {"format": data},
        }
    )
    assert isinstance(cfg.loss, RelevanceLossSection)
    assert cfg.loss.relevance == relevance  # the config keeps what was written
    assert cfg.relevance_source == resolved == cfg.loss.family_kwargs(cfg)["relevance"]
    assert build_loss(cfg).relevance_source == resolved


def test_family_kwargs_are_the_fields_by_name():
    cfg = validate_config({"loss": {"family": "infonce", "reduction": "class_mean"}})
    assert cfg.loss.family_kwargs(cfg) == {
        "multi_positive": True,
        "reduction": "class_mean",
        "temperature": {"init": 0.05, "min": 0.01, "max": 0.10, "learnable": True},
    }


def test_a_temperature_spec_with_a_missing_or_unknown_key_is_refused():
    with pytest.raises(ValueError, match=r"missing \['max'\], unknown \['maximum'\]"):
        build_temperature({"init": 0.1, "min": 0.05, "maximum": 0.2})
    assert build_temperature({"init": 0.1, "min": 0.05, "max": 0.2}).value.requires_grad  # learnable by default


# ------------------------------------------------------------------------- a family registered later
class DiagonalHinge(LossFamily):
    """mean over i != j of relu(margin + S_ij / tau - S_ii / tau), images as queries: a family for the test."""

    TERMS = ("hinge",)

    def __init__(self, margin: float = 0.1, temperature=ITR_TEMPERATURE, multi_positive: bool = True) -> None:
        super().__init__(multi_positive)
        self.margin = margin
        self.tau = build_temperature(temperature)

    def forward(self, batch: EmbeddingBatch) -> LossOutput:
        S = batch.similarity() / self.tau()
        hinge = (self.margin + S - S.diagonal()[:, None]).clamp_min(0)
        off = ~torch.eye(len(S), dtype=torch.bool)
        loss = hinge[off].mean()
        return LossOutput(total=loss, terms={"hinge": loss.detach()})


class DiagonalHingeLoss(LossSection):
    """The section of :class:`DiagonalHinge`."""

    family: Literal["diagonal_hinge"] = "diagonal_hinge"
    margin: PositiveFloat = 0.1
    temperature: TemperatureConfig = TemperatureConfig(init=0.5, min=0.1, max=1.0)


@contextlib.contextmanager
def registered_diagonal_hinge():
    """``diagonal_hinge`` registered as a family and a section; both registries as they were afterwards."""
    sections = importlib.import_module(register_loss_section.__module__)
    saved_sections, saved_families = dict(sections._LOSS_SECTIONS), dict(family_registry._FAMILIES)
    try:
        family_registry.register("diagonal_hinge")(DiagonalHinge)
        register_loss_section(DiagonalHingeLoss)
        yield
    finally:
        sections._LOSS_SECTIONS.clear()
        sections._LOSS_SECTIONS.update(saved_sections)
        family_registry._FAMILIES.clear()
        family_registry._FAMILIES.update(saved_families)
        for rebuild in sections._ON_REGISTER:
            rebuild()


def naive_diagonal_hinge(image: list[list[float]], text: list[list[float]], margin: float, tau: float) -> float:
    B = len(image)
    S = [[sum(a * b for a, b in zip(image[i], text[j])) / tau for j in range(B)] for i in range(B)]
    terms = [max(0.0, margin + S[i][j] - S[i][i]) for i in range(B) for j in range(B) if i != j]
    return sum(terms) / len(terms)


def test_a_family_registered_later_is_configured_by_its_own_section():
    with registered_diagonal_hinge():
        assert loss_families()[-1] == "diagonal_hinge"
        cfg = validate_config(
            {"loss": {"family": "diagonal_hinge", "margin": 0.3, "temperature": {"init": 0.2, "min": 0.1, "max": 1.0}}}
        )
        assert isinstance(cfg.loss, DiagonalHingeLoss)
        assert cfg.model_dump(mode="json")["loss"] == {
            "family": "diagonal_hinge",
            "multi_positive": True,
            "margin": 0.3,
            "temperature": {"init": 0.2, "min": 0.1, "max": 1.0, "learnable": True},
        }
        module = build_loss(cfg).double()
        g = torch.Generator().manual_seed(3)
        image = torch.nn.functional.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=-1)
        text = torch.nn.functional.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=-1)
        out = module(EmbeddingBatch(image_emb=image, text_emb=text, image_ids=torch.arange(5)))
        tau = float(module.tau.value.detach())  # 0.2 as the float32 parameter held it before .double()
        assert tau == pytest.approx(0.2, rel=1e-7) and module.margin == 0.3
        assert float(out.total.detach()) == pytest.approx(
            naive_diagonal_hinge(image.tolist(), text.tolist(), 0.3, tau), rel=1e-12
        )

        # its fields are checked like the built-in ones, errors name them; the shared flag works for it too
        for loss, field, needle in [
            ({"margin": -1}, "loss.margin", "greater than 0"),
            ({"margin_typo": 1}, "loss.margin_typo", "unknown key"),
            ({"temperature": {"init": 2.0, "min": 0.1, "max": 1.0}}, "loss.temperature.init", "outside [min, max]"),
        ]:
            with pytest.raises(UserError) as err:
                validate_config({"loss": {"family": "diagonal_hinge", **loss}})
            assert err.value.field == field and needle in err.value.detail, err.value
        with pytest.raises(UserError, match="loss 'diagonal_hinge' has multi_positive=false"):
            validate_config(
                {"loss": {"family": "diagonal_hinge", "multi_positive": False}, "train": {"batch_sampler": "random"}}
            )
        with pytest.raises(
            UserError, match="expected tags: 'infonce', 'triplet', 'listwise', 'bcls', 'cusa', 'diagonal_hinge'"
        ):
            validate_config({"loss": {"family": "nope"}})

    # gone again: the registries and ExperimentConfig are as before
    assert "diagonal_hinge" not in loss_families() and "diagonal_hinge" not in methods.families()
    with pytest.raises(UserError, match="expected tags: 'infonce', 'triplet', 'listwise', 'bcls', 'cusa'"):
        validate_config({"loss": {"family": "diagonal_hinge"}})


def test_a_section_registered_twice_or_without_its_family_name_is_refused():
    class Nameless(LossSection):
        family: str = ""

    with pytest.raises(ValueError, match="needs its family name as the default"):
        register_loss_section(Nameless)
    with pytest.raises(ValueError, match="'infonce' registered twice"):
        register_loss_section(section_class("infonce"))


def test_a_registered_class_that_is_not_a_loss_family_is_refused_naming_it():
    """The loop reads ``requires``, ``check_inputs`` and the terms of a LossFamily: build_loss says so up front."""

    class PlainModule(torch.nn.Module):
        def __init__(self, **params) -> None:
            super().__init__()

    with registered_diagonal_hinge():
        family_registry._FAMILIES["diagonal_hinge"] = PlainModule
        cfg = validate_config({"loss": {"family": "diagonal_hinge"}})
        with pytest.raises(TypeError, match="loss family 'diagonal_hinge' builds a PlainModule, not a LossFamily"):
            build_loss(cfg)
