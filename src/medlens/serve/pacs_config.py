"""How medlens reaches a PACS: one config file (TOML or JSON), environment variables on top, secrets kept out of sight.

A config file has a ``[dicomweb]`` table for DICOMweb (QIDO-RS, WADO-RS, STOW-RS) and a ``[dimse]`` table for
classic DICOM networking (C-ECHO, C-FIND, C-STORE, C-GET/C-MOVE)::

    [dicomweb]
    url = "https://pacs.example.org/dicom-web"   # the DICOMweb root (studies/ is appended)
    auth = "basic"                                # "none", "basic" or "bearer"
    username = "medlens"
    password = "..."                              # better: MEDLENS_PACS_PASSWORD in the environment
    timeout = 30                                  # seconds, per request
    verify = true                                 # TLS: true, false, or a CA bundle path

    [dimse]
    host = "pacs.example.org"
    port = 104
    called_aet = "PACS"                           # the PACS' AE title
    calling_aet = "MEDLENS"                       # ours (the PACS must know it for C-MOVE)
    retrieve = "get"                              # "get" (C-GET) or "move" (C-MOVE to our own store SCP)
    move_port = 11113                             # where our store SCP listens during a C-MOVE
    timeout = 30

The environment overrides the file: ``MEDLENS_PACS_URL``, ``MEDLENS_PACS_USER``, ``MEDLENS_PACS_PASSWORD``,
``MEDLENS_PACS_TOKEN``. When ``auth`` is not given it follows from what is set (a token means bearer, a user
name basic). Credentials never appear in a repr, a log line or an error message: errors name where the
credentials came from (the file or the variable), never their value; :meth:`PacsConfig.redact` scrubs any text
that might echo them.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from medlens.errors import InputError, MedlensError, unknown_name

ENV_URL = "MEDLENS_PACS_URL"
ENV_USER = "MEDLENS_PACS_USER"
ENV_PASSWORD = "MEDLENS_PACS_PASSWORD"
ENV_TOKEN = "MEDLENS_PACS_TOKEN"

AUTH_TYPES = ("none", "basic", "bearer")
RETRIEVE_METHODS = ("get", "move")

#: A DICOM UID: dot-separated numbers, at most 64 characters (PS3.5 9.1). Only such strings become file names.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
#: An AE title: up to 16 printable ASCII characters without backslash.
_AET = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


class PacsError(MedlensError):
    """The PACS could not be reached, refused us, or answered something that is not what DICOM promises."""

    exit_code = 3


class PacsAuthError(PacsError):
    """The PACS refused our credentials (HTTP 401/403, or a rejected DIMSE association)."""


class PacsNotFoundError(PacsError):
    """The study or series asked for is not on the PACS."""


def is_uid(value: object) -> bool:
    """True when ``value`` is a syntactically valid DICOM UID (digits and dots, at most 64 characters)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID.match(value))


def check_uid(value: str, what: str = "UID") -> str:
    """Return ``value`` stripped if it is a valid DICOM UID, else raise :class:`InputError` naming it."""
    v = str(value).strip()
    if not is_uid(v):
        raise InputError(f"{what} {value!r} is not a DICOM UID (digits and dots, at most 64 characters)")
    return v


