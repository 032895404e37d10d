"""Triton kernels for fusecc's fused ops, installed as ``fusecc.kernels``.

This folder holds no kernels yet (they come with the kernels issue); it exists so the package layout is right.
It installs as ``fusecc.kernels`` (never as a top-level ``kernels``, a name an unrelated PyPI package owns), and
must not import torch.fx; fusecc itself never imports triton.
"""

__all__: list = []
