"""Tests for ClusterDANet: CPU, random weights, tiny inputs, no downloads.

Run: python -m pytest -q
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from clusterdanet import ChannelAttention, ClusterDANet, ClusteringLayer, DilatedResNet, PositionAttention

H, W = 11, 13  # non-square, not multiples of 8


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- shapes

def test_module_shapes():
    x = torch.randn(2, 64, H, W)
    assert ClusteringLayer(64, 24)(x).shape == (2, 24, H, W)
    assert ClusteringLayer(64, 24).eval()(x).shape == (2, 24, H, W)
    assert PositionAttention(64)(x).shape == (2, 64, H, W)
    assert PositionAttention(64, dense=True)(x).shape == (2, 64, H, W)
    assert ChannelAttention()(x).shape == (2, 64, H, W)


@pytest.mark.parametrize("backbone, channels", [("resnet18", 512), ("resnet50", 2048)])
def test_backbone_output_stride_8(backbone, channels):
    features = DilatedResNet(backbone).eval()(torch.randn(1, 3, 8 * H - 3, 8 * W + 5))
    assert features.shape == (1, channels, H, W + 1)  # ceil(size / 8)


def test_position_attention_needs_channels_divisible_by_8():
    with pytest.raises(ValueError, match="divisible by 8"):
        PositionAttention(12)


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone"):
        ClusterDANet(backbone="vgg16")


# ----------------------------------------------------------------------------- attention formulas

def test_position_attention_efficient_equals_dense():
    attention = PositionAttention(64)
    attention.gamma.data.fill_(0.7)  # gamma starts at 0, which would hide the attention term
    x = torch.randn(2, 64, H, W, requires_grad=True)
    outputs, grads = [], []
    for dense in (False, True):
        attention.dense = dense
        y = attention(x)
        outputs.append(y)
        grads.append(torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), x)[0])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def test_position_attention_dense_matches_equation():
    """Eq. 2 written pixel by pixel in float64 numpy, against the module's dense path."""
    attention = PositionAttention(16, dense=True).double()
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


def test_position_attention_uses_a_fused_kernel():
    """With only the fused (flash) kernel allowed, the inputs we pass must be accepted by it."""
    x = torch.randn(1, 64, H, W, requires_grad=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        PositionAttention(64)(x).sum().backward()
        PositionAttention(64)(x.to(memory_format=torch.channels_last)).sum().backward()


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


def test_gammas_start_at_zero():
    assert PositionAttention(64).gamma.item() == 0 and ChannelAttention().gamma.item() == 0


# ----------------------------------------------------------------------------- clustering layer

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


def test_clustering_forward_is_cosine_similarity():
    layer = ClusteringLayer(8, 5).eval()
    x = torch.randn(2, 8, H, W)
    s = layer(x)
    expected = F.cosine_similarity(x[:, None], layer.centers[None, :, :, None, None], dim=2)  # [B, K, H, W]
    torch.testing.assert_close(s, expected, rtol=1e-5, atol=1e-6)


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


# ----------------------------------------------------------------------------- the model

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
    assert model.position_branch[1].centers.shape == (128, 128)  # K = C = 512 / 4
    assert ClusterDANet(backbone="resnet18", num_clusters=64).channel_branch[1].centers.shape == (64, 128)
    assert not model.dense_attention
    model.dense_attention = True
    assert model.position_branch[2].dense


def test_gradients_reach_the_backbone():
    model = ClusterDANet(num_classes=3, backbone="resnet18")
    outputs = model(torch.randn(2, 3, 40, 56))
    sum(o.logsumexp(1).mean() for o in outputs.values()).backward()
    assert model.backbone.stem[0].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.head_parameters())
    assert model.position_branch[2].gamma.grad.abs() > 0 and model.channel_branch[2].gamma.grad.abs() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_and_channels_last(dtype):
    model = ClusterDANet(num_classes=3, backbone="resnet18").to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 40, 56).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=dtype):
        outputs = model(images)
    sum(o.float().mean() for o in outputs.values()).backward()
    assert all(torch.isfinite(o).all() for o in outputs.values())
    assert model.position_branch[1].centers.dtype == torch.float32


