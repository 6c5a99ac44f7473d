"""The ``microvm`` sandbox backend: one QEMU virtual machine per job, destroyed afterwards.

Each sandbox boots the ``cdvm image build`` kernel and initramfs (:mod:`jobs.image`) with
no network device (:mod:`jobs.qemu`). The guest's ``/init`` mounts read-only virtio-9p
shares — the host's ``/usr`` (shared libraries), the directories of ``SandboxSpec.ro_binds``
(interpreter, virtual environment, cdvm's code, the model's directory) at the same paths, and
the image's baseline llama.cpp build first on ``PYTHONPATH`` — then runs ``spec.argv`` with
``spec.env`` (nothing else) and stdin/stdout on the virtio-serial port ``cdvm.channel``,
which is QEMU's own stdin/stdout on the host: the runner is unchanged.

Limits inside the guest: a cgroup v2 with ``memory.max`` = memory + tmpfs and ``pids.max``,
``RLIMIT_CPU`` and no core dumps, a sized tmpfs on ``/tmp``; the VM's RAM is that plus
``memory_overhead_mb`` for the guest kernel; the wall timeout is kept by the host. The
guest's serial console (kernel, ``/init`` and the runner's stderr) is QEMU's stderr, kept as
a bounded tail and never logged; ``/init`` ends it with ``cdvm-exit rc=N oom_kill=N
pids_max=N`` and powers off, which ends QEMU.

What the guest is told (shares, limits, argv, env) is a line-based ``run.conf`` on its own
read-only share. Host-side state lives in ``state_dir()/microvms/<label>/`` (``state.json``:
QEMU's pid and ``/proc`` start time, the owner worker's) so :meth:`MicroVmBackend.reap_orphans`
destroys VMs a crashed worker left without killing a recycled pid.

Accelerator: ``accel="auto"`` (default) uses KVM only when a probe VM actually executes
guest code within ``kvm_probe_timeout_s`` (nested KVM may open ``/dev/kvm`` yet never run a
guest), else TCG; ``"kvm"`` and ``"tcg"`` force one. ``tee="tdx"|"snp"`` launches a
confidential guest (KVM, firmware required) with the image digest measured (:mod:`jobs.qemu`).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dvm.paths import state_dir
from jobs.image import Image, ImageError, default_image_dir
from jobs.qemu import Share, Tee, VmLaunch, check_qemu_version, parse_qemu_version, qemu_argv
from jobs.sandbox import SandboxBackend, SandboxExit, SandboxSpec, check_label
from jobs.sandbox_errors import SandboxStartError
from jobs.sandbox_process import KILL_GRACE_S, SubprocessSandbox, _alive, _proc_start_time, classify_exit

log = logging.getLogger(__name__)

IMAGE_ENV = "CDVM_MICROVM_IMAGE"
"""Environment variable naming the image directory (default: ``cache_dir()/image``)."""
GUEST_SITE = Path("/cdvm/guest-site")
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC_FILES = ("ld.so.cache", "ld.so.conf", "localtime")
_EXIT_MARK = re.compile(rb"cdvm-exit rc=(\d+) oom_kill=(\d*) pids_max=(\d*)")


def exit_status(console_tail: bytes) -> tuple[int | None, int, int]:
    """The runner's exit status, OOM kills and pids.max hits from ``/init``'s last exit line."""
    marks = _EXIT_MARK.findall(console_tail)
    if not marks:
        return None, 0, 0
    rc, oom, pids = marks[-1]
    return int(rc), int(oom or 0), int(pids or 0)


def run_conf(spec: SandboxSpec, shares: list[tuple[str, Path]], links: list[tuple[str, str]], *,
             guest_site: bool) -> str:
    """The guest's ``run.conf``: one ``kind value`` line each (``/init`` in :mod:`jobs.image` reads it);
    ``shares`` are (9p tag, guest mount point), ``links`` (target, path)."""
    env = dict(spec.env)
    if guest_site:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(GUEST_SITE), env.get("PYTHONPATH"))))
    lines = [f"tmpfs {spec.tmpfs_bytes}"]
    lines += [f"share {tag} {path}" for tag, path in shares]
    lines += [f"link {target} {path}" for target, path in links]
    lines += [f"cpu {spec.cpu_seconds}", f"pids {spec.max_processes}", f"memory {spec.memory_bytes + spec.tmpfs_bytes}"]
    lines += [f"env {name}={value}" for name, value in env.items()]
    lines += [f"arg {arg}" for arg in spec.argv]
    for line in lines:
        if "\n" in line or "\r" in line:
            raise SandboxStartError("the microvm backend cannot pass a newline in an argument, variable or path")
    if spec.argv[0].count("="):
        raise SandboxStartError(f"the runner's path {spec.argv[0]} must not contain '='")
    return "".join(f"{line}\n" for line in lines)


def guest_view(binds: tuple[Path, ...]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Host directories to share at the same path (system directories first; a file bind
    shares its directory), and the symlinks (merged ``/usr``) the guest recreates."""
    links: list[tuple[str, str]] = []
    dirs: list[Path] = []
    for name in _SYSTEM_DIRS:
        if os.path.islink(name):
            links.append((os.readlink(name), name))
        elif os.path.isdir(name):
            dirs.append(Path(name))
    for bind in sorted({Path(os.path.normpath(b)) for b in binds}, key=lambda p: len(p.parts)):
        if not bind.exists():
            raise SandboxStartError(f"sandbox bind {bind} does not exist")
        directory = bind if bind.is_dir() else bind.parent
        resolved = directory.resolve()
        if any(directory.is_relative_to(d) or resolved.is_relative_to(d.resolve()) for d in dirs):
            continue
        dirs = [d for d in dirs if not d.is_relative_to(directory)] + [directory]
    return dirs, links


