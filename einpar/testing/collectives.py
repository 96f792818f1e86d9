"""Running a user's per-device NumPy function on every device of a mesh, with collectives.

`run_per_device` starts one Python thread per device of an einpar `Mesh`; each
calls the user's function with its own blocks and a `Collectives` object whose
methods (`psum`, `all_gather`, `ppermute`, ...) work over named mesh axes with
the meaning jax.lax gives them under `shard_map`. A collective is a rendezvous
of every device of the mesh, as in SPMD code: each device posts its call and
its array, all wait at a barrier, then each computes its own result from the
arrays of its group (the devices that differ from it only along the axes) and
all wait again, so no device overwrites its post before the others have read
it. Returning from the function is a rendezvous too, so a device that skips a
collective the others call is found at once. Mismatched calls, an exception on
one device, or a device that does not arrive within `timeout` seconds end the
run with a `DeviceRunError` naming the devices and the collective, never a hang.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from functools import reduce
from typing import Any, Callable, Sequence

import numpy as np

from einpar.layout import Mesh, device_coords, group_of

DEFAULT_TIMEOUT_S = 60.0
Axes = str | Sequence[str]


class DeviceRunError(AssertionError):
    """A per-device run went wrong: a device raised, the devices called different
    collectives, or a device did not reach a collective in time."""


@dataclass(frozen=True)
class _Call:
    """What one device asked for at one rendezvous: a collective, or "return"."""

    kind: str
    axes: tuple[str, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()  # the static arguments (dims, perm, tiled)
    site: str = ""  # the user's file:line

    def __str__(self) -> str:
        if self.kind == "return":
            return "returned"
        shown = ", ".join([repr(self.axes[0] if len(self.axes) == 1 else self.axes)]
                          + [f"{name}={value!r}" for name, value in self.options])
        return f"{self.kind}(x, {shown})" + (f" at {self.site}" if self.site else "")

    @property
    def signature(self) -> tuple:
        return self.kind, self.axes, self.options


class _Aborted(Exception):
    """Another device's failure broke the barrier this device waited at."""


