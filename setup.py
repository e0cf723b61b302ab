"""Build script: the Python packages (``kernels/`` installs as ``fused_optim.kernels``).

Metadata lives in pyproject.toml.
"""
from setuptools import setup

setup(
    packages=["fused_optim", "fused_optim.reference", "fused_optim.kernels", "fused_optim.bench"],
    package_dir={"fused_optim": "fused_optim", "fused_optim.kernels": "kernels"},
)
