#!/usr/bin/env python3
"""Set up and run atoll from a fresh clone with nothing but Python.

    python3 dev.py train [RECIPE] [key=value ...]   # create .venv if needed, then `atoll train`
    python3 dev.py test  [pytest args ...]          # create .venv if needed, then the test suite

The virtual environment lives in .venv beside this file and is reused while
pyproject.toml is unchanged.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".atoll-installed"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")


def _project_hash() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def ensure_venv() -> None:
    if STAMP.exists() and STAMP.read_text() == _project_hash():
        return
    if not (BIN / "python").exists():
        print(f"creating virtual environment {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("installing atoll and its test dependencies (first run takes a few minutes)", flush=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(pip + ["-e", f"{ROOT}[test]"], check=True)
    STAMP.write_text(_project_hash())


def run(cmd: list[str], **kwargs) -> int:
    """Run `cmd` to its end and return its exit code. Ctrl-C reaches it from the terminal
    (it stops at a step boundary with a checkpoint), so this process waits for it instead
    of leaving it behind; a SIGTERM sent to this process alone is passed on."""
    child = subprocess.Popen(cmd, **kwargs)
    previous = (signal.signal(signal.SIGINT, lambda signum, frame: None),
                signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum)))
    try:
        return child.wait()
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("train", "test"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    ensure_venv()
    command, rest = argv[0], argv[1:]
    if command == "train":
        return run([str(BIN / "atoll"), "train", *rest])
    code = run([str(BIN / "python"), "-m", "pytest", *rest], cwd=ROOT)
    return 0 if code == 5 else code  # 5: no tests collected


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
