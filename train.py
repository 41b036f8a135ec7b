"""Train ClusterDANet on PASCAL VOC 2012, Cityscapes, a folder of your own images, or synthetic shapes (the demo).

    python train.py                                                    # demo: synthetic shapes, no download
    python train.py --data-root data --train-split train_aug           # VOC 2012, one GPU
    python train.py --dataset cityscapes --data-root cityscapes        # Cityscapes (fine annotations)
    python train.py --dataset folder --data-root my_data               # your images: see README for the layout
    torchrun --standalone --nproc_per_node=8 train.py --data-root data --train-split train_aug --batch-size 2
    python train.py --out-dir runs/demo_danet --no-clustering          # plain DANet, the same recipe
    python train.py --data-root data --multi-grid --init-from DANet101.pth.tar  # from the original's weights

The file in reading order (read parts 1-3 to learn the method; part 4 is machinery they call by name):
  Part 1  the recipe: each dataset's defaults (RECIPES) and the augmentation (train_transform)
  Part 2  training, top-down: main, training_loop, train_step, the model, optimizer (10x head LR), poly schedule,
          DDP and mixed precision
  Part 3  validation and the mIoU: validate, accumulate_confusion, ConfusionMatrix
  Part 4  the machinery: 4a data formats (VOC, Cityscapes, folder, demo shapes), 4b checkpoints, 4c what keeps a
          run safe (signals, the run folder and its lock, how a run ends), 4d the command line, benchmarks
evaluate.py builds on parts 3 and 4. Every error ends in one line `error: ...`, never a traceback.

Exit codes (EXIT_* in 4c; the README explains each): 0 done, 1 diverged, 2 a user error found before any training,
3 disk full, 4 out of memory, 5 a bad data file found during training, 70 a bug, 130 / 143 stopped by SIGINT / SIGTERM.
"""

import os
import signal
import sys


def exit_on_signal(signum, frame):
    """Ctrl-C or SIGTERM while the imports below run (before run_main takes over): one line, exit 128 + signum."""
    print(f"interrupted by {signal.Signals(signum).name}", file=sys.stderr, flush=True)
    os._exit(128 + signum)


if __name__ == "__main__":  # a script from its first line (evaluate.py does the same); imported, nothing changes
    signal.signal(signal.SIGINT, exit_on_signal)
    signal.signal(signal.SIGTERM, exit_on_signal)

import argparse
import codecs
import errno
import json
import math
import pickle
import re
import socket
import threading
import time
import traceback
from collections import Counter
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import tv_tensors
from torchvision.transforms import v2

from clusterdanet import (BACKBONES, MODELS, OUTPUT_STRIDE, ClusteringLayer, CompactChannelAttention,
                          CompactPositionAttention, DRANet, PositionAttention, is_original_checkpoint,
                          original_state_and_config)

try:
    import resource  # Unix only: the peak memory of a CPU run
except ImportError:
    resource = None
try:
    import fcntl  # Unix only: the lock of a run folder (FolderLock)
except ImportError:
    fcntl = None


# ==== Part 1: the recipe ==============================================================================================

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
SHAPE_CLASSES = ("background", "disc", "square", "triangle")
IGNORE_INDEX = 255  # VOC's "void" label: object borders and ambiguous pixels, ignored by loss and metric
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics
WORKERS = min(8, os.cpu_count() or 1)

# Each dataset's recipe, the values of the flags left out: the DANet paper's crop, batch and lr, the original code's
# base size and Cityscapes' 240 epochs; folder: VOC's; demo: a CPU's. The README gives each value's source.
RECIPES = {
    "demo": dict(backbone="resnet18", pretrained=False, crop_size=64, base_size=64, batch_size=8, iters=500, lr=0.01,
                 workers=0, val_every=250, log_every=25, out_dir="runs/demo"),
    "voc": dict(backbone="resnet101", pretrained=True, crop_size=480, base_size=520, batch_size=16, iters=30000,
                lr=0.01, workers=WORKERS, val_every=2000, log_every=50, out_dir="runs/voc", train_split="train_aug"),
    "cityscapes": dict(backbone="resnet101", pretrained=True, crop_size=768, base_size=1024, batch_size=8,
                       iters=90000, lr=0.01, workers=WORKERS, val_every=5000, log_every=50, out_dir="runs/cityscapes",
                       train_split="train"),
    "folder": dict(backbone="resnet101", pretrained=True, crop_size=480, base_size=520, batch_size=16, iters=30000,
                   lr=0.01, workers=WORKERS, val_every=2000, log_every=50, out_dir="runs/folder", train_split="train"),
}


class RandomScale:
    """DANet's random scale: the longer side to base_size x U(0.5, 2), aspect kept, the mask with nearest."""

    def __init__(self, base_size):
        self.base_size = base_size

    def __call__(self, image, mask):
        H, W = image.shape[-2:]
        scale = 0.5 + torch.rand(1) * 1.5  # U(0.5, 2), from torch's generator: seeded per DataLoader worker
        r = min(self.base_size / H, self.base_size / W) * scale  # [1], float32 as ScaleJitter's
        size = [max(1, int(H * r)), max(1, int(W * r))]  # ScaleJitter's int(): a side below 1 pixel would be 0
        return v2.functional.resize(image, size, antialias=True), v2.functional.resize(mask, size)


def train_transform(crop_size, base_size):
    """DANet's augmentation: random scale (RandomScale), pad with void, random crop, flip; then eval_transform."""
    return v2.Compose([
        RandomScale(base_size),
        v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
        v2.RandomHorizontalFlip(),
        eval_transform(),
    ])


def eval_transform():
    """The model's input: the image as floats normalised with ImageNet's statistics, the mask as int64."""
    return v2.Compose([
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
        v2.Normalize(MEAN, STD),
        v2.ToPureTensor(),
    ])


# ==== Part 2: training, top-down ======================================================================================

def main(argv=None):
    """Train, or time training steps (--benchmark); returns the exit code, or raises UserError or RunError."""
    args = parse_args(argv)
    device, rank, world_size, autocast = setup_device(args)
    check_batch_norm(args, device, world_size)  # before any work: what BatchNorm sees depends on the device
    torch.manual_seed(args.seed + rank)
    checkpoint = load_resume_checkpoint(args) if args.resume else None
    with run_ending(args, device) as end:  # how it ends: a second signal, a bad file, out of memory, the lock
        if args.benchmark_attention:
            return benchmark_attention(args, device, autocast)
        if args.benchmark:
            return benchmark(args, checkpoint, device, world_size, autocast)
        end.folder = take_out_dir(args, checkpoint, device)  # the run folder and its lock, before any other work
        end.run = run = build_run(args, checkpoint, device, rank, world_size, autocast, end.folder)
        del checkpoint  # its tensors are in the model and optimizer now
        start_log(run)
        with Interrupts(interrupt_message(run)) as end.interrupts:
            end.code = finish(run, training_loop(run, end.interrupts), end.interrupts)
    return end.code


def training_loop(run, interrupts):
    """The steps from run.iteration to --iters, validating every --val-every: "done", "interrupted" or "diverged"."""
    args, batches, counts = run.args, train_batches(run), StepCounts(run)
    run.model.train()
    while run.iteration < args.iters:
        images, masks = next(batches)
        images = images.to(run.device, non_blocking=True).to(memory_format=torch.channels_last)
        masks = masks.to(run.device, non_blocking=True)
        lr = run.optimizer.param_groups[0]["lr"]  # the backbone LR of this step (the head's is 10x)
        with in_flight(run, "stopped in the middle of a step"):
            scale = loss_scale(run.scaler)
            losses = train_step(run.model, images, masks, run.optimizer, run.scaler, run.autocast, args.aux_weight)
            skipped = scale is not None and loss_scale(run.scaler) < scale  # [] bool on the device: no sync
            run.scheduler.step()
            run.iteration, run.epoch_images = run.iteration + 1, run.epoch_images + args.batch_size * run.world_size
        counts.add(losses, skipped)
        log_step = run.iteration % args.log_every == 0 or run.iteration == args.iters
        if log_step and counts.log_and_check(lr):
            return "diverged"
        if stop_requested(run, interrupts, log_step):
            return "interrupted"
        if run.iteration % args.val_every == 0 or run.iteration == args.iters:
            if not weights_are_finite(run):
                return "diverged"
            if not validate(run, interrupts):
                return "interrupted"  # a signal abandoned the validation
    return "done"


def train_step(model, images, masks, optimizer, scaler, autocast, aux_weight):
    """One optimizer step; returns the loss terms as tensors (reading them would sync with the GPU). Each term is
    the cross-entropy averaged over the labelled pixels; 0 for a batch with none (all void), not the nan of 0 / 0."""
    with autocast():
        outputs = model(images)
    labelled = (masks != IGNORE_INDEX).sum().clamp(min=1)
    losses = {k: F.cross_entropy(v.float(), masks, ignore_index=IGNORE_INDEX, reduction="sum") / labelled
              for k, v in outputs.items()}
    loss = losses["out"] + aux_weight * sum(v for k, v in losses.items() if k != "out")  # DANet: 2 terms, DRANet: 1
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return {"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}}


def loss_scale(scaler):
    """fp16's loss scale as a tensor on the device, None without fp16 (fp32, bf16). The scaler lowers it exactly when
    it skips a step; get_scale() would read it with a host-device sync every step."""
    if not scaler.is_enabled():
        return None
    scale = scaler._get_scale_async()  # None until the first step: then the initial scale
    return torch.tensor(scaler.get_scale()) if scale is None else scale.clone()  # update() changes it in place


def train_batches(run):
    """Training batches from the data position (run.epoch, run.epoch_images) on, epoch after epoch."""
    while True:
        run.sampler.set_position(run.epoch, run.epoch_images)
        yield from run.train_loader
        run.epoch, run.epoch_images = run.epoch + 1, 0


# A run has diverged when its weights are not finite, or its last DIVERGED_STEPS steps all failed (a loss not finite,
# or a step fp16's GradScaler skipped): one such step is normal in fp16, that many in a row do not come back.
DIVERGED_STEPS = 20


class StepCounts:
    """The loss terms and steps since the last log step, counted on the device (no sync), and the failed steps in a
    row. At a log step, log_and_check logs the mean terms of the finite steps of all processes, LR, speed and ETA."""

    def __init__(self, run):
        self.run, self.failing = run, torch.zeros((), dtype=torch.int64, device=run.device)
        self.start, self.start_iteration = time.perf_counter(), run.iteration  # for the speed and the ETA
        self.sums, self.steps, self.nonfinite, self.skipped = {}, 0, 0, 0

    def add(self, losses, skipped):
        finite = losses["loss"].isfinite()  # [] bool: stays on the device
        self.sums = {k: self.sums.get(k, 0) + torch.where(finite, v, 0) for k, v in losses.items()}
        self.steps, self.nonfinite, self.skipped = self.steps + finite, self.nonfinite + ~finite, self.skipped + skipped
        self.failing = torch.where(~finite | skipped, self.failing + 1, 0)

    def log_and_check(self, lr):
        """Log the counts (self.record) and start afresh; True if the run has diverged (see DIVERGED_STEPS)."""
        run, args, sums = self.run, self.run.args, self.sums
        counts = [torch.as_tensor(n, dtype=torch.float32, device=run.device)
                  for n in (self.steps, self.nonfinite, self.skipped)]
        totals = torch.stack([*sums.values(), *counts])  # [n_terms + 3]
        if run.world_size > 1:
            dist.all_reduce(totals)  # summed over the processes
        *term_sums, steps, nonfinite, skipped = totals.tolist()
        done, elapsed = run.iteration - self.start_iteration, time.perf_counter() - self.start
        record = {"iteration": run.iteration, **{k: total / steps if steps else math.nan
                                                 for k, total in zip(sums, term_sums)}, "lr": lr,
                  "images_per_s": done * args.batch_size * run.world_size / elapsed,
                  "ms_per_iter": elapsed / done * 1000, "eta_s": elapsed / done * (args.iters - run.iteration),
                  "peak_memory_gib": peak_memory_gib(run.device)}
        nonfinite, skipped = round(nonfinite), round(skipped / run.world_size)
        record.update({k: n for k, n in (("nonfinite_losses", nonfinite), ("skipped_steps", skipped)) if n})
        terms = " ".join(f"{k} {record[k]:.4f}" for k in sums if k != "loss")  # out, then position channel or aux
        notes = [f"{n} non-finite loss{'es' if n > 1 else ''} left out" for n in [nonfinite] if n] + \
            [f"{n} step{'s' if n > 1 else ''} skipped by the fp16 scaler" for n in [skipped] if n]
        log(run, record, f"iter {run.iteration}/{args.iters} loss {record['loss']:.4f} ({terms}) lr {lr:.5f} "
                         f"{record['images_per_s']:.1f} img/s {record['ms_per_iter']:.0f} ms/iter "
                         f"eta {record['eta_s'] / 60:.1f} min mem {record['peak_memory_gib']:.2f} GiB"
                         + "".join(f", {note}" for note in notes))
        self.record, self.sums, self.steps, self.nonfinite, self.skipped = record, {}, 0, 0, 0
        return bool(nonfinite or skipped) and (any_rank(self.failing.item() >= DIVERGED_STEPS, run.device)
                                               or not weights_are_finite(run))


def build_run(args, checkpoint, device, rank, world_size, autocast, folder):
    """What the training loop works with: data, model, optimizer, and where the run stands (from `checkpoint`)."""
    train_set, val_set = build_datasets(args)
    if checkpoint is not None:  # a resumed run is the same run: on the classes it was trained on
        check_classes(args.resume, checkpoint["args"].get("num_classes"), checkpoint.get("class_names"),
                      train_set.class_names, f" (a resumed run keeps its classes; to train its weights on these, "
                      f"start a new run with --init-from {args.resume})")
    check_masks(val_set, train_set, args.workers)  # before any work
    args.num_classes = len(train_set.class_names)
    if len(train_set) < world_size * args.batch_size:
        raise UserError(f"{len(train_set)} training images cannot fill a batch of {args.batch_size} on each of "
                        f"{world_size} processes")
    model, raw_model, optimizer, scheduler, scaler = build_model_and_optimizer(args, checkpoint, device, world_size,
                                                                               train_set.class_names)
    sampler = ResumableSampler(len(train_set), args.seed, rank, world_size)
    loader_kwargs = dict(num_workers=args.workers, pin_memory=device.type == "cuda",
                         persistent_workers=args.workers > 0)
    train_loader = DataLoader(train_set, args.batch_size, sampler=sampler, drop_last=True, **loader_kwargs)
    val_shard = Subset(val_set, range(rank, len(val_set), world_size))  # each image once: the metric is exact
    val_loader = DataLoader(val_shard, 1, collate_fn=pad_collate, **loader_kwargs)
    resumed = checkpoint or {}
    config = {**vars(args), **{k: resumed["args"][k] for k in RESUME_KEEPS if k in resumed.get("args", {})}}
    return SimpleNamespace(
        args=args, config=config, device=device, master=rank == 0, world_size=world_size,
        autocast=autocast, model=model, raw_model=raw_model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
        sampler=sampler, train_loader=train_loader, val_loader=val_loader, out_dir=Path(args.out_dir),
        class_names=list(train_set.class_names), train_set=train_set, run_id=folder.run_id,
        iteration=resumed.get("iteration", 0), start_iteration=resumed.get("iteration", 0),
        best_miou=resumed.get("best_miou"), epoch=resumed.get("epoch", 0),
        epoch_images=resumed.get("epoch_images", 0),  # the data position
        in_flight=None, saved_iteration=None,  # what a second signal would cut short; the iteration of last.pt
        validating=False, earlier_run_kept=bool(folder.earlier) and not args.resume,  # --overwrite before a save
        unwritten_log=[], earlier=folder.earlier)


def build_model_and_optimizer(args, checkpoint, device, world_size, class_names=None):
    """(model to train, raw model, optimizer, scheduler, scaler), restored from `checkpoint` or started from
    --init-from's weights. The model to train is wrapped in DDP, then compiled (--compile); the raw one is saved."""
    raw_model = build_model({**vars(args), "pretrained": args.pretrained and checkpoint is None and not args.init_from})
    if args.init_from:  # every rank reads the same file: the models start equal
        init_from(raw_model, args.init_from, backbone=args.backbone, class_names=class_names)
    if checkpoint is not None:
        load_model_state(raw_model, checkpoint, args.resume)
    if dist.is_initialized() and device.type == "cuda":  # SyncBatchNorm (GPU only): statistics of the global batch
        raw_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    raw_model.to(device, memory_format=torch.channels_last)
    model = raw_model
    if dist.is_initialized():
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    optimizer = torch.optim.SGD([
        {"params": raw_model.backbone.parameters(), "lr": args.lr},
        {"params": raw_model.head_parameters(), "lr": args.lr * 10},  # the head is trained from scratch
    ], lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=args.iters, power=0.9)
    # fp16: the default first scale, 2**16, overflows the stem's gradient and skips the first step; 2**10 does not
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10, enabled=args.precision == "fp16")
    if checkpoint is not None:
        for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
            obj.load_state_dict(checkpoint[name])
    return model, raw_model, optimizer, scheduler, scaler


