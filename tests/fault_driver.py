"""A fork server for tests/test_fault_injection.py: import workbench, torch and transformers once,
then run each `workbench` command in a forked child (a fresh process in all that matters here,
started in milliseconds instead of the 2-3 s of an interpreter that imports torch).

Run as ``python tests/fault_driver.py``; it reads one JSON request per line on stdin and answers
one JSON line per request on stdout:

    request  {"argv": [...], "env": {...}, "cwd": DIR, "stdout": FILE, "stderr": FILE,
              "setup": PYTHON (optional, run in the child before the command), "fsize": BYTES (optional:
              RLIMIT_FSIZE, SIGXFSZ ignored, so writes past it fail with EFBIG)}
    answer   {"rc": EXIT_CODE or null, "signal": SIGNAL or null, "seconds": WALL}

No torch operation runs in this process before it forks (OpenMP and fork do not mix); each child
sets torch to one thread, sets the environment, re-arms `workbench.faults` and calls
`workbench.cli.main(argv)`, then leaves with `os._exit`.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the tests' own modules (conftest)

import torch  # noqa: E402

import workbench.faults as faults  # noqa: E402
from workbench.cli import main  # noqa: E402

for _name in ("transformers", "transformers.models.llama.modeling_llama", "safetensors.torch", "cma", "gguf", "yaml",
              "workbench.merge.executor", "workbench.merge.plan", "workbench.ops.quant", "workbench.quant.model",
              "workbench.quant.recover", "workbench.export.gguf", "workbench.export.peft", "workbench.export.hf",
              "workbench.search.run", "workbench.search.backends", "workbench.quant.search.run", "workbench.zoo.build",
              "workbench.zoo.train", "workbench.eval.evaluator", "workbench.models.loader", "peft"):
    try:
        __import__(_name)
    except Exception:  # noqa: BLE001 - a module moved or missing: the child imports what it needs
        pass


def _child(req: dict) -> int:
    os.chdir(req.get("cwd") or os.getcwd())
    for k, v in (req.get("env") or {}).items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = str(v)
    for fd, key in ((1, "stdout"), (2, "stderr")):
        f = os.open(req.get(key) or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    torch.set_num_threads(1)
    faults.reset()
    if req.get("setup"):
        exec(req["setup"], {"__name__": "fault_setup"})
    if req.get("fsize") is not None:
        import resource
        import signal

        # a .pyc written under the limit would be cut short (a short write is not an error to the
        # import system) and break every later import of that module
        sys.dont_write_bytecode = True

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(req["fsize"]), int(req["fsize"])))
    return main(list(req["argv"]))


def serve() -> None:
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but answers on the protocol stream
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            rc = 99
            try:
                sys.stdout = sys.__stdout__
                rc = _child(req)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 - the test reads the traceback in the stderr file
                traceback.print_exc()
                rc = 98
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(rc if isinstance(rc, int) else 1)
        _, status = os.waitpid(pid, 0)
        answer = {"rc": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                  "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                  "seconds": time.perf_counter() - t0}
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    serve()
