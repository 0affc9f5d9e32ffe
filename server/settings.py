"""Server settings: CLI flags override `CMSERVE_*` environment variables override defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "weights"
DEFAULT_CHECKPOINT = WEIGHTS / "cm-mnist.json"
SHIPPED_TEACHER = WEIGHTS / "teacher-mnist.json"  # the shipped model's reference tier
SHIPPED_SCORER = "mnist-lenet"  # the accept check of both (models/scorers.py)


def _csv_list(v: object) -> object:
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    return v


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CMSERVE_", extra="forbid")
    _env_keys: list[str] = PrivateAttr(default_factory=list)  # the keys not from the keys file

    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 inside a container).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port.")
    checkpoint: str = Field(
        "", description="Checkpoint (.json card beside its .safetensors); empty = the shipped default model."
    )
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Models to serve, each NAME=PATH (or PATH: served under its own name), comma-separated "
        "in CMSERVE_MODELS; PATH is a cmserve checkpoint card or a diffusers ConsistencyModelPipeline "
        "directory. The first is the default model; empty = --checkpoint, else the shipped model.",
    )
    device: str = Field("auto", description="'auto' (CUDA if present, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    backend: Literal["auto", "eager", "graph"] = Field(
        "auto",
        description="Runner backend: 'graph' = CUDA graphs (CUDA only); 'auto': graph on CUDA, else eager.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float8"] = Field(
        "auto",
        description="Compute dtype of the network: 'auto' = bfloat16 on CUDA (its FLD and class "
        "accuracy match float32's), float32 on the CPU. float8: a DiT's block linears in e4m3 with "
        "per-channel and per-token scales, the rest in bfloat16 (CUDA compute capability 9.0+, or "
        "the CPU, slowly).",
    )
    buckets: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32, 64],
        description="Batch sizes the runner pads up to (and captures on CUDA), comma-separated.",
    )
    max_batch_size: int = Field(
        0,
        ge=0,
        description="Most images the batcher puts in one batch; 0 = auto: the smallest bucket whose "
        "images/s, timed at warm-up, is within 5 percent of the best bucket's.",
    )
    batching: Literal["request", "step"] = Field(
        "request",
        description="'request': a batch is a set of whole requests of one step count; 'step': "
        "requests join and leave at every network evaluation, rows at different steps share it "
        "(docs/performance.md compares them).",
    )
    max_wait_ms: float = Field(
        0.0, ge=0, description="Extra wait for a fuller batch; 0 = dispatch as soon as the worker is idle."
    )
    max_images_per_request: int = Field(16, ge=1, description="Largest n a request may ask for.")
    max_queue_images: int = Field(512, ge=1, description="Queue bound in images; beyond it requests get 429.")
    default_timeout_s: float = Field(30.0, gt=0, description="Deadline of a request that sets none.")
    max_timeout_s: float = Field(120.0, gt=0, description="Cap on a request's own deadline.")
    max_body_bytes: int = Field(16384, ge=256, description="Largest request body accepted (413 beyond).")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Bearer API keys, comma-separated, from CMSERVE_API_KEYS only (a flag would show "
        "them in `ps`); empty, with no keys file = no auth.",
    )
    api_keys_file: str = Field(
        "", description="File with one API key per line ('#' comments), added to the keys; re-read on SIGHUP."
    )
    key_rate_limit: float = Field(
        0.0,
        ge=0,
        description="Requests/s one API key (or, without keys, one client address) may send; 0 = no limit.",
    )
    key_rate_burst: int = Field(0, ge=0, description="Burst above key_rate_limit; 0 = the rate, rounded up.")
    key_queue_share: float = Field(
        1.0, gt=0, le=1, description="Share of max_queue_images one key may hold queued (429 beyond)."
    )
    scorers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Accept checks, MODEL=SCORER, comma-separated: a built-in scorer (mnist-lenet), "
        "module:factory, or none; the shipped models get mnist-lenet unless one is named.",
    )
    accept_threshold: float = Field(
        0.9, ge=0, le=1, description="Score an image needs to be accepted (a request may ask another)."
    )
    on_reject: Literal["return", "resample", "escalate"] = Field(
        "return",
        description="What a request that sets no on_reject gets for a rejected image: 'return' it "
        "marked, 'resample' it with a new seed, or 'escalate' it to the next tier up.",
    )
    max_attempts: int = Field(3, ge=1, le=8, description="Most attempts per image, the first included.")
    references: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Reference tiers, MODEL=REFERENCE_MODEL (both served names), comma-separated; the "
        "shipped model gets its teacher unless --no-shipped-reference.",
    )
    shipped_reference: bool = Field(
        True,
        description="Serving the shipped model: also load its diffusion teacher (teacher-mnist, 32-step "
        "ODE) as its reference tier.",
    )
    shadow_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of requests whose first image is also drawn at the reference tier, only "
        "while no request waits, to compare scores (metrics only; the client never sees it).",
    )
    shadow_max_share: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Most of the compute thread's time (over 10 s) shadow draws may take; beyond it "
        "they wait, and past 64 waiting they are dropped (counted).",
    )
    latency_slo_ms: float = Field(
        0.0,
        ge=0,
        description="Latency objective: a request predicted to exceed it (queue wait + compute) runs one "
        "tier lower where it allows it; 0 = never degrade.",
    )
    allow_degrade: bool = Field(True, description="Whether a request that does not say may be degraded.")
    batch_queue_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Share of max_queue_images that priority=batch requests may fill (429 beyond), so "
        "batch work is refused before interactive work.",
    )
    ops_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Also serve /healthz, /readyz and /metrics on this port, from a process of their own, "
        "so probes and scrapes answer however busy the API is; 0 = only on the main port.",
    )
    frontends: int = Field(
        1,
        ge=1,
        le=64,
        description="HTTP front-end processes. 1: one process serves HTTP and runs the engine. N > 1: N "
        "processes share the port (parse, validate, encode PNGs, answer) and feed one engine process "
        "(batching and sampling), for hosts where one event loop cannot keep the accelerator busy.",
    )
    playground: bool = Field(
        True, description="Serve the playground page at / (off for locked-down deployments)."
    )
    protect_ops_endpoints: bool = Field(
        False, description="Require the API key on /healthz, /readyz and /metrics too."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS, comma-separated; empty = no CORS."
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="On SIGTERM: time to drain queued and running work."
    )
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = torch's default.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["text", "json"] = Field(
        "text", description="'json': one JSON object per line (time, level, logger, message, request_id)."
    )
    access_log: bool = Field(
        False, description="Log one line per response, with its request id and duration."
    )

    @field_validator("buckets", "api_keys", "cors_origins", "models", "scorers", "references", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        return _csv_list(v)

    @field_validator("buckets")
    @classmethod
    def _buckets(cls, v: list[int]) -> list[int]:
        if not v or any(b < 1 for b in v):
            raise ValueError("buckets must be positive integers")
        return sorted(set(v))

    @model_validator(mode="after")
    def _keys_file(self) -> Settings:
        self._env_keys = list(self.api_keys)
        self.api_keys = [*self._env_keys, *self.file_keys()]
        if self.default_timeout_s > self.max_timeout_s:
            raise ValueError("default_timeout_s exceeds max_timeout_s")
        return self

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[str]) -> list[str]:
        names = [m.partition("=")[0] for m in v if "=" in m]
        for m in v:
            name, eq, path = m.partition("=")
            if eq and (
                not name or not path or not name.replace("-", "").replace("_", "").replace(".", "").isalnum()
            ):
                raise ValueError(
                    f"model {m!r}: expected NAME=PATH, NAME made of letters, digits, '-', '_', '.'"
                )
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"model names must be unique, {sorted(dup)} repeats")
        return v

    def model_paths(self) -> list[tuple[str | None, Path | None]]:
        """(served name or None for the model's own, path or None for the shipped model), the
        default model first."""
        if not self.models:
            return [(None, Path(self.checkpoint) if self.checkpoint else None)]
        out: list[tuple[str | None, Path | None]] = []
        for m in self.models:
            name, eq, path = m.partition("=")
            out.append((name, Path(path)) if eq else (None, Path(m)))
        return out

    def file_keys(self) -> list[str]:
        if not self.api_keys_file:
            return []
        lines = Path(self.api_keys_file).read_text().splitlines()
        return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]

    def reload_keys(self) -> int:
        """Re-read the keys file (SIGHUP): the keys become the environment's plus the file's.
        -> how many keys there are now. A file that cannot be read keeps the keys as they were."""
        self.api_keys = [*self._env_keys, *self.file_keys()]
        return len(self.api_keys)

    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint) if self.checkpoint else DEFAULT_CHECKPOINT
