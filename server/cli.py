"""`cmserve`: serve, train, eval, bench.

`cmserve serve --help` lists every server setting; each flag also reads `CMSERVE_<NAME>` from the
environment (flags win).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Any

from pydantic import ValidationError

ENV_ONLY = {"api_keys"}  # secrets: from the environment or a file, never a flag that `ps` shows


REPEATABLE = {
    "models": ("--model", "NAME=PATH"),
    "scorers": ("--scorer", "MODEL=SCORER"),
    "references": ("--reference", "MODEL=REFERENCE"),
}


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    from server.settings import Settings

    for name, f in Settings.model_fields.items():
        if name in ENV_ONLY:
            continue
        flag = "--" + name.replace("_", "-")
        env = "CMSERVE_" + name.upper()
        default = f.default_factory() if f.default_factory is not None else f.default  # type: ignore[call-arg]
        if isinstance(default, list):
            default = ",".join(map(str, default))
        help_ = f"{f.description} [env {env}; default {default!r}]"
        if name in REPEATABLE:  # one flag per item, repeatable; the variable holds a comma list
            flag, metavar = REPEATABLE[name]
            p.add_argument(flag, dest=name, action="append", metavar=metavar, help=help_)
        elif f.annotation is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            p.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_)


def _settings(args: argparse.Namespace) -> Any:
    from server.settings import Settings

    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        return Settings(**given)
    except ValidationError as e:
        sys.exit(f"cmserve: bad setting: {e}")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cmserve")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _check_ports_free(s: Any) -> None:
    for port in (s.port, s.ops_port):
        if not port:
            continue
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            try:
                sock.bind((s.host, port))
            except OSError as e:
                sys.exit(f"cmserve: cannot listen on {s.host}:{port}: {e.strerror}")


def cmd_serve(args: argparse.Namespace) -> None:
    from models.checkpoint import CheckpointError
    from server import heap, logs
    from server.app import DrainingServer, create_app, uvicorn_config
    from server.engine import Engine
    from server.metrics import Metrics

    s = _settings(args)
    logs.configure(s.log_level, s.log_format)
    _check_ports_free(s)  # before tens of seconds of loading and warm-up, not after them
    metrics = Metrics()
    try:
        engine = Engine(s, metrics)  # fail fast on a bad checkpoint, before binding the port
    except (CheckpointError, RuntimeError, ValueError) as e:
        sys.exit(f"cmserve: cannot load model: {e}")
    sockets: list[socket.socket] | None = None
    if s.frontends > 1:  # the port is the front ends'; this process holds it bound, listening not
        from server.remote import reuseport_socket

        reserved = reuseport_socket(s.host, s.port)
        s.port = reserved.getsockname()[1]
        sockets = []
    app = create_app(s, engine, metrics)
    heap.settle()  # the loaded model and libraries out of the collector's way
    DrainingServer(uvicorn_config(app, s), app.state.cm).run(sockets=sockets)


def cmd_train(args: argparse.Namespace) -> None:
    from models.train import run

    overrides = json.loads(args.set) if args.set else {}
    run(
        args.preset,
        args.run_dir,
        overrides,
        stop_after=args.stop_after,
        from_teacher=args.from_teacher or None,
    )


def cmd_eval(args: argparse.Namespace) -> None:
    from models.evaluate import main as eval_main

    eval_main(args)


def cmd_generate(args: argparse.Namespace) -> None:
    """Images from a running server into a folder (and a grid), in chunks of --chunk."""
    from pathlib import Path

    import httpx

    from server.client import Client, CmserveError

    label = None if args.class_label.lower() in ("none", "null", "-") else int(args.class_label)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pngs: list[bytes] = []
    seed = args.seed
    try:
        with Client(args.url, api_key=args.api_key or os.environ.get("CMSERVE_API_KEY")) as client:
            while len(pngs) < args.n:
                k = min(args.chunk, args.n - len(pngs))
                res = client.generate(class_label=label, n=k, seed=seed, steps=args.steps)
                seed = res.seeds[-1] + 1  # the next chunk continues the seed sequence
                for png, s in zip(res.pngs, res.seeds):
                    (out / f"{'none' if label is None else label}_{s}.png").write_bytes(png)
                pngs += res.pngs
                if args.n > args.chunk:
                    print(f"\r{len(pngs)}/{args.n} images", end="", file=sys.stderr, flush=True)
    except CmserveError as e:
        sys.exit(f"cmserve generate: {e}")
    except httpx.TransportError as e:
        sys.exit(f"cmserve generate: cannot reach {args.url}: {e}")
    if args.n > args.chunk:
        print(file=sys.stderr)
    if args.grid:
        _save_grid(pngs, args.grid)
    print(f"{len(pngs)} images in {out}" + (f", grid in {args.grid}" if args.grid else ""))


def _save_grid(pngs: list[bytes], path: str, cols: int = 8) -> None:
    import io

    from PIL import Image

    imgs = [Image.open(io.BytesIO(p)) for p in pngs]
    w, h = imgs[0].size
    rows = -(-len(imgs) // cols)
    grid = Image.new(imgs[0].mode, (w * min(cols, len(imgs)), h * rows))
    for i, im in enumerate(imgs):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    grid.save(path)


BENCH_MISSING = (
    "cmserve bench: the benchmarks live in the source tree's bench/ package, not in the installed "
    "server; run them from a checkout, with the bench extra: pip install -e '.[bench]'"
)


def _checkout_on_path() -> None:
    """`bench/` sits beside `server/` in a checkout and is not installed with the package; an
    editable install's console script does not see the checkout's root, so add it."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if (root / "bench" / "__init__.py").is_file() and str(root) not in sys.path:
        sys.path.append(str(root))


