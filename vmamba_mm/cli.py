"""Helpers shared by the command-line tools (tools/train.py, tools/test.py, tools/demo.py, ...).

They define the arguments train.py, test.py and analysis_tools/benchmark.py have in common, load
a config, tell which toolbox (MMDetection or MMSegmentation) it belongs to, check that its data is
where the config says, prepare distributed runs (also on machines without CUDA, where mmengine's
launchers fail), and close the process group when a tool is done.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
)

TOOLBOXES = ("mmdet", "mmseg")
LAUNCHERS = ("none", "pytorch", "slurm", "mpi")

# What each launcher must have put in the environment, and what starts processes that way.
_LAUNCHER_VARIABLES = {
    "pytorch": ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"),
    "slurm": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_NODELIST"),
    "mpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
            "MASTER_ADDR"),
}
_LAUNCHER_STARTERS = {
    "pytorch": "start the tool with torchrun (tools/dist_train.sh, tools/dist_test.sh)",
    "slurm": "start the tool with srun (tools/slurm_train.sh, tools/slurm_test.sh)",
    "mpi": "start the tool with Open MPI's mpirun and export the first host's address, e.g. "
           "`mpirun -np 2 -x MASTER_ADDR=HOST -x MASTER_PORT=29500 python tools/train.py CONFIG "
           "--launcher mpi`",
}
# torch.distributed's default port, which mmengine also falls back to.
DEFAULT_MASTER_PORT = "29500"
SKIP_DATA_CHECK_HINT = (
    "If the data is there but read through a file backend this check cannot see, pass "
    "--skip-data-check."
)

T = TypeVar("T")


WORK_DIR_HELP = ("directory for logs, checkpoints and metrics (default: the config's work_dir, "
                 "else ./work_dirs/<config name>)")


def tool_parser(description: str, config_help: str) -> argparse.ArgumentParser:
    """An argument parser holding the arguments that tools/train.py and tools/test.py share.

    CONFIG is the first positional argument; a tool adds its own arguments afterwards (test.py's
    CHECKPOINT then comes second). The shared options are those of :func:`add_shared_options`.

    Args:
        description: What the tool does, for ``--help``.
        config_help: Help text of the CONFIG argument.

    Returns:
        The parser; parse with :func:`parse_tool_args`.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("config", help=config_help)
    add_shared_options(parser)
    return parser


def add_shared_options(parser: argparse.ArgumentParser,
                       work_dir_help: str = WORK_DIR_HELP) -> None:
    """Adds the options every config-running tool has (train.py, test.py, benchmark.py).

    They are ``--work-dir``, ``--cfg-options``, ``--skip-data-check``, ``--launcher`` (one of
    :data:`LAUNCHERS`, default "none") and the hidden ``--local-rank`` that
    torch.distributed.launch passes; :func:`parse_tool_args` turns the last into LOCAL_RANK.

    Args:
        parser: The tool's parser.
        work_dir_help: Help text of ``--work-dir``, saying what the tool writes there.
    """
    from mmengine.config import DictAction

    parser.add_argument("--work-dir", help=work_dir_help)
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        action=DictAction,
        help="override settings of the config, key=value (xxx=a,b or xxx=[a,b] for lists, "
        "quoted without spaces for nesting: key=\"[(a,b),(c,d)]\")",
    )
    parser.add_argument(
        "--skip-data-check",
        action="store_true",
        help="do not check before the run that the data_root, ann_file and data_prefix of the "
        "config exist locally (the check already steps aside for URIs and file backends other "
        "than the local disk)",
    )
    parser.add_argument(
        "--launcher", choices=LAUNCHERS, default="none",
        help="job launcher: none (one process), pytorch (torchrun), slurm (srun), mpi (mpirun)",
    )
    # torch.distributed.launch passes --local-rank (older torch: --local_rank).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0,
                        help=argparse.SUPPRESS)


