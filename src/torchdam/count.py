"""Count what actually runs: parameters, FLOPs (by the ops executed) and latency.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts the matmuls and
convolutions that really execute (2 FLOPs per multiply-add), so a gated model is counted
at full width (its gates skip nothing) and a compacted one at its real width.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from torchdam.compact import as_tuple, unwrap
from torchdam.errors import ConfigError
from torchdam.gates import DAMGate


def count(model: nn.Module, example_inputs) -> dict[str, int]:
    """``{"params": int, "flops": int}`` for one forward of ``model`` on ``example_inputs``.

    Params exclude DAM gates' betas (one scalar per gated layer, training-only state).

    Example:
        >>> count(nn.Linear(10, 5), torch.randn(1, 10))
        {'params': 55, 'flops': 100}
    """
    model = unwrap(model)
    gate_params = {id(p) for m in model.modules() if isinstance(m, DAMGate) for p in m.parameters()}
    params = sum(p.numel() for p in model.parameters() if id(p) not in gate_params)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*as_tuple(example_inputs))
    finally:
        model.train(was_training)
    return {"params": int(params), "flops": int(counter.get_total_flops())}


def latency(model: nn.Module | OnnxModel, example_inputs, repeats: int = 30, warmup: int = 5) -> float:
    """Median wall time of one eval-mode forward, in milliseconds (an :class:`OnnxModel` too)."""
    inputs = as_tuple(example_inputs)
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    times = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                start = time.perf_counter()
                model(*inputs)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    return 1000.0 * statistics.median(times)


class OnnxModel:
    """``model`` exported with ``torch.onnx.export`` (eval mode, batch dimension dynamic) to
    ``path`` and run by ONNX Runtime on the CPU; called like the module, tensors in, tensors
    out, so :func:`latency` times it the same way. Needs the optional packages
    ``pip install onnxruntime onnx onnxscript``.

    Example:
        >>> net = nn.Linear(4, 2).eval()
        >>> onnx_net = OnnxModel(net, torch.randn(3, 4), "net.onnx")  # doctest: +SKIP
        >>> onnx_net(torch.randn(5, 4)).shape  # doctest: +SKIP
        torch.Size([5, 2])
    """

    def __init__(self, model: nn.Module, example_inputs, path: str | Path, threads: int | None = None) -> None:
        try:
            import onnxruntime
            import onnxscript  # noqa: F401  (torch.onnx.export's exporter is built on it)
        except ImportError as err:
            raise ConfigError(f"ONNX export needs the package {err.name!r}: "
                              "pip install onnxruntime onnx onnxscript") from None
        inputs = as_tuple(example_inputs)
        batch = torch.export.Dim("batch")
        was_training = model.training
        model.eval()
        try:
            torch.onnx.export(model, inputs, str(path), dynamo=True, verbose=False,
                              dynamic_shapes=tuple({0: batch} for _ in inputs))
        finally:
            model.train(was_training)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs: Tensor) -> Tensor | list[Tensor]:
        feed = {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, inputs, strict=True)}
        outputs = [torch.from_numpy(o) for o in self.session.run(None, feed)]
        return outputs[0] if len(outputs) == 1 else outputs


def profile(model: nn.Module, sample: torch.Tensor, batch_sizes=(1, 64), repeats: int = 30) -> dict:
    """Params, FLOPs (per sample) and median latency at each batch size.

    ``sample`` is one input of batch size 1; it is repeated to make each batch.
    """
    stats = count(model, sample)
    for b in batch_sizes:
        stats[f"latency_ms_b{b}"] = latency(model, sample.expand(b, *sample.shape[1:]).contiguous(), repeats)
    return stats
