"""Every benchmark runs at its smoke size and prints the figures it promises.

Only that the numbers exist and are sane is checked, never how fast anything is: the
benchmarks compare variants side by side themselves, and a fixed time would fail on a
busy machine. The Ray benchmarks start their own local cluster (marked slow).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def run_smoke(script: str, *args: str, timeout: int = 180) -> dict:
    return run_bench(script, "--smoke", *args, timeout=timeout)


def run_bench(script: str, *args: str, timeout: int = 180) -> dict:
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.05", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(BENCH / script), "--json", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(result: dict, numbers: set[str], ratios: set[str]) -> None:
    missing = (numbers | ratios) - result.keys()
    assert not missing, f"missing keys {sorted(missing)}"
    for key in numbers | ratios:
        value = result[key]
        assert isinstance(value, (int, float)) and math.isfinite(value), f"{key}={value!r}"
    for key in ratios:
        assert result[key] > 0, f"{key}={result[key]!r}"


def test_step_smoke() -> None:
    result = run_smoke("step.py")
    check(result, {"bf16_final_loss_rel_diff", "loadavg_start", "loadavg_end"},
          {"ratio_vs_plain", "mfu_fp32", "mfu_bf16", "peak_gflops_fp32", "peak_gflops_bf16",
           "bf16_speedup", "autopoietic_ratio", "tokens_per_s_ours_fp32", "tokens_per_s_plain_fp32"})
    # Same init, same batches, same dropout masks: the two precisions must agree closely
    # on a few steps, or the comparison is not like for like.
    assert result["bf16_final_loss_rel_diff"] < 0.05


def test_flops_per_token_counts_every_matmul_weight() -> None:
    import torch.nn as nn

    from bench.flops import flops_per_token
    from hlbd_ray.model import APTModel, ModelSpec

    spec = ModelSpec(vocab_size=50, d_model=32, num_heads=4, num_layers=2, d_ff=64, max_seq_len=16)
    model = APTModel(spec)
    # Every Linear weight, plus the tied head (the embedding matrix) once.
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    matmul += model.tok_emb.weight.numel()
    assert flops_per_token(spec, 16) == 6 * matmul + 12 * spec.num_layers * spec.d_model * 16


def test_step_imports_no_ray() -> None:
    """bench/step.py must run where only torch is installed: its imports never load Ray."""
    # sys.path[0] = bench/, as `python bench/step.py` sets it.
    code = ("import sys, runpy; sys.argv = ['step.py', '--help']; sys.path.insert(0, 'bench')\n"
            "try:\n    runpy.run_path('bench/step.py', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "assert 'ray' not in sys.modules, 'ray was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_gpu_script_parses() -> None:
    script = BENCH / "gpu.sh"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "bench/step.py" in script.read_text()


@pytest.mark.slow
@pytest.mark.extended
def test_ray_overhead_smoke() -> None:
    result = run_smoke("ray_overhead.py")
    check(result, set(), {"train_overhead_ratio", "tune_overhead_ratio", "startup_s",
                          "direct_tokens_per_s", "train_tokens_per_s", "tune_tokens_per_s"})


@pytest.mark.slow
@pytest.mark.extended
def test_ray_floor_smoke() -> None:
    result = run_smoke("ray_floor.py", timeout=300)
    variants = result["variants"]
    assert set(variants) == {"tune_function", "train_in_tune"}
    for row in variants.values():
        assert row["trials"] == 2 and row["errors"] == 0
        check(row, {"processes_per_trial"}, {"launch_s", "life_s", "cpu_s_per_trial", "trials_per_min"})
        assert row["launch_s"] < row["life_s"]
    # A plain Tune trial is one new process; Train inside it adds at least the Train
    # worker, its synchronization actor, Tune's queue actor and the controller.
    assert variants["tune_function"]["processes_per_trial"] < 2
    assert variants["train_in_tune"]["processes_per_trial"] >= 4
    assert variants["train_in_tune"]["cpu_by_kind"]["RayTrainWorker"] > 0


@pytest.mark.slow
@pytest.mark.extended
def test_sweep_smoke() -> None:
    result = run_smoke("sweep.py")
    check(result, {"idle_slots_s"}, {"step_share", "wall_s", "step_s", "launch_s", "startup_per_trial_s",
                                     "overhead_cpu_s_per_trial", "launch_per_trial_s", "cpu_s"})
    assert result["trials"] == 2 and result["step_share"] < 1.0
    # The process tree's CPU covers the steps' own and the trial processes it saw.
    assert 0 < result["step_cpu_s"] < result["cpu_s"] and result["cpu_by_process"]["RayTrainWorker"] > 0
    assert result["torch_imports"].get("RayTrainWorker") == 2


@pytest.mark.slow
def test_data_smoke(hlbd_dir: Path) -> None:
    from hlbd_ray.data import load_pairs

    result = run_smoke("data.py", "--data", "hlbd:full", "hlbd:hardcore")
    check(result, set(), {"load_s", "per_trial_get_ms", "per_trial_reread_s"})
    # It loaded the real files, every distinct pair of them (counted here, independently).
    assert result["files"] and {Path(f).parent for f in result["files"]} == {hlbd_dir}
    pairs, _ = load_pairs(result["files"], generated_per_module=0, seed=0)
    assert result["pairs"] == len(pairs) and 0 < result["train_pairs"] < result["pairs"]


@pytest.mark.slow
def test_render_smoke() -> None:
    result = run_smoke("render.py")
    check(result, {"render_s", "render_cpu_s", "poke_ms", "render_interval_s"},
          {"ingest_slowdown_ratio", "core_share"})
    # The bound holds by construction: a render starts at most every max(every_s,
    # render / max_share) seconds.
    assert result["core_share"] <= result["max_share"] + 1e-9
    assert result["renders_beside"] >= 1


@pytest.mark.slow
@pytest.mark.extended
def test_load_smoke() -> None:
    result = run_smoke("load.py", timeout=400)
    assert result["all_rows"] is True and result["trials"] == [2, 4]
    check({"growth": result["rss_growth_mb_per_trial"], "peak": max(result["peak_rss_mb"])},
          {"growth"}, {"peak"})


@pytest.mark.slow
@pytest.mark.extended
def test_two_nodes_runs_the_same_sweep_on_both_layouts() -> None:
    result = run_bench("two_nodes.py", timeout=400)   # its one size is a smoke sweep already
    check(result, {"best_val_loss_diff"}, {"wall_ratio_2x1_over_1x2"})
    one, two = result["1x2"], result["2x1"]
    assert one["nodes"] == [2] and two["nodes"] == [1, 1]
    # The seeded search drew the same configs on both clusters; every trial reported.
    assert result["same_configs"] and one["trials"] == two["trials"] == 4
    assert all(math.isfinite(r["best_val_loss"]) and r["wall_s"] > 0 for r in (one, two))


# One search seed is `python bench/regret.py --smoke` as documented (under a minute); two
# check that each seed gets its row against the one ground truth (extended).
@pytest.mark.slow
@pytest.mark.parametrize("seeds", [1, pytest.param(2, marks=pytest.mark.extended)])
def test_regret_smoke(tmp_path, seeds) -> None:
    result = run_smoke("regret.py", "--search-seeds", str(seeds), "--set", "sweep.rung_min_peers=1",
                       "--out", str(tmp_path), timeout=300)
    check(result, {"seed_noise", "search_regret", "confirmed_regret"},
          {"grid_cpu_s", "grid_machine_s", "search_cpu_ratio", "confirmed_cpu_ratio"})
    assert result["overrides"] == ["sweep.rung_min_peers=1"]
    assert result["configs"] == 2 and result["search_regret"] >= 0 and result["confirmed_regret"] >= 0
    # The confirmation adds trials: it never costs less than the search it confirms.
    assert result["confirmed_cpu_ratio"] > result["search_cpu_ratio"]
    # One row per search seed against the one ground truth; seed 0's is the headline.
    for key in ("search", "confirmed"):
        assert len(result[f"{key}_regret_by_seed"]) == seeds == len(result[f"{key}_cpu_ratio_by_seed"])
        assert result[f"{key}_regret_by_seed"][0] == result[f"{key}_regret"]
        assert result[f"{key}_within_noise"] == sum(r < 1 for r in result[f"{key}_regret_by_seed"])
        # The whole machine over the search's span holds at least its trials' slot time.
        for cpu, machine in zip(result[f"{key}_cpu_ratio_by_seed"], result[f"{key}_machine_ratio_by_seed"]):
            assert machine * result["grid_machine_s"] >= cpu * result["grid_cpu_s"] - 1.0
    # The replay of the same searches from the ground truth's epochs picks what they picked.
    replayed = run_smoke("regret_replay.py", str(tmp_path), "--seeds", str(seeds), "--set", "sweep.rung_min_peers=1")
    assert replayed["regret_by_seed"] == result["search_regret_by_seed"]
    assert replayed["seed_noise"] == result["seed_noise"] and all(r > 0 for r in replayed["cpu_ratio_by_seed"])
    assert len(replayed["machine_ratio_by_seed"]) == seeds and all(r > 0 for r in replayed["machine_ratio_by_seed"])


def test_regret_counts_in_seed_noise_against_the_one_seed_grid() -> None:
    regret = load_bench("regret")

    def trial(heads, lr, loss, seconds):
        return {"d_model": 64, "num_heads": heads, "lr": lr, "last_val_loss": loss, "last_time_total_s": seconds,
                "config_json": json.dumps({"arch": f"64x{heads}", "lr": lr})}

    seed0 = [trial(2, 1e-3, 1.0, 10), trial(4, 1e-3, 1.4, 20)]
    seed1 = [trial(2, 1e-3, 1.2, 12), trial(4, 1e-3, 1.6, 25)]     # means 1.1 and 1.5, variances 0.02
    truth, noise, grid_cpu = regret.ground_truth([seed0, seed1])
    assert truth == pytest.approx({("64x2", 1e-3): 1.1, ("64x4", 1e-3): 1.5})
    assert noise == pytest.approx(math.sqrt(0.02)) and grid_cpu == 30     # the one-seed grid's trials only
    assert regret.regret_of({"arch": "64x2", "lr": 1e-3}, truth, noise) == 0
    assert regret.regret_of({"arch": "64x4", "lr": 1e-3}, truth, noise) == pytest.approx(0.4 / math.sqrt(0.02))


def test_a_ground_truth_that_ran_both_seeds_in_one_sweep_is_refused(tmp_path) -> None:
    regret = load_bench("regret")
    copies = [[{"config_json": json.dumps({"arch": "64x2", "lr": 1e-3, "__trial_index__": c})} for c in (0, 1)]]
    with pytest.raises(SystemExit, match="several copies per config in one sweep"):
        regret.one_seed_each(tmp_path, copies)
    with pytest.raises(SystemExit, match="no ground truth sweep truth, truth-seed1"):
        regret.read_truth(tmp_path)


def test_machine_time_charges_every_slot_from_the_first_start_to_the_last_end(tmp_path) -> None:
    regret = load_bench("regret")

    def trial(trial_id, folder, start, seconds):
        # Tune's result.json: whole-second timestamps, one result per second of the run.
        rows = [{"trial_id": trial_id, "timestamp": int(start + t), "time_total_s": t}
                for t in [*range(1, int(seconds)), seconds]]
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))

    trial("a", "a", 1000.0, 10.0)
    trial("b", "b", 1000.0, 30.0)            # a slot idle from 1010 to 1030
    trial("c", "confirm/c", 1040.0, 10.0)    # both idle from 1030 to 1040
    spans = regret.trial_spans(tmp_path)
    assert regret.machine_s(spans, {"a", "b"}) == pytest.approx(2 * 30, abs=2 * 1.0)
    assert regret.machine_s(spans, {"a", "b", "c"}) == pytest.approx(2 * 50, abs=2 * 1.0)
    with pytest.raises(SystemExit, match="found for 1 of 2 trials"):
        regret.machine_s(spans, {"a", "gone"})


def test_the_replay_runs_the_sweeps_searcher_and_scheduler_over_recorded_epochs() -> None:
    from hlbd_ray.config import SpaceConfig, load_config

    replay = load_bench("regret_replay")
    space = SpaceConfig(d_model=[64], num_heads=[2, 4], lr_values=[1e-3, 3e-3])
    # (val_loss, time_total_s) at epochs 1-2; 64x4 lr 3e-3 is best at the end, worst after epoch 1.
    curves = {("64x2", 1e-3): [(2.0, 10), (1.5, 15)], ("64x4", 1e-3): [(2.1, 10), (1.6, 15)],
              ("64x2", 3e-3): [(2.2, 10), (1.4, 15)], ("64x4", 3e-3): [(2.3, 10), (1.2, 15)]}

    def run(*overrides: str):
        cfg = load_config(ROOT / "conf" / "smoke.yaml", ["train.epochs=2", "sweep.search=optuna", "sweep.num_samples=4",
                                                         *overrides])
        cfg.sweep.space = space
        return replay.replay(curves, cfg)

    # FIFO: all four configs, once each, run both epochs; the best final trial wins.
    fifo, fifo_span = run("sweep.scheduler=fifo")
    assert sorted((r.key, r.epochs, r.slot_s) for r in fifo) == sorted((key, 2, 15) for key in curves)
    assert replay.outcome(curves, fifo) == (("64x4", 3e-3), 60)
    # Two slots, four 15 s trials back to back: the search ends at 30 s, as the grid does.
    assert fifo_span == replay.grid_span(curves) == 30
    # ASHA (Ray's rule): the first trial at the rung continues, someone worse than the rung's
    # median is cut after epoch 1 and costs that epoch alone; the pick is the best finisher.
    asha, asha_span = run("sweep.scheduler=asha", "sweep.grace_period=1", "sweep.reduction_factor=2")
    assert len({r.key for r in asha}) == 4 and asha[0].epochs == 2 and any(r.epochs == 1 for r in asha)
    finishers = [r.key for r in asha if r.epochs == 2]
    pick, slot_time = replay.outcome(curves, asha)
    assert pick == min(finishers, key=lambda key: curves[key][1][0])
    assert slot_time == sum(curves[r.key][r.epochs - 1][1] for r in asha) < 60
    # The machine is charged both slots over the span: here the last trial runs on beside
    # an idle slot, so the search costs the grid's 30 s of machine for less slot time.
    assert slot_time / 2 < asha_span == 30
    # Promotion-based ASHA: the first two trials pause after epoch 1 (no one to rank
    # against); from the rung's top half the best is resumed and pays the launch again
    # (10 - (15 - 10) = 5 s), the others are stopped at the end.
    promo, _ = run("sweep.scheduler=promotion", "sweep.grace_period=1", "sweep.reduction_factor=2")
    finished = [r for r in promo if r.epochs == 2]
    assert len(finished) >= 1 and all(r.epochs in (1, 2) for r in promo)
    resumed = [r for r in finished if r.slot_s > 15]
    assert all(r.slot_s == 10 + 5 + 5 for r in resumed)
    assert replay.outcome(curves, promo)[1] == sum(r.slot_s for r in promo)


def load_bench(name: str):
    """A bench script as a module (bench/ on sys.path while it loads, as when run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.mark.parametrize("overrides", [[], ["sweep.space.lr_values=[1e-4,3e-3]"]])
def test_time_to_quality_peer_searches_the_sweeps_space(overrides: list[str]) -> None:
    """The peer builds its Optuna space and trial configs without Ray; they must be what
    Ray's OptunaSearch makes of hlbd_ray.search.param_space, and trial_config's."""
    from dataclasses import replace

    from ray.tune.search.optuna import OptunaSearch

    from hlbd_ray.config import load_config
    from hlbd_ray.search import param_space
    from hlbd_ray.sweep import trial_config

    ttq = load_bench("time_to_quality")
    cfg = load_config(str(ROOT / "conf" / "sweep.yaml"), overrides)
    assert ttq.peer_space(cfg.sweep) == OptunaSearch.convert_search_space(param_space(cfg.sweep))
    params = {"arch": "192x3", "lr": 1.5e-3}
    assert ttq.peer_trial_config(cfg, params, 2) == replace(
        trial_config(cfg, params), train=replace(trial_config(cfg, params).train, cpus_per_worker=2))


@pytest.mark.slow
@pytest.mark.extended
def test_time_to_quality_smoke() -> None:
    # An override goes into both sides' job arguments and is recorded with the run.
    result = run_smoke("time_to_quality.py", "--set", "sweep.reduction_factor=4", timeout=300)
    check(result, {"overhead_cpu_s_per_trial", "ttq_ratio"}, {"wall_ratio", "ttq_ratio_common", "step_share"})
    ours, peer = result["ours"], result["peer"]
    # The same trials on both sides: fewer than TPE's 10 random start-up draws, same seed.
    assert ours["trials"] == peer["trials"] == 4 and result["same_configs"]
    assert result["overrides"] == ["sweep.reduction_factor=4"]
    for side in (ours, peer):
        losses = [loss for _, loss, _ in side["curve"]]
        times = [t for t, _, _ in side["curve"]]
        assert losses and losses == sorted(losses, reverse=True) and times == sorted(times)
        assert 0 < times[-1] <= side["wall_s"] and losses[-1] == side["best_val_loss"]
        assert 0 < side["step_share"] <= 1 and side["tree_cpu_s"] > 0
    assert result["wall_ratio"] == pytest.approx(peer["wall_s"] / ours["wall_s"])
    assert result["ttq_ratio_common"] == pytest.approx(result["peer_time_to_common_s"] / result["ours_time_to_common_s"])
    expected = result["peer_time_to_target_s"] / result["ours_time_to_target_s"] if result["ours_reached_target"] else 0
    assert result["ttq_ratio"] == pytest.approx(expected)
    assert result["target_val_loss"] == peer["best_val_loss"]
