"""Preference objectives on pairs: ``dpo`` (sigmoid or IPO, against a reference) and ``simpo``.

Both read :class:`vlm.data.pairs.PreferenceBatch` (B pairs in 2B rows, chosen first, each image
encoded once) and score a row by the summed log-probability of its answer tokens.

``dpo`` compares with the reference policy, the stage's starting weights, without a second model:

- with LoRA (every trained component a LoRA adapter), the same model with its adapters disabled
  (peft's ``disable_adapter()``), under ``torch.no_grad``, in the same forward step;
- with ``precompute_reference: true`` (required when any component trains fully), the reference
  log-probabilities of every pair are computed once before training by the starting weights
  (:meth:`DPO.prepare_data`), stored in ``<stage>/reference_logps.pt`` (a resume or a rerun reads them
  back) and carried by the batches.

Losses, with ``d = (logp_c - ref_c) - (logp_r - ref_r)``: ``sigmoid`` ``-(1-e) logsig(beta d) - e
logsig(-beta d)`` (``e`` = ``label_smoothing``, the conservative DPO), ``ipo`` ``(d' - 1/(2 beta))^2``
with ``d'`` the per-token means (TRL's normalisation). ``simpo`` needs no reference:
``-logsig(beta (mean_c - mean_r) - gamma)`` on per-token mean log-probabilities.

Logged: ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margin`` (``beta`` times the log
ratios, for simpo ``beta`` times the mean log-probabilities) and ``rewards/accuracy`` (the share of pairs
whose chosen reward is higher).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from vlm.config import Train, train_modes
from vlm.core.errors import ConfigError, DataFormatError
from vlm.data.batch import IGNORE_INDEX
from vlm.data.pairs import PreferenceBatch
from vlm.training.objectives.base import Objective, ObjectiveContext, StepOutput

logger = logging.getLogger(__name__)

REFERENCE_FILE = "reference_logps.pt"
LOSS_TYPES = ("sigmoid", "ipo")


def answer_logps(model, batch: PreferenceBatch) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its labelled tokens, ``(2B,)``, and how many there are
    (one forward of every row; the images encoded once per pair)."""
    if not isinstance(batch, PreferenceBatch):
        raise DataFormatError("a preference objective reads pairs (format: preference_json)")
    inputs = batch.model_inputs(with_labels=False)
    logits = model(**inputs, use_cache=False).logits
    targets = batch.labels[:, 1:]
    labelled = targets != IGNORE_INDEX
    picked = logits[:, :-1][labelled].float().log_softmax(-1).gather(-1, targets[labelled].unsqueeze(-1)).squeeze(-1)
    per_token = torch.zeros(labelled.shape, dtype=picked.dtype, device=picked.device)
    per_token = per_token.masked_scatter(labelled, picked)
    return per_token.sum(1), labelled.sum(1)