def build_model(config):
    """ClusterDANet or DRANet from a train.py args dict, as stored in every checkpoint."""
    pretrained, name = config["pretrained"], config["model"]
    kwargs = {key: config[key] for key in ("num_classes", "backbone", "num_clusters", "temperature", "cluster_init",
                                           "cluster_reseed", "clustering", "multi_grid", "deep_stem")}
    kwargs["align_corners"] = config.get("align_corners", False)  # True in the original code's checkpoints only
    if name == "danet":
        kwargs["attention"] = config["attention"]
    elif config["attention"] != "auto":
        raise UserError(NO_POSITION_ATTENTION)
    try:
        return MODELS[name](pretrained=pretrained, **kwargs)
    except ValueError as e:  # a configuration the model refuses (multi-grid on resnet18, K not divisible by 8)
        raise UserError(str(e)) from None
    except RuntimeError as e:  # the ImageNet weights could not be downloaded: the message says what to do
        if pretrained:
            raise UserError(str(e)) from None
        raise


def setup_device(args):
    """(device, rank, world_size, autocast context); initialises torch.distributed under torchrun."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:  # not a device name at all
        device = None
    if device is None or device.type not in ("cuda", "cpu"):
        raise UserError(f"--device {args.device} is not supported: use cuda, cuda:N or cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device} asked for CUDA, but torch.cuda.is_available() is False "
                            f"(no GPU, or a CPU-only PyTorch); use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)  # under torchrun: one GPU per process
        count = torch.cuda.device_count()
        if device.index >= count:
            error = UserError(f"there is no {device}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}"
                              + (f" (process of rank {rank})" if world_size > 1 else ""))
            error.this_rank = True  # the other processes may have found their GPU: run_main prints it on every rank
            raise error
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if "WORLD_SIZE" in os.environ:  # launched by torchrun, also with one process (DDP, SyncBatchNorm, NCCL)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.precision is None:
        cuda = device.type == "cuda"
        args.precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731
    return device, rank, world_size, autocast


def check_batch_norm(args, device, world_size):
    """A UserError unless every BatchNorm layer sees 2 or more values per channel in a training step: the images it
    normalises over times the pixels of its smallest map (DRANet's 1x1 pooled centre, the map at OUTPUT_STRIDE)."""
    synced = dist.is_initialized() and device.type == "cuda"  # SyncBatchNorm, as build_model_and_optimizer
    images = args.batch_size * (world_size if synced else 1)
    each = "" if synced or world_size == 1 else (f" on each of the {world_size} processes (without SyncBatchNorm, on "
                                                 f"the CPU, each process normalises over its own --batch-size)")
    if args.model == "dranet" and images < 2:
        raise UserError(f"--model dranet needs a batch of 2 or more{each}: CPAM's 1x1 pooled centre gives BatchNorm "
                        f"one value per channel")
    if images * math.ceil(args.crop_size / OUTPUT_STRIDE) ** 2 < 2:
        raise UserError(f"--crop-size {args.crop_size} with --batch-size {args.batch_size}{each} leaves BatchNorm one "
                        f"value per channel (a 1x1 feature map at output stride {OUTPUT_STRIDE}): use a larger crop "
                        f"or batch")


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if resource is None:
        return math.nan
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the process's peak RSS: KiB, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


# ==== Part 3: validation and the mIoU =================================================================================

def validate(run, interrupts):
    """Validation mIoU, logged; saves last.pt, and best.pt at a new best. False if a signal abandoned it."""
    run.validating = True  # for the message of an error in the middle of it
    metric = accumulate_confusion(run.raw_model, run.val_loader, run.args.num_classes, run.device, run.autocast,
                                  stop=lambda: interrupts.requested)  # raw: DDP's forward expects every rank in step
    run.validating = False
    run.model.train()
    if metric is None:
        return False
    metric = metric.compute()
    best = not math.isnan(metric["miou"]) and (run.best_miou is None or metric["miou"] > run.best_miou)
    if best:
        run.best_miou = metric["miou"]
    usage = run.raw_model.cluster_usage()  # over the training steps since the last validation
    log(run, {"iteration": run.iteration, "val_miou": metric["miou"], "val_pixel_accuracy": metric["pixel_accuracy"],
              "val_iou": per_class(metric["iou"], run.class_names),
              **{f"{branch}_{k}": v for branch, u in usage.items() for k, v in u.items()}},
        f"val iter {run.iteration}: mIoU {metric['miou']:.4f} pixel accuracy {metric['pixel_accuracy']:.4f}"
        + (" (best)" if best else "") + "".join(
            f", {branch} clusters: {u['live']}/{u['clusters']} live, perplexity {u['perplexity']:.1f}"
            for branch, u in usage.items()))
    save(run, "last.pt")
    if best:
        save(run, "best.pt")
    return True


def predict_logits(model, images):
    """Whole-image logits [B, K, H, W] at any size (the model pads to its output stride and crops back)."""
    return model(images)["out"].float()


@torch.inference_mode()
def accumulate_confusion(model, loader, num_classes, device, autocast=nullcontext, predict=predict_logits,
                         on_batch=None, stop=None):
    """Run `predict` over a pad_collate loader and return the (all-reduced) ConfusionMatrix; on_batch(images, masks,
    logits, sizes) sees every batch. None once stop() says yes on any process: the pass is abandoned."""
    model.eval()
    metric = ConfusionMatrix(num_classes, device)
    abandoned = False
    for images, masks, sizes in loader:
        abandoned = stop is not None and stop()
        if abandoned:
            break
        images = images.to(device, non_blocking=True)
        with autocast():
            logits = predict(model, images)  # [B, K, H, W]
        metric.update(logits.argmax(1), masks.to(device, non_blocking=True))
        if on_batch is not None:
            on_batch(images, masks, logits, sizes)
    if stop is not None and any_rank(abandoned, device):
        return None
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(metric.matrix)
    return metric


class ConfusionMatrix:
    """matrix[t, p] counts the pixels of class t predicted as p; IoU_c = TP / (TP + FP + FN); mIoU averages the IoU
    of the classes present in ground truth or prediction."""

    def __init__(self, num_classes, device="cpu"):
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, prediction, target):
        keep = target != IGNORE_INDEX
        index = target[keep] * self.num_classes + prediction[keep]  # [n_pixels]
        self.matrix += torch.bincount(index, minlength=self.num_classes**2).view(self.num_classes, -1)  # [K, K]

    def compute(self):
        """{"miou", "pixel_accuracy", "iou": [per-class IoU, nan for a class absent from both]}"""
        m = self.matrix.double().cpu()
        tp, true, predicted = m.diag(), m.sum(1), m.sum(0)
        union = true + predicted - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.nan)
        miou = iou.nanmean().item() if (union > 0).any() else math.nan
        return {"miou": miou, "pixel_accuracy": (tp.sum() / m.sum().clamp(min=1)).item(), "iou": iou.tolist()}


def per_class(values, class_names):
    """{class name: value} in class order, None for nan (a class absent from ground truth and prediction)."""
    return {name: None if math.isnan(v) else v for name, v in zip(class_names, values)}


# ==== Part 4: the machinery, called by name from parts 2 and 3 ========================================================

# ---- 4a data formats -------------------------------------------------------------------------------------------------

def first_few(items, count=3):
    """"a, b, c, ...": the first `count` of `items`, and an ellipsis when there are more."""
    return ", ".join(map(str, items[:count])) + (", ..." if len(items) > count else "")


def and_more(count):
    """" (and 3 more)" after the one thing a message names, "" when there are no more."""
    return f" (and {count} more)" if count else ""


