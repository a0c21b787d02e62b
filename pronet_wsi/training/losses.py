"""PROnet losses (paper Eq. 2-4): L = lambda_B (L_V + L_K) + lambda_O L_O + lambda_C L_C, plus lambda_T L_T, the
cross-entropy of the type head on typed points' pseudo-label foreground (typed models only)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pronet_wsi.errors import InputError

IGNORE = 2


@dataclass(frozen=True)
class LossConfig:
    """Loss weights and the focal-loss exponents (CenterNet alpha 2, beta 4).

    class_weights : per-class weights of the type loss (empty: all 1); ``train`` sets them from the click counts
        (:func:`balanced_class_weights`) so a rare class is not drowned by the common ones.
    lambda_keep : weight of a term that keeps the instance maps near the start model's (``train --init``; the
        start model's foreground, centre and offset maps on the same patch are soft targets, as in "learning
        without forgetting"): a few clicks then teach types and adapt the nuclei without unlearning what the start
        model knew. 0 = off; None (the fine-tune recipe's) = by the number of classed clicks (``train``,
        :func:`~pronet_wsi.training.loop.keep_weight_for`).
    type_background : weight of a background term in the type loss: pixels the pseudo labels call background
        (target -2) are taught "no class" (every class logit below a fixed 0 logit); 0 = ignored there, the
        default: 1 lowered the validation mean class F1 of both all-click runs (CoNSeP 0.488 -> 0.428, CRCHisto
        0.571 -> 0.553; RESULTS "Nucleus types").
    """

    lambda_b: float = 1.0
    lambda_o: float = 1.0
    lambda_c: float = 1.0
    alpha: float = 2.0
    beta: float = 4.0
    lambda_t: float = 1.0
    class_weights: tuple[float, ...] = ()
    type_background: float = 0.0
    lambda_keep: float | None = 0.0

    def __post_init__(self) -> None:
        for name in ("lambda_b", "lambda_o", "lambda_c", "alpha", "beta", "lambda_t", "type_background",
                     "lambda_keep"):
            if (getattr(self, name) or 0) < 0:
                raise InputError(f"{name}={getattr(self, name)}: must be >= 0")
        object.__setattr__(self, "class_weights", tuple(float(w) for w in self.class_weights))
        if any(not w > 0 for w in self.class_weights):
            raise InputError(f"class_weights={self.class_weights}: must be > 0")


def balanced_class_weights(counts: list[int]) -> tuple[float, ...]:
    """Type-loss weight per class from its number of clicks: sqrt(median count / count), clipped to [0.2, 5]
    (a class with a tenth of the median's clicks weighs about 3x; softer than inverse frequency, which
    over-predicts a rare class). A class without clicks gets 1."""
    n = np.asarray(counts, np.float64)
    if not (n > 0).any():
        return tuple(1.0 for _ in counts)
    med = float(np.median(n[n > 0]))
    w = np.where(n > 0, np.sqrt(med / np.maximum(n, 1)), 1.0)
    return tuple(round(float(v), 4) for v in np.clip(w, 0.2, 5.0))


def masked_bce(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over labelled pixels only (label 0 or 1; 2 = ignore), normalised by their count.

    logits : (B, 1, H, W) foreground logits; label : (B, H, W) uint8/long in {0, 1, 2}.
    """
    label = label.long()
    valid = label != IGNORE
    n = valid.sum()
    if n == 0:
        return logits.sum() * 0.0
    target = (label == 1).float()
    loss = F.binary_cross_entropy_with_logits(logits[:, 0].float(), target, reduction="none")
    return (loss * valid).sum() / n


