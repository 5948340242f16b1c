"""The frozen-feature cache: a frozen vision encoder's features, computed once, served from disk.

When a stage keeps the vision encoder frozen, its output for an image never changes during the
stage, so running it every step is wasted work. :class:`FeatureCache` computes the features of
every distinct image a stage uses once (batched, no grad, on the accelerator's device, under the
stage's autocast) and stores one safetensors file per image, in the encoder's dtype. Training then
reads them (:class:`CachedFeatures`) and the model skips its encoder
(``VisionLanguageModel.forward(image_features=...)``).

Keys. A cache folder is named by a hash of everything that decides the features besides the image:
the encoder's config (name, arch, pretrained, feature_layer, keep_cls, options, preprocess),
its image size and normalisation, the stage's precision, and a fingerprint of the encoder's actual
weights (a warmed-up encoder changes its weights under the same config). Inside it, an entry is
named by a hash of the image file's bytes, not its path. Changing any of these misses and
recomputes; nothing is ever reused across them.

Safety. Entries are written to a temporary file and renamed into place, so a crash never leaves a
half-written entry. Each entry carries a digest of its tensor; every build checks every entry it
is about to serve (shape, dtype, key, digest) and recomputes the ones that fail. Under several
processes the main process builds while the others hash their images and wait at a barrier.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vlm.config import Train, WhatTrains
from vlm.core.errors import FeatureCacheError
from vlm.data.processor import ImageLoadError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
TENSOR = "features"
KEY_FILE = "key.json"




def _digest() -> "hashlib._Hash":
    return hashlib.blake2b(digest_size=20)


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex digest of a file's bytes."""
    h = _digest()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _update_with_tensor(h, tensor: torch.Tensor) -> None:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    h.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    h.update(flat.view(torch.uint8).numpy())  # the buffer itself, no copy


def tensor_digest(tensor: torch.Tensor) -> str:
    """Hex digest of a tensor's dtype, shape and bytes."""
    h = _digest()
    _update_with_tensor(h, tensor)
    return h.hexdigest()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """Hex digest of a module's state dict (names, dtypes, shapes and bytes, in name order)."""
    h = _digest()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        _update_with_tensor(h, tensor)
    return h.hexdigest()


def encoder_dtype(encoder: torch.nn.Module) -> torch.dtype:
    """The dtype of the encoder's weights: the dtype its features are stored in."""
    return next(encoder.parameters()).dtype


def _plain(node) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def encoder_description(encoder, precision: str = "fp32") -> dict:
    """Everything besides the image that decides an encoder's features (JSON-serialisable)."""
    cfg = encoder.cfg
    return {
        "format_version": FORMAT_VERSION,
        "encoder_class": f"{type(encoder).__module__}.{type(encoder).__qualname__}",
        "name": cfg.name,
        "arch": _plain(cfg.arch),
        "pretrained": cfg.pretrained,
        "feature_layer": cfg.feature_layer,
        "keep_cls": cfg.keep_cls,
        "options": _plain(cfg.options),
        "preprocess": cfg.preprocess or getattr(encoder, "default_preprocess", None),
        "image_size": encoder.image_size,
        "mean": list(encoder.mean),
        "std": list(encoder.std),
        "features_shape": [encoder.num_patches, encoder.embed_dim],
        "dtype": str(encoder_dtype(encoder)),
        "precision": str(getattr(precision, "value", precision)),
        "weights": weights_fingerprint(encoder),
    }


def description_key(description: dict) -> str:
    """The cache folder name for an encoder description."""
    blob = json.dumps(description, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=12).hexdigest()


def _class_name(component) -> str:
    return component.__name__ if isinstance(component, type) else type(component).__name__


