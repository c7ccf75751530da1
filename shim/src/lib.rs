//! libbroker.so (placeholder until the shim lands).
