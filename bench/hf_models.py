"""Whole Hugging Face MoE models: eager transformers vs moec's `ort` artifact.

Two 2-layer models at realistic layer sizes (hidden 1024, vocab 32000), random weights, fp32,
2 threads: Mixtral-like (8 experts of 3584, top-2) and Qwen2-MoE-like (60 experts of 704, top-4,
a sigmoid-gated shared expert of 2816). Eager transformers runs with its default experts
implementation. For T = 16 and 512 tokens (batch 1) the artifact's logits are first checked
against eager (relative L2), then both are timed: median of --repeat runs after warm-up.

    python bench/hf_models.py [--tokens 16 512] [--repeat 7]
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import moec
from moec.timing import median_ms

THREADS = 2
COMMON = dict(
    vocab_size=32000,
    hidden_size=1024,
    num_hidden_layers=2,
    num_attention_heads=16,
    num_key_value_heads=4,
    max_position_embeddings=1024,
)


def mixtral_like():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        **COMMON, intermediate_size=3584, num_local_experts=8, num_experts_per_tok=2
    )
    return MixtralForCausalLM(config)


def qwen2_moe_like():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        **COMMON,
        intermediate_size=2816,
        moe_intermediate_size=704,
        shared_expert_intermediate_size=2816,
        num_experts=60,
        num_experts_per_tok=4,
    )
    return Qwen2MoeForCausalLM(config)


MODELS = {"mixtral-like": mixtral_like, "qwen2-moe-like": qwen2_moe_like}


def bench_model(name: str, tokens: list[int], repeat: int, workdir: Path) -> list[dict]:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    implementation = model.config._experts_implementation
    result = moec.compile(model, target="ort", output=workdir / name)
    runner = moec.load(result.path, intra_op_threads=THREADS)
    rows = []
    for t in tokens:
        g = torch.Generator().manual_seed(t)
        ids = torch.randint(0, COMMON["vocab_size"], (1, t), generator=g)
        mask = torch.ones_like(ids)
        with torch.no_grad():

            def eager(ids=ids, mask=mask):
                return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

            ref = eager().numpy()
            eager_ms = median_ms(eager, repeat)
        out = runner(ids.numpy(), mask.numpy())
        err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        moec_ms = median_ms(functools.partial(runner.infer, feeds), repeat)
        rows.append(
            dict(
                model=name,
                tokens=t,
                eager_impl=implementation,
                eager_ms=eager_ms,
                moec_ms=moec_ms,
                speedup=eager_ms / moec_ms,
                rel_l2=err,
                lowering=sorted({b.lowering for b in result.blocks}),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--tokens", nargs="+", type=int, default=[16, 512])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", type=Path, default=Path("bench/results/hf_models.json"))
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="moec-bench-hf-") as workdir:
        for name in args.models:
            rows += bench_model(name, args.tokens, args.repeat, Path(workdir))
    table = Table(
        "model",
        "T",
        "eager transformers ms",
        "moec ort ms",
        "speed-up",
        "rel L2",
        "lowering",
        title=f"whole model, fp32, {THREADS} threads, median of {args.repeat}",
    )
    for r in rows:
        table.add_row(
            r["model"],
            str(r["tokens"]),
            f"{r['eager_ms']:.1f} ({r['eager_impl']})",
            f"{r['moec_ms']:.1f}",
            f"{r['speedup']:.2f}x",
            f"{r['rel_l2']:.1e}",
            ",".join(r["lowering"]),
        )
    Console(width=120).print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"threads": THREADS, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
