"""DeepSpeed's CPU op is compiled once per environment, whichever process starts DeepSpeed first."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from flexi_workflows.training.engines import one_op_build


def test_the_environments_own_ninja_and_build_folder_whatever_the_callers_path(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # a plain shell: a system ninja, if any, comes first
    bin_dir = Path(sys.executable).parent
    with one_op_build():
        if (bin_dir / "ninja").is_file():
            assert shutil.which("ninja") == str(bin_dir / "ninja")
        folder = os.environ["TORCH_EXTENSIONS_DIR"]
    assert os.environ["PATH"] == "/usr/bin:/bin"
    assert os.environ["TORCH_EXTENSIONS_DIR"] == folder, "kept: a later build of this process finds it"
    # a Ray job's PATH (the environment's bin first): the same ninja, the same folder
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    with one_op_build():
        assert os.environ["TORCH_EXTENSIONS_DIR"] == folder
    assert folder.startswith(os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions", "flexi-py3"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # the user's own
    with one_op_build():
        assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path)


def test_an_unset_path_is_unset_again(monkeypatch):
    monkeypatch.delenv("PATH")
    with one_op_build():
        pass
    assert "PATH" not in os.environ


def test_deepspeeds_op_loaded_line_is_dropped_and_the_rest_kept(capsys):
    with one_op_build():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("something a user should see")
    assert capsys.readouterr().out == "something a user should see\n"
    try:
        with one_op_build():
            print("printed before a failure")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert capsys.readouterr().out == "printed before a failure\n"


def test_deepspeed_starts_on_cpu_without_compiling_its_inference_all_reduce_op(monkeypatch, tmp_path):
    """The op costs a 25–32 s compile on a fresh machine (and a C++ compiler) for tensor-parallel inference
    alone; training on CPU reduces through torch.distributed whether it exists or not."""
    import importlib

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # `deepspeed.comm.torch` as a name is torch itself
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # an empty build folder: a build would land here
    with one_op_build():
        assert ds_torch.build_shm_op() is None
    assert list(tmp_path.iterdir()) == [], "nothing was compiled"
