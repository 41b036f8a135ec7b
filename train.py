"""Train ClusterDANet on PASCAL VOC 2012, or on a built-in synthetic dataset (the demo).

    python train.py                                                    # demo: synthetic shapes, no download
    python train.py --data-root data --train-split train_aug           # VOC 2012, one GPU
    torchrun --standalone --nproc_per_node=8 train.py --data-root data --train-split train_aug --batch-size 2
    python train.py --benchmark --backbone resnet50 --crop-size 256 --batch-size 2 --device cpu

This file also holds what evaluate.py builds on: the datasets, the one mIoU metric (a confusion matrix),
whole-image prediction, and checkpoint loading. Errors a user can fix end in one line and exit code 2.
"""

import argparse
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from clusterdanet import BACKBONES, OUTPUT_STRIDE, ClusterDANet

try:
    import resource  # Unix only: the peak memory of a CPU run
except ImportError:
    resource = None

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
SHAPE_CLASSES = ("background", "disc", "square", "triangle")
IGNORE_INDEX = 255  # VOC's "void" label: object borders and ambiguous pixels, ignored by loss and metric
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics


class UserError(Exception):
    """Something the user can fix (a path, a file, a flag): main() prints one line and exits with code 2."""


def run_main(main):
    """Run main(); a UserError (also one raised in a DataLoader worker) becomes one line and exit code 2."""
    try:
        main()
    except UserError as e:
        message = str(e).strip().splitlines()[-1]  # a DataLoader worker re-raises it with its traceback
        print(f"error: {message.split('UserError: ', 1)[-1]}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- data

def find_voc_root(data_root):
    """The VOC2012 folder: data_root itself or data_root/VOCdevkit/VOC2012."""
    root = Path(data_root)
    if not root.is_dir():
        raise UserError(f"data root {root} does not exist (download VOC with --download, see README)")
    for candidate in (root, root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir() and (candidate / "ImageSets" / "Segmentation").is_dir():
            return candidate
    raise UserError(f"{root} is neither a VOC2012 folder (with JPEGImages/ and ImageSets/Segmentation/) "
                    f"nor a folder holding VOCdevkit/VOC2012")


def download_voc(data_root):
    try:
        torchvision.datasets.VOCSegmentation(data_root, year="2012", image_set="trainval", download=True)
    except OSError as e:  # URLError and socket errors included
        raise UserError(f"could not download VOC 2012 into {data_root} ({e}); download VOCtrainval_11-May-2012.tar "
                        f"by hand and extract it there") from None


def train_transform(crop_size, base_size):
    """DANet's augmentation: longer side scaled to base_size x U(0.5, 2), pad, random crop, flip, normalise."""
    return v2.Compose([
        v2.ScaleJitter((base_size, base_size), scale_range=(0.5, 2.0)),  # masks are resized with nearest
        v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
        v2.RandomHorizontalFlip(),
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
        v2.Normalize(MEAN, STD),
        v2.ToPureTensor(),
    ])


def eval_transform():
    return v2.Compose([
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
        v2.Normalize(MEAN, STD),
        v2.ToPureTensor(),
    ])


def read_image(path):
    """[3, H, W] uint8 tv_tensors.Image; an unreadable file is a UserError that names it."""
    try:
        with Image.open(path) as image:
            return tv_tensors.Image(np.array(image.convert("RGB")).transpose(2, 0, 1))  # [H, W, 3] -> [3, H, W]
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None


class VOCSegmentation(Dataset):
    """PASCAL VOC 2012 segmentation: (image [3, H, W], mask [H, W]) after `transform`; mask values 0..20 and 255.

    Splits: train (1,464), val (1,449), trainval from SegmentationClass/, and train_aug (10,582: VOC train
    plus SBD, without VOC val) from SegmentationClassAug/ and ImageSets/Segmentation/train_aug.txt.
    """

    def __init__(self, data_root, split="train", transform=None):
        self.root = find_voc_root(data_root)
        split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        mask_dir = self.root / ("SegmentationClassAug" if split == "train_aug" else "SegmentationClass")
        if not split_file.is_file():
            hint = " (train_aug comes from SBD: see README)" if split == "train_aug" else ""
            raise UserError(f"split file {split_file} not found{hint}")
        if not mask_dir.is_dir():
            raise UserError(f"mask folder {mask_dir} not found")
        self.ids = split_file.read_text().split()
        if not self.ids:
            raise UserError(f"split file {split_file} lists no images")
        self.images = [self.root / "JPEGImages" / f"{i}.jpg" for i in self.ids]
        self.masks = [mask_dir / f"{i}.png" for i in self.ids]
        self.transform = transform or eval_transform()
        self.class_names = VOC_CLASSES

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        image = read_image(self.images[index])
        try:
            with Image.open(self.masks[index]) as mask:  # palette ("P") or grey ("L") PNG of class indices
                mask = np.array(mask)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read mask {self.masks[index]}: {e}") from None
        bad = np.setdiff1d(np.unique(mask), [*range(len(VOC_CLASSES)), IGNORE_INDEX])
        if mask.ndim != 2 or mask.shape != image.shape[1:] or bad.size:
            raise UserError(f"mask {self.masks[index]} is not a {image.shape[1]}x{image.shape[2]} map of labels "
                            f"0..20 and 255 (found {bad.tolist() or mask.shape})")
        return self.transform(image, tv_tensors.Mask(mask))


class SyntheticShapes(Dataset):
    """A deterministic in-memory dataset for the demo: discs, squares and triangles on a textured background.

    Image `index` is drawn from a generator seeded with (seed, index), so every run sees the same data.
    Each class has its own colour (jittered) on a grey, textured background, so a small network without
    pretrained weights learns it in minutes.
    """

    COLOURS = torch.tensor([[0.0, 0.0, 0.0], [0.9, 0.25, 0.2], [0.2, 0.8, 0.3], [0.25, 0.35, 0.95]])  # [4, 3]

    def __init__(self, length, size=64, seed=0, transform=None):
        self.length, self.size, self.seed = length, size, seed
        self.transform = transform or eval_transform()
        self.class_names = SHAPE_CLASSES

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


def build_datasets(args):
    """(train, val) datasets: VOC when args.data_root is given, else the synthetic demo data."""
    train_tf = train_transform(args.crop_size, args.base_size)
    if args.data_root is None:
        return SyntheticShapes(args.demo_images, args.base_size, 0, train_tf), SyntheticShapes(64, args.base_size, 1)
    if args.download:
        download_voc(args.data_root)
    return (VOCSegmentation(args.data_root, args.train_split, train_tf),
            VOCSegmentation(args.data_root, args.val_split))


def pad_collate(batch):
    """Batch (image, mask) pairs of different sizes: images padded with 0, masks with 255 (ignored).

    Returns images [B, 3, H, W], masks [B, H, W] and each pair's own size [B, 2] (height, width).
    """
    sizes = torch.tensor([image.shape[1:] for image, _ in batch])  # [B, 2]
    H, W = sizes.amax(0).tolist()
    images = torch.stack([F.pad(i, (0, W - i.shape[2], 0, H - i.shape[1])) for i, _ in batch])  # [B, 3, H, W]
    masks = torch.stack([F.pad(m, (0, W - m.shape[1], 0, H - m.shape[0]), value=IGNORE_INDEX)
                         for _, m in batch])  # [B, H, W]
    return images, masks, sizes


# ----------------------------------------------------------------------------- metric and prediction

class ConfusionMatrix:
    """The segmentation metric: a num_classes x num_classes confusion matrix accumulated on the device.

    matrix[t, p] counts pixels of true class t predicted as p; pixels labelled 255 are ignored.
    IoU_c = TP / (TP + FP + FN); mIoU averages over the classes present in ground truth or prediction.
    """

    def __init__(self, num_classes, device="cpu"):
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, prediction, target):
        keep = target != IGNORE_INDEX
        index = target[keep] * self.num_classes + prediction[keep]  # [n_pixels]
        self.matrix += torch.bincount(index, minlength=self.num_classes**2).view(self.num_classes, -1)  # [K, K]

    def all_reduce(self):
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix)

    def compute(self):
        """{"miou", "pixel_accuracy", "iou": [per-class IoU, nan for a class absent from both]}"""
        m = self.matrix.double().cpu()
        tp, true, predicted = m.diag(), m.sum(1), m.sum(0)
        union = true + predicted - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.nan)
        return {
            "miou": iou.nanmean().item() if (union > 0).any() else math.nan,
            "pixel_accuracy": (tp.sum() / m.sum().clamp(min=1)).item(),
            "iou": iou.tolist(),
        }


