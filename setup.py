"""Build description of dflow_fast.

setup.py owns the Python package: what is installed, its metadata, and (once the compiled core
lands) which extension modules are built. Importing dflow_fast never compiles anything.
"""
from setuptools import find_packages, setup

setup(
    name="dflow_fast",
    version="0.1.0",
    description="Fast D-Flow: controlled generation by optimizing the source noise of flow models "
                "through their ODE solve, with an exact discrete adjoint and batched L-BFGS",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dflow_fast", "dflow_fast.*"]) + ["dflow_fast.kernels"],
    package_dir={"dflow_fast.kernels": "kernels"},
    package_data={"dflow_fast.models": ["weights/*.safetensors", "weights/*.json",
                                        "MODEL_CARD.md", "card/*.png"]},
    install_requires=["torch>=2.4", "numpy", "tqdm", "safetensors"],
    extras_require={
        "test": ["pytest", "pytest-benchmark"],
        "data": ["scikit-learn", "mlxtend", "scikit-image", "matplotlib"],
        "bench": ["pytest-benchmark", "matplotlib", "torchdiffeq", "flow_matching"],
    },
    entry_points={"console_scripts": ["dflow-fast = dflow_fast.cli:main"]},
)
