//! The trireme binaries: one CLI and one config format over several event models.
//!
//! Output goes through writes that drop errors (`cli::say!`, the log subscriber), never
//! `println!`, which panics on a closed pipe: with `panic = "abort"` that kills every
//! connection.
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod admin;
pub mod cli;
pub mod demo;
pub mod process;
pub mod refresh;
pub mod runtimes;
