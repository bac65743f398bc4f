"""The on-disk cache: atomic builds, damage detection and rebuilds, dead builders' staging folders."""

import os
import subprocess
import sys

import numpy as np
import pytest
from train_support import char_tokenizer

from aha import _cache
from aha.data import resolve_source
from aha.data.tokenized import tokenize_source


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(_cache.CACHE_DIR_ENV, str(tmp_path / "elsewhere"))
    assert _cache.cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv(_cache.CACHE_DIR_ENV)
    assert _cache.cache_dir().parts[-2:] == (".cache", "aha")


def test_a_failed_build_leaves_no_cache_entry_behind(tmp_path):
    target = tmp_path / "model"

    def crash(folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-conversion")

    with pytest.raises(RuntimeError, match="killed"):
        _cache.build_cached(target, crash)
    assert list(tmp_path.iterdir()) == []

    built = _cache.build_cached(target, lambda folder: (folder / "config.json").write_text("{}"))
    assert built == target and (target / "config.json").read_text() == "{}"
    assert _cache.build_cached(target, crash) == target  # cached: the build is not run again
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def weights(folder):
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)


@pytest.mark.parametrize(
    "damage",
    [
        lambda f: (f / "model.safetensors").write_bytes(b"truncated"),
        lambda f: (f / "model.safetensors").write_bytes(bytes([1]) + (f / "model.safetensors").read_bytes()[1:]),
        lambda f: (f / "model.safetensors").unlink(),
        lambda f: (f / _cache.MANIFEST).unlink(),
    ],
    ids=["truncated", "flipped byte", "missing file", "no manifest"],
)
def test_a_damaged_entry_is_rebuilt_with_a_warning(tmp_path, caplog, monkeypatch, damage):
    target = tmp_path / "entry"
    _cache.build_cached(target, weights, "test model")
    damage(target)
    monkeypatch.setattr(_cache, "_hash_checked", set())  # as in a new process: hashes are checked again
    builds = []
    _cache.build_cached(target, lambda folder: (builds.append(1), weights(folder)), "test model")
    assert builds == [1] and "the cached test model at" in caplog.text and "rebuilding" in caplog.text
    assert _cache.entry_problem(target, check_hashes=True) is None


def test_hashes_are_checked_once_per_process_unless_asked(tmp_path, monkeypatch):
    target = tmp_path / "entry"
    _cache.build_cached(target, weights)
    data = (target / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size
    assert _cache.entry_problem(target) is None  # hashed when built in this process: sizes only now
    monkeypatch.setenv("AHA_VERIFY_CACHE", "1")
    assert "SHA-256" in _cache.entry_problem(target)


def test_staging_folders_of_dead_builders_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    stale = tmp_path / f".entry.{dead.stdout.strip()}.abc123"
    stale.mkdir()
    live = tmp_path / f".entry.{os.getpid()}.def456"  # a concurrent builder in this (live) process
    live.mkdir()
    _cache.build_cached(tmp_path / "entry", weights)
    assert not stale.exists() and live.exists()


def test_a_damaged_tokenized_corpus_is_retokenized(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello world " * 50)
    source = resolve_source(str(tmp_path / "docs"), "text")[0]
    tokenizer = char_tokenizer()
    expected = np.array(tokenize_source(source, tokenizer, tmp_path / "cache").tokens)  # a copy, not the memmap
    (entry,) = (tmp_path / "cache" / "tokenized").iterdir()
    tokens = entry / "tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[: tokens.stat().st_size // 2])  # "mmap length is greater than file size"
    again = tokenize_source(source, tokenizer, tmp_path / "cache")
    assert np.array_equal(np.asarray(again.tokens), expected)


_LOAD_KERNEL = """
from aha.kernels._cpp_build import load_cpp_kernel, cpp_kernel_error
assert load_cpp_kernel(), cpp_kernel_error()
"""


@pytest.mark.slow
def test_a_damaged_compiled_kernel_is_rebuilt(tmp_path):
    from aha.kernels import _cpp_build

    if not _cpp_build.load_cpp_kernel():
        pytest.skip(f"no C++ kernel here: {_cpp_build.cpp_kernel_error()}")
    env = {**os.environ, "AHA_CACHE_DIR": str(tmp_path)}
    path = subprocess.run(
        [sys.executable, "-c", "from aha.kernels._cpp_build import _compiler, library_path; print(library_path(_compiler()))"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()
    tmp_path.mkdir(exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x7fELF not really a library")
    result = subprocess.run([sys.executable, "-c", _LOAD_KERNEL], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "does not load" in result.stderr and "rebuilding it" in result.stderr
