"""Helpers shared by tests: a report rendered in headless Chromium, and a stand-in for Flower's ClientProxy."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import cast

from flwr.server.client_proxy import ClientProxy

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

#: Appended to a copy of the report: after load, write each image's decoded width into the DOM.
PROBE = """<script>
window.addEventListener("load", () => {
  const widths = Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0);
  const out = document.createElement("pre"); out.id = "probe"; out.textContent = "widths=" + widths.join(",");
  document.body.appendChild(out);
});
</script></body>"""


def rendered_image_widths(report: Path, work: Path) -> tuple[list[int], str]:
    """Render ``report`` in headless Chromium; each image's decoded width, and the rendered DOM."""
    assert CHROMIUM is not None
    probe = work / "probe.html"
    probe.write_text(report.read_text().replace("</body>", PROBE))
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--virtual-time-budget=10000", f"--user-data-dir={work / 'profile'}", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.search(r"<pre id=\"probe\">widths=([0-9,]*)</pre>", result.stdout)
    assert found, result.stdout[-2000:]
    return [int(w) for w in found.group(1).split(",")], result.stdout


class _FakeProxy:
    """The little of a ClientProxy the strategy touches."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.cid = str(node_id)


def proxy(node_id: int) -> ClientProxy:
    """A stand-in ClientProxy for node ``node_id``."""
    return cast(ClientProxy, _FakeProxy(node_id))
