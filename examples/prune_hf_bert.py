"""Prune a Hugging Face BERT classifier with DAM: heads and FFN units, then ship it smaller.

    python examples/prune_hf_bert.py            # ~1 minute on 2 CPU cores
    python examples/prune_hf_bert.py --steps 20 # the smoke version the tests run

The model is built from a config with random weights (nothing is downloaded) and trained on
a synthetic task (is token 7 in the sequence?), so the example runs anywhere; with a real
checkpoint, replace the config with ``from_pretrained`` and the data with yours.
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification

import torchdam as dam


def synthetic_batch(n: int, length: int = 16, vocab: int = 64) -> dict[str, torch.Tensor]:
    ids = torch.randint(8, vocab, (n, length))
    labels = torch.randint(0, 2, (n,))
    ids[labels == 1, torch.randint(0, length, (int(labels.sum()),))] = 7
    return {"input_ids": ids, "labels": labels}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--beta-lr", type=float, default=0.008, help="with Adam this, not lam, sets how fast units die")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(config)

    gates = dam.attach(model)  # attention heads + FFN units of every block (and the pooler)
    opt = torch.optim.AdamW(dam.dam_param_groups(model, lr=1e-3, beta_lr=args.beta_lr))
    policy = dam.DAMPolicy(lam=args.lam)
    model.train()
    for step in range(args.steps):
        batch = synthetic_batch(32)
        loss = model(**batch).loss + policy.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()

    example = {"input_ids": synthetic_batch(8)["input_ids"]}
    with torch.no_grad():
        small = dam.compact(model, example)           # physically smaller, same logits
    test = synthetic_batch(512)
    with torch.no_grad():
        model.eval()
        gated_acc = (model(input_ids=test["input_ids"]).logits.argmax(1) == test["labels"]).float().mean().item()
        small_acc = (small(input_ids=test["input_ids"]).logits.argmax(1) == test["labels"]).float().mean().item()
    before, after = dam.count(model, example), dam.count(small, example)
    with tempfile.TemporaryDirectory() as tmp:
        dam.save(small, tmp)
        reloaded = dam.load(tmp)                      # no pickle, no code run on load
        with torch.no_grad():
            same = torch.equal(reloaded(**example).logits, small(**example).logits)
    result = {"gates": len(gates), "widths": dam.widths(model), "accuracy_gated": gated_acc,
              "accuracy_compacted": small_acc, "params": (before["params"], after["params"]),
              "flops": (before["flops"], after["flops"]), "reload_equal": same}
    print(f"widths (live/total): {result['widths']}")
    print(f"accuracy gated {gated_acc:.3f} -> compacted {small_acc:.3f}")
    print(f"params {before['params']:,} -> {after['params']:,}; FLOPs {before['flops']:,} -> {after['flops']:,} "
          f"({before['flops'] / after['flops']:.2f}x fewer); reloaded equal: {same}")
    return result


if __name__ == "__main__":
    main()
