"""The engine: one worker thread that owns the model, a bounded queue of jobs, and batching.

The worker takes the oldest job together with every queued job that can share its decoding
settings and decodes them as one left-padded batch, handing each row's committed tokens to its
job. A job whose client went away, or whose answer hit a stop string, stops taking part. Usage
comes from the batch's `GenerationStats` alone, whatever the mode. Admission refuses work that the
speed measured so far says cannot finish before its deadline.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time

from ..evaluate import left_pad
from ..generation import GenerationStats, RowStreamer, StopGeneration, through_eos
from ..modes import run_mode
from ..tokenizer import IncrementalText
from .protocol import APIError, Sampling, ServeConfig, usage

RATE_MEMORY = 0.5  # weight of the newest batch in the running estimate of seconds per position


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")


def timed_out() -> APIError:
    return APIError(504, "the request timed out before generation finished", type="timeout_error", code="timeout")


class Job:
    """One request on its way through the worker. The worker thread calls `take`/`fail`; the
    event loop reads `events` and may `cancel`. Events: ("delta", text), ("done", text,
    finish_reason, usage), ("error", APIError)."""

    def __init__(self, prompt_ids: list[int], sampling: Sampling, text: IncrementalText, eos_id: int | None,
                 loop: asyncio.AbstractEventLoop, show_step=None):
        self.prompt_ids, self.sampling, self.text, self.eos_id, self.loop = prompt_ids, sampling, text, eos_id, loop
        self.show_step = show_step  # None, or ids -> each position's text (None where masked): send steps
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.finished = False
        self.completion_tokens = 0

    @property
    def done(self) -> bool:
        return self.finished or self.cancelled.is_set()

    def cancel(self) -> None:
        self.cancelled.set()

    def _emit(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def take(self, tokens: list[int], stats: GenerationStats, row: int) -> None:
        """New tokens for this row (`row` of the batch): pass on their text, finish at EOS, a stop
        string or max_tokens."""
        if self.done:
            return
        tokens, hit_eos = through_eos(tokens[:self.sampling.max_tokens - self.completion_tokens], self.eos_id)
        self.completion_tokens += len(tokens)
        at_limit = self.completion_tokens >= self.sampling.max_tokens
        delta, stopped = self.text.feed(tokens[:-1] if hit_eos else tokens, final=hit_eos or at_limit)
        if stopped or hit_eos or at_limit:
            self.finished = True
            self._emit("done", delta, "stop" if stopped or hit_eos else "length",
                       usage(len(self.prompt_ids), self.completion_tokens, stats, row))
        else:
            self._emit("delta", delta)

    def step(self, block: int, step: int, tokens: list[int], committed: list[bool]) -> None:
        """One denoising step of this row's current block."""
        if not self.done:
            self._emit("step", {"block": block, "step": step, "tokens": self.show_step(tokens),
                                "committed": committed})

    def fail(self, error: APIError) -> None:
        if not self.done:
            self.finished = True
            self._emit("error", error)

    async def events_until(self, disconnected, deadline: float):
        """This job's events until done or error. Raises a 504 APIError at the deadline (loop time);
        ends quietly, cancelling the job, once the awaitable `disconnected()` says the client left."""
        while True:
            left = deadline - self.loop.time()
            if left <= 0:
                self.cancel()
                raise timed_out()
            try:
                event = await asyncio.wait_for(self.events.get(), min(left, 0.5))
            except asyncio.TimeoutError:
                event = None
            if await disconnected():
                self.cancel()
                return
            if event is None:
                continue
            if event[0] == "error":
                raise event[1]
            yield event
            if event[0] == "done":
                return


