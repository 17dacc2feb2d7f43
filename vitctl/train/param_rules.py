"""The name rules of the optimizers, shared by vitctl.train.optim (optax) and
vitctl.train.torch_optim (torch): which parameters are the head and the embeddings, the
layer ids of layer-wise lr decay and the parameters --freeze holds fixed. Stdlib only (no
jax, no torch), so both backends use the one copy.

Names are JAX paths, stacked (`blocks/q/kernel`).
"""

from __future__ import annotations

import fnmatch

from vitctl.errors import ConfigError

HEAD = ("head",)  # the classifier: a new head when fine-tuning to other classes
ALL_BUT_HEAD = "all-but-head"
EMBEDDINGS = ("patch_embed", "pos_embed", "cls_token", "norm_pre")  # layer id 0 for layer decay


def frozen_names(names: list[str], freeze: str) -> set[str]:
    """The parameter names (JAX paths, `blocks/q/kernel`) that --freeze PATTERNS holds fixed.

    PATTERNS: a comma list of `all-but-head` and globs on the paths (`blocks/*`, `patch_embed/*`;
    a glob that names a module, `patch_embed`, covers everything under it). A pattern that
    matches nothing is refused (a typo would otherwise train what it meant to freeze)."""
    patterns = [p.strip() for p in freeze.split(",") if p.strip()]
    out: set[str] = set()
    for pattern in patterns:
        if pattern == ALL_BUT_HEAD:
            hit = {n for n in names if n.split("/")[0] not in HEAD}
        else:
            hit = {n for n in names if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, pattern.rstrip("/") + "/*")}
        if not hit:
            raise ConfigError(
                f"--freeze {pattern!r} matches no parameter",
                hint=f"use {ALL_BUT_HEAD} or globs on parameter paths, e.g. blocks/*, patch_embed/*",
            )
        out |= hit
    if patterns and out == set(names):
        raise ConfigError(f"--freeze {freeze!r} freezes every parameter: nothing would train", hint=f"e.g. --freeze {ALL_BUT_HEAD}")
    return out


def layer_id(name: str, depth: int) -> int | None:
    """BEiT / big_vision layer ids: 0 the embeddings, None a stacked block parameter (ids 1..L
    along its leading axis), L+1 everything after the blocks (final norm, MAP head, head)."""
    top = name.split("/")[0]
    if top in EMBEDDINGS:
        return 0
    return None if top == "blocks" else depth + 1
