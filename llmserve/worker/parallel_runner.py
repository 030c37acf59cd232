"""A tp x pp engine: one process per rank, rank 0 in the engine core's process.

Each step, rank 0 broadcasts the scheduler's plain-data `SchedulerOutput` (msgpack) to every rank,
with the sampled tokens of the steps finished since; every rank applies both to its own request
states and runs its stage's part of the forward. The sampling rank (tensor rank 0 of the last stage,
which holds the gathered logits) samples and sends the `ModelRunnerOutput` to rank 0, which answers.
Nobody waits for a step's tokens but rank 0, so with pipeline stages rank 0 keeps one step in flight
per stage, over disjoint requests (the scheduler skips requests whose token is in flight): stage 0
runs micro-batch k+1 while stage 1 runs micro-batch k. The scheduler and the KV block pool exist
once, in rank 0's engine core; each rank holds its share of every block (its layers, its KV heads),
so the pool is sized by the rank with the least room.

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
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, replace

import msgspec
import torch

from llmserve.checkpoint.convert import Mapping
from llmserve.config import EngineConfig
from llmserve.core.scheduler_output import GrammarBitmask, ModelRunnerOutput, SchedulerOutput
from llmserve.core.sequence import PLACEHOLDER
from llmserve.worker.model_runner import GrammarSource, LaunchedStep, ModelRunner
from llmserve.worker.profiling import num_kv_blocks
from llmserve.distributed import ParallelState, init_distributed, rank_config, shutdown_distributed

logger = logging.getLogger(__name__)
STOP = b""  # the step payload that ends the workers' loops
START_TIMEOUT_S = 600.0  # loading a large shard from a slow disk
_ENCODER = msgspec.msgpack.Encoder()
_OUTPUT_DECODER = msgspec.msgpack.Decoder(ModelRunnerOutput)


class RankFailedError(RuntimeError):
    """A rank of a parallel engine died or hung: the step cannot finish, the engine must stop."""


class ForwardedResult(msgspec.Struct, array_like=True):
    """A step's sampled tokens, passed on by rank 0 to the ranks that did not sample them."""

    step_no: int
    result: ModelRunnerOutput


class StepMessage(msgspec.Struct, array_like=True):
    """What rank 0 broadcasts per step: the batch, and the tokens of steps finished since the last one."""

    step_no: int
    scheduler_output: SchedulerOutput
    results: list[ForwardedResult] = []
    grammar_bitmask: GrammarBitmask | None = None  # for the sampling rank


_MESSAGE_DECODER = msgspec.msgpack.Decoder(StepMessage)


