"""Image encoders behind one interface: open_clip (name + pretrained tag or local checkpoint) and timm.

`model_id` names the embedding space an encoder produces; every embedding set and index records it and
retrieval refuses a mismatch, so it is stable for the same weights:
  open_clip:{name}:{tag}                               a pretrained tag
  open_clip:{name}:file:{basename}:{sha256[:12]}       a local checkpoint
  open_clip:{name}:random                              random init (seeded, so the same in every run)
  timm:{name}:file:{basename}:{sha256[:12]}            a timm model with a local checkpoint
`encoder_model_id(cfg)` computes it without building the model.

`load_text_encoder` gives the text tower of the same open_clip model (same builder, same model_id: text and
image embeddings share one space); given the image encoder of that model it reuses its model, never a copy.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import threading
from importlib import resources
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from PIL import Image

from rakt.pipeline.config import EncoderConfig
from rakt.pipeline.device import autocast, autocast_dtype, channels_last, dtype_name, resolve_device
from rakt.pipeline.io import InputError, file_hash

log = logging.getLogger("rakt")

TIMM_PREFIX = "timm:"
RANDOM_INIT_SEED = 0
# a tiny open_clip architecture (random init) shipped with rakt, for tests and benchmarks that measure the pipeline
# around the model: pass this path as the model name
TINY_CLIP = str(resources.files("rakt.pipeline") / "models" / "rakt-tiny-clip.json")


class ImageEncoder:
    """Images (preprocessed tensors) -> L2-normalized float32 embeddings on CPU."""

    model_id: str
    dim: int
    preprocess: Callable[[Image.Image], torch.Tensor]
    device: torch.device

    def __init__(self, model: torch.nn.Module, model_id: str, dim: int, preprocess: Callable,
                 device: torch.device, precision: str) -> None:
        self.model = model.eval().to(device)
        self.model_id = model_id
        self.dim = dim
        self.preprocess = preprocess
        self.device = device
        self.autocast_dtype = autocast_dtype(device, precision)
        self.model = channels_last(self.model)

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        images = channels_last(images.to(self.device, non_blocking=True))
        with autocast(self.device, self.autocast_dtype):
            features = self._forward(images)
        return F.normalize(features.float(), dim=-1).cpu()


class _OpenClipImageEncoder(ImageEncoder):
    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


def load_image_encoder(cfg: EncoderConfig) -> ImageEncoder:
    """Build the image encoder a config names (eval mode, on its device)."""
    device = resolve_device(cfg.device)
    if cfg.model.startswith(TIMM_PREFIX):
        model, preprocess = _build_timm(cfg.model[len(TIMM_PREFIX):], cfg.pretrained, cfg.image_size)
        encoder = ImageEncoder(model, encoder_model_id(cfg), int(model.num_features), preprocess, device,
                               cfg.precision)
    else:
        model, preprocess, dim = _open_clip_model(cfg)
        encoder = _OpenClipImageEncoder(model, encoder_model_id(cfg), dim, preprocess, device, cfg.precision)
    log.info("encoder %s: dim %d on %s (%s)", encoder.model_id, encoder.dim, device,
             dtype_name(encoder.autocast_dtype))
    return encoder


class TextEncoder:
    """Texts -> L2-normalized float32 embeddings on CPU, in the space of the same model's image embeddings."""

    def __init__(self, model: torch.nn.Module, model_id: str, dim: int, tokenizer: Callable,
                 device: torch.device, precision: str, batch_size: int = 256) -> None:
        self.model = model.eval().to(device)
        self.model_id = model_id
        self.dim = dim
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = max(1, batch_size)
        self.autocast_dtype = autocast_dtype(device, precision)

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embed `texts` in batches of `batch_size`; returns [len(texts), dim]."""
        out = [torch.zeros((0, self.dim))]
        for begin in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[begin:begin + self.batch_size])).to(self.device)
            with autocast(self.device, self.autocast_dtype):
                features = self.model.encode_text(tokens)
            out.append(F.normalize(features.float(), dim=-1).cpu())
        return torch.cat(out)


def require_text_tower(cfg: EncoderConfig) -> None:
    """Refuse encoders without a text tower (timm image models)."""
    if cfg.model.startswith(TIMM_PREFIX):
        raise InputError(f"text queries need an open_clip model with a text tower; {cfg.model} is an image-only "
                         f"timm model (pass --model NAME --pretrained TAG|FILE of an open_clip model, or use "
                         f"--query-mode image)")


def load_text_encoder(cfg: EncoderConfig, image_encoder: ImageEncoder | None = None) -> TextEncoder:
    """The text tower of the open_clip model a config names; reuses `image_encoder`'s model when it is that one."""
    require_text_tower(cfg)
    model_id = encoder_model_id(cfg)
    if isinstance(image_encoder, _OpenClipImageEncoder) and image_encoder.model_id == model_id:
        model, dim, device = image_encoder.model, image_encoder.dim, image_encoder.device
    else:
        device = resolve_device(cfg.device)
        model, _, dim = _open_clip_model(cfg)
    if cfg.model.endswith(".json"):
        _register_config(cfg.model)  # the tokenizer reads context length and kind from the registered config
    import open_clip
    try:
        tokenizer = open_clip.get_tokenizer(_open_clip_name(cfg.model))
    except Exception as e:  # an HF tokenizer offline, a missing vocab file: one clear message
        raise InputError(f"the tokenizer of open_clip {cfg.model} cannot be loaded "
                         f"({str(e).splitlines()[0][:300]}); it may need network access once to fill the HF cache"
                         ) from None
    encoder = TextEncoder(model, model_id, dim, tokenizer, device, cfg.precision, cfg.batch_size)
    log.info("text encoder %s: dim %d on %s (%s)", model_id, dim, device, dtype_name(encoder.autocast_dtype))
    return encoder


