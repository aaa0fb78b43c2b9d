"""build_tokens' command line: what it refuses, and that a refusal leaves the files at --out as they were."""

from __future__ import annotations

import gzip
import os
import signal

import pytest

from hetrain.data import build_tokens
from hetrain.data.tokenize import ByteTokenizer, build_token_file, iter_documents


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


def test_a_byte_that_is_not_utf8_is_named_by_its_line_however_far_into_the_file(tmp_path, capsys):
    # The decoder's error counted from its buffer ("byte 5581 of the part read"), naming no line.
    src = tmp_path / "late.txt"
    src.write_bytes(b"plain ascii line\n" * 20_000 + "caf\u00e9\n".encode("latin-1"))
    assert refused(capsys, str(src), "--out", str(tmp_path / "out")).endswith(
        f"{src}:20001 is not UTF-8 text (byte 0xe9 at column 4); convert the file, e.g. iconv -f <its encoding> "
        "-t utf-8\n")


def test_gzip_input_is_told_to_be_decompressed_and_a_byte_order_mark_is_skipped(tmp_path, capsys):
    zipped = tmp_path / "corpus.jsonl.gz"
    zipped.write_bytes(gzip.compress(b'{"text": "x"}\n'))
    assert f"{zipped} is gzip-compressed, not text; decompress it first, e.g. gunzip -c {zipped} > " \
           f"{tmp_path / 'corpus.jsonl'}, and pass that file" in refused(capsys, str(zipped), "--out", "unused")
    for name in ("bom.jsonl", "bom.txt"):  # Windows tools write one; the jsonl failed "Unexpected UTF-8 BOM"
        src = tmp_path / name
        src.write_text('{"text": "first"}\n' if name.endswith("jsonl") else "first\n", encoding="utf-8-sig")
        tf = build_tokens.main([str(src), "--out", str(tmp_path / "bom")])
        assert ByteTokenizer().decode(tf[0][1:-1]) == "first"


def test_a_lone_surrogate_in_a_jsonl_string_names_the_record(tmp_path, capsys):
    # Valid JSON, yet no text: the byte tokenizer failed with a bare UnicodeEncodeError naming no record.
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "fine \\ud83d\\ude00 pair"}\n{"text": "bad \\ud83d half"}\n')
    message = refused(capsys, str(src), "--out", str(tmp_path / "out"))
    assert f"{src}:2: field 'text' holds a lone surrogate '\\ud83d' at character 4" in message
    assert "fix or drop the record" in message


def test_a_whole_file_without_text_is_no_document_as_a_blank_line_is_none(tmp_path, capsys):
    # --whole-files wrote an empty file as a document of bos and eos alone; line mode said "no documents".
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n")
    for mode in ((), ("--whole-files",)):
        assert "no documents to write" in refused(capsys, str(blank), *mode, "--out", str(tmp_path / "out"))
    full = tmp_path / "full.txt"
    full.write_text("text\n")
    assert len(build_tokens.main([str(blank), str(full), "--whole-files", "--out", str(tmp_path / "out")])) == 1


