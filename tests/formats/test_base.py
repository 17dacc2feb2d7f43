"""vitctl.formats.base: sizes, Hugging Face cache paths, write errors that name file and tensor."""

import pytest

from vitctl.errors import CheckpointError, ConfigError
from vitctl.formats.base import guarded, hf_snapshot, parse_size


@pytest.mark.parametrize(
    "text,n",
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("123", 123),
        ("64kib", 65536),
        ("10 MB", 10**7),
        (4096, 4096),
    ],
)
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "5XB", "-1GB", "0", "GB", "5 G B"])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError, match="invalid size") as e:
        parse_size(text)
    assert "5GB" in e.value.hint and e.value.exit_code == 2


def test_hf_snapshot_names_the_repo_and_revision():
    sha = "a" * 40
    assert hf_snapshot(f"/root/.cache/huggingface/hub/models--me--tiny/snapshots/{sha}/params") == f"me/tiny@{sha}"
    assert hf_snapshot(f"/root/.cache/huggingface/hub/datasets--me--d/snapshots/{sha}") is None  # a data set: no model to load
    assert hf_snapshot("/data/ckpt") is None


def test_guarded_names_the_file_and_what_was_written(tmp_path):
    with pytest.raises(CheckpointError, match=f"cannot write the header to {tmp_path}/x: ") as e:
        guarded(tmp_path / "x", "the header", lambda: (tmp_path / "missing" / "x").write_bytes(b""))
    assert "ulimit -f" in e.value.hint
