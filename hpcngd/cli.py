"""Command line: ``hpcngd RUN.toml [--set section.key=value ...]`` and its helpers.

    hpcngd RUN.toml [--set k=v ...]          train (under mpirun -n N, or as one rank)
    hpcngd validate RUN.toml [--set ...] [--world-size N]
                                             print the resolved run file; exit 0, or 2 if invalid
    hpcngd data demo OUT_DIR                 write the small procedural demo data set
    hpcngd plan RUN.toml --world-size N [--ranks-per-node M]
                                             print the layer-to-rank plan and bytes per step (no MPI)
    hpcngd inspect CKPT.h5                   print what a checkpoint holds (no MPI, no torch)
    hpcngd eval RUN.toml --checkpoint CKPT [--precision fp32|fp16|bf16] [--per-layer] [--json OUT]
                                             top-1/top-5/loss of a checkpoint's model on the validation
                                             set under autocast; --per-layer: layer latency vs fp32 (no MPI)

This is the only module that names ``MPI.COMM_WORLD``. Error policy:
- bad input found while setting up (run file, data folder, run directory, checkpoint) is agreed on by
  all ranks, printed once by rank 0 as one line, and every rank exits with code 2; so is an error that
  every rank meets together later (a checkpoint that cannot be written, state that holds NaN);
- bad input met later (an unreadable image) is printed as one line by the rank that met it, and any
  other uncaught exception with its traceback; either way the whole job is aborted (``MPI_Abort``)
  with a non-zero code naming the rank, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, TypeVar

from hpcngd import __version__, config, versions
from hpcngd.errors import AgreedError, Diverged, UserError, agree

if TYPE_CHECKING:
    from mpi4py import MPI

    from hpcngd.comm.topology import Topology
    from hpcngd.data import Dataset
    from hpcngd.runlock import RunLock
    from hpcngd.stopping import StopSignals
    from hpcngd.train import Trainer

T = TypeVar("T")
COMMANDS = ("train", "validate", "plan", "inspect", "eval", "data")
EXIT_USER_ERROR = 2
EXIT_FAILURE = 1
EXIT_STOPPED = 3  # stopped by SIGTERM/SIGUSR1 after writing a checkpoint: requeue to continue
EXIT_DIVERGED = 4  # a non-finite loss (or fp16 overflow step after step): the checkpoints are kept


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hpcngd",
        description="SP-NGD training of ResNets over MPI ranks (`hpcngd RUN.toml` trains, as train).",
    )
    p.add_argument("--version", action="version", version=f"hpcngd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    overrides = argparse.ArgumentParser(add_help=False)
    overrides.add_argument("run_file", help="TOML run file")
    overrides.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one run-file key (repeatable)",
    )
    sub.add_parser("train", parents=[overrides], help="train (the default command)")
    val = sub.add_parser("validate", parents=[overrides], help="check a run file and print it resolved")
    val.add_argument("--world-size", type=_positive, default=0, help="also check against this rank count")
    plan = sub.add_parser("plan", parents=[overrides], help="print the layer-to-rank plan (no MPI needed)")
    plan.add_argument("--world-size", type=_positive, required=True, help="ranks of the planned job")
    plan.add_argument("--ranks-per-node", type=_positive, default=0, help="default: comm.ranks_per_node or 1")
    inspect = sub.add_parser("inspect", help="print what a checkpoint file holds")
    inspect.add_argument("checkpoint")
    ev = sub.add_parser("eval", parents=[overrides], help="evaluate a checkpoint at fp32/fp16/bf16 (no MPI)")
    ev.add_argument("--checkpoint", required=True, help="checkpoint file (ckpt-*.h5)")
    ev.add_argument("--precision", choices=("fp32", "fp16", "bf16"), help="autocast (default: run.precision)")
    ev.add_argument("--per-layer", action="store_true", help="also fp32, and time every layer at both")
    ev.add_argument(
        "--batch-size",
        type=_positive,
        default=0,
        help="default: data.micro_batch_size or min(batch_size, 256)",
    )
    ev.add_argument("--max-batches", type=_positive, default=0, help="evaluate the first N batches only")
    ev.add_argument(
        "--repeats", type=_positive, default=5, help="timed forwards per precision, median taken (default: 5)"
    )
    ev.add_argument("--json", metavar="OUT.json", help="also write every figure to this file")
    data = sub.add_parser("data", help="data set tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    demo = data_sub.add_parser("demo", help="write the procedural demo data set")
    demo.add_argument("out_dir", help="a new or empty folder; train/ and val/ go into it")
    demo.add_argument("--train-per-class", type=_positive, default=300, help="default: 300 (10 classes)")
    demo.add_argument("--val-per-class", type=_positive, default=50, help="default: 50")
    demo.add_argument("--size", type=_positive, default=64, help="image side in pixels (default: 64)")
    demo.add_argument("--seed", type=_natural, default=0, help="default: 0")
    return p


def _natural(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hpcngd`` console script; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and not args_list[0].startswith("-") and args_list[0] not in COMMANDS:
        first = args_list[0]
        if not (first.endswith(".toml") or os.sep in first or os.path.exists(first)):  # a misspelled command
            _parser().error(
                f"unknown command {first!r} (commands: {', '.join(COMMANDS)}; `hpcngd RUN.toml` trains)"
            )
        args_list.insert(0, "train")  # `hpcngd RUN.toml` means `hpcngd train RUN.toml`
    args = _parser().parse_args(args_list)
    if args.command == "validate":
        return _one_process(lambda: _validate(args))
    if args.command == "plan":
        return _one_process(lambda: _plan(args))
    if args.command == "inspect":
        return _one_process(lambda: _inspect(args))
    if args.command == "eval":
        return _one_process(lambda: _eval(args))
    if args.command == "data":
        return _one_process(lambda: _demo(args))
    from hpcngd.stopping import StopSignals

    # From before MPI starts (a signal during set-up stops the run after step 1) to the process's end.
    with StopSignals(ignore_after=True) as stop:
        from mpi4py import MPI

        world = MPI.COMM_WORLD
        return run_guarded(world, lambda: _train(world, args.run_file, args.overrides, stop))


def run_guarded(world: MPI.Comm, fn: Callable[[], int]) -> int:
    """Run ``fn`` on every rank; anything escaping it on any rank ends the whole job."""
    try:
        return fn()
    except AgreedError as exc:  # every rank raised it at the same point: no one is left waiting
        return _agreed_exit(world, exc)
    except BaseException as exc:  # noqa: BLE001 - every escape must end the whole job
        return _abort(world, exc)


def _one_process(fn: Callable[[], None]) -> int:
    """A command without MPI: bad input is one line on stderr and exit 2; a reader that stops reading
    (``hpcngd plan ... | head``) ends it quietly with 141, as SIGPIPE ends other tools."""
    try:
        fn()
        sys.stdout.flush()
    except UserError as exc:
        print(f"hpcngd: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 128 + signal.SIGPIPE
    return 0


def _demo(args: argparse.Namespace) -> None:
    from hpcngd.data.demo import generate

    try:
        n = generate(args.out_dir, args.train_per_class, args.val_per_class, args.size, args.seed)
    except OSError as exc:
        raise UserError(f"cannot write the demo data set to {args.out_dir}: {exc.strerror or exc}") from None
    print(f"hpcngd: wrote {n} images to {args.out_dir}")


def _validate(args: argparse.Namespace) -> None:
    cfg = config.load(args.run_file, args.overrides)
    if args.world_size:
        config.check_world_size(cfg, args.world_size)
    print(config.to_toml(cfg), end="")


def _plan(args: argparse.Namespace) -> None:
    from hpcngd.report import print_plan

    node = [f"comm.ranks_per_node={args.ranks_per_node}"] if args.ranks_per_node else []
    cfg = config.load(args.run_file, [*args.overrides, *node])
    config.check_world_size(cfg, args.world_size)  # ranks_per_node must divide it
    print_plan(cfg, args.world_size, cfg.comm.ranks_per_node or 1)


def _inspect(args: argparse.Namespace) -> None:
    from pathlib import Path

    from hpcngd.checkpoint import describe

    versions.check("h5py")
    print(describe(Path(args.checkpoint)))


def _eval(args: argparse.Namespace) -> None:
    from pathlib import Path

    import torch

    from hpcngd.inference import study

    versions.check("torch", "h5py")
    cfg = config.load(args.run_file, args.overrides)
    torch.set_num_threads(_threads(cfg.run.threads, 1))
    json_path = Path(args.json) if args.json else None
    if json_path is not None:  # said before the evaluation, not after it
        if json_path.is_dir():
            raise UserError(f"--json {json_path}: cannot write: it is a folder")
        if not os.access(json_path.parent, os.W_OK):
            raise UserError(f"--json {json_path}: cannot write: {json_path.parent} is not a writable folder")
    study(
        cfg,
        Path(args.checkpoint),
        args.precision or cfg.run.precision,
        args.per_layer,
        args.batch_size,
        args.max_batches,
        args.repeats,
        json_path,
    )


def _threads(run_threads: int, host_size: int) -> int:
    if run_threads:
        return run_threads
    if "OMP_NUM_THREADS" in os.environ:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    usable = len(os.sched_getaffinity(0))
    bound = usable < (os.cpu_count() or usable)  # the launcher pinned this rank: use what it gave
    return usable if bound else max(1, usable // host_size)


def _train(world: MPI.Comm, run_file: str, overrides: Sequence[str], stop: StopSignals) -> int:
    import torch

    from hpcngd.comm.topology import Topology
    from hpcngd.runlock import CHECKPOINT_DIR, RUN_DIR, take_all

    agree(world, lambda: versions.check("torch", "h5py"))
    # Rank 0 reads the file; every rank parses the same text, so all reach the same verdict.
    text = world.bcast(_capture(lambda: config.read_text(run_file)) if world.rank == 0 else None)
    cfg = agree(world, lambda: _parse(text, run_file, overrides, world.size))
    topo = Topology(world, cfg.comm.ranks_per_node)  # its size was checked by _parse
    torch.set_num_threads(_threads(cfg.run.threads, topo.host_size))  # the host's ranks share its cores
    train_set, val_set = datasets(world, cfg)
    # Rank 0 holds the run directory's lock from before anything is written there to the run's end, and
    # the checkpoint folder's (another run's checkpoint.dir may name this run's default one).
    places = [(cfg.run_dir, RUN_DIR)]
    if cfg.checkpoint_dir.resolve() != cfg.run_dir.resolve():
        places.append((cfg.checkpoint_dir, CHECKPOINT_DIR))
    holds = world.rank == 0 and cfg.run.lock_renew_s > 0
    locks = agree(world, lambda: take_all(places, cfg.run.lock_renew_s) if holds else [])
    with ExitStack() as held, topo:
        for lock in locks:
            held.enter_context(lock)
        return _run(world, cfg, topo, train_set, val_set, stop, locks)


def _run(
    world: MPI.Comm,
    cfg: config.Config,
    topo: Topology,
    train_set: Dataset,
    val_set: Dataset,
    stop: StopSignals,
    locks: list[RunLock],
) -> int:
    """Train in the run directory that this run holds; returns the exit code."""
    import torch

    from hpcngd import state
    from hpcngd.data import check_loader_device
    from hpcngd.device import bind, placement, placement_lines, view
    from hpcngd.metrics import MetricsLog, clock_phrase
    from hpcngd.train import Trainer, prepare_run_dir, record_run_file

    run_dir = agree(world, lambda: prepare_run_dir(cfg) if world.rank == 0 else None)
    log = MetricsLog(run_dir / "metrics.jsonl" if run_dir else None, active=world.rank == 0)
    host = topo.host.allgather(agree(world, lambda: view(cfg.run.device)))  # GPUs and cores of the host
    device = agree(world, lambda: bind(cfg.run.device, topo.host_rank, host))
    agree(world, lambda: check_loader_device(cfg.data, str(device)))
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: time cuDNN's algorithms once
    rows = world.gather(placement(device), root=0)
    trainer = Trainer(
        cfg, topo, train_set, val_set, log, checkpoints=True, stop=stop, device=device, locks=locks
    )
    resumed_from, resume_notes = state.resume(trainer)  # AgreedError: see run_guarded
    agree(world, lambda: record_run_file(cfg, config.to_toml(cfg)) if world.rank == 0 else None)
    if resumed_from is not None:
        log.say(f"resuming from {resumed_from} (step {trainer.step})")
    log.open(trainer.resumed_from_step, resumed_from.name if resumed_from else None)
    for note in [n for lock in locks for n in lock.notes] + resume_notes:
        log.say(f"note: {note}")
    log.say(
        f"hpcngd {__version__}: run {cfg.run.name} -> {cfg.run_dir} | {topo.describe()}, "
        f"{torch.get_num_threads()} thread(s) each | {cfg.model.arch} "
        f"({sum(p.numel() for p in trainer.params):,} parameters) | {_loader(cfg.data)} data: "
        f"{len(train_set)} train / {len(val_set)} val images | global batch {cfg.data.batch_size} = "
        f"{topo.size} x {trainer.local_batch} (micro-batch {trainer.micro_batch}) | "
        f"{trainer.num_samples / cfg.data.batch_size:.2f} steps/epoch, {trainer.total_steps} steps"
        + (f", from step {trainer.step}" if resumed_from else "")
    )
    for line in placement_lines(rows or []):
        log.say(line)
    wire = trainer.comm_mode if topo.size > 1 else "unused, one rank communicates nothing"
    log.say(f"precision {cfg.run.precision} | wire {cfg.comm.dtype}: {wire}")
    for note in _setting_notes(cfg, trainer):
        log.say(f"note: {note}")
    if trainer.step >= trainer.total_steps:
        log.say(f"nothing to do: the run is complete at step {trainer.step}")
        log.close()
        return 0
    result = trainer.train()
    if trainer.stopped:
        log.say(
            f"stopped by {trainer.stopped} at step {trainer.step} after a checkpoint; exit {EXIT_STOPPED} "
            f"({clock_phrase(trainer.clock.train_s, trainer.clock.elapsed_s)})"
        )
        log.close()
        return EXIT_STOPPED
    log.say(
        f"done: {trainer.step} steps, final val_top1 {result.get('val_top1', float('nan')):.2f}%; "
        + clock_phrase(trainer.clock.train_s, trainer.clock.elapsed_s)
    )
    log.close()
    return 0


def _setting_notes(cfg: config.Config, trainer: Trainer) -> list[str]:
    """What the start-up log says about settings that work but are likely not what was meant."""
    notes = []
    if cfg.run.precision == "fp16" and trainer.device.type == "cpu":
        notes.append(
            "run.precision = fp16 on a CPU runs torch's fp16 CPU kernels, which are slow (the "
            "quickstart's step took 14-20x fp32's); bf16 is the CPU's 16-bit format"
        )
    wanted = cfg.ngd.precondition_precision
    if trainer.ngd is not None and wanted != "fp32" and not trainer.ngd.tf32:
        notes.append(
            f"ngd.precondition_precision = {wanted} needs TF32 tensor cores and fp32 factors; "
            "preconditioning in fp32 here"
        )
    data = cfg.data
    if data.val_resize > 2 * data.image_size:
        notes.append(
            f"data.val_resize = {data.val_resize} is {data.val_resize / data.image_size:.3g} x "
            f"data.image_size = {data.image_size}: validation sees only the central "
            f"{data.image_size / data.val_resize:.0%} of each image's shorter side (data.val_resize = 0 "
            "takes the usual 1.14 x)"
        )
    optim = cfg.optim
    if optim.schedule == "poly" and optim.e_start < optim.warmup_epochs:
        # A note, not an error: checkpoints of runs started so must stay resumable.
        notes.append(
            f"optim.e_start = {optim.e_start} < optim.warmup_epochs = {optim.warmup_epochs}: the "
            "poly decay starts inside the warmup, so the rate drops at its end (set e_start to "
            "warmup_epochs for a continuous schedule)"
        )
    if optim.name == "spngd" and not optim.weight_rescaling:
        notes.append(
            "optim.name = spngd without optim.weight_rescaling (weight_decay = "
            f"{optim.weight_decay:g}): SP-NGD's published runs rescale weights and use no weight decay, "
            "as runs/resnet50_*.toml do"
        )
    if optim.weight_rescaling and cfg.model.init == "fan_out":
        notes.append(
            "optim.weight_rescaling with model.init = fan_out: a conv weight starts at norm sqrt(2 c_in), "
            "not at the cap sqrt(2 c_out) that rescaling keeps (cut at the first step where c_in > "
            "c_out, far below it in the stem); model.init = fan_in starts every weight at the cap, as "
            "the released SP-NGD system did"
        )
    if optim.schedule == "poly" and 0 < optim.e_end < cfg.run.epochs:
        notes.append(
            f"optim.e_end = {optim.e_end:g} < run.epochs = {cfg.run.epochs}: the learning rate is 0 for "
            f"the last {cfg.run.epochs - optim.e_end:g} epochs"
        )
    if optim.name == "spngd" and cfg.comm.dtype == "bf16" and trainer.topo.size > 1:
        notes.append(
            "comm.dtype = bf16 rounds the Kronecker factors to 8 significant bits, which an ill-conditioned "
            "damped factor amplifies (resnet8's fc bias: its preconditioned gradient 12-37% off an fp64 "
            "reference, 1-5% with fp16); fp16, scaled per tensor, is the presets' wire"
        )
    return notes


def _loader(data: config.DataConfig) -> str:
    from hpcngd.data import resolve_source

    source = resolve_source(data)
    return f"{source} ({data.dali_device})" if source == "dali" else source


def _agreed_exit(world: MPI.Comm, exc: AgreedError) -> int:
    """An error every rank raised together: rank 0 prints it once; every rank exits 2 (4: diverged)."""
    if world.rank == 0:
        print(f"hpcngd: error: {exc}", file=sys.stderr, flush=True)
    return EXIT_DIVERGED if isinstance(exc, Diverged) else EXIT_USER_ERROR


def _capture(fn: Callable[[], T]) -> T | UserError:
    try:
        return fn()
    except UserError as exc:
        return exc


def datasets(world: MPI.Comm, cfg: config.Config) -> tuple[Dataset, Dataset]:
    """The run's (train, val) sets on every rank. Rank 0 lists the images and sends the list: a tree of
    a million images listed by every rank of a large job loads a shared file system's metadata servers.
    Bad data (on rank 0, or a data.path another rank cannot see) stops every rank with one line."""
    from hpcngd.data import build_datasets, list_samples

    classes = cfg.model.num_classes
    listed = world.bcast(_capture(lambda: list_samples(cfg.data, classes)) if world.rank == 0 else None)
    return agree(world, lambda: build_datasets(cfg.data, classes, cfg.run.seed, _given(listed)))


def _given(value: T | UserError) -> T:
    """What :func:`_capture` caught on another rank, raised here."""
    if isinstance(value, UserError):
        raise value
    return value


def _parse(text: str | UserError, source: str, overrides: Sequence[str], world_size: int) -> config.Config:
    text = _given(text)
    cfg = config.loads(text, source, overrides)
    try:
        config.check_world_size(cfg, world_size)
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None
    return cfg


def _abort(world: MPI.Comm, exc: BaseException) -> int:
    """Report ``exc`` for this rank and end the whole job; returns the code when only one rank runs."""
    if isinstance(exc, SystemExit):
        raise exc
    where = f"rank {world.rank} of {world.size}"
    if isinstance(exc, UserError):
        message, code = f"hpcngd: error on {where}: {exc}", EXIT_USER_ERROR
    elif isinstance(exc, KeyboardInterrupt):
        message, code = f"hpcngd: interrupted on {where}", 130
    else:
        trace = "".join(traceback.format_exception(exc))
        message = f"{trace}hpcngd: {where} failed: {type(exc).__name__}: {exc}"
        code = EXIT_FAILURE
    if world.size > 1:
        message += f"; aborting all {world.size} ranks"
    print(message, file=sys.stderr, flush=True)
    if world.size > 1:
        world.Abort(code)
    return code
