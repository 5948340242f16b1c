"""One worker thread that answers queued chat requests with vlm's own generation path.

Requests wait in a thread-safe queue; the worker takes what has arrived (up to
``max_batch_size``), answers requests with the same sampling settings in one batch through
:func:`vlm.inference.generation.generate_answers` (the path ``vlm chat`` and ``vlm eval`` use),
and streamed requests one at a time with a streamer that hands out text as it is decoded.

At most ``max_queue`` requests wait (``submit`` raises :class:`QueueFull` beyond). A request
cancelled while it waits (its client left, its time ran out) leaves the queue at once and is
never generated; a generation whose requests were all cancelled stops at its next token.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Tuple

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
    abandoned: bool = False

    def cancel(self) -> None:
        """Nobody waits for the answer any more: dropped if still queued, else its generation
        stops once every request it answers is abandoned."""
        self.abandoned = True
        self.future.cancel()

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


class QueueFull(Exception):
    """``max_queue`` requests are waiting already."""


class Abandoned(Exception):
    """Raised inside ``generate`` to stop a generation nobody waits for."""


@dataclass
class EngineStats:
    """What the worker has done so far (read by /metrics)."""

    generated_tokens: int = 0
    generation_seconds: float = 0.0
    batches: int = 0
    running: int = 0
    cancelled_queued: int = 0
    cancelled_generating: int = 0


class TokenCounter(BaseStreamer):
    """Collects each row's new token ids during ``generate`` (rows end at their first end token);
    raises :class:`Abandoned` at a step where ``should_stop()`` is true."""

    def __init__(self, end_ids):
        self.end_ids = set(end_ids)
        self.rows: List[List[int]] = []
        self.first = True
        self.should_stop: Optional[Callable[[], bool]] = None

    def put(self, value) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Abandoned()
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


def context_length(model) -> Optional[int]:
    """The model's context in tokens: its LLM config's ``max_position_embeddings`` (None: unknown)."""
    config = getattr(getattr(model, "llm", None), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


class GenerationEngine:
    """Owns the model and its processor; ``submit`` queues a request (at most ``max_queue``
    waiting, None: no limit), the worker answers it."""

    def __init__(self, model, processor, max_batch_size: int = 8, max_queue: Optional[int] = 64):
        self.model = model
        self.processor = processor
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.context_length = context_length(model)
        self.stats = EngineStats()
        self._waiting: Deque[GenerationRequest] = deque()
        self._lock = threading.Condition()
        self._closed = False
        self.worker = threading.Thread(target=self._run, name="vlm-generate", daemon=True)
        self.worker.start()

    def submit(self, request: GenerationRequest) -> Future:
        """Queue ``request``; its future resolves to its :class:`Completion`. QueueFull when
        ``max_queue`` requests wait already; RuntimeError once closed."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the generation engine is closed")
            if self.max_queue is not None and len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_queue})")
            self._waiting.append(request)
            self._lock.notify()
        request.future.add_done_callback(lambda future: self._cancelled(request, future))
        return request.future

    def _cancelled(self, request: GenerationRequest, future: Future) -> None:
        # a future can only be cancelled while pending, i.e. before the worker took it
        if not future.cancelled():
            return
        with self._lock:
            # by identity (a dataclass compares its fields, images included); absent when the
            # worker has just popped it: it skips it
            for i, waiting in enumerate(self._waiting):
                if waiting is request:
                    del self._waiting[i]
                    break
            self.stats.cancelled_queued += 1

    def waiting(self) -> int:
        """Requests queued and not started."""
        with self._lock:
            return len(self._waiting)

    def retry_after_s(self) -> int:
        """A guess at when a slot frees up: the mean batch time times the batches ahead, 1..60 s."""
        stats = self.stats
        per_batch = stats.generation_seconds / stats.batches if stats.batches else 1.0
        ahead = self.waiting() / self.max_batch_size + 1
        return int(min(60, max(1, math.ceil(per_batch * ahead))))

    def close(self) -> None:
        """Refuse new requests; the worker answers those queued, then ends (join ``worker``)."""
        with self._lock:
            self._closed = True
            self._lock.notify()

    def _take(self) -> Optional[List[GenerationRequest]]:
        """The next requests to answer (cancelled ones skipped); None once closed and drained."""
        with self._lock:
            while True:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                if not self._waiting:
                    return None
                taken = []
                while self._waiting and len(taken) < self.max_batch_size:
                    request = self._waiting.popleft()
                    if request.future.set_running_or_notify_cancel():
                        taken.append(request)
                if taken:
                    return taken

    def _run(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            groups: Dict[Tuple, List[GenerationRequest]] = {}
            for request in taken:
                if request.on_text is not None:
                    self._answer([request], streamer=True)
                else:
                    groups.setdefault(request.batch_key(), []).append(request)
            for requests in groups.values():
                self._answer(requests)

    def _answer(self, requests: List[GenerationRequest], streamer: bool = False) -> None:
        live = []
        for request in requests:
            if request.abandoned:  # given up while an earlier group of its batch ran
                self.stats.cancelled_queued += 1
                request.future.set_exception(CancelledError())
            else:
                live.append(request)
        requests = live
        if not requests:
            return
        first = requests[0]
        kwargs = first.sampling()
        end_ids = stop_settings(self.processor)["eos_token_id"]
        if streamer:
            stops = self.processor.template.stop_strings() + first.stop
            counter = TextDeltaStreamer(self.processor.tokenizer, stops, first.on_text, end_ids)
        else:
            counter = TokenCounter(end_ids)
        counter.should_stop = lambda: all(r.abandoned for r in requests)
        self.stats.running = len(requests)
        start = time.perf_counter()
        try:
            texts = generate_answers(self.model, self.processor, [r.sample for r in requests],
                                     batch_size=len(requests), max_new_tokens=first.max_tokens, desc="serve",
                                     streamer=counter, **kwargs)
        except Abandoned:
            self.stats.cancelled_generating += len(requests)
            for request in requests:
                request.future.set_exception(CancelledError())
            return
        except Exception as exc:  # handed to the waiting requests, never lost
            logger.exception("generation failed")
            for request in requests:
                request.future.set_exception(exc)
            return
        finally:
            self._count(counter, time.perf_counter() - start)
        for row, (request, text) in enumerate(zip(requests, texts)):
            final = finish(text, request.stop)
            request.future.set_result(counter.completion(row, final, request.max_tokens, final != text))

    def _count(self, counter: TokenCounter, seconds: float) -> None:
        stats = self.stats
        stats.generated_tokens += sum(len(row) for row in counter.rows)
        stats.generation_seconds += seconds
        stats.batches += 1
        stats.running = 0
