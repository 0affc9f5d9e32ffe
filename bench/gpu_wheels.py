"""Wheels for a GPU host that has its own Python and CUDA torch but no network (`make gpu-wheels`).

    python3 -m bench.gpu_wheels [--dir .whl] [--repack]

Downloads manylinux wheels for CPython 3.12 of what such a host lacks (no dependencies pulled:
`pip download --no-deps`), then checks the set is complete: every requirement of every wheel
(extras aside) is either another wheel of the set or a package the host image already has.
Standard library only, so it runs with any python3.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

# What cmserve imports that the GPU image lacks, and what those need in turn.
WHEELS = [
    "fastapi", "starlette", "pydantic", "pydantic-core", "annotated-types", "annotated-doc",
    "typing-inspection", "typing-extensions", "pydantic-settings", "python-dotenv", "uvicorn",
    "opentelemetry-api", "litserve", "pyzmq", "mlxtend", "diffusers", "importlib-metadata",
    "python-multipart", "fastapi-offline", "transformers", "tokenizers", "typer", "shellingham",
    "httptools",
]  # fmt: skip
PYTHON = "3.12"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64"]  # fmt: skip
# Packages the lent GPU hosts' image ('cuda', Python 3.12) was read to hold on 2026-11-17.
HOST_HAS = {
    "absl-py", "accelerate", "aiofiles", "aiohappyeyeballs", "aiohttp", "aiosignal", "annotated-doc",
    "anyio", "attrs", "certifi", "charset-normalizer", "click", "cloudpickle", "colorama", "contourpy",
    "coverage", "cycler", "cython", "einops", "filelock", "fonttools", "frozenlist", "fsspec", "h11",
    "h5py", "httpcore", "httpx", "huggingface-hub", "idna", "imageio", "iniconfig", "jinja2", "joblib",
    "kiwisolver", "markupsafe", "matplotlib", "mpmath", "msgpack", "multidict", "networkx", "numpy",
    "packaging", "pandas", "pillow", "pip", "pluggy", "prometheus-client", "propcache", "protobuf",
    "psutil", "pyarrow", "pygments", "pyparsing", "pytest", "pytest-timeout", "python-dateutil",
    "pyyaml", "regex", "requests", "rich", "safetensors", "scikit-learn", "scipy", "setuptools", "six",
    "sympy", "threadpoolctl", "torch", "tqdm", "triton", "typing-extensions", "urllib3", "uvloop",
    "wheel", "yarl", "zipp",
}  # fmt: skip


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(wheel: Path) -> list[str]:
    """Names a wheel requires, leaving out extras and markers that exclude Python 3.12."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    names = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        spec = line.split(":", 1)[1].strip()
        marker = spec.split(";", 1)[1] if ";" in spec else ""
        if "extra ==" in marker or "python_version < '3.1" in marker.replace('"', "'"):
            continue
        if "implementation_name == 'pypy'" in marker.replace('"', "'"):
            continue
        names.append(normalize(re.split(r"[\s<>=!~;\[(]", spec, maxsplit=1)[0]))
    return names


def wheel_name(wheel: Path) -> str:
    return normalize(wheel.name.split("-", 1)[0])


def missing(folder: Path) -> dict[str, list[str]]:
    """{wheel: requirements neither in the folder nor on the host}; empty = complete."""
    wheels = sorted(folder.glob("*.whl"))
    have = {wheel_name(w) for w in wheels} | {normalize(n) for n in HOST_HAS}
    gaps = {}
    for w in wheels:
        lack = [r for r in requirements(w) if r not in have]
        if lack:
            gaps[w.name] = lack
    return gaps


def repack(folder: Path, min_bytes: int = 1 << 20) -> int:
    """Re-compress the wheels of at least `min_bytes` with LZMA (pip reads any zip method), to
    keep the working tree and the wheels under what one device call carries (64 MiB); returns
    the bytes saved. Wheels already in LZMA are left as they are."""
    saved = 0
    for w in sorted(folder.glob("*.whl")):
        if w.stat().st_size < min_bytes:
            continue
        with zipfile.ZipFile(w) as z:
            infos = z.infolist()
            if all(i.compress_type == zipfile.ZIP_LZMA for i in infos):
                continue
            tmp = w.with_suffix(".tmp")
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_LZMA) as out:
                for i in infos:
                    out.writestr(i, z.read(i), compress_type=zipfile.ZIP_LZMA)
        saved += w.stat().st_size - tmp.stat().st_size
        tmp.replace(w)
    return saved


def download(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", PYTHON, "--implementation", "cp", "-d", str(folder)]  # fmt: skip
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run([*cmd, *WHEELS], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=".whl")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--repack", action="store_true", help="re-compress the large wheels with LZMA (repack)")
    args = ap.parse_args()
    folder = Path(args.dir)
    if not args.check_only:
        download(folder)
    if args.repack:
        print(f"re-compressed with LZMA: {repack(folder) / 2**20:.1f} MiB saved")
    gaps = missing(folder)
    got = sorted(wheel_name(w) for w in folder.glob("*.whl"))
    lacking = sorted(set(map(normalize, WHEELS)) - set(got))
    if gaps or lacking:
        print(f"incomplete: not downloaded {lacking}; unmet requirements {gaps}", file=sys.stderr)
        sys.exit(1)
    print(f"{len(got)} wheels in {folder}, every requirement met: {' '.join(got)}")


if __name__ == "__main__":
    main()
