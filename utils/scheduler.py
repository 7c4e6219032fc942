"""The scheduler: the one thread that runs the model for many concurrent clients.

Clients (the API server's requests) submit `SequenceState`s and `ScoreJob`s to a bounded queue; the thread
admits queued sequences into a running `BatchDecoder` between decode steps (continuous batching), up to
`max_batch_size`, and scores prompts between steps too. Each sequence reports its events through its own
`on_event` callback. A request that fails, or breaks a batch step, fails alone: the others go on.
"""

from __future__ import annotations

import concurrent.futures
import copy
import queue
import threading
from dataclasses import dataclass, field

from utils.decoding import BatchDecoder, SequenceState
from utils.loading import LoadedModel


class QueueFullError(Exception):
    """The scheduler's queue holds `max_queue` items: the client should retry later."""


class ScoringError(RuntimeError):
    """Scoring a prompt failed on the scheduler's thread; set on the job's future."""


@dataclass
class ScoreJob:
    """A prompt to score (`BatchDecoder.score`) on the scheduler's thread; a cancelled future skips it."""

    ids: list[int]
    top: int
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class Scheduler:
    """The one thread that runs the model: admits queued sequences between steps, up to `max_batch_size`,
    and scores prompts between steps too."""

    def __init__(self, loaded: LoadedModel, max_batch_size: int, max_queue: int):
        # Its own tokenizer copy: the event loop encodes prompts while this thread decodes.
        self.decoder = BatchDecoder(loaded.model, copy.deepcopy(loaded.tokenizer), max_batch_size=max_batch_size)
        self.pending: queue.Queue[SequenceState | ScoreJob | None] = queue.Queue(maxsize=max_queue)
        self.completed = 0
        self.cancelled = 0
        self.failed = 0
        self.generated_tokens = 0
        self.thread = threading.Thread(target=self._loop, name="decode-scheduler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.pending.put(None)
        self.thread.join(timeout=10)

    def submit(self, item: SequenceState | ScoreJob) -> None:
        try:
            self.pending.put_nowait(item)
        except queue.Full:
            raise QueueFullError from None

    def stats(self) -> dict[str, int]:
        """`cancelled`: sequences whose client went away (dropped from the queue, or stopped mid-decode, which
        `completed` counts too); `failed`: ended by an internal error."""
        return {
            "active": len(self.decoder), "queued": self.pending.qsize(), "completed": self.completed,
            "cancelled": self.cancelled, "failed": self.failed, "generated_tokens": self.generated_tokens,
            "max_batch_size": self.decoder.max_batch_size,
        }

    def _admit(self, seq: SequenceState | ScoreJob) -> None:
        if isinstance(seq, ScoreJob):
            self._score(seq)
            return
        if seq.cancelled:
            self.cancelled += 1
            return
        try:
            self.decoder.add(seq)
        except Exception as err:  # noqa: BLE001 - one bad request must not stop the server
            seq.fail(f"generation failed: {err}")
        self._count(seq)

    def _score(self, job: ScoreJob) -> None:
        if not job.future.set_running_or_notify_cancel():  # its client is gone
            return
        try:
            job.future.set_result(self.decoder.score(job.ids, job.top))
        except Exception as err:  # noqa: BLE001 - one bad request must not stop the server
            job.future.set_exception(ScoringError(f"scoring the prompt failed: {err}"))

    def _count(self, seq: SequenceState) -> None:
        if seq.result is not None:
            self.generated_tokens += len(seq.result.tokens)
            self.completed += 1
            self.cancelled += seq.result.finish_reason == "cancelled"
        elif seq.finish_reason == "error":
            self.failed += 1

    def _new_decoder(self, max_batch_size: int) -> BatchDecoder:
        return BatchDecoder(self.decoder.model, self.decoder.tokenizer, max_batch_size)

    def _isolate(self, running: list[SequenceState]) -> None:
        """After a failed batch step, retries each of its sequences alone: only one that fails again is failed.

        The batch's cache is not trusted after a failure, so every survivor is prefilled again from its own
        tokens, once to retry the step alone and once more to rejoin the new batch.
        """
        self.decoder = self._new_decoder(self.decoder.max_batch_size)
        for seq in running:
            if seq.finish_reason is not None:
                continue
            try:
                alone = self._new_decoder(1)
                alone.resume(seq)
                alone.step()
                if seq.finish_reason is None:
                    self.decoder.resume(seq)
            except Exception as err:  # noqa: BLE001 - this sequence is the culprit
                seq.fail(f"generation failed: {err}")

    def _loop(self) -> None:
        while True:
            if not len(self.decoder):
                item = self.pending.get()
                if item is None:
                    return
                self._admit(item)
            while self.decoder.has_room:
                try:
                    item = self.pending.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    return
                self._admit(item)
            running = list(self.decoder.sequences)
            try:
                self.decoder.step()
            except Exception:  # noqa: BLE001 - find the sequence that broke the step, keep the others
                self._isolate(running)
            for seq in running:
                self._count(seq)