def _caller_site() -> str:
    """The file:line of the user's code that called into this module."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    return "" if frame is None else f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"


def describe_devices(mesh: Mesh, devices: Sequence[int]) -> str:
    """`device 5 (dp=1, tp=1)` for one device, `devices 0, 1, 2` for several."""
    devices = sorted(devices)
    if len(devices) == 1:
        coords = ", ".join(f"{axis}={k}" for axis, k in device_coords(mesh, devices[0]).items())
        return f"device {devices[0]}" + (f" ({coords})" if coords else "")
    return "devices " + ", ".join(map(str, devices))


class _Rendezvous:
    """The meeting point of all devices: each collective call posts here and waits."""

    def __init__(self, mesh: Mesh, timeout: float):
        self.mesh = mesh
        self.timeout = timeout
        self.barrier = threading.Barrier(mesh.num_devices)
        self.calls: list[_Call | None] = [None] * mesh.num_devices
        self.arrays: list[np.ndarray | None] = [None] * mesh.num_devices
        self.rounds = [0] * mesh.num_devices  # rendezvous each device has reached
        self.lock = threading.Lock()
        self.failure: DeviceRunError | None = None  # the first failure, what the run reports

    def fail(self, error: DeviceRunError) -> None:
        with self.lock:
            if self.failure is None:
                self.failure = error
        self.barrier.abort()

    def _wait(self, device: int) -> None:
        try:
            self.barrier.wait(self.timeout)
        except threading.BrokenBarrierError:
            with self.lock:
                timed_out = self.failure is None
            if timed_out:  # this device waited longest: it says who did not come
                self.fail(self._timeout_error())
            raise _Aborted() from None

    def _timeout_error(self) -> DeviceRunError:
        latest = max(self.rounds)
        waiting = [d for d, r in enumerate(self.rounds) if r == latest]
        missing = [d for d, r in enumerate(self.rounds) if r < latest]
        call = self.calls[waiting[0]]
        place = "the end of fn" if call.kind == "return" else str(call)
        return DeviceRunError(
            f"{describe_devices(self.mesh, waiting)} waited {self.timeout:g} s at {place}, but "
            f"{describe_devices(self.mesh, missing)} never got there (still computing, or stuck)")

    def exchange(self, device: int, call: _Call, array: np.ndarray | None,
                 combine: Callable[[list[np.ndarray]], np.ndarray] | None) -> np.ndarray | None:
        """Post `call` and `array`, meet every device, check they all made the same call, and
        return `combine(arrays of every device)`, computed before anyone posts again."""
        self.calls[device], self.arrays[device] = call, array
        self.rounds[device] += 1
        self._wait(device)
        calls, arrays = list(self.calls), list(self.arrays)
        self._check_same(device, calls, arrays)
        result = None if combine is None else combine(arrays)
        self._wait(device)
        return result

    def _check_same(self, device: int, calls: list[_Call], arrays: list) -> None:
        """Every device sees the same posts, so every device raises the same error."""
        by_signature: dict[tuple, list[int]] = {}
        for d, call in enumerate(calls):
            by_signature.setdefault(call.signature, []).append(d)
        if len(by_signature) > 1:
            parts = [f"{describe_devices(self.mesh, members)}: {calls[members[0]]}"
                     for members in by_signature.values()]
            raise DeviceRunError("the devices did not make the same collective call (every "
                                 "device of the mesh must make each call, in the same order):\n  "
                                 + "\n  ".join(parts))
        if calls[device].kind == "return":
            return
        by_shape: dict[tuple, list[int]] = {}
        for d, array in enumerate(arrays):
            by_shape.setdefault((array.shape, str(array.dtype)), []).append(d)
        if len(by_shape) > 1:
            parts = [f"{describe_devices(self.mesh, members)}: {dtype}{list(shape)}"
                     for (shape, dtype), members in by_shape.items()]
            raise DeviceRunError(f"{calls[device]}: the devices passed arrays of different shapes "
                                 "or dtypes (each device's block must have the same shape):\n  "
                                 + "\n  ".join(parts))


class Collectives:
    """One device's view of the mesh: collectives over named axes, as in jax.lax.

    An `axis` is a mesh axis name or a tuple of names (a group over several axes, the
    first one major). Every device of the mesh must make the same calls in the same
    order, with arrays of one shape. Results are new arrays.
    """

    def __init__(self, mesh: Mesh, device: int, rendezvous: _Rendezvous):
        self.mesh = mesh
        self.device = device
        self.coords = device_coords(mesh, device)
        self._rendezvous = rendezvous

    def _axes(self, axis: Axes) -> tuple[str, ...]:
        axes = (axis,) if isinstance(axis, str) else tuple(axis)
        for name in axes:
            if name not in self.mesh.names:
                raise ValueError(f"{name!r} is not an axis of the {self.mesh}; the axes are "
                                 f"{', '.join(map(repr, self.mesh.names)) or 'none'}")
        return axes

    def _collective(self, kind: str, axis: Axes, x, combine, **options) -> np.ndarray:
        axes = self._axes(axis)
        members = group_of(self.mesh, self.device, axes)
        position = members.index(self.device)
        call = _Call(kind, axes, tuple(options.items()), _caller_site())
        return self._rendezvous.exchange(
            self.device, call, np.asarray(x),
            lambda arrays: combine([arrays[m] for m in members], position))

    def axis_index(self, axis: Axes) -> int:
        """This device's position along `axis` (row-major over a tuple of axes)."""
        index = 0
        for name in self._axes(axis):
            index = index * self.mesh.size(name) + self.coords[name]
        return index

    def axis_size(self, axis: Axes) -> int:
        """The number of devices along `axis` (the product over a tuple of axes)."""
        return int(np.prod([self.mesh.size(name) for name in self._axes(axis)], dtype=np.int64))

    def psum(self, x, axis: Axes) -> np.ndarray:
        """The sum of `x` over the devices along `axis` (jax.lax.psum)."""
        return self._collective("psum", axis, x, lambda parts, _: reduce(np.add, parts))

    def pmax(self, x, axis: Axes) -> np.ndarray:
        """The elementwise maximum over the devices along `axis` (jax.lax.pmax)."""
        return self._collective("pmax", axis, x, lambda parts, _: reduce(np.maximum, parts))

    def pmin(self, x, axis: Axes) -> np.ndarray:
        """The elementwise minimum over the devices along `axis` (jax.lax.pmin)."""
        return self._collective("pmin", axis, x, lambda parts, _: reduce(np.minimum, parts))

    def pmean(self, x, axis: Axes) -> np.ndarray:
        """The mean over the devices along `axis` (jax.lax.pmean)."""
        return self._collective("pmean", axis, x,
                                lambda parts, _: (reduce(np.add, parts) / len(parts)).astype(parts[0].dtype))

    def all_gather(self, x, axis: Axes, dim: int = 0, *, tiled: bool = True) -> np.ndarray:
        """Every device's `x` along `axis`, concatenated along `dim` in axis order (tiled), or
        stacked as a new dimension `dim` (`tiled=False`). jax.lax.all_gather(x, axis,
        axis=dim, tiled=...), except that tiled is the default here."""
        def gather(parts, _):
            return np.concatenate(parts, axis=dim) if tiled else np.stack(parts, axis=dim)
        return self._collective("all_gather", axis, x, gather, dim=dim, tiled=tiled)

    def psum_scatter(self, x, axis: Axes, dim: int = 0, *, tiled: bool = True) -> np.ndarray:
        """The sum over `axis`, of which this device keeps block `axis_index(axis)` along `dim`
        (tiled), or index `axis_index(axis)` of `dim`, which must have the axis's size
        (`tiled=False`). jax.lax.psum_scatter(x, axis, scatter_dimension=dim, tiled=...),
        except that tiled is the default here."""
        def scatter(parts, position):
            total = reduce(np.add, parts)
            if not tiled:
                _need_size(total, dim, len(parts), "psum_scatter(tiled=False)")
                return np.take(total, position, axis=dim)
            _need_divisible(total, dim, len(parts), "psum_scatter")
            return np.split(total, len(parts), axis=dim)[position]
        return self._collective("psum_scatter", axis, x, scatter, dim=dim, tiled=tiled)

    def all_to_all(self, x, axis: Axes, split_dim: int, concat_dim: int, *,
                   tiled: bool = True) -> np.ndarray:
        """Split `x` into `axis_size` blocks along `split_dim`; block j goes to the device at
        position j, which concatenates what it receives along `concat_dim` in axis order
        (tiled). With `tiled=False`, `split_dim` must have the axis's size and is removed, and
        the received pieces are stacked as a new dimension `concat_dim`. jax.lax.all_to_all
        (x, axis, split_dim, concat_dim, tiled=...), except that tiled is the default here."""
        def exchange(parts, position):
            if tiled:
                _need_divisible(parts[0], split_dim, len(parts), "all_to_all")
                return np.concatenate([np.split(p, len(parts), axis=split_dim)[position]
                                       for p in parts], axis=concat_dim)
            _need_size(parts[0], split_dim, len(parts), "all_to_all(tiled=False)")
            return np.stack([np.take(p, position, axis=split_dim) for p in parts], axis=concat_dim)
        return self._collective("all_to_all", axis, x, exchange, split_dim=split_dim,
                                concat_dim=concat_dim, tiled=tiled)

    def ppermute(self, x, axis: Axes, perm: Sequence[tuple[int, int]]) -> np.ndarray:
        """Send `x` along `axis`: for each (source, destination) pair of positions, the device
        at the destination receives the source's `x`; a device no pair names receives zeros
        (jax.lax.ppermute)."""
        perm = tuple((int(source), int(destination)) for source, destination in perm)
        size = self.axis_size(axis)
        for name, column in (("source", 0), ("destination", 1)):
            positions = [pair[column] for pair in perm]
            if len(set(positions)) != len(positions) or not all(0 <= p < size for p in positions):
                raise ValueError(f"ppermute over {axis!r}: each {name} must be a distinct position "
                                 f"in [0, {size}); perm is {list(perm)}")
        sender = {destination: source for source, destination in perm}

        def permute(parts, position):
            source = sender.get(position)
            return np.zeros_like(parts[0]) if source is None else parts[source].copy()
        return self._collective("ppermute", axis, x, permute, perm=perm)