def read_lines(path):
    """The stripped, non-blank lines of a text file as editors save it: UTF-8 with or without byte-order marks, or
    UTF-16 with one. Other text is a UserError naming the file: a guessed code page would turn names into others."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror})") from None
    utf16 = data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    try:
        text = data.decode("utf-16" if utf16 else "utf-8")
    except UnicodeDecodeError as e:
        if utf16:
            raise UserError(f"{path} starts with a UTF-16 byte-order mark but is not UTF-16 text: save it as "
                            f"UTF-8") from None
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}: saved in another "
                        f"encoding, such as Latin-1 or Windows-1252?): save it as UTF-8") from None
    if "\0" in text:
        raise UserError(f"{path} holds NUL characters (UTF-16 or UTF-32 without a byte-order mark, or not a text "
                        f"file): save it as UTF-8")
    lines = (line.strip() for line in text.replace("\ufeff", "").splitlines())
    return [line for line in lines if line]


def other_layout_hint(root):
    """" (it looks like a Cityscapes tree: add --dataset cityscapes)" if `root` holds another dataset's layout."""
    root = Path(root)
    if (root / "leftImg8bit").is_dir() or (root / "gtFine").is_dir():
        name, title = "cityscapes", "Cityscapes"
    elif (root / "classes.txt").is_file() or ((root / "images").is_dir() and (root / "masks").is_dir()):
        name, title = "folder", "folder-dataset"
    elif any((c / "JPEGImages").is_dir() for c in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012")):
        name, title = "voc", "VOC"
    else:
        return ""
    return f" (it looks like a {title} tree: add --dataset {name})"


def find_voc_root(data_root):
    """The VOC2012 folder: data_root itself, data_root/VOC2012 (VOCdevkit given) or data_root/VOCdevkit/VOC2012."""
    root = Path(data_root)
    if not root.is_dir():
        raise UserError(f"data root {root} does not exist (download VOC with --download, see README)")
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir() and (candidate / "ImageSets" / "Segmentation").is_dir():
            return candidate
    raise UserError(f"{root} is neither a VOC2012 folder (with JPEGImages/ and ImageSets/Segmentation/) "
                    f"nor a folder holding VOC2012 or VOCdevkit/VOC2012{other_layout_hint(root)}")


# EXIF orientation (tag 0x0112) -> the PIL transposition that shows the image upright (as ImageOps.exif_transpose)
EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                  5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                  8: Image.Transpose.ROTATE_90}


def exif_orientation(image):
    """The EXIF orientation of an open PIL image: 1 (as stored) to 8; 1 when it has none or a broken one."""
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # a malformed EXIF block: the image is read as stored
        return 1
    return orientation if orientation in EXIF_TRANSPOSE else 1


def read_image(path, with_orientation=False):
    """[3, H, W] uint8 tv_tensors.Image as the user sees the file: turned by its EXIF orientation, 16-bit or float
    grey scaled to 8 bits; with `with_orientation`, (image, the orientation applied). A UserError names a bad file."""
    try:
        with Image.open(path) as image:
            orientation = exif_orientation(image)
            if orientation != 1:
                image = image.transpose(EXIF_TRANSPOSE[orientation])
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16/32-bit integer or float grey
                top = 1.0 if image.mode == "F" else 65535.0
                grey = np.array(image, dtype=np.float64)  # [H, W]
                if not (np.isfinite(grey).all() and grey.min() >= 0 and grey.max() <= top):
                    raise UserError(f"cannot read image {path}: its {image.mode} values span {grey.min():g}.."
                                    f"{grey.max():g}, not 0..{top:g}; convert it to an 8-bit image")
                rgb = np.repeat(np.round(grey * (255 / top)).astype(np.uint8)[..., None], 3, axis=2)  # [H, W, 3]
            else:
                rgb = np.array(image.convert("RGB"))  # [H, W, 3]
            image = tv_tensors.Image(rgb.transpose(2, 0, 1))  # [H, W, 3] -> [3, H, W]
            return (image, orientation) if with_orientation else image
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def read_mask(dataset, index, size, orientation):
    """Mask `index` of a SegmentationFiles, a grey or palette PNG, as [H, W] uint8 training labels, turned by its
    image's EXIF `orientation` to its image's `size` (W, H). A bad mask is a UserError naming the file."""
    path, (labels, description), (W, H) = dataset.masks[index], dataset.mask_labels, size
    try:
        with Image.open(path) as mask:  # palette ("P") or grey ("L") PNG of labels
            stored = mask.size
            if orientation != 1:
                mask = mask.transpose(EXIF_TRANSPOSE[orientation])
            mask = np.array(mask)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read mask {path}: {e}") from None
    if mask.ndim == 3:  # RGB(A), or grey + alpha: class indices only if the colour channels agree
        colour = mask[..., :3] if mask.shape[2] >= 3 else mask[..., :1]
        if (colour != colour[..., :1]).any():
            pixels = colour.reshape(-1, colour.shape[2])  # [H, W, C] -> [H * W, C]
            example = tuple(pixels[(pixels != pixels[:, :1]).any(1)][0].tolist())
            raise UserError(f"mask {path} is a {colour.shape[2]}-channel colour image (e.g. colour {example}), not "
                            f"a map of {description}: save each pixel's class index as a grey (L) or palette (P) "
                            f"PNG (see README)")
        mask = colour[..., 0]
    if mask.shape != (H, W):
        turned = orientation in (5, 6, 7, 8) and stored == (W, H)
        hint = (f"; its image's EXIF orientation {orientation} turns the image to {W}x{H} and the mask with it "
                f"(masks are drawn on the stored pixels), but this mask is already {W}x{H}: save it as the image is "
                f"stored, {H}x{W}, or save the image without its EXIF orientation") if turned else ""
        raise UserError(f"mask {path} is not a {W}x{H} map of {description}: it is {mask.shape[1]}x{mask.shape[0]}"
                        f"{hint}")
    bad = np.setdiff1d(np.unique(mask), labels)
    if bad.size:
        raise UserError(f"mask {path} is not a {W}x{H} map of {description} (found {bad.tolist()})")
    return mask.astype(np.uint8) if dataset.to_train_id is None else dataset.to_train_id[mask]


def read_pair(dataset, index):
    """(image [3, H, W], mask [H, W]) of item `index` of a SegmentationFiles, both turned by the image's EXIF."""
    try:
        image, orientation = read_image(dataset.images[index], with_orientation=True)
        return image, read_mask(dataset, index, (image.shape[2], image.shape[1]), orientation)
    except UserError as e:  # under torchrun, found by the one process whose share of the data holds the file
        e.this_rank = True
        raise


def pair_files(images, masks, mask_of, image_of):
    """(ids, image paths, mask paths), sorted by id; a file without its partner is a UserError naming both."""
    for i in sorted(images.keys() - masks.keys()):
        raise UserError(f"image {images[i]} has no mask {mask_of(i)}")
    for i in sorted(masks.keys() - images.keys()):
        raise UserError(f"mask {masks[i]} has no image {image_of(i)}")
    ids = sorted(images)
    return ids, [images[i] for i in ids], [masks[i] for i in ids]


def check_files_exist(paths, what, readable=None):
    """A UserError naming the first of `paths` that is not a readable file, and how many more are not."""
    bad = []  # (path, problem)
    for path in map(Path, paths):
        if path.is_file():
            try:
                os.close(os.open(path, os.O_RDONLY))
                continue
            except OSError as e:
                problem = f"cannot be read ({e.strerror})"
        elif path.is_dir():
            problem = "is a folder, not a file"
        elif path.is_symlink():
            problem = "is a broken link"
        elif path.exists():
            problem = "is not a regular file"
        else:
            problem = "not found"
        bad.append((path, problem))
    if bad:
        first, problem = bad[0]
        found = found_beside(first, readable) if readable and problem == "not found" else ""
        raise UserError(f"{what} {problem}: {first}{and_more(len(bad) - 1)}{found}")


def found_beside(path, readable, prefix=None):
    """": found a.webp, which is not read (readable: .jpg, .png)" for a missing `path`: the files beside it with its
    stem, or given `prefix`, whose names start with it; "" when there are none."""
    path = Path(path)
    try:
        found = sorted(p for p in path.parent.iterdir() if p != path and not p.name.startswith(".")
                       and (p.name.startswith(prefix) if prefix else p.stem == path.stem))
    except OSError:  # no such folder: nothing found
        return ""
    if not found:
        return ""
    kind = f", a {found[0].suffix} file" if len(found) == 1 and found[0].suffix.lower() != path.suffix.lower() else ""
    more = f" (and {first_few([p.name for p in found[1:]])})" if found[1:] else ""
    return (f": found {found[0]}{more}{kind}, which {'is' if len(found) == 1 else 'are'} not read (readable: "
            f"{', '.join(readable)})")


class SegmentationFiles(Dataset):
    """Image files paired with mask files: item i is (image [3, H, W], mask [H, W] in training labels) after
    `transform`. A subclass `add`s the files of its split, then `check`s them: when built, not hours into training."""

    to_train_id = None  # [256] uint8, mask value -> training label (Cityscapes)
    text_files = ()  # the text files the dataset reads (a split list, classes.txt)

    def __init__(self, split, transform):
        self.split, self.transform = split, transform or eval_transform()
        self.ids, self.images, self.masks = [], [], []

    def parts(self, refusal):
        """The parts the split reads: train and val for trainval, else itself; a UserError `refusal` for another."""
        if self.split not in ("train", "val", "trainval"):
            raise UserError(refusal)
        return ("train", "val") if self.split == "trainval" else (self.split,)

    def add(self, ids, images, masks):
        self.ids, self.images, self.masks = self.ids + ids, self.images + images, self.masks + masks

    def check(self, images, masks, readable=(None, None)):
        check_files_exist(self.images, f"image {images}", readable[0])
        check_files_exist(self.masks, f"mask {masks}", readable[1])

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        image, mask = read_pair(self, index)
        return self.transform(image, tv_tensors.Mask(mask))


class VOCSegmentation(SegmentationFiles):
    """PASCAL VOC 2012: train, val, trainval from SegmentationClass/; train_aug (SBD too) from SegmentationClassAug/."""

    class_names = VOC_CLASSES
    mask_labels = ([*range(len(VOC_CLASSES)), IGNORE_INDEX], "labels 0..20 and 255")  # for read_pair

    def __init__(self, data_root, split="train", transform=None):
        super().__init__(split, transform)
        self.root = find_voc_root(data_root)
        split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        mask_dir = self.root / ("SegmentationClassAug" if split == "train_aug" else "SegmentationClass")
        if not split_file.is_file():
            hint = " (train_aug comes from SBD: see README)" if split == "train_aug" else ""
            raise UserError(f"split file {split_file} not found{hint}")
        if not mask_dir.is_dir():
            raise UserError(f"mask folder {mask_dir} not found")
        ids, self.text_files = read_lines(split_file), (split_file,)  # one id per line
        if not ids:
            raise UserError(f"split file {split_file} lists no images")
        self.add(ids, [self.root / "JPEGImages" / f"{i}.jpg" for i in ids], [mask_dir / f"{i}.png" for i in ids])
        self.check(f"listed in {split_file}", f"listed in {split_file}", readable=((".jpg",), (".png",)))


# The 19 classes Cityscapes is evaluated on (cityscapesScripts' labels.py): (name, label id, colour); a class's
# train id is its position here, every other label id becomes 255.
CITYSCAPES_CLASSES = (
    ("road", 7, (128, 64, 128)), ("sidewalk", 8, (244, 35, 232)), ("building", 11, (70, 70, 70)),
    ("wall", 12, (102, 102, 156)), ("fence", 13, (190, 153, 153)), ("pole", 17, (153, 153, 153)),
    ("traffic light", 19, (250, 170, 30)), ("traffic sign", 20, (220, 220, 0)), ("vegetation", 21, (107, 142, 35)),
    ("terrain", 22, (152, 251, 152)), ("sky", 23, (70, 130, 180)), ("person", 24, (220, 20, 60)),
    ("rider", 25, (255, 0, 0)), ("car", 26, (0, 0, 142)), ("truck", 27, (0, 0, 70)), ("bus", 28, (0, 60, 100)),
    ("train", 31, (0, 80, 100)), ("motorcycle", 32, (0, 0, 230)), ("bicycle", 33, (119, 11, 32)),
)


class Cityscapes(SegmentationFiles):
    """Cityscapes' fine annotations: leftImg8bit/<split>/<city>/<id>_leftImg8bit.png with
    gtFine/<split>/<city>/<id>_gtFine_labelIds.png of label ids 0..33; items hold the 19 train ids and 255."""

    class_names, label_ids, colours = zip(*CITYSCAPES_CLASSES)  # by train id
    to_train_id = np.full(256, IGNORE_INDEX, np.uint8)  # label id -> train id
    to_train_id[list(label_ids)] = range(len(label_ids))
    mask_labels = (range(34), "Cityscapes label ids 0..33")  # for read_pair

    def __init__(self, data_root, split="train", transform=None):
        super().__init__(split, transform)
        root = Path(data_root)
        if not root.is_dir():
            raise UserError(f"data root {root} does not exist (Cityscapes: see README)")
        for folder in ("leftImg8bit", "gtFine"):
            if not (root / folder).is_dir():
                raise UserError(f"{root} has no {folder}/ folder: give the Cityscapes folder that holds leftImg8bit/ "
                                f"and gtFine/{other_layout_hint(root)}")
        for part in self.parts(f"Cityscapes has no split {split} (train, val or trainval)"):
            image_dir, mask_dir = root / "leftImg8bit" / part, root / "gtFine" / part
            images = {p.name.removesuffix("_leftImg8bit.png"): p for p in image_dir.glob("*/*_leftImg8bit.png")}
            masks = {p.name.removesuffix("_gtFine_labelIds.png"): p for p in mask_dir.glob("*/*_gtFine_labelIds.png")}
            if not images:
                others = sorted(image_dir.glob("*/*_leftImg8bit.*"))
                found = (f": found {others[0]}" + (f" and {len(others) - 1} more" if others[1:] else "") +
                         f", which {'are' if others[1:] else 'is'} not read") if others else ""
                raise UserError(f"{image_dir} holds no <city>/<id>_leftImg8bit.png images{found}")

            def mask_of(i):  # the partner is looked for in the same city's folder; X_gtFine_color.png is named
                path = mask_dir / images[i].parent.name / f"{i}_gtFine_labelIds.png"
                return f"{path}" + found_beside(path, ("_gtFine_labelIds.png",), prefix=f"{i}_gtFine_")

            def image_of(i):
                path = image_dir / masks[i].parent.name / f"{i}_leftImg8bit.png"
                return f"{path}" + found_beside(path, ("_leftImg8bit.png",))

            self.add(*pair_files(images, masks, mask_of, image_of))
        self.check(f"under {root / 'leftImg8bit'}", f"under {root / 'gtFine'}")


