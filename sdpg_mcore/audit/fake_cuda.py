"""Fake CUDA on a CPU-only torch: run GPU code paths for their devices, not their numbers.

Why: on a CPU machine every tensor shares one device, so code that mixes host and device tensors
(a CPU index into a CUDA tensor, a CPU tensor handed to an NCCL collective, a host mask fed to a
CUDA model) passes every test and stops at the first GPU micro-batch. ``torch``'s
``FakeTensorMode`` can make tensors that *claim* ``cuda:0`` (shapes, dtypes, strides, no data) and
raises ``FakeTensorDeviceMismatchError`` when devices mix — but only for tensors it made, and this
CPU build aborts on a few paths. :class:`FakeCuda` is a hybrid built around that, for audits only:

- host tensors stay real (batch building, rewards, plans keep their values); an op touching a fake
  tensor, or allocating with ``device="cuda"``, runs under the fake mode; mixing a real host tensor
  (not a 0-dim scalar) with a fake CUDA one raises, as CUDA would;
- a host->device copy makes a fake CUDA tensor; one that is not ``non_blocking`` from pinned memory
  is recorded as a host sync;
- a value read from the device (``.item()``, ``.tolist()``, ``float()``, a device->host copy) is
  recorded as a host sync with the line that asked, and answers a placeholder (1 / zeros);
- a data-dependent shape on the device (``nonzero``, boolean-mask gather) is a violation;
- Python indexing of fake CUDA tensors (whose C++ path needs a CUDA device guard on this build)
  is translated into the equivalent ``aten`` view / index ops.

Autograd through fake CUDA tensors aborts this CPU build, so audits run forward passes under
``torch.no_grad()`` and call backward formulas directly (see ``sdpg_mcore.audit.fake_step``).

    audit = FakeCuda()
    with audit:
        weight = audit.to_fake_cuda(real_weight)
        ...
    audit.report()
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten
CUDA = torch.device("cuda", 0)


class AuditViolation(RuntimeError):
    """A device error the real GPU would hit (or a data-dependent device shape)."""


@dataclass
class Finding:
    kind: str
    """``host_sync`` or ``violation``."""
    what: str
    where: str
    """The innermost frame of the repository's own code that asked."""


@dataclass
class AuditLog:
    findings: list[Finding] = field(default_factory=list)
    ops: int = 0
    """Device ops dispatched so far: a sync repeated with none in between is one read (``.tolist()``)."""
    _last: tuple = ()

    def add(self, kind: str, what: str) -> None:
        finding = Finding(kind, what, _caller())
        key = (kind, what, finding.where, self.ops)
        if key != self._last:
            self.findings.append(finding)
        self._last = key

    def of(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]


def _caller() -> str:
    """``file:line function`` of the innermost frame in sdpg_mcore / tools / tests, outside this module."""
    return _innermost_own_frame(traceback.extract_stack()[:-2])


def where_raised(err: BaseException) -> str:
    """Where ``err`` left the repository's own code (and the library frame that raised it)."""
    frames = traceback.extract_tb(err.__traceback__)
    last = frames[-1] if frames else None
    library = f" (raised in {last.filename.rsplit('/', 2)[-1]}:{last.lineno} {last.name})" if last else ""
    return _innermost_own_frame(frames) + library


def _innermost_own_frame(frames) -> str:
    for frame in reversed(frames):
        name = frame.filename
        if "fake_cuda" in name:
            continue
        if "/sdpg_mcore/" in name or "/tools/" in name or "/tests/" in name:
            short = (
                name[name.rfind("/sdpg_mcore/") + 1 :] if "/sdpg_mcore/" in name else name.rsplit("/", 2)[-2:]
            )
            short = short if isinstance(short, str) else "/".join(short)
            return f"{short}:{frame.lineno} {frame.name}"
    return "?"


def _no_cuda_init() -> None:
    """Stands in for ``torch.cuda._lazy_init`` while a :class:`FakeCuda` is active."""


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def is_fake_cuda(x) -> bool:
    return isinstance(x, FakeTensor) and x.device.type == "cuda"


def _placeholder(dtype: torch.dtype):
    if dtype == torch.bool:
        return True
    return 1.0 if dtype.is_floating_point else 1


