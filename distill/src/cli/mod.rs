//! The `edgelm-distill` commands, one file per group: each holds its flags (clap `Args`) and
//! the function that runs it.

pub mod checkpoint;
pub mod data;
pub mod eval;
pub mod export;
pub mod sign;
pub mod train;