def parse_tool_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None,
                    intermixed: bool = False) -> argparse.Namespace:
    """Parses a tool's command line; ``--local-rank`` becomes LOCAL_RANK unless that is set.

    Args:
        parser: A parser holding :func:`add_shared_options` (e.g. made by :func:`tool_parser`),
            with the tool's own arguments added.
        argv: The arguments; ``None`` takes ``sys.argv[1:]``.
        intermixed: Let an optional positional follow options (``parse_intermixed_args``).

    Returns:
        The parsed arguments.
    """
    parse = parser.parse_intermixed_args if intermixed else parser.parse_args
    args = parse(argv)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return args


def config_from_args(args: argparse.Namespace) -> Tuple[Any, str]:
    """Loads the config of a tool's command line, selects its toolbox and sets its work dir.

    Args:
        args: Parsed arguments with ``config``, ``cfg_options`` and ``work_dir``.

    Returns:
        The mmengine ``Config`` and its toolbox ("mmdet" or "mmseg").
    """
    cfg = load_config(args.config, args.cfg_options)
    scope = toolbox_of(cfg)
    init_toolbox(scope)
    set_work_dir(cfg, args.work_dir, args.config)
    return cfg, scope


def finish_config(cfg, args: argparse.Namespace, loaders: List[str]) -> None:
    """The last steps of a tool's setup: checks the data (unless ``--skip-data-check``), lets only
    the main process write the test metrics' file, and prepares the launcher.

    Args:
        cfg: The config, otherwise ready for the Runner.
        args: Parsed arguments with ``skip_data_check`` and ``launcher``.
        loaders: The dataloader entries the run reads, e.g. ``["test_dataloader"]``.
    """
    from vmamba_mm.engine import use_main_process_logger

    if not args.skip_data_check:
        check_data(cfg, loaders)
    use_main_process_logger(cfg)
    prepare_launcher(cfg, args.launcher)


def run_tool(args: argparse.Namespace, setup: Callable[[argparse.Namespace], Any],
             action: Callable[[Any], T]) -> T:
    """Builds the config, runs the tool's action and closes the process group it used.

    An error in the command line or the data ends the tool with one ``error:`` line, and so do
    the user errors of :func:`exit_on_user_error` raised while the action runs.

    Args:
        args: The parsed command line.
        setup: Builds the config from ``args``.
        action: Runs the config (e.g. trains); its result is returned.

    Returns:
        What ``action`` returned.
    """
    try:
        cfg = setup(args)
    except (FileNotFoundError, ValueError, TypeError) as err:
        close_process_group(wait=False)
        sys.exit(f"error: {one_line(err)}")
    try:
        result = exit_on_user_error(lambda: action(cfg))
    except SystemExit:
        # The other ranks may never get to a barrier after this rank's error.
        close_process_group(wait=False)
        raise
    close_process_group()
    return result


def load_config(config: str, cfg_options: Optional[Dict[str, Any]] = None):
    """Reads a config file and applies ``--cfg-options``.

    Args:
        config: Path of the config file.
        cfg_options: ``key=value`` overrides (already parsed by mmengine's DictAction).

    Returns:
        The mmengine ``Config``.
    """
    from mmengine.config import Config

    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(
            f"config file {config} does not exist; pass the path of a config such as "
            "configs/demo/mask-rcnn_vmamba-demo_shapes-128.py."
        )
    # Loaded first so that mmengine checkpoints resume under torch's weights-only loading and
    # the VMamba backbone is registered whatever the config's custom_imports say.
    import vmamba_mm  # noqa: F401

    cfg = Config.fromfile(str(path))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def toolbox_of(cfg) -> str:
    """The toolbox a config is written for, from its ``default_scope`` ("mmdet" or "mmseg")."""
    scope = cfg.get("default_scope")
    if scope not in TOOLBOXES:
        raise ValueError(
            f"config default_scope is {scope!r}; these tools run configs whose default_scope is "
            "'mmdet' or 'mmseg' (inherit an mmdet:: or mmseg:: base config)."
        )
    return scope


