"""Compile the Triton sink-attention kernels for a CUDA target without a GPU (to PTX and cubin).

Catches what the interpreter cannot: code that interprets fine but does not compile (types, early
returns, constexpr branches), and tiles that exceed the target's shared memory. Runs in its own process
because the kernels must be defined with TRITON_INTERPRET unset:

    python -m tests.triton_compile_check --arch 90 --dtype bf16 --head-dim 64 [--varlen] [--no-window]
"""

import argparse
import os
import sys
import time

# Shared memory per block, opt-in maximum (CUDA programming guide, compute capabilities table).
MAX_SHARED_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
TRITON_TYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", choices=sorted(TRITON_TYPES), default="bf16")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--varlen", action="store_true")
    parser.add_argument("--no-window", action="store_true")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rlparity.attention import triton_sink
    from rlparity.attention import triton_sink_kernels as kernels

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    cfg = triton_sink.cuda_block_config(divmod(args.arch, 10), args.head_dim, torch_dtype)
    elem = "*" + TRITON_TYPES[args.dtype]
    target = GPUTarget("cuda", args.arch, 32)
    varlen_pointer = {"CuSeqlens": "*i32"} if args.varlen else {}
    common = dict(HEAD_DIM=args.head_dim, BLOCK_D=triton_sink._block_d(args.head_dim), CAUSAL=True,
                  HAS_WINDOW=not args.no_window, IS_VARLEN=args.varlen, EMULATE_BF16=False,
                  DOT_PRECISION=triton_sink._dot_precision(torch_dtype))
    if not args.varlen:
        common["CuSeqlens"] = None
    floats = ("qk_scale", "scale")

    def compile_kernel(fn, pointers, constexprs, warps, stages):
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            else:
                signature[name] = pointers.get(name, "fp32" if name in floats else "i32")
        started = time.monotonic()
        compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=target,
                                  options=dict(num_warps=warps, num_stages=stages))
        seconds = time.monotonic() - started
        shared = compiled.metadata.shared
        limit = MAX_SHARED_BYTES.get(args.arch)
        print(f"{fn.__name__}: sm{args.arch} {args.dtype} head_dim {args.head_dim}: shared {shared} bytes, "
              f"compiled in {seconds:.1f} s")
        if limit is not None and shared > limit:
            raise SystemExit(f"{fn.__name__}: needs {shared} bytes of shared memory, sm{args.arch} has {limit}")

    io = {"Q": elem, "K": elem, "V": elem, **varlen_pointer}
    compile_kernel(kernels._fwd_kernel,
                   {**io, "Sinks": "*fp32", "Out": elem, "Lse": "*fp32", "Lse2": "*fp32"},
                   {**common, "BLOCK_M": cfg.fwd_m, "BLOCK_N": cfg.fwd_n}, cfg.fwd_warps, cfg.fwd_stages)
    compile_kernel(kernels._bwd_dkdv_kernel,
                   {**io, "DOut": elem, "Lse2": "*fp32", "Delta": "*fp32", "DK": elem, "DV": elem},
                   {**common, "BLOCK_M": cfg.dkdv_m, "BLOCK_N": cfg.dkdv_n,
                    "GROUP_PARTIALS": args.dtype == "fp32"}, cfg.bwd_warps, cfg.bwd_stages)
    compile_kernel(kernels._bwd_dq_kernel,
                   {**io, "DOut": elem, "Lse2": "*fp32", "Delta": "*fp32", "DQ": elem},
                   {**common, "BLOCK_M": cfg.dq_m, "BLOCK_N": cfg.dq_n}, cfg.bwd_warps, cfg.bwd_stages)
    compile_kernel(kernels._bwd_preprocess,
                   {"Out": elem, "DOut": elem, "DLse": "*fp32", "Lse2": "*fp32", "Sinks": "*fp32",
                    "Delta": "*fp32", "DSinkPart": "*fp32"},
                   {"HEAD_DIM": args.head_dim, "BLOCK_D": triton_sink._block_d(args.head_dim),
                    "BLOCK_M": cfg.preprocess_m, "HAS_DLSE": True}, 4, 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
