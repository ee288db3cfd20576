"""Fingerprints of the Gluon kernels' sm_90 machine code, compiled offline (no GPU needed).

    PYTHONPATH=src python scripts/sass_fingerprint.py > before.txt   # on the old tree
    PYTHONPATH=src python scripts/sass_fingerprint.py > after.txt    # on the new tree
    diff before.txt after.txt                                        # nothing: the same kernels
    PYTHONPATH=src python scripts/sass_fingerprint.py forward        # one family (backward, forward, dq)

A change meant to leave the kernels alone (a helper factored out, arguments reordered) is checked
on the CPU this way: each line is a configuration and the hash of its SASS instruction stream
(nvdisasm of the cubin, instruction addresses stripped), so equal lines mean the GPU runs the same
instructions as the tree that was measured. PTX is no use for this: it carries source line numbers.
The configurations are the backward's and forward's defaults plus the backward's tuning variants
with their own code paths (dq_own, the deterministic modes), and the dQ kernel's (kernels/gluon_dq.py).
"""
import hashlib
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

from pyflash.kernels import gluon_backward as gb  # noqa: E402
from pyflash.kernels import gluon_dq as gd  # noqa: E402
from pyflash.kernels import gluon_forward as gf  # noqa: E402

INSTRUCTION = re.compile(r"\s+/\*[0-9a-f]{4,}\*/\s+(.*)")


def nvdisasm():
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")


def fingerprint(compiled) -> str:
    """Hash and instruction count of a CompiledKernel's SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([nvdisasm(), "-c", cubin.name], capture_output=True, text=True, check=True).stdout
    instructions = [re.sub(r"/\*[0-9a-f]+\*/", "", match.group(1)).strip()
                    for match in map(INSTRUCTION.match, sass.splitlines()) if match]
    return f"{hashlib.sha1(chr(10).join(instructions).encode()).hexdigest()[:16]} {len(instructions)}"


def backward_cases():
    for head_dim in (64, 128, 256):
        for causal in (False, True):
            for dtype in ("bf16", "fp16"):
                yield f"backward d={head_dim} causal={int(causal)} {dtype} default", (head_dim, causal, None, dtype, 0)
    yield "backward d=64 dq_own", (64, False, gb.Config(dq_own=True), "bf16", 0)
    yield "backward d=64 causal acc dq_own st3", (64, True, gb.Config(num_stages=3, acc_init=True, dq_own=True),
                                                  "bf16", 0)
    yield "backward d=128 deterministic 1", (128, False, None, "bf16", 1)
    yield "backward d=128 causal deterministic 2", (128, True, None, "bf16", 2)
    # The first pass of the two-pass backward (gluon_backward.two_pass_config: no dQ).
    for head_dim in (128, 256):
        for causal in (False, True):
            yield (f"backward d={head_dim} causal={int(causal)} two-pass",
                   (head_dim, causal, gb.two_pass_config(head_dim, causal), "bf16", 0))


def forward_cases():
    for head_dim in (64, 128, 256):
        for causal in (False, True):
            config = gf.default_config(head_dim, causal, 4096, 4096)
            yield f"forward d={head_dim} causal={int(causal)} s=4096 default", (head_dim, config, "bf16",
                                                                                dict(has_right=causal))
    # Short causal rows take the persistent grid (PERSISTENT_MAX_SEQLEN_K).
    for head_dim in (64, 128, 256):
        yield f"forward d={head_dim} causal=1 s=512 default", (head_dim, gf.default_config(head_dim, True, 512, 512),
                                                               "bf16", dict(has_right=True))
    yield "forward d=64 causal=1 s=8192 default", (64, gf.default_config(64, True, 8192, 8192), "bf16",
                                                   dict(has_right=True))
    # Every feature switch at once (one tile per CTA).
    for head_dim in (64, 128, 256):
        yield f"forward d={head_dim} all features", (head_dim, gf.default_config(head_dim, False), "bf16",
                                                     dict(has_left=True, has_right=True, softcap=True, alibi=True))


def dq_cases():
    for head_dim in (64, 128, 256):
        for causal in (False, True):
            yield f"dq d={head_dim} causal={int(causal)} default", (head_dim, gd.default_config(head_dim, causal),
                                                                    "bf16", causal)
    yield "dq d=128 causal=1 bn64-st3-wg2-pp", (128, gd.Config(64, 3, 2, True), "bf16", True)


def main():
    only = sys.argv[1:]  # kernel families to fingerprint (backward, forward, dq); none: all three
    if not only or "backward" in only:
        for label, args in backward_cases():
            print(f"{label:48s} {fingerprint(gb.compile_sm90(*args))}", flush=True)
    if not only or "forward" in only:
        for label, (head_dim, config, dtype, flags) in forward_cases():
            print(f"{label:48s} {fingerprint(gf.compile_sm90(head_dim, config, dtype, **flags))}", flush=True)
    if not only or "dq" in only:
        for label, args in dq_cases():
            print(f"{label:48s} {fingerprint(gd.compile_sm90(*args))}", flush=True)


if __name__ == "__main__":
    main()
