"""The contexts a worker holds: loading them when told, fetching their files, dropping them, pinning their files.

Context files. A context with a manifest is loaded from the node cache (``gpuworker/cache.py``); files missing
there are fetched from peers or the origin first (``gpuworker/fetch.py``), and the worker serves the files it
holds to other workers on a socket of its own (``gpuworker/fileserver.py``). ``context_mode`` picks how long a
context is kept: resident (full), files only (partial), or nothing (agnostic).

Nothing here blocks the event loop: the cache's file-system and lock work (``pin`` takes a node-wide ``flock``
that another worker's eviction can hold) runs on a thread, and loading and freeing a model run on the compute
thread, in order with the forward passes (a model is never freed under a pass that uses it).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

from pervade.context import ContextMode, ContextSpec
from pervade.gpuworker.cache import FileCache
from pervade.gpuworker.config import WorkerConfig
from pervade.gpuworker.device import fit_dtype
from pervade.gpuworker.engine import LOAD_STAGES, LoadedContext, load_context
from pervade.gpuworker.fetch import Fetcher, FetchStats
from pervade.gpuworker.fileserver import FileServer
from pervade.gpuworker.link import BrokerLink
from pervade.manifest import Manifest
from pervade.progress import byte_bars, stage_bars
from pervade.protocol import ContextFailed, ContextLoaded, DeviceInfo, FilesDropped, FilesHeld, LoadContext

log = structlog.get_logger("gpuworker")


@dataclass
class HeldContext:
    """A context this worker holds: its files (a local directory, or None to read the origin) and, in
    full mode, the model resident on the device."""

    spec: ContextSpec
    manifest: Manifest | None
    files_dir: Path | None
    loaded: LoadedContext | None


class Contexts:
    """The contexts held here, least recently used first, and the broker's word about them."""

    def __init__(
        self,
        config: WorkerConfig,
        device: torch.device,
        device_info: DeviceInfo,
        cache: FileCache,
        fetcher: Fetcher,
        file_server: FileServer | None,
        link: BrokerLink,
        compute: ThreadPoolExecutor,
    ) -> None:
        self.config = config
        self.device = device
        self.device_info = device_info
        self.cache = cache
        self.fetcher = fetcher
        self.file_server = file_server
        self.link = link
        self._compute = compute
        self.held: OrderedDict[str, HeldContext] = OrderedDict()
        #: Manifests of the contexts the broker told us about, for a context reloaded without an order.
        self._manifests: dict[str, Manifest] = {}
        self._failed: set[str] = set()
        self.loads = 0

    def ids(self) -> list[str]:
        return list(self.held)

    def forget_failures(self) -> None:
        """The broker forgets refusals when we register: so do we."""
        self._failed.clear()

    def resident(self, context_id: str) -> LoadedContext | None:
        """The model of ``context_id`` if it is on the device (full mode)."""
        held = self.held.get(context_id)
        return held.loaded if held is not None else None

    async def ready(self, spec: ContextSpec) -> HeldContext | None:
        """The context a batch needs, marked used now; loaded again if it was dropped meanwhile. None if it
        failed here (the broker requeued the batch when it heard)."""
        context_id = spec.context_id
        if context_id in self._failed:
            return None
        reload = LoadContext(context=spec, manifest=self._manifests.get(context_id))
        if context_id not in self.held and not await self.load(reload):
            return None
        held = self.held[context_id]
        self.held.move_to_end(context_id)
        if held.manifest is not None:
            await asyncio.to_thread(self.cache.touch, held.manifest.digest)
        return held

    async def load(self, order: LoadContext) -> bool:
        """Make the context ready in this run's mode: files in the node cache (partial, full) and the
        model on the device (full). Tells the broker ContextLoaded or ContextFailed."""
        context_id = order.context.context_id
        if order.manifest is not None:
            self._manifests[context_id] = order.manifest
        for evicted in order.evict:
            await self.drop(evicted)
        if context_id in self.held:
            return True
        while len(self.held) >= self.config.max_contexts:  # on-demand loads respect the limit too
            await self.drop(next(iter(self.held)))
        log.info(
            "context_loading", context_id=context_id, model=order.context.model, mode=self.config.context_mode.value
        )
        started = time.perf_counter()
        try:
            held = await self._prepare(order.context, order.manifest)
        except Exception as exc:
            if order.manifest is not None:
                await self._unpin_unless_used(order.manifest.digest)
            self._failed.add(context_id)
            log.error("context_load_failed", context_id=context_id, error=str(exc))
            await self.link.send(ContextFailed(context_id=context_id, error=str(exc)))
            return False
        self.held[context_id] = held
        self._failed.discard(context_id)
        self.loads += 1
        seconds = time.perf_counter() - started
        log.info("context_loaded", context_id=context_id, seconds=round(seconds, 3), resident=held.loaded is not None)
        await self.link.send(ContextLoaded(context_id=context_id, seconds=seconds))
        return True

    async def _prepare(self, spec: ContextSpec, manifest: Manifest | None) -> HeldContext:
        """Fetch the files (unless agnostic) and load the model (if full)."""
        files_dir = None
        fit_dtype(spec.dtype, self.device_info)  # a dtype this device cannot run fails the context, in every mode
        if manifest is not None:  # its paths become files and links in the cache: checked here too
            await asyncio.to_thread(manifest.validate)
        if manifest is not None and self.config.context_mode is not ContextMode.AGNOSTIC:
            files_dir = await self._fetch_files(spec, manifest)
        loaded = None
        if self.config.context_mode is ContextMode.FULL:
            loaded = await self._load_model(spec, files_dir)
        return HeldContext(spec=spec, manifest=manifest, files_dir=files_dir, loaded=loaded)

    async def _load_model(self, spec: ContextSpec, files_dir: Path | None) -> LoadedContext:
        """The model on the device, loaded on the compute thread, with a bar of its stages."""
        with stage_bars(self.config.progress) as bars:
            task = bars.add_task(f"loading {spec.model}", total=len(LOAD_STAGES) - 1, stage="")

            def on_stage(stage: str) -> None:  # on the executor's thread; rich's updates take a lock
                bars.update(task, completed=LOAD_STAGES.index(stage), stage=stage)

            load = functools.partial(_load_on_device, spec, self.device, files_dir, self.device_info, on_stage)
            return await asyncio.get_running_loop().run_in_executor(self._compute, load)

    async def _fetch_files(self, spec: ContextSpec, manifest: Manifest) -> Path:
        """The context's files in the node cache, fetched from peers or the origin if missing; pinned there
        while this worker holds the context. The broker hears where the bytes came from."""
        digest = manifest.digest
        evicted = await asyncio.to_thread(self.cache.make_room, manifest)
        if evicted:
            if self.file_server is not None:
                self.file_server.forget_files()
            await self.link.send(FilesDropped(files=evicted))
        await asyncio.to_thread(self.cache.pin, manifest)  # waits while another worker of the node evicts
        try:
            with byte_bars(self.config.progress) as bars:
                task = bars.add_task(f"model files of {spec.model}", total=manifest.total_bytes)
                files_dir, stats = await self.fetcher.fetch(spec, manifest, lambda n: bars.advance(task, n))
        except BaseException:
            await self._unpin_unless_used(digest)
            raise
        _log_fetch(digest, stats)
        await self.link.send(
            FilesHeld(
                files=digest, origin_bytes=stats.origin_bytes, peer_bytes=stats.peer_bytes,
                cached_bytes=stats.cached_bytes, seconds=stats.seconds,
            )
        )  # fmt: skip
        return files_dir

    async def drop(self, context_id: str) -> None:
        """Free a context: the model leaves the device; its files stay cached (unpinned)."""
        held = self.held.pop(context_id, None)
        if held is None:
            return
        if held.manifest is not None:
            await self._unpin_unless_used(held.manifest.digest)
        del held  # the last reference to the model here: collected on the compute thread, between passes
        await asyncio.get_running_loop().run_in_executor(self._compute, _free_device_memory, self.device)
        log.info("context_evicted", context_id=context_id)

    async def _unpin_unless_used(self, digest: str) -> None:
        """Let the node cache evict these files, unless another context held here uses them."""
        if not any(h.manifest is not None and h.manifest.digest == digest for h in self.held.values()):
            await asyncio.to_thread(self.cache.unpin, digest)


def _load_on_device(
    spec: ContextSpec,
    device: torch.device,
    files_dir: Path | None,
    device_info: DeviceInfo,
    on_stage: Callable[[str], None],
) -> LoadedContext:
    """Load a context's model onto the device, after handing the allocator's free blocks back. Runs on the
    compute thread."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return load_context(spec, device, files_dir, device_info=device_info, on_stage=on_stage)


def _free_device_memory(device: torch.device) -> None:
    """Collect a dropped model and give its device memory back. Runs on the compute thread."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _log_fetch(digest: str, stats: FetchStats) -> None:
    log.info(
        "files_ready", files=digest, origin_bytes=stats.origin_bytes, peer_bytes=stats.peer_bytes,
        cached_bytes=stats.cached_bytes, corrupt_pieces=stats.corrupt_pieces, peers_failed=stats.peers_failed,
        by_peer=dict(stats.by_peer), seconds=round(stats.seconds, 3),
        mb_per_s=round((stats.origin_bytes + stats.peer_bytes) / max(stats.seconds, 1e-9) / 1e6, 1),
    )  # fmt: skip
