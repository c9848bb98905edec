"""The ``moec`` command. Thin: parses, calls the API, prints rich tables.

A `MoecError` (bad input) prints one line and exits 2; ``moec verify`` exits 1 when the artifact
is out of tolerance.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from moec import registry
from moec.cli_common import console, err_console, friendly_errors, human_bytes
from moec.cli_progress import StageProgress
from moec.cli_tensorrt import build_engine_command, check_trt_command
from moec.settings import FLAGS, CompileSettings, Flag

PIPE_WIDTH = 1000  # columns when not on a terminal: tables as wide as their content


class KeepType(click.ParamType):
    """KEEP: a fraction of experts (0.5, 1.0) or a count (8)."""

    name = "KEEP"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return value
        try:
            return int(value) if value.strip().isdigit() else float(value)
        except ValueError:
            self.fail(
                f"{value!r} is neither a fraction in (0, 1] nor a count of experts", param, ctx
            )


class RegisteredChoice(click.Choice):
    """A choice among the names registered when the command runs (`moec.registry`)."""

    def __init__(self, names):
        self.names = names
        super().__init__(names())

    @property
    def choices(self):
        return self.names()

    @choices.setter
    def choices(self, value):  # click.Choice.__init__ assigns it
        pass


PARAM_TYPES = {
    "float": float,
    "int": int,
    "keep": KeepType(),
    "list": str,
    "path": click.Path(path_type=Path),
}
REGISTERED_CHOICES = {"target": registry.target_names, "lowering": registry.lowering_names}


class ShapesType(click.ParamType):
    """DIMS: values of the artifact's dynamic dims in the order it declares them (moec inspect
    shows them), comma-separated: 2,128 is batch 2, sequence 128."""

    name = "DIMS"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            dims = tuple(int(v) for v in value.split(","))
        except ValueError:
            dims = ()
        if not dims or min(dims) < 0:
            self.fail(f"{value!r} is not comma-separated dim sizes such as 2,128", param, ctx)
        return dims


SHAPES_HELP = (
    "Values of the dynamic dims, in the order moec inspect lists them (2,128: batch 2, "
    "sequence 128); repeat for several shapes."
)


def _read_npz(path: Path, flag: str) -> dict:
    import numpy as np

    from moec.errors import InputError

    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise InputError(f"{flag} {path} is not a readable .npz ({e})") from e


TRUST_FLAGS = {
    "trust_pickle": "Allow loading by unpickling (a torch.save pickle, or a .pt2 that needs it): "
    "it runs the file's code.",
    "trust_remote_code": "Allow an hf: directory to run the Python code it ships.",
    "trust_source": "Allow rebuilding a source the artifact names that runs code "
    "(pkg.module:factory).",
}


def _trust_options(*names: str):
    """The ``--trust-*`` flags ``names``: the user's consent, which no file can give."""

    def decorate(command):
        for name in reversed(names):
            option = "--" + name.replace("_", "-")
            command = click.option(option, name, is_flag=True, help=TRUST_FLAGS[name])(command)
        return command

    return decorate


def _setting_option(flag: Flag):
    """The click option of one `CompileSettings` flag (None when not given)."""
    names = [flag.option, flag.name] + ([flag.short] if flag.short else [])
    help_text = flag.help + (f"  [default: {flag.default}]" if flag.default is not None else "")
    if flag.kind == "flag":
        return click.option(*names, is_flag=True, default=None, help=help_text)
    if flag.kind == "choice":
        registered = REGISTERED_CHOICES.get(flag.name)
        choice = RegisteredChoice(registered) if registered else click.Choice(flag.choices)
        return click.option(*names, type=choice, help=help_text)
    if flag.kind == "profile":
        return click.option(*names, multiple=True, metavar="NAME:MIN,OPT,MAX", help=help_text)
    return click.option(*names, type=PARAM_TYPES[flag.kind], help=help_text)


def _setting_options(command):
    for flag in reversed(FLAGS):
        command = _setting_option(flag)(command)
    return command


@click.group(context_settings={"max_content_width": 120})  # command summaries whole
@click.version_option(package_name="moec")
@click.option("-v", "--verbose", is_flag=True, help="Log what each stage does.")
def main(verbose: bool) -> None:
    """moec: compile Mixture-of-Experts models into verified artifacts (see moec targets)."""
    logging.addLevelName(logging.WARNING, "warning")
    logging.addLevelName(logging.INFO, "info")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("moec").setLevel(logging.INFO if verbose else logging.WARNING)
    for out in (console, err_console):  # a pipe's 80 columns would cut names short
        if not out.is_terminal and "COLUMNS" not in os.environ:
            out.width = PIPE_WIDTH
    # torch's own deprecation chatter during export says nothing about the user's model.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(copyreg|torch\.)")


