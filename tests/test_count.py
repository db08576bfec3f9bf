import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchdam as dam
from torchdam.compact import compact
from torchdam.count import FlopCounter, count, latency, profile

aten = torch.ops.aten


def test_params_and_flops_of_a_linear_stack():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    stats = count(model, torch.randn(1, 10))
    assert stats == {"params": 10 * 20 + 20 + 20 * 5 + 5, "flops": 2 * (10 * 20 + 20 * 5)}


def test_conv_flops_scale_with_batch_and_channels():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    one = count(conv, torch.randn(1, 3, 8, 8))["flops"]
    assert one == 2 * 8 * 8 * 8 * 3 * 9
    assert count(conv, torch.randn(4, 3, 8, 8))["flops"] == 4 * one


def test_gated_model_counts_full_width_compacted_counts_what_runs():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    dam.attach(model)["0"].beta.data.fill_(-2.5)  # 20 units: j > 10 live -> 9
    x = torch.randn(1, 10)
    assert count(model, x)["params"] == 325  # beta not counted
    small = compact(model, x)
    assert count(small, x) == {"params": 10 * 9 + 9 + 9 * 5 + 5, "flops": 2 * (10 * 9 + 9 * 5)}


def test_latency_and_profile_report_positive_medians():
    model = nn.Linear(16, 4)
    assert latency(model, torch.randn(2, 16), repeats=5, warmup=1) > 0
    stats = profile(model, torch.randn(1, 16), batch_sizes=(1, 8), repeats=3)
    assert stats["latency_ms_b1"] > 0 and stats["latency_ms_b8"] > 0 and stats["params"] == 68


# Analytic FLOPs (2 per multiply-add) of the pieces of the models below.

def linear(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def attention(rows: int, q_len: int, k_len: int, width: int) -> int:
    """Scores and values of ``rows`` sequences (x heads) of ``width`` total head dims."""
    return 2 * 2 * rows * q_len * k_len * width


def layer_norm(elements: int) -> int:
    return elements * (5 + 1 + 1)  # statistics, weight, bias


def encoder_layer(lengths: list[int], d: int, ff: int) -> int:
    tokens = sum(lengths)
    return (linear(tokens, d, 3 * d) + sum(attention(1, n, n, d) for n in lengths) + linear(tokens, d, d)
            + linear(tokens, d, ff) + linear(tokens, ff, d) + 2 * layer_norm(tokens * d))


def rnn(gates: int, fan_in: int, hidden: int, layers: int, directions: int, steps: int) -> int:
    """Every step, layer and direction runs the input and hidden matmuls of every gate."""
    first = linear(steps, fan_in, gates * hidden) + linear(steps, hidden, gates * hidden)
    deeper = linear(steps, directions * hidden, gates * hidden) + linear(steps, hidden, gates * hidden)
    return directions * (first + (layers - 1) * deeper)


def ops_run(model: nn.Module, *inputs) -> set:
    """The counted ops one eval, no-grad forward runs (which path a module took)."""
    with torch.no_grad(), FlopCounter() as counter:
        model.eval()(*inputs)
    return set(counter.get_flop_counts()["Global"])


@pytest.mark.parametrize("path", ["fast", "slow"])
def test_transformer_encoder_layer_counts_attention_ffn_and_norms_on_either_path(path):
    # a non-relu/gelu activation turns the fused fast path off
    activation = F.relu if path == "fast" else F.silu
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True,
                                       activation=activation)
    x = torch.randn(2, 6, 32)
    assert (aten._transformer_encoder_layer_fwd in ops_run(layer, x)) == (path == "fast")
    assert count(layer, x)["flops"] == pytest.approx(encoder_layer([6, 6], 32, 64), rel=0.01)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_nested_fast_path_is_counted_at_the_real_lengths():
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    flops = count(encoder, {"src": torch.randn(2, 6, 32), "src_key_padding_mask": padding})["flops"]
    assert flops == pytest.approx(2 * encoder_layer([6, 4], 32, 64), rel=0.01)


