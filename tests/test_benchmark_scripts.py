"""Every benchmark script imports on the CPU, and the layer sweep runs there at a toy size: the GPU
calls that run them are few and costly.

Each import runs in its own process, as the scripts do on the device, because absl flags are
process-global (two scripts that both define ``--out`` cannot share one)."""

import itertools
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", SCRIPTS)
def test_imports(name):
    result = subprocess.run([sys.executable, "-c", f"import benchmarks.{name}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_layer_sweep_interleaves_and_records_errors(tmp_path):
    """`layers.py`'s sweep on the CPU at S=64: every variant is timed (compiled first, then in
    interleaved rounds) or records why it could not run (cuDNN has no CPU backend); the MHA
    baseline's fwd+bwd choices are its own flag's."""
    out = tmp_path / "layers.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/layers.py", "--seq_lens=64", "--tokens=64", "--causal=1",
         "--methods=MHA 16:16,CCA C=2 (8:8)", "--impls=xla,cudnn", "--bwd_impls=xla",
         "--baseline_bwd_impls=xla,cudnn",
         "--prologues=jnp", "--repeats=2", f"--out={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["MHA 16:16", "CCA C=2 (8:8)"]
    for row in rows:
        xla = next(r for name, r in row["results"].items() if name.startswith("xla"))
        cudnn = next(r for name, r in row["results"].items() if name.startswith("cudnn"))
        assert xla["fwd"]["ms"] > 0 and xla["fwdbwd"]["ms"] > 0
        assert len(xla["fwd"]["round_ms"]) == 2 and row["fwd"]["spread_pct"] >= 0
        assert "error" in cudnn["fwd"] and "ms" not in cudnn["fwd"]
        assert row["fwd"]["impl"].startswith("xla")
        # The baseline (MHA) tries --baseline_bwd_impls for fwd+bwd, the CCA layer --bwd_impls.
        assert ("fwdbwd" in cudnn) == (row["method"] == "MHA 16:16")


def test_time_interleaved_takes_the_jobs_in_turn_and_records_errors():
    """Each round takes every job once (its warm-up call, then its sync of calls), every other
    round in reverse order; a job that raises is recorded and left out of the later rounds."""
    import jax.numpy as jnp

    from benchmarks.timing import time_interleaved, with_tflops
    calls = []

    def job(name):
        def fn(x):
            calls.append(name)
            if name == "broken":
                raise ValueError("no kernel")
            return x
        return fn

    x = (jnp.zeros(()),)
    res = time_interleaved([(job("a"), x, 2), (job("broken"), x, 2), (job("b"), x, 3)],
                           repeats=2, warmup=1)
    # Round 0 in order; then round 1 in reverse, round 2 in order again.
    assert calls == (["a"] * 3 + ["broken"] + ["b"] * 4 + ["b"] * 4 + ["a"] * 3
                     + ["a"] * 3 + ["b"] * 4)
    assert res[1] == {"error": "ValueError: no kernel"}
    for r in (res[0], res[2]):
        assert len(r["round_ms"]) == 2 and r["ms"] > 0
    assert with_tflops(res[0], 2e9)["tflops"] == 2e9 / res[0]["ms"] / 1e9
    assert with_tflops(res[1], 2e9) == res[1]


def test_time_interleaved_ends_the_process_on_a_stalled_job():
    """A job turn longer than stall_s (+ window_s) ends the process with STALL_EXIT_CODE and
    names the job; turns within the limit run to the end (a hung GPU kernel cannot be
    interrupted, so the watchdog exits rather than raising)."""
    script = textwrap.dedent("""
        import time
        from benchmarks.timing import time_interleaved
        def job(sleep_s):
            def fn():
                time.sleep(sleep_s)
                return None
            return fn
        res = time_interleaved([(job(0.01), (), 1), (job(0.01), (), 1)], repeats=1,
                               labels=["quick a", "quick b"], stall_s=0.5)
        print("finished", sorted(res[0]))
        time_interleaved([(job(0.01), (), 1), (job(30), (), 1)], repeats=1,
                         labels=["quick", "S=4096 16:16 causal hung_config"], stall_s=0.5)
        print("not reached")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    from benchmarks.timing import STALL_EXIT_CODE
    assert proc.returncode == STALL_EXIT_CODE, proc.stderr[-2000:]
    assert "finished ['ms', 'round_ms']" in proc.stdout
    assert ("STALLED: S=4096 16:16 causal hung_config (round 0, warm-up) ran for more than "
            "0.5 s") in proc.stdout
    assert "not reached" not in proc.stdout


def test_time_interleaved_labels_must_name_every_job():
    from benchmarks.timing import time_interleaved
    with pytest.raises(ValueError, match="labels must name every job: got 1 labels for 2 jobs"):
        time_interleaved([(print, (), 1), (print, (), 1)], repeats=1, labels=["a"])


def test_time_interleaved_windows_run_each_job_for_its_window():
    """With window_s, a round gives each job syncs back to back for window_s seconds and counts
    their median; the warm-up round is still one sync per job."""
    import time

    import jax.numpy as jnp

    from benchmarks.timing import time_interleaved
    calls, starts = [], {}

    def job(name, sleep_s):
        def fn(x):
            calls.append(name)
            starts.setdefault(name, []).append(time.perf_counter())
            time.sleep(sleep_s)
            return x
        return fn

    x = (jnp.zeros(()),)
    res = time_interleaved([(job("a", 0.001), x, 2), (job("b", 0.004), x, 2)], repeats=2,
                           warmup=1, window_s=0.05)
    assert calls[:6] == ["a"] * 3 + ["b"] * 3  # the warm-up round: a call and a sync each
    # Then b's window, a's (round 1 runs in reverse), a's again, b's: each a whole number of
    # 2-call syncs lasting >= 0.05 s, so a (1 ms calls) makes more of them than b (4 ms).
    runs = [(name, len(list(group))) for name, group in itertools.groupby(calls[6:])]
    assert [name for name, _ in runs] == ["b", "a", "b"]  # a's two windows are adjacent
    assert all(n % 2 == 0 and n >= 2 for _, n in runs)
    assert runs[1][1] > 2 * runs[0][1]
    assert 1.0 < res[0]["ms"] < 4.0 < res[1]["ms"] < 10.0
    assert len(res[0]["round_ms"]) == 2


def test_power_sampler_parses_nvidia_smi_lines():
    from benchmarks.nvidia_smi import parse_sample
    quantities = ["mhz", "watts", "power_capped"]
    stamp, values = parse_sample("2026/12/02 05:30:01.250, 1755, 698.12, Active\n", quantities)
    assert values == {"mhz": 1755.0, "watts": 698.12, "power_capped": 1.0}
    assert stamp % 1 == 0.25
    assert parse_sample("2026/12/02 05:30:01.250, [N/A], 1.5, Not Active", quantities)[1] == {
        "watts": 1.5, "power_capped": 0.0}
    assert parse_sample("timestamp, clocks.sm [MHz], power.draw [W], x", quantities) is None
    assert parse_sample("1755, 698.12", quantities) is None


def test_plot_attention_joins_runs_and_tables_ours_against_the_best_peer(tmp_path):
    """Two attention.py runs (one per S) give one plot and one Markdown table: a row per cell,
    ours over the fastest peer (the hybrid is ours, not a peer), bold only when ours is ahead."""
    def run(path, seq, ours_fwd, hybrid):
        def res(tflops):
            return {"ms": 1.0, "tflops": tflops}
        results = {"mosaic": {"fwd": res(ours_fwd), "fwdbwd": res(500.0)},
                   "cudnn": {"fwd": res(600.0), "fwdbwd": res(490.0)},
                   "tokamax": {"fwd": {"error": "no kernel"}, "fwdbwd": res(480.0)}}
        if hybrid:
            results["mosaic_fwd_cudnn_bwd"] = {"fwdbwd": res(520.0)}
        paired = {"fwd": dict(peer="cudnn", median=0.98, min=0.97, max=1.01)}
        path.write_text(json.dumps(dict(device="H", date="d", jax="j", rows=[dict(
            seq=seq, batch=1, hq=8, hkv=2, causal=True, results=results,
            ours_vs_best_peer=paired)])))
        return str(path)

    out = tmp_path / "both.png"
    result = subprocess.run(
        [sys.executable, "benchmarks/plot_attention.py",
         run(tmp_path / "a.json", 4096, 588.0, True), run(tmp_path / "b.json", 16384, 612.0, False),
         f"--out={out}", "--table"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.stat().st_size > 0
    lines = result.stdout.splitlines()
    assert lines[0] == str(out)
    assert "forward + backward: ccajax / ccajax fwd + cuDNN bwd / cuDNN / tokamax" in lines[1]
    assert lines[3] == ("| 4k 8:2 causal | 588 / 600 / err | 0.980 | 0.98 (0.97-1.01) cudnn "
                        "| 500 / 520 / 490 / 480 | **1.020** |  |")
    assert lines[4].startswith("| 16k 8:2 causal | 612 / 600 / err | **1.020** |")
    assert lines[4].endswith("| 500 / - / 490 / 480 | **1.020** |  |")  # -: no hybrid run


def test_ncu_summary_counts_opcodes_and_spills(tmp_path):
    """`ncu_attention_fwd.py --summarize` on a source page of two kernels (ncu's CSV layout):
    executed instructions per opcode (a predicate is not the opcode), local loads and stores
    with the hottest first, and the opcodes that differ most between the kernels."""
    header = '"Address","Source","Instructions Executed","Warp Stall Sampling (All Samples)"'
    ours = ['"0x10","HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ","1,000","50"',
            '"0x20","@P0 STL [R1+0x8], R12","30","2"', '"0x30","LDL R12, [R1+0x8]","45","9"',
            '"0x40","@!P1 LDL.64 R14, [R1+0x10]","5","1"']
    theirs = ['"0x10","HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ","1,000","40"',
              '"0x20","IMAD.U32 R2, R3, 0x2, RZ","7","0"']
    sass = tmp_path / "sass.csv"
    sass.write_text("\n".join(['==PROF== Connected to process 1', '"Kernel Name","ours",', header,
                               *ours, '"Kernel Name","theirs",', header, *theirs]) + "\n")
    out = tmp_path / "out.json"
    result = subprocess.run(  # its own process: the script defines absl flags
        [sys.executable, "benchmarks/ncu_attention_fwd.py", f"--summarize={sass}", f"--out={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "local memory: 50 loads, 30 stores executed" in result.stdout
    summary = json.loads(out.read_text())
    spills = summary["kernels"]["ours"]["local_memory"]
    assert (spills["loads"], spills["stores"]) == (50, 30)
    assert [h[0] for h in spills["hottest"]] == ["0x30", "0x20", "0x40"]
    assert summary["kernels"]["theirs"]["local_memory"] == dict(loads=0, stores=0, hottest=[])
    assert summary["kernels"]["ours"]["executed"] == 1080
    assert summary["largest_differences"][0] == ["LDL", 45, 0]
    assert summary["kernels"]["ours"]["samples"] == 62


def test_paired_speedup_compares_round_by_round():
    from benchmarks.timing import paired_speedup
    ours, peer = dict(round_ms=[1.0, 2.0, 1.0]), dict(round_ms=[1.1, 2.4, 0.9])
    assert paired_speedup(ours, peer) == dict(median=1.1, min=0.9, max=1.2)
    assert paired_speedup(ours, dict(error="no kernel")) is None


def test_write_sweep_records_the_command_and_replaces_the_file_whole(tmp_path, monkeypatch):
    from benchmarks.timing import write_sweep
    monkeypatch.setattr(sys, "argv", ["benchmarks/tune_attention_fwd.py", "--seq_lens=4096"])
    path = tmp_path / "sweep.json"
    write_sweep(str(path), [{"seq": 4096}], repeats=3, complete=False, configs={"default": {}})
    first = json.loads(path.read_text())
    assert first["command"] == "benchmarks/tune_attention_fwd.py --seq_lens=4096"
    assert (first["complete"], first["rows"], first["configs"]) == (False, [{"seq": 4096}],
                                                                    {"default": {}})
    write_sweep(str(path), [{"seq": 4096}, {"seq": 16384}], repeats=3, configs={})
    last = json.loads(path.read_text())
    assert last["complete"] and len(last["rows"]) == 2
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def _layer_run(path, rows):
    """A layers.py result with rows (method, causal, seq, fwd ms, fwd+bwd ms)."""
    path.write_text(json.dumps(dict(device="test", date="d", command="c", rows=[
        dict(method=m, causal=c, seq=s, batch=1, fwd={"ms": f}, fwdbwd={"ms": fb})
        for m, c, s, f, fb in rows])))
    return str(path)


def test_layer_merge_pairs_each_row_with_its_own_runs_mha(tmp_path):
    """`plot_layers.py --merge`: a row's speed-up is against the MHA layer of the run that timed
    it, the first file wins a cell both timed, and the table and plots read the merged file."""
    from benchmarks import plot_layers  # `python -m pytest` puts the repository on the path

    first = _layer_run(tmp_path / "a.json", [("MHA 16:16", True, 1024, 2.0, 8.0),
                                             ("CCGQA 8:2", True, 1024, 1.0, 2.0)])
    second = _layer_run(tmp_path / "b.json", [("MHA 16:16", True, 1024, 4.0, 4.0),
                                              ("CCGQA 8:2", True, 1024, 9.0, 9.0),
                                              ("CCA C=4 (4:4)", True, 1024, 1.0, 2.0),
                                              ("MHA 16:16", False, 2048, 3.0, 6.0),
                                              ("CCA C=4 (4:4)", False, 2048, 1.5, 1.0)])
    no_mha = _layer_run(tmp_path / "c.json", [("CCGQA 4:2", True, 1024, 1.0, 1.0)])
    merged = plot_layers.merge(str(tmp_path / "m.json"), first, second, no_mha)
    rows = json.loads(pathlib.Path(merged).read_text())["rows"]
    rows = {(r["method"], r["causal"], r["seq"]): r for r in rows}
    assert len(rows) == 6 and "speedup" not in rows["CCGQA 4:2", True, 1024]
    assert rows["CCGQA 8:2", True, 1024]["speedup"] == {"fwd": 2.0, "fwdbwd": 4.0}
    assert rows["CCGQA 8:2", True, 1024]["source"] == "a.json"
    assert rows["CCA C=4 (4:4)", True, 1024]["speedup"] == {"fwd": 4.0, "fwdbwd": 2.0}
    assert rows["MHA 16:16", True, 1024]["fwd"]["ms"] == 2.0
    assert rows["CCA C=4 (4:4)", False, 2048]["speedup"] == {"fwd": 2.0, "fwdbwd": 6.0}
    table = plot_layers.table(merged).splitlines()
    assert table[0] == "| mask | S (B) | MHA ms | CCGQA 8:2 | CCA C=4 (4:4) | CCGQA 4:2 |"
    assert table[2] == "| causal | 1k (1) | 2 / 8 | 2.00 / 4.00 | 4.00 / 2.00 | - |"
    assert table[3] == "| none | 2k (1) | 3 / 6 | - | 2.00 / 6.00 | - |"
    one_run = plot_layers.table(second).splitlines()  # not merged: paired within the run
    assert one_run[2] == "| causal | 1k (1) | 4 / 4 | 0.44 / 0.44 | 4.00 / 2.00 |"
    for png in (plot_layers.plot(merged), plot_layers.plot_speedup_curves(merged),
                plot_layers.plot_speedups(str(tmp_path / "bars.png"), second)):
        assert pathlib.Path(png).stat().st_size > 0


def test_backward_table_compares_our_backward_with_the_hybrid(tmp_path):
    """`plot_layers.py --backward_table`: fwd+bwd ms of "mosaic" against "mosaic_fwd_cudnn_bwd"
    (with or without a "/prologue" suffix), bold where ours is at least as fast, "-" where a
    cell lacks either."""
    from benchmarks import plot_layers

    def row(method, causal, seq, results):
        return dict(method=method, causal=causal, seq=seq, batch=16384 // seq, results={
            name: {"fwdbwd": {"ms": ms}} for name, ms in results.items()})

    run = tmp_path / "run.json"
    run.write_text(json.dumps(dict(rows=[
        row("MHA 16:16", True, 16384, {"mosaic": 10.0, "mosaic_fwd_cudnn_bwd": 10.5}),
        row("CCGQA 8:2", True, 16384, {"mosaic/mosaic": 5.0, "mosaic_fwd_cudnn_bwd/mosaic": 4.0}),
        row("MHA 16:16", False, 4096, {"mosaic": 6.0}),
        dict(parity=[])])))
    assert plot_layers.backward_table(str(run)).splitlines() == [
        "| mask, S (B) | MHA 16:16 | CCGQA 8:2 |", "|---|---|---|",
        "| full 4k (4) | - | - |",
        "| causal 16k (1) | 10.000 / 10.500 = **1.050** | 5.000 / 4.000 = 0.800 |"]


def test_flop_ratio_is_mhas_flops_over_the_layers():
    """The speed-up plot's ideal: 1 for MHA itself, near C for CCA at long S (attention
    dominates), higher at short S for CCGQA 8:2, whose k/v projections are 4x smaller still."""
    from benchmarks.plot_layers import flop_ratio

    def ratio(method, seq, causal=True, mode="fwd"):
        return flop_ratio(dict(method=method, seq=seq, batch=max(1, 16384 // seq),
                               causal=causal), mode)

    assert ratio("MHA 16:16", 4096) == 1.0
    for mode in ("fwd", "fwdbwd"):
        assert 1.95 < ratio("CCA C=2 (8:8)", 65536, mode=mode) < 2.0
        assert 3.9 < ratio("CCA C=4 (4:4)", 65536, causal=False, mode=mode) < 4.0
        assert ratio("CCGQA 8:2", 1024, mode=mode) > ratio("CCGQA 8:2", 65536, mode=mode) > 2

