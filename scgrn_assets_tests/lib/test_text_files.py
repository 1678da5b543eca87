"""The one text opener: plain and gzip-compressed files read the same."""

from __future__ import annotations

import gzip

from scgrn_assets.lib.text_files import open_text


def test_plain_and_gzip_text_read_the_same(tmp_path):
    text = "TF\ttarget\nSOX2\tPAX6 – ß\n"
    (tmp_path / "edges.txt").write_text(text, encoding="utf-8")
    with gzip.open(tmp_path / "edges.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write(text)
    for name in ("edges.txt", "edges.txt.gz"):
        with open_text(tmp_path / name) as handle:
            assert handle.read() == text
