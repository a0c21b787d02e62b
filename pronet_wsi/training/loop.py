"""train(config) -> checkpoints, a CSV log, a training curve and a model folder ``load_model`` reads.

The paper's schedule: offset loss after ``offset_start_epoch`` (targets from the current predicted mask and
the current points), EM refinement after ``refine_start_epoch``.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import pickle
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from pronet_wsi.errors import InputError
from pronet_wsi.files import atomic_write
from pronet_wsi.inference import InferenceConfig, Predictor
from pronet_wsi.metrics import evaluate_image, mean_scores
from pronet_wsi.model import ModelBundle, ModelConfig, PRONet, load_model, resolve_model_dir, save_model
from pronet_wsi.postprocess import PostprocessConfig, postprocess
from pronet_wsi.progress import progress_bar
from pronet_wsi.training.dataset import AugmentConfig, PatchDataset, Sample, channel_stats, prepare_samples
from pronet_wsi.training.inputs import item_classes
from pronet_wsi.training.losses import LossConfig, balanced_class_weights, pronet_loss
from pronet_wsi.training.pseudolabels import PseudoLabelConfig
from pronet_wsi.training.refinement import RefineConfig, refine_points

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"  # weights of the epoch with the best validation AJI (tensors only)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs. The defaults are the ``cpu`` recipe, the one that made the shipped
    model's first stage (width 0.25, Adam 1e-3 with a cosine, 120 epochs); see :data:`RECIPES` for the paper's
    and :data:`FINE_TUNE` for what changes when a run starts from a trained model (``init``).

    ``offset_start_epoch`` / ``refine_start_epoch`` default to the paper's 20 / 30 of 150 epochs, scaled to
    ``epochs``. Without offsets (``use_offsets=False``) the saved model groups pixels by nearest centre.

    use_offsets / use_refinement switch the paper's modules off for the ablation; ``grouping`` is the
    post-processing the saved model uses. ``max_minutes`` stops early (the model is still written).
    ``tune_center_thresholds`` x ``tune_foreground_thresholds`` x ``tune_min_areas_um2`` (um^2): the grid the
    threshold search on the validation images tries.
    ``keep_best``: with validation images, the saved model is the validated epoch with the best AJI, not the
    last one.
    ``init``: a model folder (or "default", the shipped model) whose weights, width, mpp and normalisation the
    run starts from. ``predict_every``: epochs between the full-image predictions that give the offset targets
    and the E-step (they cost a forward pass over every training image). ``patches_by_area``: patches per image
    scale with its area (``patches_per_image`` per megapixel, at least one), so small crops are not oversampled.
    ``min_patches``: an epoch has at least this many patches (the images cycled), so a few clicked crops still
    give the new type head enough steps (10 CoNSeP crops gave 2 steps an epoch without it).
    ``tune_class_weights``: a typed run with held-back clicks ends by choosing per-class weights on the class
    probabilities (``thresholds.json`` ``class_weights``) for the best mean class F1 on those clicks, when each
    class has at least ``class_weight_min_clicks`` of them (tuned on one held-back CRCHisto image with 5
    inflammatory clicks, the weights cost 0.2 mean class F1 on the test split).
    ``nucleus_classifier``: then fit a logistic regression on each clicked training nucleus's class
    probabilities, shape and stain (:mod:`pronet_wsi.classify`); on the same condition it is kept only when it
    beats the head (with its class weights) on the held-back clicks by at least ``classifier_min_gain`` mean class
    F1, with fewer held-back clicks it is kept unchecked (:func:`fit_types`).
    ``classes``: nucleus classes of the type head (default: the classes of the training points; none = untyped).
    ``freeze_trunk``: train only the type head (the start model's nuclei stay exactly as they were).
    ``type_head``: a new type head's architecture (:class:`~pronet_wsi.model.ModelConfig`; a start model with the
    same classes keeps its own). ``deep`` won CoNSeP's all-click run and lost CRCHisto's (benchmarks/RESULTS.md).
    ``type_lr_factor``: the type head's learning rate is ``lr`` times this (a new head starts from random weights
    while the trunk is already trained); None (the fine-tune recipe's) = by the number of classed clicks,
    :func:`type_lr_factor_for`.
    ``radius_px``: the centre heatmap's radius of a new model (a model started from ``init`` keeps its own;
    ``mpp`` and ``width`` left None take the start model's, see :meth:`recipe`).
    ``holdout``: without validation images, this share of the training images (at least one) is held back and
    its clicks score every validated epoch (detection F1 within ``holdout_radius_um``, averaged with the mean
    class F1 for a typed model); the best epoch is kept, then the centre threshold and minimum area (the grids
    above, with ``tune_thresholds``) are chosen by detection F1 on those clicks, before the class weights and the
    classifier. 0 trains on every image and keeps the last epoch. The fine-tune recipe holds back 0.1, but only
    when the held-back images hold at least ``holdout_min_clicks`` clicks (and there are two images or more):
    with fewer, every image trains and a warning says so. Chosen on the validation splits (ten images, `train
    --init default`, RESULTS "How a fine-tune chooses its epoch"): CRCHisto (267 held-back clicks) typed mean class
    F1 0.480 -> 0.495, untyped F_d 0.719 -> 0.751 with the hold-back; CoNSeP (31) typed 0.443 -> 0.407 with it.
    """

    epochs: int = 120
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_epochs: int = 1
    patch_px: int = 256
    patches_per_image: int = 16
    width: float = 0.25
    mpp: float = 0.25
    radius_px: float = ModelConfig.center_radius_px  # one owner: the model's; with init, the start model's
    offset_start_epoch: int | None = None
    refine_start_epoch: int | None = None
    use_offsets: bool = True
    use_refinement: bool = True
    grouping: str = "offsets"
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    num_threads: int | None = None
    max_minutes: float | None = None
    val_every: int = 5
    tune_thresholds: bool = True
    tune_center_thresholds: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4)
    tune_foreground_thresholds: tuple[float, ...] = (0.4, 0.5, 0.6)
    # 10-320 px at 0.25 um/px; 10 and 20 um^2 added in the seventh session: the held-back clicks of both
    # CRCHisto runs chose 80 px, the largest then, and 160 px from the wider grid (RESULTS)
    tune_min_areas_um2: tuple[float, ...] = (0.625, 1.25, 2.5, 5.0, 10.0, 20.0)
    init: str | None = None
    keep_best: bool = True
    predict_every: int = 1
    patches_by_area: bool = True
    min_patches: int = 1
    tune_class_weights: bool = True
    class_weight_min_clicks: int = 20
    nucleus_classifier: bool = True
    classifier_min_gain: float = 0.01
    classes: tuple[str, ...] = ()
    freeze_trunk: bool = False
    type_head: str = "small"
    holdout: float = 0.0
    holdout_radius_um: float = 3.0
    holdout_min_clicks: int = 100
    type_lr_factor: float | None = 1.0
    pseudo: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise InputError(f"epochs={self.epochs}: must be >= 1")
        if self.max_minutes is not None and not (0 < self.max_minutes < float("inf")):
            raise InputError(f"max_minutes={self.max_minutes}: must be a number of minutes > 0 (--max-minutes)")
        if self.batch_size < 1:
            raise InputError(f"batch_size={self.batch_size}: must be >= 1")
        if self.schedule not in ("constant", "cosine"):
            raise InputError(f"schedule={self.schedule!r}: must be constant or cosine")
        if self.offset_start_epoch is None:
            object.__setattr__(self, "offset_start_epoch", round(self.epochs * 20 / 150))
        if self.refine_start_epoch is None:
            object.__setattr__(self, "refine_start_epoch", round(self.epochs * 30 / 150))
        if not self.use_offsets and self.grouping == "offsets":  # an untrained offset head must not group
            object.__setattr__(self, "grouping", "nearest_center")
        if self.predict_every < 1:
            raise InputError(f"predict_every={self.predict_every}: must be >= 1")
        if self.patch_px < 64 or self.patch_px % 16:
            raise InputError(f"patch_px={self.patch_px}: must be a multiple of 16 and >= 64")
        if not 0.0 <= self.holdout < 1.0:
            raise InputError(f"holdout={self.holdout}: must be in [0, 1)")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def recipe(cls, name: str = "cpu", **overrides) -> TrainConfig:
        """The named recipe (:data:`RECIPES`), with :data:`FINE_TUNE` when ``init`` is given, then ``overrides``
        (None values are ignored, so CLI options left unset keep the recipe's value). With ``init``, ``mpp``,
        ``width`` and ``radius_px`` are the start model's (a ``width`` override that differs is refused; another
        ``mpp`` rescales the start model, :func:`rescale_model`)."""
        if name not in RECIPES:
            raise InputError(f"--recipe {name}: unknown; choose one of {', '.join(RECIPES)}")
        values = dict(RECIPES[name])
        if overrides.get("init"):
            values.update(FINE_TUNE)
            start = load_model(resolve_model_dir(None if overrides["init"] == "default" else overrides["init"])).config
            check_start(start, overrides["init"], overrides.get("width"))
            mpp = overrides.get("mpp") or start.mpp  # another mpp: the start model is rescaled (rescale_model)
            values.update(mpp=mpp, width=start.width, radius_px=start.center_radius_px * start.mpp / mpp)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def from_json(cls, raw: dict) -> TrainConfig:
        raw = dict(raw)
        raw["pseudo"] = PseudoLabelConfig(**raw["pseudo"])
        raw["loss"] = LossConfig(**{**raw["loss"], "class_weights": tuple(raw["loss"].get("class_weights", ()))})
        raw["refine"] = RefineConfig(**raw["refine"])
        aug = dict(raw["augment"])
        for key in ("scale_range", "lowres_range"):
            if key in aug:
                aug[key] = tuple(aug[key])
        raw["augment"] = AugmentConfig(**aug)
        if "tune_min_areas" in raw:  # written before 2026-12-06: px at the run's mpp
            raw["tune_min_areas_um2"] = [a * raw.get("mpp", 0.25) ** 2 for a in raw.pop("tune_min_areas")]
        for key in ("tune_center_thresholds", "tune_foreground_thresholds", "tune_min_areas_um2"):
            if key in raw:
                raw[key] = tuple(raw[key])
        raw["classes"] = tuple(raw.get("classes", ()))
        raw.setdefault("holdout_min_clicks", 0)  # written before 2026-12-07: --holdout held back whatever it drew
        return cls(**raw)


