"""Compile every kernel for sm_90 (no GPU needed) and print, per kernel, fp64 ops and vector loads/stores.

Run in a subprocess WITHOUT TRITON_INTERPRET (the interpreter replaces @triton.jit functions); used by
test_compile.py. Prints one JSON line.
"""

import json
import os
import re

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


from mergekit_safe.kernels import kernel_module  # noqa: E402

# The package's attributes of these names are the public functions; the modules live in sys.modules.
apply, band, dare, nearswap, sce, slerp, weighted_sum = (
    kernel_module(m) for m in ("apply", "band", "dare", "nearswap", "sce", "slerp", "weighted_sum")
)

D16 = [["tt.divisibility", 16]]


def build(fn, sig, constexprs):
    names = list(fn.arg_names)
    signature = {n: sig.get(n, "constexpr") for n in names}
    attrs = {(names.index(n),): D16 for n, t in signature.items() if t.startswith("*") or n == "n"}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    body = [ln for ln in ptx.splitlines() if not ln.strip().startswith("//")]
    return {
        "f64_ops": sum(1 for ln in body if re.search(r"\.f64\b", ln)),
        "vector_loads": sum(1 for ln in body if "ld.global.v" in ln),
        "vector_stores": sum(1 for ln in body if "st.global.v" in ln),
    }


ptrs = {f"x{i}": "*bf16" for i in range(8)}
coefs = {f"c{i}": "fp32" for i in range(8)}
out = {}
out["weighted_sum_N2"] = build(
    weighted_sum._weighted_sum_kernel, {"out_ptr": "*bf16", **ptrs, **coefs, "n": "i64"}, {"N": 2, "BLOCK": 4096}
)
out["weighted_sum_N8"] = build(
    weighted_sum._weighted_sum_kernel, {"out_ptr": "*bf16", **ptrs, **coefs, "n": "i64"}, {"N": 8, "BLOCK": 4096}
)
keep_sig = {"x_ptr": "*bf16", "thr_ptr": "*i32", "out_ptr": "*bf16", "n": "i64", "index_offset": "i64", "key": "i64",
            "threshold": "i64", "scale": "fp32"}
out["dare"] = build(dare._random_keep_kernel, keep_sig, {"PER_ELEMENT": False, "BLOCK": 4096})
out["della_keep"] = build(dare._random_keep_kernel, keep_sig, {"PER_ELEMENT": True, "BLOCK": 4096})
band_sig = {"out_ptr": "*bf16", "base_ptr": "*bf16", "ptr_table": "*i64", "w_table": "*fp32", "lo_table": "*fp32",
            "hi_table": "*fp32", "scale_table": "*fp32", "n": "i64", "lam": "fp32"}
band_flags = {"N": 3, "IN_DTYPE": tl.bfloat16, "NORMALIZE": True, "ALIGNED": True, "BLOCK": 4096}
out["ties"] = build(band._masked_merge_kernel, band_sig,
                    {**band_flags, "HAS_BASE": False, "SUB_BASE": False, "CONSENSUS": True})
out["breadcrumbs"] = build(band._masked_merge_kernel, band_sig,
                           {**band_flags, "HAS_BASE": True, "SUB_BASE": True, "CONSENSUS": False})
out["breadcrumbs_ties"] = build(band._masked_merge_kernel, band_sig,
                                {**band_flags, "HAS_BASE": True, "SUB_BASE": True, "CONSENSUS": True})
out["sce"] = build(
    sce._sce_kernel,
    {"out_ptr": "*bf16", "base_ptr": "*bf16", "var_ptr": "*fp32", "ptr_table": "*i64", "w_table": "*fp32",
     "n": "i64", "start": "i64", "var_key": "i32", "cutoff": "i64", "min_weight": "fp32"},
    {"N": 3, "IN_DTYPE": tl.bfloat16, "CUT": True, "ALIGNED": True, "BLOCK": 4096},
)
out["apply"] = build(
    apply._foreach_weighted_sum_kernel,
    {"ptr_table": "*i64", "coef_table": "*fp32", "numel_table": "*i64", "block_start": "*i64", "T": "i32"},
    {"K": 3, "OUT_DTYPE": tl.bfloat16, "FIRST_DTYPE": tl.bfloat16, "REST_DTYPE": tl.bfloat16, "LOG_T": 5,
     "BLOCK": 4096, "ALIGNED": True},
)
out["slerp_partials"] = build(
    slerp._slerp_partials_kernel, {"a_ptr": "*bf16", "b_ptr": "*bf16", "part_ptr": "*fp32", "n": "i64"},
    {"BLOCK": 4096},
)
out["nearswap"] = build(
    nearswap._nearswap_kernel,
    {"a_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16", "n": "i64", "t": "fp32", "min_dist": "fp32"},
    {"BLOCK": 4096},
)
print(json.dumps(out))
