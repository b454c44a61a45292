"""Downloads a checkpoint URL once per node into torch hub's cache.

In a distributed run the process with local rank 0 downloads while the others wait at a barrier,
then every process reads the cached file. The download goes to a temporary file that is renamed
when complete, so an interrupted download never leaves a partial file under the final name, and a
download without the expected hash is never kept. A cached file that later fails a check (its
CRC, or a hash pinned after it was cached) is removed by :func:`discard_cached`, so that the next
load downloads it again instead of failing on the same bad copy forever.
"""

import os
from typing import Optional
from urllib.parse import unquote, urlparse

import torch

from ..errors import DamagedCheckpointError


def cache_path(url: str, cache_dir: Optional[str] = None) -> str:
    """Where ``url`` is cached: ``<torch hub dir>/checkpoints/<file name of the URL>``."""
    name = os.path.basename(unquote(urlparse(url).path))
    if not name:
        raise ValueError(f"checkpoint URL {url!r} names no file; give the URL of a .pth file.")
    return os.path.join(cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints"), name)


def _node_rank_and_world() -> "tuple[int, int]":
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return local_rank, dist.get_world_size()


def download_once_per_node(url: str, expected_sha256: Optional[str] = None,
                           cache_dir: Optional[str] = None) -> str:
    """Fetches ``url`` into the cache unless it is there, once per node.

    Args:
        url: an http(s) URL.
        expected_sha256: hex prefix (lower case) the download must have, checked while
            downloading: a download without it is not kept.
        cache_dir: overrides torch hub's checkpoint folder.

    Returns:
        The local path of the cached file.

    Raises:
        FileNotFoundError: the download failed (on this process or on local rank 0).
        DamagedCheckpointError: the download does not have the expected hash.
    """
    import torch.distributed as dist

    target = cache_path(url, cache_dir)
    local_rank, world = _node_rank_and_world()
    failure: Optional[BaseException] = None
    if local_rank == 0 and not os.path.isfile(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, target, hash_prefix=expected_sha256,
                                           progress=os.isatty(2))
        except (OSError, RuntimeError, ValueError) as error:  # URLError is an OSError
            failure = error
    if world > 1:
        # Every rank reaches the barrier, also after a failed download, so none hangs.
        dist.barrier()
    if isinstance(failure, RuntimeError) and "hash" in str(failure):
        raise DamagedCheckpointError(
            f"the download of {url} does not have the expected SHA-256 ({failure}); it was not "
            "kept. Check the URL and the hash you gave.") from failure
    if failure is not None:
        raise FileNotFoundError(
            f"could not download checkpoint {url}: {failure}. Check the URL and the network, "
            f"or download it yourself and pass the local path.") from failure
    if not os.path.isfile(target):
        raise FileNotFoundError(
            f"checkpoint {url} was not downloaded to {target} by local rank 0 (see its log); "
            "download it yourself and pass the local path.")
    return target


def discard_cached(path: str) -> str:
    """Removes a cached download that failed its checks; only local rank 0 removes it.

    Args:
        path: the cached file (from :func:`cache_path`).

    Returns:
        A sentence for the error message that says what happened to the file.
    """
    local_rank, _ = _node_rank_and_world()
    if local_rank != 0:
        return (f"Local rank 0 removes the cached copy {path}, so the next run downloads it "
                "again.")
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        return (f"The cached copy {path} could not be removed ({error}); delete it before "
                "trying again.")
    return f"The cached copy {path} was removed, so the next load downloads it again."
