"""vLLM's source read without importing it, for the contract tests: the installed vLLM's and a downloaded
release's, each checked against the facts of vllm_steer/serving/vllm_internals.py, with every failure
named by file and line in that version."""

from __future__ import annotations

import ast
import hashlib
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from vllm_steer.serving.vllm_internals import Internal
from vllm_steer.tools.default_model import cache_root


@dataclass(frozen=True)
class Definition:
    """Where a name is defined: its AST node, in which module and file."""

    node: ast.AST
    module: str
    file: Path

    @property
    def where(self) -> str:
        return f"{self.file}:{getattr(self.node, 'lineno', 1)}"


class VllmSource:
    """The `vllm` package under `root`, as source."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        text = (self.root / "vllm" / "_version.py").read_text()
        self.version = re.search(r"__version__ = version = '([^']+)'", text).group(1)

    @property
    def minor(self) -> str:
        return ".".join(self.version.split(".")[:2])

    def module_file(self, module: str) -> Path | None:
        base = self.root.joinpath(*module.split("."))
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                return path
        return None

    def find(self, target: str) -> Definition | None:
        """The definition "module:Qual.name" names (the module itself without ":"), following re-exports
        (`from .x import Name`) and, for class members, base classes."""
        module, _, qualname = target.partition(":")
        file = self.module_file(module)
        if file is None:
            return None
        found = Definition(self._tree(file), module, file)
        for part in filter(None, qualname.split(".")):
            found = self._member(found, part) if isinstance(found.node, ast.ClassDef) else \
                self._in_module(found.module, part)
            if found is None:
                return None
        return found

    def problem(self, fact: Internal) -> str | None:
        """What does not hold of `fact` in this version, with the file and line; None if it holds."""
        target = fact.target(self.minor)
        found = self.find(target)
        if found is None:
            module = target.partition(":")[0]
            where = self.module_file(module) or f"no module {module} under {self.root}"
            return f"vLLM {self.version}: {target} is not defined ({where})"
        if fact.params is not None:
            params = _params(found.node)
            if params != fact.params:
                return f"vLLM {self.version}: {target} has parameters {params}, expected {fact.params} ({found.where})"
        if fact.fields:
            names = self.class_names(found)
            if missing := [f for f in fact.fields if f not in names]:
                return f"vLLM {self.version}: {target} has no {', '.join(missing)} ({found.where})"
        if fact.members is not None:
            members = tuple(sorted(self._body_names(found.node)))
            if members != tuple(sorted(fact.members)):
                return f"vLLM {self.version}: {target} has members {members}, expected {fact.members} ({found.where})"
        return None

    def class_names(self, found: Definition) -> set[str]:
        """The names a class defines in its body (methods, fields, attributes), its bases' included."""
        if not isinstance(found.node, ast.ClassDef):
            return set()
        names = self._body_names(found.node)
        for base in self._bases(found):
            names |= self.class_names(base)
        return names

    def digest(self, target: str) -> str:
        """A digest of the definition's source structure (comments, formatting and line numbers aside)."""
        found = self.find(target)
        if found is None:
            raise LookupError(f"vLLM {self.version}: {target} is not defined")
        return hashlib.sha256(ast.dump(found.node, annotate_fields=False).encode()).hexdigest()[:16]

    def classes_with(self, *names: str) -> list[str]:
        """Every class in vLLM whose own body defines all of `names`, as "module:Class"."""
        found = []
        for file in sorted((self.root / "vllm").rglob("*.py")):
            text = file.read_text(errors="replace")
            if not all(name in text for name in names):
                continue
            module = ".".join(file.relative_to(self.root).with_suffix("").parts).removesuffix(".__init__")
            for node in ast.walk(self._tree(file)):
                if isinstance(node, ast.ClassDef) and set(names) <= self._body_names(node):
                    found.append(f"{module}:{node.name}")
        return found

    def _member(self, owner: Definition, name: str) -> Definition | None:
        for stmt in owner.node.body:
            if name in _bound_names(stmt):
                return Definition(stmt, owner.module, owner.file)
        for base in self._bases(owner):
            if (found := self._member(base, name)) is not None:
                return found
        return None

    def _bases(self, owner: Definition) -> list[Definition]:
        bases = []
        for base in owner.node.bases:
            if isinstance(base, ast.Name) and (found := self._in_module(owner.module, base.id)) is not None:
                if isinstance(found.node, ast.ClassDef):
                    bases.append(found)
        return bases

    def _in_module(self, module: str, name: str, depth: int = 0) -> Definition | None:
        file = self.module_file(module)
        if file is None or depth > 8:
            return None
        for stmt in _runtime_statements(self._tree(file).body):
            if isinstance(stmt, ast.ImportFrom):
                for alias in stmt.names:
                    if (alias.asname or alias.name) == name:
                        source = _absolute(module, file, stmt)
                        if self.module_file(f"{source}.{alias.name}") is not None:  # a submodule
                            return Definition(self._tree(self.module_file(f"{source}.{alias.name}")),
                                              f"{source}.{alias.name}", self.module_file(f"{source}.{alias.name}"))
                        return self._in_module(source, alias.name, depth + 1)
            elif name in _bound_names(stmt):
                return Definition(stmt, module, file)
        if (sub := self.module_file(f"{module}.{name}")) is not None:
            return Definition(self._tree(sub), f"{module}.{name}", sub)
        return None

    @staticmethod
    def _body_names(node: ast.ClassDef) -> set[str]:
        return {name for stmt in node.body for name in _bound_names(stmt)}

    @staticmethod
    @cache
    def _tree(file: Path) -> ast.Module:
        return ast.parse(file.read_text(), filename=str(file))


