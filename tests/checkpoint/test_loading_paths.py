"""Every in-process way a checkpoint comes in is safe: mmengine's CheckpointLoader (local, http,
other file backends), the backbone's Pretrained init_cfg, mmengine's PretrainedInit for necks and
heads, and the checkpoint converter. Code in a pickle never runs; damaged files are refused, and a
damaged download does not stay in the cache; pinned and name-carried hashes are checked; benign
files load the same weights from a URL or another backend as from the local file."""

import hashlib
import os
import runpy
import shutil
import socket
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from crafted_checkpoints import damage_largest_record, save_benign, save_code_running, weights
from torch import nn

from vmamba_mm.checkpoint import load_checkpoint_file
from vmamba_mm.errors import DamagedCheckpointError, UnsafeCheckpointError
from vmamba_mm.models import VMamba

mmengine = pytest.importorskip("mmengine")
from mmengine.fileio import BaseStorageBackend, register_backend  # noqa: E402
from mmengine.model import BaseModule  # noqa: E402
from mmengine.runner.checkpoint import CheckpointLoader, _load_checkpoint  # noqa: E402

import vmamba_mm  # noqa: E402,F401  (registers the safe loaders)

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(dims=8, depths=[1, 1, 1, 1])
REFUSED_CALL = r"^refused (os|posix)\.system"


class Neck(BaseModule):
    """A neck loaded by mmengine's own PretrainedInit (not the backbone's loader)."""

    def __init__(self, init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        self.layer = nn.Linear(96, 64)


def _backbone_state(seed: int = 3):
    torch.manual_seed(seed)
    return VMamba(SMALL, scan_backend="torch").state_dict()


def _loaders(url_or_path: str):
    """Each in-process loading path, as a callable that loads ``url_or_path``."""
    return {
        "CheckpointLoader": lambda: CheckpointLoader.load_checkpoint(url_or_path),
        "_load_checkpoint": lambda: _load_checkpoint(url_or_path, map_location="cpu"),
        "VMamba init_cfg": lambda: VMamba(SMALL, scan_backend="torch", init_cfg=dict(
            type="Pretrained", checkpoint=url_or_path)).init_weights(),
        "PretrainedInit": lambda: Neck(init_cfg=dict(
            type="Pretrained", checkpoint=url_or_path, prefix="neck.")).init_weights(),
    }


@pytest.mark.parametrize("path", ["CheckpointLoader", "_load_checkpoint", "VMamba init_cfg",
                                  "PretrainedInit"])
def test_code_in_a_served_checkpoint_never_runs(served, tmp_path: Path, path: str) -> None:
    root, url = served
    marker = tmp_path / "marker"
    save_code_running(root / "evil.pth", marker)
    with pytest.raises(UnsafeCheckpointError, match=REFUSED_CALL):
        _loaders(f"{url}/evil.pth")[path]()
    assert not marker.exists()


@pytest.mark.parametrize("where", ["local", "url"])
@pytest.mark.parametrize("path", ["CheckpointLoader", "_load_checkpoint", "VMamba init_cfg",
                                  "PretrainedInit"])
def test_damaged_checkpoint_is_refused(served, path: str, where: str) -> None:
    root, url = served
    save_benign(root / "damaged.pth", {f"backbone.{k}": v for k, v in _backbone_state().items()})
    record = damage_largest_record(root / "damaged.pth")
    location = str(root / "damaged.pth") if where == "local" else f"{url}/damaged.pth"
    with pytest.raises(DamagedCheckpointError, match=f"record '{record}'"):
        _loaders(location)[path]()


def test_served_benign_checkpoint_loads_like_the_local_file(served) -> None:
    root, url = served
    state = {f"backbone.{k}": v for k, v in _backbone_state().items()}
    neck = Neck().state_dict()
    state.update({f"neck.{k}": torch.randn_like(v) for k, v in neck.items()})
    save_benign(root / "benign.pth", state)

    local = CheckpointLoader.load_checkpoint(str(root / "benign.pth"))
    remote = CheckpointLoader.load_checkpoint(f"{url}/benign.pth")
    assert local.keys() == remote.keys()
    for key, value in local["state_dict"].items():
        assert torch.equal(remote["state_dict"][key], value), key

    backbones = [VMamba(SMALL, scan_backend="torch", init_cfg=dict(type="Pretrained",
                                                                   checkpoint=source))
                 for source in (str(root / "benign.pth"), f"{url}/benign.pth")]
    necks = [Neck(init_cfg=dict(type="Pretrained", checkpoint=source, prefix="neck."))
             for source in (str(root / "benign.pth"), f"{url}/benign.pth")]
    for module in backbones + necks:
        module.init_weights()
    for a, b in (backbones, necks):
        for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), key
    assert torch.equal(necks[1].layer.weight, state["neck.layer.weight"])
    assert torch.equal(backbones[1].patch_embed[0].weight, state["backbone.patch_embed.0.weight"])