def predict_logits(model, images):
    """Whole-image prediction at any size (the model pads to its output stride and crops back). [B, K, H, W]"""
    return model(images)["out"].float()  # [B, K, H, W]


@torch.inference_mode()
def evaluate(model, loader, num_classes, device, autocast=nullcontext, predict=predict_logits, on_batch=None):
    """Run `predict` over a pad_collate loader and return the (all-reduced) ConfusionMatrix.

    on_batch(images, masks, logits, sizes), if given, sees every batch (evaluate.py saves pictures there).
    """
    model.eval()
    metric = ConfusionMatrix(num_classes, device)
    for images, masks, sizes in loader:
        images = images.to(device, non_blocking=True)
        with autocast():
            logits = predict(model, images)  # [B, K, H, W]
        metric.update(logits.argmax(1), masks.to(device, non_blocking=True))
        if on_batch is not None:
            on_batch(images, masks, logits, sizes)
    metric.all_reduce()
    return metric


# ----------------------------------------------------------------------------- model and checkpoints

def build_model(config):
    """ClusterDANet from a train.py args dict (as stored in every checkpoint)."""
    pretrained = config.get("pretrained", False)
    try:
        return ClusterDANet(num_classes=config["num_classes"], backbone=config["backbone"],
                            pretrained_backbone=pretrained, num_clusters=config["num_clusters"],
                            temperature=config["temperature"], dense_attention=config["dense_attention"],
                            cluster_init=config.get("cluster_init", "random"),
                            cluster_reseed=config.get("cluster_reseed", 0))
    except RuntimeError as e:  # the ImageNet weights could not be downloaded: the message says what to do
        if pretrained:
            raise UserError(str(e)) from None
        raise


