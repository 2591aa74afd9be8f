"""Check real HTTP responses against the OpenAPI document (kvstore/openapi.json).

``validate_response(method, path_template, status, headers, body)`` asserts
that the status is documented for the operation, that every documented header
that is required is present and every documented header that is present
matches its schema, that the Content-Type is a documented media type, and that
a JSON body validates against the documented schema (OpenAPI 3.0 dialect:
``nullable``, ``format: byte``).  It raises ``OpenAPIMismatch`` (an
``AssertionError``, so pytest shows it as a failed assertion) and returns the
parsed JSON body (or the raw bytes for a non-JSON body, None when there is no
content) so a test can go on asserting about it.

``$ref``s are inlined by hand: the document has no recursive schemas, and this
keeps the helper independent of a particular ``referencing`` API version.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources
from typing import Any

from jsonschema.exceptions import best_match
from openapi_schema_validator import OAS30Validator, oas30_format_checker

HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")

HeadersLike = Mapping[str, str] | Iterable[tuple[str, str]]


class OpenAPIMismatch(AssertionError):
    """A response does not match what the OpenAPI document promises."""


@cache
def load_document() -> dict[str, Any]:
    """The OpenAPI document shipped in the package (the one nodes serve at /openapi.json)."""
    text = resources.files("kvstore").joinpath("openapi.json").read_text(encoding="utf-8")
    doc: dict[str, Any] = json.loads(text)
    return doc


def resolve_ref(ref: str, doc: Mapping[str, Any] | None = None) -> Any:
    """Follow a local ``#/a/b/c`` reference."""
    if not ref.startswith("#/"):
        raise OpenAPIMismatch(f"only local references are supported, got {ref!r}")
    node: Any = doc if doc is not None else load_document()
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, Mapping) or part not in node:
            raise OpenAPIMismatch(f"unresolvable reference {ref!r}")
        node = node[part]
    return node


def deref(node: Any, doc: Mapping[str, Any] | None = None, _seen: tuple[str, ...] = ()) -> Any:
    """``node`` with every ``$ref`` replaced by its target, recursively."""
    if isinstance(node, Mapping):
        if "$ref" in node:
            ref = node["$ref"]
            if ref in _seen:
                raise OpenAPIMismatch(f"recursive reference {ref!r} is not supported")
            return deref(resolve_ref(ref, doc), doc, (*_seen, ref))
        return {k: deref(v, doc, _seen) for k, v in node.items()}
    if isinstance(node, list):
        return [deref(v, doc, _seen) for v in node]
    return node


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^/{}]+\})", template)
    pattern = "".join("[^/]+" if p.startswith("{") and p.endswith("}") else re.escape(p) for p in parts)
    return re.compile(f"^{pattern}$")


def find_path_template(path: str, doc: Mapping[str, Any] | None = None) -> str:
    """The documented template for ``path``: itself if documented, else the template it matches."""
    paths = (doc or load_document())["paths"]
    path = path.split("?", 1)[0]
    if path in paths:
        return path
    matches = [t for t in paths if _template_regex(t).match(path)]
    if len(matches) != 1:
        raise OpenAPIMismatch(f"path {path!r} matches {len(matches)} documented paths: {matches}")
    return matches[0]


def operation(method: str, path_template: str, doc: Mapping[str, Any] | None = None) -> dict[str, Any]:
    doc = doc or load_document()
    template = find_path_template(path_template, doc)
    op = doc["paths"][template].get(method.lower())
    if op is None:
        raise OpenAPIMismatch(f"{method.upper()} {template} is not documented")
    result: dict[str, Any] = op
    return result


def _headers_dict(headers: HeadersLike) -> dict[str, str]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    return {str(k).lower(): str(v) for k, v in items}


def schema_errors(instance: Any, schema: Mapping[str, Any]) -> list[str]:
    """Every way ``instance`` violates the (already dereferenced) OpenAPI 3.0 ``schema``."""
    validator = OAS30Validator(dict(schema), format_checker=oas30_format_checker)
    problems = []
    for error in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path))):
        # For oneOf/anyOf, the closest branch's complaint is the useful one.
        detail = best_match(error.context) if error.context else None
        shown = detail if detail is not None else error
        problems.append(f"{'/'.join(map(str, shown.absolute_path)) or '<root>'}: {shown.message}")
    return problems


def validate_response(
    method: str, path_template: str, status: int, headers: HeadersLike, body: bytes
) -> Any:
    """Assert the response conforms to the document; return the parsed JSON body (or the bytes, or None)."""
    doc = load_document()
    op = operation(method, path_template, doc)
    where = f"{method.upper()} {find_path_template(path_template, doc)} -> {status}"
    responses: Mapping[str, Any] = op["responses"]
    documented = responses.get(str(status)) or responses.get(f"{str(status)[0]}XX") or responses.get("default")
    if documented is None:
        raise OpenAPIMismatch(f"{where}: status not documented (documented: {sorted(responses)})")
    response = deref(documented, doc)
    hdrs = _headers_dict(headers)

    problems: list[str] = []
    for name, spec in response.get("headers", {}).items():
        value = hdrs.get(name.lower())
        if value is None:
            if spec.get("required"):
                problems.append(f"required header {name} is missing")
            continue
        problems += [f"header {name}: {e}" for e in schema_errors(value, spec.get("schema", {}))]

    content: Mapping[str, Any] = response.get("content") or {}
    result: Any = None
    if not content:
        if body:
            problems.append(f"a body of {len(body)} bytes where none is documented")
    else:
        media_type = hdrs.get("content-type", "").split(";", 1)[0].strip().lower()
        media = content.get(media_type) or content.get(media_type.split("/", 1)[0] + "/*") or content.get("*/*")
        if media is None:
            problems.append(f"Content-Type {media_type or '<none>'!r} is not one of {sorted(content)}")
        elif media_type == "application/json" or media_type.endswith("+json"):
            try:
                result = json.loads(body)
            except (ValueError, UnicodeDecodeError) as exc:
                problems.append(f"body is not JSON: {exc}")
            else:
                problems += [f"body {e}" for e in schema_errors(result, media.get("schema", {}))]
        else:
            result = body
    if problems:
        raise OpenAPIMismatch(f"{where}: " + "; ".join(problems))
    return result