def test_every_mmengine_scheme_is_served_by_the_safe_loader() -> None:
    from mmengine.runner import checkpoint as mm_checkpoint

    from vmamba_mm.mmengine_compat import load_from_safe_loader, load_url_safely

    assert set(CheckpointLoader._schemes.values()) == {load_from_safe_loader}
    for prefix in ("", "http://", "https://", "modelzoo://", "torchvision://", "open-mmlab://",
                   "openmmlab://", "mmcls://", "pavi://", r"(\S+\:)?s3://"):
        assert prefix in CheckpointLoader._schemes, prefix
    assert mm_checkpoint.load_url is load_url_safely
    assert mm_checkpoint.load_from_http is load_from_safe_loader


def test_convert_tool_refuses_code_and_damage(served, tmp_path: Path) -> None:
    root, url = served
    marker = tmp_path / "marker"
    save_code_running(root / "evil.pth", marker)
    damaged = save_benign(root / "damaged.pth")
    damage_largest_record(damaged)
    tool = runpy.run_path(str(REPO / "tools" / "model_converters" / "convert_checkpoint.py"))
    for source in (f"{url}/evil.pth", str(damaged)):
        with pytest.raises(SystemExit) as exit_info:
            tool["main"]([source, str(tmp_path / "out.pth")])
        message = str(exit_info.value.code)
        assert message.startswith("error: refused") or "fails its check" in message, message
    assert not marker.exists()
    assert not (tmp_path / "out.pth").exists()


class _CountingHandler(SimpleHTTPRequestHandler):
    gets = 0
    lock = threading.Lock()

    def do_GET(self):  # noqa: N802  (http.server's name)
        with self.lock:
            type(self).gets += 1
        super().do_GET()

    def log_message(self, format, *args):  # noqa: A002
        pass