@dataclass
class _State:
    """What reap_orphans needs: persisted as ``state.json``."""

    label: str
    owner_pid: int
    owner_start: int | None
    pid: int | None = None
    pid_start: int | None = None

    def save(self, directory: Path) -> None:
        tmp = directory / "state.json.tmp"
        tmp.write_text(json.dumps(self.__dict__))
        tmp.replace(directory / "state.json")

    @classmethod
    def load(cls, directory: Path) -> _State | None:
        try:
            return cls(**json.loads((directory / "state.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None


async def _kill_and_wait(state: _State) -> None:
    deadline = time.monotonic() + KILL_GRACE_S
    while _alive(state.pid, state.pid_start) and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(state.pid, signal.SIGKILL)  # type: ignore[arg-type]
        await asyncio.sleep(0.02)
    if _alive(state.pid, state.pid_start):
        log.warning("microvm %s: QEMU survived SIGKILL for %.0f s", state.label, KILL_GRACE_S)


class MicroVmSandbox(SubprocessSandbox):
    """A running microVM; built by :meth:`MicroVmBackend.start`. QEMU's stdin/stdout are the
    virtio-serial port; its stderr is the guest console."""

    def __init__(self, spec: SandboxSpec, directory: Path, state: _State, proc: asyncio.subprocess.Process) -> None:
        self._directory = directory
        self._state = state
        super().__init__(state.label, spec, proc)

    def __repr__(self) -> str:
        return f"MicroVmSandbox(label={self.label!r}, qemu_pid={self._proc.pid})"

    def _kill_on_timeout(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()

    async def wait(self) -> SandboxExit:
        if self._exit is None:
            qemu_status = await self._proc.wait()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._stderr_task), KILL_GRACE_S)
            tail = bytes(self._stderr)
            returncode, oom, pids_hits = exit_status(tail)
            if returncode is None and self._forced is None and qemu_status != 0:
                log.warning("microvm %s: QEMU exited with status %s before the runner ended", self.label, qemu_status)
            reason = classify_exit(returncode, stderr_tail=tail, forced=self._forced, oom_kills=oom,
                                   pids_max_hits=pids_hits)
            if self._exit is None:
                self._exit = SandboxExit(returncode=returncode, reason=reason, stderr_tail=tail)
                log.info("sandbox %s ended: %s (exit status %s)", self.label, reason, returncode)
        return self._exit

    async def destroy(self) -> SandboxExit:
        async with self._lock:
            if not self._destroyed:
                if self._proc.returncode is None:
                    self._forced = self._forced or "killed"
                await _kill_and_wait(self._state)
                ended = await self.wait()
                if self._watchdog is not None:
                    self._watchdog.cancel()
                self._stderr_task.cancel()
                if self._proc.stdin is not None:
                    self._proc.stdin.close()
                shutil.rmtree(self._directory, ignore_errors=True)
                self._destroyed = True
                log.debug("microvm %s destroyed", self.label)
                return ended
        return await self.wait()


class MicroVmBackend(SandboxBackend):
    """Starts one QEMU microVM per sandbox."""

    name = "microvm"

    def __init__(self, *, image_dir: Path | str | None = None, accel: Literal["auto", "kvm", "tcg"] = "auto",
                 vcpus: int | None = None, memory_overhead_mb: int = 256, tee: Tee = "none",
                 firmware: Path | str | None = None, cpu: str | None = None, qemu: str = "qemu-system-x86_64",
                 state_root: Path | None = None, kvm_probe_timeout_s: float = 5.0) -> None:
        binary = shutil.which(qemu)
        if binary is None:
            raise SandboxStartError(f"{qemu} is not installed: install the qemu-system-x86 package")
        if accel not in ("auto", "kvm", "tcg"):
            raise SandboxStartError(f"microvm accel must be auto, kvm or tcg, not {accel!r}")
        self._qemu = binary
        directory = Path(image_dir or os.environ.get(IMAGE_ENV) or default_image_dir())
        try:
            self.image = Image.load(directory)
        except ImageError as error:
            raise SandboxStartError(str(error)) from None
        if tee != "none":
            check_qemu_version(parse_qemu_version(self._version()), tee)
            if tee not in self.image.tee_support:
                raise SandboxStartError(f"the image's kernel {self.image.kernel_version} has no {tee.upper()} guest "
                                        "support: build the image with a kernel that has it (--kernel-deb)")
            accel = "kvm"
        self._accel: Literal["kvm", "tcg"] | None = None if accel == "auto" else accel
        self._vcpus = vcpus or len(os.sched_getaffinity(0))
        self._overhead_mib = memory_overhead_mb
        self._tee: Tee = tee
        self._firmware = Path(firmware) if firmware else None
        self._cpu = cpu
        self._state_root = state_root
        self._probe_timeout = kvm_probe_timeout_s
        log.info("sandbox isolation: QEMU microVM per job (image %s, digest %s, TEE %s)", directory,
                 self.image.digest, tee)

    def _version(self) -> str:
        return subprocess.run([self._qemu, "--version"], capture_output=True, text=True, check=False).stdout

    @property
    def state_root(self) -> Path:
        root = self._state_root or state_dir() / "microvms"
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        return root

    async def accel(self) -> Literal["kvm", "tcg"]:
        """The accelerator in use, probing KVM once for ``accel="auto"``."""
        if self._accel is None:
            self._accel = "kvm" if await self._kvm_runs_guests() else "tcg"
            log.info("microvm accelerator: %s", self._accel)
        return self._accel

    async def _kvm_runs_guests(self) -> bool:
        """Whether a KVM guest gets as far as printing its firmware banner on the serial port."""
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return False
        proc = await asyncio.create_subprocess_exec(
            self._qemu, "-nodefaults", "-no-user-config", "-display", "none", "-nic", "none", "-accel", "kvm",
            "-m", "64M", "-serial", "stdio", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, start_new_session=True)
        assert proc.stdout is not None
        seen = b""
        try:
            async with asyncio.timeout(self._probe_timeout):
                while b"SeaBIOS" not in seen and (chunk := await proc.stdout.read(4096)):
                    seen = seen[-64:] + chunk
        except TimeoutError:
            pass
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        return b"SeaBIOS" in seen

    async def start(self, spec: SandboxSpec, job_label: str) -> MicroVmSandbox:
        label = check_label(job_label)
        directory = self.state_root / label
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            raise SandboxStartError(f"sandbox label {label} was already used; every job needs a fresh sandbox") from None
        state = _State(label=label, owner_pid=os.getpid(), owner_start=_proc_start_time(os.getpid()))
        try:
            state.save(directory)
            argv = self._argv(spec, directory, await self.accel())
            setpriv = shutil.which("setpriv")
            if setpriv:
                argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env={}, start_new_session=True, cwd=directory)
            state.pid, state.pid_start = proc.pid, _proc_start_time(proc.pid)
            state.save(directory)
        except OSError as error:
            await _kill_and_wait(state)
            shutil.rmtree(directory, ignore_errors=True)
            raise SandboxStartError(f"could not start QEMU: {error}") from None
        except BaseException:
            await _kill_and_wait(state)
            shutil.rmtree(directory, ignore_errors=True)
            raise
        log.info("sandbox %s started (microvm, %s)", label, self._accel)
        return MicroVmSandbox(spec, directory, state, proc)

    def _argv(self, spec: SandboxSpec, directory: Path, accel: Literal["kvm", "tcg"]) -> list[str]:
        run = directory / "run"
        run.mkdir()
        dirs, links = guest_view(spec.ro_binds)
        mounts = [(f"cdvm-{index}", path, path) for index, path in enumerate(dirs)]
        site = self.image.guest_site
        if site is not None:
            mounts.append(("cdvm-site", site, GUEST_SITE))
        for name in _ETC_FILES:
            source = Path("/etc") / name
            if source.is_file():
                shutil.copyfile(source, run / name)
                links.append((f"/cdvm/run/{name}", f"/etc/{name}"))
        conf = run_conf(spec, [(tag, guest) for tag, _, guest in mounts], links, guest_site=site is not None)
        (run / "run.conf").write_text(conf)
        memory_mib = -(-(spec.memory_bytes + spec.tmpfs_bytes) // 2**20) + self._overhead_mib
        launch = VmLaunch(kernel=self.image.kernel, initrd=self.image.initrd, cmdline=self.image.cmdline,
                          memory_mib=memory_mib, vcpus=self._vcpus, accel=accel, cpu=self._cpu, tee=self._tee,
                          shares=(Share("cdvm-run", run), *(Share(tag, host) for tag, host, _ in mounts)),
                          firmware=self._firmware, image_digest=self.image.digest if self._tee != "none" else None)
        return qemu_argv(self._qemu, launch)

    async def reap_orphans(self) -> int:
        reaped = 0
        for entry in sorted(self.state_root.iterdir()):
            if not entry.is_dir():
                continue
            state = _State.load(entry)
            if state is None:
                if time.time() - entry.stat().st_mtime > 60:
                    shutil.rmtree(entry, ignore_errors=True)
                    reaped += 1
                continue
            if _alive(state.owner_pid, state.owner_start):
                continue
            await _kill_and_wait(state)
            shutil.rmtree(entry, ignore_errors=True)
            reaped += 1
        if reaped:
            log.info("reaped %d microVM(s) left by a previous worker", reaped)
        return reaped