@main.command("compile")
@click.argument("src", required=False)
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), help="Artifact directory.")
@click.option("--force", is_flag=True, help="Replace OUT if it is an existing artifact.")
@_trust_options("trust_pickle", "trust_remote_code")
@click.option(
    "--example-inputs", type=click.Path(), help="A .npz of inputs, for a pickled bare module."
)
@click.option("--list-passes", is_flag=True, help="Print the pass pipeline and exit.")
@_setting_options
@friendly_errors
def compile_command(
    src, out, force, trust_pickle, trust_remote_code, example_inputs, list_passes, **flags
):
    """Compile SRC (zoo:NAME, hf:DIR, FILE.pt2, pkg.module:factory, or a pickle) into OUT."""
    settings = CompileSettings.from_flags(flags)
    if list_passes:
        _print_passes(settings)
        return
    if src is None or out is None:
        raise click.UsageError("moec compile needs SRC and -o OUT")

    from moec.pipeline import STAGES, compile_model

    options = {"example_inputs_file": example_inputs} if example_inputs else {}
    with StageProgress(err_console, list(STAGES)) as progress:
        result = compile_model(
            src,
            settings=settings,
            output=out,
            force=force,
            trust_pickle=trust_pickle,
            trust_remote_code=trust_remote_code,
            on_stage=progress.stage,
            on_step=progress.step,
            **options,
        )
    _print_compile_summary(result)


def _print_passes(settings: CompileSettings) -> None:
    from moec import passes as p
    from moec.passes import default_passes, lossy_passes

    chosen = {x.name for x in lossy_passes(settings) + default_passes(settings, [{}])}
    lowerings = ", ".join(registry.lowerings_for(settings.target))
    rows = [  # every pass, in the order they run, and what turns it on
        (p.MergeExpertsPass, "--merge-experts KEEP --calib FILE"),
        (p.PruneExpertsPass, "--prune-experts KEEP --calib FILE"),
        (p.DistillDensePass, "--distill-dense --calib FILE"),
        (p.QuantizeExpertsPass, "--quantize int8|int4 --calib FILE"),
        (p.GroupedGemmPass, "default (--autotune times the candidates)"),
        (p.SelectLoweringPass, f"--lowering NAME, instead of grouped-gemm ({lowerings})"),
        (p.CapacityPass, "--capacity-factor F or --capacity auto, instead of grouped-gemm"),
    ]
    table = Table(
        "#", "pass", "lossy", "runs", "turned on by", "what it does",
        title=f"passes for --target {settings.target} with these flags",
    )  # fmt: skip
    for i, (kind, how) in enumerate(rows, 1):
        lossy = "yes" if kind.lossy else "no"
        runs = "[green]yes" if kind.name in chosen else "no"
        table.add_row(str(i), kind.name, lossy, runs, escape(how), kind.description)
    console.print(table)
    console.print(
        "lossy passes run first, on the eager model; the others after capture, on the program"
    )


def _print_quality(quality: dict, title: str) -> None:
    table = Table("block", "rel. output error (held out)", title=title)
    for b in quality["blocks"]:
        table.add_row(b["block"] or "(model)", f"{b['rel_error']:.3e}")
    console.print(table)
    if "perplexity" in quality:
        ppl = quality["perplexity"]
        console.print(
            f"perplexity {ppl['before']:.3f} -> {ppl['after']:.3f}; next-token top-1 agreement "
            f"{quality['top1_agreement']:.2%} ({quality['held_out_rows']} held-out rows)"
        )
    for key, what in (("parameters", "model"), ("moe_parameters", "MoE blocks")):
        size = quality[key]
        console.print(
            f"{what}: {size['before']:,} -> {size['after']:,} parameters; "
            f"{human_bytes(size['bytes_before'])} -> {human_bytes(size['bytes_after'])} "
            f"({size['bytes_after'] / max(size['bytes_before'], 1):.2f}x)"
        )


