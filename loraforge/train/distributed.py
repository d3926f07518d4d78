"""Training on several processes: the launch through accelerate (DDP over gloo on CPU, NCCL on CUDA), each
rank's slice of the global batch, and the few collectives the shared loop needs.

The loop averages the trained weights' gradients once per optimiser step (after accumulation, as DDP with
`no_sync` does) instead of wrapping modules in DistributedDataParallel: a LoRA run trains parameters spread
over the UNet and the text encoders, which the objective calls directly, and its gradients are a few MB.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from loraforge import errors
from loraforge.errors import ConfigError, LoraforgeError, TrainingError

if TYPE_CHECKING:  # pragma: no cover
    from loraforge.registry.manifest import Manifest, RecipeInfo
    from loraforge.registry.registry import Registry
    from loraforge.train.base import TrainConfig

WORKER_ENV = "LORAFORGE_TRAIN_RANKS"  # set in each launched process: it trains instead of launching again


@dataclass(frozen=True)
class Ranks:
    """This process's place among the run's processes; every method is a no-op with one process."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0: the one that checkpoints, reports progress, renders and registers."""
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's part of a global batch of `n` samples (n is a multiple of the world size)."""
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Replace every gradient by its mean over the ranks, in one all-reduce."""
        if self.world == 1 or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.detach().reshape(-1).to(self.device, torch.float32) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.device, g.dtype)
            offset += n

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64 if self.device.type == "cpu" else torch.float32,
                         device=self.device)
        torch.distributed.all_reduce(t)
        return float(t) / self.world

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a SIGTERM reaches the ranks at different steps)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def broadcast(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Rank 0's weights on every rank (DDP does the same when it wraps a model)."""
        if self.world == 1:
            return
        with torch.no_grad():
            for p in params:
                data = p.data.to(self.device)
                torch.distributed.broadcast(data, src=0)
                p.data.copy_(data)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it registers a dataset snapshot, writes caches), the others after it,
        finding what it made instead of registering a second copy."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()


SINGLE = Ranks()


def in_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


def current_ranks() -> Ranks:
    """The launched run's ranks inside a worker (accelerate's process state), else one process."""
    if not in_worker():
        return SINGLE
    from accelerate import PartialState

    state = PartialState()
    return Ranks(rank=state.process_index, world=state.num_processes, device=torch.device(state.device))


def check_processes(trainer_cls, config: TrainConfig, method: str | None = None) -> None:
    """Refuse, before anything starts, what several processes cannot honour."""
    n = config.processes
    if n <= 1:
        return
    method = method or getattr(trainer_cls, "method", trainer_cls.__name__)
    if not getattr(trainer_cls, "supports_processes", False):
        raise ConfigError(f"trainer {method} does not train on several processes (processes {n}); "
                          f"use processes 1, or the lora or dreambooth_lora trainer")
    if config.batch_size % n:
        raise ConfigError(f"batch_size {config.batch_size} does not split over {n} processes; "
                          f"use a batch_size that is a multiple of {n} (it is the global batch)")


def launch(trainer, config: TrainConfig, *, registry: Registry, output: str, recipe: RecipeInfo | None,
           input_digest: str | None, resume: bool, progress: bool | None) -> list[Manifest]:
    """Run `trainer.train(...)` on `config.processes` processes with accelerate's launcher; rank 0's
    manifests (it alone registers) are returned, and an error raised on a rank is raised here as itself."""
    from accelerate import notebook_launcher

    from loraforge.home import tmp_dir
    from loraforge.registry.manifest import Manifest
    from loraforge.registry.refs import check_name

    check_name(output)
    check_processes(type(trainer), config)
    if torch.cuda.is_initialized():  # the launcher forks its ranks, and CUDA does not survive a fork
        raise ConfigError(f"processes {config.processes} must be launched from a process that has not used the "
                          f"GPU yet (an earlier step of this run did); run this training on its own: "
                          f"loraforge train {getattr(trainer, 'method', '')} ... --processes {config.processes}")
    _prepare_base(registry, config)
    results = Path(tempfile.mkdtemp(dir=tmp_dir(registry.home), prefix="ranks-"))
    # The elastic agent under the launcher logs each rank it closes; the rank's own error is the message.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    args = (type(trainer), config, str(registry.home), output, recipe, input_digest, resume, progress, str(results))
    try:
        try:
            # The launcher announces itself on stdout; keep stdout for the command's own output (--json).
            with contextlib.redirect_stdout(sys.stderr):
                notebook_launcher(_worker, args, num_processes=config.processes, use_port=str(_free_port()),
                                  mixed_precision="no")  # precision is the trainer's own (config.mixed_precision)
        except BaseException as exc:
            _raise_rank_error(results, exc)
            raise
        _raise_rank_error(results, None)
        done = results / "manifests.json"
        if not done.is_file():
            raise TrainingError(f"{config.processes}-process run of {output} ended without rank 0's result")
        return [Manifest.model_validate(m) for m in json.loads(done.read_text(encoding="utf-8"))]
    finally:
        shutil.rmtree(results, ignore_errors=True)


def _prepare_base(registry: Registry, config: TrainConfig) -> None:
    """Resolve the base (building a builtin, downloading a Hub model) here, before the ranks start: ranks would
    each do it at once, and inside a process group transformers saves models on rank 0 only."""
    from loraforge.registry.resolve import resolve_base

    resolve_base(registry, config.base, digest=False)


def _raise_rank_error(results: Path, cause: BaseException | None) -> None:
    """The lowest rank's recorded error, raised as the same loraforge error class with its one line."""
    found = sorted(results.glob("error-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    if not found:
        return
    info = json.loads(found[0].read_text(encoding="utf-8"))
    cls = getattr(errors, info["type"], None)
    if not (isinstance(cls, type) and issubclass(cls, LoraforgeError)):
        cls = TrainingError
    raise cls(info["message"]) from cause


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """A rank must not outlive the launching process (killed, it would go on and register alone)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(1)


def _worker(trainer_cls, config, home: str, output: str, recipe, input_digest, resume, progress,
            results: str) -> None:
    """One rank: join the process group (accelerate picks gloo on CPU, NCCL on CUDA) and train."""
    _die_with_parent()
    os.environ[WORKER_ENV] = "1"
    from accelerate import PartialState

    from loraforge.registry.registry import Registry

    state = PartialState(cpu=not torch.cuda.is_available())
    rank = state.process_index
    try:
        if state.device.type == "cuda" and torch.cuda.device_count() < state.num_processes:
            raise ConfigError(f"processes {state.num_processes} needs as many GPUs and this machine has "
                              f"{torch.cuda.device_count()}; use --processes {torch.cuda.device_count()}")
        manifests = trainer_cls().train(config, registry=Registry(Path(home)), output=output, recipe=recipe,
                                        input_digest=input_digest, resume=resume,
                                        progress=progress if rank == 0 else False)
        if rank == 0:
            text = json.dumps([m.model_dump(mode="json") for m in manifests])
            (Path(results) / "manifests.json").write_text(text, encoding="utf-8")
    except LoraforgeError as exc:
        (Path(results) / f"error-{rank}.json").write_text(
            json.dumps({"type": type(exc).__name__, "message": str(exc)}), encoding="utf-8")
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
