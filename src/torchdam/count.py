"""Count what actually runs: parameters, FLOPs (by the ops executed) and latency.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which sees every aten op that
really executes; :class:`FlopCounter` adds formulas for the ops torch does not count
(attention kernels, the fused multi-head-attention and encoder-layer fast paths, fused RNN
layers, norms), so a gated model is counted at full width (its gates skip nothing) and a
compacted one at its real width.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from torchdam.attach import unwrap
from torchdam.calling import as_tuple
from torchdam.errors import ConfigError
from torchdam.gates import DAMGate

aten = torch.ops.aten
Shape = Sequence[int]

#: FLOPs per element of a norm that computes statistics from its input (LayerNorm, GroupNorm,
#: InstanceNorm, BatchNorm in training): mean (1), centre (1), square and sum (2), scale by the
#: inverse std (1). RMSNorm skips the mean and the centring.
STATS_NORM_FLOPS = 5
RMS_NORM_FLOPS = 3
#: FLOPs per element of a BatchNorm on running statistics: one multiply-add once the statistics
#: and the affine are folded into a scale and a shift.
RUNNING_NORM_FLOPS = 2
#: FLOPs per element of each affine tensor (weight, bias) of a statistics norm.
AFFINE_FLOPS = 1


def _linear(tokens: int, weight: Shape) -> int:
    """``tokens`` rows through a ``(out, in)`` weight, 2 FLOPs per multiply-add."""
    return 2 * tokens * weight[0] * weight[1]


def _attention(queries: int, keys: int, qk_dim: int, v_dim: int) -> int:
    """Scores ``q k^T`` and their product with ``v`` for ``queries`` query rows (all heads);
    masked entries (causal, padding) are counted: dense kernels compute them."""
    return 2 * queries * keys * (qk_dim + v_dim)


def _norm(elements: int, per_element: int, *affine: Shape | None) -> int:
    return elements * (per_element + AFFINE_FLOPS * sum(a is not None for a in affine))


def _sequence_lengths(x: Tensor) -> list[int]:
    """Lengths of the sequences in a ``(..., length, features)`` input; a nested tensor's
    real lengths (the fast paths drop padding by nesting)."""
    if x.is_nested:
        return x._nested_tensor_size()[:, 0].tolist()
    return [x.shape[-2]] * math.prod(x.shape[:-2])


def _multi_head_attention(q_lengths: list[int], kv_lengths: list[int], num_heads: int,
                          qkv_weight: Shape, proj_weight: Shape) -> int:
    """Input projections (a packed ``(3 E, E_in)`` weight), attention of every head, and the
    output projection."""
    embed = qkv_weight[0] // 3
    queries, keys = sum(q_lengths), sum(kv_lengths)
    head = embed // num_heads
    return (_linear(queries, (embed, qkv_weight[1])) + 2 * _linear(keys, (embed, qkv_weight[1]))
            + sum(_attention(lq * num_heads, lk, head, head) for lq, lk in zip(q_lengths, kv_lengths, strict=True))
            + _linear(queries, proj_weight))


# Formulas for FlopCounterMode's ``custom_mapping``: each receives the op's arguments as the
# dispatcher passes them, as shapes, or as tensors where marked ``_raw`` (nested inputs have no
# shape).

def _raw(formula: Callable[..., int]) -> Callable[..., int]:
    formula._get_raw = True  # type: ignore[attr-defined]  (FlopCounterMode's flag: pass tensors)
    return formula


def _sdpa_flop(query: Shape, key: Shape, value: Shape, *args, out_shape=None, **kwargs) -> int:
    """Any SDPA kernel: ``(..., L, E)`` queries, ``(..., S, E)`` keys, ``(..., S, Ev)`` values;
    grouped keys (fewer heads) are shared by the query heads, so the count is by query rows."""
    return _attention(math.prod(query[:-1]), key[-2], query[-1], value[-1])


@_raw
def _native_mha_flop(query: Tensor, key: Tensor, value: Tensor, embed_dim: int, num_head: int,
                     qkv_weight: Tensor, qkv_bias: Tensor, proj_weight: Tensor, *args, out_val=None, **kwargs) -> int:
    """``nn.MultiheadAttention``'s fast path (``aten._native_multi_head_attention``)."""
    return _multi_head_attention(_sequence_lengths(query), _sequence_lengths(key), num_head,
                                 qkv_weight.shape, proj_weight.shape)


