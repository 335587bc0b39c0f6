"""`influence --batch`, `generate` and `embed` with bad input: one clear line, the right exit code,
no model loaded for input that cannot run, and an --output file that a failed run leaves alone."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

GEN = ["--max-tokens", "4", "--temperature", "0"]
MISSING_MODEL = ["-m", "/nonexistent/model.gguf"]  # a run that got as far as loading would fail on it


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "influence_tui", *args], capture_output=True, text=True, timeout=300, **kw)


def _run_bytes(args, stdin=b""):
    """For bytes on stdin or in argv (not UTF-8): output decoded afterwards."""
    out = subprocess.run([sys.executable, "-m", "influence_tui", *args], input=stdin, capture_output=True, timeout=300)
    return subprocess.CompletedProcess(out.args, out.returncode, out.stdout.decode(), out.stderr.decode())


def _one_line_error(out, code, *words):
    assert out.returncode == code, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    for word in words:
        assert word in out.stderr, out.stderr


def _rows(text):
    return [json.loads(line) for line in text.splitlines()]


# --- 1. --output is replaced only by a run that keeps its results ---------------------------------


def test_a_failed_run_keeps_the_old_output_and_a_good_one_replaces_it(tmp_path):
    (tmp_path / "ok.txt").write_text("Say hi.\n")
    keep = tmp_path / "keep.jsonl"
    old = b'{"id": 1, "text": "yesterday"}\n'
    keep.write_bytes(old)
    keep.chmod(0o640)
    out = _run(["--batch", "ok.txt", *MISSING_MODEL, "--output", "keep.jsonl"], cwd=tmp_path)
    _one_line_error(out, 1, "nonexistent")
    assert keep.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.jsonl", "ok.txt"]  # no temp file left behind
    out = _run(["--batch", "ok.txt", *GEN, "--output", "keep.jsonl"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    rows = _rows(keep.read_text())
    assert len(rows) == 1 and rows[0]["id"] == 1 and rows[0]["text"]
    assert keep.stat().st_mode & 0o777 == 0o640  # the file's permissions survive the replacement
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.jsonl", "ok.txt"]


def test_a_run_where_every_prompt_fails_keeps_the_old_output(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "hi", "temprature": 0.1}\n')
    keep = tmp_path / "keep.jsonl"
    keep.write_bytes(b"precious\n")
    out = _run(["--batch", "bad.jsonl", *MISSING_MODEL, "--output", "keep.jsonl"], cwd=tmp_path)
    # the line is wrong, so no model is needed to say so (the missing one is never looked for)
    _one_line_error(out, 1, "temprature", "keep.jsonl")
    assert keep.read_bytes() == b"precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "keep.jsonl"]


def test_an_unwritable_output_is_reported_before_the_model_loads(tmp_path):
    (tmp_path / "ok.txt").write_text("Say hi.\n")
    target = tmp_path / "no-such-folder" / "out.jsonl"
    out = _run(["--batch", str(tmp_path / "ok.txt"), *MISSING_MODEL, "--output", str(target)])
    _one_line_error(out, 2, str(target))
    assert "nonexistent" not in out.stderr
    out = _run(["--batch", str(tmp_path / "ok.txt"), *MISSING_MODEL, "--output", str(tmp_path)])
    _one_line_error(out, 2, "folder")


@pytest.mark.skipif(os.name != "posix", reason="sends SIGINT")
def test_ctrl_c_after_an_answer_keeps_the_finished_answers(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"id": "quick", "prompt": "Say hi.", "max_tokens": 1}\n'
                                       '{"id": "long", "prompt": "Tell a long story.", "max_tokens": 100000, "ignore_eos": true}\n')
    keep = tmp_path / "keep.jsonl"
    keep.write_bytes(b"old\n")
    proc = subprocess.Popen([sys.executable, "-m", "influence_tui", "--batch", "in.jsonl", "--temperature", "0", "--output", "keep.jsonl"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        # results are written (and flushed) as they finish: wait for the first one in the temp file
        while not any(p.name.startswith("keep.jsonl.") and p.stat().st_size for p in tmp_path.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert [r["id"] for r in _rows(keep.read_text())] == ["quick"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "keep.jsonl"]


# --- 2 and 3. strict JSONL fields, real line numbers ----------------------------------------------


def test_bad_fields_are_named_with_their_real_line_numbers(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        "Say hi.\n"  # 1
        "\n"
        "   \n"
        "{broken\n"  # 4
        '{"prompt": "x", "temprature": 0.1}\n'  # 5
        '{"prompt": "x", "max_new_tokens": 3}\n'  # 6
        '{"prompt": "x", "ignore_eos": "false"}\n'  # 7
        '{"prompt": "x", "system": 123}\n'  # 8
        '{"id": "fine", "prompt": "Say yes.", "ignore_eos": false, "system": "Be brief."}\n'  # 9
    )
    out = _run(["--batch", str(src), *GEN])
    assert out.returncode == 0, out.stderr
    rows = _rows(out.stdout)
    assert [r["id"] for r in rows] == [1, 4, 5, 6, 7, 8, "fine"]
    errors = {r["id"]: r.get("error") for r in rows}
    assert errors[4].startswith("line 4: invalid JSON")
    assert errors[5].startswith("line 5: unknown field 'temprature'")
    assert errors[6].startswith("line 6: unknown field 'max_new_tokens'")
    assert errors[7] == "line 7: ignore_eos must be true or false"
    assert errors[8] == "line 8: system must be a string"
    assert rows[0]["text"] and rows[-1]["text"]


def test_a_lone_surrogate_in_one_line_does_not_fail_the_others(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "\\udcce"}\nSay hi.\n')
    out = _run(["--batch", str(src), *GEN])
    assert out.returncode == 0, out.stderr
    bad, good = _rows(out.stdout)
    assert bad["error"].startswith("line 1: prompt") and good["text"], (bad, good)


# --- 4. nothing to do -----------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "\n  \n\t\n"])
def test_an_empty_batch_file_is_an_error(tmp_path, content):
    src = tmp_path / "empty.txt"
    src.write_text(content)
    _one_line_error(_run(["--batch", str(src), *MISSING_MODEL]), 2, f"no prompts in {src}")


def test_empty_stdin_batch_is_an_error():
    _one_line_error(_run(["--batch", "-", *MISSING_MODEL], input=""), 2, "no prompts in standard input")


# --- 5. bytes that are not UTF-8 ------------------------------------------------------------------


def test_a_batch_file_that_is_not_utf8_is_named(tmp_path):
    src = tmp_path / "junk.bin"
    src.write_bytes(b"\xce\nSay hi.\n")
    _one_line_error(_run(["--batch", str(src), *MISSING_MODEL]), 2, f"{src} is not UTF-8 text (byte 0xce at offset 0)")
    src.write_bytes(b"\xef\xbb\xbfSay hi.\n\xff\n")  # a BOM is allowed; the offset still counts from the file's start
    _one_line_error(_run(["--batch", str(src), *MISSING_MODEL]), 2, f"{src} is not UTF-8 text (byte 0xff at offset 11)")


def test_stdin_that_is_not_utf8_is_refused():
    for args in (["--batch", "-"], ["generate", "-"]):
        out = _run_bytes([*args, *MISSING_MODEL], stdin=b"Say hi.\n\xce\n")
        _one_line_error(out, 2, "standard input is not UTF-8 text (byte 0xce at offset 8)")
        assert out.stdout == ""


def test_a_prompt_argument_that_is_not_utf8_is_refused():
    _one_line_error(_run_bytes(["generate", b"hi \xce", *MISSING_MODEL]), 2, "the prompt is not UTF-8 text")


def test_generate_from_stdin_still_works():
    out = _run(["generate", "-", *GEN], input="Say hi.\n")
    assert out.returncode == 0 and out.stdout.strip(), out.stderr


# --- 6. embed -------------------------------------------------------------------------------------


def test_embed_refuses_empty_texts():
    _one_line_error(_run(["embed", ""]), 2, "text 1 is empty")
    _one_line_error(_run(["embed", "hello", "  "]), 2, "text 2 is empty")
    _one_line_error(_run(["embed", "-"], input=""), 2, "text 1 is empty")


def test_embed_dash_reads_stdin():
    piped = _run(["embed", "-"], input="The cat sat on the mat.")
    direct = _run(["embed", "The cat sat on the mat."])
    assert piped.returncode == direct.returncode == 0, (piped.stderr, direct.stderr)
    assert json.loads(piped.stdout)["embeddings"] == json.loads(direct.stdout)["embeddings"]
    _one_line_error(_run_bytes(["embed", "-"], stdin=b"\xff"), 2, "standard input is not UTF-8 text")
    _one_line_error(_run(["embed", "-", "-"], input="x"), 2, "only once")
