"""Search checkpoints that load without running code from the run directory.

A run directory can be shared, so resuming one must not unpickle arbitrary objects. A
checkpoint is two files, committed by the atomic rename of the second::

    checkpoint-cma-000007.pickle  pycma's CMAEvolutionStrategy (``es.pickle_dumps()``) after
                                  generation 7; loaded only by :class:`CmaUnpickler`
    checkpoint.json               the plain state: format, generation, evaluations, elapsed,
                                  incumbent (a history row), stop reason, numpy's global RNG
                                  state (as lists), and the name and SHA-256 of the CMA file

The CMA file of a generation is written first under its own name, then the JSON; older CMA
files are removed after. A kill at any point leaves a JSON whose CMA file exists and matches.

:class:`CmaUnpickler` is pickle's own (pure Python) machine with every way to run code closed:
globals only from an allow-list (numpy's array/dtype/RNG rebuilders, a few cma functions, and
classes of the cma package whose instances load without running cma code), calls (REDUCE) only
of the numpy rebuilders (the RNG ones limited to numpy's bit generators), a ``getattr`` limited
to a RandomState's draws and ``range``/``slice``/``complex`` of numbers; no INST/OBJ, BUILD only
on instances of allowed classes, items only through the builtin list/dict/set methods. After
loading, every function or class the ES holds must be one pycma itself keeps there, and the pycma
options workbench sets (they steer its log files, signals file, output and stopping) must be the
spec's. Anything else is refused with one line naming the file. Pickles of older workbench
versions (``checkpoint.pkl``) are never read.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import math
import pickle
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workbench.atomic import atomic_file
from workbench.errors import WorkbenchError

FORMAT = "workbench-search-checkpoint/1"
CHECKPOINT = "checkpoint.json"
OLD_CHECKPOINT = "checkpoint.pkl"
CMA_GLOB = "checkpoint-cma-*.pickle"

# globals that REDUCE may call: numpy's rebuilders of arrays, scalars and dtypes (and, through
# the checked stand-ins in `_STAND_INS`, getattr, numpy's RNG rebuilders and three builtins)
_CALLS = {("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
          ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"), ("numpy", "dtype")}
# globals that may only be held as values (pycma keeps them in its options and sampler)
_VALUES = {("numpy.linalg", "eigh"), ("cma.options_parameters", "is_feasible"), ("cma.evolution_strategy", "_pass"),
           ("cma.boundary_handler", "BoundTransform")}
# non-cma classes whose instances may be built (NEWOBJ) and filled (BUILD)
_CLASSES = {("numpy", "ndarray"), ("numpy.random._mt19937", "MT19937")}
_DRAWS = {"randn", "rand", "standard_normal", "normal", "uniform"}  # RandomState methods pycma may keep
_HOOKS = ("__new__", "__setstate__", "__getattr__", "__getattribute__", "__setattr__")


def cma_file_name(generation: int) -> str:
    return f"checkpoint-cma-{generation:06d}.pickle"


class _Refused(Exception):
    """Raised inside the unpickler; turned into a WorkbenchError naming the file."""


def _import(module: str, name: str):
    with warnings.catch_warnings():  # numpy.core is a deprecated alias of numpy._core in numpy 2
        warnings.simplefilter("ignore")
        return getattr(importlib.import_module(module), name)


def _inert_cma_class(obj) -> bool:
    """A class of the cma package whose instances NEWOBJ/BUILD make without running cma code."""
    if not isinstance(obj, type) or not obj.__module__.startswith("cma."):
        return False
    return not any(hook in vars(c) for c in obj.__mro__ if c.__module__.startswith("cma.") for hook in _HOOKS)


def _safe_getattr(obj, name: str):
    """``getattr`` as pickle uses it for bound methods, limited to a RandomState's draws."""
    if not (isinstance(obj, np.random.RandomState) and name in _DRAWS):
        raise _Refused(f"getattr({_name(obj)}, {name!r})")
    return getattr(obj, name)


