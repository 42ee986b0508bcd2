"""Typed stage configs: one dataclass per stage, bound to CLI flags and YAML, validated with clear errors."""
from __future__ import annotations

import dataclasses
import difflib
import json
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config or CLI value that rakt cannot use; the message says what to change."""


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRECISION_HELP = ("auto (bf16 autocast on a GPU and on CPUs with native bf16: avx512_bf16/AMX; else fp32) | fp32 | "
                  "bf16 | fp16 (GPU); stored outputs stay float32")
AUGMENTS = ("none", "shift", "crop")


def _f(default: Any, help: str, positional: bool = False, choices: tuple | None = None):
    """A config field with its CLI help text."""
    meta = {"help": help, "positional": positional, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class EncoderConfig:
    model: str = _f("ViT-B-32", "open_clip model name (e.g. ViT-B-32), or 'timm:NAME' for a timm model")
    pretrained: str = _f(
        "laion2b_s34b_b79k",
        "open_clip pretrained tag, a local checkpoint file (.pt/.bin/.safetensors), or '' for random init",
    )
    image_size: int = _f(0, "encoder input resolution in px (0 = the model's own); part of the embedding-model id")
    batch_size: int = _f(256, "images per forward pass")
    workers: int = _f(-1, "DataLoader worker processes for decoding (0 = in process; -1 = auto: none on a CPU "
                          "device with <= 4 cores, whose cores the model's threads use, up to 8 for a GPU)")
    threads: int = _f(-1, "torch intra-op threads (-1 = every core this process may use)")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    precision: str = _f("auto", PRECISION_HELP, choices=PRECISIONS)


@dataclass
class EngineConfig:
    """Where a stage's partitions run (pipeline/engines.py); the same flags on every stage that has them."""
    engine: str = _f("local", "local (in this process) | ray (Ray Data actors on a Ray cluster; pip install "
                              "'rakt[ray]')", choices=("local", "ray"))
    ray_address: str = _f("", "with --engine ray: '' = start (or join this process's) local Ray, 'auto' = the "
                              "cluster this node belongs to, or ray://HOST:10001")


@dataclass
class EmbedConfig(EngineConfig, EncoderConfig):
    source: list[str] = _f([], "image folder (class subfolders), CSV/parquet manifest (path,label), or "
                               "WebDataset shards (files, brace patterns or a folder of .tar/.tar.gz)",
                           positional=True)
    out: str = _f("", "output embedding set directory")
    split: str = _f("", "split name for every row (default: the sample's own 'split' field, else 'train')")
    per_class: int = _f(0, "keep N images per class (few-shot draw with --seed); 0 keeps all")
    seed: int = _f(0, "seed of the per-class draw")
    partition_size: int = _f(10000, "images per partition for folder/manifest sources (a shard is one partition)")
    classes: str = _f("", "classes.txt (one name per line) naming label indices; default: found beside the source")


@dataclass
class IndexBuildConfig(EngineConfig, EncoderConfig):
    source: list[str] = _f([], "pool images (folder, manifest or shards) or an existing embedding set directory",
                           positional=True)
    out: str = _f("", "output index directory")
    kind: str = _f("auto", "auto | flat | ivfpq | a faiss index_factory string (e.g. 'IVF1024,PQ32')")
    memory_budget: str = _f("4G", "RAM the index may use, e.g. 500M, 16G; decides flat vs IVF-PQ with kind=auto")
    metric: str = _f("ip", "ip (cosine on normalized embeddings) | l2", choices=("ip", "l2"))
    metadata: str = _f("", "optional parquet of extra pool metadata (url, caption, ...) joined on column 'id'")
    partition_size: int = _f(10000, "images per partition when embedding a folder/manifest pool")
    train_size: int = _f(100000, "vectors sampled to train IVF/PQ quantizers")
    nprobe: int = _f(16, "IVF lists visited per query (stored as the index default)")
    seed: int = _f(0, "seed for the training sample")