@_raw
def _encoder_layer_flop(src: Tensor, embed_dim: int, num_heads: int, qkv_weight: Tensor, qkv_bias: Tensor,
                        proj_weight: Tensor, proj_bias: Tensor, use_gelu: bool, norm_first: bool, eps: float,
                        norm_weight_1: Tensor, norm_bias_1: Tensor, norm_weight_2: Tensor, norm_bias_2: Tensor,
                        ffn_weight_1: Tensor, ffn_bias_1: Tensor, ffn_weight_2: Tensor, *args,
                        out_val=None, **kwargs) -> int:
    """``nn.TransformerEncoderLayer``'s fast path (``aten._transformer_encoder_layer_fwd``):
    self-attention, two LayerNorms and the two feed-forward linears."""
    lengths = _sequence_lengths(src)
    tokens = sum(lengths)
    norm = _norm(tokens * embed_dim, STATS_NORM_FLOPS, norm_weight_1, norm_bias_1)
    norm += _norm(tokens * embed_dim, STATS_NORM_FLOPS, norm_weight_2, norm_bias_2)
    return (_multi_head_attention(lengths, lengths, num_heads, qkv_weight.shape, proj_weight.shape)
            + _linear(tokens, ffn_weight_1.shape) + _linear(tokens, ffn_weight_2.shape) + norm)


def _rnn_layer_flop(input: Shape, weight0: Shape, weight1: Shape, *args, out_shape=None, **kwargs) -> int:
    """``aten.mkldnn_rnn_layer`` (CPU LSTM): one layer and direction; every time step runs the
    input ``(gates * H, I)`` and hidden ``(gates * H, H)`` matmuls."""
    steps = math.prod(input[:-1])
    return _linear(steps, weight0) + _linear(steps, weight1)


def _fused_rnn_flop(input: Shape, weight: Sequence[Shape], *args, out_shape=None, **kwargs) -> int:
    """``aten._cudnn_rnn`` / ``aten.miopen_rnn``: every layer and direction; each 2-D weight
    (input, hidden, projection) is applied once per time step of each sequence (a packed
    input's rows are its time steps)."""
    steps = math.prod(input[:-1])
    return sum(_linear(steps, w) for w in weight if len(w) == 2)


def _layer_norm_flop(input: Shape, normalized_shape: Shape, weight: Shape | None, bias: Shape | None,
                     *args, out_shape=None, **kwargs) -> int:
    return _norm(math.prod(input), STATS_NORM_FLOPS, weight, bias)


def _group_norm_flop(input: Shape, weight: Shape | None, bias: Shape | None, *args, out_shape=None, **kwargs) -> int:
    return _norm(math.prod(input), STATS_NORM_FLOPS, weight, bias)


def _batch_norm_flop(input: Shape, weight: Shape | None, bias: Shape | None, *args, out_shape=None, **kwargs) -> int:
    """Batch norms whose schema ends ``training, momentum, eps``: batch statistics when
    training (InstanceNorm too), folded running statistics otherwise."""
    if args[-3]:
        return _norm(math.prod(input), STATS_NORM_FLOPS, weight, bias)
    return math.prod(input) * RUNNING_NORM_FLOPS


def _running_batch_norm_flop(input: Shape, *args, out_shape=None, **kwargs) -> int:
    """Eval BatchNorm (``aten._native_batch_norm_legit_no_training``)."""
    return math.prod(input) * RUNNING_NORM_FLOPS


def _rms_norm_flop(input: Shape, normalized_shape: Shape, weight: Shape | None = None, eps: float | None = None,
                   *, out_shape=None) -> int:
    return _norm(math.prod(input), RMS_NORM_FLOPS, weight)


#: Formulas for the ops ``FlopCounterMode`` leaves at 0, keyed by op packet as it looks them up
#: (``aten.rms_norm`` never reaches it: :class:`FlopCounter` counts it from a module hook).
FLOP_FORMULAS: dict = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flop,
    aten._scaled_dot_product_fused_attention_overrideable: _sdpa_flop,
    aten._native_multi_head_attention: _native_mha_flop,
    aten._transformer_encoder_layer_fwd: _encoder_layer_flop,
    aten.mkldnn_rnn_layer: _rnn_layer_flop,
    aten._cudnn_rnn: _fused_rnn_flop,
    aten.miopen_rnn: _fused_rnn_flop,
    aten.native_layer_norm: _layer_norm_flop,
    aten.native_group_norm: _group_norm_flop,
    aten._native_batch_norm_legit: _batch_norm_flop,
    aten.cudnn_batch_norm: _batch_norm_flop,
    aten.miopen_batch_norm: _batch_norm_flop,
    aten._native_batch_norm_legit_no_training: _running_batch_norm_flop,
    aten.rms_norm: _rms_norm_flop,
}


