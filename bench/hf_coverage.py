"""Coverage of transformers' MoE families: compile a tiny random model of each for `ort`, `onnx`
and `trt` from ``hf:DIR``, verify its logits against eager transformers, and tabulate. (A `trt`
compile passes moec's TensorRT check; with no TensorRT here, verify runs its ONNX on ONNX
Runtime.) Each family is also tried in a second config, as a new user's might differ, on `onnx`:
every window, block, chunk and indexer top-k at most 4, below the sequences verify runs, and
other random weights (`second_config_kwargs` in tests/hf_families.py).

Every family of the installed transformers whose modeling code mentions experts is listed; one
without a tiny configuration in tests/hf_families.json says so. Each (family, target) runs in its
own process. Writes bench/results/hf_coverage.json and, with --write-docs, the table between the
coverage markers in docs/coverage.md. With --families, only those are re-run and their rows replace
the ones in the existing results (each row records the commit it ran on), and likewise with
--targets; the table covers them all.

    python bench/hf_coverage.py [--families mixtral qwen2_moe] [--targets trt] [--jobs 2]
        [--configs first second] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from hf_families import FAMILIES, NOT_MOE, build_tiny, save_tiny  # noqa: E402

TARGETS = ("ort", "onnx", "trt")
SECOND_TARGETS = ("onnx",)  # the second config exercises the model's code, not the target's
DECODED = ("ort", "onnx")  # targets whose generate runs here (a trt one needs its engine)
MOE_CODE = re.compile(
    r"use_experts_implementation|num_local_experts|n_routed_experts|num_experts_per_tok"
    r"|moe_num_experts|num_experts\b"
)
COVERAGE_PAGE = ROOT / "docs" / "coverage.md"  # the page --write-docs rewrites between the markers
COVERAGE_START, COVERAGE_END = "<!-- hf-coverage:start -->", "<!-- hf-coverage:end -->"
README = ROOT / "README.md"  # --write-docs puts the one-line summary between its markers
SUMMARY_START = "<!-- hf-coverage-summary:start -->"
SUMMARY_END = "<!-- hf-coverage-summary:end -->"
TIMEOUT_S = 900
# notes every row of a target has here, which say nothing about the family
COMMON_NOTES = ("no TensorRT engine yet", "weights streamed from the checkpoint")


def installed_moe_families() -> list[str]:
    import transformers

    models = Path(transformers.__file__).parent / "models"
    found = []
    for directory in sorted(p for p in models.iterdir() if p.is_dir()):
        code = "".join(f.read_text(errors="ignore") for f in directory.glob("modeling_*.py"))
        if MOE_CODE.search(code):
            found.append(directory.name)
    return found


def check_one(family: str, target: str, second: bool = False) -> dict:
    """Compile and verify one family for one target, in its first or second config (runs in a
    child process)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    import moec

    row = {"family": family, "target": target, "second": second}
    with tempfile.TemporaryDirectory(prefix=f"moec-{family}-") as tmp:
        try:
            src = save_tiny(family, Path(tmp) / "model", second=second)
            result = moec.compile(f"hf:{src}", target=target, output=Path(tmp) / "out")
            row["model"] = FAMILIES[family]["model"]
            row["lowerings"] = sorted({b.lowering for b in result.blocks})
            row["blocks"] = len(result.blocks)
            row["adapters"] = sorted({b.adapter for b in result.blocks})
            row["notes"] = result.notes
            unfused = [b.reason for b in result.blocks if target == "ort" and b.lowering != "fused"]
            if unfused:
                row["not_fused"] = unfused[0]
            report = moec.verify(result.path)
            row["rel_l2"] = max(o.rel_l2 for o in report.outputs)
            tolerance = report.outputs[0].tolerance
            row["failing_shapes"] = [
                shape["input_ids"]
                for shape, err in zip(report.shapes, report.outputs[0].per_run, strict=True)
                if err > tolerance
            ]
            row["agreement"] = min((r.agreement for r in report.routing), default=None)
            row["passed"] = bool(report)
            decoded = target in DECODED and not second
            row["decode"] = decode_check(family, result, report) if decoded else None
        except Exception as e:  # every failure is a row in the table, with its reason
            row["passed"] = False
            row["error"] = f"{type(e).__name__}: {e}"
    return row