@dataclass
class RetrieveConfig:
    embeddings: str = _f("", "target embedding set directory (from `rakt embed`)", positional=True)
    index: str = _f("", "index spec, e.g. faiss:/path/to/index or a plain index directory")
    out: str = _f("", "output candidates directory")
    k: int = _f(100, "neighbours per query image")
    query_split: str = _f("train", "embedding-set split used as queries ('' = all rows)")
    batch_size: int = _f(4096, "queries per search call")
    nprobe: int = _f(0, "IVF lists to visit (0 = the index's default)")
    force: bool = _f(False, "query even if the embedding model differs from the index's")
    backend: str = _f("auto", "search backend for FAISS indexes: auto (faiss-gpu, else torch exact search on CUDA "
                              "for flat indexes, else faiss CPU) | faiss | torch (exact, flat only; CPU too)",
                      choices=("auto", "faiss", "torch"))
    query_mode: str = _f("image", "image: the embedding set's images | text: class-name prompts (open_clip text "
                                  "tower) | both: images and prompts together", choices=("image", "text", "both"))
    classes: str = _f("", "classes file for text queries, one name per line (default: the classes recorded in "
                          "the embedding set)")
    templates: str = _f("default", "prompt templates for text queries: 'default' or a file, one template with "
                                   "'{}' per line")
    text_queries: str = _f("class", "class: one query per class (normalized mean of its prompts) | prompt: one "
                                    "query per class x template", choices=("class", "prompt"))
    model: str = _f("", "open_clip model for text queries (default: model_name recorded in the embedding set)")
    pretrained: str = _f("", "its pretrained tag or checkpoint (default: the embedding set's, when --model is "
                             "not given; '' with --model = random init)")


@dataclass
class CurateConfig:
    candidates: str = _f("", "candidates directory (from `rakt retrieve`)", positional=True)
    out: str = _f("", "output transfer-manifest directory")
    budget: int = _f(10000, "transfer-set size N, counting the query images (paper rule: k = N/queries - 1)")
    per_query_k: int = _f(0, "pool images per query; 0 = the paper's fixed-budget rule")
    balance: str = _f("query", "query: every query gets k | class: every class gets an equal share",
                      choices=("query", "class"))
    dedup: bool = _f(True, "an image retrieved by several queries counts once (best score, all query ids)")
    near_dup: float = _f(0.0, "drop images whose cosine to a better-scored kept image exceeds this (0 = off)")
    min_score: float = _f(-1.0, "drop candidates scoring below this")
    eval_embeddings: str = _f("", "embedding set of the target test/eval images for the leakage guard "
                                  "(default: rows of --eval-split in the query embedding set)")
    eval_split: str = _f("test", "split of the query embedding set used by the leakage guard")
    leakage_threshold: float = _f(0.95, "drop pool images whose cosine to any eval image exceeds this")
    index: str = _f("", "index spec (default: the one recorded by retrieve)")


@dataclass
class SampleConfig:
    """`rakt sample`: a uniform random transfer manifest (the paper's random-pool and target-unlabelled baselines)."""
    source: list[str] = _f([], "index directory (sample its pool metadata) or WebDataset shards (files, brace "
                               "patterns or a folder) to sample from", positional=True)
    out: str = _f("", "output transfer-manifest directory (same layout as `rakt curate`'s)")
    n: int = _f(0, "images to draw (0 = as many as --like's manifest holds)")
    like: str = _f("", "a transfer-manifest directory whose row count sets n (same-size baselines)")
    exclude: list[str] = _f([], "embedding sets (or manifests) whose image ids are never drawn, e.g. the "
                                "labelled target images")
    seed: int = _f(0, "seed of the draw")


@dataclass
class MaterializeConfig:
    manifest: str = _f("", "transfer-manifest directory (from `rakt curate`)", positional=True)
    out: str = _f("", "output WebDataset shard directory")
    shard_size: int = _f(10000, "samples per output shard")
    pool_root: str = _f("", "directory to resolve the pool's relative paths/shards against (if it moved)")


@dataclass
class DownloadConfig(EngineConfig):
    """engine local = img2dataset's multiprocessing distributor; ray = its ray distributor on the Ray cluster."""
    manifest: str = _f("", "transfer-manifest directory with a 'url' column (from `rakt curate`)", positional=True)
    out: str = _f("", "output WebDataset shard directory (img2dataset layout: 00000.tar, 00000_stats.json, ...)")
    image_size: int = _f(256, "output image size in px")
    resize_mode: str = _f("border", "border | keep_ratio | center_crop | no (img2dataset's resize modes)",
                          choices=("border", "keep_ratio", "center_crop", "no"))
    encode_format: str = _f("jpg", "jpg | png | webp", choices=("jpg", "png", "webp"))
    encode_quality: int = _f(95, "jpg/webp quality 0-100 (png: compression 0-9)")
    processes: int = _f(0, "download processes (0 = one per CPU core)")
    threads: int = _f(32, "download threads per process")
    timeout: int = _f(10, "seconds before a connection or read gives up")
    retries: int = _f(0, "extra attempts per failed URL")
    shard_size: int = _f(10000, "samples (manifest rows) per output shard")
    max_image_area: int = _f(89_478_485, "refuse images with more pixels than this, before decoding them "
                                         "(decompression bombs); 0 = no limit")
    allow_private: bool = _f(False, "fetch URLs whose host resolves to a private/loopback/link-local address")
    allow_network: list[str] = _f([], "CIDRs exempted from the address guard, e.g. 127.0.0.0/8 10.0.0.0/8")


