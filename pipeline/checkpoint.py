"""Open and check a checkpoint directory before any work starts.

Everything a user can get wrong in the input is found here, with the file named:
config, family, tensor names, shapes and dtypes, shards, tokenizer.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.errors import CheckpointError
from pipeline.families import TensorPlan, plan_tensors
from pipeline.metadata import build_kv
from pipeline.safetensors_io import TensorSource, index_checkpoint, source_fingerprint

MASTER_DTYPES = ("F32", "F16", "BF16")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    model_dir: Path
    plan: TensorPlan
    sources: dict[str, TensorSource]   # by Hugging Face name, only the planned tensors
    kv: list[dict]
    fingerprint: list


def open_checkpoint(model_dir: Path) -> Checkpoint:
    model_dir = Path(model_dir)
    plan = plan_tensors(model_dir)
    found = index_checkpoint(model_dir)
    sources = {}
    for t in plan.tensors:
        src = found.get(t.hf_name)
        if src is None:
            raise CheckpointError(f"{model_dir}: tensor {t.hf_name} is missing from the safetensors files "
                                  f"(needed for {t.gguf_name}); the checkpoint is incomplete or not {plan.family.description}")
        if src.shape != t.shape:
            raise CheckpointError(f"{src.file}: tensor {t.hf_name} has shape {list(src.shape)}, but config.json "
                                  f"implies {list(t.shape)}; config and weights disagree")
        if src.dtype not in MASTER_DTYPES:
            raise CheckpointError(f"{src.file}: tensor {t.hf_name} is {src.dtype}; {plan.family.description} "
                                  f"needs float weights ({', '.join(MASTER_DTYPES)})")
        sources[t.hf_name] = src
    fam = plan.family
    for name, reason in fam.rejected:
        if name in found:
            raise CheckpointError(f"{found[name].file}: has {reason}; this checkpoint is not {fam.description}")
    planned = {t.hf_name for t in plan.tensors}
    unexpected = sorted(n for n in found if n not in planned and not n.endswith(fam.ignored_suffixes))
    if unexpected:
        raise CheckpointError(f"{found[unexpected[0]].file}: tensor {unexpected[0]}"
                              f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''} is not part of "
                              f"{fam.description} as config.json describes it; config and weights disagree")
    kv = build_kv(plan, model_dir)
    return Checkpoint(model_dir, plan, sources, kv, source_fingerprint(model_dir))
