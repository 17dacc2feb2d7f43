"""The README runs as written. Every ```bash block is run, in README order, in one fresh
directory (tests/docs/conftest.py: vitctl on PATH, the loopback Hub as HF_ENDPOINT, a token
in HF_TOKEN, HF_USER=me); ```text blocks hold output samples and the labelled options
synopsis and are not run. The Quick start section is the newcomer's path (train -> convert
-> verify -> probe -> push -> pull -> verify) and is checked to stay that path.

A README line that cannot run here as written is listed in SUBSTITUTES with what runs
instead and why; a listed line that is not in the README fails the test, so the table
cannot go stale. Nothing else is skipped.
"""

from __future__ import annotations

import json
import re
import shlex

import pytest

from tests.docs.conftest import HF_USER, ROOT, Sandbox

pytest.importorskip("jax")
pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("huggingface_hub")

README = ROOT / "README.md"

# README line (exact) -> (what this test runs instead, why). Keep it short and honest.
SUBSTITUTES: dict[str, tuple[str, str]] = {
    "make demo   # creates or reuses .venv, installs pinned torch, then vitctl; runs the main job": (
        "vitctl info vit-22b",
        (
            "the recipe's first line (checked against the Makefile below); its `vitctl demo --force` (300 steps, ~2 min) "
            "is run by tests/cli/test_demo.py as `vitctl demo --out DIR --steps 6` (and --force, --json)"
        ),
    ),
    "make test   # same environment; runs the whole test suite (what CI runs: .ci/run)": (
        "",
        "it is the suite that runs this test",
    ),
    "vitctl bench --quick                        # GEMM peaks, vitctl vs timm and plain Flax, train steps, convert vs cp": (
        "vitctl bench --quick --only cli",
        "the full --quick run takes minutes of CPU; tests/test_bench.py runs every part at the tiny size",
    ),
}
MAKE_DEMO = ["$(VENV)/bin/vitctl info vit-22b", "$(VENV)/bin/vitctl demo --force"]  # what `make demo` runs

# The newcomer's path, in order: what the Quick start must do (vitctl command words).
WORKFLOW = ["train", "convert jax-to-torch", "verify", "probe", "hub push", "hub pull", "verify"]
PLACEHOLDER = re.compile(r"<[A-Za-z_-]+>|\[--|\.\.\.")


def blocks(text: str) -> list[dict]:
    """Fenced blocks in order: {"lang", "code", "section" (the nearest ## heading), "before" (the paragraph above)}."""
    out, section, lines, i = [], "", text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        m = re.fullmatch(r"```(\S*)\s*", line)
        if m:
            j = lines.index("```", i + 1)
            before = "\n".join(lines[max(0, i - 3) : i])
            out.append({"lang": m.group(1), "code": "\n".join(lines[i + 1 : j]), "section": section, "before": before, "line": i + 1})
            i = j
        i += 1
    return out


def commands(code: str) -> list[str]:
    """The command lines of a bash block (heredoc bodies and comments left out)."""
    out, heredoc = [], None
    for line in code.splitlines():
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        if m := re.search(r"<<-?'?(\w+)'?", line):
            heredoc = m.group(1)
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line)
    return out


def substituted(code: str) -> str:
    return "\n".join(SUBSTITUTES[line][0] if line in SUBSTITUTES else line for line in code.splitlines())


def vitctl_words(line: str) -> str:
    """ "vitctl hub push A B --x" -> "hub push"; "" for a line that is not a vitctl command."""
    words = [w for w in shlex.split(line, comments=True) if "=" not in w or w.startswith("-")]
    if not words or words[0] != "vitctl":
        return ""
    sub = [w for w in words[1:3] if not w.startswith("-")]
    return " ".join(sub[:2] if sub[:1] in (["hub"], ["convert"]) else sub[:1])


