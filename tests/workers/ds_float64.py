"""DeepSpeed engines in float64, for parity tests across process layouts (tests only).

fp32 results of a multi-step MPL run depend on the CPU's summation order: h is a cosine near 1e-3 and the
probe gradient jumps where a round-off-sized weight change flips an activation across a ReLU kink, so two
layouts that agree to round-off at step 1 drift 1e-3 apart within a few steps. In float64 the same
comparisons agree to ~1e-8 on any CPU. DeepSpeed does not train in float64 as shipped, in two places:

- ZeRO-1/2/3 keep master weights (and hand the optimizer gradients) in fp32 whatever the parameters' dtype
  (`ZeROOptimizer._configure_master_weights`): a float64 run would round its weights to fp32 every step.
- Stage 0 all-reduces only the accelerator's `supported_dtypes()` (fp32, bf16 on CPU) and refuses float64.

`use_float64()` makes float64 the default dtype and lifts both; `check_float64(learner)` fails loudly if a
DeepSpeed release moves one of them, instead of letting a test silently compare fp32 runs.

Two fp32 roundings remain, and set the ~1e-8: gradients are communicated in fp32 (ZeRO-3's reduce-scatter
accepts no wider `communication_data_type`), and ZeRO-3 hands out its gradient pieces (h's dot products) in
fp32. Both round values that agree to ~1e-15 in the two runs, so they round alike almost everywhere and
do not compound the way fp32 arithmetic throughout does. ZeRO-1/2 also accumulate the float64 gradients in
a separate fp32 `grad_accum` buffer (the engine's gradient-accumulation dtype stays fp32), a path fp32
training does not take: there the probe gradient of `grad_dots` is not cleared before the next update, so
the probe-isolation test runs in fp32 (tests/workers/zero_parity.py).
"""

from __future__ import annotations

import torch


def use_float64() -> None:
    """Call before building models and engines."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    torch.set_default_dtype(torch.float64)
    accelerator = type(get_accelerator())
    supported = accelerator.supported_dtypes
    accelerator.supported_dtypes = lambda self: [*supported(self), torch.float64]
    ZeROOptimizer._configure_master_weights = lambda self, *args, **kwargs: torch.float64


def check_float64(learner) -> None:
    """Raise unless the engine's optimizer steps float64 tensors (its master weights)."""
    optimizer = learner.engine.optimizer  # stage 0: the torch optimizer; ZeRO: its wrapper
    inner = getattr(optimizer, "optimizer", optimizer)
    # ZeRO-1/2 hand the torch optimizer their flat master partitions; ZeRO-3 swaps them in only for the step.
    masters = [p for group in inner.param_groups for p in group["params"]]
    masters += getattr(optimizer, "fp32_partitioned_groups_flat", [])
    dtypes = {t.dtype for t in masters}
    if dtypes != {torch.float64}:
        raise RuntimeError(f"the optimizer steps {sorted(map(str, dtypes))}, not float64: tests/workers/ds_float64.py "
                           f"no longer matches this DeepSpeed")
