"""Chat templates: a conversation -> text segments, each marked trainable or not.

Labels are built from these segments turn by turn, never by re-tokenising the whole prompt and
counting. Templates:

- ``plain``: LLaVA's alignment format. A user turn contributes only its ``<image>`` and
  ``<video>`` markers (its text is dropped); an assistant turn is trained together with a
  trailing newline.
- ``vicuna_v1``: ``SYSTEM USER: q ASSISTANT: a</s>USER: ...`` (LLaVA-1.5).
- ``chatml``: ``<|im_start|>role\\n...<|im_end|>\\n`` (Qwen and others).
- ``tokenizer``: the tokenizer's own ``chat_template`` (Jinja), split by rendering prefixes.
- ``blip2_qa``, ``instructblip``: the BLIP-2 / InstructBLIP papers' prompts (``Question: {} Short answer:``).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, List, Mapping, Optional, Sequence, Tuple

from vlm.core.errors import TemplateError
from vlm.core.registry import Registry
from vlm.data.types import IMAGE_TOKEN, VIDEO_TOKEN, Turn

TEMPLATES: Registry = Registry("chat template")

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass
class TemplateContext:
    """What a chat template is built for (``ChatTemplate.build``): the LLM's tokenizer and the
    system prompt (None: the template's own default)."""

    tokenizer: Any = None
    system_prompt: Optional[str] = None


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text; ``trainable`` pieces get labels, the rest get -100."""

    text: str
    trainable: bool




class ChatTemplate(ABC):
    """Renders conversations into segments and knows how generation should start and stop."""

    add_bos: bool = True
    # the image marker of the conversations (the processor sets the model's ``image_token``)
    image_token: str = IMAGE_TOKEN
    # the component protocol (vlm.core.registry.Component): a template takes no options
    Options: ClassVar[Optional[type]] = None

    def __init__(self, tokenizer, system_prompt: Optional[str] = None):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt

    @classmethod
    def build(cls, options: Optional[Mapping[str, Any]], ctx: TemplateContext) -> "ChatTemplate":
        """The template bound to ``ctx.tokenizer`` and ``ctx.system_prompt``."""
        return cls(ctx.tokenizer, ctx.system_prompt)

    @classmethod
    def check(cls, cfg, where: str) -> None:
        """Nothing in a config section that names a template is the template's to check (the
        ``tokenizer`` template needs a tokenizer with a chat_template: refused when built)."""

    @abstractmethod
    def segments(self, turns: Sequence[Turn], add_generation_prompt: bool = False) -> List[Segment]:
        """Segments for ``turns``; with ``add_generation_prompt`` they end where the answer starts."""

    def stop_strings(self) -> List[str]:
        """Strings that end an assistant answer (besides the tokenizer's eos token)."""
        return []

    @staticmethod
    def split_system(turns: Sequence[Turn]):
        """(system text or None, the other turns), checking alternation user/assistant."""
        system = None
        rest = list(turns)
        if rest and rest[0].role == "system":
            system, rest = rest[0].content, rest[1:]
        for i, turn in enumerate(rest):
            if turn.role == "system":
                raise TemplateError("a system turn may only come first")
        return system, rest

    @staticmethod
    def alternate(turns: Sequence[Turn], text: str, user: Tuple[str, str], answer: Tuple[str, str],
                  after_answer: str = "", add_generation_prompt: bool = False) -> List[Segment]:
        """Segments of ``turns`` (no system turn) after the untrained opening ``text``: a user
        turn adds its content, between the two strings of ``user``, to the untrained text; an
        assistant turn is trained, between the two strings of ``answer``, and the untrained
        text starts again with ``after_answer`` (left out after the last answer with
        ``add_generation_prompt``)."""
        out: List[Segment] = []
        for turn in turns:
            if turn.role == "user":
                text += f"{user[0]}{turn.content}{user[1]}"
            else:
                out.append(Segment(text, False))
                out.append(Segment(f"{answer[0]}{turn.content}{answer[1]}", True))
                text = after_answer
        if add_generation_prompt and turns and turns[-1].role != "user":
            text = ""
        if text:
            out.append(Segment(text, False))
        return out


@TEMPLATES.register("plain")
class PlainTemplate(ChatTemplate):
    """LLaVA's ``plain`` alignment format: image markers, then the trained answer and a newline."""

    def segments(self, turns, add_generation_prompt=False):
        _, turns = self.split_system(turns)
        out: List[Segment] = []
        for turn in turns:
            if turn.role == "user":
                # its image and video markers, in order (a video's frames are visual tokens too)
                markers = re.findall(f"{re.escape(self.image_token)}|{re.escape(VIDEO_TOKEN)}", turn.content)
                out.append(Segment("".join(markers), False))
            else:
                out.append(Segment(turn.content + "\n", True))
        return [s for s in out if s.text]

    def stop_strings(self):
        return ["\n"]


@TEMPLATES.register("vicuna_v1")
class VicunaTemplate(ChatTemplate):
    """``SYSTEM USER: q ASSISTANT: a</s>`` as in LLaVA-1.5's ``conv_vicuna_v1``."""

    def segments(self, turns, add_generation_prompt=False):
        system, turns = self.split_system(turns)
        eos = self.tokenizer.eos_token
        text = (system or self.system_prompt or VICUNA_SYSTEM) + " "
        return self.alternate(turns, text, ("USER: ", " ASSISTANT:"), (" ", eos))


@TEMPLATES.register("chatml")
class ChatMLTemplate(ChatTemplate):
    """``<|im_start|>role\\ncontent<|im_end|>\\n``; the answer and its ``<|im_end|>`` are trained."""

    add_bos = False

    def segments(self, turns, add_generation_prompt=False):
        system, turns = self.split_system(turns)
        system = system or self.system_prompt
        text = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        return self.alternate(turns, text, ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),
                              ("", "<|im_end|>"), after_answer="\n", add_generation_prompt=add_generation_prompt)

    def stop_strings(self):
        return ["<|im_end|>"]


