"""The ``minidisagg`` command line (in-process where possible) and the model cache's error messages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minidisagg.cli import main
from minidisagg.models.fetch import SMOLLM2_GGUF, cached_path, fetch
from minidisagg.models.registry import known_models, load_model

TRUNCATED_BYTES = 1 << 20


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Rich wraps at the terminal width (80 when captured); a wide one keeps each message on one line."""
    monkeypatch.setenv("COLUMNS", "400")


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """Run ``minidisagg ARGV`` in-process; returns (exit code, stdout + stderr with whitespace collapsed)."""
    code = main(list(argv))
    captured = capsys.readouterr()
    text = " ".join((captured.out + captured.err).split())
    assert "Traceback" not in text, text
    return code, text


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    """``MINIDISAGG_CACHE`` pointed at an empty folder."""
    monkeypatch.setenv("MINIDISAGG_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def truncated_cache(smollm2_gguf, empty_cache) -> Path:
    """A cache holding only the first 1 MiB of the GGUF where the full file belongs; returns that path."""
    target = cached_path(SMOLLM2_GGUF)
    assert empty_cache in target.parents
    target.parent.mkdir(parents=True)
    with open(smollm2_gguf, "rb") as f:
        target.write_bytes(f.read(TRUNCATED_BYTES))
    return target


# ---------------------------------------------------------------- doctor and fetch


def test_doctor_reports_versions_and_cached_model(capsys, smollm2_gguf):
    code, out = run_cli(capsys, "doctor")
    assert code == 0
    assert "torch" in out and torch.__version__ in out
    assert "python" in out
    assert str(smollm2_gguf.parents[2]) in out  # the cache folder
    assert "smollm2-135m" in out and "cached (93.8 MiB)" in out
    assert "compile_cpu" in out and ("available" in out or "no C++ compiler" in out)
    assert "native CPU kernels" in out and ("built" in out or "reference kernels" in out)


def test_doctor_says_when_compile_cpu_cannot_run(capsys, monkeypatch):
    from minidisagg.engine import compiled

    monkeypatch.setattr(compiled, "cxx_compiler", lambda: None)
    code, out = run_cli(capsys, "doctor")
    assert code == 0 and "no C++ compiler" in out
    assert "no C++ compiler: the CPU runs torch's reference kernels" in out


def test_doctor_reports_empty_cache(capsys, empty_cache):
    code, out = run_cli(capsys, "doctor")
    assert code == 0
    assert str(empty_cache) in out
    assert "not cached" in out and "minidisagg fetch smollm2-135m" in out


def test_fetch_verifies_cached_model(capsys, smollm2_gguf):
    code, out = run_cli(capsys, "fetch", "smollm2-135m")
    assert code == 0
    assert "sha256 verified" in out
    assert smollm2_gguf.name in out.replace(" ", "")


def test_fetch_unknown_model_lists_known_names(capsys):
    code, out = run_cli(capsys, "fetch", "nope")
    assert code == 2
    assert "unknown model 'nope'" in out
    for name in known_models():
        assert name in out


@pytest.mark.parametrize("name", ["tiny", "llama-8b"])
def test_fetch_random_preset_has_nothing_to_fetch(capsys, empty_cache, name):
    code, out = run_cli(capsys, "fetch", name)
    assert code == 0
    assert "random weights" in out and "nothing to fetch" in out
    assert not any(empty_cache.iterdir()), "fetching a random preset wrote to the cache"


def test_fetch_corrupt_cache_exits_2(capsys, truncated_cache):
    code, out = run_cli(capsys, "fetch", "smollm2-135m")
    assert code == 2
    assert "error:" in out and "truncated" in out and "minidisagg fetch" in out


# ---------------------------------------------------------------- generate


def test_generate_unknown_model_exits_2(capsys):
    code, out = run_cli(capsys, "generate", "--model", "nope", "--prompt", "hi", "--device", "cpu")
    assert code == 2
    assert "error:" in out and "unknown model 'nope'" in out
    assert "smollm2-135m" in out  # says what would work


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--max-tokens", "0"], "max_tokens must be an integer >= 1"),
        (["--max-tokens", "-5"], "max_tokens must be an integer >= 1"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--top-k", "0"], "top_k must be -1"),
        (["--temperature", "-1"], "temperature must be >= 0"),
    ],
)
def test_generate_bad_sampling_flags_exit_2(capsys, flags, fragment):
    code, out = run_cli(capsys, "generate", "--prompt", "hi", "--device", "cpu", *flags)
    assert code == 2
    assert "error:" in out and fragment in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a missing CUDA device")
