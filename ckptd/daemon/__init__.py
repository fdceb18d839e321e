"""The sidecar daemon (never imports torch): IPC, GPU and host health, hang detection, uploads."""
