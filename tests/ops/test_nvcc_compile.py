"""Compile check of the CUDA kernels (csrc/cuda/*.cu) with nvcc, which needs no GPU and no CUDA
build of torch: the CPU wheel ships the ATen/c10 CUDA headers. A machine without a GPU thus still
catches a CUDA source that does not compile. Skipped when nvcc is not on PATH.

The command mirrors a torch extension build: torch's include dirs, Python's, the defines
torch.utils.cpp_extension adds (TORCH_EXTENSION_NAME, TORCH_API_INCLUDE_EXTENSION_H, its common
nvcc flags) and the nvcc flags of csrc/flags.txt, for one architecture (sm_90, the H100).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NVCC = shutil.which("nvcc")
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: the CUDA sources are "
                                                     "not compile-checked here")


def nvcc_flags() -> list[str]:
    """The `nvcc` entries of csrc/flags.txt for this platform (format described in that file)."""
    out = []
    for raw in (ROOT / "csrc" / "flags.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        kind, _, value = line.partition(":")
        kind, _, plat = kind.strip().partition(".")
        if kind == "nvcc" and plat in ("", sys.platform):
            out.append(value.strip())
    return out


def nvcc_command(src: Path, obj: Path) -> list[str]:
    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    flags = nvcc_flags()
    cmd = [NVCC, "-c", str(src), "-o", str(obj), "-std=c++17", "-arch=sm_90",
           "-Xcompiler", "-fPIC", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
           *(f"-I{p}" for p in includes),
           *flags, *(f for f in cpp_extension.COMMON_NVCC_FLAGS if f not in flags)]
    # CPU wheels lack the header torch generates for its CUDA build; its one macro only matters
    # for Windows DLL exports, so the include can be skipped for a Linux compile check.
    torch_inc = Path(includes[0])
    if not (torch_inc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return cmd


def test_cuda_sources_exist():
    assert CU_FILES, "no csrc/cuda/*.cu found"


def test_nvcc_compiles_every_cuda_source(tmp_path):
    def compile_one(src: Path):
        cmd = nvcc_command(src, tmp_path / (src.stem + ".o"))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        return src, cmd, proc

    # Files compile in parallel (each nvcc run is single-threaded and takes tens of seconds).
    with ThreadPoolExecutor(max_workers=max(1, min(len(CU_FILES), 4))) as pool:
        results = list(pool.map(compile_one, CU_FILES))
    failed = [(src, cmd, proc) for src, cmd, proc in results if proc.returncode != 0]
    if failed:
        pytest.fail("\n\n".join(
            f"nvcc failed on {src.relative_to(ROOT)} (exit {proc.returncode}):\n"
            f"$ {' '.join(cmd)}\n{proc.stderr[-20000:]}" for src, cmd, proc in failed),
            pytrace=False)
    for src, _, _ in results:
        assert (tmp_path / (src.stem + ".o")).stat().st_size > 0
