"""The served configuration: which steers a server loads and how far requests may push them,
carried in one environment variable so that every vLLM process sees the same set (the API front
end, which validates requests before any worker sees them, the engine core and its workers).
No vLLM import."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from vllm_steer.steer.file import SteerFile, SteerFileError, SteerHeader, read_header

ENV_VAR = "VLLM_STEER_CONFIG"
# Opt-in for POST /v1/load_steer and /v1/unload_steer, as vLLM gates runtime LoRA updates.
RUNTIME_UPDATES_ENV = "VLLM_STEER_ALLOW_RUNTIME_UPDATES"
# Opt-in for the playground page at /playground.
PLAYGROUND_ENV = "VLLM_STEER_PLAYGROUND"
# Every variable a vLLM process of a steered server reads (VLLM_PLUGINS: the opt-in for the routes).
STEER_ENV_VARS = (ENV_VAR, RUNTIME_UPDATES_ENV, PLAYGROUND_ENV, "VLLM_PLUGINS")
# vLLM's Ray executors copy the names listed here to their workers on every node, in addition to
# what they copy by prefix (comma-separated; the operator's own entries are kept).
RAY_COPY_ENV = "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"
# The key of vLLM's --additional-config (which travels inside the engine configuration to every
# engine core and worker, on every node) under which `vllm-steer serve` puts the steer set's digest.
ADDITIONAL_CONFIG_KEY = "vllm_steer"
DIGEST_KEY = "steer_set_sha256"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*$")
# A preset is served as a model: the characters model names use.
PRESET_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DEFAULT_MAX_ABS_VALUE = 50.0
DEFAULT_MAX_STEERS_PER_REQUEST = 4
# The largest steer file a runtime load accepts: its bytes travel to every worker (a rank-D
# reference steer of a 4096-wide model takes 128 MiB in float32).
DEFAULT_MAX_LOAD_BYTES = 512 * 2**20
# Above this size the configuration travels in a file named by the environment variable ("@PATH"):
# one environment string may not exceed 128 KiB on Linux (about 1,500 steer paths).
ENV_INLINE_LIMIT = 120 * 1024
# What a steer loaded from an upload has in place of a path.
UPLOADED = "(uploaded)"


@dataclass(frozen=True)
class SteerConfig:
    """steers: name -> steer file path; max_abs_value: the largest |value| a request may ask
    for; bounds: the operator's tighter or looser bound for particular steers;
    max_steers_per_request: how many steers one request may compose; memory_budget: the most
    bytes the loaded steers may take where they are served (None: no limit); max_load_bytes: the
    largest steer file a runtime load accepts; load_dirs: the folders runtime loads may name paths in (none:
    runtime loads take uploads only); presets: name -> {steer: value} (a number or K values, as in vllm_xargs),
    each served as a model. headers: the steers' headers where they have been read
    (`with_headers`: the front end, which validates requests against them; workers take theirs from
    the weights they load); not part of the configuration that travels."""

    steers: dict[str, str] = field(default_factory=dict)
    max_abs_value: float = DEFAULT_MAX_ABS_VALUE
    bounds: dict[str, float] = field(default_factory=dict)
    max_steers_per_request: int = DEFAULT_MAX_STEERS_PER_REQUEST
    memory_budget: int | None = None
    max_load_bytes: int = DEFAULT_MAX_LOAD_BYTES
    load_dirs: tuple[str, ...] = ()
    presets: dict[str, dict[str, float | list[float]]] = field(default_factory=dict)
    headers: dict[str, SteerHeader] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "steers", {n: p if p == UPLOADED else str(Path(p).resolve())
                                            for n, p in self.steers.items()})
        for name in self.steers:
            if not NAME_PATTERN.match(name):
                raise ValueError(f"steer name {name!r} must be letters, digits and underscores")
        for name, bound in {"max_abs_value": self.max_abs_value, **self.bounds}.items():
            if not (isinstance(bound, (int, float)) and 0 < bound < float("inf")):
                raise ValueError(f"the bound for {name} must be a positive finite number, got {bound}")
        unknown = set(self.bounds) - set(self.steers)
        if unknown:
            raise ValueError(f"bounds given for steers that are not loaded: {sorted(unknown)}")
        if not (isinstance(self.max_steers_per_request, int) and self.max_steers_per_request >= 1):
            raise ValueError(f"max_steers_per_request must be a positive integer, got {self.max_steers_per_request}")
        if self.memory_budget is not None and not (isinstance(self.memory_budget, int) and self.memory_budget > 0):
            raise ValueError(f"the steer memory budget must be a positive number of bytes, got {self.memory_budget}")
        for name, values in self.presets.items():
            if not (isinstance(name, str) and PRESET_NAME_PATTERN.match(name)):
                raise ValueError(f"preset name {name!r} must be letters, digits, '.', '_' and '-' (a model name)")
            if not (isinstance(values, dict) and values):
                raise ValueError(f"preset {name!r} names no steers")
        if not (isinstance(self.max_load_bytes, int) and self.max_load_bytes > 0):
            raise ValueError(f"the largest steer file to load must be a positive number of bytes, "
                             f"got {self.max_load_bytes}")

    @property
    def catalog(self) -> dict[str, SteerHeader]:
        """Each steer's header (metadata only): what request validation needs. Read once, by
        `with_headers`."""
        if set(self.headers) != set(self.steers):
            raise RuntimeError("the steer headers have not been read (SteerConfig.with_headers)")
        return self.headers

    @property
    def value_bounds(self) -> dict[str, float]:
        """Each steer's bound: the operator's if given, else the file's, else max_abs_value."""
        return self.bounds_for(self.catalog)

    def bounds_for(self, catalog: dict[str, SteerHeader]) -> dict[str, float]:
        """`value_bounds` for steers whose headers are at hand (a worker's, read from the weights
        it loaded, rather than from paths that need not exist on its node)."""
        return {name: self.bounds.get(name) or header.max_abs_value or self.max_abs_value
                for name, header in catalog.items()}

    def with_headers(self) -> SteerConfig:
        """This set with every steer's header read from its file (the headers already read are kept)."""
        return replace(self, headers={name: self.headers.get(name) or read_header(path)
                                      for name, path in self.steers.items()})

    def with_steer(self, name: str, path: str, header: SteerHeader | None, bound: float | None = None) -> SteerConfig:
        """This set plus one steer, whose `header` is already read (None: not yet; the name, a duplicate and
        the bound are checked all the same)."""
        if name in self.steers:
            raise ValueError(f"a steer named {name!r} is already loaded")
        bounds = {**self.bounds, **({name: bound} if bound is not None else {})}
        headers = {**self.headers, **({name: header} if header is not None else {})}
        return replace(self, steers={**self.steers, name: path}, bounds=bounds, headers=headers)

    def with_preset(self, name: str, values: dict[str, float | list[float]]) -> SteerConfig:
        """This set plus the preset `name` (replacing one of that name)."""
        return replace(self, presets={**self.presets, name: dict(values)})

    def without_preset(self, name: str) -> SteerConfig:
        if name not in self.presets:
            raise KeyError(name)
        return replace(self, presets={n: v for n, v in self.presets.items() if n != name})

    def without_steer(self, name: str) -> SteerConfig:
        if name not in self.steers:
            raise KeyError(name)
        return replace(self, steers={n: p for n, p in self.steers.items() if n != name},
                       bounds={n: b for n, b in self.bounds.items() if n != name},
                       headers={n: h for n, h in self.headers.items() if n != name})

    def to_json(self) -> str:
        return json.dumps({"steers": self.steers, "max_abs_value": self.max_abs_value, "bounds": self.bounds,
                           "max_steers_per_request": self.max_steers_per_request,
                           "memory_budget": self.memory_budget, "max_load_bytes": self.max_load_bytes,
                           "load_dirs": list(self.load_dirs), "presets": self.presets})

    @classmethod
    def from_json(cls, text: str) -> SteerConfig:
        try:
            data = json.loads(text)
            return cls(steers=dict(data.get("steers", {})),
                       max_abs_value=float(data.get("max_abs_value", DEFAULT_MAX_ABS_VALUE)),
                       bounds={n: float(b) for n, b in data.get("bounds", {}).items()},
                       max_steers_per_request=int(data.get("max_steers_per_request", DEFAULT_MAX_STEERS_PER_REQUEST)),
                       memory_budget=data.get("memory_budget"),
                       max_load_bytes=int(data.get("max_load_bytes", DEFAULT_MAX_LOAD_BYTES)),
                       load_dirs=tuple(str(d) for d in data.get("load_dirs", ())),
                       presets={str(n): dict(v) for n, v in data.get("presets", {}).items()})
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{ENV_VAR} is not valid steer configuration JSON: {e}") from e

    @classmethod
    def from_env(cls) -> SteerConfig | None:
        text = os.environ.get(ENV_VAR)
        if text and text.startswith("@"):
            try:
                text = Path(text[1:]).read_text()
            except OSError as e:
                raise ValueError(f"{ENV_VAR} names a configuration file that cannot be read: {e}") from e
        return cls.from_json(text) if text else None

    def export(self) -> None:
        """Put this configuration where every vLLM process started from here will read it: in the
        environment, or, when it is large (hundreds of steers), in a file the environment names."""
        text = self.to_json()
        if len(text) > ENV_INLINE_LIMIT:
            digest = hashlib.sha256(text.encode()).hexdigest()[:24]
            path = Path(tempfile.gettempdir()) / "vllm-steer" / f"config-{digest}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            text = f"@{path}"
        os.environ[ENV_VAR] = text

    def read_files(self) -> dict[str, tuple[SteerFile, str]]:
        """Every steer read from its path on this node, each with the SHA-256 of its bytes. A path this
        node cannot read raises naming the node and the path (on a server spread over several nodes,
        every node needs the steer files configured at start-up at the same paths)."""
        loaded = {}
        for name, path in self.steers.items():
            where = f"steer {name!r} ({path}, read on node {socket.gethostname()})"
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                raise SteerFileError(
                    f"steer file not found or unreadable: {path} (steer {name!r}, on node {socket.gethostname()}: "
                    f"{e.strerror or e}). Every node of the server reads the steers configured at start-up from the "
                    "same paths: put the file there, or start without it and load it at run time (POST "
                    "/v1/load_steer sends the file's bytes to every worker).") from e
            loaded[name] = (SteerFile.from_bytes(data, where=where), hashlib.sha256(data).hexdigest())
        return loaded


