"""Every command of README.md's ```bash blocks, in order, from a clean clone: each must exit 0.

The clone (`git clone` of this repository's committed HEAD into a temporary folder) reuses the venv that runs the
tests (as `.venv`, a symlink) instead of installing one, and imports its own code (PYTHONPATH=clone), so what is
checked is the committed tree as a new user gets it. Each command runs in bash after `source .venv/bin/activate`,
as the README says to. Tiny step counts keep it to a few minutes: the clone's configs train 2 steps, an explicit
`--train.steps=N` becomes 3 (one more step on a resumed run), `lightspan eval` gets a short length grid.
Commands that cannot run here are skipped, each with its reason (SKIPS); a skip list that no longer matches a
README line fails the test, so the two stay in step.
"""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[1]

# command prefix -> why it is not run here
SKIPS = {
    "make test": "the test suite itself (this test is part of it)",
    "lightspan-lm-eval": "TASK is a placeholder, and lm-eval's tasks download their data sets from the hub "
                         "(no network here); the adapter is tested in tests/test_eval_lm_eval.py",
    "lightspan bench": "benchmarks take minutes; each one's code is tested on its own",
}
DEMO_STEPS = 2  # `steps:` of every config in the clone
STEPS = 3  # what an explicit --train.steps=N becomes
EVAL_SMALL = " --max-length 1024 --mqar-examples 16 --no-progress"


def readme_commands(text: str) -> list[str]:
    """The command lines of the ```bash blocks, in order (comment-only lines and blank lines dropped)."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        pending = ""
        for line in block.splitlines():
            line = pending + line.lstrip() if pending else line
            if line.rstrip().endswith("\\"):
                pending = line.rstrip()[:-1].rstrip() + " "
                continue
            pending = ""
            if line.strip() and not line.strip().startswith("#"):
                commands.append(line.strip())
    return commands


def adapt(command: str) -> str:
    """The command with tiny sizes (see the module docstring)."""
    if command.startswith("make demo"):
        # the clone's .venv is the shared one: `setup` would reinstall lightspan from the clone into it
        command = command.replace("make demo", "make -o setup demo", 1)
    command = re.sub(r"--train\.steps=\d+", f"--train.steps={STEPS}", command)
    if command.startswith("lightspan eval "):
        code, hash_, comment = command.partition("#")
        command = code.rstrip() + EVAL_SMALL + (f"  {hash_}{comment}" if hash_ else "")
    return command


def test_readme_parser_and_adaptations():
    text = "x\n```bash\nmake demo   # a\n# only a comment\nlightspan train --train.steps=100 \\\n  --x=1\n```\n" \
           "```python\nnot run\n```\n```bash\nlightspan eval runs/t --out e   # tasks\n```\n"
    cmds = readme_commands(text)
    assert cmds == ["make demo   # a", "lightspan train --train.steps=100 --x=1",
                    "lightspan eval runs/t --out e   # tasks"]
    assert [adapt(c) for c in cmds] == [
        "make -o setup demo   # a", "lightspan train --train.steps=3 --x=1",
        "lightspan eval runs/t --out e" + EVAL_SMALL + "  # tasks"]


def _venv() -> Path:
    venv = Path(sys.prefix)
    if sys.prefix == sys.base_prefix or not (venv / "bin" / "activate").is_file():
        pytest.skip("the tests do not run from a venv: nothing to reuse as the clone's .venv")
    return venv


def test_every_readme_command_runs_from_a_clean_clone(tmp_path):
    if shutil.which("git") is None or shutil.which("make") is None:
        pytest.skip("needs git and make")
    venv = _venv()
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    (clone / ".venv").symlink_to(venv, target_is_directory=True)
    for config in (clone / "configs").glob("*.yaml"):
        config.write_text(re.sub(r"(?m)^(\s+steps:\s*)\d+", rf"\g<1>{DEMO_STEPS}", config.read_text()))

    commands = readme_commands((clone / "README.md").read_text())
    assert commands, "README.md has no ```bash block"
    used = {prefix: False for prefix in SKIPS}
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PYTHONPATH=str(clone), OMP_NUM_THREADS="1", LIGHTSPAN_DEBUG="1")
    log = []
    for command in commands:
        skip = next((p for p in SKIPS if command.startswith(p)), None)
        if skip:
            used[skip] = True
            log.append(f"skipped: {command}  ({SKIPS[skip]})")
            continue
        run = adapt(command)
        t0 = time.monotonic()
        res = subprocess.run(["bash", "-c", f"source .venv/bin/activate && {run}"], cwd=clone, env=env,
                             capture_output=True, text=True, timeout=600)
        log.append(f"{time.monotonic() - t0:6.1f}s  {run}")
        assert res.returncode == 0, (f"README command failed (exit {res.returncode}): {run}\n"
                                     f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    print("\n".join(log))
    unused = [p for p, seen in used.items() if not seen]
    assert not unused, f"SKIPS entries that match no README command any more: {unused}"
    # what the README promises about its own outputs
    assert (clone / "runs" / "tiny" / "metrics.jsonl").is_file() and (clone / "hf" / "tiny" / "config.json").is_file()
    assert (clone / "eval" / "tiny" / "results.json").is_file()
