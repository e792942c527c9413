"""DeepSpeed engines behind `LearnerInterface`: teacher and student each in its own ZeRO engine.

`ZeroLearner` wraps one `deepspeed.initialize` engine and offers the methods the steps use (`__call__`,
`lr`, `update`, `probe_logits`, `grad_dots`, `mean_over_replicas`), so `mpl_large.steps` runs unchanged.

The feedback dot product never materialises a full gradient. After a backward, every ZeRO stage leaves
each rank a disjoint piece of the averaged gradient (`local_grad_pieces`): its ZeRO-3 partition, its
ZeRO-1/2 fragment, or for stage 0 (full gradients everywhere) a rank-owned contiguous range of the
flattened gradient. The pieces of all ranks tile the gradient exactly once, so the three partial dot
products [g.u, g.g, u.u] summed by one all-reduce are the full ones. The stash u is one piece
(~4 P / N bytes in fp32).
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
import sys
import warnings
from pathlib import Path

import timm
import torch
import torch.distributed as dist
from torch import nn

from mpl_large.checkpoint import CheckpointError
from mpl_large.config import ConfigError, OptimConfig
from mpl_large.device import collective_device
from mpl_large.guard import all_finite
from mpl_large.learner import advance_schedule, measurement_mode, running_statistics_frozen
from mpl_large.optim import build_optimizer, lr_factor
from mpl_large.parallel import ParallelDims, split_width

def init_distributed() -> tuple[int, int]:
    """Join the process group the launcher describes (accelerate launch, deepspeed, torchrun all set
    RANK / WORLD_SIZE / MASTER_ADDR); gloo on CPU, nccl on CUDA. Returns (rank, world size)."""
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", "29512"))
        # DeepSpeed builds its CPU communication op (shm_comm) on first use into TORCH_EXTENSIONS_DIR. The
        # default, ~/.cache/torch_extensions, is shared by every checkout: their builds clash, and a killed
        # build's lock hangs later runs. One directory per environment (venv) instead; a setting of yours wins.
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
        import deepspeed  # lazy: importing it takes seconds and probes accelerators; one process never needs it

        # DeepSpeed calls torch.distributed functions torch has deprecated; say it once, not every step.
        warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed",
                                category=FutureWarning)
        if not torch.cuda.is_available():
            skip_shm_comm_build()
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def skip_shm_comm_build() -> None:
    """On CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce (`deepspeed_shm_comm`) when it
    starts: a g++ build of minutes on 2 cores on a fresh machine, repeated whenever another environment's build
    replaces the one cache every environment shares (~/.cache/torch_extensions), and ranks wait on its lock.
    Only DeepSpeed's inference all-reduce uses it, which we never call: every collective of ours goes through
    gloo. DeepSpeed builds the op only if its compatibility table (`deepspeed.ops.__compatible_ops__`, which it
    keeps for edits like this one) says it can; mark it unavailable there, which also spares probing the
    other ops."""
    import deepspeed.ops

    table = vars(deepspeed.ops).setdefault("__compatible_ops__", {})
    table["deepspeed_shm_comm"] = False


def engine_config(config: dict, micro_batch: int, world_size: int) -> dict:
    """`config` with the batch bookkeeping DeepSpeed insists on filled in (one micro-batch per step:
    the steps do their own accumulation-free updates)."""
    config = copy.deepcopy(config)
    config.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=1,
                  train_batch_size=micro_batch * world_size)
    config.setdefault("steps_per_print", 1 << 30)
    return config


def cast_for_engine(model: nn.Module, ds_config: dict) -> nn.Module:
    """The model in the dtype its engine trains in (assembly's dtype step, before `ZeroLearner`)."""
    if ds_config.get("bf16", {}).get("enabled", False):
        # DeepSpeed casts parameters only; BatchNorm needs its running statistics in the same dtype.
        model = model.to(torch.bfloat16)
    return model


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers to every rank, for a model that takes rank 0's weights before its engine is built:
    DeepSpeed broadcasts parameters only; BatchNorm statistics must reach the other ranks too."""
    device = collective_device()  # the model is still on the host; NCCL broadcasts CUDA tensors only
    for buffer in model.buffers():
        sent = buffer.to(device)
        dist.broadcast(sent, 0)
        buffer.copy_(sent)


class _TestedOptimizer(logging.Filter):
    """Drops DeepSpeed's "ZeRO with an untested optimizer" warning (once per engine): our optimizers
    (`mpl_large.optim`: SGD, TF RMSProp, LARS) are tested under ZeRO 0-3 against one process
    (tests/test_zero.py), which is what `zero_allow_untested_optimizer` in ds_configs/ asserts."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "untested optimizer" not in record.getMessage()


_TESTED_OPTIMIZER = _TestedOptimizer()


class ZeroLearner:
    """One model in a DeepSpeed engine, with the `LearnerInterface` the steps use."""

    def __init__(self, model: nn.Module, optim: OptimConfig, ds_config: dict, micro_batch: int,
                 dims: ParallelDims | None = None) -> None:
        """`model`: already in the engine's dtype (`cast_for_engine`). `dims`: the mesh of a model
        `parallelize`d for spatial partitioning; inputs are then split along width for this rank.
        `micro_batch`: images per replica per step."""
        import deepspeed  # lazy, as in init_distributed
        from deepspeed.utils import logger as deepspeed_logger

        deepspeed_logger.addFilter(_TESTED_OPTIMIZER)  # a no-op after the first engine
        if not torch.cuda.is_available():  # a process group joined without init_distributed (tests' forked ranks)
            skip_shm_comm_build()
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        optimizer = build_optimizer(model, optim)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, optim))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=engine_config(ds_config, micro_batch, self.world_size),
        )
        self.engine.checkpoint_engine = weights_only_checkpoint_engine(self.engine)
        self.model = self.engine.module
        self.device = self.engine.device
        """Where the engine put the model (`cuda:LOCAL_RANK` on a CUDA machine): batches are moved here."""
        self.stage = self.engine.zero_optimization_stage()
        if self.stage == 3:
            # Non-reentrant checkpointing checks the recomputed tensors' metadata, and ZeRO-3 parameters
            # change shape between forward (gathered) and backward (released): use timm's reentrant mode.
            timm.layers.set_reentrant_ckpt(True)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.dtype = next(self.model.parameters()).dtype
        self._ranges = self._stage0_ranges() if self.stage == 0 else None
        self._stash: list[torch.Tensor] | None = None
        self.dims = dims if dims is not None and dims.sp > 1 else None
        self.skipped_updates = 0
        """Updates skipped for a non-finite loss or gradient on any rank (`mpl_large.guard`)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.engine(self.prepare(x))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """A replica's images as this rank's model input: the engine's dtype, and its width strip."""
        x = x.to(self.dtype) if x.is_floating_point() else x
        return split_width(x, self.dims) if self.dims is not None else x

    @property
    def lr(self) -> float:
        """The learning rate the next `update` will use."""
        return self.engine.get_lr()[0]

    def update(self, loss: torch.Tensor, stash_grad: bool = False) -> None:
        """Backward (gradients averaged over ranks and partitioned), optionally stash this rank's piece,
        step the optimizer and the schedule. If the loss or a gradient piece is not finite on any rank, every
        rank skips the optimizer step (counted) and only the schedule advances."""
        with running_statistics_frozen(self.model):
            self.engine.backward(loss)
        pieces = self.local_grad_pieces()
        if stash_grad:
            self._stash = [g.detach().float().clone() for g in pieces]
        bad = (~all_finite(loss, pieces)).to(torch.float32).reshape(1)
        dist.all_reduce(bad)
        if bad.item():
            self.engine.optimizer.zero_grad()
            self.scheduler.step()
            self.skipped_updates += 1
            return
        self.engine.step()

    def wait(self) -> None:
        """A step in which this model does not train: only its schedule advances (`OptimConfig.wait_steps`)."""
        advance_schedule(self.scheduler)

    def probe_logits(self, x: torch.Tensor) -> torch.Tensor:
        with measurement_mode(self.model):
            return self(x)

    def grad_dots(self, loss: torch.Tensor) -> torch.Tensor:
        """[g.u, g.g, u.u] of the global averaged gradients: partial products on this rank's pieces and one
        all-reduce of three scalars. The probe gradient is then cleared, so no step ever sees it."""
        if self._stash is None:
            raise RuntimeError("grad_dots needs a gradient stashed by update(..., stash_grad=True)")
        with measurement_mode(self.model):  # activation checkpointing recomputes the probe's forward here
            self.engine.backward(loss)
        u, self._stash = self._stash, None
        # Accumulated where the gradients live: a host copy per parameter would sync the device each time.
        dots = torch.zeros(3, dtype=torch.float64, device=loss.device)
        for g_piece, u_piece in zip(self.local_grad_pieces(), u):
            g_piece = g_piece.detach().double()
            u_piece = u_piece.double()
            dots += torch.stack([g_piece @ u_piece, g_piece @ g_piece, u_piece @ u_piece]).to(loss.device)
        self.engine.optimizer.zero_grad()
        dist.all_reduce(dots)
        return dots.to(torch.float32 if loss.dtype != torch.float64 else loss.dtype)

    def mean_over_replicas(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of `value` over data-parallel ranks (gloo has no AVG: SUM / N)."""
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world_size

    def local_grad_pieces(self) -> list[torch.Tensor]:
        """This rank's disjoint pieces of the averaged gradient, flattened, one per parameter it owns."""
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_grad  # lazy, as in init_distributed

            return [safe_get_local_grad(p).reshape(-1) for p in self.params]
        if self.stage in (1, 2):
            pieces = []
            for p in self.params:
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is None:
                    continue
                piece = mapping.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
                if piece.numel() == p.numel():  # bf16 keeps a full accumulation buffer; take the owned range
                    address = mapping.lp_fragment_address
                    piece = piece.narrow(0, address.start, address.numel)
                pieces.append(piece)
            return pieces
        return [p.grad.reshape(-1)[start:stop] for p, (start, stop) in zip(self.params, self._ranges)
                if stop > start]

    def _stage0_ranges(self) -> list[tuple[int, int]]:
        """Stage 0 keeps full gradients on every rank; rank r owns the r-th contiguous N-th of the
        flattened gradient, as (start, stop) within each parameter."""
        total = sum(p.numel() for p in self.params)
        lo, hi = total * self.rank // self.world_size, total * (self.rank + 1) // self.world_size
        ranges, offset = [], 0
        for p in self.params:
            start, stop = max(lo - offset, 0), min(hi - offset, p.numel())
            ranges.append((start, max(start, stop)))
            offset += p.numel()
        return ranges

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full model weights on rank 0 (None elsewhere). Collective: every rank must call it. Under
        ZeRO-3 parameters are gathered one module at a time, so no rank holds two models' worth."""
        if self.stage == 3:
            # DeepSpeed's public save_16bit_model writes a pickle; we only want the gathered tensors.
            state = self.engine._zero3_consolidated_16bit_state_dict()
            # On CPU `.cpu()` is a no-op and these tensors alias the live weights: copy them.
            return {k: v.detach().cpu().clone() for k, v in state.items()} if self.rank == 0 else None
        if self.rank != 0:
            return None
        return {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}

    def save(self, directory: Path) -> None:
        """Collective: this rank's partitions of weights and optimizer states, and the schedule, with
        DeepSpeed's own checkpointing (the only writer that knows every stage's partition layout)."""
        self.engine.save_checkpoint(str(directory), tag="engine", save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag="engine", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory}")

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()


def deepspeed_safe_globals() -> list:
    """The classes DeepSpeed pickles into its checkpoints besides tensors and plain data (checked for stages 0,
    2 and 3, fp32 and bf16, with `torch.serialization.get_unsafe_globals_in_checkpoint`): all plain records."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def weights_only_checkpoint_engine(engine):
    """DeepSpeed's torch checkpoint engine, loading with `weights_only=True` and the allow-list above instead
    of unpickling whatever a checkpoint file holds (DeepSpeed's own loader uses `weights_only=False`)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(deepspeed_safe_globals()):
                try:
                    return torch.load(path, map_location=map_location, weights_only=True)
                except pickle.UnpicklingError as e:
                    raise CheckpointError(f"{path}: refused to load: it holds an object outside DeepSpeed's "
                                          f"allow-listed checkpoint classes, and loading it would run its code "
                                          f"({str(e).splitlines()[0]})") from None

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise ConfigError(f"deepspeed: checkpoint engine {type(engine.checkpoint_engine).__name__} is not "
                          f"supported (its loader unpickles); use DeepSpeed's default torch engine")
    return WeightsOnlyCheckpointEngine(engine._config)
