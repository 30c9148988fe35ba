//! The trireme binaries: one CLI and one config format over several event models.

pub mod admin;
pub mod cli;
pub mod demo;
pub mod l2;
pub mod process;
pub mod refresh;
pub mod runtimes;
