"""How the server runs generations: requests come in as (prompt ids, sampling parameters) and go out as
asynchronous streams of :class:`~lowbit.runtime.sequence.Step`.

``BatchEngine`` decodes up to ``max_batch`` requests together (continuous batching); ``SerialEngine`` runs one
generation at a time on a worker thread, in arrival order, for models whose decoder holds one sequence. In
both, a consumer that stops reading (a client gone, streaming or not) cancels its generation at the next token,
and a request still waiting for its turn leaves the queue.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional

import torch

from lowbit.runtime.sampling import SamplingParams
from lowbit.runtime.sequence import Sequence, Step


PREFILL_TOKENS = 512  # prompt tokens prefilled together at most (more when one prompt alone is longer): GEMMs of 512
# rows ran at ~95% of the rate of 1024 here, and a smaller pass keeps the first prompts from waiting for the last


class _Cancelled(Exception):
    pass


async def _received(items: asyncio.Queue) -> AsyncIterator[Step]:
    """The steps a worker puts in ``items`` until its None; an exception it puts is raised here."""
    while (item := await items.get()) is not None:
        if isinstance(item, Exception):
            raise item
        yield item


class SerialEngine:
    def __init__(self, llm):
        self.llm = llm
        self.turn = asyncio.Lock()  # FIFO among waiting requests
        self.model = threading.Lock()  # the model and its KV cache, held by the worker even after a cancel

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       top_logprobs: Optional[int] = None) -> AsyncIterator[Step]:
        """The steps of one generation; closing the iterator early cancels it."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def produce() -> None:
            try:
                with self.model:
                    for step in self.llm.stream_steps(prompt_ids, params, top_logprobs):
                        if cancel.is_set():
                            raise _Cancelled
                        loop.call_soon_threadsafe(queue.put_nowait, step)
            except _Cancelled:
                pass
            except Exception as exc:  # handed to the consumer, which reports it
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            loop.call_soon_threadsafe(queue.put_nowait, None)

        async with self.turn:
            worker = loop.run_in_executor(None, produce)
            try:
                async for step in _received(queue):
                    yield step
            finally:
                cancel.set()
                await worker


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    top_logprobs: Optional[int]
    emit: Callable[[object], None]  # a Step, an Exception, or None at the end
    cancel: threading.Event


@dataclass
class _Running:
    request: _Request
    sequence: Sequence
    slot: int
    position: int  # where the next token goes
    token: int  # the token to feed at ``position``


class BatchEngine:
    """Continuous batching: up to ``llm.max_batch`` generations decode together, one batched decode step per
    token (each projection's weights read once for all of them), each in its own KV cache slot with its own
    sampling parameters and stop strings. Requests join at the next step (the prompts that arrived meanwhile
    prefilled together in one pass, each into its slot), leave when they finish or their client goes, and free
    their slots; requests beyond ``max_batch`` wait in arrival order. One scheduler thread owns the model."""

    def __init__(self, llm):
        self.llm = llm
        self.waiting: queue.Queue[_Request] = queue.Queue()
        self.free = list(range(llm.max_batch - 1, -1, -1))
        self.scheduler = threading.Thread(target=self._schedule, name="lowbit-batch", daemon=True)
        self.scheduler.start()

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       top_logprobs: Optional[int] = None) -> AsyncIterator[Step]:
        """The steps of one generation; closing the iterator early cancels it at the next step."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        self.waiting.put(_Request(prompt_ids, params, top_logprobs,
                                  lambda item: loop.call_soon_threadsafe(out.put_nowait, item), cancel))
        try:
            async for step in _received(out):
                yield step
        finally:
            cancel.set()

    def _schedule(self) -> None:
        running: list[_Running] = []
        while True:
            running = [r for r in running if not self._dropped(r)]
            arrived = self._arrivals(block=not running)
            if arrived:
                running += self._admit(arrived)
            if running:
                running = self._step(running)

    def _arrivals(self, block: bool) -> list[_Request]:
        """The waiting requests that fit the free slots and one prefill's token budget (at least one; waiting for
        it only when ``block``)."""
        taken: list[_Request] = []
        tokens = 0
        while len(taken) < len(self.free):
            try:
                request = self.waiting.get(block=block and not taken)
            except queue.Empty:
                break
            taken.append(request)
            tokens += len(request.prompt_ids)
            if tokens >= PREFILL_TOKENS:
                break
        return taken

    def _dropped(self, r: _Running) -> bool:
        if r.request.cancel.is_set():
            self._leave(r.request, r.slot)
            return True
        return False

    def _admit(self, requests: list[_Request]) -> list[_Running]:
        """Prefill the requests' prompts together, each into a free slot, and emit their first steps; returns those
        that go on decoding."""
        ready = []
        for request in requests:
            if request.cancel.is_set():
                request.emit(None)
                continue
            try:
                self.llm.check_length(len(request.prompt_ids), request.params.max_tokens)
                sequence = Sequence(self.llm.tokenizer, request.params, self.llm.eos_ids, request.top_logprobs)
            except Exception as exc:  # handed to the request, which reports it; the others go on
                request.emit(exc)
                request.emit(None)
                continue
            ready.append((request, sequence, self.free.pop()))
        if not ready:
            return []
        try:
            logits = self.llm.decoder.prefill([(request.prompt_ids, slot) for request, _, slot in ready])
        except Exception as exc:
            for request, _, slot in ready:
                request.emit(exc)
                self._leave(request, slot)
            return []
        joined = []
        for (request, sequence, slot), row in zip(ready, logits):
            step = sequence.advance(row)
            request.emit(step)
            if step.finish:
                self._leave(request, slot)
            else:
                joined.append(_Running(request, sequence, slot, len(request.prompt_ids), step.token))
        return joined

    def _step(self, running: list[_Running]) -> list[_Running]:
        """One batched decode step for every running sequence; returns those still running."""
        try:
            logits = self.llm.decoder.decode_batch([r.token for r in running], [r.position for r in running],
                                                   [r.slot for r in running])
        except Exception as exc:
            for r in running:
                r.request.emit(exc)
                self._leave(r.request, r.slot)
            return []
        still = []
        for r, row in zip(running, logits):
            step = r.sequence.advance(row)
            r.request.emit(step)
            if step.finish:
                self._leave(r.request, r.slot)
            else:
                r.position, r.token = r.position + 1, step.token
                still.append(r)
        return still

    def _leave(self, request: _Request, slot: int) -> None:
        request.emit(None)
        self.free.append(slot)


def engine_for(llm):
    """The batching engine where the model can hold several sequences, else one generation at a time."""
    return BatchEngine(llm) if getattr(llm, "max_batch", 1) > 1 else SerialEngine(llm)