class Encoding:
    """What a Hugging Face ``tokenizers.Tokenizer.encode`` returns: the ids in ``.ids``."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids


class FastLike:
    def encode(self, text: str) -> Encoding:
        return Encoding([7] * len(text))


class Picky:
    vocab_size = 100

    def encode(self, text: str) -> list[int]:
        if "?" in text:
            raise KeyError("unknown character '?'")
        return [5] * len(text)


class Wide:
    def encode(self, text: str) -> list[int]:
        return [70_000] * len(text)


class Opaque:
    def encode(self, text: str) -> object:
        return object()


def test_what_goes_wrong_in_a_tokenizer_names_the_line(tmp_path, capsys, monkeypatch):
    # A tokenizer raising gave a bare traceback; an id past --itemsize 2 named "document 1", not the line.
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "toks.py").write_text(f"from {__name__} import FastLike, Opaque, Picky, Wide\n")
    src = tmp_path / "in.txt"
    src.write_text("fine\n\nwhat?\n")
    out = str(tmp_path / "out")
    assert f"{src}:3: tokenizer Picky failed: KeyError: \"unknown character '?'\"" in refused(
        capsys, str(src), "--tokenizer", "toks:Picky", "--out", out)
    assert f"{src}:1 has token id 70000 outside [0, 65535] of uint16; write with itemsize=4 (uint32; " \
           "build_tokens --itemsize 4)" in refused(capsys, str(src), "--tokenizer", "toks:Wide", "--itemsize", "2",
                                                   "--out", out)
    assert f"{src}:1: tokenizer Opaque returned a object, not token ids; pass one that returns a list of ints, " \
           "e.g. lambda s: tok.encode(s).ids" in refused(capsys, str(src), "--tokenizer", "toks:Opaque", "--out", out)
    # A Hugging Face Encoding failed with "'Encoding' object is not iterable".
    tf = build_tokens.main([str(src), "--tokenizer", "toks:FastLike", "--out", out])
    assert [t.tolist() for t in (tf[0], tf[1])] == [[7] * 4, [7] * 5]


def test_a_lone_carriage_return_stays_in_its_document_and_both_error_paths_number_lines_alike(tmp_path, capsys,
                                                                                              monkeypatch):
    # Universal newlines ended a line at a lone \r: the document was cut in two, and a tokenizer's error named line
    # 4 where a byte that is not UTF-8 on the same line was named line 3.
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "toks.py").write_text(f"from {__name__} import Picky\n")
    src = tmp_path / "in.txt"
    src.write_bytes(b"a stray \r inside\r\nsecond\r\nwhat?\n")  # CRLF line ends are taken off as before
    docs = list(iter_documents([src]))
    assert docs == ["a stray \r inside", "second", "what?"]
    assert [doc.where for doc in docs] == [f"{src}:{n}" for n in (1, 2, 3)]
    out = str(tmp_path / "out")
    assert f"{src}:3: tokenizer Picky failed" in refused(capsys, str(src), "--tokenizer", "toks:Picky", "--out", out)
    src.write_bytes(b"a stray \r inside\r\nsecond\r\ncaf\xe9\n")
    assert f"{src}:3 is not UTF-8 text" in refused(capsys, str(src), "--out", out)


def test_a_json_lines_record_with_a_lone_carriage_return_is_one_record(tmp_path, capsys):
    # A \r is JSON whitespace, but it ended the line: "{"text": "a"," was refused as no JSON record, at line 1.
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "a",\r"id": 1}\r\n{"text": "b"}\r\n{"body": "c"}\n')
    assert f"{src}:3 has no field 'text'" in refused(capsys, str(src), "--out", str(tmp_path / "out"))
    src.write_bytes(b'{"text": "a",\r"id": 1}\r\n{"text": "b"}\r\n')
    tf = build_tokens.main([str(src), "--out", str(tmp_path / "out")])
    assert [ByteTokenizer().decode(tf[i]) for i in range(len(tf))] == ["a", "b"]


class NoModel:
    def __init__(self) -> None:
        raise OSError("Can't load tokenizer: model file 'spm.model' not found")  # as HF and SentencePiece raise


class Terminating:
    """Sends its own process SIGTERM at the second document, as a scheduler stopping the job mid-build does."""

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        if self.calls == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return [5] * len(text)


def test_a_tokenizer_that_fails_to_load_is_named_with_its_own_message(tmp_path, capsys, monkeypatch):
    # An OSError without a path went to the handler for unreadable inputs: "hetrain: None: None; the inputs must be
    # readable and --out ... in a directory you can write".
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "no_model_tok.py").write_text(f"from {__name__} import NoModel\n")
    src = tmp_path / "in.txt"
    src.write_text("text\n")
    err = refused(capsys, str(src), "--tokenizer", "no_model_tok:NoModel", "--out", str(tmp_path / "out"))
    assert err.endswith("error: hetrain: --tokenizer no_model_tok:NoModel failed to load: OSError: Can't load "
                        "tokenizer: model file 'spm.model' not found\n"), err


def test_a_build_stopped_by_sigterm_leaves_no_temporary_file_and_restores_the_handler(tmp_path, capsys, monkeypatch):
    # SIGTERM killed the build outright, leaving out/<name>.bin.<random>.tmp as large as the tokens written so far.
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "sigterm_tok.py").write_text(f"from {__name__} import Terminating\n")
    src, out = tmp_path / "in.txt", tmp_path / "out"
    src.write_text("one\ntwo\nthree\n")
    out.mkdir()
    received = []

    def before(signum: int, frame: object) -> None:  # the handler the build finds, and must put back
        received.append(signum)

    old = signal.signal(signal.SIGTERM, before)
    try:
        with pytest.raises(SystemExit) as exited:
            build_tokens.main([str(src), "--tokenizer", "sigterm_tok:Terminating", "--out", str(out / "c")])
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, old)
    assert exited.value.code == 128 + signal.SIGTERM and not received
    assert list(out.iterdir()) == []
    assert "hetrain: build_tokens stopped by SIGTERM" in capsys.readouterr().err


def test_a_build_repairs_what_one_killed_between_its_renames_left_at_out(tmp_path, capsys):
    # Killed outright (SIGKILL: no handler runs), a build left its new .bin beside the old .idx and the old .bin as
    # out.bin.old.<id>.tmp, as large as the old corpus; later builds at --out never removed it.
    src, empty = tmp_path / "in.txt", tmp_path / "empty.txt"
    src.write_text("one\ntwo\n")
    empty.write_text("")
    out = str(tmp_path / "out")
    build_tokens.main([str(src), "--out", out])
    before = {p.name: p.read_bytes() for p in tmp_path.glob("out.*")}
    age(tmp_path, 100)
    src.write_text("three\nfour\n")
    pid = os.fork()
    if pid == 0:  # the child leaves by SIGKILL or os._exit, never back into pytest
        try:
            real = os.replace

            def replace(src, dst):
                if str(dst).endswith(".idx"):
                    os.kill(os.getpid(), signal.SIGKILL)
                real(src, dst)

            os.replace = replace
            build_tokens.main([str(src), "--out", out])
        finally:
            os._exit(1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in tmp_path.glob("out.*")} != before
    age(tmp_path, 3600)
    with pytest.warns(RuntimeWarning) as warned:
        assert "no documents to write" in refused(capsys, str(empty), "--out", out)
    assert "the old out.bin is back" in str(warned[0].message)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("out.*")} == before


def age(folder, seconds: float) -> None:
    """Every file in ``folder`` as written ``seconds`` earlier."""
    for path in folder.iterdir():
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


def test_json_lines_are_read_by_field_named_json_or_in_capitals(tmp_path, capsys):
    # Hugging Face datasets' to_json writes JSON Lines as .json, and a file may be named .JSONL: both were tokenised
    # as text, braces and field names included, and --field was ignored without a word.
    records = '{"text": "hi", "id": 1}\n{"text": "yo", "id": 2}\n'
    for name in ("hf_export.json", "UPPER.JSONL"):
        (tmp_path / name).write_text(records)
        tf = build_tokens.main([str(tmp_path / name), "--out", str(tmp_path / f"{name}.tokens")])
        assert [ByteTokenizer().decode(tf[i]) for i in range(len(tf))] == ["hi", "yo"], name
    text = tmp_path / "records.txt"
    text.write_text(records)
    assert "--field body names a field of JSON Lines records, but no input is a .jsonl or .json file, and other " \
           "files are read as text; name JSON Lines files .jsonl, or drop --field" in \
        refused(capsys, str(text), "--field", "body", "--out", str(tmp_path / "out"))
    array = tmp_path / "array.json"  # one JSON document, not JSON Lines
    array.write_text('[\n  {"text": "hi"}\n]\n')
    err = refused(capsys, str(array), "--out", str(tmp_path / "out"))
    assert f"{array}:1 is not a JSON record: " in err and "a .jsonl or .json file holds one JSON object per line " \
        "(JSON Lines); convert a JSON array with e.g. jq -c '.[]' in.json > out.jsonl" in err, err


def test_whole_files_reads_a_json_file_as_one_text_document(tmp_path):
    # A code tree's package.json under --whole-files failed as JSON Lines, with no way to read it as text.
    (tmp_path / "main.py").write_text("print('hi')\n")
    (tmp_path / "package.json").write_text('{\n  "name": "demo"\n}\n')
    (tmp_path / "records.jsonl").write_text('{"text": "yo"}\n')
    tf = build_tokens.main([str(tmp_path / n) for n in ("main.py", "package.json", "records.jsonl")] +
                           ["--whole-files", "--out", str(tmp_path / "out")])
    assert [ByteTokenizer().decode(tf[i]) for i in range(len(tf))] == ["print('hi')\n", '{\n  "name": "demo"\n}\n',
                                                                       "yo"]


def test_documents_built_in_python_are_named_by_their_index(tmp_path):
    with pytest.raises(ValueError, match=r"document 1: tokenizer <lambda> failed: ZeroDivisionError"):
        build_token_file(["ok", "boom"], tmp_path / "c", tokenizer=lambda s: [1 // (s != "boom")])


def test_an_out_that_cannot_be_written_and_a_directory_input_are_one_line_each(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("text\n")
    # An --out inside a file: was a raw FileExistsError traceback.
    assert f"File exists: {src}; the inputs must be readable and --out {src}/out in a directory you can write" in \
        refused(capsys, str(src), "--out", str(src / "out"))
    # A directory: was "no such file".
    assert f"{tmp_path}: a directory, not a file; pass the files in it, e.g. {tmp_path}/*.jsonl" in \
        refused(capsys, str(tmp_path), "--out", str(tmp_path / "out"))


def test_a_large_corpus_reports_its_progress_on_stderr(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(build_tokens, "PROGRESS_CHARS", 100)
    src = tmp_path / "in.txt"
    src.write_text("x" * 60 + "\n" + "y" * 60 + "\n" + "z" * 10 + "\n")
    build_tokens.main([str(src), "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hetrain: build_tokens: 2 documents, 0M characters read, at "
                                                   f"{src}:2 (")


class MethodIds:
    """Ids the way SentencePiece's processor gives them: methods, and -1 for "none"."""

    def __init__(self, bos: int, eos: int, vocab: int) -> None:
        self._bos, self._eos, self._vocab = bos, eos, vocab

    def bos_id(self) -> int:
        return self._bos

    def eos_id(self) -> int:
        return self._eos

    def vocab_size(self) -> int:
        return self._vocab

    def encode(self, text: str) -> list[int]:
        return [5] * len(text)


def test_a_tokenizer_with_ids_as_methods_and_minus_one_for_none_builds(tmp_path):
    # Read as attributes, SentencePiece's methods failed: "'<=' not supported between instances of 'method' and
    # 'int'", and with an itemsize given, the method object went into every document as a token id.
    tf = build_token_file(["ab", "c"], tmp_path / "c", MethodIds(bos=1, eos=-1, vocab=70_000))
    assert tf.dtype.itemsize == 4 and [tf[0].tolist(), tf[1].tolist()] == [[1, 5, 5], [1, 5]]
    tf = build_token_file(["ab"], tmp_path / "d", MethodIds(bos=-1, eos=2, vocab=100), itemsize=2)
    assert tf.dtype.itemsize == 2 and tf[0].tolist() == [5, 5, 2]
    assert build_token_file(["ab"], tmp_path / "e", MethodIds(bos=-1, eos=-1, vocab=100)).dtype.itemsize == 2
    with pytest.raises(TypeError, match=r"tokenizer MethodIds's bos_id is '<s>', not an integer; pass bos_id to "
                                        r"build_token_file"):
        build_token_file(["ab"], tmp_path / "f", MethodIds(bos="<s>", eos=-1, vocab=100))
