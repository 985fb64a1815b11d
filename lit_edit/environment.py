"""What a figure was measured with: library versions, torch threads, CPU.

Every published number depends on these (the thread count changes floating-point reduction
order; library upgrades change kernels and defaults), so builds, results folders and benchmarks
record them beside their figures.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

#: Libraries whose version can change what lit_edit computes.
LIBRARIES = ("torch", "transformers", "tokenizers", "lightning", "numpy", "peft",
             "sentence-transformers", "torchmetrics")


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """The installed version of each library (``"not installed"`` when absent)."""
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def cpu_name() -> str:
    """The CPU model (from ``/proc/cpuinfo`` where there is one)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_environment() -> dict[str, Any]:
    """Torch's thread count, the library versions, Python and the CPU, as a JSON-able dict."""
    import torch

    return {
        "torch_threads": torch.get_num_threads(),
        "versions": library_versions(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
    }


def environment_line() -> str:
    """One line for a benchmark's output: threads, key library versions, CPU."""
    env = describe_environment()
    libs = ", ".join(f"{k} {env['versions'][k]}" for k in ("torch", "transformers", "lightning"))
    return f"environment: {env['torch_threads']} torch thread(s); {libs}; {env['cpu']}"
