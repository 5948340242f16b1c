"""One worker thread that answers queued chat requests with vlm's own generation path.

Requests wait in a thread-safe queue; the worker takes what has arrived (up to
``max_batch_size``), answers requests with the same sampling settings in one batch through
:func:`vlm.inference.generation.generate_answers` (the path ``vlm chat`` and ``vlm eval`` use),
and streamed requests one at a time with a streamer that hands out text as it is decoded.
Nothing is dropped: a request waits until the worker reaches it.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from transformers.generation.streamers import BaseStreamer

from vlm.data.types import Sample
from vlm.inference.generation import clean_answer, generate_answers, stop_settings

logger = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    """A conversation (``sample``, images in memory) and how to answer it; ``on_text`` receives
    streamed text pieces (None: not streamed); ``future`` resolves to a :class:`Completion`."""

    sample: Sample
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: List[str] = field(default_factory=list)
    on_text: Optional[Callable[[str], None]] = None
    future: Future = field(default_factory=Future)

    def sampling(self) -> Dict:
        """Generation keyword arguments: greedy at temperature 0, else sampling."""
        if self.temperature <= 0:
            return {}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}

    def batch_key(self) -> Tuple:
        return (self.max_tokens, self.temperature, self.top_p)


def finish(text: str, stops: List[str]) -> str:
    """The answer cut at the request's own stop strings (vlm's template stops are cut already)."""
    return clean_answer(text, stops) if stops else text


@dataclass
class Completion:
    """An answer, how many tokens were generated for it, and why generation ended."""

    text: str
    completion_tokens: int
    finish_reason: str  # "stop" (an end token or a stop string) or "length"


class TokenCounter(BaseStreamer):
    """Collects each row's new token ids during ``generate`` (rows end at their first end token)."""

    def __init__(self, end_ids):
        self.end_ids = set(end_ids)
        self.rows: List[List[int]] = []
        self.first = True

    def put(self, value) -> None:
        if self.first:  # generate() first passes the prompt (empty here: inputs_embeds)
            self.first = False
            if value.dim() > 1:
                return
        values = [int(t) for t in value.reshape(-1)]
        if not self.rows:
            self.rows = [[] for _ in values]
        for row, token in zip(self.rows, values):
            if not row or row[-1] not in self.end_ids:
                row.append(token)
        self.on_tokens()

    def on_tokens(self) -> None:
        """Called after every step (streaming subclasses emit text here)."""

    def end(self) -> None:
        self.on_tokens()

    def completion(self, row: int, text: str, max_tokens: int, cut_by_stop: bool) -> Completion:
        ids = self.rows[row] if row < len(self.rows) else []
        ended = bool(ids) and ids[-1] in self.end_ids
        return Completion(text, len(ids), "stop" if ended or cut_by_stop or len(ids) < max_tokens else "length")


class TextDeltaStreamer(TokenCounter):
    """Streams a one-sample generation: hands ``on_text`` only text that the final answer is sure
    to start with: leading whitespace is dropped, and trailing whitespace or a possible
    beginning of a stop string is held back (``clean_answer`` strips and cuts those)."""

    def __init__(self, tokenizer, stops: List[str], on_text: Callable[[str], None], end_ids=()):
        super().__init__(end_ids)
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.on_text = on_text
        self.sent = ""
        self.stopped = False

    def _safe_text(self) -> str:
        ids = self.rows[0] if self.rows else []
        text = self.tokenizer.decode(ids, skip_special_tokens=True).lstrip()
        for stop in self.stops:
            if stop in text:
                self.stopped = True
                text = text.split(stop, 1)[0]
        if self.stopped:
            return text.rstrip()
        text = text.rstrip("\ufffd")  # a character split across tokens
        held = 0
        for stop in self.stops:  # the longest suffix that may begin a stop string
            for n in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:n]):
                    held = n
                    break
        return text[: len(text) - held].rstrip()

    def on_tokens(self) -> None:
        text = self._safe_text()
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text


class GenerationEngine:
    """Owns the model and its processor; ``submit`` queues a request, the worker answers it."""

    def __init__(self, model, processor, max_batch_size: int = 8):
        self.model = model
        self.processor = processor
        self.max_batch_size = max_batch_size
        self.queue: "queue.Queue[Optional[GenerationRequest]]" = queue.Queue()
        self.worker = threading.Thread(target=self._run, name="vlm-generate", daemon=True)
        self.worker.start()

    def submit(self, request: GenerationRequest) -> Future:
        """Queue ``request``; its future resolves to its :class:`Completion`."""
        self.queue.put(request)
        return request.future

    def close(self) -> None:
        self.queue.put(None)

    def _run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            taken = [first]
            while len(taken) < self.max_batch_size:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self.queue.put(None)
                    break
                taken.append(item)
            groups: Dict[Tuple, List[GenerationRequest]] = {}
            for request in taken:
                if request.on_text is not None:
                    self._answer([request], streamer=True)
                else:
                    groups.setdefault(request.batch_key(), []).append(request)
            for requests in groups.values():
                self._answer(requests)

    def _answer(self, requests: List[GenerationRequest], streamer: bool = False) -> None:
        first = requests[0]
        kwargs = first.sampling()
        end_ids = stop_settings(self.processor)["eos_token_id"]
        if streamer:
            stops = self.processor.template.stop_strings() + first.stop
            counter = TextDeltaStreamer(self.processor.tokenizer, stops, first.on_text, end_ids)
        else:
            counter = TokenCounter(end_ids)
        try:
            texts = generate_answers(self.model, self.processor, [r.sample for r in requests],
                                     batch_size=len(requests), max_new_tokens=first.max_tokens, desc="serve",
                                     streamer=counter, **kwargs)
        except Exception as exc:  # handed to the waiting requests, never lost
            logger.exception("generation failed")
            for request in requests:
                request.future.set_exception(exc)
            return
        for row, (request, text) in enumerate(zip(requests, texts)):
            final = finish(text, request.stop)
            request.future.set_result(counter.completion(row, final, request.max_tokens, final != text))