def _print_compile_summary(result) -> None:
    blocks = Table("block", "class", "routing and experts", "lowering", "why", title="MoE blocks")
    for b in result.blocks:
        blocks.add_row(b.name or "(model)", b.class_name, b.summary, b.lowering or "-", b.reason)
    if result.blocks:
        console.print(blocks)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    if result.manifest.compression:
        _print_quality(result.manifest.compression["quality"], "quality after the lossy passes")
    for record in result.manifest.passes:
        if "drop_rate" in record["report"]:
            console.print(
                f"capacity: drop rate {record['report']['drop_rate']:.2%} of routed (token, "
                f"expert) pairs on {record['report']['calibration_calls']} calibration calls"
            )
    stages = Table("stage", "seconds", title="compile")
    for name, seconds in result.stage_seconds.items():
        stages.add_row(name, f"{seconds:.2f}")
    stages.add_row("[bold]total", f"[bold]{sum(result.stage_seconds.values()):.2f}")
    console.print(stages)
    deployable = result.manifest.deployable_bytes
    reference = result.size_bytes - deployable
    extra = f" + {human_bytes(reference)} that only verify reads" if reference else ""
    console.print(
        f"{len(result.blocks)} MoE block(s); artifact {result.path} "
        f"({human_bytes(deployable)} to run{extra}; target {result.manifest.target})"
    )


@main.command("targets")
def targets_command() -> None:
    """List the registered targets and lowerings, and each target's default rule."""
    targets = Table("target", "what you get", "default lowering", "--autotune times")
    for name in registry.target_names():
        t = registry.target(name)
        steps = [
            step.lowering
            + (" (quantised experts)" if step.quantized else "")
            + (
                f" (hidden x expert <= {step.max_expert_elements})"
                if step.max_expert_elements
                else ""
            )
            for step in t.default
        ]
        what = t.description + (" (not built in this version of moec)" if t.unavailable else "")
        targets.add_row(name, what, ", else ".join(steps), ", ".join(t.autotune) or "-")
    console.print(targets)
    lowerings = Table("lowering", "targets", "exact", "how")
    for name in registry.lowering_names():
        lw = registry.lowering(name)
        lowerings.add_row(name, ", ".join(lw.targets), lw.exact, lw.description)
    console.print(lowerings)


@main.command("place")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--devices", type=click.IntRange(min=1), required=True, help="Devices (ranks).")
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--redundant",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Extra expert replicas per block, for the most loaded experts.",
)
@click.option(
    "--policy",
    type=click.Choice(["eplb", "hierarchical", "contiguous"]),
    default="eplb",
    show_default=True,
)
@click.option(
    "--calib",
    type=click.Path(path_type=Path),
    required=True,
    help="A .npy of the artifact's first input (token ids [N, S]).",
)
@click.option("--calib-samples", type=click.IntRange(min=2), help="Use at most this many rows.")
@click.option(
    "--max-moves",
    type=click.IntRange(min=0),
    help="Rebalance the artifact's placement moving at most this many experts.",
)
@click.option("--plot", type=click.Path(path_type=Path), help="Write a PNG of load per device.")
@click.option("--simulate", is_flag=True, help="Also print a step's cost on 8 to 256 GPUs.")
@friendly_errors
def place_command(out, devices, nodes, redundant, policy, calib, calib_samples, max_moves, plot,
                  simulate):  # fmt: skip
    """Plan where each MoE block's experts live over DEVICES, write it into OUT."""
    from moec.placing import place

    report = place(
        out,
        devices=devices,
        nodes=nodes,
        redundant=redundant,
        policy=policy,
        calib=calib,
        calib_samples=calib_samples,
        max_moves=max_moves,
    )
    _print_placement(report, out)
    if plot is not None:
        from moec.placement_plot import plot_placement

        plot_placement(report, plot)
        console.print(f"plot written to {plot}")
    if simulate:
        _print_simulation(report, out)


def _print_placement(report, out: Path) -> None:
    p = report.placement
    table = Table(
        "block", "experts", "replicas", "contiguous", p.policy, "moved",
        title=escape(f"max/mean tokens per device on held-out tokens, {p.devices} devices"),
    )  # fmt: skip
    for b in report.blocks:
        table.add_row(
            b.block or "(model)", str(b.experts), str(b.replicas), f"{b.baseline:.3f}",
            f"{b.planned:.3f}", str(b.moves),
        )  # fmt: skip
    base, plan = report.overall
    table.add_row("[bold]mean", "", "", f"[bold]{base:.3f}", f"[bold]{plan:.3f}", "")
    console.print(table)
    per_device = sum(report.slots * size for size in report.expert_bytes.values())
    console.print(
        f"expert weights per device: {human_bytes(per_device)} "
        f"({report.slots} slots per block); placement written to {out}"
    )


