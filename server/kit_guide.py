"""The ``COMMANDS.md`` of each kit: what a hospital's or the coordinator's IT engineer runs, in order.

Written for a machine where medsilo is installed (``medsilo --version`` answers) and the kit is copied to
``/var/lib/medsilo/<kit name>``, where the kit's systemd unit (:mod:`server.services`) expects it. Pure text.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from server.services import (
    DATA_PLACEHOLDER,
    INSTALL_ROOT,
    NODE_ENV_FILE,
    NODE_UNIT,
    RUNS_DIR,
    RUNTIME_PORT,
    SERVICE_USER,
    SUPERLINK_UNIT,
    installed_kit_dir,
)

_INSTALL = """\
## 1. Install the kit (once, as root)

    sudo useradd --system --home-dir {root} --no-create-home --shell /usr/sbin/nologin {user}
    sudo install -d -m 0755 {root}
    sudo cp -r THIS-FOLDER {kit}
    sudo chown -R {user}:{user} {kit}
    sudo chmod 0700 {kit}

`THIS-FOLDER` is the folder that holds this file, as you received it. The commands below run as the
`{user}` account (`sudo -u {user} ...`): it owns the kit, and its private key must stay mode 0600. Where
`sudo` does not find `medsilo` or `flwr` (it searches its own `secure_path`), write their full paths (this
kit was written by `{medsilo}`; `flwr` is installed beside it).
"""


def _install(kit: PurePosixPath, medsilo: str | Path) -> str:
    return _INSTALL.format(root=INSTALL_ROOT, user=SERVICE_USER, kit=kit, medsilo=medsilo)


def site_commands(*, site: str, federation: str, address: str, fingerprint: str, medsilo: str | Path) -> str:
    """``COMMANDS.md`` of the hospital kit of ``site``.

    Parameters
    ----------
    site, federation
        The hospital's and the federation's names.
    address
        The coordinator address the node dials (``host:port``).
    fingerprint
        The node key's fingerprint (as ``ssh-keygen -lf node.pub`` prints it).
    medsilo
        The ``medsilo`` command written into the kit's unit.

    Returns
    -------
    str
        Markdown text.

    """
    kit = installed_kit_dir(site)
    unit = NODE_UNIT.removesuffix(".service")
    return f"""\
# Hospital '{site}' in federation '{federation}'

Coordinator address: `{address}`.
This hospital's node key fingerprint (read it to the coordinator when asked; `ssh-keygen -lf node.pub` prints
the same): `{fingerprint}`

This folder is the hospital's startup kit: `node.key` is the hospital's identity in the federation (keep it
secret, mode 0600), `ca.crt` the federation's CA, `site-policy.toml` the hospital's own privacy rules and
`{NODE_UNIT}` the systemd unit of the node. The commands assume medsilo is installed on the machine
that can read your images (`medsilo --version` answers; use the release the coordinator names) and the kit is
at `{kit}`.

{_install(kit, medsilo)}
The `{SERVICE_USER}` account must be able to read your DICOM folder: add it to the group that may
(`sudo usermod -aG GROUP {SERVICE_USER}`) rather than opening the folder to everyone.

## 2. Review the privacy policy with your privacy officer

`{kit}/site-policy.toml` holds this hospital's rules; the coordinator cannot loosen them. The node refuses
any request that breaks one and says which. `epsilon-per-run` is the most ε one run may spend on your
records, `epsilon-lifetime` the most all runs together may spend on them, both with `delta`. Restart the node
after editing it.

## 3. Check your data (before the first run)

    sudo -u {SERVICE_USER} medsilo site check --data /path/to/dicom --dataset DATASET --state-dir {kit}/state

`DATASET` is the task the coordinator announced (e.g. `pneumoniamnist`). Labels are read from `labels.csv` in
the DICOM folder, or from `--labels FILE`; a DICOMweb service is checked with its root URL
(`--data https://pacs.example.org/dicom-web --labels FILE`). The report lists every decoded and rejected file
with its reason and PHI findings (attribute names only); exit code 0 means ready. With `--state-dir` as above
it also fills the node's DICOM cache, so the first round does not decode the archive again.

