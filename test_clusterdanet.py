"""Tests for ClusterDANet: CPU, random weights, tiny inputs, no downloads.

Run: python -m pytest -q
"""

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
