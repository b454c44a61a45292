"""A restricted reader for ``torch.save`` files whose pickle holds non-weight objects.

Official VMamba classification checkpoints pickle their yacs config (a ``dict`` subclass) next to
the weights, which torch's weights-only loader refuses. This reader rebuilds tensors and the plain
types of torch's allow-list, and lets every other class appear only as an inert
:class:`SkippedObject` that records what it stood for. It never runs code from the file:

* calling (``REDUCE``) anything outside the allow-list is refused, and so is building an
  unknown class the way a call would: ``INST`` and ``OBJ`` (which call the class), and ``NEWOBJ``
  or ``NEWOBJ_EX`` with arguments. A config is rebuilt by ``NEWOBJ`` without arguments, then
  ``BUILD``/``SETITEMS``, so none of these is ever needed;
* ``BUILD``, ``SETITEM(S)``, ``APPEND(S)`` and ``ADDITEMS`` apply only to objects the reader
  itself created while reading this file, so a pickle cannot change an existing class, module or
  function (e.g. ``GLOBAL collections.Counter`` then ``BUILD {"most_common": ...}``). What a
  ``GLOBAL`` names is never such an object, nor is an object that an allowed call returns but
  that existed before (``torch.serialization._get_layout`` returns the global ``torch.strided``);
  dtypes, layouts, quantization schemes, memory formats and devices never are.
"""

import io
import pickle
import sys
import types
import zipfile
from typing import Any, Callable, Dict, Iterable, List, Tuple

import torch

from ..errors import DamagedCheckpointError, UnsafeCheckpointError


class SkippedObject(dict):
    """An inert stand-in for a pickled object whose class is not allowed to load.

    It records how the pickle built it (``pickled_name``, ``args``, ``state``, items) and never
    runs any code of the original class.
    """

    pickled_name = "<unknown>"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.__dict__["args"] = args
        self.__dict__["kwargs"] = kwargs

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def append(self, item: Any) -> None:
        self.__dict__.setdefault("items", []).append(item)

    def extend(self, items: Any) -> None:
        self.__dict__.setdefault("items", []).extend(items)

    def __repr__(self) -> str:
        return f"<skipped pickled object {self.pickled_name}>"


def torch_allowed_globals() -> Dict[str, Any]:
    """torch's own allow-list for weights-only loading, by ``module.name``.

    Tensor rebuild functions, storage types, dtypes, ``OrderedDict``, ``torch.Size`` and similar.
    """
    from torch import _weights_only_unpickler

    return dict(_weights_only_unpickler._get_allowed_globals())


def qualified_name(obj: Any) -> str:
    """``module.qualname`` of a class or function, as a pickle names it."""
    return f"{obj.__module__}.{obj.__qualname__}"


# Opcodes whose result may be a new object made by the reader (a call's result only when it is
# new, see _is_fresh).
_CREATING_OPCODES = ("EMPTY_DICT", "EMPTY_LIST", "EMPTY_SET", "DICT", "LIST", "REDUCE", "NEWOBJ",
                     "NEWOBJ_EX", "OBJ", "INST")
# Opcodes that change the object under them on the stack (or in a mark below the items).
_MUTATING_OPCODES = {"BUILD": 1, "SETITEM": 2, "SETITEMS": None, "APPEND": 1, "APPENDS": None,
                     "ADDITEMS": None}
# What is never a reader-made object, whatever else the pickle says.
_NEVER_MUTABLE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
                  types.MethodType, types.MethodWrapperType, types.WrapperDescriptorType,
                  types.MethodDescriptorType, torch.dtype, torch.layout, torch.qscheme,
                  torch.memory_format, torch.device)
# References to a new object right after the opcode that made it: the stack's, and the one
# sys.getrefcount itself holds. An object that existed before has more (its module's, a cache's).
_probe = [object()]
_FRESH_REFCOUNT = sys.getrefcount(_probe[-1])
del _probe


def _opcode(name: str) -> int:
    return getattr(pickle, name)[0]