def _print_simulation(report, out: Path) -> None:
    import numpy as np

    from moec.placement_simulator import GPU_COUNTS, redundant_for, simulate
    from moec.runtime.manifest import Manifest

    blocks = {b["name"]: b for b in Manifest.read(out).blocks}
    table = Table(
        "block", "GPUs", "contiguous ms", "eplb ms", "eplb max/mean",
        title="simulated step per MoE layer (H100 defaults, 4096 tokens per GPU)",
    )  # fmt: skip
    for name, load in report.placement.load.items():
        shape = _block_shape(blocks[name])
        fit = np.asarray(load["fit"], dtype=np.float64)
        for gpus in GPU_COUNTS:
            base = simulate(fit, gpus=gpus, policy="contiguous", **shape)
            plan = simulate(
                fit, gpus=gpus, policy="eplb", redundant=redundant_for(len(fit), gpus), **shape
            )
            table.add_row(
                name or "(model)", str(gpus), f"{base.step_s * 1e3:.3f}",
                f"{plan.step_s * 1e3:.3f}", f"{plan.balance:.3f}",
            )  # fmt: skip
    console.print(table)


def _block_shape(block: dict) -> dict:
    """A manifest block's sizes, as `simulate` takes them."""
    return {k: int(block.get(k) or 1) for k in ("hidden", "expert_size", "top_k")}


@main.command("verify")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--source", help="Use this SRC as the eager model instead of the recorded one.")
@_trust_options("trust_pickle", "trust_remote_code", "trust_source")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--rel-l2",
    type=click.FloatRange(min=0),
    help="Tolerance on each output's relative L2 "
    "[moec's, by dtype: fp32 1e-5, fp16 2e-2, bf16 5e-2].",
)
@click.option(
    "--agreement",
    type=click.FloatRange(0, 1),
    help="Least routing agreement per block [0.999 in fp32, 0.99 in fp16 and bf16].",
)
@click.option(
    "--atol",
    type=click.FloatRange(min=0),
    help="Check every element: |out - ref| <= atol + rtol |ref| (instead of the relative L2).",
)
@click.option("--rtol", type=click.FloatRange(min=0), help="See --atol.")
@click.option("--shapes", multiple=True, type=ShapesType(), help=SHAPES_HELP)
@click.option(
    "--inputs",
    "inputs_path",
    type=click.Path(path_type=Path),
    help="Verify on these inputs (a .npz, one array per input name) instead of random ones.",
)
@click.option(
    "--json", "json_path", type=click.Path(path_type=Path), help="Also write a JSON report."
)
@click.option(
    "--by-layers/--whole",
    default=None,
    help="Run an ONNX artifact a layer (or a few) at a time, its weights never all in memory "
    "(default: when they would take over half the memory left), or as one session.",
)
@friendly_errors
def verify_command(
    out,
    source,
    seed,
    rel_l2,
    agreement,
    atol,
    rtol,
    shapes,
    inputs_path,
    json_path,
    by_layers,
    **trust,
):
    """Run OUT and its eager source on the same random inputs; compare outputs and routing."""
    from moec.verification import DEFAULT_DIM_SCHEDULE, verify

    report = verify(
        out,
        source=source,
        seed=seed,
        rel_l2=rel_l2,
        agreement=agreement,
        atol=atol,
        rtol=rtol,
        schedule=tuple(shapes) or DEFAULT_DIM_SCHEDULE,
        inputs=_read_npz(inputs_path, "--inputs") if inputs_path else None,
        by_layers=by_layers,
        **trust,
    )
    shapes = "; ".join(" ".join(f"{k}={v}" for k, v in s.items()) for s in report.dims)
    outputs = Table(
        "output",
        "max abs",
        "mean abs",
        "max rel",
        "rel L2",
        "tol",
        "",
        title=escape(f"numerics vs eager ({len(report.shapes)} shapes: {shapes})"),
    )
    for o in report.outputs:
        outputs.add_row(
            o.name,
            f"{o.max_abs:.2e}",
            f"{o.mean_abs:.2e}",
            f"{o.max_rel:.2e}",
            f"{o.rel_l2:.2e}",
            o.tolerance_str + (f" ({o.outside} outside)" if o.outside else ""),
            _status(o.passed),
        )
    console.print(outputs)
    if report.routing:
        routing = Table(
            "block",
            "tokens",
            "agreement",
            "near-ties (flipped)",
            "min",
            "",
            title="routing vs eager",
        )
        for r in report.routing:
            routing.add_row(
                r.block or "(model)",
                str(r.tokens),
                f"{r.agreement:.2%}",
                f"{r.near_ties} ({r.near_tie_flips})",
                f"{r.tolerance:.1%}",
                _status(r.passed),
            )
        console.print(routing)
    if report.decode:
        title = "decoding vs eager transformers with its own cache (step 0: the prompt)"
        steps = Table(
            "step", "tokens", "logits rel L2", "tol", "routing agreement", "", title=title
        )
        for d in report.decode:
            row = d.to_dict()
            steps.add_row(str(d.step), str(d.tokens), f"{row['logits_rel_l2']:.2e}",
                          f"{row['tolerance']:.0e}", f"{row['routing_agreement']:.2%}",
                          _status(d.passed))  # fmt: skip
        console.print(steps)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    from moec.runtime.manifest import Manifest

    compression = Manifest.read(out).compression
    if compression:
        console.print("lossy artifact: checked against the model its passes produced")
        _print_quality(compression["quality"], "stored quality report of the lossy passes")
    if json_path:
        json_path.write_text(json.dumps(report.to_dict(), indent=2))
    console.print("[bold green]PASS" if report else "[bold red]FAIL")
    sys.exit(0 if report else 1)