def save_atomic(path, write):
    """write(tmp) to a temporary file, then rename it to path: an interrupt never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # disk full, Ctrl-C: keep the previous file, leave no temporary one
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(state, path):
    save_atomic(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint written by save_checkpoint; any other file is a UserError that says what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load raises many types for truncated or foreign files
        raise UserError(f"checkpoint {path} cannot be read (truncated or not a PyTorch file?): "
                        f"{type(e).__name__}") from None
    if not isinstance(checkpoint, dict) or not {"model", "args", "iteration"} <= checkpoint.keys():
        raise UserError(f"{path} is not a train.py checkpoint (it needs model, args and iteration)")
    return checkpoint


def load_model_state(model, checkpoint, path):
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"checkpoint {path} is for another model ({first})") from None


# ----------------------------------------------------------------------------- command line

DEMO = dict(backbone="resnet18", pretrained=False, crop_size=64, base_size=64, batch_size=8, iters=500, lr=0.01,
            workers=0, val_every=250, log_every=25, out_dir="runs/demo")
VOC = dict(backbone="resnet101", pretrained=True, crop_size=480, base_size=520, batch_size=16, iters=30000,
           lr=0.01, workers=min(8, os.cpu_count() or 1), val_every=2000, log_every=50, out_dir="runs/voc")


def positive(text):
    """argparse type: an integer >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = "default: VOC {} / demo {}".format
    p.add_argument("--data-root", help="VOC2012 folder or a folder holding VOCdevkit/VOC2012; none: the demo")
    p.add_argument("--download", action="store_true", help="download VOC 2012 into --data-root first")
    p.add_argument("--train-split", default="train_aug", choices=["train", "trainval", "train_aug"])
    p.add_argument("--val-split", default="val", choices=["val", "train", "trainval"])
    p.add_argument("--backbone", choices=BACKBONES, help=d(VOC["backbone"], DEMO["backbone"]))
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, help="ImageNet weights; " + d("yes", "no"))
    p.add_argument("--num-clusters", type=positive, help="K, default: the branch width (512, or 128 for resnet18/34)")
    p.add_argument("--temperature", type=float, default=100.0, help="clustering softmax temperature")
    p.add_argument("--dense-attention", action="store_true", help="position attention by the dense formula")
    p.add_argument("--cluster-init", choices=["random", "data"], default="random", help="clustering centres: "
                   "random unit vectors (the original) or drawn from the first batch, k-means++ style")
    p.add_argument("--cluster-reseed", type=int, default=0, metavar="N", help="draw again the centres that were "
                   "dead (under a tenth of an equal share of the mass) for N steps in a row; 0: never")
    p.add_argument("--crop-size", type=positive, help=d(VOC["crop_size"], DEMO["crop_size"]))
    p.add_argument("--base-size", type=positive, help="longer side before the 0.5-2x random scale; "
                   + d(VOC["base_size"], DEMO["base_size"]))
    p.add_argument("--batch-size", type=positive, help="per process; " + d(VOC["batch_size"], DEMO["batch_size"]))
    p.add_argument("--iters", type=positive, help="optimizer steps; " + d(VOC["iters"], DEMO["iters"]))
    p.add_argument("--lr", type=float, help="backbone LR (head: 10x); " + d(VOC["lr"], DEMO["lr"]))
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--aux-weight", type=float, default=1.0, help="weight of the position and channel losses "
                   "(1.0: the original DANet code's equal weights)")
    p.add_argument("--workers", type=int, help="data loading processes; " + d(VOC["workers"], DEMO["workers"]))
    p.add_argument("--demo-images", type=positive, default=1000, help="size of the synthetic training set")
    p.add_argument("--out-dir", help=d(VOC["out_dir"], DEMO["out_dir"]))
    p.add_argument("--resume", help="a last.pt to continue from (same schedule)")
    p.add_argument("--device", help="cuda, cuda:N or cpu; default: cuda if available")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPUs that have it, "
                   "else fp16 on GPU; fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--val-every", type=positive, help=d(VOC["val_every"], DEMO["val_every"]))
    p.add_argument("--log-every", type=positive, help=d(VOC["log_every"], DEMO["log_every"]))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--benchmark", action="store_true", help="time training steps on random tensors and exit")
    p.add_argument("--benchmark-steps", type=positive, default=10)
    args = p.parse_args(argv)
    if args.workers is not None and args.workers < 0:
        p.error("argument --workers: expected a number >= 0")
    if args.cluster_reseed < 0:
        p.error("argument --cluster-reseed: expected a number >= 0")
    for key, value in (VOC if args.data_root else DEMO).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def setup_device(args):
    """(device, rank, world_size, autocast context); initialises torch.distributed under torchrun."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device} asked for CUDA, but torch.cuda.is_available() is False "
                            f"(no GPU, or a CPU-only PyTorch); use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)  # under torchrun: one GPU per process
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.precision is None:
        cuda = device.type == "cuda"
        args.precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731
    return device, rank, world_size, autocast


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if resource is None:
        return math.nan
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the process's peak RSS: KiB, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


# ----------------------------------------------------------------------------- training

def train_step(model, images, masks, optimizer, scaler, autocast, aux_weight):
    """One optimizer step; returns the loss terms as tensors (reading them would sync with the GPU)."""
    with autocast():
        outputs = model(images)
    losses = {k: F.cross_entropy(v.float(), masks, ignore_index=IGNORE_INDEX) for k, v in outputs.items()}
    loss = losses["out"] + aux_weight * (losses["position"] + losses["channel"])
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return {"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}}


def benchmark(args, model, optimizer, scaler, device, autocast, master=True):
    """Time training steps on random tensors: no dataset, no data loading."""
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
    attention = "dense" if args.dense_attention else "efficient"
    if master:
        print(f"benchmark {args.backbone} crop {args.crop_size} batch {args.batch_size} {args.precision} {device.type} "
              f"{attention} attention: {ms:.1f} ms/step, {args.batch_size * 1000 / ms:.2f} images/s, "
              f"peak memory {peak_memory_gib(device):.2f} GiB")


def main(argv=None):
    args = parse_args(argv)
    device, rank, world_size, autocast = setup_device(args)
    master = rank == 0
    torch.manual_seed(args.seed + rank)

    checkpoint = None
    if args.resume:
        checkpoint = load_checkpoint(args.resume)
        missing = {"optimizer", "scheduler", "scaler", "best_miou"} - checkpoint.keys()
        if missing:
            raise UserError(f"{args.resume} is not a train.py checkpoint to resume from "
                            f"(no {', '.join(sorted(missing))})")
        if checkpoint["args"]["backbone"] != args.backbone:
            raise UserError(f"checkpoint {args.resume} is for {checkpoint['args']['backbone']}, not {args.backbone}")
    if args.benchmark:
        train_set = val_set = None
        args.num_classes = len(VOC_CLASSES)
    else:
        train_set, val_set = build_datasets(args)
        args.num_classes = len(train_set.class_names)
        if len(train_set) < world_size * args.batch_size:
            raise UserError(f"{len(train_set)} training images cannot fill a batch of {args.batch_size} on each of "
                            f"{world_size} processes")
    config = vars(args).copy()

    model = build_model({**config, "pretrained": args.pretrained and checkpoint is None})
    if checkpoint is not None:
        load_model_state(model, checkpoint, args.resume)
        if checkpoint["args"]["iters"] != args.iters:
            raise UserError(f"checkpoint {args.resume} follows a schedule of {checkpoint['args']['iters']} "
                            f"iterations: resume with --iters {checkpoint['args']['iters']}")
    if world_size > 1 and device.type == "cuda":  # BN statistics over the global batch (SyncBN is GPU-only)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device, memory_format=torch.channels_last)
    raw_model = model  # for saving: no DDP / compile wrappers in the state dict
    if args.compile:
        model = torch.compile(model)
    eval_model = model  # validation runs without DDP, whose forward would expect every rank in step
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    optimizer = torch.optim.SGD([
        {"params": raw_model.backbone.parameters(), "lr": args.lr},
        {"params": raw_model.head_parameters(), "lr": args.lr * 10},  # the head is trained from scratch
    ], lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=args.iters, power=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    iteration, best_miou = 0, -1.0
    if checkpoint is not None:
        for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
            obj.load_state_dict(checkpoint[name])
        iteration, best_miou = checkpoint["iteration"], checkpoint["best_miou"]

    if args.benchmark:
        model.train()
        return benchmark(args, model, optimizer, scaler, device, autocast, master)

    sampler = DistributedSampler(train_set, seed=args.seed, drop_last=True) if world_size > 1 else None
    loader_kwargs = dict(num_workers=args.workers, pin_memory=device.type == "cuda",
                         persistent_workers=args.workers > 0)
    train_loader = DataLoader(train_set, args.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True,
                              **loader_kwargs)
    val_shard = Subset(val_set, range(rank, len(val_set), world_size))  # each image once: the metric is exact
    val_loader = DataLoader(val_shard, 1, collate_fn=pad_collate, **loader_kwargs)
    out_dir = Path(args.out_dir)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"training {args.backbone} on {type(train_set).__name__} {len(train_set)} images, {world_size} "
              f"process(es) on {device.type}, {args.precision}, {args.iters} iterations from {iteration}")

    def log(record, text):
        if master:
            print(text, flush=True)
            with open(out_dir / "log.jsonl", "a") as log_file:
                log_file.write(json.dumps(record) + "\n")

    def save(name):
        if master:
            save_checkpoint({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                             "iteration": iteration, "best_miou": best_miou, "args": config,
                             "class_names": list(train_set.class_names)}, out_dir / name)

    stop = []  # Ctrl-C: finish the step, save last.pt, exit; a second Ctrl-C exits at once

    def on_interrupt(*_):
        stop.append(1)
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    def agreed_stop():  # under DDP every rank must leave the loop after the same iteration
        if world_size == 1:
            return bool(stop)
        flag = torch.tensor([float(bool(stop))], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    previous_handler = signal.signal(signal.SIGINT, on_interrupt)
    try:
        epoch, batches = iteration // len(train_loader), iter(())
        start, start_iteration, sums, logged_steps = time.perf_counter(), iteration, {}, 0
        model.train()
        stopping = False
        while iteration < args.iters and not stopping:
            try:
                images, masks = next(batches)
            except StopIteration:
                if sampler is not None:
                    sampler.set_epoch(epoch)
                batches, epoch = iter(train_loader), epoch + 1
                continue
            images = images.to(device, non_blocking=True).to(memory_format=torch.channels_last)
            masks = masks.to(device, non_blocking=True)
            losses = train_step(model, images, masks, optimizer, scaler, autocast, args.aux_weight)
            scheduler.step()
            iteration += 1
            sums = {k: sums.get(k, 0) + v for k, v in losses.items()}  # stays on the device: no sync
            logged_steps += 1

            if iteration % args.log_every == 0 or iteration == args.iters:
                steps, elapsed = iteration - start_iteration, time.perf_counter() - start
                record = {"iteration": iteration, **{k: v.item() / logged_steps for k, v in sums.items()},
                          "lr": optimizer.param_groups[0]["lr"],
                          "images_per_s": steps * args.batch_size * world_size / elapsed,
                          "ms_per_iter": elapsed / steps * 1000, "eta_s": elapsed / steps * (args.iters - iteration),
                          "peak_memory_gib": peak_memory_gib(device)}
                log(record, f"iter {iteration}/{args.iters} loss {record['loss']:.4f} (out {record['out']:.4f} "
                            f"position {record['position']:.4f} channel {record['channel']:.4f}) lr {record['lr']:.5f} "
                            f"{record['images_per_s']:.1f} img/s {record['ms_per_iter']:.0f} ms/iter "
                            f"eta {record['eta_s'] / 60:.1f} min mem {record['peak_memory_gib']:.2f} GiB")
                sums, logged_steps = {}, 0

            if iteration % args.val_every == 0 or iteration == args.iters:
                metric = evaluate(eval_model, val_loader, args.num_classes, device, autocast).compute()
                model.train()
                best = metric["miou"] > best_miou
                best_miou = max(best_miou, metric["miou"])
                usage = raw_model.cluster_usage()  # over the training steps since the last validation
                log({"iteration": iteration, "val_miou": metric["miou"], "val_pixel_accuracy": metric["pixel_accuracy"],
                     **{f"{branch}_{k}": v for branch, u in usage.items() for k, v in u.items()}},
                    f"val iter {iteration}: mIoU {metric['miou']:.4f} pixel accuracy {metric['pixel_accuracy']:.4f}"
                    + (" (best)" if best else "") + "".join(
                        f", {branch} clusters: {u['live']}/{u['clusters']} live, perplexity {u['perplexity']:.1f}"
                        for branch, u in usage.items()))
                save("last.pt")
                if best:
                    save("best.pt")

            if world_size == 1 or iteration % args.log_every == 0:  # a collective: only every log step under DDP
                stopping = agreed_stop()
    finally:
        signal.signal(signal.SIGINT, previous_handler)

    if stopping:
        save("last.pt")
        log({"iteration": iteration, "interrupted": True}, f"interrupted: saved {out_dir / 'last.pt'} at iteration "
                                                           f"{iteration}; continue with --resume")
    elif master:
        print(f"done: best val mIoU {best_miou:.4f}; checkpoints in {out_dir}")
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
