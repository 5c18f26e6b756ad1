"""The pipeline's configuration: one typed schema, resolved once per run.

`params.yaml` is what people edit. Its top-level sections are the `tiny` profile (the embedded
default); `profiles.<name>` holds overlays deep-merged on top for other machines. Every section
is validated against the schema below when the file is loaded: an unknown key, a wrong type or
an impossible value is refused with the file, the profile and the key path. Defaults live here
and nowhere else.

The active profile (`--profile`, else `MEDREGA_PROFILE`, else `profile:` in the file) is resolved
once into `params.resolved.yaml` (`medrega config resolve`, the first DVC stage). That file is
what DVC tracks as the params of every stage, and what every process reads: the stage commands
(`--config params.resolved.yaml` in dvc.yaml) and every training rank under torchrun or Slurm
(the tune stage hands its ranks the resolved file it was given). So a profile switch re-runs
exactly the stages whose sections differ, and editing an inactive profile re-runs nothing.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medrega.errors import BadInput

DEFAULT_PARAMS = Path("params.yaml")
RESOLVED = Path("params.resolved.yaml")
PROFILE_ENV = "MEDREGA_PROFILE"
BASE_PROFILE = "tiny"

Task = Literal["caption", "r2t", "t2r", "grounded", "vqa", "report", "cls"]
Lang = Literal["en", "zh"]
Setting = Literal["SS", "SM", "MS", "MM"]


class ConfigError(BadInput):
    """params.yaml (or a resolved config) is missing, malformed, or names an unknown profile."""


class Section(BaseModel):
    """Every section refuses keys it does not know (a typo must not silently become a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# -- data ---------------------------------------------------------------------------------------

class DataConfig(Section):
    root: Path = Path("data/samed2d")
    patients_per_modality: int = Field(48, ge=1)
    slices_per_patient: int = Field(2, ge=1)
    image_size: int = Field(224, ge=64)
    seed: int = 0
    package_scans: bool = True  # merge the real head CT / brain MR scans pydicom and nibabel ship


class ValidateConfig(Section):
    out: Path = Path("artifacts/validate")
    max_failure_share: float = Field(0.0, ge=0.0, le=1.0)  # share of images that may fail a rule
    max_image_pixels: int = Field(40_000_000, ge=1)   # refuse decompression bombs
    max_image_side: int = Field(65535, ge=1)
    min_mask_pixels: int = Field(4, ge=1)


class MimicConfig(Section):
    root: Path    # MIMIC-CXR-JPG directory
    boxes: Path   # Chest ImaGenome JSON or scene-graph directory


class MaterializeConfig(Section):
    out: Path = Path("artifacts/instructions")
    test_share: float = Field(0.2, gt=0.0, lt=1.0)
    tasks: list[Task] = ["caption", "r2t", "t2r", "grounded", "vqa", "report", "cls"]
    langs: list[Lang] = ["en", "zh"]
    t2r_settings: list[Setting] = ["SS", "SM", "MS", "MM"]
    seed: int = 0
    max_record_bytes: int = Field(4096, ge=64)
    max_quarantine_share: float = Field(0.01, ge=0.0, le=1.0)
    released_meta: Path | None = None
    mimic: MimicConfig | None = None
    workers: int | None = Field(2, ge=1)   # None: one per CPU core
    shard_size: int = Field(2000, ge=1)
    dask_address: str | None = None

    @field_validator("tasks", "langs", "t2r_settings")
    @classmethod
    def _non_empty_unique(cls, v: list) -> list:
        if not v:
            raise ValueError("must list at least one")
        if len(set(v)) != len(v):
            raise ValueError(f"lists an entry twice: {v}")
        return v

    @property
    def n_workers(self) -> int:
        return self.workers or os.cpu_count() or 1


# -- model and training -------------------------------------------------------------------------

# Named checkpoints a preset can stand for (`model.checkpoint` overrides with a local path).
CHECKPOINT_PRESETS = {
    "internvl3-1b": "OpenGVLab/InternVL3-1B-hf",
    "internvl3-2b": "OpenGVLab/InternVL3-2B-hf",
    "internvl3-8b": "OpenGVLab/InternVL3-8B-hf",
    "internvl-34b": "OpenGVLab/InternVL-Chat-V1-2",
}

class ModelConfig(Section):
    preset: str = "tiny"
    checkpoint: str | None = None   # a local path or hub id, for presets that load a checkpoint
    image_size: int = Field(224, ge=28)
    patch_size: int = Field(28, ge=1)
    downsample_ratio: float = Field(0.5, gt=0.0, le=1.0)
    max_length: int = Field(384, ge=16)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    # what training, evaluation and serving load the weights in on GPUs (CPUs always use float32:
    # bf16 there is slow and some kernels lack it)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # evaluation and serving: null puts the whole model on one GPU (each rank its own); "auto"
    # spreads it over the GPUs of the node (shared out among the node's ranks) through
    # accelerate, for a model one GPU cannot hold. A placement that spills to CPU or disk fails.
    device_map: Literal["auto"] | None = None
    system_prompt: str | None = None
    # tiny preset only: the randomly initialised InternVL built from these
    vision_hidden_size: int = Field(128, ge=8)
    vision_layers: int = Field(2, ge=1)
    vision_heads: int = Field(4, ge=1)
    text_hidden_size: int = Field(192, ge=8)
    text_layers: int = Field(4, ge=1)
    text_heads: int = Field(4, ge=1)
    text_kv_heads: int = Field(2, ge=1)
    text_intermediate_size: int = Field(512, ge=8)

    @model_validator(mode="after")
    def _geometry(self) -> "ModelConfig":
        if self.preset != "tiny" and self.preset not in CHECKPOINT_PRESETS and not self.checkpoint:
            raise ValueError(f"preset {self.preset!r} is neither 'tiny' nor a known checkpoint "
                             f"({', '.join(CHECKPOINT_PRESETS)}); name one, or set model.checkpoint")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        side = self.image_size // self.patch_size * self.downsample_ratio
        if side != int(side) or side < 1:
            raise ValueError(f"pixel shuffle needs (image_size / patch_size) * downsample_ratio to be a whole "
                             f"number, got {self.image_size}/{self.patch_size}*{self.downsample_ratio}")
        if self.preset == "tiny":
            for hidden, heads, what in ((self.vision_hidden_size, self.vision_heads, "vision"),
                                        (self.text_hidden_size, self.text_heads, "text")):
                if hidden % heads:
                    raise ValueError(f"{what}_hidden_size {hidden} is not divisible by {what}_heads {heads}")
            if self.text_heads % self.text_kv_heads:
                raise ValueError(f"text_heads {self.text_heads} is not divisible by text_kv_heads {self.text_kv_heads}")
        return self

    @property
    def num_image_tokens(self) -> int:
        per_side = self.image_size // self.patch_size
        return int(per_side * per_side * self.downsample_ratio ** 2)


class TrainingConfig(Section):
    """What every HF Trainer run takes (base pretraining phases, align, tune)."""

    max_steps: int = -1                  # -1: run num_train_epochs
    num_train_epochs: float = Field(1.0, gt=0.0)
    per_device_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0.0)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    save_steps: int = Field(100, ge=1)
    logging_steps: int = Field(10, ge=1)
    gradient_checkpointing: bool = False
    group_by_length: bool = False
    bf16: bool = False                   # honoured on GPUs only
    dataloader_num_workers: int = Field(0, ge=0)
    max_too_long_share: float = Field(0.0, ge=0.0, le=1.0)   # records over max_length: counted, never cut

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("must be -1 (train num_train_epochs) or a positive number of steps")
        return v


