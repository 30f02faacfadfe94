import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Compile time dominates this suite on 2 cores: skip LLVM's expensive optimisation passes. XLA's float semantics
# are unchanged (no fast-math), so every parity tolerance still applies.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
# Conversion caches and the persistent compilation cache go to a per-user temporary folder, never ~/.cache;
# shared by the test workers, so a shape compiled by one is reused by the others.
os.environ.setdefault("SVD_JAX_CACHE", os.path.join(tempfile.gettempdir(), f"svd_jax-tests-{os.getuid()}"))
# Only programs that take over a second to compile are worth writing to that cache here (svd_jax's 0.1 s default
# suits a GPU process's start, but writing every small CPU program costs this suite about 8%).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1.0")
