"""Build description of dflow_fast: the installed package and its compiled core.

setup.py owns what `pip install` produces: the Python package, its metadata, and the extension
dflow_fast._C (C++ CPU kernels, plus CUDA kernels when torch is a CUDA build and nvcc is found).
CMakeLists.txt is a developer build of the same sources; both glob csrc/*.cpp and csrc/cuda/*.cu
and read their flags from csrc/flags.txt, so neither list is written twice.

The extension compiles against the torch already installed, so install without build isolation:

    pip install --no-build-isolation -e ".[test,data]"

Environment switches:
    DFLOW_FAST_NO_EXT=1       pure-Python install, no compiler needed (backend "torch" only)
    DFLOW_FAST_CUDA=0|1       skip / force the CUDA kernels (default: built when possible)
    DFLOW_FAST_CUDA_ARCHS     GPU architectures, e.g. "8.0;9.0" (else TORCH_CUDA_ARCH_LIST, else
                              the default in csrc/flags.txt plus the visible GPUs')
    MAX_JOBS                  parallel compile jobs (torch's ninja build)

Importing dflow_fast never compiles anything.
"""
import glob
import os
import re
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "dflow_fast._C"


def read_flags(path=os.path.join(ROOT, "csrc", "flags.txt"), platform=sys.platform):
    """csrc/flags.txt as {kind: [values]}, keeping the entries for this platform (see that file)."""
    flags = {}
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            kind, _, value = line.partition(":")
            kind, _, plat = kind.strip().partition(".")
            if plat and plat != platform:
                continue
            flags.setdefault(kind, []).append(value.strip())
    return flags


def _switch(name):
    """An environment switch: None (unset or "auto"), True ("1") or False ("0")."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"dflow_fast setup: {name}={os.environ[name]!r}; use 0, 1 or unset")


def _cuda_archs(default, torch):
    """The arch list for torch's TORCH_CUDA_ARCH_LIST: the user's, else the default plus the
    architectures of the GPUs visible now (so a local build always runs locally)."""
    for var in ("DFLOW_FAST_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST"):
        if os.environ.get(var, "").strip():
            return ";".join(a for a in re.split(r"[;,\s]+", os.environ[var]) if a)
    archs = [a for entry in default for a in re.split(r"[;,\s]+", entry) if a]
    have = {a.replace("+PTX", "") for a in archs}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = "%d.%d" % torch.cuda.get_device_capability(i)
            if cap not in have:
                archs.append(cap)
                have.add(cap)
    return ";".join(archs)


def extensions():
    """(ext_modules, cmdclass) for the compiled core, or ([], {}) for a pure-Python install."""
    if _switch("DFLOW_FAST_NO_EXT"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        raise SystemExit(
            f"dflow_fast setup: the C++ extension is compiled against the installed torch, which "
            f"cannot be imported here ({e}). Install torch first and then dflow_fast with "
            f"`pip install --no-build-isolation .`, or set DFLOW_FAST_NO_EXT=1 for a pure-Python "
            f"install.") from e

    want_cuda = _switch("DFLOW_FAST_CUDA")
    why_not = None
    if torch.version.cuda is None:
        why_not = f"torch {torch.__version__} is not a CUDA build"
    elif cpp_extension.CUDA_HOME is None:
        why_not = "nvcc was not found (set CUDA_HOME)"
    if want_cuda and why_not:
        raise SystemExit(f"dflow_fast setup: DFLOW_FAST_CUDA=1 but {why_not}.")
    with_cuda = why_not is None and want_cuda is not False

    flags = read_flags()
    # Paths relative to setup.py: setuptools wants them so, and they stay short in build logs.
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # depends: rebuild triggers, and what an sdist carries besides the sources (the CUDA sources
    # too, so an sdist made on a CPU-only machine still builds the CUDA kernels elsewhere).
    depends = sorted(glob.glob(os.path.join("csrc", "*.h")) + [os.path.join("csrc", "flags.txt")]
                     + glob.glob(os.path.join("csrc", "cuda", "*.cuh")))
    compile_args = {"cxx": flags.get("cxx", [])}
    if with_cuda:
        sources += cuda_sources
        # torch adds its own common nvcc flags; drop ours that repeat them.
        compile_args["nvcc"] = [f for f in flags.get("nvcc", [])
                                if f not in cpp_extension.COMMON_NVCC_FLAGS]
        os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_archs(flags.get("cuda_archs", []), torch)
        print(f"dflow_fast: building C++ CPU and CUDA kernels "
              f"(archs {os.environ['TORCH_CUDA_ARCH_LIST']})")
    else:
        depends += cuda_sources
        print(f"dflow_fast: building C++ CPU kernels"
              f"{'' if why_not is None else ' only: ' + why_not}"
              f"{' (DFLOW_FAST_CUDA=0)' if want_cuda is False and why_not is None else ''}")

    make = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext = make(EXT_NAME, sources, depends=depends, extra_compile_args=compile_args,
               extra_link_args=flags.get("link", []))
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extensions()


def version() -> str:
    """__version__ from dflow_fast/_version.py, read without importing the package."""
    text = open(os.path.join(ROOT, "dflow_fast", "_version.py"), encoding="utf-8").read()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)

setup(
    name="dflow_fast",
    version=version(),
    description="Fast D-Flow: controlled generation by optimizing the source noise of flow models "
                "through their ODE solve, with an exact discrete adjoint and batched L-BFGS",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dflow_fast", "dflow_fast.*"]) + ["dflow_fast.kernels"],
    package_dir={"dflow_fast.kernels": "kernels"},
    package_data={"dflow_fast.models": ["weights/*.safetensors", "weights/*.json",
                                        "MODEL_CARD.md", "card/*.png", "MODEL_CARD_QM9.md"]},
    install_requires=["torch>=2.4", "numpy", "tqdm", "safetensors"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", 'triton; platform_system == "Linux"', "pyyaml"],
        "data": ["scikit-learn", "mlxtend", "torchmetrics", "matplotlib"],
        "bench": ["pytest-benchmark", "matplotlib", "torchdiffeq", "flow_matching"],
        # the adapters' libraries: never imported by `import dflow_fast`
        "diffusers": ["diffusers>=0.30"],
        "flow_matching": ["flow_matching"],
        # QM9 (dflow_fast.data.qm9) and the molecule metrics (dflow_fast.molecules)
        "molecules": ["qm9pack", "rdkit"],
    },
    entry_points={"console_scripts": ["dflow-fast = dflow_fast.apps.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
