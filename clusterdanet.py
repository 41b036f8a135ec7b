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
      |     (each branch: conv_in          -> clustering      -> attention         -> conv_out)
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

Two departures from the original code, both keeping what it computes: position attention never stores
the HW x HW attention matrix (by default it runs block by block of query rows on the CPU and through
`F.scaled_dot_product_attention` on CUDA; the dense formula is kept as `attention="dense"` for reading and
comparison, see PositionAttention), and the clustering update never divides by the cluster mass, which the
original does and which turns centres into NaN when a cluster gets no mass.
One addition, off by default as in the original: ClusteringLayer can draw its centres from the data and
re-seed centres that stay dead (see its docstring). ClusteringLayer, PositionAttention and
ChannelAttention each work copied alone into a file that imports torch, torch.nn as nn and
torch.nn.functional as F.

DRANet (Fu et al., "Scene Segmentation With Dual Relation-Aware Attention Network", TNNLS 2020), the same
authors' successor, is here too, with the same options: its compact position attention (CPAM) attends to
50 pooled centres instead of every pixel, its compact channel attention (CCAM) to C/16 compact channels,
and a cross-level gating decoder (CLGD) joins layer1's features at stride 4 (see DRANet; each of the
three modules also works copied alone). clustering=True puts the clustering layer before CPAM and CCAM:
ClusterDRANet. CPAM's 50 centres and the clustering layer's K centres differ in kind: CPAM's are places,
averages of the feature map over fixed bins of each image (1x1, 2x2, 3x3, 6x6), recomputed per image and
trained by the gradient through learned projections; the clustering layer's are kinds of features, unit
vectors shared by all images, moved only by online k-means, and each pixel is described by its
similarity to them wherever it is. In ClusterDRANet CPAM pools the K similarity maps.