def _need_divisible(array: np.ndarray, dim: int, size: int, what: str) -> None:
    if array.shape[dim] % size:
        raise ValueError(f"{what}: dimension {dim} of size {array.shape[dim]} does not split into "
                         f"{size} equal blocks")


def _need_size(array: np.ndarray, dim: int, size: int, what: str) -> None:
    if array.shape[dim] != size:
        raise ValueError(f"{what}: dimension {dim} has size {array.shape[dim]}; it must have the "
                         f"axis's size {size}")


def run_per_device(mesh: Mesh, fn: Callable[..., Any], blocks: Sequence[dict[str, np.ndarray]],
                   timeout: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """`fn(collectives, **blocks[d])` on every device d of `mesh`, one thread each; returns
    what each device returned. Raises DeviceRunError if a device raised (chained to its
    exception), the devices' collective calls differ, or one did not come within `timeout`."""
    rendezvous = _Rendezvous(mesh, timeout)
    results: list[Any] = [None] * mesh.num_devices
    raised: dict[int, BaseException] = {}

    def device_main(device: int) -> None:
        try:
            results[device] = fn(Collectives(mesh, device, rendezvous), **blocks[device])
            rendezvous.exchange(device, _Call("return"), None, None)
        except _Aborted:
            pass
        except DeviceRunError as error:
            rendezvous.fail(error)
        except Exception as error:  # noqa: BLE001 - the user's code: reported with its device
            raised[device] = error
            rendezvous.fail(DeviceRunError(f"{describe_devices(mesh, [device])} raised "
                                           f"{type(error).__name__}: {error}"))

    threads = [threading.Thread(target=device_main, args=(d,), daemon=True,
                                name=f"einpar-device-{d}") for d in range(mesh.num_devices)]
    for thread in threads:
        thread.start()
    for thread in threads:
        # A failure breaks the barrier and every waiting device leaves; one computing
        # forever is left behind (a daemon thread) rather than hanging the test.
        while thread.is_alive():
            thread.join(0.05)
            if rendezvous.failure is not None:
                thread.join(1.0)
                break
    if rendezvous.failure is not None:
        cause = next(iter(raised.values()), None)
        error = rendezvous.failure
        if len(raised) > 1:
            error = DeviceRunError(f"{error}\n  (also raised: "
                                   f"{describe_devices(mesh, sorted(raised))})")
        raise error from cause
    return results
