"""Typed configs of this package's stages: `rakt adapt`, `rakt distill`, `rakt finetune`, `rakt evaluate`, `rakt export` and the
fresh student of the labelled-only arm (`init`). Bound to CLI flags and YAML like every stage config
(rakt/pipeline/config.py)."""
from __future__ import annotations

from dataclasses import dataclass

from rakt.distill.kd_modes import KD_MODES, modes_help
from rakt.pipeline.config import (SEED_MAX, EncoderConfig, RegisteredNames, device_option, option, precision_option,
                                  threads_option)

AUGMENTS = ("none", "shift", "crop")
MIXES = ("none", "mixup", "cutmix", "both")  # rakt/distill/mixing.py


@dataclass
class EvaluateConfig:
    source: list[str] = option([], "labelled target test images: image folder (class subfolders), CSV/parquet "
                                   "manifest (path,label) or WebDataset shards with .cls", positional=True)
    checkpoint: str = option("", "student checkpoint file (from the trainer / distill.students.save_student), or "
                                 "bare weights with --model")
    model: str = option("", "timm model name when --checkpoint holds bare weights ('' = read it from the checkpoint)")
    small_input: bool = option(False, "with --model: the student uses the 32-px (CIFAR-style) ResNet stem")
    classes: str = option("", "classes.txt (one name per line) naming label indices; default: found beside the source")
    split: str = option("", "evaluate only samples whose split field is this (e.g. test); '' = every sample")
    batch_size: int = option(256, "images per forward pass")
    device: str = device_option()
    precision: str = precision_option()
    threads: int = threads_option()
    out: str = option("", "output report JSON (accuracy, per-class accuracy, confusion matrix)")


EXPORT_FORMATS = ("auto", "both", "onnx", "torchscript")


@dataclass
class ExportConfig:
    """`rakt export` (rakt/distill/export.py): the student as ONNX and TorchScript, checked and timed."""
    checkpoint: str = option("", "student checkpoint file (from rakt finetune / distill.students.save_student)")
    source: list[str] = option([], "labelled target test images (as for `rakt evaluate`): the exported models' "
                                   "accuracy must equal the PyTorch student's within --tolerance", positional=True)
    format: str = option("auto", "auto: ONNX and TorchScript, TorchScript alone (with a warning) when the ONNX "
                                 "packages are missing; both | onnx | torchscript", choices=EXPORT_FORMATS)
    classes: str = option("", "classes.txt (one name per line); default: found beside the source")
    split: str = option("", "check only on samples whose split field is this ('' = every sample)")
    tolerance: float = option(0.1, "largest accepted accuracy difference, in points, between exported and PyTorch")
    teacher: str = option("", "teacher checkpoint (rakt adapt) measured alongside: parameters and multiply-adds at its "
                              "input size, size and latency in the student's runtimes")
    runs: int = option(50, "latency: timed batch-1 forward passes per model (the median is reported)")
    latency_threads: int = option(1, "intra-op threads of the latency runs (1 = one core; -1 = every core this "
                                     "process may use)", minimum=-1)
    batch_size: int = option(64, "images per forward pass of the accuracy check")
    threads: int = option(-1, "torch / onnxruntime intra-op threads of the accuracy check (-1 = every core)",
                          minimum=-1)
    out: str = option("", "output folder: student.onnx, student.torchscript.pt, student.json, export.json")


