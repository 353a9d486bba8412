//! Runnable programs; see `examples/`.