def steer_set_digest(config: SteerConfig, file_sha256: dict[str, str]) -> str:
    """What identifies a served steer set, whichever node reads it: each steer's name and the
    SHA-256 of its file's bytes, and the settings that decide what requests may ask. Paths are
    left out (the same files may sit at other paths on other nodes)."""
    if set(file_sha256) != set(config.steers):
        raise ValueError(f"file digests for {sorted(file_sha256)}, steers {sorted(config.steers)}")
    identity = {"steers": dict(sorted(file_sha256.items())), "bounds": dict(sorted(config.bounds.items())),
                "max_abs_value": config.max_abs_value, "max_steers_per_request": config.max_steers_per_request,
                "memory_budget": config.memory_budget}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def with_steer_digest(additional_config: dict | None, digest: str) -> dict:
    """The operator's --additional-config (a JSON object) with the steer set's digest added under
    "vllm_steer"; everything else the operator put there is kept."""
    merged = dict(additional_config or {})
    ours = merged.get(ADDITIONAL_CONFIG_KEY, {})
    if not isinstance(ours, dict):
        raise ValueError(f"--additional-config: {ADDITIONAL_CONFIG_KEY!r} is reserved for vllm-steer and must be a "
                         f"JSON object, got {ours!r}")
    merged[ADDITIONAL_CONFIG_KEY] = {**ours, DIGEST_KEY: digest}
    return merged


