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

# safetensors dtype name -> (bits per element, torch dtype name or None when torch has none)
SAFETENSORS_TABLE: dict[str, tuple[int, str | None]] = {
    "BOOL": (8, "bool"), "F4": (4, "float4_e2m1fn_x2"), "F6_E2M3": (6, None), "F6_E3M2": (6, None),
    "U8": (8, "uint8"), "I8": (8, "int8"), "F8_E5M2": (8, "float8_e5m2"), "F8_E4M3": (8, "float8_e4m3fn"),
    "F8_E8M0": (8, "float8_e8m0fnu"), "F8_E4M3FNUZ": (8, "float8_e4m3fnuz"), "F8_E5M2FNUZ": (8, "float8_e5m2fnuz"),
    "I16": (16, "int16"), "U16": (16, "uint16"), "F16": (16, "float16"), "BF16": (16, "bfloat16"),
    "I32": (32, "int32"), "U32": (32, "uint32"), "F32": (32, "float32"), "C64": (64, "complex64"),
    "F64": (64, "float64"), "I64": (64, "int64"), "U64": (64, "uint64"),
}
# F4 packs two values per byte; torch stores it as float4_e2m1fn_x2 with the last dimension halved.
SAFETENSORS_PACKED = {"F4": 2}
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, (bits, attr) in SAFETENSORS_TABLE.items()
    if attr is not None and name not in SAFETENSORS_PACKED and hasattr(torch, attr)
}
DTYPE_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype the reader returns (``F4`` for packed float4), else torch's name."""
    if dtype == getattr(torch, "float4_e2m1fn_x2", None):
        return "F4"
    return DTYPE_TO_SAFETENSORS.get(dtype, str(dtype).removeprefix("torch."))

