"""load_teacher: plain weights load, wrappers and DDP prefixes are handled, code-carrying pickles
are refused without running them."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from abd_plugin import UnsafeCheckpointError, load_teacher
from abd_testutils import TinyCNN


def test_loads_plain_and_wrapped_state_dicts(tmp_path):
    torch.manual_seed(0)
    src = TinyCNN(8)
    for i, obj in enumerate([src.state_dict(), {"state_dict": src.state_dict(), "epoch": 3},
                             {"model": {f"module.{k}": v for k, v in src.state_dict().items()}}]):
        path = tmp_path / f"t{i}.pt"
        torch.save(obj, path)
        dst = TinyCNN(8).train()
        out = load_teacher(path, dst)
        assert out is dst and not dst.training
        for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True):
            assert torch.equal(a, b)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/abd_plugin_pwned",))


def test_refuses_a_pickle_that_carries_code(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    if os.path.exists("/tmp/abd_plugin_pwned"):
        os.remove("/tmp/abd_plugin_pwned")
    with pytest.raises(UnsafeCheckpointError, match="state_dict"):
        load_teacher(path, TinyCNN(8))
    assert not os.path.exists("/tmp/abd_plugin_pwned")


def test_missing_file_and_non_state_dict(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_teacher(tmp_path / "nope.pt", TinyCNN(8))
    path = tmp_path / "x.pt"
    torch.save({"epoch": 1}, path)
    with pytest.raises(ValueError, match="no state dict"):
        load_teacher(path, TinyCNN(8))


def test_safetensors_when_installed(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    src = TinyCNN(8)
    path = tmp_path / "t.safetensors"
    st.save_file(src.state_dict(), str(path))
    dst = load_teacher(path, TinyCNN(8))
    for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True):
        assert torch.equal(a, b)
