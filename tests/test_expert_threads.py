"""Experts side by side: when they run that way, that results come back in order and equal the
block run in turn, and that the caller's thread count is left as it was."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from moe_cases import CASES, H, random_weights

from moec.ir.expert_kernels import ONEDNN
from moec.ir.moe_op import moe_eager
from moec.runtime import expert_threads
from moec.runtime.expert_threads import MIN_ROWS_PER_EXPERT, run_side_by_side, side_by_side
from moec.runtime.weight_packing import PackedMoE


def test_side_by_side_needs_threads_experts_and_rows():
    many = MIN_ROWS_PER_EXPERT
    assert side_by_side([many, many], threads=2)
    assert side_by_side([2 * many - 1, 1], threads=2)  # the mean counts
    assert not side_by_side([many, many - 1], threads=2)
    assert not side_by_side([many, many], threads=1)
    assert not side_by_side([4 * many], threads=2)  # one expert: nothing to put beside it


def test_results_come_back_in_task_order():
    rows = [5, 1, 9, 3, 7, 2]
    tasks = [(r, lambda i=i: torch.full((1,), float(i))) for i, r in enumerate(rows)]
    assert [float(t) for t in run_side_by_side(tasks, threads=2)] == [0, 1, 2, 3, 4, 5]


def test_tasks_run_at_the_same_time_off_the_callers_thread():
    """Each task waits for the other: they finish only if they run side by side."""
    both = threading.Barrier(2, timeout=30)
    seen = []

    def fn():
        seen.append(threading.get_ident())
        both.wait()
        return torch.zeros(1)

    run_side_by_side([(1, fn), (1, fn)], threads=2)
    assert len(set(seen)) == 2 and threading.get_ident() not in seen


def test_workers_are_single_threaded_and_the_caller_keeps_its_count():
    threads = 3  # a pool of its own, built here
    torch.set_num_threads(2)
    counts = run_side_by_side([(1, torch.get_num_threads)] * threads, threads=threads)
    assert counts == [1] * threads
    assert torch.get_num_threads() == 2
    fresh = ThreadPoolExecutor(1).submit(torch.get_num_threads).result()
    assert fresh == 2  # threads started later begin with the caller's count again


def test_a_task_error_reaches_the_caller():
    def fail():
        raise ValueError("expert failed")

    with pytest.raises(ValueError, match="expert failed"):
        run_side_by_side([(1, fail), (1, lambda: torch.zeros(1))], threads=2)


@pytest.mark.skipif(not ONEDNN, reason="this torch is built without oneDNN")
@pytest.mark.parametrize("case", ["gpt-oss", "qwen-shared-gated", "plain-gelu-tanh", "post-norm"])
def test_packed_block_side_by_side_computes_the_ops_kernel(case, monkeypatch):
    """Every call with two experts or more goes side by side (the threshold lowered to one row)."""
    monkeypatch.setattr(expert_threads, "MIN_ROWS_PER_EXPERT", 1)
    spec, weights = CASES[case], random_weights(case, seed=6)
    packed = PackedMoE(spec, weights)
    ran = []
    real = expert_threads.run_side_by_side
    monkeypatch.setattr(
        "moec.runtime.weight_packing.run_side_by_side",
        lambda tasks, threads: ran.append(len(tasks)) or real(tasks, threads),
    )
    torch.set_num_threads(2)
    for tokens in (1, 7, 40):
        x = torch.randn(1, tokens, H, generator=torch.Generator().manual_seed(tokens))
        with torch.no_grad():
            out, chosen = packed(x)
            expected, expected_chosen = moe_eager(spec, weights, x)
        assert float((out - expected).norm() / expected.norm()) <= 1e-6
        assert torch.equal(chosen, expected_chosen)
    assert ran and max(ran) > 1


@pytest.mark.skipif(not ONEDNN, reason="this torch is built without oneDNN")
def test_side_by_side_experts_add_their_gated_rows_at_their_tokens(monkeypatch):
    """Side by side, each expert gathers its tokens, scales its output and adds it into the
    block's output: the same sum as one gather, the experts in turn and one scatter-add."""
    spec, weights = CASES["qwen-shared-gated"], random_weights("qwen-shared-gated", seed=7)
    packed = PackedMoE(spec, weights)
    counts = [3, 0, 5, 2] + [0] * (spec.num_experts - 4)
    g = torch.Generator().manual_seed(7)
    x, start = torch.randn(6, H, generator=g), torch.randn(6, H, generator=g)
    tokens = torch.tensor([0, 2, 5, 0, 1, 2, 3, 4, 1, 5])  # each expert's tokens, ascending
    gates = torch.rand(len(tokens), generator=g)
    torch.set_num_threads(2)
    with torch.no_grad():
        in_turn = packed.routed(start.clone(), x, tokens, counts, gates)
        expected = start.index_add(0, tokens, packed.experts(x[tokens], counts) * gates[:, None])
        monkeypatch.setattr(expert_threads, "MIN_ROWS_PER_EXPERT", 1)
        assert expert_threads.side_by_side([3, 5, 2], 2)
        side = packed.routed(start.clone(), x, tokens, counts, gates)
    assert torch.allclose(in_turn, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(side, expected, rtol=1e-5, atol=1e-6)
