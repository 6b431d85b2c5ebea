"""The ``loss`` section: one section per registered ``methods`` loss family, chosen by ``loss.family``.

Each section's fields are the keyword arguments of its family's constructor, by name (``LossSection.family_kwargs``);
the sections are registered by family name (:func:`register_loss_section`), and ``ExperimentConfig.loss`` is the
discriminated union of the registered ones -- a family added later brings its own section the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, Union

from pydantic import Field, StrictBool, model_validator

from orchestrator.config.base import FieldError, NonNegFloat, PositiveFloat, PositiveInt, Section

if TYPE_CHECKING:
    from orchestrator.config.experiment import ExperimentConfig


class TemperatureConfig(Section):
    """A learnable (or fixed) softmax temperature, clamped to [min, max] before every forward pass."""

    init: PositiveFloat
    min: PositiveFloat
    max: PositiveFloat
    learnable: StrictBool = True

    @model_validator(mode="after")
    def _bounds(self) -> TemperatureConfig:
        if not self.min <= self.init <= self.max:
            raise FieldError("init", f"{self.init} is outside [min, max] = [{self.min}, {self.max}]")
        return self


class LossSection(Section):
    """Base of the ``loss`` sections, one per ``methods`` loss family, chosen by ``loss.family``.

    Each field is the keyword argument of the same name of the family's constructor: the family is built by
    ``methods.build(section.family, **section.family_kwargs(experiment))``. The one hook for values that depend
    on the rest of the experiment (``relevance: auto``) is :meth:`resolved_kwargs`.

    A family registered later brings its own section: a subclass whose ``family`` is ``Literal["<name>"] =
    "<name>"`` (the name ``methods.register`` gave the family), decorated with :func:`register_loss_section`;
    ``loss.family: <name>`` then selects it (``ExperimentConfig`` is rebuilt with the section in its union).
    """

    family: str = Field(description="the registered loss family (methods.build name)")
    multi_positive: StrictBool = Field(True, description="treat other captions of the same image as positives")

    @property
    def supports_multi_positive(self) -> bool:
        """Whether a batch may hold several captions of one image (``train.batch_sampler: random``)."""
        return self.multi_positive

    def family_kwargs(self, experiment: ExperimentConfig) -> dict[str, Any]:
        """The family constructor's keyword arguments: every field but ``family`` by its name (a nested section,
        such as a temperature, as a mapping of its fields), then :meth:`resolved_kwargs`."""
        kwargs = self.model_dump(exclude={"family"})
        kwargs.update(self.resolved_kwargs(experiment))
        return kwargs

    def resolved_kwargs(self, experiment: ExperimentConfig) -> dict[str, Any]:
        """Hook: the arguments whose value depends on the rest of ``experiment`` (none by default)."""
        return {}


#: loss.family -> its section, in registration order (the union's order: error messages list the tags so)
_LOSS_SECTIONS: dict[str, type[LossSection]] = {}
#: called after each registration (``ExperimentConfig`` rebuilds its ``loss`` field: :func:`on_registration`)
_ON_REGISTER: list[Callable[[], None]] = []
_SectionT = TypeVar("_SectionT", bound=type[LossSection])


def _family_default(section: type[LossSection]) -> Any:
    return section.model_fields["family"].default


def register_loss_section(section: _SectionT) -> _SectionT:
    """Make ``section`` the ``loss`` section of the family named by its ``family`` default."""
    name = _family_default(section)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{section.__name__}.family needs its family name as the default (Literal[name] = name)")
    if name in _LOSS_SECTIONS:
        raise ValueError(f"loss section {name!r} registered twice")
    _LOSS_SECTIONS[name] = section
    for rebuild in _ON_REGISTER:
        rebuild()
    return section


def on_registration(callback: Callable[[], None]) -> None:
    """Call ``callback`` after every later :func:`register_loss_section`."""
    _ON_REGISTER.append(callback)


def loss_families() -> tuple[str, ...]:
    """The ``loss.family`` names a config may select."""
    return tuple(_LOSS_SECTIONS)


def loss_section_union() -> Any:
    """The type of ``ExperimentConfig.loss``: the registered sections, discriminated by ``family``."""
    return Annotated[Union[tuple(_LOSS_SECTIONS.values())], Field(discriminator="family")]  # noqa: UP007 (built at run time)


@register_loss_section
class InfoNCELoss(LossSection):
    """Multi-positive InfoNCE (CUSA's L_itr): positives are every caption of the same image."""

    family: Literal["infonce"] = "infonce"
    temperature: TemperatureConfig = TemperatureConfig(init=0.05, min=0.01, max=0.10)
    reduction: Literal["sum", "class_mean"] = Field(
        "sum", description="sum: textbook cross-entropy; class_mean: the released CUSA form (divided by B)"
    )


@register_loss_section
class TripletLoss(LossSection):
    """Bidirectional triplet ranking loss (VSE++ hardest negative, Triplet-SN or SelHN mining)."""

    family: Literal["triplet"] = "triplet"
    margin: PositiveFloat = 0.2
    mining: Literal["hardest", "soft_negative", "selhn"] = "hardest"
    soft_negative_tau: PositiveFloat = Field(0.05, description="Triplet-SN softmax temperature (reconstruction)")
    selhn_eps: PositiveFloat = Field(0.01, description="SelHN switch gap (RVSEPP's default epsilon)")


RelevanceSource = Literal["auto", "exact", "teacher"]
_RELEVANCE_DOC = (
    "exact: the dataset's own graded relevance (synthetic data); teacher: RSC from the text "
    "teacher's caption embeddings; auto: exact when the data has it and no text teacher is set"
)
UnitInterval = Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]


