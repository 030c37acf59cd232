"""A tp x pp engine: one process per rank, rank 0 in the engine core's process.

Each step, rank 0 broadcasts the scheduler's plain-data `SchedulerOutput` (msgpack) to every rank;
every rank applies it to its own request states, runs its stage's part of the forward, and the
sampling rank (tensor rank 0 of the last stage, which holds the gathered logits) samples and
broadcasts the `ModelRunnerOutput` back, so every rank's request states stay the same and rank 0
answers. The scheduler and the KV block pool exist once, in rank 0's engine core; each rank holds
its share of every block (its layers, its KV heads), so the pool is sized by the rank with the
least room.

Worker processes load their own `rank{r}.safetensors` (or convert it on the fly from a HuggingFace
directory) before joining the process group, so a bad shard fails start-up naming its rank.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace

import msgspec
import torch

from llmserve.checkpoint.convert import Mapping
from llmserve.config import EngineConfig
from llmserve.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from llmserve.worker.model_runner import LaunchedStep, ModelRunner
from llmserve.worker.parallel import ParallelState, init_distributed, rank_config, shutdown_distributed

logger = logging.getLogger(__name__)
STOP = b""  # the step payload that ends the workers' loops
START_TIMEOUT_S = 600.0  # loading a large shard from a slow disk
_STEP_ENCODER = msgspec.msgpack.Encoder()
_STEP_DECODER = msgspec.msgpack.Decoder(SchedulerOutput)
_OUTPUT_DECODER = msgspec.msgpack.Decoder(ModelRunnerOutput)


class RankFailedError(RuntimeError):
    """A rank of a parallel engine died or hung: the step cannot finish, the engine must stop."""


class ParallelModelRunner(ModelRunner):
    """One rank's runner: its stage's forward, and the exchange that keeps every rank's requests equal."""

    def __init__(self, model, local_config, config: EngineConfig, num_blocks: int, parallel: ParallelState):
        # eager: the CUDA graphs of one rank would capture a stage hand-off; graph capture of the
        # collectives is not built yet
        device = replace(config.device, device=str(parallel.device), enforce_eager=True)
        super().__init__(model, local_config, config.cache, device, num_blocks, 0, config.scheduler.max_num_seqs)
        self.parallel = parallel

    def launch(self, out: SchedulerOutput, previous: LaunchedStep | None = None) -> LaunchedStep:
        raise NotImplementedError("a parallel engine runs steps synchronously (execute)")

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """Rank 0: hand the step to every worker, then run this rank's part of it."""
        try:
            self.parallel.broadcast_bytes(_STEP_ENCODER.encode(out), 0, self.parallel.control_group)
            return self.run_step(out)
        except RuntimeError as exc:  # gloo / NCCL: a peer closed its connection or a collective timed out
            raise RankFailedError(f"the tensor/pipeline-parallel step failed ({self.describe_ranks()}): "
                                  f"{str(exc).splitlines()[0]}") from exc

    def describe_ranks(self) -> str:
        """Which ranks are gone, as rank 0 sees them (replaced by the engine core with its workers' view)."""
        return "a rank died or hung"

    @torch.inference_mode()
    def run_step(self, out: SchedulerOutput) -> ModelRunnerOutput:
        parallel = self.parallel
        batch = self.prepare_inputs(out)
        states = batch.sample_states if batch is not None else []
        step = LaunchedStep([], None, None, None, 0, False)
        if batch is not None:
            hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)
            if hidden is not None and states:  # the last stage: every tensor rank joins the gather
                logits = self.model.compute_logits(hidden[batch.logits_indices])
                if parallel.is_sampler:
                    step = self.sample(logits, states)
        if parallel.is_sampler:
            result = self.collect(step)
            parallel.broadcast_bytes(_STEP_ENCODER.encode(result), parallel.sampler_rank, parallel.result_group)
            return result
        result = _OUTPUT_DECODER.decode(
            parallel.broadcast_bytes(None, parallel.sampler_rank, parallel.result_group))
        for state, token_id in zip(states, result.sampled_token_ids):
            state.output_token_ids.append(token_id)
        return result

    def stop_workers(self) -> None:
        """Rank 0: end the workers' step loops (they leave the process group and exit)."""
        self.parallel.broadcast_bytes(STOP, 0, self.parallel.control_group)


def kv_blocks_for_rank(model, local_config, config: EngineConfig, parallel: ParallelState) -> int:
    """KV blocks this rank has room for, agreed as the minimum over all ranks (every rank calls this)."""
    from llmserve.engine.engine_core import num_kv_blocks

    if config.cache.num_blocks:
        return config.cache.num_blocks  # the same on every rank: nothing to agree on
    return parallel.agree_on_min(num_kv_blocks(model, local_config, config))