RECIPES: dict[str, dict] = {
    "cpu": {},  # the TrainConfig defaults
    "paper": dict(epochs=150, lr=1e-4, weight_decay=3e-2, schedule="constant", warmup_epochs=0, width=1.0,
                  patches_by_area=False),
}
# Starting from a trained model (--init): a lower rate without warm-up, offsets and refinement from the start
# (the model already finds nuclei), the full-image predictions every 3rd epoch (they cost a forward pass over
# every image). Used for the shipped model's second stage (models/pronet-multilab/MODEL_CARD.md). A tenth of the
# images held back when they hold enough clicks (``holdout_min_clicks``) to choose the epoch and the thresholds.
FINE_TUNE: dict = dict(lr=5e-4, warmup_epochs=0, offset_start_epoch=0, refine_start_epoch=0, predict_every=3,
                       epochs=40, patches_per_image=8, val_every=3, type_lr_factor=None, min_patches=64,
                       holdout=0.1, loss=LossConfig(lambda_keep=None))
# type_lr_factor and lambda_keep None: by the number of classed clicks (type_lr_factor_for, keep_weight_for).
MANY_TYPED_CLICKS = 5000
"""From this many classed clicks on, a new type head learns at 5x the rate, below it at 1x. Measured (benchmarks/
RESULTS.md, "Nucleus types"; mean class F1 on the test splits): 5x wins with all clicks (CoNSeP 17,033: held-back
clicks 0.660 vs 0.630 at 1x; CRCHisto 13,698: 0.417 vs 0.252), 1x with ten images (CoNSeP 344 clicks: 0.405 vs
0.359; CRCHisto 2,487 classed: 0.350 vs 0.239)."""


def type_lr_factor_for(n_typed_clicks: int) -> float:
    """The type head's learning-rate factor for a run with ``n_typed_clicks`` classed clicks.

    >>> type_lr_factor_for(344), type_lr_factor_for(17033)
    (1.0, 5.0)
    """
    return 5.0 if n_typed_clicks >= MANY_TYPED_CLICKS else 1.0


