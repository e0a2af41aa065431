"""Typed configs: a YAML file plus `section.key=value` overrides, validated by pydantic with one-line errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from lookalike.core.errors import ConfigError
from lookalike.core.results import Metric
from lookalike.core.steps import RerankStep
from lookalike.devices import check_device

Device = Annotated[str, AfterValidator(check_device)]  # auto (cuda, else mps, else cpu), cpu, cuda, cuda:N, mps

PositiveInt = Annotated[int, Field(gt=0)]
Count = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]  # a share: 0 <= x < 1


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    table: str | None = None  # dataset CSV
    root: str | None = None  # folder that relative paths start from; default: the CSV's folder
    # square side, or [height, width] (resized exactly, no crop; re-ID uses [256, 128])
    image_size: int | list[int] = 224
    # evaluation: resize the short side to image_size / crop_fraction, then centre-crop (1.0: no crop)
    crop_fraction: Annotated[float, Field(gt=0, le=1)] = 0.875
    batch_size: PositiveInt = 64  # images per batch when embedding
    num_workers: Count = 0  # DataLoader worker processes that decode images (0: in the main process)
    # drop rows whose image is missing, empty, truncated or corrupt (or its bbox misses it), with a warning; false: such
    # an image is an error naming it
    skip_bad_images: bool = False

    @field_validator("image_size")
    @classmethod
    def _two_sides(cls, size: int | list[int]) -> int | list[int]:
        sides = [size] if isinstance(size, int) else size
        if len(sides) not in (1, 2) or min(sides) < 1:
            raise ValueError("expected a positive side or [height, width]")
        return sides[0] if len(sides) == 1 else sides


class ModelConfig(Section):
    name: str | None = None  # any timm model name; None: the model model.weights records, else resnet50
    pretrained: bool = True  # download timm's pretrained weights
    weights: str | None = None  # local state dict or Lightning checkpoint, loaded after creation
    embedding_dim: PositiveInt | None = None  # linear projection after pooling; None keeps the backbone's features
    normalize: bool = True  # L2-normalise embeddings
    # 1: no downsampling in a ResNet's last stage (re-ID: BoT / CTL); None keeps the model's own
    last_stride: PositiveInt | None = None
    bnneck: bool = False  # batch-norm neck after the projection (BoT / CTL recipe); embeddings taken after it


class ExtractConfig(Section):
    output: str = "runs/embeddings.npz"  # embeddings file (.npz) that extract writes and search reads
    device: Device = "cpu"  # torch device of the extractor: auto, cpu, cuda, cuda:1, mps
    split: str | None = "validation"  # embed only this split; None embeds every row
    shard_size: PositiveInt = 50_000  # rows per shard file (OUTPUT.shards/shard-NNNNN.npz): a killed run resumes there
    restart: bool = False  # discard the shards of an earlier (interrupted or different) run instead of resuming
    keep_shards: bool = False  # keep OUTPUT.shards/ after the merge (iter_shards and a FAISS `search` read it)


class SearchConfig(Section):
    embeddings: str | None = None  # default: extract.output
    output: str = "runs/results.npz"  # RetrievalResults file (.npz) that search writes and evaluate reads
    k: PositiveInt = 100  # gallery items kept per query
    metric: Metric = "cosine"  # cosine (1 - cosine similarity) or euclidean distance
    index: str = "exact"  # exact, or a FAISS factory string: Flat, IVF256,Flat, HNSW32, ...
    device: Device = "cpu"  # torch device of exact search (FAISS indexes run on the CPU)
    reranked_output: str = "runs/results_reranked.npz"  # the list after the last re-ranking stage


class EvaluateConfig(Section):
    results: str | None = None  # default: search.output
    output: str = "runs/metrics.json"  # metrics JSON
    cmc_k: list[PositiveInt] = [1, 5, 10]  # cut-offs of CMC@k
    precision_k: list[PositiveInt] = [5, 10]  # cut-offs of precision@k
    map_k: list[PositiveInt] = [5, 10, 100]  # cut-offs of mAP@k
    grid: str | None = "runs/grid.png"  # picture of queries and their top results; null to skip
    cmc_plot: str | None = "runs/cmc.png"  # CMC curve picture; null to skip
    grid_queries: PositiveInt = 8  # queries shown in the result grid
    # rank per-label gallery centroids (CTL) instead of images
    centroids: Literal["none", "label", "label_sequence"] = "none"
    grid_top_k: PositiveInt = 6  # results shown per query in the result grid

    def metric_kwargs(self) -> dict[str, tuple[int, ...]]:
        """The cut-offs, as compute_metrics and the re-ranking chain take them."""
        return {"cmc_k": tuple(self.cmc_k), "precision_k": tuple(self.precision_k), "map_k": tuple(self.map_k)}


class LossConfig(Section):
    triplet: NonNegativeFloat = 1.0  # weight of the triplet loss (0 turns it off)
    margin: float | None = 0.2  # triplet margin; null = soft margin, log(1 + exp(d_ap - d_an))
    # every valid triplet, the hardest positive + negative per anchor, or the n hardest
    miner: Literal["all", "batch_hard", "n_hard"] = "batch_hard"
    n_positives: PositiveInt = 1  # n_hard: hardest positives per anchor
    n_negatives: PositiveInt = 1  # n_hard: hardest negatives per anchor
    memory_size: Count = 0  # cross-batch memory of past embeddings mined as extra positives/negatives; 0 = off
    centroid: NonNegativeFloat = 0.0  # weight of the centroid triplet loss (CTL)
    centroid_margin: PositiveFloat | None = 0.5  # margin of the centroid triplet loss; null = soft margin
    # official centroids-reid code (queries + centroids mined together) or the paper's equation
    centroid_mode: Literal["official", "equation"] = "official"
    cross_entropy: NonNegativeFloat = 0.0  # weight of cross-entropy on a classifier over the (BNNeck) embedding
    label_smoothing: Fraction = 0.1  # label smoothing of the cross-entropy loss
    center: NonNegativeFloat = 0.0  # weight of the center loss
    # center loss scale * ||x - c||^2: 0.5 is Wen et al.'s 1/2, 1.0 the official CTL code's
    center_scale: PositiveFloat = 0.5
    # sgd: the centres' own plain SGD on the unweighted loss (official CTL); shared: a group of train.optimizer
    center_optimizer: Literal["sgd", "shared"] = "sgd"
    # learning rate of the class centres; None = 0.5 (sgd, the official value) or train.lr (shared)
    center_lr: PositiveFloat | None = None


class TrainConfig(Section):
    output: str = "runs/train"  # checkpoints/, tensorboard/, csv/ and validation grids land here
    seed: int = 0  # seed of weights, sampler and augmentation (Lightning seed_everything)
    # repeated runs with seeds seed, seed+1, ... under output/run{r}/: mean and std of the final metrics (runs.json)
    runs: PositiveInt = 1
    epochs: PositiveInt = 10  # training epochs
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"  # optimizer of all parameter groups
    lr: PositiveFloat = 1e-4  # learning rate (of the head, and of the backbone unless backbone_lr)
    backbone_lr: PositiveFloat | None = None  # a lower rate for the backbone; None = lr
    weight_decay: NonNegativeFloat = 0.0  # weight decay of the optimizer
    # learning-rate schedule after the warm-up: constant, cosine to 0, or /10 at step_epochs
    scheduler: Literal["none", "cosine", "step"] = "none"
    warmup_epochs: Count = 0  # linear warm-up of the learning rate
    step_epochs: list[PositiveInt] = []  # scheduler=step: epochs at which the rate is multiplied by step_gamma
    step_gamma: PositiveFloat = 0.1  # scheduler=step: the factor (STIR's recipe: 5e-3 once the backbone joins)
    p: PositiveInt = 8  # labels per batch
    k: PositiveInt = 4  # images per label in a batch
    # None: an epoch is one pass over the labels; set it when there are few labels
    batches_per_epoch: PositiveInt | None = None
    # labels with < k images: draw with repetition, pad with mock images (never anchors, never mined), or skip
    few_images: Literal["repeat", "pad", "drop"] = "repeat"
    # light: random resized crop + flip; reid: pad-crop + flip + random erasing
    augment: Literal["none", "light", "reid"] = "light"
    val_every: PositiveInt = 1  # validate every N epochs
    monitor: str = "cmc@1"  # validation metric that picks the best checkpoint (higher is better)
    grid: bool = True  # write a result grid picture per validation
    validate_before: bool = True  # validate the untrained model first, to show what training changed
    loss: LossConfig = LossConfig()


class TrainerConfig(Section):
    accelerator: str = "auto"  # cpu, gpu, auto
    # devices (processes) per node, as Lightning takes it: a count, 'auto' or a list such as '0,1'
    devices: int | str = 1
    strategy: str = "auto"  # ddp for several processes
    num_nodes: PositiveInt = 1  # machines for multi-node training
    # 16-mixed, bf16-mixed, ... (of training steps; validation embeds in fp32, as extract does)
    precision: str = "32-true"
    # NHWC model while training (both trainers), validating, extracting and serving: faster convolutions (oneDNN on CPU,
    # tensor cores on GPU), the same embeddings everywhere
    channels_last: bool = True
    # train on only this many batches (int) or this share (float) of each epoch; None: all
    limit_train_batches: int | float | None = None
    log_every_n_steps: PositiveInt = 10  # steps between logged training losses
    progress: bool = True  # Lightning's progress bar


class PairwiseConfig(Section):
    """The STIR pairwise re-ranker trained by `lookalike train-reranker`: its model here; the loop (epochs, lr,
    backbone_lr, p, k, output, ...) in train.*; model.* with model.weights is the frozen extractor that mines pairs."""

    name: str = "vit_small_patch16_224"  # timm model that takes the two images stacked along the height
    pretrained: bool = True  # timm's pretrained weights (downloads); false to start from scratch
    model_kwargs: dict[str, Any] = {}  # extra timm.create_model arguments, e.g. {patch_size: 8, depth: 4}
    image_size: int | list[int] | None = None  # one image of the pair; None = data.image_size
    init_from_extractor: bool = False  # start the backbone from model.weights (same timm model as model.name)
    hidden: PositiveInt = 192  # MLP head's hidden width
    dropout: Fraction = 0.5  # dropout of the MLP head
    tta: bool = False  # average both stacking orders when re-ranking
    # per anchor the hardest (or a random) positive and negative by the extractor
    mining: Literal["hard", "random"] = "hard"
    freeze_epochs: Count = 0  # backbone frozen for the first N epochs (head only), then trained at train.backbone_lr
    top_n: PositiveInt = 5  # validation re-ranks each query's top_n
    batch_size: PositiveInt = 128  # pairs per batch when re-ranking
    precision: str = "auto"  # auto: bf16-mixed (else 16-mixed) on CUDA, 32-true on CPU; or any Lightning precision


class ServeConfig(Section):
    """`lookalike index` writes index_dir; `lookalike serve index_dir` answers searches over its gallery."""

    index_dir: str = "runs/index"  # folder that `lookalike index` writes and `lookalike serve` reads
    gallery: Literal["all", "validation", "train"] = "all"  # all rows; or one split (validation: its is_gallery rows)
    candidates: PositiveInt = 100  # items searched per query; re-rankers re-order these, the page shows the top k
    max_upload_mb: PositiveFloat = 10.0  # larger uploads get 413
    max_pixels: PositiveInt = 40_000_000  # larger images (width x height) get 413, before decoding
    thumbnail: PositiveInt = 256  # longest side of the images the page shows
    # uploads whose longer side is more times the shorter one get 413, before decoding
    max_aspect_ratio: PositiveFloat = 20.0
    search_timeout: PositiveFloat = 30.0  # seconds a search waits for the model (searches run one at a time); then 503
    # seconds a request body may stall between bytes; then 408 and the connection is closed
    read_timeout: PositiveFloat = 10.0
    # seconds a whole request body may take to arrive; then 408 and the connection is closed
    upload_timeout: PositiveFloat = 60.0
    # Host header names accepted besides loopback names and --host ("*" any, "*.example.com")
    allowed_hosts: list[str] = []
    # how `serve` embeds uploads: torch (model.pt), or onnx (model.onnx, which `lookalike index` then exports too)
    runtime: Literal["torch", "onnx"] = "torch"

    @field_validator("allowed_hosts")
    @classmethod
    def _host_patterns(cls, hosts: list[str]) -> list[str]:
        bad = [h for h in hosts if not h or "*" in h[1:] or (h.startswith("*") and h != "*" and not h.startswith("*."))]
        if bad:
            raise ValueError(f"expected host names, '*' or patterns like '*.example.com', got {bad[0]!r}")
        return hosts


class IndexConfig(Section):
    """Where `lookalike index` puts the gallery's vectors: in its folder (embeddings, FAISS), or in a Milvus collection
    the folder's manifest names (searched with filter expressions on metadata)."""

    backend: Literal["faiss", "milvus"] = "faiss"  # milvus: vectors + metadata in index.uri's collection; filters
    uri: str = "runs/gallery.db"  # milvus: a local .db file (Milvus Lite, embedded) or http(s)://host:port of a server
    collection: str = "gallery"  # milvus: the collection's name
    type: Literal["FLAT", "HNSW", "IVF_FLAT"] = "FLAT"  # milvus: FLAT is exact; HNSW and IVF_FLAT approximate