from_original("DANet101.pth.tar") (or "dran101.pth.tar") returns the original code's published checkpoint as
plain DANet (DRANet), its tensors renamed (ORIGINAL_NAMES), in eval mode.
"""

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
OUTPUT_STRIDE = 8  # the backbone's features are 8x smaller than the image


class ClusteringLayer(nn.Module):
    """Online soft k-means: each pixel's feature becomes its cosine similarity to K centres.

    Input [B, C, H, W], output [B, K, H, W] in the input's dtype, with s_ik = u_i . c_k / ||c_k||, where
    u_i = x_i / ||x_i||. The centres are buffers, not parameters: gradients flow through s into x, never
    into the centres. In training mode each call then moves the centres towards the pixels assigned to them:

        m_ik   = softmax_k(T * s_ik)                   soft assignment, temperature T
        mass_k = sum_i m_ik,   sum_k = sum_i m_ik u_i
        counts += mass,        alpha = mass / counts
        centers = (1 - alpha) * centers + alpha * sum_k / mass_k

    and since alpha * sum_k / mass_k = sum_k / counts_k, we apply the last line in that form: it is the
    same update without dividing by a mass that can underflow to 0 (a centre with no mass stays put).
    `counts` is 1 plus all the mass a centre ever received, so the step size decays like 1/t (MacQueen's
    online k-means): after t calls with similar mass a centre moves 1/t of the way to its pixels, and it
    settles early. The update works in fp32: in an fp32 forward it reuses the forward's unit features and
    similarities (computed once, as ConstellationNet does); under autocast it recomputes them in fp32 from x,
    as 16-bit similarities would move some pixels to another nearest centre; it sums the statistics in fp32. Under
    torch.distributed, mass and sum are all-reduced first, so every rank holds the same centres, equal to
    those of one process that saw the global batch.

    Dead centres. With random unit centres, non-negative (post-ReLU) features and T = 100, the few centres
    nearest to the features take almost all the mass and most others never get any: they stay where they
    started and their similarities are noise. Two options address it (the original code has neither):
    - cluster_init="data": on the first training call the centres are drawn from that batch's unit features,
      k-means++ style (each next one with probability proportional to its squared distance to the nearest
      centre drawn so far). Rank 0 draws and broadcasts, so every rank holds the same centres.
      cluster_init="random" keeps the original random unit centres (drawn from `seed`).
    - cluster_reseed=R > 0: a centre that is dead in each of R consecutive training calls is drawn again
      the same way from the current batch (relative to the live centres), with its count back to 1.
    A centre is live in a stretch of calls when it receives at least LIVE_SHARE / K of their mass: a
    tenth of an equal share. usage() reports the live centres and the perplexity exp(-sum_k p_k log p_k)
    of the mass shares p_k (the effective number of centres in use: K for equal use, 1 when one centre
    takes all) over the training calls since it was last called.

    `counts` and `mass` stay float64 through .half() / .to(torch.bfloat16) (see _apply); `centers`
    follows the module's dtype.
    """

    LIVE_SHARE = 0.1  # a centre is live when it receives at least a tenth of an equal share (1 / K) of the mass

    def __init__(self, channels, num_clusters, temperature=100.0, seed=0, cluster_init="random", cluster_reseed=0):
        super().__init__()
        if cluster_init not in ("random", "data"):
            raise ValueError(f"ClusteringLayer cluster_init must be 'random' or 'data', got {cluster_init!r}")
        self.temperature, self.cluster_init, self.cluster_reseed = temperature, cluster_init, cluster_reseed
        generator = torch.Generator().manual_seed(seed)  # every build starts from the same centres
        centers = torch.randn(num_clusters, channels, generator=generator)  # [K, C]
        self.register_buffer("centers", F.normalize(centers, dim=1))
        self.register_buffer("counts", torch.ones(num_clusters, dtype=torch.float64))  # 1 + all mass received
        self.register_buffer("mass", torch.zeros(num_clusters, dtype=torch.float64))  # since the last usage()
        self.register_buffer("idle", torch.zeros(num_clusters, dtype=torch.int64))  # consecutive dead calls
        self.register_buffer("initialised", torch.tensor(cluster_init == "random"))  # False until drawn from data
        self.calls = 0  # training calls made by this process since it was built

    def forward(self, x):
        if self.training and (self.cluster_init == "data" or self.cluster_reseed):
            self.seed_centers(x.detach())
        u = F.normalize(x.float(), dim=1)  # [B, C, H, W], unit length per pixel (0 stays 0; in fp16 it would be NaN)
        centers = F.normalize(self.centers.float(), dim=1)  # [K, C]
        s = torch.einsum("bchw,kc->bkhw", u, centers)  # [B, C, H, W] -> [B, K, H, W], under autocast in 16 bits
        if self.training:
            if s.dtype == torch.float32:  # no autocast: these are the update's fp32 similarities, computed once
                self.update(x.detach(), u.detach(), s.detach())
            else:
                self.update(x.detach())
        return s.to(x.dtype)

    @torch.no_grad()
    def update(self, x, u=None, s=None):
        """One k-means step from the features x [B, C, H, W], in fp32 whatever the autocast state. u and s, the unit
        features and their similarities, are recomputed in fp32 unless the caller already has them in fp32."""
        with torch.autocast(x.device.type, enabled=False):
            if s is None:
                u = F.normalize(x.float(), dim=1)  # [B, C, H, W]
                s = torch.einsum("bchw,kc->bkhw", u, F.normalize(self.centers.float(), dim=1))  # [B, K, H, W]
            m = torch.softmax(self.temperature * s, dim=1)  # [B, K, H, W]
            mass = m.sum(dim=(0, 2, 3))  # [K]
            sums = torch.einsum("bkhw,bchw->kc", m, u)  # [K, C]
            if self.distributed():
                stats = torch.cat([mass[:, None], sums], dim=1)  # [K, 1 + C], one all-reduce for both
                torch.distributed.all_reduce(stats)
                mass, sums = stats[:, 0], stats[:, 1:]  # [K], [K, C]
            mass, sums = mass.double(), sums.double()
            self.counts += mass
            alpha = mass / self.counts  # [K], in [0, 1)
            step = sums / self.counts[:, None]  # [K, C], = alpha * mean without the division
            self.centers.copy_((1 - alpha[:, None]) * self.centers + step)
            self.mass += mass
            dead = mass < self.LIVE_SHARE * mass.sum() / len(mass)  # [K]
            self.idle.add_(1).mul_(dead)  # consecutive calls without a live share; 0 after a live one

    @torch.compiler.disable  # data-dependent Python control flow; the work happens rarely
    @torch.no_grad()
    def seed_centers(self, x):
        """Draw the centres from x on the first training call (cluster_init="data"), and every cluster_reseed calls
        draw again those that were dead in each of the last cluster_reseed calls."""
        calls, self.calls = self.calls, self.calls + 1
        if calls == 0 and not self.initialised:  # not after loading a checkpoint that was already initialised
            drawn = self.kmeans_plus_plus(self.unit_rows(x), self.centers[:0], len(self.centers))
            if drawn is not None:
                self.centers.copy_(drawn)
            self.initialised.fill_(True)
            self.broadcast_centers()
        elif self.cluster_reseed and calls and calls % self.cluster_reseed == 0:
            dead = self.idle >= self.cluster_reseed  # [K], the same on every rank (mass is all-reduced)
            if dead.any():
                drawn = self.kmeans_plus_plus(self.unit_rows(x), self.centers[~dead], int(dead.sum()))
                if drawn is not None:
                    self.centers[dead] = drawn.to(self.centers.dtype)
                    self.counts[dead], self.idle[dead] = 1, 0
                self.broadcast_centers()

    @staticmethod
    def unit_rows(x):
        return F.normalize(x.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # [B, C, H, W] -> [BHW, C]

    @staticmethod
    def kmeans_plus_plus(u, centers, n):
        """n rows of u [N, C] (unit or zero rows), k-means++ style: each with probability proportional to its
        squared distance to the nearest of `centers` [M, C] and of the rows drawn before it (uniform when
        M = 0). Zero rows are never drawn. Returns [n, C], or None when u has no nonzero row."""
        u = u[u.norm(dim=1) > 0]  # [N', C]
        if len(u) == 0:
            return None
        nearest = torch.full((len(u),), 4.0, device=u.device)  # [N'], squared distance to the nearest centre
        if len(centers):
            nearest = 2 - 2 * (u @ F.normalize(centers.float(), dim=1).T).amax(dim=1)  # [N', M] -> [N']
        drawn = []
        for _ in range(n):
            i = torch.multinomial(nearest.clamp(min=1e-12), 1)  # [1]; the floor keeps a valid distribution
            drawn.append(u[i])  # [1, C]
            nearest = torch.minimum(nearest, 2 - 2 * (u @ u[i].T)[:, 0])  # ||u - v||^2 = 2 - 2 u.v for unit u, v
        return torch.cat(drawn)  # [n, C]

    def broadcast_centers(self):
        """Rank 0's centres to every rank: each rank drew its own from its own part of the batch."""
        if self.distributed():
            torch.distributed.broadcast(self.centers, src=0)

    @staticmethod
    def distributed():
        return torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1

    def usage(self, reset=True):
        """{"live": live centres, "clusters": K, "perplexity": exp(entropy of the mass shares)} over the training
        calls since the last reset (NaN before any), then reset."""
        share = self.mass / self.mass.sum()  # [K], NaN before any call
        live = (share >= self.LIVE_SHARE / len(share)).sum().item() if share.isfinite().all() else float("nan")
        perplexity = torch.exp(-torch.special.xlogy(share, share).sum()).item()
        if reset:
            self.mass.zero_()
        return {"live": live, "clusters": len(share), "perplexity": perplexity}

    def _apply(self, fn, recurse=True):
        """Module.to / .cuda / .half ...: `counts` and `mass` follow the device but stay float64. They sum the mass
        of the whole training, which fp16 cannot hold (it overflows at 65504) and to which bf16 stops adding
        (from 256 on, adding 1 changes nothing)."""
        kept = {"counts": self.counts, "mass": self.mass}
        super()._apply(fn, recurse)
        for name, value in kept.items():
            if getattr(self, name).dtype != torch.float64:
                setattr(self, name, value.to(getattr(self, name).device))
        return self

    def extra_repr(self):
        return (f"channels={self.centers.shape[1]}, num_clusters={self.centers.shape[0]}, "
                f"temperature={self.temperature}, cluster_init={self.cluster_init!r}, "
                f"cluster_reseed={self.cluster_reseed}")


