"""Tests for ClusterDANet: the model, train.py and evaluate.py. CPU only, random weights, tiny inputs.

Nothing is downloaded: the data are a tiny VOC tree the tests write and the synthetic demo set.
The tests follow the code: the shared helpers (command lines and runs, tiny datasets, the original code's models),
then clusterdanet.py's classes top to bottom, train.py's parts 1 to 4, evaluate.py, and the whole program at the end.
Each section opens with a `# ---- name` banner.
Run: python -m pytest -q
"""

import codecs
import copy
import errno
import fnmatch
import gc
import inspect
import json
import math
import os
import queue
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.nn.attention import SDPBackend, sdpa_kernel

import clusterdanet
import evaluate
import train
from clusterdanet import (ChannelAttention, ClusterDANet, ClusteringLayer, CompactChannelAttention,
                          CompactPositionAttention, CrossLevelGatingDecoder, DilatedResNet, DRANet, PositionAttention)

REPO = Path(__file__).resolve().parent
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])  # ImageNet, written out again
H, W = 11, 13  # non-square, not multiples of 8
# Tests that matter on a GPU take a `device`; their CUDA variants (ids containing "cuda") are collected everywhere
# and skipped without a GPU. `python -m pytest -q -k cuda` runs exactly them.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
FP32_BF16 = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def relative_error(actual, expected):
    """||actual - expected|| / ||expected||, in float64."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.fixture(autouse=True)
def isolate(monkeypatch):
    """Seed, stay offline (a proxy that refuses every connection, for this process and its children), and give
    back the SIGINT and SIGTERM handlers that train.main() and train.run_main() replace."""
    torch.manual_seed(0)
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("no_proxy", "NO_PROXY", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in handlers.items():
        signal.signal(s, handler)


# ---------------------------------------------------------------------- shared helpers: command lines, runs and scripts

def tiny(out_dir, *extra):
    """Command-line arguments for a tiny CPU run."""
    return ["--backbone", "resnet18", "--no-pretrained", "--crop-size", "32", "--base-size", "32", "--batch-size", "2",
            "--workers", "0", "--device", "cpu", "--out-dir", str(out_dir), *extra]


def read_log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def run_cli(capsys, argv, main=train.main):
    """Run main(argv) as the command line runs it (train.run_main). Returns (exit code, stdout, stderr lines)."""
    capsys.readouterr()
    try:
        train.run_main(lambda: main([str(a) for a in argv]))
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err.splitlines()


def cli_error(capsys, argv, main=train.main, code=2):
    """run_cli that must end with exit code `code` and one `error:` line on stderr. Returns the line."""
    exit_code, _, lines = run_cli(capsys, argv, main)
    assert exit_code == code, (exit_code, lines)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def run_script(args, cwd, timeout=120, module=()):
    """python [module...] train.py args in a fresh process, from `cwd`."""
    return subprocess.run([sys.executable, *module, str(REPO / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def assert_script_error(result, *fragments):
    """Exit code 2, no traceback, and exactly one line on stderr that holds every fragment."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert str(fragment) in lines[0]
    return lines[0]


def assert_nothing_half_written(tmp_path, out_dir, created=False):
    """No temporary checkpoint anywhere, no checkpoint in out_dir; out_dir not even created if `created` is False."""
    assert not list(Path(tmp_path).rglob("*.tmp"))
    if created:
        assert not list(Path(out_dir).glob("*.pt"))
    else:
        assert not Path(out_dir).exists()


def folder_bytes(folder):
    """{file name: bytes} of every file in folder."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def tree_bytes(folder):
    """{relative path: bytes} of every file under folder, through symbolic links to folders."""
    files = {}
    for parent, _, names in os.walk(folder, followlinks=True):
        for name in names:
            path = Path(parent, name)
            files[path.relative_to(folder).as_posix()] = path.read_bytes()
    return files


DEMO_ITERS = 20


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One short demo training run shared by the tests that read its log and checkpoints: its out dir."""
    out = tmp_path_factory.mktemp("demo") / "out"
    handler = signal.getsignal(signal.SIGINT)
    torch.manual_seed(0)
    try:
        train.main(tiny(out, "--batch-size", "4", "--iters", str(DEMO_ITERS), "--demo-images", "16",
                        "--log-every", "5", "--val-every", str(DEMO_ITERS)))
    finally:
        signal.signal(signal.SIGINT, handler)
    return out


def interrupt_after(monkeypatch, steps, counter):
    """Make train_step send this process a real SIGINT after `steps` steps; count every step in counter[0]."""
    original = train.train_step

    def train_step(*args, **kwargs):
        result = original(*args, **kwargs)
        counter[0] += 1
        if counter[0] == steps:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(train, "train_step", train_step)


def run_evaluate(*args):
    """python evaluate.py args in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def voc_checkpoint(tmp_path_factory):
    """An untrained 21-class resnet18 checkpoint in train.py's format, as for VOC."""
    args = train.parse_args(["--data-root", "unused", "--backbone", "resnet18", "--no-pretrained"])
    config = {**vars(args), "num_classes": 21}
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("voc") / "voc.pt"
    train.save_checkpoint({"model": train.build_model(config).state_dict(), "args": config, "iteration": 0,
                           "class_names": list(train.VOC_CLASSES)}, path)
    return path


def untrained_checkpoint(path, class_names, *flags):
    """An untrained resnet18 checkpoint in train.py's format, of a run with these flags and class names."""
    args = train.parse_args([*flags, "--backbone", "resnet18", "--no-pretrained"])
    config = {**vars(args), "num_classes": len(class_names)}
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    train.save_checkpoint({"model": train.build_model(config).state_dict(), "args": config, "iteration": 0,
                           "class_names": list(class_names)}, path)
    return path


TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


def torchrun_exit_codes(stderr):
    """{rank: exit code} from torchrun's report of failed processes."""
    return {int(rank): int(code) for rank, code in
            re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\n\s*exitcode\s*: (-?\d+)", stderr)}


# ------------------------------------------------------------------------ shared helpers: tiny dataset trees and images

# Each class that make_voc draws has its own flat colour; no colour channel is near 0, so a pixel whose three
# channels are exactly 0 can only be padding.
VOC_TEST_COLOURS = {0: (120, 120, 120), 1: (220, 40, 40), 7: (40, 190, 60), 12: (230, 200, 40), 15: (50, 80, 230),
                    20: (200, 60, 200)}


VOC_TEST_SIZES = ((40, 52), (37, 45), (52, 40), (45, 37), (33, 50), (48, 36))  # (height, width), none square


def voc_sample(index, size):
    """(image [H, W, 3] uint8, mask [H, W] uint8) for image `index`: a grey background (class 0) and two
    rectangles of two foreground classes in their colours, each with a 1-pixel void (255) rim, as VOC has."""
    H, W = size
    rng = np.random.RandomState(index)
    foreground = [c for c in VOC_TEST_COLOURS if c]
    classes = (foreground[index % len(foreground)], foreground[(index + 2) % len(foreground)])
    image = np.empty((H, W, 3), np.uint8)
    image[:] = VOC_TEST_COLOURS[0]
    mask = np.zeros((H, W), np.uint8)
    # the first rectangle in the top-left part, the second in the bottom-right part: they never overlap
    boxes = [(rng.randint(1, 4), rng.randint(1, 4), H // 2 - 1 - rng.randint(0, 3), W // 2 - 1 - rng.randint(0, 3)),
             (H // 2 + rng.randint(1, 3), W // 2 + rng.randint(1, 3),
              H - 1 - rng.randint(0, 3), W - 1 - rng.randint(0, 3))]  # (y0, x0, y1, x1) each
    for c, (y0, x0, y1, x1) in zip(classes, boxes):
        image[y0:y1, x0:x1] = VOC_TEST_COLOURS[c]
        mask[y0:y1, x0:x1] = 255  # the rim
        mask[y0 + 1:y1 - 1, x0 + 1:x1 - 1] = c
    return image, mask


def save_mask(mask, path, mode="P"):
    """A label map as VOC stores it: a palette PNG ("P", SegmentationClass) or grey PNG ("L", SBD's Aug masks)."""
    picture = Image.fromarray(mask.astype(np.uint8))  # "L"
    if mode == "P":
        picture.putpalette([v for rgb in evaluate.PALETTE for v in rgb])  # turns it into "P", indices unchanged
    picture.save(path)


def make_voc(root, n_train=4, n_val=2, sizes=VOC_TEST_SIZES, train_aug=False, n_aug_only=2):
    """Write root/VOCdevkit/VOC2012 with JPEGImages/*.jpg, SegmentationClass/*.png (palette PNGs) and
    ImageSets/Segmentation/{train,val,trainval}.txt; image i has size sizes[i % len(sizes)] and the content
    of voc_sample(i). With train_aug, also SegmentationClassAug/*.png (grey PNGs) for the train images and
    for n_aug_only more images that have no SegmentationClass mask (as SBD's), and train_aug.txt.

    Returns the VOC2012 folder; its `ids` are the train ids then the val ids (then the Aug-only ids).
    """
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    n_aug = n_aug_only if train_aug else 0
    ids = [f"2007_{i:06d}" for i in range(n_train + n_val + n_aug)]
    for i, name in enumerate(ids):
        image, mask = voc_sample(i, sizes[i % len(sizes)])
        Image.fromarray(image).save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
        if i < n_train + n_val:
            save_mask(mask, voc / "SegmentationClass" / f"{name}.png")
        if train_aug and (i < n_train or i >= n_train + n_val):
            (voc / "SegmentationClassAug").mkdir(exist_ok=True)
            save_mask(mask, voc / "SegmentationClassAug" / f"{name}.png", mode="L")
    splits = {"train": ids[:n_train], "val": ids[n_train:n_train + n_val], "trainval": ids[:n_train + n_val]}
    if train_aug:
        splits["train_aug"] = ids[:n_train] + ids[n_train + n_val:]
    for split, names in splits.items():
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return voc


@pytest.fixture
def voc_root(tmp_path):
    """A tiny VOC tree (4 train, 2 val images) under tmp_path/data; returns tmp_path/data."""
    make_voc(tmp_path / "data")
    return tmp_path / "data"


def unnormalise(image):
    """[3, H, W] normalised -> [3, H, W] in 0..1."""
    return image * STD[:, None, None] + MEAN[:, None, None]


def interior(mask, radius=2):
    """[H, W] bool: pixels that are not void and whose (2 radius + 1)^2 neighbourhood has their label only."""
    H, W = mask.shape
    padded = F.pad(mask, (radius,) * 4, value=-1)
    same = torch.ones_like(mask, dtype=torch.bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            same &= padded[dy:dy + H, dx:dx + W] == mask
    return same & (mask != train.IGNORE_INDEX)


# cityscapesScripts' labels.py, written out again: label id -> train id of the 19 evaluated classes (others: 255)
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


CITYSCAPES_NAMES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                    "bicycle"]


CITYSCAPES_SIZE = (22, 38)  # (height, width)


def make_cityscapes(root, cities=(("train", "aachen", 2), ("train", "bremen", 2), ("val", "lindau", 2))):
    """Write root/leftImg8bit/<split>/<city>/<id>_leftImg8bit.png (random RGB) and
    root/gtFine/<split>/<city>/<id>_gtFine_labelIds.png (every label id 0..33 at random places), plus the gtFine
    files that are not read (colour, instance ids, polygons). Returns {id: (image [H, W, 3], label ids [H, W])}."""
    rng = np.random.RandomState(0)
    H, W = CITYSCAPES_SIZE
    samples = {}
    for split, city, count in cities:
        for folder in ("leftImg8bit", "gtFine"):
            (root / folder / split / city).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            name = f"{city}_{i:06d}_000019"
            image = rng.randint(0, 256, (H, W, 3), dtype=np.uint8)
            label_ids = rng.permutation(np.arange(H * W) % 34).reshape(H, W).astype(np.uint8)
            Image.fromarray(image).save(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
            Image.fromarray(label_ids).save(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png")
            Image.fromarray(image).save(root / "gtFine" / split / city / f"{name}_gtFine_color.png")
            Image.fromarray(label_ids.astype(np.uint16) * 1000).save(
                root / "gtFine" / split / city / f"{name}_gtFine_instanceIds.png")
            (root / "gtFine" / split / city / f"{name}_gtFine_polygons.json").write_text("{}")
            samples[name] = image, label_ids
    return samples


FOLDER_CLASSES = ["sky", "grass", "cow"]


FOLDER_COLOURS = [(90, 150, 230), (60, 170, 60), (120, 80, 40)]


def make_folder(root, n_train=4, n_val=2, classes=FOLDER_CLASSES):
    """Write root/classes.txt, root/images/{train,val}/NAME.{jpg,jpeg,png} and root/masks/{train,val}/NAME.png: sky
    above grass, a cow (a rectangle) on it, a 1-pixel void (255) rim around the cow; grey and palette mask PNGs.
    Returns {NAME: (image [H, W, 3], mask [H, W])}."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in classes))
    rng = np.random.RandomState(1)
    samples = {}
    for split, count in (("train", n_train), ("val", n_val)):
        for folder in ("images", "masks"):
            (root / folder / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            name, extension = f"{split}_{i}", (".png", ".jpg", ".jpeg")[i % 3]
            H, W = 30 + rng.randint(0, 12), 40 + rng.randint(0, 12)
            mask = np.zeros((H, W), np.uint8)
            mask[H // 3:] = 1
            y0, x0 = H // 2 + rng.randint(0, 3), rng.randint(2, W // 2)
            mask[y0 - 1:y0 + 7, x0 - 1:x0 + 11] = 255
            mask[y0:y0 + 6, x0:x0 + 10] = 2
            image = np.array(FOLDER_COLOURS, np.uint8)[np.minimum(mask, 2)]  # the rim takes the cow's colour
            Image.fromarray(image).save(root / "images" / split / f"{name}{extension}", quality=95)
            save_mask(mask, root / "masks" / split / f"{name}.png", mode="LP"[i % 2])
            samples[name] = image, mask
    return samples


def tiny_run(tmp_path_factory, dataset, make, *flags):
    """A tiny `dataset` tree written by `make` and a short training run on it: (data root, out dir, samples)."""
    root = tmp_path_factory.mktemp(dataset)
    samples = make(root / "data")
    torch.manual_seed(0)
    train.main(tiny(root / "out", "--dataset", dataset, "--data-root", str(root / "data"), *flags))
    return root / "data", root / "out", samples


@pytest.fixture(scope="module")
def cityscapes_run(tmp_path_factory):
    """A tiny Cityscapes tree and a 2-iteration training run on it: (data root, out dir, samples)."""
    return tiny_run(tmp_path_factory, "cityscapes", make_cityscapes, "--iters", "2", "--val-every", "2")


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A tiny folder dataset and a 4-iteration training run on it: (data root, out dir, samples)."""
    return tiny_run(tmp_path_factory, "folder", make_folder, "--iters", "4", "--val-every", "4", "--log-every", "2")


def break_dataset(case, root):
    """Write a dataset at root broken as `case` says; returns (train.py flags, expected error line fragments)."""
    if case.startswith("cityscapes"):
        make_cityscapes(root)
        flags = ["--dataset", "cityscapes", "--data-root", root]
        if case == "cityscapes_no_leftImg8bit":
            (root / "leftImg8bit").rename(root / "images")
            return flags, [f"{root} has no leftImg8bit/ folder"]
        if case == "cityscapes_no_gtFine":
            (root / "gtFine").rename(root / "labels")
            return flags, [f"{root} has no gtFine/ folder"]
        if case == "cityscapes_empty_split":
            for path in (root / "leftImg8bit" / "train").rglob("*.png"):
                path.unlink()
            return flags, [f"{root / 'leftImg8bit' / 'train'} holds no <city>/<id>_leftImg8bit.png images"]
        if case == "cityscapes_image_without_mask":
            mask = root / "gtFine" / "train" / "bremen" / "bremen_000001_000019_gtFine_labelIds.png"
            mask.unlink()
            return flags, [f"image {root}/leftImg8bit/train/bremen/bremen_000001_000019_leftImg8bit.png has no mask "
                           f"{mask}"]
        mask = root / "gtFine" / "train" / "aachen" / "aachen_000001_000019_gtFine_labelIds.png"  # a bad label id
        labels = np.array(Image.open(mask))
        labels[3, 4] = 40
        Image.fromarray(labels).save(mask)
        return flags, [f"mask {mask} is not a 38x22 map of Cityscapes label ids 0..33 (found [40])"]
    make_folder(root)
    flags = ["--dataset", "folder", "--data-root", root]
    if case == "folder_no_classes_txt":
        (root / "classes.txt").unlink()
        return flags, [f"{root / 'classes.txt'} not found"]
    if case == "folder_empty_classes_txt":
        (root / "classes.txt").write_text("# no class yet\n\n  \n")
        return flags, [f"{root / 'classes.txt'} must name 1 to 255 different classes", "it names 0"]
    if case == "folder_image_without_mask":
        Image.new("RGB", (8, 8)).save(root / "images" / "train" / "extra.jpg")
        return flags, [f"image {root}/images/train/extra.jpg has no mask {root}/masks/train/extra.png"]
    if case == "folder_mask_without_image":
        Image.new("L", (8, 8)).save(root / "masks" / "train" / "orphan.png")
        return flags, [f"mask {root}/masks/train/orphan.png has no image {root}/images/train/orphan.jpg"]
    if case == "folder_empty_split":
        for path in [*(root / "images" / "train").iterdir(), *(root / "masks" / "train").iterdir()]:
            path.unlink()
        return flags, [f"{root}/images/train holds no images"]
    if case == "folder_no_split_folder":
        (root / "masks" / "val").rename(root / "masks" / "validation")
        return flags, [f"folder {root}/masks/val not found"]
    if case == "folder_bad_mask_value":  # found when the mask is read
        mask = root / "masks" / "train" / "train_1.png"  # in the first batch: nothing trained, exit 2
        labels = np.array(Image.open(mask))
        labels[0, :2] = 3  # 3 classes: 0..2
        save_mask(labels, mask)
        return flags, [f"mask {mask} is not a ", "map of class indices 0..2 and 255 (found [3])"]
    if case == "dataset_without_data_root":
        return ["--dataset", "folder"], ["--dataset folder needs --data-root"]
    return flags + ["--download"], ["--download fetches VOC only"]  # "download_not_voc"


def random_png(path, width, height, seed=0):
    """A random RGB PNG of width x height: its pixels [H, W, 3]."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


# --------------------------------------------------------------------------- shared helpers: pieces of models, pictures

def dilations(layer):
    """The dilation of each block's 3x3 convolutions, one list per block, and the strides of all its convolutions."""
    rates = [sorted({m.dilation[0] for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)})
             for block in layer]
    strides = {m.stride for m in layer.modules() if isinstance(m, nn.Conv2d)}
    return rates, strides


def attention_chain(device):
    """ClusteringLayer -> PositionAttention -> ChannelAttention with both gammas at 0.5 (at 0 they would hide a
    wrong attention)."""
    torch.manual_seed(0)
    chain = nn.Sequential(ClusteringLayer(16, 16), PositionAttention(16), ChannelAttention()).to(device)
    chain[1].gamma.data.fill_(0.5)
    chain[2].gamma.data.fill_(0.5)
    return chain


def run_chain(chain, x, context=nullcontext(), call=None):
    """Output, d(loss)/dx and the parameter gradients of two training calls (the second after a centre update);
    `call` runs the chain (default: the chain itself)."""
    x = x.clone().requires_grad_()
    with context:
        (call or chain)(x)
        y = (call or chain)(x)
    loss = (y.float() * torch.linspace(-1, 1, y.numel(), device=x.device).view_as(y)).sum()
    loss.backward()
    return y, x.grad, {name: p.grad for name, p in chain.named_parameters()}


def attention_gradients(attention, x, call=None):
    """(output, {"x": dx, parameter name: gradient}) of sum(y * fixed weights), for float32 or float64 x."""
    x = x.clone().requires_grad_()
    y = (call or attention)(x)
    weights = torch.linspace(-1, 1, y.numel(), dtype=torch.float64, device=x.device).view(y.shape)
    names, parameters = zip(*attention.named_parameters())
    grads = torch.autograd.grad((y.double() * weights).sum(), [x, *parameters])
    return y, dict(zip(("x", *names), grads))


def randomise_bn(module, seed=0):
    """BatchNorm statistics and affine parameters away from 0 / 1, so an eval-mode BN is not the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=generator) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=generator) * 0.2 - 0.1)
    return module


def tiny_model(num_classes=3):
    return ClusterDANet(num_classes=num_classes, backbone="resnet18", num_clusters=32).eval()


CLUSTERS_CAPTIONS = ["image", "nearest centre of each 8x8 cell\n(one colour per centre)",
                     *["position attention\nof the marked pixel"] * 3]


def captions_height(width, captions, scaled=()):
    """The height of the caption row under panels `width` px wide: its tallest caption, with a colour bar under
    the panels whose index is in `scaled`."""
    return max(evaluate.caption(text, width).shape[1] + (evaluate.colour_bar(0.0, 1.0, width).shape[1]
                                                          if i in scaled else 0) for i, text in enumerate(captions))


# ----------------------------------------------------------------- shared helpers: the original code's DANet and DRANet

# An original-layout DANet, written here from the original code's description and not from our loader: its
# module names are the state_dict names of PyTorch-Encoding's DANet (pretrained.*, head.conv5a, head.sa.query_conv,
# ...). The published DANet101 is a ResNet-101; this one has ResNet-50's blocks (3, 4, 6, 3) to stay small, which
# the loader must tell apart by its keys. Its head, as the original, takes 2048 channels: 512 after conv5a/conv5c.
class OriginalBottleneck(torch.nn.Module):
    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def save_as_original(model, path, epoch, best_pred):
    """Save `model` as the original code saved its published checkpoints; returns path. PyTorch < 0.4.1 had no
    num_batches_tracked, and < 1.6 wrote the pickle format, not zip."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"epoch": epoch, "state_dict": state, "best_pred": best_pred}, path,
               _use_new_zipfile_serialization=False)
    return path


def add_original_layers(resnet, inplanes, blocks):
    """layer1..4 of the original code's dilated ResNet (output stride 8, multi-grid 4, 8, 16) on `resnet`."""
    nn = torch.nn
    dilations = ([1] * blocks[0], [1] * blocks[1], [1] + [2] * (blocks[2] - 1), [4, 8, 16])
    for i, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 1), (512, 1))):
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
        layer = [OriginalBottleneck(inplanes, planes, stride, dilations[i][0], downsample)]
        layer += [OriginalBottleneck(planes * 4, planes, 1, d) for d in dilations[i][1:]]
        setattr(resnet, f"layer{i + 1}", nn.Sequential(*layer))
        inplanes = planes * 4