@main.command("bench")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--source", help="Use this SRC as the eager model instead of the recorded one.")
@_trust_options("trust_pickle", "trust_remote_code", "trust_source")
@click.option(
    "--repeat", type=click.IntRange(min=1), default=7, show_default=True, help="Calls per round."
)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Paired rounds (eager, then the artifact) per shape.",
)
@click.option("--shapes", multiple=True, type=ShapesType(), help=SHAPES_HELP)
@friendly_errors
def bench_command(out, source, repeat, rounds, shapes, **trust):
    """Time OUT against its eager source on a few input shapes, in paired rounds."""
    import statistics

    from moec.benchmark import BENCH_SCHEDULE, bench_artifact

    report = bench_artifact(
        out,
        source=source,
        repeat=repeat,
        rounds=rounds,
        schedule=tuple(shapes) or BENCH_SCHEDULE,
        **trust,
    )
    console.print(", ".join(f"{k}: {v}" for k, v in report.host.items()), highlight=False)
    table = Table(
        "dims",
        "eager ms",
        "artifact ms",
        "speed-up",
        "min - max",
        title=escape(f"{out}: median of {rounds} rounds of {repeat} calls"),
    )
    for r in report.rows:
        table.add_row(
            escape(r.dims_str),
            f"{statistics.median(r.eager_ms):.3f}",
            f"{statistics.median(r.artifact_ms):.3f}",
            f"{r.speedup:.2f}x",
            f"{min(r.speedups):.2f}x - {max(r.speedups):.2f}x",
        )
    console.print(table)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)


@main.command("run")
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--input",
    "input_path",
    required=True,
    type=click.Path(path_type=Path),
    help="A .npz with one array per input name.",
)
@click.option(
    "--output",
    "output_path",
    type=click.Path(path_type=Path),
    help="Write every output to this .npz.",
)
@_trust_options("trust_pickle")
@friendly_errors
def run_command(out, input_path, output_path, trust_pickle):
    """Run OUT on the arrays in --input (under torchrun: expert-parallel by its placement, rank
    0 writing the outputs)."""
    import os

    import numpy as np

    from moec.runtime.load import load

    feeds = _read_npz(input_path, "--input")
    rank = 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from moec.runtime.expert_parallel import distributed_world, init_from_env, leave

        init_from_env()
        rank, _ = distributed_world()
    with load(out, trust_pickle=trust_pickle) as runner:
        outputs = runner.infer(feeds)
        seconds = runner.inference_time
    if rank or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        leave()
    if rank != 0:
        return
    table = Table("output", "shape", "dtype", title=f"outputs ({seconds * 1e3:.2f} ms)")
    for name, value in outputs.items():
        table.add_row(name, escape(str(list(value.shape))), str(value.dtype))
    console.print(table)
    if output_path:
        np.savez(output_path, **outputs)
        console.print(f"wrote {output_path}")