def _rewards_terms(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    chosen, rejected = chosen.detach(), rejected.detach()
    return {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/margin": (chosen - rejected).mean(), "rewards/accuracy": (chosen > rejected).float().mean()}


def _check_pairs(stage, where: str) -> None:
    if stage.group_by_length:
        raise ConfigError(f"{where}.group_by_length: a preference objective batches pairs in dataset order "
                          "(set group_by_length: false)")


def _options(cls, stage) -> Any:
    """The stage's ``objective_options`` merged onto ``cls.Options``' defaults."""
    given = getattr(stage, "objective_options", None) or {}
    given = OmegaConf.to_container(given, resolve=True) if OmegaConf.is_config(given) else dict(given)
    return cls.Options(**given)


@dataclass
class DPOOptions:
    """``dpo``'s options (``stages.<name>.objective_options``)."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"  # sigmoid | ipo
    precompute_reference: bool = False


class DPO(Objective):
    """Direct preference optimisation against the stage's starting weights (see the module)."""

    Options: ClassVar[type] = DPOOptions
    needs_pixels = True  # the pairs load pixels; the frozen-feature cache is not read
    reads_pairs = True

    def __init__(self, model, tokenizer, options: Optional[DPOOptions] = None):
        super().__init__()
        self.options = options or DPOOptions()

    @classmethod
    def build(cls, options: Optional[Mapping[str, Any]], ctx: ObjectiveContext) -> "DPO":
        return cls(ctx.model, ctx.tokenizer, cls.Options(**dict(options or {})))

    @property
    def precompute_reference(self) -> bool:
        """Whether the reference log-probabilities are computed once before training."""
        return bool(self.options.precompute_reference)

    @classmethod
    def check_stage(cls, stage, where):
        _check_pairs(stage, where)
        options = _options(cls, stage)
        key = f"{where}.objective_options"
        if options.loss_type not in LOSS_TYPES:
            raise ConfigError(f"{key}.loss_type: unknown '{options.loss_type}'; known: {', '.join(LOSS_TYPES)}")
        if options.beta <= 0:
            raise ConfigError(f"{key}.beta: must be positive, got {options.beta}")
        if not 0.0 <= options.label_smoothing < 0.5:
            raise ConfigError(f"{key}.label_smoothing: must be in [0, 0.5), got {options.label_smoothing}")
        modes = train_modes(stage.train)
        full = [c for c, m in modes.items() if m is Train.full]
        if full and not options.precompute_reference:
            raise ConfigError(f"{where}.train: dpo's reference is the starting weights; with {', '.join(full)} "
                              "trained fully set objective_options.precompute_reference: true (only LoRA adapters "
                              "can be switched off to recover it)")
        if not options.precompute_reference and not any(m is Train.lora for m in modes.values()):
            raise ConfigError(f"{where}.train: dpo's reference is the model with its LoRA adapters disabled and no "
                              "component trains with LoRA; set objective_options.precompute_reference: true")

    def reference_logps(self, model, batch: PreferenceBatch) -> torch.Tensor:
        """``(2B,)`` reference log-probabilities: precomputed ones, else the model with its LoRA
        adapters disabled, without gradients."""
        if self.precompute_reference:
            if batch.reference_logps is None:
                raise DataFormatError("dpo: precompute_reference is on but the batch carries no reference "
                                      "log-probabilities")
            return torch.cat([batch.reference_logps[:, 0], batch.reference_logps[:, 1]])
        llm = model.llm
        if not hasattr(llm, "disable_adapter"):
            raise ConfigError("dpo: without precompute_reference the reference is the model with its LoRA "
                              "adapters disabled, and the LLM has none")
        with torch.no_grad(), llm.disable_adapter():
            logps, _ = answer_logps(model, batch)
        return logps

    def losses(self, logps: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor) -> StepOutput:
        """The loss and its logged terms from policy and reference log-probabilities ``(2B,)``
        and each row's answer token count."""
        beta, pairs = self.options.beta, logps.shape[0] // 2
        ratios = logps - reference
        chosen, rejected = ratios[:pairs], ratios[pairs:]
        if self.options.loss_type == "ipo":
            delta = chosen / counts[:pairs].clamp(min=1) - rejected / counts[pairs:].clamp(min=1)
            per_pair = (delta - 1 / (2 * beta)) ** 2
        else:
            delta, smoothing = chosen - rejected, self.options.label_smoothing
            per_pair = -(1 - smoothing) * F.logsigmoid(beta * delta) - smoothing * F.logsigmoid(-beta * delta)
        return StepOutput(per_pair.mean(), _rewards_terms(beta * chosen, beta * rejected))

    def forward(self, model, batch: PreferenceBatch):
        reference = self.reference_logps(model, batch)
        logps, counts = answer_logps(model, batch)
        return self.losses(logps, reference.to(logps.dtype), counts)

    def prepare_data(self, model, dataset, collate, batch_size: int, out_dir: Path, is_main: bool) -> None:
        """With ``precompute_reference``: every pair's reference log-probabilities, by ``model`` as
        it is now (the starting weights), read from ``out_dir/reference_logps.pt`` when it holds
        this dataset's (a resume), else computed in eval mode and written there (main process)."""
        if not self.precompute_reference:
            return
        path = Path(out_dir) / REFERENCE_FILE if out_dir is not None else None
        dataset.reference = precomputed_reference(model, dataset, collate, batch_size, path, is_main)


def _fingerprint(dataset) -> str:
    digest = hashlib.sha256()
    for _, (c_ids, c_labels), (r_ids, r_labels) in dataset.entries:
        for seq in (c_ids, c_labels, r_ids, r_labels):
            digest.update(torch.tensor(seq, dtype=torch.long).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def precomputed_reference(model, dataset, collate, batch_size: int, path: Optional[Path],
                          is_main: bool) -> torch.Tensor:
    """``(len(dataset), 2)`` reference log-probabilities (chosen, rejected) of every pair, read
    from ``path`` when it holds this dataset's, else computed by ``model`` in eval mode, in
    dataset order, and written to ``path`` (atomically, by the main process; None: not kept)."""
    fingerprint = _fingerprint(dataset)
    if path is not None and path.exists():
        stored = torch.load(path, map_location="cpu")
        if stored.get("fingerprint") == fingerprint:
            logger.info("reference log-probabilities read from %s", path)
            return stored["logps"]
        logger.warning("%s holds another dataset's reference log-probabilities: computing them again", path)
    modes = {name: module.training for name, module in model.named_modules()}
    model.eval()
    device = next(model.parameters()).device
    rows = []
    try:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            if any(item is None for item in items):
                raise DataFormatError(f"{dataset.name}: an unreadable image while precomputing reference "
                                      "log-probabilities")
            batch = collate(items).to(device)
            logps, _ = answer_logps(model, batch)
            pairs = logps.shape[0] // 2
            rows.append(torch.stack([logps[:pairs], logps[pairs:]], dim=1).float().cpu())
    finally:
        for name, module in model.named_modules():
            module.train(modes[name])
    logps = torch.cat(rows) if rows else torch.zeros(0, 2)
    if is_main and path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"fingerprint": fingerprint, "logps": logps}, tmp)
        os.replace(tmp, path)
    logger.info("reference log-probabilities of %d pairs computed", len(logps))
    return logps


@dataclass
class SimPOOptions:
    """``simpo``'s options (``stages.<name>.objective_options``)."""

    beta: float = 2.0
    gamma: float = 0.5  # the target reward margin


class SimPO(Objective):
    """SimPO: a reference-free preference loss on length-normalised log-probabilities."""

    Options: ClassVar[type] = SimPOOptions
    needs_pixels = True
    reads_pairs = True

    def __init__(self, model, tokenizer, options: Optional[SimPOOptions] = None):
        super().__init__()
        self.options = options or SimPOOptions()

    @classmethod
    def build(cls, options: Optional[Mapping[str, Any]], ctx: ObjectiveContext) -> "SimPO":
        return cls(ctx.model, ctx.tokenizer, cls.Options(**dict(options or {})))

    @classmethod
    def check_stage(cls, stage, where):
        _check_pairs(stage, where)
        options = _options(cls, stage)
        if options.beta <= 0:
            raise ConfigError(f"{where}.objective_options.beta: must be positive, got {options.beta}")

    def forward(self, model, batch: PreferenceBatch):
        logps, counts = answer_logps(model, batch)
        pairs = logps.shape[0] // 2
        mean = logps / counts.clamp(min=1)
        chosen, rejected = self.options.beta * mean[:pairs], self.options.beta * mean[pairs:]
        loss = -F.logsigmoid(chosen - rejected - self.options.gamma).mean()
        return StepOutput(loss, _rewards_terms(chosen, rejected))
