"""The ``model`` section: the student, an open_clip model by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, StrictBool, field_validator

from orchestrator.config.base import Section, existing_path


class ModelConfig(Section):
    """The student: an open_clip model by name (built-in or one of the project's JSON configs)."""

    name: str = "ViT-B-32"
    pretrained: Path | None = Field(None, description="a local open_clip checkpoint; none = random init")
    lock_image: StrictBool = Field(False, description="freeze the image tower (LiT; open_clip lock_image_tower)")
    lock_text: StrictBool = Field(False, description="freeze the text tower (open_clip lock_text_tower)")
    cache_locked_towers: StrictBool = Field(
        True,
        description="compute a locked tower's frozen outputs once per split (cached under "
        "teachers.cache_dir) so an epoch runs only the trainable projection",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 autocast on GPU, fp32 on CPU")
    heads: Literal["auto", "none", "cross", "cross_uni"] = Field(
        "auto", description="CUSA's LN+Linear projectors: auto = cross_uni for cusa (cross if beta = 0), else none"
    )
    grad_checkpointing: StrictBool = Field(
        False,
        description="recompute the towers' activations in the backward (open_clip set_grad_checkpointing): "
        "less activation memory, about 30% more compute, the same values",
    )

    @field_validator("pretrained", mode="before")
    @classmethod
    def _none_string(cls, v: Any) -> Any:
        return None if isinstance(v, str) and v.strip().lower() in {"", "none", "null"} else v

    @field_validator("pretrained")
    @classmethod
    def _pretrained_exists(cls, v: Path | None) -> Path | None:
        return existing_path(v, "file")

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from orchestrator.models.registry import known_model_names

        names = known_model_names()
        if v not in names:
            close = [n for n in names if v.lower().replace("_", "-") in n.lower()][:5]
            hint = f"; did you mean {', '.join(close)}" if close else ""
            raise ValueError(f"unknown open_clip model {v!r}{hint}")
        return v