def test_compile():
    layer = torch.nn.Sequential(ClusteringLayer(16, 16), PositionAttention(16), ChannelAttention())
    compiled = torch.compile(layer)
    x = torch.randn(2, 16, H, W)
    reference = torch.nn.Sequential(ClusteringLayer(16, 16), PositionAttention(16), ChannelAttention())
    reference.load_state_dict(layer.state_dict())
    torch.testing.assert_close(compiled(x), reference(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer[0].centers, reference[0].centers)  # the buffer update happened


def test_pretrained_download_failure_is_explained(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty weights cache
    for name in ("https_proxy", "HTTPS_PROXY"):  # a proxy that refuses every connection: offline
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(RuntimeError, match="could not download the ImageNet weights of resnet18.*--no-pretrained"):
        ClusterDANet(backbone="resnet18", pretrained_backbone=True)


# ----------------------------------------------------------------------------- evaluate.py

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from PIL import Image  # noqa: E402

import evaluate  # noqa: E402
import train  # noqa: E402

ROOT = Path(__file__).resolve().parent


def run_script(script, *args, cwd=ROOT):
    """Run a script as a user would; returns (exit code, stdout, stderr)."""
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                            cwd=cwd, timeout=600)
    return result.returncode, result.stdout, result.stderr


def assert_user_error(result, *words):
    code, _, stderr = result
    assert code == 2, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("error: ") and all(w in stderr for w in words), stderr


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """A real demo checkpoint: two iterations of train.py on the synthetic shapes (4 classes)."""
    out = tmp_path_factory.mktemp("demo")
    train.main(["--iters", "2", "--crop-size", "32", "--batch-size", "2", "--demo-images", "4", "--val-every", "2",
                "--out-dir", str(out), "--device", "cpu"])
    return out / "last.pt"


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


def tiny_model(num_classes=3):
    return ClusterDANet(num_classes=num_classes, backbone="resnet18", num_clusters=32).eval()


def test_confusion_matrix_against_hand_count():
    metric = train.ConfusionMatrix(4)
    target = torch.tensor([[0, 0, 1, 1], [1, 2, 255, 255]])
    prediction = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 3]])  # the 255 pixels' predictions are ignored
    metric.update(prediction, target)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    for t, p in [(0, 0), (0, 1), (1, 1), (1, 1), (1, 2), (2, 2)]:
        expected[t, p] += 1
    assert torch.equal(metric.matrix, expected)
    result = metric.compute()
    # IoU = TP / (TP + FP + FN): class 0: 1/2, class 1: 2/(2+1+1), class 2: 1/2, class 3: absent from both
    assert result["iou"][:3] == pytest.approx([1 / 2, 2 / 4, 1 / 2]) and math.isnan(result["iou"][3])
    assert result["miou"] == pytest.approx((1 / 2 + 2 / 4 + 1 / 2) / 3)
    assert result["pixel_accuracy"] == pytest.approx(4 / 6)


def test_slide_window_covering_the_image_equals_whole_image():
    model = tiny_model()
    images = torch.randn(2, 3, 45, 61)
    with torch.inference_mode():
        whole = train.predict_logits(model, images)
        assert torch.equal(evaluate.predict_slide(model, images, crop_size=64), whole)
        assert torch.equal(evaluate.predict(model, images, mode="slide", crop_size=61), whole)


def test_slide_window_averages_overlapping_windows():
    model = tiny_model()
    images = torch.randn(1, 3, 40, 72)
    with torch.inference_mode():
        scores = evaluate.predict_slide(model, images, crop_size=40)  # stride 27: windows at x = 0, 27, 32
        windows = {x: train.predict_logits(model, images[..., x:x + 40]) for x in (0, 27, 32)}
    assert scores.shape == (1, 3, 40, 72)
    torch.testing.assert_close(scores[..., 10], windows[0][..., 10])  # one window
    torch.testing.assert_close(scores[..., 30], (windows[0][..., 30] + windows[27][..., 3]) / 2)  # two windows
    expected = (windows[0][..., 35] + windows[27][..., 8] + windows[32][..., 3]) / 3  # three windows
    torch.testing.assert_close(scores[..., 35], expected)
    torch.testing.assert_close(scores[..., 70], windows[32][..., 38])


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


