"""The speed levers of a training stage and what ``auto`` picks for each on this hardware.

Each lever is ``auto`` by default and on only where it was measured to win on the hardware class
(and precision) a stage runs on; an explicit ``true`` / ``false`` (a number for ``num_workers``)
overrides. :func:`choose_levers` decides all of them in one place from :class:`StageFacts`;
docs/performance.md has the measurements behind each rule. Knows no config and imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Union

from vlm.core.errors import ConfigError
from vlm.core.hardware import Hardware

AUTO = "auto"
# on / off levers, then the worker count (auto or a number)
SWITCHES = ("compile", "channels_last", "training_attention", "frozen_weight_cast", "image_cache")
LEVERS = (*SWITCHES, "num_workers")
# bf16 runs natively (and autocast wins) on these classes; elsewhere a bf16 stage is emulated
NATIVE_BF16_CLASSES = ("cuda-bf16", "cpu-amx", "cpu-avx512-bf16")
# DataLoader worker processes stay off with this many cores or fewer: they take the cores the
# step's own threads use (measured on 2 cores)
WORKERS_MIN_CORES = 4

Switch = Union[str, bool]


def parse_switch(value: Any, where: str) -> Switch:
    """``auto``, True or False from a config value (YAML booleans, or their names as strings);
    ConfigError naming ``where`` otherwise."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == AUTO:
        return AUTO
    if text in ("true", "false"):
        return text == "true"
    raise ConfigError(f"{where} = {value!r}: must be auto, true or false")


def parse_workers(value: Any, where: str) -> Union[str, int]:
    """``auto`` or a worker count >= 0 from a config value; ConfigError naming ``where`` otherwise."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == AUTO:
            return AUTO
        if text.isdigit():
            return int(text)
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ConfigError(f"{where} = {value!r}: must be auto or a number of worker processes >= 0")


def parse_lever(name: str, value: Any, where: str) -> Union[str, bool, int]:
    """Lever ``name``'s config value parsed: a worker count for ``num_workers``, else a switch."""
    return parse_workers(value, where) if name == "num_workers" else parse_switch(value, where)


@dataclass(frozen=True)
class StageFacts:
    """What the levers' choices depend on besides the hardware: the stage's resolved precision,
    whether it reads an image more than once (several epochs, or images shared by samples),
    whether it trains from cached encoder features, and the cores this process may use."""

    precision: str  # fp32 | bf16 | fp16
    rereads_images: bool
    feature_cache: bool = False
    cores: int = 1


@dataclass(frozen=True)
class LeverChoice:
    """What one lever was asked for, the value it takes, and why."""

    requested: Any
    value: Any
    reason: str

    def as_record(self) -> Dict[str, Any]:
        """The choice as a JSON-able record (``<stage>/levers.json``, ``metrics.json``)."""
        return {"requested": self.requested, "value": self.value, "reason": self.reason}


def _autocast(facts: StageFacts) -> bool:
    return facts.precision in ("bf16", "fp16")


def _compile(hw: Hardware, facts: StageFacts) -> tuple:
    if hw.gpus:
        return True, "CUDA: fused kernels"
    if _autocast(facts):
        return True, f"{facts.precision} autocast on CPU: the casts fuse into the kernels (~1.5x a step)"
    # measured on AVX2 at the demo's sizes: 7-11% a step, which the 8-15 s compilation takes back
    # in stages of a few minutes (set compile: true for long ones)
    return False, "fp32 on CPU: ~10% a step, which the 8-15 s compilation takes back in short stages"


def _channels_last(hw: Hardware, facts: StageFacts) -> tuple:
    if facts.precision == "bf16" and not hw.gpus and hw.hardware_class not in NATIVE_BF16_CLASSES:
        return False, f"bf16 emulated on {hw.hardware_class}: channels-last convolutions were slower"
    return True, "channels-last convolutions are faster here (CNN encoders only)"


def _training_attention(hw: Hardware, facts: StageFacts) -> tuple:
    if hw.gpus:
        return False, "CUDA: the low-precision attention kernels are fast"
    if _autocast(facts):
        return True, f"{facts.precision} autocast on CPU: the attention backward runs ~4x faster in fp32"
    return False, "fp32: the attention already runs in fp32"


def _frozen_weight_cast(hw: Hardware, facts: StageFacts) -> tuple:
    if _autocast(facts):
        return True, f"{facts.precision} autocast: frozen weights cast once, not every step"
    return False, "fp32: nothing to cast"


def _image_cache(hw: Hardware, facts: StageFacts) -> tuple:
    if facts.feature_cache:
        return False, "the stage reads cached encoder features, not images"
    if facts.rereads_images:
        return True, "the stage reads images more than once: each is decoded and transformed once"
    return False, "each image is read once"


def _num_workers(hw: Hardware, facts: StageFacts) -> tuple:
    if facts.cores <= WORKERS_MIN_CORES:
        return 0, f"{facts.cores} cores: worker processes would take the training step's cores"
    workers = min(8, facts.cores // 4)
    return workers, f"{facts.cores} cores: {workers} worker processes decode images beside the step"


_RULES = {"compile": _compile, "channels_last": _channels_last, "training_attention": _training_attention,
          "frozen_weight_cast": _frozen_weight_cast, "image_cache": _image_cache, "num_workers": _num_workers}


def choose_levers(requested: Mapping[str, Any], facts: StageFacts, hardware: Hardware,
                  where: str = "stage") -> Dict[str, LeverChoice]:
    """Every lever's value for a stage: what ``requested`` says where it is explicit, what the
    hardware class and ``facts`` favour where it is ``auto`` (or missing)."""
    choices: Dict[str, LeverChoice] = {}
    for name in LEVERS:
        raw = requested.get(name, AUTO)
        value = parse_lever(name, raw, f"{where}.{name}")
        if value == AUTO:
            chosen, reason = _RULES[name](hardware, facts)
            choices[name] = LeverChoice(AUTO, chosen, f"auto on {hardware.hardware_class}: {reason}")
        else:
            choices[name] = LeverChoice(value, value, "set in the config")
    return choices


def describe(choices: Mapping[str, LeverChoice]) -> str:
    """One line for the log: each lever's value, ``auto`` ones marked."""
    parts = []
    for name, choice in choices.items():
        value = ("on" if choice.value else "off") if isinstance(choice.value, bool) else str(choice.value)
        parts.append(f"{name} {value}{' (auto)' if choice.requested == AUTO else ''}")
    return ", ".join(parts)
