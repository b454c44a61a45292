"""Bit-exact resume: random-number states in Runner checkpoints, and a refusal of NaN checkpoints.

mmengine 0.10.7 saves the model, optimizer, schedulers and message hub, but no random-number
state, so a resumed run draws different flips, crops, RoI samples and drop paths than the run it
continues, and its weights drift away (up to 3.4e-3 after 10 iterations of the demo Mask R-CNN).
:class:`ExactResumeHook` closes that gap:

* every checkpoint gets the states of Python's ``random``, NumPy's global generator, torch's CPU
  generator and every initialised CUDA device, for every rank (gathered as tensors; the
  checkpoint stays loadable with ``torch.load(..., weights_only=True)``);
* on resume each rank gets its own states back right before the first batch it trains on, that
  is, after mmengine's ``IterBasedTrainLoop`` has replayed the batches already trained (that
  replay runs the data pipeline, which draws random numbers in the main process);
* a checkpoint whose parameters or optimizer state hold NaN or infinity is refused with
  :class:`~vmamba_mm.errors.NonFiniteCheckpointError`, for resume and ``load_from`` alike.

What is exact, given a seeded config (``randomness``) and the same world size:

* an ``IterBasedTrainLoop`` resumed from any of its checkpoints (tested on the CPU for the demo
  Mask R-CNN and UperNet, with one and two processes), also with data-loader worker processes,
  persistent or not: mmengine seeds every worker from ``randomness.seed``, and the replay of the
  trained batches draws their numbers again in the same order;
* an ``EpochBasedTrainLoop`` resumed from an end-of-epoch checkpoint with ``num_workers=0`` or
  non-persistent workers (mmengine re-seeds those identically at every epoch).

Validation leaves the random-number states as it found them (they are put back after each
validation), so a validation at a checkpoint iteration does not shift the training after it.

What is not exact: an ``EpochBasedTrainLoop`` with persistent workers (their generators live in
the worker processes, are not saved, and restart from the seed on resume: a warning says so);
a mid-epoch checkpoint of an ``EpochBasedTrainLoop`` (mmengine restarts that epoch from its first
batch); a different world size (each rank restores what was saved for it, but the data are split
differently); non-deterministic kernels (cuDNN autotuning, atomics: set
``randomness.deterministic=True``); generators other than the global ones (a sampler's own
``torch.Generator`` is rebuilt from its seed and replayed by the loop, so it needs nothing).
"""

from __future__ import annotations

import logging
import random
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from mmengine.dist import all_gather, get_rank, get_world_size
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS
from mmengine.runner import IterBasedTrainLoop

from ..errors import CheckpointError, NonFiniteCheckpointError

# Key of the random-number states in a Runner checkpoint.
RNG_STATE_KEY = "rng_state"
# Layout version of what is stored under RNG_STATE_KEY.
_FORMAT = 1
# How many non-finite tensors an error message names before it only counts them.
_NAMED_TENSORS = 5


