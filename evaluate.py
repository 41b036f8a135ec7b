"""Evaluate a train.py checkpoint (or the original DANet code's): mIoU by DANet's protocols, and pictures.

    python evaluate.py --checkpoint runs/demo/best.pt --save-dir runs/demo/pictures --show-clusters  # the demo
    python evaluate.py --checkpoint runs/voc/best.pt --data-root data                       # single scale
    python evaluate.py --checkpoint runs/voc/best.pt --data-root data --flip \\
        --scales 0.5 0.75 1.0 1.25 1.5 1.75                                                 # multi-scale + flip
    python evaluate.py --checkpoint runs/voc/best.pt --image photo.jpg --save-dir predictions
    python evaluate.py --checkpoint runs/cityscapes/best.pt --data-root cityscapes --save-dir predictions
    python evaluate.py --checkpoint runs/folder/best.pt --data-root my_data --json results.json
    python evaluate.py --checkpoint DANet101.pth.tar --dataset cityscapes --data-root cityscapes \
        --mode slide --crop-size 768 --flip                                  # the original's, its protocol

Protocols: "whole" predicts each image at once at its own size (padded to the output stride, cropped
back); "slide" averages the logits of overlapping --crop-size windows. With several --scales and/or
--flip, softmax probabilities are averaged over scales and flips, as in DANet's evaluation.
The metric, the dataset and the whole-image prediction are train.py's: validation there and here agree.

The code, in reading order:
  Part 1, the protocols: predict (whole or slide, over scales and flips), and the windows of slide.
  Part 2, the pictures: per image a label PNG, an overlay, and with --show-clusters the clustering layer's
          centres and the position attention; where each goes in --save-dir.
  Part 3, the command line: main in three steps (load the model, then evaluate a split or predict files), the
          checks on what a run writes (before any work), parse_args.
"""

import os
import signal
import sys

# Ctrl-C or SIGTERM while the imports below run (torch takes seconds): one line and exit code 128 + the signal number,
# no traceback, as train.exit_on_signal does for train.py (this file can import it only after torch); then run_main.
if __name__ == "__main__":
    def exit_on_signal(signum, frame):
        print(f"interrupted by {signal.Signals(signum).name}", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGINT, exit_on_signal)
    signal.signal(signal.SIGTERM, exit_on_signal)

import argparse
import functools
import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin
from torch.utils.data import DataLoader
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_keypoints, draw_segmentation_masks, make_grid

import train
from clusterdanet import OUTPUT_STRIDE
from train import MEAN, STD, UserError, save_atomic

SCALES = (0.1, 8.0)  # the range of --scales: 0.1x keeps a 512-pixel image at 51 pixels; memory grows as scale squared
LARGE_IMAGE = 2048 * 1024  # pixels: above this, --image in whole mode suggests --mode slide
PROGRESS_SECONDS = 10  # --image in slide mode: a line on the windows done at most this often
PICTURE_MARK = ("Software", "ClusterDANet evaluate.py")  # a PNG text chunk in each picture: what --save-dir replaces
RESULTS_KEYS = {"checkpoint", "dataset", "mode", "scales", "flip"}  # in every --json summary: what --json replaces
MIN_PANEL, MAX_PANEL = 256, 2048  # pixels: the height pictures of small images are enlarged to, the largest side
CAPTION_SIZE = 16  # pixels: the text of captions, colour bars and legends
BAR_HEIGHT = 10  # pixels: the colour bar under an attention panel
HEAT_ALPHA = 0.7  # how red the most attended pixel of an attention panel is drawn


# ==== Part 1: the protocols ===========================================================================================

def predict(model, images, scales=(1.0,), flip=False, mode="whole", crop_size=512, batch_size=1, progress=None):
    """Scores [B, K, H, W]: logits for one scale without flip, else softmax averaged over scales and flips.
    A scale that would shrink a side below one pixel shrinks it to one pixel (see rescale). In slide mode the
    windows of each scale, and with flip their mirrored copies, go through the model batch_size windows at a time
    (predict_slide), and progress(done, total), if given, is told after each call how many windows of all scales
    are done."""
    H, W = images.shape[-2:]
    done, total = 0, 0
    if mode == "slide":  # each scale's windows, counted on a meta tensor (only its shape is computed)
        sizes = [rescale(torch.empty(1, 1, H, W, device="meta"), scale).shape[-2:] for scale in scales]
        total = sum(len(slide_windows(*size, crop_size)[2]) for size in sizes) * (2 if flip else 1)

    def on_windows(n):
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    def run(x):  # the logits of x, and with flip those of its mirror image flipped back
        if mode == "slide":
            return predict_slide(model, x, crop_size, flip, batch_size, on_windows)
        return (train.predict_logits(model, x),) + ((train.predict_logits(model, x.flip(-1)).flip(-1),) if flip else ())

    if list(scales) == [1.0] and not flip:
        return run(images)[0]
    scores = 0
    for scale in scales:
        for logits in run(images if scale == 1 else rescale(images, scale)):
            probabilities = torch.softmax(F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False), 1)
            scores = scores + probabilities  # [B, K, H, W]
    return scores / (len(scales) * (2 if flip else 1))


