"""Distil the shipped model into a stride-2-stem network (``ModelConfig.stem_stride=2``, issue 20 lever 2b).

    python -m benchmarks.distill -o runs/stem2 --teacher runs/v3 --minutes 60   # validating every --val-every min
    python -m benchmarks.distill -o runs/stem2 --minutes 60 --resume # go on from runs/stem2/last.pt

The student starts from the teacher's weights (the first convolution's RGB weights spread over the 2x2 blocks of
the pixel-unshuffled input; the refinement starts at zero, so the student begins as the teacher's layers at half
resolution plus bilinear upsampling) and learns the teacher's maps on random crops of the four labs' training
images (benchmarks/labs.py): binary cross-entropy on the foreground and centre probabilities, L1 on the offsets
inside the teacher's foreground, the crop's outer ``--border`` px left out. No labels and no points are used, so
the teacher's accuracy is the target. Every ``--val-every`` minutes the student's validation AJI per lab (the labs'
val splits, OpenVINO bf16 as ``segment`` runs it, the teacher's thresholds) is logged and the weights kept in
``OUT/val-MMM`` (minutes); ``OUT/best`` is the one whose worst lab is closest to the teacher (the shipping rule
of issue 20: every lab within 0.01), with the teacher's thresholds (the student learns the teacher's maps).
``last.pt`` holds the weights, optimiser and elapsed time, so ``--resume`` goes on without redoing finished
minutes.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import labs, record


def student_from(teacher, width: float | None = None) -> torch.nn.Module:
    """A stride-2-stem PRONet holding the teacher's weights where the shapes agree; with ``width`` below the
    teacher's, each layer keeps the teacher's first channels (a narrower, faster network to distil into)."""
    from pronet_wsi.model import PRONet

    student = PRONet(replace(teacher.config, stem_stride=2, width=width or teacher.config.width, extra={}))
    state = teacher.model.state_dict()
    if teacher.config.stem_stride == 1:  # (C, 3, 3, 3) -> (C, 12, 3, 3): pixel_unshuffle orders channels c * 4 + k
        state["stages.0.0.weight"] = state["stages.0.0.weight"].repeat_interleave(4, dim=1) / 4
    own = student.state_dict()
    state = {k: v[tuple(slice(0, n) for n in own[k].shape)] if v.ndim else v for k, v in state.items() if k in own}
    missing, unexpected = student.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("refine.") for k in missing), (missing, unexpected)
    return student


def crops(images: list[np.ndarray], n: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """(n, side, side, 3) uint8 random crops, each flipped / rotated at random (reflect-padded when small)."""
    out = np.empty((n, side, side, 3), np.uint8)
    for i in range(n):
        image = images[int(rng.integers(len(images)))]
        h, w = image.shape[:2]
        if h < side or w < side:
            image = np.pad(image, ((0, max(side - h, 0)), (0, max(side - w, 0)), (0, 0)), mode="reflect")
            h, w = image.shape[:2]
        y, x = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        c = image[y : y + side, x : x + side]
        c = np.rot90(c, int(rng.integers(4)))
        out[i] = c[:, ::-1] if rng.integers(2) else c
    return out


def distill_loss(student: dict[str, torch.Tensor], teacher: dict[str, np.ndarray], offset_scale: float,
                 border: int) -> tuple[torch.Tensor, dict[str, float]]:
    """BCE(foreground) + BCE(centres) + L1(offsets / scale, weighted by the teacher's foreground)."""
    inner = (slice(None), slice(border, -border or None), slice(border, -border or None))
    fg_t = torch.from_numpy(teacher["foreground"])[inner]
    ct_t = torch.from_numpy(teacher["centers"])[inner]
    off_t = torch.from_numpy(teacher["offsets"])[:, :, border : -border or None, border : -border or None]
    fg = student["foreground"][:, 0][inner].float()
    ct = student["centers"][:, 0][inner].float()
    off = student["offsets"][:, :, border : -border or None, border : -border or None].float()
    l_fg = F.binary_cross_entropy_with_logits(fg, fg_t)
    l_ct = F.binary_cross_entropy_with_logits(ct, ct_t)
    l_off = ((off - off_t).abs().sum(1) * fg_t).sum() / fg_t.sum().clamp(min=1.0) / offset_scale
    total = l_fg + 2.0 * l_ct + l_off
    return total, {"fg": l_fg.item(), "center": l_ct.item(), "offset": l_off.item()}


def validation_aji(model_dir: Path, val: dict[str, list]) -> dict[str, float]:
    """Mean AJI per lab of a model folder, as ``segment`` runs it on a CPU (OpenVINO when installed)."""
    from pronet_wsi.inference import InferenceConfig, Predictor, segment_image
    from pronet_wsi.metrics import evaluate_image, mean_scores

    predictor = Predictor(model_dir, InferenceConfig())
    return {name: mean_scores([evaluate_image(gt, segment_image(im, predictor).labels) for _, im, gt in items]).aji
            for name, items in val.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--teacher", type=Path, default=None,
                        help="model folder to distil (default: the shipped model; v4 was made from v3, "
                             "git show 1237235:models/pronet-multilab)")
    parser.add_argument("--minutes", type=float, default=60.0, help="training time (validation not counted)")
    parser.add_argument("--val-every", type=float, default=10.0, help="minutes of training between validations")
    parser.add_argument("--crop", type=int, default=320, help="crop side, px (a multiple of 32)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4, help="Adam, cosine decay to 0 over --minutes")
    parser.add_argument("--border", type=int, default=32, help="px at each crop edge left out of the loss")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=float, default=None,
                        help="student channel multiplier (default: the teacher's; the first channels are kept)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="a few steps on 256 px crops, one validation image")
    args = parser.parse_args()
    if args.smoke:
        labs.smoke()
        args.minutes, args.val_every, args.crop, args.batch = 0.05, 0.05, 128, 2
    if not labs.available():
        print(f"datasets not found under {labs.DATA}; this benchmark needs ../shared/data", file=sys.stderr)
        sys.exit(2)
    print(record.banner(seed=args.seed), file=sys.stderr)
    torch.set_num_threads(args.threads)
    from pronet_wsi.model import default_model_dir, load_model, save_model
    from pronet_wsi.runtime import OpenVINOForward, openvino_available

    if not openvino_available():
        if args.smoke:
            record.smoke_skip("OpenVINO is not installed")
        sys.exit('the teacher runs in OpenVINO: pip install "pronet-wsi[fast]"')
    teacher = load_model(args.teacher or default_model_dir())
    teach = OpenVINOForward(teacher.model, teacher.config.mean, teacher.config.std, bf16=False,
                            threads=args.threads)
    student = student_from(teacher, args.width)
    mean = torch.tensor(teacher.config.mean).view(1, 3, 1, 1)
    std = torch.tensor(teacher.config.std).view(1, 3, 1, 1)
    opt = torch.optim.Adam(student.parameters(), lr=args.lr)
    args.out.mkdir(parents=True, exist_ok=True)
    last, log_path = args.out / "last.pt", args.out / "log.csv"
    elapsed, step, best = 0.0, 0, -float("inf")  # best: the worst lab's AJI minus the teacher's
    if args.resume and last.exists():
        state = torch.load(last, map_location="cpu", weights_only=True)
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        elapsed, step, best = float(state["elapsed"]), int(state["step"]), float(state["best"])
        print(f"resumed at {elapsed / 60:.1f} min, step {step}", file=sys.stderr)
    elif log_path.exists():
        log_path.unlink()
    train_images = {name: [im for _, im, _ in labs.load(name, "train")] for name in labs.LABS}
    val = {name: labs.load(name, "val") for name in labs.LABS}
    if args.resume and log_path.exists():
        with log_path.open() as f:
            row = next(r for r in csv.DictReader(f) if r["minutes"] == "teacher")
        ref = {name: float(row[f"aji_{name}"]) for name in val}
    else:
        ref = validation_aji(args.teacher or default_model_dir(), val)
        with log_path.open("a", newline="") as f:
            csv.writer(f).writerow(["minutes", "step", "loss", *[f"aji_{n}" for n in val], "mean_aji"])
            csv.writer(f).writerow(["teacher", 0, "", *[f"{v:.4f}" for v in ref.values()],
                                    f"{np.mean(list(ref.values())):.4f}"])
        print("teacher", {k: round(v, 4) for k, v in ref.items()}, flush=True)
    rng = np.random.default_rng(args.seed + step)
    total_s, next_val = args.minutes * 60, (math.floor(elapsed / (args.val_every * 60)) + 1) * args.val_every * 60
    losses: list[float] = []
    while elapsed < total_s:
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * min(elapsed / total_s, 1.0)))
        per_lab = max(1, args.batch // len(train_images))
        x = np.concatenate([crops(ims, per_lab, args.crop, rng) for ims in train_images.values()])
        target = teach(x)
        student.train()
        xt = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        loss, parts = distill_loss(student(xt.contiguous(memory_format=torch.channels_last)), target,
                                   teacher.config.offset_scale, args.border)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        elapsed += time.perf_counter() - t0
        if step % 20 == 0:
            print(f"{elapsed / 60:6.2f} min step {step} loss {np.mean(losses[-20:]):.4f} {parts}", flush=True)
        if elapsed >= next_val or elapsed >= total_s:
            next_val += args.val_every * 60
            student.eval()
            extra = {"distill_minutes": round(elapsed / 60, 2), "distill_steps": step}
            folder = save_model(student, args.out / f"val-{elapsed / 60:03.0f}", teacher.thresholds, extra=extra)
            aji = validation_aji(folder, val)
            mean_aji = float(np.mean(list(aji.values())))
            with log_path.open("a", newline="") as f:
                csv.writer(f).writerow([f"{elapsed / 60:.2f}", step, f"{np.mean(losses[-50:]):.4f}",
                                        *[f"{v:.4f}" for v in aji.values()], f"{mean_aji:.4f}"])
            print(f"val at {elapsed / 60:.1f} min:", {k: round(v, 4) for k, v in aji.items()}, round(mean_aji, 4),
                  flush=True)
            worst = min(aji[name] - ref[name] for name in aji)
            print(f"worst lab vs teacher {worst:+.4f}", flush=True)
            if worst > best:
                best = worst
                save_model(student, args.out / "best", teacher.thresholds, extra=extra)
            tmp = last.with_suffix(".tmp")
            torch.save({"model": student.state_dict(), "opt": opt.state_dict(), "elapsed": elapsed, "step": step,
                        "best": best}, tmp)
            tmp.replace(last)
    print("done:", args.out / "best", f"worst lab vs teacher {best:+.4f} validation AJI", flush=True)

if __name__ == "__main__":
    main()
