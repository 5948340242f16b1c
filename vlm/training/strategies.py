"""How a stage is spread over processes: the ``STRATEGIES`` ddp, fsdp, zero2 and zero3.

How a stage is spread over processes: ``stages.<name>.strategy: ddp | fsdp | zero2 | zero3``,
the names of the registry :data:`STRATEGIES`.

A :class:`Strategy` (a component: ``build(None, DistributionSettings.of(stage))``, and
``check(stage, where)`` for its config rules) builds the stage's Accelerator, wraps the training
module (and builds the optimizer once the parameters are in their final, possibly sharded, form),
gives back the plain module, gathers the model and optimizer state for saving and puts them back
on resume.

- ``ddp``: accelerate's DistributedDataParallel (or nothing, in one process).
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``), one unit per transformer block of the
  LLM (and of the vision encoder when it trains), then the root; bf16 compute with fp32 master
  weights when the stage's precision is bf16; optional CPU offload. The same code runs on CPU
  (gloo) and GPUs (NCCL). With one process there is nothing to shard: the module trains
  unwrapped (logged).
- ``zero2`` / ``zero3``: DeepSpeed ZeRO through accelerate's ``DeepSpeedPlugin``; needs CUDA and
  the ``deepspeed`` package (``pip install -e ".[deepspeed]"``), refused before the model is built
  otherwise.

:func:`check_environment` and :func:`check_launch` stop a launch whose processes do not match what
the environment announces or the stage asks for.
"""

from __future__ import annotations

import datetime
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple

import torch
from accelerate import Accelerator
from torch import nn

from vlm.config import COMPONENTS, Precision, StageConfig, Train, TrainModes, resolved
from vlm.core.errors import ConfigError
from vlm.core.registry import Registry

logger = logging.getLogger(__name__)

MIXED_PRECISION = {Precision.fp32: "no", Precision.bf16: "bf16", Precision.fp16: "fp16"}
TORCHRUN_CPU = "OMP_NUM_THREADS=1 torchrun --nproc_per_node N -m vlm train CONFIG --out DIR"


