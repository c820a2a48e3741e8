# The multi-user broker of a JupyterHub GPU node (docs/deploy-jupyterhub.md); put it in a
# Jupyter config directory the broker reads, e.g. /etc/jupyter/mig_kernel_config.py. The tests
# (tests/test_jupyterhub.py) run this file; MIG_HUB_* variables exist for them, with the
# defaults of a production node.
import os
import pwd
from pathlib import Path

c = get_config()  # noqa: F821 (traitlets' config loader defines it)

c.Broker.multi_user = True
c.Broker.identity_provider_class = "mig_kernel.broker.hub_identity.JupyterHubIdentity"
c.JupyterHubIdentity.hub_api_url = os.environ.get(
    "MIG_HUB_API_URL", "http://127.0.0.1:8001/hub/api"
)
token_file = Path(os.environ.get("MIG_HUB_TOKEN_FILE", "/etc/mig-kernel/hub-service-token"))
c.JupyterHubIdentity.api_token = token_file.read_text().strip()

# Hub users who share one OS user (SimpleLocalProcessSpawner runs every server as the hub's
# user; DockerSpawner and KubeSpawner as jovyan): name that user here. Their kernels prove who
# they are with their server's hub token; their executors run as uids of their own
# (JupyterHubIdentity.executor_uids) and reach their kernels over loopback tcp, every message
# signed with the lease key, since those uids cannot map the kernels' shared memory.
shared_user = os.environ.get("MIG_HUB_SHARED_USER", "")
if shared_user:
    c.JupyterHubIdentity.shared_uids = {pwd.getpwnam(shared_user).pw_uid}
    c.Broker.executor_transport = "tcp"
if os.environ.get("MIG_HUB_HOMES"):
    c.JupyterHubIdentity.homes_dir = os.environ["MIG_HUB_HOMES"]