class FlopCounter(FlopCounterMode):
    """``FlopCounterMode`` with :data:`FLOP_FORMULAS`; its ``get_flop_counts()`` breaks down
    what :func:`count` totals, by module and op.

    ``nn.RMSNorm`` is counted by a forward hook: its op is CompositeImplicitAutograd, so it
    reaches a dispatch mode only as elementwise ops (and a ``TorchFunctionMode``, which would
    see ``F.rms_norm``, turns off the attention fast paths).
    """

    def __init__(self) -> None:
        super().__init__(display=False, custom_mapping=FLOP_FORMULAS)
        self._rms_hook: torch.utils.hooks.RemovableHandle | None = None

    def __enter__(self) -> FlopCounter:  # noqa: PYI034  (typing.Self needs Python 3.11)
        # registered before the module tracker's hooks, so it runs while the norm is a parent
        self._rms_hook = nn.modules.module.register_module_forward_hook(self._count_rms_norm)
        super().__enter__()
        return self

    def __exit__(self, *args) -> bool | None:
        self._rms_hook.remove()
        return super().__exit__(*args)

    def _count_rms_norm(self, module: nn.Module, inputs: tuple, output) -> None:
        if isinstance(module, nn.RMSNorm):
            self._count_flops(aten.rms_norm, output, (inputs[0], module.normalized_shape, module.weight), {})


def _forward(model: Callable, example_inputs):
    """``model(**inputs)`` for a mapping (keyword inputs, as HF models take), else
    ``model(*inputs)`` for a tuple or list, else ``model(inputs)``."""
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    return model(*as_tuple(example_inputs))