class PositionAttention(nn.Module):
    """DANet's position attention module (PAM, Eq. 2): each pixel attends to every pixel.

    Input and output [B, C, H, W] (the output in the input's dtype). With N = H * W, q = Wq x and k = Wk x
    in d = C / REDUCTION dims, v = Wv x in C:
        energy_ij = q_i . k_j   (no 1/sqrt(d) scaling),   A = softmax_j(energy),
        out_i = gamma * sum_j A_ij v_j + x_i,   gamma a learnable scalar initialised to 0.
    `attention` chooses how A v is computed; the four give the same numbers to float rounding:
    - "blocked": q . k once, block_size query rows at a time, the rows of A recomputed in the backward pass
      instead of stored (Blocked): the dense formula's multiply-adds plus one more q . k, memory linear in N.
    - "heads": F.scaled_dot_product_attention, whose fused kernels never store A either. They need q, k and v
      with one head size, so the C value channels are split into C / d = REDUCTION heads of d channels that all
      share the one q and k: the same sum, but q . k is computed once per head, 8 times.
    - "dense": the formula literally, storing the N x N matrix A: the reference to read and compare.
    - "auto" (the default): the one measured fastest on the input's device, FASTEST. train.py
      --benchmark-attention times them all; on CUDA "heads" stays the choice until .ci/gpu, which runs that
      benchmark on a GPU, has been run and its table picks another.
    """

    REDUCTION = 8  # q and k have C / 8 channels, as in the paper
    ATTENTIONS = ("auto", "blocked", "heads", "dense")
    FASTEST = {"cpu": "blocked", "cuda": "heads"}  # what "auto" runs (cuda: not yet measured); elsewhere "blocked"

    def __init__(self, channels, attention="auto", block_size=1024):
        super().__init__()
        if channels % self.REDUCTION:
            raise ValueError(f"PositionAttention needs channels divisible by {self.REDUCTION}, got {channels}")
        if attention not in self.ATTENTIONS:
            raise ValueError(f"PositionAttention attention must be one of {', '.join(self.ATTENTIONS)}, "
                             f"got {attention!r}")
        if block_size < 1:
            raise ValueError(f"PositionAttention block_size must be at least 1, got {block_size}")
        self.query = nn.Conv2d(channels, channels // self.REDUCTION, kernel_size=1)
        self.key = nn.Conv2d(channels, channels // self.REDUCTION, kernel_size=1)
        self.value = nn.Conv2d(channels, channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.attention, self.block_size = attention, block_size

    @classmethod
    def resolve(cls, attention, device_type):
        """The computation `attention` stands for on a device type ("cpu", "cuda"): "blocked", "heads" or "dense"."""
        return cls.FASTEST.get(device_type, "blocked") if attention == "auto" else attention

    def forward(self, x):
        B, C, H, W = x.shape
        N, d = H * W, C // self.REDUCTION
        q = self.query(x).flatten(2).transpose(1, 2)  # [B, d, H, W] -> [B, N, d]
        k = self.key(x).flatten(2).transpose(1, 2)  # [B, d, H, W] -> [B, N, d]
        v = self.value(x).flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, N, C]
        path = self.resolve(self.attention, x.device.type)
        if path == "blocked":
            out = self.Blocked.apply(q, k, v, self.block_size)  # [B, N, C]
        elif path == "heads":
            heads = C // d  # value heads of q's size d (= REDUCTION = 8): the fused kernels need one head size
            q = q.contiguous().unsqueeze(1).expand(B, heads, N, d)  # [B, 8, N, d], one q shared by 8 heads (no copy)
            k = k.contiguous().unsqueeze(1).expand(B, heads, N, d)  # [B, 8, N, d]
            v = v.contiguous().view(B, N, heads, d).transpose(1, 2)  # [B, N, C] -> [B, 8, N, d]
            out = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # [B, 8, N, d]
            out = out.transpose(1, 2).reshape(B, N, C)  # [B, 8, N, d] -> [B, N, C]
        elif path == "dense":
            energy = torch.bmm(q, k.transpose(1, 2))  # [B, N, d] x [B, d, N] -> [B, N, N]
            attention = torch.softmax(energy, dim=-1)  # [B, N, N], rows sum to 1
            out = torch.bmm(attention, v)  # [B, N, N] x [B, N, C] -> [B, N, C]
        else:
            raise ValueError(f"PositionAttention attention must be one of {', '.join(self.ATTENTIONS)}, "
                             f"got {self.attention!r}")
        out = out.transpose(1, 2).reshape(B, C, H, W)  # [B, N, C] -> [B, C, H, W]
        return (self.gamma * out + x).to(x.dtype)  # the fp32 gamma would promote a bf16 result to fp32

    def attention_rows(self, x, rows):
        """The rows A_i of the query pixels i in `rows` (flat indices y * W + x): [B, len(rows), N], each summing
        to 1."""
        q = self.query(x).flatten(2).transpose(1, 2)[:, rows]  # [B, d, H, W] -> [B, N, d] -> [B, R, d]
        k = self.key(x).flatten(2)  # [B, d, H, W] -> [B, d, N]
        return torch.softmax(torch.bmm(q, k).float(), dim=-1)  # [B, R, N]

    class Blocked(torch.autograd.Function):
        """softmax(q k^T) v for q, k [B, N, d] and v [B, N, C], block by block of query rows, in memory linear in N.

        Forward, for each block b of rows (at most block_size queries):
            S = q_b k^T [B, rows, N],   m = rowmax(S),   l = rowsum(exp(S - m)),
            out_b = exp(S - m) v / l,   lse_b = m + log(l)   (the log-sum-exp of each row, kept)
        Backward, with dO the gradient of out and D = rowsum(dO * out) [B, N, 1]; A_b = exp(q_b k^T - lse_b) are
        the block's attention rows, recomputed:
            dV += A_b^T dO_b,   dS = A_b * (dO_b v^T - D_b),   dq_b = dS k,   dK += dS^T q_b
        (dS is the softmax's backward: dA = dO v^T, and dS_ij = A_ij (dA_ij - sum_l A_il dA_il), where
        sum_l A_il dA_il = dO_i . out_i = D_i.) Only q, k, v, out and lse are kept for the backward pass, and one
        block's S and dS are the largest temporaries, so block_size bounds the memory: a block's rows are the
        same numbers whatever the block size (to float rounding).

        Precision: q . k, the softmax statistics (m, l, lse, D), dS, dq and dk, and the dV sum are computed in
        fp32 (or fp64 for fp64 inputs) whatever the autocast state: the energies are unscaled sums of d products
        and would lose too much in 16 bits. The products with v and dO (A v, A^T dO, dO v^T) run in v's dtype
        (bf16 under autocast, as in the fused kernels), with A cast to it; out has v's dtype.
        """

        @staticmethod
        def forward(ctx, q, k, v, block_size):
            B, N, _ = q.shape
            dtype, dtypes = torch.promote_types(q.dtype, torch.float32), (q.dtype, k.dtype)
            product_into = PositionAttention.Blocked.product_into
            with torch.autocast(q.device.type, enabled=False):
                q, k = q.to(dtype), k.to(dtype)  # [B, N, d]; the energies in fp32 (fp64 stays)
                out = v.new_empty(v.shape)  # [B, N, C]
                lse = q.new_empty(B, N, 1)  # [B, N, 1]
                buffer = q.new_empty(B, min(block_size, N), N)  # [B, rows, N], one block's energies, reused
                for start in range(0, N, block_size):
                    rows = slice(start, start + block_size)
                    S = product_into(buffer, q[:, rows], k.transpose(1, 2))  # [B, rows, d] x [B, d, N]
                    m = S.amax(dim=-1, keepdim=True)  # [B, rows, 1]
                    E = S.sub_(m).exp_()  # [B, rows, N], exp(S - m) in place: rows of A up to their sum
                    l = E.sum(dim=-1, keepdim=True)  # [B, rows, 1]
                    out[:, rows] = torch.bmm(E.to(v.dtype), v) / l  # [B, rows, N] x [B, N, C] -> [B, rows, C]
                    lse[:, rows] = m + l.log()
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.block_size, ctx.dtypes = block_size, dtypes
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse = ctx.saved_tensors
            B, N, _ = q.shape
            block_size, dtype = ctx.block_size, q.dtype
            product_into = PositionAttention.Blocked.product_into
            with torch.autocast(q.device.type, enabled=False):
                dout = dout.to(v.dtype)  # [B, N, C]
                dq, dk = torch.empty_like(q), torch.zeros_like(k)  # [B, N, d]
                dv = torch.zeros(v.shape, dtype=dtype, device=v.device)  # [B, N, C], summed over blocks in fp32
                A_buffer = q.new_empty(B, min(block_size, N), N)  # [B, rows, N], reused by every block
                dS_buffer = torch.empty_like(A_buffer)  # [B, rows, N]
                for start in range(0, N, block_size):
                    rows = slice(start, start + block_size)
                    A = product_into(A_buffer, q[:, rows], k.transpose(1, 2))  # [B, rows, d] x [B, d, N]
                    A = A.sub_(lse[:, rows]).exp_()  # [B, rows, N], the block's attention rows
                    dO = dout[:, rows]  # [B, rows, C]
                    A_v = A.to(v.dtype)  # [B, rows, N], what multiplies v and dO
                    if dv.dtype == v.dtype:
                        dv.baddbmm_(A_v.transpose(1, 2), dO)  # [B, N, rows] x [B, rows, C] -> [B, N, C]
                    else:
                        dv += torch.bmm(A_v.transpose(1, 2), dO)  # a block's share in bf16, the sum in fp32
                    D = (dO.to(dtype) * out[:, rows].to(dtype)).sum(dim=-1, keepdim=True)  # [B, rows, 1]
                    dS = product_into(dS_buffer, dO, v.transpose(1, 2))  # dA = dO v^T: [B, rows, C] x [B, C, N]
                    dS = dS.sub_(D).mul_(A)  # [B, rows, N], A * (dA - D)
                    dq[:, rows] = torch.bmm(dS, k)  # [B, rows, N] x [B, N, d] -> [B, rows, d]
                    dk.baddbmm_(dS.transpose(1, 2), q[:, rows])  # [B, N, rows] x [B, rows, d] -> [B, N, d]
            return dq.to(ctx.dtypes[0]), dk.to(ctx.dtypes[1]), dv.to(v.dtype), None

        @staticmethod
        def product_into(buffer, a, b):
            """a b ([B, rows, n] x [B, n, N]) written into buffer [B, block_size, N] (a fresh tensor for a last,
            shorter block), in a's dtype and stored in buffer's: [B, rows, N]."""
            if a.shape[1] != buffer.shape[1]:
                buffer = buffer.new_empty(a.shape[0], a.shape[1], b.shape[2])  # [B, rows, N]
            if a.dtype == buffer.dtype:
                return buffer.baddbmm_(a, b, beta=0)  # in place: no new block-sized tensor per block
            return buffer.copy_(torch.bmm(a, b))  # dO v^T in bf16 under autocast, then fp32


class ChannelAttention(nn.Module):
    """DANet's channel attention module (CAM, Eq. 4): each channel map attends to every channel map.

    Input and output [B, C, H, W]. With X the input as [B, C, N]:
        E = X X^T,   A = softmax(rowmax(E) - E),   out = gamma * (A X) + x,   gamma initialised to 0.
    There are no projections, so the module has one parameter. E is computed in fp32 even under
    autocast: its entries are sums over all N pixels and lose too much precision in 16 bits. The output
    has the input's dtype.

    The softmax is saturated: E sums over all N pixels, so the entries of a row lie far apart and
    softmax(rowmax(E) - E) puts nearly all of a row's weight on the one channel least similar to it; the
    original code's is saturated the same way (it computes the same formula). We keep the paper's formula;
    the learnable gamma (starting at 0) sets how much of it is added.
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
        return (self.gamma * out + x).to(x.dtype)  # out and gamma are fp32: back to the input's dtype


class CompactPositionAttention(nn.Module):
    """DRANet's compact position attention (CPAM, Fu et al., TNNLS 2020): each pixel attends to M = 50 pooled
    centres instead of all N = H * W pixels.

    Input and output [B, C, H, W] (the output in the input's dtype), any H and W. The centres y [B, M, C] are
    adaptive average pools of x to 1x1, 2x2, 3x3 and 6x6 bins (1 + 4 + 9 + 36 = 50), each followed by a
    conv1x1 + BN + ReLU. Then, with q = Wq x per pixel and k = Wk y per centre in d = C / 4 dims, v = Wv y in C:
        energy_im = q_i . k_m   (no 1/sqrt(d) scaling),   A = softmax_m(energy)   [B, N, 50],
        out_i = gamma * sum_m A_im v_m + x_i,   gamma a learnable scalar initialised to 0.
    The attention matrix has N x 50 entries instead of PAM's N x N: memory and time linear in N.
    """

    BINS = (1, 2, 3, 6)  # the pooled grids: 50 centres
    REDUCTION = 4  # q and k have C / 4 channels

    def __init__(self, channels):
        super().__init__()
        if channels % self.REDUCTION:
            raise ValueError(f"CompactPositionAttention needs channels divisible by {self.REDUCTION}, got {channels}")
        self.centres = nn.ModuleList(nn.Sequential(  # one conv1x1 + BN + ReLU per pooled grid
            nn.Conv2d(channels, channels, kernel_size=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
        ) for _ in self.BINS)
        self.query = nn.Conv2d(channels, channels // self.REDUCTION, kernel_size=1)
        self.key = nn.Linear(channels, channels // self.REDUCTION)
        self.value = nn.Linear(channels, channels)
        self.gamma = nn.Parameter(torch.zeros(1))

    def pooled_centres(self, x):
        """y [B, 50, C]: the pooled, projected centres of x [B, C, H, W]."""
        y = [conv(F.adaptive_avg_pool2d(x, bins)).flatten(2) for conv, bins in zip(self.centres, self.BINS)]
        return torch.cat(y, dim=2).transpose(1, 2)  # 4 x [B, C, bins^2] -> [B, C, 50] -> [B, 50, C]

    def attention(self, x):
        """(A [B, N, 50], y [B, 50, C]) for x [B, C, H, W]."""
        y = self.pooled_centres(x)  # [B, 50, C]
        q = self.query(x).flatten(2).transpose(1, 2)  # [B, d, H, W] -> [B, N, d]
        k = self.key(y)  # [B, 50, d]
        return torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1), y  # [B, N, d] x [B, d, 50] -> [B, N, 50]

    def forward(self, x):
        B, C, H, W = x.shape
        attention, y = self.attention(x)  # [B, N, 50], [B, 50, C]
        v = self.value(y)  # [B, 50, C]
        out = torch.bmm(attention.to(v.dtype), v)  # [B, N, 50] x [B, 50, C] -> [B, N, C]
        out = out.transpose(1, 2).reshape(B, C, H, W)  # [B, N, C] -> [B, C, H, W]
        return (self.gamma * out + x).to(x.dtype)

    def regions(self, H, W):
        """R [50, N]: the pooling weights of the centres, R_mj = 1 / (pixels in centre m's bin) when pixel j lies in
        that bin, else 0 (adaptive pooling's bins: rows floor(i H / n) to ceil((i + 1) H / n), columns alike)."""
        rows = []
        for n in self.BINS:
            area = torch.zeros(n, n, H, W)
            for i in range(n):
                top, bottom = i * H // n, -(-(i + 1) * H // n)
                for j in range(n):
                    left, right = j * W // n, -(-(j + 1) * W // n)
                    area[i, j, top:bottom, left:right] = 1 / ((bottom - top) * (right - left))
            rows.append(area.reshape(n * n, H * W))  # [n, n, H, W] -> [n^2, N]
        return torch.cat(rows)  # [50, N]

    def attention_rows(self, x, rows):
        """How much each query pixel i in `rows` (flat indices) draws from each pixel j through the centres:
        sum_m A_im R_mj, [B, len(rows), N]; each row sums to 1, as the rows of PositionAttention.attention_rows."""
        attention, _ = self.attention(x)  # [B, N, 50]
        return attention[:, rows].float() @ self.regions(*x.shape[-2:]).to(x.device)  # [B, R, 50] x [50, N]


class CompactChannelAttention(nn.Module):
    """DRANet's compact channel attention (CCAM): each channel map attends to C / 16 compact channel maps.

    Input and output [B, C, H, W] (the output in the input's dtype). With X the input as [B, C, N] and
    F = ReLU(BN(Wf x)) [B, C/16, N] (a conv1x1):
        E = X F^T [B, C, C/16],   A = softmax(rowmax(E) - E),   out = gamma * (A F) + x,   gamma initialised to 0.
    As in ChannelAttention, E is computed in fp32 even under autocast (sums over all N pixels).
    """

    REDUCTION = 16

    def __init__(self, channels):
        super().__init__()
        if channels % self.REDUCTION:
            raise ValueError(f"CompactChannelAttention needs channels divisible by {self.REDUCTION}, got {channels}")
        self.reduce = nn.Sequential(nn.Conv2d(channels, channels // self.REDUCTION, kernel_size=1, bias=False),
                                    nn.BatchNorm2d(channels // self.REDUCTION), nn.ReLU(inplace=True))
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        B, C, H, W = x.shape
        f = self.reduce(x)  # [B, C/16, H, W]
        dtype = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        with torch.autocast(x.device.type, enabled=False):
            X = x.to(dtype).reshape(B, C, H * W)  # [B, C, H, W] -> [B, C, N]
            Fc = f.to(dtype).reshape(B, -1, H * W)  # [B, C/16, H, W] -> [B, C/16, N]
            energy = torch.bmm(X, Fc.transpose(1, 2))  # [B, C, N] x [B, N, C/16] -> [B, C, C/16]
            attention = torch.softmax(energy.amax(dim=-1, keepdim=True) - energy, dim=-1)  # [B, C, C/16]
            out = torch.bmm(attention, Fc).reshape(B, C, H, W)  # [B, C, C/16] x [B, C/16, N] -> [B, C, H, W]
        return (self.gamma * out + x).to(x.dtype)


class CrossLevelGatingDecoder(nn.Module):
    """DRANet's cross-level gating decoder (CLGD): high-level features gate and join low-level ones.

    forward(low [B, C_low, H, W], high [B, C, h, w]) -> [B, C, H, W] in high's dtype, with L = 32 channels:
        l = conv3x3+BN+ReLU(low) [B, L, H, W],   u = high upsampled bilinearly to H x W,
        g = sigmoid(conv1x1([l, u])) [B, 1, H, W],   l' = gamma * g * l   (gamma learnable, initialised to 1),
        out = conv3x3+BN+ReLU(conv3x3+BN+ReLU([l', u]))   ([B, L + C, H, W] -> [B, C, H, W] -> [B, C, H, W]).
    The original code upsamples with align_corners=True.
    """

    LOW_WIDTH = 32

    def __init__(self, low_channels, channels, align_corners=True):
        super().__init__()
        L = self.LOW_WIDTH

        def conv_bn_relu(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                                 nn.ReLU(inplace=True))

        self.low = conv_bn_relu(low_channels, L)
        self.gate = nn.Sequential(nn.Conv2d(L + channels, 1, kernel_size=1), nn.Sigmoid())
        self.fuse = conv_bn_relu(L + channels, channels)
        self.out = conv_bn_relu(channels, channels)
        self.gamma = nn.Parameter(torch.ones(1))
        self.align_corners = align_corners

    def forward(self, low, high):
        low = self.low(low)  # [B, L, H, W]
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear",
                             align_corners=self.align_corners)  # [B, C, h, w] -> [B, C, H, W]
        gate = self.gate(torch.cat([low, high.to(low.dtype)], dim=1))  # [B, L + C, H, W] -> [B, 1, H, W]
        low = (self.gamma * gate * low).to(low.dtype)  # [B, L, H, W]; the fp32 gamma would promote bf16
        return self.out(self.fuse(torch.cat([low, high.to(low.dtype)], dim=1))).to(high.dtype)  # [B, C, H, W]


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
    layer3's blocks have dilation 1, 2, 2, ... and layer4's 2, 4, 4, ...: the first block of each keeps the
    previous rate, as torchvision's replace_stride_with_dilation does (Bottleneck ResNets) and as we do by
    hand for the BasicBlock ResNets (18/34), whose blocks have two 3x3 convolutions at the block's rate.
    With multi_grid (Bottleneck ResNets only) layer4's three blocks are dilated 4, 8, 16 instead, the
    "multi-grid" of DeepLabv3 that the original DANet code offers (--multi-grid --multi-dilation 4 8 16).

    deep_stem=True (Bottleneck ResNets, no ImageNet weights here) replaces the 7x7 stem convolution by three 3x3
    ones, 3 -> 64 (stride 2) -> 64 -> 128, with BN + ReLU after the first two, as the original code's default
    ResNet and DRANet's published checkpoint (the "ResNet-C" stem of Bag of Tricks, He et al., CVPR 2019):
    then BN(128) + ReLU + max-pool, and layer1 takes 128 channels.
    """

    def __init__(self, backbone="resnet101", pretrained=False, multi_grid=False, deep_stem=False):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
        bottleneck = backbone not in ("resnet18", "resnet34")
        if multi_grid and not bottleneck:
            raise ValueError(f"multi-grid needs a Bottleneck ResNet (resnet50, resnet101, resnet152), not {backbone}")
        if deep_stem and not bottleneck:
            raise ValueError(f"the deep stem needs a Bottleneck ResNet (resnet50, resnet101, resnet152), "
                             f"not {backbone}")
        if deep_stem and pretrained:
            raise ValueError("there are no ImageNet weights for the deep stem here: train it without them")
        weights = torchvision.models.get_model_weights(backbone).DEFAULT if pretrained else None
        # torchvision dilates Bottleneck ResNets itself; its BasicBlock refuses, so 18/34 are done below.
        kwargs = {"replace_stride_with_dilation": [False, True, True]} if bottleneck else {}
        try:
            resnet = torchvision.models.get_model(backbone, weights=weights, **kwargs)
        except OSError as e:  # urllib's URLError and socket errors are OSErrors
            raise RuntimeError(
                f"could not download the ImageNet weights of {backbone} ({e}). Connect to the internet once "
                f"(they are cached under {torch.hub.get_dir()}/checkpoints), or copy {weights.url.rsplit('/', 1)[-1]} "
                f"there by hand, or train without them (pretrained=False, train.py --no-pretrained)."
            ) from None
        if not bottleneck:  # torchvision's _make_layer(dilate=True): block 0 at the previous rate, the rest at the new
            for layer, previous, dilation in ((resnet.layer3, 1, 2), (resnet.layer4, 2, 4)):
                for index, block in enumerate(layer):
                    rate = previous if index == 0 else dilation
                    for module in block.modules():
                        if isinstance(module, nn.Conv2d):
                            module.stride = (1, 1)  # the first block's conv1 and its downsample conv
                            if module.kernel_size == (3, 3):
                                module.dilation, module.padding = (rate, rate), (rate, rate)
        if multi_grid:
            for block, dilation in zip(resnet.layer4, (4, 8, 16)):  # each Bottleneck's 3x3 conv
                block.conv2.dilation, block.conv2.padding = (dilation, dilation), (dilation, dilation)
        if deep_stem:  # stem.0 becomes a Sequential: its indices 0, 1, 3, 4, 6 are the original's conv1.0 ... conv1.6
            resnet.conv1 = nn.Sequential(
                nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                nn.Conv2d(64, 128, 3, padding=1, bias=False),
            )
            resnet.bn1 = nn.BatchNorm2d(128)
            first = resnet.layer1[0]  # its 1x1 convolution and its shortcut now read 128 channels
            first.conv1 = nn.Conv2d(128, first.conv1.out_channels, kernel_size=1, bias=False)
            first.downsample[0] = nn.Conv2d(128, first.downsample[0].out_channels, kernel_size=1, bias=False)
            for module in (*resnet.conv1.modules(), first.conv1, first.downsample[0]):
                if isinstance(module, nn.Conv2d):  # torchvision's initialisation of ResNet convolutions
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        self.out_channels = resnet.fc.in_features  # layer4's; layer1 has out_channels / 8, layer3 out_channels / 2
        self.deep_stem = deep_stem

    def forward(self, x):
        return self.levels(x)[-1]  # [B, C_in, H/8, W/8]

    def levels(self, x):
        """(layer1, layer3, layer4) features: [B, C_in/8, H/4, W/4], [B, C_in/2, H/8, W/8], [B, C_in, H/8, W/8]."""
        low = self.layer1(self.stem(x))  # [B, 64 or 128, H/4, W/4] -> [B, C_in/8, H/4, W/4]
        mid = self.layer3(self.layer2(low))  # [B, C_in/4, H/8, W/8] -> [B, C_in/2, H/8, W/8]
        return low, mid, self.layer4(mid)


def attention_branch(in_channels, channels, width, attention, clustering):
    """conv_in -> clustering -> attention -> conv_out, named steps: [B, C_in, h, w] -> [B, C, h, w]. `clustering` is
    a ClusteringLayer (width = its K) or None (plain: width = C)."""
    return nn.Sequential(OrderedDict(
        conv_in=conv_bn_relu(in_channels, channels),  # [B, C, h, w]
        clustering=clustering if clustering is not None else nn.Identity(),  # [B, K, h, w]; plain: nothing
        attention=attention,  # [B, width, h, w]
        conv_out=conv_bn_relu(width, channels),  # [B, C, h, w]
    ))


class SegmentationNet(nn.Module):
    """What ClusterDANet and DRANet share: padding to multiples of 8, upsampled logits, the head's parameters and
    the clustering layers' usage."""

    def build_backbone_and_branches(self, *, backbone, pretrained, multi_grid, deep_stem, clustering, num_clusters,
                                    temperature, cluster_init, cluster_reseed, position_attention, channel_attention):
        """self.backbone, self.position_branch and self.channel_branch (each conv_in -> clustering -> attention ->
        conv_out, [B, C_in, h, w] -> [B, C, h, w]); the attention modules are position_attention(width) and
        channel_attention(width), width = K with clustering, else C. Returns (C_in, C)."""
        self.backbone = DilatedResNet(backbone, pretrained=pretrained, multi_grid=multi_grid, deep_stem=deep_stem)
        in_channels = self.backbone.out_channels
        channels = in_channels // 4
        width = (num_clusters or channels) if clustering else channels  # what the attention modules see (K or C)

        def branch(attention):  # [B, C_in, h, w] -> [B, C, h, w]
            return attention_branch(in_channels, channels, width, attention, ClusteringLayer(
                channels, width, temperature, cluster_init=cluster_init, cluster_reseed=cluster_reseed)
                if clustering else None)

        self.position_branch = branch(position_attention(width))
        self.channel_branch = branch(channel_attention(width))
        return in_channels, channels

    def head_parameters(self):
        """Everything but the backbone (trained with a 10x learning rate)."""
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]

    def cluster_usage(self):
        """{"position": {"live", "clusters", "perplexity"}, "channel": {...}} of the clustering layers over the
        training calls since the last call (see ClusteringLayer.usage)."""
        return {name: branch.clustering.usage() for name, branch in (("position", self.position_branch),
                                                                      ("channel", self.channel_branch))
                if isinstance(branch.clustering, ClusteringLayer)}

    @staticmethod
    def pad(images):
        """Zeros (the mean colour of normalised images) at the bottom and right up to multiples of 8, so the 8x8
        cells of the feature grid sit on the image's pixels: [B, 3, H, W] -> [B, 3, H', W']."""
        H, W = images.shape[-2:]
        return F.pad(images, (0, -W % OUTPUT_STRIDE, 0, -H % OUTPUT_STRIDE)) if H % OUTPUT_STRIDE or W % OUTPUT_STRIDE \
            else images

    def logits(self, classifier, x, padded_size, size):
        """classifier(x) upsampled to the padded image and cropped back: [B, C, h, w] -> [B, num_classes, H, W]."""
        x = F.interpolate(classifier(x), size=padded_size, mode="bilinear", align_corners=self.align_corners)
        return x[..., :size[0], :size[1]]


class ClusterDANet(SegmentationNet):
    """The full network: dilated ResNet, then clustering + position / channel attention branches.

    forward(images [B, 3, H, W]) returns a dict of logits at [B, num_classes, H, W], any H and W:
    "out" always, and the auxiliary "position" and "channel" outputs in training mode. Sizes that are not
    multiples of 8 are padded with zeros (the mean colour of normalised images) at the bottom and right,
    so the 8x8 cells of the feature grid sit on the image's pixels, and the logits are cropped back.
    num_clusters (K) defaults to the branch width C = C_in / 4 (512 for ResNet-50/101, 128 for 18/34).
    pretrained=True loads the backbone's ImageNet weights; cluster_init and cluster_reseed are ClusteringLayer's;
    attention is PositionAttention's ("auto", "blocked", "heads" or "dense": how it is computed, the same numbers).
    Each branch is an nn.Sequential of named steps: model.position_branch.clustering,
    model.channel_branch.attention, ... clustering=False builds plain DANet (no clustering layer: the attention
    runs on the C branch channels); multi_grid=True dilates layer4 4, 8, 16 (Bottleneck backbones),
    deep_stem=True gives the backbone the 3x3 deep stem. align_corners is how the logits are upsampled: the
    original DANet code uses True, so its checkpoints are evaluated with True.
    """

    def __init__(self, num_classes=21, backbone="resnet101", pretrained=False, num_clusters=None,
                 temperature=100.0, attention="auto", cluster_init="random", cluster_reseed=0, clustering=True,
                 multi_grid=False, align_corners=False, deep_stem=False):
        super().__init__()
        in_channels, channels = self.build_backbone_and_branches(
            backbone=backbone, pretrained=pretrained, multi_grid=multi_grid, deep_stem=deep_stem,
            clustering=clustering, num_clusters=num_clusters, temperature=temperature,
            cluster_init=cluster_init, cluster_reseed=cluster_reseed,
            position_attention=lambda width: PositionAttention(width, attention=attention),
            channel_attention=lambda width: ChannelAttention())
        self.position_classifier = classifier(channels, num_classes)
        self.channel_classifier = classifier(channels, num_classes)
        self.classifier = classifier(channels, num_classes)
        self.align_corners = align_corners

    @property
    def attention(self):
        """How the position attention is computed (PositionAttention's `attention`); may be changed at any time."""
        return self.position_branch.attention.attention

    @attention.setter
    def attention(self, attention):
        if attention not in PositionAttention.ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(PositionAttention.ATTENTIONS)}, got {attention!r}")
        self.position_branch.attention.attention = attention

    def forward(self, images):
        size = images.shape[-2:]
        images = self.pad(images)  # [B, 3, H', W'], multiples of 8
        features = self.backbone(images)  # [B, 3, H', W'] -> [B, C_in, h, w] = H' / 8, W' / 8
        position = self.position_branch(features)  # [B, C, h, w]
        channel = self.channel_branch(features)  # [B, C, h, w]
        padded = images.shape[-2:]
        outputs = {"out": self.logits(self.classifier, position + channel, padded, size)}  # [B, num_classes, H, W]
        if self.training:
            outputs["position"] = self.logits(self.position_classifier, position, padded, size)
            outputs["channel"] = self.logits(self.channel_classifier, channel, padded, size)
        return outputs


class DRANet(SegmentationNet):
    """DRANet (Fu et al., "Scene Segmentation With Dual Relation-Aware Attention Network", TNNLS 2020), with the
    clustering layer in front of its compact attention modules as an option (ClusterDRANet).

        images [B, 3, H, W] -> dilated ResNet: layer1 [B, C_in/8, H/4, W/4], layer3 [B, C_in/2, h, w],
                                               layer4 [B, C_in, h, w]
        layer4 -> conv_in -> clustering -> CompactPositionAttention -> conv_out -> p [B, C, h, w]   (C = C_in / 4)
        layer4 -> conv_in -> clustering -> CompactChannelAttention  -> conv_out -> c [B, C, h, w]
        fusion: conv3x3+BN+ReLU([p, c]) [B, 2C, h, w] -> [B, C/2, h, w]
        decoder: CrossLevelGatingDecoder(layer1, fused) -> [B, C/2, H/4, W/4]
        classifier(decoded) -> "out";  classifier(conv3x3+BN+ReLU(layer3) [B, C/2, h, w]) -> "aux" (training only)

    The same conventions as ClusterDANet: a dict of logits at [B, num_classes, H, W] for any H and W, named branch
    steps (model.position_branch.attention is the CPAM), clustering=False for the plain model, multi_grid,
    deep_stem (the published DRANet101 has both) and align_corners (the original code: True, also in the decoder).
    With clustering, K (num_clusters, default C) must be a multiple of 16 (CCAM reads K / 16 compact channels).
    """

    def __init__(self, num_classes=21, backbone="resnet101", pretrained=False, num_clusters=None,
                 temperature=100.0, cluster_init="random", cluster_reseed=0, clustering=True, multi_grid=False,
                 align_corners=False, deep_stem=False):
        super().__init__()
        in_channels, channels = self.build_backbone_and_branches(
            backbone=backbone, pretrained=pretrained, multi_grid=multi_grid, deep_stem=deep_stem,
            clustering=clustering, num_clusters=num_clusters, temperature=temperature,
            cluster_init=cluster_init, cluster_reseed=cluster_reseed,
            position_attention=CompactPositionAttention, channel_attention=CompactChannelAttention)
        self.fusion = conv_bn_relu(2 * channels, channels // 2)
        self.decoder = CrossLevelGatingDecoder(in_channels // 8, channels // 2, align_corners)
        self.classifier = classifier(channels // 2, num_classes)
        self.aux_conv = conv_bn_relu(in_channels // 2, channels // 2)
        self.aux_classifier = classifier(channels // 2, num_classes)
        self.align_corners = align_corners

    def forward(self, images):
        size = images.shape[-2:]
        images = self.pad(images)  # [B, 3, H', W'], multiples of 8
        low, mid, features = self.backbone.levels(images)  # [B, C_in/8, H'/4, W'/4], [B, C_in/2, h, w], [B, C_in, h, w]
        position = self.position_branch(features)  # [B, C, h, w]
        channel = self.channel_branch(features)  # [B, C, h, w]
        fused = self.fusion(torch.cat([position, channel], dim=1))  # [B, 2C, h, w] -> [B, C/2, h, w]
        decoded = self.decoder(low, fused)  # [B, C/2, H'/4, W'/4]
        padded = images.shape[-2:]
        outputs = {"out": self.logits(self.classifier, decoded, padded, size)}  # [B, num_classes, H, W]
        if self.training:
            outputs["aux"] = self.logits(self.aux_classifier, self.aux_conv(mid), padded, size)
        return outputs


# ----------------------------------------------------------------------------- the original code's checkpoints

MODELS = {"danet": ClusterDANet, "dranet": DRANet}  # by name, each with or without clustering

# The original DANet code (PyTorch-Encoding) publishes DANet101.pth.tar and dran101.pth.tar (DRANet), both saved as
# {"state_dict": ..., "epoch": ..., "best_pred": ...}. Their names -> ours, by prefix; what follows the prefix is the
# same on both sides: torchvision's ResNet names, nn.Sequential indices (conv5a.0 conv, .1 BN; conv6.1 the conv after
# the dropout), BN's tensors. The deep stem's pretrained.conv1.0 ... conv1.6 become backbone.stem.0.0 ... stem.0.6.
ORIGINAL_BACKBONE_NAMES = (
    ("pretrained.conv1.", "backbone.stem.0."),  # the 7x7 stem convolution, or the deep stem's three 3x3 (conv1.0/3/6)
    ("pretrained.bn1.", "backbone.stem.1."),
    ("pretrained.layer", "backbone.layer"),
)
ORIGINAL_NAMES = {
    "danet": ORIGINAL_BACKBONE_NAMES + (
        ("head.conv5a.", "position_branch.conv_in."),  # conv3x3 + BN before position attention
        ("head.sa.query_conv.", "position_branch.attention.query."),
        ("head.sa.key_conv.", "position_branch.attention.key."),
        ("head.sa.value_conv.", "position_branch.attention.value."),
        ("head.sa.gamma", "position_branch.attention.gamma"),
        ("head.conv51.", "position_branch.conv_out."),
        ("head.conv5c.", "channel_branch.conv_in."),  # conv3x3 + BN before channel attention
        ("head.sc.gamma", "channel_branch.attention.gamma"),
        ("head.conv52.", "channel_branch.conv_out."),
        ("head.conv6.", "position_classifier."),  # Dropout2d + conv1x1 on the position branch: an auxiliary output
        ("head.conv7.", "channel_classifier."),
        ("head.conv8.", "classifier."),  # on the sum of both branches: the output
    ),
    "dranet": ORIGINAL_BACKBONE_NAMES + (
        ("head.conv_cpam_b.", "position_branch.conv_in."),  # conv3x3 + BN before CPAM
        ("head.cpam_enc.conv1.", "position_branch.attention.centres.0."),  # conv1x1 + BN after the 1x1 pool
        ("head.cpam_enc.conv2.", "position_branch.attention.centres.1."),  # ... after the 2x2 pool
        ("head.cpam_enc.conv3.", "position_branch.attention.centres.2."),
        ("head.cpam_enc.conv4.", "position_branch.attention.centres.3."),  # ... after the 6x6 pool
        ("head.cpam_dec.scale", "position_branch.attention.gamma"),
        ("head.cpam_dec.conv_query.", "position_branch.attention.query."),  # conv1x1 per pixel
        ("head.cpam_dec.conv_key.", "position_branch.attention.key."),  # Linear per centre
        ("head.cpam_dec.conv_value.", "position_branch.attention.value."),
        ("head.conv_cpam_e.", "position_branch.conv_out."),
        ("head.conv_ccam_b.", "channel_branch.conv_in."),  # conv3x3 + BN before CCAM
        ("head.ccam_enc.", "channel_branch.attention.reduce."),  # conv1x1 + BN to C / 16
        ("head.ccam_dec.scale", "channel_branch.attention.gamma"),
        ("head.conv_ccam_e.", "channel_branch.conv_out."),
        ("head.conv_cat.", "fusion."),  # conv3x3 + BN on [CPAM, CCAM]
        ("head.clgd.conv_low.", "decoder.low."),
        ("head.clgd.conv_att.", "decoder.gate."),
        ("head.clgd.conv_cat.", "decoder.fuse."),
        ("head.clgd.conv_out.", "decoder.out."),
        ("head.clgd.gamma", "decoder.gamma"),
        ("cls_seg.", "classifier."),  # Dropout2d + conv1x1 on the decoder: the output
        ("cls_aux.0.", "aux_conv.0."),  # conv3x3 + BN + ReLU + Dropout2d + conv1x1 on layer3: the auxiliary output
        ("cls_aux.1.", "aux_conv.1."),
        ("cls_aux.4.", "aux_classifier.1."),
    ),
}
ORIGINAL_CLASSIFIERS = {"danet": "head.conv8.1.weight", "dranet": "cls_seg.1.weight"}
ORIGINAL_DEPTHS = {(3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101", (3, 8, 36, 3): "resnet152"}  # blocks/layer


def is_original_checkpoint(checkpoint):
    """Whether `checkpoint` (what torch.load returned) is the original code's: a dict whose "state_dict" holds
    pretrained.* (the backbone) and head.* or cls_seg.* tensors."""
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    return isinstance(state, dict) and any(str(k).startswith("pretrained.") for k in state) and \
        any(str(k).startswith(("head.", "cls_seg.")) for k in state)


def original_state_and_config(state_dict, source="the state_dict"):
    """(tensors, config, unused) of an original DANet or DRANet state_dict: its tensors under our names, the model
    that holds them as {"model": "danet" or "dranet", **its constructor's keyword arguments}, and the names that have
    no place here.

    That model is plain DANet or DRANet (DRANet's file has cls_seg and head.clgd) with multi-grid (4, 8, 16) and
    align_corners=True upsampling, as the published DANet101 (--multi-grid --multi-dilation 4 8 16 --os 8
    --no-deepstem) and dran101; the depth is read off its blocks, the deep stem off pretrained.conv1.0, the number
    of classes off its classifier. A ValueError naming `source` says when the blocks or the classifier are not ones
    this loader knows.
    """
    blocks = tuple(len({k.split(".")[2] for k in state_dict if k.startswith(f"pretrained.layer{i}.") and
                        k.count(".") > 2}) for i in range(1, 5))  # pretrained.layer3.22.conv1.weight: block 22
    name = "dranet" if any(k.startswith(("cls_seg.", "head.clgd.")) for k in state_dict) else "danet"
    if blocks not in ORIGINAL_DEPTHS or ORIGINAL_CLASSIFIERS[name] not in state_dict:
        raise ValueError(f"{source} is not an original DANet or DRANet checkpoint this loader knows (blocks per layer "
                         f"{blocks}, known: ResNet-50/101/152 Bottlenecks; and a head.conv8 classifier for DANet, "
                         f"cls_seg for DRANet)")
    tensors, unused = {}, []
    for key, tensor in state_dict.items():
        ours = next((o + key[len(t):] for t, o in ORIGINAL_NAMES[name] if key.startswith(t)), None)
        if ours is None:
            unused.append(key)
        else:
            tensors[ours] = tensor
    for key in [k for k in tensors if k.endswith(".running_mean")]:  # files of PyTorch < 0.4.1 have no BN counters
        tensors.setdefault(key.replace(".running_mean", ".num_batches_tracked"), torch.tensor(0))
    config = dict(model=name, num_classes=state_dict[ORIGINAL_CLASSIFIERS[name]].shape[0],
                  backbone=ORIGINAL_DEPTHS[blocks], clustering=False, multi_grid=True, align_corners=True,
                  deep_stem="pretrained.conv1.0.weight" in state_dict)
    return tensors, config, unused


def from_original(checkpoint, map_location="cpu"):
    """The model of an original DANet or DRANet checkpoint, its weights loaded, in eval mode:

        model = from_original("DANet101.pth.tar")  # ClusterDANet(clustering=False, multi_grid=True, align_corners=True)

    `checkpoint` is the file's path or what torch.load returned for it. A path is read with
    torch.load(weights_only=True): the file holds tensors and numbers, and no code is unpickled. The model is the
    one original_state_and_config describes; a file that is not the original code's, or whose tensors do not fit
    that model, is a ValueError.
    """
    source = "the checkpoint"
    if not isinstance(checkpoint, dict):
        source, checkpoint = str(checkpoint), torch.load(checkpoint, map_location=map_location, weights_only=True)
    if not is_original_checkpoint(checkpoint):
        raise ValueError(f"{source} is not a checkpoint of the original DANet code (a dict whose state_dict holds "
                         f"pretrained.* and head.* tensors)")
    tensors, config, _ = original_state_and_config(checkpoint["state_dict"], source)
    model = MODELS[config["model"]](**{k: v for k, v in config.items() if k != "model"})
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:  # missing tensors, or tensors of other shapes
        raise ValueError(f"{source} does not hold the tensors of the {type(model).__name__} it names: {e}") from None
    return model.eval()
