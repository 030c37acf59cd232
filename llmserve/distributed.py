"""Tensor and pipeline parallel ranks on torch.distributed: groups, collectives, the step hand-off.

Rank r = pp_rank * tp + tp_rank (TensorRT-LLM's order, as the converter writes `rank{r}.safetensors`).
Three kinds of traffic, each on the stock library:
- the model's collectives, on the data backend (NCCL on CUDA, gloo on CPU): an all-reduce per
  attention and per MLP inside a stage's tensor-parallel group, the LM head's all-gather, and the
  hidden states passed from one pipeline stage to the next (send/recv);
- each step's plain-data batch, broadcast by rank 0 (the engine core) to every rank, and the
  sampled tokens sent by the sampling rank to rank 0 alone, as msgpack bytes on gloo groups;
- nothing else: no home-made socket protocol.
A dead peer breaks the gloo/NCCL connections and a hung one times out (`step_timeout_s`): either
way the collective raises, the step fails, and the engine stops.
"""

from __future__ import annotations

import datetime
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from llmserve.checkpoint.convert import Mapping

IDLE_TIMEOUT = datetime.timedelta(days=365)  # workers wait for the next step as long as the server idles


class CollectiveTimer:
    """Time spent in this rank's all-reduces (benchmarks): CUDA events on a GPU, wall time on CPU."""

    def __init__(self):
        self.count = 0
        self._cpu_s = 0.0
        self._events: list = []

    @contextmanager
    def time(self, device: torch.device):
        self.count += 1
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            began = time.perf_counter()
            yield
            self._cpu_s += time.perf_counter() - began

    def total_ms(self) -> float:
        if self._events:
            self._events[-1][1].synchronize()
        return 1e3 * self._cpu_s + sum(start.elapsed_time(end) for start, end in self._events)