def count(model: nn.Module, example_inputs) -> dict[str, int]:
    """``{"params": int, "flops": int}`` for one eval-mode, no-grad forward of ``model`` on
    ``example_inputs`` (a tensor, a tuple/list of positional inputs, or a dict of keyword inputs).

    FLOPs are those of the ops that run, 2 per multiply-add: linears and convolutions; attention
    score and value products (every SDPA kernel, the fused ``nn.MultiheadAttention`` and
    ``nn.TransformerEncoderLayer`` fast paths; causal and padding masks counted at full size,
    except padding a nested-tensor fast path drops); RNN, LSTM and GRU input and hidden matmuls
    of every gate, time step, layer and direction; and norms per element: 5 for LayerNorm,
    GroupNorm, InstanceNorm, 3 for ``nn.RMSNorm``, each plus 1 per affine weight and 1 per bias,
    and 2 for an eval BatchNorm. Elementwise ops (activations, softmax, residual adds, biases,
    hand-written norms such as HF Llama's RMSNorm) are not counted. A gated model is counted
    at full width: its gates skip nothing. Params exclude DAM gates' betas (one scalar per gated layer, training-only
    state).

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
        with torch.no_grad(), FlopCounter() as counter:
            _forward(model, example_inputs)
    finally:
        model.train(was_training)
    return {"params": int(params), "flops": int(counter.get_total_flops())}


def latency(model: nn.Module | OnnxModel, example_inputs, repeats: int = 30, warmup: int = 5) -> float:
    """Median wall time of one eval-mode forward, in milliseconds (an :class:`OnnxModel` too);
    ``example_inputs`` as for :func:`count`."""
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    times = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                start = time.perf_counter()
                _forward(model, example_inputs)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    return 1000.0 * statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], blocks: int, seconds: float) -> dict[str, list[float]]:
    """Seconds per call of each function in ``blocks`` blocks of about ``seconds`` each,
    the order alternating between blocks, so that load on a shared machine hits both sides
    of every pair alike (timing one model after the other does not)."""
    calls = {}
    for name, fn in fns.items():
        fn()  # warm-up
        start = time.perf_counter()
        fn()
        calls[name] = max(1, round(seconds / max(time.perf_counter() - start, 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for b in range(blocks):
        for name in names if b % 2 == 0 else names[::-1]:
            fn, n = fns[name], calls[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - start) / n)
    return times


def paired_latency(dense: nn.Module, small: nn.Module, sample: torch.Tensor, batch_sizes=(1, 64),
                   blocks: int = 30, seconds: float = 0.01) -> tuple[dict, dict, dict]:
    """Median ms per forward of ``dense`` and ``small`` at each batch size, timed in
    interleaved pairs of blocks, and the speed-up: the median of the per-pair ratios with
    their quartiles (the spread)."""
    before, after, speedup = {}, {}, {}
    dense.eval(), small.eval()
    for b in batch_sizes:
        x = sample.expand(b, *sample.shape[1:]).contiguous()
        with torch.inference_mode():
            times = interleaved({"dense": lambda: dense(x), "small": lambda: small(x)}, blocks, seconds)
        ratios = sorted(d / s for d, s in zip(times["dense"], times["small"], strict=True))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        before[f"latency_ms_b{b}"] = 1000.0 * statistics.median(times["dense"])
        after[f"latency_ms_b{b}"] = 1000.0 * statistics.median(times["small"])
        speedup[f"b{b}"] = {"median": statistics.median(ratios), "p25": q[0], "p75": q[2], "pairs": len(ratios)}
    return before, after, speedup


class _KeywordCall(nn.Module):
    """``model(**dict(zip(names, inputs)), **constants)``: tensor keyword inputs passed
    positionally (for tracing), non-tensor ones fixed."""

    def __init__(self, model: nn.Module, kwargs: dict) -> None:
        super().__init__()
        self.model = model
        self.names = [k for k, v in kwargs.items() if isinstance(v, Tensor)]
        self.constants = {k: v for k, v in kwargs.items() if not isinstance(v, Tensor)}

    def forward(self, *inputs: Tensor):
        return self.model(**dict(zip(self.names, inputs, strict=True)), **self.constants)


class OnnxModel:
    """``model`` exported with ``torch.onnx.export`` (eval mode, batch dimension dynamic) to
    ``path`` and run by ONNX Runtime on the CPU; called like the module, tensors in, tensors
    out, so :func:`latency` times it the same way. Needs the optional packages
    ``pip install onnxruntime onnx onnxscript``.

    ``example_inputs`` as for :func:`count`: a tensor, a tuple/list of positional inputs, or a
    dict of keyword inputs (Hugging Face style, ``{"input_ids": ...}``); non-tensor keyword
    values (``use_cache=False``) are fixed at export. Call the result the same way:
    ``onnx_model(x)``, ``onnx_model(users, items)`` or ``onnx_model(input_ids=ids)``.
    ``dynamo=False`` uses torch's older TorchScript exporter (deprecated by torch, but some
    30x faster on small models) instead of the ``torch.export`` based one.

    Example:
        >>> net = nn.Linear(4, 2).eval()
        >>> onnx_net = OnnxModel(net, torch.randn(3, 4), "net.onnx")  # doctest: +SKIP
        >>> onnx_net(torch.randn(5, 4)).shape  # doctest: +SKIP
        torch.Size([5, 2])
    """

    def __init__(self, model: nn.Module, example_inputs, path: str | Path, threads: int | None = None,
                 dynamo: bool = True) -> None:
        try:
            import onnxruntime
            import onnxscript  # noqa: F401  (torch.onnx.export's exporter is built on it)
        except ImportError as err:
            raise ConfigError(f"ONNX export needs the package {err.name!r}: "
                              "pip install onnxruntime onnx onnxscript") from None
        if isinstance(example_inputs, Mapping):
            # keyword inputs go in positionally: the TorchScript exporter would bind them to the
            # whole signature (defaults too, HF's logits_to_keep=0 becoming an input), and
            # non-tensor values (use_cache=False) are fixed at export
            traced: nn.Module = _KeywordCall(model, dict(example_inputs))
            inputs, names = tuple(example_inputs[k] for k in traced.names), traced.names
        else:
            traced, inputs = model, as_tuple(example_inputs)
            names = None if dynamo else [f"input_{i}" for i in range(len(inputs))]
        was_training = model.training
        traced.eval()
        try:
            if dynamo:
                batch = torch.export.Dim("batch")
                shapes = torch.export.ShapesCollection()
                for t in inputs:
                    shapes[t] = {0: batch}
                torch.onnx.export(traced, inputs, str(path), dynamo=True, verbose=False, input_names=names,
                                  dynamic_shapes=shapes.dynamic_shapes(traced, inputs))
            else:
                torch.onnx.export(traced, inputs, str(path), dynamo=False, input_names=names,
                                  dynamic_axes={n: {0: "batch"} for n in names})
        finally:
            model.train(was_training)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs: Tensor, **keyword_inputs: Tensor) -> Tensor | list[Tensor]:
        tensors = dict(zip(self.input_names, inputs))
        tensors.update((k, v) for k, v in keyword_inputs.items() if isinstance(v, Tensor))
        if len(inputs) > len(self.input_names) or sorted(tensors) != sorted(self.input_names):
            raise ConfigError(f"OnnxModel: the exported model takes the inputs {self.input_names}; "
                              f"got {len(inputs)} positional and the keywords {sorted(keyword_inputs)}")
        feed = {name: t.detach().cpu().numpy() for name, t in tensors.items()}
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
