"""Run configuration: YAML file + `--set key=value` overrides, validated before anything starts.

Every section forbids unknown keys, so a typo is an error rather than a silent default.
The resolved config is saved beside the run (`config.yaml`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .storage import Storage, as_storage


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = "resnet20"
    num_classes: int | None = Field(None, ge=1, description="default: the data set's class count")
    in_channels: int = Field(3, ge=1)


class DataConfig(Section):
    dataset: Literal["fashion_mnist", "cifar10", "image_folder", "synthetic"] = Field(
        "fashion_mnist", description="synthetic: random images at image_size (4 096 train, 1 024 test), for "
        "throughput and smoke runs; nothing to learn")
    root: str | None = Field(None, description="data directory (image_folder: has train/ and val/)")
    image_size: int = Field(224, ge=8, description="image_folder crop size; synthetic image size")
    val_size: float = Field(5000, gt=0, description="held-out validation images carved from train (count or fraction)")
    train_limit: int | None = Field(None, ge=1, description="use only this many training images (quick runs)")
    test_limit: int | None = Field(None, ge=1, description="evaluate on only this many test images")
    batch_size: int = Field(128, ge=1, description="global batch size across all training workers")
    eval_batch_size: int = Field(256, ge=1)
    num_threads: int = Field(2, ge=1, description="DALI threads per worker")
    skip_bad: bool = Field(False, description="skip corrupt/non-image files and empty classes with a warning")
    verify: Literal["none", "header", "decode"] = Field(
        "header", description="image_folder: how the driver checks each file when it indexes the folder once: "
        "none (listing only), header (JPEG/PNG signature), decode (a full decode; catches truncated files)")


class TrainConfig(Section):
    total_epochs: int = Field(200, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["multistep", "cosine"] = "multistep"
    milestones: list[int] = Field(default_factory=lambda: [60, 120, 160, 190])
    gamma: float = Field(0.1, gt=0, le=1)
    keep_momentum: bool = Field(True, description="slice optimizer momentum to the kept channels (False: reset, as the reference)")
    steps_per_epoch: int | None = Field(None, ge=1, description="cap on optimizer steps per epoch (quick runs)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="training/evaluation arithmetic: auto = bf16 autocast on GPU, fp32 on CPU; bf16 also "
        "applies on the CPU (slow without native bf16 instructions)")
    channels_last: Literal["auto"] | bool = Field("auto", description="channels_last memory format; auto = on GPU only")
    compile: bool = Field(False, description="torch.compile the training forward; compiled afresh after every prune")
    compile_backend: str = Field("inductor", description="torch.compile backend (torch._dynamo.list_backends())")
    progress_bar: bool = Field(True, description="tqdm progress bars on the coordinator (rank 0)")

    @model_validator(mode="after")
    def _backend_known(self) -> "TrainConfig":
        if self.compile:
            import torch._dynamo

            known = torch._dynamo.list_backends(exclude_tags=())
            if self.compile_backend not in known:
                raise ValueError(f"unknown compile_backend {self.compile_backend!r}; known: {', '.join(known)}")
        return self

    @model_validator(mode="before")
    @classmethod
    def _migrate_bf16(cls, data: Any) -> Any:
        """Configs saved before `precision` (`bf16: bool`, GPU-only `channels_last: bool`) keep their meaning."""
        if isinstance(data, dict) and "bf16" in data:
            data = dict(data)
            bf16 = data.pop("bf16")
            data.setdefault("precision", "auto" if bf16 else "fp32")
            if data.get("channels_last") is True:
                data["channels_last"] = "auto"
        return data


class PruneConfig(Section):
    start_epoch: int = Field(50, ge=0)
    target_flops_reduction: float = Field(0.5, gt=0, lt=1)
    step_flops: float = Field(0.01, gt=0, lt=1)
    recover_flops: float = Field(0.02, gt=0, lt=1)
    recover_epochs: int = Field(6, ge=0)
    max_prune_ratio: float = Field(0.75, gt=0, lt=1)
    criteria: list[str] = Field(default_factory=lambda: ["l1", "l2", "fpgm", "cosine"], min_length=1)
    aggregation: Literal["group", "root"] = "group"
    search: Literal["reference", "exact", "adaptive"] = "exact"
    subset_size: int = Field(10000, ge=1)
    subset_shards: int = Field(8, ge=1)
    shard_batch_size: int = Field(500, ge=1)
    bn_recalibration: int = Field(0, ge=0, description="images of the subset used to re-estimate BN stats per candidate (0: off)")
    adaptive_confidence: float = Field(0.999, gt=0.5, lt=1)
    selection: Literal["loss", "importance"] = Field(
        "loss", description="how a round picks its candidate: 'loss' (lowest subset loss: LAASP) or 'importance' "
        "(lowest normalised criterion importance removed per FLOP removed, no subset forwards: a global-ranking control)")
    taylor_images: int | None = Field(None, ge=1, description="images of the scoring subset (from its start) in the "
                                      "`taylor` criterion's gradient pass; None: the whole subset")
    # real speed (docs/latency.md): rounded widths, and a latency target sized by a per-layer latency table
    round_to: int | Literal["auto"] = Field(
        "auto", description="keep every group's width a multiple of N; auto: 8 with use_gpu, the CPU's float32 "
        "vector lanes otherwise (resolved when the run's config is built)")
    target: Literal["flops", "latency"] = Field("flops", description="what target and steps measure")
    target_latency_reduction: float = Field(0.35, gt=0, lt=1, description="with target=latency: fraction of the "
                                            "unpruned network's latency to remove (steps follow the table's estimate; "
                                            "measured checks, latency_checks, keep the measurement honest)")
    latency_checks: int = Field(4, ge=0, description="with target=latency: before a recovery within recover_latency "
                                "of the target, time the network against its unpruned original and aim the estimate "
                                "where the target would be measured; at most this many checks in a run (0: trust "
                                "the table's estimate)")
    step_latency: float = Field(0.01, gt=0, lt=1, description="with target=latency: estimated latency per candidate")
    recover_latency: float = Field(0.02, gt=0, lt=1, description="with target=latency: recovery after this much")
    latency_table: str | None = Field(None, description="a `laasp-dist latency-table` file; none with "
                                      "target=latency: the run measures one on its own device")
    latency_batch: int = Field(256, ge=1, description="batch size of the table a run measures itself")
    score_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="arithmetic of candidate scoring; auto = the training's (train.precision resolved on "
        "the training device)")

    @field_validator("round_to", mode="before")
    @classmethod
    def _round_to(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"must be a positive integer or 'auto' (got {value!r})")

    def goal(self) -> tuple[float, float, float]:
        """(target, step, recovery spacing), as fractions of the original FLOPs or estimated latency (`target`)."""
        if self.target == "latency":
            return self.target_latency_reduction, self.step_latency, self.recover_latency
        return self.target_flops_reduction, self.step_flops, self.recover_flops

    @model_validator(mode="after")
    def _criteria_known(self) -> "PruneConfig":
        from .pruning.criteria import get_criterion

        for name in self.criteria:
            get_criterion(name)
        if len(set(self.criteria)) != len(self.criteria):
            raise ValueError("criteria must not repeat")
        return self


class RayConfig(Section):
    address: str | None = Field(None, description="Ray cluster address; None starts an embedded local Ray")
    num_workers: int = Field(2, ge=1, description="Ray Train (DDP) workers")
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1)
    search_workers: int = Field(2, ge=1, description="Ray actors scoring candidates")
    search_executor: Literal["auto", "actors", "ranks", "local"] = Field(
        "auto", description="where candidates are scored: 'actors' (search_workers Ray actors), 'ranks' (the "
        "training ranks, idle during a round, each scoring its share of the shards on its own device), 'local' "
        "(the coordinator alone); auto = actors")
    search_gpu_fraction: float = Field(
        0.25, gt=0, lt=0.5, description="with use_gpu and actors: the share of a GPU each search actor asks Ray "
        "for; each training worker asks for the rest of its GPU, so one actor fits beside every training worker")
    gpu_share: float = Field(
        1.0, gt=0, le=1, description="with use_gpu: the share of one GPU that a training worker and the search "
        "actors beside it take together; below 1 several runs share a GPU (a sweep's trials, --max-concurrent). "
        "A run of several training workers must leave each more than half a GPU (NCCL refuses two ranks on one)")
    collective_timeout_s: int = Field(1800, ge=10, description="torch.distributed timeout; covers a whole search round, during which non-coordinator ranks wait")
    max_failures: int = Field(3, ge=-1, description="times Ray Train restarts the worker group after a worker or node "
                              "failure, continuing from the last checkpoint (-1: no limit, 0: stop at the first)")
    placement_strategy: Literal["PACK", "SPREAD"] = Field(
        "PACK", description="how Ray places the training workers: PACK fills nodes, SPREAD puts them on distinct nodes")


class RunConfig(Section):
    name: str = "run"
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        from .models import model_entry

        model_entry(self.model.name)
        if self.prune.start_epoch >= self.train.total_epochs:
            raise ValueError("prune.start_epoch must be before train.total_epochs")
        if self.prune.subset_shards > self.prune.subset_size:
            raise ValueError("prune.subset_shards cannot exceed prune.subset_size")
        if (self.prune.taylor_images or 0) > self.prune.subset_size:
            raise ValueError("prune.taylor_images cannot exceed prune.subset_size")
        if self.prune.round_to == "auto":  # the resolved value is what config.yaml keeps and a resume compares
            from .latency import resolve_round_to

            self.prune.round_to = resolve_round_to("auto", "cuda" if self.ray.use_gpu else "cpu")
        r = self.ray
        worker_share = gpu_shares(self)[0]
        if r.use_gpu and r.num_workers > 1 and worker_share <= 0.5:
            raise ValueError(f"ray.num_workers={r.num_workers} training workers would keep {worker_share} of a "
                             f"GPU each (ray.gpu_share={r.gpu_share}, less the search actors beside them at "
                             f"ray.search_gpu_fraction={r.search_gpu_fraction}): two could share a GPU, which NCCL "
                             f"refuses; raise ray.gpu_share or lower ray.search_workers / ray.search_gpu_fraction")
        return self


def executor_kind(config: RunConfig) -> str:
    """Where the run scores candidates: ``ray.search_executor`` with auto resolved; ``local`` for importance
    selection, which scores nothing."""
    kind = config.ray.search_executor
    if config.prune.selection == "importance":
        return "local"
    return "actors" if kind == "auto" else kind


def gpu_shares(config: RunConfig) -> tuple[float, float]:
    """(GPUs per training worker, GPUs per search actor) that the run asks Ray for.

    CPU runs: (0, 0). GPU runs: a training worker and the search actors beside it take
    ``ray.gpu_share`` of a GPU together (1 by default; less packs several runs on one GPU).
    With search actors, each takes ``ray.search_gpu_fraction`` of that share and a training
    worker the rest after the actors beside it (``ceil(search_workers / num_workers)``; validated
    to leave each of several training workers more than half a GPU, so two never land on one GPU).
    """
    r = config.ray
    if not r.use_gpu:
        return 0.0, 0.0
    if executor_kind(config) != "actors":
        return r.gpu_share, 0.0
    per_gpu = -(-r.search_workers // r.num_workers)
    actor = r.gpu_share * r.search_gpu_fraction
    return round(r.gpu_share - per_gpu * actor, 4), round(actor, 4)


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {key}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["prune.step_flops=0.02", ...]` → nested dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        _set_dotted(out, key.strip(), yaml.safe_load(raw))
    return out


def merge_dicts(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = merge_dicts(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def build_config(data: dict[str, Any]) -> RunConfig:
    """Validate a config dict; the first problem becomes a one-line ConfigError."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "config"
        raise ConfigError(f"config error at {where}: {err['msg']}") from None
    except ConfigError as exc:
        raise ConfigError(f"config error: {exc}") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read YAML (if given: a local path or a URI), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(as_storage(path).read_text("")) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping")
    return build_config(merge_dicts(data, parse_overrides(list(overrides))))


def save_config(config: RunConfig, location: str | Path | Storage) -> None:
    """Write the resolved config as YAML (a local path or a URI)."""
    as_storage(location).write_text("", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
