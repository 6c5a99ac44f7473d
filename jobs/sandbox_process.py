"""The ``process`` sandbox backend: the runner as a Linux process tree in its own namespaces.

Isolation, strongest available first (logged once when the backend is built):

* **bubblewrap** — new user, mount, pid, network (no interfaces but a down loopback), ipc,
  uts and cgroup namespaces; an empty root holding only read-only binds of the system
  directories and of ``SandboxSpec.ro_binds``, a sized tmpfs on ``/tmp``, a fresh ``/proc``
  and minimal ``/dev``; no capabilities, ``no_new_privs``, a new session, killed with the
  worker. When the worker is root, the runner gets a **dedicated host uid per sandbox**
  (so it owns no host file, shares no per-uid keyring, and ``RLIMIT_NPROC``, which the
  kernel ignores for uid 0 and counts per uid, is the sandbox's own); bwrap sets up the
  mounts as root inside its namespace and ``setpriv`` drops to that uid before the runner.
* **unshare** (util-linux), when bwrap is missing — the same namespaces and limits, tmpfs
  over ``/tmp``, ``/var/tmp`` and ``/dev/shm``, but the host filesystem stays visible
  (writes are stopped only by file permissions, as the dedicated or worker uid), so every
  bind must be world-readable when the worker is root.

Limits: ``RLIMIT_AS`` (memory), ``RLIMIT_CPU`` (SIGXCPU, then SIGKILL 2 s later),
``RLIMIT_NPROC``, ``RLIMIT_FSIZE`` (= tmpfs size) and ``RLIMIT_CORE`` = 0, applied by
``prlimit`` inside the new user namespace; a cgroup v2 ``memory.max``/``pids.max`` when the
worker is root and a delegated cgroup v2 with both controllers is writable; the wall timeout
is kept by the host. The channel is the runner's stdin/stdout; stderr is kept as a bounded
tail for :class:`SandboxExit` and never logged.

Host-side state lives in ``state_dir()/sandboxes/<label>/state.json`` (pids with their
``/proc`` start times, owner worker, uid, cgroup) so :meth:`ProcessBackend.reap_orphans`
can destroy what a crashed worker left behind without killing a recycled pid.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import time
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dvm.paths import state_dir
from jobs.channel import encode_frame, read_frame
from jobs.sandbox import (
    LIMIT_REASONS,
    ExitReason,
    Sandbox,
    SandboxBackend,
    SandboxExit,
    SandboxSpec,
    check_label,
)
from jobs.sandbox_errors import SandboxError, SandboxExited, SandboxLimitExceeded, SandboxStartError

log = logging.getLogger(__name__)

Isolation = Literal["bwrap", "unshare"]

SANDBOX_UID = 65534
"""The uid and gid the runner sees inside the sandbox."""
DEFAULT_UID_BASE = 1_900_000_000
DEFAULT_UID_COUNT = 4096
STDERR_TAIL_BYTES = 16 * 1024
KILL_GRACE_S = 5.0
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/alternatives")
_MEMORY_MARKERS = (b"MemoryError", b"std::bad_alloc", b"Cannot allocate memory", b"failed to allocate")
_PIDS_MARKERS = (b"BlockingIOError", b"Resource temporarily unavailable", b"Cannot fork",
                 b"can't start new thread")
_UNSHARE_SCRIPT = (
    'for d in /tmp /var/tmp /dev/shm; do [ -d "$d" ] && '
    'mount -t tmpfs -o "size=$1,mode=1777,nosuid,nodev" tmpfs "$d" || exit 125; done; '
    'shift; "$@"'
)
"""Runs as pid 1 of the new pid namespace: mounts the tmpfs dirs, then runs the runner as its
child (pid 1 ignores default-action signals such as SIGXCPU) and exits 128+n if it died of signal n."""


def classify_exit(returncode: int | None, *, stderr_tail: bytes = b"", forced: ExitReason | None = None,
                  oom_kills: int = 0, pids_max_hits: int = 0) -> ExitReason:
    """Why a runner ended, from what the host saw.

    ``forced`` (the host killed it: timeout or destroy) wins; then cgroup events; then the
    terminating signal (bwrap reports a signal as 128+n, others as -n): SIGXCPU is the cpu
    limit; then the runner's last stderr words for failures that limits cause without a
    signal (``RLIMIT_AS`` → allocation failure, ``RLIMIT_NPROC`` → fork failure).
    """
    if forced is not None:
        return forced
    if oom_kills:
        return "memory"
    if returncode is None:
        return "killed"
    signum = -returncode if returncode < 0 else returncode - 128 if 128 < returncode < 128 + 65 else 0
    if signum == signal.SIGXCPU:
        return "cpu"
    if returncode != 0:
        if pids_max_hits:
            return "pids"
        if any(marker in stderr_tail for marker in _MEMORY_MARKERS):
            return "memory"
        if any(marker in stderr_tail for marker in _PIDS_MARKERS):
            return "pids"
    return "killed" if signum else "exited"


def _proc_start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time in clock ticks), ``None`` if gone or a zombie."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()
    if len(fields) < 20 or fields[0] == b"Z":
        return None
    return int(fields[19])


def _alive(pid: int | None, start: int | None) -> bool:
    return pid is not None and start is not None and _proc_start_time(pid) == start


def _pids_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is ``uid``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue
        lines = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if lines.get("State", "").strip().startswith("Z"):
            continue
        if int(lines.get("Uid", "-1 ").split()[0]) == uid:
            found.append(int(entry.name))
    return found


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.scandir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                kids += [int(k) for k in Path(task.path, "children").read_text().split()]
    return kids


def _kill(pid: int | None, start: int | None) -> None:
    if _alive(pid, start):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # type: ignore[arg-type]


def _world_accessible(path: Path) -> bool:
    """Whether a uid that owns nothing and has no groups can reach ``path``."""
    try:
        target = path.resolve(strict=True)
        for directory in [*reversed(target.parents)] + ([target] if target.is_dir() else []):
            if not os.stat(directory).st_mode & stat.S_IXOTH:
                return False
        return bool(os.stat(target).st_mode & stat.S_IROTH)
    except OSError:
        return False


def _find_cgroup_parent() -> Path | None:
    """A writable cgroup v2 directory whose children get the memory and pids controllers."""
    try:
        own = next(line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::"))
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except (OSError, StopIteration):
        return None
    root = next((Path(m.split()[1]) for m in mounts if m.split()[2:3] == ["cgroup2"]), None)
    if root is None:
        return None
    here = root / own.strip("/")
    for candidate in (here, here.parent):
        try:
            controllers = set((candidate / "cgroup.subtree_control").read_text().split())
        except OSError:
            continue
        if {"memory", "pids"} <= controllers and os.access(candidate, os.W_OK) and candidate.is_relative_to(root):
            return candidate
    return None


@dataclass
class _State:
    """What reap_orphans needs to find and destroy a sandbox; persisted as state.json."""

    label: str
    isolation: Isolation
    owner_pid: int
    owner_start: int | None
    pid: int | None = None
    pid_start: int | None = None
    child_pid: int | None = None
    child_start: int | None = None
    uid: int | None = None
    cgroup: str | None = None

    def save(self, directory: Path) -> None:
        tmp = directory / "state.json.tmp"
        tmp.write_text(json.dumps(self.__dict__))
        tmp.replace(directory / "state.json")

    @classmethod
    def load(cls, directory: Path) -> _State | None:
        try:
            data = json.loads((directory / "state.json").read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError):
            return None


class _Host:
    """Host-side resources of one sandbox: its state dir, uid lease and cgroup."""

    def __init__(self, root: Path, state: _State) -> None:
        self.root = root
        self.state = state
        self.directory = root / state.label

    def kill_all(self, *, outer: bool = True) -> None:
        """SIGKILL the namespace init (the kernel then kills the whole pid namespace), every
        process of the dedicated uid and the cgroup; then, unless ``outer`` is false (let it
        reap its child and exit by itself), the outer bwrap/unshare process."""
        s = self.state
        _kill(s.child_pid, s.child_start)
        if s.pid is not None and s.isolation == "unshare" and _alive(s.pid, s.pid_start):
            for kid in _children(s.pid):
                _kill(kid, _proc_start_time(kid))
        if outer:
            _kill(s.pid, s.pid_start)
        if s.uid is not None:
            for pid in _pids_of_uid(s.uid):
                _kill(pid, _proc_start_time(pid))
        if s.cgroup:
            with contextlib.suppress(OSError):
                Path(s.cgroup, "cgroup.kill").write_text("1")

    def anything_alive(self) -> bool:
        s = self.state
        return (_alive(s.pid, s.pid_start) or _alive(s.child_pid, s.child_start)
                or (s.uid is not None and bool(_pids_of_uid(s.uid))))

    async def kill_and_wait(self) -> None:
        started = time.monotonic()
        deadline = started + KILL_GRACE_S
        while True:
            self.kill_all(outer=time.monotonic() - started > 0.5)
            if not self.anything_alive() or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        if self.anything_alive():
            log.warning("sandbox %s: some processes survived SIGKILL for %.0f s", self.state.label, KILL_GRACE_S)

    def remove(self) -> None:
        """Remove the cgroup, the state dir and the uid lease."""
        if self.state.cgroup:
            with contextlib.suppress(OSError):
                os.rmdir(self.state.cgroup)
        shutil.rmtree(self.directory, ignore_errors=True)
        if self.state.uid is not None:
            shutil.rmtree(self.root / ".uids" / str(self.state.uid), ignore_errors=True)


class SubprocessSandbox(Sandbox):
    """A sandbox driven through one host subprocess: its stdin/stdout carry the channel frames,
    its stderr is kept as a bounded tail (never logged), and a watchdog enforces the wall
    timeout. The process and microvm backends differ only in how they kill, classify the exit
    and clean up (``_kill_on_timeout``, ``wait``, ``destroy``)."""

    def __init__(self, label: str, spec: SandboxSpec, proc: asyncio.subprocess.Process) -> None:
        self.label = label
        self._spec = spec
        self._proc = proc
        self._stderr = bytearray()
        self._stderr_task = asyncio.create_task(self._pump_stderr())
        self._forced: ExitReason | None = None
        self._exit: SandboxExit | None = None
        self._destroyed = False
        self._lock = asyncio.Lock()
        self._watchdog: asyncio.Task[None] | None = None
        self.reset_deadline()

    async def _pump_stderr(self) -> None:
        assert self._proc.stderr is not None
        while chunk := await self._proc.stderr.read(65536):
            self._stderr += chunk
            if len(self._stderr) > STDERR_TAIL_BYTES:
                del self._stderr[:-STDERR_TAIL_BYTES]

    def reset_deadline(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = asyncio.create_task(self._expire(self._spec.wall_timeout_s))

    async def _expire(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if self._proc.returncode is None:
            self._forced = self._forced or "timeout"
            self._kill_on_timeout()

    @abstractmethod
    def _kill_on_timeout(self) -> None:
        """Stop everything the sandbox runs once its wall timeout passed."""

    def _exited_error(self, ended: SandboxExit) -> SandboxExited:
        message = f"sandbox {self.label} ended: {ended.reason} (exit status {ended.returncode})"
        if ended.reason in LIMIT_REASONS:
            return SandboxLimitExceeded(message, limit=ended.reason, returncode=ended.returncode)
        return SandboxExited(message, reason=ended.reason, returncode=ended.returncode)

    async def send(self, obj: dict[str, Any]) -> None:
        if self._destroyed:
            raise SandboxError(f"sandbox {self.label} was destroyed")
        frame = encode_frame(obj, max_frame=self._spec.max_frame)
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            stdin.write(frame)
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise self._exited_error(await self.wait()) from None

    async def recv(self) -> dict[str, Any]:
        if self._destroyed:
            raise SandboxError(f"sandbox {self.label} was destroyed")
        assert self._proc.stdout is not None
        frame = await read_frame(self._proc.stdout, max_frame=self._spec.max_frame)
        if frame is None:
            raise self._exited_error(await self.wait())
        return frame


class ProcessSandbox(SubprocessSandbox):
    """A started process sandbox; built by :meth:`ProcessBackend.start`."""

    def __init__(self, spec: SandboxSpec, host: _Host, proc: asyncio.subprocess.Process) -> None:
        self._host = host
        super().__init__(host.state.label, spec, proc)

    def __repr__(self) -> str:
        return f"ProcessSandbox(label={self.label!r}, isolation={self._host.state.isolation!r}, pid={self._proc.pid})"

    def _kill_on_timeout(self) -> None:
        self._host.kill_all(outer=False)

    async def wait(self) -> SandboxExit:
        if self._exit is None:
            returncode = await self._proc.wait()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._stderr_task), KILL_GRACE_S)
            oom, pids_hits = self._cgroup_events()
            tail = bytes(self._stderr)
            reason = classify_exit(returncode, stderr_tail=tail, forced=self._forced,
                                   oom_kills=oom, pids_max_hits=pids_hits)
            if self._exit is None:
                self._exit = SandboxExit(returncode=returncode, reason=reason, stderr_tail=tail)
                log.info("sandbox %s ended: %s (exit status %s)", self.label, reason, returncode)
        return self._exit

    def _cgroup_events(self) -> tuple[int, int]:
        cgroup = self._host.state.cgroup
        if not cgroup:
            return 0, 0
        counts: dict[str, int] = {}
        for name in ("memory.events", "pids.events"):
            with contextlib.suppress(OSError, ValueError):
                for line in Path(cgroup, name).read_text().splitlines():
                    key, value = line.split()
                    counts[f"{name}:{key}"] = int(value)
        return counts.get("memory.events:oom_kill", 0), counts.get("pids.events:max", 0)

    async def destroy(self) -> SandboxExit:
        async with self._lock:
            if not self._destroyed:
                if self._proc.returncode is None:
                    self._forced = self._forced or "killed"
                await self._host.kill_and_wait()
                ended = await self.wait()
                if self._watchdog is not None:
                    self._watchdog.cancel()
                self._stderr_task.cancel()
                if self._proc.stdin is not None:
                    self._proc.stdin.close()
                self._host.remove()
                self._destroyed = True
                log.debug("sandbox %s destroyed", self.label)
                return ended
        return await self.wait()


class ProcessBackend(SandboxBackend):
    """Starts sandboxes as namespaced process trees (bubblewrap, else unshare)."""

    name = "process"

    def __init__(self, *, isolation: Literal["auto", "bwrap", "unshare"] = "auto",
                 state_root: Path | None = None, uid_base: int = DEFAULT_UID_BASE,
                 uid_count: int = DEFAULT_UID_COUNT, use_cgroup: bool = True) -> None:
        self._bwrap = shutil.which("bwrap")
        self._unshare = shutil.which("unshare")
        self._prlimit = shutil.which("prlimit")
        self._setpriv = shutil.which("setpriv")
        if isolation == "auto":
            isolation = "bwrap" if self._bwrap else "unshare"
        if isolation == "bwrap" and not self._bwrap:
            raise SandboxStartError("bubblewrap (bwrap) is not installed: install the bubblewrap package")
        if isolation == "unshare" and not (self._unshare and self._setpriv):
            raise SandboxStartError("neither bubblewrap nor util-linux unshare/setpriv is installed: install bubblewrap")
        if not self._prlimit:
            raise SandboxStartError("util-linux prlimit is not installed; it applies the sandbox's resource limits")
        if os.geteuid() == 0 and not self._setpriv:
            raise SandboxStartError("util-linux setpriv is not installed; a root worker needs it to drop to the sandbox uid")
        self.isolation: Isolation = isolation
        self._root_worker = os.geteuid() == 0
        self._state_root = state_root
        self._uid_range = range(uid_base, uid_base + uid_count)
        self._cgroup_parent = _find_cgroup_parent() if use_cgroup and self._root_worker and isolation == "bwrap" else None
        if isolation == "bwrap":
            log.info("sandbox isolation: bubblewrap (user/mount/pid/net/ipc/uts/cgroup namespaces, read-only binds, "
                     "%s; cgroup v2 limits: %s)", "dedicated uid per sandbox" if self._root_worker else "worker uid",
                     self._cgroup_parent or "none")
        else:
            log.warning("sandbox isolation: unshare fallback (namespaces and rlimits, but the host filesystem stays "
                        "visible; install bubblewrap for read-only binds)")

    @property
    def state_root(self) -> Path:
        root = self._state_root or state_dir() / "sandboxes"
        (root / ".uids").mkdir(mode=0o700, parents=True, exist_ok=True)
        return root

    def _lease_uid(self, root: Path, label: str) -> int:
        for uid in self._uid_range:
            try:
                os.mkdir(root / ".uids" / str(uid), 0o700)
            except FileExistsError:
                continue
            if _pids_of_uid(uid):
                continue
            (root / ".uids" / str(uid) / "label").write_text(label)
            return uid
        raise SandboxStartError(f"all {len(self._uid_range)} sandbox uids are in use; destroy sandboxes or raise uid_count")

    def _limits(self, spec: SandboxSpec) -> list[str]:
        assert self._prlimit is not None
        return [self._prlimit, f"--as={spec.memory_bytes}", f"--cpu={spec.cpu_seconds}:{spec.cpu_seconds + 2}",
                f"--nproc={spec.max_processes}", f"--fsize={spec.tmpfs_bytes}", "--core=0", "--"]

    def _bwrap_argv(self, spec: SandboxSpec, info_fd: int, block_fd: int | None) -> list[str]:
        assert self._bwrap is not None
        argv = [self._bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session",
                "--clearenv", "--info-fd", str(info_fd), "--hostname", "sandbox"]
        for name, value in spec.env.items():
            argv += ["--setenv", name, value]
        for path in _SYSTEM_DIRS:
            if os.path.islink(path):
                argv += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                argv += ["--ro-bind", path, path]
        for path in _ETC_FILES:
            argv += ["--ro-bind-try", path, path]
        argv += ["--proc", "/proc", "--dev", "/dev",
                 "--perms", "1777", "--size", str(spec.tmpfs_bytes), "--tmpfs", "/tmp"]
        made: set[Path] = set()
        for bind in _top_binds(spec.ro_binds):
            for parent in reversed(bind.parents):
                if parent != Path("/") and parent not in made:
                    argv += ["--perms", "0755", "--dir", str(parent)]
                    made.add(parent)
            argv += ["--ro-bind", str(bind), str(bind)]
        argv += ["--remount-ro", "/", "--chdir", "/tmp"]
        if block_fd is None:
            argv += ["--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--cap-drop", "ALL", "--"]
        else:
            assert self._setpriv is not None
            argv += ["--userns-block-fd", str(block_fd), "--cap-drop", "ALL",
                     "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP", "--",
                     self._setpriv, f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups",
                     "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
        return argv + self._limits(spec) + list(spec.argv)

    def _unshare_argv(self, spec: SandboxSpec) -> list[str]:
        assert self._unshare is not None and self._setpriv is not None
        return [self._setpriv, "--pdeathsig=KILL", "--", self._unshare, "--user", "--map-root-user", "--net", "--pid",
                "--fork", "--kill-child", "--mount", "--mount-proc", "--ipc", "--uts", "--",
                "/bin/sh", "-c", _UNSHARE_SCRIPT, "sh", str(spec.tmpfs_bytes),
                self._setpriv, "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
                *self._limits(spec), *spec.argv]

    async def start(self, spec: SandboxSpec, job_label: str) -> ProcessSandbox:
        label = check_label(job_label)
        root = self.state_root
        try:
            (root / label).mkdir(mode=0o700)
        except FileExistsError:
            raise SandboxStartError(f"sandbox label {label} was already used; every job needs a fresh sandbox") from None
        state = _State(label=label, isolation=self.isolation, owner_pid=os.getpid(),
                       owner_start=_proc_start_time(os.getpid()))
        host = _Host(root, state)
        try:
            if self._root_worker:
                state.uid = self._lease_uid(root, label)
            state.save(host.directory)
            proc = await (self._spawn_bwrap(spec, host) if self.isolation == "bwrap" else self._spawn_unshare(spec, host))
        except BaseException:
            await host.kill_and_wait()
            host.remove()
            raise
        log.info("sandbox %s started (%s)", label, self.isolation)
        return ProcessSandbox(spec, host, proc)

    async def _spawn_bwrap(self, spec: SandboxSpec, host: _Host) -> asyncio.subprocess.Process:
        info_r, info_w = os.pipe()
        block_r, block_w = os.pipe() if self._root_worker else (None, None)
        pass_fds = (info_w,) if block_r is None else (info_w, block_r)
        try:
            proc = await self._exec(self._bwrap_argv(spec, info_w, block_r), host, pass_fds=pass_fds, env={})
        finally:
            for fd in pass_fds:
                os.close(fd)
        try:
            info = await _read_info(info_r)
        finally:
            os.close(info_r)
        state = host.state
        try:
            if info is None:
                await proc.wait()
                assert proc.stderr is not None
                message = (await proc.stderr.read(4096)).decode(errors="replace").strip()
                raise SandboxStartError(f"bubblewrap could not start the sandbox: {message or 'no message'}")
            state.child_pid = info
            state.child_start = _proc_start_time(info)
            state.save(host.directory)
            if block_w is not None:
                assert state.uid is not None
                mapping = f"0 0 1\n{SANDBOX_UID} {state.uid} 1\n"
                Path(f"/proc/{info}/uid_map").write_text(mapping)
                Path(f"/proc/{info}/gid_map").write_text(mapping)
                self._join_cgroup(spec, host, (proc.pid, info))
                os.write(block_w, b"1")
        except OSError as exc:
            raise SandboxStartError(f"could not set up the sandbox's user namespace or cgroup: {exc}") from None
        finally:
            if block_w is not None:
                os.close(block_w)
        return proc

    def _join_cgroup(self, spec: SandboxSpec, host: _Host, pids: tuple[int, ...]) -> None:
        if self._cgroup_parent is None:
            return
        cgroup = self._cgroup_parent / f"cdvm-{host.state.label}"
        cgroup.mkdir()
        host.state.cgroup = str(cgroup)
        host.state.save(host.directory)
        (cgroup / "memory.max").write_text(str(spec.memory_bytes + spec.tmpfs_bytes))
        with contextlib.suppress(OSError):
            (cgroup / "memory.swap.max").write_text("0")
        (cgroup / "pids.max").write_text(str(spec.max_processes + 2))
        for pid in pids:
            (cgroup / "cgroup.procs").write_text(str(pid))

    async def _spawn_unshare(self, spec: SandboxSpec, host: _Host) -> asyncio.subprocess.Process:
        uid = host.state.uid
        if uid is not None:
            for path in (Path(spec.argv[0]), *spec.ro_binds):
                if path.is_absolute() and not _world_accessible(path):
                    raise SandboxStartError(f"{path} is not readable by the sandbox uid {uid}: the unshare fallback "
                                            "keeps the host filesystem, so install bubblewrap or use world-readable paths")
        return await self._exec(self._unshare_argv(spec), host, env=dict(spec.env), uid=uid)

    async def _exec(self, argv: list[str], host: _Host, *, env: dict[str, str], pass_fds: tuple[int, ...] = (),
                    uid: int | None = None) -> asyncio.subprocess.Process:
        ids: dict[str, Any] = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=env, pass_fds=pass_fds, start_new_session=True, cwd="/", **ids)
        except OSError as exc:
            raise SandboxStartError(f"could not run {argv[0]}: {exc}") from None
        host.state.pid = proc.pid
        host.state.pid_start = _proc_start_time(proc.pid)
        host.state.save(host.directory)
        return proc

    async def reap_orphans(self) -> int:
        root = self.state_root
        reaped = 0
        for entry in sorted(root.iterdir()):
            if entry.name == ".uids" or not entry.is_dir():
                continue
            state = _State.load(entry)
            if state is None:
                if time.time() - entry.stat().st_mtime > 60:
                    shutil.rmtree(entry, ignore_errors=True)
                    reaped += 1
                continue
            if _alive(state.owner_pid, state.owner_start):
                continue
            host = _Host(root, state)
            await host.kill_and_wait()
            host.remove()
            reaped += 1
        for lease in (root / ".uids").iterdir():
            label = (lease / "label").read_text() if (lease / "label").exists() else ""
            if label and (root / label).exists():
                continue
            uid = int(lease.name) if lease.name.isdigit() else None
            if uid is not None and _pids_of_uid(uid):
                continue
            shutil.rmtree(lease, ignore_errors=True)
        if reaped:
            log.info("reaped %d sandbox(es) left by a previous worker", reaped)
        return reaped


def _top_binds(binds: tuple[Path, ...]) -> list[Path]:
    """Binds not already visible through a system directory or another (identity) bind."""
    system = [Path(p).resolve() for p in _SYSTEM_DIRS if os.path.isdir(p) and not os.path.islink(p)]
    ordered = sorted(dict.fromkeys(Path(os.path.normpath(b)) for b in binds), key=lambda p: len(p.parts))
    kept: list[Path] = []
    for bind in ordered:
        if not bind.exists():
            raise SandboxStartError(f"sandbox bind {bind} does not exist")
        if any(bind == top or bind.is_relative_to(top) for top in (*system, *kept)):
            continue
        kept.append(bind)
    return kept


async def _read_info(fd: int) -> int | None:
    """bwrap's ``--info-fd`` JSON: the pid (in the host) of the namespace's init, or ``None`` if bwrap failed."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(fd), "rb"))
    data = b""
    try:
        while chunk := await reader.read(4096):
            data += chunk
            with contextlib.suppress(ValueError):
                pid = json.loads(data).get("child-pid")
                return pid if isinstance(pid, int) else None
    finally:
        transport.close()
    return None
