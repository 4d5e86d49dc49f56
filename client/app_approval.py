"""Which app bundles (FABs) a hospital node accepts, decided before anything of them is loaded.

A Flower SuperNode runs the ClientApp inside the FAB that the coordinator uploads with ``flwr run``: the
coordinator's code, with the site's privacy policy, DP step and ledger in it. medsilo's node never does that: its
ClientApp process (:mod:`client.runner`) runs the ClientApp of the medsilo installed in the node's own
environment, which the hospital installed and can review, and takes only the run config from the FAB. It still
checks each FAB first, and refuses the request with a reason the coordinator sees unless

- the FAB's ClientApp code (every ``.py`` file under ``client/`` and ``common/``) is byte for byte the code of the
  node's installed medsilo: the coordinator ships the same release (its ``server/`` may differ: that code runs at
  the coordinator, which the site does not trust anyway), or
- the FAB's digest is listed in the site policy's ``[apps] approved`` (``medsilo site approve FAB``): the hospital
  reviewed that bundle and takes part in runs launched with it, still with its own code.

A refused FAB is kept in the node's state folder (``refused-apps/``) for review.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

from common.errors import MedsiloError
from common.io import atomic_write_bytes
from common.site_policy import SitePolicy

#: The packages whose code a site's ClientApp runs (``server/`` and ``simulations/`` never run at a site).
SITE_CODE = ("client/", "common/")

#: Limits on a FAB the node opens (a zip: its entries are read into memory, never extracted).
MAX_FAB_BYTES = 64 << 20
MAX_ENTRIES = 10_000


class FabError(MedsiloError):
    """A FAB that cannot be read as an app bundle."""


@dataclass(frozen=True)
class Fab:
    """An app bundle's digest and files (path inside the bundle -> bytes)."""

    digest: str
    files: dict[str, bytes]

    @property
    def site_code(self) -> dict[str, bytes]:
        """The ``.py`` files a site's ClientApp would run."""
        return {p: b for p, b in self.files.items() if p.startswith(SITE_CODE) and p.endswith(".py")}


def fab_digest(content: bytes) -> str:
    """``sha256:<hex>`` of a FAB's bytes: how a site policy names an approved bundle."""
    return "sha256:" + hashlib.sha256(content).hexdigest()


def read_fab(content: bytes) -> Fab:
    """Open a FAB in memory; raise :class:`FabError` for anything that is not a reasonable zip."""
    if len(content) > MAX_FAB_BYTES:
        raise FabError(f"the app bundle has {len(content)} bytes, more than the {MAX_FAB_BYTES} a node accepts")
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            infos = archive.infolist()
            if len(infos) > MAX_ENTRIES or sum(i.file_size for i in infos) > MAX_FAB_BYTES:
                raise FabError("the app bundle unpacks to more files or bytes than a node accepts")
            files = {i.filename: archive.read(i) for i in infos if not i.is_dir()}
    except (zipfile.BadZipFile, OSError) as exc:
        raise FabError(f"the app bundle is not a readable zip file ({exc})") from None
    return Fab(digest=fab_digest(content), files=files)


def installed_root() -> Path:
    """The folder holding this node's installed ``client`` and ``common`` packages."""
    import client

    return Path(client.__file__).resolve().parent.parent


def installed_site_code(root: Path | None = None) -> dict[str, bytes]:
    """The ``.py`` files of the installed ``client`` and ``common`` packages, by bundle-relative path."""
    base = root or installed_root()
    out: dict[str, bytes] = {}
    for package in SITE_CODE:
        for path in sorted((base / package).rglob("*.py")):
            out[path.relative_to(base).as_posix()] = path.read_bytes()
    return out


def differences(fab: Fab, installed: dict[str, bytes]) -> list[str]:
    """Site-code files that differ between the FAB and the installation, each with how (sorted by path)."""
    shipped = fab.site_code
    out = []
    for path in sorted(set(shipped) | set(installed)):
        if path not in installed:
            out.append(f"{path} (only in the bundle)")
        elif path not in shipped:
            out.append(f"{path} (missing from the bundle)")
        elif shipped[path] != installed[path]:
            out.append(f"{path} (differs)")
    return out


@dataclass(frozen=True)
class Verdict:
    """Whether the node accepts a FAB, and the reason (sent to the coordinator when it does not)."""

    accepted: bool
    digest: str
    how: str
    differing: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        if self.accepted:
            return self.how
        listed = ", ".join(self.differing[:5]) + (f" and {len(self.differing) - 5} more" if len(self.differing) > 5
                                                   else "")
        return (f"this node runs only app code its hospital approved: the app bundle {self.digest} is not this "
                f"node's medsilo release ({listed or self.how}) and is not in the site policy's [apps] approved; "
                "ship the medsilo release the hospitals installed, or ask the hospital to review and approve the "
                "bundle (`medsilo site approve FAB`)")


def check(content: bytes, policy: SitePolicy, *, installed: dict[str, bytes] | None = None) -> Verdict:
    """The node's decision on a FAB's bytes (nothing of it is imported or written)."""
    digest = fab_digest(content)
    if digest in policy.approved_apps:
        return Verdict(True, digest, "approved by the site policy")
    try:
        fab = read_fab(content)
    except FabError as exc:
        return Verdict(False, digest, str(exc))
    differing = differences(fab, installed if installed is not None else installed_site_code())
    if not differing:
        return Verdict(True, digest, "the node's own medsilo release")
    return Verdict(False, digest, "site code differs", tuple(differing))


def keep_refused(state: Path, content: bytes, digest: str) -> Path:
    """Keep a refused bundle in the node's state folder for the hospital to review (owner-only)."""
    path = state / "refused-apps" / (digest.replace(":", "-") + ".fab")
    if not path.exists():
        atomic_write_bytes(path, content, mode=0o600)
    return path


def describe(content: bytes, *, installed: dict[str, bytes] | None = None) -> list[str]:
    """What a hospital reviews before approving a FAB: digest, origin, size, and its site code against the node's."""
    import tomllib

    fab = read_fab(content)
    lines = [f"app bundle {fab.digest}", f"  {len(content):,} bytes, {len(fab.files)} files"]
    try:
        meta = tomllib.loads(fab.files.get("pyproject.toml", b"").decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        meta = {}
    project = meta.get("project", {}) if isinstance(meta.get("project"), dict) else {}
    flwr = meta.get("tool", {}).get("flwr", {}) if isinstance(meta.get("tool"), dict) else {}
    lines.append(f"  declares {project.get('name', '?')} {project.get('version', '?')}, publisher "
                 f"{flwr.get('app', {}).get('publisher', '?') if isinstance(flwr.get('app'), dict) else '?'}")
    differing = differences(fab, installed if installed is not None else installed_site_code())
    if not differing:
        lines.append("  its site code (client/, common/) is identical to this node's installed medsilo: the node "
                     "accepts it without approval")
    else:
        lines.append(f"  its site code differs from this node's installed medsilo in {len(differing)} file(s) (the "
                     "node runs its own code either way; approving accepts runs launched with this bundle):")
        lines += [f"    {d}" for d in differing]
    others = sorted(p for p in fab.files if p.endswith(".py") and not p.startswith(SITE_CODE))
    lines.append(f"  coordinator-side code (never run at the site): {len(others)} Python file(s)")
    return lines
