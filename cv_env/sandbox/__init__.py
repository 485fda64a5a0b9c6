"""Secure execution of model-written image code, with op detection and frames.

    from cv_env.sandbox import Sandbox
    with Sandbox(workers=2, timeout_s=10.0, memory_mb=1024) as sandbox:
        r = sandbox.run(code, images, image_index=0)
        r.ok, r.image, r.stdout, r.error, r.ops, r.frame, r.source_index, r.elapsed_s

Two layers, each insufficient alone: RestrictedPython compilation with guarded attribute
access and module proxies (`restricted.py`, `proxies.py`), and pre-started worker processes
with namespaces, uid drop, rlimits, seccomp and a wall-clock kill (`isolation.py`,
`worker.py`, `pool.py`). Ops are detected from execution and checked against pixels
(`ops.py`, `op_rules.py`). `Sandbox.layers` says which OS layers this machine allowed.
"""

from cv_env.sandbox.pool import Sandbox, SandboxResult

__all__ = ["Sandbox", "SandboxResult"]
