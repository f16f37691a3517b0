"""The one table of dtypes: names users type (CLI flags, YAML recipes) and the codes safetensors files carry.

Every module that turns a dtype name or a safetensors code into a ``torch.dtype`` (reader, writer, recipe,
eval, CLI) reads it from here, so a dtype added once is accepted everywhere.
"""

from __future__ import annotations

import torch

# Names users type -> torch dtype (eval's --dtype choices, in this order).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
# mergekit's short spellings, accepted in recipes.
DTYPE_ALIASES: dict[str, str] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}
# What a merge can write: the kernels' dtypes (float64 is for eval references only). Aliases included.
OUTPUT_DTYPE_NAMES: tuple[str, ...] = ("float32", "float16", "bfloat16")
OUTPUT_DTYPES: dict[str, torch.dtype] = {
    spelling: DTYPES[name]
    for name in OUTPUT_DTYPE_NAMES
    for spelling in (name, *(a for a, n in DTYPE_ALIASES.items() if n == name))
}

# safetensors header codes <-> torch dtypes (the format's own spelling).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

