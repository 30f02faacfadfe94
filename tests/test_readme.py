"""Every code block in README.md runs as written: bash and Python blocks on the CPU (the tiny model), TOML blocks
load as training configs (a block without ``model``, such as one more table, in a minimal config around it). A
block that cannot run here opts out with ``<!-- not run: REASON -->`` on the line
before its fence; any other block, of any language, is run, and a failure names the block's line."""

import os
import re
import subprocess
import sys

import pytest

from parity import REPO

NOT_RUN = re.compile(r"^<!--\s*not run:\s*(\S.*?)\s*-->$")
FENCE = re.compile(r"^```(\S*)")


def readme_blocks(text: str) -> list[dict]:
    """``{"line", "lang", "code", "not_run"}`` for every fenced block (line: the opening fence, 1-based)."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"README.md line {i + 1}: code block never closed"
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = NOT_RUN.match(before)
        blocks.append({"line": i + 1, "lang": opening.group(1), "code": "\n".join(lines[i + 1:end]) + "\n",
                       "not_run": marker.group(1) if marker else None})
        i = end + 1
    return blocks


BLOCKS = readme_blocks((REPO / "README.md").read_text())
RUN = [b for b in BLOCKS if b["not_run"] is None]


def describe(block) -> str:
    first = block["code"].strip().splitlines()[0] if block["code"].strip() else ""
    return f"README.md line {block['line']} (```{block['lang']}: {first[:60]!r})"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A working folder holding the repository's assets, with ``python`` and ``svd-jax`` on PATH running this
    checkout (as after ``pip install -e .``)."""
    root = tmp_path_factory.mktemp("readme")
    (root / "assets").symlink_to(REPO / "assets")
    bin_dir = root / ".bin"
    bin_dir.mkdir()
    for name in ("python", "python3"):
        (bin_dir / name).symlink_to(sys.executable)
    script = bin_dir / "svd-jax"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m svd_jax.cli "$@"\n')
    script.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "JAX_PLATFORMS": "cpu"}
    return root, env


def test_blocks_are_found_and_markers_give_a_reason():
    assert len(BLOCKS) >= 8 and RUN, "README.md code blocks were not found"
    text = (REPO / "README.md").read_text()
    for line in text.splitlines():
        if "not run" in line and line.lstrip().startswith("<!--"):
            assert NOT_RUN.match(line.strip()), f"malformed marker {line!r}: write <!-- not run: REASON -->"


@pytest.mark.parametrize("block", RUN, ids=[f"line{b['line']}-{b['lang'] or 'text'}" for b in RUN])
def test_readme_block_runs(block, sandbox):
    root, env = sandbox
    where = describe(block)
    if block["lang"] == "toml":
        import tomllib

        from svd_jax.train.config import config_from_dict

        values = tomllib.loads(block["code"])
        if "model" not in values:  # a fragment (e.g. one more table): checked in a config of its own
            values = {"model": "tiny", "output_dir": "runs/readme", "data": {"path": "videos/"}, **values}
        config_from_dict(values)  # unknown or invalid keys raise here
        return
    if block["lang"] in ("bash", "sh", "shell"):
        command = ["bash", "-e", "-o", "pipefail", "-c", block["code"]]
    elif block["lang"] == "python":
        command = [sys.executable, "-c", block["code"]]
    else:
        pytest.fail(f"{where}: no runner for ```{block['lang'] or '(no language)'} blocks; mark it with "
                    "<!-- not run: REASON --> on the line before its fence")
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (
        f"{where} failed with exit code {result.returncode}; make it run on a CPU with the tiny model, or mark it "
        f"<!-- not run: REASON -->\n{result.stdout[-1500:]}\n{result.stderr[-3000:]}")
