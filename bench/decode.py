"""Decoding whole models: tokens/s of transformers' `generate` against moec's artifacts.

Three 2-layer transformers models at real layer sizes (hidden 1024, vocab 32000, random
weights, fp32, 2 threads): Mixtral-like and Qwen2-MoE-like (as `hf_models.py`) and
DeepSeek-V3-like (64 experts of 512, top-6 in 4 of 8 groups, a shared expert, MLA attention).
A prompt of --prompt tokens, then --new tokens, greedy, at each batch of --batches:

- transformers eager: `model.generate` with its default experts implementation and cache;
- transformers with a static cache under `torch.compile`, at the first batch of the models in
  --compiled-models (compiling for CPU takes minutes), in a subprocess given --compile-timeout
  seconds (a row that does not finish says so);
- moec's `ort`, `onnx` and `torch` artifacts compiled from the same model: `runner.generate`.

Per row, from one timed generate after one to warm up: time to first token (the prefill, as a
streamer sees it), decode tokens/s (batch x (new - 1) tokens over the time after the first),
per-token latency, the share of new
tokens equal to transformers' eager ones, and for moec rows the memory floor of a decode step:
the bytes it must read (the experts its tokens chose, counted from the artifact's routing over
8 steps; every other weight but the embedding; the cache at the mean length) over the copy
bandwidth (bytes read and written per second by a 512 MiB copy) measured in the same run.
Each model runs in its own process (one model and one artifact in memory at a time).

Targets: moec's best artifact >= 1.5x transformers eager decode tokens/s at batch 1 and 8, and
faster than every other row; per-token latency <= 1.3x the memory floor at batch 1.

    python bench/decode.py [--models ...] [--batches 1 8] [--prompt 128] [--new 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import moec
from moec.timing import cpu_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import hf_models  # noqa: E402  (the Mixtral- and Qwen2-MoE-like models)
from moe_layer import BandwidthProbe  # noqa: E402

RESULTS = HERE / "results" / "decode.json"
THREADS = 2
TARGETS = ("ort", "onnx", "torch")
FLOOR_STEPS = 8
COMPILED = "transformers static + torch.compile"
console = Console(width=140)


def deepseek_v3_like():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        **{**hf_models.COMMON, "num_key_value_heads": 16},
        intermediate_size=2816,
        moe_intermediate_size=512,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_group=8,
        topk_group=4,
        n_shared_experts=1,
        first_k_dense_replace=0,
        kv_lora_rank=256,
        q_lora_rank=512,
        qk_rope_head_dim=32,
        qk_nope_head_dim=64,
        v_head_dim=64,
    )
    return DeepseekV3ForCausalLM(config)


MODELS = {
    "mixtral-like": hf_models.mixtral_like,
    "qwen2-moe-like": hf_models.qwen2_moe_like,
    "deepseek-v3-like": deepseek_v3_like,
}


def build(name: str):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    model.generation_config.eos_token_id = None  # every row makes all --new tokens
    model.generation_config.pad_token_id = 0
    return model


def prompts(batches: list[int], length: int) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    vocab = hf_models.COMMON["vocab_size"]
    return {b: torch.randint(0, vocab, (b, length), generator=g) for b in batches}


class FirstToken:
    """A streamer (transformers' ``put``/``end``, and moec's callable) that records when the
    first new token arrived."""

    def __init__(self, skip_prompt: bool):
        self.puts, self.skip, self.start, self.first = 0, skip_prompt, 0.0, None

    def __call__(self, tokens) -> None:
        self.puts += 1
        if self.first is None and self.puts > self.skip:
            self.first = time.perf_counter() - self.start

    put = __call__

    def end(self) -> None:
        pass


def timed(generate, new: int, transformers: bool) -> tuple[float, float, torch.Tensor]:
    """(seconds to the first token, seconds for all ``new``, the tokens) of one
    ``generate(new, streamer)`` after one to warm up (at the same length: a static cache
    compiles for it)."""
    generate(new, None)
    streamer = FirstToken(skip_prompt=transformers)  # transformers puts the prompt first
    streamer.start = time.perf_counter()
    tokens = generate(new, streamer)
    return streamer.first, time.perf_counter() - streamer.start, torch.as_tensor(tokens)


def row(name, what, batch, first, total, new, tokens, reference) -> dict:
    decode_s = max(total - first, 1e-9)
    same = float((tokens[:, -new:] == reference[:, -new:]).float().mean())
    return {
        "model": name,
        "row": what,
        "batch": batch,
        "ttft_ms": first * 1e3,
        "decode_tokens_per_s": batch * (new - 1) / decode_s,
        "ms_per_token": decode_s / (new - 1) * 1e3,
        "same_as_eager": same,
    }


def bench_model(name: str, args) -> list[dict]:
    """Every row of one model (run in its own process)."""
    torch.set_num_threads(THREADS)
    model, ids = build(name), prompts(args.batches, args.prompt)
    probe = BandwidthProbe()
    rows, reference = [], {}
    for batch, prompt in ids.items():

        def eager(n, streamer, prompt=prompt):
            with torch.no_grad():
                return model.generate(prompt, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, streamer=streamer)  # fmt: skip

        first, total, tokens = timed(eager, args.new, transformers=True)
        reference[batch] = tokens
        rows.append(row(name, "transformers eager", batch, first, total, args.new, tokens, tokens))
    if name in args.compiled_models:
        rows += compiled_rows(name, args, reference)
    with tempfile.TemporaryDirectory(prefix="moec-decode-") as work:
        for target in TARGETS:
            art = moec.compile(model, target=target, output=Path(work) / target).path
            options = {"intra_op_threads": THREADS} if target != "torch" else {"threads": THREADS}
            with moec.load(art, **options) as runner:
                bandwidth = probe.copy()
                for batch, prompt in ids.items():

                    def ours(n, streamer, prompt=prompt, runner=runner):
                        return runner.generate(prompt, n, eos_token_id=[], streamer=streamer)

                    first, total, tokens = timed(ours, args.new, transformers=False)
                    found = row(name, f"moec {target}", batch, first, total, args.new, tokens,
                                reference[batch])  # fmt: skip
                    floor = step_bytes(model, runner, prompt, args)
                    found.update(floor_bytes=floor, floor_ms=floor / bandwidth * 1e3)
                    found["copy_gb_s"] = bandwidth / 1e9
                    rows.append(found)
    return rows


def compiled_rows(name: str, args, reference: dict) -> list[dict]:
    """transformers with a static cache under torch.compile, in a subprocess with a timeout."""
    rows = []
    for batch in args.batches[:1]:
        command = [sys.executable, __file__, "--compiled-row", name, str(batch)]
        command += ["--prompt", str(args.prompt), "--new", str(args.new)]
        try:
            done = subprocess.run(command, capture_output=True, text=True,
                                  timeout=args.compile_timeout, check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            note = f"not done in {args.compile_timeout} s"
            rows.append({"model": name, "row": COMPILED, "batch": batch, "note": note})
            continue
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or ["failed"])[-1][:120]
            rows.append({"model": name, "row": COMPILED, "batch": batch, "note": why})
            continue
        found = json.loads(done.stdout.strip().splitlines()[-1])
        tokens = torch.tensor(found.pop("tokens"))
        rows.append(row(name, COMPILED, batch, found["first"],
                        found["total"], args.new, tokens, reference[batch]))  # fmt: skip
    return rows


def compiled_row(name: str, batch: int, args) -> None:
    torch.set_num_threads(THREADS)
    model, prompt = build(name), prompts([batch], args.prompt)[batch]
    model.forward = torch.compile(model.forward, fullgraph=False)

    def generate(n, streamer):
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  cache_implementation="static", streamer=streamer)  # fmt: skip

    first, total, tokens = timed(generate, args.new, transformers=True)
    print(json.dumps({"first": first, "total": total, "tokens": tokens.tolist()}))


def step_bytes(model, runner, prompt: torch.Tensor, args) -> float:
    """Bytes one decode step reads: the distinct experts its tokens chose (mean of
    `FLOOR_STEPS` steps after the prompt, from the artifact's routing), every other weight but
    the embedding, and the cache at the mean length of the run."""
    experts, other = expert_and_other_bytes(model)
    decoding, feeds = runner.decoding, {"input_ids": prompt.numpy()}
    distinct = []
    for _ in range(FLOOR_STEPS + 1):
        outputs = runner.infer(feeds)
        routing = [v for k, v in outputs.items() if k.startswith("routing.")]
        distinct.append(sum(int(r.reshape(-1, r.shape[-1]).any(0).sum()) for r in routing))
        chosen = outputs[decoding.logits][:, -1].argmax(-1)[:, None]
        total = feeds.get(decoding.mask, np.ones_like(feeds["input_ids"])).shape[1] + 1
        mask = np.ones((len(chosen), total), np.int64)
        positions = np.full((len(chosen), 1), total - 1, np.int64)
        feeds = decoding.next_step(chosen, mask, positions, outputs)
    per_expert = experts / len(routing) / routing[0].shape[-1]  # bytes of one expert
    length = args.prompt + args.new / 2
    cache = sum(
        len(prompt) * layer.kv_heads * (layer.key_dim + layer.value_dim) * length * 4
        for layer in decoding.layers
    )
    return float(np.mean(distinct[1:])) * per_expert + other + cache


def expert_and_other_bytes(model) -> tuple[float, float]:
    """fp32 bytes of the routed experts' weights, and of every other weight but the input
    embedding (a step reads only its tokens' rows of it)."""
    experts = other = 0
    embedding = model.get_input_embeddings().weight
    for name, p in model.named_parameters():
        if p is embedding:
            continue
        if ".experts." in name:  # routed experts; shared ones are ".shared_expert(s)."
            experts += p.numel() * 4
        else:
            other += p.numel() * 4
    return experts, other


def targets(rows: list[dict], batches: list[int]) -> list[dict]:
    found = []
    for model in sorted({r["model"] for r in rows}):
        for batch in batches:
            mine = [r for r in rows if r["model"] == model and r["batch"] == batch]
            ours = [r for r in mine if r["row"].startswith("moec") and "note" not in r]
            theirs = [r for r in mine if not r["row"].startswith("moec") and "note" not in r]
            best = max(ours, key=lambda r: r["decode_tokens_per_s"])
            eager = next(r for r in theirs if r["row"] == "transformers eager")
            ratio = best["decode_tokens_per_s"] / eager["decode_tokens_per_s"]
            fastest = all(best["decode_tokens_per_s"] > r["decode_tokens_per_s"] for r in theirs)
            found.append({"target": f"{model}, batch {batch}: best moec >= 1.5x eager tokens/s, "
                                    "faster than every other row",
                          "measured": f"{best['row']} {ratio:.2f}x",
                          "met": ratio >= 1.5 and fastest})  # fmt: skip
            if batch == 1:
                over = best["ms_per_token"] / best["floor_ms"]
                times = f"{best['ms_per_token']:.1f} / {best['floor_ms']:.1f} ms"
                found.append({"target": f"{model}, batch 1: per-token latency <= 1.3x the floor",
                              "measured": f"{best['row']} {over:.2f}x ({times})",
                              "met": over <= 1.3})  # fmt: skip
    return found


def report(results: dict) -> None:
    title = (
        f"decoding, fp32, {THREADS} threads, prompt {results['prompt']}, {results['new']} new "
        f"({results['cpu']})"
    )
    table = Table("model", "row", "batch", "first token ms", "decode tok/s", "ms/token",
                  "floor ms", "same tokens", title=title)  # fmt: skip
    for r in results["rows"]:
        if "note" in r:
            table.add_row(r["model"], r["row"], str(r["batch"]), r["note"], "", "", "", "")
            continue
        floor = f"{r['floor_ms']:.1f}" if "floor_ms" in r else "-"
        table.add_row(r["model"], r["row"], str(r["batch"]), f"{r['ttft_ms']:.0f}",
                      f"{r['decode_tokens_per_s']:.1f}", f"{r['ms_per_token']:.1f}", floor,
                      f"{r['same_as_eager']:.0%}")  # fmt: skip
    console.print(table)
    marks = Table("target", "measured", "met", title="targets")
    for t in results["targets"]:
        marks.add_row(t["target"], t["measured"], "yes" if t["met"] else "[red]no")
    console.print(marks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--compile-timeout", type=int, default=300)
    parser.add_argument(
        "--compiled-models",
        nargs="*",
        default=["mixtral-like"],
        help="models that get the torch.compile row (it compiles for minutes)",
    )
    parser.add_argument("--compiled-row", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--model-rows", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compiled_row:
        compiled_row(args.compiled_row[0], int(args.compiled_row[1]), args)
        return
    if args.model_rows:
        print(json.dumps(bench_model(args.model_rows, args)))
        return
    start, rows = time.time(), []
    for name in args.models:
        command = [sys.executable, __file__, "--model-rows", name, "--new", str(args.new)]
        command += ["--prompt", str(args.prompt), "--compile-timeout", str(args.compile_timeout)]
        command += ["--batches", *map(str, args.batches)]
        command += ["--compiled-models", *args.compiled_models]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{name}: {done.stderr[-3000:]}")
        rows += json.loads(done.stdout.strip().splitlines()[-1])
        console.print(f"{name} done ({time.time() - start:.0f} s)")
    results = {
        "command": " ".join(["python bench/decode.py", *sys.argv[1:]]),
        "cpu": cpu_model(),
        "threads": THREADS,
        "prompt": args.prompt,
        "new": args.new,
        "rows": rows,
        "targets": targets(rows, args.batches),
        "seconds": round(time.time() - start, 1),
    }
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    report(results)
    console.print(f"wrote {RESULTS} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