def init_toolbox(scope: str) -> None:
    """Imports the toolbox and makes it the default registry scope."""
    if scope == "mmdet":
        from mmdet.utils import register_all_modules
    else:
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=True)


def _datasets(dataset_cfg: Any) -> Iterator[Any]:
    """Yields a dataset config and the configs it wraps (RepeatDataset, ConcatDataset, ...)."""
    if not isinstance(dataset_cfg, dict):
        return
    yield dataset_cfg
    inner = dataset_cfg.get("dataset")
    if inner is not None:
        yield from _datasets(inner)
    for child in dataset_cfg.get("datasets", []) or []:
        yield from _datasets(child)


def _reads_another_backend(dataset_cfg: Any) -> bool:
    """Whether a dataset or a transform of its pipeline reads through a non-local file backend.

    ``backend_args=dict(backend='petrel', path_mapping=...)`` can map local-looking paths to
    object storage, so such paths say nothing about the local disk.
    """
    holders = [dataset_cfg, *(t for t in dataset_cfg.get("pipeline") or [] if isinstance(t, dict))]
    for holder in holders:
        backend_args = holder.get("backend_args")
        if isinstance(backend_args, dict) and backend_args.get("backend") not in (None, "local"):
            return True
    return False


def check_data(cfg, loaders: List[str]) -> None:
    """Fails early, with a hint, when a dataset's local data root or annotation file is missing.

    Without this a missing COCO file surfaces as a traceback deep inside dataset building, and a
    missing segmentation folder as a dataset of length zero. Only local paths are checked: a
    dataset read through another file backend (``backend_args`` naming petrel, s3, http, ...) is
    left alone, and so is any data_root, ann_file or data_prefix that is a URI (``scheme://``).
    The tools' ``--skip-data-check`` turns the check off.

    Args:
        cfg: The loaded config.
        loaders: Names of the dataloader entries to check, e.g. ``["train_dataloader"]``.

    Raises:
        FileNotFoundError: a local data root, annotation file or data prefix does not exist.
    """
    for loader in loaders:
        loader_cfg = cfg.get(loader)
        if not loader_cfg:
            continue
        for ds in _datasets(loader_cfg.get("dataset")):
            root = ds.get("data_root")
            if _reads_another_backend(ds) or (root and is_remote(str(root))):
                continue
            if root and not Path(root).is_dir():
                raise FileNotFoundError(
                    f"{loader}: data_root {root!r} does not exist (relative paths are taken from "
                    f"{os.getcwd()}). For the demo configs run `python -m vmamba_mm.datasets "
                    f"--out {root}` first, or point the config at your data with --cfg-options "
                    f"{loader}.dataset.data_root=PATH. {SKIP_DATA_CHECK_HINT}"
                )
            ann = ds.get("ann_file")
            if ann and not is_remote(str(ann)):
                ann_path = Path(root or "") / ann if not Path(ann).is_absolute() else Path(ann)
                if not ann_path.is_file():
                    raise FileNotFoundError(
                        f"{loader}: annotation file {str(ann_path)!r} does not exist; check "
                        f"data_root and ann_file in the config. {SKIP_DATA_CHECK_HINT}"
                    )
            prefix = ds.get("data_prefix") or {}
            for key, sub in prefix.items():
                if not sub or is_remote(str(sub)):
                    continue
                sub_path = Path(root or "") / sub
                if not sub_path.is_dir():
                    raise FileNotFoundError(
                        f"{loader}: data_prefix {key}={sub!r} points at {str(sub_path)!r}, which "
                        "does not exist; check data_root and data_prefix in the config. "
                        f"{SKIP_DATA_CHECK_HINT}"
                    )


def set_work_dir(cfg, work_dir: Optional[str], config_path: str) -> None:
    """``--work-dir`` wins, then the config's ``work_dir``, then ``./work_dirs/<config name>``."""
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = str(Path("work_dirs") / Path(config_path).stem)
    if Path(cfg.work_dir).exists() and not Path(cfg.work_dir).is_dir():
        raise ValueError(
            f"work dir {cfg.work_dir} exists and is not a directory; choose another --work-dir."
        )