class BackboneConfig(Section):
    """One frozen timm backbone of `lookalike adapt`, read at chosen layers."""

    name: str = "resnet50"  # any timm model with forward_intermediates
    # indices into the model's feature layers (-1 = the deepest); each pooled and L2-normalised
    layers: list[int] = [-1]
    pretrained: bool = True  # download timm's pretrained weights
    weights: str | None = None  # local state dict or Lightning checkpoint (e.g. a trained lookalike extractor) instead
    image_size: int | list[int] | None = None  # None = data.image_size


class AdaptConfig(Section):
    """`lookalike adapt`: an adaptation module learnt on frozen features of image pairs.

    The visual-similarity system of Risser-Maroix et al., ICIP 2021.
    """

    # pairs table CSV (left, right, optional split), or a folder with left/ and right/ paired by file name
    pairs: str | None = None
    root: str | None = None  # folder that relative paths start from; default: the CSV's folder
    subset: str | None = None  # CSV with a column of file names (e.g. the published TLL_obj.csv): keep only those pairs
    subset_column: str | None = None  # its column of file names; None: its only named column
    backbones: list[BackboneConfig] = [BackboneConfig()]  # features concatenated across layers and backbones
    flip: bool = False  # also extract mirror images; training replaces each image by its mirror with probability 1/2
    features: str = "runs/adapt/features.npz"  # features cache: reused when pairs and extraction settings match
    pca_dim: PositiveInt | None = 256  # PCA fitted on each run's training pairs only; None: no PCA
    module: Literal["linear", "diagonal", "identity"] = "linear"  # published Linear+ReLU, per-feature weights, or none
    hidden: PositiveInt = 1024  # output width of the linear module
    scale: PositiveFloat = 15.0  # inverse temperature of the symmetric InfoNCE
    lr: PositiveFloat = 1.0e-3  # Adam
    weight_decay: NonNegativeFloat = 0.0  # Adam weight decay
    epochs: PositiveInt = 100  # training epochs per run (the best on the validation pairs is kept)
    batch_size: PositiveInt | None = None  # pairs per step; None: full batch
    monitor: str = "top1/mean"  # validation metric that picks the epoch kept; 'loss' for the lowest loss
    # random: train/validation/test drawn per run; table: the table's validation pairs are the test set
    split: Literal["random", "table"] = "random"
    validation_fraction: Fraction = 0.1  # random: share of all pairs; table: share of the train pairs
    test_fraction: Fraction = 0.3  # random only
    runs: PositiveInt = 5  # repeated splits (seeds seed, seed+1, ...): mean and std
    seed: int = 0  # seed of the first run's split and initialisation
    top_k: list[PositiveInt] = [1, 3, 5]  # k of the reported top-k accuracy
    device: Device = "cpu"  # torch device of feature extraction and training
    output: str = "runs/adapt"  # metrics.json, tensorboard/ (per run and average), run{r}/ (adapter, PCA, split)
    # reference: the published train.py command (see lookalike.adapt.run)
    protocol: Literal["lookalike", "reference"] = "lookalike"


