"""Build llama.cpp's ``llama-server`` once, from the source vendored in the pinned
llama-cpp-python sdist, into a cache directory (benchmarks only; never CI or tests).

    python -m bench.llama_server_build          # prints the binary's path

The sdist comes from PyPI through pip (``pip download --no-binary``); the build
runs at the lowest CPU priority with one job so it does not starve other work.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

CACHE = Path(os.environ.get("DVAI_BENCH_CACHE", Path.home() / ".cache" / "dvai-bench"))


def pinned_version() -> str:
    return metadata.version("llama_cpp_python")


def server_binary(version: str | None = None) -> Path:
    version = version or pinned_version()
    return CACHE / f"llama.cpp-{version}" / "build" / "bin" / "llama-server"


def build(version: str | None = None, *, jobs: int = 1) -> Path:
    """The llama-server binary for ``version``, building it first if needed."""
    version = version or pinned_version()
    binary = server_binary(version)
    if binary.is_file():
        return binary
    root = CACHE / f"llama.cpp-{version}"
    source = root / "src"
    if not (source / "CMakeLists.txt").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                 f"llama-cpp-python=={version}", "-d", tmp],
                check=True,
            )
            archive = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            vendored = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
            if source.exists():
                shutil.rmtree(source)
            source.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(vendored, source)
    build_dir = root / "build"
    nice = ["nice", "-n", "19"]
    subprocess.run(
        [*nice, "cmake", "-S", str(source), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
         "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
         "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_OPENSSL=OFF",
         "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON"],
        check=True,
    )
    subprocess.run(
        [*nice, "cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs)],
        check=True,
    )
    if not binary.is_file():
        raise RuntimeError(f"the build finished but {binary} is missing")
    return binary


if __name__ == "__main__":
    print(build())