def feature_cache_refusal(connector, objective=None, vision: Train | str = Train.frozen,
                          objective_name: Optional[str] = None) -> Optional[str]:
    """Why a stage cannot train from cached encoder features, or None: the one place the
    feature-cache precondition is combined, for the config validation (``vlm.app.wiring``) and
    the cache (:func:`check_feature_cache`) alike. Each part is declared where it belongs:

    - ``vision``: the stage's ``train.vision`` must be frozen (cached features would go stale);
    - ``connector`` (class or instance): ``Connector.feature_cache_conflict()``, why its visual
      tokens are not a function of the encoder's features (e.g. it runs inside the encoder);
    - ``objective`` (class or instance, or None): ``Objective.needs_pixels``, it reads the images
      itself; ``objective_name`` names it in the message (default: its class name).
    """
    vision = Train(vision)
    if vision is not Train.frozen:
        return (f"needs train.vision: frozen (cached features would go stale as the encoder trains); "
                f"got '{vision.value}'")
    conflict = connector.feature_cache_conflict()
    if conflict:
        return f"connector {_class_name(connector)} {conflict}"
    if objective is not None and objective.needs_pixels:
        name = f"'{objective_name}'" if objective_name else _class_name(objective)
        return f"objective {name} reads the images itself"
    return None


def check_feature_cache(model, objective=None, where: str = "feature_cache", vision: Train | str = Train.frozen,
                        objective_name: Optional[str] = None) -> None:
    """Refuse (FeatureCacheError naming ``where``) when a built ``model``'s features cannot be
    cached: :func:`feature_cache_refusal` for its connector, ``objective`` and the stage's
    ``vision`` mode, then any vision parameter that trains (the model must match that mode)."""
    refusal = feature_cache_refusal(model.connector, objective, vision, objective_name)
    if refusal:
        raise FeatureCacheError(f"{where}: {refusal}")
    trainable = [n for n, p in model.vision.named_parameters() if p.requires_grad]
    if trainable:
        raise FeatureCacheError(f"{where}: the vision encoder trains ({len(trainable)} trainable tensors, "
                                f"e.g. {trainable[0]}); the feature cache needs train.vision: frozen")


@dataclass
class BuildReport:
    """What a cache build did: distinct images, entries reused / computed / found corrupt,
    images that could not be read, and the seconds it took."""

    directory: str
    images: int = 0
    reused: int = 0
    computed: int = 0
    corrupt: int = 0
    failed: int = 0
    seconds: float = 0.0
    failures: List[str] = field(default_factory=list)


class CachedFeatures:
    """Serves an encoder's cached features by image path (picklable, for DataLoader workers).

    ``load(path)`` raises ImageLoadError, naming the image and the cache file, when the image
    was unreadable at build time or its entry has gone bad since; the dataset then skips the
    sample as it does for an unreadable image.
    """

    def __init__(self, directory: str | Path, digests: Dict[str, str], shape: Sequence[int], dtype: torch.dtype):
        self.directory = Path(directory)
        self.digests = dict(digests)
        self.shape = tuple(shape)
        self.dtype = dtype

    def entry_path(self, image_digest: str) -> Path:
        """The entry file of an image digest."""
        return self.directory / image_digest[:2] / f"{image_digest}.safetensors"

    def load(self, path: str) -> torch.Tensor:
        """Features ``(N, Dv)`` of the image at ``path``."""
        image_digest = self.digests.get(path)
        if image_digest is None:
            raise ImageLoadError(f"cannot load image {path}: it could not be read when the feature cache was built")
        entry = self.entry_path(image_digest)
        try:
            with safe_open(str(entry), framework="pt") as f:
                tensor = f.get_tensor(TENSOR)
        except Exception as exc:
            raise ImageLoadError(f"cannot load cached features of image {path} from {entry}: {exc}") from exc
        if tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype:
            raise ImageLoadError(f"cached features of image {path} in {entry} have shape {tuple(tensor.shape)} "
                                 f"{tensor.dtype}, expected {self.shape} {self.dtype}")
        return tensor


