"""`Engine`: the object every client holds. It owns one worker thread that owns the model.

Clients call `submit()` from any thread (or the asyncio loop) and get a `GenerationStream`.
Loading, switching and unloading models are commands to the same thread, so nothing else ever
touches the model. torch is imported by the worker when a model needs it (the C kernel's own model
does not: see native_model), never by `import influence_tui.engine`.
"""

from __future__ import annotations

import itertools
import os
import queue
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

from influence_tui.config import Settings
from influence_tui.engine.types import GenerationRequest, GenerationStream, Result, Usage, batched_wakes
from influence_tui.library import ModelNotFound, default_model_path, find_model, model_name_for_path


class EngineError(RuntimeError):
    """A user-facing engine problem (bad model file, device not there, …)."""


class QueueFull(EngineError):
    """Too many requests are waiting; try again shortly."""


@dataclass
class ModelSummary:
    name: str
    path: str
    architecture: str
    format: str
    quantization: str
    dtype: str
    device: str
    context_length: int
    parameters: int | None
    size_bytes: int
    load_s: float
    weights: str = ""  # how weights are held: int4 / int8 / none (float)
    thinks: bool = False  # a reasoning model: answers come with their reasoning apart (engine.reasoning)
    tools: bool = False  # its chat template takes tools (engine.tools)
    infills: bool = False  # its vocabulary has fill-in-the-middle tokens (engine.infill)


@dataclass
class EngineStatus:
    state: str  # empty | loading | ready | error
    model: ModelSummary | None
    loading: str | None
    error: str | None
    in_flight: int
    queued: int
    served: int
    device: str


@dataclass
class EmbeddingResult:
    embeddings: list[list[float]]
    prompt_tokens: int
    model: str


def _file_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file()) if os.path.isdir(path) else 0


