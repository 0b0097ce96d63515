"""Finding a checkpoint (local folder or hub id), reading config.json and safetensors shards.

Our modules are named after the hub checkpoint keys, so loading is: rename a prefix (other
layouts), drop a few named tensors, check names and shapes, assign. Tensors are read one at a
time with plain file reads (no mmap kept resident) into their final tensors (a conversion goes through
one small reused buffer), placed into a model built on the `meta` device, so peak memory stays close to
the weights' final size.
"""
from __future__ import annotations

import json
import os
import re
import struct
import sys
import time
from pathlib import Path

import torch

import quantize

CONFIG_FILES = ["*.json", "*.jinja"]  # config, tokenizer, preprocessor, chat template
WEIGHT_FILES = ["*.safetensors", "model.safetensors.index.json"]

# Original ViP-LLaVA training checkpoints, renamed as the official convert script does:
# substring replacements, every occurrence, in this order.
ORIGINAL_RENAMES = [
    ("model.vision_tower.", ""), ("model.mm_projector", "multi_modal_projector"), ("model", "model.model"),
    ("vision_model.model", "vision_model"), ("lm_head", "language_model.lm_head"),
    ("model.model", "language_model.model"), ("multi_modal_projector.0", "multi_modal_projector.linear_1"),
    ("multi_modal_projector.2", "multi_modal_projector.linear_2"), ("final_linear.0", "linear_1"),
    ("final_linear.2", "linear_2"), ("multi_modal_projector.clip_layernorm", "multi_modal_projector.projector_layernorm"),
]
# transformers layouts -> hub layout (the names of our modules). Hub keys pass unchanged.
RENAMES = [
    (r"^model\.language_model\.", "language_model.model."),  # transformers 4.5x / 5.x in memory
    (r"^model\.(vision_tower|multi_modal_projector)\.", r"\1."),  # idem
    (r"^lm_head\.", "language_model.lm_head."),  # idem
    (r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),  # transformers 5.x save_pretrained
]
# Tensors some checkpoints carry that we do not load, and why.
SKIP = [
    (r"\.position_ids$", "CLIP's position index buffer: positions are 0..576 by construction"),
    (r"rotary_emb\.inv_freq$", "RoPE frequencies: recomputed from rope_theta"),
]

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def log(msg: str, end="\n"):
    print(msg, file=sys.stderr, end=end, flush=True)


def progress(msg: str, last: bool = False):
    """A progress line: rewritten in place on a terminal; elsewhere (a log file, CI) each one a whole line,
    so that a `\r` never runs it into the next."""
    if sys.stderr.isatty():
        log("\r" + msg, end="\n" if last else "")
    else:
        log(msg)


# ---------------------------------------------------------------------------- finding files
def resolve(path_or_repo_id, allow_patterns=CONFIG_FILES + WEIGHT_FILES) -> Path:
    """A local checkpoint folder, or a hub id downloaded (or found in the hub cache)."""
    name = str(path_or_repo_id)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{name} is a file: pass the checkpoint folder that holds config.json")
    if name.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise FileNotFoundError(f"no checkpoint folder {name!r}, and it is not a hub id of the form owner/name")
    from huggingface_hub import snapshot_download  # shows its own progress bars

    try:
        return Path(snapshot_download(name, allow_patterns=allow_patterns))
    except Exception as e:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
        raise OSError(
            f"could not fetch {name!r} from the Hugging Face hub{offline}, and no complete copy is in the hub cache "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Without network access, download it on "
            f"another machine (`hf download {name}`) and pass the local folder that holds config.json and the "
            f"*.safetensors files instead; to try the code offline, `python tiny_checkpoint.py FOLDER` writes a "
            f"small random checkpoint there (its answers are gibberish).") from e


def read_json(file: Path) -> dict:
    """A JSON file's contents; {} if there is no such file."""
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e}): download it again") from e


def read_config(folder: Path) -> dict:
    file = Path(folder) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in {folder}: is this a VipLlava checkpoint folder?")
    return read_json(file)


