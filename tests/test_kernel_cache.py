"""Processes sharing one install share one build of the C++ kernels: none rebuilds another's.

A server, an eval and a benchmark started differently (an activated virtualenv or not, so another
ninja; CXX=g++ or c++; taskset) used to rebuild one cache directory in turn. One real build here
(~15-60 s), shared by both tests.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantkit.kernels import cpu_ext

# Loads the kernels and says where from; INFO logging shows when it waits for another's build.
PROBE = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
import torch
from quantkit.kernels import cpu_ext
ok = cpu_ext.available()
print(json.dumps({"available": ok, "directory": str(cpu_ext.build_directory()), "libraries": sorted(torch.ops.loaded_libraries),
                  "bf16": bool(cpu_ext.ops().bf16_available()) if ok else None}))
"""


def probe_env(cache: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "QUANTKIT_CACHE": str(cache), "OMP_WAIT_POLICY": "PASSIVE", **extra}


def run_probe(env: dict[str, str], cwd: Path, prefix: tuple[str, ...] = ()) -> dict:
    run = subprocess.run([*prefix, sys.executable, "-c", PROBE], env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def recording_ninja(bin_dir: Path, log: Path) -> dict[str, str]:
    """A `ninja` first on PATH that records each call and runs the real one: a build runs it, a
    process that loads a finished library never does."""
    real_path = os.environ.get("PATH", "")
    bin_dir.mkdir()
    ninja = bin_dir / "ninja"
    ninja.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\nPATH="{real_path}" exec ninja "$@"\n')
    ninja.chmod(ninja.stat().st_mode | stat.S_IXUSR)
    return {"PATH": f"{bin_dir}{os.pathsep}{real_path}"}


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file of a build directory by inode and mtime: a rebuild or relink changes them."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.iterdir()}


@pytest.fixture(scope="module")
def first_build(tmp_path_factory) -> tuple[Path, dict]:
    """A process in the default configuration builds the kernels into a fresh cache."""
    cache = tmp_path_factory.mktemp("shared_cache")
    env = probe_env(cache)
    env.pop("CXX", None)  # the builder's default compiler, `c++`
    result = run_probe(env, cwd=Path.cwd())
    assert result["available"], "the C++ kernels did not build (a compiler and ninja are needed)"
    return cache, result


def test_a_differently_configured_process_compiles_nothing(first_build, tmp_path):
    cache, first = first_build
    directory = Path(first["directory"])
    before = snapshot(directory)
    ninja_log = tmp_path / "ninja_calls"
    # The same compiler by another name (the build file's `cxx =` line differed), a ninja earlier on
    # PATH (a different ninja hashed the same commands differently), pinned to one core, one thread.
    compiler = os.path.realpath(shutil.which("c++"))
    env = probe_env(cache, CXX=compiler, OMP_NUM_THREADS="1", MAX_JOBS="1", **recording_ninja(tmp_path / "bin", ninja_log))
    pin = ("taskset", "-c", "0") if shutil.which("taskset") else ()
    second = run_probe(env, cwd=tmp_path, prefix=pin)
    assert second["available"] and second["bf16"] == first["bf16"]
    assert second["directory"] == first["directory"]  # one key for both configurations
    assert not ninja_log.exists(), f"the second process ran ninja: {ninja_log.read_text()}"
    assert snapshot(directory) == before  # not a file rebuilt, relinked or touched
    assert second["libraries"] == [str(directory / json.loads((directory / cpu_ext.MARKER).read_text())["library"])]
    assert sorted(p.name for p in (cache / "cpu_kernels").iterdir() if p.is_dir()) == [directory.name]


def test_a_process_waits_for_a_build_in_progress_and_loads_it(first_build, tmp_path, monkeypatch):
    # Two processes starting at once on a fresh cache: the second waits for the first's build.
    # Here the test is the first: it holds the build lock, then publishes a finished build.
    built, _ = first_build
    cache = tmp_path / "cache"
    monkeypatch.setenv("QUANTKIT_CACHE", str(cache))
    directory = cpu_ext.build_directory()
    ninja_log, stderr = tmp_path / "ninja_calls", tmp_path / "stderr"
    env = probe_env(cache, **recording_ninja(tmp_path / "bin", ninja_log))
    with cpu_ext._build_lock(directory), open(stderr, "w") as err:
        waiter = subprocess.Popen([sys.executable, "-c", PROBE], env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        deadline = time.monotonic() + 300
        while "waiting for another process's build" not in stderr.read_text():
            assert waiter.poll() is None, f"it did not wait: {stderr.read_text()}"
            assert time.monotonic() < deadline, "it never reached the lock"
            time.sleep(0.2)
        shutil.copytree(built / "cpu_kernels" / directory.name, directory)
    out, _ = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, stderr.read_text()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["available"] and result["directory"] == str(directory)
    assert not ninja_log.exists(), f"the waiting process ran ninja: {ninja_log.read_text()}"
    assert result["libraries"] == [str(directory / "quantkit_cpu_kernels.so")]
