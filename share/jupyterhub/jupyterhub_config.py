# JupyterHub on one GPU node with mig-kernel (docs/deploy-jupyterhub.md explains each part).
#
# The same file serves both kinds of deployment and is the one the tests run
# (tests/test_jupyterhub.py); the MIG_HUB_* variables exist for them and default to a
# production node:
#   MIG_HUB_SPAWNER    local (hub users are OS users: LocalProcessSpawner) or
#                      shared (hub users share the hub's OS user: SimpleLocalProcessSpawner)
#   MIG_HUB_STATE      directory of the hub's database and cookie secret
#   MIG_HUB_PORT       the public port (the proxy); the hub's own API listens on the next one
#   MIG_HUB_BROKER     the broker's public connection file
#   MIG_HUB_TOKEN_FILE a file holding the broker's service token (root-only, 0600)
#   MIG_HUB_ADMINS     comma-separated hub admins (broker admins too)
#   MIG_HUB_JUPYTER_PATH  where the mig kernelspecs are, if not in the servers' environment
import os
from pathlib import Path

c = get_config()  # noqa: F821 (JupyterHub's config loader defines it)

state = Path(os.environ.get("MIG_HUB_STATE", "/srv/jupyterhub"))
port = int(os.environ.get("MIG_HUB_PORT", "8000"))
broker = os.environ.get("MIG_HUB_BROKER", "/run/mig-kernel/broker.json")
token_file = Path(os.environ.get("MIG_HUB_TOKEN_FILE", "/etc/mig-kernel/hub-service-token"))

c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = port
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = port + 1
c.JupyterHub.db_url = f"sqlite:///{state / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(state / "jupyterhub_cookie_secret")
c.ConfigurableHTTPProxy.pid_file = str(state / "jupyterhub-proxy.pid")

# Who may log in. DummyAuthenticator is for trying this out and for tests: use PAM, OAuth or
# LDAP on a real node (the rest of this file does not change).
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = os.environ.get("MIG_HUB_PASSWORD", "")
c.Authenticator.allow_all = True
c.Authenticator.admin_users = {u for u in os.environ.get("MIG_HUB_ADMINS", "").split(",") if u}

# The broker as a hub service: its token lets it read a user's name, groups and admin flag,
# nothing more (the least scopes it needs). It runs as its own systemd service
# (share/systemd/mig-kernel.service), so the hub does not start it.
c.JupyterHub.services = [{"name": "mig-kernel", "api_token": token_file.read_text().strip()}]
c.JupyterHub.load_roles = [
    {
        "name": "mig-kernel-broker",
        "scopes": ["read:users:name", "read:users:groups"],
        "services": ["mig-kernel"],
    }
]

# Kernels find the node's broker through the kernelspecs (`mig-kernel install-kernelspec
# --multi-user`); MIG_KERNEL_BROKER says it again for any other process of the server.
environment = {"MIG_KERNEL_BROKER": broker}
if os.environ.get("MIG_HUB_JUPYTER_PATH"):
    environment["JUPYTER_PATH"] = os.environ["MIG_HUB_JUPYTER_PATH"]
if os.environ.get("PYTHONPATH"):
    environment["PYTHONPATH"] = os.environ["PYTHONPATH"]

if os.environ.get("MIG_HUB_SPAWNER", "local") == "shared":
    # Every hub user's server runs as the hub's own OS user: the broker tells users apart by
    # their server's API token (c.JupyterHubIdentity.shared_uids names that uid).
    c.JupyterHub.spawner_class = "simple"
    c.Spawner.args = ["--allow-root"] if os.geteuid() == 0 else []
else:
    # Hub users are OS users (created by the administrator, or by the authenticator): the
    # broker identifies their kernels by uid, and their executors run as them.
    c.JupyterHub.spawner_class = "localprocess"
c.Spawner.environment = environment
c.Spawner.default_url = "/lab"
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 120
