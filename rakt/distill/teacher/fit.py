"""How each adapt mode fits its trainable parts: a logistic-regression probe, a zero-shot text head, and
gradient training of prompt + mapping (reprogram) or backbone + head (finetune) on labelled images."""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterator

import torch
import torch.nn.functional as F

from rakt.distill.teacher.inputs import holdout_split
from rakt.distill.teacher.model import AdaptedTeacher
from rakt.distill.train_loop import adamw
from rakt.pipeline.device import adapt_threads
from rakt.pipeline.progress import Progress

log = logging.getLogger("rakt")

WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2)
SMALL_WORK = 50_000_000  # rows x dim x classes below which the probe runs on one thread


@contextlib.contextmanager
def _threads_for(work: int) -> Iterator[None]:
    """One intra-op thread for small problems: thread hand-offs cost more than they save (10x on a busy CPU)."""
    before = torch.get_num_threads()
    if work < SMALL_WORK:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _lbfgs(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float,
           max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch multinomial logistic regression with an L2 penalty on the weights."""
    with _threads_for(x.numel() * num_classes):
        return _lbfgs_fit(x, y, num_classes, weight_decay, max_iter)


def _lbfgs_fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float,
               max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def fit_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, weight_decay: float = -1.0,
               holdout: float = 0.2, seed: int = 0, max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A linear probe on L2-normalized features. With weight_decay < 0 it is chosen among WEIGHT_DECAYS by
    accuracy on a stratified `holdout` fraction of the training rows, then refit on all of them."""
    x = F.normalize(x.float(), dim=-1)
    info: dict = {}
    if weight_decay < 0:
        train, held = holdout_split(y, holdout, seed)
        if holdout <= 0 or len(held) == 0:
            weight_decay = WEIGHT_DECAYS[1]
            log.warning("linear probe: no held-out rows (holdout %.2f); weight decay %g", holdout, weight_decay)
        else:
            scores = {}
            for wd in WEIGHT_DECAYS:
                w, b = _lbfgs(x[train], y[train], num_classes, wd, max_iter)
                scores[wd] = float(((x[held] @ w.T + b).argmax(1) == y[held]).float().mean())
            weight_decay = max(WEIGHT_DECAYS, key=lambda wd: (scores[wd], wd))  # ties: the stronger penalty
            info["holdout_accuracy"] = {str(k): round(v, 4) for k, v in scores.items()}
            info["holdout_rows"] = int(len(held))
            log.info("linear probe: holdout accuracy by weight decay %s -> %g", info["holdout_accuracy"], weight_decay)
    w, b = _lbfgs(x, y, num_classes, weight_decay, max_iter)
    info["weight_decay"] = weight_decay
    info["train_accuracy"] = round(float(((x @ w.T + b).argmax(1) == y).float().mean()), 4)
    return w, b, info


def zeroshot_weights(text_encoder, classes: list[str], templates: list[str]) -> torch.Tensor:
    """[classes, dim] normalized mean template embeddings (the CLIP zero-shot classifier)."""
    from rakt.pipeline.prompts import text_queries

    _, _, vectors = text_queries(text_encoder, classes, templates, "class")
    return torch.from_numpy(vectors)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light augmentation of [0, 1] images: random horizontal flip and a random shift of up to 1/8 of the side."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1).to(x.device), x.flip(-1), x)
    pad = max(1, min(h, w) // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()  # one shift per batch: cheap
    return padded[..., dy:dy + h, dx:dx + w]


def fit_images(teacher: AdaptedTeacher, images: torch.Tensor, labels: torch.Tensor, *, epochs: int, lr: float,
               weight_decay: float, batch_size: int, seed: int = 0, backbone_lr: float = 0.01) -> list[float]:
    """Train the teacher's trainable parts with AdamW (cosine schedule) on uint8 images; mean loss per epoch.

    reprogram: prompt + head; finetune: backbone (lr * backbone_lr) + head."""
    device = teacher.logit_scale.device
    head = [p for n, p in teacher.named_parameters() if not n.startswith("backbone.")]
    groups = [{"params": head, "lr": lr}]
    if teacher.backbone_trainable:
        groups.append({"params": [p for p in teacher.backbone.parameters() if p.requires_grad], "lr": lr * backbone_lr})
    opt = adamw(groups, device, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(labels) / batch_size)
    total = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    teacher.train(True)
    bar = Progress(epochs * len(labels), f"adapt ({teacher.mode})", unit="img")
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=gen)
        total_loss = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            x = augment(images[idx].float().div(255), gen).to(device)
            loss = F.cross_entropy(teacher(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
            bar.update(len(idx), loss=loss.item())
            adapt_threads()
        losses.append(total_loss / len(labels))
        log.info("%s epoch %d/%d: loss %.4f", teacher.mode, epoch + 1, epochs, losses[-1])
    bar.close()
    teacher.train(False)
    return losses


@torch.inference_mode()
def image_logits(teacher: AdaptedTeacher, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Teacher logits of uint8 images, in batches, on CPU."""
    device = teacher.logit_scale.device
    out = []
    with Progress(len(images), "teacher eval", unit="img") as bar:
        for i in range(0, len(images), batch_size):
            out.append(teacher(images[i:i + batch_size].float().div(255).to(device)).float().cpu())
            bar.update(len(out[-1]))
            adapt_threads()
    return torch.cat(out) if out else torch.zeros(0, teacher.head.out_features)
