"""Evaluate a train.py checkpoint: mIoU by DANet's protocols, and predictions as pictures.

    python evaluate.py --checkpoint runs/demo/best.pt --save-dir runs/demo/pictures --show-clusters  # the demo
    python evaluate.py --checkpoint runs/voc/best.pt --data-root data                       # single scale
    python evaluate.py --checkpoint runs/voc/best.pt --data-root data --flip \\
        --scales 0.5 0.75 1.0 1.25 1.5 1.75                                                 # multi-scale + flip
    python evaluate.py --checkpoint runs/voc/best.pt --image photo.jpg --save-dir predictions

Protocols: "whole" predicts each image at once at its own size (padded to the output stride, cropped
back); "slide" averages the logits of overlapping --crop-size windows. With several --scales and/or
--flip, softmax probabilities are averaged over scales and flips, as in DANet's evaluation.
The metric, the dataset and the whole-image prediction are train.py's: validation there and here agree.
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader
from torchvision.utils import draw_keypoints, draw_segmentation_masks, make_grid, save_image

import train
from train import MEAN, STD, UserError, save_atomic


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


# ----------------------------------------------------------------------------- protocols

def predict_slide(model, images, crop_size):
    """Average the logits of crop_size windows at stride 2/3 crop_size; one window if it covers the image."""
    B, _, H, W = images.shape
    stride = math.ceil(crop_size * 2 / 3)
    h, w = min(crop_size, H), min(crop_size, W)

    def starts(size, window):
        positions = list(range(0, size - window + 1, stride))
        return positions if positions[-1] + window == size else positions + [size - window]

    logits, counts = None, torch.zeros(1, 1, H, W, device=images.device)
    for y in starts(H, h):
        for x in starts(W, w):
            window = train.predict_logits(model, images[..., y:y + h, x:x + w])  # [B, K, h, w]
            if logits is None:
                logits = torch.zeros(B, window.shape[1], H, W, device=images.device)
            logits[..., y:y + h, x:x + w] += window
            counts[..., y:y + h, x:x + w] += 1
    return logits / counts  # [B, K, H, W]


def predict(model, images, scales=(1.0,), flip=False, mode="whole", crop_size=512):
    """Scores [B, K, H, W]: logits for one scale without flip, else softmax averaged over scales and flips."""
    H, W = images.shape[-2:]

    def run(x):
        return train.predict_logits(model, x) if mode == "whole" else predict_slide(model, x, crop_size)

    if list(scales) == [1.0] and not flip:
        return run(images)
    scores = 0
    for scale in scales:
        scaled = images if scale == 1 else F.interpolate(images, scale_factor=scale, mode="bilinear",
                                                         align_corners=False)
        for flipped in ([False, True] if flip else [False]):
            x = scaled.flip(-1) if flipped else scaled
            logits = run(x)
            logits = logits.flip(-1) if flipped else logits
            probabilities = torch.softmax(F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False), 1)
            scores = scores + probabilities  # [B, K, H, W]
    return scores / (len(scales) * (2 if flip else 1))


# ----------------------------------------------------------------------------- pictures

def save_label_png(labels, path):
    """VOC's submission format: a palette PNG whose pixel values are the class indices."""
    image = Image.fromarray(labels.to(torch.uint8).cpu().numpy(), mode="P")
    image.putpalette([v for rgb in PALETTE for v in rgb])
    save_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def denormalise(image):
    """A normalised [3, H, W] float image back to uint8."""
    mean, std = torch.tensor(MEAN, device=image.device), torch.tensor(STD, device=image.device)
    return ((image * std[:, None, None] + mean[:, None, None]).clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def overlay(image, labels, alpha=0.6):
    """Colour each class of `labels` [H, W] but background (void included) over `image` [3, H, W] uint8."""
    present = [c for c in labels.unique().tolist() if c != 0]
    if not present:
        return image
    masks = torch.stack([labels == c for c in present])  # [n_present, H, W]
    return draw_segmentation_masks(image, masks.cpu(), alpha=alpha, colors=[PALETTE[c] for c in present])


def legend(classes, class_names, width):
    """A white strip with a colour swatch and the name of each class in `classes`, as [3, h, width] uint8."""
    if not classes:
        classes = [0]
    entries = [(PALETTE[c], class_names[c] if c < len(class_names) else "void") for c in classes]
    per_row = max(1, width // 110)
    rows = math.ceil(len(entries) / per_row)
    strip = Image.new("RGB", (width, 16 * rows + 4), "white")
    draw = ImageDraw.Draw(strip)
    for i, (colour, name) in enumerate(entries):
        x, y = 4 + (i % per_row) * 110, 4 + (i // per_row) * 16
        draw.rectangle([x, y, x + 10, y + 10], fill=colour, outline="black")
        draw.text((x + 14, y), name, fill="black")
    return torch.from_numpy(np.array(strip)).permute(2, 0, 1)  # [H, W, 3] -> [3, h, width]


def save_overlay(image, prediction, path, class_names, target=None):
    """image | ground truth | prediction side by side (no ground truth panel without one), with a legend."""
    panels = [image] + ([overlay(image, target)] if target is not None else []) + [overlay(image, prediction)]
    grid = make_grid(panels, nrow=len(panels), padding=4, pad_value=255)  # [3, H + 8, n * (W + 4) + 4]
    classes = set(prediction.unique().tolist()) | (set(target.unique().tolist()) if target is not None else set())
    classes = sorted(classes - {0})  # background is left uncoloured
    picture = torch.cat([grid, legend(classes, class_names, grid.shape[2])], dim=1)  # stacked vertically
    save_atomic(path, lambda tmp: save_image(picture.float() / 255, tmp, format="png"))


@torch.inference_mode()
def save_clusters(model, image, path, num_queries=3):
    """image | nearest cluster centre of each pixel | position attention of a few query pixels (marked).

    Reads the position branch: its ClusteringLayer's similarities s [1, K, h, w] and, from its
    PositionAttention, the attention row softmax_j(q_i . k_j) of each query pixel i.
    """
    clustering, attention = model.position_branch.clustering, model.position_branch.attention
    H, W = image.shape[-2:]
    captured = {}
    hook = clustering.register_forward_hook(lambda module, inputs, output: captured.setdefault("s", output))
    train.predict_logits(model, image[None])
    hook.remove()
    s = captured["s"].float()  # [1, K, h, w] (h, w: the padded size / 8)
    h, w = math.ceil(H / train.OUTPUT_STRIDE), math.ceil(W / train.OUTPUT_STRIDE)
    s = s[..., :h, :w]  # [1, K, h, w], the image's own part
    nearest = s.argmax(1)[0]  # [h, w]
    colours = torch.randint(0, 256, (s.shape[1], 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    cluster_map = colours[nearest.cpu()].permute(2, 0, 1)  # [h, w, 3] -> [3, h, w]
    cluster_map = F.interpolate(cluster_map[None].float(), size=(H, W), mode="nearest")[0].to(torch.uint8)

    q = attention.query(s).flatten(2)[0]  # [1, d, h, w] -> [d, N]
    k = attention.key(s).flatten(2)[0]  # [1, d, h, w] -> [d, N]
    picture = denormalise(image)  # [3, H, W] uint8
    panels = [picture, cluster_map]
    for i in range(num_queries):  # query pixels spread along the diagonal
        qy, qx = (i + 1) * h // (num_queries + 1), (i + 1) * w // (num_queries + 1)
        row = torch.softmax(q[:, qy * w + qx] @ k, dim=0).view(1, 1, h, w)  # [N] -> [1, 1, h, w]
        row = (row - row.min()) / (row.max() - row.min()).clamp(min=1e-12)  # rescaled to [0, 1] to show its shape
        heat = F.interpolate(row, size=(H, W), mode="bilinear", align_corners=False)[0, 0].cpu()  # [H, W]
        red = torch.stack([torch.full_like(heat, 255), torch.zeros_like(heat), torch.zeros_like(heat)])  # [3, H, W]
        blended = (picture.float() * (1 - 0.7 * heat) + red * 0.7 * heat).to(torch.uint8)
        point = torch.tensor([[[(qx + 0.5) * train.OUTPUT_STRIDE, (qy + 0.5) * train.OUTPUT_STRIDE]]])  # [1, 1, 2]
        panels.append(draw_keypoints(blended, point, colors="yellow", radius=3))
    grid = make_grid(panels, nrow=len(panels), padding=4, pad_value=255)
    save_atomic(path, lambda tmp: save_image(grid.float() / 255, tmp, format="png"))


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a train.py checkpoint (best.pt or last.pt)")
    p.add_argument("--data-root", help="VOC2012 folder or its parent; default: the demo's synthetic val set "
                   "for a demo checkpoint")
    p.add_argument("--split", default="val", choices=["val", "train", "trainval", "train_aug"])
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], help="e.g. 0.5 0.75 1.0 1.25 1.5 1.75")
    p.add_argument("--flip", action="store_true", help="also average horizontally flipped predictions")
    p.add_argument("--mode", choices=["whole", "slide"], default="whole")
    p.add_argument("--crop-size", type=int, default=512, help="window size for --mode slide")
    p.add_argument("--batch-size", type=int, default=1, help="images of a batch are padded to one size; 1 is exact")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--device", help="cuda, cuda:N or cpu; default: cuda if available")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--save-dir", help="write <id>.png (VOC palette PNG) and overlays/<id>.png for every image")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--image", nargs="+", help="predict these image files instead of a dataset")
    p.add_argument("--show-clusters", action="store_true", help="also save clusters/<id>.png: nearest centre "
                   "per pixel and the position attention of a few query pixels (needs --save-dir)")
    args = p.parse_args(argv)
    if args.show_clusters and not args.save_dir:
        raise UserError("--show-clusters writes pictures: give --save-dir too")
    return args


def load_model(path, device):
    checkpoint = train.load_checkpoint(path)
    config = checkpoint["args"]
    try:
        model = train.build_model({**config, "pretrained": False})
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"checkpoint {path} has an unusable model configuration ({e})") from None
    train.load_model_state(model, checkpoint, path)
    class_names = checkpoint.get("class_names") or [f"class {i}" for i in range(config["num_classes"])]
    return model.to(device, memory_format=torch.channels_last).eval(), config, class_names


def print_table(result, class_names):
    print(f"{'class':<14} IoU")
    for name, iou in zip(class_names, result["iou"]):
        print(f"{name:<14} {'n/a' if math.isnan(iou) else f'{iou:.4f}'}")


def main(argv=None):
    args = parse_args(argv)
    device, _, _, autocast = train.setup_device(args)
    model, config, class_names = load_model(args.checkpoint, device)
    save_dir = Path(args.save_dir) if args.save_dir else None
    options = dict(scales=args.scales, flip=args.flip, mode=args.mode, crop_size=args.crop_size)
    protocol = f"{args.mode}, scales {' '.join(map(str, args.scales))}{', flip' if args.flip else ''}"

    def save_pictures(image, prediction, name, target=None):
        save_label_png(prediction, save_dir / f"{name}.png")
        save_overlay(denormalise(image), prediction.cpu(), save_dir / "overlays" / f"{name}.png", class_names,
                     None if target is None else target.cpu())
        if args.show_clusters:
            save_clusters(model, image, save_dir / "clusters" / f"{name}.png")

    if args.image:  # arbitrary files: no ground truth, no metric
        transform = train.eval_transform()
        for path in args.image:
            image = transform(train.read_image(path)).to(device)  # [3, H, W]
            with torch.inference_mode(), autocast():
                prediction = predict(model, image[None], **options).argmax(1)[0]  # [H, W]
            counts = prediction.flatten().bincount(minlength=len(class_names))  # [H, W] -> [num_classes]
            found = ", ".join(f"{class_names[c]} {counts[c] / prediction.numel():.0%}" for c in counts.nonzero()[:, 0])
            print(f"{path}: {found}")
            if save_dir:
                save_pictures(image, prediction, Path(path).stem)
        print(f"peak memory {train.peak_memory_gib(device):.2f} GiB")
        return

    if args.data_root:
        dataset = train.VOCSegmentation(args.data_root, args.split)
        ids = dataset.ids
    elif config.get("data_root") is None:  # a demo checkpoint: its synthetic validation set
        dataset = train.SyntheticShapes(64, config["base_size"], seed=1)
        ids = [f"shapes_{i:03d}" for i in range(len(dataset))]
    else:
        raise UserError(f"checkpoint {args.checkpoint} was trained on VOC: give --data-root (or --image)")
    if len(dataset.class_names) != config["num_classes"]:
        raise UserError(f"checkpoint {args.checkpoint} predicts {config['num_classes']} classes, the dataset has "
                        f"{len(dataset.class_names)}")

    loader = DataLoader(dataset, args.batch_size, num_workers=args.workers, collate_fn=train.pad_collate,
                        pin_memory=device.type == "cuda")
    start, done = time.perf_counter(), [0]

    def on_batch(images, masks, scores, sizes):
        for image, mask, score, (h, w) in zip(images, masks, scores, sizes.tolist()):
            if save_dir:
                save_pictures(image[:, :h, :w], score[:, :h, :w].argmax(0), ids[done[0]], mask[:h, :w])
            done[0] += 1
        if done[0] % 50 < len(images) or done[0] == len(dataset):
            rate = done[0] / (time.perf_counter() - start)
            print(f"[{done[0]}/{len(dataset)}] {rate:.2f} images/s, eta {(len(dataset) - done[0]) / rate:.0f} s",
                  flush=True)

    metric = train.evaluate(model, loader, config["num_classes"], device, autocast,
                            lambda m, images: predict(m, images, **options), on_batch)
    result = metric.compute()
    print_table(result, class_names)
    split = args.split if args.data_root else "synthetic val"
    print(f"{args.checkpoint} on {split} ({len(dataset)} images, {protocol}): mIoU {result['miou']:.4f}, "
          f"pixel accuracy {result['pixel_accuracy']:.4f}, peak memory {train.peak_memory_gib(device):.2f} GiB")
    if args.json:
        summary = {"miou": result["miou"], "pixel_accuracy": result["pixel_accuracy"],
                   "per_class_iou": {n: None if math.isnan(v) else v for n, v in zip(class_names, result["iou"])},
                   "checkpoint": str(args.checkpoint), "split": split,
                   "images": len(dataset), "mode": args.mode, "scales": args.scales, "flip": args.flip}
        save_atomic(Path(args.json), lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))


if __name__ == "__main__":
    train.run_main(main)