@dataclass
class AdaptConfig(EncoderConfig):
    """`rakt adapt`: fit the teacher to the target task (rakt/distill/teacher/adapt.py); batch_size also sets training batches."""
    mode: str = option("linear", "how the teacher is fitted to the task (rakt/distill/teacher/modes.py and the README "
                                 "describe each mode)", choices=RegisteredNames("rakt.distill.teacher.modes:ADAPT_MODES"))
    train: list[str] = option([], "labelled target images (folder, manifest or shards, as for `rakt embed`)")
    embeddings: str = option("", "linear: the train embedding set from `rakt embed` with the same model (reused, "
                                 "not recomputed)")
    eval: list[str] = option([], "test images (source specs) and/or, for linear/zeroshot, an eval embedding set")
    eval_split: str = option("", "rows/samples of this split in --eval ('' = all)")
    split: str = option("", "train rows/samples of this split ('' = all)")
    per_class: int = option(0, "few-shot: keep N training images per class (draw with --seed); 0 keeps all")
    seed: int = option(0, "seed of the few-shot draw, the holdout split and training", maximum=SEED_MAX)
    classes: str = option("", "classes.txt (one name per line); default: recorded with the source / embedding set")
    templates: str = option("default", "zeroshot prompt templates: 'default' or a file, one template with '{}' a line")
    epochs: int = option(10, "reprogram/finetune: passes over the training images")
    lr: float = option(0.0, "learning rate of head and prompt (0 = the mode's default, 0.01)")
    backbone_lr: float = option(0.01, "finetune: backbone learning rate as a fraction of lr")
    weight_decay: float = option(-1.0, "L2 penalty; -1 = linear: chosen on the holdout split, others: 0")
    prompt_size: int = option(30, "reprogram: width in px of the learnable border around the downscaled image")
    holdout: float = option(0.2, "linear: fraction of train held out to choose the weight decay (never the test set)")
    out: str = option("", "teacher checkpoint path (e.g. teacher.pt); the report goes to OUT.json")


@dataclass
class TrainConfig:
    """Loop settings shared by `rakt distill` and `rakt finetune` (rakt/distill/train_loop.py)."""
    epochs: int = option(10, "passes over the training data")
    batch_size: int = option(128, "images per step and process")
    lr: float = option(1e-3, "peak AdamW learning rate")
    weight_decay: float = option(0.05, "AdamW weight decay (not on biases/norms)")
    warmup: int = option(0, "linear warm-up steps before the cosine decay")
    clip: float = option(1.0, "max gradient norm (0 = no clipping)")
    ema: float = option(0.0, "EMA decay of the saved student (e.g. 0.999; 0 = off)")
    augment: str = option("crop", "training views: crop (flip + random resized crop) | shift (flip + translation up "
                                  "to 1/8 of the side) | none", choices=AUGMENTS)
    crop_scale: float = option(0.6, "crop: smallest area fraction of a random resized crop")
    device: str = device_option(" (under torchrun: the local rank's GPU)")
    precision: str = precision_option()
    threads: int = threads_option("; images are decoded once and augmented in batches, so training needs no "
                                  "DataLoader workers")
    seed: int = option(0, "seed of initialisation, shuffling, augmentation and the few-shot draw", maximum=SEED_MAX)
    draw_seed: int = option(-1, "seed of the few-shot draw of labelled target images (-1 = --seed); fix it to keep "
                                "the teacher's labelled images across training seeds", minimum=-1, maximum=SEED_MAX)
    checkpoint_every: int = option(100, "write OUT/checkpoint.pt every N steps (and at the end)")
    resume: bool = option(True, "continue from OUT/checkpoint.pt when it exists")
    compile: bool = option(False, "torch.compile the training module")
    out: str = option("", "output folder: checkpoint.pt, metrics.jsonl, student.pt, summary.json")


