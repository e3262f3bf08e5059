"""Run-file parsing: defaults, every rejection path, overrides, round trip, presets."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcngd import config
from hpcngd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_and_round_trip() -> None:
    cfg = config.loads("")
    assert cfg == config.Config()
    assert config.loads(config.to_toml(cfg)) == cfg


def test_values_are_typed_and_canonical() -> None:
    cfg = config.loads("[optim]\nlr = 1\nmilestones = [1, 2.5]\n[data]\ncrop_scale = [0.5, 1]")
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.milestones == (1.0, 2.5)
    assert cfg.data.crop_scale == (0.5, 1.0)
    with pytest.raises(AttributeError):
        cfg.optim.lr = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[optim]\nlr = -0.1", "optim.lr = -0.1: must be > 0.0"),
        ("[optim]\nlr = 0", "optim.lr = 0.0: must be > 0.0"),
        ("[optim]\nmomentum = 1.0", "optim.momentum = 1.0: must be < 1.0"),
        ("[optim]\nlrr = 0.1", "optim.lrr is not a known key"),
        ("[optimizer]\nlr = 0.1", "[optimizer] is not a known section"),
        ("[optimizer]", "[optimizer] is not a known section"),
        ("lr = 0.1", "lr = 0.1: top-level keys must be [sections]"),
        ("[data]\nbatch_size = 12.5", "data.batch_size = 12.5: must be an integer"),
        ("[data]\nbatch_size = true", "data.batch_size = true: must be an integer"),
        ("[data]\nbatch_size = 0", "data.batch_size = 0: must be >= 1"),
        ("[data]\nimage_size = 100000", "data.image_size = 100000: must be <= 2048"),
        ('[optim]\nlr = "fast"', 'optim.lr = "fast": must be a number'),
        ("[optim]\nlr = inf", "optim.lr = inf: must be a finite number"),
        ("[data]\nflip = 1", "data.flip = 1: must be true or false"),
        ("[run]\nname = 3", "run.name = 3: must be a string"),
        ('[run]\nname = "a b"', 'run.name = "a b": must be non-empty'),
        ('[run]\nname = ""', 'run.name = "": must be non-empty'),
        ('[run]\nname = ".."', "not be '.' or '..'"),  # the run directory would be output_dir's parent
        ("[run]\nseed = 10000000000000000", "run.seed = 10000000000000000: must be <= 2147483647"),
        ("[data]\nval_resize = 16", "data.val_resize = 16: must be 0 or >= data.image_size = 32"),
        ('[model]\narch = "vgg"', 'model.arch = "vgg": must be one of "resnet8"'),
        ("[model]\nnum_classes = 1", "model.num_classes = 1: must be >= 2"),
        ('[data]\nsource = "folder"', 'data.path = "": is required when data.source = "folder"'),
        ("[data]\ncrop_scale = [0.9, 0.1]", "data.crop_scale = [0.9, 0.1]: must be [low, high]"),
        ("[data]\ncrop_scale = [0.0, 1.0]", "data.crop_scale = [0.0, 1.0]: must be > 0.0"),
        ("[data]\ncrop_scale = 0.5", "data.crop_scale = 0.5: must be a list of numbers"),
        ("[data]\nmean = [0.5, 0.5]", "data.mean = [0.5, 0.5]: must have 3 values"),
        (
            "[data]\nbatch_size = 8\nmicro_batch_size = 16",
            "data.micro_batch_size = 16: must be <= data.batch_size",
        ),
        ("[optim]\nmomentum = 0.0\nnesterov = true", "optim.nesterov = true: needs optim.momentum > 0"),
        ("[optim]\ne_start = 3.0\ne_end = 2.0", "optim.e_end = 2.0: must be > optim.e_start = 3.0"),
        ("[optim]\nmilestones = [3, 1]", "optim.milestones = [3.0, 1.0]: must be increasing"),
        (
            "[optim]\nwarmup_epochs = 1.0\nwarmup_init_lr = 1.0",
            "optim.warmup_init_lr = 1.0: must be <= optim.lr",
        ),
        ('[optim]\nschedule = "linear"', 'optim.schedule = "linear": must be one of'),
        ("[checkpoint]\nkeep_last = 0", "checkpoint.keep_last = 0: must be >= 1"),
        ('[checkpoint]\nresume = ""', 'checkpoint.resume = "": must be "auto", "never" or the path'),
        (
            '[checkpoint]\nallow_changes = ["model.depth"]',
            "checkpoint.allow_changes = [\"model.depth\"]: 'model.depth' is not a section.key",
        ),
        ("[ngd]\ndamping = 0", "ngd.damping = 0.0: must be > 0.0"),
        ('[ngd]\nfisher = "kfac"', 'ngd.fisher = "kfac": must be one of "empirical", "mc"'),
        ("[ngd]\nema_decay = 1.5", "ngd.ema_decay = 1.5: must be <= 1.0"),
        ("[ngd]\nstale_max_interval = 0", "ngd.stale_max_interval = 0: must be >= 1"),
        ("[ngd]\ndamping = 1e-3\ndamping_end = 1e-2", "ngd.damping_end = 0.01: must be <= ngd.damping"),
        ('[ngd]\nexclude = "fc"', 'ngd.exclude = "fc": must be a list of strings'),
        (
            '[optim]\nname = "spngd"\nnesterov = true',
            "optim.nesterov = true: is not part of the SP-NGD update",
        ),
        ("[comm]\nbucket_mb = 0", "comm.bucket_mb = 0.0: must be > 0.0"),
        ("[log]\nevery_steps = 0", "log.every_steps = 0: must be >= 1"),
        ("[run\n", "not valid TOML"),
    ],
)
def test_rejections_name_the_key(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.loads(text, "bad.toml")
    message = str(info.value)
    assert message.startswith("bad.toml: ")
    assert needle in message
    assert "\n" not in message


def test_world_size_checks() -> None:
    cfg = config.loads("[data]\nbatch_size = 12\nmicro_batch_size = 3")
    config.check_world_size(cfg, 1)
    config.check_world_size(cfg, 4)
    with pytest.raises(ConfigError, match=r"data.batch_size = 12: must be divisible by the 5 ranks"):
        config.check_world_size(cfg, 5)
    with pytest.raises(ConfigError, match=r"data.micro_batch_size = 3: must divide the per-rank batch"):
        config.check_world_size(cfg, 6)
    nodes = config.loads("[data]\nbatch_size = 12\n[comm]\nranks_per_node = 4")
    config.check_world_size(nodes, 4)
    with pytest.raises(ConfigError, match=r"comm.ranks_per_node = 4: must divide the 6 ranks"):
        config.check_world_size(nodes, 6)
    # one image a forward pass: fine while the last map is larger than 1x1 (was a traceback mid-step)
    small = config.loads('[model]\narch = "resnet50d"\n[data]\nbatch_size = 4\nimage_size = 32')
    config.check_world_size(small, 2)
    with pytest.raises(
        ConfigError, match=r"^data.batch_size / ranks = 1 image a forward pass at data.image_"
    ):
        config.check_world_size(small, 4)
    one = config.loads(
        '[model]\narch = "resnet50d"\n[data]\nbatch_size = 4\nmicro_batch_size = 1\nimage_size = 32'
    )
    with pytest.raises(
        ConfigError, match=r"^data.micro_batch_size = 1 image .* resnet50d's last BatchNorm would"
    ):
        config.check_world_size(one, 1)
    config.check_world_size(config.loads("[data]\nbatch_size = 4\nmicro_batch_size = 1\nimage_size = 33"), 1)
    config.check_world_size(config.loads("[data]\nbatch_size = 4\nmicro_batch_size = 1\nimage_size = 8"), 1)


def test_a_trainer_refuses_what_check_world_size_refuses() -> None:
    """A Trainer built without the CLI (tests, benchmarks) makes the same check: a micro-batch larger
    than a rank's batch was a silent, smaller BatchNorm batch, so 8-rank runs parted from 1-rank ones."""
    import sys

    from mpi4py import MPI

    sys.path.insert(0, str(ROOT / "tests" / "mpi"))
    from runs import make_trainer

    refused = pytest.raises(ConfigError, match=r"^data.micro_batch_size = 3: must divide the per-rank batch ")
    with refused, make_trainer(MPI.COMM_SELF, ["data.micro_batch_size=3"]):
        pass