def files_under(folder, suffixes):
    """({relative path without suffix: path} of the files under `folder` with one of `suffixes`, the number of
    hidden names (starting with ".") left out, [the files of other suffixes])."""
    files, hidden, others = {}, 0, []
    for parent, folders, names in os.walk(folder, followlinks=True):
        hidden += sum(name.startswith(".") for name in folders)
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                hidden += 1
                continue
            path = Path(parent, name)
            if path.suffix.lower() in suffixes:
                key = path.relative_to(folder).with_suffix("").as_posix()
                if key in files:
                    raise UserError(f"{files[key]} and {path} have the same name")
                files[key] = path
            else:
                others.append(path)
    return files, hidden, others


class FolderDataset(SegmentationFiles):
    """Your own data: DATA/classes.txt names the classes (the i-th is label i); DATA/images/<split>/NAME.jpg (.jpeg,
    .png, also in subfolders) goes with DATA/masks/<split>/NAME.png of class indices, 255 to ignore (see README)."""

    EXTENSIONS = (".jpg", ".jpeg", ".png")

    def __init__(self, data_root, split="train", transform=None):
        super().__init__(split, transform)
        root = Path(data_root)
        if not root.is_dir():
            raise UserError(f"data root {root} does not exist")
        classes_file = root / "classes.txt"
        if not classes_file.is_file():
            raise UserError(f"{classes_file} not found: it names the classes, one per line (see README)"
                            f"{other_layout_hint(root)}")
        names = [line for line in read_lines(classes_file) if not line.startswith("#")]  # # starts a comment
        if not names or len(names) > IGNORE_INDEX:
            raise UserError(f"{classes_file} must name 1 to 255 different classes, one per line (# starts a comment, "
                            f"blank lines are left out); it names {len(names)}")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise UserError(f"{classes_file} must name 1 to 255 different classes, one per line: {repeated[0]!r} is "
                            f"named {names.count(repeated[0])} times")
        self.class_names, self.text_files, self.hidden = tuple(names), (classes_file,), 0
        for part in self.parts(f"a folder dataset has no split {split} (train, val or trainval: images/train/ and "
                               f"images/val/)"):
            image_dir, mask_dir = root / "images" / part, root / "masks" / part
            for folder in (image_dir, mask_dir):
                if not folder.is_dir():
                    raise UserError(f"folder {folder} not found (see README for the layout){other_layout_hint(root)}")
            images, hidden_images, others = files_under(image_dir, self.EXTENSIONS)
            masks, hidden_masks, _ = files_under(mask_dir, (".png",))
            if not images:
                suffixes = sorted({p.suffix.lower() or "no suffix" for p in others})
                found = (f": it holds {len(others)} other {'files' if others[1:] else 'file'} ({', '.join(suffixes)}), "
                         f"which {'are' if others[1:] else 'is'} not read") if others else ""
                raise UserError(f"{image_dir} holds no images (NAME.jpg, .jpeg or .png, also in subfolders){found}")
            prefix = f"{part}/" if split == "trainval" else ""  # ids stay apart when both splits are read
            ids, image_paths, mask_paths = pair_files(  # a partner of another suffix is named (a.webp beside a.png)
                images, masks, lambda i: f"{mask_dir / i}.png" + found_beside(mask_dir / f"{i}.png", (".png",)),
                lambda i: f"{image_dir / i}.jpg (.jpeg, .png)" + found_beside(image_dir / f"{i}.jpg", self.EXTENSIONS))
            self.add([prefix + i for i in ids], image_paths, mask_paths)
            self.hidden += hidden_images + hidden_masks
        self.check(f"under {root / 'images'}", f"under {root / 'masks'}")
        self.mask_labels = ([*range(len(self.class_names)), IGNORE_INDEX],
                            f"class indices 0..{len(self.class_names) - 1} and 255")  # for read_pair


