"""The ``data`` section: where the image–caption pairs come from (synthetic, captions_json, karpathy, webdataset)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, StrictInt, field_validator, model_validator

from orchestrator.config.base import (
    AbsolutePath,
    FieldError,
    NonNegInt,
    PositiveFloat,
    PositiveInt,
    Section,
    existing_path,
)
from orchestrator.config.data_formats import AUTO, check_format_name, detect_format, format_declaration


class SyntheticConfig(Section):
    """The built-in generated dataset of coloured shapes (no download)."""

    num_train_images: PositiveInt = 2000
    num_val_images: PositiveInt = 300
    num_test_images: PositiveInt = 300
    seed: NonNegInt = 0
    image_size: Annotated[StrictInt, Field(ge=16, le=512)] = 64
    captions_per_image: tuple[PositiveInt, PositiveInt] = (2, 5)

    @model_validator(mode="after")
    def _range(self) -> SyntheticConfig:
        lo, hi = self.captions_per_image
        if lo > hi:
            raise FieldError("captions_per_image", "the minimum is larger than the maximum")
        return self


class NoiseConfig(Section):
    """Noisy correspondence in the training split (the NCR / NPC protocol, ``orchestrator.data.noise``).

    ``caption_shuffle: r`` re-pairs ``round(r * M)`` of the M training captions with other images, none keeping its
    own; val and test stay clean. ``seed`` picks them; it is its own field, not ``train.seed``, so every training
    seed and every loss of a sweep sees the same corrupted pairs (as the papers' fixed noise files do): sweep
    ``data.noise.seed`` to vary the draw."""

    caption_shuffle: float = Field(
        0.0, description="share of the training captions re-paired with another image, in [0, 1); 0 = off"
    )
    seed: NonNegInt = Field(0, description="seed of the choice and of the re-pairing (not train.seed)")

    @field_validator("caption_shuffle", mode="after")
    @classmethod
    def _share(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:  # NaN fails too
            raise ValueError("must be a share of the training captions in [0, 1)")
        return v


class DataConfig(Section):
    """Where the image–caption pairs come from.

    ``format``: ``auto`` picks ``synthetic`` when ``root`` is unset, ``captions_json`` when ``root`` holds
    ``<split>.json`` files (the coco-mini / ALBEF layout), ``karpathy`` when ``annotations`` is set, ``webdataset``
    when ``shards`` is set (training pairs streamed from tar shards, ``orchestrator.data.shards``; the eval splits
    still come from ``root`` / ``annotations``, map-style). The names are those declared in
    :mod:`orchestrator.config.data_formats` (a format registered later is accepted too), each with the fields it
    needs and how ``auto`` recognises it.
    """

    format: str = Field(
        AUTO,
        description="auto, synthetic, captions_json, karpathy, webdataset, or a format registered later "
        "(orchestrator.data.formats.register_split_format)",
    )
    root: Path | None = Field(None, description="captions_json: the folder with <split>.json; karpathy: image root")
    annotations: Path | None = Field(None, description="karpathy: dataset_coco.json / dataset_flickr30k.json")
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    synthetic: SyntheticConfig = SyntheticConfig()
    shards: str | list[str] | None = Field(
        None,
        description="webdataset: the training shards, a brace pattern (path/train-{000000..000099}.tar) or a "
        "list of them; {key}.jpg + {key}.json/.txt per sample (img2dataset / open_clip layout)",
    )
    train_samples: PositiveInt | None = Field(
        None,
        description="webdataset: samples per epoch (declared); unset: the shards' sizes.json, or counted once "
        "and recorded there",
    )
    shuffle_buffer: NonNegInt = Field(
        1000,
        description="webdataset: samples each loader worker buffers to shuffle its shards' stream (encoded "
        "bytes; 0 or 1: stored order)",
    )
    clean_captions: StrictBool = Field(
        True, description="CUSA's pre_caption: lower-case, punctuation to spaces, 64 words"
    )
    verify_images: Literal["none", "exists", "header", "full"] = "header"
    manifest_dir: AbsolutePath | None = Field(
        None,
        description="where the verified-image manifests live (header/full checks done once, files unchanged "
        "since are not parsed again); default $XDG_CACHE_HOME/itr/manifests (~/.cache/itr/manifests)",
    )
    max_train_images: PositiveInt | None = Field(None, description="use only the first N training images")
    image_cache: Literal["decoded", "tensor_ram", "none"] = Field(
        "decoded",
        description="decoded: each image decoded and resized once ever into a uint8 memory-mapped cache "
        "(data.image_cache_dir) that every epoch, loader worker and run shares, normalised "
        "on the device; tensor_ram: float32 tensors kept in each process's RAM (up to 2 GiB, "
        "the old behaviour); none: decode every image every time",
    )
    image_cache_dir: AbsolutePath | None = Field(
        None,
        description="where the decoded-image cache lives (content-addressed, shared by every run that reads "
        "it; node-local disk or shared storage); default $XDG_CACHE_HOME/itr/images "
        "(~/.cache/itr/images)",
    )
    image_cache_workers: PositiveInt | Literal["auto"] = Field(
        "auto",
        description="processes that decode images into the cache on the driver (itr train, itr prepare); "
        "auto = every CPU",
    )
    loader_workers: NonNegInt | Literal["auto"] = Field(
        "auto",
        description="DataLoader worker processes per training process; auto = its CPUs minus one "
        "(scaling.cpus_per_worker on Ray, the machine's available CPUs locally)",
    )
    prefetch_factor: PositiveInt = Field(2, description="batches each loader worker keeps in flight")
    augment: Literal["none", "open_clip"] = Field(
        "none",
        description="training augmentation: none (the eval transform; images decoded once into the cache), "
        "open_clip (its train transform: random resized crop; decoded in the loader workers "
        "every epoch)",
    )
    augment_scale: tuple[PositiveFloat, PositiveFloat] = Field(
        (0.9, 1.0), description="augment open_clip: the random resized crop's area range (open_clip's default)"
    )
    bad_images: Literal["fail", "skip"] = Field(
        "fail",
        description="an image that cannot be decoded during training: fail (exit 2, naming it), or skip "
        "(replace the pair by another caption's, count it: train/skipped_images)",
    )
    leakage: Literal["warn", "error"] = Field(
        "warn",
        description="an image (same id or file) or caption id of the train split also in val/test: log a "
        "WARNING, or refuse the data (exit 2)",
    )
    allow_outside_root: bool = Field(
        False,
        description="accept image paths that leave the dataset root (absolute, or '..' after lexical "
        "normalisation); symlinks inside the root are not followed by this check",
    )
    noise: NoiseConfig = NoiseConfig()

    @field_validator("format", mode="before")
    @classmethod
    def _known_format(cls, v: Any) -> Any:
        return check_format_name(v)

    @field_validator("root")
    @classmethod
    def _root_exists(cls, v: Path | None) -> Path | None:
        return existing_path(v, "folder")

    @field_validator("annotations")
    @classmethod
    def _annotations_exist(cls, v: Path | None) -> Path | None:
        return existing_path(v, "file")

    @property
    def resolved_format(self) -> str:
        """``format``, or for ``auto`` the format whose declared detector recognises the fields set
        (:func:`orchestrator.config.data_formats.detect_format`)."""
        return self.format if self.format != AUTO else detect_format(self)

    @property
    def split_format(self) -> str:
        """The format of the map-style splits: the eval splits of ``webdataset`` are ``karpathy`` (annotations set)
        or ``captions_json``; other formats are their own."""
        fmt = self.resolved_format
        if fmt != "webdataset":
            return fmt
        return "karpathy" if self.annotations is not None else "captions_json"

    @field_validator("shards", mode="before")
    @classmethod
    def _shard_patterns(cls, v: Any) -> Any:
        """Relative patterns made absolute against the current folder (braces kept); none may be empty."""
        if v is None:
            return None
        items = [v] if isinstance(v, (str, Path)) else v
        if (
            not isinstance(items, list)
            or not items
            or not all(isinstance(p, (str, Path)) and str(p).strip() for p in items)
        ):
            raise ValueError("must be a shard path pattern or a non-empty list of them")
        absolute = [str(Path.cwd() / Path(p).expanduser()) for p in items]  # an absolute one stays as it is
        return absolute[0] if isinstance(v, (str, Path)) else absolute

    @model_validator(mode="after")
    def _format_inputs(self) -> DataConfig:
        fmt = self.resolved_format
        if fmt != "webdataset":
            for name in ("shards", "train_samples"):
                if getattr(self, name) is not None:
                    raise FieldError(name, f"is read by format webdataset only (the format here is {fmt})")
        declaration = format_declaration(fmt)
        missing = declaration.missing_field(self)
        if missing is not None:  # the fields the format declared it needs
            raise FieldError(missing, declaration.needs_message)
        if fmt == "webdataset" and self.max_train_images is not None:
            raise FieldError(
                "max_train_images", "not with format webdataset (declare data.train_samples: the epoch length)"
            )
        lo, hi = self.augment_scale
        if not lo <= hi <= 1.0:
            raise FieldError(
                "augment_scale",
                f"needs 0 < low <= high <= 1 (the crop's share of the image area), got [{lo:g}, {hi:g}]",
            )
        return self

    @model_validator(mode="after")
    def _noise_needs_an_index(self) -> DataConfig:
        if self.noise.caption_shuffle > 0 and self.resolved_format == "webdataset":
            raise FieldError(
                "noise.caption_shuffle",
                "data.noise needs the train split's caption index, which format webdataset (streamed shards) "
                "does not have; train on captions_json / karpathy data, or set it to 0",
            )
        return self