def test_multihead_attention_fast_path_and_cross_attention():
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    x, memory = torch.randn(2, 6, 32), torch.randn(2, 10, 32)
    assert aten._native_multi_head_attention in ops_run(mha, x, x, x)
    self_attention = linear(12, 32, 3 * 32) + attention(2, 6, 6, 32) + linear(12, 32, 32)
    assert count(mha, (x, x, x))["flops"] == pytest.approx(self_attention, rel=0.01)
    cross = linear(12, 32, 32) + linear(20, 32, 2 * 32) + attention(2, 6, 10, 32) + linear(12, 32, 32)
    assert count(mha, (x, memory, memory))["flops"] == pytest.approx(cross, rel=0.01)


class Attend(nn.Module):
    def __init__(self, **options) -> None:
        super().__init__()
        self.options = options

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **self.options)


@pytest.mark.parametrize("options, kv_heads, v_dim", [
    ({}, 4, 8), ({"is_causal": True}, 4, 8), ({"enable_gqa": True}, 2, 8),
    ({}, 4, 12),  # a value width unlike the query's: CPU runs the math path (bmm)
])
def test_scaled_dot_product_attention_counts_scores_and_values(options, kv_heads, v_dim):
    keys = 6 if options.get("is_causal") else 10
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, kv_heads, keys, 8), torch.randn(2, kv_heads, keys, v_dim)
    expected = 2 * (2 * 4) * 6 * keys * (8 + v_dim)  # q k^T, then (6 x keys) @ v, per batch x head
    assert count(Attend(**options), (q, k, v))["flops"] == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_lstm_counts_every_gate_step_layer_and_direction(bidirectional):
    lstm = nn.LSTM(input_size=8, hidden_size=16, num_layers=2, batch_first=True, bidirectional=bidirectional)
    expected = rnn(4, 8, 16, layers=2, directions=1 + bidirectional, steps=2 * 5)
    assert count(lstm, torch.randn(2, 5, 8))["flops"] == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("kind, gates", [(nn.GRU, 3), (nn.RNN, 1)])
def test_bidirectional_gru_and_rnn_count_every_gate_step_layer_and_direction(kind, gates):
    net = kind(input_size=8, hidden_size=16, num_layers=2, batch_first=True, bidirectional=True)
    expected = rnn(gates, 8, 16, layers=2, directions=2, steps=2 * 5)
    assert count(net, torch.randn(2, 5, 8))["flops"] == pytest.approx(expected, rel=0.01)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("proj_size", [0, 4])
def test_cudnn_rnn_formula_matches_the_cpu_count(proj_size):
    # the GPU kernel cannot run here: feed its formula the arguments nn.LSTM passes aten._cudnn_rnn
    lstm = nn.LSTM(input_size=8, hidden_size=16, num_layers=2, proj_size=proj_size)
    x = torch.randn(5, 2, 8)
    formula = FlopCounter().flop_registry[aten._cudnn_rnn]
    args = (x, lstm._flat_weights, 4, None, torch.zeros(2, 2, proj_size or 16), torch.zeros(2, 2, 16), 2, 16,
            proj_size, 2, False, 0.0, False, False, [], None)
    assert formula(*args, out_val=None) == count(lstm, x)["flops"] > 0


@pytest.mark.parametrize("training, per_element", [(False, 2), (True, 5 + 2)])
def test_cudnn_batch_norm_formula_follows_the_norm_convention(training, per_element):
    bn, x = nn.BatchNorm2d(8), torch.randn(2, 8, 3, 3)
    formula = FlopCounter().flop_registry[aten.cudnn_batch_norm]
    args = (x, bn.weight, bn.bias, bn.running_mean, bn.running_var, training, 0.1, 1e-5)
    assert formula(*args, out_val=None) == per_element * x.numel()


