"""Training/evaluation configs: typed dataclasses loaded from YAML, overridable from the command line.

A config file has up to seven sections, each a dataclass below (every key is
optional; omitted keys keep their defaults):

    _base_: other_config          # optional: a shipped config name or a path (or a list of them)
    model:    {name: apcnet_r50-d8, norm: SyncBN}
    data:     {name: cityscapes, root: data/cityscapes, crop_size: [512, 1024]}
    optim:    {lr: 0.01, momentum: 0.9, weight_decay: 0.0005}
    schedule: {power: 0.9, eta_min: 0.0001, warmup_iters: 0}
    train:    {iters: 80000, batch_size: 8, val_interval: 8000, checkpoint_interval: 8000}
    eval:     {mode: whole}
    runtime:  {amp: none}

`load_config("apcnet_r18-d8_synthetic", ["train.iters=200", "optim.lr=0.01"])`
finds `configs/apcnet_r18-d8_synthetic.yaml` (the package `fastctx.configs`),
or takes a path. Bases are merged first, then the file, then the overrides.
Unknown keys and bad values raise ConfigError naming the key and what it
accepts. Overrides (`fastctx ... --set`):

    train.iters=200                              one key; values are YAML: [32, 32], null, true, {a: 1}
    model.kwargs.decode_head.dropout_ratio=0     a dotted key reaches into a mapping value and merges there
    data.train_kwargs:={num_images: 100}         ':=' replaces the value (or a whole section, data:={...})
                                                 instead of merging mappings into the inherited one
    data.name=pascal_voc12 data.root=data/VOCdevkit
                                                 switching data.name resets the inherited dataset-specific
                                                 keys (root, splits, crop_size, scale, train_kwargs,
                                                 val_kwargs) to their defaults: they described the old
                                                 dataset; the overrides then set the new one's
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "Config", "ConfigError", "DataConfig", "EvalConfig", "ModelConfig", "OptimConfig", "RuntimeConfig",
    "ScheduleConfig", "TrainConfig", "apply_overrides", "available_configs", "load_config", "parse_overrides",
    "resolve_config_path",
]


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names the key and what it accepts."""


def _positive(**kw):
    return field(metadata={"min": 1}, **kw)


def _non_negative(**kw):
    return field(metadata={"min": 0}, **kw)


@dataclass
class ModelConfig:
    """The network: a `fastctx.models.build_model` preset.

    name: preset ("apcnet_r50-d8", "encnet_r18-d8", "fcn_r101-d8", ...).
    norm: "BN" or "SyncBN" (SyncBN is used when training with several processes).
    fused: run the context heads with fastctx's fused kernels (False: mmseg's eager maths).
    pretrained: a local backbone or segmentor checkpoint to initialise from.
    kwargs: further keyword arguments of build_model (architecture overrides),
        e.g. {decode_head: {dropout_ratio: 0}} or, from the command line,
        model.kwargs.decode_head.dropout_ratio=0.
    """

    name: str = "apcnet_r18-d8"
    norm: Literal["BN", "SyncBN"] = "BN"
    fused: bool = True
    pretrained: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """The dataset: a `fastctx.data.build_dataset` name, its root and pipeline sizes.

    crop_size: training crop [h, w]. scale: mmseg's resize scale [w, h] (the
    RandomResize base scale in training, the keep-ratio Resize in testing).
    Both default to the dataset's mmseg settings when null. train_kwargs /
    val_kwargs go to build_dataset as they are (e.g. the synthetic dataset's
    num_images, size).
    num_workers: DataLoader worker processes (0: load in the main process).
    """

    name: str = "synthetic"
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    crop_size: tuple[int, int] | None = None
    scale: tuple[int, int] | None = None
    train_kwargs: dict[str, Any] = field(default_factory=dict)
    val_kwargs: dict[str, Any] = field(default_factory=dict)
    num_workers: int = _non_negative(default=2)