## 4. Start the node by hand (the first time, to watch it join)

    sudo -u {SERVICE_USER} medsilo client start --kit {kit} --data /path/to/dicom

`--data` is your DICOM folder (with `labels.csv`, or add `--labels FILE`), a DICOMweb root URL (with
`--labels FILE`; credentials in `MEDSILO_PACS_USER` and `MEDSILO_PACS_PASSWORD`, or `MEDSILO_PACS_TOKEN`) or
a `.npz` file. The node checks the kit and the
coordinator's certificate, then prints that it joined the federation and waits for rounds; TLS, node
authentication and secure aggregation are on. Ctrl-C stops it and every process it started.

A second node on the same machine (another kit) needs its own `--runtime-port` (default {RUNTIME_PORT}, on
loopback), e.g. `--runtime-port {RUNTIME_PORT + 1}`: two nodes on one port fail with "SuperNode Runtime HTTP API
failed to start."

## 5. Run the node as a service (systemd)

`{NODE_UNIT}` runs the same command as the `{SERVICE_USER}` account with the kit read-only (only its
`state/` and `flwr/` are writable) and the rest of the system protected. Install it:

    sudo cp {kit}/{NODE_UNIT} /etc/systemd/system/
    sudoedit /etc/systemd/system/{NODE_UNIT}         # --data: see below
    sudo systemd-analyze verify /etc/systemd/system/{NODE_UNIT}
    sudo systemctl daemon-reload
    sudo systemctl enable --now {unit}
    journalctl -u {unit} -f

In `ExecStart=`, replace `{DATA_PLACEHOLDER}` with your DICOM folder (or DICOMweb URL and
`--labels FILE`). `ExecStart=` starts `{medsilo}`, the medsilo command that wrote this kit; if medsilo is
installed elsewhere here (`command -v medsilo`), put that path instead. DICOMweb credentials go in
`{NODE_ENV_FILE}` (root-owned, mode 0600) as `MEDSILO_PACS_USER=` and `MEDSILO_PACS_PASSWORD=`, or
`MEDSILO_PACS_TOKEN=`, lines. For a second node, copy the unit under another name and give it its kit and
`--runtime-port`. `sudo systemctl stop {unit}` stops the node and
every Flower process it started; a crash restarts it.

## 6. Privacy ledger and audit log

    sudo -u {SERVICE_USER} medsilo site ledger --kit {kit}
    sudo -u {SERVICE_USER} medsilo audit verify {kit}/state/audit.jsonl --key {kit}/node.pub

The ledger shows the ε spent and left per data source. `audit verify` checks every line of the node's signed
audit log (what was asked, what was answered or refused): exit code 0 means intact, 1 that lines were edited,
deleted, reordered or cut off.
"""


def coordinator_commands(*, federation: str, address: str, bind: str, medsilo: str | Path) -> str:
    """``COMMANDS.md`` of the coordinator kit.

    Parameters
    ----------
    federation
        The federation's name (also the ``flwr`` connection's name).
    address
        The address hospitals dial (``host:port``).
    bind
        Where the SuperLink listens (``host:port``).
    medsilo
        The ``medsilo`` command written into the kit's unit.

    Returns
    -------
    str
        Markdown text.

    """
    kit = installed_kit_dir("coordinator")
    unit = SUPERLINK_UNIT.removesuffix(".service")
    return f"""\
# Coordinator of federation '{federation}'