@pytest.mark.parametrize("norm, x, per_element", [
    (nn.LayerNorm(8), torch.randn(2, 5, 8), 5 + 2),
    (nn.LayerNorm(8, elementwise_affine=False), torch.randn(2, 5, 8), 5),
    (nn.GroupNorm(2, 8), torch.randn(2, 8, 3, 3), 5 + 2),
    (nn.InstanceNorm2d(8, affine=True), torch.randn(2, 8, 3, 3), 5 + 2),
    (nn.BatchNorm2d(8), torch.randn(2, 8, 3, 3), 2),
    (nn.RMSNorm(8), torch.randn(2, 5, 8), 3 + 1),
])
def test_norms_cost_a_fixed_number_of_flops_per_element(norm, x, per_element):
    assert count(norm, x)["flops"] == per_element * x.numel()


def bert_like(impl: str):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=100, attn_implementation=impl)
    return transformers.BertModel(config)


def test_hf_bert_counts_attention_with_either_implementation():
    b, n, d, ff, layers = 2, 6, 32, 64, 2
    ids = torch.randint(0, 100, (b, n))
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, 4:] = 0
    tokens = b * n
    per_layer = 4 * linear(tokens, d, d) + linear(tokens, d, ff) + linear(tokens, ff, d) + 2 * layer_norm(tokens * d)
    without_attention = layers * per_layer + layer_norm(tokens * d) + linear(b, d, d)  # + embeddings' norm, pooler
    flops = [count(bert_like(impl), {"input_ids": ids, "attention_mask": mask})["flops"] for impl in ("eager", "sdpa")]
    assert flops[1] == pytest.approx(flops[0], rel=0.01)
    for f in flops:
        assert f - without_attention == pytest.approx(layers * attention(b, n, n, d), rel=0.01)


def test_hf_gpt2_conv1d_and_attention_are_counted():
    transformers = pytest.importorskip("transformers")
    b, n, d, layers = 2, 6, 32, 2
    tokens = b * n
    per_layer = (linear(tokens, d, 3 * d) + linear(tokens, d, d) + linear(tokens, d, 4 * d) + linear(tokens, 4 * d, d)
                 + attention(b, n, n, d) + 2 * layer_norm(tokens * d))
    expected = layers * per_layer + layer_norm(tokens * d)  # + the final norm
    ids = torch.randint(0, 100, (b, n))
    for impl in ("eager", "sdpa"):
        config = transformers.GPT2Config(n_embd=d, n_layer=layers, n_head=4, vocab_size=100, n_positions=16,
                                         bos_token_id=0, eos_token_id=0, attn_implementation=impl)
        assert count(transformers.GPT2Model(config), {"input_ids": ids})["flops"] == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode, torch.enable_grad])
def test_count_is_the_same_under_any_grad_mode(context):
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    lstm = nn.LSTM(input_size=8, hidden_size=16, batch_first=True)
    with context():
        x, seq = torch.randn(2, 6, 32), torch.randn(2, 5, 8)
        assert count(layer, x)["flops"] == pytest.approx(encoder_layer([6, 6], 32, 64), rel=0.01)
        assert count(lstm, seq)["flops"] == rnn(4, 8, 16, layers=1, directions=1, steps=10)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(5, 3)

    def forward(self, x, y=None):
        return self.a(x) if y is None else self.a(x) + self.b(y)


def test_inputs_as_a_tensor_a_tuple_or_keywords():
    model = TwoInputs().train()
    x, y = torch.randn(2, 4), torch.randn(2, 5)
    both = linear(2, 4, 3) + linear(2, 5, 3)
    assert count(model, x)["flops"] == linear(2, 4, 3)
    assert count(model, (x, y))["flops"] == count(model, [x, y])["flops"] == both
    assert count(model, {"y": y, "x": x})["flops"] == both
    assert model.training