def test_evaluate_demo_checkpoint_end_to_end(demo_checkpoint, tmp_path):
    """The demo checkpoint on its synthetic val set: --json, palette PNGs, overlays, clusters; ms + flip."""
    out = tmp_path / "pictures"
    code, stdout, stderr = run_script("evaluate.py", "--checkpoint", demo_checkpoint, "--save-dir", out, "--json",
                                      tmp_path / "r.json", "--show-clusters", "--workers", "0", "--batch-size", "3",
                                      "--scales", "0.75", "1.0", "--flip")
    assert code == 0, stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result["per_class_iou"]) == set(train.SHAPE_CLASSES)
    ious = [v for v in result["per_class_iou"].values() if v is not None]
    assert result["miou"] == pytest.approx(sum(ious) / len(ious)) and 0 <= result["pixel_accuracy"] <= 1
    assert f"mIoU {result['miou']:.4f}" in stdout
    masks = sorted(out.glob("*.png"))
    assert len(masks) == 64 and len(list((out / "overlays").glob("*.png"))) == 64
    assert len(list((out / "clusters").glob("*.png"))) == 64
    with Image.open(masks[0]) as png:
        assert png.mode == "P" and png.size == (64, 64)
        assert set(np.unique(np.array(png))) <= {0, 1, 2, 3}
        assert png.getpalette()[:6] == [0, 0, 0, 128, 0, 0]  # VOC colours: background black, class 1 dark red


def test_evaluate_images_end_to_end(voc_checkpoint, tmp_path):
    for name, size in (("a.jpg", (50, 34)), ("b.png", (23, 41))):
        Image.fromarray(np.random.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / name)
    code, stdout, stderr = run_script("evaluate.py", "--checkpoint", voc_checkpoint, "--image", tmp_path / "a.jpg",
                                      tmp_path / "b.png", "--save-dir", tmp_path / "out", "--device", "cpu")
    assert code == 0, stderr
    assert "a.jpg:" in stdout and "b.png:" in stdout
    for name, size in (("a", (50, 34)), ("b", (23, 41))):
        with Image.open(tmp_path / "out" / f"{name}.png") as png:
            assert png.mode == "P" and png.size == size and np.array(png).max() <= 20
        with Image.open(tmp_path / "out" / "overlays" / f"{name}.png") as picture:
            assert picture.mode == "RGB" and picture.width > 2 * size[0]  # image | prediction (+ legend below)
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_evaluate_bad_inputs(demo_checkpoint, voc_checkpoint, tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(demo_checkpoint.read_bytes()[:5000])
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

    assert_user_error(run_script("evaluate.py", "--checkpoint", tmp_path / "missing.pt"), "missing.pt", "not found")
    assert_user_error(run_script("evaluate.py", "--checkpoint", truncated), "truncated.pt", "cannot be read")
    assert_user_error(run_script("evaluate.py", "--checkpoint", not_a_checkpoint), "not a train.py checkpoint")
    assert_user_error(run_script("evaluate.py", "--checkpoint", other_model), "other.pt", "another model")
    assert_user_error(run_script("evaluate.py", "--checkpoint", voc_checkpoint), "--data-root")
    assert_user_error(run_script("evaluate.py", "--checkpoint", voc_checkpoint, "--data-root", tmp_path / "nowhere"),
                      "nowhere", "does not exist")
    assert_user_error(run_script("evaluate.py", "--checkpoint", voc_checkpoint, "--data-root", not_voc), "not_voc")
    assert_user_error(run_script("evaluate.py", "--checkpoint", voc_checkpoint, "--image", broken_image),
                      "broken.jpg")
    assert_user_error(run_script("evaluate.py", "--checkpoint", voc_checkpoint, "--show-clusters", "--image",
                                 broken_image), "--save-dir")