def focal_center_loss(logits: torch.Tensor, heatmap: torch.Tensor, alpha: float = 2.0, beta: float = 4.0,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """CenterNet focal loss (paper Eq. 3), normalised by the number of points (pixels where heatmap == 1).

    logits : (B, 1, H, W) centre logits; heatmap : (B, H, W) Gaussian target in [0, 1]; valid : (B, H, W)
    bool, the pixels inside a complete-annotation region (None: all); the others carry no loss.
    """
    logits = logits[:, 0].float()
    pos = heatmap >= 1.0 - 1e-6
    neg = ~pos if valid is None else ~pos & valid
    if valid is not None:
        pos = pos & valid
    log_p = F.logsigmoid(logits)
    log_1mp = F.logsigmoid(-logits)
    p = torch.sigmoid(logits)
    pos_loss = ((1 - p) ** alpha * log_p)[pos].sum()
    neg_loss = ((1 - heatmap) ** beta * p**alpha * log_1mp)[neg].sum()
    n_points = pos.sum().clamp(min=1)
    return -(pos_loss + neg_loss) / n_points


def offset_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 offset loss (paper Eq. 4): mean over all pixels of |O - O_hat|, target 0 where ``mask`` is False.

    pred, target : (B, 2, H, W) (dy, dx) px; mask : (B, H, W) bool, pixels that carry an offset target.
    Pixels outside the mask are not penalised (the paper's target there is undefined).
    """
    diff = (pred.float() - target).abs().sum(dim=1) * mask
    return diff.sum() / mask.numel()


def type_ce(logits: torch.Tensor, target: torch.Tensor, weights: tuple[float, ...] = (),
            background: float = 0.0) -> torch.Tensor:
    """Cross-entropy of (B, K, H, W) class logits over the pixels whose (B, H, W) target is >= 0 (-1 = ignore),
    normalised by their (weighted) count; 0 when no pixel is typed. ``weights``: one per class (empty: all 1).

    ``background`` > 0: a fixed zero logit is appended as a "no class" option; pixels with target -2 are taught
    it (their mean, times ``background``, is added) and typed pixels must beat it. 0: -2 is ignored like -1.
    """
    valid = target >= 0
    if not bool(valid.any()):
        return logits.sum() * 0.0
    w = torch.tensor(weights, dtype=torch.float32, device=logits.device) if weights else None
    logits = logits.float()
    if not background:
        return F.cross_entropy(logits, target.long().clamp(min=-1), weight=w, ignore_index=-1)
    k = logits.shape[1]
    logits = torch.cat([logits, torch.zeros_like(logits[:, :1])], dim=1)
    if w is not None:
        w = torch.cat([w, w.new_ones(1)])
    typed = F.cross_entropy(logits, torch.where(valid, target, -1).long(), weight=w, ignore_index=-1)
    bg = target == -2
    if not bool(bg.any()):
        return typed
    bg_loss = F.cross_entropy(logits, torch.where(bg, k, -1).long(), ignore_index=-1)
    return typed + background * bg_loss


def keep_loss(out: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> torch.Tensor:
    """How far the instance maps ``out`` moved from the start model's ``start`` (same patch): cross-entropy to its
    foreground probabilities (mean over pixels) and to its centre probabilities (normalised by the start map's
    centre mass, as the focal loss is by the number of points), plus the L1 of the offsets weighted by its
    foreground probability. Minimal (the targets' entropy) where the maps agree."""
    p_fg = torch.sigmoid(start["foreground"].float())
    p_c = torch.sigmoid(start["centers"].float())
    l_fg = F.binary_cross_entropy_with_logits(out["foreground"].float(), p_fg)
    l_c = F.binary_cross_entropy_with_logits(out["centers"].float(), p_c, reduction="sum") / p_c.sum().clamp(min=1)
    l_o = ((out["offsets"].float() - start["offsets"].float()).abs().sum(dim=1, keepdim=True) * p_fg).mean()
    return l_fg + l_c + l_o


def pronet_loss(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], config: LossConfig,
                use_offsets: bool, start: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """All terms and the weighted total, for logging and backward; ``start``: the start model's maps of the same
    patch, for the keep term (``lambda_keep``)."""
    l_v = masked_bce(out["foreground"], batch["voronoi"])
    l_k = masked_bce(out["foreground"], batch["cluster"])
    l_c = focal_center_loss(out["centers"], batch["heatmap"], config.alpha, config.beta, batch.get("valid"))
    if use_offsets:
        l_o = offset_l1(out["offsets"], batch["offsets"], batch["offset_mask"])
    else:
        l_o = out["offsets"].sum() * 0.0
    total = config.lambda_b * (l_v + l_k) + config.lambda_c * l_c + config.lambda_o * l_o
    terms = {"loss": total, "voronoi": l_v, "cluster": l_k, "center": l_c, "offset": l_o}
    if "types" in out and "types" in batch:
        terms["type"] = type_ce(out["types"], batch["types"], config.class_weights, config.type_background)
        terms["loss"] = terms["loss"] + config.lambda_t * terms["type"]
    if start is not None and config.lambda_keep:
        terms["keep"] = keep_loss(out, start)
        terms["loss"] = terms["loss"] + config.lambda_keep * terms["keep"]
    return terms
