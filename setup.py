from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent


def _reqs(name: str) -> list[str]:
    lines = (here / name).read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


setup(
    name="holderpo_megatron",
    version="0.1.0",
    description="Hölder Policy Optimisation (HölderPO) RL post-training on Megatron-Core with SGLang rollouts",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["holderpo_megatron", "holderpo_megatron.*"]),
    install_requires=_reqs("requirements.txt"),
    extras_require={
        "test": _reqs("requirements-test.txt"),
        # GPU-only extras. NVIDIA apex is not on PyPI (the PyPI "apex" is unrelated): build it from
        # NVIDIA's repository as its README says. None of these build or import without CUDA.
        "gpu": ["transformer-engine[pytorch]>=2.0", "flash-attn>=2.6"],
        "wandb": ["wandb>=0.17"],
    },
    entry_points={"console_scripts": ["holderpo=holderpo_megatron.cli:main"]},
)