def _bit_generator(bit_generator="MT19937"):
    """numpy's ``__bit_generator_ctor``, which calls any class it is given, limited to numpy's."""
    from numpy.random import _pickle

    cls = bit_generator if isinstance(bit_generator, type) else _pickle.BitGenerators.get(bit_generator)
    if not (isinstance(cls, type) and issubclass(cls, np.random.BitGenerator)):
        raise _Refused(f"a bit generator {_name(bit_generator)}")
    return cls()


def _random_state(bit_generator="MT19937", bit_generator_ctor=None):
    """numpy's ``__randomstate_ctor``, which calls any ``bit_generator_ctor``, without that."""
    if bit_generator_ctor not in (None, _bit_generator):
        raise _Refused(f"a call of {_name(bit_generator_ctor)}")
    if not isinstance(bit_generator, np.random.BitGenerator):
        bit_generator = _bit_generator(bit_generator)
    return np.random.RandomState(bit_generator)


def _numbers_only(builtin):
    """``range``/``slice``/``complex`` of plain numbers (no ``__index__`` of a loaded object)."""
    def call(*args):
        if not all(a is None or isinstance(a, (int, float, complex, np.number)) for a in args):
            raise _Refused(f"{builtin.__name__}() of {', '.join(_name(a) for a in args)}")
        return builtin(*args)
    return call


_STAND_INS = {("builtins", "getattr"): _safe_getattr, ("numpy.random._pickle", "__bit_generator_ctor"): _bit_generator,
              ("numpy.random._pickle", "__randomstate_ctor"): _random_state,
              **{("builtins", f.__name__): _numbers_only(f) for f in (range, slice, complex)}}


def _allowed_calls() -> list:
    out = list(_STAND_INS.values())
    for module, name in _CALLS:
        try:
            out.append(_import(module, name))
        except (ImportError, AttributeError):
            pass
    return out


class CmaUnpickler(pickle._Unpickler):
    """Loads pycma's pickled ES and nothing else (see the module docstring)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file) -> None:
        super().__init__(file)
        self._calls = _allowed_calls()
        self._classes = tuple(_import(m, n) for m, n in _CLASSES) + (np.dtype, np.random.RandomState)

    def find_class(self, module: str, name: str):
        if (module, name) in _STAND_INS:
            return _STAND_INS[module, name]
        if (module, name) in _CALLS | _VALUES | _CLASSES:
            return _import(module, name)
        if module.startswith("cma.") and "." not in name:  # only modules `import cma` loaded: nothing new runs
            obj = getattr(sys.modules.get(module), name, None)
            if _inert_cma_class(obj):
                return obj
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        raise _Refused("a persistent id")

    def _reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if not any(func is f for f in self._calls):
            raise _Refused(f"a call of {_name(func)}")
        self.stack[-1] = func(*args)

    def _build(self) -> None:
        inst = self.stack[-2]
        if not (isinstance(inst, self._classes) or _inert_cma_class(type(inst))):
            raise _Refused(f"setting the state of {_name(inst)}")
        pickle._Unpickler.load_build(self)

    def _appends(self) -> None:
        items = self.pop_mark()
        list.extend(_target(self.stack[-1], list, "extend"), items)

    def _append(self) -> None:
        value = self.stack.pop()
        list.append(_target(self.stack[-1], list, "append"), value)

    def _setitems(self) -> None:
        items = self.pop_mark()
        target = _target(self.stack[-1], dict, "__setitem__")
        for i in range(0, len(items), 2):
            dict.__setitem__(target, items[i], items[i + 1])

    def _setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        dict.__setitem__(_target(self.stack[-1], dict, "__setitem__"), key, value)

    def _additems(self) -> None:
        items = self.pop_mark()
        set.update(_target(self.stack[-1], set, "update"), items)

    def _no_inst(self) -> None:
        raise _Refused("a protocol-0/1 instance (INST/OBJ)")

    dispatch[pickle.REDUCE[0]] = _reduce
    dispatch[pickle.BUILD[0]] = _build
    dispatch[pickle.APPENDS[0]] = _appends
    dispatch[pickle.APPEND[0]] = _append
    dispatch[pickle.SETITEMS[0]] = _setitems
    dispatch[pickle.SETITEM[0]] = _setitem
    dispatch[pickle.ADDITEMS[0]] = _additems
    dispatch[pickle.INST[0]] = _no_inst
    dispatch[pickle.OBJ[0]] = _no_inst


def _name(obj) -> str:
    t = obj if isinstance(obj, type) or callable(obj) else type(obj)
    return f"{getattr(t, '__module__', '?')}.{getattr(t, '__qualname__', type(t).__name__)}"


def _target(obj, kind: type, method: str):
    """The object items go into: a list, dict or set, or a subclass that keeps the builtin's
    ``method``; the builtin's method is called, so no code of a loaded class runs."""
    if not isinstance(obj, kind) or getattr(type(obj), method) is not getattr(kind, method):
        raise _Refused(f"adding items to {_name(obj)}")
    return obj


