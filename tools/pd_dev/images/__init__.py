"""`pdctl dev images build`: the operator and runtime images, built here from the project's own
Dockerfiles without any registry, and imported into the real node's containerd.

`plan` is pure (what goes in, the cache keys, the command lines); `host` runs debootstrap,
a private dockerd and ctr; `cli` is the command. See docs/images.md.
"""
