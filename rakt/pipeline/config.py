"""Typed stage configs: one dataclass per stage, bound to CLI flags and YAML, validated with clear errors."""
from __future__ import annotations

import dataclasses
import difflib
import json
import hashlib
import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Collection, Iterator


class ConfigError(ValueError):
    """A config or CLI value that rakt cannot use; the message says what to change."""


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRECISION_HELP = ("auto (bf16 autocast on a GPU and on CPUs with native bf16: avx512_bf16/AMX; else fp32) | fp32 | "
                  "bf16 | fp16 (GPU); stored outputs stay float32")


class RegisteredNames(Collection[str]):
    """The names of a registry ("module:NAME", a dict) read when first needed: a config offers them as choices
    without loading the registry's module (and torch) when the CLI starts."""

    def __init__(self, ref: str) -> None:
        self.ref = ref

    def _names(self) -> Collection[str]:
        module, _, attr = self.ref.partition(":")
        return getattr(importlib.import_module(module), attr)

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


INT_MAX = 2**63 - 1  # every int setting fits a signed 64-bit integer (numpy, pandas, torch)
SEED_MAX = 2**32 - 1  # numpy's legacy seeding and FAISS take 32-bit seeds


def option(default: Any, help: str, positional: bool = False, choices: Collection[str] | None = None,
           minimum: int = 0, maximum: int = INT_MAX):
    """A config field with its CLI help text; an int field's value must lie in [minimum, maximum]."""
    meta = {"help": help, "positional": positional, "choices": choices, "range": (minimum, maximum)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


DEVICE_HELP = "auto | cpu | cuda | cuda:N"
THREADS_HELP = ("torch intra-op threads (-1 = auto: the cores this process may use, less those other processes "
                "keep busy)")


def device_option(more: str = ""):
    """The `device` field of a stage that runs a model."""
    return option("auto", DEVICE_HELP + more)


def precision_option():
    """The `precision` field of a stage that runs a model (--precision auto|fp32|bf16|fp16)."""
    return option("auto", PRECISION_HELP, choices=PRECISIONS)


def threads_option(more: str = ""):
    """The `threads` field of a stage that runs a torch model (-1 = auto)."""
    return option(-1, THREADS_HELP + more, minimum=-1)


@dataclass
class EncoderConfig:
    model: str = option("ViT-B-32", "open_clip model name (e.g. ViT-B-32), or 'timm:NAME' for a timm model")
    pretrained: str = option(
            "laion2b_s34b_b79k",
            "open_clip pretrained tag, a local checkpoint file (.pt/.bin/.safetensors), or '' for random init",
        )
    image_size: int = option(0, "encoder input resolution in px (0 = the model's own); part of the embedding-model id")
    batch_size: int = option(256, "images per forward pass")
    workers: int = option(-1, "DataLoader worker processes for decoding (0 = in process; -1 = auto: none on a CPU "
                              "device with <= 4 cores, whose cores the model's threads use, up to 8 for a GPU)",
                     minimum=-1)
    threads: int = threads_option()
    device: str = device_option()
    precision: str = precision_option()


@dataclass
class EngineConfig:
    """Where a stage's partitions run (rakt/pipeline/engines.py); the same flags on every stage that has them."""
    engine: str = option("local", "local (in this process) | ray (Ray Data actors on a Ray cluster; pip install "
                                  "'rakt[ray]')", choices=RegisteredNames("rakt.pipeline.engines:ENGINES"))
    ray_address: str = option("", "with --engine ray: '' = start (or join this process's) local Ray, 'auto' = the "
                                  "cluster this node belongs to, or ray://HOST:10001")


EMBEDDING_DTYPES = ("float32", "float16")  # float16 halves the disk (clip-retrieval stores LAION's embeddings so)


@dataclass
class EmbeddingStoreConfig:
    """How an embedding set stores its vectors; the same flag on every stage that writes one."""
    dtype: str = option("float32", "float32 | float16 (half the disk; every reader accepts both)",
                        choices=EMBEDDING_DTYPES)


@dataclass
class EmbedConfig(EmbeddingStoreConfig, EngineConfig, EncoderConfig):
    source: list[str] = option([], "image folder (class subfolders), CSV/parquet manifest (path,label), or "
                                   "WebDataset shards (files, brace patterns or a folder of .tar/.tar.gz)",
                               positional=True)
    out: str = option("", "output embedding set directory")
    split: str = option("", "split name for every row (default: the sample's own 'split' field, else 'train')")
    per_class: int = option(0, "keep N images per class (few-shot draw with --seed); 0 keeps all")
    seed: int = option(0, "seed of the per-class draw", maximum=SEED_MAX)
    partition_size: int = option(10000, "images per partition for folder/manifest sources (a shard is one partition)")
    classes: str = option("", "classes.txt (one name per line) naming label indices; default: found beside the source")


@dataclass
class IndexBuildConfig(EmbeddingStoreConfig, EngineConfig, EncoderConfig):
    source: list[str] = option([], "pool images (folder, manifest or shards) or an existing embedding set directory",
                               positional=True)
    out: str = option("", "output index directory")
    kind: str = option("auto", "auto | flat | ivfpq | a faiss index_factory string (e.g. 'IVF1024,PQ32')")
    memory_budget: str = option("4G", "RAM this build may use, e.g. 500M, 16G: decides flat vs IVF-PQ with kind=auto "
                                      "and the PQ code size; a build that cannot fit is refused before it starts")
    on_disk: bool = option(False, "keep the IVF lists on disk (index-000.ivfdata, memory-mapped when searched) instead "
                                  "of in RAM: for indexes larger than RAM; resumes after a kill")
    metric: str = option("ip", "ip (cosine on normalized embeddings) | l2", choices=("ip", "l2"))
    metadata: str = option("", "optional parquet of extra pool metadata (url, caption, ...) joined on column 'id'")
    partition_size: int = option(10000, "images per partition when embedding a folder/manifest pool")
    train_size: int = option(0, "vectors sampled to train IVF/PQ quantizers (0 = auto: 39 per IVF list, the lists "
                                "~4 sqrt(N))")
    nprobe: int = option(16, "IVF lists visited per query (stored as the index default)")
    seed: int = option(0, "seed for the training sample", maximum=SEED_MAX)
    task_rows: int = option(0, "vectors per add task of a build in parts (--on-disk, --engine ray): the unit a killed "
                               "build resumes by (0 = auto: 1M in process; on Ray >= 1M and >= 10x the empty index's "
                               "size)", minimum=0)


@dataclass
class RetrieveConfig:
    embeddings: str = option("", "target embedding set directory (from `rakt embed`)", positional=True)
    index: str = option("", "index spec, e.g. faiss:/path/to/index or a plain index directory")
    out: str = option("", "output candidates directory")
    k: int = option(100, "neighbours per query image")
    fill_per_class: int = option(0, "re-query the images of a class whose neighbours hold fewer than N distinct pool "
                                    "images with a doubled k (up to --max-k), so that overlapping neighbourhoods "
                                    "still fill curate's budget (0 = off)")
    max_k: int = option(3200, "largest k of --fill-per-class re-queries")
    query_split: str = option("train", "embedding-set split used as queries ('' = all rows)")
    batch_size: int = option(4096, "queries per search call")
    nprobe: int = option(0, "IVF lists to visit (0 = the index's default)")
    force: bool = option(False, "query even if the embedding model differs from the index's")
    backend: str = option("auto", "search backend for FAISS indexes: auto (faiss-gpu, else torch exact search on CUDA "
                                  "for flat indexes, else faiss CPU) | faiss | torch (exact, flat only; CPU too)",
                          choices=("auto", "faiss", "torch"))
    query_mode: str = option("image", "image: the embedding set's images | text: class-name prompts (open_clip text "
                                      "tower) | both: images and prompts together", choices=("image", "text", "both"))
    classes: str = option("", "classes file for text queries, one name per line (default: the classes recorded in "
                              "the embedding set)")
    templates: str = option("default", "prompt templates for text queries: 'default' or a file, one template with "
                                       "'{}' per line")
    text_queries: str = option("class", "class: one query per class (normalized mean of its prompts) | prompt: one "
                                        "query per class x template", choices=("class", "prompt"))
    model: str = option("", "open_clip model for text queries (default: model_name recorded in the embedding set)")
    pretrained: str = option("", "its pretrained tag or checkpoint (default: the embedding set's, when --model is "
                                 "not given; '' with --model = random init)")


@dataclass
class CurateConfig:
    candidates: str = option("", "candidates directory (from `rakt retrieve`)", positional=True)
    out: str = option("", "output transfer-manifest directory")
    budget: int = option(10000, "transfer-set size N, counting the query images (paper rule: k = N/queries - 1)")
    per_query_k: int = option(0, "pool images per query; 0 = the paper's fixed-budget rule")
    balance: str = option("query", "query: every query gets k | class: every class gets an equal share",
                          choices=("query", "class"))
    dedup: bool = option(True, "an image retrieved by several queries counts once (best score, all query ids)")
    near_dup: float = option(0.0, "drop images whose cosine to a better-scored kept image exceeds this (0 = off)")
    min_score: float = option(-1.0, "drop candidates scoring below this")
    eval_embeddings: str = option("", "embedding set of the target test/eval images for the leakage guard "
                                      "(default: rows of --eval-split in the query embedding set)")
    eval_split: str = option("test", "split of the query embedding set used by the leakage guard")
    leakage_threshold: float = option(0.95, "drop pool images whose cosine to any eval image exceeds this")
    require_leakage_guard: bool = option(False, "refuse to run without eval images for the leakage guard (`rakt run` "
                                                "sets it: there the test set is known); off: the guard is skipped "
                                                "with a warning, in the summary and manifest.json")
    index: str = option("", "index spec (default: the one recorded by retrieve)")
    teacher_scores: str = option("", "teacher-aware curation: a `rakt score` output folder (the adapted teacher's "
                                     "class and probability for every candidate); the report then shows the "
                                     "selected set's predicted-class histogram")
    teacher_agree: bool = option(False, "with --teacher-scores: a candidate counts for a query only when the teacher "
                                        "predicts the query's class (class balance by the teacher's prediction)")
    teacher_min_prob: float = option(0.0, "with --teacher-scores: drop candidates whose top teacher probability is "
                                          "below this (out of domain: unlike every target class; 0 = off)")


@dataclass
class SampleConfig:
    """`rakt sample`: a uniform random transfer manifest (the paper's random-pool and target-unlabelled baselines)."""
    source: list[str] = option([], "index directory (sample its pool metadata) or WebDataset shards (files, brace "
                                   "patterns or a folder) to sample from", positional=True)
    out: str = option("", "output transfer-manifest directory (same layout as `rakt curate`'s)")
    n: int = option(0, "images to draw (0 = as many as --like's manifest holds)")
    like: str = option("", "a transfer-manifest directory whose row count sets n (same-size baselines)")
    exclude: list[str] = option([], "embedding sets (or manifests) whose image ids are never drawn, e.g. the "
                                    "labelled target images")
    seed: int = option(0, "seed of the draw", maximum=SEED_MAX)


@dataclass
class MaterializeConfig:
    manifest: str = option("", "transfer-manifest directory (from `rakt curate`)", positional=True)
    out: str = option("", "output WebDataset shard directory")
    shard_size: int = option(10000, "samples per output shard")
    pool_root: str = option("", "the pool's folder: relative paths/shards resolve under it, a moved pool's are found "
                                "in it, and files in it may be read (besides the folders/shards/manifests the index "
                                "was built from, per the manifest's lineage); nothing outside is ever copied")


@dataclass
class DownloadConfig(EngineConfig):
    """engine local = img2dataset's multiprocessing distributor; ray = its ray distributor on the Ray cluster."""
    manifest: str = option("", "transfer-manifest directory with a 'url' column (from `rakt curate`)", positional=True)
    out: str = option("", "output WebDataset shard directory (img2dataset layout: 00000.tar, 00000_stats.json, ...)")
    image_size: int = option(256, "output image size in px")
    resize_mode: str = option("border", "border | keep_ratio | center_crop | no (img2dataset's resize modes)",
                              choices=("border", "keep_ratio", "center_crop", "no"))
    encode_format: str = option("jpg", "jpg | png | webp", choices=("jpg", "png", "webp"))
    encode_quality: int = option(95, "jpg/webp quality 0-100 (png: compression 0-9)")
    processes: int = option(0, "download processes (0 = one per CPU core)")
    threads: int = option(32, "download threads per process")
    timeout: int = option(10, "seconds before a connection or read gives up")
    deadline: int = option(60, "seconds one request (each redirect hop) may take in all -- connect, headers, body: "
                               "a server that trickles bytes is cut off there; 0 = no limit")
    max_size_mb: int = option(32, "largest response body in MiB: a larger one is refused (declared) or cut off; "
                                  "0 = no limit")
    any_host: bool = option(False, "let the proxy connect to hosts that are not in the manifest (e.g. an HTTPS "
                                   "redirect to another host); by default only the manifest's hosts and the "
                                   "targets of plain-HTTP redirects are contacted")
    retries: int = option(0, "extra attempts per failed URL")
    shard_size: int = option(10000, "samples (manifest rows) per output shard")
    max_image_area: int = option(89_478_485, "refuse images with more pixels than this, before decoding them "
                                             "(decompression bombs); 0 = no limit")
    allow_private: bool = option(False, "fetch URLs whose host resolves to a private/loopback/link-local address")
    allow_network: list[str] = option([], "CIDRs exempted from the address guard, e.g. 127.0.0.0/8 10.0.0.0/8")


@dataclass
class LabelledConfig:
    """`rakt labelled`: the few-shot draw of the labelled target images, written once as one shard."""
    source: list[str] = option([], "labelled target images (folder, manifest or shards, as for `rakt embed`)",
                               positional=True)
    per_class: int = option(0, "few-shot draw of N images per class (0 = all)")
    seed: int = option(0, "seed of the few-shot draw", maximum=SEED_MAX)
    out: str = option("", "output folder: labelled-000000.tar and classes.txt")


FASHION_MNIST = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]