KEEP_FEW_CLICKS = 1.0
"""The keep term's weight (:func:`~pronet_wsi.training.losses.keep_loss`) for a fine-tune from fewer than
:data:`MANY_TYPED_CLICKS` clicks (classed clicks for a typed run). Measured (benchmarks/RESULTS.md, "Keeping the
start model's nuclei"; validation splits, ten images each): typed CoNSeP mean class F1 0.476 -> 0.483, F_d 0.699
-> 0.740 (weight 0.3: 0.478 / 0.712; 3: 0.457 / 0.741), typed CRCHisto 0.501 -> 0.506, F_d 0.772 -> 0.777;
untyped CoNSeP F_d 0.673 -> 0.731, AJI 0.390 -> 0.431 (the start model 0.738 / 0.453), untyped CRCHisto F_d
0.774 -> 0.771 (a new lab at 20x still adapts: the start model 0.665). With all of CoNSeP's 17,033 classed
clicks it lost (0.532 -> 0.524, F_d 0.764 both): there the clicks teach more than the start model knew."""


def keep_weight_for(n_clicks: int) -> float:
    """The keep term's weight for a fine-tune from ``n_clicks`` clicks (classed clicks for a typed run).

    >>> keep_weight_for(344), keep_weight_for(17033)
    (1.0, 0.0)
    """
    return KEEP_FEW_CLICKS if n_clicks < MANY_TYPED_CLICKS else 0.0


def _lr_factor(config: TrainConfig, epoch: int, minutes: float = 0.0) -> float:
    """Warm-up, then constant or cosine; with ``max_minutes`` the cosine follows whichever of epochs and
    wall time is further along, so a time-limited run still ends at a low learning rate."""
    if config.warmup_epochs and epoch < config.warmup_epochs:
        return (epoch + 1) / config.warmup_epochs
    if config.schedule == "cosine":
        t = (epoch - config.warmup_epochs) / max(config.epochs - config.warmup_epochs, 1)
        if config.max_minutes:
            t = min(max(t, minutes / config.max_minutes), 1.0)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def _predict_full(predictor: Predictor, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    predictor.model.eval()
    out = [predictor.predict_image(im) for im in images]
    predictor.model.train()
    return out


def train(config: TrainConfig, train_items: list, outdir: str | Path, val_items: list | None = None,
          resume: bool = False, progress: bool = True) -> Path:
    """Train PRONet on ``train_items`` = [(name, image uint8 HxWx3, points_xy Nx2[, region[, classes]])], write
    ``outdir``.

    ``outdir`` becomes a model folder (config.json, thresholds.json, weights.pt) with ``train/`` holding
    checkpoint.pt, log.csv, curve.png, train_config.json and the pseudo-label cache. ``val_items`` =
    [(name, image, gt instance map)] are used for validation scores and threshold tuning; without them, a
    ``config.holdout`` share of the training images is held back and its clicks validate.

    The algorithm is the paper's section 2: pseudo labels from the points (2.1, :func:`prepare_samples`), then each
    epoch :func:`em_epoch` (E-step, Eq. 5; M-step, Eq. 2-4 and 6). :class:`_Run` keeps the books beside it (log,
    validation, best epoch, checkpoint, time limit) and :func:`_finish` tunes and saves the model.
    """
    outdir = Path(outdir)
    _check_run_folder(outdir, resume)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    config = with_point_classes(config, train_items)
    held: list = []
    if config.holdout and not val_items:
        train_items, held = hold_back(train_items, config)
    work = outdir / "train"
    work.mkdir(parents=True, exist_ok=True)
    samples = prepare_samples(train_items, config.pseudo, work / "cache", config.classes)  # V, K, cells (2.1)
    predictor, opt = _learner(config, start_model(config, samples))
    start = _frozen_copy(predictor.model) if config.init and config.loss.lambda_keep else None
    run = _Run(config, work, predictor, opt, samples, val_items or [], held, resume, progress)
    mcfg = predictor.bundle.config
    dataset = PatchDataset(samples, config.patch_px, config.patches_per_image, mcfg.center_radius_px, mcfg.mean,
                           mcfg.std, config.augment, config.seed, by_area=config.patches_by_area,
                           min_patches=max(config.batch_size, config.min_patches))
    for epoch in range(run.start_epoch, config.epochs):
        _set_learning_rate(opt, config, epoch, run.minutes())
        stats = em_epoch(config, epoch, predictor, opt, samples, dataset, start)
        if run.end_epoch(epoch, stats):
            break
    return _finish(config, run, outdir)


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The start network as it is now, fixed (eval mode, no gradients): the keep term's targets."""
    start = copy.deepcopy(model).eval()
    for p in start.parameters():
        p.requires_grad_(False)
    return start


def _check_run_folder(outdir: Path, resume: bool) -> None:
    """An InputError when ``--resume`` finds no run in ``outdir``, or a new run would overwrite one."""
    if resume and not (outdir / "train" / CHECKPOINT).exists():
        raise InputError(f"--resume: no checkpoint in {outdir / 'train'}; start without --resume")
    if not resume and (outdir / "train" / CHECKPOINT).exists():
        raise InputError(f"{outdir} already holds a training run; pass --resume to continue it or choose a new -o")


def with_point_classes(config: TrainConfig, train_items: list) -> TrainConfig:
    """``config`` with the clicks' classes (when it names none) and, for a typed run, type-loss weights that
    balance the classes' click counts (when it gives none)."""
    if not config.classes and item_classes(train_items):
        config = replace(config, classes=item_classes(train_items))
    if config.classes and not config.loss.class_weights:
        counts = [sum(c == name for it in train_items if len(it) > 4 and it[4] for c in it[4])
                  for name in config.classes]
        config = replace(config, loss=replace(config.loss, class_weights=balanced_class_weights(counts)))
        log.info("type loss weights %s for %s clicks of %s", config.loss.class_weights, counts, config.classes)
    n = sum(c in config.classes for it in train_items if len(it) > 4 and it[4] for c in it[4])
    if config.type_lr_factor is None:
        config = replace(config, type_lr_factor=type_lr_factor_for(n))
        if config.classes:
            log.info("type head learning rate %gx (%d classed clicks)", config.type_lr_factor, n)
    if config.loss.lambda_keep is None:
        n_clicks = n if config.classes else sum(len(it[2]) for it in train_items)
        config = replace(config, loss=replace(config.loss, lambda_keep=keep_weight_for(n_clicks)))
        if config.loss.lambda_keep:
            log.info("keeping the nuclei maps near the start model's (weight %g; %d %sclicks)",
                     config.loss.lambda_keep, n_clicks, "classed " if config.classes else "")
    if config.freeze_trunk and not config.classes:
        raise InputError("--freeze-trunk trains only the type head; the points carry no classes")
    return config


def _learner(config: TrainConfig, bundle: ModelBundle) -> tuple[Predictor, torch.optim.Optimizer]:
    """The network to train (as a PyTorch Predictor: validation must see the weights as they train, not a graph
    converted at the start) and its optimiser: the type head at ``type_lr_factor`` times the rate, the trunk
    fixed with ``freeze_trunk``."""
    predictor = Predictor(bundle, InferenceConfig(device=config.device, amp=config.amp, runtime="torch"))
    model = predictor.model
    groups: list[dict] = [{"params": model.trunk_parameters(), "lr_factor": 1.0}]
    if model.head_type is not None:
        groups.append({"params": list(model.head_type.parameters()), "lr_factor": config.type_lr_factor or 1.0})
    if config.freeze_trunk:
        for p in model.trunk_parameters():
            p.requires_grad_(False)
        groups = groups[1:]
    return predictor, torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)


