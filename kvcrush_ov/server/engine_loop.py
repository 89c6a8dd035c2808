"""One native engine stepped by one thread, serving every HTTP request together.

HTTP handlers (asyncio) submit :class:`ServerRequest` objects; the engine thread tokenizes them,
checks them (``ConfigError`` goes back to the handler), queues them on the engine, steps it while
anything is unfinished, and sends each request's events back to its handler's asyncio queue:

- ``("start", prompt_tokens)`` once the request is queued on the engine;
- ``("text", chunk)`` as text becomes final (stop strings held back: what is streamed is what
  the result holds);
- ``("end", finish_reason, text, completion_tokens)`` when it finishes;
- ``("error", exception)`` if it was refused or the engine failed.

Everything that touches the engine or the tokenizer runs on the engine thread.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from kvcrush_ov.backends.common import TextStream
from kvcrush_ov.cache_plan import check_request_size
from kvcrush_ov.config import GenerationConfig
from kvcrush_ov.errors import ConfigError
from kvcrush_ov.eviction.spec import EvictionSpec
from kvcrush_ov.pipeline import Pipeline

# Prometheus histogram buckets (seconds)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass
class ServerRequest:
    """One prompt to generate for. ``messages`` (chat) or ``prompt`` (completion)."""

    config: GenerationConfig
    prompt: str | None = None
    messages: list[dict] | None = None
    eviction: EvictionSpec | None = None
    events: asyncio.Queue | None = None
    loop: asyncio.AbstractEventLoop | None = None
    seq: object = None
    stream: TextStream | None = None
    chunks: list[str] = field(default_factory=list)  # streamed text not yet sent
    arrival: float = field(default_factory=time.perf_counter)

    def emit(self, *event) -> None:
        if self.loop is not None and self.events is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets, self.counts = buckets, [0] * (len(buckets) + 1)
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [f"# TYPE {name} histogram"], 0
        for b, c in zip(self.buckets, self.counts, strict=False):
            acc += c
            out.append(f'{name}_bucket{{le="{b}"}} {acc}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out += [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class EngineLoop:
    """The engine thread. ``pipe`` must be a native-backend Pipeline."""

    def __init__(self, pipe: Pipeline) -> None:
        if pipe.backend_name != "native":
            raise ConfigError("backend", pipe.backend_name, "'native' for the server")
        self.pipe = pipe
        self.backend = pipe.backend
        self.engine = pipe.backend.engine
        self._inbox: queue.Queue = queue.Queue()
        self._active: dict[int, ServerRequest] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.ttft, self.tpot = Histogram(TTFT_BUCKETS), Histogram(TPOT_BUCKETS)
        self.finished: dict[str, int] = {}
        self.failures = 0
        self.kv_bytes_saved = 0
        self._thread = threading.Thread(target=self._run, name="kvcrush-engine", daemon=True)
        self._thread.start()

    # -- called from the asyncio side -------------------------------------------------------
    def submit(self, req: ServerRequest) -> None:
        self._inbox.put(("add", req))

    def cancel(self, req: ServerRequest) -> None:
        self._inbox.put(("cancel", req))

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel what is left and end the thread."""
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout)

    def snapshot(self) -> dict:
        """Gauges and counters for /metrics (read under the loop's lock)."""
        with self._lock:
            eng = self.engine
            used = float(eng.blocks_held)
            return {
                "requests_running": len(eng.scheduler.running),
                "requests_waiting": len(eng.scheduler.waiting),
                "kv_blocks_used": used,
                "kv_blocks_free": eng.num_blocks - used,
                "kv_blocks_total": eng.num_blocks,
                "kv_bytes_saved": self.kv_bytes_saved,
                "preemptions": eng.scheduler.num_preemptions,
                "finished": dict(self.finished),
                "failures": self.failures,
                "ttft": self.ttft.lines("kvcrush_ttft_seconds"),
                "tpot": self.tpot.lines("kvcrush_tpot_seconds"),
            }

    # -- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            idle = not self.engine.has_unfinished()
            try:
                item = self._inbox.get(timeout=0.05) if idle else self._inbox.get_nowait()
            except queue.Empty:
                item = None
            with self._lock:
                while item is not None:
                    self._handle(*item)
                    try:
                        item = self._inbox.get_nowait()
                    except queue.Empty:
                        item = None
                if self.engine.has_unfinished():
                    self._step()
        with self._lock:  # shutting down: what is left ends as cancelled
            for req in list(self._active.values()):
                self._drop(req, "cancelled")

    def _handle(self, kind: str, req: ServerRequest | None) -> None:
        if kind == "add":
            self._add(req)
        elif kind == "cancel" and req is not None and req.seq is not None \
                and req.seq.seq_id in self._active:
            self._drop(req, "cancelled")

    def _add(self, req: ServerRequest) -> None:
        b, g = self.backend, req.config
        try:
            if req.messages is not None:
                ids = encode_messages(b.tokenizer, req.messages)
            else:
                ids = b.encode(req.prompt, False)[0].tolist()
            check_request_size("prompt" if req.messages is None else "messages", len(ids),
                               g.max_new_tokens, self.pipe.info.context_length,
                               self.pipe.cache_tokens, self.pipe.scheduler)
            seq = b.add_request(ids, g)
        except ConfigError as e:
            req.emit("error", e)
            return
        if req.eviction is not None:
            self.engine.evictor.set_spec(seq, req.eviction)
        req.seq = seq
        req.stream = TextStream(b.tokenizer, req.chunks.append, g.stop_strings,
                                g.include_stop_str_in_output)
        self._active[seq.seq_id] = req
        req.emit("start", len(ids))

    def _drop(self, req: ServerRequest, reason: str) -> None:
        seq = req.seq
        self.engine.abort(seq)
        self.engine.sequences.pop(seq.seq_id, None)
        self._active.pop(seq.seq_id, None)
        self.finished[reason] = self.finished.get(reason, 0) + 1
        req.emit("end", reason, seq.sampler.output_text(), seq.sampler.num_generated)

    def _flush(self, req: ServerRequest) -> None:
        for c in req.chunks:
            req.emit("text", c)
        req.chunks.clear()

    def _step(self) -> None:
        try:
            out = self.engine.step()
        except Exception as e:  # noqa: BLE001 - every request of the engine gets the error
            self.failures += 1
            for req in list(self._active.values()):
                self.engine.abort(req.seq)
                self.engine.sequences.pop(req.seq.seq_id, None)
                req.emit("error", e)
            self._active.clear()
            return
        saved = 0
        bs = self.engine.block_size
        for s in self.engine.scheduler.running:
            full = -(-s.num_computed // bs) * self.engine.block_bytes
            saved += max(0, full - s.extra.get("kv_bytes", full))
        self.kv_bytes_saved = saved
        for sid, tok in out.new_tokens.items():
            req = self._active.get(sid)
            if req is None:
                continue
            seq = req.seq
            if seq.sampler.num_generated == 1:
                self.ttft.observe(seq.first_token_time - req.arrival)
            if not seq.is_finished:
                req.stream.push([tok])
                self._flush(req)
        for seq in out.finished:
            req = self._active.pop(seq.seq_id, None)
            if req is None:
                continue
            text = seq.sampler.output_text()
            req.stream.finish(text)
            self._flush(req)
            n = seq.sampler.num_generated
            if n > 1:
                self.tpot.observe((seq.last_token_time - seq.first_token_time) / (n - 1))
            reason = seq.sampler.finish_reason or "stop"
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.engine.sequences.pop(seq.seq_id, None)
            req.emit("end", reason, text, n)


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat through the model's chat template (generation prompt added)."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return list(tokenizer.encode(text, add_special_tokens=False).input_ids.data[0])
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
    return list(tokenizer.encode(text).input_ids.data[0])