@dataclass
class OptimConfig:
    """The optimizer: SGD with momentum (mmseg: lr 0.01, momentum 0.9, weight decay 5e-4) or AdamW.

    type: "SGD" (uses momentum) or "AdamW" (uses betas, eps; torch's decoupled weight decay, as mmseg's
        AdamW configs, e.g. lr 6e-5, betas [0.9, 0.999], weight_decay 0.01 for Swin).
    paramwise: mmseg's paramwise_cfg custom_keys, {substring: {lr_mult: m, decay_mult: d}}: a parameter
        whose full name (e.g. backbone.stages.0.blocks.0.norm1.weight) contains a key gets lr * lr_mult
        and weight_decay * decay_mult; with several matches the longest key wins (alphabetical among
        equal lengths), as mmengine's DefaultOptimWrapperConstructor. Swin's rules:
        {norm: {decay_mult: 0}, absolute_pos_embed: {decay_mult: 0}, relative_position_bias_table:
        {decay_mult: 0}}.
    """

    lr: float = field(default=0.01, metadata={"min_exclusive": 0.0})
    momentum: float = field(default=0.9, metadata={"min": 0.0})
    weight_decay: float = field(default=5e-4, metadata={"min": 0.0})
    type: Literal["SGD", "AdamW"] = "SGD"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = field(default=1e-8, metadata={"min_exclusive": 0.0})
    paramwise: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScheduleConfig:
    """Learning rate per iteration: optional linear warmup, then mmseg's PolyLR.

    Warmup (mmengine LinearLR over [0, warmup_iters)) ramps the factor from
    warmup_ratio to 1; then lr = (lr0 - eta_min) * (1 - s / (S - 1))**power + eta_min
    with s the iteration since warmup and S the iterations after warmup.
    """

    power: float = field(default=0.9, metadata={"min": 0.0})
    eta_min: float = field(default=1e-4, metadata={"min": 0.0})
    warmup_iters: int = _non_negative(default=0)
    warmup_ratio: float = field(default=1e-6, metadata={"min_exclusive": 0.0})


@dataclass
class TrainConfig:
    """Iteration-based training.

    iters: optimizer steps. batch_size: images per forward pass over all
    processes (each process gets batch_size / world_size); with accum_steps > 1
    one step sees batch_size * accum_steps images. Intervals are in iterations
    (0 disables; validation and a checkpoint also happen at the end).
    """

    iters: int = _positive(default=80000)
    batch_size: int = _positive(default=8)
    accum_steps: int = _positive(default=1)
    log_interval: int = _positive(default=50)
    val_interval: int = _non_negative(default=8000)
    checkpoint_interval: int = _non_negative(default=8000)
    seed: int = _non_negative(default=0)


@dataclass
class EvalConfig:
    """Inference for evaluation (batch 1, logits at the label's size).

    mode: "whole" image, or "slide" windows of crop_size every stride pixels
    (null: the data crop size, and 2/3 of it). tta: average the softmax over
    tta_scales (relative to the test image) and, if tta_flip, horizontal flips.
    """

    mode: Literal["whole", "slide"] = "whole"
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    tta: bool = False
    tta_scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    tta_flip: bool = True


@dataclass
class RuntimeConfig:
    """Where and how to run.

    device: "auto" (CUDA if available), "cpu", "cuda" or "cuda:N".
    amp: "none", "bf16" (CPU or CUDA) or "fp16" (CUDA, with a GradScaler).
    backend: fastctx kernel backend ("auto" picks from the tensors).
    work_dir: logs and checkpoints (default work_dirs/<config name>).
    dist_backend: torch.distributed backend ("auto": nccl on CUDA, gloo on CPU).
    """

    device: str = "auto"
    amp: Literal["none", "bf16", "fp16"] = "none"
    backend: Literal["auto", "reference", "cpu", "cuda", "triton"] = "auto"
    work_dir: str | None = None
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"