class SyntheticShapes(Dataset):
    """The demo's data, drawn in memory: discs, squares and triangles in jittered colours on a textured grey, which a
    small network learns without pretrained weights. Image `index` is drawn from (seed, index): always the same."""

    COLOURS = torch.tensor([[0.0, 0.0, 0.0], [0.9, 0.25, 0.2], [0.2, 0.8, 0.3], [0.25, 0.35, 0.95]])  # [4, 3]

    def __init__(self, length, size=64, seed=0, transform=None):
        self.length, self.size, self.seed = length, size, seed
        self.transform = transform or eval_transform()
        self.class_names = SHAPE_CLASSES
        self.ids = [f"shapes_{i:03d}" for i in range(length)]

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        S = self.size
        y, x = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")  # [S, S] each
        grey = torch.rand(1, 1, 1, generator=g) * 0.5 + 0.2
        texture = torch.rand(1, S // 8, S // 8, generator=g) * 0.3 + torch.rand(3, 1, 1, generator=g) * 0.1
        image = F.interpolate((grey + texture)[None], size=(S, S), mode="bilinear")[0]  # [3, S, S]
        mask = torch.zeros(S, S, dtype=torch.int64)
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            label = int(torch.randint(1, 4, (1,), generator=g))
            r = float(torch.randint(S // 10, S // 4, (1,), generator=g))
            cy, cx = (float(v) for v in torch.randint(int(r), S - int(r), (2,), generator=g))
            if label == 1:
                inside = (y - cy) ** 2 + (x - cx) ** 2 <= r**2
            elif label == 2:
                inside = ((y - cy).abs() <= r * 0.8) & ((x - cx).abs() <= r * 0.8)
            else:  # a triangle pointing up: below the apex and between the two sides
                inside = (y <= cy + r * 0.7) & ((x - cx).abs() <= (y - cy + r) * 0.6)
            mask[inside] = label
            colour = self.COLOURS[label] + (torch.rand(3, generator=g) - 0.5) * 0.2  # [3]
            image[:, inside] = colour[:, None]  # [3, n_pixels_inside]
        image = (image + torch.randn(3, S, S, generator=g) * 0.04).clamp(0, 1)
        return self.transform(tv_tensors.Image((image * 255).to(torch.uint8)), tv_tensors.Mask(mask))


class MaskScan(Dataset):
    """Item i: (value histogram [256] of mask i, None), or (None, its error); its image's pixels are not decoded."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset.masks)

    def __getitem__(self, index):
        dataset, path = self.dataset, self.dataset.images[index]
        try:
            with Image.open(path) as image:
                orientation, (W, H) = exif_orientation(image), image.size
        except (OSError, ValueError) as e:
            return None, f"cannot read image {path}: {e}"
        size = (H, W) if orientation in (5, 6, 7, 8) else (W, H)  # as shown
        try:
            mask = read_mask(dataset, index, size, orientation)
        except UserError as e:
            return None, str(e)
        return np.bincount(mask.ravel(), minlength=256), None


def mask_histogram(dataset, workers, every_mask):
    """(value histogram [256], masks read) of `dataset`'s masks: all, or in a random order until every class occurs."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    total, seen = np.zeros(256, np.int64), 0
    for batch in DataLoader(Subset(MaskScan(dataset), order), batch_size=16, num_workers=workers, collate_fn=list):
        for histogram, error in batch:
            if error:
                raise UserError(error)
            total += histogram
            seen += 1
        if not every_mask and total[:len(dataset.class_names)].all():
            break
    return total, seen


def check_masks(val_set, train_set=None, workers=0, log=None):
    """Check the masks before any work: every mask of `val_set`, which must hold a labelled pixel, and `train_set`'s
    until every class has occurred (a class in none is a warning). Logs (print0 unless `log`) the images per split."""
    log = log or print0
    if not hasattr(val_set, "masks"):  # the demo's shapes
        return
    start = time.perf_counter()
    counts = [f"{d.split} {len(d)} images" + (f" ({d.hidden} hidden files left out)" if getattr(d, "hidden", 0) else "")
              for d in (train_set, val_set) if d is not None]
    total, seen = mask_histogram(val_set, workers, every_mask=True)
    train = mask_histogram(train_set, workers, every_mask=False) if train_set is not None else None
    if not total[:len(val_set.class_names)].sum():
        raise UserError(f"the {val_set.split} set has no labelled pixel in its {seen} masks (all 255, ignored): "
                        f"no mIoU can be measured on it; check the masks (class indices, 255 only to ignore)")
    log(f"data: {', '.join(counts)}; masks checked in {time.perf_counter() - start:.1f} s")
    if train is not None:
        total, seen = train
        absent = [f"{c} ({name})" for c, name in enumerate(train_set.class_names) if not total[c]]
        if absent:
            ignored = total[IGNORE_INDEX] / max(1, total.sum())
            binary = (f", and 255 (ignored) covers {ignored:.0%} of their pixels: masks saved as black and white "
                      f"0/255 images mark the objects 255, which is ignored; save them as 0/1 (255 only for pixels "
                      f"to ignore)") if ignored > 0.1 else \
                f": {'they' if len(absent) > 1 else 'it'} cannot be learned (255 covers {ignored:.0%})"
            log(f"warning: class{'es' if len(absent) > 1 else ''} {', '.join(absent)} never occur"
                f"{'' if len(absent) > 1 else 's'} in the {seen} training masks{binary}")


DATASETS = {"demo": SyntheticShapes, "voc": VOCSegmentation, "cityscapes": Cityscapes, "folder": FolderDataset}


def build_datasets(args):
    """(train, val) datasets of args.dataset, checked against the run's outputs (check_run_outputs)."""
    train_tf = train_transform(args.crop_size, args.base_size)
    if args.dataset == "demo":
        return SyntheticShapes(args.demo_images, args.base_size, 0, train_tf), SyntheticShapes(64, args.base_size, 1)
    if args.download:
        try:
            torchvision.datasets.VOCSegmentation(args.data_root, year="2012", image_set="trainval", download=True)
        except OSError as e:  # URLError and socket errors included
            raise UserError(f"could not download VOC 2012 into {args.data_root} ({e}); download "
                            f"VOCtrainval_11-May-2012.tar by hand and extract it there") from None
    dataset = DATASETS[args.dataset]
    datasets = dataset(args.data_root, args.train_split, train_tf), dataset(args.data_root, args.val_split)
    check_run_outputs(args, datasets)  # before anything is written: --out-dir overwrites none of their files
    return datasets


def pad_collate(batch):
    """(images [B, 3, H, W] padded with 0, masks [B, H, W] padded with 255, each pair's (H, W) [B, 2])."""
    sizes = torch.tensor([image.shape[1:] for image, _ in batch])  # [B, 2]
    H, W = sizes.amax(0).tolist()
    images = torch.stack([F.pad(i, (0, W - i.shape[2], 0, H - i.shape[1])) for i, _ in batch])  # [B, 3, H, W]
    masks = torch.stack([F.pad(m, (0, W - m.shape[1], 0, H - m.shape[0]), value=IGNORE_INDEX)
                         for _, m in batch])  # [B, H, W]
    return images, masks, sizes


class ResumableSampler(Sampler):
    """The training order: a permutation from seed + epoch, shared out over the processes, starting `skip` images
    into the epoch; the images shown do not depend on the number of processes, so a resumed run skips them."""

    def __init__(self, length, seed=0, rank=0, world_size=1):
        self.length, self.seed, self.rank, self.world_size = length, seed, rank, world_size
        self.epoch = self.skip = 0

    def set_position(self, epoch, skip):
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        rest = order[self.skip:][:len(self) * self.world_size]  # the unseen part, a multiple of world_size
        return iter(rest[self.rank::self.world_size].tolist())

    def __len__(self):
        return max(0, self.length - self.skip) // self.world_size


# ---- 4b checkpoints: save, load, the original code's, --init-from, --resume's checks ---------------------------------

def save_atomic(path, write):
    """write(tmp) to this process and thread's temporary file, then rename it to path: never a half-written file."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # a full disk can refuse the folder too
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:  # disk full, Ctrl-C: keep the previous file, leave no temporary one
        tmp.unlink(missing_ok=True)
        cause = e  # torch.save's zip writer raises a RuntimeError as the OSError of a failed file.write unwinds
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = f"the previous {path.name} is kept" if path.is_file() else f"no {path.name} was written"
            raise RunError(f"no space left on the device while writing {path}: {kept}; free some space",
                           EXIT_DISK_FULL) from None
        raise


def save_checkpoint(state, path):
    """torch.save(state) to path, atomically, through a file object: a full disk is an OSError (ENOSPC) there."""
    def write(tmp):
        with open(tmp, "wb") as file:
            torch.save(state, file)

    save_atomic(path, write)


def load_checkpoint(path):
    """A checkpoint of ours or the original code's, with finite weights; another file is a UserError saying what."""
    path = Path(path)
    if path.is_dir():
        inside = next((f" (it holds {path / name})" for name in ("last.pt", "best.pt") if (path / name).is_file()), "")
        raise UserError(f"checkpoint {path} is a folder, not a checkpoint file{inside}")
    if not path.exists():
        raise UserError(f"checkpoint {path} not found")
    if not path.is_file():
        raise UserError(f"checkpoint {path} is not a regular file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # many types for truncated or foreign files; weights_only refuses pickled classes
        found = re.search(r"GLOBAL ([\w.]+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if found is None:
            raise UserError(f"checkpoint {path} cannot be read (truncated or not a PyTorch file?): "
                            f"{type(e).__name__}") from None
        name = found.group(1)
        what = "a whole pickled model" if name.startswith(("torch.nn.", "clusterdanet.")) else "a pickled Python object"
        raise UserError(f"checkpoint {path} is {what} ({name}, as torch.save(model) writes), not a checkpoint of "
                        f"tensors: it is not unpickled (that would run code from the file); save model.state_dict() "
                        f"instead") from None
    if is_original_checkpoint(checkpoint):
        checkpoint = read_original(checkpoint, path)
    elif not isinstance(checkpoint, dict) or not {"model", "args", "iteration"} <= checkpoint.keys() or \
            not isinstance(checkpoint["model"], dict):
        raise UserError(f"{path} is not a train.py checkpoint (it needs model, args and iteration) "
                        f"nor one of the original DANet code (a state_dict of pretrained.* and head.* tensors)")
    checkpoint = upgrade(checkpoint)
    bad = [name for name, t in checkpoint["model"].items()
           if torch.is_tensor(t) and t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:
        raise UserError(f"checkpoint {path} holds weights that are nan or infinite ({len(bad)} tensors: "
                        f"{first_few(bad)}): it cannot be evaluated or trained from; train.py never saves such "
                        f"weights, so use an earlier checkpoint")
    return checkpoint


# The args a checkpoint may lack, and the value it was trained with then.
ARGS_ADDED = dict(model="danet", clustering=True, cluster_init="random", cluster_reseed=0, multi_grid=False,
                  deep_stem=False, pretrained=False)


def upgrade(checkpoint):
    """A checkpoint in this file's form: the args it lacks, `attention` for `dense_attention`, best_miou None for -1."""
    args = checkpoint["args"] = {**ARGS_ADDED, **checkpoint["args"]}
    if "attention" not in args:
        args["attention"] = "dense" if args.pop("dense_attention", False) else "auto"
    if checkpoint.get("best_miou") is not None and checkpoint["best_miou"] < 0:
        checkpoint["best_miou"] = None
    return checkpoint


def read_original(checkpoint, path):
    """An original DANet or DRANet checkpoint as one of ours, with VOC's or Cityscapes' classes if it has as many."""
    try:
        model, config, unused = original_state_and_config(checkpoint["state_dict"], source=str(path))
    except ValueError as e:  # blocks or a classifier the loader does not know
        raise UserError(str(e)) from None
    known = {len(VOC_CLASSES): ("voc", list(VOC_CLASSES)),
             len(Cityscapes.class_names): ("cityscapes", list(Cityscapes.class_names))}
    dataset, class_names = known.get(config["num_classes"], ("folder", None))
    config = dict(num_clusters=None, temperature=100.0, **config, dataset=dataset)
    return {"model": model, "args": config, "iteration": checkpoint.get("epoch", 0), "class_names": class_names,
            "original": True, "unused": unused}


CLASSIFIERS = ("classifier.", "position_classifier.", "channel_classifier.")  # the tensors of the class list


def model_name(config):
    """ClusterDANet, DANet, ClusterDRANet or DRANet: the model a train.py args dict builds (see build_model)."""
    return ("Cluster" if config["clustering"] else "") + {"danet": "DANet", "dranet": "DRANet"}[config["model"]]


def percent(part, whole):
    """part / whole in percent, never rounded to 100% or 0% when it is neither: 99.96% reads 99.9%."""
    if part in (0, whole):
        return f"{100 * part // whole}%"
    tenths = math.floor(1000 * part / whole)
    return f"{tenths / 10:.1f}%" if tenths else "under 0.1%"


def init_from(model, path, log=None, backbone=None, class_names=None):
    """--init-from: copy into `model` every tensor of checkpoint `path` whose name and shape match, but not the
    clustering state, nor a classifier for other `class_names`. The log says what was loaded, what was not and why."""
    log = log or print0
    checkpoint = load_checkpoint(path)
    source, config = checkpoint["model"], checkpoint["args"]
    file_classes = checkpoint.get("class_names")
    other_classes = (class_names is not None and file_classes is not None and len(file_classes) == len(class_names)
                     and list(file_classes) != list(class_names))
    state = model.state_dict()  # its tensors share memory with the model's
    fresh = {f"{name}.{b}" for name, m in model.named_modules() if isinstance(m, ClusteringLayer)
             for b, _ in m.named_buffers()}
    loaded, other_shape, absent, renamed_classes = [], [], [], []
    with torch.no_grad():
        for name, tensor in state.items():
            if name in fresh:
                continue
            if name not in source:
                absent.append(name)
            elif source[name].shape != tensor.shape:
                other_shape.append(f"{name} {list(source[name].shape)} -> {list(tensor.shape)}")
            elif other_classes and name.startswith(CLASSIFIERS):
                renamed_classes.append(name)
            else:
                tensor.copy_(source[name])
                loaded.append(name)
    unused = [k for k in source if k not in state] + checkpoint.get("unused", [])
    parameters = dict(model.named_parameters())
    copied = sum(parameters[name].numel() for name in loaded if name in parameters)  # buffers are not parameters
    parts = Counter(name.split(".")[0] for name in loaded)  # backbone, position_branch, ...: tensors loaded
    kind = "the original DANet code's checkpoint" if checkpoint.get("original") else "a train.py checkpoint"
    log(f"init from {path} ({kind}): loaded {len(loaded)} of {len(state)} tensors, "
        f"{percent(copied, sum(p.numel() for p in parameters.values()))} of the model's parameters "
        f"({', '.join(f'{part} {n}' for part, n in parts.items())})")
    this_model = {"model": "dranet" if isinstance(model, DRANet) else "danet", "clustering": bool(fresh)}
    if model_name(config) != model_name(this_model):
        log(f"  the file holds another model, {model_name(config)} (this model is {model_name(this_model)}): only "
            f"the tensors whose names and shapes happen to match were loaded")
    if backbone is not None and config.get("backbone") not in (None, backbone):
        log(f"  the file's backbone is {config['backbone']}, this model's {backbone}: only the tensors whose names "
            f"and shapes happen to match were loaded")
    if other_classes:
        differ = [f"{i} {a!r} -> {b!r}" for i, (a, b) in enumerate(zip(file_classes, class_names)) if a != b]
        log(f"  the file's classes differ from the dataset's (class {first_few(differ)}): the classifiers start fresh")
    for label, names in (("kept fresh (clustering)", sorted(fresh)),
                         ("skipped, other shape (file -> model)", other_shape),
                         ("skipped, other classes", renamed_classes),
                         ("skipped, not in the file", absent), ("unused from the file", unused)):
        if names:
            log(f"  {label} {len(names)}: {first_few(names)}")
    return checkpoint


def load_model_state(model, checkpoint, path):
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"checkpoint {path} is for another model ({first})") from None


# A resumed run is the same run: these flags must be the checkpoint's. {flag: what a resumed run keeps}.
RESUME_MUST_MATCH = {key: kept for kept, keys in (
    ("data", "dataset train_split val_split demo_images crop_size base_size seed"),
    ("model", "model backbone deep_stem num_clusters temperature clustering cluster_init cluster_reseed multi_grid"),
    ("loss", "aux_weight"), ("numerics", "precision"), ("schedule", "iters lr momentum weight_decay"))
    for key in keys.split()}
# These may change: where and how fast the run goes, what it logs (the data position counts images, whatever the
# batch), and --attention, the same attention by another path.
RESUME_MAY_CHANGE = ("device", "workers", "batch_size", "compile", "log_every", "val_every", "out_dir", "data_root",
                     "attention")
RESUME_KEEPS = ("pretrained", "init_from")  # a new run's first weights: a resumed run records the checkpoint's


def flag_text(key, value):
    """How a command line says `key` = `value`: "with --lr 0.01", "with --multi-grid", "without --multi-grid", ..."""
    flag = "--" + key.replace("_", "-")
    if key == "dataset" and value == "demo":
        return "on the demo data (no --dataset, no --data-root)"
    if key == "clustering":
        return "with --clustering" if value else "with --no-clustering"
    if value is None:
        return f"with the default {flag}"
    if isinstance(value, bool):
        return f"with {flag}" if value else f"without {flag}"
    return f"with {flag} {value}"


def load_resume_checkpoint(args):
    """The --resume checkpoint; a UserError names the first flag of RESUME_MUST_MATCH that differs from its own."""
    checkpoint = load_checkpoint(args.resume)
    missing = {"optimizer", "scheduler", "scaler", "best_miou"} - checkpoint.keys()
    if missing:
        hint = "; to start from its weights use --init-from" if checkpoint.get("original") else ""
        raise UserError(f"{args.resume} is not a train.py checkpoint to resume from "
                        f"(no {', '.join(sorted(missing))}){hint}")
    stored = checkpoint["args"]
    for key, kept in RESUME_MUST_MATCH.items():
        if key not in stored or key == "demo_images" and stored.get("dataset", "demo") != "demo":
            continue  # a flag the checkpoint does not record (load_state_dict checks its model); the demo's size
        if stored[key] != getattr(args, key):
            text = flag_text(key, stored[key])
            what = "continues its schedule" if kept == "schedule" else f"keeps its {kept}"
            raise UserError(f"checkpoint {args.resume} was trained {text}: resume {text} (a resumed run {what})")
    return checkpoint


def check_classes(path, num_classes, stored_names, class_names, hint=""):
    """A UserError unless checkpoint `path`'s `num_classes` classes named `stored_names` (None: by number only) are
    the dataset's `class_names` in the same order; `hint` (what to do instead) ends the message."""
    if num_classes is not None and num_classes != len(class_names):
        raise UserError(f"checkpoint {path} predicts {num_classes} classes, the dataset has {len(class_names)}{hint}")
    differ = [f"class {i} is {ours!r} in the checkpoint, {theirs!r} in the dataset"
              for i, (ours, theirs) in enumerate(zip(stored_names or (), class_names)) if ours != theirs]
    if differ:
        raise UserError(f"checkpoint {path} was trained on other classes than the dataset's: "
                        f"{differ[0]}{and_more(len(differ) - 1)}{hint}")


# ---- 4c what keeps a run safe ----------------------------------------------------------------------------------------

class UserError(Exception):
    """Something the user can fix (a path, a file, a flag): main() prints one line and exits with code 2."""


# Exit codes of train.py and evaluate.py (the README and --help list them the same way).
EXIT_DIVERGED, EXIT_USER_ERROR, EXIT_DISK_FULL, EXIT_OUT_OF_MEMORY, EXIT_DATA_ERROR = 1, 2, 3, 4, 5
EXIT_BUG = 70  # an unexpected exception (sysexits' EX_SOFTWARE): Python's own exit code for it, 1, means diverged


class RunError(Exception):
    """An error that ends the work after it started: one line saying what was kept, and the exit code `code`."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def error_line(error):
    """The one line of a UserError, also of one that a DataLoader worker re-raised with its traceback."""
    return str(error).strip().splitlines()[-1].split("UserError: ", 1)[-1]


def run_main(main):
    """Run main() as a command: its errors end in one line and their exit code, any other exception is a bug."""
    def on_signal(signum, frame):
        raise KeyboardInterrupt(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    rank, code = int(os.environ.get("RANK", 0)), None
    try:
        code = main()
    except UserError as e:
        this_rank = getattr(e, "this_rank", False) or "DataLoader worker" in str(e)  # a file of this rank's share
        if rank == 0 or this_rank:  # under torchrun: said once, by rank 0, unless only this rank found it
            print(f"error: {error_line(e)}", file=sys.stderr)
        code = EXIT_USER_ERROR
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        code = e.code
    except KeyboardInterrupt as e:
        signum = e.args[0] if e.args else signal.SIGINT
        print(f"interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        code = 128 + signum
    except Exception as e:
        traceback.print_exc()
        print(f"error: unexpected {type(e).__name__} (a bug: please report it with the traceback above)",
              file=sys.stderr)
        code = EXIT_BUG
    finally:
        # Under torchrun a failing process ignores signals until it has exited: torchrun's SIGTERM, sent as soon as
        # one process has exited, would cut the others' exit short (see Interrupts.close)
        ending = code and "WORLD_SIZE" in os.environ
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_IGN if ending else handler)
    if code:
        sys.exit(code)


class Interrupts:
    """Ctrl-C and SIGTERM while training: the first asks the loop to stop after the step in flight, save last.pt and
    exit with 128 + the signal; a second stops at once (stop_at_once). Under torchrun the processes stop together."""

    def __init__(self, message=None):
        self.message, self.signum, self.pid = message, None, os.getpid()
        self.signalled_rank, self.others_signum = None, None  # set by agree in a process that received no signal

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if os.getpid() != self.pid:  # a DataLoader worker, forked with this handler: the main process decides
            return
        first, self.signum = self.signum is None, signum
        if not first:
            raise KeyboardInterrupt
        if self.message:
            print(f"\n{self.name}: {self.message}", file=sys.stderr, flush=True)

    @property
    def requested(self):
        return self.signum is not None

    def agree(self, device):
        """Every process calls it as they stop: one that received no signal stops for the first one that did."""
        signals = each_rank(self.signum or 0, device)  # the signal number of each rank, 0 where none came
        if self.signum is None:
            self.signalled_rank = next((rank for rank, signum in enumerate(signals) if signum), None)
            self.others_signum = signals[self.signalled_rank] if self.signalled_rank is not None else None

    def close(self):
        """Ignore signals from now on: the SIGTERM torchrun sends as one process exits must not cut the others short."""
        for s in self.previous:
            signal.signal(s, signal.SIG_IGN)
        self.previous = {}

    @property
    def stop_signum(self):
        """The signal this process stops for: its own, or the one another process received (agree)."""
        return self.signum or self.others_signum or signal.SIGINT

    @property
    def name(self):
        return signal.Signals(self.stop_signum).name

    @property
    def exit_code(self):
        return 128 + self.stop_signum


def each_rank(value, device):
    """[`value` of rank 0, of rank 1, ...] (whole numbers): one all_reduce under torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=device)
    values[dist.get_rank()] = value
    dist.all_reduce(values)
    return values.tolist()


def any_rank(flag, device):
    """`flag` or-ed over the processes."""
    return any(each_rank(int(bool(flag)), device))


def print0(*args, **kwargs):
    """print, by process 0 only: what a run says, it says once."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs)


def interrupt_message(run):
    """What the first Ctrl-C or SIGTERM says (process 0)."""
    together = " and, with the other processes, the steps up to the next log step" if run.world_size > 1 else ""
    return (f"finishing the step in flight{together}, then saving last.pt (a validation in progress is abandoned); "
            f"send it again to stop at once") if run.master else None


def stop_requested(run, interrupts, log_step):
    """Whether a signal asks the loop to stop: one process after every step; under DDP at log steps, on any process
    (a collective every step would sync each one)."""
    if run.world_size == 1:
        return bool(interrupts.requested)
    return log_step and any_rank(interrupts.requested, run.device)


@contextmanager
def in_flight(run, what):
    """Mark the block as `what` a second signal would cut short ("stopped while saving"): stop_at_once saves nothing."""
    run.in_flight = what
    yield
    run.in_flight = None


def tensors_are_finite(model):
    """True if every floating-point parameter and buffer of `model` is finite."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([t.isfinite().all() for t in tensors]).all())


def weights_are_finite(run):
    """tensors_are_finite(run.raw_model) on every process."""
    return not any_rank(not tensors_are_finite(run.raw_model), run.device)


def is_out_of_memory(error):
    """Whether `error` means the memory ran out (on the GPU, in Python or in PyTorch's CPU allocator)."""
    return isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and "DefaultCPUAllocator" in str(error))


def folder_runs(out_dir):
    """{file: (run id, iteration)} for last.pt, best.pt and log.jsonl in out_dir (memory-mapped: reads only those)."""
    out_dir, found = Path(out_dir), {}
    for name in ("last.pt", "best.pt"):
        if (out_dir / name).is_file():
            try:
                checkpoint = torch.load(out_dir / name, map_location="cpu", weights_only=True, mmap=True)
                found[name] = (checkpoint.get("run_id"), checkpoint.get("iteration"))
            except Exception:  # truncated, foreign: another run's file
                found[name] = ("unreadable", None)
    if (out_dir / "log.jsonl").is_file():
        try:
            with open(out_dir / "log.jsonl") as log_file:
                first = json.loads(log_file.readline())
            found["log.jsonl"] = (first.get("run_id") if isinstance(first, dict) else None, None)
        except (OSError, ValueError):  # empty, or not JSON: a log without a run id
            found["log.jsonl"] = (None, None)
    return found


RUN_FILES = ("last.pt", "best.pt", "log.jsonl", "train.lock")  # what a run writes in --out-dir (FolderLock.NAME)


def check_run_outputs(args, datasets=()):
    """Before any work: the files a run writes (RUN_FILES) are files or not there yet, none of them is a file the run
    reads (--init-from, --resume, the `datasets`), and --out-dir is in no dataset folder (check_apart)."""
    out_dir = Path(args.out_dir)
    for name in RUN_FILES:
        path = out_dir / name
        if (path.exists() or path.is_symlink()) and not path.is_file():
            kind = "a broken link" if not path.exists() else "a folder" if path.is_dir() else "a special file"
            raise UserError(f"--out-dir {out_dir} holds {path}, which is {kind}, not a file: the run writes its "
                            f"{name} there; move it away or choose another --out-dir")
    resumed = os.path.realpath(args.resume) if args.resume else None
    outputs = [(out_dir / name, f"--out-dir {out_dir}: writing {out_dir / name}", "--out-dir") for name in RUN_FILES
               if os.path.realpath(out_dir / name) != resumed]  # a resumed checkpoint is the run's own to replace
    inputs = [(path, f"the {flag} file") for flag, path in (("--resume", args.resume), ("--init-from", args.init_from))
              if path]
    files, folders = dataset_inputs(datasets)
    check_apart(outputs, inputs + files, folders, [(out_dir, f"--out-dir {out_dir}", "--out-dir")])


def take_out_dir(args, checkpoint, device):
    """Take the run folder before any other work (process 0): writable, created, locked, and this run's."""
    out_dir = Path(args.out_dir)  # a new run's id: when it started (UTC), and 6 random hex digits
    run_id = (checkpoint or {}).get("run_id") or time.strftime("%Y%m%d-%H%M%S-", time.gmtime()) + os.urandom(3).hex()
    taken, refused = SimpleNamespace(run_id=run_id, lock=None, created=[], earlier={}), None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            check_writable(out_dir, "--out-dir")
            check_run_outputs(args)  # the checkpoints it reads; build_datasets checks the data
            taken.created = create_folders(out_dir)
            taken.lock = FolderLock(out_dir, run_id)
            taken.earlier = check_earlier_run(args, checkpoint, folder_runs(out_dir))
        except UserError as e:
            refused = e
    if any_rank(refused is not None, device):
        if taken.lock is not None:
            taken.lock.release()
        remove_created(taken.created)
        raise refused or UserError(f"process 0 could not take --out-dir {out_dir}")
    return taken


def check_earlier_run(args, checkpoint, found):
    """`found` if the run may write there: a new run a folder without an earlier run, a resumed one its own files."""
    out_dir = Path(args.out_dir)
    if not found or args.overwrite:
        return found
    if checkpoint is None:
        files = " and ".join(name for name in ("last.pt", "best.pt") if name in found)
        what = f"{files} of an earlier run" if files else "the log.jsonl of an earlier run (which saved no checkpoint)"
        resume = f"continue it with --resume {out_dir / 'last.pt'}, " if "last.pt" in found else ""
        raise UserError(f"--out-dir {out_dir} holds {what}: {resume}choose another --out-dir, or give --overwrite to "
                        f"replace it")
    run_id = checkpoint.get("run_id")
    own_folder = out_dir.resolve() == Path(args.resume).resolve().parent
    for name, (other, iteration) in found.items():
        same = own_folder if other is None or run_id is None else other == run_id  # no ids: its own folder only
        if not same:
            raise UserError(f"--out-dir {out_dir} holds the {name} of another run (run {other}) than {args.resume} "
                            f"(run {run_id}): give the resumed run an --out-dir of its own")
        if name == "last.pt" and iteration is not None and iteration > checkpoint["iteration"]:
            raise UserError(f"--out-dir {out_dir} holds a later last.pt of this run (iteration {iteration}; "
                            f"{args.resume} is from iteration {checkpoint['iteration']}): resume from "
                            f"{out_dir / 'last.pt'}, or give another --out-dir")
    return found


class FolderLock:
    """OUT_DIR/train.lock, held with fcntl.flock: the OS releases it however the process ends, also SIGKILL. The file
    names its holder and is removed when the holder ends. Without fcntl (Windows) folders are not locked."""

    NAME = "train.lock"

    def __init__(self, out_dir, run_id):
        self.path, self.fd = Path(out_dir) / self.NAME, None
        if fcntl is None:
            return
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            for _ in range(20):  # a holder that is ending unlocks it in a moment (release)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    time.sleep(0.01)
            else:  # held by a live process
                os.close(fd)
                raise UserError(f"--out-dir {out_dir} is in use by another training ({self.holder()}): wait for it "
                                f"to end, or choose another --out-dir")
            locked = os.fstat(fd)
            if file_identity(self.path) == (locked.st_dev, locked.st_ino):  # else its holder removed it as it ended
                self.fd = fd
            else:
                os.close(fd)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "run_id": run_id}
        os.ftruncate(self.fd, 0)
        os.write(self.fd, (json.dumps(holder) + "\n").encode())

    def holder(self):
        try:
            holder = json.loads(self.path.read_text())
            return f"run {holder['run_id']}, pid {holder['pid']} on {holder['host']}, started {holder['started']}"
        except (OSError, ValueError, KeyError, TypeError):  # being written at this very moment
            return "its lock file names no holder yet"

    def release(self):
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still held: no one can lock this file after us
            fcntl.flock(self.fd, fcntl.LOCK_UN)  # also for DataLoader workers that share the descriptor
            os.close(self.fd)
            self.fd = None


def create_folders(path):
    """Create the folder `path` and the missing folders above it; returns those this call created, deepest first."""
    path, created = Path(path), []
    for folder in reversed([folder for folder in (path, *path.parents) if not folder.exists()]):
        try:
            folder.mkdir()
            created.insert(0, folder)
        except FileExistsError:
            pass
    return created


def remove_created(folders):
    """Remove `folders` (create_folders' list) while they are empty: one holding anything stays, and those above."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def start_log(run):
    """Begin the log with what this run is (a line that waits for the next), and say what is about to run."""
    if not run.master:
        return
    record = {"run_id": run.run_id, "start": "resumed" if run.args.resume else "new",
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if run.args.resume:
        record.update({"from": str(run.args.resume), "from_iteration": run.iteration})
    elif run.earlier:  # --overwrite: what the earlier run was
        last = run.earlier.get("last.pt", run.earlier.get("best.pt", (None, None)))
        record["overwriting"] = {"run_id": last[0] or run.earlier.get("log.jsonl", (None,))[0],
                                 "files": sorted(run.earlier), "iteration": last[1]}
    log(run, record, defer=True)
    print(f"training {model_name(vars(run.args))} ({run.args.backbone}) on {type(run.train_set).__name__} "
          f"{len(run.train_set)} images, {run.world_size} process(es) on {run.device.type}, {run.args.precision}, "
          f"{run.args.iters} iterations from {run.iteration}, run {run.run_id} in {run.out_dir}", flush=True)


def temporary_path(path):
    """A hidden temporary name beside `path`, this process's and thread's alone, also across machines."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_native_id()}.{os.urandom(3).hex()}.tmp")


def check_writable(path, what, folder=True):
    """A UserError unless `path` (a folder, or a file) can be written: by a file created and removed in the nearest
    existing folder (os.access says yes to root for /proc)."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise UserError(f"{what} {path} is {'a file' if folder else 'a folder'}")
    parent = path if path.is_dir() else path.parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        kind = "a broken link" if parent.is_symlink() and not parent.exists() else "a file"
        raise UserError(f"{what} {path} cannot be created: {parent} is {kind}")
    probe = temporary_path(parent / "write-check")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        probe.unlink()
    except OSError as e:
        reason = f"{parent} is read-only" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else \
            f"no file can be created in {parent} ({e.strerror})"
        raise UserError(f"{what} {path} cannot be written: {reason}") from None


def file_identity(path):
    """(device, inode) of the file `path` names, through links and `..`; None where there is none."""
    try:
        status = os.stat(path)
    except (OSError, ValueError):
        return None
    return status.st_dev, status.st_ino


def check_apart(outputs, inputs, input_folders=(), output_folders=()):
    """Before any work, a UserError if one of the `outputs` (file, description, flag) is one of the `inputs` (file,
    description), also through a link, or one of the `output_folders` is or is inside one of the `input_folders`."""
    written = {file_identity(path): (description, flag) for path, description, flag in reversed(outputs)}
    written.pop(None, None)  # a file not there yet is none of the inputs
    for path, what in inputs if written else ():
        if (identity := file_identity(path)) in written:
            description, flag = written[identity]
            raise UserError(f"{description} would overwrite {what} {path}: nothing was written; choose another {flag}")
    folders = {os.path.realpath(folder): (folder, what) for folder, what in reversed(input_folders)}
    for folder, description, flag in output_folders:
        real = Path(os.path.realpath(folder))
        for candidate in (real, *real.parents):
            if str(candidate) in folders:
                inside, what = folders[str(candidate)]
                where = "is" if candidate == real else "is inside"
                raise UserError(f"{description} {where} {what} {inside}: nothing was written; choose another {flag}")


def dataset_inputs(datasets):
    """What `datasets` read, for check_apart: their files, and the folders of their images and masks."""
    files, folders = [], []
    for dataset in datasets:
        for kind, paths in (("image", getattr(dataset, "images", ())), ("mask", getattr(dataset, "masks", ()))):
            files += [(path, f"a{'n' if kind == 'image' else ''} {kind} of the dataset") for path in paths]
            parents = {os.path.dirname(path) for path in paths}
            if parents:
                parents.add(os.path.commonpath(sorted(parents)))
            folders += [(parent, f"the dataset's {kind} folder") for parent in sorted(parents)]
        files += [(path, "a file of the dataset") for path in getattr(dataset, "text_files", ())]
    return files, folders


def log(run, record, text=None, defer=False):
    """Print `text` and append `record` to log.jsonl (rank 0); a `defer`red line waits for the next (see save)."""
    if not run.master:
        return
    if text:
        print(text, flush=True)
    strict = json.loads(json.dumps(record), parse_constant=lambda constant: None)  # nan and inf: null
    run.unwritten_log.append(json.dumps(strict, allow_nan=False) + "\n")
    if not (defer or run.earlier_run_kept):
        path = run.out_dir / "log.jsonl"
        try:
            with open(path, "a") as log_file:
                log_file.write("".join(run.unwritten_log))
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise RunError(f"no space left on the device while writing {path}: {checkpoint_kept(run)}; free "
                           f"some space", EXIT_DISK_FULL) from None
        run.unwritten_log = []


def save(run, name):
    """The run's state as out_dir/name (rank 0); the first save of an --overwrite run replaces the earlier run."""
    if run.master:
        with in_flight(run, "stopped while saving"):
            path = run.out_dir / name
            try:
                save_checkpoint({"model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict(),
                                 "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
                                 "iteration": run.iteration, "best_miou": run.best_miou, "args": run.config,
                                 "class_names": run.class_names, "epoch": run.epoch, "epoch_images": run.epoch_images,
                                 "run_id": run.run_id}, path)
            except RunError as e:
                kept = f"the previous {name} is kept, " if name != "last.pt" and path.is_file() else ""
                saved = run.saved_iteration is not None
                resume = f", then continue with --resume {run.out_dir / 'last.pt'}" if saved else ""
                raise RunError(f"no space left on the device while writing {path}: {kept}{checkpoint_kept(run)}; "
                               f"free some space{resume}", e.code) from None
            if run.earlier_run_kept:
                for other in sorted({"last.pt", "best.pt"} - {name}):
                    (run.out_dir / other).unlink(missing_ok=True)
                save_atomic(run.out_dir / "log.jsonl", lambda tmp: tmp.write_text("".join(run.unwritten_log)))
                run.unwritten_log, run.earlier_run_kept = [], False
    if name == "last.pt":
        run.saved_iteration = run.iteration


def resume_from(run):
    """The checkpoint to continue this run from: its last.pt, else the one it resumed from, else None."""
    if run.saved_iteration is not None:
        return run.out_dir / "last.pt"
    return Path(run.args.resume) if run.args.resume else None


def latest_checkpoint(run):
    """What messages say of resume_from(run)."""
    path = resume_from(run)
    if path is None:
        return "this run has saved no checkpoint"
    if run.saved_iteration is None:
        return f"the latest checkpoint is {path} from iteration {run.start_iteration} (resumed from; none saved since)"
    return f"the latest checkpoint is {path} from iteration {run.saved_iteration}"


def checkpoint_kept(run):
    """What a run that ends with an error keeps: its latest checkpoint, and the earlier run --overwrite spared."""
    earlier = f"; the earlier run in {run.out_dir} is as it was" if run.earlier_run_kept else ""
    return latest_checkpoint(run) + earlier


def save_last(run):
    """Save last.pt unless it is saved already, the weights are not finite, or a signal cut short what run.in_flight
    names; says which: "saved OUT/last.pt at iteration N", or why not and the latest checkpoint."""
    if run.saved_iteration != run.iteration:
        why = run.in_flight or (None if tensors_are_finite(run.raw_model) else "the weights are not finite")
        if why:
            return f"last.pt not saved ({why}); {latest_checkpoint(run)}"
        save(run, "last.pt")
    return f"saved {run.out_dir / 'last.pt'} at iteration {run.iteration}"


def checkpoints_text(run):
    """What the run folder holds of this run ("last.pt and best.pt in runs/x"), and where the best is if elsewhere."""
    files = [] if run.earlier_run_kept else [name for name in ("last.pt", "best.pt") if (run.out_dir / name).is_file()]
    here = f"{' and '.join(files)} in {run.out_dir}" if files else checkpoint_kept(run)
    if run.best_miou is None:
        return f"no validation has run; {here}"
    if "best.pt" in files:
        return f"best val mIoU {run.best_miou:.4f}; {here}"
    if not run.args.resume:
        where = f"is not on disk: there is no {run.out_dir / 'best.pt'}"  # removed since it was saved
    elif (Path(run.args.resume).parent / "best.pt").is_file():
        where = f"is {Path(run.args.resume).parent / 'best.pt'}"  # the folder of the run resumed
    else:
        where = f"was saved by the run that {run.args.resume} continues, and there is no best.pt next to it"
    return f"{here}; the best, val mIoU {run.best_miou:.4f}, {where}"


def finish(run, status, interrupts):
    """Say how the run ended, saving last.pt after an interrupt; returns the exit code."""
    if status == "interrupted" and not weights_are_finite(run):
        status = "diverged"
    if status == "diverged":
        log(run, {"iteration": run.iteration, "diverged": True})
        print0(f"error: training diverged (the loss or the weights became nan or infinite by iteration "
               f"{run.iteration}): stopped without saving, {checkpoint_kept(run)}; try a lower --lr than "
               f"{run.args.lr:g}", file=sys.stderr)
        return EXIT_DIVERGED
    if status == "interrupted":
        interrupts.agree(run.device)
        record, said = {"iteration": run.iteration, "interrupted": interrupts.name}, interrupts.name
        if interrupts.signalled_rank is not None:  # stopped for another process
            record["signalled_rank"] = interrupts.signalled_rank
            said = f"another process (rank {interrupts.signalled_rank}) received {interrupts.name}"
        log(run, record, f"{said}: {save_last(run)}; continue with --resume {run.out_dir / 'last.pt'}")
        if run.world_size > 1:
            interrupts.close()
            try:
                dist.barrier()  # no process exits before rank 0 has saved: torchrun would then stop it (see close)
            except RuntimeError:  # rank 0 stopped at once (a second signal while it saved): nothing to wait for
                pass
        return interrupts.exit_code
    print0(f"done: {checkpoints_text(run)}")
    return 0


def data_error(run, error):
    """A bad file: before the first step a user error, after it last.pt is saved first and EXIT_DATA_ERROR."""
    message = error_line(error)
    if run.iteration == run.start_iteration:
        raise UserError(message) from None
    where = "during the validation of" if run.validating else "after"
    outcome = save_last(run)
    log(run, {"iteration": run.iteration, "data_error": message})
    resume = f"; fix the file, then continue with --resume {resume_from(run)}" if resume_from(run) else ""
    raise RunError(f"{message} ({where} iteration {run.iteration}): {outcome}{resume}", EXIT_DATA_ERROR)


def out_of_memory(args, device, run=None):
    """The RunError of running out of memory (nothing saved: the weights may be half-updated): where, what to lower."""
    where, kept = f"out of {'GPU ' if device.type == 'cuda' else ''}memory on {device}", ""
    if run is not None:
        where += (f" during the validation of iteration {run.iteration}" if run.validating else
                  f" in step {run.iteration + 1}")
        kept = f"; {latest_checkpoint(run)}" + (": --resume it with a lower --batch-size (the other flags must stay)"
                                                 if resume_from(run) else "")
    lower = [f"--batch-size (now {args.batch_size})", f"--crop-size (now {args.crop_size})"]
    if args.precision == "fp32":
        lower.append("--precision bf16" + (" (or fp16)" if device.type == "cuda" else ""))
    workers = f"; on the CPU also fewer --workers (now {args.workers})" if device.type == "cpu" and args.workers else ""
    return RunError(f"{where}: lower {', '.join(lower[:-1])} or use {lower[-1]}{workers}{kept}", EXIT_OUT_OF_MEMORY)


def stop_at_once(run, interrupts):
    """After a second signal: save last.pt if the weights are between two steps (no collective)."""
    if run.master:
        try:
            outcome = save_last(run)
        except KeyboardInterrupt:  # a third signal: the save is abandoned, the previous last.pt kept
            outcome = f"last.pt not saved (a third signal cut its save short); {latest_checkpoint(run)}"
        print(f"{interrupts.name} again: stopped at once; {outcome}", file=sys.stderr)
    return interrupts.exit_code


@contextmanager
def run_ending(args, device):
    """How main's work ends if not by itself (a second signal, a bad file, out of memory), and the lock goes."""
    end = SimpleNamespace(folder=None, run=None, interrupts=None, code=None)
    try:
        yield end
        if dist.is_initialized():
            dist.destroy_process_group()
    except KeyboardInterrupt:
        if end.interrupts is None or end.code is not None:
            raise
        with end.interrupts:  # its handlers again: a third signal cuts the save short
            end.code = stop_at_once(end.run, end.interrupts)
    except UserError as e:
        if end.interrupts is None:
            raise
        with end.interrupts:
            data_error(end.run, e)
    except Exception as e:
        if is_out_of_memory(e):
            raise out_of_memory(args, device, end.run) from None
        raise
    finally:
        if end.folder is not None and end.folder.lock is not None:
            end.folder.lock.release()
        if end.folder is not None and (end.run is None or end.run.saved_iteration is None):
            remove_created(end.folder.created)  # a run that saved nothing leaves no empty folder


# ---- 4d the command line and benchmarks ------------------------------------------------------------------------------

ATTENTION_HELP = ("how position attention is computed, the same numbers by each (see README): blocked, heads, dense, "
                  "or auto, the fastest on the device: " + ", ".join(map(" ".join, PositionAttention.FASTEST.items())))


NO_POSITION_ATTENTION = "--attention is DANet's position attention; DRANet's attends to 50 pooled centres"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors end like every other user error: one line, exit code 2."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


INT32_MAX = 2**31 - 1  # the largest whole number a flag takes: it fits every integer type torch indexes with


def whole_number(low, high=INT32_MAX):
    """An argparse type: a whole number in low..high; anything else is one line that says the range."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}")
        if value > high:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high}, got {text!r}")
        return value
    return parse


def real_number(low, high=math.inf, low_open=True, high_open=False):
    """An argparse type: a finite number in the range from `low` to `high`, open at either end or not."""
    wanted = f"a number {'>' if low_open else '>='} {low:g}" + \
        (f" and {'<' if high_open else '<='} {high:g}" if high < math.inf else "")

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > low if low_open else value >= low)
                and (value < high if high_open else value <= high)):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value
    return parse


positive, non_negative, positive_float = whole_number(1), whole_number(0), real_number(0)  # argparse types
MIN_BASE_SIZE = 16  # --base-size: the random scale's smallest (0.5x) keeps the longer side at 8 pixels
# --num-clusters: the multiple of K each model's attention needs
CLUSTERS_MULTIPLE = {
    "danet": (PositionAttention.REDUCTION, "position attention reads K / 8 query dimensions"),
    "dranet": (math.lcm(CompactChannelAttention.REDUCTION, CompactPositionAttention.REDUCTION),
               "compact channel attention reads K / 16 compact channels, compact position attention K / 4 "
               "query dimensions"),
}
# --deep-stem and --multi-grid: the Bottleneck ResNets (resnet18/34 are made of BasicBlocks)
BOTTLENECK_BACKBONES = tuple(name for name in BACKBONES if name not in ("resnet18", "resnet34"))


def dataset_name(dataset, data_root):
    """The dataset a command line means: --dataset if given, else VOC when --data-root is given, else the demo."""
    return dataset or ("voc" if data_root else "demo")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def d(key):  # the defaults of a flag, dataset by dataset
        return "default: " + ", ".join(f"{name} {recipe[key]}" for name, recipe in RECIPES.items() if key in recipe)

    p.add_argument("--dataset", choices=["voc", "cityscapes", "folder"],
                   help="default: voc with --data-root, else the demo")
    p.add_argument("--data-root", type=os.path.expanduser, help="the dataset's folder (see README); none: the demo")
    p.add_argument("--download", action="store_true", help="download VOC 2012 into --data-root first")
    p.add_argument("--train-split", choices=["train", "trainval", "train_aug"], help=d("train_split"))
    p.add_argument("--val-split", default="val", choices=["val", "train", "trainval"])
    p.add_argument("--model", choices=list(MODELS), default="danet", help="(Cluster)DANet or (Cluster)DRANet")
    p.add_argument("--backbone", choices=BACKBONES, help=d("backbone"))
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, help="ImageNet weights; " + d("pretrained"))
    p.add_argument("--num-clusters", type=whole_number(8, 4096), help="K, the clustering centres, up to 4096: "
                   + ", ".join(f"--model {name} a multiple of {multiple} ({why})"
                               for name, (multiple, why) in CLUSTERS_MULTIPLE.items())
                   + "; default: the branch width (512, or 128 for resnet18/34), which every model takes")
    p.add_argument("--temperature", type=real_number(0, 1e4), default=100.0, help="clustering softmax temperature")
    p.add_argument("--attention", choices=PositionAttention.ATTENTIONS, default="auto", help=ATTENTION_HELP)
    p.add_argument("--cluster-init", choices=["random", "data"], default="random", help="clustering centres: "
                   "random unit vectors (the original) or k-means++ on the first batch")
    p.add_argument("--cluster-reseed", type=non_negative, default=0, metavar="N", help="draw again the centres dead "
                   "for N steps in a row; 0: never")
    p.add_argument("--clustering", action=argparse.BooleanOptionalAction, default=True,
                   help="clustering layers before the attention; --no-clustering: plain DANet, the baseline")
    p.add_argument("--multi-grid", action="store_true", help="dilate layer4's blocks 4, 8, 16 as DANet101")
    p.add_argument("--deep-stem", action="store_true", help="three 3x3 convolutions as the stem, as the original "
                   "DRANet101 (no ImageNet weights)")
    p.add_argument("--init-from", type=os.path.expanduser, help="a new run from the weights of this file (a train.py "
                   "checkpoint or the original DANet code's) where names and shapes match")
    p.add_argument("--crop-size", type=whole_number(1, 8192), help=d("crop_size"))
    p.add_argument("--base-size", type=whole_number(MIN_BASE_SIZE, 16384), help="longer side before the 0.5-2x "
                   "random scale, at least 16; " + d("base_size"))
    p.add_argument("--batch-size", type=whole_number(1, 4096), help="per process; " + d("batch_size"))
    p.add_argument("--iters", type=positive, help="optimizer steps; " + d("iters"))
    p.add_argument("--lr", type=positive_float, help="backbone LR (head: 10x); " + d("lr"))
    p.add_argument("--momentum", type=real_number(0, 1, low_open=False, high_open=True), default=0.9)
    p.add_argument("--weight-decay", type=real_number(0, 1, low_open=False, high_open=True), default=1e-4)
    p.add_argument("--aux-weight", type=real_number(0, 1e3, low_open=False), help="weight of the auxiliary losses; "
                   "default: danet 1.0, dranet 0.2")
    p.add_argument("--workers", type=whole_number(0, 256), help="data loading processes; " + d("workers"))
    p.add_argument("--demo-images", type=whole_number(1, 10**6), default=1000, help="size of the demo training set")
    p.add_argument("--out-dir", type=os.path.expanduser, help="the run's folder, one run's; with --resume: the "
                   "checkpoint's folder; " + d("out_dir"))
    p.add_argument("--resume", type=os.path.expanduser, help="a last.pt to continue its run from. These flags may "
                   "differ from the checkpoint's: " + ", ".join("--" + k.replace("_", "-") for k in RESUME_MAY_CHANGE)
                   + "; every other flag must be the same")
    p.add_argument("--overwrite", action="store_true", help="start a new run in an --out-dir that holds an earlier "
                   "one, which its first save replaces")
    p.add_argument("--device", help="cuda, cuda:N or cpu; default: cuda if available")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="default: bf16, else fp16 on GPU; fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--val-every", type=positive, help=d("val_every"))
    p.add_argument("--log-every", type=positive, help=d("log_every"))
    p.add_argument("--seed", type=whole_number(0, 2**32 - 1), default=0)
    p.add_argument("--benchmark", action="store_true", help="time training steps on random tensors and exit")
    p.add_argument("--benchmark-attention", type=whole_number(1, 4096), nargs="+", metavar="SIZE", help="time "
                   "PositionAttention alone by each --attention path on [--batch-size, C, SIZE, SIZE] maps, and exit")
    p.add_argument("--benchmark-channels", type=whole_number(8, 65536), nargs="+", default=[512], metavar="C",
                   help="the channels C of --benchmark-attention; default: 512")
    p.add_argument("--benchmark-steps", type=whole_number(1, 10**6), help="timed steps of --benchmark (default 10), "
                   "or repeats of each path of --benchmark-attention (default 3)")
    args = p.parse_args(argv)
    dataset, benchmarking = dataset_name(args.dataset, args.data_root), args.benchmark or args.benchmark_attention
    backbone = args.backbone or RECIPES[dataset]["backbone"]
    multiple, why = CLUSTERS_MULTIPLE[args.model]
    for wrong, message in (  # the rules across flags: the first one broken is the error
            (args.resume and args.overwrite,
             "--resume continues the run in --out-dir and --overwrite starts a new one: give only one"),
            (not args.clustering and (args.num_clusters is not None or args.cluster_init != "random"
                                      or args.cluster_reseed),
             "--num-clusters, --cluster-init and --cluster-reseed set the clustering layers, which --no-clustering "
             "leaves out"),
            (args.num_clusters is not None and args.num_clusters % multiple,
             f"argument --num-clusters: --model {args.model} needs a multiple of {multiple} ({why}), got "
             f"{args.num_clusters}"),
            (args.init_from and args.resume,
             "--init-from starts a new run from weights, --resume continues a run: give only one"),
            (args.model == "dranet" and args.attention != "auto", NO_POSITION_ATTENTION),
            (args.benchmark and args.benchmark_attention,
             "--benchmark times training steps, --benchmark-attention the position attention alone: give only one"),
            (any(c % PositionAttention.REDUCTION for c in args.benchmark_channels),
             f"argument --benchmark-channels: expected multiples of {PositionAttention.REDUCTION}, got "
             f"{' '.join(map(str, args.benchmark_channels))}"),
            (args.dataset and not args.data_root and not benchmarking,
             f"--dataset {args.dataset} needs --data-root (see README)"),
            (args.download and dataset != "voc",
             f"--download fetches VOC only; put the {dataset} data in place by hand (see README)"),
            (args.deep_stem and args.pretrained,
             "--deep-stem has no ImageNet weights here: leave out --pretrained (or start from a file: --init-from)"),
            *(((wanted and backbone not in BOTTLENECK_BACKBONES),
               f"{flag} needs a Bottleneck ResNet (--backbone {', '.join(BOTTLENECK_BACKBONES)}), not {backbone}"
               + ("" if args.backbone else f" (the {dataset}'s default)"))
              for flag, wanted in (("--multi-grid", args.multi_grid), ("--deep-stem", args.deep_stem)))):
        if wrong:  # a message that points to the README needs no --help
            raise UserError(message if message.endswith("(see README)") else f"{message} (see --help)")
    args.dataset = dataset
    defaults = {**RECIPES[dataset], "benchmark_steps": 3 if args.benchmark_attention else 10,
                "aux_weight": {"danet": 1.0, "dranet": 0.2}[args.model]}  # the original code's aux weights
    if args.resume:  # a resumed run continues in its checkpoint's folder
        defaults["out_dir"] = os.path.dirname(args.resume) or "."
    if args.deep_stem:  # there are no ImageNet weights for the deep stem
        defaults["pretrained"] = False
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def benchmark(args, checkpoint, device, world_size, autocast):
    """Time training steps on random tensors: no dataset, no data loading."""
    args.num_classes = len(VOC_CLASSES)
    model, _, optimizer, _, scaler = build_model_and_optimizer(args, checkpoint, device, world_size)
    model.train()
    images = torch.randn(args.batch_size, 3, args.crop_size, args.crop_size, device=device)
    images = images.to(memory_format=torch.channels_last)
    masks = torch.randint(0, args.num_classes, (args.batch_size, args.crop_size, args.crop_size), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):  # warm-up: cudnn.benchmark, torch.compile, allocator
        train_step(model, images, masks, optimizer, scaler, autocast, args.aux_weight)
    sync()
    start = time.perf_counter()
    for _ in range(args.benchmark_steps):
        train_step(model, images, masks, optimizer, scaler, autocast, args.aux_weight)
    sync()
    ms = (time.perf_counter() - start) / args.benchmark_steps * 1000
    attention = "compact" if args.model == "dranet" else PositionAttention.resolve(args.attention, device.type)
    name = "dranet " if args.model == "dranet" else ""
    print0(f"benchmark {name}{args.backbone} crop {args.crop_size} batch {args.batch_size} {args.precision} "
           f"{device.type} {attention} attention: {ms:.1f} ms/step, {args.batch_size * 1000 / ms:.2f} images/s, "
           f"peak memory {peak_memory_gib(device):.2f} GiB")


class TensorMemory(TorchDispatchMode):
    """Inside it, the peak bytes of the tensors created there and alive at once (`peak`), tracked by their storage
    until it is freed: what autograd saves counts, a kernel's own scratch memory does not."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = {}, 0  # {data_ptr: (StorageWeakRef, bytes)}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        self.live = {ptr: (ref, size) for ptr, (ref, size) in self.live.items() if not ref.expired()}
        for t in torch.utils._pytree.tree_leaves(result):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                self.live.setdefault(storage.data_ptr(), (StorageWeakRef(storage), storage.nbytes()))
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return result


def peak_extra_memory(step, device):
    """The peak bytes step() allocates beyond what was allocated before it (on the CPU: TensorMemory)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with TensorMemory() as memory:
        step()
    return memory.peak


def benchmark_attention(args, device, autocast):
    """Time PositionAttention alone, forward + backward, by each path on random maps (the paths interleaved, the best
    of --benchmark-steps), and its peak extra memory: a Markdown table."""
    paths = [path for path in PositionAttention.ATTENTIONS if path != "auto"]
    auto = PositionAttention.resolve("auto", device.type)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"benchmark attention: PositionAttention forward + backward, {device.type} {args.precision}{threads}, "
          f"best of {args.benchmark_steps}; auto = {auto} here; time, peak extra memory")
    print("| input [B, C, H, W] | " + " | ".join(paths) + f" | {auto} (auto) / dense |")
    print("| --- " * (len(paths) + 2) + "|")
    for channels in args.benchmark_channels:
        for size in args.benchmark_attention:
            torch.manual_seed(0)
            module = PositionAttention(channels).to(device)
            module.gamma.data.fill_(0.5)
            x = torch.randn(args.batch_size, channels, size, size, device=device).to(memory_format=torch.channels_last)
            x.requires_grad_()
            weights = torch.randn(x.shape, device=device)  # the loss sum(y * weights): a gradient of every element

            def step():
                with autocast():
                    y = module(x)
                torch.autograd.grad((y.float() * weights).sum(), [x, *module.parameters()])

            seconds, memory = {}, {}
            for path in paths:  # a warm-up step each, which also measures the memory
                module.attention = path
                try:
                    memory[path] = peak_extra_memory(step, device)
                    seconds[path] = math.inf
                except Exception as e:
                    if not is_out_of_memory(e):
                        raise
            for _ in range(args.benchmark_steps):
                for path in list(seconds):
                    module.attention = path
                    sync()
                    start = time.perf_counter()
                    step()
                    sync()
                    seconds[path] = min(seconds[path], time.perf_counter() - start)
            cells = [f"{seconds[p] * 1000:.0f} ms, {memory[p] / 2**20:.0f} MiB" if p in seconds else "out of memory"
                     for p in paths]
            ratio = (f"{seconds[auto] / seconds['dense']:.2f}x time, {memory[auto] / memory['dense']:.3f}x memory"
                     if auto in seconds and "dense" in seconds else "")
            print(f"| [{args.batch_size}, {channels}, {size}, {size}] | " + " | ".join(cells) + f" | {ratio} |",
                  flush=True)
            del module, x, weights


if __name__ == "__main__":
    run_main(main)