class _Dispatch(TorchDispatchMode):
    def __init__(self, audit: FakeCuda):
        super().__init__()
        self.audit = audit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        fake = [x for x in leaves if isinstance(x, FakeTensor)]
        if not fake and not _is_cuda(kwargs.get("device")):
            return func(*args, **kwargs)  # a real host op
        if "out" in kwargs:  # the fake out= kernels copy through a CUDA-guarded binding: compute, then copy
            out = kwargs.pop("out")
            with self.audit.fake:
                aten.copy_.default(out, func.overloadpacket(*args, **kwargs))
            return out
        self.audit.log.ops += func is not aten._local_scalar_dense.default
        handler = self.audit.handlers.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        if func in (aten.nonzero.default, aten.masked_select.default, aten._unique2.default):
            self.audit.violation(f"{func}: a data-dependent shape on the device (host sync)")
        with self.audit.fake:
            return func(*args, **kwargs)


class _Indexing(TorchFunctionMode):
    """Tensor methods whose Python bindings hold a CUDA device guard (``x[...]``, ``x[...] = v``,
    ``contiguous``, ``copy_``, ``out=``), as the aten ops they stand for; ``pin_memory`` (the method
    and the factory argument) as a mark."""

    def __init__(self, audit: FakeCuda):
        super().__init__()
        self.audit = audit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__ and is_fake_cuda(args[0]):
            return self.audit.getitem(args[0], args[1])
        if func is torch.Tensor.__setitem__ and is_fake_cuda(args[0]):
            return self.audit.setitem(*args)
        if func is torch.Tensor.pin_memory:  # a CPU-only build has no pinned memory: mark instead
            self.audit.mark_pinned(args[0])
            return args[0]
        if kwargs.get("pin_memory") is True:  # torch.empty(..., pin_memory=True): the same, allocated plain
            out = func(*args, **{**kwargs, "pin_memory": False})
            self.audit.mark_pinned(out)
            return out
        if func is torch.Tensor.is_pinned:
            return self.audit.is_pinned(args[0])
        if func in (torch.Tensor.tolist, torch.Tensor.item) and is_fake_cuda(args[0]):
            self.audit.sync(f"a device value read on the host (.{func.__name__}())")
            return torch.ones(args[0].shape, dtype=args[0].dtype).tolist()
        if func is torch.Tensor.contiguous and is_fake_cuda(args[0]):
            fmt = args[1] if len(args) > 1 else kwargs.get("memory_format", torch.contiguous_format)
            x = args[0]
            return x if x.is_contiguous(memory_format=fmt) else aten.clone.default(x, memory_format=fmt)
        if func is torch.Tensor.copy_ or "out" in kwargs:  # their bindings hold a CUDA device guard
            if any(is_fake_cuda(x) for x in tree_leaves((args, kwargs))):
                name = "copy_" if func is torch.Tensor.copy_ else func.__name__
                return getattr(aten, name)(*args, **kwargs)
        return func(*args, **kwargs)


