import os

from setuptools import find_packages, setup

# every package is discovered (a new one needs no line here). kernels/ installs as fusecc.kernels (never as a
# top-level `kernels`, a name an unrelated PyPI package owns); each op folder in it is a subpackage
_OPS = sorted(d for d in os.listdir("kernels") if os.path.isfile(os.path.join("kernels", d, "__init__.py")))
_PACKAGES = ["fusecc"] + [f"fusecc.{p}" for p in find_packages("fusecc")]

setup(
    name="fusecc",
    version="0.1.0",
    description="Fuse N same-architecture PyTorch models into one module that runs all N at once",
    packages=_PACKAGES + ["fusecc.kernels"] + [f"fusecc.kernels.{op}" for op in _OPS],
    package_dir={"fusecc.kernels": "kernels"},
    package_data={"fusecc.kernels.linear": ["*.c"]},  # compiled at first use (kernels/linear/cpu.py)
    python_requires=">=3.10",
    # ranges, not pins: fusecc is a library (requirements.txt pins the project's own environment). Tested on torch
    # 2.14 (CI) and 2.11 (the GPU machine's; bench/gpu_check.py installs fusecc there with --no-deps)
    install_requires=["torch>=2.11", "numpy", "safetensors>=0.4", "tqdm"],
    entry_points={"console_scripts": ["fusecc = fusecc.cli:main"]},
    # transformers: Hugging Face fleets (fuse() takes the models without it; the CLI's checkpoint loading needs it)
    extras_require={"dev": ["pytest", "expecttest", "httpx", "tritonclient[http]", "torchvision==0.29.1", "transformers>=5", "timm", "peft>=0.21"],
                    "bench": ["torchvision==0.29.1", "transformers>=5", "peft>=0.21"], "hf": ["transformers>=5"],
                    "lora": ["peft>=0.21"],
                    # fusecc serve: the Open Inference Protocol over HTTP (fusecc/serve/)
                    "serve": ["fastapi>=0.110", "uvicorn>=0.29", "prometheus-client>=0.20"],
                    "ray": ["ray[serve,tune]>=2.9", "fastapi>=0.110", "prometheus-client>=0.20"],
                    # fusecc.hpo: pack-aware hyper-parameter search on Optuna (tqdm: its progress bar)
                    "hpo": ["optuna>=4", "tqdm"]},
)