@TEMPLATES.register("tokenizer")
class TokenizerChatTemplate(ChatTemplate):
    """The tokenizer's own Jinja ``chat_template``, split into turns by rendering prefixes.

    The assistant span of turn i is the text between the rendering of turns[:i] with the
    generation prompt and the rendering of turns[:i+1], less trailing whitespace (the separator
    before the next turn, which stays unlabelled as in ``chatml``); a template whose renderings are not
    prefixes of each other is refused with a clear error.
    """

    add_bos = False  # chat templates write their own bos

    def __init__(self, tokenizer, system_prompt=None):
        super().__init__(tokenizer, system_prompt)
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("template 'tokenizer': this tokenizer has no chat_template")

    def _render(self, turns, add_generation_prompt):
        messages = [{"role": t.role, "content": t.content} for t in turns]
        if not turns:
            return ""
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def segments(self, turns, add_generation_prompt=False):
        turns = list(turns)
        if self.system_prompt and (not turns or turns[0].role != "system"):
            turns = [Turn("system", self.system_prompt)] + turns
        out: List[Segment] = []
        done = ""
        for i, turn in enumerate(turns):
            if turn.role != "assistant":
                continue
            prompt = self._render(turns[:i], add_generation_prompt=True)
            full = self._render(turns[: i + 1], add_generation_prompt=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise TemplateError(
                    "template 'tokenizer': the chat_template's renderings of successive turns are "
                    "not prefixes of each other, so labels cannot be split by turn"
                )
            out.append(Segment(prompt[len(done):], False))
            # the answer and its end token train; the separator whitespace after it does not
            answer = full[len(prompt):]
            body = answer.rstrip()
            out.append(Segment(body, True))
            out.append(Segment(answer[len(body):], False))
            done = full
        final = self._render(turns, add_generation_prompt=add_generation_prompt)
        if not final.startswith(done):
            raise TemplateError("template 'tokenizer': final rendering does not extend the turns")
        if final[len(done):]:
            out.append(Segment(final[len(done):], False))
        return [s for s in out if s.text]


class PaperPromptTemplate(ChatTemplate):
    """A paper's fixed prompt: each user turn's images, then its text in ``question`` (or, for a
    turn with no text besides its images, ``caption``); the answer after a space, eos trained
    after it (an encoder-decoder model's target ends with eos anyway)."""

    add_bos = False  # BLIP-2's prompts start with the visual tokens, as its processor writes them
    question: ClassVar[str] = "{}"
    caption: ClassVar[str] = ""

    def prompt(self, content: str) -> str:
        """A user turn's text: its image markers, then the question or caption prompt."""
        markers = self.image_token * content.count(self.image_token)
        text = content.replace(self.image_token, "").strip()
        return markers + (self.question.format(text) if text else self.caption)

    def segments(self, turns, add_generation_prompt=False):
        _, turns = self.split_system(turns)
        eos = self.tokenizer.eos_token or ""
        out: List[Segment] = []
        text = ""
        for turn in turns:
            if turn.role == "user":
                text += (" " if text else "") + self.prompt(turn.content)
            else:
                out += [Segment(text, False), Segment(f" {turn.content}{eos}", True)]
                text = ""
        if text:
            out.append(Segment(text, False))
        return [s for s in out if s.text]


@TEMPLATES.register("blip2_qa")
class Blip2QATemplate(PaperPromptTemplate):
    """BLIP-2's zero-shot VQA prompt ``Question: {} Short answer:``; captions get no prompt."""

    question = "Question: {} Short answer:"


@TEMPLATES.register("instructblip")
class InstructBlipTemplate(PaperPromptTemplate):
    """InstructBLIP's instruction templates: ``Question: {} Short answer:`` for a question,
    ``A short image description:`` for a caption (its VQA and captioning evaluation prompts)."""

    question = "Question: {} Short answer:"
    caption = "A short image description:"


def build_template(name: str, tokenizer, system_prompt: Optional[str] = None) -> ChatTemplate:
    """The template registered as ``name``, bound to ``tokenizer`` (``ChatTemplate.build``)."""
    return TEMPLATES.get(name).build(None, TemplateContext(tokenizer, system_prompt))
