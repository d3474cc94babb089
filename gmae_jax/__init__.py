"""gmae_jax: G-MAE in JAX/Flax."""

import os

# gcsfs (gs:// data and workdirs through etils epath) otherwise probes every bucket for the zonal / HNS
# layout over gRPC first; where gRPC cannot reach storage (a proxy, a firewall, an emulator) each probe
# waits 60 s and is not cached, so a run crawls for many minutes before its first step. Zonal buckets
# are not supported here; set the variable to 'true' to opt back in.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