# ----------------------------------------------------------------------------- static checks
def test_readme_blocks_are_runnable_or_labelled():
    """Every fence is bash (run) or text (not run); no bash block holds a placeholder or an
    [optional] part; a text block of commands is labelled as a synopsis; every substitute's
    line is in the README once; `make demo` runs what the substitute table says."""
    text = README.read_text()
    found = blocks(text)
    assert {b["lang"] for b in found} <= {"bash", "text"}, [b["line"] for b in found if b["lang"] not in ("bash", "text")]
    bash_lines = [line for b in found if b["lang"] == "bash" for line in b["code"].splitlines()]
    for b in found:
        if b["lang"] == "bash":
            bad = [c for c in commands(b["code"]) if PLACEHOLDER.search(c.split(" #")[0])]
            assert not bad, f"README line {b['line']}: not runnable as written: {bad}"
        elif any(line.startswith("vitctl ") for line in b["code"].splitlines()):
            assert "synopsis" in b["before"].lower() or b["code"].startswith("vitctl train (JAX"), f"README line {b['line']}: unlabelled"
    for line in SUBSTITUTES:
        assert bash_lines.count(line) == 1, f"SUBSTITUTES names a line that is not in a README bash block: {line!r}"
    # Indented (unfenced) code that starts with a command would escape the harness.
    indented = [ln for ln in text.splitlines() if re.match(r"    (vitctl|make|python) ", ln)]
    assert not indented, indented
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1)
    assert [ln.strip() for ln in recipe.splitlines()] == MAKE_DEMO


def test_quick_start_is_the_newcomer_path():
    """The Quick start section runs train -> convert -> verify -> probe -> push -> pull -> verify, in that order."""
    quick = [b for b in blocks(README.read_text()) if b["section"].startswith("Quick start") and b["lang"] == "bash"]
    assert quick, "the README has no Quick start bash block"
    words = [w for b in quick for c in commands(b["code"]) if (w := vitctl_words(c))]
    it = iter(words)
    assert all(step in it for step in WORKFLOW), words  # a subsequence, in order


# ----------------------------------------------------------------------------- the run
@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """Every bash block, in order, in one fresh directory; stops at the first failure."""
    box = Sandbox(tmp_path_factory.mktemp("readme"))
    ran = []
    try:
        for b in (b for b in blocks(README.read_text()) if b["lang"] == "bash"):
            r = box.sh("set -x\n" + substituted(b["code"]))
            ran.append((b, r))
            if r.returncode:
                break
        yield box, ran
    finally:
        box.close()


def test_every_bash_block_runs(readme_run):
    _, ran = readme_run
    b, r = ran[-1]
    assert r.returncode == 0, f"README block at line {b['line']} failed ({r.returncode}):\n{r.stderr[-3000:]}"
    assert len(ran) == sum(b["lang"] == "bash" for b in blocks(README.read_text()))


def test_quick_start_left_a_pulled_checkpoint_that_verifies(readme_run):
    """What the newcomer's path leaves: a trained run, its torch twin, a Hub repo, and a pulled copy with
    its provenance, each verify PASSED."""
    box, ran = readme_run
    quick = [r for b, r in ran if b["section"].startswith("Quick start")]
    assert quick and all(r.returncode == 0 for r in quick), quick[-1].stderr[-3000:]
    out = "".join(r.stdout for r in quick)
    assert out.count("PASSED") == 2 and "test accuracy" in out
    rows = [json.loads(line) for line in (box.root / "runs/digits/metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows][-1] == 20
    prov = json.loads((box.root / "ckpt/digits-pulled/config.json").read_text())["provenance"]
    repo = f"{HF_USER}/vit-digits"
    assert prov["source"] == f"hf://{repo}@{box.hub.repos[repo].branches['main']}"
    assert (box.root / "ckpt/digits-pulled/model.safetensors").read_bytes() == (box.root / "ckpt/digits-pt/model.safetensors").read_bytes()