def test_generate_cuda_without_gpu_exits_2(capsys):
    code, out = run_cli(capsys, "generate", "--model", "tiny", "--prompt", "hi", "--device", "cuda")
    assert code == 2
    assert "no CUDA device" in out


def test_generate_without_prompt_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate"])
    assert info.value.code == 2
    assert "--prompt" in capsys.readouterr().err


def test_generate_tiny_streams_text_and_stats(capsys, smollm2_gguf):
    """The random ``tiny`` preset runs the whole generate path in-process cheaply (tokenizer from SmolLM2)."""
    code, out = run_cli(capsys, "generate", "--model", "tiny", "--prompt", "hi", "--max-tokens", "4",
                        "--device", "cpu")
    assert code == 0
    assert "tokens, finish=" in out and "TTFT" in out
    code, out = run_cli(capsys, "generate", "--model", "tiny", "--prompt", "hi", "--max-tokens", "4",
                        "--device", "cpu", "--quiet", "--temperature", "0.8", "--seed", "1")
    assert code == 0
    assert "finish=" not in out


@pytest.mark.slow
def test_console_script_generates_paris(smollm2_gguf):
    """One end-to-end run of the installed ``minidisagg`` script on the real model."""
    script = Path(sys.executable).parent / "minidisagg"
    if not script.exists():
        script = Path(shutil.which("minidisagg") or "minidisagg")
    env = dict(os.environ, MINIDISAGG_CACHE=str(smollm2_gguf.parents[2]))
    proc = subprocess.run(
        [str(script), "generate", "--prompt", "What is the capital of France?", "--chat", "--max-tokens", "20",
         "--device", "cpu"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- the cache's error messages


def test_truncated_cache_is_reported_not_replaced(truncated_cache):
    for download in (False, True):  # a corrupt file is never silently re-downloaded over
        with pytest.raises(ValueError, match="minidisagg fetch") as info:
            fetch(SMOLLM2_GGUF, download=download)
        assert "truncated" in str(info.value) and str(truncated_cache) in str(info.value)
    with pytest.raises(ValueError, match="minidisagg fetch"):
        load_model("smollm2-135m", device="cpu", download=False)
    assert truncated_cache.stat().st_size == TRUNCATED_BYTES


def test_right_size_wrong_hash_is_reported(empty_cache):
    target = cached_path(SMOLLM2_GGUF)
    target.parent.mkdir(parents=True)
    with open(target, "wb") as f:
        f.truncate(SMOLLM2_GGUF.size_bytes)  # sparse: the right size, all zeros
    with pytest.raises(ValueError, match="minidisagg fetch") as info:
        fetch(SMOLLM2_GGUF, download=False)
    assert "sha256" in str(info.value) and "corrupt" in str(info.value)


def test_empty_cache_without_download_says_how_to_fetch(empty_cache):
    with pytest.raises(ValueError, match="minidisagg fetch") as info:
        fetch(SMOLLM2_GGUF, download=False)
    assert "not in the cache" in str(info.value)
    assert str(cached_path(SMOLLM2_GGUF)) in str(info.value)  # where to copy the file by hand
    with pytest.raises(ValueError, match="minidisagg fetch"):
        load_model("smollm2-135m", device="cpu", download=False)
    assert not any(empty_cache.rglob("*.gguf"))