class PretrainPhase(TrainingConfig):
    """One phase of the tiny preset's stand-in pretraining (tasks/align.py)."""

    tasks: list[Task] = ["caption", "r2t", "t2r"]
    base_prompt_share: float = Field(1.0, ge=0.0, le=1.0)


class PretrainConfig(Section):
    """Phases run one after the other, each from the weights the one before wrote. Keys given
    beside `phases` are shared by every phase (a phase's own keys win); the resolved file lists
    each phase complete."""

    phases: list[PretrainPhase] = []

    @model_validator(mode="before")
    @classmethod
    def _expand(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        common = {k: v for k, v in data.items() if k != "phases"}
        phases = data.get("phases") or []
        if not isinstance(phases, list):
            return data
        return {"phases": [{**common, **(p or {})} if isinstance(p, dict) else p for p in phases]}


class TokenizerConfig(Section):
    vocab_size: int = Field(2000, ge=300)
    min_frequency: int = Field(2, ge=1)


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 3
    offload_optimizer: bool = False   # to CPU memory (GPU clusters; leave off on CPU boxes)
    offload_params: bool = False      # ZeRO-3 only


class LauncherConfig(Section):
    # local: torchrun on this machine; with nnodes > 1, one torchrun per "node" on loopback
    # addresses (127.0.0.1, 127.0.0.2, ...), a rehearsal of a multi-node run. slurm: sbatch.
    kind: Literal["local", "slurm"] = "local"
    nnodes: int = Field(1, ge=1)
    nproc_per_node: int = Field(1, ge=1)
    # GPUs Slurm allocates per node; null: one per rank. More than ranks: a rank spreads its model
    # over several (evaluation with model.device_map auto)
    gpus_per_node: int | None = Field(None, ge=1)
    backend: Literal["gloo", "nccl"] = "gloo"
    port: int = Field(29500, ge=1024, le=65535)
    job_name: str | None = None   # the Slurm job's name; null: medrega-<stage>
    time: str = "48:00:00"
    cpus_per_task: int | None = Field(None, ge=1)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    python: str | None = None   # the interpreter on the compute nodes (default: this one)
    # memory of one GPU; set for GPU clusters: align and tune refuse a plan that cannot fit (`medrega plan`)
    gpu_memory_gib: float | None = Field(None, gt=0)
    # Bounded waits, so a node that never comes, or dies mid-run, ends the job with a diagnosis
    # instead of a hang: every node must join the rendezvous within rdzv_timeout_s, and any
    # collective (process-group setup, a step's all-reduce, rank 0 converting a checkpoint while
    # the others wait) that waits longer than comm_timeout_s fails.
    rdzv_timeout_s: int = Field(300, ge=1)
    comm_timeout_s: int = Field(1800, ge=1)
    # Resume under another world size even where the rest of the epoch cannot be drawn in the
    # order the interrupted run would have used (group_by_length: the Trainer groups lengths per
    # per-device batch x accumulation, which a world-size change alters). False: refused, with
    # the world sizes that resume exactly (README, "Running on a cluster").
    allow_inexact_resume: bool = False

    @model_validator(mode="after")
    def _a_gpu_per_rank(self) -> "LauncherConfig":
        if self.gpus_per_node is not None and self.gpus_per_node < self.nproc_per_node:
            raise ValueError(f"gpus_per_node {self.gpus_per_node} is fewer than nproc_per_node {self.nproc_per_node}")
        return self


class AlignConfig(TrainingConfig):
    out: Path = Path("artifacts/align")
    # null: the align recipe runs in the stage's own process (the tiny profile). Set: it runs on
    # every rank like tune (torchrun or Slurm), under `align.deepspeed` when given: a real
    # checkpoint's frozen weights do not fit one GPU without ZeRO-3 (`medrega plan`).
    launcher: LauncherConfig | None = None
    deepspeed: DeepSpeedConfig | None = None

    @model_validator(mode="after")
    def _deepspeed_needs_ranks(self) -> "AlignConfig":
        if self.deepspeed is not None and self.launcher is None:
            raise ValueError("align.deepspeed needs align.launcher (DeepSpeed runs under torchrun or Slurm)")
        return self


class TuneConfig(TrainingConfig):
    out: Path = Path("artifacts/tune")
    tasks: list[Task] | None = None   # None: every materialized task but captions, as the paper
    mode: Literal["lora", "full"] = "lora"
    lora: LoraConfig = LoraConfig()
    deepspeed: DeepSpeedConfig | None = DeepSpeedConfig()
    launcher: LauncherConfig = LauncherConfig()


# -- evaluation and registry --------------------------------------------------------------------

class PluginConfig(Section):
    model_path: Path | None = None
    layer: int | None = None


class PluginsConfig(Section):
    bertscore: PluginConfig = PluginConfig()
    chexbert: PluginConfig = PluginConfig()
    radgraph: PluginConfig = PluginConfig()


class EvaluateConfig(Section):
    out: Path = Path("artifacts/eval")
    tasks: list[Task] | None = None    # None: the test split of every materialized task
    max_samples_per_task: int = 40     # -1: every held-out item
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(128, ge=1)
    iou_threshold: float = Field(0.5, gt=0.0, le=1.0)
    name_match: Literal["strict", "lenient"] = "strict"
    gallery: int = Field(12, ge=0)
    wordnet_dir: Path | None = None
    plugins: PluginsConfig = PluginsConfig()
    # null: answers are generated in the stage's own process. Set: on every rank of this launcher
    # (torchrun or Slurm, as tune), each rank a deterministic share of the held-out batches;
    # the answers are merged in item order and equal a one-process run's.
    launcher: LauncherConfig | None = None

    @field_validator("max_samples_per_task")
    @classmethod
    def _samples(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("must be -1 (every held-out item) or a positive count")
        return v


class GateConfig(Section):
    tolerance: float = Field(0.02, ge=0.0)
    # `<task>.<figure>` or `<task>.<lang>.<figure>`, score figures only (higher is better); checked
    # against what evaluation produces (medrega.metrics.figures) when params load
    metrics: list[str] = []


class RegisterConfig(Section):
    out: Path = Path("artifacts/register")
    model_name: str = "medrega"
    alias: str = "challenger"
    champion_alias: str = "champion"
    # merged: one full checkpoint copied into the MLflow model; adapter: base weights + LoRA
    # adapter copied in; reference: no copy, the version records the tuned checkpoint's DVC remote
    # and content hashes, and loading fetches and verifies them (checkpoints too big to store twice)
    weights: Literal["merged", "adapter", "reference"] = "merged"
    # inside `dvc exp run` register records "not registered" instead of creating a version and
    # moving `alias` (an 8-sample experiment must not become the challenger); true to register them
    in_experiments: bool = False
    gate: GateConfig = GateConfig()

    @model_validator(mode="after")
    def _aliases(self) -> "RegisterConfig":
        if self.alias == self.champion_alias:
            raise ValueError(f"alias and champion_alias must differ (both {self.alias!r})")
        return self


MiB = 1024 * 1024


class ServeConfig(Section):
    """Every bound the served model enforces (model.serve, and the pyfunc in process). Sizes in
    bytes, times in seconds."""

    # request
    max_header_bytes: int = Field(16 * 1024, gt=0)     # request line and headers together
    header_timeout_s: float = Field(10.0, gt=0)        # the headers must arrive within this (slowloris)
    max_body_bytes: int = Field(48 * MiB, gt=0)        # refused from Content-Length, or while reading, before parsing
    body_timeout_s: float = Field(30.0, gt=0)          # the whole body must arrive within this (slow senders)
    max_json_depth: int = Field(6, gt=0)               # the contract needs 4 (dataframe_split.data[row][cell])
    max_json_containers: int = Field(1024, gt=0)       # arrays + objects in one body
    max_rows: int = Field(64, gt=0)
    # fields
    max_question_chars: int = Field(4000, gt=0)
    max_image_bytes: int = Field(32 * MiB, gt=0)       # decoded size of one image
    max_image_pixels: int = Field(40_000_000, gt=0)    # from the header, before a pixel is decoded
    # generation
    max_new_tokens: int = Field(1024, gt=0)            # the most a request may ask for (params.max_new_tokens)
    deadline_s: float = Field(60.0, gt=0)              # per request, queueing included; generation stops at it
    workers: int = Field(1, gt=0)                      # generations at once
    max_queue: int = Field(8, ge=0)                    # requests admitted beyond the running ones; then 503
    # server
    max_connections: int = Field(64, gt=0)             # open connections; uvicorn answers 503 beyond
    graceful_shutdown_s: float = Field(10.0, gt=0)     # after SIGTERM/SIGINT, then in-flight requests are cut

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bools(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("must be a number, not true/false")
        return v


# -- the whole ----------------------------------------------------------------------------------

SECTIONS = ("data", "validate", "materialize", "model", "pretrain", "tokenizer", "align", "tune",
            "evaluate", "register")


class Config(Section):
    profile: str = BASE_PROFILE
    seed: int = 0
    data: DataConfig = DataConfig()
    # `validate` and `register` are also names of pydantic/ABC methods: the fields carry a
    # trailing underscore in code and their plain names in YAML
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    materialize: MaterializeConfig = MaterializeConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    align: AlignConfig = AlignConfig()
    tune: TuneConfig = TuneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    register_: RegisterConfig = Field(RegisterConfig(), alias="register")
    serve: ServeConfig = ServeConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, protected_namespaces=())

    @model_validator(mode="after")
    def _task_mixes(self) -> "Config":
        """Pretraining, tuning and evaluation choose among what materialize builds."""
        built = set(self.materialize.tasks)
        chosen = {f"pretrain.phases[{i}].tasks": p.tasks for i, p in enumerate(self.pretrain.phases)}
        chosen.update({"tune.tasks": self.tune.tasks, "evaluate.tasks": self.evaluate.tasks})
        for key, tasks in chosen.items():
            missing = sorted(set(tasks or []) - built)
            if missing:
                raise ValueError(f"{key} names {', '.join(missing)}, which materialize.tasks does not build "
                                 f"({', '.join(sorted(built))})")
        if self.register_.weights == "adapter" and self.tune.mode != "lora":
            raise ValueError("register.weights 'adapter' needs tune.mode 'lora'")
        self._gate_figures()
        return self

    def _gate_figures(self) -> None:
        """Each gate name must be a score figure evaluation produces for the evaluated tasks and
        languages (medrega.metrics.figures, the table the scorer checks itself against): a
        misspelt gate would read "not measured" on every version and protect nothing."""
        import difflib

        from medrega.metrics.figures import gate_names

        tasks = self.evaluate.tasks or self.materialize.tasks
        known = gate_names(tasks, self.materialize.langs)
        everything = [name for names in known.values() for name in names]
        for i, name in enumerate(self.register_.gate.metrics):
            if name in everything:
                continue
            task = name.split(".")[0]
            if task not in known:
                why = f"task {task!r} is not evaluated (evaluated: {', '.join(tasks)})"
            else:
                alike = [n for n in known[task] if n.count(".") == name.count(".")]
                close = difflib.get_close_matches(name, alike, n=3, cutoff=0.6)
                why = ("evaluation produces no such figure" + (f" (did you mean {', '.join(close)}?)" if close else "")
                       + f"; {task} figures: {', '.join(n for n in known[task] if n.count('.') == 1)}, "
                       f"each also as {task}.<lang>.<figure> for {', '.join(self.materialize.langs)}")
            raise ValueError(f"register.gate.metrics[{i}]: {name!r}: {why}")

    def section(self, name: str) -> Section:
        return getattr(self, name + "_" if name in ("validate", "register") else name)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able values, sections keyed as in params.yaml."""
        return self.model_dump(mode="json", by_alias=True)

    def merged(self, overlay: dict[str, Any]) -> "Config":
        """A copy with `overlay` deep-merged on top, validated again (tests, sweeps, CLI overrides)."""
        return _validate(deep_merge(self.as_dict(), overlay), "overrides")


def deep_merge(base: dict, overlay: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _where(loc: tuple) -> str:
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        elif item not in ("function-after", "function-before") and not str(item).startswith(("function-", "literal[")):
            parts.append(str(item))
    return ".".join(parts) or "(top level)"


def _validate(raw: dict[str, Any], source: str) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors(include_url=False):
            scalar = not isinstance(e.get("input"), (dict, list))
            got = f" (got {e.get('input')!r})" if scalar and e["type"] not in ("missing", "extra_forbidden") else ""
            message = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                message = "unknown key"
            problems.append(f"{_where(e['loc'])}: {message}{got}")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (the last would silently win)."""


def _mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the repository root or pass --params)")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def profiles(path: str | Path = DEFAULT_PARAMS) -> dict[str, Config]:
    """Every profile of a params file, each validated (a typo in an inactive profile is caught too)."""
    path = Path(path)
    raw = _read_yaml(path)
    overlays = raw.pop("profiles", None) or {}
    base_name = raw.pop("base_profile", BASE_PROFILE)
    raw.pop("profile", None)
    if not isinstance(overlays, dict):
        raise ConfigError(f"{path}: profiles must map profile names to overlays")
    out = {base_name: _validate({**raw, "profile": base_name}, f"{path} (profile {base_name})")}
    for name, overlay in overlays.items():
        if not isinstance(overlay, dict):
            raise ConfigError(f"{path}: profiles.{name} must be a mapping of sections")
        for section in ("data", "validate", "materialize", "align", "tune", "evaluate", "register"):
            moved = {"root"} if section == "data" else {"out"}
            hit = moved & set((overlay.get(section) or {}))
            if hit:
                # dvc.yaml templates these paths from params.yaml's top level: a profile that moved
                # them would make DVC track one place while the stage writes another
                raise ConfigError(f"{path}: profiles.{name}.{section}.{hit.pop()}: paths are the workspace's "
                                  "layout, shared by every profile; set them at the top level")
        out[name] = _validate({**deep_merge(raw, overlay), "profile": name}, f"{path} (profile {name})")
    return out


def active_profile(path: str | Path = DEFAULT_PARAMS, profile: str | None = None) -> str:
    if profile:
        return profile
    if os.environ.get(PROFILE_ENV):
        return os.environ[PROFILE_ENV]
    return str(_read_yaml(Path(path)).get("profile") or BASE_PROFILE)


def resolve(path: str | Path = DEFAULT_PARAMS, profile: str | None = None) -> Config:
    """The active profile of a params file (explicit, else MEDREGA_PROFILE, else `profile:`)."""
    name = active_profile(path, profile)
    known = profiles(path)
    if name not in known:
        raise ConfigError(f"{path}: unknown profile {name!r} (known: {', '.join(known)})")
    return known[name]


HEADER = ("# Generated by `medrega config resolve` from params.yaml (profile {profile}); do not edit.\n"
          "# DVC tracks this file as the params of every stage, and every process reads it.\n")


def write_resolved(config: Config, path: str | Path = RESOLVED) -> Path:
    """Write the resolved config (atomically; untouched when the content is the same, so its
    mtime does not move)."""
    from medrega import io

    path = Path(path)
    text = HEADER.format(profile=config.profile) + yaml.safe_dump(config.as_dict(), sort_keys=False,
                                                                   allow_unicode=True)
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        io.write_text(path, text)
    return path


def load_resolved(path: str | Path = RESOLVED) -> Config:
    """A resolved config file (params.resolved.yaml, or the copy a stage hands its workers)."""
    path = Path(path)
    raw = _read_yaml(path)
    if "profiles" in raw:
        raise ConfigError(f"{path}: has a 'profiles' section, so it is a params file, not a resolved "
                          "config (pass it with --params, or resolve it with `medrega config resolve`)")
    return _validate(raw, str(path))


def load(config: str | Path | None = None, params: str | Path = DEFAULT_PARAMS, profile: str | None = None) -> Config:
    """What every entry point calls: a resolved file when given, else params.yaml resolved now."""
    if config is not None:
        if profile:
            raise ConfigError(f"--config {config} is already resolved: it cannot take --profile {profile}")
        return load_resolved(config)
    return resolve(params, profile)
