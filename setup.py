"""Build and install pykernels.

Pure Python always; the CUDA extension ``pykernels._C`` through CMake + pybind11 when ``nvcc`` is
found. ``PYKERNELS_BUILD_EXT=1`` forces the extension (fail if it cannot build), ``=0`` skips it,
unset means "when nvcc is found". ``PYKERNELS_CUDA_ARCHS`` overrides the targets (default 90a).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _find_nvcc() -> str | None:
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def _want_extension() -> bool:
    mode = os.environ.get("PYKERNELS_BUILD_EXT", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"PYKERNELS_BUILD_EXT: expected 0, 1 or unset, got {mode!r}")
    nvcc = _find_nvcc()
    if mode == "1" and nvcc is None:
        sys.exit("PYKERNELS_BUILD_EXT=1 but nvcc was not found (set CUDACXX or put nvcc on PATH)")
    if mode == "0" or nvcc is None:
        print("pykernels: installing pure Python (no CUDA extension: "
              + ("PYKERNELS_BUILD_EXT=0" if mode == "0" else "nvcc not found") + ")")
        return False
    return True


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        import pybind11

        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPK_OUTPUT_DIR={out_dir}",
            f"-DCMAKE_CUDA_COMPILER={_find_nvcc()}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if archs := os.environ.get("PYKERNELS_CUDA_ARCHS"):
            configure.append(f"-DCMAKE_CUDA_ARCHITECTURES={archs}")
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        subprocess.run(configure, check=True)
        jobs = str(max(1, os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


setup(
    ext_modules=[Extension("pykernels._C", sources=[])] if _want_extension() else [],
    cmdclass={"build_ext": CMakeBuild},
)