def encoder_model_id(cfg: EncoderConfig) -> str:
    """The embedding-space id of the encoder a config names (hashes a local checkpoint)."""
    if cfg.model.startswith(TIMM_PREFIX):
        family, name = "timm", cfg.model[len(TIMM_PREFIX):]
    else:
        family, name = "open_clip", _open_clip_name(cfg.model)
    size = f"@{cfg.image_size}px" if cfg.image_size else ""  # another resolution is another embedding space
    if not cfg.pretrained:
        return f"{family}:{name}:random{size}"
    if os.path.isfile(cfg.pretrained):
        st = os.stat(cfg.pretrained)
        digest = _digest(os.path.abspath(cfg.pretrained), st.st_size, st.st_mtime_ns)
        return f"{family}:{name}:file:{Path(cfg.pretrained).name}:{digest[:12]}{size}"
    return f"{family}:{name}:{cfg.pretrained}{size}"


@functools.lru_cache(maxsize=16)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a checkpoint, hashed once per (path, size, mtime) in a process."""
    return file_hash(path)


@contextlib.contextmanager
def _seeded(seed: int):
    """Deterministic random init without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --- open_clip ------------------------------------------------------------------------------------

def _open_clip_name(model: str) -> str:
    """The registry name of an open_clip model; a path to a JSON config is registered under its stem."""
    if model.endswith(".json"):
        return Path(model).stem
    return model.replace("/", "-")  # open_clip's own spelling: ViT-B/32 -> ViT-B-32


def _register_config(path: str) -> None:
    """Register a JSON model config with open_clip under its file stem (`add_model_config`)."""
    import open_clip

    try:
        wanted = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"open_clip model config {path}: cannot read it ({e})") from None
    if not all(k in wanted for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise InputError(f"open_clip model config {path}: needs the keys embed_dim, vision_cfg and text_cfg")
    if open_clip.get_model_config(Path(path).stem) != wanted:
        open_clip.add_model_config(path)


def _open_clip_model(cfg: EncoderConfig) -> tuple[torch.nn.Module, Callable, int]:
    """One open_clip model (image and text towers), its image transform and its embedding dim."""
    import open_clip

    model, preprocess = _build_open_clip(cfg.model, cfg.pretrained, cfg.image_size)
    return model, preprocess, int(open_clip.get_model_config(_open_clip_name(cfg.model))["embed_dim"])


def _build_open_clip(model: str, pretrained: str, image_size: int = 0) -> tuple[torch.nn.Module, Callable]:
    import open_clip

    if model.startswith(("hf-hub:", "local-dir:")):
        raise InputError(f"{model}: hf-hub:/local-dir: model names are not supported; pass the architecture "
                         f"name (e.g. ViT-B-32) and --pretrained /path/to/open_clip_pytorch_model.bin")
    if model.endswith(".json"):
        _register_config(model)
    name = _open_clip_name(model)
    if name not in open_clip.list_models():
        raise InputError(f"unknown open_clip model {name!r}; list the names with "
                         f"`python -c 'import open_clip; print(open_clip.list_models())'`, give a JSON model "
                         f"config path, or use 'timm:NAME' for a timm model")
    kwargs: dict = {"pretrained_text": False}  # never fetch HF text-tower weights behind the user's back
    if image_size:
        kwargs["force_image_size"] = image_size  # open_clip resizes ViT position embeddings
    if not pretrained:
        log.warning("open_clip %s: no pretrained weights, random init (seed %d)", name, RANDOM_INIT_SEED)
        with _seeded(RANDOM_INIT_SEED):
            model_, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, **kwargs)
        return model_, preprocess
    if os.path.isfile(pretrained):
        return _create_open_clip(name, pretrained, kwargs, f"checkpoint {pretrained}")
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise InputError(f"pretrained {pretrained!r} is neither a file nor a known tag of open_clip {name} "
                         f"(tags: {', '.join(tags) or 'none'}); pass a tag, a local checkpoint, or '' for random init")
    cached = _cached_weights(tag_cfg)
    if cached:  # load the cached file directly (no hub round trip), with the tag's preprocessing
        pp = {f"image_{k}": tag_cfg.get(k) for k in ("mean", "std", "interpolation", "resize_mode")}
        return _create_open_clip(name, cached, {**kwargs, **pp}, f"cached weights of tag {pretrained} ({cached})")
    offline = _offline_reason()
    if offline:
        raise _weights_unavailable(name, pretrained, offline)
    try:
        model_, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, **kwargs)
    except Exception as e:  # any download failure becomes one clear message
        raise _weights_unavailable(name, pretrained, str(e).splitlines()[0][:300]) from None
    return model_, preprocess


