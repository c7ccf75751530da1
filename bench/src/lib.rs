//! What the benchmark (`bench`) and the soak/fault program (`soak`) share: the local origin,
//! the processes they drive (`broker serve`, the origin) and the in-repo client.

pub mod client;
pub mod netem;
pub mod nginx;
pub mod origin;
pub mod procs;
