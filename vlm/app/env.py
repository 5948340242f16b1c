"""``vlm env``: versions, CPU capability, GPUs and the resolved precision, for bug reports.

``vlm env``: what a bug report needs — versions, the CPU and its bf16 capability, threads, GPUs,
the precision ``auto`` resolves to, and the optional extras installed. Benchmark reports embed it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Dict, Optional

from vlm.core.hardware import detect, resolve_precision

CORE_PACKAGES = ("vlm", "torch", "transformers", "peft", "accelerate", "timm", "open_clip_torch", "tokenizers")
# optional extras and the features they bring
EXTRAS = {
    "lmms-eval": "lmms-eval adapter (`lmms-eval --model vlm`)",
    "deepspeed": "strategies zero2 / zero3",
    "torchscale": "beit3 encoder",
    "selenium": "make test-browser",
    "trl": "preference-tuning parity tests",
    "webdataset": "webdataset shards",
    "datasets": "HF datasets",
    "tensorboard": "TensorBoard tracker",
    "wandb": "Weights & Biases tracker",
    "mlflow": "MLflow tracker",
    "av": "video decoding (PyAV)",
    "liger-kernel": "fused GPU kernels",
    "bitsandbytes": "8-bit optimizers (GPU)",
}


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> Dict[str, object]:
    """The report as a JSON-able dict."""
    import torch

    hardware = detect()
    choice = resolve_precision("auto", hardware)
    return {
        "versions": {name: _version(name) for name in CORE_PACKAGES},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": {
            "model": hardware.cpu_model,
            "capability": hardware.cpu_capability,
            "flags": sorted(hardware.cpu_flags),
            "hardware_class": hardware.hardware_class,
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "gpus": [{"name": g.name, "capability": f"{g.capability[0]}.{g.capability[1]}", "bf16": g.bf16}
                 for g in hardware.gpus],
        "precision_auto": choice.as_record(),
        "extras": {name: _version(name) for name in EXTRAS},
    }


def format_environment(env: Dict[str, object]) -> str:
    """The report as the plain text ``vlm env`` prints."""
    cpu, auto = env["cpu"], env["precision_auto"]
    lines = [f"{name}: {version or 'not installed'}" for name, version in env["versions"].items()]
    lines += [f"python: {env['python']}", f"platform: {env['platform']}",
              f"cpu: {cpu['model']}", f"cpu capability: {cpu['capability']} ({cpu['hardware_class']}; "
              f"flags: {', '.join(cpu['flags']) or 'none'})",
              f"cores: {cpu['cores']}, torch threads: {cpu['torch_threads']}"]
    lines += [f"gpu: {g['name']} (sm {g['capability']}, bf16 {'yes' if g['bf16'] else 'no'})" for g in env["gpus"]] \
        or ["gpu: none"]
    lines.append(f"precision auto -> {auto['precision']}: {auto['reason']}")
    extras = [f"{name} {version}" for name, version in env["extras"].items() if version]
    lines.append(f"extras: {', '.join(extras) or 'none'}")
    return "\n".join(lines)