def _add_bench_args(p: argparse.ArgumentParser) -> bool:
    """The bench subcommands' arguments, where the checkout's bench/ is importable."""
    _checkout_on_path()
    try:
        from bench.cli import add_args
    except ImportError:
        return False
    add_args(p)
    return True


def cmd_bench(args: argparse.Namespace) -> None:
    _checkout_on_path()
    try:
        from bench.cli import main as bench_main
    except ImportError as e:
        sys.exit(f"{BENCH_MISSING} ({e})")
    bench_main(args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cmserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cmserve {_version()}")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("serve", help="serve one or several models over HTTP")
    _add_settings_flags(p)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("train", help="train the teacher and tune the consistency model (resumable)")
    p.add_argument("--preset", default="mnist", help="training preset: mnist (the shipped run) or tiny")
    p.add_argument("--run-dir", default="runs/mnist", help="where state, logs, samples and exports go")
    p.add_argument("--set", default="", help="JSON overrides of the preset, e.g. '{\"ect_steps\": 400}'")
    p.add_argument("--stop-after", type=int, default=None, help="stop (resumably) after this global step")
    p.add_argument(
        "--from-teacher", default="", help="skip the teacher phase: tune from this teacher checkpoint"
    )
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("generate", help="images from a running server into a folder")
    p.add_argument("class_label", help="class index, or 'none' for unconditional")
    p.add_argument("-n", type=int, default=1, help="number of images")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    p.add_argument("--seed", type=int, default=None, help="first seed (image i gets seed + i)")
    p.add_argument("-o", "--out", default=".", help="folder for the PNGs (<class>_<seed>.png)")
    p.add_argument("--grid", default="", help="also write all images as one grid PNG here")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default="", help="bearer key (or CMSERVE_API_KEY)")
    p.add_argument("--chunk", type=int, default=16, help="images per request (the server's max n)")
    p.set_defaults(fn=cmd_generate)

    # eval and bench bring torch-heavy tooling: their arguments are only built when asked for,
    # so `cmserve serve` (and its --help) never imports them
    cmd = (sys.argv[1:] if argv is None else argv)[:1]
    p = sub.add_parser("eval", help="FLD / class accuracy / speed of the samplers")
    if cmd == ["eval"]:
        from models.evaluate import add_args as eval_args

        eval_args(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("bench", help="benchmarks (from a checkout): sampler, server, frontend, threads")
    if not (cmd == ["bench"] and _add_bench_args(p)):
        p.add_argument("what", nargs="*", help=argparse.SUPPRESS)  # cmd_bench says what is missing
    p.set_defaults(fn=cmd_bench)

    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    args.fn(args)


if __name__ == "__main__":
    main()
