"""Replay a whole training step (forward, GReg's double backward, backward) from one CUDA graph.

Why: a GReg step on small images launches about three times the kernels of an energy-OE step, each of them
short. On an H100, the WRN-40-2 GReg step (128 + 256 images of 32x32) took 60 ms of wall time for 37 ms of GPU
time: the GPU waited for Python and the CPU to launch kernels (``bench/results/h100_profile_compiled.txt``). A
CUDA graph launches the recorded kernels of the whole step at once ("whole-network capture" in PyTorch's CUDA
Graphs notes; Nguyen et al., "Accelerating PyTorch with CUDA Graphs", 2021).

:class:`CapturedStep` wraps ``step(*inputs) -> dict[str, Tensor]``, a function that computes a loss and calls
``backward()``. The first ``warmup`` calls run eagerly on a side stream (cuDNN autotuning, ``torch.compile`` and
lazy initializations happen there, as capture forbids them); the next call records the step into a graph; from
then on a call copies its inputs into the graph's static inputs and replays it. Every call leaves *fresh*
gradients in the parameters' ``.grad`` (it does not accumulate) and returns copies of the step's outputs. The
optimizer step is not recorded, so learning-rate schedules, gradient clipping and Lightning's hooks are unchanged.

What ``step`` must respect (the rules of CUDA graph capture): it reads only its inputs, the parameters and buffers
(updated in place, like BatchNorm's running statistics, which the graph then keeps updating); it never
synchronizes with the host (no ``.item()``, no shapes that depend on values, no BatchNorm with ``momentum=None``);
its shapes are fixed. Inputs whose shapes, dtypes or strides differ from the first call's (a smaller last batch)
run eagerly. CPU inputs always run eagerly, so the same code runs on a laptop.

Autocast's weight cache lives as long as the outer ``autocast`` region (all of Lightning's ``training_step``, in
which an outlier sampler may already have run the model), and it matters twice:

- the graph must not read weights cast before the capture: ``step`` runs under a nested ``autocast`` with the cache
  disabled, so the weights are cast inside the graph on every replay;
- a cached cast keeps its autograd node alive (PyTorch 2.9 and later give casts cached under ``no_grad`` one), and
  with it the parameter's gradient accumulator, which remembers the stream it was created on. A backward captured
  on the graph's stream then accumulates on the default stream and the capture fails ("operation would make the
  legacy stream depend on a capturing blocking stream"; seen on an H100 with a bf16 forward before the capture).
  The cache is therefore cleared before the capture.

Should a capture still fail, the step warns once and runs eagerly from then on (a capture executes nothing, so no
parameter or statistic has changed).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

Step = Callable[..., dict[str, Tensor]]


_EAGER = object()  # the signature after a failed capture: equal to no inputs' (an empty tuple is a step's without any)


def _signature(inputs: tuple[Tensor, ...]) -> tuple:
    return tuple((t.shape, t.dtype, t.device, t.stride()) for t in inputs)


def _autocast_without_cache() -> contextlib.AbstractContextManager:
    """The current CUDA autocast setting with its weight cache off (a no-op outside autocast)."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


class CapturedStep:
    """Run ``step(*inputs)`` (a loss and its ``backward()``) from a CUDA graph after ``warmup`` eager calls.

    Args:
        step: computes the loss from ``inputs`` and calls ``backward()``; returns the tensors the caller needs
            (losses, statistics), which :meth:`__call__` returns as copies.
        params: the parameters whose gradients ``step`` computes.
        warmup: eager calls before the capture (PyTorch's notes use 3; DDP would need 11).
    """

    def __init__(self, step: Step, params: Iterable[Tensor], warmup: int = 3) -> None:
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0 (eager calls before the capture), got {warmup!r}")
        self.step = step
        self.params = [p for p in params if p.requires_grad]
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self._signature: tuple | object | None = None
        self._eager_calls = 0
        self._static_inputs: tuple[Tensor, ...] = ()
        self._static_outputs: dict[str, Tensor] = {}
        self._grads: list[Tensor | None] = []

    def __call__(self, *inputs: Tensor) -> dict[str, Tensor]:
        """Gradients into ``.grad`` (replacing what was there) and the step's outputs."""
        self._clear_grads()
        signature = _signature(inputs)
        if self._signature is None and all(t.is_cuda for t in inputs):
            self._signature = signature  # the shapes to capture: those of the first CUDA call
        if signature != self._signature:
            return self.step(*inputs)
        if self.graph is None:
            if self._eager_calls < self.warmup:
                self._eager_calls += 1
                return self._run_on_side_stream(inputs)
            try:
                self._capture(inputs)
            except RuntimeError as err:
                message = f"CUDA graph capture failed, the training step runs eagerly: {err}"
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                self._signature = _EAGER  # eager from now on
                self._clear_grads()
                return self.step(*inputs)
        for static, t in zip(self._static_inputs, inputs, strict=True):
            static.copy_(t)
        self.graph.replay()
        for p, grad in zip(self.params, self._grads, strict=True):
            p.grad = grad
        return {k: v.clone() for k, v in self._static_outputs.items()}

    def _clear_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def _run_on_side_stream(self, inputs: tuple[Tensor, ...]) -> dict[str, Tensor]:
        # PyTorch's notes warm up on a side stream, as the capture itself runs on one.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), _autocast_without_cache():
            outputs = self.step(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        return outputs

    def _capture(self, inputs: tuple[Tensor, ...]) -> None:
        self._static_inputs = tuple(t.clone() for t in inputs)  # clone keeps the strides (channels-last)
        torch.clear_autocast_cache()  # its casts hold gradient accumulators bound to another stream (docstring)
        graph = torch.cuda.CUDAGraph()
        # The gradients are allocated inside the graph (they are None now): replays write into the same tensors.
        with torch.cuda.graph(graph), _autocast_without_cache():
            self._static_outputs = {k: v.detach() for k, v in self.step(*self._static_inputs).items()}
        self._grads = [p.grad for p in self.params]
        self.graph = graph
