from setuptools import setup

setup(
    name="fusecc",
    version="0.1.0",
    description="Fuse N same-architecture PyTorch models into one module that runs all N at once",
    packages=["fusecc", "fusecc.rules", "fusecc.optim", "fusecc.kernels"],
    package_dir={"fusecc.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch==2.14.1", "numpy"],
    extras_require={"dev": ["pytest", "torchvision==0.29.1"], "bench": ["torchvision==0.29.1"]},
)
