"""Notebook integration: kernel provisioner, kernelspecs, kernel, magics."""