@dataclass
class CarveConfig:
    """`rakt carve`: a labelled target task carved out of a pool by the pool's evaluation-only KEY.json source and
    orig_label (the one stage that may select by them: it is how the task is defined)."""
    pool: list[str] = option([], "pool shards (files, brace patterns or a folder) whose KEY.json has 'source' and "
                                 "'orig_label'", positional=True)
    source: str = option("fashion-mnist", "the KEY.json 'source' whose images make the task")
    classes: list[str] = option(FASHION_MNIST, "class names in label order: the source's orig_label values (an "
                                               "integer orig_label is an index into them); [] = the sorted values")
    train_per_class: int = option(10, "labelled training images per class (the target train shard)")
    test_per_class: int = option(100, "test images per class (the target test shard)")
    seed: int = option(0, "seed of the per-class draw (test first, then train, from one seeded order)",
                       maximum=SEED_MAX)
    out: str = option("", "output folder: train/, test/ (shards + classes.txt), pool/ (the pool without them), "
                          "carve.json")


def from_dict(cls: type, values: dict, where: str = "config") -> Any:
    """Build a stage config from a mapping; unknown keys and wrong types raise ConfigError."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        key_norm = key.replace("-", "_")
        if key_norm not in names:
            hint = difflib.get_close_matches(key_norm, names, n=1)
            tip = f"; did you mean '{hint[0]}'?" if hint else f"; known keys: {', '.join(sorted(names))}"
            raise ConfigError(f"{where}: unknown key '{key}'{tip}")
        kwargs[key_norm] = _coerce(names[key_norm], value, where)
    cfg = cls(**kwargs)
    validate(cfg, where)
    return cfg


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(default, list):
        return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{where}: '{f.name}' must be true or false, got {value!r}")
    kind = type(default)
    if kind in (int, float):
        return _number(kind, f.name, value, where)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: '{f.name}' must be {kind.__name__}, got {value!r}") from None


def _number(kind: type, name: str, value: Any, where: str) -> int | float:
    """An int or float field's value: a whole number for an int (72.0 is 72; 72.9 is refused, never cut to 72),
    a finite number for a float; a bool or a list is no number."""
    wrong = ConfigError(f"{where}: '{name}' must be {kind.__name__} ({'a whole number' if kind is int else 'finite'}), "
                        f"got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise wrong
    try:
        number = float(value) if isinstance(value, str) else value
        if isinstance(value, str) and kind is int:
            number = int(value.strip()) if value.strip().lstrip("+-").isdigit() else float(value)
    except ValueError:
        raise wrong from None
    if isinstance(number, float) and not math.isfinite(number):
        raise wrong
    if kind is int:
        if isinstance(number, float) and not number.is_integer():
            raise wrong
        if abs(number) > INT_MAX:
            raise ConfigError(f"{where}: '{name}' must be between {-INT_MAX - 1} and {INT_MAX}, got {value!r}")
        return int(number)
    return float(number)


def validate(cfg: Any, where: str = "config") -> None:
    """Check choices, the range of every int setting and required outputs."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices is not None and value not in choices:
            raise ConfigError(f"{where}: '{f.name}' must be one of {', '.join(choices)}, got {value!r}")
        low, high = f.metadata.get("range", (0, INT_MAX))
        if isinstance(value, int) and not isinstance(value, bool) and not low <= value <= high:
            raise ConfigError(f"{where}: '{f.name}' must be between {low} and {high}, got {value}")
    if hasattr(cfg, "out") and not cfg.out:
        raise ConfigError(f"{where}: 'out' is required (where to write the result)")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(cfg: Any) -> str:
    """Stable short hash of a config's values (for lineage and skip-if-unchanged)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