_RANK_SCRIPT = """
import sys, torch.distributed as dist
from vmamba_mm.checkpoint.download import download_once_per_node
dist.init_process_group("gloo")
path = download_once_per_node(sys.argv[1])
print("PATH", path)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_url_is_downloaded_once_per_node(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    save_benign(served / "shared.pth")
    _CountingHandler.gets = 0
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a, **k: _CountingHandler(*a, directory=str(served), **k))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/shared.pth"
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch_home"), WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    try:
        ranks = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, url], text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
                 for r in range(2)]
        outputs = [rank.communicate(timeout=120) for rank in ranks]
    finally:
        server.shutdown()
        server.server_close()
    for rank, (_out, err) in zip(ranks, outputs):
        assert rank.returncode == 0, err
    paths = {line.split(" ", 1)[1] for out, _ in outputs for line in out.splitlines()
             if line.startswith("PATH ")}
    assert len(paths) == 1 and Path(paths.pop()).is_file()
    assert _CountingHandler.gets == 1


def _cached(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]


def test_damaged_download_leaves_the_cache_and_a_fixed_server_then_works(served) -> None:
    root, url = served
    save_benign(root / "model.pth")
    record = damage_largest_record(root / "model.pth")
    cached = _cached(f"{url}/model.pth")
    with pytest.raises(DamagedCheckpointError, match=f"record '{record}'") as error:
        CheckpointLoader.load_checkpoint(f"{url}/model.pth")
    assert f"cached copy {cached} was removed" in str(error.value)
    assert not cached.exists()

    save_benign(root / "model.pth")
    loaded = CheckpointLoader.load_checkpoint(f"{url}/model.pth")
    assert torch.equal(loaded["state_dict"]["layer.weight"], weights()["layer.weight"])
    assert cached.is_file()


def test_mmengine_load_url_into_a_model_dir_drops_a_damaged_copy(served, tmp_path: Path) -> None:
    # mmengine's own code (e.g. its torchvision/openmmlab schemes) calls load_url(url, model_dir).
    from mmengine.runner import checkpoint as mm_checkpoint

    root, url = served
    save_benign(root / "model.pth")
    record = damage_largest_record(root / "model.pth")
    cached = tmp_path / "hub" / "model.pth"
    with pytest.raises(DamagedCheckpointError, match=f"record '{record}'") as error:
        mm_checkpoint.load_url(f"{url}/model.pth", model_dir=str(cached.parent))
    assert f"cached copy {cached} was removed" in str(error.value)
    assert not cached.exists()

    save_benign(root / "model.pth")
    loaded = mm_checkpoint.load_url(f"{url}/model.pth", model_dir=str(cached.parent))
    assert torch.equal(loaded["state_dict"]["layer.weight"], weights()["layer.weight"])
    assert cached.is_file()


def test_sha256_pin_of_a_url_is_checked_while_downloading_and_on_the_cached_copy(
        served, tmp_path: Path) -> None:
    root, url = served
    wanted = save_benign(tmp_path / "wanted.pth", weights(seed=1))
    pin = f"#sha256={hashlib.sha256(wanted.read_bytes()).hexdigest()}"
    save_benign(root / "model.pth")  # not the pinned file
    cached = _cached(f"{url}/model.pth")

    # The pin goes into the download: a download without the pinned hash is never kept.
    with pytest.raises(DamagedCheckpointError, match="does not have the expected SHA-256"):
        load_checkpoint_file(f"{url}/model.pth{pin}")
    assert not cached.exists()

    # A copy cached before the pin was given fails it: it is removed, and its path named.
    load_checkpoint_file(f"{url}/model.pth")
    assert cached.is_file()
    with pytest.raises(DamagedCheckpointError, match="not the .* that was given") as error:
        load_checkpoint_file(f"{url}/model.pth{pin}")
    assert f"cached copy {cached} was removed" in str(error.value)
    assert not cached.exists()

    shutil.copy(wanted, root / "model.pth")  # the server is fixed
    loaded, _ = load_checkpoint_file(f"{url}/model.pth{pin}")
    assert torch.equal(loaded["state_dict"]["layer.weight"], weights(seed=1)["layer.weight"])


def test_hash_in_a_url_file_name_is_checked(served) -> None:
    root, url = served
    path = save_benign(root / "model.pth")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    wrong = "0" * 8 if digest[0] != "0" else "1" * 8
    shutil.copy(path, root / f"model-{wrong}.pth")
    with pytest.raises(DamagedCheckpointError, match="expected SHA-256"):
        CheckpointLoader.load_checkpoint(f"{url}/model-{wrong}.pth")
    assert not _cached(f"{url}/model-{wrong}.pth").exists()
    shutil.copy(path, root / f"model-{digest[:8]}.pth")
    loaded = CheckpointLoader.load_checkpoint(f"{url}/model-{digest[:8]}.pth")
    assert torch.equal(loaded["state_dict"]["layer.bias"], weights()["layer.bias"])


def test_sha256_in_a_backbone_init_cfg_and_in_load_from_is_checked(tmp_path: Path) -> None:
    from mmengine.runner.checkpoint import load_checkpoint

    state = _backbone_state()
    path = save_benign(tmp_path / "backbone.pth", {f"backbone.{k}": v for k, v in state.items()})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    wrong = "f" * 64 if digest[0] != "f" else "e" * 64

    def init(sha256: str) -> VMamba:
        model = VMamba(SMALL, scan_backend="torch", init_cfg=dict(
            type="Pretrained", checkpoint=str(path), sha256=sha256))
        model.init_weights()
        return model

    with pytest.raises(DamagedCheckpointError, match="that was given"):
        init(wrong[:12])
    assert torch.equal(init(digest[:12].upper()).patch_embed[0].weight,
                       state["patch_embed.0.weight"])

    # What the Runner calls for load_from=...#sha256=...
    model = nn.ModuleDict({"backbone": VMamba(SMALL, scan_backend="torch")})
    with pytest.raises(DamagedCheckpointError, match="that was given"):
        load_checkpoint(model, f"{path}#sha256={wrong}", map_location="cpu")
    load_checkpoint(model, f"{path}#sha256={digest}", map_location="cpu", strict=True)
    assert torch.equal(model["backbone"].patch_embed[0].weight, state["patch_embed.0.weight"])


class _FolderBackend(BaseStorageBackend):
    """An mmengine file backend for ``vmtest://<name>`` that reads a folder (stands in for s3,
    petrel and other storage)."""

    root = Path(".")

    def get(self, filepath) -> bytes:
        return (self.root / str(filepath).split("://", 1)[1]).read_bytes()

    def get_text(self, filepath, encoding: str = "utf-8") -> str:
        return self.get(filepath).decode(encoding)


register_backend("vmtest", _FolderBackend, force=True, prefixes="vmtest")


def test_other_file_backends_load_benign_and_refuse_code_and_damage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_FolderBackend, "root", tmp_path)
    marker = tmp_path / "marker"
    benign = save_benign(tmp_path / "benign.pth")
    save_code_running(tmp_path / "evil.pth", marker)
    save_benign(tmp_path / "damaged.pth")
    record = damage_largest_record(tmp_path / "damaged.pth")
    digest = hashlib.sha256(benign.read_bytes()).hexdigest()
    wrong = "0" * 8 if digest[0] != "0" else "1" * 8
    shutil.copy(benign, tmp_path / f"named-{wrong}.pth")
    shutil.copy(benign, tmp_path / f"named-{digest[:8]}.pth")

    loaded = CheckpointLoader.load_checkpoint("vmtest://benign.pth")
    local = CheckpointLoader.load_checkpoint(str(benign))
    for key, value in local["state_dict"].items():
        assert torch.equal(loaded["state_dict"][key], value), key
    with pytest.raises(UnsafeCheckpointError, match=REFUSED_CALL):
        CheckpointLoader.load_checkpoint("vmtest://evil.pth")
    assert not marker.exists()
    with pytest.raises(DamagedCheckpointError, match=f"record '{record}'"):
        CheckpointLoader.load_checkpoint("vmtest://damaged.pth")
    # The name's hash is checked whatever backend the bytes come from.
    with pytest.raises(DamagedCheckpointError, match="name-<sha256 prefix>"):
        CheckpointLoader.load_checkpoint(f"vmtest://named-{wrong}.pth")
    CheckpointLoader.load_checkpoint(f"vmtest://named-{digest[:8]}.pth")
    with pytest.raises(DamagedCheckpointError, match="that was given"):
        CheckpointLoader.load_checkpoint(f"vmtest://benign.pth#sha256={wrong}")
