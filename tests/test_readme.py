"""README.md cannot drift from the code: every command in its code blocks composes (run.py, with `--cfg job`)
or answers `--help` (the other scripts), every file it names exists, and every row of its error table is a
case of the bad-input test with the message the table shows."""
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
# commands that need a machine or service the suite does not start (installing, torchrun, W&B's uploader)
NOT_RUN = ("pip ", "pytest", "torchrun", "wandb ", "git ", "cd ", "export ", "time ")


def _code_lines() -> list[str]:
    lines, joined = [], ""
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", README, re.S):
        for raw in block.splitlines():
            line = re.split(r"\s+#(?=\s|$)", raw)[0].rstrip()  # a trailing comment
            if line.lstrip().startswith("#") or not line.strip():
                continue
            if line.endswith("\\"):
                joined += line[:-1] + " "
                continue
            lines.append((joined + line).strip())
            joined = ""
    return lines


def _commands() -> list[str]:
    out = []
    for line in _code_lines():
        for part in re.split(r"\s*&&\s*", line):  # `pip install ... && python run.py`
            if part and not part.startswith(NOT_RUN):
                out.append(part)
    return out


def _single_job(args: list[str]) -> list[str]:
    """A sweep's first job: -m dropped, each comma list replaced by its first value (Hydra's --cfg cannot take -m)."""
    if "-m" not in args and "--multirun" not in args:
        return args
    out = []
    for a in args:
        if a in ("-m", "--multirun"):
            continue
        key, eq, value = a.partition("=")
        if eq and "," in value and not value.startswith(("[", "'[", '"[')):
            value = value.split(",")[0]
        out.append(f"{key}{eq}{value}")
    return out


def test_the_readme_has_commands_to_check():
    commands = _commands()
    assert sum(c.startswith("python run.py") for c in commands) >= 15, commands


@pytest.mark.parametrize("command", _commands())
def test_every_readme_command_composes(command, tmp_path):
    args = shlex.split(command)
    if args[:2] == ["python", "run.py"]:
        cmd = [sys.executable, str(ROOT / "run.py"), *_single_job(args[2:]), "--cfg", "job"]
    elif args[0] == "python" and args[1].endswith(".py"):
        cmd = [sys.executable, str(ROOT / args[1]), "--help"]
    elif args[:3] == ["python", "-m", "bertexp.compare"] or args[0] == "bertexp-compare":
        cmd = [sys.executable, "-m", "bertexp.compare", "--help"]
    else:
        pytest.fail(f"a README command this test does not know how to check: {command}")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, f"{command}\n{r.stderr[-2000:]}"
    # repo files the command names are there (from a fresh clone, as written)
    for path in re.findall(r"(?:data\.path|model\.path)=((?:tests|docs|conf|benchmarks)/[^\s,\]]+)", command):
        assert (ROOT / path).exists(), f"{command}: {path} does not exist"


def test_files_and_folders_the_readme_names_exist():
    named = set(re.findall(r"`((?:bertexp|conf|tests|benchmarks|docs|multirun_sweeps)/[\w./-]*)`", README))
    named |= set(re.findall(r"\]\(((?:docs|benchmarks)/[\w./-]+)(?:#[\w-]+)?\)", README))  # Markdown links
    assert named, "the README names no repo files?"
    missing = [p for p in sorted(named) if not (ROOT / p.rstrip("/")).exists()]
    assert not missing, missing