def first_slurm_host(node_list: str) -> str:
    """The first host of a Slurm node list (``node[01-04]``), as ``scontrol show hostname``
    expands it; mmengine takes that host as the master address.

    Args:
        node_list: ``SLURM_NODELIST``.

    Returns:
        The host name.

    Raises:
        ValueError: scontrol is missing or fails and the list is not a single plain host name.
    """
    try:
        done = subprocess.run(["scontrol", "show", "hostname", node_list], capture_output=True,
                              text=True, check=False)
        hosts = done.stdout.split() if done.returncode == 0 else []
        reason = done.stderr.strip() or f"exit status {done.returncode}"
    except FileNotFoundError:
        hosts, reason = [], "scontrol is not on PATH"
    if hosts:
        return hosts[0]
    if re.fullmatch(r"[\w.-]+", node_list):
        return node_list
    raise ValueError(
        f"cannot tell the first host of SLURM_NODELIST={node_list!r} ({reason}); set "
        "MASTER_ADDR to it."
    )


def launcher_environment(launcher: str, environ: Mapping[str, str],
                         first_host: Callable[[str], str] = first_slurm_host) -> Dict[str, str]:
    """The torch.distributed variables of this process, derived from what its launcher set.

    The derivation is mmengine's (``mmengine.dist.utils._init_dist_slurm`` and
    ``_init_dist_mpi``): Slurm's SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID become RANK,
    WORLD_SIZE and LOCAL_RANK, the first host of SLURM_NODELIST the master address unless
    MASTER_ADDR is set; Open MPI's OMPI_COMM_WORLD_RANK, _SIZE and _LOCAL_RANK likewise (its
    MASTER_ADDR must be set). MASTER_PORT defaults to 29500. torchrun sets them all itself.

    Args:
        launcher: "pytorch", "slurm" or "mpi".
        environ: The process environment (``os.environ``).
        first_host: Resolves a Slurm node list to its first host.

    Returns:
        RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.

    Raises:
        ValueError: the launcher is unknown or a variable it sets is missing.
    """
    if launcher not in _LAUNCHER_VARIABLES:
        raise ValueError(f"launcher {launcher!r} is not one of {', '.join(_LAUNCHER_VARIABLES)}.")
    missing = [k for k in _LAUNCHER_VARIABLES[launcher] if k not in environ]
    if missing:
        raise ValueError(
            f"--launcher {launcher} needs the environment variables {', '.join(missing)}; "
            f"{_LAUNCHER_STARTERS[launcher]}."
        )
    if launcher == "pytorch":
        return {k: environ[k] for k in _LAUNCHER_VARIABLES["pytorch"]}
    if launcher == "slurm":
        rank = environ["SLURM_PROCID"]
        world_size = environ["SLURM_NTASKS"]
        # mmengine falls back to the rank modulo the GPU count; on CPUs that is the rank.
        local_rank = environ.get("SLURM_LOCALID", rank)
        master_addr = environ.get("MASTER_ADDR") or first_host(environ["SLURM_NODELIST"])
    else:
        rank = environ["OMPI_COMM_WORLD_RANK"]
        world_size = environ["OMPI_COMM_WORLD_SIZE"]
        local_rank = environ["OMPI_COMM_WORLD_LOCAL_RANK"]
        master_addr = environ["MASTER_ADDR"]
    return {
        "RANK": rank,
        "WORLD_SIZE": world_size,
        "LOCAL_RANK": local_rank,
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": environ.get("MASTER_PORT", DEFAULT_MASTER_PORT),
    }


