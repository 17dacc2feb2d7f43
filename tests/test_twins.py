"""The twin models line up: after framework tokens are normalised, most lines of
vitctl/model_jax/model.py and vitctl/model_torch/model.py are the same line.

Run as a script for the report: `python tests/test_twins.py [-v]` (-v prints the
side-by-side diff of the normalised lines, `|` marking lines that differ).
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JAX, TORCH = ROOT / "vitctl/model_jax/model.py", ROOT / "vitctl/model_torch/model.py"
FLOOR = 0.70  # the share reached; raise it as the twins converge

# Each side's spelling -> one neutral spelling. Applied in order, as regexes.
COMMON = [
    (r"#.*$", ""),  # comments explain each side's own code; the code is what pairs up
    (r"\s+$", ""),
]
JAX_TOKENS = [
    (r"\bnnx\.Module\b", "Module"),
    (r"\bnnx\.Param\b", "Param"),
    (r"\bnnx\.initializers\b", "init"),
    (r"\bjax\.nn\.", "F."),
    (r"\bjax\.lax\.", "F."),
    (r"\bjnp\.", "fw."),
    (r"\bjax\.", "fw."),
    (r"\bnnx\.", "fw."),
    (r"def __call__\(", "def forward("),
    (r"\[\.\.\.\]", ""),  # NNX variable read
    # rngs plumbing and logical-axis (sharding) annotations: NNX-only, no torch counterpart.
    (r",\s*\*,\s*(rngs(: \w+\.Rngs)?|axis)\)", ")"),
    (r",\s*(axes|rngs)\b(?!=)", ""),
    (r",\s*axes=\([^)]*\)", ""),
    (r",\s*axis=\"\w+\"", ""),
    (r",\s*out_sharding=(\([^)]*\)|[\w.]+(\[[^\]]*\])?)", ""),
    (r",\s*rngs=(rngs|fw\.Rngs\(\w*\))", ""),
    (r"\(rngs=rngs\)", "()"),
    (r"\b(kernel|scale)\b", "weight"),  # parameter leaf names (the mapping renames them)
    (r"\.astype\(", ".to("),
    (r"\bkeepdims=", "keepdim="),
    (r"\bjnp\b", "fw"),
]
TORCH_TOKENS = [
    (r"\bnn\.Module\b", "Module"),
    (r"\bnn\.Parameter\b", "Param"),
    (r"\bnn\.init\b", "init"),
    (r"\btorch\.nn\.functional\b", "F"),
    (r"\btorch\.", "fw."),
    (r"\bnn\.", "fw."),
    (r"^\s*super\(\)\.__init__\(\)$", ""),
    (r"\bkeepdim=", "keepdim="),
    # F is the mlp_dim shape letter on both sides; torch spells it F_ because F names its functional module.
    (r"\bF_\b", "F"),
    (r"\btorch\b", "fw"),
]


def normalise(text: str, tokens) -> list[str]:
    """Code lines (no blanks, no comments), each side's framework spelling made neutral.

    Only spellings that one framework forces are rewritten: module and API names, NNX's rngs
    and sharding arguments, parameter leaf names, and the mlp_dim letter F, which torch code
    spells F_ because F is its functional module. Docstrings stay as written."""
    out = []
    for line in text.splitlines():
        for pat, rep in COMMON + tokens:
            line = re.sub(pat, rep, line)
        if line.strip():
            out.append(line)
    return out


def pairing(a: list[str], b: list[str]) -> tuple[float, list[tuple[str, str, str]]]:
    """(share of lines that pair with an identical line on the other side, side-by-side rows).

    The share is 2 * paired / (len(a) + len(b)), over difflib's longest matching blocks."""
    sm = difflib.SequenceMatcher(None, a, b, autojunk=False)
    rows, paired = [], 0
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            paired += i2 - i1
            rows += [(x, " ", y) for x, y in zip(a[i1:i2], b[j1:j2])]
        else:
            n = max(i2 - i1, j2 - j1)
            left, right = a[i1:i2] + [""] * (n - (i2 - i1)), b[j1:j2] + [""] * (n - (j2 - j1))
            rows += [(x, "|" if x and y else ("<" if x else ">"), y) for x, y in zip(left, right)]
    return 2 * paired / (len(a) + len(b)), rows


def score() -> tuple[float, list[tuple[str, str, str]], int, int]:
    a, b = normalise(JAX.read_text(), JAX_TOKENS), normalise(TORCH.read_text(), TORCH_TOKENS)
    s, rows = pairing(a, b)
    return s, rows, len(a), len(b)


def test_pairing_helper_counts_identical_lines():
    a, b = ["x", "y", "z", "w"], ["x", "q", "z", "w"]
    assert pairing(a, b)[0] == 0.75
    jax_line = "        self.q = Dense(cfg, (D,), (N, K), rngs=rngs)"
    torch_line = "        self.q = Dense(cfg, (D,), (N, K))"
    assert normalise(jax_line, JAX_TOKENS) == normalise(torch_line, TORCH_TOKENS)
    assert normalise("class A(nnx.Module):", JAX_TOKENS) == normalise("class A(nn.Module):", TORCH_TOKENS)


def test_twin_models_line_up():
    s = score()[0]
    assert s >= FLOOR, f"only {s:.1%} of the twin models' lines pair up (floor {FLOOR:.0%}); run `python tests/test_twins.py -v`"


if __name__ == "__main__":
    s, rows, na, nb = score()
    if "-v" in sys.argv:
        w = 78
        for x, mark, y in rows:
            print(f"{x[:w]:<{w}} {mark} {y[:w]}")
    print(f"paired: {s:.1%} (jax {na} code lines, torch {nb})")
