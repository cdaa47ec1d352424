"""Real processes for the tests without paying for ``import torch`` each time.

Most of a short training process's CPU time is its imports (here: ~4.5 of ~5.6 CPU-seconds for a
two-batch run; torch, dynamo, Ignite and torchvision). A test that runs ``python script.py ...`` gets,
instead of a fresh interpreter, a child forked from a server process that imported those four and
nothing else (no pytest, none of our packages, no threads): still a real process of its own, with
its own pid, its own stdin/stdout/stderr pipes, environment, working directory and session, killed
by real signals and ending with the exit status a fresh ``python script.py`` would have
(``-signal`` when killed, 1 after an uncaught exception and its traceback on stderr, ``SystemExit``'s
code). The script and everything it imports beyond the four run in the child as in a fresh process.

Not forked (run as a fresh interpreter by :mod:`subprocess`): anything but ``python FILE ...``,
``python -c CODE ...`` and ``python -m MODULE ...``; an environment whose variables read at ``import torch``
(thread counts, devices, ``TORCH_*``/``PYTORCH_*``) differ from the server's; and everything when
``TESTS_FORKSERVER=0`` (the same suite, every process fresh).
"""

from __future__ import annotations

import io
import os
import pickle
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

PRELOAD = ("torch", "torch._dynamo", "torchvision", "ignite.engine", "ignite.metrics", "ignite.handlers")
_MAX_REQUEST = 1 << 16
_IMPORT_TIME = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


def _import_time_env(env) -> dict:
    """The variables read when python starts or torch is imported (``PYTHONUNBUFFERED`` is the child's own)."""
    return {k: v for k, v in env.items() if k in _IMPORT_TIME or k.startswith(("TORCH", "PYTORCH"))
            or (k.startswith("PYTHON") and k != "PYTHONUNBUFFERED")}


# ----------------------------------------------------------------------------- the server side
def _child(request: dict, fds: list[int], servers: list[int]) -> None:
    """In the forked child: close the server's own descriptors (``servers``), become the process
    ``request`` describes with ``fds`` as its stdin, stdout and stderr, run it, exit as python would."""
    import atexit
    import runpy
    import signal
    import types

    code = 1
    try:
        for fd in servers:
            os.close(fd)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        if request["new_session"]:
            os.setsid()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(request["env"])
        if "numpy" in sys.modules:  # a fresh process draws its own seed (Python's random reseeds itself at fork)
            sys.modules["numpy"].random.seed()
        os.chdir(request["cwd"])
        unbuffered = bool(request["env"].get("PYTHONUNBUFFERED"))
        sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        for fd, name in ((1, "stdout"), (2, "stderr")):
            raw = io.FileIO(fd, "w", closefd=False)
            stream = io.TextIOWrapper(raw if unbuffered else io.BufferedWriter(raw), encoding="utf-8",
                                      errors="backslashreplace" if fd == 2 else "strict",
                                      line_buffering=fd == 2, write_through=unbuffered)
            setattr(sys, name, stream)
            setattr(sys, f"__{name}__", stream)
        argv = request["argv"]
        if argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            sys.path[0] = ""
            main = types.ModuleType("__main__")
            main.__dict__["__builtins__"] = __builtins__
            sys.modules["__main__"] = main
            exec(compile(argv[1], "<string>", "exec"), main.__dict__)
        elif argv[0] == "-m":
            sys.argv = ["-m", *argv[2:]]  # runpy puts the module's file first
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            script = os.path.abspath(argv[0])
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(script)
            runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException as exc:
        tb = exc.__traceback__  # from the first frame a fresh interpreter would show: not ours nor runpy's
        while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, runpy.__file__, "<frozen runpy>"):
            tb = tb.tb_next
        sys.excepthook(type(exc), exc.with_traceback(tb), tb)
        # python ends by SIGINT itself after an uncaught KeyboardInterrupt
        code = -signal.SIGINT if isinstance(exc, KeyboardInterrupt) else 1
    try:
        threading._shutdown()  # what the interpreter does at exit: wait for non-daemon threads
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    except BaseException:
        pass
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


def serve(fd: int) -> None:
    """The server: preload, then fork one child per request; each child's pid, then its wait status,
    go back on the status pipe that came with its request."""
    import importlib

    sys.path.pop(0)  # this folder, put first to import this module: gone, as in a fresh interpreter
    for name in PRELOAD:
        importlib.import_module(name)
    sock = socket.socket(fileno=fd)
    sock.sendall(b"ready\n")
    running: dict[int, int] = {}  # pid -> status pipe (write end)
    while True:
        readable, _, _ = select.select([sock], [], [], 0.01)
        while running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            out = running.pop(pid)
            os.write(out, f"status {status}\n".encode())
            os.close(out)
        if not readable:
            continue
        message, fds, _, _ = socket.recv_fds(sock, _MAX_REQUEST, 4)
        if not message:
            return  # the test worker is gone
        request = pickle.loads(message)
        *stdio, status_pipe = fds
        pid = os.fork()
        if pid == 0:
            _child(request, stdio, [sock.fileno(), status_pipe, *running.values()])
        for received in stdio:
            os.close(received)
        running[pid] = status_pipe
        os.write(status_pipe, f"pid {pid}\n".encode())