def get_rng_state() -> Dict[str, torch.Tensor]:
    """This process's random-number states, each encoded as a CPU tensor.

    Returns:
        A dict of 1-D tensors: ``python`` (int64 [626]: version, 624 Mersenne-Twister words,
        position), ``python_gauss`` (float64 [2]: has a cached value, the value), ``numpy``
        (int64 [626]: 624 words, position, has a cached value), ``numpy_gauss`` (float64 [1]),
        ``torch`` (uint8, the CPU generator) and ``cuda`` (uint8 [num_devices * state_size],
        empty when CUDA is not initialised: its generators have then never been drawn from).
    """
    version, words, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    if name != "MT19937":
        raise RuntimeError(f"NumPy's global generator is {name}, expected MT19937.")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cat([s.flatten() for s in torch.cuda.get_rng_state_all()])
    else:
        cuda = torch.zeros(0, dtype=torch.uint8)
    return {
        "python": torch.tensor([version, *words], dtype=torch.int64),
        "python_gauss": torch.tensor(
            [gauss_next is not None, gauss_next or 0.0], dtype=torch.float64),
        "numpy": torch.tensor([*keys.tolist(), pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached_gaussian], dtype=torch.float64),
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def set_rng_state(state: Dict[str, torch.Tensor]) -> List[str]:
    """Restores states produced by :func:`get_rng_state` (tensors may be on any device).

    Args:
        state: The dict :func:`get_rng_state` returned, possibly after a save and a load.

    Returns:
        Notes on what could not be restored (CUDA states for devices this process lacks); empty
        when everything was restored.
    """
    notes: List[str] = []
    python = state["python"].cpu().tolist()
    has_gauss, gauss = state["python_gauss"].cpu().tolist()
    random.setstate((python[0], tuple(python[1:]), gauss if has_gauss else None))
    numpy = state["numpy"].cpu().tolist()
    np.random.set_state(("MT19937", np.array(numpy[:624], dtype=np.uint32), numpy[624],
                         numpy[625], float(state["numpy_gauss"].cpu()[0])))
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    cuda = state["cuda"].cpu().to(torch.uint8)
    if cuda.numel():
        if not torch.cuda.is_available():
            notes.append("the CUDA states were saved on a machine with CUDA; this one has none")
        else:
            size = torch.cuda.default_generators[0].get_state().numel()
            saved = list(cuda.view(-1, size))
            here = torch.cuda.device_count()
            if len(saved) != here:
                notes.append(f"CUDA states were saved for {len(saved)} devices, this process "
                             f"sees {here}; restored the first {min(len(saved), here)}")
            torch.cuda.set_rng_state_all(saved[:here])
    return notes


def find_non_finite(tree: Any, prefix: str) -> List[str]:
    """Names of the floating tensors in a nested dict/list that hold NaN or infinity.

    Args:
        tree: A state dict, an optimizer state dict or any nest of dicts, lists and tensors.
        prefix: Name of ``tree``, prepended to the dotted names returned.

    Returns:
        Dotted names (``"optimizer.state.3.exp_avg"``) in traversal order.
    """
    found: List[str] = []
    if isinstance(tree, torch.Tensor):
        if (tree.is_floating_point() or tree.is_complex()) and not bool(
                torch.isfinite(tree).all()):
            found.append(prefix)
    elif isinstance(tree, dict):
        for key, value in tree.items():
            found += find_non_finite(value, f"{prefix}.{key}")
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            found += find_non_finite(value, f"{prefix}.{index}")
    return found


def check_finite_checkpoint(checkpoint: Dict[str, Any]) -> None:
    """Refuses a checkpoint whose parameters, buffers or optimizer state are not all finite.

    Args:
        checkpoint: A loaded Runner checkpoint (``state_dict``, optionally ``optimizer``).

    Raises:
        NonFiniteCheckpointError: naming the first few non-finite tensors and their count.
    """
    bad = find_non_finite(checkpoint.get("state_dict", {}), "state_dict")
    bad += find_non_finite(checkpoint.get("optimizer", {}), "optimizer")
    if not bad:
        return
    meta = checkpoint.get("meta") or {}
    where = f" (saved at epoch {meta['epoch']}, iter {meta['iter']})" if (
        "epoch" in meta and "iter" in meta) else ""
    names = ", ".join(bad[:_NAMED_TENSORS]) + (
        f" and {len(bad) - _NAMED_TENSORS} more" if len(bad) > _NAMED_TENSORS else "")
    raise NonFiniteCheckpointError(
        f"the checkpoint{where} holds NaN or infinite values in {len(bad)} tensor(s): {names}. "
        "Training had diverged before it was saved, and continuing from it would only produce "
        "NaN. Resume from an earlier checkpoint (an older iter_*.pth / epoch_*.pth in the work "
        "dir: --resume PATH), and consider a lower learning rate or gradient clipping."
    )


def _all_gather_1d(tensor: torch.Tensor) -> List[torch.Tensor]:
    """All ranks' copies of a 1-D tensor whose length may differ between ranks."""
    length = torch.tensor([tensor.numel()], dtype=torch.int64)
    lengths = [int(n) for n in all_gather(length)]
    padded = torch.zeros(max(lengths), dtype=tensor.dtype)
    padded[:tensor.numel()] = tensor
    return [t.cpu()[:n].clone() for t, n in zip(all_gather(padded), lengths)]


def gather_rng_states() -> List[Dict[str, torch.Tensor]]:
    """Every rank's :func:`get_rng_state`; a collective call that every rank must make.

    Returns:
        One state dict per rank, in rank order (just this process's under a world size of 1).
    """
    local = get_rng_state()
    if get_world_size() == 1:
        return [local]
    gathered: List[Dict[str, torch.Tensor]] = [{} for _ in range(get_world_size())]
    for key in sorted(local):
        for rank, value in enumerate(_all_gather_1d(local[key])):
            gathered[rank][key] = value
    return gathered


class _RestoreBeforeFirstFetch:
    """Stands in for ``IterBasedTrainLoop.dataloader_iterator`` during a resume.

    The loop first fetches (and drops) the ``skip`` batches already trained; those fetches run
    the data pipeline and draw random numbers. Right before the next fetch, the first batch that
    is trained on, the saved states are restored and the loop gets its own iterator back.
    """

    def __init__(self, loop: IterBasedTrainLoop, skip: int, restore) -> None:
        self._loop = loop
        self._inner = loop.dataloader_iterator
        self._skip = skip
        self._restore = restore

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> Any:
        if self._skip > 0:
            self._skip -= 1
            return next(self._inner)
        self._restore()
        self._loop.dataloader_iterator = self._inner
        return next(self._inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@HOOKS.register_module()
class ExactResumeHook(Hook):
    """Saves every rank's random-number states with each checkpoint and restores them on resume.

    Registered in mmengine's root ``HOOKS`` registry, so mmdet and mmseg configs can list it:
    ``custom_hooks = [dict(type='ExactResumeHook')]`` (tools/train.py adds it when a config does
    not). See the module docstring for what is and is not exact. It also refuses to load a
    checkpoint with non-finite parameters or optimizer state.

    ``Runner.save_checkpoint`` runs on rank 0 only, so the states cannot be gathered there. They
    are gathered on all ranks just before the ``CheckpointHook`` saves (this hook's priority is
    just above it) and at the start of each validation (best-checkpoint saves happen during
    validation). A checkpoint saved at any other moment holds rank 0's states only, and the other
    ranks keep their seeded states when resuming from it (with a warning).

    Args:
        check_finite: Refuse checkpoints with NaN or infinite parameters or optimizer state.
    """

    # Just above CheckpointHook's VERY_LOW (90): the states are taken right before it saves, and
    # restored at ``before_train_epoch`` after the other hooks have set up the epoch.
    priority = 80

    def __init__(self, check_finite: bool = True) -> None:
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be True or False, got {check_finite!r}.")
        self.check_finite = check_finite
        # States gathered for the save that is about to happen, and where they were taken.
        self._gathered: Optional[List[Dict[str, torch.Tensor]]] = None
        self._gathered_at: Optional[Tuple[str, int]] = None
        self._in_val = False
        # States loaded from a checkpoint, waiting to be restored, and the loop position
        # (epoch, iter) that checkpoint resumes at.
        self._loaded: Optional[Dict[str, Any]] = None
        self._loaded_at: Optional[Tuple[int, int]] = None
        self._training = False

    def before_train(self, runner) -> None:
        self._training = True

    def after_train(self, runner) -> None:
        self._training = False

    def before_train_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        # States gathered for an earlier save must not be mistaken for the current ones.
        self._gathered = self._gathered_at = None

    def _capture(self, point: str, runner) -> None:
        self._gathered = gather_rng_states()
        self._gathered_at = (point, runner.iter)

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None,
                         outputs: Any = None) -> None:
        if any(self._saves_after_iter(hook, runner) for hook in runner.hooks):
            self._capture("train", runner)

    def after_train_epoch(self, runner) -> None:
        if any(self._saves_after_epoch(hook, runner) for hook in runner.hooks):
            self._capture("train", runner)

    def before_val(self, runner) -> None:
        if self._training:
            self._in_val = True
            self._capture("val", runner)

    def after_val(self, runner) -> None:
        # Validation draws random numbers (each DataLoader iterator draws a seed); putting the
        # states back makes training after a validation continue exactly as from a checkpoint
        # saved before that validation.
        if self._in_val:
            self._in_val = False
            set_rng_state(self._gathered[get_rank()])

    @staticmethod
    def _saves_after_iter(hook: Hook, runner) -> bool:
        # CheckpointHook.after_train_iter's own condition, evaluated on every rank.
        return isinstance(hook, CheckpointHook) and not hook.by_epoch and (
            hook.every_n_train_iters(runner, hook.interval, hook.save_begin)
            or (hook.save_last and hook.is_last_train_iter(runner)))

    @staticmethod
    def _saves_after_epoch(hook: Hook, runner) -> bool:
        # CheckpointHook.after_train_epoch's own condition, evaluated on every rank.
        return isinstance(hook, CheckpointHook) and hook.by_epoch and (
            hook.every_n_epochs(runner, hook.interval, hook.save_begin)
            or (hook.save_last and hook.is_last_train_epoch(runner)))

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        point = "val" if self._in_val else "train"
        if self._gathered is not None and self._gathered_at == (point, runner.iter):
            ranks = self._gathered
        else:
            ranks = [get_rng_state()] + [{} for _ in range(get_world_size() - 1)]
            if get_world_size() > 1:
                print_log("A checkpoint was saved outside CheckpointHook's schedule: it holds "
                          "rank 0's random-number states only; on resume the other ranks keep "
                          "their seeded states.", logger="current", level=logging.WARNING)
        checkpoint[RNG_STATE_KEY] = dict(format=_FORMAT, world_size=get_world_size(),
                                         ranks=ranks)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.check_finite:
            check_finite_checkpoint(checkpoint)
        saved = checkpoint.get(RNG_STATE_KEY)
        meta = checkpoint.get("meta") or {}
        if saved is None or "iter" not in meta:
            self._loaded = self._loaded_at = None
            return
        if saved.get("format") != _FORMAT:
            raise CheckpointError(
                f"the checkpoint's {RNG_STATE_KEY!r} has format {saved.get('format')!r}; this "
                f"vmamba_mm reads format {_FORMAT}. Resume with the vmamba_mm version that "
                "saved it.")
        self._loaded = saved
        self._loaded_at = (meta.get("epoch", 0), meta["iter"])

    def before_train_epoch(self, runner) -> None:
        if self._loaded is None:
            return
        loop = runner.train_loop
        # Runner.resume sets the loop's position from the checkpoint; load_from (fine-tuning)
        # leaves it at 0, and then the states of the other training are not wanted.
        resumed = (loop.epoch, loop.iter) == self._loaded_at and loop.iter > 0
        if not resumed:
            self._loaded = self._loaded_at = None
            return
        if isinstance(loop, IterBasedTrainLoop):
            loop.dataloader_iterator = _RestoreBeforeFirstFetch(loop, loop.iter, self._restore)
            return
        dataloader = loop.dataloader
        if hasattr(dataloader, "__len__") and loop.iter != loop.epoch * len(dataloader):
            print_log(f"Resumed from a checkpoint saved inside epoch {loop.epoch + 1}: the "
                      "epoch-based loop restarts that epoch from its first batch, so this run "
                      "will not match an uninterrupted one exactly.", logger="current",
                      level=logging.WARNING)
        if getattr(dataloader, "num_workers", 0) and getattr(
                dataloader, "persistent_workers", False):
            print_log("The data-loader workers are persistent: their random-number states are "
                      "not in the checkpoint and restart from the seed, so the augmentations "
                      "after this resume differ from an uninterrupted run (set "
                      "train_dataloader.persistent_workers=False for an exact resume).",
                      logger="current", level=logging.WARNING)
        self._restore()

    def _restore(self) -> None:
        saved, self._loaded, self._loaded_at = self._loaded, None, None
        rank, world_size = get_rank(), get_world_size()
        ranks = saved["ranks"]
        if saved["world_size"] != world_size:
            kept = min(len(ranks), world_size)
            others = (f", ranks {kept} and above keep their seeded ones" if world_size > kept
                      else "")
            print_log(f"The checkpoint was saved by {saved['world_size']} processes and is "
                      f"resumed by {world_size}: ranks 0 to {kept - 1} get their own "
                      f"random-number states back{others}, and the data are split differently, "
                      "so this run will not match an uninterrupted one.", logger="current",
                      level=logging.WARNING)
        state = ranks[rank] if rank < len(ranks) else {}
        if not state:
            if saved["world_size"] == world_size:
                print_log(f"The checkpoint holds no random-number states for rank {rank}; it "
                          "keeps its seeded states.", logger="current", level=logging.WARNING)
            return
        for note in set_rng_state(state):
            print_log(f"Random-number states: {note}.", logger="current", level=logging.WARNING)