def test_overrides_are_typed_by_the_schema() -> None:
    cfg = config.loads(
        "[optim]\nlr = 0.5",
        overrides=[
            "optim.lr=0.25",
            "data.batch_size=64",
            "data.flip=false",
            "run.name=007",  # a string field stays a string, even if it looks like a number
            'run.output_dir="/tmp/x y"',
            "optim.milestones=[1, 2]",
        ],
    )
    assert cfg.optim.lr == 0.25
    assert cfg.data.batch_size == 64
    assert cfg.data.flip is False
    assert cfg.run.name == "007"
    assert cfg.run.output_dir == "/tmp/x y"
    assert cfg.optim.milestones == (1.0, 2.0)


def test_a_key_that_may_be_a_string_or_a_boolean() -> None:
    """comm.cuda_aware = "auto" | true | false, from the file and from --set."""
    assert config.loads("").comm.cuda_aware == "auto"
    assert config.loads("[comm]\ncuda_aware = true").comm.cuda_aware is True
    assert config.loads("", overrides=["comm.cuda_aware=false"]).comm.cuda_aware is False
    assert config.loads("", overrides=["comm.cuda_aware=auto"]).comm.cuda_aware == "auto"
    for bad in ('"yes"', "1"):
        with pytest.raises(ConfigError, match=r"comm.cuda_aware = .*: must be"):
            config.loads(f"[comm]\ncuda_aware = {bad}")


def test_moved_keys_of_older_run_files_still_read() -> None:
    """data.channels_last became run.channels_last: older run files (and the run files stored in older
    checkpoints) still load, with the value in its new place; a contradiction is refused."""
    old = config.loads("[data]\nchannels_last = true\nbatch_size = 64")
    assert old.run.channels_last is True and old.data.batch_size == 64
    assert config.loads("[run]\nchannels_last = true\n[data]\nchannels_last = true").run.channels_last
    with pytest.raises(ConfigError, match=r"data.channels_last = true: moved to run.channels_last"):
        config.loads("[run]\nchannels_last = false\n[data]\nchannels_last = true")


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        ("optim.lr=abc", "--set optim.lr=abc: not a valid value"),
        ("optim.lr=-1", "optim.lr = -1.0: must be > 0.0"),
        ("optim.bogus=1", "optim.bogus is not a known key"),
        ("nosection=1", "expected section.key=value"),
        ("optim.lr", "expected section.key=value"),
        ("data.batch_size=1.5", "data.batch_size = 1.5: must be an integer"),
    ],
)
def test_bad_overrides(item: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        config.loads("", "f.toml", overrides=[item])
    assert needle in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope.toml: cannot read run file"):
        config.load(tmp_path / "nope.toml")


@pytest.mark.parametrize("path", sorted((ROOT / "runs").glob("*.toml")), ids=lambda p: p.name)
def test_presets_validate(path: Path) -> None:
    cfg = config.load(path)
    assert config.loads(config.to_toml(cfg)) == cfg
