"""Chat with a trained model about images and videos, from the command line or Python."""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

from vlm.checkpoint.pretrained import load_pretrained
from vlm.data.types import VIDEO_TOKEN, Sample, Turn, marking_images_with
from vlm.modeling.processing import build_processor


def answer(model, processor, image: Union[str, Sequence[str]], turns: List[Turn], max_new_tokens: int = 64,
           temperature: float = 0.0, videos: Sequence[str] = ()) -> str:
    """The model's reply to a conversation whose markers refer to ``image`` (a path or a list,
    in marker order) and ``videos``."""
    from vlm.inference.generation import generate_answers

    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {}
    images = [image] if isinstance(image, str) else list(image)
    with marking_images_with(processor.image_token):
        sample = Sample(id="chat", turns=turns, images=images, videos=list(videos))
    return generate_answers(model, processor, [sample], batch_size=1, max_new_tokens=max_new_tokens,
                            desc="chat", **sampling)[0]


def task_prompt(question: str, model_cfg, enabled: bool = True) -> str:
    """``question`` in the prompt format the model was trained with: ``model.task_prompt_suffix``
    appended (when set, ``enabled`` and not already there)."""
    suffix = model_cfg.get("task_prompt_suffix") if enabled else None
    if not suffix or question.endswith(suffix):
        return question
    return question + suffix


def chat(checkpoint: str, image: Union[str, Sequence[str]], prompt: Optional[str] = None, max_new_tokens: int = 64,
         temperature: float = 0.0, template: Optional[str] = None, trust_remote_code: bool = False,
         use_task_prompt: bool = True, videos: Sequence[str] = ()) -> None:
    """Answer ``prompt`` about ``image`` (a path, or several in marker order) and ``videos``, or
    loop over questions read from stdin. Each question gets the checkpoint's
    ``task_prompt_suffix`` unless ``use_task_prompt`` is False. The first question shows them
    all, images then videos; the processor places them as the model was trained."""
    model, tokenizer, model_cfg = load_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    processor = build_processor(model, tokenizer, model_cfg, template)
    turns: List[Turn] = []
    questions = [prompt] if prompt else None
    while True:
        if questions is not None:
            if not questions:
                return
            question = questions.pop(0)
        else:
            try:
                question = input("you> ").strip()
            except EOFError:
                return
            if question in ("", "exit", "quit"):
                return
        question = task_prompt(question, model_cfg, use_task_prompt)
        content = visual_markers(processor.image_token, image, videos) + question if not turns else question
        turns.append(Turn("user", content))
        reply = answer(model, processor, image, turns, max_new_tokens, temperature, videos)
        turns.append(Turn("assistant", reply))
        print(reply if prompt else f"vlm> {reply}", flush=True)


def visual_markers(image_token: str, image: Union[str, Sequence[str]], videos: Sequence[str] = ()) -> str:
    """One marker line per image (in order), then one per video."""
    count = 1 if isinstance(image, str) else len(image)
    return f"{image_token}\n" * count + f"{VIDEO_TOKEN}\n" * len(videos)


def loglikelihood(model, processor, image, turns: List[Turn], continuation: str) -> float:
    """Sum of the log-probs of ``continuation`` as the reply to ``turns`` about ``image`` (a path
    or a PIL image)."""
    from vlm.inference.likelihood import loglikelihoods

    sample = Sample(id="chat", turns=turns, images=[image] if image is not None else [])
    return loglikelihoods(model, processor, [sample], [continuation])[0][0]
