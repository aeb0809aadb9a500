"""Build deploy/k8s kustomizations in Python, for the features deploy/k8s uses and no others.

kustomize itself is not a dependency (no Python, npm or Debian package ships it; kubectl embeds
it, and where kubectl is installed tests/deploy/test_deploy_k8s_replicas.py checks that this build
equals ``kubectl kustomize``). Supported: ``resources`` (files and folders), ``labels`` with
``pairs`` only (metadata labels, as kustomize does without includeSelectors/includeTemplates),
``images`` (newName/newTag on container images) and ``patches`` given as a file of RFC 6902
operations (add, remove, replace, test) with a kind/name target. Anything else raises
:class:`UnsupportedKustomization` rather than being built differently from kustomize.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.support import load_yaml_documents

_KEYS = frozenset({"apiVersion", "kind", "resources", "labels", "images", "patches"})


class UnsupportedKustomization(Exception):
    """The kustomization uses a feature this builder does not implement."""


class PatchFailed(Exception):
    """An RFC 6902 operation does not apply (a failed ``test``, a missing path)."""


def build(root: Path) -> list[dict[str, Any]]:
    """The documents ``kubectl kustomize root`` prints, in resource order."""
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text(encoding="utf-8"))
    unknown = sorted(set(kustomization) - _KEYS)
    if unknown:
        raise UnsupportedKustomization(f"{root}: {unknown} not supported by tests/deploy/kustomize")
    documents: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = root / entry
        documents += build(path) if path.is_dir() else load_yaml_documents(path)
    for label in kustomization.get("labels", []):
        if set(label) != {"pairs"}:
            raise UnsupportedKustomization(f"{root}: labels {sorted(label)}: only pairs")
        for doc in documents:
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
    for image in kustomization.get("images", []):
        _set_image(documents, image)
    for patch in kustomization.get("patches", []):
        _patch(root, documents, patch)
    return documents


def _set_image(documents: list[dict[str, Any]], image: dict[str, str]) -> None:
    if not set(image) <= {"name", "newName", "newTag"}:
        raise UnsupportedKustomization(f"images: {sorted(image)}")
    for doc in documents:
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                tag = image.get("newTag", tag)
                new = image.get("newName", name)
                container["image"] = f"{new}:{tag}" if tag else new


def _patch(root: Path, documents: list[dict[str, Any]], patch: dict[str, Any]) -> None:
    if set(patch) != {"path", "target"} or set(patch["target"]) != {"kind", "name"}:
        raise UnsupportedKustomization(f"patches: only path + target (kind, name): {patch}")
    operations = yaml.safe_load((root / patch["path"]).read_text(encoding="utf-8"))
    if not isinstance(operations, list):
        raise UnsupportedKustomization(f"{patch['path']}: only RFC 6902 operation lists")
    target = patch["target"]
    matches = [
        i
        for i, doc in enumerate(documents)
        if doc["kind"] == target["kind"] and doc["metadata"]["name"] == target["name"]
    ]
    if not matches:
        raise PatchFailed(f"{patch['path']}: no {target['kind']} {target['name']}")
    for i in matches:
        documents[i] = apply_json_patch(documents[i], operations)


def apply_json_patch(document: Any, operations: list[dict[str, Any]]) -> Any:
    """``document`` with RFC 6902 ``operations`` applied (a new object; the input is unchanged)."""
    result = copy.deepcopy(document)
    for operation in operations:
        op, path = operation["op"], operation["path"]
        if op not in ("add", "remove", "replace", "test"):
            raise UnsupportedKustomization(f"JSON patch op {op!r}")
        if path == "":
            raise UnsupportedKustomization("JSON patch of the whole document")
        *parents, last = [_unescape(token) for token in path.split("/")[1:]]
        container = result
        for token in parents:
            container = _child(container, token, path)
        if op == "test":
            if _child(container, last, path) != operation["value"]:
                raise PatchFailed(f"test {path}: expected {operation['value']!r}")
        elif op == "add":
            value = copy.deepcopy(operation["value"])
            if isinstance(container, list):
                index = len(container) if last == "-" else _index(container, last, path, end=1)
                container.insert(index, value)
            else:
                container[last] = value
        else:
            _child(container, last, path)  # remove and replace need an existing member
            if op == "remove":
                if isinstance(container, list):
                    del container[int(last)]
                else:
                    del container[last]
            elif isinstance(container, list):
                container[int(last)] = copy.deepcopy(operation["value"])
            else:
                container[last] = copy.deepcopy(operation["value"])
    return result


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _index(container: list[Any], token: str, path: str, *, end: int = 0) -> int:
    if not token.isdigit() or int(token) >= len(container) + end:
        raise PatchFailed(f"{path}: no index {token} in a list of {len(container)}")
    return int(token)


def _child(container: Any, token: str, path: str) -> Any:
    if isinstance(container, list):
        return container[_index(container, token, path)]
    if isinstance(container, dict) and token in container:
        return container[token]
    raise PatchFailed(f"{path}: no member {token!r}")