@dataclass
class Config:
    """A whole config: one dataclass per section, plus the name it was loaded as."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    name: str = "config"

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists for tuples): what `from_dict` and YAML/JSON take back."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], name: str = "config") -> Config:
        """Build and validate a Config from nested dicts (unknown keys and bad values -> ConfigError)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
        raw = dict(raw)
        raw.pop("name", None)
        sections = _section_types()
        for key in raw:
            if key not in sections:
                raise ConfigError(_unknown_key_message(key, list(sections), "config sections"))
        values = {}
        for key, section_cls in sections.items():
            section = raw.get(key) or {}
            if not isinstance(section, dict):
                raise ConfigError(f"config section {key!r} must be a mapping of keys, got {section!r}")
            values[key] = _build_section(section_cls, section, key)
        config = cls(**values, name=name)
        config.validate()
        return config

    def validate(self) -> None:
        """Cross-field checks (the per-key ones ran when the sections were built)."""
        if self.schedule.warmup_iters >= self.train.iters and self.schedule.warmup_iters > 0:
            raise ConfigError(f"schedule.warmup_iters ({self.schedule.warmup_iters}) must be smaller than "
                              f"train.iters ({self.train.iters})")
        if any(not 0.0 <= b < 1.0 for b in self.optim.betas):
            raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {list(self.optim.betas)}")
        for key, rule in self.optim.paramwise.items():
            if not isinstance(rule, dict) or not rule or set(rule) - {"lr_mult", "decay_mult"} or any(
                    isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 for v in rule.values()):
                raise ConfigError(f"optim.paramwise.{key}: expected a mapping of lr_mult and/or decay_mult to "
                                  f"numbers >= 0, got {rule!r}")
        if not self.eval.tta_scales:
            raise ConfigError("eval.tta_scales: expected at least one scale, got an empty list")
        if any(s <= 0 for s in self.eval.tta_scales):
            raise ConfigError(f"eval.tta_scales: expected positive scale factors, got {list(self.eval.tta_scales)}")
        for key, size in (("data.crop_size", self.data.crop_size), ("data.scale", self.data.scale),
                          ("eval.crop_size", self.eval.crop_size), ("eval.stride", self.eval.stride)):
            if size is not None and min(size) < 1:
                raise ConfigError(f"{key}: expected two positive integers, got {list(size)}")
        if self.runtime.device not in ("auto", "cpu", "cuda") and not _is_cuda_index(self.runtime.device):
            raise ConfigError(f"runtime.device: expected one of 'auto', 'cpu', 'cuda', 'cuda:N', "
                              f"got {self.runtime.device!r}")
        from ..data import DATASETS
        from ..models import MODEL_NAMES

        _check_registered("model.name", self.model.name, MODEL_NAMES)
        _check_registered("data.name", self.data.name, DATASETS)

    def with_overrides(self, overrides: list[str] | None) -> Config:
        """A copy with `section.key=value` overrides applied (and validated)."""
        return Config.from_dict(apply_overrides(self.to_dict(), overrides or []), self.name)


def _is_cuda_index(device: str) -> bool:
    prefix, _, index = device.partition(":")
    return prefix == "cuda" and index.isdigit()


def _check_registered(key: str, value: str, names) -> None:
    names = list(names)
    if value not in names:
        raise ConfigError(f"{key}: unknown name {value!r}; valid: {', '.join(map(str, names))}")


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if f.name != "name"}


def _build_section(section_cls: type, values: dict[str, Any], section: str):
    hints = typing.get_type_hints(section_cls)
    fields = {f.name: f for f in dataclasses.fields(section_cls)}
    for key in values:
        if key not in fields:
            raise ConfigError(_unknown_key_message(f"{section}.{key}", [f"{section}.{k}" for k in fields],
                                                   f"keys of section '{section}'"))
    kwargs = {}
    for key, value in values.items():
        name = f"{section}.{key}"
        coerced = _coerce(value, hints[key], name)
        _check_range(coerced, fields[key].metadata, name)
        kwargs[key] = coerced
    return section_cls(**kwargs)


