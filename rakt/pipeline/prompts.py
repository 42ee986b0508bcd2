"""Text->image queries (REACT-style): class names x prompt templates, encoded by the open_clip text tower.

`text_queries` gives one query per class (`text_queries="class"`: the normalized mean of the class's template
embeddings, i.e. the CLIP zero-shot classifier vector) or one per class x template (`"prompt"`). Query ids
are `text:{class}` / `text:{class}:{template_index}`; the query label is the class index.
`build_text_queries` resolves a retrieve config into those queries and refuses an encoder whose embedding
space is not the index's. This module imports torch only when it encodes.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rakt.pipeline.formats import read_classes
from rakt.pipeline.io import InputError, check_index_model, l2_normalize

if TYPE_CHECKING:
    from rakt.pipeline.config import EncoderConfig, RetrieveConfig
    from rakt.pipeline.encoders import TextEncoder

log = logging.getLogger("rakt")

TEXT_QUERY_PREFIX = "text:"
TEXT_QUERY_MODES = ("class", "prompt")
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a photo of many {}.",
    "an image of a {}.",
)
_PX_SUFFIX = re.compile(r"@(\d+)px$")


@dataclass
class TextQueries:
    """Text queries ready to search: ids, class labels, unit vectors [n, dim], and what they were made from."""

    ids: list[str]
    labels: list[int]
    vectors: np.ndarray
    classes: list[str]
    templates: list[str]
    model_id: str


def load_templates(spec: str) -> list[str]:
    """'default' (the built-in set) or a file with one template per line, each with '{}' for the class name."""
    if spec in ("", "default"):
        return list(DEFAULT_TEMPLATES)
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"templates {spec!r}: neither 'default' nor a file of templates (one per line, with '{{}}')")
    templates = []
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "{}" not in line:
            raise InputError(f"templates file {path}, line {lineno}: {line!r} has no '{{}}' where the class name "
                             f"goes (e.g. 'a photo of a {{}}.')")
        templates.append(line)
    if not templates:
        raise InputError(f"templates file {path}: no templates; write one per line, e.g. 'a photo of a {{}}.'")
    return templates


def prompt(template: str, class_name: str) -> str:
    """A template filled with a class name (underscores read as spaces: 'maple_tree' -> 'maple tree')."""
    return template.replace("{}", class_name.replace("_", " "))


def text_query_id(class_name: str, template_index: int | None = None) -> str:
    if template_index is None:
        return f"{TEXT_QUERY_PREFIX}{class_name}"
    return f"{TEXT_QUERY_PREFIX}{class_name}:{template_index}"


def class_vectors(per_prompt: np.ndarray) -> np.ndarray:
    """[classes, templates, dim] prompt embeddings -> [classes, dim] normalized means (zero-shot classifier)."""
    mean = per_prompt.mean(axis=1)
    return l2_normalize(mean, axis=1).astype(np.float32)


def text_queries(encoder: TextEncoder, classes: list[str], templates: list[str],
                 mode: str = "class") -> tuple[list[str], list[int], np.ndarray]:
    """Encode every class x template prompt; one query per class (mode 'class') or per prompt ('prompt')."""
    if mode not in TEXT_QUERY_MODES:
        raise InputError(f"text_queries must be one of {', '.join(TEXT_QUERY_MODES)}, got {mode!r}")
    texts = [prompt(t, c) for c in classes for t in templates]
    per_prompt = encoder.encode(texts).numpy().astype(np.float32).reshape(len(classes), len(templates), -1)
    if mode == "class":
        return [text_query_id(c) for c in classes], list(range(len(classes))), class_vectors(per_prompt)
    ids = [text_query_id(c, t) for c in classes for t in range(len(templates))]
    labels = [ci for ci in range(len(classes)) for _ in templates]
    return ids, labels, per_prompt.reshape(len(texts), -1)


def text_encoder_config(cfg: RetrieveConfig, meta: dict, index_model: str) -> EncoderConfig:
    """The text tower's encoder config: --model/--pretrained, else the embedding set's recorded model.

    The image resolution (`@Npx` of the index's model id) does not change the text tower; it is copied so that
    the model ids compare equal."""
    from rakt.pipeline.config import ConfigError, EncoderConfig

    if cfg.model:
        model, pretrained = cfg.model, cfg.pretrained
    elif meta.get("model_name"):
        model = str(meta["model_name"])
        pretrained = cfg.pretrained or str(meta.get("pretrained") or "")
    else:
        raise ConfigError("rakt retrieve: text queries need the open_clip model: pass --model NAME --pretrained "
                          "TAG|FILE, or an embedding set whose embeddings.json records model_name and pretrained")
    size = _PX_SUFFIX.search(index_model or "")
    return EncoderConfig(model=model, pretrained=pretrained, image_size=int(size.group(1)) if size else 0,
                         device="auto")


def resolve_classes(cfg: RetrieveConfig, meta: dict, image_queries: bool) -> list[str]:
    """--classes, else the embedding set's recorded classes; with image queries both must name the same labels."""
    recorded = meta.get("classes") or None
    if not cfg.classes:
        if not recorded:
            raise InputError("text queries need class names: pass --classes classes.txt (one name per line)"
                             + ("" if meta else ", or a target embedding set that records its classes"))
        return [str(c) for c in recorded]
    classes = read_classes(cfg.classes)
    if image_queries and recorded and list(recorded) != classes:
        raise InputError(f"--classes {cfg.classes} ({', '.join(classes[:4])}, ...) differs from the classes the "
                         f"image queries' labels index ({', '.join(map(str, recorded[:4]))}, ...); text and image "
                         "queries of one class must share its label: drop --classes or pass the same list")
    return classes


def build_text_queries(cfg: RetrieveConfig, meta: dict, index) -> TextQueries:
    """Resolve classes, templates and the text encoder of a retrieve config; check it against the index; encode."""
    from rakt.pipeline.encoders import encoder_model_id, load_text_encoder, require_text_tower

    classes = resolve_classes(cfg, meta, image_queries=cfg.query_mode == "both")
    templates = load_templates(cfg.templates)
    enc_cfg = text_encoder_config(cfg, meta, index.model)
    require_text_tower(enc_cfg)
    model_id = encoder_model_id(enc_cfg)
    check_index_model(model_id, index.model, cfg.index, "text queries would be encoded with model",
                      "pass the index's model as --model/--pretrained", cfg.force)
    encoder = load_text_encoder(enc_cfg)
    if encoder.dim != index.dim:
        raise InputError(f"text encoder {model_id} gives dim {encoder.dim} but the index {cfg.index} holds dim "
                         f"{index.dim}; use the index's model '{index.model}' (--force cannot bridge different dims)")
    ids, labels, vectors = text_queries(encoder, classes, templates, cfg.text_queries)
    log.info("text queries: %d classes x %d templates -> %d queries (%s)", len(classes), len(templates), len(ids),
             cfg.text_queries)
    return TextQueries(ids, labels, vectors, classes, templates, model_id)