def _accelerator(mixed: str, collective_timeout_s: Optional[float] = None, **kwargs) -> Accelerator:
    """An Accelerator with ``mixed`` precision. accelerate keeps one process-wide state, fixed at
    its first mixed-precision setting; a later stage with another precision resets it first. The
    process group, and so ``collective_timeout_s``, is set up by the first stage of the process."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", mixed)) != mixed:
        AcceleratorState._reset_state(reset_partial_state=False)
    if collective_timeout_s:
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=collective_timeout_s))]
    return Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available(), **kwargs)


def launched_world_size() -> Optional[int]:
    """The number of processes the launcher announced (``WORLD_SIZE``), or None."""
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value else None


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def accelerate_requested_processes(parent_cmdline: Optional[List[str]] = None) -> Optional[int]:
    """``--num_processes N`` of the ``accelerate launch`` that started this process (read from
    the parent's command line on Linux), or None when not known."""
    if parent_cmdline is None:
        try:
            raw = open(f"/proc/{os.getppid()}/cmdline", "rb").read()
        except OSError:
            return None
        parent_cmdline = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    for i, arg in enumerate(parent_cmdline):
        value = None
        if arg == "--num_processes" and i + 1 < len(parent_cmdline):
            value = parent_cmdline[i + 1]
        elif arg.startswith("--num_processes="):
            value = arg.split("=", 1)[1]
        if value is not None and value.isdigit():
            return int(value)
    return None


def check_environment(strategy: "Strategy", where: str) -> None:
    """Before the Accelerator exists: refuse a launch environment that cannot give what the stage
    asks (a stray ``WORLD_SIZE``, an accelerate config that shards on its own)."""
    announced = launched_world_size()
    if announced is not None and announced > 1 and not os.environ.get("MASTER_ADDR"):
        raise ConfigError(f"{where}: WORLD_SIZE={announced} is set but no launcher started the processes "
                          f"(MASTER_ADDR is unset); run `{TORCHRUN_CPU}` or unset WORLD_SIZE")
    if _truthy("ACCELERATE_USE_FSDP"):
        raise ConfigError(f"{where}: an accelerate FSDP config was given; vlm shards per stage from its YAML "
                          f"({where}.strategy: fsdp): launch with `{TORCHRUN_CPU}` or a ddp accelerate config")
    if _truthy("ACCELERATE_USE_DEEPSPEED") and not strategy.name.startswith("zero"):
        raise ConfigError(f"{where}: an accelerate DeepSpeed config was given but {where}.strategy is "
                          f"'{strategy.name}'; set {where}.strategy: zero2 | zero3, or launch with torchrun")


def check_launch(accelerator: Accelerator, strategy: "Strategy", where: str) -> None:
    """Once the Accelerator exists: refuse, in one line, a process group whose size disagrees
    with what the launcher announced or was asked for."""
    announced = launched_world_size()
    seen = accelerator.num_processes
    if announced is not None and announced != seen:
        raise ConfigError(f"{where}: the launcher announced WORLD_SIZE={announced} but the process group has "
                          f"{seen} process(es) ({accelerator.distributed_type}); launch with `{TORCHRUN_CPU}` "
                          "on CPU, or `accelerate launch --config_file configs/accelerate/ddp_8gpu.yaml ...` on GPUs")
    if seen == 1 and any(k.startswith("ACCELERATE_") for k in os.environ):
        asked = accelerate_requested_processes()
        if asked is not None and asked > 1:
            command = TORCHRUN_CPU.replace(" N ", f" {asked} ")
            raise ConfigError(f"{where}: `accelerate launch --num_processes {asked}` started ONE process (no "
                              f"distributed config: --cpu alone runs single-process); run `{command}`, "
                              "or add --multi_gpu on GPUs")
    if strategy.name == "fsdp" and seen == 1:
        logger.info("%s: strategy fsdp in one process: nothing to shard, the model trains unwrapped", where)


# ---------------------------------------------------------------------------------------------
# gradient checkpointing


def _checkpointed(forward: Callable) -> Callable:
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run


def _enable_module_checkpointing(module: nn.Module, what: str) -> bool:
    """The module's own switch (HF ``gradient_checkpointing_enable``, ``activation_checkpointing_enable``
    in transformers 5, timm / open_clip
    ``set_grad_checkpointing``), else torch.utils.checkpoint around each transformer block."""
    for sub in module.modules():
        if getattr(sub, "supports_gradient_checkpointing", False):
            if hasattr(sub, "activation_checkpointing_enable"):  # transformers >= 5.x's name
                sub.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                sub.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return True
        if hasattr(sub, "set_grad_checkpointing"):
            sub.set_grad_checkpointing(True)
            return True
    blocks = transformer_blocks(module)
    for block in blocks:
        block.forward = _checkpointed(block.forward)
    if not blocks:
        logger.warning("gradient checkpointing: %s has no transformer blocks to checkpoint", what)
    return bool(blocks)


def enable_gradient_checkpointing(model, stage) -> List[str]:
    """Recompute activations in the backward pass for the LLM, and for the vision encoder when it
    trains (``stage``: a ``StageConfig`` or its :class:`DistributionSettings`). Frozen-input
    LoRA needs its embedding outputs to require grad (else the checkpointed blocks would see no
    input that needs a gradient). Returns the components switched on."""
    done = []
    llm = model.llm
    if _enable_module_checkpointing(llm, "llm"):
        done.append("llm")
    if Train(stage.train.llm) is not Train.full and hasattr(llm, "enable_input_require_grads"):
        llm.enable_input_require_grads()
    if Train(stage.train.vision) is not Train.frozen and not stage.feature_cache:
        if _enable_module_checkpointing(model.vision, "vision"):
            done.append("vision")
    logger.info("gradient checkpointing on: %s", ", ".join(done) or "nothing")
    return done


# ---------------------------------------------------------------------------------------------
# strategies


def transformer_blocks(module: nn.Module) -> List[nn.Module]:
    """The transformer blocks of a component: HF models name their block classes in
    ``_no_split_modules`` (the blocks are those kept in a ModuleList); other encoders keep them in a ``blocks`` / ``layers`` / ``resblocks``
    ModuleList."""
    names = set()
    for sub in module.modules():
        names.update(getattr(sub, "_no_split_modules", None) or [])
    if names:  # the repeated ones: _no_split_modules also lists embeddings
        blocks = [block for sub in module.modules() if isinstance(sub, nn.ModuleList)
                  for block in sub if type(block).__name__ in names]
        if blocks:
            return blocks
    for name, sub in module.named_modules():
        if isinstance(sub, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("blocks", "layers", "resblocks"):
            return list(sub)
    return []


@dataclass
class DistributionSettings:
    """What a strategy is built for (``Strategy.build``): the stage's settings that decide how it
    is spread over processes."""

    precision: Precision = Precision.fp32
    grad_accum: int = 1
    max_grad_norm: Optional[float] = 1.0
    gradient_checkpointing: bool = False
    fsdp_cpu_offload: bool = False
    train: TrainModes = field(default_factory=TrainModes)
    feature_cache: bool = False
    collective_timeout_s: Optional[float] = None

    @classmethod
    def of(cls, stage: StageConfig) -> "DistributionSettings":
        """The distribution settings of a stage (a ``StageConfig`` or its DictConfig) whose
        precision is resolved (``vlm.app.stages.resolved_precision``): ``auto`` is refused here."""
        return cls(precision=resolved(stage.precision, "a strategy"), grad_accum=stage.grad_accum,
                   max_grad_norm=stage.max_grad_norm, gradient_checkpointing=stage.gradient_checkpointing,
                   fsdp_cpu_offload=stage.fsdp_cpu_offload,
                   train=TrainModes(**{c: Train(getattr(stage.train, c)) for c in COMPONENTS}),
                   feature_cache=stage.feature_cache, collective_timeout_s=stage.collective_timeout_s)


STRATEGIES: Registry = Registry("strategy")


def _register(cls):
    """Register a strategy class under its ``name`` (the name is written once, on the class)."""
    return STRATEGIES.register(cls.name)(cls)


@_register
class Strategy:
    """DDP through accelerate (the default); the base of the other strategies."""

    name = "ddp"
    # the component protocol (vlm.core.registry.Component): a strategy takes no options of its
    # own; what it reads is the stage's DistributionSettings
    Options: ClassVar[Optional[type]] = None

    def __init__(self, settings: DistributionSettings):
        self.settings = settings

    @classmethod
    def build(cls, options: Optional[Mapping[str, Any]], ctx: DistributionSettings) -> "Strategy":
        """The strategy for a stage's distribution settings (nothing is checked against the
        machine yet: :meth:`check_available`)."""
        return cls(ctx)

    @classmethod
    def check(cls, stage: StageConfig, where: str) -> None:
        """The rules of stage ``where`` that belong to this strategy (config only; what the
        machine must have is :meth:`check_available`'s). The default: none."""

    def check_available(self, where: str) -> None:
        """Refuse, before anything is built, a strategy this machine cannot run."""

    def make_accelerator(self) -> Accelerator:
        """The stage's Accelerator."""
        return _accelerator(MIXED_PRECISION[Precision(self.settings.precision)], self.settings.collective_timeout_s)

    def prepare(self, accelerator: Accelerator, module: nn.Module, make_optimizer: Callable, loader):
        """(wrapped module, optimizer, loader) ready to train; ``make_optimizer()`` is called
        once the parameters are final."""
        if self.settings.gradient_checkpointing:
            enable_gradient_checkpointing(module.model, self.settings)
        return accelerator.prepare(module, make_optimizer(), loader)

    def unwrap(self, accelerator: Accelerator, model: nn.Module) -> nn.Module:
        """The training module without its wrapper."""
        return accelerator.unwrap_model(model)

    def clip_grad_norm(self, accelerator: Accelerator, model: nn.Module, max_norm: float) -> float:
        """Clip the gradients to ``max_norm``; the total norm before clipping."""
        return float(accelerator.clip_grad_norm_(model.parameters(), max_norm))

    # whether the trainer may rescale the accumulated gradients after the backward passes (what
    # weighting a step by its tokens needs); DeepSpeed keeps them in its own partitioned buffers
    rescales_gradients: ClassVar[bool] = True

    def scale_gradients(self, model: nn.Module, factor: float) -> None:
        """Multiply every accumulated gradient by ``factor`` (local, sharded or not)."""
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter.grad.mul_(factor)

    def gathered_state(self, accelerator: Accelerator, model: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
        """The full training-module state on the main process when the live module does not hold
        it (sharded); None when it does. Called on every process."""
        return None

    def optimizer_state(self, accelerator: Accelerator, model: nn.Module, optimizer) -> dict:
        """The optimizer state to save (complete on the main process). Called on every process."""
        return optimizer.state_dict()

    def load_optimizer_state(self, model: nn.Module, optimizer, state: dict) -> None:
        """Put back what :meth:`optimizer_state` saved."""
        optimizer.load_state_dict(state)

    def load_module_state(self, model: nn.Module, state: Dict[str, torch.Tensor]) -> bool:
        """Load a (partial) full state dict of the training module; False when the caller loads
        into the plain module itself."""
        return False


@_register
class FSDPStrategy(Strategy):
    """FSDP2: each transformer block of the LLM (and of a training vision encoder) its own unit,
    then the root; frozen, LoRA and trained parameters mixed within units."""

    name = "fsdp"

    def check_available(self, where):
        if self.settings.fsdp_cpu_offload and not torch.cuda.is_available():
            raise ConfigError(f"{where}.fsdp_cpu_offload: offloading moves GPU memory to the CPU and needs CUDA "
                              f"(pinned memory); without a GPU the parameters are on the CPU already: set it false")

    def prepare(self, accelerator, module, make_optimizer, loader):
        if accelerator.num_processes == 1:
            return super().prepare(accelerator, module, make_optimizer, loader)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
        )

        settings = self.settings
        if settings.gradient_checkpointing:
            enable_gradient_checkpointing(module.model, settings)
        device = accelerator.device
        module.to(device)
        bf16 = Precision(settings.precision) is Precision.bf16
        if bf16:  # fp32 master weights for what trains, bf16 compute
            for param in module.parameters():
                if param.requires_grad and param.dtype != torch.float32:
                    param.data = param.data.float()
        mesh = init_device_mesh(device.type, (accelerator.num_processes,))
        options = dict(mesh=mesh,
                       mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                       if bf16 else MixedPrecisionPolicy(),
                       offload_policy=CPUOffloadPolicy() if settings.fsdp_cpu_offload else OffloadPolicy())
        units = list(transformer_blocks(module.model.llm))
        if Train(settings.train.vision) is not Train.frozen:
            units += transformer_blocks(module.model.vision)
        for block in units:
            fully_shard(block, **options)
        fully_shard(module, **options)
        logger.info("fsdp: %d transformer-block units + root over %d processes", len(units), accelerator.num_processes)
        optimizer, loader = accelerator.prepare(make_optimizer(), loader)
        return module, optimizer, loader

    def clip_grad_norm(self, accelerator, model, max_norm):
        from torch.distributed.tensor import DTensor

        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    @staticmethod
    def _sharded(model) -> bool:
        from torch.distributed.tensor import DTensor

        return any(isinstance(p, DTensor) for p in model.parameters())

    def gathered_state(self, accelerator, model):
        if not self._sharded(model):
            return None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state(self, accelerator, model, optimizer):
        if not self._sharded(model):
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(model, _bare(optimizer),
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, model, optimizer, state):
        if not self._sharded(model):
            return optimizer.load_state_dict(state)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(model, _bare(optimizer), optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))

    def load_module_state(self, model, state):
        if not self._sharded(model):
            return False
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        return True


class ZeroStrategy(Strategy):
    """DeepSpeed ZeRO stage 2 or 3 through accelerate's DeepSpeedPlugin (CUDA only)."""

    zero_stage = 2
    rescales_gradients = False

    @classmethod
    def check(cls, stage, where):
        if stage.grad_accum != 1:
            raise ConfigError(f"{where}.grad_accum: strategy '{cls.name}' needs grad_accum 1 (DeepSpeed would "
                              f"scale the loss a second time); raise batch_size or use strategy=fsdp")

    def check_available(self, where):
        if not torch.cuda.is_available():
            raise ConfigError(f"{where}.strategy: '{self.name}' (DeepSpeed) needs CUDA GPUs and none is visible; "
                              f"use {where}.strategy=fsdp (runs on CPU too) or ddp")
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(f"{where}.strategy: '{self.name}' needs the deepspeed package: "
                              "pip install -e \".[deepspeed]\", or use strategy=fsdp")

    def make_accelerator(self):
        from accelerate.utils import DeepSpeedPlugin

        settings = self.settings
        plugin = DeepSpeedPlugin(zero_stage=self.zero_stage, gradient_accumulation_steps=1,
                                 gradient_clipping=settings.max_grad_norm or 0.0,
                                 offload_optimizer_device="cpu" if settings.fsdp_cpu_offload else "none",
                                 zero3_save_16bit_model=True)  # get_state_dict gathers under ZeRO-3
        return _accelerator(MIXED_PRECISION[Precision(settings.precision)], settings.collective_timeout_s,
                            deepspeed_plugin=plugin)

    def clip_grad_norm(self, accelerator, model, max_norm):
        # DeepSpeed clips inside its step (gradient_clipping); the norm it measured, when it has one
        norm = getattr(model, "get_global_grad_norm", lambda: None)()
        return float(norm) if norm is not None else float("nan")

    def gathered_state(self, accelerator, model):
        if self.zero_stage < 3:
            return None
        return accelerator.get_state_dict(model, unwrap=True)


@_register
class Zero2Strategy(ZeroStrategy):
    """ZeRO-2: optimizer states and gradients partitioned."""

    name, zero_stage = "zero2", 2


@_register
class Zero3Strategy(ZeroStrategy):
    """ZeRO-3: parameters partitioned as well."""

    name, zero_stage = "zero3", 3


def _bare(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def build_strategy(stage: StageConfig, where: str = "stage") -> Strategy:
    """The stage's strategy (``Strategy.build`` for its DistributionSettings), checked against
    this machine (raises ConfigError). Its config rules (``Strategy.check``) were checked when
    the config was validated."""
    try:
        cls = STRATEGIES.get(str(stage.strategy))
    except KeyError as exc:
        raise ConfigError(f"{where}.strategy: {exc.args[0]}") from None
    strategy = cls.build(None, DistributionSettings.of(stage))
    strategy.check_available(where)
    return strategy


def split_module_state(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """A training-module state dict as (model state, objective state), prefixes removed."""
    model, objective = {}, {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        (model if head == "model" else objective)[rest] = value
    return model, objective