@dataclass
class EvaluateConfig:
    source: list[str] = _f([], "labelled target test images: image folder (class subfolders), CSV/parquet "
                               "manifest (path,label) or WebDataset shards with .cls", positional=True)
    checkpoint: str = _f("", "student checkpoint file (from the trainer / distill.students.save_student), or "
                             "bare weights with --model")
    model: str = _f("", "timm model name when --checkpoint holds bare weights ('' = read it from the checkpoint)")
    small_input: bool = _f(False, "with --model: the student uses the 32-px (CIFAR-style) ResNet stem")
    classes: str = _f("", "classes.txt (one name per line) naming label indices; default: found beside the source")
    split: str = _f("", "evaluate only samples whose split field is this (e.g. test); '' = every sample")
    batch_size: int = _f(256, "images per forward pass")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    precision: str = _f("auto", PRECISION_HELP, choices=PRECISIONS)
    threads: int = _f(-1, "torch intra-op threads (-1 = every core this process may use)")
    out: str = _f("", "output report JSON (accuracy, per-class accuracy, confusion matrix)")


@dataclass
class AdaptConfig(EncoderConfig):
    """`rakt adapt`: fit the teacher to the target task (distill/teacher.py); batch_size also sets training batches."""
    mode: str = _f("linear", "linear: logistic-regression probe on frozen embeddings | zeroshot: open_clip text "
                             "head from class names x templates | reprogram: frozen backbone + learned padding "
                             "visual prompt + linear output mapping (TDMR) | finetune: backbone + linear head",
                   choices=("linear", "zeroshot", "reprogram", "finetune"))
    train: list[str] = _f([], "labelled target images (folder, manifest or shards, as for `rakt embed`)")
    embeddings: str = _f("", "linear: the train embedding set from `rakt embed` with the same model (reused, "
                             "not recomputed)")
    eval: list[str] = _f([], "test images (source specs) and/or, for linear/zeroshot, an eval embedding set")
    eval_split: str = _f("", "rows/samples of this split in --eval ('' = all)")
    split: str = _f("", "train rows/samples of this split ('' = all)")
    per_class: int = _f(0, "few-shot: keep N training images per class (draw with --seed); 0 keeps all")
    seed: int = _f(0, "seed of the few-shot draw, the holdout split and training")
    classes: str = _f("", "classes.txt (one name per line); default: recorded with the source / embedding set")
    templates: str = _f("default", "zeroshot prompt templates: 'default' or a file, one template with '{}' a line")
    epochs: int = _f(10, "reprogram/finetune: passes over the training images")
    lr: float = _f(0.0, "learning rate of head and prompt (0 = the mode's default, 0.01)")
    backbone_lr: float = _f(0.01, "finetune: backbone learning rate as a fraction of lr")
    weight_decay: float = _f(-1.0, "L2 penalty; -1 = linear: chosen on the holdout split, others: 0")
    prompt_size: int = _f(30, "reprogram: width in px of the learnable border around the downscaled image")
    holdout: float = _f(0.2, "linear: fraction of train held out to choose the weight decay (never the test set)")
    out: str = _f("", "teacher checkpoint path (e.g. teacher.pt); the report goes to OUT.json")


