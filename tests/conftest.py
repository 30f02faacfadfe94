import os

# Parity tests compare float32 math; keep XLA's CPU matmuls exact and the test output quiet.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