@main.command("generate")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--prompt", multiple=True, help="Text to continue (repeat for a batch).")
@click.option(
    "--prompt-file",
    type=click.Path(path_type=Path),
    help="A text file whose every non-empty line is a prompt.",
)
@click.option("--batch", type=click.IntRange(min=1), help="Repeat the prompt(s) to this batch.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(min=1))
@click.option("--top-p", type=float)
@click.option("--seed", type=int, help="Seed of the sampler.")
@_trust_options("trust_pickle")
@friendly_errors
def generate_command(out, prompt, prompt_file, batch, max_new_tokens, sample, temperature, top_k,
                     top_p, seed, trust_pickle):  # fmt: skip
    """Continue text with OUT (an artifact with a KV cache and a tokenizer), printing it as it
    comes, then tokens/s."""
    import time

    from moec.errors import InputError
    from moec.runtime.load import load
    from moec.runtime.text import ArtifactTokenizer

    prompts = list(prompt)
    if prompt_file is not None:
        try:
            prompts += [line for line in prompt_file.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--prompt-file {prompt_file} is not a readable text file") from e
    if not prompts:
        raise InputError("no prompt: give --prompt TEXT or --prompt-file FILE")
    if batch is not None:
        prompts = [prompts[i % len(prompts)] for i in range(batch)]
    with load(out, trust_pickle=trust_pickle) as runner:
        if runner.decoding is None:
            runner.generate([[0]])  # raises the error that names --no-kv-cache
        eos = runner.decoding.eos_token_id
        tokenizer = ArtifactTokenizer(out, runner.manifest.files, eos[0] if eos else 0)
        ids, mask = tokenizer.encode(prompts)
        streamed: list[int] = []
        shown = ""

        def stream(tokens) -> None:
            nonlocal shown
            streamed.append(int(tokens[0]))
            text = tokenizer.decode(streamed)
            if len(prompts) == 1 and text.startswith(shown):
                console.print(text[len(shown) :], end="", highlight=False, markup=False)
                shown = text

        if len(prompts) == 1:
            console.print(prompts[0], end="", highlight=False, markup=False, style="bold")
        start = time.perf_counter()
        tokens = runner.generate(
            ids, max_new_tokens, attention_mask=mask, streamer=stream, do_sample=sample,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        )  # fmt: skip
        seconds = time.perf_counter() - start
    new = tokens.shape[1] - ids.shape[1]
    if len(prompts) == 1:
        console.print()
    else:
        for text, row in zip(prompts, tokens[:, ids.shape[1] :], strict=True):
            console.print(f"[bold]{escape(text)}[/]{escape(tokenizer.decode(row))}")
    console.print(
        f"{new * len(prompts)} tokens in {seconds:.2f} s: {new * len(prompts) / seconds:.1f} "
        f"tokens/s (batch {len(prompts)}, prefill included)"
    )


@main.command("inspect")
@click.argument("target")
@_trust_options("trust_pickle", "trust_remote_code")
@click.option(
    "--calib",
    type=click.Path(path_type=Path),
    help="Also show each block's expert load on this calibration data (see compile --calib).",
)
@click.option("--calib-samples", type=int, help="Use at most this many calibration rows.")
@click.option(
    "--plot", type=click.Path(path_type=Path), help="With --calib: write a PNG of the load."
)
@friendly_errors
def inspect_command(target, calib, calib_samples, plot, **trust):
    """Show the MoE blocks of a SRC, or what an artifact directory OUT holds."""
    if Path(target).is_dir():
        _inspect_artifact(Path(target))
        return
    if plot is not None and calib is None:
        raise click.UsageError("--plot shows the expert load on calibration data: give --calib")
    from moec.compiler.sources import load_source
    from moec.models import find_moe_blocks
    from moec.models.block_calls import recorded_block_calls

    source = load_source(target, **trust).model_source
    model = source.model
    refused: dict[str, str] = {}
    with recorded_block_calls(model, tuple(source.example_inputs)):
        blocks = find_moe_blocks(model, refused)
    table = Table(
        "block",
        "class",
        "experts",
        "top-k",
        "routing and experts",
        "params",
        title=f"MoE blocks of {target}",
    )
    expert_params = 0
    for b in blocks:
        n = sum(t.numel() for _, t in b.weights.items())
        expert_params += n
        table.add_row(
            b.name or "(model)",
            type(b.module).__name__,
            str(b.spec.num_experts),
            str(b.spec.top_k),
            b.spec.summary(),
            f"{n:,}",
        )
    console.print(table)
    total = sum(p.numel() for p in model.parameters())
    console.print(f"{len(blocks)} MoE block(s); {expert_params:,} of {total:,} parameters in them")
    for reason in refused.values():
        console.print(f"not converted (it would run as the model's own ops): {reason}")
    if calib is not None:
        _print_expert_load(source, target, calib, calib_samples, plot)


def _print_expert_load(source, target: str, calib: Path, samples: int | None, plot) -> None:
    from moec.passes.calibration import load_calibration
    from moec.passes.expert_load import expert_load, plot_expert_load

    data = load_calibration(calib, source, samples)
    loads = expert_load(source, data)
    given = data.fit.size + data.held_out.size if data.fit.dtype.kind in "iu" else 0  # ids
    table = Table(
        "block",
        "tokens",
        "never used",
        "busiest (share)",
        "quietest (share)",
        "max/mean",
        "top gate mass",
        title=escape(f"expert load on {calib}"),
    )
    for load in loads:
        freq, mass = load.frequency, load.gate_mass
        table.add_row(
            load.block or "(model)",
            str(load.tokens),
            str(int((freq == 0).sum())),
            f"{freq.argmax()} ({freq.max():.1%})",
            f"{freq.argmin()} ({freq.min():.1%})",
            f"{load.imbalance:.2f}",
            f"{mass.argmax()} ({mass.max():.3f})",
        )
    console.print(table)
    if loads and 0 < loads[0].tokens < given:
        console.print(
            f"note: the load is counted on the first {loads[0].tokens} of the {given} tokens "
            "given (--calib-samples N takes fewer rows)"
        )
    if plot is not None:
        plot_expert_load(loads, plot, f"expert load of {target} on {calib.name}")
        console.print(f"plot written to {plot}")


def _inspect_artifact(path: Path) -> None:
    from moec.runtime.manifest import Manifest

    m = Manifest.read(path)
    console.print(f"artifact {path}: target {m.target}, source {m.source.get('spec')}")
    io = Table("", "name", "dtype", "shape", "role", title="signature")
    for kind, specs in (("in", m.inputs), ("out", m.outputs)):
        for t in specs:
            role = "" if t.role == "main" else t.role
            io.add_row(kind, t.name, t.dtype, escape(t.shape_str()), role)
    console.print(io)
    blocks = Table("block", "class", "routing and experts", "lowering", "why", title="MoE blocks")
    for b in m.blocks:
        blocks.add_row(
            b.get("name") or "(model)",
            str(b.get("class")),
            str(b.get("summary")),
            str(b.get("lowering")),
            str(b.get("reason")),
        )
    console.print(blocks)
    if m.settings:
        settings = Table("setting", "value", title="compiled with")
        for flag, value in CompileSettings.from_dict(m.settings).rows():
            settings.add_row(flag, escape(value))
        console.print(settings)
    if m.build:
        _print_build(m.build, path)
    files = Table("file", "size", "sha256")
    for role, f in m.files.items():
        only = " (verify only)" if role in registry.REFERENCE_FILE_ROLES else ""
        files.add_row(f"{role}: {f.path}{only}", human_bytes(f.bytes), f.sha256[:16])
    console.print(files)
    unlisted = m.unlisted_files(path)
    if unlisted:
        console.print(f"[yellow]note:[/] files the manifest does not list: {', '.join(unlisted)}")


def _print_build(build: dict, path: Path) -> None:
    """A TensorRT artifact's engine and profile (the manifest's ``build`` section)."""
    dims = ", ".join(
        f"{name} {low}..{opt}..{high}" for name, (low, opt, high) in build["dims"].items()
    )
    console.print(
        f"TensorRT profile (min..opt..max): {escape(dims)}; precision {build['precision']}"
    )
    engine = build.get("engine")
    if engine:
        console.print(
            f"engine: TensorRT {engine['tensorrt']}, {escape(engine['gpu'])} (compute "
            f"capability {engine['compute_capability']})"
        )
    else:
        console.print(f"engine: not built yet; on the deployment machine: moec build-engine {path}")


def _status(passed: bool) -> str:
    return "[green]ok" if passed else "[red]FAIL"


main.add_command(check_trt_command)
main.add_command(build_engine_command)

if __name__ == "__main__":
    main()
