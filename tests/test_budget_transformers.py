"""Budgets on transformers (torchdam.budget with head and FFN gates): the width model equals
``count(compact(model))`` on HF BERT, ViT, GPT-2, Llama (GQA) and torch-native
``nn.TransformerEncoder`` / ``nn.MultiheadAttention`` models; short runs reach 1/2, 1/3 and
1/5 of the dense FLOPs within +-3% (never above) with compacted outputs equal to the gated
model's; a target below the floor (the residual stream keeps its width) is said in one
line; what the width model cannot price is refused at bind.

Tiny models (hidden 32, 2 layers, 4 heads, sequence 8) built from configs with random
weights (the zoo's builders, ``tests/test_zoo_transformers.py``)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchdam as dam
from torchdam.budget import TOLERANCE, Budget, WidthModel, _beta_for, live_counts
from torchdam.errors import AttachError, ConfigError
from torchdam.models import build_model
from torchdam.train import TrainConfig, Trainer

# the zoo's builders (importing it skips this module when transformers is not installed)
from test_zoo_transformers import FFN, HEADS, HIDDEN, SEQ, VOCAB, MHANet, bert, gpt2, llama, vit
from tiny_task import one_thread  # noqa: F401  (autouse fixture: one thread)

TARGETS = [1 / 2, 1 / 3, 1 / 5]


class EncoderNet(nn.Module):
    """``nn.TransformerEncoder`` (batch_first) between a linear embedding and a classifier."""

    def __init__(self, norm_first: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(8, HIDDEN)
        layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, dim_feedforward=FFN, dropout=0.0, batch_first=True,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=not norm_first)
        self.head = nn.Linear(HIDDEN, 5)

    def forward(self, x, padding=None):
        return self.head(self.encoder(self.embed(x), src_key_padding_mask=padding).mean(1))


class AttentionNet(nn.Module):
    """One ``nn.MultiheadAttention`` (self-attention, or cross-attention over ``kdim``-wide
    keys and values: separate q/k/v weights) and a classifier."""

    def __init__(self, kdim: int | None = None, **mha) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True, kdim=kdim, vdim=kdim, **mha)
        self.head = nn.Linear(HIDDEN, 5)

    def forward(self, q, kv=None):
        kv = q if kv is None else kv
        return self.head(self.attn(q, kv, kv, need_weights=False)[0].mean(1))


def _ids(batch, gen):
    return {"input_ids": torch.randint(0, VOCAB, (batch, SEQ), generator=gen)}


def _padded_ids(batch, gen):
    inputs = _ids(batch, gen)
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    mask[0, -2:] = 0
    return {**inputs, "attention_mask": mask}


def _padded_sequence(batch, gen):
    padding = torch.zeros(batch, SEQ, dtype=torch.bool)
    padding[0, -3:] = True
    return (torch.randn(batch, SEQ, 8, generator=gen), padding)


#: name -> (build, inputs(batch, generator)): a tensor, a tuple or a dict of keyword inputs
MODELS = {
    "bert": (lambda: bert("sdpa"), _padded_ids),
    "bert_eager": (lambda: bert("eager"), _ids),
    "vit": (lambda: vit("sdpa"), lambda b, g: {"pixel_values": torch.randn(b, 3, 32, 32, generator=g)}),
    "gpt2": (lambda: gpt2("sdpa"), _ids),
    "llama_gqa": (lambda: llama("sdpa"), _ids),
    "encoder": (EncoderNet, _padded_sequence),
    "encoder_norm_first": (lambda: EncoderNet(norm_first=True), lambda b, g: torch.randn(b, SEQ, 8, generator=g)),
    "mha_blocks": (MHANet, lambda b, g: torch.randn(b, SEQ, 8, generator=g)),
    "mha": (AttentionNet, lambda b, g: torch.randn(b, SEQ, HIDDEN, generator=g)),
    "mha_cross_kdim": (lambda: AttentionNet(kdim=12),
                       lambda b, g: (torch.randn(b, SEQ, HIDDEN, generator=g), torch.randn(b, 5, 12, generator=g))),
    "vit_tiny_cli": (lambda: build_model("vit-tiny", in_channels=3, num_classes=4, image_size=16),
                     lambda b, g: torch.randn(b, 3, 16, 16, generator=g)),  # torchdam prune's transformer
}


def first(inputs, n=1):
    if isinstance(inputs, dict):
        return {k: v[:n] for k, v in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(t[:n] for t in inputs)
    return inputs[:n]


def outputs(model, inputs):
    model.eval()
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs) if isinstance(inputs, tuple) \
            else model(inputs)
    return out.logits if hasattr(out, "logits") else out


# ------------------------------------------------------------------ the width model


@pytest.mark.parametrize("name", list(MODELS))
def test_width_model_equals_count_of_the_compacted_transformer(name):
    build, make_inputs = MODELS[name]
    torch.manual_seed(0)
    model = build()
    gates = dam.attach(model)
    gen = torch.Generator().manual_seed(0)
    x = make_inputs(2, gen)
    one = first(x)
    wm = WidthModel(model, x)
    assert wm.dense == dam.count(model, one)
    heads = [n for n in gates if type(model.get_submodule(n)) in dam.attention.attention_types()]
    assert heads, "the model has head gates"
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        for gate in gates.values():  # every gate at a chosen live count, 1 .. n
            gate.beta.data.fill_(_beta_for(gate, int(torch.randint(1, gate.n + 1, (), generator=g))))
        gates[heads[0]].beta.data.fill_(_beta_for(gates[heads[0]], 1 + seed % gates[heads[0]].n))
        live = live_counts(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            real = dam.count(dam.compact(model, x), one)
        for metric in ("flops", "params"):
            said = float(wm.cost(live, metric))
            assert abs(said - real[metric]) < 0.5, (name, seed, metric, live.tolist(), said, real[metric])


def test_a_head_gate_prices_its_heads_from_attention_cuts():
    """One live head of BERT's four: q/k/v rows and output columns of 3 heads go, and the
    attention scores shrink with them (per sample: 2 FLOPs per multiply-add)."""
    torch.manual_seed(0)
    model = bert("sdpa")
    gates = dam.attach(model)
    wm = WidthModel(model, _ids(1, None))
    name = "bert.encoder.layer.0.attention"
    live = torch.tensor([float(g.n) for g in gates.values()], dtype=torch.float64)
    grad = wm.marginal(live)[list(gates).index(name)]
    d = HIDDEN // HEADS
    projections = 4 * 2 * SEQ * HIDDEN * d  # q, k, v outputs and the output projection's inputs
    scores = 2 * SEQ * SEQ * (d + d)  # q k^T and the product with v, one head
    assert float(grad) == projections + scores


# ------------------------------------------------------------------ targets reached


def _token_task(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    scores = torch.randn(VOCAB, 3, generator=g)
    return ids, scores[ids].sum(1).argmax(-1)  # a labelling the model can learn


def _sequence_task(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, SEQ, 8, generator=g)
    return x, (x.mean(1) @ torch.randn(8, 5, generator=g)).argmax(-1)


def _train(model, x, y, budget, wrap, steps=40, batch=16):
    """The documented user loop: no DAM term in the loss, budget.step() after opt.step()."""
    budget.bind(model, wrap(x[:1]), total_steps=steps)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        out = model(**wrap(x[idx])) if isinstance(wrap(x[:1]), dict) else model(x[idx])
        loss = F.cross_entropy(out.logits if hasattr(out, "logits") else out, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        budget.step()
    return budget


def reached(model, inputs, one, metric="flops"):
    small = dam.compact(model, inputs)
    return dam.count(small, one)[metric] / dam.count(model, one)[metric], small


@pytest.mark.parametrize("name", ["bert", "encoder"])
@pytest.mark.parametrize("target", TARGETS, ids=["1/2", "1/3", "1/5"])
def test_budget_reaches_the_flops_target_on_a_transformer(name, target):
    torch.manual_seed(0)
    if name == "bert":
        model, (x, y) = bert("sdpa"), _token_task()

        def wrap(t):
            return {"input_ids": t}
    else:
        model, (x, y) = EncoderNet(), _sequence_task()

        def wrap(t):
            return t
    dam.attach(model)
    budget = _train(model, x, y, Budget(flops=target), wrap)
    got, small = reached(model, wrap(x[:4]), wrap(x[:1]))
    assert 1 - TOLERANCE <= got / target <= 1 + TOLERANCE, (name, target, got, dam.widths(model))
    assert budget.summary(got)["ok"] and budget.message(got) is None
    assert budget.current() == pytest.approx(got)  # the width model's figure is the compacted one
    assert any(a < t for n, (a, t) in dam.widths(model).items() if "attention" in n or "self_attn" in n)
    fresh = wrap(x[-8:])
    ref, out = outputs(model, fresh), outputs(small, fresh)
    assert (ref - out).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_round_to_rounds_ffn_units_but_not_heads():
    """A head is already head_dim channels: round_to applies to the FFN units only, so a
    model with fewer heads than round_to still loses heads."""
    torch.manual_seed(0)
    model, (x, y) = EncoderNet(), _sequence_task()
    dam.attach(model)
    budget = _train(model, x, y, Budget(flops=1 / 3, round_to=8), lambda t: t)
    got, _ = reached(model, x[:4], x[:1])
    assert got <= (1 / 3) * (1 + TOLERANCE) and budget.frozen
    widths = dam.widths(model)
    heads = {n: w for n, w in widths.items() if "self_attn" in n}
    ffn = {n: w for n, w in widths.items() if "self_attn" not in n}
    assert heads and ffn and HEADS < 8
    assert all(a % 8 == 0 or a == t for a, t in ffn.values()), ffn
    assert any(a < t for a, t in heads.values()), heads


def test_trainer_with_keyword_inputs_reaches_a_target_on_bert():
    """``Trainer`` binds the budget to the inputs ``forward_fn`` passes, keywords included."""
    torch.manual_seed(0)
    model = bert("sdpa")
    dam.attach(model)
    ids, labels = _token_task()

    def forward_fn(net, batch):
        x, y = batch
        return net(input_ids=x).logits, y

    trainer = Trainer(model, TrainConfig(epochs=2, batch_size=16, lr=1e-3, progress=False, target_flops=1 / 3),
                      forward_fn=forward_fn)
    trainer.fit(DataLoader(TensorDataset(ids, labels), batch_size=16, shuffle=True))
    got, _ = reached(model, {"input_ids": ids[:4]}, {"input_ids": ids[:1]})
    assert 1 - TOLERANCE <= got * 3 <= 1 + TOLERANCE, (got, dam.widths(model))
    assert trainer.budget.summary(got)["ok"]


def test_trainer_refuses_mixed_positional_and_keyword_inputs_in_one_line():
    torch.manual_seed(0)
    model = EncoderNet()
    dam.attach(model)
    x, y = _sequence_task(32)

    def forward_fn(net, batch):
        return net(batch[0], padding=None), batch[1]

    trainer = Trainer(model, TrainConfig(epochs=1, batch_size=16, progress=False, target_flops=0.5),
                      forward_fn=forward_fn)
    with pytest.raises(ConfigError, match="positional inputs only or keyword") as info:
        trainer.fit(DataLoader(TensorDataset(x, y), batch_size=16))
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ floors and refusals


@pytest.mark.parametrize("name", ["bert", "vit", "gpt2", "llama_gqa", "encoder", "mha_blocks"])
def test_a_target_below_the_floor_is_said_in_one_line(name):
    """The residual stream keeps its width: embeddings, norms, stream writers and one unit
    per gate stay, so a target below that floor cannot be reached, and the run says so."""
    build, make_inputs = MODELS[name]
    torch.manual_seed(0)
    model = build()
    dam.attach(model)
    x = make_inputs(1, torch.Generator().manual_seed(0))
    probe = Budget(flops=0.5).bind(model, x, total_steps=10)
    floor = probe.floor
    assert 0.05 < floor < 0.5, floor
    budget = Budget(flops=floor * 0.8).bind(model, x, total_steps=4)
    for _ in range(4):
        budget.step()
    assert budget.frozen and budget.unreachable
    got = float(budget.width_model.relative(live_counts(model)))
    assert got == pytest.approx(floor)  # every gate at one unit: as small as it gets
    message = budget.message(got)
    assert "\n" not in message and "target not reached" in message and f"{100 * floor:.1f}%" in message


def test_heads_compact_cannot_remove_are_refused_at_bind_naming_the_layer():
    torch.manual_seed(0)
    model = AttentionNet(add_bias_kv=True)
    dam.attach(model)
    with pytest.raises(AttachError, match="'attn'.*add_bias_kv") as info:
        Budget(flops=0.5).bind(model, torch.randn(1, SEQ, HIDDEN), total_steps=10)
    assert "\n" not in str(info.value)


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True)
        self.unused = nn.Linear(HIDDEN, 16)
        self.head = nn.Linear(HIDDEN, 5)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def test_a_gated_layer_the_inputs_do_not_reach_is_priced_whole_as_compact_keeps_it():
    torch.manual_seed(0)
    model = TwoBranches()
    dam.attach(model, layers=(nn.MultiheadAttention, "unused"))
    x = torch.randn(1, SEQ, HIDDEN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # compact's warning that 'unused' keeps its units
        wm = WidthModel(model, x)
        unused = wm.names.index("unused")
        for live in (16, 3):
            counts = torch.tensor([2.0, 2.0], dtype=torch.float64)
            counts[unused] = live
            with torch.no_grad():
                for i, (_, g) in enumerate(dam.named_gates(model)):
                    g.beta.fill_(_beta_for(g, int(counts[i])))
                small = dam.compact(model, x)
                real = dam.count(small, x)
            assert small.unused.out_features == 16
            for metric in ("flops", "params"):
                assert float(wm.cost(counts, metric)) == pytest.approx(real[metric], rel=1e-9), (live, metric)