@dataclass
class DistillConfig(TrainConfig):
    """`rakt distill`: the adapted teacher -> a timm student on the transfer shards."""
    transfer: list[str] = option([], "transfer-set WebDataset shards (files, brace patterns or a folder)",
                                 positional=True)
    teacher: str = option("", "adapted teacher checkpoint (from `rakt adapt`)")
    student: str = option("resnet18", "timm model name of the student")
    small_input: bool = option(False, "CIFAR-style 32-px stem (timm ResNets)")
    image_size: int = option(0, "training resolution in px (0 = 32 with --small-input, else 224)")
    mode: str = option("task", modes_help(), choices=KD_MODES)
    temperature: float = option(4.0, "KD temperature")
    target: list[str] = option([], "optional labelled target images to distill on too (see --target-mix)")
    target_mix: str = option("transfer", "transfer: the target images join the transfer set (KD only, once per "
                                         "epoch) | step: --target-batch-size of them join every step, with "
                                         "hard-label CE weighted --hard-weight (measured worse: docs/results.md)",
                             choices=("transfer", "step"))
    target_per_class: int = option(0, "few-shot draw of N target images per class (0 = all)")
    hard_weight: float = option(1.0, "target-mix step: weight of the hard-label CE on target images")
    target_batch_size: int = option(0, "target-mix step: labelled target images joined to each step (0 = --batch-size)")
    classes: str = option("", "classes.txt of the target task (default: recorded with the target images)")
    cache_teacher: bool = option(False, "compute teacher outputs once (beside the decoded shards, in teacher-cache/) "
                                        "instead of running the teacher every step; see --teacher-view")
    teacher_view: str = option("same", "with --cache-teacher: same (the student trains on --cache-views fixed views, "
                                       "epoch e on view e mod V, with the teacher's outputs on that view) | clean (the "
                                       "teacher's outputs on the whole image; the student gets fresh views each epoch)",
                               choices=("same", "clean"))
    cache_views: int = option(4, "augmented views per image in the teacher cache (teacher-view same)")
    cache_seed: int = option(-1, "seed of the cached views (-1 = --seed); fix it to share one cache across seeds",
                             minimum=-1, maximum=SEED_MAX)
    mix: str = option("none", "mix transfer batches (function matching): mixup | cutmix | both (either, 1/2 each per "
                              "batch) | none; the online teacher sees the same mixed image, a cached one gives the "
                              "mixture of its class distributions (an approximation)", choices=MIXES)
    mix_alpha: float = option(1.0, "--mix: Beta(alpha, alpha) distribution of the mixing weight (> 0)")
    mix_prob: float = option(1.0, "--mix: probability that a batch is mixed (0-1)")


@dataclass
class FinetuneConfig(TrainConfig):
    """`rakt finetune`: a distilled student -> cross-entropy on the labelled target images."""
    lr: float = option(1e-4, "peak AdamW learning rate (small: the student is already distilled)")
    student: str = option("", "student checkpoint (OUT/student.pt of `rakt distill`)")
    target: list[str] = option([], "labelled target images (folder, manifest or shards)", positional=True)
    classes: str = option("", "classes.txt (default: recorded with the target images)")
    per_class: int = option(0, "few-shot draw of N images per class (0 = all)")
    split: str = option("", "target samples of this split ('' = all)")


@dataclass
class InitConfig:
    """A randomly initialised student for the labelled-only arm; the class count comes from an embedding set."""
    student: str = option("resnet18", "timm model name of the student")
    seed: int = option(0, "seed of the initialisation", maximum=SEED_MAX)
    small_input: bool = option(False, "CIFAR-style 32-px stem (timm ResNets)")
    image_size: int = option(0, "the student's input resolution in px (0 = the model's own)")
    embeddings: str = option("", "embedding set whose recorded classes the student predicts")
    out: str = option("", "student checkpoint file to write (e.g. init/student.pt)")


@dataclass
class ScoreConfig:
    """`rakt score` (rakt/distill/teacher/score.py): the adapted teacher's class prediction for every retrieved candidate."""
    candidates: str = option("", "candidates directory (from `rakt retrieve`)", positional=True)
    teacher: str = option("", "adapted teacher checkpoint (from `rakt adapt`)")
    max_rank: int = option(0, "score only candidates of rank < N (0 = every candidate)")
    pool_root: str = option("", "the local pool's folder, as for `rakt materialize` ('' = from the index's lineage)")
    batch_size: int = option(256, "images per teacher forward pass")
    device: str = device_option()
    precision: str = precision_option()
    threads: int = threads_option()
    out: str = option("", "output folder: scores.parquet (pool_id, pred, prob, logits), scores.json, and the "
                          "candidates' images as shards (kept for a resumed run)")