def _create_open_clip(name: str, checkpoint: str, kwargs: dict, what: str) -> tuple[torch.nn.Module, Callable]:
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=checkpoint, **kwargs)
    except Exception as e:  # torch/safetensors/state-dict errors alike: re-raised as one clear message
        raise InputError(f"{what} does not load into open_clip {name}: {str(e).splitlines()[0][:300]}") from None
    return model, preprocess


def _cached_weights(tag_cfg: dict) -> str | None:
    """Path of a tag's weights in the local HF cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        return None
    repo, filename = os.path.split(hub)  # "org/repo/" means the default file name
    filename = filename or HF_WEIGHTS_NAME
    safe = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else filename.rsplit(".", 1)[0] + ".safetensors"
    for fname in (safe, filename):  # open_clip prefers the safetensors file too
        hit = try_to_load_from_cache(repo, fname)
        if isinstance(hit, str):
            return hit
    return None


def _offline_reason() -> str:
    """Why the HF hub cannot be reached now ('' when it can); decides in at most ~2 s."""
    from huggingface_hub import constants

    if constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    result: list[str] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=2).close()
            result.append("")
        except OSError as e:
            result.append(f"cannot connect to {host}:{port} ({e})")

    thread = threading.Thread(target=probe, daemon=True)  # DNS lookups ignore socket timeouts
    thread.start()
    thread.join(2.5)
    return result[0] if result else f"no answer from {host}:{port} within 2 s"


def _weights_unavailable(name: str, tag: str, why: str) -> InputError:
    hint = " (unset HF_HUB_OFFLINE to download)" if "HF_HUB_OFFLINE" in why else ""
    return InputError(
        f"the weights for open_clip model {name} tag {tag} are not available offline ({why}); pass a local "
        f"checkpoint (--pretrained /path/to/open_clip_pytorch_model.bin), or set up network access or an HF "
        f"cache that holds them{hint}")


# --- timm -----------------------------------------------------------------------------------------

def _build_timm(name: str, checkpoint: str, image_size: int = 0) -> tuple[torch.nn.Module, Callable]:
    import timm
    import timm.data

    if not timm.is_model(name):
        raise InputError(f"unknown timm model {name!r}; list names with "
                         f"`python -c 'import timm; print(timm.list_models())'`")
    if checkpoint and not os.path.isfile(checkpoint):
        raise InputError(f"timm:{name}: --pretrained must be a local checkpoint file (.safetensors, .pt, .pth), "
                         f"got {checkpoint!r} (no such file)")
    with _seeded(RANDOM_INIT_SEED):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    if checkpoint:
        _load_timm_checkpoint(model, name, checkpoint)
    else:
        log.warning("timm %s: no checkpoint, random init (seed %d)", name, RANDOM_INIT_SEED)
    data_cfg = timm.data.resolve_model_data_config(model)
    if image_size:
        data_cfg["input_size"] = (3, image_size, image_size)
    return model, timm.data.create_transform(**data_cfg, is_training=False)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path, device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise InputError(f"{path}: not a state dict checkpoint")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_timm_checkpoint(model: torch.nn.Module, name: str, path: str) -> None:
    """Load weights strictly except for the classifier head (the encoder has none)."""
    try:
        state = _read_state_dict(path)
    except (OSError, RuntimeError, ValueError) as e:
        raise InputError(f"{path}: cannot read the checkpoint ({str(e).splitlines()[0][:200]})") from None
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    is_head = lambda k: any(k == h or k.startswith(h + ".") for h in heads)  # noqa: E731
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected and not is_head(k)]
    wrong_shape = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        raise InputError(
            f"{path} is not a checkpoint of timm {name}: {len(missing)} missing keys "
            f"({', '.join(missing[:3])}), {len(unexpected)} unexpected keys ({', '.join(unexpected[:3])}), "
            f"{len(wrong_shape)} of other shapes ({', '.join(wrong_shape[:3])}); pass a checkpoint of this "
            f"architecture or the matching --model timm:NAME")
    model.load_state_dict(state, strict=False)  # what is left out is the classifier head, checked above
    log.info("timm %s: loaded %s (%d tensors, head left out)", name, path, len(expected))
