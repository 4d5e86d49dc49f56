"""The federation file a coordinator writes: who coordinates, on which addresses, and which hospitals take part.

Example ``federation.toml``::

    [federation]
    name = "pediatric-cxr"

    [coordinator]
    hosts = ["flower.consortium.example.org", "10.20.0.5"]   # names and IPs hospitals use to reach it
    port = 9443                                              # the SuperLink's one HTTPS port
    bind = "0.0.0.0"                                         # interface the SuperLink listens on

    [[sites]]
    name = "st-olav"
    epsilon = 8.0          # most ε per run on this site's records (site policy template)
    epsilon-lifetime = 24.0  # most ε over all runs (default 3 x epsilon)

    [[sites]]
    name = "karolinska"

Every problem in the file is reported at once, each naming the key, the value and the fix.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import Problems
from common.io import read_toml

SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class SiteSpec:
    """One hospital of the federation and its privacy-policy template values."""

    name: str
    epsilon: float = 8.0
    delta: float = 1e-5
    contact: str = ""
    epsilon_lifetime: float = 0.0  # 0: three runs' worth (3 x epsilon, at most 100)

    @property
    def lifetime(self) -> float:
        """The lifetime ε written into the site's policy template."""
        return self.epsilon_lifetime or min(100.0, 3 * self.epsilon)


@dataclass(frozen=True)
class FederationSpec:
    """A parsed, validated ``federation.toml``."""

    name: str
    hosts: tuple[str, ...]
    port: int = 9443
    bind: str = "0.0.0.0"
    cert_days: int = 365
    sites: tuple[SiteSpec, ...] = field(default_factory=tuple)

    @property
    def address(self) -> str:
        """The address hospitals dial: the first host and the port (IPv6 in brackets)."""
        return format_address(self.hosts[0], self.port)


