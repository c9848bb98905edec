"""Compile and verify a checkpoint bigger than the memory the processes may use (run by
`test_big_models`; prints one JSON line of figures).

The cap is RLIMIT_DATA (the process's private memory: heap and anonymous mappings) with
glibc's arenas limited to two: RLIMIT_AS would count what merely is mapped (the shared
libraries alone map ~0.5 GB, and each thread's arena reserves 64 MB it never uses).

    python tests/memory_capped.py WORKDIR
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CAP = 1_300_000_000  # bytes of private memory each command may use
LAYERS = 4  # Mixtral-like at hidden 1024, 8 experts of 3584: 1.7 GB of float32 weights


def build(directory: Path) -> int:
    import torch
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=3584,
        num_hidden_layers=LAYERS,
        num_attention_heads=16,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config)  # its own initialisation: seconds
    model.save_pretrained(directory)
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def capped() -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (CAP, CAP))


def run(argv: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "COLUMNS": "160"}
    done = subprocess.run(argv, preexec_fn=capped, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(
            f"{' '.join(argv)} failed under the cap:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return time.perf_counter() - start, done.stdout


def main(workdir: Path) -> None:
    source, out = workdir / "model", workdir / "out"
    weights = build(source)
    moec = [sys.executable, "-m", "moec"]
    compile_s, _ = run([*moec, "compile", f"hf:{source}", "-o", str(out), "--no-kv-cache"])
    verify_s, said = run([*moec, "verify", str(out), "--shapes", "1,16"])
    figures = {"cap": CAP, "weights": weights, "compile_s": compile_s, "verify_s": verify_s}
    print(json.dumps({**figures, "verified_by_layers": "ran by layers" in said}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