class Engine:
    """The queue and the worker thread that owns the model."""

    def __init__(self, model, config: ServeConfig, eos_id: int | None, pad_id: int):
        self.model, self.config, self.eos_id, self.pad_id = model, config, eos_id, pad_id
        self.pending: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.stopping = False
        # abandoned: rows whose client left or timed out before they were done
        self.stats = {"batches": 0, "rows": 0, "largest_batch": 0, "abandoned": 0}
        self.running: list[Job] = []
        self.seconds_per_position: dict[tuple, float] = {}  # by Sampling.cost_key(), measured
        self.thread = threading.Thread(target=self._work, name="twotower-serve-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        for job in list(self.running):
            job.fail(shutting_down())
        self.thread.join()
        for job in self.pending:
            job.fail(shutting_down())
        self.pending.clear()

    def estimate(self, sampling: Sampling) -> tuple[float, float]:
        """(seconds of work ahead in the queue, seconds to generate this request) at the speed
        measured so far; settings never measured count as free."""
        def seconds(s: Sampling, positions: int) -> float:
            return positions * self.seconds_per_position.get(s.cost_key(), 0.0)

        ahead = sum(seconds(job.sampling, job.sampling.max_tokens) for job in self.pending)
        if self.running:
            left = max(job.sampling.max_tokens - job.completion_tokens for job in self.running)
            ahead += seconds(self.running[0].sampling, left)
        return ahead, seconds(sampling, sampling.max_tokens)

    def submit(self, job: Job, seconds_left: float) -> None:
        with self.cond:
            if self.stopping:
                raise shutting_down()
            if len(self.pending) >= self.config.max_queue:
                raise APIError(429, "too many requests are waiting; try again later", type="rate_limit_error",
                               code="queue_full", retry_after=self.estimate(job.sampling)[0] or 1)
            ahead, own = self.estimate(job.sampling)
            if self.config.refuse_late_work and ahead + own > seconds_left:
                raise APIError(429, f"this request would take about {ahead + own:.0f} s ({ahead:.0f} s waiting, "
                               f"{own:.0f} s generating), more than the {seconds_left:.0f} s it may take; "
                               "try later or ask for fewer tokens", type="rate_limit_error",
                               code="would_time_out", retry_after=ahead or None)
            self.pending.append(job)
            self.cond.notify_all()

    def withdraw(self, job: Job) -> None:
        """Cancel a job and drop it from the queue if it has not started."""
        job.cancel()
        with self.cond:
            if job in self.pending:
                self.pending.remove(job)

    def queued(self) -> int:
        with self.cond:
            return len(self.pending)

    def _next_batch(self) -> list[Job] | None:
        """The oldest waiting job and up to max_batch_size - 1 compatible ones, waiting at most
        batch_wait for them to arrive; None when stopping."""
        with self.cond:
            while not self.pending and not self.stopping:
                self.cond.wait()
            if self.stopping:
                return None
            batch = [self.pending.popleft()]
            key = batch[0].sampling.batch_key()
            if key is None:
                return batch
            deadline = time.monotonic() + self.config.batch_wait
            while True:
                joining = [j for j in self.pending if j.sampling.batch_key() == key]
                joining = joining[:self.config.max_batch_size - len(batch)]
                for job in joining:
                    self.pending.remove(job)
                batch += joining
                left = deadline - time.monotonic()
                if len(batch) >= self.config.max_batch_size or left <= 0 or self.stopping:
                    return batch
                self.cond.wait(left)

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            batch = [job for job in batch if not job.done]
            if batch:
                self._generate(batch)

    def _measure(self, sampling: Sampling, seconds: float, positions: int) -> None:
        if positions:
            key, rate = sampling.cost_key(), seconds / positions
            old = self.seconds_per_position.get(key, rate)
            self.seconds_per_position[key] = RATE_MEMORY * rate + (1 - RATE_MEMORY) * old

    def _generate(self, jobs: list[Job]) -> None:
        """Decode compatible jobs as one left-padded batch, handing each row's tokens to its job."""
        s = jobs[0].sampling
        self.stats["batches"] += 1
        self.stats["rows"] += len(jobs)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        stats = GenerationStats()
        streamer = RowStreamer(len(jobs), lambda row, tokens: jobs[row].take(tokens, stats, row),
                               lambda row: jobs[row].done, self.eos_id)

        def show_steps(step):  # diffusion's step_callback, for the rows that asked to see steps
            for i, row in enumerate(step.rows.tolist()):
                if jobs[row].show_step is not None:
                    jobs[row].step(step.block, step.step, step.tokens[i].tolist(), step.committed[i].tolist())

        self.running, start = jobs, time.monotonic()
        try:
            ids, mask = left_pad([job.prompt_ids for job in jobs], self.pad_id)
            run_mode(self.model, s.mode, ids, max(job.sampling.max_tokens for job in jobs), attention_mask=mask,
                     sampling=s.sampling, diffusion=s.diffusion, eos_token_id=self.eos_id, streamer=streamer,
                     stats=stats, step_callback=show_steps if any(job.show_step for job in jobs) else None)
        except StopGeneration:
            pass
        except Exception as e:  # a failed batch answers its requests; the worker goes on
            for job in jobs:
                job.fail(APIError(500, f"generation failed: {e}", type="server_error", code="generation_failed"))
        finally:
            self.running = []
            self.stats["abandoned"] += sum(not job.finished for job in jobs)
            self._measure(s, time.monotonic() - start, max(job.completion_tokens for job in jobs))