class RestrictedUnpickler(pickle._Unpickler):
    """Reads the ``data.pkl`` record of a torch zip checkpoint without running its code.

    The pure-Python unpickler is used because its opcode table can be extended; ``data.pkl``
    holds only the object graph (tensor bytes are separate records), so it is small.

    Args:
        data: the bytes of ``data.pkl``.
        archive: the open zip file, for the tensor storage records.
        root: the archive's top folder, e.g. ``"archive/"``.
        name: the checkpoint's name, for error messages.
        extra_allowed: classes and functions admitted beyond torch's allow-list.
    """

    dispatch: Dict[int, Callable[["RestrictedUnpickler"], None]] = dict(
        pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, name: str,
                 extra_allowed: Iterable[Any] = ()) -> None:
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._root = root
        self._name = name
        self._allowed = torch_allowed_globals()
        self._allowed.update((qualified_name(obj), obj) for obj in extra_allowed)
        self._placeholders: Dict[str, type] = {}
        self._storages: Dict[str, Any] = {}
        # Objects made while reading, kept alive so that their ids stay unique.
        self._created: Dict[int, Any] = {}

    @property
    def skipped(self) -> List[str]:
        """``module.name`` of every class replaced by a placeholder, sorted."""
        return sorted(self._placeholders)

    def find_class(self, module: str, name: str) -> Any:
        full_name = f"{module}.{name}"
        if full_name in self._allowed:
            return self._allowed[full_name]
        if full_name not in self._placeholders:
            self._placeholders[full_name] = type(
                "SkippedObject", (SkippedObject,), {"pickled_name": full_name})
        return self._placeholders[full_name]

    def persistent_load(self, saved_id: Any) -> Any:
        if not (isinstance(saved_id, tuple) and len(saved_id) == 5 and saved_id[0] == "storage"):
            raise UnsafeCheckpointError(
                f"{self._name}: unsupported persistent id {saved_id!r}; this is not a file "
                "written by torch.save.")
        _, storage_type, key, _location, _numel = saved_id
        if key not in self._storages:
            if storage_type is torch.UntypedStorage:
                dtype = torch.uint8
            elif isinstance(getattr(storage_type, "dtype", None), torch.dtype):
                # torch.FloatStorage & co., or the StorageType stand-ins of torch's allow-list.
                dtype = storage_type.dtype
            else:
                raise UnsafeCheckpointError(
                    f"{self._name}: unsupported storage type {storage_type!r}.")
            raw = self._archive.read(f"{self._root}data/{key}")
            if raw:
                untyped = torch.frombuffer(bytearray(raw), dtype=torch.uint8).untyped_storage()
            else:
                untyped = torch.UntypedStorage(0)
            self._storages[key] = torch.storage.TypedStorage(
                wrap_storage=untyped, dtype=dtype, _internal=True)
        return self._storages[key]

    def _refuse_placeholder(self, klass: Any, opcode: str, how: str) -> None:
        if isinstance(klass, type) and issubclass(klass, SkippedObject):
            raise UnsafeCheckpointError(
                f"refused {klass.pickled_name}: {self._name} {how} while loading (pickle opcode "
                f"{opcode}), and only the tensor and container functions of torch's allow-list "
                "may be called. Nothing from the file was run. If you trust the file, see "
                "'Checkpoint safety' in the README for how to re-save its weights.")

    def _instantiate(self, klass: Any, args: list) -> None:
        # INST and OBJ call the class with the pickled arguments (pickle's protocols 0 and 1).
        self._refuse_placeholder(klass, "INST/OBJ", "calls it")
        super()._instantiate(klass, args)

    def _check_before(self, opcode: str) -> None:
        if opcode == "REDUCE":
            self._refuse_placeholder(self.stack[-2], opcode, "calls it")
        elif opcode == "NEWOBJ" and not _is_empty(self.stack[-1]):
            self._refuse_placeholder(self.stack[-2], opcode, "builds it with arguments")
        elif opcode == "NEWOBJ_EX" and not (_is_empty(self.stack[-2])
                                            and _is_empty(self.stack[-1])):
            self._refuse_placeholder(self.stack[-3], opcode, "builds it with arguments")

    def _remember_if_new(self) -> None:
        # A call's result is the reader's own only if nothing else holds it: an allowed function
        # may hand back an object that already existed (a global, a cached singleton).
        if sys.getrefcount(self.stack[-1]) > _FRESH_REFCOUNT:
            return
        obj = self.stack[-1]
        self._created[id(obj)] = obj


