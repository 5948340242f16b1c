"""lmms-eval's model ``vlm``: any vlm stage output evaluated by lmms-eval's tasks.

Registered through lmms-eval's entry-point group ``lmms_eval.models`` (see pyproject.toml), so
after ``pip install -e ".[eval]"``::

    lmms-eval --model vlm --model_args checkpoint=DIR[,batch_size=8,template=T] --tasks pope

A request's context and visuals become one user turn (a ``<video>`` marker per video, an
``<image>`` marker per image, then the context with any ``<image>`` tags of its own removed)
rendered with the model's chat template. As lmms-eval's own models read them, a visual given as a
path (``str``) is a video (a file PyAV decodes, or a folder of frames), sampled as the model's
``model.video`` says; a PIL image is an image.
``generate_until`` runs vlm's generation path (:func:`vlm.inference.generation.generate_answers`)
and cuts the answer at the task's ``until`` strings; ``loglikelihood`` runs
:func:`vlm.inference.likelihood.loglikelihoods`.
"""

from __future__ import annotations

import json
from typing import Dict, List, Optional, Tuple

from lmms_eval.api.model import lmms
from tqdm.auto import tqdm

from vlm.data.types import IMAGE_TOKEN, VIDEO_TOKEN, Sample, Turn
from vlm.inference.generation import clean_answer, generate_answers
from vlm.inference.likelihood import loglikelihoods

MODEL_NAME = "vlm"


def manifest():
    """The entry point's payload: lmms-eval's manifest for ``--model vlm``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.VLMLmms")


def _images(visuals) -> list:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    out = []
    for visual in visuals:
        out.extend(_images(visual))
    return out


class VLMLmms(lmms):
    """A vlm stage output as an lmms-eval model (single process)."""

    def __init__(self, checkpoint: str, batch_size: int | str = 8, device: Optional[str] = None,
                 template: Optional[str] = None, max_new_tokens: int | str = 256, **kwargs) -> None:
        super().__init__()
        from vlm.checkpoint.pretrained import load_pretrained
        from vlm.modeling.processing import build_processor

        if kwargs:
            raise ValueError(f"--model_args: unknown argument(s) {sorted(kwargs)} for model vlm "
                             "(checkpoint, batch_size, device, template, max_new_tokens)")
        self.model, tokenizer, model_cfg = load_pretrained(checkpoint, device=device)
        self.processor = build_processor(self.model, tokenizer, model_cfg, template)
        self.batch_size_per_gpu = int(batch_size)
        self.default_max_new_tokens = int(max_new_tokens)

    @staticmethod
    def sample(context: str, visuals, sample_id: str = "lmms") -> Sample:
        """One user turn: a ``<video>`` marker per video (a visual given as a path), an
        ``<image>`` marker per image, then the context."""
        flat = _images(visuals)
        videos = [visual for visual in flat if isinstance(visual, str)]
        images = [visual for visual in flat if not isinstance(visual, str)]
        text = context.replace(IMAGE_TOKEN, "").strip()
        markers = f"{VIDEO_TOKEN}\n" * len(videos) + f"{IMAGE_TOKEN}\n" * len(images)
        return Sample(id=sample_id, turns=[Turn("user", markers + text)], images=images, videos=videos)

    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def generate_until(self, requests) -> List[str]:
        results: List[Optional[str]] = [None] * len(requests)
        groups: Dict[str, List[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        progress = tqdm(total=len(requests), desc="vlm generate_until", disable=self.rank != 0)
        for indices in groups.values():
            settings = dict(requests[indices[0]].args[1])
            until = settings.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            kwargs = {"max_new_tokens": int(settings.get("max_new_tokens") or self.default_max_new_tokens),
                      "num_beams": int(settings.get("num_beams") or 1)}
            temperature = float(settings.get("temperature") or 0)
            if temperature > 0 and settings.get("do_sample", True):
                kwargs.update(do_sample=True, temperature=temperature)
                if settings.get("top_p") is not None:
                    kwargs["top_p"] = float(settings["top_p"])
            samples = []
            for i in indices:
                context, _, doc_to_visual, doc_id, task, split = requests[i].args
                samples.append(self.sample(context, doc_to_visual(self._doc(task, split, doc_id)), f"{task}/{doc_id}"))
            answers = generate_answers(self.model, self.processor, samples, batch_size=self.batch_size_per_gpu,
                                       desc="lmms-eval", **kwargs)
            for i, answer in zip(indices, answers):
                results[i] = clean_answer(answer, until)
                self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), results[i])
            progress.update(len(indices))
        progress.close()
        return results

    def loglikelihood(self, requests) -> List[Tuple[float, bool]]:
        samples, continuations = [], []
        for request in requests:
            context, target, doc_to_visual, doc_id, task, split = request.args
            doc = self._doc(task, split, doc_id)
            samples.append(self.sample(context, doc_to_visual(doc), f"{task}/{doc_id}"))
            continuations.append(target if isinstance(target, str) else target(doc))
        return loglikelihoods(self.model, self.processor, samples, continuations, batch_size=self.batch_size_per_gpu)

    def generate_until_multi_round(self, requests) -> List[str]:
        raise NotImplementedError("model vlm: multi-round generation is not supported")