def expected_steer_digest(additional_config: object) -> str | None:
    """The steer set digest the front end started with, if it put one in --additional-config."""
    if not isinstance(additional_config, dict):
        return None
    ours = additional_config.get(ADDITIONAL_CONFIG_KEY)
    return ours.get(DIGEST_KEY) if isinstance(ours, dict) else None


def ray_env_vars_to_copy(current: str | None) -> str:
    """VLLM_RAY_EXTRA_ENV_VARS_TO_COPY naming every steer variable, after the operator's entries."""
    names = [n.strip() for n in (current or "").split(",") if n.strip()]
    return ",".join(dict.fromkeys([*names, *STEER_ENV_VARS]))


def runtime_updates_allowed() -> bool:
    return os.environ.get(RUNTIME_UPDATES_ENV, "").lower() in ("1", "true")


def playground_served() -> bool:
    return os.environ.get(PLAYGROUND_ENV, "").lower() in ("1", "true")


def resolved_roots(folders: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The load folders as real paths (symlinks resolved), each an existing folder; ValueError otherwise."""
    roots = []
    for folder in folders:
        if not Path(folder).is_dir():
            raise ValueError(f"--steer-load-dir {folder}: not a folder")
        roots.append(os.path.realpath(folder))
    return tuple(dict.fromkeys(roots))