@dataclass
class TrainConfig:
    """Loop settings shared by `rakt distill` and `rakt finetune` (distill/trainer.py)."""
    epochs: int = _f(10, "passes over the training data")
    batch_size: int = _f(128, "images per step and process")
    lr: float = _f(1e-3, "peak AdamW learning rate")
    weight_decay: float = _f(0.05, "AdamW weight decay (not on biases/norms)")
    warmup: int = _f(0, "linear warm-up steps before the cosine decay")
    clip: float = _f(1.0, "max gradient norm (0 = no clipping)")
    ema: float = _f(0.0, "EMA decay of the saved student (e.g. 0.999; 0 = off)")
    augment: str = _f("crop", "training views: crop (flip + random resized crop) | shift (flip + translation up "
                              "to 1/8 of the side) | none", choices=AUGMENTS)
    crop_scale: float = _f(0.6, "crop: smallest area fraction of a random resized crop")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N (under torchrun: the local rank's GPU)")
    precision: str = _f("auto", PRECISION_HELP, choices=PRECISIONS)
    threads: int = _f(-1, "torch intra-op threads (-1 = every core this process may use); images are decoded once "
                          "and augmented in batches, so training needs no DataLoader workers")
    seed: int = _f(0, "seed of initialisation, shuffling, augmentation and the few-shot draw")
    draw_seed: int = _f(-1, "seed of the few-shot draw of labelled target images (-1 = --seed); fix it to keep "
                            "the teacher's labelled images across training seeds")
    checkpoint_every: int = _f(100, "write OUT/checkpoint.pt every N steps (and at the end)")
    resume: bool = _f(True, "continue from OUT/checkpoint.pt when it exists")
    compile: bool = _f(False, "torch.compile the training module")
    out: str = _f("", "output folder: checkpoint.pt, metrics.jsonl, student.pt, summary.json")


@dataclass
class DistillConfig(TrainConfig):
    """`rakt distill`: the adapted teacher -> a timm student on the transfer shards."""
    transfer: list[str] = _f([], "transfer-set WebDataset shards (files, brace patterns or a folder)",
                             positional=True)
    teacher: str = _f("", "adapted teacher checkpoint (from `rakt adapt`)")
    student: str = _f("resnet18", "timm model name of the student")
    small_input: bool = _f(False, "CIFAR-style 32-px stem (timm ResNets)")
    image_size: int = _f(0, "training resolution in px (0 = 32 with --small-input, else 224)")
    mode: str = _f("task", "task: KD on teacher logits | agnostic: feature KD | progressive: TDMR schedule",
                   choices=("task", "agnostic", "progressive"))
    temperature: float = _f(4.0, "KD temperature")
    target: list[str] = _f([], "optional labelled target images to distill on too (see --target-mix)")
    target_mix: str = _f("transfer", "transfer: the target images join the transfer set (KD only, once per epoch) | "
                                     "step: --target-batch-size of them join every step, with hard-label CE weighted "
                                     "--hard-weight (measured worse: docs/results.md)", choices=("transfer", "step"))
    target_per_class: int = _f(0, "few-shot draw of N target images per class (0 = all)")
    hard_weight: float = _f(1.0, "target-mix step: weight of the hard-label CE on target images")
    target_batch_size: int = _f(0, "target-mix step: labelled target images joined to each step (0 = --batch-size)")
    classes: str = _f("", "classes.txt of the target task (default: recorded with the target images)")
    cache_teacher: bool = _f(False, "compute teacher outputs once (beside the decoded shards, in teacher-cache/) "
                                    "instead of running the teacher every step; see --teacher-view")
    teacher_view: str = _f("same", "with --cache-teacher: same (the student trains on --cache-views fixed views, "
                                   "epoch e on view e mod V, with the teacher's outputs on that view) | clean (the "
                                   "teacher's outputs on the whole image; the student gets fresh views each epoch)",
                           choices=("same", "clean"))
    cache_views: int = _f(4, "augmented views per image in the teacher cache (teacher-view same)")
    cache_seed: int = _f(-1, "seed of the cached views (-1 = --seed); fix it to share one cache across seeds")


@dataclass
class FinetuneConfig(TrainConfig):
    """`rakt finetune`: a distilled student -> cross-entropy on the labelled target images."""
    lr: float = _f(1e-4, "peak AdamW learning rate (small: the student is already distilled)")
    student: str = _f("", "student checkpoint (OUT/student.pt of `rakt distill`)")
    target: list[str] = _f([], "labelled target images (folder, manifest or shards)", positional=True)
    classes: str = _f("", "classes.txt (default: recorded with the target images)")
    per_class: int = _f(0, "few-shot draw of N images per class (0 = all)")
    split: str = _f("", "target samples of this split ('' = all)")


STAGES: dict[str, type] = {
    "embed": EmbedConfig,
    "index": IndexBuildConfig,
    "retrieve": RetrieveConfig,
    "curate": CurateConfig,
    "sample": SampleConfig,
    "materialize": MaterializeConfig,
    "download": DownloadConfig,
    "adapt": AdaptConfig,
    "evaluate": EvaluateConfig,
    "distill": DistillConfig,
    "finetune": FinetuneConfig,
}


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
    try:
        return type(default)(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: '{f.name}' must be {type(default).__name__}, got {value!r}") from None


def validate(cfg: Any, where: str = "config") -> None:
    """Check choices and required outputs."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value not in choices:
            raise ConfigError(f"{where}: '{f.name}' must be one of {', '.join(choices)}, got {value!r}")
    if hasattr(cfg, "out") and not cfg.out:
        raise ConfigError(f"{where}: 'out' is required (where to write the result)")


def load_yaml(path: str | Path, section: str | None = None) -> dict:
    """Read a YAML config; with `section`, return that stage's mapping."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values")
    if section is not None and section in data and isinstance(data[section], dict):
        data = data[section]
    return data


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(cfg: Any) -> str:
    """Stable short hash of a config's values (for lineage and skip-if-unchanged)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