class OriginalResNet(torch.nn.Module):
    """The plain-stem, dilated (output stride 8), multi-grid ResNet of --multi-grid --multi-dilation 4 8 16 --os 8."""

    def __init__(self, blocks=(3, 4, 6, 3)):
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False), nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        add_original_layers(self, 64, blocks)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class OriginalPAM(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.query_conv = torch.nn.Conv2d(channels, channels // 8, 1)
        self.key_conv = torch.nn.Conv2d(channels, channels // 8, 1)
        self.value_conv = torch.nn.Conv2d(channels, channels, 1)
        self.gamma = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):  # one head over all C value channels, the attention matrix stored
        B, C, H, W = x.shape
        query = self.query_conv(x).view(B, -1, H * W).permute(0, 2, 1)
        energy = torch.bmm(query, self.key_conv(x).view(B, -1, H * W))
        attention = torch.softmax(energy, dim=-1)
        out = torch.bmm(self.value_conv(x).view(B, C, H * W), attention.permute(0, 2, 1))
        return self.gamma * out.view(B, C, H, W) + x


class OriginalCAM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        B, C, H, W = x.shape
        X = x.view(B, C, -1)
        energy = torch.bmm(X, X.permute(0, 2, 1))
        attention = torch.softmax(energy.max(-1, keepdim=True)[0] - energy, dim=-1)
        return self.gamma * torch.bmm(attention, X).view(B, C, H, W) + x


class OriginalHead(torch.nn.Module):
    def __init__(self, num_classes, in_channels=2048):
        super().__init__()
        nn, inter = torch.nn, in_channels // 4

        def conv_bn_relu(c_in):
            return nn.Sequential(nn.Conv2d(c_in, inter, 3, padding=1, bias=False), nn.BatchNorm2d(inter), nn.ReLU())

        self.conv5a, self.conv5c = conv_bn_relu(in_channels), conv_bn_relu(in_channels)
        self.sa, self.sc = OriginalPAM(inter), OriginalCAM()
        self.conv51, self.conv52 = conv_bn_relu(inter), conv_bn_relu(inter)
        for name in ("conv6", "conv7", "conv8"):
            setattr(self, name, nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(inter, num_classes, 1)))

    def forward(self, x):
        sa_conv = self.conv51(self.sa(self.conv5a(x)))
        sc_conv = self.conv52(self.sc(self.conv5c(x)))
        return self.conv8(sa_conv + sc_conv), self.conv6(sa_conv), self.conv7(sc_conv)


class OriginalDANet(torch.nn.Module):
    def __init__(self, num_classes=19, blocks=(3, 4, 6, 3)):
        super().__init__()
        self.pretrained, self.head = OriginalResNet(blocks), OriginalHead(num_classes)

    def forward(self, x):  # (fused, position, channel) logits, upsampled with align_corners=True
        size = x.shape[-2:]
        return tuple(F.interpolate(y, size, mode="bilinear", align_corners=True) for y in self.head(self.pretrained(x)))


@pytest.fixture(scope="module")
def original_checkpoint(tmp_path_factory):
    """(path, model): a random 19-class original-layout DANet (ResNet-50) saved as the original code saves it."""
    return save_original_danet(tmp_path_factory.mktemp("original") / "DANet50.pth.tar")


def save_original_danet(path, blocks=(3, 4, 6, 3)):
    """(path, model): a random 19-class original-layout DANet on a ResNet of `blocks`, saved at `path` as the original
    code saves DANet101.pth.tar."""
    torch.manual_seed(0)
    model = OriginalDANet(blocks=blocks).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():  # BN statistics and affine away from 0 / 1
            if name.endswith(("running_mean", "bn3.bias")):
                tensor.uniform_(-0.1, 0.1)
            elif name.endswith(("running_var", "bn3.weight")) or (".1.weight" in name and tensor.dim() == 1):
                tensor.uniform_(0.5, 1.5)
        model.head.sa.gamma.fill_(0.7)
        model.head.sc.gamma.fill_(0.5)
        model.head.sa.query_conv.weight.mul_(8)  # a peaked position attention, not a uniform one
    return save_as_original(model, path, 240, 0.87), model


# The original code's DRANet, written from its description: the default ResNet of the original code (deep stem),
# dilated, multi-grid 4 8 16, returning layer1, layer3 and layer4; CPAMEnc / CPAMDec / CCAMDec / CLGD; cls_seg, cls_aux.
class OriginalDeepStemResNet(torch.nn.Module):
    def __init__(self, blocks=(3, 4, 6, 3)):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Sequential(nn.Conv2d(3, 64, 3, 2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                   nn.Conv2d(64, 64, 3, 1, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                   nn.Conv2d(64, 128, 3, 1, padding=1, bias=False))
        self.bn1, self.maxpool = nn.BatchNorm2d(128), nn.MaxPool2d(3, 2, padding=1)
        add_original_layers(self, 128, blocks)

    def forward(self, x):
        c1 = self.layer1(self.maxpool(F.relu(self.bn1(self.conv1(x)))))
        c3 = self.layer3(self.layer2(c1))
        return c1, c3, self.layer4(c3)


def original_conv_bn_relu(c_in, c_out, kernel=3):
    return torch.nn.Sequential(torch.nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
                               torch.nn.BatchNorm2d(c_out), torch.nn.ReLU())


class OriginalCPAMEnc(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        for i in range(1, 5):
            setattr(self, f"conv{i}", original_conv_bn_relu(channels, channels, kernel=1))

    def forward(self, x):  # [B, C, 50]
        B, C = x.shape[:2]
        return torch.cat([getattr(self, f"conv{i}")(F.adaptive_avg_pool2d(x, n)).view(B, C, -1)
                          for i, n in zip(range(1, 5), (1, 2, 3, 6))], dim=2)


class OriginalCPAMDec(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.zeros(1))
        self.conv_query = torch.nn.Conv2d(channels, channels // 4, 1)
        self.conv_key, self.conv_value = torch.nn.Linear(channels, channels // 4), torch.nn.Linear(channels, channels)

    def forward(self, x, y):  # x [B, C, H, W], y [B, 50, C]
        B, C, H, W = x.shape
        query = self.conv_query(x).view(B, -1, H * W).permute(0, 2, 1)  # [B, N, C/4]
        attention = torch.softmax(torch.bmm(query, self.conv_key(y).permute(0, 2, 1)), dim=-1)  # [B, N, 50]
        out = torch.bmm(self.conv_value(y).permute(0, 2, 1), attention.permute(0, 2, 1))  # [B, C, N]
        return self.scale * out.view(B, C, H, W) + x


class OriginalCCAMDec(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, y):  # x [B, C, H, W], y [B, C/16, H, W]
        B, C, H, W = x.shape
        energy = torch.bmm(x.view(B, C, -1), y.view(B, y.shape[1], -1).permute(0, 2, 1))  # [B, C, C/16]
        attention = torch.softmax(energy.max(-1, keepdim=True)[0].expand_as(energy) - energy, dim=-1)
        return x + self.scale * torch.bmm(attention, y.view(B, y.shape[1], -1)).view(B, C, H, W)


class OriginalCLGD(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv_low = original_conv_bn_relu(channels, 32)
        self.conv_cat = original_conv_bn_relu(channels + 32, channels)
        self.conv_att = torch.nn.Sequential(torch.nn.Conv2d(channels + 32, 1, 1), torch.nn.Sigmoid())
        self.conv_out = original_conv_bn_relu(channels, channels)
        self.gamma = torch.nn.Parameter(torch.ones(1))

    def forward(self, x, y):
        low = self.conv_low(x)
        high = F.interpolate(y, low.shape[2:], mode="bilinear", align_corners=True)
        refined = self.gamma * self.conv_att(torch.cat([low, high], 1)) * low
        return self.conv_out(self.conv_cat(torch.cat([refined, high], 1)))


class OriginalDranHead(torch.nn.Module):
    def __init__(self, in_channels=2048):
        super().__init__()
        inter = in_channels // 4
        self.conv_cpam_b, self.cpam_enc = original_conv_bn_relu(in_channels, inter), OriginalCPAMEnc(inter)
        self.cpam_dec, self.conv_cpam_e = OriginalCPAMDec(inter), original_conv_bn_relu(inter, inter)
        self.conv_ccam_b, self.ccam_enc = original_conv_bn_relu(in_channels, inter), \
            original_conv_bn_relu(inter, inter // 16, kernel=1)
        self.ccam_dec, self.conv_ccam_e = OriginalCCAMDec(), original_conv_bn_relu(inter, inter)
        self.conv_cat, self.clgd = original_conv_bn_relu(2 * inter, inter // 2), OriginalCLGD(inter // 2)

    def forward(self, c1, c4):
        ccam_b = self.conv_ccam_b(c4)
        ccam = self.conv_ccam_e(self.ccam_dec(ccam_b, self.ccam_enc(ccam_b)))
        cpam_b = self.conv_cpam_b(c4)
        cpam = self.conv_cpam_e(self.cpam_dec(cpam_b, self.cpam_enc(cpam_b).permute(0, 2, 1)))
        return self.clgd(c1, self.conv_cat(torch.cat([cpam, ccam], 1)))


class OriginalDRANet(torch.nn.Module):
    def __init__(self, num_classes=19, blocks=(3, 4, 6, 3)):
        super().__init__()
        nn = torch.nn
        self.pretrained, self.head = OriginalDeepStemResNet(blocks), OriginalDranHead()
        self.cls_aux = nn.Sequential(nn.Conv2d(1024, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(),
                                     nn.Dropout2d(0.1), nn.Conv2d(256, num_classes, 1))
        self.cls_seg = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(256, num_classes, 1))

    def forward(self, x):  # (output, auxiliary) logits, upsampled with align_corners=True
        c1, c3, c4 = self.pretrained(x)
        up = lambda y: F.interpolate(y, x.shape[-2:], mode="bilinear", align_corners=True)  # noqa: E731
        return up(self.cls_seg(self.head(c1, c4))), up(self.cls_aux(c3))


@pytest.fixture(scope="module")
def original_dranet(tmp_path_factory):
    """(path, model): a random 19-class original-layout DRANet (ResNet-50) saved as the original code saves it."""
    return save_original_dranet(tmp_path_factory.mktemp("original") / "dran50.pth.tar")


def save_original_dranet(path, blocks=(3, 4, 6, 3)):
    """(path, model): a random 19-class original-layout DRANet on a deep-stem ResNet of `blocks`, saved at `path` as
    the original code saves dran101.pth.tar."""
    torch.manual_seed(0)
    model = randomise_bn(OriginalDRANet(blocks=blocks)).eval()
    with torch.no_grad():
        model.head.cpam_dec.scale.fill_(0.7)
        model.head.ccam_dec.scale.fill_(0.5)
        model.head.clgd.gamma.fill_(0.8)
        model.head.cpam_dec.conv_query.weight.mul_(8)  # a peaked attention over the centres, not a uniform one
    return save_as_original(model, path, 180, 0.81), model


# -------------------------------------------------------------------------------- clusterdanet.py: the clustering layer

def test_clustering_forward_is_cosine_similarity():
    layer = ClusteringLayer(8, 5).eval()
    x = torch.randn(2, 8, H, W)
    s = layer(x)
    expected = F.cosine_similarity(x[:, None], layer.centers[None, :, :, None, None], dim=2)  # [B, K, H, W]
    torch.testing.assert_close(s, expected, rtol=1e-5, atol=1e-6)


def reference_update(centers, counts, x, temperature):
    """ConstellationNet's update, written out in float64 numpy with the division by the mass."""
    B, C, h, w = x.shape
    u = x.transpose(0, 2, 3, 1).reshape(-1, C)  # [B*h*w, C]
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    c = centers / np.linalg.norm(centers, axis=1, keepdims=True)
    s = u @ c.T  # [B*h*w, K]
    m = np.exp(temperature * s - (temperature * s).max(1, keepdims=True))
    m /= m.sum(1, keepdims=True)
    mass = m.sum(0)
    mean = (m.T @ u) / mass[:, None]
    counts = counts + mass
    alpha = (mass / counts)[:, None]
    return (1 - alpha) * centers + alpha * mean, counts, s


def test_clustering_update_matches_hand_computation():
    layer = ClusteringLayer(8, 5, temperature=10.0)
    layer.centers.mul_(torch.rand(5, 1) + 0.5)  # centres of different lengths, as after some updates
    layer.counts.mul_(3.0)
    centers0, counts0 = layer.centers.double().numpy().copy(), layer.counts.numpy().copy()
    x = torch.randn(2, 8, H, W)
    s = layer(x)
    centers, counts, s_ref = reference_update(centers0, counts0, x.double().numpy(), 10.0)
    # the output uses the centres as they were before this call
    np.testing.assert_allclose(s.permute(0, 2, 3, 1).reshape(-1, 5).numpy(), s_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.counts.numpy(), counts, rtol=1e-6)
    np.testing.assert_allclose(layer.centers.numpy(), centers, rtol=1e-5, atol=1e-6)


def test_clustering_gradients_reach_input_not_centres():
    layer = ClusteringLayer(8, 5)
    x = torch.randn(2, 8, H, W, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not layer.centers.requires_grad


def test_clustering_centres_stay_finite():
    layer = ClusteringLayer(16, 8, temperature=100.0)
    direction = torch.randn(16)
    concentrated = direction.view(1, 16, 1, 1).expand(4, 16, H, W) * 1e3  # every pixel on one direction
    for _ in range(20):
        layer(concentrated)
        layer(torch.zeros(4, 16, H, W))
    assert torch.isfinite(layer.centers).all() and torch.isfinite(layer.counts).all()
    assert torch.isfinite(layer(concentrated)).all()


def test_clustering_centre_without_mass_is_unchanged():
    layer = ClusteringLayer(4, 2, temperature=100.0)
    layer.centers.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
    x = torch.tensor([1.0, 0.1, 0, 0]).view(1, 4, 1, 1).expand(2, 4, 3, 3)  # all pixels near centre 0
    layer(x)
    assert torch.equal(layer.centers[1], torch.tensor([-1.0, 0, 0, 0]))
    assert not torch.equal(layer.centers[0], torch.tensor([1.0, 0, 0, 0]))


def test_clustering_eval_mode_never_changes_centres():
    layer = ClusteringLayer(8, 5).eval()
    centers, counts = layer.centers.clone(), layer.counts.clone()
    for _ in range(3):
        layer(torch.randn(2, 8, H, W))
    assert torch.equal(layer.centers, centers) and torch.equal(layer.counts, counts)


def test_clustering_initial_centres_are_deterministic_unit_vectors():
    a, b = ClusteringLayer(8, 5), ClusteringLayer(8, 5)
    assert torch.equal(a.centers, b.centers)
    torch.testing.assert_close(a.centers.norm(dim=1), torch.ones(5))
    assert a.counts.dtype == torch.float64 and torch.equal(a.counts, torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_clustering_update_in_fp32_under_autocast(device):
    """bf16 features under bf16 autocast: the similarities returned are bf16, but the centres move exactly as in
    an fp32 run on the same values (in bf16 a few percent of the hard assignments would change)."""
    x = torch.relu(torch.randn(4, 32, H, W, device=device)).bfloat16()
    layer, reference = ClusteringLayer(32, 16).to(device), ClusteringLayer(32, 16).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        s = layer(x)
    assert s.dtype == torch.bfloat16
    reference(x.float())
    torch.testing.assert_close(layer.centers, reference.centers, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer.counts, reference.counts, rtol=1e-9, atol=0)
    assert layer.centers.dtype == torch.float32 and layer.counts.dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
def test_clustering_statistics_stay_float64_under_dtype_casts(device):
    """counts and mass follow the device but not the dtype: 70000.5 is inf in fp16 and 70144 in bf16."""
    layer = ClusteringLayer(8, 5)
    layer.counts.fill_(70000.5)
    layer.mass.fill_(0.25)
    casts = [lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.to(device), lambda m: m.float(),
             lambda m: m.to(device, torch.float16)]
    for cast in casts:
        layer = cast(layer)
        for buffer in (layer.counts, layer.mass):
            assert buffer.dtype == torch.float64 and buffer.device == layer.centers.device
        assert torch.equal(layer.counts.cpu(), torch.full((5,), 70000.5, dtype=torch.float64))
        assert torch.equal(layer.mass.cpu(), torch.full((5,), 0.25, dtype=torch.float64))
    assert layer.centers.dtype == torch.float16 and layer.centers.device.type == device
    s = layer(torch.rand(2, 8, H, W, device=device, dtype=torch.float16))  # a training call, all in fp16
    assert s.dtype == torch.float16 and layer.centers.dtype == torch.float16 and layer.counts.dtype == torch.float64
    assert layer.counts.sum().item() == pytest.approx(5 * 70000.5 + 2 * H * W)  # every pixel's mass, kept exactly
    state = layer.state_dict()
    assert state["counts"].dtype == torch.float64 and state["centers"].dtype == torch.float16


def test_clustering_computes_its_similarities_once_in_fp32(monkeypatch):
    """A training call in fp32 computes the similarities once (forward and update share them) and moves the centres
    exactly as the update from x alone; under bf16 autocast the update recomputes them in fp32 (twice)."""
    calls = []
    einsum = torch.einsum
    monkeypatch.setattr(torch, "einsum", lambda equation, *a: calls.append(equation) or einsum(equation, *a))
    x = torch.relu(torch.randn(2, 16, 5, 7))
    layer, alone = ClusteringLayer(16, 8, temperature=10.0), ClusteringLayer(16, 8, temperature=10.0)
    layer(x)
    alone.update(x)
    assert calls.count("bchw,kc->bkhw") == 2  # once in the forward, once in update(x) alone
    torch.testing.assert_close(layer.state_dict(), alone.state_dict(), rtol=0, atol=0)
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    assert calls.count("bchw,kc->bkhw") == 2


def test_clustering_usage_by_hand():
    """Live centres (>= 1/10 of an equal share of the mass) and the perplexity of the mass shares, against numpy."""
    layer = ClusteringLayer(8, 6, temperature=20.0)
    x = torch.randn(2, 8, H, W) + torch.linspace(0, 2, 8).view(1, 8, 1, 1)  # one direction favoured: unequal use
    mass = 0
    for _ in range(2):
        centers, counts = layer.centers.double().numpy().copy(), layer.counts.numpy().copy()
        _, _, s = reference_update(centers, counts, x.double().numpy(), 20.0)
        m = np.exp(20 * s - (20 * s).max(1, keepdims=True))
        mass = mass + (m / m.sum(1, keepdims=True)).sum(0)  # [K]
        layer(x)
    share = mass / mass.sum()
    usage = layer.usage()
    assert usage["clusters"] == 6 and usage["live"] == (share >= 0.1 / 6).sum()
    assert 0 < usage["live"] < 6  # the data make this a real test of the threshold
    assert usage["perplexity"] == pytest.approx(np.exp(-(share * np.log(share)).sum()), rel=1e-5)
    assert all(math.isnan(v) for k, v in layer.usage().items() if k != "clusters")  # reset: nothing since


def test_clustering_data_init_draws_kmeans_plus_plus_from_the_batch():
    """cluster_init="data": the first training call draws the centres from the batch's unit features, each next one far
    from those drawn before (k-means++): two centres cover two clusters of very different sizes."""
    torch.manual_seed(0)
    a, b = torch.zeros(8), torch.zeros(8)
    a[0], b[1] = 1, 1
    pixels = torch.cat([a + 0.05 * torch.rand(190, 8), b + 0.05 * torch.rand(10, 8)])  # [200, 8], 190 near a
    x = (pixels * torch.rand(200, 1) * 3).T.reshape(1, 8, 10, 20)  # [1, 8, 10, 20], lengths vary
    unit = F.normalize(pixels, dim=1)
    for trial in range(5):
        layer = ClusteringLayer(8, 2, cluster_init="data")
        assert not layer.initialised
        layer.seed_centers(x)
        assert layer.initialised
        distances = torch.cdist(layer.centers, unit, compute_mode="donot_use_mm_for_euclid_dist")  # [2, 200]
        assert distances.min(dim=1).values.max() < 1e-6  # each centre is one of the pixels
        nearest = distances.argmin(dim=1)
        assert sorted((nearest >= 190).tolist()) == [False, True]  # one from each cluster
        drawn = layer.centers.clone()
        layer.seed_centers(x)  # later calls do not draw again
        assert torch.equal(layer.centers, drawn)
    random = ClusteringLayer(8, 2)
    assert random.initialised and not torch.equal(random.centers, drawn)  # cluster_init="random": the original centres


def test_clustering_data_init_and_reseeding_keep_centres_alive():
    """Non-negative features around a common direction (as after ReLU) and random centres: the few centres nearest
    to that direction take all the mass. Data initialisation keeps most centres alive, re-seeding brings dead ones
    back. The figures are the live centres of the last of 30 training calls."""
    live = {}
    for name, options in {"random": {}, "data": dict(cluster_init="data"), "reseed": dict(cluster_reseed=5)}.items():
        torch.manual_seed(1)
        layer = ClusteringLayer(32, 16, **options)
        for _ in range(30):
            layer(torch.relu(1 + 0.5 * torch.randn(4, 32, 6, 6)))
            usage = layer.usage()
        live[name] = usage["live"]
    assert live["random"] <= 4 and live["data"] >= 14 and live["reseed"] >= 14, live


def test_clustering_reseeds_centres_that_stay_dead():
    """cluster_reseed=3: a centre dead in 3 calls in a row is drawn again from the batch, far from the live centre
    (k-means++), with its count back to 1; before that it stays put."""
    layer = ClusteringLayer(4, 2, cluster_reseed=3)
    layer.centers.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))  # centre 1 points away from all pixels
    a = torch.tensor([1.0, 0.1, 0, 0]).view(1, 4, 1, 1).expand(2, 4, 3, 3)
    b = torch.tensor([0.1, 0, 1.0, 0]).view(1, 4, 1, 1).expand(2, 4, 1, 3)
    x = torch.cat([a, b], dim=2)  # [2, 4, 4, 3]: 18 pixels near a, 6 near b; all nearer to centre 0
    for call in range(3):
        layer(x)
        torch.testing.assert_close(layer.centers[1], torch.tensor([-1.0, 0, 0, 0]), rtol=0, atol=1e-6)
        assert layer.idle.tolist() == [0, call + 1]
    counts0 = layer.counts[0].item()
    layer(x)  # the 4th call re-seeds centre 1 (at the pixels near b, the farthest from centre 0), then updates
    assert F.cosine_similarity(layer.centers[1], b[0, :, 0, 0], dim=0) > 0.99
    assert layer.counts[1].item() == pytest.approx(1 + 6, rel=1e-3)  # 1 + the mass of the b pixels
    assert layer.counts[0].item() == pytest.approx(counts0 + 18, rel=1e-3)  # centre 0 keeps its history
    assert layer.idle.tolist() == [0, 0]


def _distributed_data_init(rank, world_size, init_file, x, result_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(rank)  # as train.py seeds: each rank draws differently
    layer = ClusteringLayer(8, 5, cluster_init="data")
    part = x.chunk(world_size)[rank]
    layer.seed_centers(part)
    drawn = [torch.empty_like(layer.centers) for _ in range(world_size)]
    torch.distributed.all_gather(drawn, layer.centers)
    layer(part)  # one update of the data-initialised centres
    updated = [torch.empty_like(layer.centers) for _ in range(world_size)]
    torch.distributed.all_gather(updated, layer.centers)
    if rank == 0:
        torch.save({"drawn": drawn, "updated": updated}, result_file)
    torch.distributed.destroy_process_group()


def test_clustering_data_init_is_identical_on_every_rank(tmp_path):
    """Each rank draws from its own part of the batch; rank 0's centres are broadcast, so all ranks agree."""
    x = torch.relu(torch.randn(4, 8, H, W))
    torch.multiprocessing.spawn(_distributed_data_init, args=(2, tmp_path / "init", x, tmp_path / "out.pt"), nprocs=2)
    result = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(result["drawn"][1], result["drawn"][0], rtol=0, atol=0)
    torch.testing.assert_close(result["updated"][1], result["updated"][0], rtol=0, atol=0)
    rank0_pixels = F.normalize(x[:2], dim=1).permute(0, 2, 3, 1).reshape(-1, 8)  # [2 * H * W, 8]
    distances = torch.cdist(result["drawn"][0], rank0_pixels, compute_mode="donot_use_mm_for_euclid_dist")  # [5, 2HW]
    assert distances.min(dim=1).values.max() < 1e-6  # drawn from rank 0's part


def _distributed_update(rank, world_size, init_file, x, result_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    layer = ClusteringLayer(8, 5, temperature=10.0)
    layer(x.chunk(world_size)[rank])  # each rank sees its half of the batch
    gathered = [torch.empty_like(layer.centers) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, layer.centers)
    if rank == 0:
        torch.save({"centers": gathered, "counts": layer.counts}, result_file)
    torch.distributed.destroy_process_group()


def test_clustering_update_is_synchronised_across_ranks(tmp_path):
    x = torch.randn(4, 8, H, W)
    torch.multiprocessing.spawn(_distributed_update, args=(2, tmp_path / "init", x, tmp_path / "out.pt"), nprocs=2)
    result = torch.load(tmp_path / "out.pt")
    single = ClusteringLayer(8, 5, temperature=10.0)
    single(x)  # one process, the global batch
    for centers in result["centers"]:
        torch.testing.assert_close(centers, single.centers)
    torch.testing.assert_close(result["counts"], single.counts)


# ---------------------------------------------------------------------- clusterdanet.py: position and channel attention

def test_module_shapes():
    x = torch.randn(2, 64, H, W)
    assert ClusteringLayer(64, 24)(x).shape == (2, 24, H, W)
    assert ClusteringLayer(64, 24).eval()(x).shape == (2, 24, H, W)
    assert PositionAttention(64)(x).shape == (2, 64, H, W)
    for attention in ("blocked", "heads", "dense"):
        assert PositionAttention(64, attention)(x).shape == (2, 64, H, W)
    assert ChannelAttention()(x).shape == (2, 64, H, W)


def test_position_attention_needs_channels_divisible_by_8():
    with pytest.raises(ValueError, match="divisible by 8"):
        PositionAttention(12)


def test_attention_option_and_block_size_are_checked():
    assert PositionAttention(16).attention == "auto"
    assert PositionAttention.resolve("auto", "cpu") == PositionAttention.FASTEST["cpu"] == "blocked"
    assert PositionAttention.resolve("auto", "cuda") == "heads"
    assert PositionAttention.resolve("dense", "cuda") == "dense"
    with pytest.raises(ValueError, match="attention must be one of auto, blocked, heads, dense, got 'flash'"):
        PositionAttention(16, "flash")
    with pytest.raises(ValueError, match="block_size must be at least 1, got 0"):
        PositionAttention(16, block_size=0)
    with pytest.raises(ValueError, match="attention must be one of auto, blocked, heads, dense, got 'sparse'"):
        ClusterDANet(backbone="resnet18", attention="sparse")


@pytest.mark.parametrize("device", DEVICES)
@FP32_BF16
def test_position_attention_efficient_equals_dense(dtype, device):
    """Outputs and gradients of the blocked and heads paths agree with the dense one's, in fp32 and under bf16
    autocast (there all also stay within 1% of the float64 formula)."""
    attention = PositionAttention(64, block_size=50).to(device)  # 143 pixels: 3 blocks, the last one shorter
    attention.gamma.data.fill_(0.7)  # gamma starts at 0, which would hide the attention term
    x = torch.randn(2, 64, H, W, device=device)
    weights = torch.linspace(-1, 1, x.numel(), device=device).view_as(x)
    outputs, grads = [], []
    for path in ("blocked", "heads", "dense"):
        attention.attention = path
        x_ = x.clone().requires_grad_()
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            y = attention(x_)
        assert y.dtype == torch.float32  # the input's dtype
        outputs.append(y)
        grads.append(torch.autograd.grad((y * weights).sum(), x_)[0])
    if dtype == torch.float32:
        tolerance = 1e-5 if device == "cpu" else 1e-4
        for output, grad in zip(outputs[:2], grads[:2]):
            torch.testing.assert_close(output, outputs[2], rtol=tolerance, atol=tolerance)
            torch.testing.assert_close(grad, grads[2], rtol=tolerance, atol=tolerance)
        return
    reference = copy.deepcopy(attention).double()  # dense, float64
    x_ = x.double().requires_grad_()
    y = reference(x_)
    grad = torch.autograd.grad((y * weights.double()).sum(), x_)[0]
    assert all(relative_error(o, outputs[2]) < 1e-2 and relative_error(g, grads[2]) < 1e-2
               for o, g in zip(outputs[:2], grads[:2]))
    assert all(relative_error(o, y) < 1e-2 for o in outputs) and all(relative_error(g, grad) < 1e-2 for g in grads)


def test_position_attention_dense_matches_equation():
    """Eq. 2 written pixel by pixel in float64 numpy, against the module's dense path."""
    attention = PositionAttention(16, "dense").double()
    attention.gamma.data.fill_(0.5)
    x = torch.randn(1, 16, 3, 5, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = (conv(x)[0].flatten(1).numpy() for conv in (attention.query, attention.key, attention.value))
    expected = np.zeros((16, 15))
    for i in range(15):
        energy = np.array([q[:, i] @ k[:, j] for j in range(15)])  # no 1/sqrt(d) scaling
        a = np.exp(energy - energy.max())
        a /= a.sum()
        expected[:, i] = 0.5 * (v * a).sum(1) + x[0].flatten(1)[:, i].numpy()
    np.testing.assert_allclose(attention(x)[0].flatten(1).detach().numpy(), expected, rtol=1e-10)


def position_attention_reference(attention, x):
    """Eq. 2 written out in float64 with the module's weights: gamma * softmax(q k^T) v + x, [B, C, H, W]."""
    B, C, H, W = x.shape
    q, k, v = (F.conv2d(x, conv.weight.double(), conv.bias.double()).flatten(2)  # [B, c, H, W] -> [B, c, N]
               for conv in (attention.query, attention.key, attention.value))
    A = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # [B, N, d] x [B, d, N] -> [B, N, N]
    out = (v @ A.transpose(1, 2)).view(B, C, H, W)  # [B, C, N] x [B, N, N] -> [B, C, H, W]
    return attention.gamma.double() * out + x


@pytest.mark.parametrize("device", DEVICES)
def test_blocked_attention_equals_the_formula(device):
    """The blocked path in fp32 at an odd size (33 x 47 = 1551 pixels) against Eq. 2 in float64: the output and the
    gradients of x, of the query / key / value weights and biases and of gamma within 1e-5 relative, for two
    block sizes (16 blocks, the last one shorter; and 2), which also agree with each other."""
    torch.manual_seed(0)
    attention = PositionAttention(64, "blocked").to(device)
    attention.gamma.data.fill_(0.7)
    x = torch.randn(2, 64, 33, 47, device=device)
    reference = copy.deepcopy(attention).double()
    y_ref, grads_ref = attention_gradients(reference, x.double(), lambda x: position_attention_reference(reference, x))
    key_bias = grads_ref.pop("key.bias")  # 0 in exact arithmetic: it adds q_i . b to a whole row of energies
    assert key_bias.abs().max() < 1e-9 * grads_ref["key.weight"].abs().max()
    results = []
    for block_size in (100, 1024):
        attention.block_size = block_size
        y, grads = attention_gradients(attention, x)
        assert y.dtype == torch.float32 and relative_error(y, y_ref) < 1e-5
        assert grads["key.bias"].abs().max() < 1e-5 * grads["key.weight"].abs().max()
        assert all(relative_error(grads[name], grads_ref[name]) < 1e-5 for name in grads_ref), \
            {name: relative_error(grads[name], grads_ref[name]) for name in grads_ref}
        results.append((y, grads))
    (y1, g1), (y2, g2) = results
    assert relative_error(y1, y2) < 1e-6 and all(relative_error(g1[name], g2[name]) < 1e-6 for name in grads_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_blocked_attention_under_bf16_autocast_channels_last(device):
    """A bf16 channels_last input under bf16 autocast: a bf16 output, every gradient finite and within 2% of the
    float64 formula's (the energies and softmax statistics are fp32 inside)."""
    torch.manual_seed(0)
    attention = PositionAttention(64, "blocked", block_size=64).to(device)
    attention.gamma.data.fill_(0.7)
    x = torch.randn(2, 64, 19, 23, device=device).to(torch.bfloat16)
    reference = copy.deepcopy(attention).double()
    y_ref, grads_ref = attention_gradients(reference, x.double(), lambda x: position_attention_reference(reference, x))
    grads_ref.pop("key.bias")  # 0 in exact arithmetic
    with torch.autocast(device, dtype=torch.bfloat16):
        y, grads = attention_gradients(attention, x.to(memory_format=torch.channels_last))
    assert y.dtype == torch.bfloat16 and grads["x"].dtype == torch.bfloat16
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert relative_error(y, y_ref) < 1e-2
    assert all(relative_error(grads[name], grads_ref[name]) < 2e-2 for name in grads_ref), \
        {name: relative_error(grads[name], grads_ref[name]) for name in grads_ref}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_blocked_attention_compiles_cuda():
    """torch.compile of the blocked path on CUDA against eager (test_compile covers it on the CPU, where auto is
    the blocked path)."""
    torch.manual_seed(0)
    attention = PositionAttention(64, "blocked", block_size=50).cuda()
    attention.gamma.data.fill_(0.7)
    x = torch.randn(2, 64, H, W, device="cuda")
    y, grads = attention_gradients(attention, x, torch.compile(attention))
    y_ref, grads_ref = attention_gradients(attention, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads, grads_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@FP32_BF16
def test_position_attention_uses_a_fused_kernel(dtype, device):
    """With only the fused kernels allowed (flash on CPU; flash and memory-efficient on CUDA), the q, k, v we
    pass (q and k expanded over the heads without a copy) must be accepted: a fallback to the math kernel, which
    stores the N x N matrix, raises here. The output has the input's dtype, also under autocast."""
    backends = [SDPBackend.FLASH_ATTENTION] + ([SDPBackend.EFFICIENT_ATTENTION] if device == "cuda" else [])
    attention = PositionAttention(64, "heads").to(device)
    attention.gamma.data.fill_(0.5)
    x = torch.randn(1, 64, H, W, device=device, dtype=dtype, requires_grad=True)
    with sdpa_kernel(backends), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        for x_ in (x, x.to(memory_format=torch.channels_last)):
            y = attention(x_)
            assert y.dtype == dtype
            y.float().sum().backward()
    assert torch.isfinite(x.grad).all() and attention.gamma.grad.abs() > 0


def test_channel_attention_matches_formula():
    attention = ChannelAttention()
    attention.gamma.data.fill_(0.3)
    x = torch.randn(2, 6, H, W) * 0.2
    X = x.double().numpy().reshape(2, 6, H * W)
    E = X @ X.transpose(0, 2, 1)
    A = np.exp(-E - (-E).max(-1, keepdims=True))  # softmax(-E), the same as softmax(rowmax(E) - E)
    A /= A.sum(-1, keepdims=True)
    expected = 0.3 * (A @ X) + X
    np.testing.assert_allclose(attention(x).detach().numpy().reshape(2, 6, -1), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_channel_attention_under_autocast(device):
    """A bf16 input under bf16 autocast gives a bf16 output (the fp32 gamma used to promote it to fp32), equal to
    the fp32 computation on the same values up to one bf16 rounding: E is computed in fp32."""
    attention = ChannelAttention().to(device)
    attention.gamma.data.fill_(0.3)
    x = (torch.randn(2, 6, H, W, device=device) * 0.2).bfloat16()
    with torch.autocast(device, dtype=torch.bfloat16):
        y = attention(x)
    assert y.dtype == torch.bfloat16
    expected = attention(x.float())
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)
    assert relative_error(y, expected) < 4e-3  # bf16 keeps 8 bits: one rounding is at most 2^-9 relative


def test_gammas_start_at_zero():
    assert PositionAttention(64).gamma.item() == 0 and ChannelAttention().gamma.item() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_and_channels_last(dtype, device):
    """The attention chain under autocast on channels_last input against eager fp32: outputs within 2%, gradients
    within 5%, the input's dtype out of every module, centres still fp32 (updated as in fp32), counts fp64."""
    chain, reference = attention_chain(device), attention_chain(device)
    x = torch.randn(2, 16, H, W, device=device)
    dtypes = []
    for module in chain:
        module.register_forward_hook(lambda m, inputs, output: dtypes.append((inputs[0].dtype, output.dtype)))
    y, dx, grads = run_chain(chain, x.to(dtype).to(memory_format=torch.channels_last),
                             torch.autocast(device, dtype=dtype))
    y_ref, dx_ref, grads_ref = run_chain(reference, x.to(dtype).float())
    assert y.dtype == dtype and dtypes == [(dtype, dtype)] * 6
    assert relative_error(y, y_ref) < 2e-2 and relative_error(dx, dx_ref) < 5e-2
    key_bias = grads_ref.pop("1.key.bias")  # 0 in exact arithmetic: it adds q_i . b to a whole row of energies
    assert key_bias.abs().max() < 1e-3 * grads_ref["1.key.weight"].abs().max()
    assert all(relative_error(grads[name], grads_ref[name]) < 5e-2 for name in grads_ref)
    assert chain[0].centers.dtype == torch.float32 and chain[0].counts.dtype == torch.float64
    torch.testing.assert_close(chain[0].centers, reference[0].centers, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["ClusteringLayer", "PositionAttention", "ChannelAttention"])
def test_model_classes_work_copied_alone(name):
    """Each class's source alone, with only torch / nn / F imported, trains and matches the module's class."""
    namespace = {"torch": torch, "nn": nn, "F": F}
    exec(inspect.getsource(getattr(__import__("clusterdanet"), name)), namespace)
    builds = {"ClusteringLayer": lambda cls: cls(16, 8, cluster_init="data", cluster_reseed=1),
              "PositionAttention": lambda cls: cls(16), "ChannelAttention": lambda cls: cls()}
    torch.manual_seed(0)
    copied = builds[name](namespace[name])
    torch.manual_seed(0)
    original = builds[name](getattr(__import__("clusterdanet"), name))
    x = torch.relu(torch.randn(2, 16, H, W))
    for _ in range(3):  # ClusteringLayer: data initialisation, update, re-seeding
        torch.manual_seed(0)
        y = copied(x.requires_grad_())
        torch.manual_seed(0)
        torch.testing.assert_close(y, original(x))
        y.sum().backward()
    torch.testing.assert_close(copied.state_dict(), original.state_dict())
    if name == "ClusteringLayer":
        assert copied.usage() == original.usage()


# --------------------------------------------------- clusterdanet.py: DRANet's compact attention and cross-level gating

# DRANet's modules against dense references written here from the equations (float64, explicit bins, loops and
# interpolation matrices), and an original-layout DRANet written from the original code's description (module names
# as its state_dict: pretrained.conv1.0, head.cpam_enc.conv1, head.clgd.conv_att, cls_seg, cls_aux, ...), not from
# our loader. The published dran101 is a ResNet-101; the stand-in has ResNet-50's blocks to stay small.

def bn_eval(bn, x):
    """An eval-mode BatchNorm2d by its formula, channels on dim 1 of x (any number of trailing dims)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps) * \
        bn.weight.view(shape) + bn.bias.view(shape)


def bins(size, n):
    """Adaptive pooling's n bins of `size` rows: [floor(i size / n), ceil((i + 1) size / n))."""
    return [(i * size // n, math.ceil((i + 1) * size / n)) for i in range(n)]


def reference_cpam(m, x):
    """CPAM written out: centres by explicit bin means, then softmax over the 50 centres by exp / sum."""
    B, C, H, W = x.shape
    centres = []
    for conv, n in zip(m.centres, (1, 2, 3, 6)):
        for top, bottom in bins(H, n):
            for left, right in bins(W, n):
                mean = x[:, :, top:bottom, left:right].mean(dim=(2, 3))  # [B, C]
                centres.append(torch.relu(bn_eval(conv[1], mean @ conv[0].weight[:, :, 0, 0].T)))
    y = torch.stack(centres, dim=1)  # [B, 50, C]
    pixels = x.flatten(2).transpose(1, 2)  # [B, N, C]
    q = pixels @ m.query.weight[:, :, 0, 0].T + m.query.bias  # [B, N, C/4]
    k, v = y @ m.key.weight.T + m.key.bias, y @ m.value.weight.T + m.value.bias  # [B, 50, C/4], [B, 50, C]
    e = torch.exp(q @ k.transpose(1, 2))  # [B, N, 50]
    out = (e / e.sum(-1, keepdim=True)) @ v  # [B, N, C]
    return m.gamma * out.transpose(1, 2).reshape(B, C, H, W) + x


def reference_ccam(m, x):
    B, C, H, W = x.shape
    f = torch.relu(bn_eval(m.reduce[1], torch.einsum("bchw,dc->bdhw", x, m.reduce[0].weight[:, :, 0, 0])))
    X, Fc = x.reshape(B, C, -1), f.reshape(B, f.shape[1], -1)  # [B, C, N], [B, C/16, N]
    E = X @ Fc.transpose(1, 2)  # [B, C, C/16]
    e = torch.exp(E.max(-1, keepdim=True).values - E)
    return m.gamma * ((e / e.sum(-1, keepdim=True)) @ Fc).reshape(B, C, H, W) + x


def interpolation_matrix(out_size, in_size):
    """[out, in]: bilinear weights with align_corners=True (source position i (in - 1) / (out - 1))."""
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        position = i * (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        lower = min(int(position), in_size - 1)
        upper, fraction = min(lower + 1, in_size - 1), position - lower
        matrix[i, lower] += 1 - fraction
        matrix[i, upper] += fraction
    return matrix


def reference_clgd(m, low, high):
    def conv_bn_relu(seq, x):
        return torch.relu(bn_eval(seq[1], F.conv2d(x, seq[0].weight, padding=1)))

    low = conv_bn_relu(m.low, low)  # [B, 32, H, W]
    H, W = low.shape[-2:]
    up = torch.einsum("Hh,bchw,Ww->bcHW", interpolation_matrix(H, high.shape[2]), high,
                      interpolation_matrix(W, high.shape[3]))
    both = torch.cat([low, up], dim=1)
    gate = 1 / (1 + torch.exp(-(torch.einsum("bchw,c->bhw", both, m.gate[0].weight[0, :, 0, 0]) + m.gate[0].bias)))
    low = m.gamma * gate[:, None] * low
    return conv_bn_relu(m.out, conv_bn_relu(m.fuse, torch.cat([low, up], dim=1)))


@pytest.mark.parametrize("name", ["CompactPositionAttention", "CompactChannelAttention", "CrossLevelGatingDecoder"])
def test_dranet_modules_follow_the_equations(name):
    """Outputs and gradients (input, gamma, every weight) against the dense references, float64, eval-mode BN, at an
    odd size where the 6x6 bins overlap (5 x 7 pixels); gammas nonzero."""
    torch.manual_seed(0)
    module = {"CompactPositionAttention": lambda: CompactPositionAttention(32),
              "CompactChannelAttention": lambda: CompactChannelAttention(32),
              "CrossLevelGatingDecoder": lambda: CrossLevelGatingDecoder(12, 16, align_corners=True)}[name]()
    module = randomise_bn(module).double().eval()
    with torch.no_grad():
        module.gamma.fill_(0.7)
        if name == "CompactPositionAttention":
            module.query.weight.mul_(8)  # a peaked attention over the centres, not a uniform one
    reference = {"CompactPositionAttention": reference_cpam, "CompactChannelAttention": reference_ccam,
                 "CrossLevelGatingDecoder": reference_clgd}[name]
    if name == "CrossLevelGatingDecoder":
        inputs = [torch.randn(2, 12, 10, 14, dtype=torch.float64), torch.randn(2, 16, 5, 7, dtype=torch.float64)]
    else:
        inputs = [torch.relu(torch.randn(2, 32, 5, 7, dtype=torch.float64))]
    width = 16 if name == "CrossLevelGatingDecoder" else 32
    weights = torch.randn(2, width, *inputs[0].shape[-2:], dtype=torch.float64)
    results = []
    for function in (module, lambda *x: reference(module, *x)):
        xs = [x.clone().requires_grad_() for x in inputs]
        module.zero_grad()
        out = function(*xs)
        (out * weights).sum().backward()
        results.append((out.detach(), [x.grad for x in xs], {n: p.grad.clone() for n, p in module.named_parameters()}))
    (out, x_grads, p_grads), (expected, expected_x, expected_p) = results
    assert relative_error(out, expected) < 1e-12
    if name != "CrossLevelGatingDecoder":
        assert relative_error(out, inputs[0]) > 0.01  # the attention adds something
    for got, want in zip(x_grads, expected_x):
        assert relative_error(got, want) < 1e-10
    assert p_grads.keys() == expected_p.keys() and len(p_grads) >= 3
    for key in p_grads:
        if key == "key.bias":  # q . (k_m + b) - q . k_m is the same for every centre: softmax cancels it, gradient 0
            assert p_grads[key].abs().max() < 1e-12 and expected_p[key].abs().max() < 1e-12
        else:
            assert relative_error(p_grads[key], expected_p[key]) < 1e-10, key
    if name == "CompactPositionAttention":  # the attention is peaked enough to mean something
        attention, _ = module.attention(inputs[0])
        assert attention.max() > 2 / 50


def test_cpam_regions_are_the_pooling_weights():
    """R [50, N] applied to x gives the adaptive pools (overlapping bins at 5 x 7); attention_rows sum to 1."""
    module = CompactPositionAttention(8).eval()
    x = torch.randn(1, 8, 5, 7)
    R = module.regions(5, 7)  # [50, N]
    pooled = torch.cat([F.adaptive_avg_pool2d(x, n).flatten(2) for n in (1, 2, 3, 6)], dim=2)  # [1, 8, 50]
    torch.testing.assert_close(x.flatten(2) @ R.T, pooled, rtol=0, atol=1e-6)
    rows = module.attention_rows(x, [0, 12, 34])
    assert rows.shape == (1, 3, 35)
    torch.testing.assert_close(rows.sum(-1), torch.ones(1, 3), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["CompactPositionAttention", "CompactChannelAttention", "CrossLevelGatingDecoder"])
def test_dranet_modules_work_copied_alone_at_any_size_and_keep_bf16(name):
    """Each class's source alone (torch / nn / F) trains like the module's class at 33 x 47; bf16 autocast keeps
    bf16."""
    namespace = {"torch": torch, "nn": nn, "F": F}
    exec(inspect.getsource(getattr(__import__("clusterdanet"), name)), namespace)
    build = {"CrossLevelGatingDecoder": lambda cls: cls(8, 16)}.get(name, lambda cls: cls(32))
    torch.manual_seed(0)
    copied = build(namespace[name])
    torch.manual_seed(0)
    original = build(getattr(__import__("clusterdanet"), name))
    for m in (copied, original):
        with torch.no_grad():
            m.gamma.fill_(0.5)
    inputs = [torch.randn(2, 8, 66, 94), torch.randn(2, 16, 33, 47)] if name == "CrossLevelGatingDecoder" else \
        [torch.relu(torch.randn(2, 32, 33, 47))]
    y = copied(*[x.requires_grad_() for x in inputs])
    torch.testing.assert_close(y, original(*inputs))
    assert y.shape == (2, 16 if name == "CrossLevelGatingDecoder" else 32, *inputs[0].shape[-2:])
    y.sum().backward()
    torch.testing.assert_close(copied.state_dict(), original.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert original(*[x.detach().bfloat16() for x in inputs]).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------- clusterdanet.py: the dilated ResNet

@pytest.mark.parametrize("backbone, channels", [("resnet18", 512), ("resnet50", 2048)])
def test_backbone_output_stride_8(backbone, channels):
    features = DilatedResNet(backbone).eval()(torch.randn(1, 3, 8 * H - 3, 8 * W + 5))
    assert features.shape == (1, channels, H, W + 1)  # ceil(size / 8)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34"])
def test_basic_block_resnets_dilate_like_torchvision_bottlenecks(backbone):
    """torchvision dilates Bottleneck ResNets itself: in layer3 and layer4 the first block keeps the previous rate
    (1, then 2), the others take the new one (2, then 4). ResNet-18/34 (dilated by hand) follow the same pattern."""
    bottleneck, basic = DilatedResNet("resnet50"), DilatedResNet(backbone)
    for name, previous, rate in (("layer3", 1, 2), ("layer4", 2, 4)):
        expected, expected_strides = dilations(getattr(bottleneck, name))
        assert expected == [[previous]] + [[rate]] * (len(expected) - 1)  # torchvision's own pattern
        rates, strides = dilations(getattr(basic, name))
        assert rates == expected[:len(rates)] and strides == expected_strides == {(1, 1)}
        assert all(m.padding == m.dilation for m in getattr(basic, name).modules()
                   if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))


def test_multi_grid_dilates_layer4_4_8_16():
    def dilations(backbone):
        return [(block.conv2.dilation, block.conv2.padding) for block in backbone.layer4]

    assert dilations(DilatedResNet("resnet50")) == [((2, 2), (2, 2)), ((4, 4), (4, 4)), ((4, 4), (4, 4))]
    multi_grid = DilatedResNet("resnet50", multi_grid=True).eval()
    assert dilations(multi_grid) == [((4, 4), (4, 4)), ((8, 8), (8, 8)), ((16, 16), (16, 16))]
    assert multi_grid(torch.randn(1, 3, 8 * H, 8 * W)).shape == (1, 2048, H, W)  # still output stride 8
    for name in ("resnet18", "resnet34"):
        with pytest.raises(ValueError, match=f"multi-grid needs a Bottleneck ResNet.*not {name}"):
            ClusterDANet(backbone=name, multi_grid=True)


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone"):
        ClusterDANet(backbone="vgg16")


def test_pretrained_download_failure_is_explained(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty weights cache
    for name in ("https_proxy", "HTTPS_PROXY"):  # a proxy that refuses every connection: offline
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(RuntimeError, match="could not download the ImageNet weights of resnet18.*--no-pretrained"):
        ClusterDANet(backbone="resnet18", pretrained=True)


# ----------------------------------------------------------------------------- clusterdanet.py: ClusterDANet and DRANet

@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_model_outputs(backbone):
    model = ClusterDANet(num_classes=5, backbone=backbone)
    images = torch.randn(2, 3, 8 * H - 5, 8 * W + 3)
    outputs = model(images)
    assert set(outputs) == {"out", "position", "channel"}
    assert all(v.shape == (2, 5, *images.shape[-2:]) for v in outputs.values())
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert set(outputs) == {"out"} and outputs["out"].shape == (2, 5, *images.shape[-2:])


def test_model_default_clusters_and_dense_switch():
    model = ClusterDANet(backbone="resnet18")
    assert list(model.position_branch._modules) == ["conv_in", "clustering", "attention", "conv_out"]
    assert isinstance(model.position_branch.clustering, ClusteringLayer)
    assert isinstance(model.channel_branch.attention, ChannelAttention)
    assert model.position_branch.clustering.centers.shape == (128, 128)  # K = C = 512 / 4
    assert ClusterDANet(backbone="resnet18", num_clusters=64).channel_branch.clustering.centers.shape == (64, 128)
    assert model.attention == model.position_branch.attention.attention == "auto"
    model.attention = "dense"
    assert model.position_branch.attention.attention == "dense"
    with pytest.raises(ValueError, match="attention must be one of auto, blocked, heads, dense, got 'fast'"):
        model.attention = "fast"
    model = ClusterDANet(backbone="resnet18", cluster_init="data", cluster_reseed=7)
    for branch in (model.position_branch, model.channel_branch):
        assert branch.clustering.cluster_init == "data" and branch.clustering.cluster_reseed == 7
    with pytest.raises(ValueError, match="cluster_init must be 'random' or 'data'"):
        ClusterDANet(backbone="resnet18", cluster_init="kmeans")


def test_model_cluster_usage():
    model = ClusterDANet(num_classes=3, backbone="resnet18", num_clusters=16)
    model(torch.randn(2, 3, 32, 40))
    usage = model.cluster_usage()
    assert set(usage) == {"position", "channel"}
    for branch in ("position", "channel"):
        assert usage[branch]["clusters"] == 16 and 1 <= usage[branch]["live"] <= 16
        assert 1 <= usage[branch]["perplexity"] <= 16
        assert torch.equal(getattr(model, f"{branch}_branch").clustering.mass, torch.zeros(16, dtype=torch.float64))


@pytest.mark.parametrize("size", [(45, 61), (33, 40), (40, 57)])
def test_model_is_right_for_any_size(size):
    """For sizes that are not multiples of 8 the model pads the image itself (zeros, bottom and right) and crops
    the logits: the same as padding by hand and cropping, instead of stretching a ceil(size / 8) grid."""
    model = ClusterDANet(num_classes=3, backbone="resnet18", num_clusters=16).eval()
    images = torch.randn(2, 3, *size)
    h, w = size
    with torch.no_grad():
        logits = model(images)["out"]
        padded = model(F.pad(images, (0, -w % 8, 0, -h % 8)))["out"]  # [2, 3, 8 * ceil(h / 8), 8 * ceil(w / 8)]
    assert logits.shape == (2, 3, h, w)
    torch.testing.assert_close(logits, padded[..., :h, :w], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(train.predict_logits(model, images), logits, rtol=0, atol=0)
    model.train()
    assert all(v.shape == (2, 3, h, w) for v in model(images).values())


def test_gradients_reach_the_backbone():
    model = ClusterDANet(num_classes=3, backbone="resnet18")
    outputs = model(torch.randn(2, 3, 40, 56))
    sum(o.logsumexp(1).mean() for o in outputs.values()).backward()
    assert model.backbone.stem[0].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.head_parameters())
    assert model.position_branch.attention.gamma.grad.abs() > 0 and model.channel_branch.attention.gamma.grad.abs() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_model_under_autocast_and_channels_last(dtype, device):
    """The whole model, channels_last, under autocast: logits in the autocast dtype and near fp32 (a random
    backbone's deep gradients are chaotic in 16 bits, so only the classifier's gradient is compared)."""
    torch.manual_seed(0)
    model = ClusterDANet(num_classes=3, backbone="resnet18", num_clusters=32).to(device)
    model.position_branch.attention.gamma.data.fill_(0.5)
    model.channel_branch.attention.gamma.data.fill_(0.5)
    for module in model.modules():
        if isinstance(module, nn.Dropout2d):
            module.p = 0.0  # the same computation in both runs
    reference = copy.deepcopy(model)
    model.to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 40, 56, device=device)
    with torch.autocast(device, dtype=dtype):
        outputs = model(images.to(memory_format=torch.channels_last))
    expected = reference(images)
    for name, logits in outputs.items():
        assert logits.dtype == dtype and torch.isfinite(logits).all() and relative_error(logits, expected[name]) < 0.1
    sum(o.float().logsumexp(1).mean() for o in outputs.values()).backward()
    sum(o.logsumexp(1).mean() for o in expected.values()).backward()
    assert relative_error(model.classifier[1].weight.grad, reference.classifier[1].weight.grad) < 2e-2
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    for branch in (model.position_branch, model.channel_branch):
        assert branch.clustering.centers.dtype == torch.float32 and branch.clustering.counts.dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
def test_compile(device):
    """torch.compile of the attention chain against eager fp32: outputs, gradients and the centre updates."""
    chain, reference = attention_chain(device), attention_chain(device)
    x = torch.randn(2, 16, H, W, device=device)
    y, dx, grads = run_chain(chain, x, call=torch.compile(chain))
    y_ref, dx_ref, grads_ref = run_chain(reference, x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads, grads_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chain.state_dict(), reference.state_dict(), rtol=1e-5, atol=1e-5)  # 2 centre updates
    assert chain[0].counts.dtype == torch.float64


def test_clusterdanet_paths_agree():
    """ClusterDANet with its clustering layers, training mode: each path's logits and gradients equal the dense
    one's (both gammas at 0.5, no dropout); the clustering updates are the same too."""
    torch.manual_seed(0)
    model = ClusterDANet(num_classes=3, backbone="resnet18", num_clusters=32)
    model.position_branch.attention.gamma.data.fill_(0.5)
    model.channel_branch.attention.gamma.data.fill_(0.5)
    for module in model.modules():
        if isinstance(module, nn.Dropout2d):
            module.p = 0.0
    images = torch.randn(2, 3, 40, 56)
    results = {}
    for path in ("blocked", "heads", "dense"):
        net = copy.deepcopy(model)
        net.attention = path
        outputs = net(images)
        sum(o.logsumexp(1).mean() for o in outputs.values()).backward()
        results[path] = outputs, {n: p.grad for n, p in net.named_parameters()}, net.state_dict()
    outputs_ref, grads_ref, state_ref = results.pop("dense")
    for outputs, grads, state in results.values():
        torch.testing.assert_close(outputs, outputs_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grads, grads_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(state, state_ref, rtol=1e-5, atol=1e-6)


def test_plain_danet_follows_the_equations():
    """clustering=False: no clustering layer or buffer; the output is DANet's, computed here densely in float64."""
    torch.manual_seed(0)
    model = ClusterDANet(num_classes=3, backbone="resnet18", clustering=False).double().eval()
    assert not any(isinstance(m, ClusteringLayer) for m in model.modules())
    assert not [name for name, _ in model.named_buffers() if "centers" in name or "counts" in name]
    assert model.position_branch.attention.query.in_channels == 128  # the attention sees the branch's C channels
    with torch.no_grad():
        for name, tensor in model.named_buffers():  # BN statistics away from 0 / 1
            if name.endswith("running_mean"):
                tensor.uniform_(-0.1, 0.1)
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
        model.position_branch.attention.gamma.fill_(0.6)
        model.channel_branch.attention.gamma.fill_(0.4)
    w = dict(model.named_parameters())
    b = dict(model.named_buffers())
    images = torch.randn(1, 3, 40, 48, dtype=torch.float64)

    def conv_bn_relu(x, prefix):
        x = F.conv2d(x, w[f"{prefix}.0.weight"], padding=1)
        mean, var = b[f"{prefix}.1.running_mean"], b[f"{prefix}.1.running_var"]
        x = (x - mean[:, None, None]) / torch.sqrt(var + 1e-5)[:, None, None]
        return F.relu(x * w[f"{prefix}.1.weight"][:, None, None] + w[f"{prefix}.1.bias"][:, None, None])

    def conv1x1(x, prefix):
        return torch.einsum("oc,chw->ohw", w[f"{prefix}.weight"][:, :, 0, 0], x) + w[f"{prefix}.bias"][:, None, None]

    with torch.no_grad():
        f = model.backbone(images)[0]  # [512, 5, 6]
        a = conv_bn_relu(f[None], "position_branch.conv_in")[0]  # [C, h, w]
        C, h, w_ = a.shape
        q = conv1x1(a, "position_branch.attention.query").reshape(C // 8, -1)  # [C/8, N]
        k = conv1x1(a, "position_branch.attention.key").reshape(C // 8, -1)
        v = conv1x1(a, "position_branch.attention.value").reshape(C, -1)  # [C, N]
        s = torch.softmax(q.T @ k, dim=1)  # s_ji = softmax_i(q_j . k_i): [N, N]
        position = 0.6 * (v @ s.T) + a.reshape(C, -1)  # Eq. 2: E_j = alpha sum_i s_ji D_i + A_j
        p = conv_bn_relu(position.reshape(1, C, h, w_), "position_branch.conv_out")[0]
        A = conv_bn_relu(f[None], "channel_branch.conv_in")[0].reshape(C, -1)  # [C, N]
        energy = A @ A.T
        x = torch.softmax(energy.max(1, keepdim=True).values - energy, dim=1)  # the original code's max(E) - E
        channel = 0.4 * (x @ A) + A  # Eq. 4
        c = conv_bn_relu(channel.reshape(1, C, h, w_), "channel_branch.conv_out")[0]
        logits = conv1x1(p + c, "classifier.1")  # dropout is the identity in eval mode
        expected = F.interpolate(logits[None], size=(40, 48), mode="bilinear", align_corners=False)
        got = model(images)["out"]
    assert expected.std() > 0.1 * expected.abs().max()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)  # ChannelAttention runs in fp32


def test_dranet_any_size_outputs_and_deep_stem():
    """DRANet at 33 x 47: "out" (and "aux" in training), both with and without clustering; the deep stem's shapes."""
    for clustering in (True, False):
        model = DRANet(num_classes=5, backbone="resnet18", clustering=clustering)
        outputs = model(torch.randn(2, 3, 33, 47))
        assert {k: tuple(v.shape) for k, v in outputs.items()} == {"out": (2, 5, 33, 47), "aux": (2, 5, 33, 47)}
        assert list(model.eval()(torch.randn(1, 3, 33, 47))) == ["out"]
        assert any(isinstance(m, ClusteringLayer) for m in model.modules()) == clustering
    backbone = DilatedResNet("resnet50", deep_stem=True)
    convs = [m for m in backbone.stem[0] if isinstance(m, nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(64, 3, 3, 3), (64, 64, 3, 3), (128, 64, 3, 3)]
    assert [c.stride for c in convs] == [(2, 2), (1, 1), (1, 1)] and backbone.stem[1].num_features == 128
    low, mid, high = backbone.levels(torch.randn(1, 3, 40, 56))
    assert (low.shape, mid.shape, high.shape) == ((1, 256, 10, 14), (1, 1024, 5, 7), (1, 2048, 5, 7))
    for kwargs, fragment in (({"backbone": "resnet18", "deep_stem": True}, "needs a Bottleneck ResNet"),
                             ({"backbone": "resnet50", "deep_stem": True, "pretrained": True}, "no ImageNet weights")):
        with pytest.raises(ValueError, match=fragment):
            DilatedResNet(**kwargs)


# ----------------------------------------------------- clusterdanet.py: the original code's checkpoints (from_original)

def test_original_checkpoint_is_read_as_plain_danet_with_the_same_logits(original_checkpoint, capsys):
    path, original = original_checkpoint
    model, config, class_names = evaluate.load_model(path, torch.device("cpu"))
    assert "a checkpoint of the original DANet code (epoch 240), read as plain DANet, resnet50, multi-grid 4 8 16, " \
           "19 classes" in capsys.readouterr().out
    assert class_names == CITYSCAPES_NAMES and config["num_classes"] == 19
    assert not any(isinstance(m, ClusteringLayer) for m in model.modules())
    assert [block.conv2.dilation for block in model.backbone.layer4] == [(4, 4), (8, 8), (16, 16)]
    images = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        expected = original(images)
        got = train.predict_logits(model.float(), images)
    scale = expected[0].abs().max()
    assert expected[0].std() > 0.1 * scale  # not a flat output: the comparison means something
    torch.testing.assert_close(got / scale, expected[0] / scale, rtol=0, atol=2e-5)

    # the auxiliary outputs too: conv6 is the position branch's classifier, conv7 the channel branch's
    original = copy.deepcopy(original)  # the fixture's model stays as it is
    for module in (*model.modules(), *original.modules()):
        if isinstance(module, torch.nn.Dropout2d):
            module.p = 0.0
    model.train(), original.train()  # BN on batch statistics, the same on both sides
    with torch.no_grad():
        expected, got = original(images), model(images)
    for e, key in zip(expected, ("out", "position", "channel")):  # BN over 2 x 6 x 8 pixels amplifies rounding
        torch.testing.assert_close(got[key] / e.abs().max(), e / e.abs().max(), rtol=0, atol=1e-3)
    assert (expected[1] - expected[2]).abs().max() > 0.1 * expected[1].abs().max()  # a swap would show


def test_original_dranet_is_read_as_plain_dranet_with_the_same_logits(original_dranet, capsys):
    path, original = original_dranet
    model, config, class_names = evaluate.load_model(path, torch.device("cpu"))
    assert f"{path}: a checkpoint of the original DANet code (epoch 180), read as plain DRANet, resnet50, deep stem, " \
           "multi-grid 4 8 16, 19 classes" in capsys.readouterr().out.splitlines()
    assert isinstance(model, DRANet) and class_names == CITYSCAPES_NAMES and config["model"] == "dranet"
    assert not any(isinstance(m, ClusteringLayer) for m in model.modules()) and model.backbone.deep_stem
    assert [block.conv2.dilation for block in model.backbone.layer4] == [(4, 4), (8, 8), (16, 16)]
    images = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        expected = original(images)[0]
        got = train.predict_logits(model.float(), images)
    scale = expected.abs().max()
    assert expected.std() > 0.1 * scale  # not a flat output: the comparison means something
    torch.testing.assert_close(got / scale, expected / scale, rtol=0, atol=1e-4)

    original = copy.deepcopy(original)  # the auxiliary output too, in training mode without dropout
    for module in (*model.modules(), *original.modules()):
        if isinstance(module, torch.nn.Dropout2d):
            module.p = 0.0
    model.train(), original.train()
    with torch.no_grad():
        expected, got = original(images), model(images)
    for e, key in zip(expected, ("out", "aux")):
        torch.testing.assert_close(got[key] / e.abs().max(), e / e.abs().max(), rtol=0, atol=1e-3)
    line = cli_error(capsys, ["--checkpoint", path, "--save-dir", path.parent / "pictures", "--show-clusters"],
                     main=evaluate.main)
    assert "draws the clustering layer" in line and "is plain DRANet" in line


ALONE_CODE = """
import importlib.util, json, os, torch
import clusterdanet
assert os.path.dirname(os.path.abspath(clusterdanet.__file__)) == os.getcwd(), clusterdanet.__file__
assert importlib.util.find_spec("train") is None and importlib.util.find_spec("evaluate") is None
images = torch.load("images.pt", weights_only=True)
summary = {}
for name in ("DANet101.pth.tar", "dran101.pth.tar"):
    model = clusterdanet.from_original(name)
    with torch.no_grad():
        torch.save(model(images)["out"], name + ".out.pt")
    summary[name] = dict(model=type(model).__name__, training=model.training, align_corners=model.align_corners,
                         layer4=[block.conv2.dilation[0] for block in model.backbone.layer4],
                         layer3=len(model.backbone.layer3), deep_stem=model.backbone.deep_stem,
                         classes=model.classifier[1].out_channels,
                         clustering=any(isinstance(m, clusterdanet.ClusteringLayer) for m in model.modules()))
print(json.dumps(summary))
"""


def test_from_original_with_clusterdanet_py_alone(tmp_path):
    """clusterdanet.py copied alone into an empty folder, with original-layout DANet101 and DRANet101 stand-ins
    written there: in a process that can import nothing else of this repository, from_original(path) gives plain
    DANet / DRANet (ResNet-101) in eval mode with the original's settings, whose logits are those of evaluate.py's
    loading and of the stand-ins themselves."""
    (tmp_path / "clusterdanet.py").write_bytes((REPO / "clusterdanet.py").read_bytes())
    resnet101 = (3, 4, 23, 3)
    files = {"DANet101.pth.tar": save_original_danet(tmp_path / "DANet101.pth.tar", resnet101),
             "dran101.pth.tar": save_original_dranet(tmp_path / "dran101.pth.tar", resnet101)}
    images = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    torch.save(images, tmp_path / "images.pt")
    result = subprocess.run([sys.executable, "-E", "-s", "-c", ALONE_CODE], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)  # -E: no PYTHONPATH; -c puts only the folder on the path
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    for name, model_name, deep_stem in (("DANet101.pth.tar", "ClusterDANet", False),
                                        ("dran101.pth.tar", "DRANet", True)):
        assert summary[name] == dict(model=model_name, training=False, align_corners=True, layer4=[4, 8, 16],
                                     layer3=23, deep_stem=deep_stem, classes=19, clustering=False)
        got = torch.load(tmp_path / f"{name}.out.pt", weights_only=True)
        model, _, _ = evaluate.load_model(tmp_path / name, torch.device("cpu"))
        with torch.no_grad():
            expected = train.predict_logits(model, images)
            original = files[name][1](images)[0]
        scale = expected.abs().max()
        assert expected.std() > 0.1 * scale  # not a flat output: the comparison means something
        torch.testing.assert_close(got / scale, expected / scale, rtol=0, atol=1e-5)
        torch.testing.assert_close(got / scale, original / scale, rtol=0, atol=1e-4)


def test_from_original_takes_a_loaded_dict_and_refuses_other_files(original_checkpoint, tmp_path):
    """What torch.load returned loads as the path does; a train.py checkpoint, blocks of no known depth and tensors
    that do not fit are ValueErrors that name the source."""
    path, _ = original_checkpoint
    from_path = clusterdanet.from_original(path)
    from_dict = clusterdanet.from_original(torch.load(path, weights_only=True))
    assert not from_dict.training
    torch.testing.assert_close(from_dict.state_dict(), from_path.state_dict(), rtol=0, atol=0)
    torch.save({"model": {}, "args": {}, "iteration": 0}, tmp_path / "ours.pt")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'ours.pt'))} is not a checkpoint of the "
                                         r"original DANet code"):
        clusterdanet.from_original(tmp_path / "ours.pt")
    t = torch.zeros(1)
    state = {f"pretrained.layer{i}.{j}.conv1.weight": t for i, n in enumerate((3, 4, 7, 3), 1) for j in range(n)}
    with pytest.raises(ValueError, match=r"^x\.pth is not an original DANet or DRANet checkpoint this loader knows "
                                         r"\(blocks per layer \(3, 4, 7, 3\)"):
        clusterdanet.original_state_and_config({**state, "head.conv8.1.weight": t}, source="x.pth")
    resnet50 = {k.replace("layer3.6.", "extra."): v for k, v in state.items()}  # blocks (3, 4, 6, 3), one extra
    tensors, config, unused = clusterdanet.original_state_and_config({**resnet50, "head.conv8.1.weight": t[:, None]})
    assert config == dict(model="danet", num_classes=1, backbone="resnet50", clustering=False, multi_grid=True,
                          align_corners=True, deep_stem=False)
    assert unused == ["pretrained.extra.conv1.weight"] and "classifier.1.weight" in tensors
    with pytest.raises(ValueError, match=r"^the checkpoint does not hold the tensors of the ClusterDANet it names: "
                                         r"Error\(s\) in loading state_dict"):
        clusterdanet.from_original({"state_dict": {**resnet50, "head.conv8.1.weight": torch.zeros(19, 512, 1, 1)}})


# ---------------------------------------------------------------------------- train.py 1: the recipe and the transforms

def test_each_dataset_has_its_recipe():
    assert train.parse_args([]).dataset == "demo" and train.parse_args([]).crop_size == 64
    voc = train.parse_args(["--data-root", "d"])
    assert (voc.dataset, voc.crop_size, voc.batch_size, voc.train_split) == ("voc", 480, 16, "train_aug")
    cityscapes = train.parse_args(["--dataset", "cityscapes", "--data-root", "d"])
    assert (cityscapes.crop_size, cityscapes.batch_size, cityscapes.lr, cityscapes.base_size) == (768, 8, 0.01, 1024)
    assert cityscapes.train_split == "train" and cityscapes.out_dir == "runs/cityscapes"
    folder = train.parse_args(["--dataset", "folder", "--data-root", "d", "--crop-size", "96"])
    assert (folder.crop_size, folder.train_split, folder.out_dir) == (96, "train", "runs/folder")


def test_random_scale_keeps_danets_sizes_and_never_a_side_of_0():
    """Ordinary images: exactly v2.ScaleJitter's output (the same draw, sizes, resampling). Extreme ones: the longer
    side still base x scale, the shorter one at least one pixel, where ScaleJitter's would be 0."""
    image = lambda H, W: train.tv_tensors.Image(torch.randint(0, 256, (3, H, W), dtype=torch.uint8))  # noqa: E731
    mask = lambda H, W: train.tv_tensors.Mask(torch.randint(0, 3, (H, W), dtype=torch.uint8))  # noqa: E731
    for H, W in ((40, 52), (375, 500), (1, 1), (30, 300)):
        for seed in range(3):
            pair = image(H, W), mask(H, W)
            torch.manual_seed(seed)
            expected = train.v2.ScaleJitter((64, 64), scale_range=(0.5, 2.0))(*pair)
            torch.manual_seed(seed)
            scaled = train.RandomScale(64)(*pair)
            assert all(torch.equal(a, b) and type(a) is type(b) for a, b in zip(scaled, expected))
    for H, W in ((40, 4000), (4000, 3), (1, 5000)):
        for seed in range(5):
            pair = image(H, W), mask(H, W)
            torch.manual_seed(seed)
            scale = 0.5 + 1.5 * torch.rand(1).item()
            torch.manual_seed(seed)
            scaled_image, scaled_mask = train.RandomScale(64)(*pair)
            longer, shorter = max(scaled_image.shape[1:]), min(scaled_image.shape[1:])
            assert abs(longer - 64 * scale) <= 1 and shorter == 1  # ScaleJitter's int(): 0
            assert scaled_mask.shape == scaled_image.shape[1:]
        image_, mask_ = train.train_transform(32, 64)(image(H, W), mask(H, W))
        assert image_.shape == (3, 32, 32) and mask_.shape == (32, 32)


def class_colours():
    colours = torch.zeros(256, 3)
    for c, rgb in VOC_TEST_COLOURS.items():
        colours[c] = torch.tensor(rgb) / 255
    return colours  # [256, 3]


def assert_colours_follow_labels(image, mask):
    """Away from label borders, every pixel has the colour make_voc drew for its label. Returns the pixel count."""
    inside = interior(mask)
    deviation = (unnormalise(image)[:, inside] - class_colours()[mask[inside]].T).abs()  # [3, n]
    if deviation.numel():  # JPEG ringing and resampling near edges; the class colours differ by > 0.3
        assert deviation.max() < 0.2 and deviation.median() < 0.03
    return int(inside.sum())


def test_train_crops_are_aligned_and_padded_with_void(voc_root):
    """Crop 48 > twice base size 20: the whole scaled image lies inside the crop, padded around."""
    crop, base = 48, 20
    dataset = train.VOCSegmentation(voc_root, "train", train.train_transform(crop, base))
    pad_value = (0 - MEAN) / STD  # image padding is 0 before normalisation
    flips, checked = set(), 0
    for trial in range(24):
        index = trial % len(dataset)
        image, mask = dataset[index]
        assert image.shape == (3, crop, crop) and image.dtype == torch.float32
        assert mask.shape == (crop, crop) and mask.dtype == torch.int64

        padding = (image == pad_value[:, None, None]).all(0)  # [crop, crop]
        assert (mask[padding] == 255).all()
        ys, xs = torch.nonzero(~padding, as_tuple=True)
        top, left, h, w = ys.min(), xs.min(), int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert not padding[top:top + h, left:left + w].any()  # the image is one rectangle, padded all around
        assert padding.sum() == crop * crop - h * w > 0

        # that rectangle is the source image scaled by base / longer side x U(0.5, 2), aspect ratio kept
        source = Image.open(dataset.images[index])
        W0, H0 = source.size
        assert base * 0.5 - 1 <= max(h, w) <= base * 2
        assert abs(h * W0 - w * H0) <= max(H0, W0)  # int() rounding: each side within 1 pixel

        # inside it: the mask is the source mask resized with nearest neighbours, the image the source image
        # resized, both flipped or both not
        mask0 = torch.from_numpy(np.array(Image.open(dataset.masks[index]))).long()
        image0 = torch.from_numpy(np.array(source.convert("RGB"))).permute(2, 0, 1).float() / 255
        resized = F.interpolate(image0[None], size=(h, w), mode="bilinear", antialias=True)[0]
        content, labels = unnormalise(image)[:, top:top + h, left:left + w], mask[top:top + h, left:left + w]
        flipped = (content - resized.flip(-1)).abs().amax() < (content - resized).abs().amax()
        torch.testing.assert_close(content, resized.flip(-1) if flipped else resized, atol=0.02, rtol=0)
        expected = [F.interpolate(mask0[None, None].float(), size=(h, w), mode=mode)[0, 0].long()
                    for mode in ("nearest", "nearest-exact")]
        assert any(torch.equal(labels, e.flip(-1) if flipped else e) for e in expected)
        flips.add(bool(flipped))
        checked += assert_colours_follow_labels(image, mask)
    assert flips == {True, False} and checked > 1000  # both branches of the random flip were seen and checked


def test_train_crops_of_upscaled_images_are_aligned(voc_root):
    """Crop 32 < base size 48: mostly cropping; labels still carry their colours, and padding is void."""
    dataset = train.VOCSegmentation(voc_root, "train", train.train_transform(32, 48))
    pad_value = (0 - MEAN) / STD
    checked = 0
    for trial in range(16):
        image, mask = dataset[trial % len(dataset)]
        assert image.shape == (3, 32, 32) and mask.shape == (32, 32)
        padding = (image == pad_value[:, None, None]).all(0)
        assert (mask[padding] == 255).all()
        checked += assert_colours_follow_labels(image, mask)
    assert checked > 1000


def test_eval_items_are_whole_images_and_masks(voc_root):
    dataset = train.VOCSegmentation(voc_root, "val")  # no transform: the evaluation one
    assert len(dataset) == 2 and dataset.class_names == train.VOC_CLASSES
    for index in range(len(dataset)):
        image, mask = dataset[index]
        decoded = torch.from_numpy(np.array(Image.open(dataset.images[index]).convert("RGB"))).permute(2, 0, 1)
        H, W = VOC_TEST_SIZES[(4 + index) % len(VOC_TEST_SIZES)]  # val images come after the 4 train images
        assert image.shape == (3, H, W) and image.dtype == torch.float32
        torch.testing.assert_close(image, (decoded / 255 - MEAN[:, None, None]) / STD[:, None, None])
        assert mask.dtype == torch.int64
        assert torch.equal(mask, torch.from_numpy(voc_sample(4 + index, (H, W))[1]).long())
        assert 255 in mask and len(mask.unique()) == 4  # background, two classes, void


# ------------------------------------- train.py 2: training (the loop, train_step, the model and optimizer, the device)

def test_training_lowers_the_loss(demo_run):
    records = read_log(demo_run)
    steps = [r for r in records if "loss" in r]
    assert [r["iteration"] for r in steps] == [5, 10, 15, 20]
    assert all(math.isfinite(r[k]) for r in steps for k in ("loss", "out", "position", "channel"))
    for r in steps:  # the logged loss is the one train_step optimises
        assert r["loss"] == pytest.approx(r["out"] + 1.0 * (r["position"] + r["channel"]), rel=1e-5)  # --aux-weight 1.0
        # the LR that the logged step used: step k (1-based) runs at lr (1 - (k - 1) / iters)^0.9
        assert r["lr"] == pytest.approx(0.01 * (1 - (r["iteration"] - 1) / DEMO_ITERS) ** 0.9, abs=1e-12)
    assert steps[-1]["lr"] > 0  # the last step's LR, not the next one's (0)
    assert steps[-1]["loss"] < steps[0]["loss"]
    validation = [r for r in records if "val_miou" in r]
    assert [r["iteration"] for r in validation] == [DEMO_ITERS]
    assert 0 <= validation[0]["val_miou"] <= 1 and 0 <= validation[0]["val_pixel_accuracy"] <= 1
    for branch in ("position", "channel"):  # cluster usage over the training steps before the validation
        assert validation[0][f"{branch}_clusters"] == 128
        assert 1 <= validation[0][f"{branch}_live"] <= 128 and 1 <= validation[0][f"{branch}_perplexity"] <= 128


def test_cluster_flags_reach_the_model_log_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    train.main(tiny(out, "--iters", "4", "--demo-images", "8", "--val-every", "2", "--num-clusters", "16",
                    "--cluster-init", "data", "--cluster-reseed", "1"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("val iter")]
    validation = [r for r in read_log(out) if "val_miou" in r]
    assert [r["iteration"] for r in validation] == [2, 4] and len(lines) == 2
    for record, line in zip(validation, lines):
        for branch in ("position", "channel"):
            live, perplexity = record[f"{branch}_live"], record[f"{branch}_perplexity"]
            assert record[f"{branch}_clusters"] == 16 and 1 <= live <= 16 and 1 <= perplexity <= 16
            assert f"{branch} clusters: {live}/16 live, perplexity {perplexity:.1f}" in line
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["args"]["cluster_init"] == "data" and checkpoint["args"]["cluster_reseed"] == 1
    model = train.build_model(checkpoint["args"])
    model.load_state_dict(checkpoint["model"])
    for branch in (model.position_branch, model.channel_branch):
        assert branch.clustering.cluster_init == "data" and branch.clustering.cluster_reseed == 1
        assert branch.clustering.initialised and branch.clustering.counts.min() >= 1
    clustering = model.position_branch.clustering
    centers = clustering.centers.clone()
    clustering.seed_centers(torch.rand(2, 128, 4, 4))  # the first call after loading: not drawn again
    assert torch.equal(clustering.centers, centers)


@pytest.mark.parametrize("device", DEVICES)
def test_train_step_channels_last_bf16(device):
    """train.train_step with a channels_last model and batch under bf16 autocast, against the same step in fp32."""
    torch.manual_seed(0)
    model = ClusterDANet(num_classes=3, backbone="resnet18", num_clusters=32).to(device)
    for module in model.modules():
        if isinstance(module, nn.Dropout2d):
            module.p = 0.0
    reference = copy.deepcopy(model)
    model.to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 40, 56, device=device)
    masks = torch.randint(0, 3, (2, 40, 56), device=device)
    masks[:, :4] = train.IGNORE_INDEX
    results = []
    for net, dtype, batch in ((model, torch.bfloat16, images.to(memory_format=torch.channels_last)),
                              (reference, torch.float32, images)):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        scaler = torch.amp.GradScaler(device, enabled=False)
        autocast = lambda: torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731
        results.append(train.train_step(net, batch, masks, optimizer, scaler, autocast, aux_weight=1.0))
    (losses, losses_ref) = results
    assert losses.keys() == {"loss", "out", "position", "channel"}
    for key in losses:
        assert losses[key].dtype == torch.float32
        assert losses[key].item() == pytest.approx(losses_ref[key].item(), rel=2e-2)
    assert relative_error(model.classifier[1].weight.grad, reference.classifier[1].weight.grad) < 2e-2
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert model.backbone.stem[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_a_batch_without_labelled_pixels_has_loss_0_not_nan():
    """All void: the loss is 0 and so are the gradients; otherwise the mean over the labelled pixels, as
    F.cross_entropy's."""
    torch.manual_seed(0)
    model = ClusterDANet(num_classes=3, backbone="resnet18", num_clusters=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images, masks = torch.randn(2, 3, 16, 16), torch.full((2, 16, 16), train.IGNORE_INDEX)
    losses = train.train_step(model, images, masks, optimizer, scaler, nullcontext, 1.0)
    assert all(v.item() == 0 for v in losses.values())
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    masks[0, :4] = 1
    model.eval()  # no dropout: the same logits twice
    losses = train.train_step(model, images, masks, optimizer, scaler, nullcontext, 1.0)
    with torch.no_grad():
        logits = model(images)["out"]
    assert losses["out"].item() == pytest.approx(F.cross_entropy(logits, masks, ignore_index=255).item(), rel=1e-5)


def _log_counts_on_rank(rank, world_size, init_file, out_dir, result_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    # rank r summed 3 steps of losses: loss r + 1 each step, the terms 0.5 (r + 1), 0.25 (r + 1), 0.25 (r + 1)
    sums = {k: torch.tensor(3.0 * w * (rank + 1)) for k, w in
            (("loss", 1.0), ("out", 0.5), ("position", 0.25), ("channel", 0.25))}
    run = SimpleNamespace(args=SimpleNamespace(batch_size=2, iters=10), iteration=3, world_size=world_size,
                          master=rank == 0, device=torch.device("cpu"), out_dir=Path(out_dir),
                          unwritten_log=[], earlier_run_kept=False)
    counts = train.StepCounts(run)
    counts.sums, counts.steps, counts.start, counts.start_iteration = sums, 3, time.perf_counter() - 1.0, 0
    assert counts.log_and_check(0.01) is False  # no failed step
    torch.save(counts.record, f"{result_file}.{rank}")
    torch.distributed.destroy_process_group()


def test_logged_loss_is_averaged_over_ranks(tmp_path):
    """Each of 2 ranks has its own loss (1 and 2 per step): both log their mean, 1.5."""
    torch.multiprocessing.spawn(_log_counts_on_rank, args=(2, tmp_path / "init", tmp_path, tmp_path / "r"), nprocs=2)
    for rank in range(2):
        record = torch.load(f"{tmp_path / 'r'}.{rank}")
        assert record["loss"] == pytest.approx(1.5) and record["out"] == pytest.approx(0.75)
        assert record["position"] == pytest.approx(0.375) and record["channel"] == pytest.approx(0.375)
        assert record["images_per_s"] == pytest.approx(3 * 2 * 2 / 1.0, rel=0.05)  # both ranks' images
    assert read_log(tmp_path) == [{k: v for k, v in torch.load(f"{tmp_path / 'r'}.0").items()}]  # rank 0 writes


def test_build_model_reads_the_attention_of_old_checkpoints():
    """Checkpoints written before --attention hold dense_attention: True is the dense path, False the default; DRANet
    has no PositionAttention, so a path for it is refused."""
    config = {**vars(train.parse_args(tiny("unused"))), "num_classes": 3}
    del config["attention"]
    for dense, attention in ((True, "dense"), (False, "auto")):
        upgraded = train.upgrade({"args": {**config, "dense_attention": dense}})["args"]
        assert train.build_model(upgraded).attention == attention
    upgraded = train.upgrade({"args": {**config, "dense_attention": True, "attention": "heads"}})["args"]
    assert train.build_model(upgraded).attention == "heads"
    with pytest.raises(train.UserError, match="--attention is DANet's position attention; DRANet's attends to 50"):
        train.build_model({**config, "model": "dranet", "attention": "dense"})


def test_offline_downloads_exit_2(voc_root, tmp_path, capsys, monkeypatch):
    """ImageNet weights and --download need the internet: offline (see isolate), one clear line each."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached weights
    line = cli_error(capsys, tiny(tmp_path / "out", "--data-root", voc_root, "--train-split", "train", "--pretrained"))
    assert "could not download the ImageNet weights of resnet18" in line and "--no-pretrained" in line
    line = cli_error(capsys, tiny(tmp_path / "out", "--data-root", tmp_path / "new", "--download"))
    assert f"could not download VOC 2012 into {tmp_path / 'new'}" in line
    assert_nothing_half_written(tmp_path, tmp_path / "out")


def test_compile_under_ddp_compiles_the_ddp_model(tmp_path):
    """torch.compile wraps DistributedDataParallel (its gradient all_reduce then overlaps the backward pass); the raw
    model, for validation and saving, is neither (a one-process group is enough to build the DDP wrapper)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        args = train.parse_args(tiny(tmp_path / "out", "--compile"))
        args.num_classes = 4
        model, raw_model, *_ = train.build_model_and_optimizer(args, None, torch.device("cpu"), world_size=2)
    finally:
        torch.distributed.destroy_process_group()
    assert isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(model._orig_mod, torch.nn.parallel.DistributedDataParallel)
    assert model._orig_mod.module is raw_model and type(raw_model) is ClusterDANet


def test_hints_one_line_on_every_rank_and_fp16_without_warnings(tmp_path, capsys, monkeypatch):
    """--data-root of another dataset's tree says which --dataset; under torchrun a user error is said once (rank 0)
    unless only this rank found it; an fp16 step on the CPU warns nothing."""
    make_cityscapes(tmp_path / "city")
    make_folder(tmp_path / "mine", n_train=2, n_val=1)
    for root, name, title in ((tmp_path / "city", "cityscapes", "Cityscapes"),
                              (tmp_path / "mine", "folder", "folder-dataset")):
        line = cli_error(capsys, tiny(tmp_path / "out", "--data-root", root))
        assert line == (f"error: {root} is neither a VOC2012 folder (with JPEGImages/ and ImageSets/Segmentation/) nor "
                        f"a folder holding VOC2012 or VOCdevkit/VOC2012 (it looks like a {title} tree: add --dataset "
                        f"{name})")
    line = cli_error(capsys, tiny(tmp_path / "out", "--dataset", "cityscapes", "--data-root", tmp_path / "mine"))
    assert line.endswith("(it looks like a folder-dataset tree: add --dataset folder)")

    def fails(this_rank):
        error = train.UserError("bad input")
        error.this_rank = this_rank
        raise error
    monkeypatch.setenv("RANK", "1")
    for this_rank, printed in ((False, ""), (True, "error: bad input\n")):
        with pytest.raises(SystemExit) as exit_info:
            train.run_main(lambda: fails(this_rank))
        assert exit_info.value.code == 2 and capsys.readouterr().err == printed
    monkeypatch.delenv("RANK")

    args = train.parse_args(["--device", "cpu", "--precision", "fp16", "--batch-size", "2"])
    device, _, _, autocast = train.setup_device(args)
    args.num_classes = 4
    model, _, optimizer, scheduler, scaler = train.build_model_and_optimizer(args, None, device, 1)
    images, masks = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses = train.train_step(model, images, masks, optimizer, scaler, autocast, args.aux_weight)
        scheduler.step()
    assert scaler.get_scale() == 2.0**10 and math.isfinite(losses["loss"].item())  # the first step was not skipped


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_without_gpu_exits_2(tmp_path, capsys):
    line = cli_error(capsys, tiny(tmp_path / "out", "--iters", "1") + ["--device", "cuda"])
    assert "--device cuda asked for CUDA, but torch.cuda.is_available() is False" in line
    assert_nothing_half_written(tmp_path, tmp_path / "out")


# ---------------------------------------------------------------------------------- train.py 3: validation and the mIoU

def test_confusion_matrix_by_hand():
    # 5 classes; class 3 is only ever predicted (IoU 0), class 4 never appears (IoU nan, left out of the mean);
    # the void pixels are predicted as 3 and 4, which must not count.
    target = torch.tensor([[0, 0, 0, 1, 1], [1, 2, 2, 255, 255]])
    prediction = torch.tensor([[0, 0, 1, 1, 1], [2, 2, 0, 3, 4]])
    metric = train.ConfusionMatrix(5)
    metric.update(prediction, target)
    metric.update(torch.tensor([3, 2]), torch.tensor([0, 2]))  # a second batch accumulates
    expected = np.zeros((5, 5), np.int64)
    for t, p in zip(target.flatten().tolist() + [0, 2], prediction.flatten().tolist() + [3, 2]):
        if t != 255:
            expected[t, p] += 1
    assert np.array_equal(metric.matrix.numpy(), expected)
    assert expected.sum() == 10
    # by hand: class 0: 2 right of 4 true, predicted 3 times (2 + one 2-pixel) -> 2 / (4 + 3 - 2) = 2/5
    #          class 1: 2 right of 3 true, predicted 3 times -> 2 / (3 + 3 - 2) = 1/2
    #          class 2: 2 right of 3 true, predicted 3 times -> 2 / 4 = 1/2
    #          class 3: 0 right, predicted once -> 0;  class 4: nothing -> nan
    result = metric.compute()
    np.testing.assert_allclose(result["iou"], [2 / 5, 1 / 2, 1 / 2, 0, np.nan])
    assert result["miou"] == pytest.approx((2 / 5 + 1 / 2 + 1 / 2 + 0) / 4)
    assert result["pixel_accuracy"] == pytest.approx(6 / 10)
    assert math.isnan(train.ConfusionMatrix(3).compute()["miou"])  # nothing seen yet


def test_distributed_validation_counts_every_image_once(tmp_path):
    data = tmp_path / "data"
    make_voc(data, n_train=4, n_val=3)
    out = tmp_path / "out"
    args = tiny(out, "--data-root", str(data), "--train-split", "train", "--iters", "2", "--val-every", "2")
    result = run_script(args, cwd=tmp_path, timeout=180,
                        module=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert result.returncode == 0, "\n".join(line for line in result.stderr.splitlines() if "Error" in line)
    logged = [r for r in read_log(out) if "val_miou" in r][-1]

    # the same weights, one process, every val image once; metric by numpy
    checkpoint = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    model = train.build_model(checkpoint["args"])
    model.load_state_dict(checkpoint["model"])
    model.eval()
    matrix = np.zeros((21, 21), np.int64)
    for image, mask in train.VOCSegmentation(data, "val"):
        H, W = mask.shape
        with torch.no_grad():  # pad to a multiple of 8 at the bottom and right, crop the prediction back
            logits = model(F.pad(image[None], (0, -W % 8, 0, -H % 8)))["out"][0, :, :H, :W]
        keep = mask != 255
        np.add.at(matrix, (mask[keep].numpy(), logits.argmax(0)[keep].numpy()), 1)
    tp, union = np.diag(matrix), matrix.sum(0) + matrix.sum(1) - np.diag(matrix)
    assert logged["val_pixel_accuracy"] == pytest.approx(tp.sum() / matrix.sum(), abs=1e-4)
    assert logged["val_miou"] == pytest.approx(np.mean(tp[union > 0] / union[union > 0]), abs=1e-4)


# ----------------------------------------------- train.py 4a: data formats (VOC, Cityscapes, a folder, the demo shapes)

def test_find_voc_root_accepts_voc2012_its_parent_or_its_grandparent(voc_root):
    voc = voc_root / "VOCdevkit" / "VOC2012"
    assert train.find_voc_root(voc_root) == voc
    assert train.find_voc_root(voc) == voc
    assert train.find_voc_root(voc_root / "VOCdevkit") == voc
    assert len(train.VOCSegmentation(voc, "train")) == len(train.VOCSegmentation(voc_root, "train")) == 4
    assert len(train.VOCSegmentation(voc_root / "VOCdevkit", "train")) == 4
    with pytest.raises(train.UserError, match="is neither a VOC2012 folder"):
        train.find_voc_root(voc / "JPEGImages")


def test_read_image_as_the_user_sees_it(tmp_path):
    """EXIF orientation applied (a phone photo stored sideways), 16-bit grey and float grey scaled to 8 bits."""
    rng = np.random.RandomState(0)
    stored = rng.randint(0, 256, (5, 8, 3), dtype=np.uint8)  # 5 rows, 8 columns, as the camera stored it
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF Orientation 6: turn 90 degrees clockwise to show it
    Image.fromarray(stored).save(tmp_path / "phone.png", exif=exif)
    image = train.read_image(tmp_path / "phone.png")
    assert image.shape == (3, 8, 5) and image.dtype == torch.uint8
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), np.rot90(stored, k=-1))  # k=-1: clockwise

    grey16 = rng.randint(0, 65536, (6, 7)).astype(np.uint16)
    grey16[0, :2] = 0, 65535
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as png:
        assert png.mode == "I;16"
    image = train.read_image(tmp_path / "grey16.png")
    expected = np.floor(grey16 / 65535 * 255 + 0.5).astype(np.uint8)  # 0..65535 -> 0..255, rounded
    assert expected[0, :2].tolist() == [0, 255]
    for channel in image:
        np.testing.assert_array_equal(channel.numpy(), expected)

    grey = rng.rand(4, 9).astype(np.float32)
    Image.fromarray(grey).save(tmp_path / "float.tiff")
    image = train.read_image(tmp_path / "float.tiff")
    np.testing.assert_array_equal(image[1].numpy(), np.floor(grey.astype(np.float64) * 255 + 0.5).astype(np.uint8))
    Image.fromarray(grey * 1000).save(tmp_path / "depth.tiff")  # not an image in 0..1: refused, not guessed
    with pytest.raises(train.UserError, match=r"depth.tiff: its F values span [\d.]+\.\.[\d.]+, not 0\.\.1; "
                                              r"convert it to an 8-bit image"):
        train.read_image(tmp_path / "depth.tiff")


def test_train_aug_reads_segmentation_class_aug(tmp_path):
    voc = make_voc(tmp_path, train_aug=True, n_aug_only=2)
    ids = (voc / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    # an Aug mask that differs from its SegmentationClass twin: all background but a void square
    different = np.zeros(VOC_TEST_SIZES[0], np.uint8)
    different[5:9, 5:9] = 255
    save_mask(different, voc / "SegmentationClassAug" / f"{ids[0]}.png", mode="L")
    dataset = train.VOCSegmentation(tmp_path, "train_aug")
    assert dataset.ids == ids and len(dataset) == 6
    assert all(path.parent.name == "SegmentationClassAug" for path in dataset.masks)
    for index, name in enumerate(ids):
        expected = np.array(Image.open(voc / "SegmentationClassAug" / f"{name}.png"))
        assert torch.equal(dataset[index][1], torch.from_numpy(expected).long())
    assert torch.equal(dataset[0][1], torch.from_numpy(different).long())
    assert not (voc / "SegmentationClass" / f"{ids[-1]}.png").exists()  # an SBD-only image


def test_missing_data_root_exits_2(tmp_path):
    missing = tmp_path / "no-such-folder"
    result = run_script(tiny(tmp_path / "out", "--data-root", str(missing)), cwd=tmp_path)
    assert_script_error(result, f"data root {missing} does not exist")
    assert result.stdout == ""
    assert_nothing_half_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("case", ["not_voc", "no_train_aug_txt", "no_aug_masks", "empty_split"])
def test_malformed_data_root_exits_2(case, tmp_path, capsys):
    data = tmp_path / "data"
    split = ["--train-split", "train"]
    if case == "not_voc":
        (data / "images").mkdir(parents=True)
        (data / "images" / "a.jpg").write_bytes(b"")
        expected = f"{data} is neither a VOC2012 folder"
    else:
        voc = make_voc(data)
        if case == "no_train_aug_txt":
            split = []  # the default, train_aug
            expected = f"split file {voc}/ImageSets/Segmentation/train_aug.txt not found (train_aug comes from SBD"
        elif case == "no_aug_masks":
            (voc / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("2007_000000\n")
            split = ["--train-split", "train_aug"]
            expected = f"mask folder {voc}/SegmentationClassAug not found"
        else:
            (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n")
            expected = f"split file {voc}/ImageSets/Segmentation/train.txt lists no images"
    line = cli_error(capsys, tiny(tmp_path / "out", "--data-root", str(data), *split, "--iters", "2"))
    assert expected in line
    assert_nothing_half_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("missing", ["images", "mask"])
def test_missing_listed_file_exits_2_before_training(missing, voc_root, tmp_path, capsys):
    """Found when the dataset is built, not when first read: out dir not even created."""
    voc = voc_root / "VOCdevkit" / "VOC2012"
    if missing == "images":
        for name in ("2007_000003", "2007_000001"):
            (voc / "JPEGImages" / f"{name}.jpg").unlink()
        expected = (f"image listed in {voc}/ImageSets/Segmentation/train.txt not found: "
                    f"{voc}/JPEGImages/2007_000001.jpg (and 1 more)")
    else:
        (voc / "SegmentationClass" / "2007_000002.png").unlink()
        expected = (f"mask listed in {voc}/ImageSets/Segmentation/train.txt not found: "
                    f"{voc}/SegmentationClass/2007_000002.png")
    line = cli_error(capsys, tiny(tmp_path / "out", "--data-root", voc_root, "--train-split", "train", "--iters", "2"))
    assert line == f"error: {expected}"
    assert_nothing_half_written(tmp_path, tmp_path / "out")


def test_truncated_image_exits_2_naming_it(voc_root, tmp_path):
    """Through a DataLoader worker (--workers 1): the error is re-raised in the main process, still one line."""
    image = voc_root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000000.jpg"  # in the first batch
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    args = tiny(tmp_path / "out", "--data-root", str(voc_root), "--train-split", "train", "--iters", "2")
    result = run_script([*args, "--workers", "1"], cwd=tmp_path)
    assert_script_error(result, f"cannot read image {image}")
    assert_nothing_half_written(tmp_path, tmp_path / "out")  # the folder the run created is gone


def test_garbage_image_exits_2_naming_it(voc_root, tmp_path, capsys):
    image = voc_root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000001.jpg"
    image.write_bytes(b"this is not a JPEG file" * 10)
    line = cli_error(capsys, tiny(tmp_path / "out", "--data-root", str(voc_root), "--train-split", "train",
                                  "--iters", "2"))
    assert f"cannot read image {image}" in line
    assert_nothing_half_written(tmp_path, tmp_path / "out")  # the folder the run created is gone


@pytest.mark.parametrize("case", ["label_42", "wrong_size"])
def test_bad_mask_exits_2_naming_it(case, voc_root, tmp_path, capsys):
    mask_file = voc_root / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000003.png"
    mask = np.array(Image.open(mask_file))  # H 45, W 37
    if case == "label_42":
        mask[10, 10:13] = 42
        expected = f"mask {mask_file} is not a 37x45 map of labels 0..20 and 255 (found [42])"
    else:
        mask = mask[:-1]
        expected = f"mask {mask_file} is not a 37x45 map of labels 0..20 and 255: it is 37x44"
    save_mask(mask, mask_file)
    line = cli_error(capsys, tiny(tmp_path / "out", "--data-root", str(voc_root), "--train-split", "train",
                                  "--iters", "2"))
    assert line == f"error: {expected}"
    assert_nothing_half_written(tmp_path, tmp_path / "out")  # the folder the run created is gone


def test_more_processes_than_images_exits_2(tmp_path, capsys, monkeypatch):
    """As under torchrun with WORLD_SIZE=2, without starting a process group: setup_device reports 2 processes."""
    make_voc(tmp_path / "data", n_train=1)
    monkeypatch.setattr(train, "setup_device", lambda args: (torch.device("cpu"), 0, 2, nullcontext))
    line = cli_error(capsys, tiny(tmp_path / "out", "--data-root", str(tmp_path / "data"), "--train-split", "train",
                                  "--batch-size", "1"))
    assert "1 training images cannot fill a batch of 1 on each of 2 processes" in line
    assert_nothing_half_written(tmp_path, tmp_path / "out")


def windows_text(lines, bom=True):
    """`lines` as a Windows editor saves them: UTF-8 with a byte-order mark, CRLF line ends, trailing blanks, blank
    lines at the end."""
    return (codecs.BOM_UTF8 if bom else b"") + "".join(f"{line}  \r\n" for line in lines).encode() + b"\r\n \r\n"


def test_voc_split_files_saved_on_windows_train_and_evaluate(tmp_path, capsys):
    """VOC split lists in UTF-8 with a BOM, CRLF, trailing blanks and blank lines (train.txt also joined from two such
    files: a BOM in the middle), or in UTF-16 (PowerShell's `>`): the same ids; a run trains and evaluate.py
    evaluates on them. A split file in Latin-1 is one line naming it, in both scripts."""
    voc = make_voc(tmp_path / "data")
    splits = voc / "ImageSets" / "Segmentation"
    ids = {split: (splits / f"{split}.txt").read_text().split() for split in ("train", "val")}
    (splits / "train.txt").write_bytes(windows_text(ids["train"][:2]) + windows_text(ids["train"][2:]))
    (splits / "val.txt").write_bytes(windows_text(ids["val"]))
    assert train.VOCSegmentation(tmp_path / "data", "train").ids == ids["train"]
    (splits / "trainval.txt").write_bytes("\r\n".join(ids["train"] + ids["val"]).encode("utf-16"))
    assert train.VOCSegmentation(tmp_path / "data", "trainval").ids == ids["train"] + ids["val"]
    out = tmp_path / "out"
    assert run_cli(capsys, tiny(out, "--data-root", tmp_path / "data", "--train-split", "train", "--iters", "1",
                                "--val-every", "1"))[0] == 0
    argv = ["--checkpoint", out / "last.pt", "--data-root", tmp_path / "data", "--device", "cpu", "--workers", "0",
            "--json", tmp_path / "r.json"]
    code, _, err = run_cli(capsys, argv, main=evaluate.main)
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["images"] == len(ids["val"]) == 2

    (splits / "val.txt").write_bytes(f"{ids['val'][0]}\n{ids['val'][1]}\n# é\n".encode("latin-1"))
    expected = (f"error: {splits / 'val.txt'} is not UTF-8 text (byte 0xe9 on line 3: saved in another encoding, such "
                f"as Latin-1 or Windows-1252?): save it as UTF-8")
    assert cli_error(capsys, tiny(tmp_path / "out2", "--data-root", tmp_path / "data", "--train-split", "train",
                                  "--iters", "1")) == expected
    assert cli_error(capsys, argv[:-2] + ["--json", tmp_path / "r2.json"], main=evaluate.main) == expected
    (splits / "val.txt").write_bytes("\n".join(ids["val"]).encode("utf-16-le"))  # UTF-16 without its mark
    assert cli_error(capsys, tiny(tmp_path / "out2", "--data-root", tmp_path / "data", "--train-split", "train",
                                  "--iters", "1")) == (
        f"error: {splits / 'val.txt'} holds NUL characters (UTF-16 or UTF-32 without a byte-order mark, or not a text "
        f"file): save it as UTF-8")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "r2.json").exists()


def test_cityscapes_label_ids_become_train_ids(tmp_path):
    samples = make_cityscapes(tmp_path)
    for split, cities in (("train", ("aachen", "bremen")), ("val", ("lindau",)), ("trainval", ("aachen", "bremen",
                                                                                                 "lindau"))):
        dataset = train.Cityscapes(tmp_path, split)
        assert dataset.ids == sorted(name for name in samples if name.split("_")[0] in cities)
        assert list(dataset.class_names) == CITYSCAPES_NAMES
        for index, name in enumerate(dataset.ids):
            image, mask = dataset[index]
            source, label_ids = samples[name]
            expected = np.vectorize(lambda i: CITYSCAPES_TRAIN_IDS.get(i, 255))(label_ids)
            assert mask.dtype == torch.int64 and np.array_equal(mask.numpy(), expected)
            assert set(mask.unique().tolist()) == set(range(19)) | {255}  # every id was drawn
            torch.testing.assert_close(unnormalise(image), torch.from_numpy(source).permute(2, 0, 1) / 255)
    # training items: random crops keep the pairing, and padding is void
    image, mask = train.Cityscapes(tmp_path, "train", train.train_transform(48, 40))[0]
    assert image.shape == (3, 48, 48) and mask.shape == (48, 48)
    assert (mask[(image == ((0 - MEAN) / STD)[:, None, None]).all(0)] == 255).all()


def test_folder_dataset_reads_pairs_by_name(tmp_path):
    samples = make_folder(tmp_path)
    dataset = train.FolderDataset(tmp_path, "train")
    assert dataset.class_names == tuple(FOLDER_CLASSES) and dataset.ids == ["train_0", "train_1", "train_2", "train_3"]
    assert [p.suffix for p in dataset.images] == [".png", ".jpg", ".jpeg", ".png"]
    for index, name in enumerate(dataset.ids):
        image, mask = dataset[index]
        source, labels = samples[name]
        assert torch.equal(mask, torch.from_numpy(labels).long()) and 255 in mask  # grey and palette PNGs alike
        expected = torch.from_numpy(source).permute(2, 0, 1) / 255
        if dataset.images[index].suffix == ".png":
            torch.testing.assert_close(unnormalise(image), expected)
        else:  # JPEG: close to the colours away from the edges, where it rings
            inside = interior(mask)
            torch.testing.assert_close(unnormalise(image)[:, inside], expected[:, inside], atol=0.05, rtol=0)


def test_folder_dataset_is_what_is_listed(tmp_path, capsys):
    """Subfolders are read (the mask at the same relative path); resource forks, hidden files and folders named like
    images are not images; classes.txt in UTF-16 or UTF-8 with comments (Latin-1 is one line, not a guess); a broken
    link or a split a folder dataset has not is one line before anything runs."""
    root = tmp_path / "data"
    samples = make_folder(root)
    for folder in ("images", "masks"):
        (root / folder / "train" / "farm").mkdir()
    image, mask = samples["train_0"]
    Image.fromarray(image).save(root / "images" / "train" / "farm" / "cow.png")
    save_mask(mask, root / "masks" / "train" / "farm" / "cow.png")
    (root / "images" / "train" / "._train_0.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02Mac OS X")  # resource forks
    (root / "masks" / "train" / "._train_0.png").write_bytes(b"\x00\x05\x16\x07\x00\x02Mac OS X")
    (root / "images" / "train" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "images" / "train" / ".thumbnails").mkdir()
    Image.new("RGB", (4, 4)).save(root / "images" / "train" / ".thumbnails" / "train_1.jpg")
    (root / "images" / "train" / "album.jpg").mkdir()  # a folder named like an image
    classes = "# classes of the farm photos\nsky\n# the ground\ngrass\ncow café\n\n"
    (root / "classes.txt").write_bytes(classes.encode("latin-1"))
    with pytest.raises(train.UserError) as error:
        train.FolderDataset(root, "train")
    assert str(error.value) == (f"{root / 'classes.txt'} is not UTF-8 text (byte 0xe9 on line 5: saved in another "
                                f"encoding, such as Latin-1 or Windows-1252?): save it as UTF-8")
    for encoding in ("utf-16", "utf-8-sig", "utf-8"):
        (root / "classes.txt").write_bytes(classes.encode(encoding))
        dataset = train.FolderDataset(root, "train")
        assert dataset.class_names == ("sky", "grass", "cow café"), encoding
    assert dataset.ids == ["farm/cow", "train_0", "train_1", "train_2", "train_3"] and dataset.hidden == 4
    assert torch.equal(dataset[0][1], torch.from_numpy(mask).long())
    both = train.FolderDataset(root, "trainval")
    assert both.ids == [f"train/{i}" for i in dataset.ids] + ["val/val_0", "val/val_1"]
    lines = []
    train.check_masks(train.FolderDataset(root, "val"), dataset, 0, lines.append)
    assert len(lines) == 1 and lines[0].startswith("data: train 5 images (4 hidden files left out), val 2 images; "
                                                   "masks checked in ")

    flags = tiny(tmp_path / "out", "--dataset", "folder", "--data-root", root, "--iters", "2")
    save_mask(mask, root / "masks" / "train" / "gone.png")
    (root / "images" / "train" / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    assert cli_error(capsys, flags) == (f"error: image under {root / 'images'} is a broken link: "
                                        f"{root / 'images' / 'train' / 'gone.jpg'}")
    (root / "images" / "train" / "gone.jpg").unlink()
    (root / "masks" / "train" / "gone.png").unlink()
    assert cli_error(capsys, flags + ["--train-split", "train_aug"]) == (
        "error: a folder dataset has no split train_aug (train, val or trainval: images/train/ and images/val/)")
    assert not (tmp_path / "out").exists()


def test_classes_txt_saved_on_windows_trains_and_evaluates(tmp_path, capsys):
    """classes.txt in UTF-8 with a BOM, CRLF, a comment, trailing blanks and blank lines (also between names): the
    same class names in the run, its checkpoint and evaluate.py's results."""
    root = tmp_path / "data"
    make_folder(root)
    (root / "classes.txt").write_bytes(windows_text(["# the farm", FOLDER_CLASSES[0], "", *FOLDER_CLASSES[1:]]))
    assert train.FolderDataset(root, "val").class_names == tuple(FOLDER_CLASSES)
    out = tmp_path / "out"
    assert run_cli(capsys, tiny(out, "--dataset", "folder", "--data-root", root, "--iters", "1",
                                "--val-every", "1"))[0] == 0
    assert torch.load(out / "last.pt", weights_only=True)["class_names"] == FOLDER_CLASSES
    code, _, err = run_cli(capsys, ["--checkpoint", out / "last.pt", "--data-root", root, "--device", "cpu",
                                    "--workers", "0", "--json", tmp_path / "r.json"], main=evaluate.main)
    assert code == 0, err
    assert list(json.loads((tmp_path / "r.json").read_text())["per_class_iou"]) == FOLDER_CLASSES


@pytest.mark.parametrize("case", ["cityscapes_no_leftImg8bit", "cityscapes_no_gtFine", "cityscapes_empty_split",
                                  "cityscapes_image_without_mask", "cityscapes_bad_label_id", "folder_no_classes_txt",
                                  "folder_empty_classes_txt", "folder_image_without_mask", "folder_mask_without_image",
                                  "folder_empty_split", "folder_no_split_folder", "folder_bad_mask_value",
                                  "dataset_without_data_root", "download_not_voc"])
def test_bad_dataset_exits_2_naming_the_file(case, tmp_path, capsys):
    flags, fragments = break_dataset(case, tmp_path / "data")
    line = cli_error(capsys, tiny(tmp_path / "out", *flags, "--iters", "2", "--train-split", "train"))
    assert all(str(f) in line for f in fragments), line
    assert_nothing_half_written(tmp_path, tmp_path / "out")  # also where masks are read in training


def test_bad_mask_value_exits_2_from_a_data_loading_worker(tmp_path):
    flags, fragments = break_dataset("folder_bad_mask_value", tmp_path / "data")
    result = run_script([*map(str, tiny(tmp_path / "out", *flags)), "--iters", "2", "--workers", "1"], cwd=tmp_path)
    assert_script_error(result, *fragments)


def test_masks_that_are_not_what_they_claim(tmp_path, capsys):
    """A colour mask is named as one; a photo's EXIF orientation turns its mask too, and explains a size mismatch;
    sizes are W x H; the 0/255 binary-mask mistake is a warning, a val set without a labelled pixel an error (train.py
    and evaluate.py)."""
    root = tmp_path / "data"
    make_folder(root, n_train=2, n_val=1)
    flags = tiny(tmp_path / "out", "--dataset", "folder", "--data-root", root, "--iters", "2")
    mask_file = root / "masks" / "train" / "train_1.png"
    labels = np.array(Image.open(mask_file))
    Image.fromarray(np.array(evaluate.PALETTE, np.uint8)[labels]).save(mask_file)  # VOC's colours, as RGB
    assert cli_error(capsys, flags) == (
        f"error: mask {mask_file} is a 3-channel colour image (e.g. colour (128, 0, 0)), not a map of class indices "
        f"0..2 and 255: save each pixel's class index as a grey (L) or palette (P) PNG (see README)")
    assert not (tmp_path / "out").exists()
    Image.fromarray(np.repeat(labels[..., None], 3, axis=2)).save(mask_file)  # the indices in 3 equal channels
    assert torch.equal(train.FolderDataset(root, "train")[1][1], torch.from_numpy(labels).long())

    stored = np.zeros((16, 16, 3), np.uint8)  # a square phone photo stored sideways: shown turned 90 deg clockwise
    stored[:, :5] = FOLDER_COLOURS[2]
    stored_mask = np.zeros((16, 16), np.uint8)
    stored_mask[:, :5] = 2  # drawn on the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(root / "images" / "train" / "phone.png", exif=exif)
    save_mask(stored_mask, root / "masks" / "train" / "phone.png")
    with Image.open(root / "images" / "train" / "phone.png") as photo:
        assert np.array_equal(np.array(ImageOps.exif_transpose(photo)), np.rot90(stored, -1))  # what viewers show
    dataset = train.FolderDataset(root, "train")
    image, mask = train.read_pair(dataset, dataset.ids.index("phone"))
    assert np.array_equal(image.permute(1, 2, 0).numpy(), np.rot90(stored, -1))
    assert np.array_equal(mask, np.rot90(stored_mask, -1))
    assert np.array_equal(mask == 2, (image.permute(1, 2, 0).numpy() == FOLDER_COLOURS[2]).all(-1))

    Image.fromarray(np.zeros((12, 20, 3), np.uint8)).save(root / "images" / "train" / "wide.png", exif=exif)
    save_mask(np.zeros((20, 12), np.uint8), root / "masks" / "train" / "wide.png")  # saved as shown, 12 x 20
    assert cli_error(capsys, flags) == (
        f"error: mask {root / 'masks' / 'train' / 'wide.png'} is not a 12x20 map of class indices 0..2 and 255: it is "
        f"20x12; its image's EXIF orientation 6 turns the image to 12x20 and the mask with it (masks are drawn on the "
        f"stored pixels), but this mask is already 12x20: save it as the image is stored, 20x12, or save the image "
        f"without its EXIF orientation")

    binary = tmp_path / "binary"  # object and background, the object saved as 255
    (binary / "classes.txt").parent.mkdir()
    (binary / "classes.txt").write_text("background\nobject\n")
    for split, count in (("train", 3), ("val", 1)):
        for i in range(count):
            for folder in ("images", "masks"):
                (binary / folder / split).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(binary / "images" / split / f"{i}.png")
            black_and_white = np.zeros((8, 8), np.uint8)
            black_and_white[2:6, 2:6] = 255  # a quarter of the pixels
            save_mask(black_and_white, binary / "masks" / split / f"{i}.png", mode="L")
    lines = []
    train.check_masks(train.FolderDataset(binary, "val"), train.FolderDataset(binary, "train"), 0, lines.append)
    assert lines[1] == ("warning: class 1 (object) never occurs in the 3 training masks, and 255 (ignored) covers 25% "
                        "of their pixels: masks saved as black and white 0/255 images mark the objects 255, which is "
                        "ignored; save them as 0/1 (255 only for pixels to ignore)")
    save_mask(np.full((8, 8), 255, np.uint8), binary / "masks" / "val" / "0.png", mode="L")
    no_label = ("error: the val set has no labelled pixel in its 1 masks (all 255, ignored): no mIoU can be measured "
                "on it; check the masks (class indices, 255 only to ignore)")
    assert cli_error(capsys, tiny(tmp_path / "out", "--dataset", "folder", "--data-root", binary)) == no_label
    config = {**vars(train.parse_args(tiny(tmp_path / "out"))), "num_classes": 2, "dataset": "folder"}
    train.save_checkpoint({"model": train.build_model(config).state_dict(), "args": config, "iteration": 0,
                           "class_names": ["background", "object"]}, tmp_path / "binary.pt")
    assert cli_error(capsys, ["--checkpoint", tmp_path / "binary.pt", "--data-root", binary, "--workers", "0",
                              "--device", "cpu"], main=evaluate.main) == no_label
    assert not (tmp_path / "out").exists()


def test_image_of_a_kind_not_read_is_named_when_its_partner_is_refused(tmp_path, capsys):
    """Folder dataset, Cityscapes and VOC: the file that is there under a name not read is named, with what is read."""
    root = tmp_path / "folder"
    make_folder(root)
    images, masks = root / "images" / "train", root / "masks" / "train"
    Image.new("RGB", (8, 8)).save(images / "extra.webp")
    Image.new("L", (8, 8)).save(masks / "extra.png")
    flags = tiny(tmp_path / "out", "--dataset", "folder", "--data-root", root, "--iters", "1")
    assert cli_error(capsys, flags) == (
        f"error: mask {masks / 'extra.png'} has no image {images / 'extra.jpg'} (.jpeg, .png): found "
        f"{images / 'extra.webp'}, a .webp file, which is not read (readable: .jpg, .jpeg, .png)")
    (masks / "extra.png").rename(masks / "extra.bmp")
    (images / "extra.webp").rename(images / "extra.png")
    assert cli_error(capsys, flags) == (f"error: image {images / 'extra.png'} has no mask {masks / 'extra.png'}: "
                                        f"found {masks / 'extra.bmp'}, a .bmp file, which is not read (readable: .png)")
    for path in images.iterdir():
        path.rename(path.with_suffix(".tif" if path.suffix == ".png" else ".webp"))
    assert cli_error(capsys, flags) == (f"error: {images} holds no images (NAME.jpg, .jpeg or .png, also in "
                                        f"subfolders): it holds 5 other files (.tif, .webp), which are not read")

    root = tmp_path / "cityscapes"
    make_cityscapes(root)
    flags = tiny(tmp_path / "out", "--dataset", "cityscapes", "--data-root", root, "--iters", "1")
    city = root / "gtFine" / "train" / "bremen"
    (city / "bremen_000001_000019_gtFine_labelIds.png").unlink()
    assert cli_error(capsys, flags) == (
        f"error: image {root}/leftImg8bit/train/bremen/bremen_000001_000019_leftImg8bit.png has no mask "
        f"{city / 'bremen_000001_000019_gtFine_labelIds.png'}: found {city / 'bremen_000001_000019_gtFine_color.png'} "
        f"(and bremen_000001_000019_gtFine_instanceIds.png, bremen_000001_000019_gtFine_polygons.json), which are not "
        f"read (readable: _gtFine_labelIds.png)")
    (city / "bremen_000001_000019_gtFine_color.png").rename(city / "bremen_000001_000019_gtFine_labelIds.png")
    image = root / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png"
    Image.open(image).save(image.with_suffix(".jpg"))
    image.unlink()
    assert cli_error(capsys, flags) == (
        f"error: mask {root}/gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png has no image {image}: found "
        f"{image.with_suffix('.jpg')}, a .jpg file, which is not read (readable: _leftImg8bit.png)")
    for path in (root / "leftImg8bit" / "train").glob("*/*.png"):
        path.rename(path.with_suffix(".jpg"))
    assert cli_error(capsys, flags) == (
        f"error: {root / 'leftImg8bit' / 'train'} holds no <city>/<id>_leftImg8bit.png images: found "
        f"{image.with_suffix('.jpg')} and 3 more, which are not read")

    voc = make_voc(tmp_path / "voc")
    flags = tiny(tmp_path / "out", "--data-root", voc, "--train-split", "train", "--iters", "1")
    jpeg = voc / "JPEGImages" / "2007_000001.jpg"
    Image.open(jpeg).save(jpeg.with_suffix(".png"))
    jpeg.unlink()
    split = voc / "ImageSets" / "Segmentation" / "train.txt"
    assert cli_error(capsys, flags) == (f"error: image listed in {split} not found: {jpeg}: found "
                                        f"{jpeg.with_suffix('.png')}, a .png file, which is not read (readable: .jpg)")
    jpeg.with_suffix(".png").rename(jpeg.with_suffix(".JPG"))
    (voc / "JPEGImages" / "2007_000002.jpg").unlink()
    assert cli_error(capsys, flags) == (f"error: image listed in {split} not found: {jpeg} (and 1 more): found "
                                        f"{jpeg.with_suffix('.JPG')}, which is not read (readable: .jpg)")


def test_synthetic_shapes_are_deterministic():
    dataset = train.SyntheticShapes(8, size=32, seed=0)
    image, mask = dataset[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert mask.shape == (32, 32) and mask.dtype == torch.int64
    torch.manual_seed(123)  # the global generator does not matter
    again = train.SyntheticShapes(8, size=32, seed=0)[3]
    assert torch.equal(image, again[0]) and torch.equal(mask, again[1])
    assert not torch.equal(mask, dataset[4][1]) and not torch.equal(mask, train.SyntheticShapes(8, 32, seed=1)[3][1])
    assert len(dataset) == 8 and dataset.class_names == train.SHAPE_CLASSES
    # every shape has its class colour (+-0.1 jitter, noise 0.04), on a background that is neither
    for index in range(8):
        image, mask = dataset[index]
        assert set(mask.unique().tolist()) <= {0, 1, 2, 3} and (mask > 0).any() and (mask == 0).any()
        pixels = unnormalise(image)
        for label in mask.unique().tolist():
            if label:
                median = pixels[:, mask == label].median(1).values
                torch.testing.assert_close(median, train.SyntheticShapes.COLOURS[label], atol=0.15, rtol=0)


# ------------------------------------- train.py 4b: checkpoints, the original code's checkpoints, --init-from, resuming

def test_checkpoint_loads_with_weights_only_and_reproduces_validation(demo_run):
    checkpoint = torch.load(demo_run / "last.pt", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "iteration", "args", "best_miou"} <= checkpoint.keys()
    assert checkpoint["iteration"] == DEMO_ITERS
    assert checkpoint["args"]["backbone"] == "resnet18" and checkpoint["args"]["num_classes"] == 4
    assert checkpoint["class_names"] == list(train.SHAPE_CLASSES)
    best = torch.load(demo_run / "best.pt", map_location="cpu", weights_only=True)
    assert best["iteration"] == DEMO_ITERS and best["best_miou"] == checkpoint["best_miou"]
    validation = [r for r in read_log(demo_run) if "val_miou" in r][-1]
    assert checkpoint["best_miou"] == validation["val_miou"]

    # the saved weights give the logged validation mIoU, computed here with numpy on the demo's val set
    model = train.build_model(checkpoint["args"])
    model.load_state_dict(checkpoint["model"])
    model.eval()
    val_set = train.SyntheticShapes(64, 32, seed=1)
    images, masks = map(torch.stack, zip(*(val_set[i] for i in range(len(val_set)))))
    with torch.no_grad():
        prediction = model(images)["out"].argmax(1).numpy()
    truth = masks.numpy()
    iou = []
    for c in range(4):
        union = np.sum((truth == c) | (prediction == c))
        if union:
            iou.append(np.sum((truth == c) & (prediction == c)) / union)
    assert np.mean(iou) == pytest.approx(validation["val_miou"], abs=2e-3)  # argmax ties may differ by a pixel
    assert np.mean(truth == prediction) == pytest.approx(validation["val_pixel_accuracy"], abs=2e-3)


def test_failed_save_leaves_old_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    """A save that dies half-way (disk full, Ctrl-C) keeps the previous last.pt and leaves nothing behind."""
    path = tmp_path / "last.pt"
    train.save_checkpoint({"iteration": 1}, path)
    assert torch.load(path, weights_only=True) == {"iteration": 1} and not list(tmp_path.glob("*.tmp"))

    def half_save(state, file):
        file.write(b"PK\x03\x04 half a zip file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(train.RunError, match="no space left on the device") as error:
        train.save_checkpoint({"iteration": 2}, path)
    assert error.value.code == train.EXIT_DISK_FULL
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"iteration": 1}
    assert not list(tmp_path.glob("*.tmp"))


def test_temporary_files_belong_to_one_thread(tmp_path):
    """Two threads writing one file at once: each writes its own temporary file (.NAME.PID.THREAD.RANDOM.tmp beside
    it), neither dies, the file is whole (the last rename wins) and no temporary file is left."""
    path = tmp_path / "pictures" / "a.png"
    first_started, second_done, names = threading.Event(), threading.Event(), {}

    def write(tag, before_end=None):
        def write_to(tmp):
            names[tag] = Path(tmp).name
            with open(tmp, "wb") as file:
                file.write(tag.encode() * 1000)
                if before_end is not None:
                    before_end()
                file.write(b"end")
        return write_to

    def slow():  # writes half, waits while the other thread writes and renames, then finishes
        first_started.set()
        assert second_done.wait(30)

    errors = []

    def save(tag, before_end=None):
        try:
            train.save_atomic(path, write(tag, before_end))
        except Exception as e:  # reported below, for either thread
            errors.append(e)

    first = threading.Thread(target=save, args=("A", slow))
    first.start()
    assert first_started.wait(30)
    save("B")
    second_done.set()
    first.join(30)
    assert not errors and not first.is_alive()
    assert path.read_bytes() == b"A" * 1000 + b"end"  # the later rename, whole
    pid = os.getpid()
    assert names["A"] != names["B"]
    for name in names.values():
        assert re.fullmatch(rf"\.a\.png\.{pid}\.\d+\.[0-9a-f]{{6}}\.tmp", name), name
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.png"]


def bad_checkpoint(case, real, tmp_path):
    """(path, expected message fragment) for a --resume checkpoint that train.py must refuse."""
    path = tmp_path / f"{case}.pt"
    if case == "missing":
        return path, f"checkpoint {path} not found"
    if case == "truncated":
        data = real.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path, f"checkpoint {path} cannot be read (truncated or not a PyTorch file?)"
    checkpoint = torch.load(real, map_location="cpu", weights_only=True)
    if case == "other_num_classes":  # a VOC model (21 classes), resumed on the demo (4)
        checkpoint["model"] = ClusterDANet(num_classes=21, backbone="resnet18").state_dict()
        checkpoint["args"]["num_classes"], checkpoint["class_names"] = 21, list(train.VOC_CLASSES)
        message = f"checkpoint {path} predicts 21 classes, the dataset has 4 (a resumed run keeps its classes"
    elif case == "other_backbone":
        checkpoint["args"]["backbone"] = "resnet34"
        checkpoint["model"] = ClusterDANet(num_classes=4, backbone="resnet34").state_dict()
        message = f"checkpoint {path} was trained with --backbone resnet34: resume with --backbone resnet34"
    elif case == "other_num_clusters":
        checkpoint["model"] = ClusterDANet(num_classes=4, backbone="resnet18", num_clusters=32).state_dict()
        message = f"checkpoint {path} is for another model (size mismatch for"
    elif case == "no_optimizer":  # has model, args and iteration, but not what resuming needs
        del checkpoint["optimizer"]
        message = f"{path} is not a train.py checkpoint"
    else:  # "weights_only": a bare state dict
        checkpoint = checkpoint["model"]
        message = f"{path} is not a train.py checkpoint (it needs model, args and iteration)"
    torch.save(checkpoint, path)
    return path, message


@pytest.mark.parametrize("case", ["missing", "truncated", "other_num_classes", "other_backbone", "other_num_clusters",
                                  "weights_only", "no_optimizer"])
def test_bad_checkpoint_exits_2(case, demo_run, tmp_path, capsys):
    path, message = bad_checkpoint(case, demo_run / "last.pt", tmp_path)
    argv = tiny(tmp_path / "out", "--iters", str(DEMO_ITERS), "--demo-images", "16", "--resume", str(path))
    line = cli_error(capsys, argv)
    assert message in line
    assert_nothing_half_written(tmp_path, tmp_path / "out")


def test_truncated_checkpoint_exits_2_from_the_command_line(demo_run, tmp_path):
    path, message = bad_checkpoint("truncated", demo_run / "last.pt", tmp_path)
    result = run_script(tiny(tmp_path / "out", "--iters", "2", "--resume", str(path)), cwd=tmp_path)
    assert_script_error(result, message)
    assert_nothing_half_written(tmp_path, tmp_path / "out")


def test_checkpoints_are_checked_when_read(demo_run, tmp_path, capsys):
    """A folder is named as a folder (not "not found"), a whole pickled model as such, non-finite weights are
    refused by evaluate.py, --init-from and --resume."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "last.pt").write_bytes((demo_run / "last.pt").read_bytes())
    pickled = tmp_path / "model.pt"
    torch.save(ClusterDANet(num_classes=4, backbone="resnet18"), pickled)
    checkpoint = torch.load(demo_run / "last.pt", weights_only=True)
    checkpoint["model"]["classifier.1.weight"][0, 0] = math.nan
    checkpoint["model"]["backbone.stem.0.weight"][0, 0] = math.inf
    nan = tmp_path / "nan.pt"
    torch.save(checkpoint, nan)
    messages = {folder: f"checkpoint {folder} is a folder, not a checkpoint file (it holds {folder / 'last.pt'})",
                pickled: f"checkpoint {pickled} is a whole pickled model (clusterdanet.ClusterDANet, as torch.save("
                         f"model) writes), not a checkpoint of tensors",
                nan: f"checkpoint {nan} holds weights that are nan or infinite (2 tensors: backbone.stem.0.weight, "
                     f"classifier.1.weight): it cannot be evaluated or trained from"}
    for path, message in messages.items():
        runs = [(["--checkpoint", path], evaluate.main),
                (tiny(tmp_path / "out", "--iters", DEMO_ITERS, "--demo-images", "4", "--resume", path), train.main),
                (tiny(tmp_path / "out", "--iters", "1", "--demo-images", "4", "--init-from", path), train.main)]
        for argv, main in runs:
            line = cli_error(capsys, argv, main=main)
            assert line.startswith(f"error: {message}"), line
            assert "not found" not in line
    assert not (tmp_path / "out").exists()


def test_plain_danet_checkpoint_round_trip(tmp_path, capsys):
    """--no-clustering is stored in the checkpoint and evaluate.py rebuilds plain DANet from it."""
    out = tmp_path / "out"
    train.main(tiny(out, "--no-clustering", "--iters", "2", "--demo-images", "4", "--val-every", "2"))
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["args"]["clustering"] is False and checkpoint["args"]["multi_grid"] is False
    assert not [k for k in checkpoint["model"] if "centers" in k or "counts" in k]
    model, config, _ = evaluate.load_model(out / "last.pt", torch.device("cpu"))
    assert isinstance(model.position_branch.clustering, torch.nn.Identity)
    assert isinstance(model.channel_branch.clustering, torch.nn.Identity)
    check = cli_error(capsys, ["--checkpoint", out / "last.pt", "--save-dir", tmp_path / "p", "--show-clusters"],
                      main=evaluate.main)
    assert "plain DANet" in check


def test_old_checkpoint_without_the_new_keys_is_clusterdanet(demo_run, tmp_path):
    checkpoint = torch.load(demo_run / "last.pt", weights_only=True)
    for key in ("clustering", "multi_grid"):
        del checkpoint["args"][key]
    torch.save(checkpoint, tmp_path / "old.pt")
    model, _, _ = evaluate.load_model(tmp_path / "old.pt", torch.device("cpu"))
    assert isinstance(model.position_branch.clustering, ClusteringLayer)
    assert model.backbone.layer4[1].conv2.dilation == (4, 4)


def test_init_from_original_checkpoint_loads_backbone_and_head(original_checkpoint, capsys):
    """Into a 4-class ClusterDANet: every backbone and head tensor, not the classifiers, not the clustering."""
    path, original = original_checkpoint
    model = ClusterDANet(num_classes=4, backbone="resnet50", multi_grid=True)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    train.init_from(model, path)
    ours = model.state_dict()
    theirs = original.state_dict()
    pairs = {"conv5a": "position_branch.conv_in", "conv51": "position_branch.conv_out",
             "sa.query_conv": "position_branch.attention.query", "sa.key_conv": "position_branch.attention.key",
             "sa.value_conv": "position_branch.attention.value",
             "conv5c": "channel_branch.conv_in", "conv52": "channel_branch.conv_out"}
    expected = {"backbone.stem.0.weight": "pretrained.conv1.weight", "position_branch.attention.gamma": "head.sa.gamma",
                "channel_branch.attention.gamma": "head.sc.gamma"}
    for name in theirs:
        if name.startswith("pretrained.bn1."):
            expected["backbone.stem.1." + name.split(".", 2)[2]] = name
        elif name.startswith("pretrained.layer"):
            expected["backbone." + name.split(".", 1)[1]] = name
        for theirs_prefix, ours_prefix in pairs.items():
            if name.startswith(f"head.{theirs_prefix}."):
                expected[ours_prefix + name[len(f"head.{theirs_prefix}"):]] = name
    assert len(expected) == len([n for n in theirs if not n.startswith(("head.conv6", "head.conv7", "head.conv8"))])
    for name, original_name in expected.items():
        if not name.endswith("num_batches_tracked"):  # not in the file (as in files of old PyTorch versions)
            assert torch.equal(ours[name], theirs[original_name]), name
    clustering = [name for name in ours if ".clustering." in name]  # centers, counts, ...: ClusteringLayer's state
    assert len(clustering) >= 4
    for name in ours:
        if name.startswith(("classifier.", "position_classifier.", "channel_classifier.")) or name in clustering:
            assert torch.equal(ours[name], fresh[name]), name  # as built: 4 classes, and fresh centres
    out = capsys.readouterr().out
    assert "(the original DANet code's checkpoint): loaded " in out
    assert "skipped, other shape (file -> model) 6: position_classifier.1.weight [19, 512, 1, 1] -> [4, 512, 1, 1]" \
        in out
    assert f"kept fresh (clustering) {len(clustering)}: channel_branch.clustering." in out
    assert len(out.splitlines()) <= 5  # a summary, not a list


def test_init_from_original_dranet_loads_backbone_and_head(original_dranet, capsys):
    """Into a 4-class ClusterDRANet with the deep stem: every backbone and head tensor, not the classifiers, not the
    clustering (whose K = C keeps every attention shape)."""
    path, original = original_dranet
    model = DRANet(num_classes=4, backbone="resnet50", multi_grid=True, deep_stem=True)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    train.init_from(model, path)
    ours, theirs = model.state_dict(), original.state_dict()
    pairs = {"pretrained.conv1": "backbone.stem.0", "pretrained.bn1": "backbone.stem.1",
             "head.conv_cpam_b": "position_branch.conv_in", "head.conv_cpam_e": "position_branch.conv_out",
             "head.cpam_dec.conv_query": "position_branch.attention.query",
             "head.cpam_dec.conv_key": "position_branch.attention.key",
             "head.cpam_dec.conv_value": "position_branch.attention.value",
             **{f"head.cpam_enc.conv{i + 1}": f"position_branch.attention.centres.{i}" for i in range(4)},
             "head.conv_ccam_b": "channel_branch.conv_in", "head.ccam_enc": "channel_branch.attention.reduce",
             "head.conv_ccam_e": "channel_branch.conv_out", "head.conv_cat": "fusion",
             "head.clgd.conv_low": "decoder.low", "head.clgd.conv_att": "decoder.gate",
             "head.clgd.conv_cat": "decoder.fuse", "head.clgd.conv_out": "decoder.out",
             "cls_aux.0": "aux_conv.0", "cls_aux.1": "aux_conv.1"}
    expected = {"position_branch.attention.gamma": "head.cpam_dec.scale",
                "channel_branch.attention.gamma": "head.ccam_dec.scale", "decoder.gamma": "head.clgd.gamma"}
    for name in theirs:
        if name.startswith("pretrained.layer"):
            expected["backbone." + name.split(".", 1)[1]] = name
        for theirs_prefix, ours_prefix in pairs.items():
            if name.startswith(theirs_prefix + "."):
                expected[ours_prefix + name[len(theirs_prefix):]] = name
    assert len(expected) == len([n for n in theirs if not n.startswith(("cls_seg.", "cls_aux.4."))])
    for name, original_name in expected.items():
        if not name.endswith("num_batches_tracked"):  # not in the file
            assert torch.equal(ours[name], theirs[original_name]), name
    clustering = [name for name in ours if ".clustering." in name]
    assert len(clustering) >= 4
    for name in ours:
        if name.startswith(("classifier.", "aux_classifier.")) or name in clustering:
            assert torch.equal(ours[name], fresh[name]), name
    out = capsys.readouterr().out
    assert "(the original DANet code's checkpoint): loaded " in out
    assert "skipped, other shape (file -> model) 4: " in out and "[19, 256, 1, 1] -> [4, 256, 1, 1]" in out
    assert len(out.splitlines()) <= 5  # a summary, not a list


def test_original_checkpoint_bad_inputs(tmp_path, capsys):
    """Key sets the loader refuses, and an original file given to --resume; tiny stand-in tensors."""
    t = torch.zeros(1)
    keys = {f"pretrained.layer{i}.{j}.conv1.weight": t for i, n in enumerate((3, 4, 6, 3), 1) for j in range(n)}
    files = {
        "resnet34_like": {"pretrained.conv1.weight": t, **keys, "pretrained.layer3.9.conv1.weight": t,
                          "head.conv8.1.weight": t},
        "keys_only": {"pretrained.conv1.weight": t, **keys, "head.conv8.1.weight": torch.zeros(19, 512, 1, 1)},
    }
    for name, state in files.items():
        torch.save({"state_dict": state, "epoch": 1}, tmp_path / f"{name}.pth.tar")

    def check(argv, *fragments, main=evaluate.main):
        line = cli_error(capsys, argv, main=main)
        assert all(f in line for f in fragments), line

    check(["--checkpoint", tmp_path / "resnet34_like.pth.tar"], "blocks per layer (3, 4, 7, 3)")
    check(["--checkpoint", tmp_path / "keys_only.pth.tar"], "is for another model")
    check(tiny(tmp_path / "out", "--iters", "2", "--resume", tmp_path / "keys_only.pth.tar"),
          "is not a train.py checkpoint to resume from", "use --init-from", main=train.main)


def test_init_from_on_the_command_line(demo_run, tmp_path, capsys):
    """train.py --init-from, a train.py checkpoint into plain DANet: with lr 1e-9 the saved weights are the file's."""
    train.main(tiny(tmp_path / "plain", "--no-clustering", "--init-from", str(demo_run / "last.pt"), "--lr", "1e-9",
                    "--iters", "1", "--demo-images", "2"))
    out = capsys.readouterr().out
    assert f"init from {demo_run / 'last.pt'} (a train.py checkpoint): loaded " in out
    clustering = [n for n, _ in ClusterDANet(4, "resnet18").named_buffers() if ".clustering." in n]
    assert f"unused from the file {len(clustering)}: position_branch.clustering.centers" in out  # none in plain DANet
    demo = torch.load(demo_run / "last.pt", weights_only=True)["model"]
    saved = torch.load(tmp_path / "plain" / "last.pt", weights_only=True)
    assert saved["iteration"] == 1 and saved["args"]["init_from"] == str(demo_run / "last.pt")
    parameters = [n for n, _ in ClusterDANet(4, "resnet18", clustering=False).named_parameters()]  # BN stats move
    for name in parameters:
        torch.testing.assert_close(saved["model"][name], demo[name], rtol=0, atol=1e-6)  # one step of lr 1e-9


def test_init_from_says_when_backbone_or_classes_differ(demo_run):
    lines = []
    model = ClusterDANet(num_classes=4, backbone="resnet34")
    train.init_from(model, demo_run / "last.pt", lines.append, "resnet34", list(train.SHAPE_CLASSES))
    loaded = re.match(rf"init from {re.escape(str(demo_run / 'last.pt'))} \(a train.py checkpoint\): loaded (\d+) of "
                      rf"(\d+) tensors, ([\d.]+)% of the model's parameters", lines[0])
    assert loaded and int(loaded[1]) < int(loaded[2]) and float(loaded[3]) < 100
    assert lines[1] == ("  the file's backbone is resnet18, this model's resnet34: only the tensors whose names and "
                        "shapes happen to match were loaded")

    model = ClusterDANet(num_classes=4, backbone="resnet18")
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    source = torch.load(demo_run / "last.pt", weights_only=True)["model"]
    lines = []
    train.init_from(model, demo_run / "last.pt", lines.append, "resnet18", ["background", "square", "disc", "triangle"])
    classifiers = [n for n in fresh if n.startswith(train.CLASSIFIERS)]
    assert len(classifiers) == 6  # weight and bias of three 1x1 convolutions
    for name, tensor in model.state_dict().items():
        expected = fresh[name] if name in classifiers or ".clustering." in name else source[name]
        assert torch.equal(tensor, expected), name
    assert "  the file's classes differ from the dataset's (class 1 'disc' -> 'square', 2 'square' -> 'disc'): the " \
           "classifiers start fresh" in lines
    assert any(line.startswith("  skipped, other classes 6: ") for line in lines)


def random_checkpoint(model, path, config):
    """Save `model`'s state with every tensor changed (floats uniform in 2..3, integers 7, booleans flipped), so that
    a tensor of a fresh model equals the file's only when it was copied from it. Returns the saved tensors."""
    generator = torch.Generator().manual_seed(1)
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            state[name] = 2 + torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype)
        elif tensor.dtype == torch.bool:
            state[name] = ~tensor
        else:
            state[name] = torch.full_like(tensor, 7)
    train.save_checkpoint({"model": state, "args": config, "iteration": 3}, path)
    return state


def check_init_report(model, source, lines):
    """The numbers of init_from's first line against a count of the model's tensors that equal the file's."""
    found = re.match(r"init from .* checkpoint\): loaded (\d+) of (\d+) tensors, (100|[\d.]+)% of the model's "
                     r"parameters", lines[0])
    assert found, lines[0]
    state, parameters = model.state_dict(), dict(model.named_parameters())
    equal = {n for n, t in state.items() if n in source and t.shape == source[n].shape and torch.equal(t, source[n])}
    assert int(found[1]) == len(equal) and int(found[2]) == len(state)
    share = sum(p.numel() for n, p in parameters.items() if n in equal) / sum(p.numel() for p in parameters.values())
    if found[3] == "100":
        assert share == 1
    else:
        assert float(found[3]) <= 100 * share < float(found[3]) + 0.1 and share < 1
    listed = sum(int(re.match(r"  (kept fresh|skipped)[^0-9]* (\d+):", line)[2]) for line in lines
                 if line.startswith(("  kept fresh", "  skipped")))
    assert listed == len(state) - len(equal)  # every tensor not loaded is listed, once
    return float(found[3]), share


@pytest.mark.parametrize("file_model, file_clustering, model, clustering, other", [
    ("dranet", True, "danet", True, "ClusterDRANet (this model is ClusterDANet)"),
    ("danet", True, "dranet", False, "ClusterDANet (this model is DRANet)"),
    ("danet", False, "danet", True, "DANet (this model is ClusterDANet)"),
    ("danet", True, "danet", True, None),
])
def test_init_from_another_model_says_so_and_counts_what_it_loaded(file_model, file_clustering, model, clustering,
                                                                   other, tmp_path):
    torch.manual_seed(0)
    config = {"model": file_model, "clustering": file_clustering, "backbone": "resnet18"}
    source = random_checkpoint(train.MODELS[file_model](4, "resnet18", clustering=file_clustering), tmp_path / "f.pt",
                               config)
    target = train.MODELS[model](4, "resnet18", clustering=clustering)
    lines = []
    train.init_from(target, tmp_path / "f.pt", lines.append, "resnet18")
    reported, share = check_init_report(target, source, lines)
    says = [line for line in lines if "another model" in line]
    if other is None:
        assert not says and reported == 100
    else:
        assert says == [f"  the file holds another model, {other}: only the tensors whose names and shapes happen to "
                        f"match were loaded"]
    if file_model != model:
        assert share < 1 and reported < 100  # a few head tensors were not loaded: the share says it, not "100%"


def test_init_from_original_danet_into_dranet_says_it_is_another_model(original_checkpoint):
    path, _ = original_checkpoint
    model = DRANet(num_classes=19, backbone="resnet50", multi_grid=True, clustering=False)
    lines = []
    train.init_from(model, path, lines.append, "resnet50")
    assert lines[0].startswith(f"init from {path} (the original DANet code's checkpoint): loaded ")
    assert lines[1] == ("  the file holds another model, DANet (this model is DRANet): only the tensors whose names "
                        "and shapes happen to match were loaded")
    reported, share = check_init_report(model, train.load_checkpoint(path)["model"], lines)
    assert reported < 100 and share < 1


def test_percent_is_never_rounded_to_all_or_nothing():
    assert [train.percent(*p) for p in ((5, 5), (0, 5), (9999, 10000), (1, 2000), (1, 1000), (1, 3))] == \
        ["100%", "0%", "99.9%", "under 0.1%", "0.1%", "33.3%"]


def record_train_reads(monkeypatch, seen, val_ids):
    """Append to `seen` the id of every VOC image read that is not a validation image, in reading order."""
    original = train.VOCSegmentation.__getitem__

    def getitem(self, index):
        if self.ids[index] not in val_ids:
            seen.append(self.ids[index])
        return original(self, index)

    monkeypatch.setattr(train.VOCSegmentation, "__getitem__", getitem)


def test_resumed_run_matches_uninterrupted_run(voc_root, tmp_path, monkeypatch):
    """Run A: 6 steps. Run B: Ctrl-C after 3, then --resume. Same schedule, and the same images in the same order:
    the resumed run goes on with the images its epoch had not shown (4 images, batch 2: 2 steps per epoch)."""
    iters = 6
    args = ["--data-root", str(voc_root), "--train-split", "train", "--iters", str(iters), "--log-every", "1",
            "--val-every", str(iters)]
    val_ids = set(train.VOCSegmentation(voc_root, "val").ids)
    train_ids = train.VOCSegmentation(voc_root, "train").ids
    seen_a, seen_b = [], []
    record_train_reads(monkeypatch, seen_a, val_ids)
    steps = [0]
    interrupt_after(monkeypatch, 0, steps)  # counts only
    assert train.main(tiny(tmp_path / "a", *args)) == 0
    assert steps[0] == iters

    # run B: Ctrl-C after 3 steps. If train.main had no handler of its own, this one would see the signal.
    unhandled = []
    signal.signal(signal.SIGINT, lambda *_: unhandled.append(1))
    steps = [0]
    monkeypatch.undo()
    record_train_reads(monkeypatch, seen_b, val_ids)
    interrupt_after(monkeypatch, 3, steps)
    assert train.main(tiny(tmp_path / "b", *args)) == 130  # 128 + SIGINT
    assert not unhandled and steps[0] == 3
    interrupted = torch.load(tmp_path / "b" / "last.pt", map_location="cpu", weights_only=True)
    assert interrupted["iteration"] == 3
    assert (interrupted["epoch"], interrupted["epoch_images"]) == (1, 2)  # epoch 1, its first batch done
    assert read_log(tmp_path / "b")[-1] == {"iteration": 3, "interrupted": "SIGINT"}
    assert not (tmp_path / "b" / "best.pt").exists()  # no validation yet
    expected_lr = 0.01 * (1 - 3 / iters) ** 0.9
    assert [g["lr"] for g in interrupted["optimizer"]["param_groups"]] == pytest.approx([expected_lr, 10 * expected_lr])
    assert len(seen_b) == 3 * 2

    steps = [0]
    interrupt_after(monkeypatch, 0, steps)
    assert train.main(tiny(tmp_path / "b", *args, "--resume", str(tmp_path / "b" / "last.pt"))) == 0
    assert steps[0] == iters - 3  # only the missing steps

    # the data order: 3 epochs, each a permutation of the 4 train images, and B read exactly what A read
    assert len(seen_a) == iters * 2 and seen_b == seen_a
    for epoch in range(3):
        assert sorted(seen_a[4 * epoch:4 * epoch + 4]) == sorted(train_ids)
    assert seen_a[:4] != seen_a[4:8] or seen_a[4:8] != seen_a[8:]  # a new order each epoch

    a = torch.load(tmp_path / "a" / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", map_location="cpu", weights_only=True)
    assert a["iteration"] == b["iteration"] == iters
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [g["lr"] for g in b["optimizer"]["param_groups"]]
    assert a["scheduler"] == b["scheduler"] and a["scheduler"]["last_epoch"] == iters
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    # the logged learning rates, step by step, are the same: step k ran at lr (1 - (k - 1) / iters)^0.9
    lrs_a = {r["iteration"]: r["lr"] for r in read_log(tmp_path / "a") if "lr" in r}
    lrs_b = {r["iteration"]: r["lr"] for r in read_log(tmp_path / "b") if "lr" in r}
    assert lrs_a == lrs_b and sorted(lrs_a) == list(range(1, iters + 1))
    for k, lr in lrs_a.items():
        assert lr == pytest.approx(0.01 * (1 - (k - 1) / iters) ** 0.9, abs=1e-12)
    # B validated once, at the end, like A
    assert [r["iteration"] for r in read_log(tmp_path / "b") if "val_miou" in r] == [iters]


def test_epoch_sampler_continues_the_epoch_on_any_number_of_processes():
    """Each epoch is one permutation (seed + epoch, independent of the process count); process r takes positions
    r, r + W, ...; skipping k B W images leaves exactly the permutation's unseen rest, split evenly."""
    n, seed = 23, 5
    for epoch in (0, 3):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        single = train.ResumableSampler(n, seed)
        single.set_position(epoch, 0)
        assert list(single) == order and len(single) == n
        for world_size in (2, 3):
            for skip in (0, 6, 12):  # e.g. 3 steps of batch 2 on 1 process, or of batch 1 on 2 processes
                shards = []
                for rank in range(world_size):
                    sampler = train.ResumableSampler(n, seed, rank, world_size)
                    sampler.set_position(epoch, skip)
                    shards.append(list(sampler))
                    assert len(sampler) == len(shards[-1]) == (n - skip) // world_size
                rest = order[skip:][:(n - skip) // world_size * world_size]
                interleaved = [shards[i % world_size][i // world_size] for i in range(len(rest))]
                assert interleaved == rest  # every unseen image once, none seen before
    epochs = [train.ResumableSampler(n, seed) for _ in range(2)]
    epochs[1].set_position(1, 0)
    assert list(epochs[0]) != list(epochs[1])  # a new order each epoch


@pytest.mark.parametrize("flags, message", [
    (["--iters", "30"], "was trained with --iters 20: resume with --iters 20"),
    (["--iters", str(DEMO_ITERS), "--lr", "0.02"], "was trained with --lr 0.01: resume with --lr 0.01"),
    (["--iters", str(DEMO_ITERS), "--momentum", "0.5"], "was trained with --momentum 0.9: resume with --momentum 0.9"),
])
def test_resume_with_another_schedule_exits_2(flags, message, demo_run, tmp_path, capsys):
    """The optimizer state would silently keep the old LR, momentum and schedule: say so instead."""
    line = cli_error(capsys, tiny(tmp_path / "out", "--demo-images", "16", "--resume", demo_run / "last.pt", *flags))
    assert line == f"error: checkpoint {demo_run / 'last.pt'} {message} (a resumed run continues its schedule)"
    assert_nothing_half_written(tmp_path, tmp_path / "out")


def test_resume_refuses_a_change_of_model_loss_data_or_numerics(demo_run, tmp_path, capsys):
    """Each flag that shapes the run must be the checkpoint's: the refusal names it and its stored value."""
    path = demo_run / "last.pt"
    base = tiny(tmp_path / "out", "--iters", str(DEMO_ITERS), "--demo-images", "16", "--batch-size", "4",
                "--resume", path)
    cases = [(["--temperature", "50"], "with --temperature 100.0", "keeps its model"),
             (["--aux-weight", "0.4"], "with --aux-weight 1.0", "keeps its loss"),
             (["--no-clustering"], "with --clustering", "keeps its model"),
             (["--cluster-init", "data"], "with --cluster-init random", "keeps its model"),
             (["--cluster-reseed", "3"], "with --cluster-reseed 0", "keeps its model"),
             (["--num-clusters", "64"], "with the default --num-clusters", "keeps its model"),
             (["--precision", "bf16"], "with --precision fp32", "keeps its numerics"),
             (["--seed", "3"], "with --seed 0", "keeps its data"),
             (["--crop-size", "48"], "with --crop-size 32", "keeps its data"),
             (["--data-root", tmp_path], "on the demo data (no --dataset, no --data-root)", "keeps its data")]
    for flags, text, why in cases:
        line = cli_error(capsys, [*base, *flags])
        assert line == f"error: checkpoint {path} was trained {text}: resume {text} (a resumed run {why})", flags
    # --multi-grid needs a Bottleneck ResNet (refused at parse time for this resnet18 run): the check alone
    args = train.parse_args([*map(str, base)])
    args.multi_grid = True
    text = "without --multi-grid"
    with pytest.raises(train.UserError) as refused:
        train.load_resume_checkpoint(args)
    assert str(refused.value) == f"checkpoint {path} was trained {text}: resume {text} (a resumed run keeps its model)"
    assert not (tmp_path / "out").exists()
    # the flags that may change are accepted (nothing left to train: iteration 20 of 20)
    assert train.main([*map(str, base), "--device", "cpu", "--workers", "1", "--log-every", "3", "--val-every", "7",
                       "--attention", "dense", "--out-dir", str(tmp_path / "out")]) == 0


def test_every_flag_is_classified_for_resume(capsys):
    """Every flag of train.py either must match on resume, may change (listed in --help), or only starts a run."""
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    usage = text.split("\n\n")[0]
    flags = {f[2:].replace("-", "_") for f in re.findall(r"--[a-z][a-z-]+", usage)} - {"no_pretrained", "no_clustering"}
    assert {"backbone", "resume", "benchmark_steps"} <= flags
    must = set(train.RESUME_MUST_MATCH)
    may = set(train.RESUME_MAY_CHANGE)
    starts = set(train.RESUME_KEEPS) | {"resume", "overwrite", "download", "benchmark", "benchmark_steps",
                                         "benchmark_attention", "benchmark_channels"}
    assert not must & may and not (must | may) & starts
    assert flags <= must | may | starts, flags - (must | may | starts)
    listed = " ".join(text.split())
    assert "These flags may differ from the checkpoint's: " + ", ".join(
        "--" + k.replace("_", "-") for k in train.RESUME_MAY_CHANGE) in listed


def test_resume_on_other_classes_exits_2_touching_nothing(tmp_path, capsys):
    """A folder dataset whose classes.txt names other classes (a real process), or one class more, than the
    checkpoint's: one line naming the first difference (or both counts), exit 2, the run folder byte for byte.
    evaluate.py refuses it through the same check, and evaluates a checkpoint that names no classes."""
    make_folder(tmp_path / "data")
    out = tmp_path / "out"
    args = tiny(out, "--dataset", "folder", "--data-root", str(tmp_path / "data"), "--iters", "1")
    assert train.main(args) == 0
    before = folder_bytes(out)
    assert sorted(before) == ["best.pt", "last.pt", "log.jsonl"]
    last = out / "last.pt"
    hint = f" (a resumed run keeps its classes; to train its weights on these, start a new run with --init-from {last})"
    (tmp_path / "data" / "classes.txt").write_text("sky\nmeadow\nbull\n")
    result = run_script([*args, "--resume", str(last)], cwd=tmp_path)
    line = assert_script_error(result)
    assert line == (f"error: checkpoint {last} was trained on other classes than the dataset's: class 1 is 'grass' in "
                    f"the checkpoint, 'meadow' in the dataset (and 1 more){hint}")
    assert folder_bytes(out) == before
    evaluate_args = ["--data-root", tmp_path / "data", "--dataset", "folder", "--device", "cpu", "--workers", "0"]
    line = cli_error(capsys, ["--checkpoint", last, *evaluate_args], main=evaluate.main)  # the same check, no hint
    assert line == (f"error: checkpoint {last} was trained on other classes than the dataset's: class 1 is 'grass' in "
                    f"the checkpoint, 'meadow' in the dataset (and 1 more)")
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    del checkpoint["class_names"]  # as the original code's checkpoints for other datasets: not checked by name
    torch.save(checkpoint, tmp_path / "unnamed.pt")
    evaluate.main(["--checkpoint", str(tmp_path / "unnamed.pt"), *map(str, evaluate_args)])
    assert "on folder val (2 images" in capsys.readouterr().out
    (tmp_path / "data" / "classes.txt").write_text("sky\ngrass\ncow\nsheep\n")
    line = cli_error(capsys, [*args, "--resume", last])
    assert line == f"error: checkpoint {last} predicts 3 classes, the dataset has 4{hint}"
    assert folder_bytes(out) == before


def test_check_classes_compares_the_count_then_the_names():
    """The one class check of train.py's --resume and evaluate.py: a checkpoint without names (None) is checked by
    their number only; `hint` ends the message."""
    train.check_classes("x.pt", 2, None, ["a", "b"])
    train.check_classes("x.pt", 2, ["a", "b"], ("a", "b"))
    with pytest.raises(train.UserError, match=r"^checkpoint x.pt predicts 2 classes, the dataset has 3$"):
        train.check_classes("x.pt", 2, None, ["a", "b", "c"])
    with pytest.raises(train.UserError, match=r"^checkpoint x.pt was trained on other classes than the dataset's: "
                                              r"class 1 is 'b' in the checkpoint, 'c' in the dataset!$"):
        train.check_classes("x.pt", 2, ["a", "b"], ["a", "c"], "!")


# -------------- train.py 4c: what keeps a run safe (signals, the run folder, failure endings, full disk, out of memory)

def start_importing(script, *args):
    """Start `python script args` and return it once the script's first lines have run: the process catches SIGTERM
    (SigCgt in /proc/PID/status; Python itself leaves SIGTERM alone), so the imports below them have begun."""
    process = subprocess.Popen([sys.executable, str(REPO / script), *args], text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    while True:
        caught = re.search(r"SigCgt:\s*([0-9a-f]+)", Path(f"/proc/{process.pid}/status").read_text()).group(1)
        if int(caught, 16) >> (signal.SIGTERM - 1) & 1:
            return process
        assert process.poll() is None, process.communicate()
        time.sleep(0.001)


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_script_imports_torch_is_one_line(script, signum):
    """Ctrl-C or SIGTERM from a script's first lines on, while torch imports: the one line and 128 + the signal
    number, no traceback. The script is started with --help, which prints only once the imports are done: nothing
    on stdout shows that the signal came before."""
    for delay in (0, 0.02, 0.1):  # seconds after the script's first lines, well within the imports
        process = start_importing(script, "--help")
        time.sleep(delay)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=60)
        assert (process.returncode, stdout, stderr) == (128 + signum, "", f"interrupted by {signum.name}\n"), delay


def test_imported_train_and_evaluate_leave_the_signal_handlers_alone():
    """The scripts' first lines act only when they run as scripts: imported, as here and by evaluate.py, Ctrl-C is
    Python's KeyboardInterrupt and SIGTERM its default."""
    code = ("import signal, evaluate, train; "
            "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler, "
            "signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout == "True True\n", result.stderr


def start_script(args, cwd, module=(), **popen):
    """python [module...] train.py args in a fresh process; threads read its stdout line by line into a queue
    and its stderr into a list."""
    process = subprocess.Popen([sys.executable, *module, str(REPO / "train.py"), *args], cwd=cwd, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)
    process.lines, process.errors = queue.Queue(), []
    process.readers = [threading.Thread(target=lambda: [process.lines.put(line) for line in process.stdout]),
                       threading.Thread(target=lambda: process.errors.extend(process.stderr))]
    for reader in process.readers:
        reader.start()
    return process


def wait_for(process, prefix, timeout=180):
    """Wait until the process prints a line that starts with prefix."""
    deadline = time.monotonic() + timeout
    while True:
        line = process.lines.get(timeout=max(1, deadline - time.monotonic()))
        if line.startswith(prefix):
            return


def finish_script(process, timeout=180):
    """(exit code, stdout lines still unread, stderr) once the process ends."""
    process.wait(timeout)
    for reader in process.readers:
        reader.join()
    lines = []
    while not process.lines.empty():
        lines.append(process.lines.get())
    return process.returncode, "".join(lines), "".join(process.errors)


def assert_saved_on_signal(out, name, tmp_path):
    """last.pt holds the iteration of the log's last record, which says the run stopped on `name`; returns it."""
    checkpoint = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert read_log(out)[-1] == {"iteration": checkpoint["iteration"], "interrupted": name}
    assert not list(Path(tmp_path).rglob("*.tmp"))
    return checkpoint["iteration"]


def test_sigterm_saves_last_checkpoint_and_exits_143(tmp_path):
    """What SLURM or Kubernetes send to the training process: a real SIGTERM, mid-run."""
    out = tmp_path / "out"
    process = start_script(tiny(out, "--iters", "1000", "--demo-images", "8", "--log-every", "1",
                                "--val-every", "1000"), cwd=tmp_path)
    wait_for(process, "iter 2/1000")
    process.send_signal(signal.SIGTERM)
    code, stdout, stderr = finish_script(process)
    assert code == 143, stderr
    assert stderr.strip() == ("SIGTERM: finishing the step in flight, then saving last.pt (a validation in progress "
                              "is abandoned); send it again to stop at once")
    iteration = assert_saved_on_signal(out, "SIGTERM", tmp_path)
    assert 2 <= iteration < 1000
    last = out / "last.pt"
    assert f"SIGTERM: saved {last} at iteration {iteration}; continue with --resume {last}" in stdout


def test_ctrl_c_in_a_terminal_with_loader_workers_exits_130(tmp_path):
    """A terminal's Ctrl-C reaches the whole process group, DataLoader workers included: they must not die."""
    out = tmp_path / "out"
    process = start_script(tiny(out, "--iters", "1000", "--demo-images", "8", "--log-every", "1",
                                "--val-every", "1000", "--workers", "1"), cwd=tmp_path, start_new_session=True)
    wait_for(process, "iter 2/1000")
    os.killpg(process.pid, signal.SIGINT)
    code, stdout, stderr = finish_script(process)
    assert code == 130, stderr
    assert "Traceback" not in stderr and stderr.count("SIGINT: finishing the step in flight") == 1
    assert 2 <= assert_saved_on_signal(out, "SIGINT", tmp_path) < 1000


def test_sigterm_under_torchrun_stops_every_rank_at_a_log_step(tmp_path):
    """torchrun passes SIGTERM on to every rank; they agree to stop at the next log step, rank 0 saves."""
    out = tmp_path / "out"
    process = start_script(tiny(out, "--iters", "1000", "--demo-images", "8", "--log-every", "2",
                                "--val-every", "1000"), cwd=tmp_path,
                           module=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    wait_for(process, "iter 2/1000", timeout=240)
    process.send_signal(signal.SIGTERM)  # to torchrun
    code, stdout, stderr = finish_script(process)
    assert code == 1  # torchrun's code when it was signalled (its SignalException)
    iteration = assert_saved_on_signal(out, "SIGTERM", tmp_path)
    assert iteration % 2 == 0 and 2 <= iteration < 1000
    assert f"SIGTERM: saved {out / 'last.pt'} at iteration {iteration}" in stdout


def torchrun_ranks(pid):
    """{rank: pid} of the processes that torchrun (pid) started, read off /proc."""
    ranks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after "pid (name)": state, parent pid
            environ = (stat.parent / "environ").read_bytes().split(b"\0") if parent == pid else []
        except (OSError, ValueError):  # a process that ended meanwhile
            continue
        ranks.update({int(e[len(b"RANK="):]): int(stat.parent.name) for e in environ if e.startswith(b"RANK=")})
    return ranks


def test_sigterm_to_one_rank_under_torchrun_every_rank_stops_for_it(tmp_path):
    """Only rank 1 receives SIGTERM: rank 0, which received none, saves last.pt saying whose signal it stops for and
    logs it; both exit 143, also rank 0, which torchrun sends its own SIGTERM as soon as rank 1 has exited.
    torchrun itself exits 1."""
    out = tmp_path / "out"
    process = start_script(tiny(out, "--iters", "1000", "--demo-images", "8", "--log-every", "2",
                                "--val-every", "1000"), cwd=tmp_path, module=TORCHRUN)
    wait_for(process, "iter 2/1000", timeout=240)
    ranks = torchrun_ranks(process.pid)
    assert sorted(ranks) == [0, 1]
    os.kill(ranks[1], signal.SIGTERM)
    code, stdout, stderr = finish_script(process)
    assert code == 1 and torchrun_exit_codes(stderr) == {0: 143, 1: 143}, stderr
    iteration = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["iteration"]
    assert iteration % 2 == 0 and 2 <= iteration < 1000
    assert read_log(out)[-1] == {"iteration": iteration, "interrupted": "SIGTERM", "signalled_rank": 1}
    last = out / "last.pt"
    assert stdout.splitlines()[-1] == (f"another process (rank 1) received SIGTERM: saved {last} at iteration "
                                       f"{iteration}; continue with --resume {last}")
    assert "SIGINT" not in stdout + stderr and "finishing the step in flight" not in stderr
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "log.jsonl"] and not list(tmp_path.rglob("*.tmp"))


def test_interrupt_abandons_validation_and_saves(tmp_path, monkeypatch, capsys):
    """Ctrl-C while validating: the validation stops at the next image, last.pt of that step is saved."""
    reads = []
    original = train.SyntheticShapes.__getitem__

    def getitem(self, index):
        if self.seed == 1:  # the demo's validation set (64 images)
            reads.append(index)
            if len(reads) == 3:
                os.kill(os.getpid(), signal.SIGINT)
        return original(self, index)

    monkeypatch.setattr(train.SyntheticShapes, "__getitem__", getitem)
    out = tmp_path / "out"
    assert train.main(tiny(out, "--iters", "4", "--demo-images", "4", "--val-every", "2", "--log-every", "2")) == 130
    assert reads == [0, 1, 2]  # the loop asks before each image
    assert assert_saved_on_signal(out, "SIGINT", tmp_path) == 2
    assert not [r for r in read_log(out) if "val_miou" in r] and not (out / "best.pt").exists()
    assert "SIGINT: finishing the step in flight, then saving last.pt" in capsys.readouterr().err


@pytest.mark.parametrize("when", ["in_a_step", "in_validation", "while_saving"])
def test_second_interrupt_stops_at_once(when, tmp_path, monkeypatch, capsys):
    """A second Ctrl-C stops at once: last.pt is saved when the weights are between two steps, and when they
    are not (in a step, or the save itself is cut short) the run says so and the previous last.pt stays whole."""
    out = tmp_path / "out"
    steps, original_step = [0], train.train_step

    def train_step(*args, **kwargs):
        steps[0] += 1
        if steps[0] == (4 if when == "in_a_step" else 3) and when != "in_validation":
            os.kill(os.getpid(), signal.SIGINT)
            if when == "in_a_step":
                os.kill(os.getpid(), signal.SIGINT)  # raises KeyboardInterrupt here, before the weights change
        return original_step(*args, **kwargs)

    original_save = torch.save

    def save(state, file, *args, **kwargs):
        if when == "while_saving" and state.get("iteration") == 3:
            file.write(b"PK half a checkpoint")  # save_checkpoint writes through a file object
            os.kill(os.getpid(), signal.SIGINT)
        return original_save(state, file, *args, **kwargs)

    original_getitem, reads = train.SyntheticShapes.__getitem__, [0]

    def getitem(self, index):
        if self.seed == 1 and when == "in_validation":
            reads[0] += 1
            if reads[0] == 64 + 5:  # the 5th image of the second validation, after step 6
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
        return original_getitem(self, index)

    monkeypatch.setattr(train, "train_step", train_step)
    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(train.SyntheticShapes, "__getitem__", getitem)
    capsys.readouterr()
    val_every = "3" if when == "in_validation" else "2"
    assert train.main(tiny(out, "--iters", "6", "--demo-images", "4", "--val-every", val_every,
                           "--log-every", "1")) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert err[0] == ("SIGINT: finishing the step in flight, then saving last.pt (a validation in progress is "
                      "abandoned); send it again to stop at once")
    checkpoint = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    if when == "in_validation":  # between steps 6 and 7: saved
        assert err[1:] == [f"SIGINT again: stopped at once; saved {out / 'last.pt'} at iteration 6"]
        assert checkpoint["iteration"] == 6
    else:
        busy = "in the middle of a step" if when == "in_a_step" else "while saving"
        assert err[1:] == [f"SIGINT again: stopped at once; last.pt not saved (stopped {busy}); the latest "
                           f"checkpoint is {out / 'last.pt'} from iteration 2"]
        assert checkpoint["iteration"] == 2  # the one of the validation at step 2, whole
    assert not list(tmp_path.rglob("*.tmp"))


def test_main_gives_back_signal_handlers_and_log_file(voc_root, tmp_path):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    gc.collect()  # what earlier tests left
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.main(tiny(tmp_path / "out", "--data-root", str(voc_root), "--train-split", "train", "--iters", "1"))
        gc.collect()
    assert (tmp_path / "out" / "last.pt").is_file()
    log_file = str(tmp_path / "out" / "log.jsonl")
    assert not [w for w in caught if issubclass(w.category, ResourceWarning) and log_file in str(w.message)]
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_existing_out_dir_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    args = tiny(out, "--iters", "1", "--demo-images", "2", "--val-every", "1", "--log-every", "1")
    assert train.main(args) == 0
    best, records = (out / "best.pt").read_bytes(), read_log(out)
    line = cli_error(capsys, args)
    assert line == (f"error: --out-dir {out} holds last.pt and best.pt of an earlier run: continue it with --resume "
                    f"{out / 'last.pt'}, choose another --out-dir, or give --overwrite to replace it")
    assert (out / "best.pt").read_bytes() == best and read_log(out) == records
    (out / "last.pt").unlink()
    assert "holds best.pt of an earlier run: choose another --out-dir" in cli_error(capsys, args)

    assert train.main(args + ["--overwrite", "--seed", "1"]) == 0  # a new run: other weights, its own log only
    assert (out / "best.pt").read_bytes() != best and len(read_log(out)) == len(records)
    assert train.main(args + ["--resume", str(out / "last.pt"), "--seed", "1"]) == 0  # nothing left to do


def test_unwritable_outputs_exit_2_before_any_work(tmp_path, capsys, monkeypatch):
    """--out-dir, --json, --save-dir: a file in the way or a read-only folder is found before anything runs (the
    evaluate.py checkpoint does not even exist: the outputs are checked first)."""
    a_file = tmp_path / "file"
    a_file.write_text("")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.geteuid() == 0:  # root ignores permission bits: creating a file is judged by them, as for any other user
        real_open = os.open

        def user_open(path, flags, *args, **kwargs):
            if flags & os.O_CREAT and not os.stat(os.path.dirname(path)).st_mode & 0o200:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, flags, *args, **kwargs)
        monkeypatch.setattr(os, "open", user_open)
    try:
        for out, message in ((a_file, f"--out-dir {a_file} is a file"),
                             (a_file / "sub", f"--out-dir {a_file / 'sub'} cannot be created: {a_file} is a file"),
                             (read_only / "out", f"--out-dir {read_only / 'out'} cannot be written: {read_only} "
                                                 f"is read-only")):
            assert cli_error(capsys, tiny(out, "--iters", "1")) == f"error: {message}"
        missing = tmp_path / "missing.pt"
        for flags, message in ((["--json", a_file / "r.json"], f"--json {a_file / 'r.json'} cannot be created: "
                                                               f"{a_file} is a file"),
                               (["--json", tmp_path], f"--json {tmp_path} is a folder"),
                               (["--json", read_only / "r.json"], f"--json {read_only / 'r.json'} cannot be written: "
                                                                  f"{read_only} is read-only"),
                               (["--save-dir", a_file], f"--save-dir {a_file} is a file"),
                               (["--save-dir", read_only / "pictures" / "x"], f"--save-dir "
                                f"{read_only / 'pictures' / 'x'} cannot be written: {read_only} is read-only")):
            line = cli_error(capsys, ["--checkpoint", missing, *flags], main=evaluate.main)
            assert line == f"error: {message}"
    finally:
        read_only.chmod(0o755)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "read-only"] and not list(read_only.iterdir())


def test_writability_is_checked_by_creating_a_file(tmp_path, capsys):
    """Root may "write" /proc and /sys by os.access; a file created and removed says the truth, for folders and files,
    in both scripts, and leaves nothing behind."""
    if os.geteuid() == 0:
        places = [(Path("/proc") / "x", "no file can be created in /proc (No such file or directory)"),
                  (Path("/sys") / "x", "/sys is read-only")]
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        places = [(locked / "x", f"{locked} is read-only")]
    for place, reason in places:
        assert cli_error(capsys, tiny(place, "--iters", "1")) == f"error: --out-dir {place} cannot be written: {reason}"
        for flag, target in (("--save-dir", place / "pictures"), ("--json", place / "results.json")):
            line = cli_error(capsys, ["--checkpoint", tmp_path / "unused.pt", flag, target], main=evaluate.main)
            assert line == f"error: {flag} {target} cannot be written: {reason}"
    before = sorted(tmp_path.iterdir())
    train.check_writable(tmp_path / "new" / "run", "--out-dir")
    train.check_writable(tmp_path / "results.json", "--json", folder=False)
    assert sorted(tmp_path.iterdir()) == before


def demo_args(out, *extra):
    return tiny(out, "--demo-images", "4", "--log-every", "1", *extra)


def test_out_dir_never_writes_over_what_the_run_reads(voc_root, tmp_path, capsys):
    """--init-from a checkpoint of --out-dir with --overwrite (directly or through a link), --out-dir inside the
    dataset's image folder, a folder where last.pt goes: one line, exit 2, nothing touched. --resume of the folder's
    own last.pt or best.pt goes on writing them."""
    out = tmp_path / "run"
    for name in ("last.pt", "best.pt"):  # an earlier run's checkpoints
        untrained_checkpoint(out / name, train.SHAPE_CLASSES)
    before = tree_bytes(out)
    (tmp_path / "weights.pt").symlink_to(out / "best.pt")
    for source, name in ((out / "last.pt", "last.pt"), (tmp_path / "weights.pt", "best.pt")):
        line = cli_error(capsys, demo_args(out, "--iters", "2", "--overwrite", "--init-from", source))
        assert line == (f"error: --out-dir {out}: writing {out / name} would overwrite the --init-from file {source}: "
                        f"nothing was written; choose another --out-dir")
    assert tree_bytes(out) == before
    images = voc_root / "VOCdevkit" / "VOC2012" / "JPEGImages"
    data = tree_bytes(voc_root)
    line = cli_error(capsys, tiny(images / "run", "--data-root", voc_root, "--train-split", "train", "--iters", "1"))
    assert line == (f"error: --out-dir {images / 'run'} is inside the dataset's image folder {images}: nothing was "
                    f"written; choose another --out-dir")
    assert tree_bytes(voc_root) == data
    (tmp_path / "new" / "last.pt").mkdir(parents=True)
    line = cli_error(capsys, demo_args(tmp_path / "new", "--iters", "1"))
    assert line == (f"error: --out-dir {tmp_path / 'new'} holds {tmp_path / 'new' / 'last.pt'}, which is a folder, "
                    f"not a file: the run writes its last.pt there; move it away or choose another --out-dir")
    for name in ("last.pt", "best.pt"):  # a resumed run goes on writing its own checkpoints
        train.check_run_outputs(train.parse_args(demo_args(out, "--iters", "1", "--resume", str(out / name))))
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "weights.pt").write_bytes(before["best.pt"])  # --init-from a file of the new run's folder
    train.check_run_outputs(train.parse_args(demo_args(tmp_path / "fresh", "--init-from",
                                                       str(tmp_path / "fresh" / "weights.pt"))))
    assert tree_bytes(out) == before and not list(tmp_path.rglob("*.tmp"))


def strict_json(line):
    """json.loads that refuses NaN and Infinity, which are not JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(line, parse_constant=refuse)


def test_two_trainings_started_together_one_is_refused_naming_the_holder(tmp_path):
    """Real processes into one --out-dir: the second is refused in one line naming the first (its pid and run id),
    and the folder holds one run: its checkpoint, its log (strict JSON, one start record), no lock once it ended."""
    out = tmp_path / "out"
    args = tiny(out, "--iters", "1000", "--demo-images", "8", "--log-every", "1", "--val-every", "1000")
    processes = [start_script(args, cwd=tmp_path) for _ in range(2)]
    deadline = time.monotonic() + 240
    while all(p.poll() is None for p in processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    loser = next(p for p in processes if p.poll() is not None)
    winner = next(p for p in processes if p is not loser)
    code, _, stderr = finish_script(loser)
    assert code == 2, stderr
    lock = json.loads((out / "train.lock").read_text())
    assert lock["pid"] == winner.pid
    assert stderr.splitlines() == [
        f"error: --out-dir {out} is in use by another training (run {lock['run_id']}, pid {winner.pid} on "
        f"{lock['host']}, started {lock['started']}): wait for it to end, or choose another --out-dir"]
    wait_for(winner, "iter 1/1000")
    winner.send_signal(signal.SIGTERM)
    code, _, stderr = finish_script(winner)
    assert code == 143, stderr
    checkpoint = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["run_id"] == lock["run_id"]
    records = [strict_json(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r for r in records if "start" in r] == [records[0]]
    assert records[0]["run_id"] == lock["run_id"] and records[0]["start"] == "new"
    assert records[-1] == {"iteration": checkpoint["iteration"], "interrupted": "SIGTERM"}
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "log.jsonl"]  # the lock went with its holder


def test_lock_of_a_killed_training_is_taken_over(tmp_path, capsys):
    """SIGKILL leaves train.lock behind, naming the dead process; the OS released its flock, so the next run takes
    it over. That run is --overwrite: it replaces the killed run's log at its first save."""
    out = tmp_path / "out"
    process = start_script(tiny(out, "--iters", "1000", "--demo-images", "8", "--log-every", "1",
                                "--val-every", "1000"), cwd=tmp_path)
    wait_for(process, "iter 2/1000")  # the record of iteration 1 is written
    process.kill()
    finish_script(process)
    killed = json.loads((out / "train.lock").read_text())
    assert killed["pid"] == process.pid
    assert strict_json((out / "log.jsonl").read_text().splitlines()[0])["run_id"] == killed["run_id"]
    code, _, err = run_cli(capsys, demo_args(out, "--iters", "1", "--overwrite"))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "log.jsonl"]
    new = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert new["run_id"] != killed["run_id"] and new["iteration"] == 1
    records = [strict_json(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[0]["run_id"] == new["run_id"] and records[0]["start"] == "new"
    assert records[0]["overwriting"] == {"run_id": killed["run_id"], "files": ["log.jsonl"], "iteration": None}
    assert [r for r in records if "start" in r] == [records[0]]  # none of the killed run's records


def test_overwrite_then_bad_data_keeps_the_earlier_run_byte_for_byte(voc_root, tmp_path, capsys):
    """--overwrite, then a training image that cannot be read in the first batch (a real process): nothing trained,
    exit 2, and the earlier run's files are exactly as they were, nothing added."""
    out = tmp_path / "out"
    args = tiny(out, "--data-root", str(voc_root), "--train-split", "train", "--iters", "1", "--val-every", "1")
    assert train.main(args) == 0
    before = folder_bytes(out)
    assert sorted(before) == ["best.pt", "last.pt", "log.jsonl"]
    image = voc_root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000000.jpg"  # read in the first batch
    image.write_bytes(b"not a JPEG")
    result = run_script([*args, "--overwrite"], cwd=tmp_path)
    assert_script_error(result, f"cannot read image {image}")
    assert folder_bytes(out) == before


def test_resume_stays_in_its_folder_and_never_enters_another_run(tmp_path, monkeypatch, capsys):
    """--resume without --out-dir continues in the checkpoint's folder (not the dataset's default one); into a
    folder of another run, or over a later last.pt of its own run, it is refused; a checkpoint of a train.py without
    run ids (best_miou -1.0 before any validation) still resumes in its own folder, and -1.0 is never shown."""
    monkeypatch.chdir(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        assert train.main(demo_args(folder, "--iters", "1", "--val-every", "1")) == 0
    b_files = folder_bytes(b)
    resume = demo_args(a, "--iters", "1")
    del resume[resume.index("--out-dir"):resume.index("--out-dir") + 2]  # no --out-dir
    code, out, err = run_cli(capsys, [*resume, "--resume", a / "last.pt"])
    assert code == 0, err
    miou = [r for r in read_log(a) if "val_miou" in r][-1]["val_miou"]
    assert out.splitlines()[-1] == f"done: best val mIoU {miou:.4f}; last.pt and best.pt in {a}"
    assert not (tmp_path / "runs").exists() and folder_bytes(b) == b_files
    ids = {f: torch.load(f / "last.pt", weights_only=True)["run_id"] for f in (a, b)}
    code, _, err = run_cli(capsys, [*resume, "--resume", a / "last.pt", "--out-dir", b])
    assert code == 2 and err == [f"error: --out-dir {b} holds the last.pt of another run (run {ids[b]}) than "
                                 f"{a / 'last.pt'} (run {ids[a]}): give the resumed run an --out-dir of its own"]
    assert folder_bytes(b) == b_files

    checkpoint = torch.load(a / "last.pt", weights_only=True)
    torch.save({**checkpoint, "iteration": 0}, a / "earlier.pt")
    code, _, err = run_cli(capsys, [*resume, "--resume", a / "earlier.pt"])
    assert code == 2 and err == [f"error: --out-dir {a} holds a later last.pt of this run (iteration 1; "
                                 f"{a / 'earlier.pt'} is from iteration 0): resume from {a / 'last.pt'}, or give "
                                 f"another --out-dir"]

    old = tmp_path / "old"
    old.mkdir()
    legacy = {k: v for k, v in checkpoint.items() if k != "run_id"}
    torch.save({**legacy, "best_miou": -1.0}, old / "last.pt")
    code, out, err = run_cli(capsys, [*resume, "--resume", old / "last.pt"])
    assert code == 0 and out.splitlines()[-1] == f"done: no validation has run; last.pt in {old}"
    assert "-1.0" not in out


def test_a_run_refused_before_its_first_step_removes_only_the_folders_it_created(voc_root, tmp_path, capsys):
    """A training image that cannot be read in the first batch (exit 2, a real process): the --out-dir and the
    folders above it that the run created are removed; the folder above them, which existed, stays with its file.
    An --out-dir that existed before, empty, stays."""
    image = voc_root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000000.jpg"  # read in the first batch
    image.write_bytes(image.read_bytes()[:600])  # its header is whole: the check of the masks before passes
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("another run's notes")
    flags = ["--data-root", str(voc_root), "--train-split", "train", "--iters", "2"]
    result = run_script(tiny(keep / "new" / "deeper" / "out", *flags), cwd=tmp_path)
    assert_script_error(result, f"cannot read image {image}")
    assert sorted(p.name for p in keep.iterdir()) == ["notes.txt"]
    assert (keep / "notes.txt").read_text() == "another run's notes"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"cannot read image {image}" in cli_error(capsys, tiny(empty, *flags))
    assert empty.is_dir() and not list(empty.iterdir())


def test_remove_created_never_removes_a_folder_that_holds_something(tmp_path):
    """create_folders names only the folders it made; remove_created stops at the first one that is not empty."""
    assert train.create_folders(tmp_path) == []
    created = train.create_folders(tmp_path / "a" / "b" / "c")
    assert created == [tmp_path / "a" / "b" / "c", tmp_path / "a" / "b", tmp_path / "a"]
    (tmp_path / "a" / "other.txt").write_text("x")
    train.remove_created(created)
    assert not (tmp_path / "a" / "b").exists() and (tmp_path / "a" / "other.txt").read_text() == "x"
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "log.jsonl").write_text("{}\n")
    train.remove_created(created)
    assert (tmp_path / "a" / "b" / "c" / "log.jsonl").is_file()


def test_log_lines_are_strict_json(tmp_path):
    run = SimpleNamespace(master=True, unwritten_log=[], earlier_run_kept=False, out_dir=tmp_path)
    train.log(run, {"iteration": 3, "loss": math.nan, "lr": math.inf, "val_iou": {"a": -math.inf, "b": 0.5},
                    "x": [math.nan]})
    assert [strict_json(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [
        {"iteration": 3, "loss": None, "lr": None, "val_iou": {"a": None, "b": 0.5}, "x": [None]}]


def test_diverged_run_logs_strict_json_and_a_new_run_does_not_append(tmp_path, capsys):
    """nan in the log is null; the log of a run that saved nothing is not appended to by the next run, which is
    refused unless --overwrite; an --overwrite run that diverges before its first save leaves it byte for byte."""
    out = tmp_path / "out"
    args = demo_args(out, "--iters", "6", "--lr", "1e9", "--val-every", "100")
    code, _, err = run_cli(capsys, args)
    assert code == 1 and "this run has saved no checkpoint" in err[0]
    lines = (out / "log.jsonl").read_text().splitlines()
    records = [strict_json(line) for line in lines]
    assert records[0]["start"] == "new" and records[-1]["diverged"] is True
    assert any(r.get("loss", 0) is None for r in records)  # a nan loss, written as null
    code, _, err = run_cli(capsys, args)
    assert code == 2 and err == [f"error: --out-dir {out} holds the log.jsonl of an earlier run (which saved no "
                                 f"checkpoint): choose another --out-dir, or give --overwrite to replace it"]
    before = folder_bytes(out)
    code, _, err = run_cli(capsys, [*args, "--overwrite"])
    assert code == 1 and err[0].endswith(f"this run has saved no checkpoint; the earlier run in {out} is as it was; "
                                         f"try a lower --lr than 1e+09")
    assert folder_bytes(out) == before


def test_nan_loss_stops_with_exit_1_and_keeps_the_finite_checkpoint(tmp_path, capsys):
    """--lr 1e9 diverges: the run stops at the first log step whose loss is not finite, exits 1, and never saves
    a checkpoint after it; what was saved before holds finite weights."""
    out = tmp_path / "out"
    capsys.readouterr()
    assert train.main(tiny(out, "--iters", "40", "--demo-images", "8", "--lr", "1e9", "--log-every", "2",
                           "--val-every", "2")) == 1
    records = read_log(out)
    stopped = records[-1]["iteration"]
    assert records[-1] == {"iteration": stopped, "diverged": True} and stopped < 40
    losses = [r["loss"] for r in records if "loss" in r]
    assert all(math.isfinite(loss) for loss in losses[:-1])  # it stopped at the first bad log step, or earlier
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: training diverged (the loss or the weights became nan or "
                                               f"infinite by iteration {stopped}): stopped without saving, ")
    assert err[0].endswith("try a lower --lr than 1e+09")
    for name in ("last.pt", "best.pt"):
        if (out / name).exists():
            checkpoint = torch.load(out / name, map_location="cpu", weights_only=True)
            assert checkpoint["iteration"] < stopped
            assert all(t.isfinite().all() for t in checkpoint["model"].values() if t.is_floating_point())


def test_nan_weights_are_never_saved(tmp_path, monkeypatch, capsys):
    """A weight turns nan after the validation of step 2; the validation of step 4 saves nothing and the run
    stops with exit code 1 (no log step in between: --log-every 100)."""
    original, steps = train.train_step, [0]

    def train_step(model, *args, **kwargs):
        result = original(model, *args, **kwargs)
        steps[0] += 1
        if steps[0] == 3:
            with torch.no_grad():
                weight = next(model.parameters())
                weight[(0,) * weight.dim()] = math.nan  # one weight
        return result

    monkeypatch.setattr(train, "train_step", train_step)
    out = tmp_path / "out"
    capsys.readouterr()
    assert train.main(tiny(out, "--iters", "6", "--demo-images", "4", "--log-every", "100", "--val-every", "2")) == 1
    assert steps[0] == 4
    for name in ("last.pt", "best.pt"):
        checkpoint = torch.load(out / name, map_location="cpu", weights_only=True)
        assert checkpoint["iteration"] == 2
        assert all(t.isfinite().all() for t in checkpoint["model"].values() if t.is_floating_point())
    assert read_log(out)[-1] == {"iteration": 4, "diverged": True}
    assert (f"stopped without saving, the latest checkpoint is {out / 'last.pt'} from iteration 2"
            in capsys.readouterr().err)


class OverflowingGradient(torch.autograd.Function):
    """The identity, whose gradient is infinite: gradients that overflow, as fp16's do, under a finite loss."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def break_steps(monkeypatch, inf_loss=(), inf_gradient=(), from_step=None):
    """Make the losses of train_step's steps `inf_loss` (1-based; all from `from_step` on) infinite and the
    gradients of the steps `inf_gradient` infinite under a finite loss. Returns the losses train_step returned."""
    original_step, original_loss, step, returned = train.train_step, F.cross_entropy, [0], []

    def cross_entropy(logits, *args, **kwargs):
        if step[0] in inf_gradient:
            logits = OverflowingGradient.apply(logits)
        loss = original_loss(logits, *args, **kwargs)
        broken = step[0] in inf_loss or (from_step is not None and step[0] >= from_step)
        return loss * math.inf if broken else loss

    def train_step(*args, **kwargs):
        step[0] += 1
        returned.append(original_step(*args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(train.F, "cross_entropy", cross_entropy)
    monkeypatch.setattr(train, "train_step", train_step)
    return returned


def test_fp16_steps_the_scaler_skips_do_not_stop_the_run(tmp_path, monkeypatch, capsys):
    """fp16 with the real GradScaler on the CPU: step 2's loss is infinite, step 3's gradients overflow under a finite
    loss. The scaler skips both (its scale halves twice, the weights stay as they were), the run goes on to the end:
    exit 0, its checkpoints, and log records that average the finite losses and count what was left out."""
    returned = break_steps(monkeypatch, inf_loss={2}, inf_gradient={3})
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, demo_args(out, "--precision", "fp16", "--iters", "4", "--log-every", "2",
                                                  "--val-every", "4"))
    assert code == 0, err
    losses = [float(r["loss"]) for r in returned]
    assert [math.isfinite(loss) for loss in losses] == [True, False, True, True]
    records = {r["iteration"]: r for r in read_log(out) if "loss" in r}
    assert records[2]["loss"] == pytest.approx(losses[0]) and records[2]["nonfinite_losses"] == 1
    assert records[2]["skipped_steps"] == 1
    assert records[4]["loss"] == pytest.approx((losses[2] + losses[3]) / 2) and records[4]["skipped_steps"] == 1
    assert "nonfinite_losses" not in records[4]
    assert "iter 2/4 loss " in stdout and stdout.count("1 step skipped by the fp16 scaler") == 2
    assert "1 non-finite loss left out" in stdout
    checkpoint = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["iteration"] == 4 and checkpoint["scaler"]["scale"] == 2.0**10 / 4  # two skips, two halvings
    assert all(t.isfinite().all() for t in checkpoint["model"].values() if t.is_floating_point())
    assert (out / "best.pt").is_file() and read_log(out)[-1]["iteration"] == 4


def test_fp16_loss_that_stays_infinite_ends_as_diverged(tmp_path, monkeypatch, capsys):
    """The loss infinite from step 2 on: every step is skipped (the weights stay finite), and at the first log step
    with DIVERGED_STEPS failed steps in a row the run stops as diverged, exit 1, having saved nothing after."""
    monkeypatch.setattr(train, "DIVERGED_STEPS", 3)
    break_steps(monkeypatch, from_step=2)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, demo_args(out, "--precision", "fp16", "--iters", "20", "--log-every", "2",
                                             "--val-every", "100"))
    stopped = next(t for t in range(2, 21, 2) if t - 1 >= train.DIVERGED_STEPS)  # steps 2..t failed
    assert code == 1 and err[0].startswith(f"error: training diverged (the loss or the weights became nan or "
                                           f"infinite by iteration {stopped}): stopped without saving")
    records = read_log(out)
    assert records[-1] == {"iteration": stopped, "diverged": True}
    assert [r["skipped_steps"] for r in records if "loss" in r] == [1, 2]  # iteration 2, then 4
    assert not list(out.glob("*.pt"))


def run_patched(patch, args, cwd):
    """python -c: import train, run `patch` (Python source), then train.py's command line with `args`."""
    code = f"import sys, train\n{patch}\ntrain.run_main(train.main)\n"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def test_an_unexpected_error_is_a_bug_not_divergence(tmp_path):
    """A real process whose step raises an exception no one expects: its traceback, one last line saying it is a
    bug, exit code 70 (Python's own 1 would read as "diverged"); the folders the run created are gone."""
    out = tmp_path / "runs" / "a" / "out"
    patch = "def broken(*args, **kwargs):\n    raise ZeroDivisionError('boom')\ntrain.train_step = broken"
    result = run_patched(patch, tiny(out, "--iters", "2", "--demo-images", "4"), tmp_path)
    assert result.returncode == train.EXIT_BUG == 70
    assert "Traceback (most recent call last)" in result.stderr and "ZeroDivisionError: boom" in result.stderr
    assert result.stderr.splitlines()[-1] == ("error: unexpected ZeroDivisionError (a bug: please report it with the "
                                              "traceback above)")
    assert not (tmp_path / "runs").exists()


def test_data_error_after_training_started_saves_last_first_and_exits_5(tmp_path, monkeypatch, capsys):
    """A training file that turns out bad after a step: last.pt is saved first, the run says so and exits 5. Under
    --overwrite that save is the new run's first: the earlier run's checkpoints and log go, its own log is written."""
    out = tmp_path / "out"
    assert train.main(demo_args(out, "--iters", "1", "--val-every", "1")) == 0
    earlier = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    original, reads = train.SyntheticShapes.__getitem__, [0]

    def getitem(self, index):
        reads[0] += 1
        if reads[0] == 3:  # the first image of the second batch (batch size 2)
            raise train.UserError("cannot read image shapes_003.png: truncated")
        return original(self, index)

    monkeypatch.setattr(train.SyntheticShapes, "__getitem__", getitem)
    code, _, err = run_cli(capsys, demo_args(out, "--iters", "4", "--val-every", "4", "--overwrite"))
    last = out / "last.pt"
    assert code == train.EXIT_DATA_ERROR == 5
    assert err == [f"error: cannot read image shapes_003.png: truncated (after iteration 1): saved {last} at "
                   f"iteration 1; fix the file, then continue with --resume {last}"]
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "log.jsonl"]  # the earlier best.pt went too
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["iteration"] == 1 and saved["run_id"] != earlier["run_id"] and saved["best_miou"] is None
    records = [strict_json(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[0]["start"] == "new" and records[0]["run_id"] == saved["run_id"]
    assert records[0]["overwriting"] == {"run_id": earlier["run_id"], "files": ["best.pt", "last.pt", "log.jsonl"],
                                         "iteration": 1}
    assert [r["iteration"] for r in records[1:]] == [1, 1] and records[-1]["data_error"].startswith("cannot read")


def test_data_error_during_validation_saves_last_first_and_exits_5(tmp_path, monkeypatch, capsys):
    original = train.SyntheticShapes.__getitem__

    def getitem(self, index):
        if self.seed == 1 and index == 3:  # the demo's validation set
            raise train.UserError("mask shapes_003.png is not a 32x32 map of labels (found [9])")
        return original(self, index)

    monkeypatch.setattr(train.SyntheticShapes, "__getitem__", getitem)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, demo_args(out, "--iters", "4", "--val-every", "2"))
    assert code == 5
    assert err == [f"error: mask shapes_003.png is not a 32x32 map of labels (found [9]) (during the validation of "
                   f"iteration 2): saved {out / 'last.pt'} at iteration 2; fix the file, then continue with "
                   f"--resume {out / 'last.pt'}"]
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=True)["iteration"] == 2
    assert not (out / "best.pt").exists() and not list(tmp_path.rglob("*.tmp"))


class FullDisk:
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, file, room):
        self.file, self.room = file, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.file.close()


def test_full_disk_while_saving_ends_in_one_line_naming_the_checkpoint_kept(tmp_path, monkeypatch, capsys):
    """best.pt, written after last.pt, finds the disk full part-way through torch.save's writes (an OSError from
    file.write, as on a real full disk): exit 3, naming last.pt as kept; no best.pt, no temporary file."""
    def open_(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        best = fnmatch.fnmatch(Path(path).name, ".best.pt.*.tmp")  # best.pt's temporary file (train.temporary_path)
        return FullDisk(file, room=4096) if mode == "wb" and best else file

    monkeypatch.setattr(train, "open", open_, raising=False)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, demo_args(out, "--iters", "1", "--val-every", "1"))
    last = out / "last.pt"
    assert code == train.EXIT_DISK_FULL == 3
    assert err == [f"error: no space left on the device while writing {out / 'best.pt'}: the latest checkpoint is "
                   f"{last} from iteration 1; free some space, then continue with --resume {last}"]
    assert torch.load(last, weights_only=True)["iteration"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "log.jsonl"]  # no best.pt, no .tmp, no lock


def test_out_of_memory_ends_in_one_line_naming_the_flags_and_the_checkpoint(tmp_path, monkeypatch, capsys):
    original, steps = train.train_step, [0]

    def train_step(*args, **kwargs):
        steps[0] += 1
        if steps[0] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", train_step)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, demo_args(out, "--iters", "4", "--val-every", "1", "--log-every", "100"))
    assert code == train.EXIT_OUT_OF_MEMORY == 4
    assert err == [f"error: out of memory on cpu in step 2: lower --batch-size (now 2), --crop-size (now 32) or use "
                   f"--precision bf16; the latest checkpoint is {out / 'last.pt'} from iteration 1: --resume it with a "
                   f"lower --batch-size (the other flags must stay)"]
    assert torch.load(out / "last.pt", weights_only=True)["iteration"] == 1


def test_done_and_other_messages_name_checkpoints_that_exist(tmp_path, monkeypatch, capsys):
    """The end of a run names the files it left and where its best is: a run resumed into another folder that
    finds no better mIoU has no best.pt of its own; before a resumed run's first save, the latest checkpoint is the
    one it resumed from."""
    b, c, d = (tmp_path / name for name in "bcd")
    interrupt_after(monkeypatch, 1, [0])
    assert run_cli(capsys, demo_args(b, "--iters", "2"))[0] == 130  # last.pt of iteration 1, no validation yet
    monkeypatch.undo()
    torch.save({**torch.load(b / "last.pt", weights_only=True), "best_miou": 1.0}, b / "best.pt")  # a best that no
    # validation beats (an mIoU is at most 1), as a best.pt of iteration 1
    code, out, _ = run_cli(capsys, demo_args(c, "--iters", "2", "--val-every", "2", "--resume", b / "best.pt"))
    assert code == 0 and out.splitlines()[-1] == f"done: last.pt in {c}; the best, val mIoU 1.0000, is {b / 'best.pt'}"
    assert sorted(p.name for p in c.iterdir()) == ["last.pt", "log.jsonl"]
    assert [r["val_miou"] < 1 for r in read_log(c) if "val_miou" in r] == [True]

    # resumed at its last iteration: nothing to do, nothing saved in d
    code, out, _ = run_cli(capsys, demo_args(d, "--iters", "2", "--val-every", "2", "--resume", c / "last.pt"))
    assert code == 0 and out.splitlines()[-1] == (
        f"done: the latest checkpoint is {c / 'last.pt'} from iteration 2 (resumed from; none saved since); the "
        f"best, val mIoU 1.0000, was saved by the run that {c / 'last.pt'} continues, and there is no best.pt next "
        f"to it")
    assert not (d / "last.pt").exists() and not (d / "best.pt").exists()

    # out of memory in the first step of a run resumed into a new folder: the checkpoint named is the resumed one
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "train_step", out_of_memory)
    code, _, err = run_cli(capsys, demo_args(tmp_path / "e", "--iters", "2", "--val-every", "2", "--resume",
                                             b / "best.pt"))
    assert code == train.EXIT_OUT_OF_MEMORY and err[-1].endswith(
        f"; the latest checkpoint is {b / 'best.pt'} from iteration 1 (resumed from; none saved since): --resume it "
        f"with a lower --batch-size (the other flags must stay)")


# --------------------------------------------------------------------- train.py 4d: the command line and the benchmarks

BOTTLENECK = "needs a Bottleneck ResNet (--backbone resnet50, resnet101, resnet152), not"
# Every flag mistake of train.py that the command line refuses before any work: (command line, flags added to it,
# fragments of the one error line; a fragment that starts with "error: " is how the line starts). The command lines
# are in FLAG_COMMAND_LINES.
FLAG_ERRORS = [
    # numbers, choices and spellings
    ("tiny", ["--log-every", "0"], ["error: argument --log-every: expected a whole number >= 1, got '0'"]),
    ("tiny", ["--val-every", "0"], ["error: argument --val-every: expected a whole number >= 1, got '0'"]),
    ("tiny", ["--batch-size", "0"], ["error: argument --batch-size: expected a whole number >= 1, got '0'"]),
    ("tiny", ["--benchmark", "--benchmark-steps", "0"],
     ["error: argument --benchmark-steps: expected a whole number >= 1, got '0'"]),
    ("tiny", ["--workers", "-1"], ["error: argument --workers: expected a whole number >= 0, got '-1'"]),
    ("tiny", ["--device", "gpu"], ["error: --device gpu is not supported: use cuda, cuda:N or cpu"]),
    ("tiny", ["--device", "mps"], ["error: --device mps is not supported: use cuda, cuda:N or cpu"]),
    ("tiny", ["--device", "tpu3"], ["error: --device tpu3 is not supported: use cuda, cuda:N or cpu"]),
    ("tiny", ["--lr", "0"], ["error: argument --lr: expected a number > 0, got '0'"]),
    ("tiny", ["--lr", "-0.01"], ["error: argument --lr: expected a number > 0, got '-0.01'"]),
    ("tiny", ["--lr", "nan"], ["error: argument --lr: expected a number > 0, got 'nan'"]),
    ("tiny", ["--lr", "inf"], ["error: argument --lr: expected a number > 0, got 'inf'"]),
    ("tiny", ["--lr", "fast"], ["error: argument --lr: expected a number > 0, got 'fast'"]),
    ("tiny", ["--crop-size", "8", "--batch-size", "1"],
     ["error: --crop-size 8 with --batch-size 1 leaves BatchNorm one value per channel (a 1x1 feature map at output "
      "stride 8): use a larger crop or batch"]),
    ("tiny", ["--resume", "last.pt", "--overwrite"],
     ["error: --resume continues the run in --out-dir and --overwrite starts a new one: give only one"]),
    ("tiny", ["--bacbone", "resnet18"], ["error: unrecognized arguments: --bacbone resnet18"]),
    ("tiny", ["--cluster-reseed", "-1"], ["error: argument --cluster-reseed: expected a whole number >= 0, got '-1'"]),
    ("tiny", ["--cluster-init", "kmeans"], ["error: argument --cluster-init: invalid choice: 'kmeans'"]),
    # --num-clusters: the multiple each model's attention needs; none without clustering
    ("tiny", ["--num-clusters", "12"], ["error: argument --num-clusters: --model danet needs a multiple of 8 (position "
                                        "attention reads K / 8 query dimensions), got 12"]),
    ("tiny", ["--num-clusters", "20"], ["argument --num-clusters: --model danet needs a multiple of 8 (position "
                                        "attention reads K / 8 query dimensions), got 20"]),
    ("tiny", ["--model", "dranet", "--num-clusters", "24"],
     ["argument --num-clusters: --model dranet needs a multiple of 16 (compact channel attention reads K / 16",
      "got 24 (see --help)"]),
    ("tiny", ["--model", "dranet", "--num-clusters", "8"],
     ["--num-clusters: --model dranet needs a multiple of 16", "got 8"]),
    ("tiny", ["--model", "dranet", "--num-clusters", "40", "--benchmark"],
     ["--model dranet needs a multiple of 16", "got 40"]),
    ("pretrained", ["--model", "dranet", "--num-clusters", "24"], ["--model dranet needs a multiple of 16"]),
    ("tiny", ["--no-clustering", "--num-clusters", "24"], ["--num-clusters, --cluster-init and --cluster-reseed set "
                                                           "the clustering layers, which --no-clustering leaves out"]),
    ("tiny", ["--no-clustering", "--num-clusters", "64"], ["which --no-clustering leaves out"]),
    ("tiny", ["--no-clustering", "--cluster-init", "data"], ["which --no-clustering leaves out"]),
    # the Bottleneck ResNets' flags, DRANet's rules
    ("tiny", ["--multi-grid"], [f"--multi-grid {BOTTLENECK} resnet18"]),
    ("tiny", ["--model", "dranet", "--multi-grid", "--backbone", "resnet34"], [f"--multi-grid {BOTTLENECK} resnet34"]),
    ("tiny", ["--deep-stem"], [f"--deep-stem {BOTTLENECK} resnet18 (see --help)"]),
    ("pretrained", ["--deep-stem"], ["--deep-stem needs a Bottleneck ResNet"]),
    ("pretrained", ["--deep-stem", "--pretrained"], ["--deep-stem has no ImageNet weights here"]),
    ("pretrained", ["--model", "dranet", "--batch-size", "1"], ["needs a batch of 2 or more"]),
    ("pretrained", ["--model", "dranet", "--attention", "dense"], ["DRANet's attends to 50 pooled centres"]),
    # --attention and its benchmark
    ("bare", ["--model", "dranet", "--attention", "heads"], ["--attention is DANet's position attention"]),
    ("bare", ["--attention", "flash"], ["argument --attention: invalid choice: 'flash'"]),
    ("bare", ["--benchmark-attention", "8", "--benchmark-channels", "12"],
     ["argument --benchmark-channels: expected multiples of 8, got 12"]),
    ("bare", ["--benchmark-attention", "0"], ["argument --benchmark-attention: expected a whole number >= 1, got '0'"]),
    ("bare", ["--benchmark-attention", "8", "--benchmark"],
     ["--benchmark times training steps, --benchmark-attention"]),
    # where a run starts from
    ("tiny", ["--init-from", "a.pt", "--resume", "b.pt"], ["--init-from starts a new run"]),
    ("tiny", ["--init-from", "nowhere.pt"], ["checkpoint nowhere.pt not found"]),
]
FLAG_COMMAND_LINES = {  # name -> the command line a row's flags are added to, given the --out-dir
    "tiny": lambda out: tiny(out, "--iters", "2", "--demo-images", "4"),
    "pretrained": lambda out: [a for a in tiny(out, "--iters", "1", "--demo-images", "2") if a != "--no-pretrained"],
    "bare": lambda out: ["--device", "cpu"],
}


@pytest.mark.parametrize("command, flags, fragments", FLAG_ERRORS,
                         ids=[" ".join([*(c != "tiny") * [c + ":"], *f]) for c, f, _ in FLAG_ERRORS])
def test_bad_flags_exit_2_in_one_line_before_any_work(command, flags, fragments, tmp_path, capsys):
    """Exit code 2 and one line holding every fragment, in the flags' words and not the model classes'; nothing
    written, not even the --out-dir."""
    line = cli_error(capsys, [*FLAG_COMMAND_LINES[command](tmp_path / "out"), *flags])
    for fragment in fragments:
        assert line.startswith(fragment) if fragment.startswith("error: ") else fragment in line, (fragment, line)
    assert "Attention" not in line and "channels divisible" not in line  # not the model classes' words
    assert_nothing_half_written(tmp_path, tmp_path / "out")


def test_dranet_flags(tmp_path, capsys, monkeypatch):
    """--aux-weight follows --model; the benchmark line (DRANet's flag mistakes are rows of FLAG_ERRORS)."""
    assert train.parse_args(["--model", "dranet"]).aux_weight == 0.2
    assert train.parse_args([]).aux_weight == 1.0
    assert train.parse_args(["--model", "dranet", "--aux-weight", "0.5"]).aux_weight == 0.5
    assert train.parse_args(["--deep-stem", "--data-root", str(tmp_path)]).pretrained is False  # VOC's recipe: True
    monkeypatch.chdir(tmp_path)
    train.main(["--benchmark", "--model", "dranet", "--backbone", "resnet18", "--crop-size", "32", "--batch-size", "2",
                "--benchmark-steps", "1", "--device", "cpu"])
    assert re.fullmatch(r"benchmark dranet resnet18 crop 32 batch 2 fp32 cpu compact attention: [\d.]+ ms/step, "
                        r"[\d.]+ images/s, peak memory [\d.]+ GiB", capsys.readouterr().out.strip())


def test_deep_stem_on_the_demo_names_the_default_backbone(tmp_path, capsys):
    line = cli_error(capsys, ["--deep-stem", "--device", "cpu", "--out-dir", tmp_path / "out"])
    assert line == f"error: --deep-stem {BOTTLENECK} resnet18 (the demo's default) (see --help)"


def test_the_issue_command_exits_2_with_one_line(tmp_path):
    result = run_script(["--model", "dranet", "--num-clusters", "24", "--out-dir", str(tmp_path / "out")], cwd=tmp_path)
    assert_script_error(result, "--num-clusters", "24", "--model dranet", "a multiple of 16")


def test_num_clusters_rule_is_what_each_model_builds_and_help_says_it(capsys):
    """parse_args accepts K exactly when the model with clustering builds with it; without clustering each model
    builds on the small and the Bottleneck backbones (deep stem too): the branch width suits every model."""
    for name, model in train.MODELS.items():
        for k in (8, 16, 24, 32, 40, 48):
            try:
                model(num_classes=2, backbone="resnet18", num_clusters=k)
                builds = True
            except ValueError:
                builds = False
            try:
                train.parse_args(["--model", name, "--num-clusters", str(k)])
                accepted = True
            except train.UserError as e:
                assert f"--model {name} needs a multiple of" in str(e)
                accepted = False
            assert accepted == builds, (name, k)
        for backbone, deep_stem in (("resnet18", False), ("resnet50", True)):
            for clustering in (True, False):
                args = train.parse_args(["--model", name, "--backbone", backbone, "--no-pretrained"]
                                        + ["--deep-stem"] * deep_stem + ["--no-clustering"] * (not clustering))
                train.build_model({**vars(args), "num_classes": 2})  # the default K or the plain width
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--model danet a multiple of 8 (position attention" in text
    assert "--model dranet a multiple of 16 (compact channel attention" in text


@pytest.mark.parametrize("script", ["train", "evaluate"])
def test_every_numeric_flag_has_a_range(script, tmp_path, capsys):
    """nan, inf, zero, negatives, overflowing integers and scales that shrink images to nothing: one line, exit 2."""
    whole = "expected a whole number"
    if script == "train":
        main, base = train.main, tiny(tmp_path / "out", "--iters", "2")
        cases = [("--temperature", "nan", "expected a number > 0 and <= 10000"),
                 ("--temperature", "0", "expected a number > 0 and <= 10000"),
                 ("--aux-weight", "-1", "expected a number >= 0 and <= 1000"),
                 ("--aux-weight", "inf", "expected a number >= 0 and <= 1000"),
                 ("--momentum", "1", "expected a number >= 0 and < 1"),
                 ("--momentum", "-0.9", "expected a number >= 0 and < 1"),
                 ("--weight-decay", "nan", "expected a number >= 0 and < 1"),
                 ("--lr", "1e400", "expected a number > 0"),
                 ("--seed", "-1", f"{whole} >= 0"), ("--seed", str(2**64), f"{whole} from 0 to {2**32 - 1}"),
                 ("--num-clusters", "0", f"{whole} >= 8"), ("--num-clusters", "8192", f"{whole} from 8 to 4096"),
                 ("--cluster-reseed", "-5", f"{whole} >= 0"), ("--cluster-reseed", "1e3", f"{whole} >= 0"),
                 ("--crop-size", "0", f"{whole} >= 1"), ("--base-size", "4", f"{whole} >= 16"),
                 ("--iters", "99999999999999999999", f"{whole} from 1 to {2**31 - 1}"),
                 ("--batch-size", "²", f"{whole} >= 1"), ("--workers", "10000", f"{whole} from 0 to 256"),
                 ("--demo-images", str(2**40), f"{whole} from 1 to 1000000"),
                 ("--benchmark-steps", "0", f"{whole} >= 1")]
    else:
        main, base = evaluate.main, ["--checkpoint", tmp_path / "unused.pt", "--image", "unused.png"]
        cases = [("--scales", "0.01", "expected a number >= 0.1 and <= 8"),
                 ("--scales", "1e9", "expected a number >= 0.1 and <= 8"),
                 ("--crop-size", "nan", f"{whole} >= 1"), ("--crop-size", str(2**63), f"{whole} from 1 to 8192"),
                 ("--batch-size", "-2", f"{whole} >= 1"), ("--workers", "1.5", f"{whole} >= 0")]
    for flag, value, expected in cases:
        line = cli_error(capsys, [*base, flag, value], main=main)
        assert line == f"error: argument {flag}: {expected}, got {value!r} (see --help)", line
    assert not list(tmp_path.iterdir())
    if script == "train":  # the smallest --base-size: the smallest random scale still leaves pixels to crop
        args = train.parse_args(["--base-size", "16", "--crop-size", "16"])
        item = train.SyntheticShapes(2, args.base_size, transform=train.train_transform(16, 16))
        torch.manual_seed(1)
        for _ in range(8):
            image, mask = item[0]
            assert image.shape == (3, 16, 16) and mask.shape == (16, 16)
    else:  # the smallest scale on a 10 x 10 image leaves one pixel to predict
        scores = evaluate.predict(tiny_model(), torch.randn(1, 3, 10, 10), scales=[evaluate.SCALES[0], 1.0])
        assert scores.shape == (1, 3, 10, 10) and torch.allclose(scores.sum(1), torch.ones(1, 10, 10))


def test_paths_may_start_with_tilde(voc_root, tmp_path, monkeypatch):
    """~ in every path flag of both scripts is the home folder."""
    monkeypatch.setenv("HOME", str(tmp_path))  # voc_root is tmp_path / "data"
    args = tiny("~/out", "--data-root", "~/data", "--train-split", "train", "--iters", "1")
    assert train.main(args) == 0 and (tmp_path / "out" / "last.pt").is_file()
    assert train.main(args + ["--resume", "~/out/last.pt"]) == 0
    Image.fromarray(np.full((12, 20, 3), 128, np.uint8)).save(tmp_path / "photo.png")
    evaluate.main(["--checkpoint", "~/out/last.pt", "--image", "~/photo.png", "--save-dir", "~/pictures",
                   "--device", "cpu"])
    assert (tmp_path / "pictures" / "labels" / "photo.png").is_file()
    evaluate.main(["--checkpoint", "~/out/last.pt", "--data-root", "~/data", "--json", "~/r.json", "--workers", "0",
                   "--device", "cpu"])
    assert json.loads((tmp_path / "r.json").read_text())["images"] == 2
    assert not Path("~").exists()  # nothing was written into a folder literally named ~


def test_smallest_crop_is_where_batchnorm_fails():
    """The --crop-size / --batch-size check agrees with BatchNorm itself: a 1x1 map at stride 8 of one image fails."""
    model = ClusterDANet(num_classes=3, backbone="resnet18", num_clusters=32).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        model(torch.randn(1, 3, 8, 8))
    cpu = torch.device("cpu")
    for batch, crop in ((1, 9), (2, 8), (2, 1)):
        assert model(torch.randn(batch, 3, crop, crop))["out"].shape == (batch, 3, crop, crop)
        train.check_batch_norm(train.parse_args(["--crop-size", str(crop), "--batch-size", str(batch)]), cpu, 1)
    with pytest.raises(train.UserError, match="leaves BatchNorm one value per channel"):
        train.check_batch_norm(train.parse_args(["--crop-size", "8", "--batch-size", "1"]), cpu, 1)


def test_batch_norm_check_counts_what_each_batch_norm_sees(tmp_path):
    """Without SyncBatchNorm (a single process, or several on the CPU) each process's BatchNorm sees its own batch:
    DRANet with batch 1 fails in BatchNorm itself, so the check refuses it, also on 2 CPU processes."""
    model = DRANet(num_classes=3, backbone="resnet18").train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        model(torch.randn(1, 3, 32, 32))
    assert model(torch.randn(2, 3, 32, 32))["out"].shape == (2, 3, 32, 32)
    cpu = torch.device("cpu")
    for flags, world_size, refused in ((["--model", "dranet", "--batch-size", "1"], 1, "--model dranet"),
                                       (["--model", "dranet", "--batch-size", "1"], 2, "--model dranet"),
                                       (["--crop-size", "8", "--batch-size", "1"], 2, "--crop-size 8"),
                                       (["--model", "dranet", "--batch-size", "2"], 2, None),
                                       (["--crop-size", "9", "--batch-size", "1"], 2, None)):
        args = train.parse_args(flags)
        if refused is None:
            train.check_batch_norm(args, cpu, world_size)
            continue
        with pytest.raises(train.UserError, match="one value per channel") as error:
            train.check_batch_norm(args, cpu, world_size)
        assert str(error.value).startswith(refused)
        assert (" on each of the 2 processes (without SyncBatchNorm" in str(error.value)) == (world_size == 2)


@pytest.mark.parametrize("attention, path", [("auto", "blocked"), ("dense", "dense")])
def test_benchmark_prints_speed_and_memory(attention, path, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the benchmark writes nothing, not even the default out dir
    capsys.readouterr()
    train.main(["--benchmark", "--backbone", "resnet18", "--crop-size", "32", "--batch-size", "2",
                "--benchmark-steps", "1", "--device", "cpu", "--attention", attention])
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    match = re.fullmatch(r"benchmark resnet18 crop 32 batch 2 fp32 cpu (\w+) attention: ([\d.]+) ms/step, "
                         r"([\d.]+) images/s, peak memory ([\d.]+) GiB", lines[0])
    assert match, lines[0]
    attention, ms, images_per_s, memory = match[1], float(match[2]), float(match[3]), float(match[4])
    assert attention == path  # what --attention computes on the CPU
    assert ms > 0 and images_per_s == pytest.approx(2 * 1000 / ms, rel=0.01, abs=0.01)  # printed rounded
    assert 0 < memory <= rss_gib + 0.005  # peak RSS of this process when it printed
    assert list(tmp_path.iterdir()) == []


def test_tensor_memory_counts_live_tensors():
    """TensorMemory's peak against sizes known here: views share their storage, a freed tensor stops counting."""
    with train.TensorMemory() as memory:
        a = torch.zeros(1000)  # 4000 bytes
        view = a[:10]  # no new storage
        b = torch.ones(500, dtype=torch.float64)  # 4000 bytes: 8000 live
        del a, view, b
        c = torch.zeros(1500)  # 6000 bytes, after the 8000 were freed
    assert memory.peak == 8000 and c.numel() == 1500


def test_blocked_attention_memory_is_linear():
    """Forward + backward at 48 x 48 (N = 2304): the dense path holds at least two N x N fp32 matrices at once (A
    kept for the backward pass and its gradient), the blocked one with blocks of 256 queries (its two largest
    temporaries are 256 x N) less than half of one, and less than half that again with blocks of 64."""
    attention = PositionAttention(16)
    attention.gamma.data.fill_(0.5)
    x = torch.randn(1, 16, 48, 48)
    matrix = 2304 ** 2 * 4  # bytes of one N x N fp32 matrix

    def peak(path, block_size=256):
        attention.attention, attention.block_size = path, block_size
        return train.peak_extra_memory(lambda: attention_gradients(attention, x), torch.device("cpu"))

    dense, blocked, small = peak("dense"), peak("blocked"), peak("blocked", 64)
    assert dense >= 2 * matrix
    assert blocked < 0.5 * matrix and small < 0.5 * blocked


def test_benchmark_attention_prints_a_table(tmp_path, capsys, monkeypatch):
    """One row per size and channel count, each path's time and peak extra memory, and the auto path against dense;
    the dense path's memory is at least its two N x N matrices (N = 32 * 32: 4 MiB each)."""
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    train.main(["--benchmark-attention", "8", "32", "--benchmark-channels", "16", "--batch-size", "1",
                "--benchmark-steps", "2", "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"benchmark attention: PositionAttention forward + backward, cpu fp32, "
                        f"{torch.get_num_threads()} threads, best of 2; auto = blocked here; time, peak extra memory")
    assert lines[1:3] == ["| input [B, C, H, W] | blocked | heads | dense | blocked (auto) / dense |",
                          "| --- | --- | --- | --- | --- |"]
    cell = r"(\d+) ms, (\d+) MiB"
    ratio = r"([\d.]+)x time, ([\d.]+)x memory"
    rows = [re.fullmatch(rf"\| \[1, 16, (\d+), \1\] \| {cell} \| {cell} \| {cell} \| {ratio} \|", line)
            for line in lines[3:]]
    assert len(rows) == 2 and all(rows), lines
    assert [row[1] for row in rows] == ["8", "32"]
    blocked, dense = int(rows[1][3]), int(rows[1][7])
    assert dense >= 8 and blocked < dense and float(rows[1][9]) == pytest.approx(blocked / dense, abs=0.15)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------- evaluate.py: the protocols (whole, slide, multi-scale, flip)

def test_slide_window_covering_the_image_equals_whole_image():
    model = tiny_model()
    images = torch.randn(2, 3, 45, 61)
    with torch.inference_mode():
        whole = train.predict_logits(model, images)
        assert torch.equal(evaluate.predict_slide(model, images, crop_size=64)[0], whole)
        assert torch.equal(evaluate.predict(model, images, mode="slide", crop_size=61), whole)


def test_slide_window_averages_overlapping_windows():
    model = tiny_model()
    images = torch.randn(1, 3, 40, 72)
    with torch.inference_mode():
        [scores] = evaluate.predict_slide(model, images, crop_size=40)  # stride 27: windows at x = 0, 27, 32
        windows = {x: train.predict_logits(model, images[..., x:x + 40]) for x in (0, 27, 32)}
    assert scores.shape == (1, 3, 40, 72)
    torch.testing.assert_close(scores[..., 10], windows[0][..., 10])  # one window
    torch.testing.assert_close(scores[..., 30], (windows[0][..., 30] + windows[27][..., 3]) / 2)  # two windows
    expected = (windows[0][..., 35] + windows[27][..., 8] + windows[32][..., 3]) / 3  # three windows
    torch.testing.assert_close(scores[..., 35], expected)
    torch.testing.assert_close(scores[..., 70], windows[32][..., 38])


def window_by_window(model, images, crop_size, flip):
    """The slide protocol one window per model call, written out: the scores predict(mode="slide") returns for one
    scale (logits without flip, else the softmax averaged over the image and its mirror image)."""
    def slide(x):
        H, W = x.shape[-2:]
        h, w, stride = min(crop_size, H), min(crop_size, W), math.ceil(crop_size * 2 / 3)
        ys = sorted(set(list(range(0, H - h + 1, stride)) + [H - h]))
        xs = sorted(set(list(range(0, W - w + 1, stride)) + [W - w]))
        total, count = 0, torch.zeros(1, 1, H, W)
        for y in ys:
            for x0 in xs:
                total = total + F.pad(train.predict_logits(model, x[..., y:y + h, x0:x0 + w]),
                                      (x0, W - w - x0, y, H - h - y))  # the window's logits placed on the image
                count[..., y:y + h, x0:x0 + w] += 1
        return total / count, len(ys) * len(xs)

    logits, windows = slide(images)
    if not flip:
        return logits, windows
    mirrored, _ = slide(images.flip(-1))
    return (logits.softmax(1) + mirrored.flip(-1).softmax(1)) / 2, 2 * windows


@pytest.mark.parametrize("size", [(50, 70), (24, 70)], ids=["larger-both-ways", "smaller-in-height"])
@pytest.mark.parametrize("flip", [False, True], ids=["no-flip", "flip"])
def test_batched_slide_windows_equal_window_by_window(size, flip, monkeypatch):
    """predict(mode="slide") with batches of 1, 3 and 16 windows equals the windows predicted one by one (also for
    2 images at once), in fewer model calls: ceil(windows / batch) of them, and progress counts every window."""
    model = tiny_model()
    images = torch.randn(2, 3, *size)
    with torch.inference_mode():
        expected, windows = window_by_window(model, images[:1], 32, flip)
        expected_two = window_by_window(model, images, 32, flip)[0]
        calls, predict_logits = [], train.predict_logits
        monkeypatch.setattr(train, "predict_logits", lambda m, x: calls.append(len(x)) or predict_logits(m, x))
        for batch_size in (1, 3, 16):
            calls.clear()
            seen = []
            scores = evaluate.predict(model, images[:1], flip=flip, mode="slide", crop_size=32, batch_size=batch_size,
                                      progress=lambda done, total: seen.append((done, total)))
            torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
            assert len(calls) == math.ceil(windows / batch_size) and sum(calls) == windows
            assert max(calls) == min(batch_size, windows) and seen[-1] == (windows, windows) and len(seen) == len(calls)
        scores = evaluate.predict(model, images, flip=flip, mode="slide", crop_size=32, batch_size=4)
        torch.testing.assert_close(scores, expected_two, rtol=1e-5, atol=1e-5)
    assert windows == {(50, 70): 6, (24, 70): 3}[size] * (2 if flip else 1)


def test_multi_scale_flip_averages_probabilities():
    model = tiny_model()
    images = torch.randn(1, 3, 36, 44)
    with torch.inference_mode():
        scores = evaluate.predict(model, images, scales=[0.75, 1.0], flip=True)
        expected = 0
        for scale in (0.75, 1.0):
            x = F.interpolate(images, scale_factor=scale, mode="bilinear") if scale != 1 else images
            for flip in (False, True):
                logits = train.predict_logits(model, x.flip(-1) if flip else x)
                logits = F.interpolate(logits.flip(-1) if flip else logits, size=(36, 44), mode="bilinear")
                expected = expected + logits.softmax(1) / 4
    assert scores.shape == (1, 3, 36, 44)
    torch.testing.assert_close(scores.sum(1), torch.ones(1, 36, 44))
    torch.testing.assert_close(scores, expected)


def test_multi_scale_slide_counts_windows_over_scales():
    """--scales with --mode slide: progress counts the windows of every scale (and flip), as predicted."""
    model = tiny_model()
    seen = []
    with torch.inference_mode():
        evaluate.predict(model, torch.randn(1, 3, 40, 60), scales=[0.5, 1.0], flip=True, mode="slide", crop_size=32,
                         batch_size=5, progress=lambda done, total: seen.append((done, total)))
    # scale 0.5: 20 x 30, one window; scale 1.0: 40 x 60, 2 x 3 windows (stride 22: y = 0, 8; x = 0, 22, 28); each
    # with its mirrored copy, in batches of up to 5 windows of one scale
    assert seen == [(2, 14), (7, 14), (12, 14), (14, 14)]


def test_scale_below_one_pixel_is_clamped_to_one_pixel(voc_checkpoint, tmp_path, capsys):
    """A scale that shrinks a side below one pixel: predicted at one pixel (not a size-0 error), the scores averaged as
    for any scale; --scales below 0.1 are refused in one line before any work."""
    x = torch.randn(1, 3, 24, 16)
    assert evaluate.rescale(x, 0.01).shape == (1, 3, 1, 1) and evaluate.rescale(x, 0.05).shape == (1, 3, 1, 1)
    assert evaluate.rescale(torch.randn(1, 3, 300, 16), 0.01).shape == (1, 3, 3, 1)
    assert torch.equal(evaluate.rescale(x, 0.5), F.interpolate(x, scale_factor=0.5, mode="bilinear"))
    model = tiny_model()
    with torch.inference_mode():
        scores = evaluate.predict(model, x, scales=[0.01, 1.0])
        small = F.interpolate(x, size=(1, 1), mode="bilinear")
        expected = (F.interpolate(train.predict_logits(model, small), size=(24, 16), mode="bilinear").softmax(1) +
                    train.predict_logits(model, x).softmax(1)) / 2
    torch.testing.assert_close(scores, expected)

    random_png(tmp_path / "a.png", 40, 6)  # 6 px high: 0.1x would be 0 px
    evaluate.main([str(a) for a in ["--checkpoint", voc_checkpoint, "--image", tmp_path / "a.png", "--device", "cpu",
                                    "--scales", "0.1", "1", "--json", tmp_path / "r.json"]])
    assert json.loads((tmp_path / "r.json").read_text())["images"][0]["size"] == [40, 6]
    line = cli_error(capsys, ["--checkpoint", voc_checkpoint, "--image", tmp_path / "a.png", "--device", "cpu",
                              "--scales", "0.01", "--json", tmp_path / "r2.json"], main=evaluate.main)
    assert line == "error: argument --scales: expected a number >= 0.1 and <= 8, got '0.01' (see --help)"
    assert not (tmp_path / "r2.json").exists()


# -------------------------------------------------------------------------------------------- evaluate.py: the pictures

def panel_columns(picture, width, n):
    """The x ranges of the n panels (and of the captions under them) in a picture of panels `width` px wide."""
    assert picture.shape[1] == n * (width + 4) + 4
    return [slice(4 + i * (width + 4), 4 + i * (width + 4) + width) for i in range(n)]


def test_overlay_picture_has_captions(tmp_path):
    """image | ground truth | prediction, each captioned under its panel; the legend below the captions."""
    image = torch.randint(0, 256, (3, 32, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    target = torch.zeros(32, 48, dtype=torch.long)
    target[8:24, 8:24] = 1
    prediction = target.roll(4, dims=1)
    evaluate.save_overlay(image, prediction, tmp_path / "o.png", ["background", "aeroplane"], target)
    picture = np.array(Image.open(tmp_path / "o.png"))
    factor = evaluate.enlargement(32, 48)
    fH, fW = 32 * factor, 48 * factor
    columns = panel_columns(picture, fW, 3)
    panels = [image, evaluate.overlay(image, target), evaluate.overlay(image, prediction)]
    below = captions_height(fW, ["image", "ground truth", "prediction"])
    for panel, text, x in zip(panels, ["image", "ground truth", "prediction"], columns):
        enlarged = panel.permute(1, 2, 0).numpy().repeat(factor, 0).repeat(factor, 1)
        np.testing.assert_array_equal(picture[4:4 + fH, x], enlarged)
        words = evaluate.caption(text, fW).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(picture[4 + fH:4 + fH + len(words), x], words)
        assert (words < 100).all(-1).sum() > 50
    legend = evaluate.legend([1], ["background", "aeroplane"], picture.shape[1]).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(picture[4 + fH + below + 4:], legend)


def test_clusters_picture_has_captions_and_colour_bars(tmp_path, monkeypatch):
    """Under each panel its caption; under each attention panel a colour bar running from white to HEAT_ALPHA red
    along its length, labelled with the lowest and highest weight of the marked pixel's attention row, which is
    computed here by hand (softmax_j(q_i . k_j) over the clustering layer's similarities); the attention panel
    itself is that colour map over the image."""
    torch.manual_seed(0)
    model = ClusterDANet(num_classes=3, backbone="resnet18", num_clusters=16).eval()
    with torch.no_grad():
        model.position_branch.attention.query.weight.mul_(30)  # a peaked attention, not a uniform one
        model.position_branch.attention.key.weight.mul_(30)
    image = torch.randn(3, 24, 32)  # 3 x 4 cells of 8x8; enlarged 11x
    bars = []

    def recorded(low, high, width):
        bars.append((low, high))
        return colour_bar(low, high, width)

    colour_bar = evaluate.colour_bar
    monkeypatch.setattr(evaluate, "colour_bar", recorded)
    evaluate.save_clusters(model, image, tmp_path / "c.png")
    picture = np.array(Image.open(tmp_path / "c.png"))
    factor, (fH, fW) = 11, (24 * 11, 32 * 11)
    assert evaluate.enlargement(24, 32) == factor
    columns = panel_columns(picture, fW, 5)

    # the attention rows by hand, from the similarities the clustering layer gives
    captured = {}
    hook = model.position_branch.clustering.register_forward_hook(lambda m, i, o: captured.setdefault("s", o))
    with torch.no_grad():
        model(image[None])
    hook.remove()
    s, attention = captured["s"], model.position_branch.attention  # [1, 16, 3, 4]
    q = F.conv2d(s, attention.query.weight, attention.query.bias)[0].flatten(1)  # [d, 12]
    k = F.conv2d(s, attention.key.weight, attention.key.bias)[0].flatten(1)  # [d, 12]
    rows = torch.softmax(q.T @ k, dim=1)  # [12, 12]
    queries = [(0, 1), (1, 2), (2, 3)]  # (cell row, cell column): spread along the diagonal
    shown = evaluate.denormalise(image).float()  # [3, 24, 32]
    for index, ((qy, qx), (low, high)) in enumerate(zip(queries, bars), 2):
        row = rows[qy * 4 + qx]
        assert (low, high) == (pytest.approx(row.min().item(), rel=1e-4), pytest.approx(row.max().item(), rel=1e-4))
        assert high > 2 * low  # peaked: the bar's ends differ
        heat = F.interpolate(((row - row.min()) / (row.max() - row.min())).view(1, 1, 3, 4), size=(24, 32),
                             mode="bilinear", align_corners=False)[0, 0]  # [24, 32]
        alpha = 0.7 * heat
        expected = shown * (1 - alpha) + torch.tensor([255.0, 0, 0])[:, None, None] * alpha  # [3, 24, 32]
        panel = torch.from_numpy(picture[4:4 + fH:factor, columns[index]][:, ::factor]).permute(2, 0, 1).float()
        away = torch.ones(24, 32, dtype=torch.bool)
        away[max(0, qy * 8 - 1):qy * 8 + 10, max(0, qx * 8 - 1):qx * 8 + 10] = False  # not the yellow dot
        assert (panel - expected)[:, away].abs().max() <= 1  # uint8 rounding

    for index, text in enumerate(CLUSTERS_CAPTIONS):
        under = picture[4 + fH:, columns[index]]  # [below, fW, 3]
        words = evaluate.caption(text, fW).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(under[:len(words)], words)
        assert (words < 100).all(-1).sum() > 100  # the caption's text is there
        rest = under[len(words):]
        if index < 2:
            assert (rest == 255).all()  # no colour bar under the image and the centres
            continue
        bar = colour_bar(*bars[index - 2], fW).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(rest[:len(bar)], bar)
        line = rest[2 + evaluate.BAR_HEIGHT // 2, 4:fW - 4].astype(int)  # [fW - 8, 3], along the bar's middle
        t = np.linspace(0, 1, fW - 8)
        assert (line[:, 0] == 255).all() and (line[:, 1] == line[:, 2]).all()
        assert (np.diff(line[:, 1]) <= 0).all() and line[0, 1] == 255  # white to red, monotone
        assert np.abs(line[:, 1] - 255 * (1 - 0.7 * t)).max() <= 0.5 + 1e-3  # the attention's colour map over white
        assert (bar[evaluate.BAR_HEIGHT + 6:] < 100).all(-1)[:, :fW // 3].sum() > 20  # the low value's text
        assert (bar[evaluate.BAR_HEIGHT + 6:] < 100).all(-1)[:, -fW // 3:].sum() > 20  # the high value's text


def test_image_json_and_enlarged_pictures(voc_checkpoint, tmp_path, capsys):
    """--json with --image: each file's size, the shares of its predicted classes (those of its labels PNG), and its
    pictures. A 1x1 and a 64x64 image are drawn 256 px high: every pixel a 256x256 or 4x4 block."""
    tiny_pixels = random_png(tmp_path / "dot.png", 1, 1)
    shape_pixels = random_png(tmp_path / "shape.png", 64, 64, seed=1)
    argv = ["--checkpoint", voc_checkpoint, "--image", tmp_path / "dot.png", tmp_path / "shape.png", "--device", "cpu",
            "--save-dir", tmp_path / "out", "--json", tmp_path / "r.json", "--show-clusters"]
    evaluate.main([str(a) for a in argv])
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["mode"] == "whole" and summary["scales"] == [1.0] and summary["flip"] is False
    assert [entry["file"] for entry in summary["images"]] == [str(tmp_path / "dot.png"), str(tmp_path / "shape.png")]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clusters", "labels", "overlays"]
    for entry, name, (w, h) in zip(summary["images"], ["dot", "shape"], [(1, 1), (64, 64)]):
        assert entry["size"] == [w, h]
        assert entry["pictures"] == {folder: str(tmp_path / "out" / folder / f"{name}.png")
                                     for folder in ("labels", "overlays", "clusters")}
        with Image.open(entry["pictures"]["labels"]) as png:
            labels = np.array(png)
        counts = np.bincount(labels.ravel(), minlength=21)
        assert entry["classes"] == {train.VOC_CLASSES[c]: counts[c] / (w * h) for c in np.flatnonzero(counts)}
        assert sum(entry["classes"].values()) == pytest.approx(1.0)

    # image | prediction, each panel enlarged to 256 px: (4 + 256 + 4) x 2 + 4 wide, captions then a legend below
    for name, pixels, factor in (("dot", tiny_pixels, 256), ("shape", shape_pixels, 4)):
        with Image.open(tmp_path / "out" / "overlays" / f"{name}.png") as picture:
            overlay = np.array(picture)
        assert overlay.shape[1] == 2 * (256 + 4) + 4 and overlay.shape[0] >= 256 + 8 + 16 + 16
        np.testing.assert_array_equal(overlay[4:260, 4:260], pixels.repeat(factor, 0).repeat(factor, 1))
        top = 264 + captions_height(256, ["image", "prediction"])  # the legend's first row
        assert (overlay[top + 6:top + 6 + 20, 8 + 16 + 6:] < 100).all(-1).sum() > 30  # the legend's 16 px text
        with Image.open(tmp_path / "out" / "clusters" / f"{name}.png") as picture:
            # image | centres | three attention maps, captioned, the attention maps with their colour bars
            assert picture.size == (5 * (256 + 4) + 4, 256 + 8 + captions_height(256, CLUSTERS_CAPTIONS, (2, 3, 4)))
            np.testing.assert_array_equal(np.array(picture)[4:260, 4:260], pixels.repeat(factor, 0).repeat(factor, 1))
    assert [evaluate.enlargement(h, w) for h, w in ((1, 1), (64, 64), (41, 23), (375, 500), (1, 2000), (300, 1))] == \
        [256, 4, 7, 1, 1, 1]


# ---------------------------------------------------------------------------------------- evaluate.py: the command line

@pytest.mark.parametrize("flags, message", [
    (["--scales", "1.0", "0"], "argument --scales: expected a number >= 0.1 and <= 8, got '0'"),
    (["--scales", "-0.5"], "argument --scales: expected a number >= 0.1 and <= 8, got '-0.5'"),
    (["--scales", "nan"], "argument --scales: expected a number >= 0.1 and <= 8, got 'nan'"),
    (["--scales", "inf"], "argument --scales: expected a number >= 0.1 and <= 8, got 'inf'"),
    (["--crop-size", "0"], "argument --crop-size: expected a whole number >= 1, got '0'"),
    (["--crop-size", "-3"], "argument --crop-size: expected a whole number >= 1, got '-3'"),
    (["--batch-size", "0"], "argument --batch-size: expected a whole number >= 1, got '0'"),
    (["--workers", "-1"], "argument --workers: expected a whole number >= 0, got '-1'"),
    (["--device", "gpu"], "--device gpu is not supported: use cuda, cuda:N or cpu"),
    (["--mode", "tiles"], "argument --mode: invalid choice: 'tiles'"),
])
def test_evaluate_bad_flags_exit_2_in_one_line(flags, message, voc_checkpoint, capsys):
    line = cli_error(capsys, ["--checkpoint", voc_checkpoint, "--image", "unused.png", *flags], main=evaluate.main)
    assert line.startswith(f"error: {message}"), line


def test_evaluate_attention_flag_sets_the_path(voc_checkpoint, capsys):
    """evaluate.py --attention chooses the path whatever the checkpoint trained with; a wrong one is one line."""
    for attention in ("auto", "dense"):
        model, _, _ = evaluate.load_model(voc_checkpoint, torch.device("cpu"), attention)
        assert model.attention == attention
    line = cli_error(capsys, ["--checkpoint", voc_checkpoint, "--image", "unused.png", "--attention", "fast"],
                     main=evaluate.main)
    assert line.startswith("error: argument --attention: invalid choice: 'fast'"), line


def test_evaluate_bad_inputs(demo_run, voc_checkpoint, tmp_path, capsys):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((demo_run / "last.pt").read_bytes()[:5000])
    not_a_checkpoint = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, not_a_checkpoint)
    other_model = tmp_path / "other.pt"
    checkpoint = torch.load(voc_checkpoint, weights_only=True)
    checkpoint["args"]["num_clusters"] = 64  # the stored weights have 128 clusters
    torch.save(checkpoint, other_model)
    broken_image = tmp_path / "broken.jpg"
    broken_image.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    not_voc = tmp_path / "not_voc"
    not_voc.mkdir()

    # two as a user runs them (exit code, no traceback), the others in this process (faster)
    assert_script_error(run_evaluate("--checkpoint", tmp_path / "missing.pt"), "missing.pt", "not found")
    assert_script_error(run_evaluate("--checkpoint", voc_checkpoint, "--image", broken_image), "broken.jpg")

    def check(argv, *fragments):
        line = cli_error(capsys, argv, main=evaluate.main)
        assert all(f in line for f in fragments), line

    check(["--checkpoint", truncated], "truncated.pt", "cannot be read")
    check(["--checkpoint", not_a_checkpoint], "not a train.py checkpoint")
    check(["--checkpoint", other_model], "other.pt", "another model")
    check(["--checkpoint", voc_checkpoint], "--data-root")
    check(["--checkpoint", voc_checkpoint, "--data-root", tmp_path / "nowhere"], "nowhere", "does not exist")
    check(["--checkpoint", voc_checkpoint, "--data-root", not_voc], "not_voc")
    make_voc(tmp_path / "voc")
    check(["--checkpoint", voc_checkpoint, "--data-root", tmp_path / "voc", "--split", "train_aug"],
          "train_aug.txt not found")
    check(["--checkpoint", demo_run / "last.pt", "--data-root", tmp_path / "voc"],
          "predicts 4 classes, the dataset has 21")
    check(["--checkpoint", voc_checkpoint, "--show-clusters", "--image", broken_image], "--save-dir")


def test_evaluate_bad_dataset_inputs(cityscapes_run, folder_run, tmp_path, capsys):
    def check(argv, *fragments):
        line = cli_error(capsys, argv, main=evaluate.main)
        assert all(str(f) in line for f in fragments), line

    cityscapes_data, cityscapes_out, _ = cityscapes_run
    folder_data, folder_out, _ = folder_run
    check(["--checkpoint", cityscapes_out / "last.pt"], "on cityscapes needs --data-root")
    check(["--checkpoint", cityscapes_out / "last.pt", "--data-root", folder_data], "has no leftImg8bit/ folder")
    check(["--checkpoint", folder_out / "last.pt", "--dataset", "cityscapes", "--data-root", cityscapes_data],
          "predicts 3 classes, the dataset has 19")
    make_folder(tmp_path / "four", classes=["sky", "grass", "cow", "fence"])
    check(["--checkpoint", folder_out / "last.pt", "--data-root", tmp_path / "four"],
          "predicts 3 classes, the dataset has 4")
    flags, fragments = break_dataset("folder_mask_without_image", tmp_path / "broken")
    check(["--checkpoint", folder_out / "last.pt", "--data-root", tmp_path / "broken", "--split", "train"],
          *fragments)


def test_evaluate_refuses_a_dataset_with_other_class_names(demo_run, tmp_path, capsys):
    checkpoint = torch.load(demo_run / "last.pt", weights_only=True)
    checkpoint["class_names"] = ["background", "square", "disc", "triangle"]
    path = tmp_path / "swapped.pt"
    torch.save(checkpoint, path)
    line = cli_error(capsys, ["--checkpoint", path], main=evaluate.main)
    assert line == (f"error: checkpoint {path} was trained on other classes than the dataset's: class 1 is 'square' "
                    f"in the checkpoint, 'disc' in the dataset (and 1 more)")


def test_evaluate_images_with_one_stem_are_kept_apart(voc_checkpoint, tmp_path, capsys):
    """a/x.png, b/x.png, c/x_2.png: pictures x, x_2, x_2_2, each at its own image's size; every file is checked
    before the first is predicted."""
    sizes = {"a": (20, 12), "b": (17, 9), "c": (10, 14)}
    for folder, (w, h) in sizes.items():
        (tmp_path / folder).mkdir()
        name = "x_2.png" if folder == "c" else "x.png"
        Image.fromarray(np.random.randint(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / folder / name)
    images = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "c" / "x_2.png"]
    assert evaluate.picture_names(images) == ["x", "x_2", "x_2_2"]
    capsys.readouterr()
    evaluate.main([str(a) for a in ["--checkpoint", voc_checkpoint, "--image", *images, "--save-dir", tmp_path / "out",
                                    "--device", "cpu"]])
    lines = capsys.readouterr().out.splitlines()
    for i, (image, name, size) in enumerate(zip(images, ["x", "x_2", "x_2_2"], sizes.values())):
        assert lines[i].startswith(f"[{i + 1}/3] {image}: ")
        assert lines[i].endswith(f" -> {tmp_path / 'out' / 'labels' / name}.png")
        with Image.open(tmp_path / "out" / "labels" / f"{name}.png") as png:
            assert png.size == size
    assert len(list((tmp_path / "out" / "labels").glob("*.png"))) == 3

    line = cli_error(capsys, ["--checkpoint", voc_checkpoint, "--image", images[0], tmp_path / "missing.png",
                              images[1], "--save-dir", tmp_path / "out2", "--device", "cpu"], main=evaluate.main)
    assert line == f"error: --image file not found: {tmp_path / 'missing.png'}"
    assert not (tmp_path / "out2").exists()  # not even the first image was predicted


def test_evaluate_suggests_slide_for_large_images(voc_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "LARGE_IMAGE", 200)  # pixels; the real threshold is 2048 x 1024
    for name, (w, h) in (("small.png", (10, 20)), ("large.png", (20, 11))):
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / name)
    capsys.readouterr()
    argv = [str(a) for a in ("--checkpoint", voc_checkpoint, "--image", tmp_path / "small.png", tmp_path / "large.png",
                             "--device", "cpu")]
    evaluate.main(argv)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"[1/2] {tmp_path / 'small.png'}: ")  # 200 pixels: no hint
    assert lines[1] == (f"[2/2] {tmp_path / 'large.png'} is 20x11: predicting it whole can take minutes on a CPU and "
                        f"much memory; --mode slide --crop-size 512 is faster for large images")
    assert lines[2].startswith(f"[2/2] {tmp_path / 'large.png'}: ")
    evaluate.main(argv + ["--mode", "slide", "--crop-size", "16"])
    assert "--mode slide" not in capsys.readouterr().out


def test_image_in_slide_mode_prints_progress(voc_checkpoint, tmp_path, capsys, monkeypatch):
    """A long --image prediction prints the windows done every PROGRESS_SECONDS (here: after every batch but the
    last); its result is that of one window per call."""
    random_png(tmp_path / "a.png", 70, 50)
    monkeypatch.setattr(evaluate, "PROGRESS_SECONDS", 0)
    capsys.readouterr()
    argv = ["--checkpoint", voc_checkpoint, "--image", tmp_path / "a.png", "--device", "cpu", "--mode", "slide",
            "--crop-size", "32", "--flip", "--json", tmp_path / "r.json"]
    evaluate.main([str(a) for a in argv + ["--batch-size", "5"]])
    lines = capsys.readouterr().out.splitlines()
    assert [re.sub(r", \d+ s$", "", line) for line in lines[:2]] == [
        f"[1/1] {tmp_path / 'a.png'}: 5/12 windows", f"[1/1] {tmp_path / 'a.png'}: 10/12 windows"]
    assert lines[2].startswith(f"[1/1] {tmp_path / 'a.png'}: ") and "windows" not in lines[2]
    batched = json.loads((tmp_path / "r.json").read_text())["images"][0]["classes"]
    evaluate.main([str(a) for a in argv + ["--batch-size", "1"]])
    assert json.loads((tmp_path / "r.json").read_text())["images"][0]["classes"] == pytest.approx(batched, abs=1e-3)


def test_evaluate_slide_batches_count_windows(voc_checkpoint, tmp_path):
    """On a dataset in slide mode --batch-size counts windows (each image on its own): the same mIoU as with
    --batch-size 1, and the protocol line says so."""
    make_voc(tmp_path / "data", n_train=1, n_val=2)
    results = []
    for batch_size in ("1", "6"):
        result = run_evaluate("--checkpoint", voc_checkpoint, "--data-root", tmp_path / "data", "--workers", "0",
                              "--mode", "slide", "--crop-size", "48", "--flip", "--batch-size", batch_size,
                              "--json", tmp_path / f"r{batch_size}.json")
        assert result.returncode == 0, result.stderr
        results.append(json.loads((tmp_path / f"r{batch_size}.json").read_text()))
    assert "slide, scales 1.0, flip, 6 windows per batch" in result.stdout
    assert results[1]["miou"] == pytest.approx(results[0]["miou"], abs=1e-4)
    assert results[1]["pixel_accuracy"] == pytest.approx(results[0]["pixel_accuracy"], abs=1e-4)


def test_evaluate_original_checkpoint_on_an_image(original_checkpoint, tmp_path, capsys):
    path, original = original_checkpoint
    pixels = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "street.png")
    evaluate.main(["--checkpoint", str(path), "--image", str(tmp_path / "street.png"), "--device", "cpu",
                   "--save-dir", str(tmp_path / "out")])
    image = (torch.from_numpy(pixels).permute(2, 0, 1) / 255 - MEAN[:, None, None]) / STD[:, None, None]
    with torch.no_grad():
        labels = original(image[None].float())[0][0].argmax(0)  # [40, 56]
    counts = labels.flatten().bincount(minlength=19)
    expected = ", ".join(f"{CITYSCAPES_NAMES[c]} {counts[c] / labels.numel():.0%}" for c in counts.nonzero()[:, 0])
    assert f"street.png: {expected}" in capsys.readouterr().out
    to_label_id = {train_id: label_id for label_id, train_id in CITYSCAPES_TRAIN_IDS.items()}
    with Image.open(tmp_path / "out" / "labels" / "street.png") as png:  # Cityscapes' format: label ids
        assert (np.array(png) == np.vectorize(to_label_id.get)(labels.numpy())).mean() > 0.999


def test_cityscapes_labels_folder_is_what_the_official_script_finds(cityscapes_run, tmp_path, capsys):
    """cityscapesScripts' evalPixelLevelSemanticLabeling.getPrediction, written out again: for each ground truth
    gtFine/val/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png it walks CITYSCAPES_RESULTS recursively, wants
    exactly one <city>_<seq>_<frame>*.png, and reads it as one channel of label ids the ground truth's size."""
    data, out, _ = cityscapes_run
    evaluate.main([str(a) for a in ["--checkpoint", out / "last.pt", "--data-root", data, "--save-dir",
                                    tmp_path / "pred", "--show-clusters", "--workers", "0", "--device", "cpu"]])

    def get_prediction(results, ground_truth):
        city, sequence, frame = Path(ground_truth).name.split("_")[:3]
        pattern = f"{city}_{sequence}_{frame}*.png"
        return [os.path.join(root, name) for root, _, names in os.walk(results)
                for name in fnmatch.filter(names, pattern)]

    ground_truths = sorted((data / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    assert len(ground_truths) == 2
    label_ids = set(CITYSCAPES_TRAIN_IDS)
    for ground_truth in ground_truths:
        found = get_prediction(tmp_path / "pred" / "labels", ground_truth)
        assert found == [str(tmp_path / "pred" / "labels" / ground_truth.name.replace("_gtFine_labelIds", ""))]
        with Image.open(found[0]) as prediction, Image.open(ground_truth) as truth:
            values = np.array(prediction)
            assert values.ndim == 2 and prediction.size == truth.size
        assert set(np.unique(values)) <= label_ids
        assert len(get_prediction(tmp_path / "pred", ground_truth)) == 3  # the whole DIR: labels, overlays, clusters
    assert len(list((tmp_path / "pred" / "labels").rglob("*"))) == 2  # nothing else in there


def test_undecodable_image_after_a_good_one_writes_nothing(voc_checkpoint, tmp_path, capsys):
    """A PNG cut in half opens (its header is whole) but cannot be decoded: found before the first prediction."""
    random_png(tmp_path / "good.png", 20, 14)
    random_png(tmp_path / "whole.png", 40, 30, seed=1)
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    with Image.open(tmp_path / "cut.png") as cut:
        assert cut.size == (40, 30)  # it opens
    argv = ["--checkpoint", voc_checkpoint, "--image", tmp_path / "good.png", tmp_path / "cut.png", "--device", "cpu",
            "--save-dir", tmp_path / "out", "--json", tmp_path / "r.json"]
    line = cli_error(capsys, argv, main=evaluate.main)
    assert line.startswith(f"error: cannot read image {tmp_path / 'cut.png'}: "), line
    assert capsys.readouterr().out == ""  # no progress line: nothing was predicted
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.json").exists()


def test_out_of_memory_exits_4_naming_the_flags(voc_checkpoint, tmp_path, capsys, monkeypatch):
    """A GPU's OutOfMemoryError on the second --image file, and a real failed CPU allocation during a dataset
    evaluation: one line, exit 4, the flags that lower the memory; the pictures done before are kept."""
    assert train.is_out_of_memory(MemoryError()) and not train.is_out_of_memory(RuntimeError("shape mismatch"))
    random_png(tmp_path / "a.png", 16, 12)
    random_png(tmp_path / "b.png", 24, 20)
    predict_logits = train.predict_logits

    def fails_on_b(model, images):
        if images.shape[-1] == 24:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return predict_logits(model, images)

    monkeypatch.setattr(train, "predict_logits", fails_on_b)
    line = cli_error(capsys, ["--checkpoint", voc_checkpoint, "--image", tmp_path / "a.png", tmp_path / "b.png",
                              "--device", "cpu", "--save-dir", tmp_path / "out"], main=evaluate.main,
                     code=train.EXIT_OUT_OF_MEMORY)
    assert train.EXIT_OUT_OF_MEMORY == 4
    assert line == (f"error: out of memory on cpu while predicting {tmp_path / 'b.png'} (24x20): lower the memory with "
                    f"--mode slide --crop-size 512; the pictures of the 1 image before it are in {tmp_path / 'out'}")
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.png")) == ["a.png", "a.png"]  # labels, overlays

    def allocates_too_much(model, images):
        torch.empty(2 ** 62, dtype=torch.uint8)  # the CPU allocator's RuntimeError, for real

    monkeypatch.setattr(train, "predict_logits", allocates_too_much)
    make_voc(tmp_path / "data", n_train=1, n_val=2)
    line = cli_error(capsys, ["--checkpoint", voc_checkpoint, "--data-root", tmp_path / "data", "--device", "cpu",
                              "--workers", "0", "--batch-size", "2", "--mode", "slide", "--crop-size", "300",
                              "--scales", "1.0", "1.5"], main=evaluate.main, code=4)
    val = tmp_path / "data" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
    first = val.read_text().split()[0]
    assert line == (f"error: out of memory on cpu while predicting image 1 of 2 ({first}): lower the memory with "
                    f"--crop-size 150, --batch-size 1, no --scales above 1")


def test_full_disk_while_writing_a_picture_exits_3(voc_checkpoint, tmp_path, capsys, monkeypatch):
    """The disk fills while the overlay is written: one line, exit 3, the label PNG written before it kept, no
    temporary file left behind."""
    random_png(tmp_path / "a.png", 16, 12)
    save = Image.Image.save

    def disk_fills_in_overlays(self, fp, *args, **kwargs):
        if "overlays" in str(fp):
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", disk_fills_in_overlays)
    line = cli_error(capsys, ["--checkpoint", voc_checkpoint, "--image", tmp_path / "a.png", "--device", "cpu",
                              "--save-dir", tmp_path / "out", "--json", tmp_path / "r.json"], main=evaluate.main,
                     code=train.EXIT_DISK_FULL)
    assert train.EXIT_DISK_FULL == 3
    assert line == (f"error: no space left on the device while writing {tmp_path / 'out' / 'overlays' / 'a.png'}: "
                    f"no a.png was written; free some space")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == \
        ["a.png", os.path.join("out", "labels", "a.png")]


def test_evaluate_never_writes_over_what_it_reads(voc_checkpoint, tmp_path, capsys):
    """--json naming the checkpoint (itself, through `..`, through a link), a picture that would land on an --image
    file, --json in a picture folder: one line, exit 2 (also from a real process), every file as it was."""
    run = tmp_path / "run"
    run.mkdir()
    best = run / "best.pt"
    best.write_bytes(voc_checkpoint.read_bytes())
    (tmp_path / "link.json").symlink_to(best)
    pictures = tmp_path / "pictures"
    (pictures / "labels").mkdir(parents=True)
    random_png(pictures / "labels" / "a.png", 20, 14)
    before = tree_bytes(tmp_path)
    result = run_evaluate("--checkpoint", best, "--json", best, "--device", "cpu")
    assert_script_error(result, f"error: --json {best} would overwrite the --checkpoint file {best}: nothing was "
                                f"written; choose another --json")
    for json_path in (run / ".." / "run" / "best.pt", tmp_path / "link.json"):
        line = cli_error(capsys, ["--checkpoint", best, "--json", json_path, "--device", "cpu"], main=evaluate.main)
        assert line == (f"error: --json {json_path} would overwrite the --checkpoint file {best}: "
                      f"nothing was written; choose another --json")
    line = cli_error(capsys, ["--checkpoint", best, "--image", pictures / "labels" / "a.png", "--save-dir",
                              pictures, "--device", "cpu"], main=evaluate.main)
    assert line == (f"error: --save-dir {pictures}: its picture {pictures / 'labels' / 'a.png'} would "
                  f"overwrite the --image file {pictures / 'labels' / 'a.png'}: nothing was written; "
                  f"choose another --save-dir")
    random_png(tmp_path / "b.png", 20, 14)
    line = cli_error(capsys, ["--checkpoint", best, "--image", tmp_path / "b.png", "--save-dir", pictures,
                              "--json", pictures / "overlays" / "b.png", "--device", "cpu"], main=evaluate.main)
    assert line == (f"error: --json {pictures / 'overlays' / 'b.png'}: its folder is the picture folder "
                  f"of --save-dir {pictures / 'overlays'}: nothing was written; choose another --json")
    assert {k: v for k, v in tree_bytes(tmp_path).items() if k != "b.png"} == before
    code, _, err = run_cli(capsys, ["--checkpoint", best, "--image", tmp_path / "b.png", "--save-dir", run,
                                    "--device", "cpu"], main=evaluate.main)  # pictures in the run's folder: fine, its
    # checkpoint stays
    assert code == 0, err
    assert best.read_bytes() == before["run/best.pt"] and (run / "labels" / "b.png").is_file()


def test_save_dir_in_a_dataset_is_refused_and_its_masks_stay(tmp_path, capsys):
    """A folder dataset whose masks live in DATA/labels (masks/val is a link to it) and --save-dir DATA: the labels
    pictures would be its masks; --save-dir inside the mask folder; train.py's --out-dir there; a labels/ folder of
    the user's own beside the dataset: each one line, exit 2, the dataset byte for byte as it was. A --save-dir inside
    the data root but in none of its folders is fine, and so is writing it again (the pictures are evaluate.py's)."""
    root = tmp_path / "data"
    make_folder(root)
    (root / "masks" / "val").rename(root / "labels")
    (root / "masks" / "val").symlink_to(Path("..") / "labels")
    checkpoint = untrained_checkpoint(tmp_path / "run" / "best.pt", FOLDER_CLASSES, "--dataset", "folder",
                                      "--data-root", "unused")
    before = tree_bytes(root)
    argv = ["--checkpoint", checkpoint, "--data-root", root, "--device", "cpu", "--workers", "0"]
    line = cli_error(capsys, argv + ["--save-dir", root], main=evaluate.main)
    assert line == (f"error: --save-dir {root}: its picture {root / 'labels' / 'val_0.png'} would "
                  f"overwrite a mask of the dataset {root / 'masks' / 'val' / 'val_0.png'}: nothing "
                  f"was written; choose another --save-dir")
    inside = root / "masks" / "val" / "pictures"
    line = cli_error(capsys, argv + ["--save-dir", inside], main=evaluate.main)
    assert line == (f"error: --save-dir {inside}: its picture folder {inside / 'labels'} is inside the "
                  f"dataset's mask folder {root / 'masks' / 'val'}: nothing was written; choose "
                  f"another --save-dir")
    out = root / "masks" / "train"
    line = cli_error(capsys, tiny(out, "--dataset", "folder", "--data-root", root, "--iters", "1"))
    assert line == (f"error: --out-dir {out} is the dataset's mask folder {out}: nothing was written; choose another "
                    f"--out-dir")
    assert tree_bytes(root) == before

    plain = tmp_path / "plain"
    make_folder(plain)
    (plain / "labels").mkdir()  # the user's own label pictures, named as the val images
    for name in ("val_0", "val_1"):
        (plain / "labels" / f"{name}.png").write_bytes((plain / "masks" / "val" / f"{name}.png").read_bytes())
    before = tree_bytes(plain)
    argv = ["--checkpoint", checkpoint, "--data-root", plain, "--device", "cpu", "--workers", "0"]
    line = cli_error(capsys, argv + ["--save-dir", plain], main=evaluate.main)
    assert line == (f"error: --save-dir {plain} holds {plain / 'labels' / 'val_0.png'} (and 1 more), "
                  f"which is not a picture of evaluate.py: it is not replaced; choose another "
                  f"--save-dir, or move the file away")
    assert tree_bytes(plain) == before
    for _ in range(2):  # the second run replaces the first one's pictures
        code, _, err = run_cli(capsys, argv + ["--save-dir", plain / "predictions"], main=evaluate.main)
        assert code == 0, err
    assert sorted(p.name for p in (plain / "predictions" / "labels").iterdir()) == ["val_0.png", "val_1.png"]
    assert {k: v for k, v in tree_bytes(plain).items() if not k.startswith("predictions/")} == before


def test_existing_files_that_evaluate_did_not_write_are_kept(voc_checkpoint, tmp_path, capsys):
    """--json replaces only a results file of evaluate.py, --save-dir only its pictures (a PNG text chunk says so):
    anything else, or a file where a picture folder goes, is one line, exit 2, and stays as it was."""
    random_png(tmp_path / "a.png", 20, 14)
    out, results = tmp_path / "out", tmp_path / "r.json"
    argv = ["--checkpoint", voc_checkpoint, "--image", tmp_path / "a.png", "--device", "cpu", "--save-dir", out,
            "--json", results]
    assert run_cli(capsys, argv, main=evaluate.main)[0] == 0
    written = tree_bytes(tmp_path)
    with Image.open(out / "labels" / "a.png") as picture:
        assert picture.info["Software"] == "ClusterDANet evaluate.py" and evaluate.is_picture(out / "labels" / "a.png")
    assert run_cli(capsys, argv, main=evaluate.main)[0] == 0  # its own files: replaced, the same again
    assert tree_bytes(tmp_path) == written

    notes = tmp_path / "notes.json"
    notes.write_text('{"todo": "evaluate the model"}\n')
    line = cli_error(capsys, argv[:-1] + [notes], main=evaluate.main)
    assert line == (f"error: --json {notes} exists and is not a results file of evaluate.py: it is not "
                  f"replaced; remove it or choose another --json")
    random_png(out / "overlays" / "a.png", 20, 14)  # a PNG evaluate.py did not write
    foreign = (out / "overlays" / "a.png").read_bytes()
    line = cli_error(capsys, argv, main=evaluate.main)
    assert line == (f"error: --save-dir {out} holds {out / 'overlays' / 'a.png'}, which is not a picture "
                  f"of evaluate.py: it is not replaced; choose another --save-dir, or move the file "
                  f"away")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "labels").write_text("")
    line = cli_error(capsys, argv[:-4] + ["--save-dir", tmp_path / "other"], main=evaluate.main)
    assert line == (f"error: --save-dir {tmp_path / 'other'}: {tmp_path / 'other' / 'labels'} is a "
                  f"file, and pictures go into a folder there: move it away or choose another "
                  f"--save-dir")
    assert notes.read_text() == '{"todo": "evaluate the model"}\n' and (tmp_path / "other" / "labels").read_text() == ""
    assert (out / "overlays" / "a.png").read_bytes() == foreign and results.read_bytes() == written["r.json"]


# ------------------------------------------------------------ the whole program: train then evaluate, scripts, torchrun

def test_evaluate_demo_checkpoint_end_to_end(demo_run, tmp_path):
    """The demo checkpoint on its synthetic val set: --json, palette PNGs, overlays, clusters; ms + flip."""
    out = tmp_path / "pictures"
    result = run_evaluate("--checkpoint", demo_run / "last.pt", "--save-dir", out, "--json", tmp_path / "r.json",
                          "--show-clusters", "--workers", "0", "--batch-size", "3", "--scales", "0.75", "1.0", "--flip")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "r.json").read_text())
    assert set(summary["per_class_iou"]) == set(train.SHAPE_CLASSES)
    ious = [v for v in summary["per_class_iou"].values() if v is not None]
    assert summary["miou"] == pytest.approx(sum(ious) / len(ious)) and 0 <= summary["pixel_accuracy"] <= 1
    assert f"mIoU {summary['miou']:.4f}" in result.stdout
    assert "batch size 3 (images padded to one size)" in result.stdout and summary["batch_size"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["clusters", "labels", "overlays"]
    masks = sorted((out / "labels").glob("*.png"))
    assert len(masks) == 64 and len(list((out / "overlays").glob("*.png"))) == 64
    assert len(list((out / "clusters").glob("*.png"))) == 64
    with Image.open(masks[0]) as png:
        assert png.mode == "P" and png.size == (32, 32)  # the demo run's val images
        assert set(np.unique(np.array(png))) <= {0, 1, 2, 3}
        assert png.getpalette()[:6] == [0, 0, 0, 128, 0, 0]  # VOC colours: background black, class 1 dark red


def test_evaluate_images_end_to_end(voc_checkpoint, tmp_path):
    """Pictures at each image's size as shown: b.png is stored 41 x 23 with EXIF orientation 8 (turn 90 degrees
    counter-clockwise), so it is shown, and predicted, 23 wide and 41 high."""
    exif = Image.Exif()
    exif[0x0112] = 8
    for name, size, extra in (("a.jpg", (50, 34), {}), ("b.png", (41, 23), {"exif": exif})):
        Image.fromarray(np.random.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / name, **extra)
    result = run_evaluate("--checkpoint", voc_checkpoint, "--image", tmp_path / "a.jpg", tmp_path / "b.png",
                          "--save-dir", tmp_path / "out", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(rf"\[1/2\] {re.escape(str(tmp_path / 'a.jpg'))}: .+ \([\d.]+ s\) -> "
                        rf"{re.escape(str(tmp_path / 'out' / 'labels' / 'a.png'))}", lines[0])
    assert lines[1].startswith(f"[2/2] {tmp_path / 'b.png'}: ")
    for name, size in (("a", (50, 34)), ("b", (23, 41))):
        with Image.open(tmp_path / "out" / "labels" / f"{name}.png") as png:
            assert png.mode == "P" and png.size == size and np.array(png).max() <= 20
        with Image.open(tmp_path / "out" / "overlays" / f"{name}.png") as picture:
            assert picture.mode == "RGB" and picture.width > 2 * size[0]  # image | prediction (+ legend below)
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_evaluate_voc_end_to_end(voc_checkpoint, tmp_path):
    """A VOC tree: per-image palette PNGs named by id at each image's size, equal to an independent prediction."""
    voc = make_voc(tmp_path / "data", n_train=1, n_val=3)
    result = run_evaluate("--checkpoint", voc_checkpoint, "--data-root", tmp_path / "data", "--save-dir",
                          tmp_path / "out", "--json", tmp_path / "r.json", "--workers", "0")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "r.json").read_text())
    assert list(summary["per_class_iou"]) == list(train.VOC_CLASSES) and summary["images"] == 3
    checkpoint = torch.load(voc_checkpoint, weights_only=True)
    model = train.build_model(checkpoint["args"])
    model.load_state_dict(checkpoint["model"])
    model.eval()
    matrix = np.zeros((21, 21), np.int64)
    for name in (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split():
        with Image.open(voc / "JPEGImages" / f"{name}.jpg") as jpeg:
            image = torch.from_numpy(np.array(jpeg.convert("RGB"))).permute(2, 0, 1) / 255
        image = (image - MEAN[:, None, None]) / STD[:, None, None]
        h, w = image.shape[1:]
        with torch.no_grad():  # pad to a multiple of 8 at the bottom and right, crop back
            expected = model(F.pad(image[None], (0, -w % 8, 0, -h % 8)))["out"][0, :, :h, :w].argmax(0).numpy()
        with Image.open(tmp_path / "out" / "labels" / f"{name}.png") as png:
            assert png.mode == "P" and png.size == (w, h)
            assert (np.array(png) == expected).mean() > 0.999  # argmax ties may differ by a pixel
        with Image.open(voc / "SegmentationClass" / f"{name}.png") as truth:
            truth = np.array(truth)
        keep = truth != 255
        np.add.at(matrix, (truth[keep], expected[keep]), 1)
        assert (tmp_path / "out" / "overlays" / f"{name}.png").is_file()
    assert summary["pixel_accuracy"] == pytest.approx(np.diag(matrix).sum() / matrix.sum(), abs=1e-3)


def evaluate_trained_run(out, name, data, class_names, dataset, tmp_path):
    """A run's checkpoint `name` and log name its dataset and classes; evaluate.py on it with --save-dir and --json
    exits 0 and its summary names them too. Returns (checkpoint, last validation record, result, summary)."""
    checkpoint = torch.load(out / name, map_location="cpu", weights_only=True)
    assert checkpoint["class_names"] == class_names and checkpoint["args"]["dataset"] == dataset
    assert checkpoint["args"]["num_classes"] == len(class_names)
    validation = [r for r in read_log(out) if "val_miou" in r][-1]
    assert list(validation["val_iou"]) == class_names
    result = run_evaluate("--checkpoint", out / name, "--data-root", data, "--save-dir", tmp_path / "out",
                          "--json", tmp_path / "r.json", "--workers", "0")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "r.json").read_text())
    assert list(summary["per_class_iou"]) == class_names and summary["dataset"] == dataset
    return checkpoint, validation, result, summary


def test_cityscapes_trains_and_evaluates_with_label_id_pngs(cityscapes_run, tmp_path):
    """Training stores the dataset and its class names; evaluate.py defaults to that dataset and writes the
    predictions as label-id PNGs (the benchmark's format), named by image, in the official colours."""
    data, out, samples = cityscapes_run
    assert len(CITYSCAPES_NAMES) == 19
    checkpoint, _, result, summary = evaluate_trained_run(out, "last.pt", data, CITYSCAPES_NAMES, "cityscapes",
                                                          tmp_path)
    assert summary["images"] == 2
    assert [line.split("  ")[0] for line in result.stdout.splitlines()[-21:-1]] == ["class", *CITYSCAPES_NAMES]
    model = train.build_model(checkpoint["args"])
    model.load_state_dict(checkpoint["model"])
    model.eval()
    to_label_id = {train_id: label_id for label_id, train_id in CITYSCAPES_TRAIN_IDS.items()}
    H, W = CITYSCAPES_SIZE
    for name in ("lindau_000000_000019", "lindau_000001_000019"):
        image = (torch.from_numpy(samples[name][0]).permute(2, 0, 1) / 255 - MEAN[:, None, None]) / STD[:, None, None]
        with torch.no_grad():
            train_ids = model(F.pad(image[None], (0, -W % 8, 0, -H % 8)))["out"][0, :, :H, :W].argmax(0).numpy()
        with Image.open(tmp_path / "out" / "labels" / f"{name}.png") as png:
            assert png.size == (W, H)
            assert (np.array(png) == np.vectorize(to_label_id.get)(train_ids)).mean() > 0.999  # argmax ties
            palette = png.getpalette()
        assert palette[7 * 3:8 * 3] == [128, 64, 128] and palette[26 * 3:27 * 3] == [0, 0, 142]  # road, car
        assert (tmp_path / "out" / "overlays" / f"{name}.png").is_file()

    # overlays: each class in its official colour, road (train id 0) included, void (255) left as it is
    labels = torch.tensor([[0, 10, 13, 255]])
    picture = evaluate.overlay(torch.zeros(3, 1, 4, dtype=torch.uint8), labels, evaluate.STYLES["cityscapes"], 1.0)
    assert picture[:, 0].T.tolist() == [[128, 64, 128], [70, 130, 180], [0, 0, 142], [0, 0, 0]]


def test_folder_dataset_trains_and_evaluates_with_its_class_names(folder_run, tmp_path):
    data, out, samples = folder_run
    assert len(FOLDER_CLASSES) == 3
    _, validation, result, summary = evaluate_trained_run(out, "best.pt", data, FOLDER_CLASSES, "folder", tmp_path)
    assert summary["images"] == 2 and summary["miou"] == pytest.approx(validation["val_miou"], abs=1e-6)
    assert [line.split()[0] for line in result.stdout.splitlines()[-5:-1]] == ["class", *FOLDER_CLASSES]
    for name in ("val_0", "val_1"):
        with Image.open(tmp_path / "out" / "labels" / f"{name}.png") as png:
            assert png.size == samples[name][1].shape[::-1] and np.array(png).max() <= 2
        assert (tmp_path / "out" / "overlays" / f"{name}.png").is_file()


def make_strips(root):
    """A folder dataset of extreme shapes (W x H): training images 4000x40 and 2x600, validation images 4000x3 and
    1x300; the first half of each mask along its longer side is class 0, the rest class 1, a void pixel at the start.
    Returns {relative image path: (W, H)}."""
    sizes = {"train/wide": (4000, 40), "train/tall": (2, 600), "val/wide": (4000, 3), "val/tall": (1, 300)}
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("left\nright\n")
    rng = np.random.RandomState(0)
    for name, (W, H) in sizes.items():
        for folder in ("images", "masks"):
            (root / folder / name).parent.mkdir(parents=True, exist_ok=True)
        mask = np.zeros((H, W), np.uint8)
        if W >= H:
            mask[:, W // 2:] = 1
        else:
            mask[H // 2:] = 1
        mask[0, 0] = 255
        Image.fromarray(rng.randint(0, 256, (H, W, 3), dtype=np.uint8)).save(root / "images" / f"{name}.png")
        save_mask(mask, root / "masks" / f"{name}.png", mode="L")
    return sizes


def test_images_of_any_shape_train_and_evaluate(tmp_path):
    """Real processes: training on 4000x40 and 2x600 images at --base-size 64 (the short side would scale to 0
    pixels), validating and evaluating 4000x3 and 1x300 images whole, at several scales with flips: exit 0, no
    traceback, checkpoints, and one prediction per pixel of every image."""
    sizes = make_strips(tmp_path / "data")
    out = tmp_path / "out"
    args = tiny(out, "--dataset", "folder", "--data-root", str(tmp_path / "data"), "--base-size", "64",
                "--batch-size", "1", "--iters", "2", "--val-every", "2", "--log-every", "1")
    result = run_script(args, cwd=tmp_path, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    records = read_log(out)
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert 0 <= [r for r in records if "val_miou" in r][0]["val_miou"] <= 1
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "log.jsonl"]
    result = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(out / "last.pt"),
                             "--data-root", str(tmp_path / "data"), "--device", "cpu", "--workers", "0", "--scales",
                             "0.1", "1.0", "--flip", "--save-dir", str(tmp_path / "pictures")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert re.search(r"on folder val \(2 images, whole, scales 0.1 1.0, flip\): mIoU [\d.]+", result.stdout)
    for name in ("wide", "tall"):
        with Image.open(tmp_path / "pictures" / "labels" / f"{name}.png") as labels:
            assert labels.size == sizes[f"val/{name}"]


def test_dranet_trains_resumes_and_draws_its_clusters(tmp_path, capsys):
    """train.py --model dranet: the loss is out + 0.2 aux (DRANet's default), the checkpoint stores model and
    deep_stem, --resume continues it, evaluate.py rebuilds it and --show-clusters draws ClusterDRANet."""
    out = tmp_path / "run"
    train.main(tiny(out, "--model", "dranet", "--iters", "2", "--demo-images", "4", "--log-every", "1"))
    steps = [r for r in read_log(out) if "loss" in r]
    assert len(steps) == 2 and set(steps[0]) >= {"out", "aux"} and "position" not in steps[0]
    for r in steps:
        assert r["loss"] == pytest.approx(r["out"] + 0.2 * r["aux"], rel=1e-5)
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["args"]["model"] == "dranet" and checkpoint["args"]["deep_stem"] is False
    assert checkpoint["args"]["aux_weight"] == 0.2
    capsys.readouterr()
    train.main(tiny(out, "--model", "dranet", "--iters", "2", "--demo-images", "4", "--resume", str(out / "last.pt")))
    assert "2 iterations from 2" in capsys.readouterr().out  # rebuilt as DRANet, its weights and optimizer loaded
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    evaluate.main(["--checkpoint", str(out / "last.pt"), "--device", "cpu", "--save-dir", str(tmp_path / "pictures"),
                   "--show-clusters", "--image", str(tmp_path / "a.png")])
    with Image.open(tmp_path / "pictures" / "clusters" / "a.png") as picture:  # image, nearest centre, 3 query maps
        f = evaluate.enlargement(40, 56)  # small pictures are enlarged (nearest) to panels at least 256 px high
        assert f == 7 and picture.size == (5 * (56 * f + 4) + 4,
                                           40 * f + 8 + captions_height(56 * f, CLUSTERS_CAPTIONS, (2, 3, 4)))


def test_original_checkpoint_on_cityscapes_end_to_end(original_checkpoint, tmp_path, monkeypatch, capsys):
    """The README's command for the published checkpoint, on a tiny Cityscapes tree: evaluate.py's mIoU is the mIoU
    of the stand-in's own predictions (whole images in one 768 window, flipped copies averaged). Cityscapes' 2048x1024
    images and 768 windows are multiples of 8, and so are the tree's images here."""
    path, original = original_checkpoint
    monkeypatch.setitem(globals(), "CITYSCAPES_SIZE", (24, 40))
    samples = make_cityscapes(tmp_path / "data")
    evaluate.main(["--checkpoint", str(path), "--dataset", "cityscapes", "--data-root", str(tmp_path / "data"),
                   "--mode", "slide", "--crop-size", "768", "--flip", "--json", str(tmp_path / "r.json"),
                   "--workers", "0", "--device", "cpu"])
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["images"] == 2 and list(summary["per_class_iou"]) == CITYSCAPES_NAMES
    matrix = np.zeros((19, 19), np.int64)
    for name in ("lindau_000000_000019", "lindau_000001_000019"):
        image, label_ids = samples[name]
        x = ((torch.from_numpy(image).permute(2, 0, 1) / 255 - MEAN[:, None, None]) / STD[:, None, None])[None]
        with torch.no_grad():
            scores = original(x)[0].softmax(1) + original(x.flip(-1))[0].flip(-1).softmax(1)  # [1, 19, 24, 40]
        prediction = scores[0].argmax(0).numpy()
        truth = np.vectorize(lambda i: CITYSCAPES_TRAIN_IDS.get(i, 255))(label_ids)
        keep = truth != 255
        np.add.at(matrix, (truth[keep], prediction[keep]), 1)
    tp, union = np.diag(matrix), matrix.sum(0) + matrix.sum(1) - np.diag(matrix)
    assert len(np.unique(prediction)) > 1  # the stand-in does not predict one class everywhere
    assert summary["miou"] == pytest.approx(np.mean(tp[union > 0] / union[union > 0]), abs=1e-9)
    assert summary["pixel_accuracy"] == pytest.approx(tp.sum() / matrix.sum(), abs=1e-9)


def test_original_dranet_on_cityscapes_and_an_image_end_to_end(original_dranet, tmp_path, monkeypatch, capsys):
    """The README's dran101 command on a tiny Cityscapes tree whose val labels are the stand-in's own predictions:
    evaluate.py's mIoU is that of the stand-in's flip-averaged predictions against them; then --image."""
    path, original = original_dranet
    monkeypatch.setitem(globals(), "CITYSCAPES_SIZE", (24, 40))
    samples = make_cityscapes(tmp_path / "data", cities=(("val", "lindau", 2),))
    to_label_id = {train_id: label_id for label_id, train_id in CITYSCAPES_TRAIN_IDS.items()}
    matrix = np.zeros((19, 19), np.int64)
    for name, (image, _) in samples.items():
        x = ((torch.from_numpy(image).permute(2, 0, 1) / 255 - MEAN[:, None, None]) / STD[:, None, None])[None]
        with torch.no_grad():
            truth = original(x)[0][0].argmax(0).numpy()  # [24, 40], the label of this tree
            scores = original(x)[0].softmax(1) + original(x.flip(-1))[0].flip(-1).softmax(1)
        label_ids = np.vectorize(to_label_id.get)(truth).astype(np.uint8)
        Image.fromarray(label_ids).save(tmp_path / "data" / "gtFine" / "val" / "lindau" / f"{name}_gtFine_labelIds.png")
        np.add.at(matrix, (truth.ravel(), scores[0].argmax(0).numpy().ravel()), 1)
    assert len(np.unique(truth)) > 1  # the stand-in does not predict one class everywhere
    evaluate.main(["--checkpoint", str(path), "--dataset", "cityscapes", "--data-root", str(tmp_path / "data"),
                   "--mode", "slide", "--crop-size", "768", "--flip", "--json", str(tmp_path / "r.json"),
                   "--workers", "0", "--device", "cpu"])
    summary = json.loads((tmp_path / "r.json").read_text())
    tp, union = np.diag(matrix), matrix.sum(0) + matrix.sum(1) - np.diag(matrix)
    assert summary["images"] == 2
    assert summary["miou"] == pytest.approx(np.mean(tp[union > 0] / union[union > 0]), abs=1e-9)
    assert summary["pixel_accuracy"] == pytest.approx(tp.sum() / matrix.sum(), abs=1e-9)

    pixels = samples["lindau_000000_000019"][0]
    Image.fromarray(pixels).save(tmp_path / "street.png")
    capsys.readouterr()
    evaluate.main(["--checkpoint", str(path), "--image", str(tmp_path / "street.png"), "--device", "cpu",
                   "--save-dir", str(tmp_path / "out")])
    with Image.open(tmp_path / "out" / "labels" / "street.png") as png:  # the stand-in's own prediction, label ids
        with Image.open(tmp_path / "data" / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png") \
                as label:
            assert (np.array(png) == np.array(label)).mean() > 0.999
    assert "street.png: " in capsys.readouterr().out


def test_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "out"
    args = tiny(out, "--iters", "4", "--demo-images", "8", "--log-every", "2", "--val-every", "4")
    result = run_script(args, cwd=tmp_path, timeout=180,
                        module=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert result.returncode == 0, "\n".join(line for line in result.stderr.splitlines() if "Error" in line)
    assert "2 process(es) on cpu" in result.stdout
    checkpoint = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["iteration"] == 4
    assert not any("SyncBatchNorm" in type(m).__name__ for m in train.build_model(checkpoint["args"]).modules())
    records = read_log(out)
    assert [r["iteration"] for r in records if "loss" in r] == [2, 4]
    for r in records:  # each rank has batch 2 of 32 x 32: the throughput counts both ranks
        if "loss" in r:
            assert r["images_per_s"] == pytest.approx(2 * 2 * 1000 / r["ms_per_iter"], rel=1e-6)
    validation = [r for r in records if "val_miou" in r]
    assert [r["iteration"] for r in validation] == [4] and 0 <= validation[0]["val_miou"] <= 1


def test_torchrun_dranet_batch_of_one_on_the_cpu_is_refused_before_any_work(tmp_path):
    """2 CPU processes with --batch-size 1: each one's BatchNorm sees 1 image, which DRANet's 1x1 pooled centre
    cannot normalise: one line (rank 0), exit 2 on every rank, before any work (no run folder)."""
    out = tmp_path / "out"
    result = run_script(tiny(out, "--model", "dranet", "--batch-size", "1", "--iters", "1", "--demo-images", "4"),
                        cwd=tmp_path, timeout=180, module=TORCHRUN)
    assert result.returncode == 1 and torchrun_exit_codes(result.stderr) == {0: 2, 1: 2}, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error: ")] == [
        "error: --model dranet needs a batch of 2 or more on each of the 2 processes (without SyncBatchNorm, on the "
        "CPU, each process normalises over its own --batch-size): CPAM's 1x1 pooled centre gives BatchNorm one value "
        "per channel"]
    assert "ValueError" not in result.stderr and result.stdout == "" and not out.exists()


def test_two_evaluate_processes_write_one_save_dir(voc_checkpoint, tmp_path):
    """Two evaluate.py into one --save-dir and one --json, meeting half-way through a write: the first is stopped
    (SIGSTOP) while its overlay is a temporary file, the second writes the same pictures meanwhile, then the first
    goes on. Both exit 0 without a traceback, every picture is whole and readable, no temporary file is left."""
    random_png(tmp_path / "a.png", 640, 480)  # random pixels: its overlay takes a while to compress
    random_png(tmp_path / "b.png", 24, 16, seed=1)
    out = tmp_path / "out"
    argv = [sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(voc_checkpoint), "--device", "cpu",
            "--save-dir", str(out), "--json", str(tmp_path / "r.json"), "--image", str(tmp_path / "a.png"),
            str(tmp_path / "b.png")]
    first = subprocess.Popen(argv, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while first.poll() is None and time.monotonic() < deadline:
        if (out / "overlays").is_dir() and any(p.name.endswith(".tmp") for p in (out / "overlays").iterdir()):
            first.send_signal(signal.SIGSTOP)  # half-way through writing overlays/a.png
            break
        time.sleep(0.001)
    assert first.poll() is None, "the first process ended before its overlay was caught half-written"
    try:
        second = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    for code, stderr in ((first.returncode, err), (second.returncode, second.stderr)):
        assert code == 0 and "Traceback" not in stderr, stderr
    for folder in ("labels", "overlays"):
        assert sorted(p.name for p in (out / folder).iterdir()) == ["a.png", "b.png"]  # no temporary file left
        for name, size in (("a.png", (640, 480)), ("b.png", (24, 16))):
            with Image.open(out / folder / name) as picture:
                picture.load()  # every byte decodes
                assert evaluate.is_picture(out / folder / name)
                assert folder == "overlays" or picture.size == size
    assert len(json.loads((tmp_path / "r.json").read_text())["images"]) == 2
    assert not list(tmp_path.rglob("*.tmp"))