def _check_callables(es, allowed: list) -> None:
    """Every function or class reachable from ``es`` is one pycma keeps there itself."""
    seen, todo = set(), [("es", es)]
    while todo:
        where, obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, complex, type(None), np.ndarray,
                                                np.generic, np.dtype)):
            continue
        seen.add(id(obj))
        if isinstance(obj, types.MethodType):
            if not (isinstance(obj.__self__, np.random.RandomState) and obj.__name__ in _DRAWS):
                raise _Refused(f"{where} = {_name(obj)}")
            continue
        if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)) or type(obj).__name__ in (
                "_ArrayFunctionDispatcher", "ufunc"):
            if not any(obj is a for a in allowed):
                raise _Refused(f"{where} = {_name(obj)}")
            continue  # pycma's own function or class: not walked into
        if isinstance(obj, dict):
            todo.extend((f"{where}[{k!r}]", v) for k, v in obj.items())
            todo.extend((f"{where} key", k) for k in obj)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo.extend((f"{where}[{i}]", v) for i, v in enumerate(obj))
        if hasattr(obj, "__dict__") and not isinstance(obj, type):
            todo.extend((f"{where}.{k}", v) for k, v in vars(obj).items())


def load_cma(path: Path, options: dict):
    """The CMAEvolutionStrategy pickled in ``path``, through :class:`CmaUnpickler`, checked."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import cma
    try:
        es = CmaUnpickler(io.BytesIO(path.read_bytes())).load()
        if type(es) is not cma.CMAEvolutionStrategy:
            raise _Refused(f"a {_name(es)} instead of a cma.CMAEvolutionStrategy")
        _check_callables(es, [_import(m, n) for m, n in _VALUES])
        for key, want in options.items():  # these steer pycma's files (verb_log, signals_filename), output, stops
            if es.opts.get(key) != want:
                raise _Refused(f"option {key}={es.opts.get(key)!r} (the spec gives {want!r})")
    except _Refused as e:
        raise WorkbenchError(f"{path}: refusing to load the CMA-ES state: it holds {e}, which a search "
                             f"checkpoint may not") from None
    except WorkbenchError:
        raise
    except Exception as e:  # a truncated or garbled file
        raise WorkbenchError(f"{path}: unreadable CMA-ES state ({type(e).__name__}: {e})") from None
    return es


# --- the checkpoint --------------------------------------------------------------------------

@dataclass
class Checkpoint:
    generation: int
    evaluations: int
    elapsed: float
    incumbent: dict | None
    stop_reason: str | None
    numpy_rng: tuple  # for np.random.set_state
    es: object  # cma.CMAEvolutionStrategy


def _rng_to_json(state: tuple) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {"bit_generator": name, "keys": np.asarray(keys).tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached)}


def _rng_from_json(d: dict) -> tuple:
    if d["bit_generator"] != "MT19937" or len(d["keys"]) != 624:
        raise ValueError("numpy_rng: not an MT19937 state")
    keys = np.array(d["keys"], dtype=np.int64)
    if keys.min() < 0 or keys.max() >= 2**32:
        raise ValueError("numpy_rng: keys out of range")
    return "MT19937", keys.astype(np.uint32), int(d["pos"]), int(d["has_gauss"]), float(d["cached_gaussian"])


def write_checkpoint(run_dir: Path, ck: Checkpoint) -> None:
    """Write the CMA file of ``ck.generation``, then commit it with checkpoint.json, then drop
    the CMA files of other generations."""
    blob = ck.es.pickle_dumps()
    name = cma_file_name(ck.generation)
    with atomic_file(run_dir / name, "wb") as f:
        f.write(blob)
    record = {"format": FORMAT, "generation": ck.generation, "evaluations": ck.evaluations, "elapsed": ck.elapsed,
              "incumbent": ck.incumbent, "stop_reason": ck.stop_reason, "numpy_rng": _rng_to_json(ck.numpy_rng),
              "cma_state": name, "cma_sha256": hashlib.sha256(blob).hexdigest()}
    with atomic_file(run_dir / CHECKPOINT) as f:
        f.write(json.dumps(record))
    for old in run_dir.glob(CMA_GLOB):
        if old.name != name:
            old.unlink(missing_ok=True)


def has_checkpoint(run_dir: Path) -> bool:
    return (Path(run_dir) / CHECKPOINT).is_file()


def require_checkpoint(run_dir: Path) -> None:
    """Refuse, before anything is loaded, a run with no checkpoint or only an old pickled one
    (which is never opened)."""
    run_dir = Path(run_dir)
    if has_checkpoint(run_dir):
        return
    if (run_dir / OLD_CHECKPOINT).is_file():
        raise WorkbenchError(f"{run_dir / OLD_CHECKPOINT}: written by an older workbench version as a pickle, "
                             "which cannot be resumed safely; start a new run (history.jsonl and best.yml "
                             "stay readable)")
    raise WorkbenchError(f"{run_dir}: no {CHECKPOINT} to resume from")


def read_checkpoint(run_dir: Path, options: dict) -> Checkpoint:
    """The checkpoint of ``run_dir``; ``options`` are the pycma options the spec gives."""
    run_dir = Path(run_dir)
    require_checkpoint(run_dir)
    path = run_dir / CHECKPOINT
    try:
        d = json.loads(path.read_text())
        if d.get("format") != FORMAT:
            raise ValueError(f"format {d.get('format')!r}, expected {FORMAT!r}")
        generation = d["generation"]
        if not isinstance(generation, int) or generation < 0 or d["cma_state"] != cma_file_name(generation):
            raise ValueError("generation and cma_state do not match")
        if not (d["incumbent"] is None or isinstance(d["incumbent"], dict)) or not (
                d["stop_reason"] is None or isinstance(d["stop_reason"], str)):
            raise ValueError("incumbent or stop_reason of the wrong type")
        ck = Checkpoint(generation, int(d["evaluations"]), float(d["elapsed"]), d["incumbent"], d["stop_reason"],
                        _rng_from_json(d["numpy_rng"]), None)
        if not math.isfinite(ck.elapsed):
            raise ValueError("elapsed is not finite")
        sha = str(d["cma_sha256"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise WorkbenchError(f"{path}: not a readable search checkpoint ({e})") from None
    cma_path = run_dir / d["cma_state"]
    if not cma_path.is_file() or hashlib.sha256(cma_path.read_bytes()).hexdigest() != sha:
        raise WorkbenchError(f"{cma_path}: missing or not the CMA-ES state that {CHECKPOINT} names")
    ck.es = load_cma(cma_path, options)
    return ck
