"""Ask for a size: a Hugging Face decoder LM (Qwen2: grouped-query attention, gated MLP) at
half its FLOPs, in one training run, then shipped smaller.

    python examples/prune_hf_causal_lm.py              # ~10 s on 2 CPU cores
    python examples/prune_hf_causal_lm.py --epochs 1   # the smoke version the tests run

torchdam has no rule for Qwen2 by name: its attention is recognised by structure (separate
q/k/v/o projections, heads split by ``head_dim``), so its key/value heads (each with the
query heads that read it) and its MLP units are the units. The model is built from a config
with random weights (nothing is downloaded) and learns a synthetic language (each token is
the previous one plus 3, modulo the vocabulary); with a real checkpoint, replace the config
with ``from_pretrained`` and the data with yours.
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import Qwen2Config, Qwen2ForCausalLM

import torchdam as dam

VOCAB, LENGTH = 64, 16


def sequences(n: int, gen: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, VOCAB, (n, 1), generator=gen)
    return (start + 3 * torch.arange(LENGTH)) % VOCAB


def next_token_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--target-flops", type=float, default=0.5, help="fraction of the dense model's FLOPs")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=LENGTH, tie_word_embeddings=False))

    gates = dam.attach(model)  # key/value-head groups + MLP units of every block
    train = sequences(1024, gen)
    config = dam.TrainConfig(epochs=args.epochs, batch_size=32, lr=3e-3, optimizer="adam",
                             target_flops=args.target_flops, progress=False)

    def forward_fn(net, batch):  # the Trainer's loss is cross-entropy of (outputs, targets)
        (ids,) = batch
        return net(input_ids=ids[:, :-1]).logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1)

    trainer = dam.Trainer(model, config, forward_fn=forward_fn)
    trainer.fit(DataLoader(TensorDataset(train), batch_size=32, shuffle=True))

    example = {"input_ids": sequences(4, gen)}
    with torch.no_grad():
        small = dam.compact(model, example)          # dead heads and units removed, same logits
    test = sequences(256, gen)
    model.eval()
    with torch.no_grad():
        loss_gated, loss_small = next_token_loss(model, test).item(), next_token_loss(small, test).item()
    one = {"input_ids": example["input_ids"][:1]}
    before, after = dam.count(model, one), dam.count(small, one)
    reached = after["flops"] / before["flops"]
    with tempfile.TemporaryDirectory() as tmp:
        dam.save(small, tmp)
        reloaded = dam.load(tmp)                     # no pickle, no code run on load
        with torch.no_grad():
            same = torch.equal(reloaded(**example).logits, small(**example).logits)
    result = {"gates": len(gates), "widths": dam.widths(model), "loss_gated": loss_gated, "loss_compacted": loss_small,
              "params": (before["params"], after["params"]), "flops": (before["flops"], after["flops"]),
              "reached": reached, "summary": trainer.budget.summary(reached), "reload_equal": same}
    print(f"widths (live/total): {result['widths']}")
    print(f"next-token loss gated {loss_gated:.4f} -> compacted {loss_small:.4f} (chance {torch.tensor(VOCAB).log():.2f})")
    print(f"params {before['params']:,} -> {after['params']:,}; FLOPs {before['flops']:,} -> {after['flops']:,} "
          f"({reached:.1%} of dense, target {args.target_flops:.0%}); reloaded equal: {same}")
    return result


if __name__ == "__main__":
    main()