def shard_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index.name} names {len(names)} shard(s) but {', '.join(missing)} is missing "
                                    f"from {folder}: download the checkpoint again")
        return [folder / n for n in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    raise FileNotFoundError(f"no weights in {folder}: expected model.safetensors, or shards named by "
                            f"model.safetensors.index.json (only .safetensors files are read)")


# ---------------------------------------------------------------------------- safetensors
def read_header(file: Path) -> tuple[dict, int]:
    """The tensor table of a .safetensors file and the byte offset where its data starts."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file.name} is not a valid safetensors file ({e}): it is corrupt, download it again") from e
    if 8 + n + end > size:
        raise ValueError(f"{file.name} is truncated: its header describes {8 + n + end} bytes but the file has "
                         f"{size}. Download it again.")
    return header, 8 + n


CHUNK_BYTES = 16 * 2**20  # conversions go through one scratch buffer of this size, reused


def read_tensor(f, file: Path, start: int, entry: dict, dtype: torch.dtype | None = None, device="cpu",
                scratch: torch.Tensor | None = None, into: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor, floating point ones converted to `dtype`, on `device`.

    The result is allocated once at its final size and dtype. In the checkpoint's dtype on the CPU the
    bytes are read straight into it; otherwise they go through `scratch` (uint8, reused from tensor to
    tensor) a chunk at a time, so no full-size temporary is ever made: a loop of full-size temporaries,
    freed and reallocated between bigger results, fragments the heap and left loads of an fp16 checkpoint
    in float32 with 10-40% more resident memory than the weights, depending on the allocator's luck.
    `into` (uint8, CPU, in the checkpoint's dtype only): a reused buffer to read into, for a tensor that is
    quantized and dropped at once.
    """
    begin, end = entry["data_offsets"]
    src = SAFETENSORS_DTYPES[entry["dtype"]]
    dtype = dtype if dtype is not None and src.is_floating_point else src
    if into is not None:
        out = into[:(end - begin) // src.itemsize * src.itemsize].view(src).view(entry["shape"])
    else:
        out = torch.empty(entry["shape"], dtype=dtype, device=device)
    n = end - begin
    if n != out.numel() * src.itemsize:
        raise ValueError(f"{file.name} is corrupt: a tensor of shape {entry['shape']} in {entry['dtype']} takes "
                         f"{out.numel() * src.itemsize} bytes but its header gives it {n}. Download it again.")
    f.seek(start + begin)
    if dtype == src and out.device.type == "cpu":
        _read_exactly(f, file, out.view(-1).view(torch.uint8))
        return out
    if scratch is None:
        scratch = torch.empty(min(n, CHUNK_BYTES), dtype=torch.uint8)
    step = len(scratch) // src.itemsize * src.itemsize
    flat = out.view(-1)
    for pos in range(0, n, step or 1):  # (n = 0: no step)
        chunk = scratch[:min(step, n - pos)]
        _read_exactly(f, file, chunk)
        flat[pos // src.itemsize:(pos + len(chunk)) // src.itemsize].copy_(chunk.view(src))
    return out


def _read_exactly(f, file: Path, buf: torch.Tensor):
    """Fill a uint8 CPU tensor from f; one read() returns at most ~2 GiB on Linux, so loop."""
    view, done = memoryview(buf.numpy()), 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise ValueError(f"{file.name} is truncated: download it again")
        done += got


def canonical_name(key: str, original: bool) -> str:
    renames = [(re.escape(a), b) for a, b in ORIGINAL_RENAMES] if original else RENAMES
    for pattern, repl in renames:
        key = re.sub(pattern, repl, key)
    return key


# ---------------------------------------------------------------------------- dtype, device, memory
def resolve_device(device=None) -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available here: use 'cpu' (or 'auto')")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for but MPS is not available here: use 'cpu' (or 'auto')")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {device}: use 'auto', 'cpu', 'cuda' or 'mps'")
    return device


def device_from_map(device_map, device=None) -> torch.device:
    """transformers' device_map ("auto", "cpu", "cuda:1", 0, or a dict of parts) as the one device it names."""
    devices = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
    if len(devices) != 1:
        raise ValueError(f"device_map places the model's parts on {len(devices)} devices "
                         f"({sorted(map(str, devices))}): this loader keeps the whole model on one device; "
                         f"pass one, e.g. device_map='cuda:0', or quantize='int4' to fit a small GPU")
    mapped = devices.pop()
    mapped = resolve_device(f"cuda:{mapped}" if isinstance(mapped, int) else mapped)
    if device is not None and resolve_device(device) != mapped:
        raise ValueError(f"device={device!r} and device_map={device_map!r} disagree: pass one of them")
    return mapped


def resolve_dtype(dtype, device: torch.device, checkpoint_dtype: torch.dtype) -> torch.dtype:
    """None/'auto': float32 on CPU (this is where CPUs are fastest), the checkpoint's dtype elsewhere."""
    if dtype in (None, "auto"):
        return torch.float32 if device.type == "cpu" else checkpoint_dtype
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"unknown dtype {dtype!r}: use 'auto', 'float32', 'float16' or 'bfloat16'")


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on the device, or None when we cannot tell."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
    return None


def size(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"


ROOM = 1.2  # float32 is the CPU default only with this much room: the activations, the KV cache, the OS


def auto_cpu_dtype(model, build, verbose: bool = True) -> torch.dtype:
    """float32 if its weights fit in the available memory with room to spare, else bfloat16; else an error
    with what int8 and int4 would need. `build(mode)` builds the model on meta, quantized to mode."""
    free = available_memory(torch.device("cpu"))
    sizes = {dtype: quantize.weight_bytes(model, dtype) for dtype in (torch.float32, torch.bfloat16)}
    for dtype, n in sizes.items():
        if free is None or n * ROOM <= free:
            if verbose:
                log(f"dtype auto: {str(dtype).removeprefix('torch.')} ({size(n)} of weights"
                    f"{'' if free is None else f', {size(free)} of memory available'})")
            return dtype
    need = {mode: quantize.weight_bytes(build(mode), torch.bfloat16) for mode in quantize.MODES}
    raise MemoryError(f"the weights need {size(sizes[torch.float32])} in float32 and {size(sizes[torch.bfloat16])} in "
                      f"bfloat16, but only {size(free)} of memory is available: quantize them while loading, "
                      f"quantize='int8' (--quantize int8, {size(need['int8'])}) or quantize='int4' (--quantize int4, "
                      f"{size(need['int4'])})")


def check_fits(n_bytes: int, dtype: torch.dtype, device: torch.device):
    free = available_memory(device)
    if free is not None and n_bytes > free:
        smaller = " load in float16 or bfloat16 (dtype=..., --dtype) to halve it," if dtype.itemsize > 2 else \
            " quantize while loading (quantize='int8' or 'int4', --quantize) to need a half or a third of it,"
        raise MemoryError(f"the weights need {size(n_bytes)} in {str(dtype).removeprefix('torch.')} but only "
                          f"{size(free)} is available on {device}:{smaller} use a device with more memory, "
                          f"or free some memory")


# ---------------------------------------------------------------------------- loading
def load_weights(model: torch.nn.Module, folder: Path, dtype: torch.dtype, device: torch.device,
                 check=None, verbose: bool = True, quantizing: bool = False):
    """Assign the checkpoint's tensors to `model` (built on the meta device), converted to dtype.

    `check(name, checkpoint_shape, model_shape)` may raise a more specific error for a shape mismatch.
    quantizing: the model's quantized layers (quantize.py) are filled from the checkpoint's float weights,
    each quantized as soon as it is read, so the full-precision model never exists in memory. Otherwise
    their tensors are read as saved (a quantized checkpoint) and keep their own dtypes.
    """
    files = shard_files(folder)
    headers = {file: read_header(file) for file in files}
    keys = [k for header, _ in headers.values() for k in header]
    original = any(k.startswith(("model.mm_projector.", "model.layers.", "model.embed_tokens.")) for k in keys)

    meta = model.state_dict()
    expected = {k: v.shape for k, v in meta.items()}
    layers = {f"{name}.weight": m for name, m in quantize.quantized_layers(model).items()}  # by weight name
    own_dtype = quantize.quantized_buffers(model)
    if quantizing:  # the checkpoint holds (out, in) float weights where the model has q, scales (, zeros)
        expected = {k: v for k, v in expected.items() if k not in own_dtype}
        expected.update({name: torch.Size((m.out_features, m.in_features)) for name, m in layers.items()})
    plan, found = {}, {}  # file -> [(key, name)]; name -> checkpoint shape
    for file, (header, _) in headers.items():
        for key, entry in header.items():
            if any(re.search(p, key) for p, _ in SKIP):
                continue
            name = canonical_name(key, original)
            plan.setdefault(file, []).append((key, name))
            found[name] = torch.Size(entry["shape"])
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or unexpected:
        def few(names):
            return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        msg = [f"the checkpoint in {folder} does not match the model built from its config.json:"]
        if missing:
            msg.append(f"{len(missing)} missing key(s): {few(missing)}")
        if unexpected:
            msg.append(f"{len(unexpected)} unexpected key(s): {few(unexpected)}")
        raise KeyError(" ".join(msg) + ". Is this a VipLlava checkpoint, and is config.json the one it came with?")
    for name, shape in found.items():
        if shape != expected[name]:
            if check:
                check(name, tuple(shape), tuple(expected[name]))
            raise ValueError(f"shape mismatch for {name}: the checkpoint has {tuple(shape)}, the model built from "
                             f"config.json expects {tuple(expected[name])}. Is config.json the one that came with the weights?")

    check_fits(quantize.weight_bytes(model, dtype), dtype, device)
    state, t0 = {}, time.perf_counter()
    def nbytes(file, key):
        begin, end = headers[file][0][key]["data_offsets"]
        return end - begin

    scratch = torch.empty(min(max((nbytes(f, k) for f, pairs in plan.items() for k, _ in pairs), default=0),
                              CHUNK_BYTES), dtype=torch.uint8)
    into = torch.empty(max((nbytes(f, k) for f, pairs in plan.items() for k, name in pairs
                            if quantizing and name in layers), default=0),
                       dtype=torch.uint8)  # the largest float weight to quantize, read into one buffer, reused
    for i, (file, pairs) in enumerate(plan.items()):
        if verbose:
            progress(f"loading weights: shard {i + 1}/{len(plan)} ({file.name})")
        header, start = headers[file]
        with open(file, "rb", buffering=0) as f:
            for key, name in sorted(pairs, key=lambda p: header[p[0]]["data_offsets"][0]):  # read in file order
                if quantizing and name in layers:  # read as stored (on the CPU), quantized, then placed
                    w = read_tensor(f, file, start, header[key], None, "cpu", scratch, into)
                    prefix = name[:-len("weight")]
                    state.update({prefix + k: v.to(device) for k, v in layers[name].from_float(w).items()})
                else:
                    own = meta[name].dtype if name in own_dtype else dtype
                    state[name] = read_tensor(f, file, start, header[key], own, device, scratch)
    if verbose:
        progress(f"loading weights: {len(plan)} shard(s), {len(state)} tensors in {time.perf_counter() - t0:.1f} s",
                 last=True)
    model.load_state_dict(state, strict=True, assign=True)
    quantize.pack(model)
    slow = quantize.without_kernel(model)
    if slow and verbose:
        log(f"note: {len(slow)} quantized layer(s) have no fused kernel on {device} with this torch (e.g. {slow[0]}): "
            f"they dequantize their weights for every product, which gives the same answers, more slowly")
    return model


def checkpoint_dtype(config: dict, folder: Path) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or config.get("text_config", {}).get("torch_dtype")
    if name in DTYPES:
        return DTYPES[name]
    header, _ = read_header(shard_files(folder)[0])
    return next((SAFETENSORS_DTYPES[e["dtype"]] for e in header.values() if e["dtype"] in ("F32", "F16", "BF16")),
                torch.float32)


# ---------------------------------------------------------------------------- saving
def save_weights(state: dict, folder: Path, max_shard_bytes: int = 5 * 2**30):
    """Write tensors as the hub does: model.safetensors, or shards plus model.safetensors.index.json."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards, size = [[]], 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, names in zip(files, shards):
        save_file({k: state[k].contiguous().cpu() for k in names}, folder / file, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: file for file, names in zip(files, shards) for k in names}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files