def _set_learning_rate(opt: torch.optim.Optimizer, config: TrainConfig, epoch: int, minutes: float) -> None:
    for g in opt.param_groups:
        g["lr"] = config.lr * g.get("lr_factor", 1.0) * _lr_factor(config, epoch, minutes)


def em_epoch(config: TrainConfig, epoch: int, predictor: Predictor, opt: torch.optim.Optimizer,
             samples: list[Sample], dataset: PatchDataset, start: torch.nn.Module | None = None) -> dict[str, float]:
    """One epoch of the paper's EM (section 2): the E-step predicts every image (every ``predict_every`` epochs):
    its masks give the offset targets (2.2) and, once refinement starts, each point moves to its cell's
    offset-vote peak (Eq. 5); the M-step minimises Eq. 2-4 and 6 over the epoch's patches. Returns the mean loss
    terms and ``mean_movement`` of the points (px; NaN without an E-step)."""
    assert config.offset_start_epoch is not None and config.refine_start_epoch is not None  # __post_init__
    use_offsets = config.use_offsets and epoch >= config.offset_start_epoch and not config.freeze_trunk
    refine = use_offsets and config.use_refinement and epoch >= config.refine_start_epoch
    unpredicted = any(s.pred_mask is None for s in samples)
    movement = float("nan")
    t0 = time.monotonic()
    if (use_offsets or refine) and (epoch % config.predict_every == 0 or unpredicted):
        movement = predict_and_refine(predictor, samples, config.refine if refine else None)
    elif config.freeze_trunk and unpredicted:  # the fixed trunk's mask, once: the type target needs it for pale
        predict_and_refine(predictor, samples, None)  # nuclei
    t_pred = time.monotonic() - t0
    dataset.epoch = epoch
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
    sums, n = m_step_epoch(predictor, opt, loader, config.loss, use_offsets, config.freeze_trunk, start)
    log.info("epoch %d: predict+refine %.1f s, %d steps %.1f s", epoch, t_pred, n, time.monotonic() - t0 - t_pred)
    return {**{k: v / n for k, v in sums.items()}, "mean_movement": movement}