@dataclass(slots=True)
class ParallelState:
    """This process's place in the tp x pp grid and the groups it talks on (None when alone)."""

    mapping: Mapping
    rank: int = 0
    device: torch.device = torch.device("cpu")
    tp_group: object | None = None  # this stage's tensor-parallel ranks, data backend
    control_group: object | None = None  # every rank, gloo, long timeout: step payloads wait on it
    result_group: object | None = None  # every rank, gloo, step timeout: sampled tokens, the KV agreement
    step_timeout_s: float = 120.0
    # sends started and not yet known complete, with the tensors they read (kept alive until done)
    outstanding: list = field(default_factory=list)
    all_reduce_timer: CollectiveTimer | None = None  # set by a benchmark to time this rank's all-reduces

    @property
    def world_size(self) -> int:
        return self.mapping.world_size

    @property
    def tp_size(self) -> int:
        return self.mapping.tp_size

    @property
    def tp_rank(self) -> int:
        return self.mapping.tp_rank(self.rank)

    @property
    def pp_rank(self) -> int:
        return self.mapping.pp_rank(self.rank)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.mapping.pp_size - 1

    @property
    def sampler_rank(self) -> int:
        """The rank that samples: tensor rank 0 of the last stage (every last-stage rank holds the logits)."""
        return self.mapping.rank(0, self.mapping.pp_size - 1)

    @property
    def is_sampler(self) -> bool:
        return self.rank == self.sampler_rank

    def stage_layers(self, num_layers: int) -> list[int]:
        return self.mapping.pp_layers(self.pp_rank, num_layers)

    # ---- tensor parallel ---------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over this stage's tensor-parallel ranks (in place)."""
        if self.tp_size == 1:
            return x
        if self.all_reduce_timer is None:
            dist.all_reduce(x, group=self.tp_group)
        else:
            with self.all_reduce_timer.time(x.device):
                dist.all_reduce(x, group=self.tp_group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[.., n] on each tensor rank -> [.., n * tp], rank order."""
        if self.tp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)

    # ---- pipeline parallel ---------------------------------------------------------------------
    def send_to_next_stage(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        """Hand the stage's output on without waiting: this stage may start the next micro-batch meanwhile."""
        peer = self.mapping.rank(self.tp_rank, self.pp_rank + 1)
        both = torch.stack([hidden, residual]).contiguous()
        self._keep(dist.isend(both, peer), both)

    def recv_from_previous_stage(self, num_tokens: int, hidden_size: int,
                                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        peer = self.mapping.rank(self.tp_rank, self.pp_rank - 1)
        both = torch.empty(2, num_tokens, hidden_size, dtype=dtype, device=self.device)
        dist.recv(both, peer)
        return both[0], both[1]

    # ---- plain data between ranks ----------------------------------------------------------------
    def broadcast_bytes(self, payload: bytes | None, group) -> bytes:
        """`payload` from rank 0 to every rank (gloo, CPU tensors): a length, then the bytes; the others
        pass None and get it. Rank 0 waits at most the step timeout for the receivers, whatever the
        group's own timeout (the control group's is a year: idle workers wait there for the next step)."""
        size = torch.tensor([len(payload) if self.rank == 0 else 0], dtype=torch.int64)
        self._broadcast(size, group)
        if self.rank == 0:
            buffer = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8)
        else:
            buffer = torch.empty(int(size.item()), dtype=torch.uint8)
        if buffer.numel():
            self._broadcast(buffer, group)
        return buffer.numpy().tobytes()

    def post_bytes(self, payload: bytes, group) -> None:
        """Rank 0: broadcast `payload` to every rank without waiting for them (they take steps in order)."""
        size = torch.tensor([len(payload)], dtype=torch.int64)
        buffer = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        self._keep(dist.broadcast(size, 0, group=group, async_op=True), size)
        self._keep(dist.broadcast(buffer, 0, group=group, async_op=True), buffer)

    def send_bytes(self, payload: bytes, dst: int, group) -> None:
        size = torch.tensor([len(payload)], dtype=torch.int64)
        dist.send(size, dst, group=group)
        dist.send(torch.frombuffer(bytearray(payload), dtype=torch.uint8), dst, group=group)

    def recv_bytes(self, src: int, group) -> bytes:
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, src, group=group)
        buffer = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.recv(buffer, src, group=group)
        return buffer.numpy().tobytes()

    def _keep(self, work, tensor: torch.Tensor) -> None:
        self.outstanding = [(w, t) for w, t in self.outstanding if not w.is_completed()]
        self.outstanding.append((work, tensor))

    def _broadcast(self, tensor: torch.Tensor, group) -> None:
        if self.rank != 0:
            dist.broadcast(tensor, 0, group=group)
            return
        work = dist.broadcast(tensor, 0, group=group, async_op=True)
        if not work.wait(timeout=datetime.timedelta(seconds=self.step_timeout_s)):
            raise RuntimeError(f"a rank did not take the step within {self.step_timeout_s:.0f} s")

    def agree_on_min(self, value: int) -> int:
        """The smallest `value` over all ranks (e.g. KV blocks: every rank must hold the pool)."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.result_group)
        return int(tensor.item())


def single_rank() -> ParallelState:
    return ParallelState(Mapping(1, 1))


def init_distributed(parallel: ParallelState, init_method: str, device: str, step_timeout_s: float) -> None:
    """Join the process group at `init_method` (tcp://host:port) as `parallel.rank` and fill in its groups.

    Every rank calls this with the same arguments but its own state; every rank creates every group
    in the same order (torch.distributed requires it).
    """
    timeout = datetime.timedelta(seconds=step_timeout_s)
    on_cuda = device.startswith("cuda")
    if on_cuda:
        torch.cuda.set_device(parallel.device)
    mapping, rank = parallel.mapping, parallel.rank
    dist.init_process_group("nccl" if on_cuda else "gloo", init_method=init_method, rank=rank,
                            world_size=mapping.world_size, timeout=timeout)
    for pp_rank in range(mapping.pp_size):
        ranks = [mapping.rank(t, pp_rank) for t in range(mapping.tp_size)]
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            parallel.tp_group = group
    parallel.step_timeout_s = step_timeout_s
    parallel.control_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    parallel.result_group = dist.new_group(backend="gloo", timeout=timeout)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_config(config, parallel: ParallelState):
    """The model as one rank holds it: its stage's layers, its share of heads and MLP columns.

    KV heads fewer than tp are duplicated (one per rank), as the converter writes them. The
    vocabulary stays whole: the embedding and LM head split it themselves.
    """
    if parallel.world_size == 1:
        return config
    from dataclasses import replace

    from llmserve.checkpoint.convert import heads_per_rank

    q_heads, kv_heads = heads_per_rank(config, parallel.tp_size)
    return replace(config, num_hidden_layers=len(parallel.stage_layers(config.num_hidden_layers)),
                   num_attention_heads=q_heads, num_key_value_heads=kv_heads,
                   intermediate_size=config.intermediate_size // parallel.tp_size)