# ---- start-up ------------------------------------------------------------------------------------
@dataclass(slots=True)
class Ranks:
    """Rank 0's side of a running tp x pp engine: its model part, its state, the worker processes."""

    model_config: object  # the whole model's ModelConfig
    model: torch.nn.Module  # rank 0's part
    parallel: ParallelState
    workers: list[multiprocessing.Process]

    def local_config(self):
        return rank_config(self.model_config, self.parallel)

    def describe(self) -> str:
        """The workers that have exited, e.g. "rank 1 exited (signal 9)", or that none has."""
        gone = [f"rank {rank} exited ({_status(worker.exitcode)})"
                for rank, worker in enumerate(self.workers, start=1) if not worker.is_alive()]
        return ", ".join(gone) or "no worker has exited: one hung or lost its connection"

    def stop(self, timeout: float = 10.0) -> None:
        for worker in self.workers:
            worker.join(timeout)
            if worker.is_alive():
                worker.kill()
        shutdown_distributed()


def start_ranks(path: str, config: EngineConfig, progress=print) -> Ranks:
    """Spawn ranks 1..N-1, load rank 0 here, wait until every rank has loaded, then join the group."""
    from llmserve.models.loader import load_rank_model

    par = config.parallel
    mapping = Mapping(par.tensor_parallel_size, par.pipeline_parallel_size)
    init_method = par.distributed_init_method or f"tcp://127.0.0.1:{_free_port()}"
    context = multiprocessing.get_context("spawn")
    workers, pipes = [], []
    for rank in range(1, par.local_ranks or mapping.world_size):
        ours, theirs = context.Pipe()
        worker = context.Process(target=worker_main, name=f"llmserve-rank{rank}", daemon=True,
                                 args=(rank, str(path), config, init_method, theirs, os.getpid()))
        worker.start()
        theirs.close()
        workers.append(worker)
        pipes.append(ours)
    try:
        parallel = ParallelState(mapping, 0, _rank_device(config, 0))
        torch.manual_seed(config.seed)
        model_config, model = load_rank_model(path, parallel, config.device.device, config.device.dtype)
        progress(f"rank 0 of {mapping.world_size} loaded (tp={mapping.tp_size}, pp={mapping.pp_size}); "
                 f"waiting for the other ranks")
        _wait_until_loaded(workers, pipes)
        init_distributed(parallel, init_method, config.device.device, par.step_timeout_s)
    except BaseException:
        for worker in workers:
            worker.kill()
        raise
    return Ranks(model_config, model, parallel, workers)


def _wait_until_loaded(workers, pipes) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    for rank, (worker, pipe) in enumerate(zip(workers, pipes), start=1):
        while not pipe.poll(0.2):
            if not worker.is_alive():
                raise RuntimeError(f"rank {rank} exited with status {worker.exitcode} while loading its shard")
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank {rank} did not load its shard within {START_TIMEOUT_S:.0f} s")
        try:
            kind, message = pipe.recv()
        except EOFError:
            kind, message = "failed", f"it exited with status {worker.exitcode} before saying so"
        if kind != "loaded":
            raise RuntimeError(f"rank {rank} failed to start: {message}")


def worker_main(rank: int, path: str, config: EngineConfig, init_method: str, pipe=None,
                parent_pid: int | None = None) -> None:
    """A worker process: load rank `rank`, join the group, then run every step rank 0 broadcasts.

    Spawned by rank 0 it reports on `pipe` and watches `parent_pid`; on another host (`llmserve worker`
    under torchrun) it has neither, and a load error ends it with the message on its own stderr.
    """
    from llmserve.models.loader import load_rank_model

    if parent_pid is not None:
        _exit_with_parent(parent_pid)
    # A Ctrl-C or SIGTERM reaches the whole process group; rank 0 decides when the workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    par = config.parallel
    mapping = Mapping(par.tensor_parallel_size, par.pipeline_parallel_size)
    try:
        parallel = ParallelState(mapping, rank, _rank_device(config, rank))
        torch.manual_seed(config.seed)
        model_config, model = load_rank_model(path, parallel, config.device.device, config.device.dtype)
    except Exception as exc:  # the message reaches the user through rank 0
        if pipe is None:
            raise
        pipe.send(("failed", f"{type(exc).__name__}: {exc}"))
        sys.exit(1)
    if pipe is not None:
        pipe.send(("loaded", None))
    init_distributed(parallel, init_method, config.device.device, par.step_timeout_s)
    local_config = rank_config(model_config, parallel)
    num_blocks = kv_blocks_for_rank(model, local_config, config, parallel)
    runner = ParallelModelRunner(model, local_config, config, num_blocks, parallel)
    while True:
        payload = parallel.broadcast_bytes(None, 0, parallel.control_group)
        if payload == STOP:
            break
        runner.run_step(_STEP_DECODER.decode(payload))
    shutdown_distributed()


def _status(exitcode: int | None) -> str:
    return f"signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"status {exitcode}"


def _rank_device(config: EngineConfig, rank: int) -> torch.device:
    if not config.device.device.startswith("cuda"):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())


def _exit_with_parent(parent_pid: int) -> None:
    """A worker never outlives the process that spawned it (rank 0), even when that one was killed."""
    def watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(0.5)
    threading.Thread(target=watch, name="llmserve-parent-watch", daemon=True).start()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
