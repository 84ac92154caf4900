"""The config schema and the shipped configs: each loads, prepares its data, builds every
model it trains and fits its machine; bad keys, values and overrides are refused."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from hlbd_ray.config import CONF_DIR, Config, LossOn, from_dict, load_config, space_pairs, to_dict, to_yaml, validate
from hlbd_ray.data import make_batch, num_batches, prepare_data
from hlbd_ray.errors import UserError
from hlbd_ray.model import ModelSpec, build_model


@pytest.mark.parametrize("path", sorted(CONF_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads_against_the_schema(path):
    cfg = load_config(path)
    assert cfg.model.d_model % cfg.model.num_heads == 0
    assert cfg.cluster.dashboard_host == "127.0.0.1"       # never exposed by what we ship


SHIPPED = ["train.yaml", "sweep.yaml", "smoke.yaml", "gpu.yaml"]


def test_shipped_yamls_cover_the_jobs():
    assert set(SHIPPED) <= {p.name for p in CONF_DIR.glob("*.yaml")}


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_config_prepares_its_data_and_builds_every_model_it_trains(name):
    cfg = load_config(CONF_DIR / name)
    validate(cfg, sweep=True)               # each may also be swept: lr_min above the floor
    data = prepare_data(cfg.data, cfg.train.max_len)
    stats = data.dataset_stats
    assert stats["truncated_train"] == stats["truncated_val"] == 0   # max_len cuts no answer
    longest = make_batch(data.train, data.train.lengths.argmax(keepdims=True), cfg.train.loss_on)
    # Its own architecture (a training run) and every pair its sweep samples.
    archs = {(cfg.model.d_model, cfg.model.num_heads), *space_pairs(cfg.sweep.space)}
    for d_model, num_heads in sorted(archs):
        model_cfg = replace(cfg.model, d_model=d_model, num_heads=num_heads)
        model = build_model(ModelSpec.from_config(model_cfg, stats["vocab_size"], stats["max_len"]))
        with torch.no_grad():
            logits = model.eval()(longest.inputs)
        assert logits.shape == (1, longest.inputs.shape[1], stats["vocab_size"])
        assert torch.isfinite(logits).all()


def test_the_shipped_configs_fit_the_machines_they_are_written_for():
    from hlbd_ray.sweep import plan_resources
    from hlbd_ray.trainer import runs_that_fit

    two_cpus = {"CPU": 2.0}
    assert runs_that_fit(load_config(CONF_DIR / "train.yaml").train, two_cpus) >= 1
    # The CPU sweeps run two one-CPU trials at once on two cores...
    for name in ("sweep.yaml", "smoke.yaml"):
        assert plan_resources(load_config(CONF_DIR / name), two_cpus).max_concurrent == 2
    # ...and the GPU sweep four trials on one GPU, a quarter each.
    gpu = load_config(CONF_DIR / "gpu.yaml")
    assert plan_resources(gpu, {"CPU": 16.0, "GPU": 1.0}).max_concurrent == 4
    # One check serves the training job and the sweep: a run that can never be placed is refused.
    with pytest.raises(UserError, match="one run needs 2 CPUs and 0.25 GPUs .* has 16 CPUs and 0 GPUs"):
        runs_that_fit(gpu.train, {"CPU": 16.0})


def test_the_smoke_config_stays_a_smoke_test():
    """The tests run conf/smoke.yaml end to end several times: it must stay tiny."""
    cfg = load_config(CONF_DIR / "smoke.yaml")
    data = prepare_data(cfg.data, cfg.train.max_len)
    model = build_model(ModelSpec.from_config(cfg.model, len(data.build_tokenizer()), data.dataset_stats["max_len"]))
    batches = cfg.sweep.num_samples * cfg.train.epochs * num_batches(data.train, cfg.train.batch_size)
    assert sum(p.numel() for p in model.parameters()) < 50_000
    assert batches <= 200 and len(data.val) <= 50               # micro-batches over all trials
    assert cfg.sweep.max_concurrent_trials <= 2 and cfg.train.num_workers == 1


def test_overrides_win_over_the_file_and_defaults_fill_the_rest():
    cfg = load_config(CONF_DIR / "train.yaml", ["model.num_heads=4", "train.lr=1e-3", "data.paths=[a.json]"])
    assert (cfg.model.num_heads, cfg.train.lr, cfg.data.paths) == (4, 1e-3, ["a.json"])
    assert cfg.report.points_per_epoch == 100


@pytest.mark.parametrize("overrides, message", [
    (["model.num_heads=12"], "model.d_model=256 is not divisible by model.num_heads=12; "
                             "valid head counts for d_model=256: [1, 2, 4, 8, 16, 32, 64, 128, 256]"),
    (["model.nmu_heads=8"], "Key 'nmu_heads' not in 'ModelConfig'"),
    (["train.lr=fast"], "train.lr"),
    (["train.epochs=2.5"], "train.epochs"),
    (["train.lr"], "use key=value"),
    (["train.lr=[1,"], "bad override syntax"),
    (["train.lr=0"], "train.lr must be > 0"),
    (["train.batch_size=-4"], "train.batch_size must be > 0"),
    (["train.loss_on=prompt"], "train.loss_on"),
    (["model.attention=sparse"], "model.attention"),
    (["data.val_fraction=1.5"], "data.val_fraction"),
    (["train.report_every_steps=1000", "train.grad_accum=4"], "bounded report size"),
    (["train.precision=fp8"], "train.precision: Invalid value 'fp8', expected one of [auto, fp32, bf16, fp16]"),
    (["train.max_len=abc"], "train.max_len must be 'auto' or an integer > 0, got 'abc'"),
    (["train.max_len=1.5"], "train.max_len must be 'auto' or an integer > 0, got 1.5"),
    (["train.max_len=true"], "train.max_len must be 'auto' or an integer > 0, got True"),
    (["train.max_len_cap=0"], "train.max_len_cap must be > 0"),
    # The sweep section (moved here with its checks from search.check_space).
    (["sweep.search=bayes"], "sweep.search"),
    (["sweep.scheduler=pbt"], "sweep.scheduler"),
    (["sweep.mode=avg"], "sweep.mode"),
    (["sweep.space.lr_min=1e-2", "sweep.space.lr_max=1e-3"], "lr_min <= lr_max"),
    (["sweep.space.num_heads=[]"], "must not be empty"),
    (["sweep.space.d_model=[256]", "sweep.space.num_heads=[3,5,12]"],
     "no valid pair: no num_heads in [3, 5, 12] divides any d_model in [256] "
     "(d_model=256 allows num_heads in [1, 2, 4, 8, 16, 32, 64, 128, 256])"),
    (["sweep.num_samples=0"], "num_samples"),
    (["sweep.search=grid", "sweep.num_samples=4"],
     "sweep.num_samples=4 does not apply to grid search, which runs every point once"),
    (["sweep.repeats=0"], "sweep.repeats must be >= 1"),
    (["sweep.confirm.top_k=-1"], "sweep.confirm.top_k must be >= 0"),
    (["sweep.confirm.seeds=0"], "sweep.confirm.seeds >= 1"),
    (["train.checkpoints_to_keep=0"], "train.checkpoints_to_keep must be > 0"),
    (["sweep.reduction_factor=1"], "reduction_factor"),
    (["sweep.startup_trials=0"], "sweep.startup_trials must be >= 1, got 0"),
    (["sweep.name=../escape"], "plain folder name"),
])
def test_bad_values_are_one_line_user_errors(overrides, message):
    with pytest.raises(UserError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_sweep_refuses_learning_rates_below_the_schedule_floor_a_run_does_not():
    cfg = load_config(None, ["train.lr=1e-2", "train.min_lr=1e-3", "sweep.space.lr_min=1e-4"])
    validate(cfg)                                     # a training run never samples lr_min
    with pytest.raises(UserError, match=r"sweep.space.lr_min=0.0001 is below train.min_lr=0.001"):
        validate(cfg, sweep=True)


def test_choices_are_enums_in_the_config_and_plain_strings_outside():
    cfg = load_config(CONF_DIR / "sweep.yaml", ["train.loss_on=all"])
    assert cfg.train.loss_on is LossOn.all and cfg.train.loss_on == "all"
    assert f"{cfg.sweep.search} search" == "optuna search"
    plain = to_dict(cfg)
    choices = [plain["train"]["precision"], plain["train"]["loss_on"], plain["model"]["attention"],
               plain["sweep"]["search"], plain["sweep"]["scheduler"], plain["sweep"]["mode"]]
    assert choices == ["auto", "all", "standard", "optuna", "promotion", "min"]
    assert all(type(value) is str for value in choices)   # what Ray and checkpoints get
    assert "  search: optuna\n" in to_yaml(cfg) and "loss_on: all\n" in to_yaml(cfg)


def test_a_yaml_with_an_unknown_key_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(UserError, match=rf"config file {path}: .*learning_rate"):
        load_config(path)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_dict_and_yaml_round_trips_keep_every_value():
    cfg = load_config(CONF_DIR / "smoke.yaml", ["train.lr=0.002"])
    assert from_dict(to_dict(cfg)) == cfg
    assert isinstance(cfg, Config)
    assert "lr: 0.002" in to_yaml(cfg)


def test_max_len_is_auto_or_an_integer_and_the_resolved_integer_round_trips():
    assert load_config(None).train.max_len == "auto"
    explicit = load_config(None, ["train.max_len=128"])
    assert type(explicit.train.max_len) is int and explicit.train.max_len == 128
    resolved = replace(explicit, train=replace(explicit.train, max_len=232))
    assert "  max_len: 232\n" in to_yaml(resolved) and from_dict(to_dict(resolved)).train.max_len == 232