def rescale(images, scale):
    """images [B, 3, H, W] resized by `scale` (bilinear; sides floor(H * scale), floor(W * scale) as F.interpolate's),
    no side below one pixel: --scales 0.01 on a 64x64 image predicts it at 1x1 instead of failing on a size of 0."""
    H, W = images.shape[-2:]
    if math.floor(H * scale) >= 1 and math.floor(W * scale) >= 1:
        return F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
    size = (max(1, math.floor(H * scale)), max(1, math.floor(W * scale)))  # clamped to one pixel
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)  # [B, 3, h, w]


def predict_slide(model, images, crop_size, flip=False, batch_size=1, on_windows=None):
    """The logits of the crop_size windows (slide_windows), averaged where they overlap: a tuple of [B, K, H, W],
    one for the image and, with flip, one for its mirror image, flipped back (the windows of the mirror image
    are the mirrored windows of the image at mirrored places).

    The windows, and with flip their mirrored copies, go through the model together, batch_size at a time
    (each window counting once per image of `images`): the scores are those of one window per call, to float
    rounding. on_windows(n), if given, is told after each model call how many windows it held."""
    B, _, H, W = images.shape
    h, w, corners = slide_windows(H, W, crop_size)
    views = [False, True] if flip else [False]  # mirrored?
    windows = [(mirrored, y, x) for mirrored in views for y, x in corners]
    logits = [None] * len(views)  # [B, K, H, W] sums of window logits, in the image's orientation
    counts = [torch.zeros(1, 1, H, W, device=images.device) for _ in views]  # [1, 1, H, W] windows per pixel
    per_call = max(1, batch_size // B)  # windows per model call
    for first in range(0, len(windows), per_call):
        group = windows[first:first + per_call]
        # the mirror image's window at x is the image's window at W - w - x, mirrored
        crops = [images[..., y:y + h, W - w - x:W - x].flip(-1) if mirrored else images[..., y:y + h, x:x + w]
                 for mirrored, y, x in group]  # each [B, 3, h, w]
        outputs = train.predict_logits(model, torch.cat(crops)).split(B)  # [n B, K, h, w] -> n x [B, K, h, w]
        for (mirrored, y, x), output in zip(group, outputs):
            left = W - w - x if mirrored else x  # where it lies on the image
            view = views.index(mirrored)
            if logits[view] is None:
                logits[view] = torch.zeros(B, output.shape[1], H, W, device=images.device)
            logits[view][..., y:y + h, left:left + w] += output.flip(-1) if mirrored else output
            counts[view][..., y:y + h, left:left + w] += 1
        if on_windows is not None:
            on_windows(len(group))
    return tuple(total / count for total, count in zip(logits, counts))  # each [B, K, H, W]


def slide_windows(H, W, crop_size):
    """The windows of crop_size over an H x W image at stride 2/3 crop_size, the last one flush with the far side
    (one window where crop_size covers a side): (h, w, [(y, x), ...]), each window's size and top-left corner."""
    stride = math.ceil(crop_size * 2 / 3)
    h, w = min(crop_size, H), min(crop_size, W)

    def starts(size, window):
        positions = list(range(0, size - window + 1, stride))
        return positions if positions[-1] + window == size else positions + [size - window]

    return h, w, [(y, x) for y in starts(H, h) for x in starts(W, w)]


# ==== Part 2: the pictures ============================================================================================

def voc_palette():
    """VOC's colour map as 256 (r, g, b) tuples: class c's colour is read off the bits of c."""
    palette = []
    for c in range(256):
        r = g = b = 0
        for shift in range(8):
            r |= ((c >> 0) & 1) << (7 - shift)
            g |= ((c >> 1) & 1) << (7 - shift)
            b |= ((c >> 2) & 1) << (7 - shift)
            c >>= 3
        palette.append((r, g, b))
    return palette


PALETTE = voc_palette()  # PALETTE[255] is VOC's cream "void" colour


def cityscapes_style():
    """Cityscapes' official colours (train id -> colour) and its submission format: <id>.png holds label ids."""
    colours, png_values, png_palette = [(0, 0, 0)] * 256, [0] * 256, [(0, 0, 0)] * 256
    for train_id, (label_id, colour) in enumerate(zip(train.Cityscapes.label_ids, train.Cityscapes.colours)):
        colours[train_id] = png_palette[label_id] = colour
        png_values[train_id] = label_id
    return dict(colours=colours, uncoloured={train.IGNORE_INDEX}, png_values=png_values, png_palette=png_palette)


# How predictions are drawn, by dataset: `colours` of the classes, the labels `uncoloured` in overlays, the value
# <id>.png holds for each class (`png_values`) and the PNG's colour for each value (`png_palette`).
VOC_STYLE = dict(colours=PALETTE, uncoloured={0}, png_values=list(range(256)), png_palette=PALETTE)
STYLES = {"demo": VOC_STYLE, "voc": VOC_STYLE, "folder": VOC_STYLE, "cityscapes": cityscapes_style()}


def save_pictures(model, image, prediction, paths, class_names, style, target=None):
    """The pictures of one image [3, H, W] and its prediction [H, W] (and ground truth [H, W]) at `paths`
    (picture_paths): its labels PNG, its overlay, and with a "clusters" path its clusters picture."""
    save_label_png(prediction, paths["labels"], style)
    save_overlay(denormalise(image), prediction.cpu(), paths["overlays"], class_names,
                 None if target is None else target.cpu(), style)
    if "clusters" in paths:
        save_clusters(model, image, paths["clusters"])


def save_label_png(labels, path, style=VOC_STYLE):
    """The benchmarks' submission format: a palette PNG of the class indices (VOC) or label ids (Cityscapes)."""
    values = torch.tensor(style["png_values"], dtype=torch.uint8)[labels.long().cpu()]  # [H, W]
    image = Image.fromarray(values.numpy(), mode="P")
    image.putpalette([v for rgb in style["png_palette"] for v in rgb])
    save_png(image, path)


def save_overlay(image, prediction, path, class_names, target=None, style=VOC_STYLE):
    """image | ground truth | prediction side by side (no ground truth panel without one), captioned, with a legend."""
    panels = [image] + ([overlay(image, target, style)] if target is not None else [])
    panels.append(overlay(image, prediction, style))
    captions = ["image"] + (["ground truth"] if target is not None else []) + ["prediction"]
    classes = set(prediction.unique().tolist()) | (set(target.unique().tolist()) if target is not None else set())
    classes = sorted(classes - style["uncoloured"])
    save_picture(panels, path, captions, strip=lambda width: legend(classes, class_names, width, style["colours"]))


@torch.inference_mode()
def save_clusters(model, image, path, num_queries=3):
    """image | nearest cluster centre of each cell | position attention of a few query pixels (marked), captioned,
    each attention panel with its colour bar.

    Reads the position branch: its ClusteringLayer's similarities s [1, K, h, w] and, from its attention module,
    the row of each query pixel i over the pixels j: PositionAttention's softmax_j(q_i . k_j), or for DRANet's
    CompactPositionAttention sum_m A_im R_mj, its attention to the 50 pooled centres spread over their bins.
    Each row is drawn rescaled from its lowest weight (no red) to its highest (HEAT_ALPHA red), and its colour
    bar gives those two weights.
    """
    clustering, attention = model.position_branch.clustering, model.position_branch.attention
    H, W = image.shape[-2:]
    captured = {}
    hook = clustering.register_forward_hook(lambda module, inputs, output: captured.setdefault("s", output))
    train.predict_logits(model, image[None])
    hook.remove()
    s = captured["s"].float()  # [1, K, h, w] (h, w: the padded size / 8)
    h, w = math.ceil(H / OUTPUT_STRIDE), math.ceil(W / OUTPUT_STRIDE)
    s = s[..., :h, :w]  # [1, K, h, w], the image's own part
    nearest = s.argmax(1)[0]  # [h, w]
    colours = torch.randint(0, 256, (s.shape[1], 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    cluster_map = colours[nearest.cpu()].permute(2, 0, 1)  # [h, w, 3] -> [3, h, w]
    cluster_map = F.interpolate(cluster_map[None].float(), size=(H, W), mode="nearest")[0].to(torch.uint8)

    queries = [((i + 1) * h // (num_queries + 1), (i + 1) * w // (num_queries + 1)) for i in range(num_queries)]
    rows = attention.attention_rows(s, [qy * w + qx for qy, qx in queries])[0]  # [num_queries, N]
    picture = denormalise(image)  # [3, H, W] uint8
    panels, scales = [picture, cluster_map], [None, None]
    for (qy, qx), row in zip(queries, rows):  # query pixels spread along the diagonal
        row = row.view(1, 1, h, w)  # [N] -> [1, 1, h, w]
        low, high = row.min(), row.max()
        heat = F.interpolate((row - low) / (high - low).clamp(min=1e-12), size=(H, W), mode="bilinear",
                             align_corners=False)[0, 0].cpu()  # [H, W], rescaled to [0, 1] to show its shape
        point = torch.tensor([[[(qx + 0.5) * OUTPUT_STRIDE, (qy + 0.5) * OUTPUT_STRIDE]]])  # [1, 1, 2]
        panels.append(draw_keypoints(heat_colours(heat, picture), point, colors="yellow", radius=3))
        scales.append((low.item(), high.item()))
    cell = f"{OUTPUT_STRIDE}x{OUTPUT_STRIDE}"
    captions = ["image", f"nearest centre of each {cell} cell\n(one colour per centre)",
                *["position attention\nof the marked pixel"] * num_queries]
    save_picture(panels, path, captions, scales)


def save_picture(panels, path, captions, scales=None, strip=None):
    """Panels [3, H, W] uint8 side by side, 4 white pixels around each, enlarged with nearest-neighbour (each pixel a
    factor x factor block, see enlargement). Under each panel its caption (captions[i]) and, for a panel with a scale
    (scales[i] = (low, high)), its colour bar; then strip(width) [3, h, width] below all if given (the legend, drawn
    at the enlarged width)."""
    factor = enlargement(*panels[0].shape[1:])
    width = panels[0].shape[2] * factor
    notes = [torch.cat([caption(text, width)] + ([colour_bar(*scale, width)] if scale else []), dim=1)
             for text, scale in zip(captions, scales or [None] * len(panels))]  # [3, h_i, fW]
    below = max(note.shape[1] for note in notes)
    columns = [torch.cat([panel.cpu().repeat_interleave(factor, 1).repeat_interleave(factor, 2),  # [3, fH, fW]
                          F.pad(note, (0, 0, 0, below - note.shape[1]), value=255)], dim=1)  # [3, below, fW]
               for panel, note in zip(panels, notes)]
    picture = make_grid(columns, nrow=len(columns), padding=4, pad_value=255)  # [3, fH + below + 8, n (fW + 4) + 4]
    # (every picture has two panels or more: make_grid would return a single one without the white border)
    if strip is not None:
        picture = torch.cat([picture, strip(picture.shape[2])], dim=1)  # the legend below
    save_png(to_pil_image(picture), path)


def enlargement(height, width):
    """The whole factor by which a picture's panels are enlarged: the least that makes them MIN_PANEL high, kept to
    sides of at most MAX_PANEL (64x64: 4, 1x1: 256, 1x2000: 1), and 1 for images MIN_PANEL high or more."""
    return max(1, min(math.ceil(MIN_PANEL / height), MAX_PANEL // max(height, width)))


def caption(text, width, size=CAPTION_SIZE):
    """`text` centred on a white strip `width` px wide, in lines of `size` px: a new line at each newline and
    wherever the next word would pass the strip's width (a word longer than the strip is cut at its edges).
    [3, h, width] uint8."""
    font, lines = legend_font(size), []
    for paragraph in text.split("\n"):
        lines.append("")
        for word in paragraph.split():
            if lines[-1] and text_width(f"{lines[-1]} {word}", font) > width - 8:
                lines.append("")
            lines[-1] = f"{lines[-1]} {word}".strip()
    strip = Image.new("RGB", (width, (size + 4) * len(lines) + 8), "white")
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        draw.text(((width - text_width(line, font)) / 2, 4 + i * (size + 4)), line, fill="black", font=font)
    return pil_to_tensor(strip)  # [3, h, width]


def legend(classes, class_names, width, colours=PALETTE, size=CAPTION_SIZE):
    """A white strip with a colour swatch and the name of each class in `classes`, as [3, h, width] uint8: rows of
    `size` px text in columns as wide as the longest name."""
    if not classes:
        classes = [0]
    entries = [(colours[c], class_names[c] if c < len(class_names) else "void") for c in classes]
    font, line = legend_font(size), size + 8
    column = size + 6 + math.ceil(max(text_width(name, font) for _, name in entries)) + 2 * size
    per_row = max(1, (width - 8) // column)
    rows = math.ceil(len(entries) / per_row)
    strip = Image.new("RGB", (width, line * rows + 8), "white")
    draw = ImageDraw.Draw(strip)
    for i, (colour, name) in enumerate(entries):
        x, y = 8 + (i % per_row) * column, 6 + (i // per_row) * line
        draw.rectangle([x, y + 2, x + size - 2, y + size], fill=colour, outline="black")
        draw.text((x + size + 6, y), name, fill="black", font=font)
    return pil_to_tensor(strip)  # [3, h, width]


def colour_bar(low, high, width, size=CAPTION_SIZE):
    """The colour scale of an attention picture: heat_colours over white from heat 0 at the left end to 1 at the
    right, in a bar BAR_HEIGHT px high and width - 8 long (black frame around it), `low` written under its left end
    and `high` under its right: the attention weights the two ends stand for. [3, h, width] uint8."""
    length = max(1, width - 8)
    heat = torch.linspace(0, 1, length).expand(BAR_HEIGHT, length)  # [BAR_HEIGHT, length]
    bar = heat_colours(heat, torch.full((3, BAR_HEIGHT, length), 255, dtype=torch.uint8))
    strip = Image.new("RGB", (width, BAR_HEIGHT + size + 12), "white")
    draw = ImageDraw.Draw(strip)
    draw.rectangle([3, 1, 4 + length, 2 + BAR_HEIGHT], outline="black")  # around the bar, not over it
    strip.paste(to_pil_image(bar), (4, 2))
    font, right = legend_font(size), f"{high:.3g}"
    draw.text((4, BAR_HEIGHT + 6), f"{low:.3g}", fill="black", font=font)
    draw.text((4 + length - text_width(right, font), BAR_HEIGHT + 6), right, fill="black", font=font)
    return pil_to_tensor(strip)  # [3, h, width]


def heat_colours(heat, base):
    """The attention pictures' colour map: `base` [3, H, W] uint8 turned red where heat [H, W] (in [0, 1]) is high,
    base (1 - a heat) + red a heat with a = HEAT_ALPHA: [3, H, W] uint8."""
    red = torch.tensor([255.0, 0.0, 0.0])[:, None, None]  # [3, 1, 1]
    alpha = HEAT_ALPHA * heat[None]  # [1, H, W]
    return (base.float() * (1 - alpha) + red * alpha).round().to(torch.uint8)


def overlay(image, labels, style=VOC_STYLE, alpha=0.6):
    """Colour each class of `labels` [H, W] but the uncoloured ones (VOC: background) over `image` [3, H, W] uint8."""
    present = [c for c in labels.unique().tolist() if c not in style["uncoloured"]]
    if not present:
        return image
    masks = torch.stack([labels == c for c in present])  # [n_present, H, W]
    return draw_segmentation_masks(image, masks.cpu(), alpha=alpha, colors=[style["colours"][c] for c in present])


def denormalise(image):
    """A normalised [3, H, W] float image back to uint8."""
    mean, std = torch.tensor(MEAN, device=image.device), torch.tensor(STD, device=image.device)
    return ((image * std[:, None, None] + mean[:, None, None]).clamp(0, 1) * 255).round().to(torch.uint8).cpu()


@functools.lru_cache
def legend_font(size=CAPTION_SIZE):
    """Pillow's own font at `size` px (FreeType, Pillow >= 10.1), else its small bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # an older Pillow, or one built without FreeType
        return ImageFont.load_default()


def text_width(text, font):
    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font)


def save_png(image, path):
    """A PIL image as the PNG `path`, written atomically, with PICTURE_MARK: a later run may replace it."""
    mark = PngImagePlugin.PngInfo()
    mark.add_text(*PICTURE_MARK)
    save_atomic(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=mark))


def is_picture(path):
    """Whether `path` is a PNG file with PICTURE_MARK (a picture that evaluate.py wrote); only the header is read."""
    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get(PICTURE_MARK[0]) == PICTURE_MARK[1]
    except (OSError, ValueError):  # not an image, a folder, unreadable
        return False


def picture_names(paths):
    """A name for each --image file's pictures: its stem; a stem seen before gets _2, _3, ... (the first free one)."""
    names = []
    for path in paths:
        stem = name = Path(path).stem
        n = 1
        while name in names:
            n += 1
            name = f"{stem}_{n}"
        names.append(name)
    return names


def picture_paths(save_dir, name, clusters=False):
    """Where the pictures of image `name` go: {folder: DIR/folder/<name>.png} for labels, overlays (and clusters).
    The predictions have a folder of their own, so that benchmark scripts that walk it find one file per image."""
    return {folder: path / f"{name}.png" for folder, path in picture_folders(save_dir, clusters).items()}


def picture_folders(save_dir, clusters=False):
    """{folder: DIR/folder} for labels, overlays (and clusters)."""
    return {folder: Path(save_dir) / folder for folder in ("labels", "overlays") + (("clusters",) if clusters else ())}


# ==== Part 3: the command line ========================================================================================

def main(argv=None):
    """Load the model, then evaluate it on a split of its dataset (the mIoU) or predict the --image files; with
    --save-dir, the pictures of every image. What the run writes is checked before any prediction."""
    args = parse_args(argv)
    device, _, _, autocast = train.setup_device(args)
    model, config, class_names = load_model(args.checkpoint, device, args.attention)
    if args.show_clusters and not config.get("clustering", True):
        raise UserError(f"--show-clusters draws the clustering layer, and {args.checkpoint} is plain "
                        f"{train.model_name(config)}")
    dataset_name = dataset_of(args, config)
    if args.image:
        predict_files(args, model, class_names, dataset_name, device, autocast)
    else:
        evaluate_split(args, model, config, class_names, dataset_name, device, autocast)


def load_model(path, device, attention="auto"):
    """A train.py checkpoint (either model), or one of the original DANet code (DANet101.pth.tar, dran101.pth.tar)
    read as it is, its position attention computed by `attention`; one whose weights are not finite is refused
    (train.load_checkpoint). Returns (model, its config, its class names)."""
    checkpoint = train.load_checkpoint(path)
    config = checkpoint["args"]
    if checkpoint.get("original"):
        print(describe_checkpoint(checkpoint, path))
    try:
        model = train.build_model({**config, "pretrained": False, "attention": attention})
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"checkpoint {path} has an unusable model configuration ({e})") from None
    train.load_model_state(model, checkpoint, path)
    class_names = list(checkpoint.get("class_names") or unnamed(config["num_classes"]))
    return model.to(device, memory_format=torch.channels_last).eval(), config, class_names


def describe_checkpoint(checkpoint, path):
    """One line on an original checkpoint: what it is evaluated as, and the tensors that have no place here."""
    config, unused = checkpoint["args"], checkpoint["unused"]
    text = (f"{path}: a checkpoint of the original DANet code (epoch {checkpoint['iteration']}), read as plain "
            f"{train.model_name(config)}, {config['backbone']}"
            f"{', deep stem' if config['deep_stem'] else ''}, multi-grid 4 8 16, {config['num_classes']} classes")
    return text + (f"; {len(unused)} tensors unused ({train.first_few(unused)})" if unused else "")


def unnamed(num_classes):
    """The class names of a checkpoint that stores none (the original DANet code's for another dataset)."""
    return [f"class {i}" for i in range(num_classes)]


def dataset_of(args, config):
    """The dataset evaluated on (with --image: whose colours the pictures have): --dataset, else the checkpoint's.
    A demo checkpoint takes this command line's dataset the way train.py would (train.dataset_name)."""
    trained_on = train.dataset_name(config.get("dataset"), config.get("data_root"))
    return train.dataset_name(args.dataset, args.data_root) if trained_on == "demo" else args.dataset or trained_on


def evaluate_split(args, model, config, class_names, dataset_name, device, autocast):
    """The mIoU of --split (a demo checkpoint without --data-root: the demo's synthetic validation set), a table of
    each class's IoU, and with --json the summary. The outputs, the class names and every mask are checked first."""
    dataset = split_dataset(args, config, dataset_name)
    check_outputs(args, dataset)  # its files, before the first picture
    named = class_names != unnamed(len(class_names))  # a checkpoint that names no classes is not checked by name
    train.check_classes(args.checkpoint, config["num_classes"], class_names if named else None, dataset.class_names)
    train.check_masks(dataset, workers=args.workers)  # every mask, before the first prediction
    class_names, ids, style = dataset.class_names, dataset.ids, STYLES[dataset_name]
    images_per_batch = 1 if args.mode == "slide" else args.batch_size  # slide: --batch-size counts windows
    loader = DataLoader(dataset, images_per_batch, num_workers=args.workers, collate_fn=train.pad_collate,
                        pin_memory=device.type == "cuda")
    start, done = time.perf_counter(), 0

    def on_batch(images, masks, scores, sizes):  # the pictures of each image, a line every 50 images
        nonlocal done
        for image, mask, score, (h, w) in zip(images, masks, scores, sizes.tolist()):
            if args.save_dir:
                save_pictures(model, image[:, :h, :w], score[:, :h, :w].argmax(0),
                              picture_paths(args.save_dir, ids[done], args.show_clusters), class_names, style,
                              mask[:h, :w])
            done += 1
        if done % 50 < len(images) or done == len(dataset):
            rate = done / (time.perf_counter() - start)
            print(f"[{done}/{len(dataset)}] {rate:.2f} images/s, eta {(len(dataset) - done) / rate:.0f} s", flush=True)

    def predicting():  # for the out-of-memory message: the image (the first of its batch), how many were done
        return f"image {done + 1} of {len(dataset)} ({ids[min(done, len(ids) - 1)]})", done

    with out_of_memory_is_one_line(args, device, predicting):
        metric = train.accumulate_confusion(model, loader, config["num_classes"], device, autocast, protocol(args),
                                            on_batch)
    result = metric.compute()
    print_table(result, class_names)
    split = args.split if args.data_root else "synthetic val"
    print(f"{args.checkpoint} on {dataset_name} {split} ({len(dataset)} images, {protocol_text(args)}): "
          f"mIoU {result['miou']:.4f}, pixel accuracy {result['pixel_accuracy']:.4f}, "
          f"peak memory {train.peak_memory_gib(device):.2f} GiB")
    if args.json:
        save_results(args, dataset_name, {"miou": result["miou"], "pixel_accuracy": result["pixel_accuracy"],
                                          "per_class_iou": train.per_class(result["iou"], class_names),
                                          "split": split, "images": len(dataset), "batch_size": args.batch_size})


def split_dataset(args, config, dataset_name):
    """--split of the dataset in --data-root, or a demo checkpoint's synthetic validation set (train.py's)."""
    if args.data_root:
        return train.DATASETS[dataset_name](args.data_root, args.split)
    if dataset_name == "demo":
        return train.SyntheticShapes(64, config["base_size"], seed=1)
    raise UserError(f"evaluating {args.checkpoint} on {dataset_name} needs --data-root (or --image)")


def print_table(result, class_names):
    width = max(14, *(len(name) + 1 for name in class_names))
    print(f"{'class':<{width}} IoU")
    for name, iou in zip(class_names, result["iou"]):
        print(f"{name:<{width}} {'n/a' if math.isnan(iou) else f'{iou:.4f}'}")


def predict_files(args, model, class_names, dataset_name, device, autocast):
    """--image: each file's predicted classes with their pixel shares (no ground truth, no metric), and with --json
    their list. Every file is read before the first is predicted: a broken one stops the run before any output."""
    train.check_files_exist(args.image, "--image file")
    sizes = read_all(args.image)
    transform, style, results = train.eval_transform(), STYLES[dataset_name], []
    for i, (path, name, (W, H)) in enumerate(zip(args.image, picture_names(args.image), sizes), 1):
        start, prefix = time.perf_counter(), f"[{i}/{len(args.image)}] {path}"
        if args.mode == "whole" and H * W > LARGE_IMAGE:
            print(f"{prefix} is {W}x{H}: predicting it whole can take minutes on a CPU and much memory; "
                  f"--mode slide --crop-size 512 is faster for large images", flush=True)
        paths = picture_paths(args.save_dir, name, args.show_clusters) if args.save_dir else {}
        with out_of_memory_is_one_line(args, device, lambda: (f"{path} ({W}x{H})", i - 1)):
            image = transform(train.read_image(path)).to(device)  # [3, H, W]
            with torch.inference_mode(), autocast():
                prediction = protocol(args)(model, image[None], progress=window_progress(prefix)).argmax(1)[0]
            if paths:
                save_pictures(model, image, prediction, paths, class_names, style)
        counts = prediction.flatten().bincount(minlength=len(class_names)).tolist()  # [H, W] -> [num_classes]
        shares = {class_names[c]: n / prediction.numel() for c, n in enumerate(counts) if n}
        found = ", ".join(f"{label} {share:.0%}" for label, share in shares.items())
        saved = f" -> {paths['labels']}" if paths else ""
        print(f"{prefix}: {found} ({time.perf_counter() - start:.1f} s){saved}", flush=True)
        results.append({"file": str(path), "size": [W, H], "classes": shares,
                        "pictures": {folder: str(p) for folder, p in paths.items()} or None})
    print(f"peak memory {train.peak_memory_gib(device):.2f} GiB")
    if args.json:
        save_results(args, dataset_name, {"images": results})


def read_all(paths):
    """Open and decode every --image file before the first is predicted (a broken file is then found before anything
    is written): the size (W, H) of each, as shown. The pixels are not kept: each is read again when predicted."""
    sizes = []
    for path in paths:
        H, W = train.read_image(path).shape[1:]  # a UserError naming the file if it cannot be read
        sizes.append((W, H))
    return sizes


def window_progress(prefix):
    """progress(done, total) for predict: a line on the windows done at most every PROGRESS_SECONDS (a long image)."""
    start = last = time.perf_counter()

    def report(done, total):
        nonlocal last
        now = time.perf_counter()
        if now - last >= PROGRESS_SECONDS and done < total:
            print(f"{prefix}: {done}/{total} windows, {now - start:.0f} s", flush=True)
            last = now
    return report


def protocol(args):
    """predict(model, images, progress=None) with the command line's protocol."""
    return functools.partial(predict, scales=args.scales, flip=args.flip, mode=args.mode, crop_size=args.crop_size,
                             batch_size=args.batch_size)


def protocol_text(args):
    """The protocol in words, for the result line: mode, scales, flip, and a --batch-size above 1."""
    text = f"{args.mode}, scales {' '.join(map(str, args.scales))}{', flip' if args.flip else ''}"
    if args.batch_size > 1:
        text += (f", {args.batch_size} windows per batch" if args.mode == "slide" else
                 f", batch size {args.batch_size} (images padded to one size)")
    return text


@contextmanager
def out_of_memory_is_one_line(args, device, what):
    """Running out of memory inside becomes a RunError (exit code 4, one line) that names the flags lowering the
    memory; what() says what was being predicted and how many images were done (their pictures are kept)."""
    try:
        yield
    except Exception as e:
        if not train.is_out_of_memory(e):
            raise
        image, done = what()
        images = f"{done} image{'s' if done > 1 else ''}"
        kept = f"; the pictures of the {images} before it are in {Path(args.save_dir)}" if args.save_dir and done \
            else ""
        raise train.RunError(f"out of memory on {device} while predicting {image}: lower the memory with "
                             f"{', '.join(memory_flags(args, device))}{kept}", train.EXIT_OUT_OF_MEMORY) from None


def memory_flags(args, device):
    """The flags that lower this command's memory, for the out-of-memory message."""
    flags = ["--mode slide --crop-size 512" if args.mode == "whole" else f"--crop-size {max(1, args.crop_size // 2)}"]
    if args.batch_size > 1:
        flags.append("--batch-size 1")
    if max(args.scales) > 1:
        flags.append("no --scales above 1")
    if device.type == "cuda":
        flags += (["--precision bf16"] if args.precision == "fp32" else []) + ["--device cpu"]
    return flags


def save_results(args, dataset_name, results):
    """--json: what produced the results (RESULTS_KEYS, by which a later run knows the file), then `results`."""
    summary = {"checkpoint": str(args.checkpoint), "dataset": dataset_name, "mode": args.mode, "scales": args.scales,
               "flip": args.flip, **results}
    save_atomic(Path(args.json), lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))


def parse_args(argv=None):
    usage = __doc__.split("\nThe code, in reading order:")[0]  # --help: the commands, not the map of the code
    p = train.ArgumentParser(description=usage, formatter_class=argparse.RawDescriptionHelpFormatter)
    path = os.path.expanduser  # every path flag accepts ~
    p.add_argument("--checkpoint", type=path, required=True, help="a train.py checkpoint (best.pt or last.pt), "
                   "or one of the original DANet code (DANet101.pth.tar, dran101.pth.tar)")
    p.add_argument("--dataset", choices=["voc", "cityscapes", "folder"], help="default: the checkpoint's (voc for a "
                   "demo checkpoint given --data-root)")
    p.add_argument("--data-root", type=path, help="the dataset's folder, as for train.py; default: the demo's "
                   "synthetic val set for a demo checkpoint")
    p.add_argument("--split", default="val", choices=["val", "train", "trainval", "train_aug"])
    p.add_argument("--scales", type=train.real_number(*SCALES, low_open=False), nargs="+", default=[1.0],
                   help=f"each {SCALES[0]:g} to {SCALES[1]:g}, e.g. 0.5 0.75 1.0 1.25 1.5 1.75")
    p.add_argument("--flip", action="store_true", help="also average horizontally flipped predictions")
    p.add_argument("--mode", choices=["whole", "slide"], default="whole")
    p.add_argument("--crop-size", type=train.whole_number(1, 8192), default=512, help="window size for --mode slide")
    p.add_argument("--batch-size", type=train.whole_number(1, 4096), default=1,
                   help="--mode whole: images per batch, padded to one size (1 is exact); --mode slide: windows per "
                   "batch (with --flip their mirrored copies too), each image on its own, exact for any value")
    p.add_argument("--attention", choices=train.PositionAttention.ATTENTIONS, default="auto",
                   help=train.ATTENTION_HELP + "; whatever the checkpoint trained with")
    p.add_argument("--workers", type=train.whole_number(0, 256), default=min(4, os.cpu_count() or 1))
    p.add_argument("--device", help="cuda, cuda:N or cpu; default: cuda if available")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--save-dir", type=path, help="write labels/<id>.png (class indices; Cityscapes: label ids) and "
                   "overlays/<id>.png for every image; --image files are named by their stem, repeated stems get "
                   "_2, _3, ...")
    p.add_argument("--json", type=path, help="write the results to this JSON file (with --image: each file's size, "
                   "predicted classes with their pixel shares, and its pictures)")
    p.add_argument("--image", type=path, nargs="+", help="predict these image files instead of a dataset")
    p.add_argument("--show-clusters", action="store_true", help="also save clusters/<id>.png: nearest centre "
                   "per pixel and the position attention of a few query pixels (needs --save-dir)")
    args = p.parse_args(argv)
    if args.show_clusters and not args.save_dir:
        raise UserError("--show-clusters writes pictures: give --save-dir too")
    if args.save_dir:
        train.check_writable(args.save_dir, "--save-dir")
    if args.json:
        train.check_writable(args.json, "--json", folder=False)
    check_outputs(args)  # against the files the command line names; main checks the dataset's too
    return args


def check_outputs(args, dataset=None):
    """Before any work: what this command writes (--json, and in --save-dir the pictures of the --image files or of
    `dataset`) is none of what it reads (the checkpoint, the --image files, the dataset's files), no picture folder
    is a dataset folder or inside one, --json is no picture and in no picture folder (train.check_apart); and no
    existing file is replaced that this script did not write: a --json results file (is_results) or a picture
    (is_picture). Anything else is a UserError naming the file."""
    names = picture_names(args.image) if args.image else dataset.ids if dataset is not None else []
    pictures = [path for name in names for path in picture_paths(args.save_dir, name, args.show_clusters).values()] \
        if args.save_dir else []
    outputs = [(path, f"--save-dir {args.save_dir}: its picture {path}", "--save-dir") for path in pictures]
    if args.json:
        outputs.insert(0, (args.json, f"--json {args.json}", "--json"))
    inputs = [(args.checkpoint, "the --checkpoint file"), *((path, "the --image file") for path in args.image or ())]
    files, folders = train.dataset_inputs([dataset] if dataset is not None else [])
    written_folders = sorted({path.parent for path in pictures})  # labels/, overlays/, and subfolders of ids
    train.check_apart(outputs, inputs + files, folders,
                      [(folder, f"--save-dir {args.save_dir}: its picture folder {folder}", "--save-dir")
                       for folder in written_folders])
    if args.json and args.save_dir:  # the predictions have folders of their own
        train.check_apart([], [], [(folder, "the picture folder of --save-dir")
                                   for folder in picture_folders(args.save_dir, args.show_clusters).values()],
                          [(Path(args.json).parent, f"--json {args.json}: its folder", "--json")])
    if args.json and os.path.lexists(args.json) and not is_results(args.json):
        raise UserError(f"--json {args.json} exists and is not a results file of evaluate.py: it is not replaced; "
                        f"remove it or choose another --json")
    for folder in written_folders:  # a file where a folder of pictures goes
        for above in (folder, *folder.parents):
            if above == Path(args.save_dir):
                break
            if os.path.lexists(above) and not above.is_dir():
                raise UserError(f"--save-dir {args.save_dir}: {above} is a file, and pictures go into a folder there: "
                                f"move it away or choose another --save-dir")
    foreign = [path for path in pictures if os.path.lexists(path) and not is_picture(path)]
    if foreign:
        raise UserError(f"--save-dir {args.save_dir} holds {foreign[0]}{train.and_more(len(foreign) - 1)}, "
                        f"which is not a picture of evaluate.py: it is not replaced; choose another --save-dir, "
                        f"or move the file away")


def is_results(path):
    """Whether `path` is a --json results file: a JSON object with the keys of every summary (RESULTS_KEYS)."""
    try:
        with open(path, "rb") as file:
            if file.read(1) != b"{":  # a checkpoint (a zip), a picture, ...: not read on
                return False
            summary = json.loads(b"{" + file.read())
    except (OSError, ValueError):  # a folder, unreadable, not UTF-8 JSON
        return False
    return isinstance(summary, dict) and RESULTS_KEYS <= summary.keys()


if __name__ == "__main__":
    train.run_main(main)