def _bound_names(stmt: ast.stmt) -> set[str]:
    if isinstance(stmt, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        return {stmt.name}
    if isinstance(stmt, ast.Assign):
        return {t.id for t in stmt.targets if isinstance(t, ast.Name)}
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        return {stmt.target.id}
    return set()


def _runtime_statements(body: list[ast.stmt]):
    """A module's statements that run on import: `if TYPE_CHECKING:` blocks left out, other `if` and `try`
    blocks entered."""
    for stmt in body:
        if isinstance(stmt, ast.If):
            if "TYPE_CHECKING" in ast.dump(stmt.test):
                yield from _runtime_statements(stmt.orelse)
            else:
                yield from _runtime_statements(stmt.body)
                yield from _runtime_statements(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            yield from _runtime_statements(stmt.body)
        else:
            yield stmt


def _absolute(module: str, file: Path, stmt: ast.ImportFrom) -> str:
    if not stmt.level:
        return stmt.module or ""
    package = module.split(".") if file.name == "__init__.py" else module.split(".")[:-1]
    package = package[: len(package) - (stmt.level - 1)]
    return ".".join([*package, *([stmt.module] if stmt.module else [])])


def _params(node: ast.AST) -> tuple[str, ...] | None:
    """A function's parameters as `inspect.signature` shows them on its class (a classmethod's first left
    out, as it is bound there); None for anything but a function."""
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    args = node.args
    names = [a.arg for a in [*args.posonlyargs, *args.args]]
    names += [args.vararg.arg] if args.vararg else []
    names += [a.arg for a in args.kwonlyargs]
    names += [args.kwarg.arg] if args.kwarg else []
    if any(isinstance(d, ast.Name) and d.id == "classmethod" for d in node.decorator_list):
        names = names[1:]
    return tuple(names)


def installed_source() -> VllmSource:
    """The vLLM this venv runs (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    return VllmSource(Path(spec.origin).parent.parent)


def release_source(version: str) -> VllmSource:
    """vLLM `version`'s Python source from its PyPI wheel (fetched once with pip, about 340 MB, into the
    vllm-steer cache; only its .py files are kept)."""
    folder = cache_root() / "vllm-source" / version
    if not (folder / "vllm" / "_version.py").is_file():
        wheels = folder.parent / f"wheel-{version}"
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                        "--no-deps", f"vllm=={version}", "-d", str(wheels)], check=True)
        (wheel,) = wheels.glob(f"vllm-{version}-*.whl")
        partial = folder.with_name(f"{version}.partial")
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(partial, [n for n in archive.namelist() if n.startswith("vllm/") and n.endswith(".py")])
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
        wheel.unlink()
    return VllmSource(folder)