def format_address(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals bracketed."""
    try:
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def valid_host(host: str) -> bool:
    """A DNS name or an IPv4/IPv6 address (no scheme, no port)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    if not host or len(host) > 253 or host.endswith("."):
        return False
    labels = host.split(".")
    return all(_HOSTNAME_LABEL.match(label) for label in labels) and not labels[-1].isdigit()


def check_site_name(name: Any, problems: Problems, where: str) -> None:
    """Record a problem unless ``name`` is a lowercase identifier usable as a folder name."""
    problems.check(
        isinstance(name, str) and bool(SITE_NAME.match(name)),
        f"{where}: site name {name!r} is not allowed; use 1-63 lowercase letters, digits and '-' "
        "(it names the site's kit folder and appears in logs)",
    )


def load_federation(path: str | Path) -> FederationSpec:
    """Parse and validate ``path``; raise :class:`ConfigError` listing every problem."""
    raw = read_toml(path, missing="write one (see `medsilo provision --help`)")
    return parse_federation(raw, source=str(path))


def parse_federation(raw: dict[str, Any], *, source: str = "federation.toml") -> FederationSpec:
    """Validate an already-parsed federation document."""
    p = Problems()
    known = {"federation", "coordinator", "sites"}
    for key in sorted(set(raw) - known):
        p.add(f"{source}: unknown table [{key}]; expected {', '.join(sorted(known))}")
    fed = raw.get("federation", {})
    coord = raw.get("coordinator", {})
    name = fed.get("name") if isinstance(fed, dict) else None
    p.check(
        isinstance(name, str) and bool(SITE_NAME.match(name or "")),
        f"{source}: [federation].name = {name!r}; give a lowercase name of letters, digits and '-'",
    )
    hosts = coord.get("hosts") if isinstance(coord, dict) else None
    if not isinstance(hosts, list) or not hosts:
        p.add(f"{source}: [coordinator].hosts = {hosts!r}; list the DNS names and/or IPs hospitals use to reach "
              "the coordinator, e.g. hosts = [\"flower.example.org\", \"10.0.0.5\"]")
        hosts = []
    for host in hosts:
        p.check(
            isinstance(host, str) and valid_host(host),
            f"{source}: [coordinator].hosts contains {host!r}, which is neither a DNS name nor an IP address; "
            "write the bare host (no scheme, no port)",
        )
    dupes = sorted({h for h in hosts if hosts.count(h) > 1})
    p.check(not dupes, f"{source}: [coordinator].hosts lists {', '.join(map(str, dupes))} more than once")
    port = coord.get("port", 9443) if isinstance(coord, dict) else 9443
    p.check(isinstance(port, int) and 1 <= port <= 65535,
            f"{source}: [coordinator].port = {port!r}; use a TCP port between 1 and 65535")
    bind = coord.get("bind", "0.0.0.0") if isinstance(coord, dict) else "0.0.0.0"
    p.check(isinstance(bind, str) and valid_host(bind),
            f"{source}: [coordinator].bind = {bind!r}; use an interface address such as 0.0.0.0 or 10.0.0.5")
    days = coord.get("cert_days", 365) if isinstance(coord, dict) else 365
    p.check(isinstance(days, int) and 1 <= days <= 825,
            f"{source}: [coordinator].cert_days = {days!r}; use 1..825 days (browsers' and CAs' limit)")
    sites_raw = raw.get("sites", [])
    if not isinstance(sites_raw, list):
        p.add(f"{source}: sites must be an array of tables ([[sites]] blocks), got {type(sites_raw).__name__}")
        sites_raw = []
    sites: list[SiteSpec] = []
    for i, entry in enumerate(sites_raw):
        where = f"{source}: [[sites]] #{i + 1}"
        if not isinstance(entry, dict):
            p.add(f"{where} is not a table")
            continue
        site = parse_site(entry, p, where)
        if site is not None:
            sites.append(site)
    names = [str(e["name"]) for e in sites_raw if isinstance(e, dict) and isinstance(e.get("name"), str)]
    dup_sites = sorted({n for n in names if names.count(n) > 1})
    p.check(not dup_sites, f"{source}: site name(s) {', '.join(dup_sites)} appear more than once; "
            "every hospital needs its own name")
    p.check(bool(sites_raw), f"{source}: no [[sites]]; add one [[sites]] block with a name per hospital")
    p.raise_if_any()
    return FederationSpec(
        name=str(name), hosts=tuple(hosts), port=int(port), bind=str(bind), cert_days=int(days), sites=tuple(sites)
    )


def parse_site(entry: dict[str, Any], p: Problems, where: str) -> SiteSpec | None:
    """One ``[[sites]]`` table (problems recorded in ``p``)."""
    known = {"name", "epsilon", "epsilon-lifetime", "delta", "contact"}
    for key in sorted(set(entry) - known):
        p.add(f"{where}: unknown key {key!r}; expected {', '.join(sorted(known))}")
    name = entry.get("name")
    check_site_name(name, p, where)
    eps = entry.get("epsilon", 8.0)
    delta = entry.get("delta", 1e-5)
    ok_eps = p.check(isinstance(eps, (int, float)) and 0 < eps <= 100,
                     f"{where}: epsilon = {eps!r}; use a privacy budget in (0, 100]")
    ok_delta = p.check(isinstance(delta, (int, float)) and 0 < delta < 1e-2,
                       f"{where}: delta = {delta!r}; use δ in (0, 0.01), well below 1/records")
    contact = entry.get("contact", "")
    life = entry.get("epsilon-lifetime", 0.0)
    ok_life = p.check(isinstance(life, (int, float)) and (life == 0 or (ok_eps and eps <= life <= 100)),
                      f"{where}: epsilon-lifetime = {life!r}; use a lifetime budget between epsilon and 100")
    if not (isinstance(name, str) and SITE_NAME.match(name) and ok_eps and ok_delta and ok_life):
        return None
    return SiteSpec(name=name, epsilon=float(eps), delta=float(delta), contact=str(contact),
                    epsilon_lifetime=float(life))
