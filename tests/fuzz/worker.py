"""Runs fuzz cases in this process and reports each on a protocol pipe; tests/test_fuzz.py drives it.

    python tests/fuzz/worker.py --serve SEED TIMEOUT    read case names from stdin, one per line
    python tests/fuzz/worker.py --run NAME [SEED]        run one case, print the outcome (for reproducing)
    python tests/fuzz/worker.py --list                   print every case name

--serve prints one JSON object per case on stdout, {"done": name, "ok": bool, "error": str}. The cases run in
forked children of this process (torch and pyllmops are imported once): a child that does not finish a case
within TIMEOUT seconds is killed and the case reported as a HANG, a child that dies mid-case makes it a
CRASH, and a fresh child takes the remaining cases. The supervising process runs no op itself.
"""
import json
import os
import select
import signal
import sys
import time
import traceback
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

torch.set_num_threads(1)

import families  # noqa: E402,F401  (registers the cases)
import properties  # noqa: E402,F401  (registers the hypothesis properties)
from cases import CASES, Bad  # noqa: E402


def _control(kind):
    """Negative controls of the driver (test_fuzz.py): a crash, a hang, a pass and a broken contract."""
    def fn(g):
        if kind == "crash":
            os.kill(os.getpid(), 9)
        if kind == "hang":
            while True:
                pass
        if kind == "fail":
            raise Bad("a broken contract")
    return fn


# a property runs PYLLMOPS_FUZZ_EXAMPLES examples (default 20) in one case: its watchdog grows with them
PROPERTY_SCALE = max(1.0, int(os.environ.get("PYLLMOPS_FUZZ_EXAMPLES", "20")) / 20)
CONTROLS = {f"control/{k}": _control(k) for k in ("crash", "hang", "ok", "fail")}


def run_case(name, seed):
    g = torch.Generator().manual_seed((zlib.crc32(name.encode()) + seed) % 2**63)
    torch.manual_seed((zlib.crc32(name.encode()) * 7 + seed) % 2**63)
    try:
        (CONTROLS.get(name) or CASES[name])(g)
        return True, ""
    except Exception as e:  # noqa: BLE001  (a broken contract, reported by name)
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(tb)
                      if "pyllmops" in f.filename), "")
        return False, f"{type(e).__name__}: {str(e)[:600]}" + (f" [at {where}]" if where else "")


def child(names, seed, wfd):
    """Runs names in order (in a forked child), reporting on pipe wfd; the ops' prints go to stderr."""
    os.dup2(2, 1)
    out = os.fdopen(wfd, "w", buffering=1)
    for name in names:
        out.write(json.dumps({"start": name}) + "\n")
        ok, err = run_case(name, seed) if name in CASES or name in CONTROLS else (False, f"no such case {name!r}")
        out.write(json.dumps({"done": name, "ok": ok, "error": err}) + "\n")
    out.flush()
    os._exit(0)


def supervise(names, seed, timeout, report):
    """Runs every case in forked children of this (already imported) process: a child that stays silent in a
    case for `timeout` seconds is killed (HANG), one that dies mid-case is a CRASH; a new child takes the
    rest. report(name, ok, error) is called once per name."""
    todo = list(names)
    while todo:
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            try:
                child(todo, seed, wfd)
            finally:
                os._exit(3)
        os.close(wfd)
        current, buf, started = None, b"", time.monotonic()
        while True:
            wait = 60.0 if current is None else timeout * (PROPERTY_SCALE if current.startswith("property/") else 1)
            ready, _, _ = select.select([rfd], [], [], max(0.0, started + wait - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                name = current or todo[0]
                report(name, False, f"HANG: no answer within {wait:g} s (killed)")
                todo.remove(name)
                break
            chunk = os.read(rfd, 65536)
            if not chunk:
                _, status = os.waitpid(pid, 0)
                if current is not None:
                    how = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                           else f"exit {os.WEXITSTATUS(status)}")
                    report(current, False, f"CRASH: the process died ({how}) in this case")
                    todo.remove(current)
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if "start" in msg:
                    current, started = msg["start"], time.monotonic()
                else:
                    report(msg["done"], msg["ok"], msg["error"])
                    todo.remove(msg["done"])
                    current, started = None, time.monotonic()
        os.close(rfd)


def main():
    if sys.argv[1] == "--list":
        print("\n".join(CASES))
        return
    if sys.argv[1] == "--run":
        seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
        ok, err = run_case(sys.argv[2], seed)
        print("ok" if ok else f"FAIL {err}")
        sys.exit(0 if ok else 1)
    seed, timeout = int(sys.argv[2]), float(sys.argv[3])
    names = [n.strip() for n in sys.stdin.read().split("\n") if n.strip()]
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def report(name, ok, err):
        proto.write(json.dumps({"done": name, "ok": ok, "error": err}) + "\n")

    supervise(names, seed, timeout, report)


if __name__ == "__main__":
    main()