def _is_empty(arguments: Any) -> bool:
    # Looks at the type first: the truth value of an arbitrary object could run its code.
    return type(arguments) in (tuple, dict) and len(arguments) == 0


def _record_created(opcode: str) -> Callable[[RestrictedUnpickler], None]:
    original = pickle._Unpickler.dispatch[_opcode(opcode)]

    def run(self: RestrictedUnpickler) -> None:
        self._check_before(opcode)
        original(self)
        self._remember_if_new()

    return run


def _only_on_created(opcode: str, depth: Any) -> Callable[[RestrictedUnpickler], None]:
    original = pickle._Unpickler.dispatch[_opcode(opcode)]

    def run(self: RestrictedUnpickler) -> None:
        # depth: items above the target; None means the target sits just below the last mark.
        target = self.metastack[-1][-1] if depth is None else self.stack[-1 - depth]
        if isinstance(target, _NEVER_MUTABLE) or self._created.get(id(target)) is not target:
            what = getattr(target, "__qualname__", type(target).__qualname__)
            module = getattr(target, "__module__", type(target).__module__)
            raise UnsafeCheckpointError(
                f"refused {module}.{what}: {self._name} tries to change it with the pickle "
                f"opcode {opcode}, but only objects built while reading the file may be changed. "
                "Nothing was changed; the file is crafted or broken, do not use it.")
        original(self)

    return run


for _name in _CREATING_OPCODES:
    RestrictedUnpickler.dispatch[_opcode(_name)] = _record_created(_name)
for _name, _depth in _MUTATING_OPCODES.items():
    RestrictedUnpickler.dispatch[_opcode(_name)] = _only_on_created(_name, _depth)


def restricted_load(archive: zipfile.ZipFile, name: str,
                    extra_allowed: Iterable[Any] = ()) -> Tuple[Any, List[str]]:
    """Reads a torch zip checkpoint with :class:`RestrictedUnpickler`.

    Args:
        archive: the open (and already verified) zip archive.
        name: the checkpoint's name, for messages.
        extra_allowed: classes and functions admitted beyond torch's allow-list.

    Returns:
        (the object, sorted ``module.name`` of the classes replaced by ``SkippedObject``).

    Raises:
        DamagedCheckpointError: the archive is not laid out as ``torch.save`` writes it.
        UnsafeCheckpointError: the pickle calls or changes something it may not.
    """
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise DamagedCheckpointError(
            f"{name} is a zip archive but not a torch.save checkpoint (no data.pkl record); "
            "check that this is the checkpoint you meant.")
    root = pickles[0][: -len("data.pkl")]
    if f"{root}byteorder" in names:
        order = archive.read(f"{root}byteorder").decode(errors="replace").strip()
        if order != sys.byteorder:
            raise DamagedCheckpointError(
                f"{name} was saved on a {order}-endian machine; re-save it on this one.")
    unpickler = RestrictedUnpickler(archive.read(pickles[0]), archive, root, name, extra_allowed)
    try:
        obj = unpickler.load()
    except (UnsafeCheckpointError, DamagedCheckpointError):
        raise
    except (pickle.UnpicklingError, EOFError, IndexError, KeyError, TypeError, ValueError,
            AttributeError) as error:
        raise DamagedCheckpointError(
            f"{name}: its pickle record could not be read ({type(error).__name__}: {error}); "
            "the file is damaged or not a torch checkpoint.") from error
    return obj, unpickler.skipped