class _Run:
    """The books of a training run, kept beside the algorithm: ``log.csv``, validation every ``val_every``
    epochs (ground-truth AJI on ``val_items``, or the ``held`` clicks) with the best epoch kept, the checkpoint
    after every epoch, the time limit and the progress bar. Opening one with ``resume`` restores weights,
    optimiser and refined points from the checkpoint."""

    FIELDS = ["epoch", "minutes", "lr", "loss", "voronoi", "cluster", "center", "offset", "type", "keep",
              "mean_movement", "val_object_dice", "val_aji", "val_clicks"]

    def __init__(self, config: TrainConfig, work: Path, predictor: Predictor, opt: torch.optim.Optimizer,
                 samples: list[Sample], val_items: list, held: list, resume: bool, progress: bool) -> None:
        self.config, self.work, self.predictor, self.opt, self.samples = config, work, predictor, opt, samples
        self.val_items, self.held = val_items, held
        self.epochs_done = 0
        self.start_epoch, elapsed0 = (restore_checkpoint(work / CHECKPOINT, predictor.model, opt, samples)
                                      if resume else (0, 0.0))
        if self.start_epoch >= config.epochs:
            raise InputError(f"--resume: the run in {work.parent} has trained {self.start_epoch} epochs of "
                             f"{config.epochs}; give --epochs more than {self.start_epoch} to continue it")
        (work / "train_config.json").write_text(json.dumps(config.to_json(), indent=2) + "\n")
        self.log_path = work / "log.csv"
        self.fields = list(self.FIELDS)
        if not resume or not self.log_path.exists():
            with open(self.log_path, "w", newline="") as f:
                csv.writer(f).writerow(self.fields)
        else:  # a run started by an older version keeps its columns
            with open(self.log_path, newline="") as f:
                self.fields = next(csv.reader(f), self.fields)
            _truncate_log(self.log_path, self.start_epoch)  # rows of epochs after the checkpoint are redone
        self.t0 = time.monotonic() - elapsed0
        self.bar = progress_bar(config.epochs, "epochs", "ep", initial=self.start_epoch, enabled=progress, leave=True)

    def minutes(self) -> float:
        return (time.monotonic() - self.t0) / 60

    def end_epoch(self, epoch: int, stats: dict[str, float]) -> bool:
        """Log, validate and checkpoint ``epoch``; True when it is the run's last (epochs or time used up)."""
        config, model = self.config, self.predictor.model
        row = {"epoch": epoch, "minutes": round(self.minutes(), 3), "lr": self.opt.param_groups[0]["lr"],
               **{k: v if k == "mean_movement" else round(v, 5) for k, v in stats.items()},
               "val_object_dice": "", "val_aji": "", "val_clicks": ""}
        last = epoch == config.epochs - 1 or _out_of_time(config, self.t0)
        due = last or (epoch + 1) % config.val_every == 0
        thresholds = self.predictor.bundle.thresholds
        if self.val_items and due:
            vs = validate(self.predictor, self.val_items, thresholds)
            row["val_object_dice"], row["val_aji"] = round(vs.object_dice, 4), round(vs.aji, 4)
            if config.keep_best:
                _keep_if_best(self.work / BEST, model, epoch, vs.aji)
        if self.held and due:
            radius_px = config.holdout_radius_um / self.predictor.bundle.config.mpp
            row["val_clicks"] = round(validate_clicks(self.predictor, self.held, thresholds, radius_px), 4)
            if config.keep_best:
                _keep_if_best(self.work / BEST, model, epoch, row["val_clicks"])
        with open(self.log_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore").writerow(row)
        _save_checkpoint(self.work / CHECKPOINT, model, self.opt, self.samples, epoch, time.monotonic() - self.t0)
        self.epochs_done = epoch + 1
        self.bar.update(1)
        self.bar.set_postfix(loss=row.get("loss"), val_aji=row["val_aji"] or None)
        if last:
            self.bar.close()
        return last


def _finish(config: TrainConfig, run: _Run, outdir: Path) -> Path:
    """The kept (best validated) epoch's weights, class weights tuned on the held-back clicks, thresholds tuned
    on the validation images, then the model folder, the refined points and the training curve."""
    predictor, work = run.predictor, run.work
    model, mcfg, thresholds = predictor.model, predictor.bundle.config, predictor.bundle.thresholds
    extra = {"epochs_trained": run.epochs_done}
    if (run.val_items or run.held) and config.keep_best and (work / BEST).exists():
        state = torch.load(work / BEST, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        extra["kept_epoch"] = int(state["epoch"])
        log.info("keeping epoch %d (validation score %.4f)", int(state["epoch"]), float(state["aji"]))
    if run.held and not run.val_items and config.tune_thresholds:
        thresholds = tune_on_clicks(predictor, run.held, thresholds, config)
    if mcfg.classes:
        train_items = [(s.name, s.image, s.initial_points_xy + 0.5, s.region,  # array-index -> continuous
                        [mcfg.classes[i] if i >= 0 else "" for i in s.point_classes])
                       for s in run.samples if s.point_classes is not None]
        thresholds = fit_types(predictor, train_items, run.held, thresholds, config)
    if run.val_items and config.tune_thresholds:
        thresholds = tune_thresholds(predictor, run.val_items, thresholds, _min_areas_px(config, mcfg.mpp),
                                     config.tune_center_thresholds,
                                     config.tune_foreground_thresholds)
    model.eval()
    save_model(model.to("cpu").to(memory_format=torch.contiguous_format),  # type: ignore[call-overload]
               outdir, thresholds, extra={**extra, "train_minutes": round(run.minutes(), 2)})
    _write_points(work, run.samples)
    plot_curve(run.log_path, work / "curve.png")
    return outdir


def start_model(config: TrainConfig, samples: list[Sample]) -> ModelBundle:
    """The network a run starts from: ``config.init``'s weights, width, mpp and normalisation, or a fresh
    network normalised to the training images."""
    if config.init:
        start = load_model(resolve_model_dir(None if config.init == "default" else config.init))
        start = rescale_model(start, config.mpp)
        check_start(start.config, config.init, config.width)
        head = start.config.type_head if start.config.classes == config.classes else config.type_head
        same = start.config.classes == config.classes
        mcfg = replace(start.config, extra={}, classes=config.classes, type_head=head,
                       class_colors=start.config.class_colors if same else ())
        model = PRONet(mcfg)
        state = start.model.state_dict()
        if not same:
            state = {k: v for k, v in state.items() if not k.startswith("head_type.")}
            if start.config.classes:
                log.warning("--init %s: its classes %s differ from the points' %s; starting a new type head",
                            config.init, list(start.config.classes), list(config.classes))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("head_type.") for k in missing):
            raise InputError(f"--init {config.init}: weights do not fit the network ({(missing + unexpected)[:3]})")
        # class weights and a nucleus classifier were fitted to the start model's type head; a new head or
        # new weights make them stale (train refits them on the held-back clicks)
        thresholds = replace(start.thresholds, grouping=config.grouping, nucleus_classifier=None,
                             class_weights=start.thresholds.class_weights if same else ())
        return ModelBundle(model, mcfg, thresholds)
    mean, std = channel_stats(samples)
    mcfg = ModelConfig(width=config.width, mpp=config.mpp, mean=mean, std=std, center_radius_px=config.radius_px,
                       classes=config.classes, type_head=config.type_head)
    return ModelBundle(PRONet(mcfg), mcfg, PostprocessConfig(grouping=config.grouping))


def rescale_model(bundle: ModelBundle, mpp: float) -> ModelBundle:
    """``bundle`` set to work at ``mpp`` um/px: the same weights, with the lengths that are in pixels (centre-map
    radius, offset scale, minimum nucleus area) scaled so that they stay the same in um. The network then needs a
    fine-tune at the new pixel size (``train --init M --model-mpp``); its receptive field (``context_px``) stays."""
    f = bundle.config.mpp / mpp
    if abs(f - 1) < 1e-6:
        return bundle
    mcfg = replace(bundle.config, mpp=mpp, center_radius_px=bundle.config.center_radius_px * f,
                   offset_scale=bundle.config.offset_scale * f)
    thresholds = replace(bundle.thresholds, min_area_px=max(1, round(bundle.thresholds.min_area_px * f * f)))
    log.info("--init: the start model works at %g um/px; rescaled to %g um/px", bundle.config.mpp, mpp)
    return ModelBundle(bundle.model, mcfg, thresholds)


def check_start(start: ModelConfig, init: str, width: float | None) -> None:
    """An InputError when a run from ``init`` asks for another width than the start model's (None: not asked);
    another working resolution is fine (:func:`rescale_model`)."""
    if width is not None and abs(start.width - width) > 1e-9:
        raise InputError(f"--init {init}: the model has width {start.width}, not {width}; drop --width (a fine-tune "
                         "keeps the start model's network)")


def restore_checkpoint(path: Path, model, opt, samples: list[Sample]) -> tuple[int, float]:
    """Load weights, optimiser and refined points from ``path``; returns (next epoch, elapsed seconds)."""
    state = load_checkpoint(path)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if len(state["points"]) != len(samples):
        raise InputError(f"{path}: saved for {len(state['points'])} images, this run has {len(samples)}; "
                         "resume with the same images or start a new -o")
    for s, pts in zip(samples, state["points"], strict=True):
        s.points_xy = pts.numpy().astype(np.float64)
    log.info("resumed from epoch %d", state["epoch"] + 1)
    return state["epoch"] + 1, state["elapsed_s"]


def predict_and_refine(predictor: Predictor, samples: list[Sample], refine: RefineConfig | None) -> float:
    """Full-image predictions: the predicted masks give the offset targets (Sec. 2.2); with ``refine``, the
    E-step (Eq. 5) moves each point to its cell's offset-vote peak. Returns the mean point movement (px)."""
    maps = _predict_full(predictor, [s.image for s in samples])
    moves = []
    for s, m in zip(samples, maps, strict=True):
        s.pred_mask = m["foreground"] > 0.5
        if refine is not None:
            s.points_xy, mv = refine_points(s.points_xy, s.cells, s.pred_mask, m["offsets"], refine)
            moves.append(mv)
    return float(np.concatenate(moves).mean()) if moves else float("nan")


def m_step_epoch(predictor: Predictor, opt, loader, loss: LossConfig, use_offsets: bool,
                 freeze_trunk: bool = False, start: torch.nn.Module | None = None) -> tuple[dict[str, float], int]:
    """One pass over the patches minimising Eq. 2-4 and 6 (offsets only once ``use_offsets``; the type loss for
    a typed model); returns the summed loss terms and the number of steps. ``freeze_trunk``: the trunk stays in
    eval mode (batch-norm statistics fixed) and only the type head learns."""
    model, device, autocast = predictor.model, predictor.device, predictor.autocast_dtype
    model.train()
    if freeze_trunk:
        assert model.head_type is not None  # only typed models freeze the trunk
        model.eval()
        model.head_type.train()
    sums: dict[str, float] = {}
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        x = batch["image"]
        if device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            out = model(x)
            if start is not None:
                with torch.no_grad():
                    start_maps = {k: v.float() for k, v in start(x).items()}
        out = {k: v.float() for k, v in out.items()}
        terms = pronet_loss(out, batch, loss, use_offsets, start_maps if start is not None else None)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
    return sums, max(len(loader), 1)


def _keep_if_best(path: Path, model, epoch: int, aji: float) -> None:
    if path.exists() and float(torch.load(path, map_location="cpu", weights_only=True)["aji"]) >= aji:
        return
    state = {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, "epoch": epoch,
             "aji": float(aji)}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _truncate_log(path: Path, start_epoch: int) -> None:
    """Keep the header and the rows of epochs before ``start_epoch`` (a resume redoes the later ones)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) < start_epoch]
    if len(kept) != len(rows):
        buf = io.StringIO()
        csv.writer(buf).writerows(kept)
        atomic_write(path, lambda tmp: tmp.write_text(buf.getvalue(), encoding="utf-8"))


def _out_of_time(config: TrainConfig, t0: float) -> bool:
    return config.max_minutes is not None and (time.monotonic() - t0) / 60 >= config.max_minutes


def _save_checkpoint(path: Path, model, opt, samples: list[Sample], epoch: int, elapsed_s: float) -> None:
    """Tensors and plain types only, so :func:`load_checkpoint` never unpickles code."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "elapsed_s": elapsed_s,
             "points": [torch.from_numpy(np.asarray(s.points_xy, np.float64)) for s in samples]}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _clip(text: str, limit: int) -> str:
    """``text`` cut at a word boundary to at most ``limit`` characters (with "..." when cut)."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + "..."


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint, loaded with ``weights_only=True``: a crafted file cannot run code."""
    try:
        with warnings.catch_warnings():  # torch's warnings about what it refuses: the error below says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not {"model", "optimizer", "epoch", "elapsed_s", "points"} <= set(state):
            raise ValueError("not a pronet-wsi training checkpoint")
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        msg = "a pickled object torch refuses to load safely" if "weights_only" in str(exc) else (
            str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise InputError(f"{path}: unreadable checkpoint ({_clip(msg, 160)}); start a new run without --resume, "
                         "or delete the file") from exc
    return state


def _write_points(work: Path, samples: list[Sample]) -> None:
    from pronet_wsi.training.points import write_points_csv

    for s in samples:
        write_points_csv(work / "refined_points" / f"{s.name}.csv", s.points_xy + 0.5)  # array -> file frame


def split_holdout(items: list, share: float, seed: int) -> tuple[list, list]:
    """(train, held back): ``share`` of the items (at least one, by a seeded draw) held back for validation."""
    if len(items) < 2:
        raise InputError(f"--holdout {share:g}: needs at least 2 training images (or regions); give more images, "
                         "--val-images, or --holdout 0")
    n = min(len(items) - 1, max(1, round(share * len(items))))
    held = set(np.random.default_rng(seed).permutation(len(items))[:n].tolist())
    return [it for i, it in enumerate(items) if i not in held], [it for i, it in enumerate(items) if i in held]


def _click_scores(maps: list, items: list, thresholds: PostprocessConfig, radius_px: float,
                  classes: tuple[str, ...]) -> list:
    """Per item, how ``thresholds`` applied to its predicted ``maps`` find (and type) its clicks: items (name,
    image, points_xy[, region[, classes]]); predictions outside an item's region mask are not scored (nothing
    there is clicked)."""
    from pronet_wsi.detection import score_typed

    scores = []
    for (_, image, pts, *rest), m in zip(items, maps, strict=True):
        region = rest[0] if rest else None
        names = rest[1] if len(rest) > 1 and rest[1] is not None else [""] * len(pts)
        seg = postprocess(m, thresholds, image)
        keep = np.ones(seg.n, bool)
        if region is not None:
            rc = np.clip(np.floor(seg.centers_rc).astype(int), 0, np.array(region.shape) - 1)
            keep = region[rc[:, 0], rc[:, 1]]
        pred = [classes[i] if classes and i >= 0 else "" for i in seg.class_index[keep]]
        scores.append(score_typed(pts, names, seg.centers_rc[keep, ::-1] + 0.5, pred, radius_px, classes))
    return scores


def _predict_held(predictor: Predictor, items: list) -> list:
    """The maps of each item's image, predicted in eval mode (the model's mode restored)."""
    was_training = predictor.model.training
    predictor.model.eval()
    maps = [predictor.predict_image(image) for _, image, *_ in items]
    predictor.model.train(was_training)
    return maps


def hold_back(items: list, config: TrainConfig) -> tuple[list, list]:
    """(train, held back) by :func:`split_holdout`, unless there are fewer than two items or the held-back ones
    hold fewer than ``config.holdout_min_clicks`` clicks: then every item trains (a warning says why)."""
    reason = ""
    if len(items) < 2:
        reason = "one training image (or region) only"
    else:
        train_part, held = split_holdout(items, config.holdout, config.seed)
        n = sum(len(it[2]) for it in held)
        if n >= config.holdout_min_clicks:
            return train_part, held
        reason = f"the held-back images would hold {n} clicks, fewer than {config.holdout_min_clicks}"
    log.warning("no held-back check (holdout %g): %s; training on every image and keeping the last epoch (for "
                "one, click more images or give --val-images)", config.holdout, reason)
    return items, []


def validate_clicks(predictor: Predictor, items: list, thresholds: PostprocessConfig, radius_px: float) -> float:
    """How well the model finds (and types) the held-back clicks of ``items`` (name, image, points_xy[, region[,
    classes]]): detection F1 within ``radius_px``, averaged with the mean class F1 when the model is typed."""
    from pronet_wsi.detection import pool_scores

    classes = predictor.classes
    pooled = pool_scores(_click_scores(_predict_held(predictor, items), items, thresholds, radius_px, classes))
    return pooled.f_d if not classes else 0.5 * (pooled.f_d + pooled.mean_f1)


def tune_click_thresholds(predictor: Predictor, items: list, base: PostprocessConfig, radius_px: float,
                          min_areas: tuple[int, ...], center_thresholds: tuple[float, ...]) -> PostprocessConfig:
    """``base`` with the centre threshold and minimum area (px) that find the held-back clicks of ``items`` best
    (detection F1 within ``radius_px``); the maps are predicted once, ties keep ``base``. Clicks say where nuclei
    are, not their outlines, so the foreground threshold stays."""
    from pronet_wsi.detection import pool_scores

    maps = _predict_held(predictor, items)
    plain = replace(base, class_weights=(), nucleus_classifier=None)  # detection does not depend on classes

    def f_d(config: PostprocessConfig) -> float:
        return pool_scores(_click_scores(maps, items, config, radius_px, ())).f_d

    start = f_d(plain)
    best, best_f = plain, start
    for ct in center_thresholds:
        for ma in min_areas:
            cand = replace(plain, center_threshold=ct, min_area_px=ma)
            if (f := f_d(cand)) > best_f + 1e-9:
                best, best_f = cand, f
    log.info("held-back clicks: centre threshold %.2f, min area %d px -> %.2f, %d px (detection F1 %.4f -> %.4f)",
             base.center_threshold, base.min_area_px, best.center_threshold, best.min_area_px, start, best_f)
    return replace(base, center_threshold=best.center_threshold, min_area_px=best.min_area_px)


def tune_class_weights(predictor: Predictor, items: list, thresholds: PostprocessConfig, radius_px: float,
                       grid: tuple[float, ...] = tuple(np.exp(np.linspace(-1.5, 1.5, 13))),
                       rounds: int = 2) -> PostprocessConfig:
    """``thresholds`` with the per-class weights (coordinate ascent over ``grid``, ``rounds`` passes) that give
    the best mean class F1 on the held-back clicks of ``items``; the class probabilities are computed once.
    A rare class the arg-max never picks costs the whole mean its F1; a weight lets it win where it is close."""
    from pronet_wsi.detection import pool_scores, score_typed
    from pronet_wsi.postprocess import reweight_classes

    classes = predictor.classes
    was_training = predictor.model.training
    predictor.model.eval()
    base = replace(thresholds, class_weights=(), nucleus_classifier=None)
    held = []  # (clicks xy, click classes, predicted centres xy, class probabilities) per item
    for _, image, pts, *rest in items:
        region = rest[0] if rest else None
        names = rest[1] if len(rest) > 1 and rest[1] is not None else [""] * len(pts)
        seg = postprocess(predictor.predict_image(image), base)
        keep = np.ones(seg.n, bool)
        if region is not None:
            rc = np.clip(np.floor(seg.centers_rc).astype(int), 0, np.array(region.shape) - 1)
            keep = region[rc[:, 0], rc[:, 1]]
        probs = seg.type_probs if seg.type_probs is not None else np.zeros((seg.n, len(classes)), np.float32)
        held.append((pts, names, seg.centers_rc[keep, ::-1] + 0.5, probs[keep]))
    predictor.model.train(was_training)

    def mean_f1(weights: tuple[float, ...]) -> float:
        scores = [score_typed(pts, names, xy, [classes[i] for i in reweight_classes(p, weights).argmax(1)],
                              radius_px, classes) if len(p) else score_typed(pts, names, xy, [], radius_px, classes)
                  for pts, names, xy, p in held]
        return pool_scores(scores).mean_f1

    weights = [1.0] * len(classes)
    best = start = mean_f1(tuple(weights))
    for _ in range(rounds):
        for k in range(len(classes)):
            for w in grid:
                cand = tuple(weights[:k] + [float(w)] + weights[k + 1:])
                if (f := mean_f1(cand)) > best + 1e-6:
                    best, weights = f, list(cand)
    log.info("class weights %s: held-back mean class F1 %.4f -> %.4f",
             dict(zip(classes, np.round(weights, 3).tolist(), strict=True)), start, best)
    return replace(thresholds, class_weights=tuple(round(w, 4) for w in weights))


def _min_areas_px(config: TrainConfig, mpp: float) -> tuple[int, ...]:
    """The threshold search's minimum areas in px at the model's ``mpp``."""
    return tuple(sorted({max(1, round(a / mpp**2)) for a in config.tune_min_areas_um2}))


def tune_on_clicks(predictor: Predictor, held: list, thresholds: PostprocessConfig,
                   config: TrainConfig) -> PostprocessConfig:
    """The detection thresholds tuned on the held-back clicks (:func:`tune_click_thresholds`) when there are at
    least ``config.holdout_min_clicks`` of them, else ``thresholds`` unchanged."""
    n = sum(len(it[2]) for it in held)
    if n < config.holdout_min_clicks:
        log.info("detection thresholds not tuned: %d held-back clicks (fewer than %d)", n, config.holdout_min_clicks)
        return thresholds
    return tune_click_thresholds(predictor, held, thresholds, config.holdout_radius_um / predictor.mpp,
                                 _min_areas_px(config, predictor.mpp), config.tune_center_thresholds)


def fit_types(predictor: Predictor, train_items: list, held: list, thresholds: PostprocessConfig,
              config: TrainConfig) -> PostprocessConfig:
    """How a typed run ends: with at least ``class_weight_min_clicks`` held-back clicks of every class, class
    weights tuned on them, then a nucleus classifier fitted on ``train_items`` and kept if it beats the head
    there; with fewer (ten images and one held back, or no ``--holdout``), the classifier unchecked (on two labs'
    ten-image runs it beat the head on the lab's other images: CoNSeP 0.426 -> 0.452, CRCHisto 0.319 -> 0.426
    mean class F1)."""
    classes = predictor.classes
    counts = {c: sum(list(it[4]).count(c) for it in held if len(it) > 4 and it[4] is not None) for c in classes}
    enough = bool(held) and min(counts.values()) >= config.class_weight_min_clicks
    radius_px = config.holdout_radius_um / predictor.mpp
    if enough and config.tune_class_weights:
        thresholds = tune_class_weights(predictor, held, thresholds, radius_px)
    elif config.tune_class_weights:
        log.info("class weights not tuned: held-back clicks per class %s (fewer than %d for some)", counts,
                 config.class_weight_min_clicks)
    if config.nucleus_classifier:
        thresholds = fit_nucleus_classifier(predictor, train_items, held if enough else [], thresholds, radius_px,
                                            config.classifier_min_gain)
    return thresholds


def fit_nucleus_classifier(predictor: Predictor, train_items: list, held: list, thresholds: PostprocessConfig,
                           radius_px: float, min_gain: float = 0.01) -> PostprocessConfig:
    """``thresholds`` with a nucleus classifier (:mod:`pronet_wsi.classify`) fitted on the nuclei of
    ``train_items`` that hold clicks of one class, when it beats ``thresholds`` (the head's arg-max with its class
    weights) on the held-back clicks of ``held`` by at least ``min_gain`` mean class F1, else ``thresholds``
    unchanged; kept unchecked when ``held`` is empty. Items: (name, image, clicks xy continuous px, region or
    None, click classes ("" = untyped))."""
    from pronet_wsi.classify import fit_classifier, nucleus_features
    from pronet_wsi.detection import pool_scores

    classes = predictor.classes
    was_training = predictor.model.training
    predictor.model.eval()
    plain = replace(thresholds, class_weights=(), nucleus_classifier=None)
    t0 = time.monotonic()
    xs, ys = [], []
    index = {c: i for i, c in enumerate(classes)}
    for _, image, pts, _, names in train_items:
        cls = np.array([index.get(c, -1) for c in (names if names is not None else [""] * len(pts))], np.int64)
        if not (cls >= 0).any():
            continue
        seg = postprocess(predictor.predict_image(image), plain)
        rc = np.clip(np.floor(np.asarray(pts)[cls >= 0, ::-1]).astype(np.int64), 0, np.array(seg.labels.shape) - 1)
        hit = seg.labels[rc[:, 0], rc[:, 1]].astype(np.int64)
        cls = cls[cls >= 0]
        first = np.full(seg.n + 1, -1, np.int64)
        clash = np.zeros(seg.n + 1, bool)
        for nid, c in zip(hit, cls, strict=True):  # a nucleus holding clicks of two classes teaches nothing
            clash[nid] |= first[nid] not in (-1, c)
            first[nid] = c
        ids = np.nonzero((first >= 0) & ~clash)[0]
        ids = ids[ids > 0]
        if len(ids):
            probs = seg.type_probs if seg.type_probs is not None else np.zeros((seg.n, len(classes)), np.float32)
            xs.append(nucleus_features(image, seg.labels, probs, predictor.mpp)[ids - 1])
            ys.append(first[ids])
    if not xs:
        predictor.model.train(was_training)
        return thresholds
    x, y = np.concatenate(xs), np.concatenate(ys)
    candidate = replace(thresholds, nucleus_classifier=fit_classifier(x, y, classes, predictor.mpp))
    if not held:
        predictor.model.train(was_training)
        log.info("nucleus classifier from %d clicked nuclei (%.0f s), kept unchecked (too few held-back clicks)",
                 len(y), time.monotonic() - t0)
        return candidate

    def held_f1(config: PostprocessConfig, maps: list) -> float:
        return pool_scores(_click_scores(maps, held, config, radius_px, classes)).mean_f1

    maps = _predict_held(predictor, held)
    predictor.model.train(was_training)
    head, fitted = held_f1(thresholds, maps), held_f1(candidate, maps)
    keep = fitted >= head + min_gain
    log.info("nucleus classifier from %d clicked nuclei (%.0f s): held-back mean class F1 %.4f (head) -> %.4f; %s",
             len(y), time.monotonic() - t0, head, fitted, "kept" if keep else f"not kept (gain < {min_gain})")
    return candidate if keep else thresholds


def validate(predictor: Predictor, val_items: list, thresholds: PostprocessConfig):
    """Mean scores of the model on [(name, image, gt labels)]."""
    was_training = predictor.model.training
    predictor.model.eval()
    untyped = replace(thresholds, nucleus_classifier=None)  # AJI needs no classes
    scores = [evaluate_image(gt, postprocess(predictor.predict_image(im), untyped).labels)
              for _, im, gt in val_items]
    predictor.model.train(was_training)
    return mean_scores(scores)


def tune_thresholds(predictor: Predictor, val_items: list, base: PostprocessConfig,
                    min_areas: tuple[int, ...] = (10,), center_thresholds: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4),
                    foreground_thresholds: tuple[float, ...] = (0.4, 0.5, 0.6)) -> PostprocessConfig:
    """Grid-search centre and foreground thresholds (and the minimum area, over ``min_areas`` px) for the best
    mean AJI on the validation images; ties keep the earlier setting (the grids' order)."""
    predictor.model.eval()
    maps = [predictor.predict_image(im) for _, im, _ in val_items]
    best, best_aji = base, -1.0
    for ct in center_thresholds:
        for ft in foreground_thresholds:
            for ma in min_areas:
                cand = replace(base, center_threshold=ct, foreground_threshold=ft, min_area_px=ma,
                               nucleus_classifier=None)  # AJI needs no classes
                aji = mean_scores([evaluate_image(gt, postprocess(m, cand).labels)
                                   for m, (_, _, gt) in zip(maps, val_items, strict=True)]).aji
                if aji > best_aji:
                    best, best_aji = cand, aji
    best = replace(best, nucleus_classifier=base.nucleus_classifier)
    log.info("tuned thresholds center %.2f foreground %.2f min area %d px (val AJI %.4f)", best.center_threshold,
             best.foreground_threshold, best.min_area_px, best_aji)
    return best


def plot_curve(log_path: Path, png: Path) -> None:
    """Loss terms and validation scores against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    ep = [int(r["epoch"]) for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for k in ("loss", "voronoi", "cluster", "center", "offset"):
        a1.plot(ep, [float(r[k] or "nan") for r in rows], label=k)
    a1.set_xlabel("epoch")
    a1.set_yscale("log")
    a1.legend()
    clicks = [(int(r["epoch"]), float(r["val_clicks"])) for r in rows if r.get("val_clicks")]
    if clicks:
        a2.plot([v[0] for v in clicks], [v[1] for v in clicks], "^-", label="held-back clicks F1")
        a2.legend()
    vr = [(int(r["epoch"]), float(r["val_aji"]), float(r["val_object_dice"])) for r in rows if r["val_aji"]]
    if vr:
        a2.plot([v[0] for v in vr], [v[1] for v in vr], "o-", label="val AJI")
        a2.plot([v[0] for v in vr], [v[2] for v in vr], "s-", label="val object Dice")
        a2.legend()
    a2.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