class ParallelModelRunner(ModelRunner):
    """One rank's runner: its stage's forward, with placeholders for tokens sampled on another rank.

    Rank 0 launches steps (broadcast, then its own stage) and collects their results (from the sampling
    rank) in order; with pipeline stages several steps are in flight, over disjoint requests. A rank that
    did not sample a step leaves a placeholder in each of its requests and fills it when rank 0 forwards
    the tokens with a later step, always before a step that reads them.
    """

    def __init__(self, model, local_config, config: EngineConfig, num_blocks: int, parallel: ParallelState,
                 describe_ranks=lambda: "a rank died or hung"):
        """`describe_ranks`: which ranks are gone, as rank 0 sees them (for the error a failed step raises)."""
        # eager: the CUDA graphs of one rank would capture a stage hand-off; graph capture of the
        # collectives is not built yet
        device = replace(config.device, device=str(parallel.device), enforce_eager=True)
        super().__init__(model, local_config, config.cache, device, num_blocks, 0, config.scheduler.max_num_seqs)
        self.parallel = parallel
        self.describe_ranks = describe_ranks
        self._step_no = 0
        self._placeholders: dict[int, list[tuple[object, int]]] = {}  # step -> (request state, output index)
        self._in_flight: deque[int] = deque()  # rank 0: launched steps whose tokens are owed, oldest first
        self._own_results: dict[int, ModelRunnerOutput] = {}  # rank 0 when it samples (one pipeline stage)
        self._to_forward: list[ForwardedResult] = []

    def launch(self, out: SchedulerOutput, previous: LaunchedStep | None = None,
               grammar_bitmask: GrammarSource | None = None) -> LaunchedStep:
        raise NotImplementedError("a parallel engine launches with launch_step and collects with collect_step")

    def execute(self, out: SchedulerOutput, grammar_bitmask: GrammarSource | None = None) -> ModelRunnerOutput:
        """Rank 0, one step at a time; the grammar masks are awaited before the step is sent (the sampling
        rank needs them with it)."""
        self.launch_step(out, grammar_bitmask() if grammar_bitmask is not None else None)
        return self.collect_step() if not out.is_empty else ModelRunnerOutput()

    def launch_step(self, out: SchedulerOutput, grammar_bitmask: GrammarBitmask | None = None) -> None:
        """Rank 0: hand the step to every rank and run this rank's stage of it; its tokens come from
        `collect_step`, in launch order."""
        with self._failures():
            self._step_no += 1
            message = StepMessage(self._step_no, out, self._to_forward, grammar_bitmask)
            self._to_forward = []
            self.parallel.post_bytes(_ENCODER.encode(message), self.parallel.control_group)
            self.run_stage(message)
            if not out.is_empty:
                self._in_flight.append(self._step_no)

    def collect_step(self) -> ModelRunnerOutput:
        """Rank 0: the sampled tokens of the oldest step in flight."""
        with self._failures():
            step_no = self._in_flight.popleft()
            if self.parallel.is_sampler:
                result = self._own_results.pop(step_no)
            else:
                payload = self.parallel.recv_bytes(self.parallel.sampler_rank, self.parallel.result_group)
                result = _OUTPUT_DECODER.decode(payload)
                self._fill(step_no, result)
            self._to_forward.append(ForwardedResult(step_no, result))
            return result

    @torch.inference_mode()
    def run_stage(self, message: StepMessage) -> None:
        """Every rank: take the forwarded tokens, then run this rank's part of the step."""
        for forwarded in message.results:
            self._fill(forwarded.step_no, forwarded.result)
        parallel = self.parallel
        batch = self.prepare_inputs(message.scheduler_output)
        if batch is None:
            return
        states = batch.sample_states
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)
        scored = self.score_prompts(hidden, batch, keep=parallel.is_sampler)
        logits = None
        if hidden is not None and states:  # the last stage: every tensor rank joins the gather
            logits = self.model.compute_logits(hidden[batch.logits_indices])
        if not parallel.is_sampler:
            self._placeholders[message.step_no] = [(state, len(state.output_token_ids)) for state in states]
            for state in states:
                state.output_token_ids.append(PLACEHOLDER)
            return
        result = self.collect(self.sample(logits, states, message.grammar_bitmask)) if states else ModelRunnerOutput()
        result.prompt_logprobs = scored
        if parallel.rank == 0:
            self._own_results[message.step_no] = result
        else:
            parallel.send_bytes(_ENCODER.encode(result), 0, parallel.result_group)

    def _fill(self, step_no: int, result: ModelRunnerOutput) -> None:
        for (state, index), token_id in zip(self._placeholders.pop(step_no, ()), result.sampled_token_ids):
            state.output_token_ids[index] = token_id  # harmless if the request was dropped meanwhile

    @contextmanager
    def _failures(self):
        try:
            yield
        except RuntimeError as exc:  # gloo / NCCL: a peer closed its connection or a collective timed out
            raise RankFailedError(f"the tensor/pipeline-parallel step failed ({self.describe_ranks()}): "
                                  f"{str(exc).splitlines()[0]}") from exc

    def stop_workers(self) -> None:
        """Rank 0: end the workers' step loops (they leave the process group and exit)."""
        self.parallel.broadcast_bytes(STOP, self.parallel.control_group)


def kv_blocks_for_rank(model, local_config, config: EngineConfig, parallel: ParallelState) -> int:
    """KV blocks this rank has room for, agreed as the minimum over all ranks (every rank calls this)."""
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
        _share_cpu_cores(config, par.local_ranks or mapping.world_size)
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
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or par.local_ranks or mapping.world_size
        _share_cpu_cores(config, local_ranks)
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
        payload = parallel.broadcast_bytes(None, parallel.control_group)
        if payload == STOP:
            break
        runner.run_stage(_MESSAGE_DECODER.decode(payload))
    shutdown_distributed()


def _share_cpu_cores(config: EngineConfig, local_ranks: int) -> None:
    """On CPU, give each of this host's ranks its share of the cores: ranks running at once with a
    thread per core each oversubscribe them (OpenMP threads spin): pipelined pp=2 on a 2-core machine ran at
    0.42 of one rank's speed with two threads per rank, 0.64 with one (bench/cpu_parallel.py)."""
    if not config.device.device.startswith("cuda"):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))


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
