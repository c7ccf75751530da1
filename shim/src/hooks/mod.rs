//! The exported hooks: thin FFI shells over [`crate::decide`].

pub mod net;
pub mod tls;
