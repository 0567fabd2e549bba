"""What ``cosytrain prepare`` writes lands with the modes a plain write gives (0644 under umask 022), not
``mkstemp``'s private 0600: shards, their json/list files, the index and spk2embedding.pt are read by
other users (and other machines' jobs) on a shared cluster, like an exported model directory."""

from __future__ import annotations

import os
import stat

from cosytrain.data import prepare as P
from cosytrain.data import shards as S
from tests.data.test_prepare import _args, make_kaldi_corpus


def _modes(root) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()}


def test_prepare_writes_world_readable_shards_and_index(tmp_path):
    src = make_kaldi_corpus(tmp_path / "src", with_bad=False)
    des = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert P.main(_args(src, des)) == 0
    finally:
        os.umask(old)
    modes = _modes(des)
    written = {S.DATA_LIST, S.INDEX_NAME, "spk2embedding.pt", S.shard_name(0), S.utt2parquet_name(0)}
    assert written <= set(modes), sorted(modes)
    assert {name: mode for name, mode in modes.items() if mode != 0o644} == {}


def test_shard_writers_follow_the_umask(tmp_path):
    """The mode is the umask's, as for ``open`` (027 -> 0640: neither mkstemp's 0600 nor a fixed 0644)."""
    rows = [{c: (b"" if c == "audio_data" else [1] if c == "speech_token" else [0.0] if "embedding" in c else "x")
             for c in S.SHARD_COLUMNS}]
    old = os.umask(0o027)
    try:
        S.write_shard(tmp_path / "private.tar", rows)
        S.write_index(tmp_path / S.INDEX_NAME, [{"utt": "x"}])
    finally:
        os.umask(old)
    assert set(_modes(tmp_path).values()) == {0o640}