Hospitals dial `{address}`; the SuperLink listens on `{bind}` (open that port to the hospitals' addresses).
The coordinator holds no patient data: it relays masked model updates and keeps the runs' outputs. The
commands assume medsilo is installed on this machine (`medsilo --version` answers) and the kit is at
`{kit}`.

{_install(kit, medsilo)}
## 2. Start the SuperLink by hand (the first time, to watch it)

    sudo -u {SERVICE_USER} medsilo server start --kit {kit}

It checks the kit, starts the SuperLink with TLS 1.3, node authentication and its database in `state/`,
registers the hospitals' keys and runs until Ctrl-C.

## 3. Run the SuperLink as a service (systemd)

`{SUPERLINK_UNIT}` runs the same command as the `{SERVICE_USER}` account with the kit read-only: only the
kit's `state/`, `flwr/` and `medsilo-runs/` folders and `{RUNS_DIR}` are writable. Install it:

    sudo cp {kit}/{SUPERLINK_UNIT} /etc/systemd/system/
    sudo systemd-analyze verify /etc/systemd/system/{SUPERLINK_UNIT}
    sudo systemctl daemon-reload
    sudo systemctl enable --now {unit}
    journalctl -u {unit} -f

`ExecStart=` starts `{medsilo}`, the medsilo command that wrote this kit; if medsilo is installed elsewhere
here (`command -v medsilo`), edit `/etc/systemd/system/{SUPERLINK_UNIT}` and put that path instead.
`sudo systemctl stop {unit}` stops the SuperLink and every Flower process it started.

## 4. Launch a run

From a medsilo checkout of the release the hospitals run, readable by `{SERVICE_USER}` (the run uploads it as
the app), with the connection the SuperLink wrote in `flwr/`:

    sudo -u {SERVICE_USER} medsilo server run --kit {kit} --app . \\
        -c "dataset='pneumoniamnist' epsilon=8.0 min-sites=2 out-dir='{RUNS_DIR}/r1'"
    sudo -u {SERVICE_USER} medsilo report {RUNS_DIR}/r1      # summary.json, report.md, report.html, plots

- `medsilo server run` submits the run with Flower's `flwr run`, follows its log and exits 0 only when the run
  completed with at least one aggregated round (1 otherwise, with the reasons: every hospital refused, no
  secure sum had enough sites). Flower's own `flwr run --stream` exits 0 either way.
- `out-dir` is where the run's outputs go (metrics, checkpoints, the signed audit log) on this machine. Give
  every run its own folder under `{RUNS_DIR}` (the service may write only there). To continue an
  interrupted run, launch it again with the same settings, the same `out-dir` and `resume=true`.
- The coordinator holds no data: the hospitals validate each model on their records (federated validation),
  and model selection and the decision threshold use their results. The dataset's recipe sets rounds,
  clipping, aggregation and model (the same as `medsilo simulate`); any `-c` setting overrides it.
  `server-eval=true` adds an optional central test set, read from `MEDSILO_DATA` in the service's
  environment.
- `medsilo status --kit {kit}` lists the hospitals (connected, last seen), the runs and the certificate's
  expiry.

## 5. Add or revoke a hospital

On the machine that holds the kits folder (`KITS`):

    medsilo provision --add-site NAME --out KITS        # send KITS/NAME to that hospital over a trusted channel
    medsilo provision --revoke-site NAME --out KITS

then bring the change here: copy `KITS/coordinator/nodes/NAME.pub` to `{kit}/nodes/` (added), or move
`{kit}/nodes/NAME.pub` to `{kit}/revoked/` (revoked), and run

    sudo -u {SERVICE_USER} medsilo server sync --kit {kit}

(or `sudo systemctl restart {unit}`) so the SuperLink sees the change.

## 6. Renew the SuperLink's certificate (before it expires)

`server.crt` is valid for `[coordinator].cert_days` of the federation file (365 days unless set);
`openssl x509 -enddate -noout -in {kit}/server.crt` shows until when. On the machine that holds the kits
folder, with the federation CA's key back in `KITS/ca/ca.key` (mode 0600):

    medsilo provision FEDERATION.toml --out KITS --renew

It signs a new `KITS/coordinator/server.crt` (same key, same host names, same CA) and changes nothing else.
Take `ca.key` offline again, then here:

    sudo install -o {SERVICE_USER} -g {SERVICE_USER} -m 0644 KITS/coordinator/server.crt {kit}/server.crt
    sudo systemctl restart {unit}

Hospitals change nothing: their `ca.crt` trusts the new certificate.

## 7. Verify a run's audit log

    sudo -u {SERVICE_USER} medsilo audit verify {RUNS_DIR}/r1/audit.jsonl --key {kit}/server.crt

Exit code 0: every line intact and signed by this coordinator's key (a renewed certificate keeps the key, so
older logs verify too).
"""
