"""profiles/decode_step.py: the kernel summary of a profiled decode step (CPU: a hand-made trace)."""
from __future__ import annotations

import pytest

from profiles import decode_step


TRACE = {"traceEvents": [
    {"ph": "X", "cat": "kernel", "name": "_mla_decode_split_kernel", "dur": 10.0},
    {"ph": "X", "cat": "kernel", "name": "_mla_decode_split_kernel", "dur": 12.0},
    {"ph": "X", "cat": "kernel", "name": "nvjet_tst_64x8_64x16_4x1_v_bz_splitK_TNT", "dur": 5.0},
    {"ph": "X", "cat": "kernel", "name": "_grouped_ffn_kernel", "dur": 30.0},
    {"ph": "X", "cat": "kernel", "name": "void at::native::vectorized_elementwise_kernel<4>", "dur": 1.5},
    {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "dur": 100.0},  # not a kernel
    {"ph": "i", "cat": "kernel", "name": "instant", "dur": 0},
]}


def test_kernel_events_keep_only_kernels():
    names = [n for n, _ in decode_step.kernel_events(TRACE)]
    assert names == ["_mla_decode_split_kernel", "_mla_decode_split_kernel",
                     "nvjet_tst_64x8_64x16_4x1_v_bz_splitK_TNT", "_grouped_ffn_kernel",
                     "void at::native::vectorized_elementwise_kernel<4>"]


def test_summary_per_step_and_categories():
    rows = decode_step.summarize(decode_step.kernel_events(TRACE), steps=2)
    assert [r.name for r in rows][:2] == ["_grouped_ffn_kernel", "_mla_decode_split_kernel"]
    mla = rows[1]
    assert mla.calls_per_step == pytest.approx(1.0) and mla.us_per_step == pytest.approx(11.0)
    assert mla.category == "mla_decode"
    cats = decode_step.by_category(rows)
    assert list(cats) == ["moe experts", "mla_decode", "gemm", "elementwise"]
    assert cats["gemm"] == pytest.approx((0.5, 2.5))


@pytest.mark.parametrize("name, category", [
    ("_rope_rows_kernel", "rope_and_cache"), ("_moe_route_kernel", "moe routing"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel", "norm"),
    ("something_new", "other")])
def test_categorize(name, category):
    assert decode_step.categorize(name) == category


def test_markdown_states_idle_time():
    rows = decode_step.summarize(decode_step.kernel_events(TRACE), steps=1)
    busy = sum(r.us_per_step for r in rows)
    run = {"batch": 1, "context": 64, "steps": 1, "step_us": 100.0, "kernel_us": busy, "idle_us": 100.0 - busy,
           "kernels_per_step": 5, "categories": {k: {"kernels": n, "us": us} for k, (n, us) in
                                                 decode_step.by_category(rows).items()},
           "kernels": [r.__dict__ for r in rows]}
    text = decode_step.markdown("H200", "tiny", 2, [run])
    assert "idle 41.5 µs (41.5%)" in text and "| moe experts | 1 | 30.0 | 30.0% |" in text


def test_render_rebuilds_markdown_and_categories(tmp_path):
    import json

    rows = decode_step.summarize(decode_step.kernel_events(TRACE), steps=1)
    run = {"batch": 1, "context": 64, "steps": 1, "step_us": 100.0, "kernel_us": 58.5, "idle_us": 41.5,
           "kernels_per_step": 5, "categories": {"stale": {"kernels": 5, "us": 58.5}},
           "kernels": [dict(r.__dict__, category="stale") for r in rows]}
    folder = tmp_path / "some-gpu"
    folder.mkdir()
    (folder / "decode_step.json").write_text(json.dumps(
        {"device": "GPU", "preset": "tiny", "layers": 2, "torch": "x", "runs": [run]}))
    assert decode_step.render(tmp_path) == 0
    data = json.loads((folder / "decode_step.json").read_text())
    assert "stale" not in data["runs"][0]["categories"] and data["runs"][0]["kernels"][0]["category"] == "moe experts"
    assert "| moe experts | 1 | 30.0 | 30.0% |" in (folder / "decode_step.md").read_text()
    assert decode_step.render(tmp_path / "nothing") == 1
