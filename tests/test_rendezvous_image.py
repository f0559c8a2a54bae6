"""The rendezvous image's dependency list works: read from ``deploy/rendezvous/Dockerfile`` (so the
test and the image cannot drift), installed into a clean virtual environment the way the
Dockerfile installs it, then ``import rendezvous.cli`` and ``dvai-rendezvous --help``.

pip reaches the package registry (its cache is warm after the project's own set-up).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "deploy" / "rendezvous" / "Dockerfile"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    out = []
    for line in logical:
        keyword, _, rest = line.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def image_install_steps(text: str) -> tuple[list[str], list[list[str]]]:
    """What the Dockerfile copies into /src and the ``pip install`` commands of its RUN lines."""
    copied: list[str] = []
    installs: list[list[str]] = []
    for keyword, rest in _instructions(text):
        if keyword == "COPY":
            *sources, _destination = shlex.split(rest)
            copied += [source for source in sources if not source.startswith("--")]
        elif keyword == "RUN":
            for command in re.split(r"&&|;", rest):
                words = shlex.split(command)
                if words[:2] == ["pip", "install"]:
                    installs.append(words[2:])
    return copied, installs


def test_the_dockerfile_parser_reads_the_install_steps() -> None:
    copied, installs = image_install_steps(
        'FROM x\nCOPY a b* ./\n# RUN pip install nope\nRUN pip install "aiohttp>=3.9" y \\\n'
        "    && pip install --no-deps . && python -c 'import z'\n"
    )
    assert copied == ["a", "b*"]
    assert installs == [["aiohttp>=3.9", "y"], ["--no-deps", "."]]
    copied, installs = image_install_steps(DOCKERFILE.read_text())
    assert "node" in copied and "rendezvous" in copied and "pyproject.toml" in copied
    assert installs[-1] == ["--no-deps", "."] and any("aiohttp" in arg for arg in installs[0])


def test_the_image_pins_what_pyproject_pins() -> None:
    """Each package the image installs carries the project's own version bound."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    _, installs = image_install_steps(DOCKERFILE.read_text())
    requirements = [arg for arguments in installs for arg in arguments if not arg.startswith("-") and arg != "."]
    assert requirements and set(requirements) <= set(project), set(requirements) - set(project)


@pytest.mark.slow
def test_the_rendezvous_runs_with_exactly_the_image_dependencies(tmp_path: Path) -> None:
    copied, installs = image_install_steps(DOCKERFILE.read_text())
    source = tmp_path / "src"  # the image's WORKDIR /src with what the Dockerfile copies into it
    source.mkdir()
    for pattern in copied:
        for path in REPO.glob(pattern):
            if path.is_dir():
                shutil.copytree(path, source / path.name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(path, source / path.name)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    for arguments in installs:
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *arguments]
        result = subprocess.run(pip, cwd=source, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{' '.join(arguments)} failed:\n{result.stderr[-3000:]}"

    imported = subprocess.run([str(python), "-c", "import rendezvous.cli"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
    assert imported.returncode == 0, imported.stderr
    helped = subprocess.run([str(env_dir / "bin" / "dvai-rendezvous"), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0, helped.stderr
    assert "dvai-rendezvous" in helped.stdout and "--public-url" in helped.stdout
    # The node's heavy dependencies are not there: the check above proves the rendezvous needs none.
    missing = subprocess.run([str(python), "-c", "import ifaddr"], capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0
