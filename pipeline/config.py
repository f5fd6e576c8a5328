"""One typed config tree: defaults, then a YAML file, then dotted ``key=value`` overrides.

Every field carries a docstring right under it. ``load_config`` raises
:class:`ConfigError` naming the offending key (and the nearest valid key) for an
unknown key or a value of the wrong type; the jobs turn that into exit code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


@dataclass
class DataConfig:
    train: str = ""
    """Training shards: a directory written by ``jobs.make_shards`` (its ``train/``), a glob, or a pyarrow URI (s3://...)."""
    eval: str = ""
    """Held-out shards evaluated at the end of training (``OUT/holdout``); empty = no evaluation."""
    exemplars: str = ""
    """Class-exemplar shards the miner embeds at each refresh (``OUT/exemplars``); empty = the ``exemplars/`` sibling of ``data.train``'s directory when it exists. Used only with ``miner.enabled``."""
    cache_dir: str = ""
    """Node-local directory for copies of shard sets given as URIs (``data.train=s3://bucket/OUT/train``): the manifest and index on first use, each shard on first read, checked against the manifest's sha256 (``pipeline.data.cache``); empty = ``~/.cache/dml-pipeline/shards``. Local shard sets are read in place."""
    image_size: int = 0
    """Side of the square images fed to the network; 0 = the size the training shards were written at (their manifest), or 64 when they keep source sizes. A size that differs from the shards' is allowed (images are resized at every read) and announced once."""
    decode_concurrency: int = 2
    """Actors per rank that fetch (by index) and decode their rank's slices (JPEG bytes -> pixels), in parallel."""
    class_sampling: Literal["uniform", "proportional"] = "uniform"
    """How the planner draws a step's classes without the miner: ``uniform`` among the classes with enough unused samples, or ``proportional`` to what they have left (classes then run out together, fewer leftovers at the end of a pass)."""
    max_lead: int = 0
    """Steps the batch planner may plan ahead of the slowest rank's training; 0 = 2 x max(``decode_concurrency``, 2) x 32 (128 by default), with or without the miner. The stream's Ray Data blocks hold lead / (2 x max(``decode_concurrency``, 2)) steps (``pipeline.data.stream.stream_shape``). With the miner, a step's classes are selected up to that many steps before it trains, so its class embeddings are about lead + ``miner.refresh_every`` / 2 steps old; a smaller lead makes them fresher but the blocks smaller, and Ray Data's cost per block grows: lead 20 (blocks of 5 steps) cost +24% of wall time against lead 128 on 2 cores (quickstart data, no Recall@1 gained) and, on a 1,200-class set, gained 2.6 points of Recall@1 at 1000 steps for +60-85% of wall time (BENCHMARKS.md, mining at 1000 steps)."""
    decode_device: Literal["cpu", "cuda"] = "cpu"
    """Where training images are decoded: ``cpu`` (the stream's fetch actors decode and flip, rows carry pixels) or ``cuda`` (rows carry the JPEG bytes; each training process decodes its batch on its own GPU with ``torchvision.io.decode_jpeg`` and flips there; needs ``scaling.use_gpu``)."""
    augment: Literal["none", "flip", "crop", "flip_crop"] = "none"
    """Training augmentation: ``none``; ``flip`` (a random half of the images mirrored left-right); ``crop`` (pad-and-crop: each image moved by up to 1/8 of its side, the border repeating the edge pixels); ``flip_crop`` (both). Drawn per sample and step from ``train.seed``, so a resumed step sees the same images. Flip only where a mirror image shows the same class (faces, most vehicles, natural objects), never where it shows another class or none (text, digits, signs, handed or asymmetric objects): the default is the safe ``none``. The old booleans still load: true = ``flip``, false = ``none``."""
    epochs: int = 0
    """Passes over the training samples the planner may start; 0 = as many as ``train.steps`` needs (a run that needs more stops with an error)."""
    max_bad_fraction: float = 0.01
    """Stop with an error naming the files when bad samples (every reason except ``small_class``: undecodable or cut JPEGs, missing labels or images, labels outside the manifest, cut tars, empty shards) exceed this fraction of the samples seen; enforced once 200 samples were seen. Bad samples are always skipped, counted per reason (``data/bad_*`` metrics) and listed in the run's ``data_report.json``."""


@dataclass
class ModelConfig:
    backbone: Literal["tiny", "small", "resnet18", "resnet34", "resnet50", "iresnet18", "iresnet50"] = "resnet18"
    """torchvision backbone: resnet18, resnet34, resnet50; ``iresnet50`` / ``iresnet18`` (ArcFace's face trunk for 112x112 images); ``small`` (a 4-conv CNN for CPU runs, ~13 M multiply-adds per 64 px image, ~1/11 of resnet18's); or ``tiny`` (~3.4 M, for tests)."""
    embedding_dim: int = 128
    """Size of the embedding the loss sees."""
    normalize: bool = False
    """L2-normalise the embedding (Sohn's N-pair loss uses unnormalised embeddings + an L2 penalty)."""
    weights: str = ""
    """Optional local path to backbone weights (nothing is downloaded)."""
    head: Literal["linear", "linear_bn"] = "linear"
    """Embedding head: ``linear`` (a Linear layer) or ``linear_bn`` (Linear then BatchNorm1d, the face-recognition habit)."""
    arch: Literal["embedding", "mixed_diff"] = "embedding"
    """``embedding`` (backbone + head) or ``mixed_diff`` (Liu et al. 2016's Mixed Difference Network: a vehicle-model branch with a softmax classifier and an instance branch, fused into the embedding; needs shards with ``model`` labels)."""
    num_vehicle_models: int = 250
    """mixed_diff: classes of the vehicle-model classifier (VehicleID: 250); labels must be below it."""
    norm: Literal["batch", "group", "sync_batch"] = "batch"
    """Normalisation layers: ``batch`` (BatchNorm, as published; in a DDP job each rank's statistics are its own rows'), ``group`` (GroupNorm in the backbone, up to 32 groups: per image, no batch statistics) or ``sync_batch`` (every BatchNorm layer takes its statistics over the global batch of all ranks, on any backend, gloo included). Measured on held-out classes (BENCHMARKS.md, factor table): ``batch`` beats ``group`` by 19 points with random batches and by 46 with mining, and ``sync_batch`` by 2.5 (per-rank statistics of 8 classes vs the global batch's 16)."""


@dataclass
class LossConfig:
    name: Literal["npair_mc", "npair_ovo", "triplet", "tuplet", "contrastive", "coupled_clusters"] = "npair_mc"
    """npair_mc, npair_ovo, triplet, tuplet, contrastive or coupled_clusters."""
    l2_reg: float = 0.002
    """Weight of the mean squared embedding norm (Sohn 2016's regulariser, N-pair losses)."""
    margin: float | None = None
    """Margin of triplet / contrastive / coupled clusters losses; empty = the loss's default."""
    negatives: Literal["all", "one"] = "all"
    """Triplet loss only: ``all`` valid triplets of the batch (batch-all, a strong baseline) or ``one`` random negative per (anchor, positive) pair, Sohn 2016's triplet baseline (drawn from a generator seeded by ``train.seed``)."""
    scale: float = 0.0
    """N-pair losses only: 0 = Sohn's unnormalised inner products (with ``l2_reg``); s > 0 = s x cosine similarity of L2-normalised embeddings (1 = pytorch-metric-learning's ``NPairsLoss`` default; larger sharpens the softmax, as NormFace's scale)."""
    cross_rank: bool | None = None
    """Gather embeddings across DDP ranks so negatives span the global batch; empty = on when world size > 1."""
    model_branch_weight: float = 1.0
    """mixed_diff: weight of the vehicle-model cross-entropy added to the metric loss (samples of unknown model are left out)."""


@dataclass
class BatchConfig:
    classes_per_batch: int = 16
    """N: distinct classes in one (global) training batch."""
    images_per_class: int = 2
    """Images of each class in a batch (2 for N-pair)."""


@dataclass
class MinerConfig:
    enabled: bool = False
    """Hard negative class mining (Sohn 2016); off = random classes."""
    refresh_every: int = 20
    """Refresh the class embeddings from the exemplars every this many steps (``miner.source: exemplars``)."""
    pool_classes: int = 64
    """C: candidate classes per step that the miner chooses N from (Sohn's 'large random set of C classes'); see ``miner.candidates``."""
    candidates: Literal["random", "knn"] = "random"
    """How the C candidates are drawn: ``random`` (uniformly from all classes with unused samples, Sohn's set) or ``knn`` (a random seed class and its C - 1 nearest active classes by FAISS over all class embeddings, per ``miner.index``: at 100k+ classes a random set holds almost no look-alikes). Seeds without an embedding yet, and missing neighbours, are drawn at random and counted (``mine/knn_filled``)."""
    source: Literal["exemplars", "ema"] = "exemplars"
    """Where class embeddings come from: ``exemplars`` (Sohn: embed ``exemplars_per_class`` images per class with recent weights every ``refresh_every`` steps) or ``ema`` (each rank pushes the per-class means of the embeddings it just trained, every ``push_every`` steps, without waiting; the miner keeps an EMA per class: no extra forward pass, scales to millions of classes, but a class's embedding is only as fresh as its last batch)."""
    refresh_by: Literal["auto", "refresher", "trainers"] = "auto"
    """Who embeds the exemplars (``source: exemplars``): ``refresher`` (an actor running Ray Data tasks; with ``scaling.use_gpu`` each asks a GPU, which never frees up while training holds every GPU), ``trainers`` (each training worker embeds 1/W of them under no_grad every ``refresh_every`` steps and pushes them: works on a full GPU cluster) or ``auto`` (``trainers`` with ``scaling.use_gpu``, else ``refresher``)."""
    refresh_classes: int = 0
    """Classes whose exemplars one trainer-side refresh embeds (``refresh_by: trainers``), a rolling window over all classes, split across the ranks; 0 = every class at every refresh. Bounds a refresh's cost at many classes (WebFace42M: 4M exemplars) to what it refreshes; a class's embedding is then refreshed every classes / refresh_classes refreshes."""
    ema_momentum: float = 0.5
    """``source: ema``: weight of a class's old embedding in each update, in [0, 1) (0 = the latest batch's mean only)."""
    push_every: int = 10
    """``source: ema``: steps of class means each rank gathers before one push to the miner."""
    exemplars_per_class: int = 2
    """Images per class embedded at a refresh."""
    warmup_steps: int = 0
    """Global steps whose classes are drawn uniformly before the miner selects them (0: mine from the first step); the refreshes run from the start, so the miner is ready when mining begins. Trained from scratch on a hard data set, the young embedding puts together classes it cannot tell apart yet, and the greedy step then trains on one such cluster at a time (BENCHMARKS.md, mining at 1000 steps)."""
    hardness_every: int = 50
    """Every this many steps the planner adds a uniformly drawn side batch to every rank's slice and rank 0 logs the hardness of the trained batch against it (``mine/*`` vs ``mine/random_*``, gathered over ranks: is mining picking harder batches?); 0 = never. Each sample costs every rank a no-grad forward and the decoding of a side batch as large as its own: at 10 that was ~3% of the compute plus 10% more images decoded (BENCHMARKS.md, mining's wall time)."""
    select_at: Literal["auto", "planner", "miner"] = "auto"
    """Where Sohn's greedy step runs: ``miner`` (the planner asks the miner actor at every step), ``planner`` (on a copy of the miner's class table that the planner refreshes every few steps without waiting: no actor call per step; the table sent is C x (8 + 4 d) bytes, 21.6 MB at CASIA-WebFace at d = 512, the copy with its sorted id index C x (24 + 4 d), 21.8 MB) or ``auto`` (``planner`` for tables of up to 64 MiB, 32k classes at d = 512; else ``miner``)."""
    index: Literal["flat", "ivf", "hnsw"] = "flat"
    """FAISS index of class embeddings: flat, ivf or hnsw."""
    num_gpus: float = 0.0
    """GPU share the miner actor reserves from Ray (e.g. 0.1); > 0 puts a flat index on that GPU, 0 keeps FAISS on the CPU (the miner never touches a GPU it did not reserve)."""
    timeout_s: float = 2.0
    """Seconds to wait for the miner before falling back to random classes."""

    def resolved_refresh_by(self, use_gpu: bool) -> str:
        """``refresher`` or ``trainers``: who embeds the exemplars with ``scaling.use_gpu`` = ``use_gpu``."""
        if self.refresh_by != "auto":
            return self.refresh_by
        return "trainers" if use_gpu else "refresher"


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps (each consumes one global batch)."""
    lr: float = 0.01
    """Learning rate."""
    optimizer: Literal["sgd", "adam"] = "sgd"
    """sgd (momentum 0.9) or adam."""
    weight_decay: float = 5e-4
    """Weight decay of the optimizer, on weights only: biases and normalisation layers' weights (every 1-d parameter) are not decayed (``pipeline.train.step.param_groups``)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Forward/backward precision: ``fp32``; ``bf16`` (autocast, on CUDA and on CPUs torch supports it for; losses in fp32); ``fp16`` (autocast with a gradient scaler; CUDA only: needs ``scaling.use_gpu``)."""
    lr_schedule: Literal["constant", "cosine", "step"] = "constant"
    """Learning-rate schedule after the warm-up: ``constant``; ``cosine`` (from ``train.lr`` down to 0 at ``train.steps``); ``step`` (times ``train.lr_gamma`` at each of ``train.lr_milestones``). Logged as ``train/lr``."""
    warmup_steps: int = 0
    """Steps of linear warm-up from ``train.lr / warmup_steps`` to ``train.lr``; 0 = none. A warm-up as long as the run or longer (a short test run of a real config) warms up for the whole run."""
    lr_milestones: list[int] = field(default_factory=list)
    """``step`` schedule: the steps at which the learning rate is multiplied by ``train.lr_gamma``."""
    lr_gamma: float = 0.1
    """``step`` schedule: the factor applied at each milestone."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value before each optimizer step; 0 = off. The norm before clipping is logged (``train/grad_norm``) at log steps."""
    compile: bool = False
    """``torch.compile`` the model (first steps are slower while it compiles; needs a C++ compiler on CPU)."""
    channels_last: bool = True
    """Keep the model's weights and activations in channels-last memory format (faster convolutions on GPUs with tensor cores and on recent CPUs)."""
    seed: int = 0
    """Seeds model init, augmentation and batch composition."""
    log_every: int = 10
    """Print and log metrics every this many steps."""
    checkpoint_every: int = 0
    """Report a checkpoint every this many steps; 0 = only at the end."""
    storage_path: str = ""
    """Where Ray Train keeps checkpoints: a local path or a pyarrow filesystem URI (s3://, gs://); empty = ./runs. On a multi-node cluster a local path must be absolute and on storage every node shares (checked before training starts)."""
    run_name: str = ""
    """Name of the Ray Train / MLflow run; empty = generated. Rerunning a job with the same name (and ``storage_path``) resumes it from its latest checkpoint, in the same MLflow run."""
    max_failures: int = 0
    """Worker-group restarts Ray Train may do before giving up (each resumes from the latest checkpoint); -1 = no limit."""
    sample_ledger: str = ""
    """Debugging/audit aid: a directory where every rank appends one JSON line per trained step (rank, pid, step resumed from, step, the batch's ``sample_ids``), to check that a resumed run trains no sample twice; empty = off. Needs a file system shared by all workers."""


@dataclass
class ScalingConfig:
    num_workers: int = 2
    """DDP workers (one per GPU on a cluster)."""
    use_gpu: bool = False
    """One GPU per worker, nccl backend."""
    cpus_per_worker: float = 1.0
    """Logical CPUs reserved by each training worker."""
    num_cpus: int = 0
    """Logical CPUs declared when starting a local Ray instance; 0 = max(16, 8 x cores)."""


@dataclass
class TrackingConfig:
    uri: str = ""
    """MLflow tracking URI; empty = sqlite:///mlflow.db in the working directory."""
    experiment: str = "dml"
    """MLflow experiment name."""
    retry_s: float = 120.0
    """Seconds the driver keeps retrying MLflow at the start of a run (experiment, run, params, config) and at its end (final metrics, artifacts, run status) when the server is unreachable or times out; during training, metrics are buffered instead and never block a step."""
    register_model: str = ""
    """Register the run's logged model (``runs:/<run id>/model``) under this name in the MLflow model registry (a new version per run: ``models:/NAME/1``, ...); empty = log it without registering."""


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """K of Recall@K."""
    batch_size: int = 128
    """Images per inference batch."""
    every: int = 0
    """Evaluate on ``eval.data`` every this many steps during training, on rank 0 (0 = only at the last step). Each evaluation's metrics go to MLflow at its step, a checkpoint is saved with it, and the checkpoint with the best ``eval.metric`` is the run's result: the end-of-run evaluation and the logged model use it (``pipeline.eval.heldout``)."""
    metric: str = "recall@1"
    """What picks the best checkpoint (higher is better): ``recall@K`` for a K of ``eval.ks``, ``map@r``, ``nmi`` or ``f1``."""
    data: str = ""
    """Shards evaluated during training; empty = ``data.eval``. Choosing the best checkpoint on the set that the final figures come from flatters them: give a separate validation split here for an unbiased ``data.eval`` (``python -m jobs.make_shards --val-fraction F`` writes one to ``OUT/val``). A ``val`` or ``holdout`` split of a shard set, never ``train``."""
    max_images: int = 2000
    """At most this many images of ``eval.data`` are evaluated during training (whole shards in a seeded order; decoded once, kept in rank 0's memory). The end-of-run evaluation uses all of ``data.eval``."""
    untrained: bool = False
    """Also evaluate the untrained network at the end of the run (``untrained_*`` metrics: the baseline that training must beat)."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    """Shards and decoding."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone and embedding head."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Metric learning objective."""
    batch: BatchConfig = field(default_factory=BatchConfig)
    """Batch composition."""
    miner: MinerConfig = field(default_factory=MinerConfig)
    """Hard negative class mining."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and checkpoints."""
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    """Workers and devices."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check cross-field constraints; raises ConfigError naming the key."""
        checks = [
            ("batch.classes_per_batch", self.batch.classes_per_batch >= 2, "must be >= 2 (negatives need another class)"),
            ("batch.images_per_class", self.batch.images_per_class >= 2, "must be >= 2 (positives need a pair)"),
            ("scaling.num_workers", self.scaling.num_workers >= 1, "must be >= 1"),
            ("train.steps", self.train.steps >= 1, "must be >= 1"),
            ("train.lr", self.train.lr > 0, "must be > 0"),
            ("train.max_failures", self.train.max_failures >= -1, "must be >= -1 (-1 = no limit)"),
            ("train.checkpoint_every", self.train.checkpoint_every >= 0, "must be >= 0 (0 = only at the end)"),
            ("tracking.retry_s", self.tracking.retry_s >= 0, "must be >= 0"),
            ("data.max_lead", self.data.max_lead >= 0, "must be >= 0 (0 = 2 x max(data.decode_concurrency, 2) x 32)"),
            ("data.decode_concurrency", self.data.decode_concurrency >= 1, "must be >= 1"),
            ("data.image_size", self.data.image_size == 0 or self.data.image_size >= 16,
             "must be 0 (the shards' size) or >= 16"),
            ("model.embedding_dim", self.model.embedding_dim >= 1, "must be >= 1"),
            ("model.num_vehicle_models", self.model.num_vehicle_models >= 1, "must be >= 1"),
            ("loss.model_branch_weight", self.loss.model_branch_weight >= 0, "must be >= 0"),
            ("train.warmup_steps", self.train.warmup_steps >= 0, "must be >= 0"),
            ("train.grad_clip", self.train.grad_clip >= 0, "must be >= 0 (0 = off)"),
            ("train.lr_gamma", self.train.lr_gamma > 0, "must be > 0"),
            ("train.lr_milestones", list(self.train.lr_milestones) == sorted(set(self.train.lr_milestones))
             and all(m > 0 for m in self.train.lr_milestones), "must be increasing steps >= 1"),
            ("miner.refresh_every", self.miner.refresh_every >= 1, "must be >= 1"),
            ("miner.pool_classes", self.miner.pool_classes >= 1, "must be >= 1"),
            ("miner.warmup_steps", self.miner.warmup_steps >= 0, "must be >= 0 (0 = mine from the first step)"),
            ("miner.hardness_every", self.miner.hardness_every >= 0, "must be >= 0 (0 = no hardness samples)"),
            ("miner.ema_momentum", 0.0 <= self.miner.ema_momentum < 1.0, "must be in [0, 1)"),
            ("miner.push_every", self.miner.push_every >= 1, "must be >= 1"),
            ("miner.refresh_classes", self.miner.refresh_classes >= 0, "must be >= 0 (0 = every class)"),
            ("miner.num_gpus", 0.0 <= self.miner.num_gpus <= 1.0, "must be in [0, 1] (a share of one GPU)"),
            ("train.precision", self.train.precision != "fp16" or self.scaling.use_gpu,
             "fp16 needs scaling.use_gpu=true (on a CPU use bf16 or fp32)"),
            ("eval.every", self.eval.every >= 0, "must be >= 0 (0 = only at the last step)"),
            ("eval.max_images", self.eval.max_images >= 4, "must be >= 4"),
            ("eval.metric", self.eval.metric in eval_metrics(self.eval.ks),
             f"must be one of {', '.join(eval_metrics(self.eval.ks))}, got {self.eval.metric!r}"),
            ("data.decode_device", self.data.decode_device == "cpu" or self.scaling.use_gpu,
             "cuda needs scaling.use_gpu=true (the training process decodes on its GPU; "
             "on a machine without one use cpu)"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"config key '{key}' {why}")
        if self.batch.classes_per_batch % self.scaling.num_workers:
            raise ConfigError(
                f"config key 'batch.classes_per_batch' ({self.batch.classes_per_batch}) must be divisible by "
                f"'scaling.num_workers' ({self.scaling.num_workers}): each rank gets the same number of classes"
            )
        if self.loss.negatives != "all" and self.loss.name != "triplet":
            raise ConfigError(
                f"config key 'loss.negatives' ({self.loss.negatives}) applies to loss.name=triplet only, "
                f"got loss.name={self.loss.name}; leave it at 'all'"
            )
        if self.loss.scale < 0 or (self.loss.scale and not self.loss.name.startswith("npair")):
            raise ConfigError(
                f"config key 'loss.scale' ({self.loss.scale}) must be >= 0 and applies to loss.name=npair_mc or "
                f"npair_ovo only, got loss.name={self.loss.name}; leave it at 0"
            )
        if self.loss.name.startswith("npair") and self.batch.images_per_class != 2:
            raise ConfigError("config key 'batch.images_per_class' must be 2 for the N-pair losses")


def eval_metrics(ks) -> tuple[str, ...]:
    """The metrics ``eval.metric`` may name, given ``eval.ks``."""
    return (*(f"recall@{k}" for k in ks), "map@r", "nmi", "f1")


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        keys.append(name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _all_keys(hints[f.name], name + ".")
    return keys


def _unknown(key: str) -> ConfigError:
    near = difflib.get_close_matches(key, _all_keys(Config), n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


LEGACY_VALUES: dict[str, dict[bool, str]] = {"data.augment": {True: "flip", False: "none"}}
"""Keys that were booleans once: the value each boolean (YAML true/false/yes/no) stands for now."""


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Return ``value`` converted to ``typ`` (strings from the command line are parsed as YAML first)."""
    origin = typing.get_origin(typ)
    if key in LEGACY_VALUES:
        legacy = value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            legacy = yaml.safe_load(value)  # the command line's 'data.augment=true'
        if isinstance(legacy, bool):
            return LEGACY_VALUES[key][legacy]
    if origin is Literal:
        return _choice(key, value, typing.get_args(typ))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "null", "none")):
            return None
        return _coerce(key, value, args[0])
    if origin is list:
        (item,) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return [_coerce(key, v, item) for v in value]
    if isinstance(value, str) and typ is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass  # stays a string; the type check below names the key
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, which reads '1e-3' (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"config key '{key}' expects {typ.__name__}, got {value!r} ({type(value).__name__})")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` when it is one of ``choices``; else ConfigError naming the key, the nearest choice and all of them."""
    if isinstance(value, str) and value in choices:
        return value
    near = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.0)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    raise ConfigError(f"config key '{key}' must be one of {', '.join(choices)}, got {value!r}{hint}")


def choices(key: str) -> tuple[str, ...]:
    """The fixed set of values of config ``key`` (a ``Literal`` field, e.g. ``loss.name``); () for a free field."""
    target: Any = Config
    parts = key.split(".")
    for part in parts[:-1]:
        target = typing.get_type_hints(target)[part]
    typ = typing.get_type_hints(target)[parts[-1]]
    return typing.get_args(typ) if typing.get_origin(typ) is Literal else ()


def _apply(obj: Any, key: str, value: Any) -> None:
    parts = key.split(".")
    target = obj
    for depth, part in enumerate(parts):
        hints = typing.get_type_hints(type(target))
        if part not in hints:
            raise _unknown(key)
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(hints[part]):
                if not isinstance(value, dict):
                    raise ConfigError(f"config key '{key}' is a section; give a mapping or set '{key}.<field>'")
                for sub, v in value.items():
                    _apply(obj, f"{key}.{sub}", v)
            else:
                setattr(target, part, _coerce(key, value, hints[part]))
        else:
            if not dataclasses.is_dataclass(hints[part]):
                raise _unknown(key)
            target = getattr(target, part)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _defaults() -> Config:
    # Bypass __post_init__: validation runs once, after file and overrides are applied.
    cfg = Config.__new__(Config)
    for f in dataclasses.fields(Config):
        setattr(cfg, f.name, f.default_factory())
    return cfg


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a validated Config from :func:`to_dict` output (e.g. inside a Ray worker)."""
    cfg = _defaults()
    for key, value in _flatten(d).items():
        _apply(cfg, key, value)
    cfg.validate()
    return cfg


CONFIG_DIRS = (Path(__file__).resolve().parent / "configs", Path(__file__).resolve().parents[1] / "configs")
"""Where ``--config NAME`` is looked up when NAME is not a file: the copy installed with the
package (``pipeline/configs/``), then a checkout's ``configs/``."""


def find_config(path: str | Path) -> Path:
    """The config file ``path`` names: the file itself, else ``configs/<name>`` shipped with the package.

    ``quickstart``, ``quickstart.yaml`` and ``configs/quickstart.yaml`` all name the shipped
    ``quickstart.yaml`` when no such file exists where the job runs. Raises ConfigError
    naming the path and the shipped configs when none matches.
    """
    p = Path(path)
    if p.is_file():
        return p
    name = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    for d in CONFIG_DIRS:
        if (d / name).is_file() and (len(p.parts) == 1 or p.parent.name == "configs"):
            return d / name
    shipped = sorted({f.stem for d in CONFIG_DIRS if d.is_dir() for f in d.glob("*.yaml")})
    raise ConfigError(f"config file '{p}' does not exist (shipped configs, usable by name: {', '.join(shipped)})")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build the config: defaults, then the YAML file at ``path``, then ``key=value`` overrides.

    Returns the validated :class:`Config`. Raises :class:`ConfigError` for an unreadable
    file, an unknown key (with the nearest valid key) or a value of the wrong type.
    """
    cfg = _defaults()
    if path:
        p = find_config(path)
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping at top level")
        for key, value in _flatten(raw).items():
            try:
                _apply(cfg, key, value)
            except ConfigError as e:
                raise ConfigError(f"{p}: {e}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. train.steps=50)")
        key, value = item.split("=", 1)
        _apply(cfg, key.strip(), value)
    cfg.validate()
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as a nested plain dict (for YAML dumps and MLflow)."""
    return dataclasses.asdict(cfg)


def to_flat_dict(cfg: Config) -> dict[str, Any]:
    """The config as ``{"section.key": value}`` (MLflow params)."""
    return _flatten(to_dict(cfg))


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
