"""Finding a checkpoint (Hub repo id or local folder) and loading its safetensors into our modules.

Only safetensors are read: pickled `.bin` weights can run code when unpickled, so a folder
that has nothing else is refused with a message that says how to convert it.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from .. import settings
from .config import GPTConfig
from ..errors import CheckpointError, UnknownModel
from .gpt import HEAD_PREFIXES, GPTWithHead
from .known import KNOWN_MODELS

# Only what a checkpoint needs: never pickles, never remote code.
HUB_FILES = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "*.safetensors",
    "model.safetensors.index.json",
]
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_IGNORED = (".attn.bias", ".attn.masked_bias", "position_ids")  # buffers old checkpoints carry
_OPENAI_RENAMES = {"tokens_embed.": "wte.", "positions_embed.": "wpe."}


def _offline_default() -> bool:
    return settings.get_bool("HF_HUB_OFFLINE")


def resolve_checkpoint(name_or_path: str, revision: Optional[str] = None, cache_dir: Optional[str] = None,
                       offline: Optional[bool] = None) -> Path:
    """A local folder with config.json and weights, downloading from the Hub when needed.

    The download shows huggingface_hub's progress bar on stderr (and so in a Space's log).
    """
    if not name_or_path or not str(name_or_path).strip():
        raise UnknownModel("no model given")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if str(name_or_path).startswith((".", "/", "~")) or os.sep in str(name_or_path).strip("/").replace("/", "", 1):
        # the path is the operator's to see (log, command line), not a visitor's
        raise UnknownModel("this model's checkpoint folder is missing on the server", f"no folder at {name_or_path}")
    repo_id = KNOWN_MODELS.get(name_or_path, name_or_path)
    if not _REPO_ID.match(repo_id):
        raise UnknownModel(
            f"unknown model {name_or_path!r}: use one of {', '.join(KNOWN_MODELS)}, a Hub repo id, or a local folder"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    offline = _offline_default() if offline is None else offline
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                   allow_patterns=HUB_FILES, local_files_only=offline)
    except (RepositoryNotFoundError, GatedRepoError):
        raise UnknownModel(f"no model {repo_id!r} on the Hugging Face Hub (or it is private)") from None
    except RevisionNotFoundError:
        raise UnknownModel(f"model {repo_id!r} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"model {name_or_path!r} is not in the local cache and the Hub cannot be reached"
            f"{' (offline mode)' if offline else ''}. Download it once with network access, or point "
            f"--model at a local folder with config.json and model.safetensors "
            f"(`wwt make-tiny-model DIR` writes a tiny one for a smoke test)."
        ) from None
    except Exception as e:  # network errors come in many types; say what happened, plainly
        raise CheckpointError(f"could not download {repo_id!r}: {e.__class__.__name__}: {e}. "
                              f"Point --model at a local folder instead.") from None
    return Path(folder)


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint in `folder`, from one safetensors file or an index of shards."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        if pickles:
            raise CheckpointError(
                f"{folder} has only pickled weights ({', '.join(sorted(pickles))}); they are not loaded because "
                f"unpickling can run code. Convert them to model.safetensors (for example with "
                f"safetensors.torch.save_file) and try again."
            )
        raise CheckpointError(f"no model.safetensors in {folder}")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:
            raise CheckpointError(f"cannot read {f.name}: {e}") from None
    return state


def _hub_to_ours(key: str, model_type: str) -> str:
    if not key.startswith("transformer.") and not key.startswith(tuple(p for ps in HEAD_PREFIXES.values() for p in ps)):
        key = "transformer." + key  # checkpoints saved from the bare model have no prefix
    if model_type == "openai-gpt":
        for old, new in _OPENAI_RENAMES.items():
            key = key.replace("transformer." + old, "transformer." + new)
    return key


def split_state(state: dict, config: GPTConfig) -> tuple[dict, dict]:
    """(body and head tensors under our names, tensors no head of ours knows)."""
    ours, unknown = {}, {}
    for key, tensor in state.items():
        if key.endswith(_IGNORED):
            continue
        name = _hub_to_ours(key, config.model_type)
        ours[name] = tensor
        rest = name[len("transformer."):] if name.startswith("transformer.") else None
        if rest is not None and not re.match(r"^(wte|wpe|ln_f|h\.\d+)\.", rest):
            unknown[key] = tensor
    for key in unknown:
        ours.pop(_hub_to_ours(key, config.model_type), None)
    return ours, unknown


def heads_in(state: dict) -> set[str]:
    """Heads whose tensors the checkpoint carries (the LM head is always there: it is tied)."""
    found = {"lm"}
    for head, prefixes in HEAD_PREFIXES.items():
        if head != "lm" and any(k.startswith(prefixes[-1]) for k in state):
            found.add(head)
    return found


def fill(module: GPTWithHead, ours: dict, unknown: dict) -> None:
    """Give `module` (built on the meta device) the checkpoint's tensors as its parameters, refusing
    any missing, unexpected or misshapen one by name."""
    if unknown:
        raise CheckpointError(f"unexpected tensors in checkpoint: {', '.join(sorted(unknown)[:5])}")
    expected = module.state_dict()
    lm_weight = ours.pop("lm_head.weight", None)
    if lm_weight is not None and module.config.tie_word_embeddings and "transformer.wte.weight" not in ours:
        # Tied checkpoints may keep the shared matrix under the head's name only
        # (transformers saves OpenAIGPTDoubleHeadsModel that way).
        ours["transformer.wte.weight"] = lm_weight
    head_owned = tuple(p for ps in HEAD_PREFIXES.values() for p in ps)
    missing = [k for k in expected if k not in ours]
    if missing:
        raise CheckpointError(f"checkpoint is missing tensors: {', '.join(missing[:5])}"
                              f"{' and more' if len(missing) > 5 else ''}")
    for key, tensor in ours.items():
        if key not in expected:
            if key.startswith(head_owned):
                continue  # another head's weights (e.g. a classifier's score): not used by this head
            raise CheckpointError(f"unexpected tensor in checkpoint: {key}")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"tensor {key} has shape {tuple(tensor.shape)}, "
                                  f"the config needs {tuple(expected[key].shape)}")
    with torch.no_grad():
        # The checkpoint's tensors become the parameters (assign): no second copy of any matrix.
        module.load_state_dict({key: ours[key] for key in expected}, strict=True, assign=True)
        if lm_weight is not None and not module.config.tie_word_embeddings and hasattr(module, "lm_head"):
            module.lm_head.untied = torch.nn.Parameter(lm_weight.clone())


@contextmanager
def shapes_only():
    """Build modules on the meta device (shapes, no memory) for tensors a checkpoint will give.

    The token and position embeddings' random init is skipped as well: every parameter is
    replaced by the checkpoint's, and `normal_` on the meta device imports torch's Python
    decompositions, about 68 MB of memory a server would carry for nothing."""
    reset = torch.nn.Embedding.reset_parameters
    torch.nn.Embedding.reset_parameters = lambda self: None
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.nn.Embedding.reset_parameters = reset


def load(name_or_path: str, head: str = "lm", dtype=torch.float32, device=None, revision: Optional[str] = None,
         cache_dir: Optional[str] = None, offline: Optional[bool] = None) -> GPTWithHead:
    """A GPT model with the given head, from a Hub repo id, a short name or a local folder."""
    folder = resolve_checkpoint(name_or_path, revision, cache_dir, offline)
    return load_folder(folder, head, dtype, device)


def load_folder(folder: Path, head: str = "lm", dtype=torch.float32, device=None) -> GPTWithHead:
    config = GPTConfig.from_file(Path(folder) / "config.json")
    state = read_state(Path(folder))
    ours, unknown = split_state(state, config)
    with shapes_only():
        module = GPTWithHead(config, head)
    fill(module, ours, unknown)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_with_heads(folder: Path, dtype=torch.float32, device=None) -> tuple[GPTWithHead, dict[str, GPTWithHead]]:
    """The LM model and one model per extra head the checkpoint carries, all sharing one body.

    The engine serves completion with the LM head and classification / question answering
    with the checkpoint's own heads when it has them.
    """
    folder = Path(folder)
    config = GPTConfig.from_file(folder / "config.json")
    state = read_state(folder)
    ours, unknown = split_state(state, config)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with shapes_only():
        lm = GPTWithHead(config, "lm")
    fill(lm, dict(ours), unknown)
    lm = lm.to(device=device, dtype=dtype).eval().requires_grad_(False)
    extras = {}
    for head in sorted(heads_in(state) - {"lm", "double-heads"}):
        with shapes_only():  # only the head's own small layer is new: no random body is built
            module = GPTWithHead(config, head, body=lm.transformer)
        for name, child in module.named_children():
            if name == "transformer":
                continue
            child.to_empty(device="cpu")
            with torch.no_grad():
                for pname, p in child.named_parameters():
                    key = f"{name}.{pname}"
                    if key not in ours:
                        raise CheckpointError(f"checkpoint is missing tensor {key} of its {head} head")
                    if tuple(ours[key].shape) != tuple(p.shape):
                        raise CheckpointError(f"tensor {key} has shape {tuple(ours[key].shape)}, "
                                              f"the config needs {tuple(p.shape)}")
                    p.copy_(ours[key])
            child.to(device=device, dtype=dtype)
        extras[head] = module.eval().requires_grad_(False)
    return lm, extras