def prepare_launcher(cfg, launcher: str) -> None:
    """Sets up distributed runs; on machines without CUDA, starts a gloo process group itself.

    mmengine's launchers always call ``torch.cuda.set_device`` and wrap the model with
    ``device_ids=[LOCAL_RANK]``; both fail on CPU. Without CUDA this derives the torch.distributed
    variables from the launcher's (:func:`launcher_environment`), starts a gloo process group
    (mmengine then skips its own initialisation) and wraps the model without device ids. With
    CUDA mmengine initialises the process group as usual.

    Args:
        cfg: The config; its ``launcher``, ``env_cfg.dist_cfg`` and ``model_wrapper_cfg`` are set.
        launcher: "none", "pytorch", "slurm" or "mpi".

    Raises:
        ValueError: a variable the launcher sets is missing.
    """
    cfg.launcher = launcher
    if launcher == "none":
        return
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        # Checked here so that a missing variable is one error line, not a KeyError in mmengine.
        launcher_environment(launcher, os.environ, first_host=lambda nodes: nodes)
        if launcher == "mpi":
            # mmengine picks the GPU from OMPI_COMM_WORLD_LOCAL_RANK but wraps the model with
            # device_ids=[LOCAL_RANK], which the tools default to 0: make the two agree.
            os.environ["LOCAL_RANK"] = os.environ["OMPI_COMM_WORLD_LOCAL_RANK"]
        return
    os.environ.update(launcher_environment(launcher, os.environ))
    dist_cfg = cfg.setdefault("env_cfg", {}).setdefault("dist_cfg", {})
    dist_cfg["backend"] = "gloo"
    if not dist.is_initialized():
        timeout = dist_cfg.get("timeout")
        kwargs = {}
        if timeout is not None:
            import datetime

            kwargs["timeout"] = datetime.timedelta(seconds=timeout)
        dist.init_process_group(backend="gloo", **kwargs)
    wrapper = cfg.get("model_wrapper_cfg") or {"type": "MMDistributedDataParallel"}
    wrapper.setdefault("broadcast_buffers", False)
    wrapper.setdefault("find_unused_parameters", cfg.get("find_unused_parameters", False))
    wrapper["device_ids"] = None
    cfg.model_wrapper_cfg = wrapper


def close_process_group(wait: bool = True) -> None:
    """Destroys the default process group, if one is up, after every rank got here.

    Left to the interpreter's exit, the group's backend threads can still be running while the
    process is torn down; under load a 2-process CPU run once ended with "terminate called
    without an active exception" (SIGABRT) on rank 0 after finishing its work.

    Args:
        wait: Meet the other ranks at a barrier first (the end of a run that went well); without
            it only this process's side of the group is closed (after an error of its own).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if wait:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def build_runner(cfg):
    """Builds the Runner named by ``runner_type`` in the config, or mmengine's default Runner."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    if "runner_type" in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


def is_remote(location: str) -> bool:
    """Whether a checkpoint location is a URL or another file-backend URI (not a local path)."""
    from .checkpoint.loading import is_uri

    return is_uri(location)


def check_checkpoint_argument(location: str, option: str, hint: str) -> None:
    """Fails early when a local checkpoint path given on the command line does not exist.

    URLs and other schemes are checked when they are loaded (downloaded once per node). A
    ``#sha256=<hex>`` suffix is not part of the path.
    """
    from vmamba_mm.checkpoint.integrity import split_sha256

    path, _ = split_sha256(location)
    if not is_remote(path) and not Path(path).expanduser().is_file():
        raise FileNotFoundError(f"checkpoint {path} given to {option} does not exist; {hint}")


def one_line(error: BaseException) -> str:
    """The error's message on one line, for ``error: ...`` output."""
    return " ".join(str(error).split()) or type(error).__name__


def exit_on_user_error(action):
    """Runs ``action()``; an error in the user's input ends the tool with one ``error:`` line.

    Input errors are missing files, bad checkpoints (damaged, unsafe, non-finite, not matching
    the model) and images the backbone cannot take (``vmamba_mm.errors.USER_ERRORS``). Any other
    exception keeps its traceback: it is a bug to report.
    """
    from vmamba_mm.errors import USER_ERRORS

    try:
        return action()
    except USER_ERRORS as error:
        sys.exit(f"error: {one_line(error)}")
