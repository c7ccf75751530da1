//! The exported hooks: thin FFI shells over [`crate::decide`].

pub mod dns;
pub mod exec;
pub mod fallback;
pub mod net;
pub mod tls;
