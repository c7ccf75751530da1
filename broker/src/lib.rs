//! broker: a credential broker for AI agents.
//!
//! The request pipeline, in order (see `proxy`): accept -> classify -> look up credential ->
//! swap -> forward -> respond -> audit.

pub mod approvals;
pub mod audit;
pub mod audit_queue;
pub mod ca;
pub mod cli;
pub mod control;
pub mod credential_command;
pub mod credentials;
pub mod denials;
pub mod dns;
pub mod embedded_shim;
pub mod form;
pub mod hardening;
pub mod hex;
pub mod home;
pub mod import;
pub mod instance;
mod key_cache;
pub mod launch;
pub mod notify;
pub mod oauth;
pub mod policy;
pub mod procfs;
pub mod providers;
pub mod proxy;
pub mod sandbox;
pub mod selftest;
pub mod system;
#[cfg(test)]
mod test_rng;
pub mod vault;