@dataclass(frozen=True)
class PacsConfig:
    """Where the PACS is and how to log in. Build it with :func:`load_pacs_config`.

    Attributes:
        url: DICOMweb root URL (``.../dicom-web``), or None when only DIMSE is configured.
        auth: "none", "basic" or "bearer".
        username: user for basic authentication.
        password: password for basic authentication (never shown).
        token: bearer token (never shown).
        timeout: seconds per HTTP request.
        verify: TLS certificate verification: True, False, or the path of a CA bundle.
        host: DIMSE host.
        port: DIMSE port.
        called_aet: the PACS' AE title.
        calling_aet: our AE title.
        retrieve: DIMSE retrieve method, "get" (C-GET) or "move" (C-MOVE).
        move_port: port of our temporary storage SCP during a C-MOVE.
        dimse_timeout: seconds for a DIMSE connection, association or message.
        source: where the settings came from (a file and/or environment variables), for error messages.
    """

    url: str | None = None
    auth: str = "none"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    timeout: float = 30.0
    verify: bool | str = True
    host: str | None = None
    port: int = 104
    called_aet: str = "ANY-SCP"
    calling_aet: str = "MEDLENS"
    retrieve: str = "get"
    move_port: int = 11113
    dimse_timeout: float = 30.0
    source: str = "defaults"

    def secrets(self) -> list[str]:
        """Every string that must never be shown: password, token, and their encoded forms in headers."""
        out = [s for s in (self.password, self.token) if s]
        if self.password:
            raw = f"{self.username or ''}:{self.password}".encode()
            out.append(base64.b64encode(raw).decode("ascii"))
        return out

    def redact(self, text: str) -> str:
        """``text`` with every secret replaced by ``***`` (for messages that quote a server or a library)."""
        for s in sorted(self.secrets(), key=len, reverse=True):
            text = text.replace(s, "***")
        return text

    def credential_source(self) -> str:
        """Where the credentials were configured, to tell users what to check (never the values)."""
        if self.auth == "bearer":
            return f"the token ({ENV_TOKEN} or 'token' in {self.source})"
        return f"the user name and password ({ENV_USER}/{ENV_PASSWORD} or 'username'/'password' in {self.source})"

    def require_url(self) -> str:
        """The DICOMweb URL, or an error saying how to set it (or that the credentials are incomplete)."""
        if not self.url:
            raise InputError(
                f"no DICOMweb URL configured (set 'url' in the [dicomweb] table of --config or {ENV_URL})"
            )
        if self.auth == "basic" and not (self.username and self.password):
            raise InputError(
                f"auth 'basic' needs a user name and a password ({ENV_USER}/{ENV_PASSWORD} or {self.source})"
            )
        if self.auth == "bearer" and not self.token:
            raise InputError(f"auth 'bearer' needs a token ({ENV_TOKEN} or 'token' in {self.source})")
        return self.url

    def require_host(self) -> str:
        """The DIMSE host, or an error saying how to set it."""
        if not self.host:
            raise InputError(
                "no DIMSE host configured (set 'host' and 'port' in the [dimse] table of --config)"
            )
        return self.host


def load_pacs_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> PacsConfig:
    """Read the PACS settings from ``path`` (TOML or JSON, optional) and the environment (which wins).

    Args:
        path: a ``.toml`` or ``.json`` file with ``[dicomweb]`` and/or ``[dimse]`` tables.
        env: the environment to read ``MEDLENS_PACS_*`` from (default ``os.environ``).

    Raises:
        InputError: the file is missing or malformed, or a value is invalid (the message names it, never a
            secret).
    """
    env = os.environ if env is None else env
    web: dict[str, Any] = {}
    dimse: dict[str, Any] = {}
    sources = []
    if path is not None:
        web, dimse = _read_file(Path(path))
        sources.append(str(path))
    overrides = {
        "url": env.get(ENV_URL),
        "username": env.get(ENV_USER),
        "password": env.get(ENV_PASSWORD),
        "token": env.get(ENV_TOKEN),
    }
    used = [k for k, v in overrides.items() if v]
    if used:
        sources.append("environment")
    web.update({k: v for k, v in overrides.items() if v})
    source = " and ".join(sources) or "defaults"
    cfg = PacsConfig(source=source, **_web_fields(web, source), **_dimse_fields(dimse, source))
    return _split_url_credentials(cfg)


def _read_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    if not path.is_file():
        raise InputError(f"{path}: PACS config file not found")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import tomllib

            data = tomllib.loads(text)
    except (UnicodeDecodeError, ValueError) as e:
        # tomllib/json errors quote line and column, not values; still, say only where.
        where = f" (line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ""
        raise InputError(
            f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'}{where}"
        ) from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a table with [dicomweb] and/or [dimse]")
    unknown = set(data) - {"dicomweb", "dimse"}
    if unknown:
        raise InputError(f"{path}: unknown table(s) {sorted(unknown)}; expected [dicomweb] and/or [dimse]")
    web, dimse = data.get("dicomweb", {}), data.get("dimse", {})
    if not isinstance(web, dict) or not isinstance(dimse, dict):
        raise InputError(f"{path}: [dicomweb] and [dimse] must be tables")
    return dict(web), dict(dimse)