DECODE_TOKENS = 16


def decode_check(family: str, result, report) -> str | None:
    """``pass`` when the artifact's decode steps verify and its greedy `generate` gives
    transformers' tokens; ``no cache`` for a generator compiled without one; None for a model
    that does not generate; else what failed."""
    import torch

    import moec

    if not result.manifest.decoding:  # a model that does not generate has no note
        return "no cache" if any("without a KV cache" in n for n in result.notes) else None
    if not all(step.passed for step in report.decode):
        worst = max(step.logits.rel_l2 for step in report.decode)
        return f"steps differ: rel L2 {worst:.1e}"
    model = build_tiny(family)
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=DECODE_TOKENS, do_sample=False,
                                  pad_token_id=0)  # fmt: skip
    with moec.load(result.path) as runner:
        tokens = runner.generate(ids, DECODE_TOKENS, pad_token_id=0)
    return "pass" if torch.equal(tokens, expected) else "generate differs"


def current_commit() -> str:
    """The checked-out commit, marked ``+dirty`` when the tree has uncommitted changes."""
    git = ["git", "-C", str(ROOT)]
    sha = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    return sha.stdout.strip() + ("+dirty" if dirty else "")


def run_child(family: str, target: str, second: bool) -> dict:
    cmd = [sys.executable, __file__, "--one", family, target, *(["--second"] if second else [])]
    row = {"family": family, "target": target, "second": second, "passed": False}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {**row, "error": "timed out"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {**row, "error": f"crashed: {tail}"}
    return json.loads(lines[-1])


def key(row: dict) -> tuple[str, str, bool]:
    return row["family"], row["target"], bool(row.get("second"))


ANSI = re.compile(r"\x1b\[[0-9;]*m|\[9\dm|\[0m")
TMP_PATH = re.compile(r"hf:/\S*?/model: ")


def _clean(text: str, limit: int = 260) -> str:
    text = TMP_PATH.sub("", ANSI.sub("", text)).replace("|", "/").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def reason_of(rows: list[dict]) -> str:
    errors = [_second(r) + r["error"] for r in rows if r.get("error")]
    if errors:
        return _clean(errors[0])
    failed = [r for r in rows if not r.get("passed")]
    if failed:
        r = failed[0]
        shapes = ", ".join("x".join(map(str, s)) for s in r.get("failing_shapes", []))
        where = f" for input_ids {shapes}" if shapes else " (routing agreement)"
        return f"{_second(r)}logits differ from eager{where}: rel L2 {r.get('rel_l2'):.1e}"
    notes = sorted({n for r in rows for n in r.get("notes", []) if not n.startswith(COMMON_NOTES)})
    notes += sorted({r["not_fused"] for r in rows if r.get("not_fused")})
    return _clean("; ".join(notes), limit=400)


def _second(row: dict) -> str:
    return "second config: " if row.get("second") else ""


def cell(row: dict | None) -> str:
    if row is None:
        return "-"
    if row.get("rel_l2") is None:
        return "fail"
    mark = "pass" if row.get("passed") else "FAIL"
    return f"{mark} {row['rel_l2']:.1e}"


def table(families: list[str], results: dict) -> str:
    lines = [
        "| family | model class | ort (rel L2) | onnx (rel L2) | trt (rel L2) "
        "| second config (onnx) | decode (ort / onnx) | lowering (ort / onnx / trt) "
        "| notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for family in families:
        if family in NOT_MOE:
            lines.append(f"| {family} | - | - | - | - | - | - | - | not MoE: {NOT_MOE[family]} |")
            continue
        if family not in FAMILIES:
            lines.append(
                f"| {family} | - | - | - | - | - | - | - "
                "| no tiny config in tests/hf_families.json |"
            )
            continue
        rows = [results.get((family, t, False)) for t in TARGETS]
        seconds = [results.get((family, t, True)) for t in SECOND_TARGETS]
        second = " / ".join(cell(r) for r in seconds)
        lowering = " / ".join(",".join(r.get("lowerings", [])) or "-" for r in rows if r)
        decode = " / ".join((r or {}).get("decode") or "-" for r in rows[: len(DECODED)])
        reason = reason_of([r for r in rows + seconds if r])
        model = FAMILIES[family]["model"]
        lines.append(
            f"| {family} | {model} | {cell(rows[0])} | {cell(rows[1])} | {cell(rows[2])} "
            f"| {second} | {decode} | {lowering} | {reason} |"
        )
    return "\n".join(lines)


def summary(families: list[str], results: dict) -> str:
    """The README's line: how many MoE families pass `ort` and `onnx`, and their second config."""
    moe = [f for f in families if f not in NOT_MOE]
    passing = [
        f for f in moe if all((results.get((f, t, False)) or {}).get("passed") for t in DECODED)
    ]
    tried = [f for f in moe if all((f, t, True) in results for t in SECOND_TARGETS)]
    second = [f for f in tried if all(results[(f, t, True)].get("passed") for t in SECOND_TARGETS)]
    import transformers

    return (
        f"Hugging Face: {len(passing)} of the {len(moe)} MoE families in transformers "
        f"{transformers.__version__} compile and verify for `ort` and `onnx` (tiny random "
        f"models), and {len(second)} of the {len(tried)} tried in a second tiny config "
        "([docs/coverage.md](docs/coverage.md))."
    )


def write_between(page: Path, start_marker: str, end_marker: str, text: str) -> None:
    content = page.read_text()
    start, end = content.index(start_marker), content.index(end_marker)
    page.write_text(content[: start + len(start_marker)] + "\n" + text + "\n" + content[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+")
    parser.add_argument("--targets", nargs="+", choices=TARGETS)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--configs", nargs="+", choices=("first", "second"), default=["first", "second"]
    )
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/hf_coverage.json")
    parser.add_argument("--one", nargs=2, metavar=("FAMILY", "TARGET"), help=argparse.SUPPRESS)
    parser.add_argument("--second", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(check_one(*args.one, second=args.second)))
        return
    families = args.families or sorted(set(installed_moe_families()) | set(FAMILIES))
    targets = args.targets or TARGETS
    known = [f for f in families if f in FAMILIES and f not in NOT_MOE]
    jobs = [(f, t, False) for f in known for t in targets] if "first" in args.configs else []
    if "second" in args.configs:
        jobs += [(f, t, True) for f in known for t in targets if t in SECOND_TARGETS]
    commit = current_commit()

    def run(job: tuple[str, str, bool]) -> dict:
        row = {**run_child(*job), "commit": commit}
        print(json.dumps(row), flush=True)
        return row

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(run, jobs))
    partial = args.families or args.targets or len(args.configs) < 2
    if partial and args.json.exists():  # merge into the rest
        previous = json.loads(args.json.read_text())
        done = {key(r) for r in rows}
        rows += [r for r in previous["rows"] if key(r) not in done]
        families = sorted(set(previous["families"]) | set(families))
        rows.sort(key=lambda r: (r["family"], bool(r.get("second")), TARGETS.index(r["target"])))
    results = {key(r): r for r in rows}
    text = table(families, results)
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"families": families, "rows": rows}, indent=1))
    if args.write_docs:
        write_between(COVERAGE_PAGE, COVERAGE_START, COVERAGE_END, text)
        write_between(README, SUMMARY_START, SUMMARY_END, summary(families, results))


if __name__ == "__main__":
    main()
