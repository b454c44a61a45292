"""Packaging for vmamba_mm: VMamba backbones for MMDetection and MMSegmentation."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_version() -> str:
    namespace: dict = {}
    exec((HERE / "vmamba_mm" / "version.py").read_text(), namespace)
    return namespace["__version__"]


# The OpenMMLab stack is pinned to the versions verified together: mmdet 3.3.0 and
# mmseg 1.2.2 refuse mmcv 2.2.0 at import, and mmcv must be built with its compiled ops.
MM_REQUIRES = [
    "mmengine==0.10.7",
    "mmcv==2.1.0",
    "mmdet==3.3.0",
    "mmsegmentation==1.2.2",
    "pycocotools",
    "ftfy",
    "regex",
    # mmengine's config loader imports pkg_resources (gone in setuptools 82) for
    # `mmdet::`/`mmseg::` bases; torch 2.13 needs setuptools >= 77.0.3.
    "setuptools>=77.0.3,<82",
]

setup(
    name="vmamba_mm",
    version=read_version(),
    description="VMamba backbones with a Triton / pure-PyTorch 2D selective scan for OpenMMLab",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["vmamba_mm", "vmamba_mm.*"]),
    install_requires=["torch>=2.1", "numpy"],
    extras_require={
        "mm": MM_REQUIRES,
        "triton": ["triton"],
        "dev": ["pytest", "pytest-xdist", "ruff", "fvcore"],
    },
    license="Apache-2.0",
    license_files=["LICENSE"],
)