class Engine:
    def __init__(self, settings: Settings | None = None, *, max_batch: int = 8, max_queue: int = 64, models_dir: str | None = None) -> None:
        self.settings = settings or Settings.load()
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.models_dir = models_dir
        self._commands: queue.Queue = queue.Queue()
        self._pending: deque = deque()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._scheduler: Any = None
        self._summary: ModelSummary | None = None
        self._state = "empty"
        self._loading: str | None = None
        self._error: str | None = None
        self._served = 0
        self._listeners: list[Callable[[EngineStatus], None]] = []
        self._embedder: Any = None
        self._default_threads: int | None = None  # torch's own thread count, before INFLUENCE_THREADS
        self._loaded_context: int | None = None  # the context_length setting the model was loaded with
        self._ids = itertools.count(1)
        self._stop = threading.Event()

    # --- public API ----------------------------------------------------------------------------
    def status(self) -> EngineStatus:
        sched = self._scheduler
        return EngineStatus(
            state=self._state, model=self._summary, loading=self._loading, error=self._error,
            in_flight=len(sched.active) if sched else 0, queued=len(self._pending), served=self._served,
            device=self._summary.device if self._summary else (self.settings.device or "auto"),
        )

    def add_listener(self, callback: Callable[[EngineStatus], None]) -> None:
        """Called (from the worker thread) whenever the state changes: loading, ready, error."""
        self._listeners.append(callback)

    def resolve(self, model: str | None) -> str:
        """A model name, alias or path -> the path to load. Raises ModelNotFound."""
        if not model:
            path = self.settings.model_path or default_model_path()
            if not path:
                raise ModelNotFound("no model given and the bundled model is not installed (run ./setup.sh)")
            return path if os.path.exists(path) else find_model(path, models_dir=self._models_dir()).path
        if self._summary and model in (self._summary.name, self._summary.path):
            return self._summary.path
        info = find_model(model, models_dir=self._models_dir(), configured=self.settings.model_path)
        if info.kind == "embedding":
            raise EngineError(f"{info.name} is an embedding model: it cannot generate text")
        if not info.usable:
            raise EngineError(f"model {info.name} is not usable: {info.reason}")
        return info.path

    def load(self, model: str | None = None, device: str | None = None) -> ModelSummary:
        """Load (or switch to) a model; blocks until it is ready. Raises ModelNotFound/EngineError."""
        return self._on_worker(self._load, self.resolve(model), device)

    def unload(self) -> None:
        self._on_worker(self._unload)

    def unload_if_idle(self, path: str, allowed: Callable[[], bool] | None = None) -> bool:
        """Unload `path`'s model unless a request is running or waiting for it (an API client's
        keep_alive ran out), or `allowed()` says no. Decided on the worker, where requests are
        admitted: none is cut off."""
        return self._on_worker(self._unload_if_idle, path, allowed)

    def _unload_if_idle(self, path: str, allowed: Callable[[], bool] | None = None) -> bool:
        busy = bool(self._pending) or bool(self._scheduler and self._scheduler.active)
        if busy or self._summary is None or self._summary.path != path or (allowed is not None and not allowed()):
            return False
        self._unload()
        return True

    def submit(self, request: GenerationRequest, model: str | None = None) -> GenerationStream:
        """Queue a generation; returns at once. Raises QueueFull, ModelNotFound, EngineError."""
        return self.submit_many([request], model)[0]

    def submit_many(self, requests: list[GenerationRequest], model: str | None = None) -> list[GenerationStream]:
        """Queue several generations at once: they are admitted together as far as slots allow
        (one prefill for all of them, a common prefix such as a system prompt computed once).
        Queues all of them or, raising QueueFull, none."""
        from influence_tui.engine.scheduler import Job  # no torch: Job is a plain dataclass

        path = self.resolve(model) if model else None
        streams = [GenerationStream() for _ in requests]
        for stream in streams:
            stream.request_id = f"req-{next(self._ids)}"
        with self._lock:
            if len(self._pending) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting; try again shortly")
            self._pending.extend(Job(r, s, path) for r, s in zip(requests, streams))
        self._ensure_thread()
        self._commands.put(("wake",))
        return streams

    def generate(self, request: GenerationRequest, model: str | None = None) -> Result:
        return self.submit(request, model).wait()

    def count_tokens(self, request: GenerationRequest, model: str | None = None) -> int:
        """The prompt tokens `request` would take, chat template and tools included (Anthropic's
        count_tokens), with `model` (a path, None: the loaded or default one); nothing generates.
        A model other than the loaded one is loaded only when nothing is running."""
        return self._on_worker(self._count_tokens, request, model)

    def _count_tokens(self, request: GenerationRequest, model: str | None) -> int:
        from influence_tui.engine.scheduler import RequestError

        if self._scheduler is None or (model and model != self._summary.path):  # type: ignore[union-attr]
            if self._scheduler is not None and self._scheduler.active:
                raise EngineError("another model is answering now: count tokens with the loaded one, or later")
            self._load(model or self.resolve(None), None)
        try:
            return self._scheduler.count_prompt(request)  # type: ignore[union-attr]
        except RequestError as exc:
            raise EngineError(str(exc)) from None

    def embed(self, texts: list[str], model: str | None = None, truncate: bool = True) -> EmbeddingResult:
        """Embeddings with a BERT-family encoder (default: the bundled all-MiniLM-L6-v2).

        They run on the worker thread, between decode steps, like everything that computes: torch
        ops from a second thread start a second OpenMP team, and with more OpenMP threads than
        CPUs libgomp stops spinning at its barriers and sleeps instead, which made every prompt
        after it prefill ~1.6x slower."""
        return self._on_worker(self._embed, list(texts), model, truncate)

    def _embed(self, texts: list[str], model: str | None, truncate: bool = True) -> EmbeddingResult:
        from influence_tui.engine.embeddings import Embedder, resolve_embedding_model

        path, name = resolve_embedding_model(model, models_dir=self._models_dir())
        if self._embedder is None or self._embedder.path != path:
            from influence_tui.engine.offline import local_only

            with local_only():
                self._embedder = Embedder(path, name=name, device=self.settings.device, device_index=self.settings.device_index)
            self._apply_threads()  # torch is loaded now
        vectors, n_tokens = self._embedder.embed(texts, truncate)
        return EmbeddingResult(vectors, n_tokens, self._embedder.name)

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread and self._thread.is_alive():
            self._commands.put(("stop",))
            self._thread.join(timeout=10)

    # --- worker thread -------------------------------------------------------------------------
    def _models_dir(self) -> str:
        return self.models_dir or self.settings.output_dir

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="influence-engine", daemon=True)
                self._thread.start()

    def _notify(self) -> None:
        status = self.status()
        for callback in list(self._listeners):
            try:
                callback(status)
            except Exception:  # a listener's bug must not kill the engine
                pass

    def _run(self) -> None:
        while not self._stop.is_set():
            busy = bool(self._scheduler and self._scheduler.active)
            try:
                cmd = self._commands.get(block=not busy and not self._can_admit(), timeout=None if not busy else 0)
            except queue.Empty:
                cmd = None
            if cmd is not None:
                if cmd[0] == "stop":
                    break
                self._handle(cmd)
                continue_draining = True
                while continue_draining:
                    try:
                        nxt = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    if nxt[0] == "stop":
                        self._stop.set()
                        break
                    self._handle(nxt)
            # asyncio consumers are woken once after the admissions (first tokens) and once a step
            with batched_wakes():
                self._admit_pending()
            if self._scheduler and self._scheduler.active:
                with batched_wakes():
                    try:
                        self._scheduler.step()
                    except Exception as exc:  # a model bug: fail the running requests, keep serving
                        self._fail_active(f"generation failed: {exc}")
        if self._scheduler:
            self._scheduler.cancel_all()
        self._fail_pending("the engine was shut down")
        while True:  # callers still waiting on a load or an embedding get an answer too
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd[-1], Future) and not cmd[-1].done():
                cmd[-1].set_exception(EngineError("the engine was shut down"))

    def _can_admit(self) -> bool:
        return bool(self._pending) and (self._scheduler is None or self._scheduler.has_free_slot)

    def _on_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) on the worker thread, between decode steps; its result or its exception."""
        fut: Future = Future()
        self._ensure_thread()
        self._commands.put(("call", fn, args, fut))
        return fut.result()

    def _handle(self, cmd: tuple) -> None:
        if cmd[0] == "call":
            _, fn, args, fut = cmd
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)

    def _unload(self) -> None:
        if self._scheduler:
            self._scheduler.cancel_all()
        self._release()
        self._notify()

    def _admit_pending(self) -> None:
        """Move waiting jobs into free slots: everything that can start now starts together."""
        batch: list = []
        loaded_s = 0.0
        while self._pending:
            job = self._pending[0]
            wanted = job.model_path
            if self._scheduler is None or (wanted and wanted != self._summary.path):  # type: ignore[union-attr]
                if batch or (self._scheduler and self._scheduler.active):
                    break  # switch models once the running requests are done
                before = self._summary
                try:
                    summary = self._load(wanted or self.resolve(None), None)
                    if summary is not before:  # a load happened: the jobs admitted now waited for it
                        loaded_s = summary.load_s
                except BaseException as exc:
                    with self._lock:
                        self._pending.popleft()
                    job.stream._finish(Result("", "error", Usage(), error=str(exc), error_kind="engine"))
                    continue
            if job.stream.cancelled:
                with self._lock:
                    self._pending.popleft()
                job.stream._finish(Result("", "cancelled", Usage(), model=self._summary.name if self._summary else ""))
                continue
            free = sum(not s.busy for s in self._scheduler.slots)
            if len(batch) >= free:
                break
            with self._lock:
                self._pending.popleft()
            job.load_s = loaded_s
            batch.append(job)
        if not batch:
            return
        self._served += len(batch)
        try:
            self._scheduler.admit(batch)
        except Exception as exc:
            for job in batch:
                if not job.stream.done:
                    job.stream._finish(Result("", "error", Usage(), error=f"generation failed: {exc}", error_kind="engine"))
            self._fail_active(f"generation failed: {exc}")
            for slot in self._scheduler.slots:  # their caches may be half written: start clean
                slot.busy = False
                slot.forget()

    def _load(self, path: str, device: str | None) -> ModelSummary:
        same_context = self._loaded_context == self.settings.context_length  # a changed setting reloads
        if self._summary and self._summary.path == path and (device is None or device == self.settings.device) and same_context:
            return self._summary
        if self._scheduler and self._scheduler.active:
            self._scheduler.cancel_all()
        self._release()
        self._state, self._loading, self._error = "loading", os.path.basename(path.rstrip("/")), None
        self._notify()
        t0 = time.perf_counter()
        try:
            self._apply_threads()
            loaded = self._load_model(path, device or self.settings.device)
            self._apply_threads(loaded.model)
            # one name everywhere: what `influence list` shows, not the file's internal name
            loaded.name = model_name_for_path(loaded.path, self._models_dir()) or loaded.name
            from influence_tui.engine.scheduler import Scheduler

            scheduler = Scheduler(loaded)
            scheduler.warmup(self.settings.warmup_tokens)
        except BaseException as exc:
            self._state, self._loading, self._error = "error", None, str(exc)
            self._notify()
            if isinstance(exc, (EngineError, ModelNotFound)):
                raise
            raise EngineError(str(exc)) from exc
        self._scheduler = scheduler
        self._loaded_context = self.settings.context_length
        self._summary = ModelSummary(
            name=loaded.name, path=loaded.path, architecture=loaded.architecture, format=loaded.format,
            quantization=loaded.quantization, dtype=loaded.dtype, device=loaded.device,
            # what a request can use: the model's maximum, capped by the KV cache allocated for it
            context_length=min(loaded.context_length, int(loaded.extra.get("max_seq") or loaded.context_length)),
            parameters=loaded.parameters,
            size_bytes=_file_size(loaded.path), load_s=time.perf_counter() - t0,
            weights=str(loaded.extra.get("weights", "")), thinks=scheduler.thinks, tools=scheduler.takes_tools,
            infills=scheduler.fim is not None,
        )
        self._state, self._loading = "ready", None
        self._notify()
        return self._summary

    def _apply_threads(self, model: Any = None) -> None:
        """INFLUENCE_THREADS: the CPU threads of the C kernel, torch and the embeddings, at most one
        per usable CPU; unset, one per physical core, torch's default. torch is only set where it is
        loaded: the kernel's own model never imports it."""
        from influence_tui.engine.governor import capped_threads

        if model is not None and hasattr(model, "set_threads"):
            model.set_threads(self.settings.threads)
        torch = sys.modules.get("torch")
        if torch is None:
            return
        if self._default_threads is None:
            self._default_threads = torch.get_num_threads()
        torch.set_num_threads(capped_threads(self.settings.threads) or self._default_threads)

    def _load_model(self, path: str, device: str) -> Any:
        from influence_tui.engine.base import ModelLoadError
        from influence_tui.engine.native_model import load_native

        ctx = self.settings.context_length  # None: the model's own, capped at 4096 (sources.allocate_and_tokenizer)
        try:  # the kernel's torch-free model where it applies (see native_model), else torch's
            native = load_native(path, device=device, max_batch=self.max_batch, max_seq=ctx)
        except ModelLoadError as exc:
            raise EngineError(str(exc)) from None
        if native is not None:
            return native
        from influence_tui.engine.loader import UnsupportedArchitecture, load_model

        try:
            return load_model(path, device=device, device_index=self.settings.device_index, max_batch=self.max_batch,
                              max_seq=ctx)
        except UnsupportedArchitecture:
            if not os.path.isdir(path):
                raise
            from influence_tui.engine.hf_fallback import load_hf_model

            try:
                return load_hf_model(path, device=device, device_index=self.settings.device_index, max_batch=self.max_batch,
                                     max_seq=ctx or 4096)
            except ModelLoadError as exc:
                raise EngineError(str(exc)) from None
        except ModelLoadError as exc:
            raise EngineError(str(exc)) from None

    def _release(self) -> None:
        self._scheduler = None
        self._summary = None
        self._state = "empty"
        import gc

        gc.collect()

    def _fail_active(self, message: str) -> None:
        sched = self._scheduler
        for seq in list(sched.active):
            seq.slot.busy = False
            seq.slot.forget()
            sched.active.remove(seq)
            seq.job.stream._finish(Result("".join(seq.text), "error", seq.usage, error=message))

    def _fail_pending(self, message: str) -> None:
        with self._lock:
            jobs, self._pending = list(self._pending), deque()
        for job in jobs:
            job.stream._finish(Result("", "error", Usage(), error=message))