class _ImagesToEncode(Dataset):
    """(digest, pixels or None) for each image still to encode; None when it fails to load."""

    def __init__(self, items: List[Tuple[str, str]], load_image: Callable[[str], torch.Tensor]):
        self.items = items
        self.load_image = load_image

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        image_digest, path = self.items[index]
        try:
            return image_digest, path, self.load_image(path), None
        except ImageLoadError as exc:
            return image_digest, path, None, str(exc)


class FeatureCache:
    """On-disk features of one frozen encoder under ``root/<encoder key>/``.

    Building refuses an encoder with trainable parameters. ``precision`` is the stage's
    (``fp32`` / ``bf16`` / ``fp16``): features are computed under the same autocast that training
    with the encoder running would use, and it is part of the key.
    """

    def __init__(self, root: str | Path, encoder: torch.nn.Module, precision: str = "fp32"):
        if any(p.requires_grad for p in encoder.parameters()):
            raise FeatureCacheError("feature_cache: the vision encoder has trainable parameters; "
                                    "cached features would go stale as it trains")
        self.encoder = encoder
        self.description = encoder_description(encoder, precision)
        self.key = description_key(self.description)
        self.directory = Path(root) / self.key
        self.shape = (encoder.num_patches, encoder.embed_dim)
        self.dtype = encoder_dtype(encoder)

    def reader(self, digests: Dict[str, str]) -> CachedFeatures:
        """A reader over this cache for ``{image path: digest}``."""
        return CachedFeatures(self.directory, digests, self.shape, self.dtype)

    def entry_path(self, image_digest: str) -> Path:
        """The entry file of an image digest."""
        return self.reader({}).entry_path(image_digest)

    def hash_images(self, paths: Iterable[str], progress: bool = True) -> Tuple[Dict[str, str], List[str]]:
        """``({path: digest of its bytes}, [messages for unreadable files])`` for distinct paths."""
        digests: Dict[str, str] = {}
        failures: List[str] = []
        for path in tqdm(sorted(set(paths)), desc="feature cache: hashing images", disable=not progress,
                         leave=False):
            try:
                digests[path] = file_digest(path)
            except OSError as exc:
                failures.append(f"cannot load image {path}: {exc}")
        return digests, failures

    def entry_is_valid(self, image_digest: str) -> bool:
        """Whether the entry exists and holds this key's features for this image, intact."""
        entry = self.entry_path(image_digest)
        if not entry.is_file():
            return False
        try:
            with safe_open(str(entry), framework="pt") as f:
                meta = f.metadata() or {}
                tensor = f.get_tensor(TENSOR)
        except Exception:
            return False
        return (meta.get("key") == self.key and meta.get("image") == image_digest
                and tuple(tensor.shape) == self.shape and tensor.dtype == self.dtype
                and meta.get("digest") == tensor_digest(tensor))

    def write_entry(self, image_digest: str, features: torch.Tensor) -> Path:
        """Store one image's features atomically (temporary file, then rename)."""
        entry = self.entry_path(image_digest)
        entry.parent.mkdir(parents=True, exist_ok=True)
        tensor = features.detach().to("cpu", self.dtype).contiguous()
        tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
        meta = {"key": self.key, "image": image_digest, "digest": tensor_digest(tensor)}
        try:
            save_file({TENSOR: tensor}, str(tmp), metadata=meta)
            os.replace(tmp, entry)
        finally:
            tmp.unlink(missing_ok=True)
        return entry

    def _write_key_file(self) -> None:
        path = self.directory / KEY_FILE
        if path.is_file():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{KEY_FILE}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.description, indent=2, default=str))
        os.replace(tmp, path)

    @torch.no_grad()
    def _encode(self, todo: List[Tuple[str, str]], load_image, device, autocast, batch_size: int,
                num_workers: int, progress: bool, report: BuildReport) -> None:
        loader = DataLoader(_ImagesToEncode(todo, load_image), batch_size=batch_size, shuffle=False,
                            num_workers=num_workers, collate_fn=list,
                            generator=torch.Generator())  # never draw from the global torch RNG
        was_training = self.encoder.training
        self.encoder.eval()
        bar = tqdm(total=len(todo), desc="feature cache: encoding images", disable=not progress, leave=False)
        try:
            for items in loader:
                ok = [(d, pixels) for d, _, pixels, error in items if error is None]
                for _, path, _, error in items:
                    if error is not None:
                        report.failed += 1
                        report.failures.append(error)
                if ok:
                    pixels = torch.stack([p for _, p in ok]).to(device)
                    with autocast():
                        features = self.encoder(pixels)
                    for (image_digest, _), row in zip(ok, features):
                        self.write_entry(image_digest, row)
                    report.computed += len(ok)
                bar.update(len(items))
        finally:
            bar.close()
            self.encoder.train(was_training)

    def build(self, paths: Iterable[str], load_image: Callable[[str], torch.Tensor], accelerator=None,
              batch_size: int = 32, num_workers: int = 0, progress: bool = True) -> Tuple[CachedFeatures, BuildReport]:
        """Make sure every readable image in ``paths`` has a valid entry; returns a reader and a
        report. ``load_image`` is the processor's (PIL -> the encoder's input tensor).

        With an ``accelerator``, the encoder runs on its device under its autocast, only the main
        process writes, and every process returns after the main one has finished.
        """
        start = time.perf_counter()
        is_main = accelerator is None or accelerator.is_main_process
        progress = progress and is_main
        report = BuildReport(directory=str(self.directory))
        digests, unreadable = self.hash_images(paths, progress)
        report.images = len(set(digests.values()))
        if is_main:
            report.failed, report.failures = len(unreadable), list(unreadable)
            self._write_key_file()
            first_path: Dict[str, str] = {}
            for path, image_digest in sorted(digests.items()):
                first_path.setdefault(image_digest, path)
            todo: Dict[str, str] = {}
            for image_digest, path in tqdm(sorted(first_path.items()), desc="feature cache: checking entries",
                                           disable=not progress, leave=False):
                if self.entry_is_valid(image_digest):
                    report.reused += 1
                    continue
                if self.entry_path(image_digest).exists():
                    report.corrupt += 1
                    logger.warning("feature cache: entry %s is not valid; recomputing it",
                                   self.entry_path(image_digest))
                todo[image_digest] = path
            if todo:
                device = accelerator.device if accelerator is not None else next(self.encoder.parameters()).device
                self.encoder.to(device)
                autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
                self._encode(sorted(todo.items()), load_image, device, autocast, batch_size, num_workers,
                             progress, report)
            for message in report.failures[:3]:
                logger.warning("feature cache: %s", message)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        report.seconds = time.perf_counter() - start
        if is_main:
            logger.info("feature cache %s: %d images, %d reused, %d computed (%d corrupt), %d unreadable, %.1f s",
                        self.directory, report.images, report.reused, report.computed, report.corrupt,
                        report.failed, report.seconds)
        return self.reader(digests), report


def build_stage_feature_cache(model, objective, processor, samples, trains: WhatTrains, precision: str,
                              root: str | Path, stage_name: str, accelerator=None, batch_size: int = 8,
                              num_workers: int = 0, progress: bool = True) -> Tuple[CachedFeatures, BuildReport]:
    """The feature cache of one stage (``trains``: what it trains; ``precision``: resolved):
    refuse when the stage cannot use it (FeatureCacheError naming ``stages.<name>.feature_cache``),
    else build it for every image of ``samples``, ``batch_size`` images at a time."""
    where = f"stages.{stage_name}.feature_cache"
    check_feature_cache(model, objective, where, trains.modes["vision"], trains.objective)
    cache = FeatureCache(root, model.vision, precision)
    paths = [path for sample in samples for path in sample.images]
    return cache.build(paths, processor.load_image, accelerator, batch_size=batch_size,
                       num_workers=num_workers, progress=progress)
