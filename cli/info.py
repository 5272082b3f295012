"""`hqlt info`: versions, device, and which kernel backends are available (and what `auto` picks)."""
from __future__ import annotations

import importlib.metadata as md
import platform


def configure_parser(parser) -> None:
    pass


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def run(args) -> int:
    import torch

    from hqlt.kernels import available_backends, resolve_backend

    print(f"hqlt {_version('hqlt')}  python {platform.python_version()}  torch {torch.__version__}")
    for dist in ("omegaconf", "ray", "optuna", "mlflow", "triton", "fla-core", "flash-attn"):
        print(f"  {dist:<10} {_version(dist)}")
    if torch.cuda.is_available():
        device = torch.device("cuda")
        print(f"device: cuda — {torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})")
    else:
        device = torch.device("cpu")
        print(f"device: cpu ({torch.get_num_threads()} threads)")
    print("kernel backends:")
    for name, ok in available_backends().items():
        print(f"  {name:<10} {'available' if ok else 'unavailable'}")
    print(f"auto resolves to: {resolve_backend('auto', device)} on {device.type}")
    return 0
