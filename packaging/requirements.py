"""Print the Python requirements listed once, in pyproject.toml, one per line.

    python3 packaging/requirements.py --all       everything `make setup` installs (tests, benchmarks)
    python3 packaging/requirements.py --runtime   what the .deb's venv carries: [project]
                                                  dependencies plus every extra except `dev`

pyproject.toml is the one list (a new package is one line there: under [project] dependencies,
or in the `dev` extra if only tests, benchmarks or notebooks use it); setup.sh and build-deb.sh
read it through this script. Standard library only: it runs before the venv exists.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirements(include_dev: bool) -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    listed = list(project.get("dependencies", []))
    for extra, packages in project.get("optional-dependencies", {}).items():
        if extra != "dev" or include_dev:
            listed.extend(packages)
    return list(dict.fromkeys(listed))


def main(argv: list[str]) -> int:
    if argv not in (["--all"], ["--runtime"]):
        print("usage: requirements.py --all | --runtime", file=sys.stderr)
        return 2
    print("\n".join(requirements(include_dev=argv == ["--all"])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