def _web_fields(web: dict[str, Any], source: str) -> dict[str, Any]:
    known = {"url", "auth", "username", "password", "token", "timeout", "verify"}
    _check_keys(web, known, "dicomweb", source)
    auth = web.get("auth")
    if auth is None:
        auth = "bearer" if web.get("token") else "basic" if web.get("username") else "none"
    auth = str(auth).lower()
    if auth not in AUTH_TYPES:
        raise unknown_name("PACS auth type", auth, AUTH_TYPES)
    verify = web.get("verify", True)
    if not isinstance(verify, bool | str):
        raise InputError(f"{source}: [dicomweb] verify must be true, false or a CA bundle path")
    if isinstance(verify, str) and not Path(verify).exists():
        raise InputError(f"{source}: [dicomweb] verify = {verify!r}: no such CA bundle file or folder")
    url = web.get("url")
    if url is not None:
        url = str(url).rstrip("/")
        if urlsplit(url).scheme not in ("http", "https"):
            raise InputError(f"DICOMweb url {_strip_userinfo(url)!r} must start with http:// or https://")
    return {
        "url": url,
        "auth": auth,
        "username": web.get("username"),
        "password": web.get("password"),
        "token": web.get("token"),
        "timeout": _positive(web.get("timeout", 30.0), "dicomweb timeout", source),
        "verify": verify,
    }


def _dimse_fields(dimse: dict[str, Any], source: str) -> dict[str, Any]:
    known = {"host", "port", "called_aet", "calling_aet", "retrieve", "move_port", "timeout"}
    _check_keys(dimse, known, "dimse", source)
    out: dict[str, Any] = {}
    if "host" in dimse:
        out["host"] = str(dimse["host"])
    for key in ("port", "move_port"):
        if key in dimse:
            value = dimse[key]
            if not isinstance(value, int) or not 0 < value < 65536:
                raise InputError(f"{source}: [dimse] {key} = {value!r} is not a TCP port (1-65535)")
            out[key] = value
    for key in ("called_aet", "calling_aet"):
        if key in dimse:
            aet = str(dimse[key])
            if not _AET.match(aet) or not aet.strip():
                raise InputError(
                    f"{source}: [dimse] {key} = {aet!r} is not an AE title (1-16 ASCII characters)"
                )
            out[key] = aet
    if "retrieve" in dimse:
        method = str(dimse["retrieve"]).lower()
        if method not in RETRIEVE_METHODS:
            raise unknown_name("DIMSE retrieve method", method, RETRIEVE_METHODS)
        out["retrieve"] = method
    if "timeout" in dimse:
        out["dimse_timeout"] = _positive(dimse["timeout"], "dimse timeout", source)
    return out


def _check_keys(table: dict[str, Any], known: set[str], name: str, source: str) -> None:
    unknown = set(table) - known
    if unknown:
        raise InputError(f"{source}: unknown key(s) {sorted(unknown)} in [{name}]; accepted: {sorted(known)}")


def _positive(value: Any, what: str, source: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = -1.0
    if not v > 0:
        raise InputError(f"{source}: {what} = {value!r} must be a positive number of seconds")
    return v


def _strip_userinfo(url: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _split_url_credentials(cfg: PacsConfig) -> PacsConfig:
    """Move ``user:password@`` out of the URL (so it is never logged) into the credential fields."""
    if not cfg.url or "@" not in urlsplit(cfg.url).netloc:
        return cfg
    userinfo = urlsplit(cfg.url).netloc.rpartition("@")[0]
    user, _, password = userinfo.partition(":")
    url = _strip_userinfo(cfg.url)
    if cfg.auth != "none":  # explicit credentials win; the URL ones are dropped
        return replace(cfg, url=url)
    if not password:
        raise InputError(f"DICOMweb url {url!r} has a user name but no password; set {ENV_PASSWORD}")
    return replace(cfg, url=url, auth="basic", username=unquote(user), password=unquote(password))
