"""A small LeNet-style MNIST classifier: the feature space of the Fréchet LeNet Distance (FLD)
and the judge of class accuracy. Trained on the train split only; independent of the generator."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

DEFAULT_CLASSIFIER = Path(__file__).resolve().parent / "weights" / "lenet-mnist.safetensors"


class LeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 1, 28, 28] in [-0.5, 0.5] -> [B, 128] (the FLD features)."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc1(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to 2 px (augmentation)."""
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
    return torch.roll(F.pad(x, (2, 2, 2, 2), value=-0.5), shifts=(dy, dx), dims=(2, 3))[..., 2:-2, 2:-2]


def train_classifier(out: str | Path = DEFAULT_CLASSIFIER, epochs: int = 12, seed: int = 0) -> float:
    """Train on the train split, save, return held-out accuracy."""
    from models.data import load_split

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = load_split("train")
    xe, ye = load_split("eval")
    net = LeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (len(x) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - 63, 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(net(_shift(x[idx], g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    acc = accuracy(net, xe, ye)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out))
    return acc


def load_classifier(path: str | Path = DEFAULT_CLASSIFIER) -> LeNet:
    net = LeNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(net: LeNet, x: torch.Tensor, y: torch.Tensor) -> float:
    pred = torch.cat([net(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return float((pred == y).float().mean())


@torch.no_grad()
def features(net: LeNet, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([net.features(x[i : i + 500]) for i in range(0, len(x), 500)]).double()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a: [N, D] and b: [M, D]:
    |mu_a − mu_b|² + tr(S_a) + tr(S_b) − 2 tr((S_a^½ S_b S_a^½)^½)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(sa)
    sqrt_a = (v * w.clamp(min=0).sqrt()) @ v.T
    m = sqrt_a @ sb @ sqrt_a
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + sa.trace() + sb.trace() - 2 * tr_sqrt)
