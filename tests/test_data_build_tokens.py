"""build_tokens' command line: what it refuses, and that a refusal leaves the files at --out as they were."""

from __future__ import annotations

import pytest

from hetrain.data import build_tokens


def refused(capsys, *argv: str) -> str:
    """The one line ``build_tokens`` prints when it refuses ``argv`` (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as exited:
        build_tokens.main(list(argv))
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_an_input_without_documents_leaves_an_existing_corpus_as_it_was(tmp_path, capsys):
    # An empty input replaced the corpus at --out with an empty one, then deleted it: "nothing written".
    src, empty = tmp_path / "in.txt", tmp_path / "empty.txt"
    src.write_text("one document\nanother\n")
    empty.write_text("\n  \n")
    out = tmp_path / "corpus"
    build_tokens.main([str(src), "--out", str(out)])
    before = {p.name: p.read_bytes() for p in tmp_path.glob("corpus.*")}
    assert sorted(before) == ["corpus.bin", "corpus.idx"]
    message = refused(capsys, str(empty), "--out", str(out))
    assert "no documents to write" in message and "left as they were" in message
    assert {p.name: p.read_bytes() for p in tmp_path.glob("corpus*")} == before  # no temporary left either
