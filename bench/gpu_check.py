"""The TensorRT check on a GPU machine: build, verify and time engines.

For zoo:mixtral-lm, zoo:deepseek-lm and tiny random transformers Mixtral and Qwen2-MoE, at
fp32 and fp16: ``moec compile --target trt`` (which builds the engine where TensorRT and a GPU
are), ``moec verify`` (the engine against eager PyTorch, routing included), and the engine's
time for one prefill against eager PyTorch on the same GPU and inputs, in the same run.
Without a GPU, or without TensorRT, it says which and exits 0. Budget: under 8 minutes.

    python bench/gpu_check.py [--json bench/results/gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

MODELS = ("zoo:mixtral-lm", "zoo:deepseek-lm", "hf:mixtral", "hf:qwen2_moe")
PRECISIONS = ("fp32", "fp16")
BATCH, SEQUENCE, REPEAT = 1, 64, 20


def source(name: str, scratch: Path) -> str:
    """A SRC for ``name``: a zoo model, or a tiny random transformers family saved to disk."""
    if not name.startswith("hf:"):
        return name
    from hf_families import save_tiny

    return f"hf:{save_tiny(name.removeprefix('hf:'), scratch / name.removeprefix('hf:'))}"


def median_ms(fn) -> float:
    """Median milliseconds of ``fn`` on the GPU (each call waited for)."""
    import torch

    from moec.timing import median_ms as timed

    return timed(lambda: (fn(), torch.cuda.synchronize()), REPEAT, warmup=3)


def check(name: str, precision: str, scratch: Path) -> dict:
    import torch

    import moec
    from moec.compiler.sources import load_source
    from moec.settings import DTYPES

    row = {"model": name, "precision": precision}
    out = scratch / f"{name.replace(':', '-')}-{precision}"
    src = source(name, scratch)
    start = time.perf_counter()
    result = moec.compile(src, target="trt", precision=precision, output=out)
    row["compile_s"] = round(time.perf_counter() - start, 1)
    row["engine"] = result.manifest.build.get("engine")
    report = moec.verify(out)
    row["verified"] = bool(report)
    row["rel_l2"] = max(o.rel_l2 for o in report.outputs)
    row["routing_agreement"] = min((r.agreement for r in report.routing), default=None)
    ids = torch.randint(0, 64, (BATCH, SEQUENCE), device="cuda")
    with moec.load(out) as runner:  # one prefill: the cache's inputs empty
        feeds = runner.completed({"input_ids": ids})
        feeds = {k: torch.as_tensor(v, device="cuda") for k, v in feeds.items()}
        row["engine_ms"] = median_ms(lambda: runner.infer(feeds))
    loaded = load_source(src).model_source
    model = loaded.model.to("cuda", getattr(torch, DTYPES[precision])).eval()
    given = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    args = [given[n] for n in (loaded.input_names or ["input_ids"]) if n in given]
    with torch.no_grad():
        row["eager_ms"] = median_ms(lambda: model(*args))
    row["speedup"] = round(row["eager_ms"] / row["engine_ms"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/gpu_check.json")
    args = parser.parse_args()
    from moec.runtime.tensorrt_env import tensorrt_missing

    why = tensorrt_missing()
    if why is not None:
        print(f"gpu_check: nothing to check here: {why}")
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="moec-gpu-check-") as tmp:
        for name in MODELS:
            for precision in PRECISIONS:
                try:
                    row = check(name, precision, Path(tmp))
                except Exception as e:  # every failure is a row
                    error = f"{type(e).__name__}: {e}"
                    row = {"model": name, "precision": precision, "error": error}
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(f"{'model':18} {'prec':5} {'verify':7} {'rel L2':9} {'engine ms':10} {'eager ms':9} x")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:18} {r['precision']:5} ERROR {r['error'][:80]}")
            continue
        print(
            f"{r['model']:18} {r['precision']:5} {'pass' if r['verified'] else 'FAIL':7} "
            f"{r['rel_l2']:.1e}   {r['engine_ms']:<10.3f} {r['eager_ms']:<9.3f} {r['speedup']}"
        )
    results = {"command": "python bench/gpu_check.py", "rows": rows}
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