# ----------------------------------------------------------------------------- the test side
class _Server:
    """One server per test process, started on first use, restarted if it died."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.env: dict = {}
        self.lock = threading.Lock()

    def _start(self) -> None:
        if self.sock is not None:
            self.sock.close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # one message a request
        code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import forkserver; " \
               f"forkserver.serve({theirs.fileno()})"
        self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=[theirs.fileno()],
                                     stdin=subprocess.DEVNULL, env=dict(os.environ))
        theirs.close()
        self.env = _import_time_env(os.environ)
        ours.settimeout(120)
        assert ours.recv(6) == b"ready\n", "the fork server did not start"
        ours.settimeout(None)
        self.sock = ours

    def fork(self, request: dict, fds: list[int]) -> None:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            data = pickle.dumps(request)
            if len(data) > _MAX_REQUEST:
                raise ValueError(f"a request of {len(data)} bytes (the environment?): at most {_MAX_REQUEST}")
            socket.send_fds(self.sock, [data], fds)


_server = _Server()


def forkable(cmd: list, env: dict | None) -> bool:
    """Whether ``cmd`` can be a child of the server: ``python FILE ...``, ``python -c CODE ...`` or
    ``python -m MODULE ...``, with the start-up environment the server had."""
    if os.environ.get("TESTS_FORKSERVER", "1") == "0" or len(cmd) < 2 or str(cmd[0]) != sys.executable:
        return False
    first = str(cmd[1])
    if first in ("-c", "-m"):
        ok = len(cmd) >= 3
    else:
        ok = not first.startswith("-") and first.endswith(".py")
    server_env = _server.env if _server.proc is not None else _import_time_env(os.environ)
    return ok and _import_time_env(os.environ if env is None else env) == server_env


class ForkedProcess:
    """What a test uses of :class:`subprocess.Popen`, for a child of the fork server."""

    def __init__(self, cmd: list, *, stdin=None, stdout=None, stderr=None, text: bool = False, env: dict | None = None,
                 cwd=None, start_new_session: bool = False) -> None:
        self.args, self.returncode, self.text = cmd, None, text
        mine, theirs = [], []
        self.stdin = self.stdout = self.stderr = None
        null = os.open(os.devnull, os.O_RDWR)
        try:
            if stdin == subprocess.PIPE:
                r, w = os.pipe()
                theirs.append(r)
                mine.append(r)
                self.stdin = self._wrap(os.fdopen(w, "wb"))
            else:
                theirs.append(null)
            for which, spec in (("stdout", stdout), ("stderr", stderr)):
                if spec == subprocess.PIPE:
                    r, w = os.pipe()
                    setattr(self, which, self._wrap(os.fdopen(r, "rb")))
                    theirs.append(w)
                    mine.append(w)
                elif spec == subprocess.STDOUT and which == "stderr":
                    theirs.append(theirs[1])
                elif spec is None:
                    theirs.append(which == "stdout" and 1 or 2)
                else:
                    theirs.append(null)
            self._status_r, status_w = os.pipe()
            request = {"argv": [str(a) for a in cmd[1:]], "env": dict(os.environ if env is None else env),
                       "cwd": str(cwd or os.getcwd()), "new_session": start_new_session}
            _server.fork(request, [*theirs, status_w])
            os.close(status_w)
        finally:
            for fd in (*mine, null):
                if fd not in (0, 1, 2):
                    os.close(fd)
        self._pending = b""
        self.pid = int(self._line(timeout=60).split()[1])

    def _wrap(self, f):
        return io.TextIOWrapper(f, encoding="utf-8", errors="replace", line_buffering=True) if self.text else f

    def _line(self, timeout: float | None) -> str:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._status_r], [], [], left)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            chunk = os.read(self._status_r, 256)
            if not chunk:
                raise RuntimeError("the fork server went away")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return line.decode()

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self._finish(self._line(timeout=0))
            except subprocess.TimeoutExpired:
                pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._finish(self._line(timeout))
        return self.returncode

    def _finish(self, line: str) -> None:
        self.returncode = os.waitstatus_to_exitcode(int(line.split()[1]))
        os.close(self._status_r)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        import signal

        self.send_signal(signal.SIGTERM)

    def communicate(self, input=None, timeout: float | None = None):
        if self.stdin is not None:
            if input:
                self.stdin.write(input)
            self.stdin.close()
        streams = [s for s in (self.stdout, self.stderr) if s is not None]
        results: dict = {}
        readers = [threading.Thread(target=lambda s=s: results.__setitem__(id(s), s.read()), daemon=True)
                   for s in streams]
        for reader in readers:
            reader.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        for s in streams:
            s.close()
        return (results.get(id(self.stdout)) if self.stdout is not None else None,
                results.get(id(self.stderr)) if self.stderr is not None else None)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for s in (self.stdin, self.stdout, self.stderr):
            if s is not None:
                s.close()
        self.wait()


def popen(cmd: list, **kwargs) -> subprocess.Popen | ForkedProcess:
    """``subprocess.Popen(cmd, **kwargs)``, forked from the server where it can be (see :func:`forkable`)."""
    if forkable(cmd, kwargs.get("env")) and set(kwargs) <= {"stdin", "stdout", "stderr", "text", "env", "cwd",
                                                            "start_new_session"}:
        return ForkedProcess(cmd, **kwargs)
    return subprocess.Popen(cmd, **kwargs)


def run(cmd: list, *, capture_output: bool = False, timeout: float | None = None, check: bool = False,
        input=None, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run``, forked from the server where it can be."""
    if capture_output:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    proc = popen(cmd, **kwargs)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done