class RelevanceLossSection(LossSection):
    """Base of the sections of families that score graded relevance R (Listwise ITR, BCLS)."""

    relevance: RelevanceSource = Field("auto", description=_RELEVANCE_DOC)

    def relevance_source(self, experiment: ExperimentConfig) -> str:
        """``exact`` or ``teacher``: ``auto`` is exact for synthetic data without a text teacher."""
        if self.relevance != "auto":
            return self.relevance
        if experiment.data.resolved_format == "synthetic" and experiment.teachers.text is None:
            return "exact"
        return "teacher"

    def resolved_kwargs(self, experiment: ExperimentConfig) -> dict[str, Any]:
        return {"relevance": self.relevance_source(experiment)}


LossKernel = Literal["auto", "torch", "triton"]
_KERNEL_DOC = (
    "O(B³) loss implementation: auto = fused Triton kernels on CUDA float32/16 (methods/kernels.py), "
    "else the blocked torch form; torch / triton force one"
)


@register_loss_section
class ListwiseLoss(RelevanceLossSection):
    """Listwise ITR: (1 − λ)·triplet + λ·Smooth-NDCG over the in-batch list, relevance from RSC (docs/methods.md §B)."""

    family: Literal["listwise"] = "listwise"
    weight: UnitInterval = Field(0.5, description="λ (sndcg_weight); missing from the released code: sweep it")
    tau: PositiveFloat = Field(0.01, description="sigmoid temperature of the smooth rank")
    margin: PositiveFloat = 0.2
    mining: Literal["hardest", "soft_negative", "selhn"] = "hardest"
    t2i_relevance: Literal["transpose", "as_released"] = Field(
        "transpose", description="as_released: the released code's untransposed t2i relevance and i2t IDCG"
    )
    rescale: StrictBool = Field(True, description="RSC's (1 + cos) / 2")
    chunk_size: PositiveInt | None = None
    kernel: LossKernel = Field("auto", description=_KERNEL_DOC)


@register_loss_section
class BCLSLoss(RelevanceLossSection):
    """BCLS: Triplet-SN + λ·Kendall ranking loss on continuous pseudo labels, with SW-HS sampling (docs/methods.md §A).

    Triplet-SN and SW-HS are reconstructions (docs/methods.md §A.8): ``soft_negative_tau`` -> 0 is VSE++;
    ``window`` None and ``hard_k`` None is the full (released ITM_CLS) Kendall loss.
    """

    family: Literal["bcls"] = "bcls"
    margin: PositiveFloat = 0.2
    mining: Literal["hardest", "soft_negative", "selhn"] = "soft_negative"
    soft_negative_tau: PositiveFloat = 0.05
    kendall_weight: NonNegFloat = Field(1.0, description="λ; the released ITM_CLS sums with weight 1")
    gap: NonNegFloat = Field(0.3, description="pairs count only when their labels differ by more than this")
    surrogate: Literal["hinge", "tanh", "sigmoid"] = "hinge"
    surrogate_temperature: PositiveFloat = 0.1
    window: PositiveInt | None = Field(16, description="SW-HS sliding window (None = all pairs)")
    hard_k: PositiveInt | None = Field(None, description="SW-HS: keep the k most violated pairs per query")
    t2i_relevance: Literal["transpose", "as_released"] = "transpose"
    rescale: StrictBool = Field(False, description="ITM_CLS uses the raw max-cosine (no (1 + cos) / 2)")
    chunk_size: PositiveInt | None = None
    kernel: LossKernel = Field("auto", description=_KERNEL_DOC + " (all-pairs Kendall only: window None, no hard_k)")


@register_loss_section
class CUSALoss(LossSection):
    """CUSA: InfoNCE + α·CSA + β·USA (docs/methods.md §C.2), temperatures and clamps of the released configs.

    ``reduction`` defaults to the released ``class_mean`` InfoNCE (divided by B) because the published α = 0.1
    and β = 0.5 are relative to it (docs/methods.md §C.7-1); ``sum`` is the textbook form (then scale α, β by 1/B).
    """

    family: Literal["cusa"] = "cusa"
    temperature: TemperatureConfig = TemperatureConfig(init=0.05, min=0.01, max=0.10)
    reduction: Literal["sum", "class_mean"] = "class_mean"
    alpha: NonNegFloat = Field(0.1, description="CSA weight")
    beta: NonNegFloat = Field(0.5, description="USA weight")
    csa_temperature: TemperatureConfig = TemperatureConfig(init=0.45, min=0.10, max=0.99)
    usa_image_temperature: TemperatureConfig = TemperatureConfig(init=0.45, min=0.10, max=1.00)
    usa_text_temperature: TemperatureConfig = TemperatureConfig(init=0.45, min=0.10, max=1.00)
    teacher_temperature: PositiveFloat = Field(1.0, description="τ_s, fixed")
    csa_mode: Literal["each", "add", "dot"] = "each"


if TYPE_CHECKING:  # a type checker sees the base; pydantic validates against the union
    LossConfig = LossSection
else:
    #: the built-in sections' union (``ExperimentConfig.model_fields["loss"]`` holds the current one)
    LossConfig = loss_section_union()


#: Loss families that compute only a rank's query rows (``methods`` ``supports_local_loss``).
LOCAL_LOSS_FAMILIES = ("infonce", "cusa", "triplet", "listwise", "bcls")
