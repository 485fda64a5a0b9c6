"""Secure execution of model-written image code, with op detection and frames.

    from cv_env.sandbox import Sandbox
    with Sandbox(workers=2, timeout_s=10.0, memory_mb=1024) as sandbox:
        r = sandbox.run(code, images, image_index=0)
        r.ok, r.image, r.stdout, r.error, r.ops, r.frame, r.source_index, r.elapsed_s

Two layers, each sufficient for what it promises without the other, and a host that believes
neither: the Python layer (`restricted.py`, `proxies.py`: restricted compilation, guarded
attributes, items, iteration and call results, module proxies); the OS layer (`isolation.py`,
`syscalls.py`, `worker.py`: an empty root under bubblewrap, a PID/IPC/network/mount namespace
per worker, uid or capability drop, rlimits, a seccomp allow-list, a wall-clock kill); and the
host (`pool.py`, `wire.py`, `reply.py`, `verify.py`: bounded replies read before one deadline,
every claimed rotation, flip and crop checked against the pixels). Ops are detected from
execution (`ops.py`, `op_rules.py`). `Sandbox.layers` says which pieces this machine allowed.
"""

from cv_env.sandbox.pool import Sandbox, SandboxResult

__all__ = ["Sandbox", "SandboxResult"]
