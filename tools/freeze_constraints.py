"""Write the worker's lock file: every package that ``pip install ".[EXTRAS]"`` brings, at the version
installed in this environment, as pip constraints (``name==version``).

    python tools/freeze_constraints.py worker > constraints/worker.txt     # `make lock`

torch and what only torch needs are left out: CPU installs take torch from ``constraints/cpu.txt``, GPU
images keep their base image's CUDA build. Run it in a venv made by ``make venv`` after changing
dependencies in pyproject.toml, and commit the result with that change.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

from packaging.markers import default_environment
from packaging.requirements import Requirement

LEFT_TO_TORCH = {"torch", "sympy", "mpmath", "networkx", "setuptools", "triton"}
PROJECT = "ipo-align"


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(project: str, extras: tuple[str, ...]) -> dict[str, str]:
    """``{normalised name: installed version}`` of ``project[extras]`` and everything it requires, with
    environment markers evaluated for this interpreter."""
    env = default_environment()
    versions: dict[str, str] = {}
    seen: set[tuple[str, tuple[str, ...]]] = set()

    def wanted(req: Requirement, extras: tuple[str, ...]) -> bool:
        if req.marker is None:
            return True
        return any(req.marker.evaluate({**env, "extra": extra}) for extra in ("", *extras))

    def walk(name: str, extras: tuple[str, ...]) -> None:
        if (_key(name), extras) in seen:
            return
        seen.add((_key(name), extras))
        dist = metadata.distribution(name)
        versions[_key(name)] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if wanted(req, extras):
                walk(req.name, tuple(sorted(req.extras)))

    walk(project, extras)
    return versions


def main(argv: list[str]) -> int:
    extras = tuple(argv) or ("worker",)
    versions = closure(PROJECT, extras)
    print(
        f"# pip constraints: {PROJECT}[{','.join(extras)}] as tested (python tools/freeze_constraints.py "
        f"{' '.join(extras)}; `make lock`). torch comes from constraints/cpu.txt or the GPU image."
    )
    for name in sorted(versions):
        if name not in LEFT_TO_TORCH and name != PROJECT:
            local = versions[name].split("+", 1)[0]
            print(f"{name}=={local}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