class FakeCuda:
    """The hybrid fake-CUDA context (module docstring). Re-entrant per instance: enter once."""

    def __init__(self) -> None:
        self.fake = FakeTensorMode(allow_non_fake_inputs=True)
        self.log = AuditLog()
        self._pinned: set[int] = set()  # storage addresses of host tensors marked pinned
        self.handlers = {
            aten._local_scalar_dense.default: self._scalar,
            aten._to_copy.default: self._to_copy,
            aten.copy_.default: self._copy_,
        }
        self._modes = (_Dispatch(self), _Indexing(self))

    def __enter__(self) -> FakeCuda:
        # ``device="cuda"`` arguments make the argument parser initialise CUDA before any mode sees
        # the call; this build has none, so the audit (only) makes that initialisation a no-op.
        self._lazy_init, torch.cuda._lazy_init = torch.cuda._lazy_init, _no_cuda_init
        # Torch-function modes below ours (the CPU compatibility layer maps device="cuda" to the
        # CPU) would turn every device allocation back into a host one: set aside while auditing.
        self._outer_modes = [
            torch._C._pop_torch_function_stack() for _ in range(torch._C._len_torch_function_stack())
        ]
        self._modes[0].__enter__()
        self._modes[1].__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._modes[1].__exit__(*exc)
        self._modes[0].__exit__(*exc)
        for mode in reversed(self._outer_modes):
            torch._C._push_on_torch_function_stack(mode)
        torch.cuda._lazy_init = self._lazy_init

    # -------------------------------------------------------------------- findings
    def sync(self, what: str) -> None:
        self.log.add("host_sync", what)

    def violation(self, what: str) -> None:
        self.log.add("violation", what)
        raise AuditViolation(f"{what} at {self.log.findings[-1].where}")

    # -------------------------------------------------------------------- tensors
    def mark_pinned(self, x: torch.Tensor) -> None:
        """Remember ``x``'s storage as pinned host memory (its views are pinned too)."""
        self._pinned.add(x.untyped_storage().data_ptr())

    def is_pinned(self, x: torch.Tensor) -> bool:
        return not isinstance(x, FakeTensor) and x.untyped_storage().data_ptr() in self._pinned

    def to_fake_cuda(self, x: torch.Tensor) -> FakeTensor:
        """A fake ``cuda:0`` tensor with ``x``'s shape, dtype and strides (no data)."""
        if isinstance(x, FakeTensor):
            return x
        with torch.no_grad():
            meta = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
        return FakeTensor(self.fake, meta, CUDA)

    def _host_placeholder(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape, dtype=x.dtype)

    def _scalar(self, x, *args, **kwargs):
        self.sync("a device value read on the host (float() / int() / bool())")
        return _placeholder(x.dtype)

    def _to_copy(self, x, *args, **kwargs):
        target = kwargs.get("device")
        if isinstance(x, FakeTensor) and target is not None and not _is_cuda(target):
            if not kwargs.get("non_blocking"):
                self.sync(f"device-to-host copy of {tuple(x.shape)} (blocking)")
            return self._host_placeholder(x).to(kwargs.get("dtype") or x.dtype)
        if not isinstance(x, FakeTensor) and _is_cuda(target):
            self._check_upload(x, bool(kwargs.get("non_blocking")))
            out = self.to_fake_cuda(x.contiguous())
            dtype = kwargs.get("dtype")
            if dtype is None or dtype == out.dtype:
                return out
            with self.fake:
                return out.to(dtype)
        with self.fake:
            return aten._to_copy.default(x, *args, **kwargs)

    def _copy_(self, dst, src, non_blocking: bool = False):
        if is_fake_cuda(dst) and not isinstance(src, FakeTensor):
            if src.dim() > 0:
                self._check_upload(src, non_blocking)
            return dst
        if not isinstance(dst, FakeTensor) and is_fake_cuda(src):
            if not (non_blocking and self.is_pinned(dst)):
                self.sync(f"device-to-host copy of {tuple(src.shape)} into pageable memory")
            return dst
        with self.fake:
            return aten.copy_.default(dst, src, non_blocking)

    def _check_upload(self, x: torch.Tensor, non_blocking: bool) -> None:
        if not (non_blocking and self.is_pinned(x)):
            self.sync(f"synchronous host-to-device copy of {tuple(x.shape)} (pageable or blocking)")

    # -------------------------------------------------------------------- indexing
    def getitem(self, x: torch.Tensor, index):
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            self.violation("boolean-mask index of a device tensor (a host sync: nonzero)")
        parts = index if isinstance(index, tuple) else (index,)
        return _basic_index(x, parts, self)

    def setitem(self, x: torch.Tensor, index, value) -> None:
        view = self.getitem(x, index)
        if isinstance(value, torch.Tensor):
            aten.copy_.default(view, value)
        else:
            aten.fill_.Scalar(view, value)

    def report(self) -> dict:
        return {
            "violations": [f"{f.what} at {f.where}" for f in self.log.of("violation")],
            "host_syncs": [f"{f.what} at {f.where}" for f in self.log.of("host_sync")],
        }


def _basic_index(x: torch.Tensor, parts: tuple, audit: FakeCuda) -> torch.Tensor:
    """``x[parts]`` for ints, slices, None, Ellipsis and integer index tensors (one, in front of views)."""
    out, dim = x, 0
    for i, part in enumerate(parts):
        if part is None:
            out, dim = out.unsqueeze(dim), dim + 1
        elif part is Ellipsis:  # the dims the parts after it consume are the last ones
            dim = out.dim() - sum(1 for p in parts[i + 1 :] if p is not None and p is not Ellipsis)
        elif isinstance(part, bool):
            raise AuditViolation("bool index of a device tensor")
        elif isinstance(part, int):
            out = out.select(dim, part)
        elif isinstance(part, slice):
            start, stop, step = part.indices(out.shape[dim])
            out, dim = aten.slice.Tensor(out, dim, start, stop, step), dim + 1
        elif isinstance(part, torch.Tensor):
            if part.dtype == torch.bool:
                audit.violation("boolean-mask index of a device tensor (a host sync: nonzero)")
            if not is_fake_cuda(part) and part.dim() > 0:
                audit.violation(f"host index tensor {tuple(part.shape)} into a device tensor")
            out = (
                out.index_select(dim, part)
                if part.dim() == 1
                else aten.index.Tensor(out, [None] * dim + [part])
            )
            dim += part.dim()
        else:
            raise AuditViolation(f"unsupported index {part!r} of a device tensor")
    return out
