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


def _saved(tmp_path, fmt):
    src = TinyCNN(8)
    path = tmp_path / f"t.{fmt}"
    if fmt == "safetensors":
        st = pytest.importorskip("safetensors.torch")
        st.save_file(src.state_dict(), str(path))
    elif fmt == "legacy":
        torch.save(src.state_dict(), path, _use_new_zipfile_serialization=False)
    else:
        torch.save(src.state_dict(), path)
    return path


@pytest.mark.parametrize("fmt", ["pt", "legacy", "safetensors"])
@pytest.mark.parametrize("keep", [0.0, 0.02, 0.5, 0.99])
def test_empty_or_truncated_file_is_one_clear_error_naming_it(tmp_path, fmt, keep):
    from abd_plugin import CheckpointReadError

    path = _saved(tmp_path, fmt)
    data = path.read_bytes()
    cut = tmp_path / f"cut_{fmt}.pt"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointReadError, match=str(cut)) as err:
        load_teacher(cut, TinyCNN(8))
    assert isinstance(err.value, ValueError)
    assert ("empty" if keep == 0 else "truncated or corrupted") in str(err.value) or (
        "neither a torch.save file nor a safetensors file" in str(err.value))


def test_safetensors_is_recognised_by_content_not_by_name(tmp_path):
    path = _saved(tmp_path, "safetensors")
    renamed = tmp_path / "teacher.pt"
    path.rename(renamed)
    load_teacher(renamed, TinyCNN(8))  # was refused as an unsafe pickle before
    plain = _saved(tmp_path, "pt")
    disguised = tmp_path / "teacher.safetensors"
    plain.rename(disguised)
    load_teacher(disguised, TinyCNN(8))  # a torch.save file with a safetensors name


def test_foreign_files_and_code_in_old_pickle_protocols(tmp_path):
    from abd_plugin import CheckpointReadError

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointReadError, match="neither a torch.save file"):
        load_teacher(junk, TinyCNN(8))
    with pytest.raises(CheckpointReadError, match="is a directory"):
        load_teacher(tmp_path, TinyCNN(8))
    for proto in (0, 2, 4):
        evil = tmp_path / f"evil{proto}.pt"
        with open(evil, "wb") as f:
            pickle.dump({"state_dict": _Evil()}, f, protocol=proto)
        with pytest.raises(UnsafeCheckpointError):
            load_teacher(evil, TinyCNN(8))
    assert not os.path.exists("/tmp/abd_plugin_pwned")
