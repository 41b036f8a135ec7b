"""ClusterDANet: DANet's dual attention with a clustering layer in front, in one file.

DANet (Fu et al., "Dual Attention Network for Scene Segmentation", CVPR 2019) puts two attention
modules on top of a dilated ResNet: position attention, where every pixel is a weighted sum of all
pixels (Eq. 2), and channel attention, where every channel map is a weighted sum of all channel maps
(Eq. 4). ClusterDANet inserts a clustering layer before each of them: online soft k-means over the
pixel features, as in ConstellationNet (Xu et al., "Attentional Constellation Nets for Few-Shot
Learning", ICLR 2021), which replaces each pixel's feature by its cosine similarity to K centres.

    images [B, 3, H, W]
      |
    dilated ResNet (output stride 8)                       -> f [B, C_in, H/8, W/8]   (C_in = 2048 or 512)
      |
      +-- conv3x3+BN+ReLU -> ClusteringLayer -> PositionAttention -> conv3x3+BN+ReLU -> p [B, C, h, w]
      |                       [B, K, h, w]      [B, K, h, w]                       (C = C_in / 4)
      +-- conv3x3+BN+ReLU -> ClusteringLayer -> ChannelAttention  -> conv3x3+BN+ReLU -> c [B, C, h, w]
      |
    classifier(p + c) -> "out";  classifier(p) -> "position";  classifier(c) -> "channel"
    (each classifier is Dropout2d(0.1) + conv1x1 -> num_classes, upsampled to [B, num_classes, H, W];
     the two auxiliary outputs are returned in training mode only)

`clustering=False` leaves the clustering layers out: that is plain DANet, the baseline to compare with
(the attention modules then see the C branch channels instead of K similarities). `multi_grid=True` dilates
layer4's three blocks 4, 8 and 16 instead of 2, 4, 4, as the original repository's DANet101 checkpoint.

Two departures from the original code, both keeping what it computes: position attention runs through
`F.scaled_dot_product_attention`, so the HW x HW attention matrix is never stored (the dense formula is
kept as `dense=True` for reading and comparison), and the clustering update never divides by the
cluster mass, which the original does and which turns centres into NaN when a cluster gets no mass.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class ClusteringLayer(nn.Module):
    """Online soft k-means: each pixel's feature becomes its cosine similarity to K centres.

    Input [B, C, H, W], output [B, K, H, W] with s_ik = u_i . c_k / ||c_k||, where u_i = x_i / ||x_i||.
    The centres are buffers, not parameters: gradients flow through s into x, never into the centres.
    In training mode each call then moves the centres towards the pixels assigned to them:

        m_ik   = softmax_k(T * s_ik)                   soft assignment, temperature T
        mass_k = sum_i m_ik,   sum_k = sum_i m_ik u_i
        counts += mass,        alpha = mass / counts
        centers = (1 - alpha) * centers + alpha * sum_k / mass_k

    and since alpha * sum_k / mass_k = sum_k / counts_k, we apply the last line in that form: it is the
    same update without dividing by a mass that can underflow to 0 (a centre with no mass stays put).
    Under torch.distributed, mass and sum are all-reduced first, so every rank holds the same centres,
    equal to those of one process that saw the global batch.
    """

    def __init__(self, channels, num_clusters, temperature=100.0, seed=0):
        super().__init__()
        self.temperature = temperature
        generator = torch.Generator().manual_seed(seed)  # every build starts from the same centres
        centers = torch.randn(num_clusters, channels, generator=generator)  # [K, C]
        self.register_buffer("centers", F.normalize(centers, dim=1))
        self.register_buffer("counts", torch.ones(num_clusters, dtype=torch.float64))

    def forward(self, x):
        u = F.normalize(x, dim=1)  # [B, C, H, W], unit length per pixel (0 stays 0)
        centers = F.normalize(self.centers, dim=1).to(u.dtype)  # [K, C]
        s = torch.einsum("bchw,kc->bkhw", u, centers)  # [B, C, H, W] -> [B, K, H, W]
        if self.training:
            self.update(u.detach(), s.detach())
        return s

    @torch.no_grad()
    def update(self, u, s):
        """One k-means step from unit features u [B, C, H, W] and their similarities s [B, K, H, W]."""
        with torch.autocast(u.device.type, enabled=False):  # the statistics are summed in fp32
            u, s = u.float(), s.float()
            m = torch.softmax(self.temperature * s, dim=1)  # [B, K, H, W]
            mass = m.sum(dim=(0, 2, 3))  # [K]
            sums = torch.einsum("bkhw,bchw->kc", m, u)  # [K, C]
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                stats = torch.cat([mass[:, None], sums], dim=1)  # [K, 1 + C], one all-reduce for both
                dist.all_reduce(stats)
                mass, sums = stats[:, 0], stats[:, 1:]  # [K], [K, C]
            self.counts += mass.double()
            alpha = mass.double() / self.counts  # [K], in [0, 1)
            step = sums.double() / self.counts[:, None]  # [K, C], = alpha * mean without the division
            self.centers.copy_((1 - alpha[:, None]) * self.centers + step)

    def extra_repr(self):
        return f"channels={self.centers.shape[1]}, num_clusters={self.centers.shape[0]}, temperature={self.temperature}"


class PositionAttention(nn.Module):
    """DANet's position attention module (PAM, Eq. 2): each pixel attends to every pixel.

    Input and output [B, C, H, W]. With N = H * W, q = Wq x and k = Wk x in C/8 dims, v = Wv x in C:
        energy_ij = q_i . k_j   (no 1/sqrt(d) scaling),   A = softmax_j(energy),
        out_i = gamma * sum_j A_ij v_j + x_i,   gamma a learnable scalar initialised to 0.
    By default this runs through F.scaled_dot_product_attention, whose fused kernels never store the
    N x N matrix A (memory linear in N). Those kernels need q, k and v with the same head size, so the C
    value channels are split into 8 heads of C/8 that all share the one q and k: the same sum, 8 heads.
    `dense=True` computes the formula literally, storing A, as the reference to read and compare.
    """

    def __init__(self, channels, dense=False):
        super().__init__()
        if channels % 8:
            raise ValueError(f"PositionAttention needs channels divisible by 8, got {channels}")
        self.query = nn.Conv2d(channels, channels // 8, kernel_size=1)
        self.key = nn.Conv2d(channels, channels // 8, kernel_size=1)
        self.value = nn.Conv2d(channels, channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.dense = dense

    def forward(self, x):
        B, C, H, W = x.shape
        N, d = H * W, C // 8
        q = self.query(x).flatten(2).transpose(1, 2)  # [B, d, H, W] -> [B, N, d]
        k = self.key(x).flatten(2).transpose(1, 2)  # [B, d, H, W] -> [B, N, d]
        v = self.value(x).flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, N, C]
        if self.dense:
            energy = torch.bmm(q, k.transpose(1, 2))  # [B, N, d] x [B, d, N] -> [B, N, N]
            attention = torch.softmax(energy, dim=-1)  # [B, N, N], rows sum to 1
            out = torch.bmm(attention, v)  # [B, N, N] x [B, N, C] -> [B, N, C]
        else:
            q = q.contiguous().unsqueeze(1).expand(B, 8, N, d)  # [B, 8, N, d], one q shared by 8 heads (no copy)
            k = k.contiguous().unsqueeze(1).expand(B, 8, N, d)  # [B, 8, N, d]
            v = v.contiguous().view(B, N, 8, d).transpose(1, 2)  # [B, N, C] -> [B, 8, N, d]
            out = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # [B, 8, N, d]
            out = out.transpose(1, 2).reshape(B, N, C)  # [B, 8, N, d] -> [B, N, C]
        out = out.transpose(1, 2).reshape(B, C, H, W)  # [B, N, C] -> [B, C, H, W]
        return self.gamma * out + x


class ChannelAttention(nn.Module):
    """DANet's channel attention module (CAM, Eq. 4): each channel map attends to every channel map.

    Input and output [B, C, H, W]. With X the input as [B, C, N]:
        E = X X^T,   A = softmax(rowmax(E) - E),   out = gamma * (A X) + x,   gamma initialised to 0.
    There are no projections, so the module has one parameter. E is computed in fp32 even under
    autocast: its entries are sums over all N pixels and lose too much precision in 16 bits.
    """

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        B, C, H, W = x.shape
        with torch.autocast(x.device.type, enabled=False):
            X = x.float().reshape(B, C, H * W)  # [B, C, H, W] -> [B, C, N]
            energy = torch.bmm(X, X.transpose(1, 2))  # [B, C, N] x [B, N, C] -> [B, C, C]
            # The original code's max(E) - E: softmax is shift-invariant, so this equals softmax(-E),
            # i.e. a channel attends most to the channels it is least similar to.
            attention = torch.softmax(energy.amax(dim=-1, keepdim=True) - energy, dim=-1)  # [B, C, C]
            out = torch.bmm(attention, X).reshape(B, C, H, W)  # [B, C, C] x [B, C, N] -> [B, C, H, W]
        return self.gamma * out.to(x.dtype) + x


def conv_bn_relu(in_channels, out_channels):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def classifier(in_channels, num_classes):
    return nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(in_channels, num_classes, kernel_size=1))


class DilatedResNet(nn.Module):
    """A torchvision ResNet without pooling and fc, with layer3/4 dilated: output stride 8.

    Input [B, 3, H, W], output [B, C_in, ceil(H/8), ceil(W/8)], C_in = 512 (resnet18/34) or 2048.
    layer4's blocks are dilated 2, 4, 4; with multi_grid (Bottleneck ResNets only) 4, 8, 16, the
    "multi-grid" of DeepLabv3 that the original DANet code offers (--multi-grid --multi-dilation 4 8 16).
    """

    def __init__(self, name="resnet101", pretrained=False, multi_grid=False):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
        bottleneck = name not in ("resnet18", "resnet34")
        if multi_grid and not bottleneck:
            raise ValueError(f"multi-grid needs a Bottleneck ResNet (resnet50, resnet101, resnet152), not {name}")
        weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
        # torchvision dilates Bottleneck ResNets itself; its BasicBlock refuses, so 18/34 are done below.
        kwargs = {"replace_stride_with_dilation": [False, True, True]} if bottleneck else {}
        try:
            resnet = torchvision.models.get_model(name, weights=weights, **kwargs)
        except OSError as e:  # urllib's URLError and socket errors are OSErrors
            raise RuntimeError(
                f"could not download the ImageNet weights of {name} ({e}). Connect to the internet once "
                f"(they are cached under {torch.hub.get_dir()}/checkpoints), or copy {weights.url.rsplit('/', 1)[-1]} "
                f"there by hand, or train without them (pretrained_backbone=False, train.py --no-pretrained)."
            ) from None
        if not bottleneck:
            for layer, dilation in ((resnet.layer3, 2), (resnet.layer4, 4)):
                for module in layer.modules():
                    if isinstance(module, nn.Conv2d):
                        module.stride = (1, 1)  # the first block's conv1 and its downsample conv
                        if module.kernel_size == (3, 3):
                            module.dilation, module.padding = (dilation, dilation), (dilation, dilation)
        if multi_grid:
            for block, dilation in zip(resnet.layer4, (4, 8, 16)):  # each Bottleneck's 3x3 conv
                block.conv2.dilation, block.conv2.padding = (dilation, dilation), (dilation, dilation)
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        self.out_channels = resnet.fc.in_features

    def forward(self, x):
        x = self.stem(x)  # [B, 64, H/4, W/4]
        x = self.layer2(self.layer1(x))  # [B, C_in/4, H/8, W/8]
        return self.layer4(self.layer3(x))  # [B, C_in, H/8, W/8]


class ClusterDANet(nn.Module):
    """The full network: dilated ResNet, then clustering + position / channel attention branches.

    forward(images [B, 3, H, W]) returns a dict of logits at [B, num_classes, H, W], any H and W:
    "out" always, and the auxiliary "position" and "channel" outputs in training mode.
    num_clusters (K) defaults to the branch width C = C_in / 4 (512 for ResNet-50/101, 128 for 18/34).
    clustering=False builds plain DANet (no clustering layer: the attention runs on the C branch channels);
    multi_grid=True dilates layer4 4, 8, 16 (Bottleneck backbones). align_corners is how the logits are
    upsampled: the original DANet code uses True, so its checkpoints are evaluated with True.
    """

    def __init__(self, num_classes=21, backbone="resnet101", pretrained_backbone=False, num_clusters=None,
                 temperature=100.0, dense_attention=False, clustering=True, multi_grid=False, align_corners=False):
        super().__init__()
        self.backbone = DilatedResNet(backbone, pretrained_backbone, multi_grid)
        in_channels = self.backbone.out_channels
        channels = in_channels // 4
        width = (num_clusters or channels) if clustering else channels  # what the attention modules see

        def clustering_layer():  # plain DANet: nothing between the first conv and the attention
            return ClusteringLayer(channels, width, temperature) if clustering else nn.Identity()

        self.position_branch = nn.Sequential(
            conv_bn_relu(in_channels, channels),
            clustering_layer(),
            PositionAttention(width, dense=dense_attention),
            conv_bn_relu(width, channels),
        )
        self.channel_branch = nn.Sequential(
            conv_bn_relu(in_channels, channels),
            clustering_layer(),
            ChannelAttention(),
            conv_bn_relu(width, channels),
        )
        self.position_classifier = classifier(channels, num_classes)
        self.channel_classifier = classifier(channels, num_classes)
        self.classifier = classifier(channels, num_classes)
        self.align_corners = align_corners

    @property
    def dense_attention(self):
        return self.position_branch[2].dense

    @dense_attention.setter
    def dense_attention(self, dense):
        self.position_branch[2].dense = dense

    def head_parameters(self):
        """Everything but the backbone (trained with a 10x learning rate)."""
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]

    def forward(self, images):
        size = images.shape[-2:]
        features = self.backbone(images)  # [B, 3, H, W] -> [B, C_in, h, w]
        position = self.position_branch(features)  # [B, C, h, w]
        channel = self.channel_branch(features)  # [B, C, h, w]

        def logits(classifier, x):  # [B, C, h, w] -> [B, num_classes, H, W]
            return F.interpolate(classifier(x), size=size, mode="bilinear", align_corners=self.align_corners)

        outputs = {"out": logits(self.classifier, position + channel)}
        if self.training:
            outputs["position"] = logits(self.position_classifier, position)
            outputs["channel"] = logits(self.channel_classifier, channel)
        return outputs