class Config(Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    extract: ExtractConfig = ExtractConfig()
    search: SearchConfig = SearchConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    train: TrainConfig = TrainConfig()
    trainer: TrainerConfig = TrainerConfig()
    pairwise: PairwiseConfig = PairwiseConfig()
    serve: ServeConfig = ServeConfig()
    index: IndexConfig = IndexConfig()
    adapt: AdaptConfig = AdaptConfig()
    # re-ranking chain: each step a re-ranker's name (lookalike.list_rerankers()) or {name: ..., parameter: value}, e.g.
    # [centroids, {name: icfrr, kg: 10}, kreciprocal]
    rerank: list[RerankStep] = []

    @field_validator("rerank", mode="before")
    @classmethod
    def _rerank_steps(cls, steps: Any) -> Any:
        """Each step typed and its name checked now, at config load, with its position in the error."""
        if not isinstance(steps, list | tuple):
            return steps
        from lookalike.rerank.base import list_rerankers  # the registry imports every re-ranker (torch): on demand

        known = list_rerankers()
        typed = [RerankStep.parse(step, i) for i, step in enumerate(steps)]
        for i, step in enumerate(typed):
            if step.name not in known:
                raise ConfigError(f"rerank[{i}]: unknown re-ranker {step.name!r}; expected one of {', '.join(known)}")
        return typed


def valid_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted key the config accepts."""
    keys = []
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys += valid_keys(sub, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _check_keys(values: dict, source: str, model: type[BaseModel] = Config, prefix: str = "") -> None:
    """Reject an unknown key, listing the valid ones of its section."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {values!r}")
    for key, value in values.items():
        field = model.model_fields.get(str(key))
        if field is None:
            keys = ", ".join(valid_keys(model, prefix))
            raise ConfigError(f"{source}: unknown key {prefix + str(key)!r}; valid keys: {keys}")
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            _check_keys(value, source, sub, f"{prefix}{key}.")


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (), base: Config | None = None
) -> Config:
    """Defaults (or `base`), then the YAML file, then `key=value` overrides, validated as one Config.

    Args:
        path: a YAML config (None: the defaults).
        overrides: `section.key=value` strings, as on the command line.
        base: the Config to start from instead of the defaults.

    Returns:
        Config; an unknown key or a bad value is one error naming it.

    Example:
        >>> import lookalike
        >>> lookalike.load_config(None, ["model.name=resnet18", "data.image_size=32"]).data.image_size
        32
    """
    merged = OmegaConf.create((base or Config()).model_dump())
    if path is not None:
        merged = OmegaConf.merge(merged, _read_yaml(Path(path)))
    bad = [o for o in overrides if "=" not in o or not o.split("=", 1)[0]]
    if bad:
        raise ConfigError(f"override {bad[0]!r}: expected key=value, e.g. model.name=resnet18")
    try:
        dotlist = OmegaConf.from_dotlist(list(overrides))
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        raise ConfigError(f"overrides: {str(exc).splitlines()[0]}") from None
    _check_keys(OmegaConf.to_container(dotlist), "override")
    merged = OmegaConf.merge(merged, dotlist)
    try:
        values = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as exc:  # e.g. ${nope}: an interpolation of a key that does not exist
        where = getattr(exc, "full_key", None) or "config"
        raise ConfigError(f"{where}: cannot resolve the interpolation ({str(exc).splitlines()[0]})") from None
    try:
        return Config.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc.errors()[0])) from None


BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def validation_message(err: dict) -> str:
    """One pydantic error as 'section.key: what was expected, got VALUE' (bounds as 'must be > 0'); a validator's own
    ConfigError is already such a line."""
    where = ".".join(str(p) for p in err["loc"])
    if isinstance((err.get("ctx") or {}).get("error"), ConfigError):
        return str(err["ctx"]["error"])
    if err["type"] == "missing":  # the input is the whole enclosing mapping: not worth printing
        return f"{where}: missing"
    if err["type"] in BOUNDS:
        bound = next(iter((err.get("ctx") or {}).values()))
        return f"{where}: must be {BOUNDS[err['type']]} {bound:g}, got {err.get('input')!r}"
    return f"{where}: {err['msg']}, got {err.get('input')!r}"


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    _check_keys(values, str(path))
    return values