def _unknown_key_message(key: str, valid: list[str], what: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown config key {key!r}{hint} Valid {what}: {', '.join(valid)}"


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_describe(a) for a in args) + " or null"
    if origin is tuple:
        args = typing.get_args(tp)
        items = {int: "integers", float: "numbers", str: "strings"}.get(args[0], str(args[0]))
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {items}"
        return f"a list of {len(args)} {items}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value, tp, key: str):
    """`value` converted to type `tp`, or ConfigError saying what `key` expects."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise bad
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and len(args) == 2 \
                and args[1] is not Ellipsis:
            value = [value, value]  # a single size means a square
        if not isinstance(value, (list, tuple)):
            raise bad
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(value) != len(item_types):
            raise bad
        try:
            return tuple(_coerce(v, a, key) for v, a in zip(value, item_types))
        except ConfigError:
            raise bad from None  # name the whole value, not one item
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"config type {tp} of {key} is not supported")  # a bug in the schema, not user input


def _check_range(value, metadata, key: str) -> None:
    if value is None:
        return
    if "min" in metadata and value < metadata["min"]:
        raise ConfigError(f"{key}: expected a value >= {metadata['min']}, got {value!r}")
    if "min_exclusive" in metadata and value <= metadata["min_exclusive"]:
        raise ConfigError(f"{key}: expected a value > {metadata['min_exclusive']}, got {value!r}")


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


class _Replace:
    """An override value given with ':=': it replaces what it is merged into, mappings included."""

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return f"_Replace({self.value!r})"


# Keys of the data section that describe one dataset: reset when an override switches data.name.
_DATASET_KEYS = ("root", "train_split", "val_split", "crop_size", "scale", "train_kwargs", "val_kwargs")


def _merge(base: dict, update: dict) -> dict:
    """Recursive in-place merge of `update` into `base` (mappings merge, anything else and ':=' values replace)."""
    for key, value in update.items():
        if isinstance(value, _Replace):
            base[key] = _plain_overrides(value.value)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = _plain_overrides(value)
    return base


def _plain_overrides(value: Any) -> Any:
    """`value` with any nested ':=' markers unwrapped (nothing below them to merge into)."""
    if isinstance(value, _Replace):
        return _plain_overrides(value.value)
    if isinstance(value, dict):
        return {k: _plain_overrides(v) for k, v in value.items()}
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Merge `section.key=value` / `key:=value` overrides into a raw config dict (in place; returned).

    An override switching data.name to another dataset first resets the
    inherited dataset-specific keys of the data section (they described the
    old dataset) to their defaults.
    """
    nested = parse_overrides(overrides)
    data = nested.get("data")
    inherited = raw.get("data")
    if isinstance(data, dict) and "name" in data and isinstance(inherited, dict):
        if _plain_overrides(data["name"]) != inherited.get("name", DataConfig.name):
            for key in _DATASET_KEYS:
                inherited.pop(key, None)
    return _merge(raw, nested)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """["train.iters=200", "data.crop_size=[32, 32]"] -> {"train": {"iters": 200}, "data": {...}}.

    Values are parsed as YAML scalars/lists/mappings; a dotted key may reach
    into a mapping-valued key (`model.kwargs.decode_head.dropout_ratio=0`).
    `key:=value` replaces instead of merging (see the module docstring).
    """
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        replace = key.endswith(":")
        key = key.removesuffix(":").strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.iters=200")
        parts = key.split(".")
        if not all(parts) or (len(parts) < 2 and not replace):
            raise ConfigError(f"override {item!r}: the key must be section.key (sections: "
                              f"{', '.join(_section_types())}); section:={{...}} replaces a whole section")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from None
        if replace and len(parts) == 1 and not isinstance(value, dict):
            raise ConfigError(f"override {item!r}: a section is replaced by a mapping, e.g. "
                              f"{parts[0]}:={{key: value}}")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = _Replace(value) if replace else value
    return nested


def available_configs() -> list[str]:
    """Names of the configs shipped in fastctx.configs."""
    return _configs_module().config_names()


def _configs_module():
    try:
        from fastctx import configs
    except ImportError:
        # A source checkout installed before `fastctx.configs` was declared: the
        # YAML files are in the repository's configs/ folder next to fastctx/.
        import importlib.util

        init = Path(__file__).resolve().parents[2] / "configs" / "__init__.py"
        if not init.is_file():
            raise
        spec = importlib.util.spec_from_file_location("fastctx.configs", init)
        configs = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(configs)
    return configs


def resolve_config_path(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    """A config file: an existing path (absolute, or relative to `relative_to` / the cwd), or a shipped name."""
    path = Path(name_or_path).expanduser()
    candidates = [path] if path.is_absolute() else (
        [relative_to / path, path] if relative_to is not None else [path])
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    looks_like_path = path.suffix in (".yaml", ".yml") and (len(path.parts) > 1 or path.is_absolute())
    if not looks_like_path:
        try:
            return _configs_module().config_path(str(name_or_path))
        except FileNotFoundError:
            pass
    raise ConfigError(f"config {str(name_or_path)!r} is neither a file nor a shipped config; "
                      f"shipped configs: {', '.join(available_configs())}")


def _load_raw(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"config inheritance cycle: {chain}")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
    bases = raw.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"config {path}: _base_ must be a config name/path or a list of them, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        _merge(merged, _load_raw(resolve_config_path(base, relative_to=path.parent), (*seen, path)))
    return _merge(merged, raw)


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a config by shipped name or path, apply `section.key=value` overrides, validate."""
    path = resolve_config_path(name_or_path)
    raw = apply_overrides(_load_raw(path), overrides or [])
    name = path.name
    for suffix in (".yaml", ".yml"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return Config.from_dict(raw, name=name)
